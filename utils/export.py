"""Diffusers-format exports: `final/` and `checkpoints/best-<metric>/`, each written atomically.

Every process calls an export. The weights are gathered into a full state dict collectively (under FSDP each
rank holds shards) and rank 0 alone writes them, as diffusers' save_pretrained lays them out (config.json plus
diffusion_pytorch_model.safetensors), without calling save_pretrained on a module that may be sharded.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import diffusers
import torch.distributed as dist
import yaml
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from models.unet2d import VECTOR_EMBEDDING_FILE
from utils.checkpoint import TEMP_PREFIX, commit_folder
from utils.distributed import full_state_options, is_distributed


def gather_full_state(module) -> dict:
    """Full CPU tensors of `module` on rank 0 ({} on the others); every rank must call it (shards are gathered)."""
    return get_model_state_dict(module, options=full_state_options())


def write_on_rank0(folder: Path, write: Callable[[Path], None]) -> Path:
    """Rank 0 runs write(tmp) into a temporary folder that then replaces `folder`; every rank waits for it."""
    if not is_distributed() or dist.get_rank() == 0:
        tmp = folder.with_name(f"{TEMP_PREFIX}{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        commit_folder(tmp, folder)
    if is_distributed():
        dist.barrier()
    return folder


def save_diffusers_model(model, state: dict, folder: Path) -> None:
    """What `model.save_pretrained(folder)` writes, from a gathered state dict (`model` gives the config only)."""
    model.save_config(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / SAFETENSORS_WEIGHTS_NAME,
              metadata={"format": "pt"})


def _save_denoiser(denoiser, state: dict, folder: Path) -> None:
    """`unet/` in diffusers format plus the vector-condition table (read back by models.unet2d.load_denoiser); a
    label-diffusion classifier writes its own files (models.classifier.LabelDiffusionClassifier.save_export)."""
    if hasattr(denoiser, "save_export"):
        denoiser.save_export(state, folder)
        return
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    save_diffusers_model(denoiser.unet, unet, folder / "unet")
    if denoiser.vector_embedding is not None:
        save_file({"weight": state["vector_embedding"].contiguous()}, folder / VECTOR_EMBEDDING_FILE)


def export_final(folder: Path, denoiser, strategy, task_info: dict, pipeline_class: str = "", vae=None,
                 card: str = "") -> Path:
    """Write unet/, scheduler/, task.yaml, the model card README.md (and model_index.json when a stock pipeline can
    sample the model).

    Args:
        denoiser: the unwrapped `Denoiser`, possibly sharded (EMA weights already swapped in).
        task_info: what a user needs to feed the model: targets, conditions, channels, normalisation.
        pipeline_class: e.g. "DDIMPipeline" for an unconditional pixel-space DDPM model; "" writes no
            model_index.json.
        vae: the frozen autoencoder of a latent diffusion model, written to vae/.
        card: the model card (utils.model_card), written as README.md.
    """
    state = gather_full_state(denoiser)
    vae_state = gather_full_state(vae) if vae is not None else None

    def write(tmp: Path) -> None:
        _save_denoiser(denoiser, state, tmp)
        strategy.export_scheduler(tmp / "scheduler")
        if vae is not None:
            save_diffusers_model(vae, vae_state, tmp / "vae")
        (tmp / "task.yaml").write_text(yaml.safe_dump(task_info, sort_keys=False))
        if card:
            (tmp / "README.md").write_text(card)
        if pipeline_class:
            scheduler_class = json.loads((tmp / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", type(denoiser.unet).__name__], "scheduler": ["diffusers", scheduler_class]},
                indent=2))

    return write_on_rank0(folder, write)


def export_weights(folder: Path, denoiser, info: dict) -> Path:
    """Weights only (e.g. best-val_loss): unet/ in diffusers format plus metric.json saying why it was kept.
    Every rank calls it (see `export_final`)."""
    state = gather_full_state(denoiser)

    def write(tmp: Path) -> None:
        _save_denoiser(denoiser, state, tmp)
        (tmp / "metric.json").write_text(json.dumps(info, indent=2))

    return write_on_rank0(folder, write)


def exported_step(run_dir: Path, weights: str) -> Optional[int]:
    """The training step of the weights that eval.weights names, where the run records it (None otherwise):
    best-<metric>/metric.json, a checkpoint folder's state.json; final/ is exported at the last step the run
    logged, which metrics.csv holds."""
    if weights == "final":
        metrics_csv = run_dir / "metrics.csv"
        if not metrics_csv.is_file():
            return None
        with metrics_csv.open(newline="") as handle:
            steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("step", "").isdigit()]
        return max(steps, default=None)
    folder = run_dir / "checkpoints" / weights if weights.startswith("best-") else Path(weights)
    for record in (folder / "metric.json", folder / "state.json"):
        if record.is_file():
            step = json.loads(record.read_text()).get("step")
            return int(step) if isinstance(step, int) else None
    return None
