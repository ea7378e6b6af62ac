"""Latent cache: autoencoder latents of a dataset, encoded once (encode_latents.py) and read memory-mapped.

A cache folder holds `manifest.json` and `shard-XXXXX.safetensors`. Each shard holds the items of one split:
`latent` (N, C, h, w) raw autoencoder latents (or `<image>_latent`, one per image, with latent.encode_each), masks at latent size (majority label of each f x f block),
vectors (class distributions), and, for held-out shards only, the source images in pixel space so that samples
can be scored against them without reading the source data. The manifest records the encoder's identity, the
latent scale/shift (computed from the training latents; applied on read), shapes, the split and the creation
config. Training reads only the cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusion.task import Field
from utils.config import ConfigError
from utils.logging import get_logger

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LATENT_SUFFIX = "_latent"  # <image>_latent: that image's own latent (latent.encode_each)


def is_latent(name: str) -> bool:
    """Whether a cache tensor is an autoencoder latent: "latent" (the inputs together) or "<image>_latent"."""
    return name == "latent" or name.endswith(LATENT_SUFFIX)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def check_held_out(train_items: Optional[list[str]], held_out: dict[str, list[str]], autoencoder: str,
                   cache_dir: Path) -> None:
    """Refuse held-out items that the autoencoder was trained on: their reconstructions would flatter every
    held-out score of a model trained on the cache.

    Args:
        train_items: the autoencoder's training item ids (its autoencoder.yaml), None when it does not say.
        held_out: split name -> item ids of the cache's held-out splits.
    """
    if train_items is None:
        get_logger().warning("the autoencoder %s does not record its training items (not exported by "
                             "train_vae.py?): cannot check that the cache's held-out items are unseen", autoencoder)
        return
    trained = set(train_items)
    for split, items in held_out.items():
        leaked = [item for item in items if item in trained]
        if leaked:
            raise ConfigError(f"{len(leaked)} of the {len(items)} {split} items of the latent cache (e.g. "
                              f"'{leaked[0]}') were training items of the autoencoder {autoencoder}: encode with "
                              "its run's split (copy the split.json of that run over "
                              f"{Path(cache_dir) / 'split.json'})")


def masks_at_latent_size(labels: torch.Tensor, num_classes: int, factor: int) -> torch.Tensor:
    """(B, 1, H, W) labels -> (B, 1, H/f, W/f): the most frequent label of each f x f block."""
    one_hot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()  # (B, K, H, W)
    return F.avg_pool2d(one_hot, factor).argmax(dim=1, keepdim=True)


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"latent.cache_dir={cache_dir} holds no {MANIFEST}: build the cache first with "
                          "encode_latents.py --config <the same preset>")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def check_encoder(manifest: dict, identity: str, autoencoder: str, cache_dir: Path) -> None:
    """Refuse a cache encoded by another autoencoder than the one the config names."""
    if manifest["encoder"]["identity"] != identity:
        raise ConfigError(f"the latent cache {cache_dir} was encoded by a different autoencoder "
                          f"({manifest['encoder']['folder']}, identity {manifest['encoder']['identity'][:12]}) "
                          f"than latent.autoencoder={autoencoder} (identity {identity[:12]}); re-encode or point "
                          "latent.autoencoder at the encoder of the cache")


# safetensors dtype names -> numpy, for the dtypes encode_latents.py writes.
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I16": np.int16, "I32": np.int32, "I64": np.int64,
                "U8": np.uint8, "BOOL": np.bool_}


def open_shard(path: Path, expected_items: int) -> dict[str, np.memmap]:
    """The tensors of a shard as read-only memory maps; a missing, truncated or corrupt file is named.

    A safetensors file is an 8-byte header length, a JSON header with each tensor's dtype, shape and byte
    range, then the raw data, so each tensor maps straight from the file: reading an item touches only its rows.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_length))
        header.pop("__metadata__", None)
        data_start = 8 + header_length
        tensors = {}
        for name, spec in header.items():
            begin, end = spec["data_offsets"]
            if data_start + end > size:
                raise ValueError(f"tensor '{name}' ends at byte {data_start + end} but the file has {size}")
            tensors[name] = np.memmap(path, dtype=NUMPY_DTYPES[spec["dtype"]], mode="r",
                                      offset=data_start + begin, shape=tuple(spec["shape"]))
        rows = next(tensor for name, tensor in tensors.items() if is_latent(name)).shape[0]
    except (OSError, ValueError, KeyError, StopIteration, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"latent cache shard {path} cannot be read ({str(error).splitlines()[0]}); "
                          "delete it and rerun encode_latents.py to re-encode it") from None
    if rows != expected_items:
        raise ConfigError(f"latent cache shard {path} holds {rows} items, the manifest says {expected_items}")
    return tensors


