"""Sampling with per-item seeds: a sample depends on its global item index, not on batch size or process count."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from diffusion.task import Task


def item_noise(shape: Sequence[int], item_indices: Sequence[int], seed: int, device) -> torch.Tensor:
    """Standard normal noise (B, *shape) where row i is seeded by (seed, item_indices[i]) alone."""
    rows = []
    for index in item_indices:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows).to(device)


def item_uniform(item_indices: Sequence[int], seed: int, device) -> torch.Tensor:
    """One uniform number in [0, 1) per item, seeded by (seed, item index) alone (B,)."""
    values = [torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_033 + int(i))) for i in item_indices]
    return torch.stack(values).to(device)


@torch.no_grad()
def generate(strategy, net, task: Task, batch: dict, item_indices: Sequence[int], seed: int, steps: int,
             device, guidance_scale: float = 1.0, callback: Optional[Callable] = None) -> torch.Tensor:
    """Sample the task's targets for a batch of items. Returns x0 (B, C, *spatial) in the normalised space.

    Args:
        batch: collated items on `device` (conditions are read from it; targets are not used).
        item_indices: global index of each item, which seeds its noise.
    """
    noise = item_noise(task.sample_shape, item_indices, seed, device)
    cond = task.condition_of(batch)
    null_cond = task.null_condition(cond) if guidance_scale != 1.0 else None
    return strategy.sample(net, noise, cond, steps, guidance_scale=guidance_scale, null_cond=null_cond,
                           callback=callback)
