"""Pieces every training script shares: optimizer, LR schedule, per-step seeding, resumable batches."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler

from utils.config import ConfigError, TrainingConfig
from utils.distributed import gather_objects, is_distributed

LR_SCHEDULES = ("constant", "linear", "cosine", "one_cycle")


def build_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def compile_if_asked(model: torch.nn.Module, cfg: TrainingConfig) -> torch.nn.Module:
    """With training.compile, torch.compile the model in place (nn.Module.compile): it stays the same module, so
    state_dict keys, checkpoints, EMA and exports are those of the plain model (no `_orig_mod.` prefix).

    Static shapes: each input shape (training batch, validation batch, a progressive phase's image size) compiles
    once; symbolic sizes would break the random draws inside models, such as a KL autoencoder's posterior sample.
    """
    if cfg.compile:
        model.compile(backend=cfg.compile_backend, dynamic=False)
    return model


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of training.lr at `step`: linear warm-up, then the chosen decay to zero at max_steps."""
    if cfg.lr_schedule == "one_cycle":
        # Smith & Topin 2019: cosine ramp up to the peak over the warm-up, cosine anneal down afterwards.
        warmup = max(cfg.lr_warmup_steps, 1)
        if step < warmup:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * step / warmup))
        progress = min((step - warmup) / max(cfg.max_steps - warmup, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    progress = min((step - cfg.lr_warmup_steps) / max(cfg.max_steps - cfg.lr_warmup_steps, 1), 1.0)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"training.lr_schedule='{cfg.lr_schedule}' is not one of {list(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's global RNG from (seed, step, rank) alone.

    Noise, timesteps, condition dropout, flips and dropout then depend only on the step, so a resumed run
    draws exactly what an uninterrupted one would, without saving RNG states.
    """
    torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank)


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches of indices; epoch e is a permutation (or a weighted draw) seeded by (seed, e).

    Each global batch is split between ranks, so ranks see different samples, and micro-batch k is a pure
    function of k: resuming at k needs no saved sampler state.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0,
                 weights: Optional[torch.Tensor] = None):
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise ConfigError(f"the training set has {num_items} items, fewer than one global batch "
                              f"(training.batch_size={batch_size} x {world_size} processes)")
        self.num_items, self.batch_size, self.rank = num_items, batch_size, rank
        self.global_batch, self.seed, self.start = global_batch, seed, start
        self.batches_per_epoch = num_items // global_batch  # the incomplete last batch is dropped
        # Per-item sampling weights (class-balanced sampling): an epoch draws num_items with replacement.
        self.weights = weights

    def __iter__(self):
        k, order_epoch = self.start, None
        while True:
            epoch, offset = divmod(k, self.batches_per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                if self.weights is None:
                    order = torch.randperm(self.num_items, generator=generator)
                else:
                    order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=generator)
                order_epoch = epoch
            begin = offset * self.global_batch + self.rank * self.batch_size
            yield order[begin:begin + self.batch_size].tolist()
            k += 1

    def __len__(self) -> int:
        return 2 ** 62  # endless


class TrainingDiverged(RuntimeError):
    pass


class NonFiniteGuard:
    """Skipped steps: each non-finite loss or gradient is counted in state["nonfinite_steps"]; `limit` in a row
    stop the run (the last checkpoint, written before them, stays the newest)."""

    def __init__(self, state: dict, limit: int, checkpoints, hint: str):
        self.state, self.limit, self.checkpoints, self.hint = state, limit, checkpoints, hint
        self.in_a_row = 0

    def record(self, finite: bool, step: int, logger) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.state["nonfinite_steps"] += 1
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.in_a_row} consecutive steps had a non-finite loss or "
                f"gradient; the last good checkpoint is kept in {self.checkpoints} ({self.hint})")


WORST_BATCH = "worst_batch"  # RunningMeans.state_dict() key of the worst micro-batch since the last log


class RunningMeans:
    """Per-metric sums and step counts kept on the device between logs, so logging syncs once per log.

    A metric counts only the steps that reported it (e.g. a GAN loss from its start step); the sums go into
    checkpoints, so a resumed run logs exactly the averages an uninterrupted one would.
    """

    def __init__(self, device, saved: Optional[dict] = None):
        self.device = device
        saved = dict(saved or {})
        worst = saved.pop(WORST_BATCH, None)
        self.sums = {k: (torch.tensor(total, device=device), n) for k, (total, n) in saved.items()}
        # (mean loss on the device, item ids) of each micro-batch since the last log (see add_batch).
        self.batches = [(torch.tensor(worst["loss"], device=device), worst["items"])] if worst else []

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            total, n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (total + value, n + 1)

    def add_counted(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add (sum, count) pairs: the metric becomes a mean over what was counted (e.g. samples in a time
        quartile), not over steps; counts stay on the device too."""
        for name, (value, count) in values.items():
            total, n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (total + value, n + count)

    def pop_means(self) -> dict[str, float]:
        """The averages since the last call (metrics with nothing counted left out), then start again."""
        counts = {name: float(n) for name, (_, n) in self.sums.items()}
        means = {name: float(total) / counts[name] for name, (total, _) in self.sums.items() if counts[name] > 0}
        self.sums = {}
        return means

    def add_batch(self, loss: torch.Tensor, item_ids: list[str]) -> None:
        """Remember a micro-batch's mean loss and its items: the worst since the last log is logged by id."""
        self.batches.append((loss.detach().float(), list(item_ids)))

    def pop_worst_batch(self) -> dict:
        """{"worst_batch_loss", "worst_batch_items" (space-separated ids)} of the micro-batch with the highest loss
        on any process since the last call, then start again. Every process must call it (it gathers)."""
        worst = self._worst_everywhere()
        self.batches = []
        if worst is None:
            return {}
        return {"worst_batch_loss": worst["loss"], "worst_batch_items": " ".join(worst["items"])}

    def _worst_everywhere(self) -> Optional[dict]:
        local = None
        if self.batches:
            # Finite losses only, as in the averages: skipped steps are counted in train/nonfinite_steps, and
            # DEBUG logging names every micro-batch's items.
            losses = torch.stack([loss for loss, _ in self.batches])
            losses = torch.where(losses.isfinite(), losses, -math.inf)
            index = int(losses.argmax())  # one host sync
            if math.isfinite(float(losses[index])):
                local = {"loss": float(losses[index]), "items": self.batches[index][1]}
        candidates = [c for c in gather_objects(local) if c is not None]
        return max(candidates, key=lambda c: c["loss"], default=None)

    def state_dict(self) -> dict:
        """Sums and counts, and the worst batch over all processes so far (every process must call it)."""
        state = {name: [float(total), float(n)] for name, (total, n) in self.sums.items()}
        worst = self._worst_everywhere() if self.batches or is_distributed() else None
        if worst is not None:
            state[WORST_BATCH] = worst
        return state


def training_batches(dataset, cfg: TrainingConfig, data_cfg, accelerator, seed: int, step: int,
                     weights: Optional[torch.Tensor] = None):
    """Endless collated training batches from optimizer step `step` on (micro-batch k = step * accum + ...)."""
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, accelerator.process_index,
                                    accelerator.num_processes, seed, start=step * cfg.grad_accum_steps,
                                    weights=weights)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=data_cfg.num_workers,
                           pin_memory=accelerator.device.type == "cuda"))
