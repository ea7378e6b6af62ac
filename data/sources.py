"""What a diffusion run trains on: pixel-space datasets, or a latent cache plus the autoencoder that decodes it.

Both give the same bundle, so training, validation and evaluation do not branch on the space: samples are
always scored in pixel space, against the source images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from data import build_datasets
from data.latent_cache import LATENT_SUFFIX, build_cache_datasets, check_encoder, is_latent
from diffusion.task import Field, fields_from_config
from models.autoencoder import FrozenAutoencoder, denormalise
from utils.checkpoint import atomic_write_text
from utils.config import Config


@dataclass
class DataBundle:
    datasets: dict  # split -> dataset
    fields: dict[str, Field]  # what the datasets provide
    spatial_shape: tuple[int, int]  # of the generated arrays
    scored: Optional[list[Field]] = None  # pixel-space fields scored instead of the task's targets (latent runs)
    to_pixels: Optional[Callable[[dict], dict]] = None  # generated latents -> {scored name: pixels}
    autoencoder: object = None


class LatentDecoder:
    """Turns generated (normalised) latents into source images in [-1, 1]: "latent" split into the named inputs,
    "<image>_latent" into that image."""

    def __init__(self, autoencoder, scale: float, shift: float, pixel_fields: list[Field]):
        self.autoencoder, self.scale, self.shift, self.pixel_fields = autoencoder, scale, shift, pixel_fields

    def images_of(self, latent_name: str) -> list[Field]:
        """The pixel fields a latent decodes into."""
        if latent_name == "latent":
            return self.pixel_fields
        return [f for f in self.pixel_fields if f"{f.name}{LATENT_SUFFIX}" == latent_name]

    def __call__(self, generated: dict) -> dict:
        out = {}
        for name, latent in generated.items():
            if not is_latent(name):
                continue
            pixels = self.autoencoder.decode(denormalise(latent.float(), self.scale, self.shift)).clamp(-1, 1)
            start = 0
            for f in self.images_of(name):
                out[f.name] = pixels[:, start:start + f.channels].to(latent.device)
                start += f.channels
        return out


def load_data(cfg: Config, run_dir: Path, is_main_process: bool, device) -> DataBundle:
    """Datasets of cfg.data.kind; for a latent cache also checks its encoder and loads it for decoding."""
    if cfg.data.kind == "class_folders":
        datasets = build_datasets(cfg.data, run_dir, cfg.run.seed, is_main_process=is_main_process)
        image = datasets["val"][0]["image"]
        fields = {"image": Field("image", "image", image.shape[0]),
                  "label": Field("label", "label", datasets["train"].num_classes)}
        return DataBundle(datasets, fields, tuple(image.shape[1:]))
    if cfg.data.kind != "latent_cache":
        datasets = build_datasets(cfg.data, run_dir, cfg.run.seed, is_main_process=is_main_process)
        shape = tuple(datasets["val"][0][cfg.data.images[0]].shape[1:])  # (H, W) or (D, H, W) of a held-out item
        return DataBundle(datasets, fields_from_config(cfg.data), shape)

    datasets = build_cache_datasets(Path(cfg.latent.cache_dir))
    train = datasets["train"]
    autoencoder = FrozenAutoencoder.load(cfg.latent.autoencoder, device, cfg.latent.tile_size,
                                         cfg.latent.tile_overlap)
    check_encoder(train.manifest, autoencoder.identity, cfg.latent.autoencoder, Path(cfg.latent.cache_dir))
    split_path = Path(run_dir) / "split.json"
    if is_main_process and not split_path.exists():  # the run's split is the cache's
        atomic_write_text(split_path, json.dumps(train.manifest["split"], indent=1))
    decoder = LatentDecoder(autoencoder, train.scale, train.shift, train.pixel_fields)
    # Scored: the images the generated latents decode into (not those of a latent condition, e.g. ld_latent).
    scored = [f for name in cfg.task.targets if is_latent(name) for f in decoder.images_of(name)]
    return DataBundle(datasets, train.fields, train.spatial_shape, scored or train.pixel_fields, decoder, autoencoder)


def pixel_references(bundle: DataBundle, task) -> list[Field]:
    """The fields samples are scored on: the task's targets in pixel space, or the decoded source images."""
    return bundle.scored if bundle.scored is not None else task.targets

