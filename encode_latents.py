"""Pre-compute a latent cache with a frozen autoencoder, split across all processes.

    accelerate launch encode_latents.py --config configs/demo_pathology_ldm.yaml [section.key=value ...]

Reads the source data the preset's data section describes (data.kind of the source = latent.source_kind),
encodes it with latent.autoencoder and writes latent.cache_dir, which the same preset's training reads.
Shards are assigned to processes round-robin; rerunning skips finished shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from data import build_datasets
from data.latent_cache import (FORMAT_VERSION, LATENT_SUFFIX, MANIFEST, check_held_out, masks_at_latent_size,
                                read_shard_tensor, shard_name)
from diffusion.task import fields_from_config
from models.autoencoder import FrozenAutoencoder, check_codebook_scaling, latent_scaling
from utils import config as config_lib
from utils.checkpoint import atomic_write_text
from utils.config import ConfigError
from utils.distributed import check_launch
from utils.logging import setup_logging
from utils.metrics import psnr

CACHE_IDENTITY = ".cache_identity.json"  # what the shards in the folder were encoded from


def plan_shards(datasets: dict, shard_size: int) -> list[dict]:
    """Consecutive items of one split per shard, splits in train/val/test order: the cache's global order."""
    shards = []
    for split in ("train", "val", "test"):
        if split not in datasets:
            continue
        ids = datasets[split].item_ids
        for start in range(0, len(ids), shard_size):
            shards.append({"file": shard_name(len(shards)), "split": split, "start": start,
                           "items": ids[start:start + shard_size]})
    return shards


def latents_of(inputs: list[str], encode_each: list[str]) -> dict[str, list[str]]:
    """Latent name -> the images encoded into it: "latent" <- the inputs together, or "<image>_latent" <- each."""
    if encode_each:
        return {f"{name}{LATENT_SUFFIX}": [name] for name in encode_each}
    return {"latent": list(inputs)}


@torch.no_grad()
def encode_shard(autoencoder, dataset, shard: dict, latents: dict[str, list[str]], fields: dict,
                 batch_size: int) -> dict:
    """Tensors of one shard: raw latents, conditions at latent size, vectors, pixels of held-out items."""
    f = autoencoder.downsample_factor
    inputs = [name for names in latents.values() for name in names]
    parts: dict[str, list] = {}
    for start in range(0, len(shard["items"]), batch_size):
        indices = range(shard["start"] + start, shard["start"] + min(start + batch_size, len(shard["items"])))
        batch = default_collate([dataset[i] for i in indices])
        out = {latent: autoencoder.encode(torch.cat([batch[n] for n in names], dim=1)).cpu()
               for latent, names in latents.items()}
        for name, field in fields.items():
            if field.kind == "mask":
                out[name] = masks_at_latent_size(batch[name], field.channels, f).to(torch.int16)
            elif field.kind == "vector":
                out[name] = batch[name].float()
        if shard["split"] != "train":  # references for scoring samples in pixel space
            out.update({name: batch[name].to(torch.float16) for name in inputs})
        for name, value in out.items():
            parts.setdefault(name, []).append(value.contiguous())
    return {name: torch.cat(values) for name, values in parts.items()}


def write_shard(path: Path, tensors: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, tmp)
    os.replace(tmp, path)  # a shard under its final name is always complete