def read_shard_tensor(path: Path, expected_items: int, name: str) -> torch.Tensor:
    """One whole tensor of a shard, copied into memory."""
    return torch.from_numpy(np.array(open_shard(path, expected_items)[name]))


class LatentCacheDataset(Dataset):
    """Items of one split of a latent cache; latents normalised as (z - shift) * scale on read.

    Item: {"latent": float32 (C, h, w), <mask>: int64 (1, h, w), <vector>: float32 (K,), "item_id": str, and for
    held-out splits the source images <name>: float32 (C, H, W) in [-1, 1]}.
    """

    data_range = 2.0  # the source images were normalised to [-1, 1]

    def __init__(self, cache_dir: Path, split: str, manifest: Optional[dict] = None):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest or read_manifest(self.cache_dir)
        self.scale, self.shift = self.manifest["scale"], self.manifest["shift"]
        self.normalization = self.manifest["source_normalization"]
        self.fields = {name: Field(name, spec["kind"], spec["channels"])
                       for name, spec in self.manifest["fields"].items()}
        self.pixel_fields = [Field(name, "image", c) for name, c in self.manifest["pixel_inputs"].items()]
        self.spatial_shape = tuple(self.manifest["latent_shape"][1:])
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        self.item_ids = [item for s in self.shards for item in s["items"]]
        self._rows = [(k, row) for k, s in enumerate(self.shards) for row in range(len(s["items"]))]
        for s in self.shards:  # fail now, naming the file, rather than mid-training
            open_shard(self.cache_dir / s["file"], len(s["items"]))
        self._maps: dict[int, dict[str, np.memmap]] = {}
        vectors = [n for n, f in self.fields.items() if f.kind == "vector"]
        if vectors:  # the dominant class of each item, for class-balanced sampling (-1 when unlabelled)
            dist = torch.cat([read_shard_tensor(self.cache_dir / s["file"], len(s["items"]), vectors[0])
                              for s in self.shards]) if self.shards else torch.zeros(0, 1)
            self.num_classes = self.fields[vectors[0]].channels
            self.dominant_class = torch.where(dist.sum(dim=1) > 0, dist.argmax(dim=1), -1)

    def __len__(self) -> int:
        return len(self._rows)

    def _shard(self, k: int) -> dict[str, np.memmap]:
        # Mapped lazily, so each DataLoader worker maps the files itself.
        if k not in self._maps:
            self._maps[k] = open_shard(self.cache_dir / self.shards[k]["file"], len(self.shards[k]["items"]))
        return self._maps[k]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Items of a batch, read with one gather per shard and tensor (the DataLoader calls this per batch)."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(indices):
            k, row = self._rows[index]
            by_shard.setdefault(k, []).append((position, row))
        items: list[dict] = [{} for _ in indices]
        for k, entries in by_shard.items():
            positions, rows = zip(*entries)
            for name, tensor in self._shard(k).items():
                values = self._convert(name, torch.from_numpy(tensor[np.array(rows)]))
                for position, value in zip(positions, values):
                    items[position][name] = value
            for position, row in entries:
                items[position]["item_id"] = self.shards[k]["items"][row]
        return items

    def _convert(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Stored dtype -> training dtype; latents normalised to the diffusion space."""
        if is_latent(name):
            return (values.float() - self.shift) * self.scale
        field = self.fields.get(name)
        return values.long() if field is not None and field.kind == "mask" else values.float()


def build_cache_datasets(cache_dir: Path) -> dict[str, LatentCacheDataset]:
    """{"train", "val"[, "test"]} of a cache, split as its manifest records."""
    manifest = read_manifest(cache_dir)
    splits = sorted({s["split"] for s in manifest["shards"]})
    return {split: LatentCacheDataset(cache_dir, split, manifest) for split in splits}
