"""Checkpoints: full training state as safetensors + weights-only tensors + JSON, written atomically.

`checkpoints/checkpoint-<step>/` holds model.safetensors, ema.safetensors, optimizer.pt (tensors only, loaded
with weights_only=True), lr_scheduler.json and state.json; each further trained network (e.g. a GAN
discriminator) adds <name>.safetensors, <name>_optimizer.pt and <name>_lr_scheduler.json. Every file is written
into a hidden temporary folder that is renamed into place last, so a folder named `checkpoint-<step>` is always
complete and a process killed while saving leaves the previous checkpoint as the newest one.
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

from utils.config import ConfigError, to_yaml
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


def prepare_run_dir(run_dir: Path, resume_from: Optional[Path], cfg, is_main: bool) -> None:
    """Refuse to start a fresh run on top of an existing one; keep the previous config when it changes."""
    existing = [n for n in ("metrics.csv", "checkpoints", "final") if (run_dir / n).exists()]
    if resume_from is None and existing:
        raise ConfigError(f"run.output_dir={run_dir} already holds a run ({', '.join(existing)}) and there is no "
                          "checkpoint to resume; choose another run.output_dir or training.resume=auto")
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    new_text, saved = to_yaml(cfg), run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != new_text:
        saved.rename(run_dir / f"config-before-step-{resume_from.name.split('-')[-1]}.yaml")
    saved.write_text(new_text)


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


def _files_of(name: str) -> tuple[str, str, str]:
    """Weights, optimizer and LR-schedule file names of a trained network ("" = the main model)."""
    if not name:
        return "model.safetensors", "optimizer.pt", "lr_scheduler.json"
    return f"{name}.safetensors", f"{name}_optimizer.pt", f"{name}_lr_scheduler.json"


def save_checkpoint(accelerator, root: Path, step: int, model, optimizer, lr_scheduler, ema, state: dict,
                    keep_last: int, extra: Optional[dict[str, tuple]] = None) -> Optional[Path]:
    """Save everything needed for an exact resume; every rank must call this (state dicts may be gathered).

    Args:
        extra: further networks trained beside `model`, name -> (model, optimizer, lr_scheduler).
    """
    parts = {name: (get_model_state_dict(net, options=_full_state_options()),
                    get_optimizer_state_dict(net, opt, options=_full_state_options()), sched.state_dict())
             for name, (net, opt, sched) in {"": (model, optimizer, lr_scheduler), **(extra or {})}.items()}
    ema_state = ema.full_state_dict(model) if ema is not None else None
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        tmp = root / f"{TEMP_PREFIX}checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, (net_state, optim_state, sched_state) in parts.items():
            weights_file, optim_file, sched_file = _files_of(name)
            save_file({k: v.contiguous() for k, v in net_state.items()}, tmp / weights_file)
            torch.save(optim_state, tmp / optim_file)
            (tmp / sched_file).write_text(json.dumps(sched_state))
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model, optimizer, lr_scheduler, ema,
                    extra: Optional[dict[str, tuple]] = None) -> dict:
    """Restore the state saved by `save_checkpoint` into prepared objects; returns state.json's dict.

    Args:
        extra: the same name -> (model, optimizer, lr_scheduler) as given to `save_checkpoint`.
    """
    try:
        for name, (net, opt, sched) in {"": (model, optimizer, lr_scheduler), **(extra or {})}.items():
            weights_file, optim_file, sched_file = _files_of(name)
            set_model_state_dict(net, load_file(path / weights_file), options=_load_options())
            optim_state = torch.load(path / optim_file, map_location="cpu", weights_only=True)
            set_optimizer_state_dict(net, opt, optim_state, options=_load_options())
            sched.load_state_dict(json.loads((path / sched_file).read_text()))
        if ema is not None:
            ema.load_full_state_dict(model, load_file(path / "ema.safetensors"))
        return json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot resume from {path}: {str(error).splitlines()[0]}") from None
