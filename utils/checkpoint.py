"""Checkpoints: full training state as safetensors + weights-only tensors + JSON, written atomically.

`checkpoints/checkpoint-<step>/` holds model.safetensors, ema.safetensors, optimizer.pt (tensors only, loaded
with weights_only=True), lr_scheduler.json and state.json; each further trained network (e.g. a GAN
discriminator) adds <name>.safetensors, <name>_optimizer.pt and <name>_lr_scheduler.json. Every file is written
into a hidden temporary folder that is renamed into place last, so a folder named `checkpoint-<step>` is always
complete and a process killed while saving leaves the previous checkpoint as the newest one. Files and folders
are fsynced before the rename, so a folder that exists after a node crash also holds its data; a checkpoint
that cannot be read anyway (a truncated file) is skipped on resume in favour of the one before it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from utils.config import ConfigError
from utils.distributed import full_state_options, load_options
from utils.logging import get_logger

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = f"{TEMP_PREFIX}old-"  # a folder being replaced, kept until its successor is in place
logger = get_logger()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def unreadable_reason(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be restored (a missing, truncated or corrupt file), or None.

    Cheap structural checks that read headers, not tensors: a safetensors header must describe exactly the
    bytes on disk, a torch zip must have its central directory and every member inside the file, JSON must
    parse. Every rank reaches the same verdict on the same files, so they all resume from the same step.
    """
    if not (folder / "state.json").is_file():
        return "no state.json"
    try:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".safetensors":
                with path.open("rb") as f:
                    (header_size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_size))
                end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
                if path.stat().st_size != 8 + header_size + end:
                    return f"{path.name} is truncated"
            elif path.suffix == ".pt":
                with zipfile.ZipFile(path) as archive:
                    size = path.stat().st_size
                    if any(i.header_offset + i.compress_size > size for i in archive.infolist()):
                        return f"{path.name} is truncated"
            elif path.suffix == ".json":
                json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile) as error:
        return f"{path.name}: {first_line(error)}"
    return None


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """`training.resume`: auto/latest -> newest readable checkpoint (auto tolerates none), never, or a path.

    A newest checkpoint that cannot be read (e.g. files cut short by a node crash) is skipped with a warning
    and the one before it is used.
    """
    if resume == "never":
        return None
    if resume in ("auto", "latest"):
        for folder in reversed(list_checkpoints(root)):
            reason = unreadable_reason(folder)
            if reason is None:
                return folder
            logger.warning("skipping checkpoint %s: %s; trying the one before it", folder, reason)
        if resume == "latest":
            raise ConfigError(f"training.resume=latest but {root} holds no complete checkpoint")
        return None
    path = Path(resume)
    reason = unreadable_reason(path) if path.is_dir() else "not a folder"
    if reason is not None:
        raise ConfigError(f"training.resume={resume}: not a readable checkpoint folder ({reason})")
    return path


