"""Helpers for splitting work across processes exactly once and gathering the results."""
from __future__ import annotations

import os

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions

from utils.config import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_state_options() -> StateDictOptions:
    """Full (unsharded) tensors on the CPU: the same files serve 1 GPU, DDP and FSDP, and any world size."""
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def load_options(strict: bool = True) -> StateDictOptions:
    """A full state dict is broadcast from rank 0 under torch.distributed; a single process loads it directly."""
    return StateDictOptions(full_state_dict=is_distributed(), broadcast_from_rank0=is_distributed(), strict=strict)


def shard(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous block of global item indices for this rank; every item lands on exactly one rank."""
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


def gather_objects(obj) -> list:
    """Every rank's object, in rank order (a list of one item without torch.distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(*tensors) -> None:
    """Sum each tensor in place over all ranks (nothing without torch.distributed)."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)


def broadcast_from_rank0(tensor) -> None:
    """Overwrite the tensor in place with rank 0's (nothing without torch.distributed)."""
    if is_distributed():
        dist.broadcast(tensor, 0)


def check_launch(accelerator) -> None:
    """Stop when the launcher started several processes but they do not form one group.

    On a CPU-only machine `accelerate launch --multi_gpu` without ACCELERATE_USE_CPU=1 starts N processes that
    each train alone on the same data; that silently wastes the compute and writes the run directory N times.
    """
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {expected} processes but Accelerate sees {accelerator.num_processes}: they would "
            "train independently. On CPU use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N")
