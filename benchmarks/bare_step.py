"""The bare training step the benchmarks time: train_diffusion.py's optimizer step without its loop."""
from __future__ import annotations

import time

import torch
from torch.utils.data import default_collate

from utils.training import build_optimizer


def collated_batches(dataset, batch_size: int, count: int) -> list[dict]:
    """`count` collated batches of consecutive items, wrapping around: in memory, so no data loading is timed."""
    return [default_collate([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)])
            for i in range(count)]


def mean_step_seconds(model, task, strategy, batches: list[dict], cfg, steps: int, warmup: int) -> float:
    """Mean seconds of one optimizer step (one micro-batch: the strategy's loss reduced by the task, backward,
    gradient clipping with the loop's one host sync, AdamW) over `steps`, after `warmup` untimed steps."""
    optimizer = build_optimizer(model.parameters(), cfg.training)
    max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
    torch.manual_seed(cfg.run.seed)  # the noise and times the loss draws
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        elementwise, _ = strategy.loss_terms(model, task.targets_of(batch),
                                             task.condition_of(batch, cfg.task.cond_drop_prob))
        per_sample, _ = task.reduce(elementwise, batch)
        per_sample.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        bool(torch.isfinite(grad_norm))  # the loop's one host sync per step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps
