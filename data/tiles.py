"""Pathology tiles: large RGB images cut into tiles, a tissue filter, and class masks as class distributions.

Layout: <root>/<name>.png|.tif|.tiff RGB images and, optionally, <root>/<name>_mask.png|.tif|.tiff with one
integer class id per pixel (0 = background, < data.tile_classes). Images without a mask are unlabelled extra
data: their tiles have an all-zero class distribution (the null condition of classifier-free guidance).

Every image is decoded, filtered and tiled once, when the dataset is built; a `TileDataset` then only indexes
in-memory tensors.
"""
from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.filters import threshold_otsu

from data.arrays import ArrayDataset
from data.nifti import subject_of
from data.split import split_by_slab, split_by_subject
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MASK_TAG = "_mask"
DATA_RANGE = 2.0  # images live in [-1, 1]
NORMALIZATION = {"method": "rgb_uint8", "range": [-1, 1]}  # x / 127.5 - 1 for 8-bit RGB
# What Pillow and tifffile raise for unreadable, truncated or corrupt files (TiffFileError is a ValueError).
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)
# Pillow modes accepted as masks: 8/16/32-bit grey, palette indices, bilevel.
MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


@dataclass
class TileSource:
    """One source image (the "subject" of pathology): its name, its file and its mask file, if any."""

    name: str
    image: Path
    mask: Path | None


# ---------------------------------------------------------------------------------------------------------
# Discovery and reading


def discover_images(root: Path) -> list[TileSource]:
    """List <root>/<name>.png|.tif|.tiff images (sorted by name) and match each <name>_mask file to its image."""
    if not root.is_dir():
        raise ConfigError(f"data.root: data folder not found: {root}")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        is_mask = path.stem.endswith(MASK_TAG)
        name = path.stem[: -len(MASK_TAG)] if is_mask else path.stem
        found = masks if is_mask else images
        if name in found:
            raise ConfigError(f"data.root: '{name}' has two {'masks' if is_mask else 'images'} in {root}: "
                              f"{found[name].name} and {path.name}")
        found[name] = path
    if not images:
        raise ConfigError(f"data.root: no images in {root} (expected <name>.png, .tif or .tiff RGB images, "
                          f"optionally with <name>_mask.png class masks)")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise ConfigError(f"mask {masks[orphans[0]].name} has no image {orphans[0]}.png, .tif or .tiff in {root}")
    return [TileSource(name, images[name], masks.get(name)) for name in sorted(images)]


def _read_pixels(path: Path, name: str, pillow_modes: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """Decode a PNG (Pillow) or TIFF (tifffile) file; returns (array, Pillow mode or "" for TIFF).

    Pillow images in a mode outside `pillow_modes` are converted to RGB (palette and RGBA images).
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path)), ""
        with Image.open(path) as image:
            image.load()  # inside the try: a truncated file only fails when its pixels are decoded
            mode = image.mode
            if pillow_modes is not None and mode not in pillow_modes and mode in ("P", "PA"):
                image = image.convert("RGBA")
                mode = "RGBA"
            return np.asarray(image), mode
    except READ_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read image file {name}: {message}") from None


def read_rgb(path: Path, name: str) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8; the alpha channel of RGBA images is dropped.

    Greyscale images are refused rather than repeated to three channels: the tissue filter works on colour
    saturation, which is zero everywhere in a grey image, so every tile would be discarded or kept blindly.

    Args:
        path: the file.
        name: how errors name the file (e.g. "slide-07.png").
    """
    pixels, mode = _read_pixels(path, name, pillow_modes=("RGB", "RGBA"))
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar TIFF: (C, H, W)
    detail = f"mode '{mode}'" if mode else f"shape {pixels.shape}"
    if mode.startswith(("L", "I", "F", "1")) or pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] < 3):
        raise ConfigError(f"image is greyscale ({detail}) in {name}: expected an RGB image (the tissue filter "
                          f"needs colour)")
    if (mode and mode not in ("RGB", "RGBA")) or pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise ConfigError(f"expected an RGB image (H, W, 3), got {detail} in {name}")
    if pixels.dtype != np.uint8:
        raise ConfigError(f"image has {pixels.dtype} pixels in {name}: expected 8-bit RGB")
    return np.ascontiguousarray(pixels[..., :3])