def main(argv=None):
    # Configuration.
    _, cfg = config_lib.parse_args(argv, __doc__)
    if not (cfg.latent.autoencoder and cfg.latent.cache_dir):
        raise ConfigError("encode_latents.py needs latent.autoencoder (folder) and latent.cache_dir")
    cache_dir = Path(cfg.latent.cache_dir)
    source = dataclasses.replace(cfg.data, kind=cfg.latent.source_kind)
    accelerator = Accelerator()
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Encoder, source data, shard plan.
    autoencoder = FrozenAutoencoder.load(cfg.latent.autoencoder, accelerator.device, cfg.latent.tile_size,
                                         cfg.latent.tile_overlap)
    if cfg.latent.scaling == "codebook_minmax":
        check_codebook_scaling(autoencoder.model)
    # The images the autoencoder was trained on (its export says which); a plain diffusers folder: vae.inputs.
    inputs = [spec["name"] for spec in autoencoder.metadata.get("inputs", [])] or cfg.vae.inputs
    latents = latents_of(inputs, cfg.latent.encode_each)
    inputs = [name for names in latents.values() for name in names]  # the pixel images the cache keeps
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    datasets = build_datasets(source, cache_dir, cfg.run.seed, is_main_process=accelerator.is_main_process)
    fields = {n: f for n, f in fields_from_config(source).items() if n not in inputs}
    missing = [n for n in inputs if n not in datasets["train"][0]]
    if missing:
        raise ConfigError(f"the autoencoder's inputs {missing} are not in the source data {source.root}")
    for name in cfg.latent.encode_each:
        if datasets["train"][0][name].shape[0] != autoencoder.in_channels:
            raise ConfigError(f"latent.encode_each names '{name}', an image of {datasets['train'][0][name].shape[0]} "
                              f"channels; the autoencoder encodes {autoencoder.in_channels}")
    check_held_out(autoencoder.metadata.get("train_items"),
                   {name: d.item_ids for name, d in datasets.items() if name != "train"}, cfg.latent.autoencoder,
                   cache_dir)
    shards = plan_shards(datasets, cfg.latent.shard_size)
    identity = {"encoder": autoencoder.identity, "source": dataclasses.asdict(source), "inputs": inputs,
                **({"encode_each": cfg.latent.encode_each} if cfg.latent.encode_each else {}),
                "shard_size": cfg.latent.shard_size, "items": [s["items"] for s in shards]}
    identity_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    identity_file = cache_dir / CACHE_IDENTITY
    if identity_file.is_file() and json.loads(identity_file.read_text())["hash"] != identity_hash:
        raise ConfigError(f"latent.cache_dir={cache_dir} holds shards encoded from other data or another "
                          "encoder; choose another latent.cache_dir or delete that folder")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(identity_file, json.dumps({"hash": identity_hash}))

    # Encode this process's shards (round-robin), skipping those already written.
    mine = [s for k, s in enumerate(shards) if k % world == rank]
    todo = [s for s in mine if not (cache_dir / s["file"]).is_file()]
    logger.info("%d shards (%d items); this process: %d, %d already done", len(shards),
                sum(len(s["items"]) for s in shards), len(mine), len(mine) - len(todo))
    for shard in tqdm(todo, desc="encode", disable=not accelerator.is_main_process):
        tensors = encode_shard(autoencoder, datasets[shard["split"]], shard, latents, fields, cfg.latent.batch_size)
        write_shard(cache_dir / shard["file"], tensors)
    accelerator.wait_for_everyone()

    # Manifest: scale/shift (from the training latents or the codebook), then a decode check on held-out items.
    if accelerator.is_main_process:
        # One scale and shift over every latent: they come from one encoder, and a shared scale keeps a
        # degraded latent and its target comparable.
        train_latents = torch.cat([read_shard_tensor(cache_dir / s["file"], len(s["items"]), latent)
                                   for s in shards if s["split"] == "train" for latent in latents])
        scale, shift = latent_scaling(cfg.latent.scaling, train_latents, autoencoder.model)
        check = next(s for s in shards if s["split"] != "train")
        count = min(8, len(check["items"]))
        checked, checked_inputs = next(iter(latents.items()))
        stored = {name: read_shard_tensor(cache_dir / check["file"], len(check["items"]), name)[:count]
                  for name in (checked, *checked_inputs)}
        decoded = autoencoder.decode(stored[checked]).cpu()
        reference = torch.cat([stored[n].float() for n in checked_inputs], dim=1)
        recon_psnr = float(psnr(decoded.clamp(-1, 1), reference, data_range=2.0).mean())
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": {"identity": autoencoder.identity, "folder": str(cfg.latent.autoencoder),
                        "kind": autoencoder.kind, "downsample_factor": autoencoder.downsample_factor},
            "scaling": cfg.latent.scaling, "scale": scale, "shift": shift,
            "latent_shape": list(train_latents.shape[1:]), "dtype": str(train_latents.dtype).replace("torch.", ""),
            "fields": {**{latent: {"kind": "image", "channels": autoencoder.latent_channels} for latent in latents},
                       **{n: {"kind": f.kind, "channels": f.channels} for n, f in fields.items()}},
            "pixel_inputs": {n: int(datasets["train"][0][n].shape[0]) for n in inputs},
            "source_normalization": datasets["train"].normalization,
            "split": json.loads((cache_dir / "split.json").read_text()),
            "shards": [{k: s[k] for k in ("file", "split", "items")} for s in shards],
            "reconstruction_psnr": recon_psnr,
            "creation_config": config_lib.to_yaml(cfg),
        }
        atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1))
        logger.info("cache %s: %d items, latent %s, scale %.4f shift %.4f, decoded held-out PSNR %.2f dB",
                    cache_dir, sum(len(s["items"]) for s in shards),
                    tuple(train_latents.shape[1:]), scale, shift, recon_psnr)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    config_lib.run_main(main)
