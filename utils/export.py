"""Diffusers-format exports: `final/` and `checkpoints/best-<metric>/`, each written atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers
import yaml

from models.unet2d import save_denoiser
from utils.checkpoint import TEMP_PREFIX


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def export_final(folder: Path, denoiser, strategy, task_info: dict, pipeline_class: str = "", vae=None) -> Path:
    """Write unet/, scheduler/, task.yaml (and model_index.json when a stock pipeline can sample the model).

    Args:
        denoiser: the unwrapped `Denoiser` (EMA weights already swapped in).
        task_info: what a user needs to feed the model: targets, conditions, channels, normalisation.
        pipeline_class: e.g. "DDIMPipeline" for an unconditional DDPM model; "" writes no model_index.json.
        vae: the frozen autoencoder of a latent diffusion model, written to vae/.
    """
    tmp = folder.with_name(f"{TEMP_PREFIX}{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_denoiser(denoiser, tmp)
    strategy.export_scheduler(tmp / "scheduler")
    if vae is not None:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / "task.yaml").write_text(yaml.safe_dump(task_info, sort_keys=False))
    if pipeline_class:
        scheduler_class = json.loads((tmp / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", type(denoiser.unet).__name__], "scheduler": ["diffusers", scheduler_class]}, indent=2))
    replace_dir(tmp, folder)
    return folder


def export_weights(folder: Path, denoiser, info: dict) -> Path:
    """Weights only (e.g. best-val_loss): unet/ in diffusers format plus metric.json saying why it was kept."""
    tmp = folder.with_name(f"{TEMP_PREFIX}{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_denoiser(denoiser, tmp)
    (tmp / "metric.json").write_text(json.dumps(info, indent=2))
    replace_dir(tmp, folder)
    return folder