def read_mask(path: Path, name: str, num_classes: int) -> np.ndarray:
    """Read a single-channel mask of integer class ids as (H, W) int64; reject other labels."""
    pixels, mode = _read_pixels(path, name, pillow_modes=MASK_MODES)
    if mode and mode not in MASK_MODES:
        raise ConfigError(f"mask must hold one integer class id per pixel, got Pillow mode '{mode}' in {name}")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise ConfigError(f"mask must be single-channel (H, W), got shape {pixels.shape} in {name}")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.number):
        raise ConfigError(f"mask has {pixels.dtype} values in {name}: expected integer class ids")
    labels = np.rint(pixels)
    if not np.array_equal(labels, pixels):
        raise ConfigError(f"mask has non-integer values in {name} (expected integer class ids)")
    if labels.min() < 0:
        raise ConfigError(f"mask has negative label {int(labels.min())} in {name}")
    if labels.max() >= num_classes:
        raise ConfigError(f"mask label {int(labels.max())} >= data.tile_classes {num_classes} in {name}")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Tissue filter and tiling


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of (H, W, 3) uint8 pixels, 0 where max == 0.

    Equal to skimage.color.rgb2hsv(rgb)[..., 1], without the float64 copy of all three HSV channels.
    """
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels more saturated than the Otsu threshold of the whole image's saturation.

    Stained tissue is coloured; glass, background and most pen-free artefacts are grey or white.
    """
    sat = saturation(rgb)
    return sat > threshold_otsu(sat)


def tile_origins(height: int, width: int, tile_size: int, stride: int) -> np.ndarray:
    """(N, 2) top-left (y, x) corners of every tile that fits inside the image, row-major."""
    ys = np.arange(0, height - tile_size + 1, stride)
    xs = np.arange(0, width - tile_size + 1, stride)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2)


def window_sums(binary: np.ndarray, origins: np.ndarray, tile_size: int) -> np.ndarray:
    """(N,) counts of true pixels in each tile, via an integral image (one pass, any stride)."""
    integral = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(binary, axis=0, dtype=np.int64), axis=1, out=integral[1:, 1:])
    y, x = origins[:, 0], origins[:, 1]
    t = tile_size
    return integral[y + t, x + t] - integral[y, x + t] - integral[y + t, x] + integral[y, x]


def crops(array: np.ndarray, origins: np.ndarray, tile_size: int) -> np.ndarray:
    """(N, tile_size, tile_size, ...) copies of the tiles of an (H, W, ...) array at the (y, x) origins."""
    out = np.empty((len(origins), tile_size, tile_size, *array.shape[2:]), array.dtype)
    for k, (y, x) in enumerate(origins):
        out[k] = array[y:y + tile_size, x:x + tile_size]
    return out


