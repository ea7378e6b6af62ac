"""Checkpoints: full training state as safetensors + weights-only tensors + JSON, written atomically.

`checkpoints/checkpoint-<step>/` holds model.safetensors, ema.safetensors, optimizer.pt (tensors only, loaded
with weights_only=True), lr_scheduler.json and state.json. Every file is written into a hidden temporary folder
that is renamed into place last, so a folder named `checkpoint-<step>` is always complete and a process killed
while saving leaves the previous checkpoint as the newest one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from utils.config import ConfigError
from utils.logging import get_logger

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-"
logger = get_logger()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """`training.resume`: auto/latest -> newest complete checkpoint (auto tolerates none), never, or a path."""
    if resume == "never":
        return None
    if resume in ("auto", "latest"):
        found = list_checkpoints(root)
        if not found and resume == "latest":
            raise ConfigError(f"training.resume=latest but {root} holds no complete checkpoint")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"training.resume={resume}: not a complete checkpoint folder (no state.json)")
    return path


def remove_incomplete(root: Path) -> None:
    """Delete temporary folders left by a process killed while saving."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TEMP_PREFIX):
                logger.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)


def _full_state_options() -> StateDictOptions:
    # Full (unsharded) tensors on the CPU: the same files serve 1 GPU, DDP and FSDP, and any world size.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options() -> StateDictOptions:
    # A full state dict is broadcast from rank 0 under torch.distributed; a single process loads it directly.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return StateDictOptions(full_state_dict=distributed, broadcast_from_rank0=distributed)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, root: Path, step: int, model, optimizer, lr_scheduler, ema, state: dict,
                    keep_last: int) -> Optional[Path]:
    """Save everything needed for an exact resume; every rank must call this (state dicts may be gathered)."""
    model_state = get_model_state_dict(model, options=_full_state_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    ema_state = ema.full_state_dict(model) if ema is not None else None
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        tmp = root / f"{TEMP_PREFIX}checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model, optimizer, lr_scheduler, ema) -> dict:
    """Restore the state saved by `save_checkpoint` into prepared objects; returns state.json's dict."""
    try:
        set_model_state_dict(model, load_file(path / "model.safetensors"), options=_load_options())
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=_load_options())
        lr_scheduler.load_state_dict(json.loads((path / "lr_scheduler.json").read_text()))
        if ema is not None:
            ema.load_full_state_dict(model, load_file(path / "ema.safetensors"))
        return json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot resume from {path}: {str(error).splitlines()[0]}") from None
