"""Exponential moving average of model weights, kept in the model's own parameter layout.

The shadow tensors mirror `model.parameters()` one to one, so the same code serves a plain model, DDP and FSDP
(where each rank averages its own shards). Validation and export swap the averaged weights in and back out.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from utils.distributed import full_state_options, load_options


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def current_decay(self, step: int) -> float:
        # Warm-up: early weights are mostly noise, so average over roughly the last `step` updates at first.
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.current_decay(step))

    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module, parameters) -> None:
        """Load the average of `parameters` (some of `model`'s) into them: for a part frozen from now on, whose
        weights then equal their average for good."""
        chosen = {id(p) for p in parameters}
        for p, s in zip(model.parameters(), self.shadow):
            if id(p) in chosen:
                p.copy_(s)

    @contextmanager
    @torch.no_grad()
    def swapped(self, model: torch.nn.Module):
        """Temporarily put the averaged weights into `model` (for validation and export)."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        for p, s in zip(params, self.shadow):
            p.copy_(s)
        try:
            yield model
        finally:
            for p, b in zip(params, backup):
                p.copy_(b)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        with self.swapped(model):
            state = get_model_state_dict(model, options=full_state_options())
            # On the CPU the state dict shares storage with the parameters, which the swap-out overwrites.
            return {k: v.clone() for k, v in state.items()}

    @torch.no_grad()
    def load_full_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore the average from a full state dict (as `full_state_dict` wrote it); the model is unchanged."""
        with self.swapped(model):
            set_model_state_dict(model, state, options=load_options())
            self.shadow = [p.detach().clone() for p in model.parameters()]