def restore_interrupted_replacements(folder: Path) -> None:
    """Finish or undo folder replacements a killed process left half done, and delete unfinished writes.

    `.tmp-old-<name>` is the previous version of `<name>` moved aside while its successor was renamed into
    place: when `<name>` is missing the kill came between the two renames, so the old version is restored.
    Any other `.tmp-*` entry is an unfinished write and is removed.
    """
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if p.name.startswith(OLD_PREFIX):
            target = folder / p.name[len(OLD_PREFIX):]
            if target.exists():
                logger.warning("removing %s, replaced by %s", p, target)
                shutil.rmtree(p, ignore_errors=True)
            else:
                logger.warning("restoring %s, interrupted while being replaced", target)
                os.replace(p, target)
        elif p.name.startswith(TEMP_PREFIX):
            logger.warning("removing incomplete %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def bare_module(net: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP and torch.compile wrappers (FSDP2 shards in place and has no wrapper).

    State dicts are read and written on it, so keys never carry `module.` or `_orig_mod.` prefixes and a
    checkpoint written by N processes loads into 1 and back (a DDP wrapper would expect prefixed keys).
    """
    while True:
        if isinstance(net, DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def bare_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer under Accelerate's wrapper: restoring state runs a step with zero gradients to create it,
    which through the wrapper would go through the fp16 loss scaler and fail before any backward."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def first_line(error: BaseException) -> str:
    """The first informative line of an error; load_state_dict's first line is only a header ending in ':'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(error).__name__


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's data to disk (a folder's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_folder(tmp: Path, final: Path) -> None:
    """Durably move a fully written temporary folder into place, replacing any folder of the same name.

    The files and the folder are fsynced before the rename and the parent after it, so what a crash leaves
    named `final` is complete. An existing `final` is moved aside first and deleted only once its successor
    is in place, so at every instant one complete version exists (see `restore_interrupted_replacements`).
    """
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(tmp)
    old = final.with_name(f"{OLD_PREFIX}{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files_of(name: str) -> tuple[str, str, str]:
    """Weights, optimizer and LR-schedule file names of a trained network ("" = the main model)."""
    if not name:
        return "model.safetensors", "optimizer.pt", "lr_scheduler.json"
    return f"{name}.safetensors", f"{name}_optimizer.pt", f"{name}_lr_scheduler.json"


SCALER_FILE = "grad_scaler.json"  # fp16 loss-scaler state: scale and growth tracker


def save_checkpoint(accelerator, root: Path, step: int, model, optimizer, lr_scheduler, ema, state: dict,
                    keep_last: int, extra: Optional[dict[str, tuple]] = None) -> Optional[Path]:
    """Save everything needed for an exact resume; every rank must call this (state dicts may be gathered).

    Args:
        extra: further networks trained beside `model`, name -> (model, optimizer, lr_scheduler).
    """
    parts = {}
    for name, (net, opt, sched) in {"": (model, optimizer, lr_scheduler), **(extra or {})}.items():
        net, opt = bare_module(net), bare_optimizer(opt)
        parts[name] = (get_model_state_dict(net, options=full_state_options()),
                       get_optimizer_state_dict(net, opt, options=full_state_options()), sched.state_dict())
    ema_state = ema.full_state_dict(bare_module(model)) if ema is not None else None
    scaler = getattr(accelerator, "scaler", None)
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
        if scaler is not None:
            (tmp / SCALER_FILE).write_text(json.dumps(scaler.state_dict()))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        commit_folder(tmp, final)  # the same step saved again (the last step after a resume) replaces it
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model, optimizer, lr_scheduler, ema,
                    extra: Optional[dict[str, tuple]] = None, scaler=None) -> dict:
    """Restore the state saved by `save_checkpoint` into prepared objects; returns state.json's dict.

    Args:
        extra: the same name -> (model, optimizer, lr_scheduler) as given to `save_checkpoint`.
        scaler: the fp16 loss scaler (`accelerator.scaler`), restored so a resume does not settle it again.
    """
    try:
        for name, (net, opt, sched) in {"": (model, optimizer, lr_scheduler), **(extra or {})}.items():
            net, opt = bare_module(net), bare_optimizer(opt)
            weights_file, optim_file, sched_file = _files_of(name)
            set_model_state_dict(net, load_file(path / weights_file), options=load_options())
            optim_state = torch.load(path / optim_file, map_location="cpu", weights_only=True)
            # Not strict: parameters that never had a gradient (the label denoiser while a classification run's
            # first stage trains) have no optimizer state yet.
            set_optimizer_state_dict(net, opt, optim_state, options=load_options(strict=False))
            sched.load_state_dict(json.loads((path / sched_file).read_text()))
        if ema is not None:
            ema.load_full_state_dict(bare_module(model), load_file(path / "ema.safetensors"))
        if scaler is not None and (path / SCALER_FILE).is_file():
            scaler.load_state_dict(json.loads((path / SCALER_FILE).read_text()))
        return json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot resume from {path}: {first_line(error)}") from None