def _resize(tiles: torch.Tensor, size: int, is_mask: bool) -> torch.Tensor:
    """(N, C, t, t) -> (N, C, size, size): antialiased bilinear for images, nearest for masks."""
    if tiles.shape[-1] == size:
        return tiles
    if is_mask:
        return F.interpolate(tiles.float(), size=(size, size), mode="nearest-exact").long()
    resized = F.interpolate(tiles, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(-1.0, 1.0)


def _tile_image(source: TileSource, cfg: DataConfig, root: Path) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Decode, filter and tile one image: (arrays of its kept tiles, their item ids, number of grid positions)."""
    image_name = source.image.name
    rgb = read_rgb(source.image, image_name)
    mask = None
    if source.mask is not None:
        mask = read_mask(source.mask, source.mask.name, cfg.tile_classes)
        if mask.shape != rgb.shape[:2]:
            raise ConfigError(f"mask shape {mask.shape} != image shape {rgb.shape[:2]} in {source.mask.name}")
    t = cfg.tile_size
    origins = tile_origins(*rgb.shape[:2], t, cfg.tile_stride or t)
    tissue = window_sums(tissue_mask(rgb), origins, t) / (t * t)
    kept = origins[tissue >= cfg.min_tissue]
    count = len(kept)
    item_ids = [f"{source.name}/y{y:05d}_x{x:05d}" for y, x in kept]

    images = torch.from_numpy(crops(rgb, kept, t)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, t, t)
    if mask is None:
        labels = torch.zeros((count, 1, t, t), dtype=torch.int64)
        class_dist = torch.zeros((count, cfg.tile_classes), dtype=torch.float32)
    else:
        labels = torch.from_numpy(crops(mask, kept, t))[:, None]  # (N, 1, t, t)
        # Fractions of the tile's own pixels, before any resizing.
        counts = np.stack([window_sums(mask == c, kept, t) for c in range(cfg.tile_classes)], axis=1)
        class_dist = torch.from_numpy(counts / (t * t)).float()  # (N, tile_classes)
    arrays = {
        "image": _resize(images, cfg.image_size, is_mask=False),
        "mask": _resize(labels, cfg.image_size, is_mask=True),
        "class_dist": class_dist,
        "labelled": torch.full((count,), mask is not None, dtype=torch.bool),
    }
    if not count:
        reason = "it is smaller than data.tile_size" if not len(origins) else "no tile passes data.min_tissue"
        get_logger().warning("no tiles from %s in %s: %s", image_name, root, reason)
    return arrays, item_ids, len(origins)


# ---------------------------------------------------------------------------------------------------------
# Dataset


class TileDataset(ArrayDataset):
    """In-memory tiles: item = {"image": float32 (3, H, W) in [-1, 1], "mask": int64 (1, H, W) class ids,
    "class_dist": float32 (tile_classes,) class fractions (zeros if unlabelled), "labelled": bool (),
    "item_id": "<image name>/y<row>_x<column>" of the tile's top-left pixel in the source image}."""

    data_range: float = DATA_RANGE

    def __init__(self, arrays: dict[str, torch.Tensor], item_ids: list[str]) -> None:
        """
        Args:
            arrays: "image" (N, 3, H, W) float32, "mask" (N, 1, H, W) int64, "class_dist" (N, C) float32,
                "labelled" (N,) bool, in the order of `item_ids`.
            item_ids: N ids.
        """
        super().__init__(arrays, item_ids)
        self.image_names = ["image"]
        self.mask_names = ["mask"]
        self.normalization = copy.deepcopy(NORMALIZATION)
        labelled = arrays["labelled"]
        # (N,) int64: the most frequent class of each tile, -1 for unlabelled tiles.
        self.dominant_class = torch.where(labelled, arrays["class_dist"].argmax(dim=1), -1)

    @property
    def num_classes(self) -> int:
        return self.arrays["class_dist"].shape[1]

    @property
    def subject_ids(self) -> list[str]:
        """Source images of the items, in order of first appearance."""
        return list(dict.fromkeys(subject_of(item_id) for item_id in self.item_ids))

    @property
    def labelled_subject_ids(self) -> list[str]:
        """Source images that have a mask, in order of first appearance."""
        labelled = self.arrays["labelled"].tolist()
        return list(dict.fromkeys(subject_of(i) for i, flag in zip(self.item_ids, labelled) if flag))

    def subset(self, item_ids: Sequence[str]) -> TileDataset:
        """A dataset of the given items (in the given order); the tensors are copied, not re-decoded."""
        missing = [i for i in item_ids if i not in self._index]
        if missing:
            raise KeyError(f"unknown item id {missing[0]!r}")
        index = torch.tensor([self._index[i] for i in item_ids], dtype=torch.long)
        return TileDataset({name: tensor[index] for name, tensor in self.arrays.items()}, list(item_ids))


def _check_config(cfg: DataConfig) -> None:
    """Reject tile settings that cannot work, naming the key, before any file is read."""
    if cfg.tile_size < 1:
        raise ConfigError(f"data.tile_size must be positive, got {cfg.tile_size}")
    if cfg.tile_stride < 0:
        raise ConfigError(f"data.tile_stride must be >= 0 (0 = data.tile_size), got {cfg.tile_stride}")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {cfg.image_size}")
    if not 0.0 <= cfg.min_tissue <= 1.0:
        raise ConfigError(f"data.min_tissue must lie in [0, 1], got {cfg.min_tissue}")
    if cfg.tile_classes < 1:
        raise ConfigError(f"data.tile_classes must be >= 1 (background included), got {cfg.tile_classes}")


def load_tile_dataset(cfg: DataConfig) -> TileDataset:
    """Decode every image under cfg.root once and return all tiles that pass the tissue filter."""
    _check_config(cfg)
    root = Path(cfg.root)
    sources = discover_images(root)
    parts: dict[str, list[torch.Tensor]] = {"image": [], "mask": [], "class_dist": [], "labelled": []}
    item_ids: list[str] = []
    positions = 0
    for source in sources:
        arrays, ids, grid_size = _tile_image(source, cfg, root)
        for name, tensor in arrays.items():
            parts[name].append(tensor)
        item_ids += ids
        positions += grid_size
    if not positions:
        raise ConfigError(f"every image in {root} is smaller than data.tile_size ({cfg.tile_size} px): lower "
                          f"data.tile_size")
    if not item_ids:
        raise ConfigError(f"no tiles left after the tissue filter in {root}: lower data.min_tissue "
                          f"(now {cfg.min_tissue})")
    dataset = TileDataset({name: torch.cat(tensors) for name, tensors in parts.items()}, item_ids)
    labelled = int(dataset.arrays["labelled"].sum())
    get_logger().info("loaded %d images from %s: %d of %d tiles of %d px kept (data.min_tissue=%s), %d labelled, "
                      "as %dx%d items", len(sources), root, len(item_ids), positions, cfg.tile_size,
                      cfg.min_tissue, labelled, cfg.image_size, cfg.image_size)
    return dataset


# ---------------------------------------------------------------------------------------------------------
# Split and class balance


def _tile_origin(item_id: str) -> tuple[int, int]:
    """The (y, x) of an item id like "slide-07/y00128_x00256"."""
    y, x = item_id.rsplit("/", 1)[1].split("_")
    return int(y[1:]), int(x[1:])


def split_by_row_bands(item_ids: Sequence[str], tile_size: int, stride: int, val_fraction: float,
                       test_fraction: float, seed: int) -> dict:
    """Split one image's tiles into bands of tile rows, with a gap of one tile between a held-out band and
    the training tiles (the slab split of data/split.py, applied to rows of tiles).

    Returns a split.json dict with unit "slice" (split.json's item-level unit) listing tile ids.
    """
    image = subject_of(item_ids[0])
    rows = sorted({_tile_origin(i)[0] for i in item_ids})
    # Rows that are `gap` rows apart start >= (gap + 1) * stride >= 2 * tile_size pixels apart, so a whole tile
    # of pixels separates held-out tiles from training tiles, whatever the overlap (stride < tile_size).
    gap = math.ceil(2 * tile_size / stride) - 1
    row_ids = [f"{image}/r{k:05d}" for k in range(len(rows))]
    try:
        row_split = split_by_slab(row_ids, val_fraction, test_fraction, gap, seed)
    except ConfigError:
        raise ConfigError(f"{len(rows)} rows of tiles in {image} are too few for a row-band split with a "
                          f"one-tile gap: lower data.val_fraction ({val_fraction}) / data.test_fraction "
                          f"({test_fraction}) or data.tile_size ({tile_size}), or add images") from None
    label_of_row = {rows[int(row_id.rsplit('/r', 1)[1])]: name
                    for name in ("train", "val", "test", "excluded_gap") for row_id in row_split[name]}
    split = {name: [i for i in item_ids if label_of_row[_tile_origin(i)[0]] == name]
             for name in ("train", "val", "test", "excluded_gap")}
    note = (f"one labelled image ('{image}'): split by bands of tile rows with seed {seed}, leaving {gap} "
            f"row(s) of tiles ({tile_size} px or more) out between every held-out band and the training tiles; "
            f"neighbouring tissue still correlates, so held-out scores are optimistic")
    return {"unit": "slice", "seed": seed, "note": note, **split}


def make_tile_split(dataset: TileDataset, cfg: DataConfig, seed: int) -> dict:
    """Split by source image; held-out images are drawn from the labelled ones and unlabelled images always
    train (they are extra data, and held-out scores need masks). With one labelled image (or one image in
    all), split its tiles by row bands instead, with a warning.
    """
    labelled = dataset.labelled_subject_ids
    pool = labelled or dataset.subject_ids
    extra = [s for s in dataset.subject_ids if s not in pool]
    if len(pool) >= 2:
        split = split_by_subject(pool, cfg.val_fraction, cfg.test_fraction, seed)
        split["train"] = sorted(split["train"] + extra)
        if extra:
            split["note"] += f"; {len(extra)} unlabelled images always train"
        return split
    pool_items = [i for i in dataset.item_ids if subject_of(i) == pool[0]]
    split = split_by_row_bands(pool_items, cfg.tile_size, cfg.tile_stride or cfg.tile_size, cfg.val_fraction,
                               cfg.test_fraction, seed)
    split["train"] += [i for i in dataset.item_ids if subject_of(i) in extra]
    get_logger().warning(split["note"])
    return split


def balanced_weights(dataset: TileDataset) -> torch.Tensor:
    """Per-item sampling weights (float64, for torch's WeightedRandomSampler) that make every dominant class
    equally likely: 1 / (tiles with that dominant class); unlabelled tiles get the mean labelled weight.
    All ones when no tile is labelled.
    """
    if not hasattr(dataset, "dominant_class"):
        raise ConfigError("data.class_balanced needs per-item class labels: pathology tiles with masks, or a "
                          "latent cache encoded from them")
    dominant = dataset.dominant_class
    labelled = dominant >= 0
    weights = torch.ones(len(dominant), dtype=torch.float64)
    if not labelled.any():
        return weights
    counts = torch.bincount(dominant[labelled], minlength=dataset.num_classes).double()
    weights[labelled] = 1.0 / counts[dominant[labelled]]
    weights[~labelled] = weights[labelled].mean()
    return weights
