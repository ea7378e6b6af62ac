"""Images sorted into class folders, for image classification.

Layout: <root>/train/<class>/<image> and, optionally, <root>/test/<class>/<image>, with .png, .jpg, .jpeg,
.tif, .tiff or .nii.gz (.nii) images. The classes are the sorted folder names of train/; test/ may hold a subset
of them. train/ is split into train and val (seeded, stratified by class); test/ is only ever the test split.

Every image is decoded, converted to data.color, fitted to data.image_size and normalised once, when the dataset
is built; a `ClassFolderDataset` then only indexes in-memory tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from data.arrays import ArrayDataset
from data.nifti import NIFTI_SUFFIXES, fit_slices, to_slices
from data.nifti import READ_ERRORS as NIFTI_READ_ERRORS
from data.tiles import _read_pixels  # the tile reader's PNG (Pillow) / TIFF (tifffile) decoding and read errors
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SUFFIXES = PIXEL_SUFFIXES + NIFTI_SUFFIXES
NORMALIZATIONS = ("imagenet", "intensity")
COLORS = ("rgb", "grey")
# Pillow modes read as they are: grey (8/16/32-bit integer, float, bilevel), grey + alpha, RGB, RGBA. Palette
# images are converted to RGBA while reading; other modes (CMYK, YCbCr, LAB, HSV) are refused.
PILLOW_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA")
# ImageNet statistics of RGB pixels in [0, 1], as pretrained classifiers expect their input normalised.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 RGB -> grey, as Pillow's convert("L")
UINT16_MAX = 65535
# How stored pixel values reach [0, 1] before normalisation (recorded with the normalisation).
UNIT_SCALING = ("8-bit / 255; other integers in [0, 65535] / 65535 (16-bit); float images, other integers and "
                "NIfTI min-max per image")


@dataclass
class ImageFile:
    """One image of the layout: its file, its id "<split folder>/<class>/<file name>" and its class index."""

    path: Path
    item_id: str
    label: int


# ---------------------------------------------------------------------------------------------------------
# Discovery


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    """The class folders of a split folder, sorted by name (hidden folders are not classes)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_of_class(folder: Path, label: int) -> list[ImageFile]:
    """The images of one class folder, sorted by name; a folder without any is refused."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    images = [p for p in files if _is_image(p)]
    if not images:
        raise ConfigError(f"class folder {folder} has no image (expected {', '.join(SUFFIXES)} files)")
    if len(images) < len(files):
        get_logger().warning("ignoring %d entries of %s that are not %s images", len(files) - len(images), folder,
                             "/".join(SUFFIXES))
    return [ImageFile(path, f"{folder.parent.name}/{folder.name}/{path.name}", label) for path in images]


def discover_images(root: Path) -> tuple[list[str], list[ImageFile]]:
    """The class names (sorted folder names of <root>/train) and every image of train/, then of test/."""
    train = root / "train"
    if not train.is_dir():
        raise ConfigError(f"data.root: no train/ folder in {root} (expected {root}/train/<class>/<image files>)")
    class_names = [folder.name for folder in _class_folders(train)]
    if len(class_names) < 2:
        found = f" ({class_names[0]})" if class_names else ""
        raise ConfigError(f"data.root: {train} holds {len(class_names)} class folder{found}; classification "
                          f"needs at least two")
    images = [image for label, name in enumerate(class_names) for image in _images_of_class(train / name, label)]
    test = root / "test"
    if test.is_dir():
        test_classes = [folder.name for folder in _class_folders(test)]
        if not test_classes:
            raise ConfigError(f"{test} holds no class folder: add <class>/<image files> or remove it")
        unknown = [name for name in test_classes if name not in class_names]
        if unknown:
            raise ConfigError(f"test class '{unknown[0]}' ({test / unknown[0]}) is not a class of {train} "
                              f"(classes: {', '.join(class_names)})")
        images += [image for name in test_classes
                   for image in _images_of_class(test / name, class_names.index(name))]
    return class_names, images


# ---------------------------------------------------------------------------------------------------------
# Reading


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant image becomes all zeros (it carries no contrast to keep)."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return scaled.astype(np.float32)


def _to_unit_range(pixels: np.ndarray, name: str) -> np.ndarray:
    """Stored pixel values -> float32 in [0, 1], following UNIT_SCALING."""
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    if not np.issubdtype(pixels.dtype, np.number):
        raise ConfigError(f"image has {pixels.dtype} pixels in {name}: expected numbers")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    # Pillow reads 16-bit PNGs as 32-bit integers ("I"), so their range decides, not their dtype.
    if np.issubdtype(pixels.dtype, np.integer) and pixels.min() >= 0 and pixels.max() <= UINT16_MAX:
        return pixels.astype(np.float32) / UINT16_MAX
    if not np.isfinite(pixels).all():
        raise ConfigError(f"image has NaN or Inf pixels in {name}")
    return _min_max(pixels.astype(np.float64))


def _channels_last(pixels: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) pixels -> (H, W, 1) grey or (H, W, 3) RGB, alpha dropped."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    elif pixels.ndim == 3 and pixels.shape[-1] > 4 and pixels.shape[0] in (1, 3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar TIFF
    if pixels.ndim != 3 or pixels.shape[-1] > 4:
        raise ConfigError(f"expected a 2D grey or RGB image, got shape {pixels.shape} in {name}")
    return pixels[..., :1] if pixels.shape[-1] <= 2 else pixels[..., :3]


def read_nifti_image(path: Path, name: str) -> np.ndarray:
    """A 2D NIfTI image (or a 3D one holding one slice) as (H, W) float32 in [0, 1].

    Reoriented to RAS and shown as data/nifti.py shows slices (radiological view). NIfTI intensities have no
    fixed range (MRI arbitrary units, CT in HU), so each image is min-max scaled to [0, 1] on its own.
    """
    try:
        image = nib.load(path)
        # Read inside the try: a truncated .nii.gz only fails when its data is decompressed.
        data = image.get_fdata(dtype=np.float32)
    except NIFTI_READ_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read NIfTI file {name}: {message}") from None
    shape = data.shape
    if data.ndim > 3 and all(size == 1 for size in shape[3:]):
        data = data.reshape(shape[:3])
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 or min(data.shape) != 1:
        raise ConfigError(f"expected a 2D NIfTI image (or a 3D one with a single slice), got shape {shape} in {name}")
    if not np.isfinite(data).all():
        raise ConfigError(f"image has NaN or Inf voxels in {name}")
    volume = nib.as_closest_canonical(nib.Nifti1Image(data, image.affine)).get_fdata(dtype=np.float32)
    axis = max(k for k, size in enumerate(volume.shape) if size == 1)  # the single slice, wherever RAS put it
    return _min_max(to_slices(torch.from_numpy(np.ascontiguousarray(volume)), axis)[0, 0].numpy())



def read_image(path: Path, name: str) -> np.ndarray:
    """Read an image file as (H, W, C) float32 in [0, 1]: C = 1 for grey, 3 for colour images.

    Args:
        path: the file.
        name: how errors name the file.
    """
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti_image(path, name)[..., None]
    pixels, mode = _read_pixels(path, name, pillow_modes=PILLOW_MODES)
    if mode and mode not in PILLOW_MODES:
        raise ConfigError(f"unsupported Pillow mode '{mode}' in {name}: save it as an RGB or greyscale image")
    return _to_unit_range(_channels_last(pixels, name), name)


def to_color(pixels: np.ndarray, color: str) -> np.ndarray:
    """(H, W, 1 or 3) pixels -> (H, W, 1) for "grey" (BT.601 luma) or (H, W, 3) for "rgb" (grey repeated)."""
    channels = pixels.shape[-1]
    if color == "grey":
        return pixels if channels == 1 else pixels @ np.asarray(LUMA_WEIGHTS, np.float32)[:, None]
    return pixels if channels == 3 else np.repeat(pixels, 3, axis=-1)


def prepare_image(pixels: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1] -> normalised (C, image_size, image_size) float32, C from cfg.color."""
    image = torch.from_numpy(np.ascontiguousarray(to_color(pixels, cfg.color))).permute(2, 0, 1)[None]
    # Fitted in [-1, 1] (the intensity normalisation) where fit_slices pads with -1: black borders.
    image = fit_slices(image * 2.0 - 1.0, cfg.image_size, cfg.resize, is_mask=False)[0]
    if cfg.normalization == "imagenet":
        mean, std = (torch.tensor(values).view(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
        image = ((image + 1.0) / 2.0 - mean) / std
    return image.contiguous()


def normalization_record(cfg: DataConfig) -> dict:
    """How images were normalised (JSON-serialisable), with the `data_range` metrics use."""
    record = {"method": cfg.normalization, "color": cfg.color, "channels": 3 if cfg.color == "rgb" else 1,
              "unit_scaling": UNIT_SCALING}
    if cfg.normalization == "imagenet":
        # Each channel spans 1 / std; the widest span keeps PSNR/SSIM comparable across channels.
        record.update({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "data_range": 1.0 / min(IMAGENET_STD)})
    else:
        record.update({"output_range": [-1.0, 1.0], "data_range": 2.0})
    return record


# ---------------------------------------------------------------------------------------------------------
# Dataset


class ClassFolderDataset(ArrayDataset):
    """In-memory class-folder images: item = {"image": float32 (C, H, W) normalised, "label": int64 () class
    index into `class_names`, "item_id": "<split folder>/<class>/<file name>"}."""

    def __init__(self, arrays: dict[str, torch.Tensor], item_ids: list[str], class_names: Sequence[str],
                 normalization: dict) -> None:
        """
        Args:
            arrays: "image" (N, C, H, W) float32 and "label" (N,) int64, in the order of `item_ids`.
            item_ids: N ids.
            class_names: the classes, in label order.
            normalization: `normalization_record` of the config the images were prepared with.
        """
        super().__init__(arrays, item_ids)
        self.image_names = ["image"]
        self.mask_names: list[str] = []
        self.class_names = list(class_names)
        self.normalization = normalization
        self.data_range = float(normalization["data_range"])

    @property
    def dominant_class(self) -> torch.Tensor:
        """(N,) int64 labels: the class of each image, for data.tiles.balanced_weights."""
        return self.arrays["label"]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, item_ids: Sequence[str]) -> ClassFolderDataset:
        """A dataset of the given items (in the given order); the tensors are copied, not re-decoded."""
        missing = [i for i in item_ids if i not in self._index]
        if missing:
            raise KeyError(f"unknown item id {missing[0]!r}")
        index = torch.tensor([self._index[i] for i in item_ids], dtype=torch.long)
        return ClassFolderDataset({name: tensor[index] for name, tensor in self.arrays.items()}, list(item_ids),
                                  self.class_names, self.normalization)


def _check_config(cfg: DataConfig) -> None:
    """Reject class-folder settings that cannot work, naming the key, before any file is read."""
    if cfg.normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization must be {' or '.join(NORMALIZATIONS)} for data.kind=class_folders, "
                          f"got '{cfg.normalization}'")
    if cfg.color not in COLORS:
        raise ConfigError(f"data.color must be {' or '.join(COLORS)}, got '{cfg.color}'")
    if cfg.normalization == "imagenet" and cfg.color != "rgb":
        raise ConfigError(f"data.normalization=imagenet needs data.color=rgb (its statistics are per RGB channel), "
                          f"got data.color={cfg.color}; use data.normalization=intensity for grey images")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {cfg.image_size}")
    if cfg.dims != 2:
        raise ConfigError(f"data.dims must be 2 for data.kind=class_folders (2D images), got {cfg.dims}")
    if not 0.0 <= cfg.rotate_degrees <= 180.0:
        raise ConfigError(f"data.rotate_degrees must lie in [0, 180], got {cfg.rotate_degrees}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {cfg.val_fraction}")
    if cfg.test_fraction != 0:
        raise ConfigError(f"data.test_fraction must be 0 for data.kind=class_folders (got {cfg.test_fraction}): "
                          f"the test set is <data.root>/test/")


def load_class_folders(cfg: DataConfig) -> ClassFolderDataset:
    """Decode every image under cfg.root once: train/ images first, then test/ ones."""
    _check_config(cfg)
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: data folder not found: {root}")
    class_names, files = discover_images(root)
    images = torch.stack([prepare_image(read_image(file.path, str(file.path)), cfg) for file in files])
    labels = torch.tensor([file.label for file in files], dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    get_logger().info("loaded %d images of %d classes from %s (%s) as %s %dx%d items", len(files),
                      len(class_names), root, ", ".join(f"{n} {name}" for name, n in zip(class_names, counts)),
                      cfg.color, cfg.image_size, cfg.image_size)
    return ClassFolderDataset({"image": images, "label": labels}, [file.item_id for file in files], class_names,
                              normalization_record(cfg))


# ---------------------------------------------------------------------------------------------------------
# Split and augmentation


def make_class_split(dataset: ClassFolderDataset, val_fraction: float, seed: int) -> dict:
    """A split.json dict (unit "image": item ids): train/ images shuffled with `seed` and dealt out per class,
    round(count * val_fraction) of each class to val (at least one, and at least one left to train, when a class
    has two or more images); test/ images form the test split.
    """
    rng = np.random.default_rng(seed)
    labels = dataset.dominant_class.tolist()
    train_items = [(item_id, label) for item_id, label in zip(dataset.item_ids, labels) if item_id.startswith("train/")]
    train: list[str] = []
    val: list[str] = []
    for label in range(dataset.num_classes):
        members = sorted(item_id for item_id, item_label in train_items if item_label == label)
        num_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        order = rng.permutation(len(members))
        val += [members[k] for k in order[:num_val]]
        train += [members[k] for k in order[num_val:]]
        if not num_val:
            get_logger().warning("class '%s' has a single image in train/: it has no validation item",
                                 dataset.class_names[label])
    test = [item_id for item_id in dataset.item_ids if item_id.startswith("test/")]
    note = (f"class folders: train/ split stratified by class with seed {seed} into {len(train)} train and "
            f"{len(val)} val images; {len(test)} test images from test/")
    return {"unit": "image", "seed": seed, "note": note, "train": sorted(train), "val": sorted(val), "test": test}


def rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each square (B, C, H, W) image about its centre by its angle (B,) in radians, counter-clockwise
    as displayed (row 0 at the top): bilinear for float images, nearest for integer masks.

    Borders are filled by reflection, so no artificial corners appear. A rotation in grid_sample's normalised
    coordinates is a rotation in pixels only for square images, which every class_folders item is.
    """
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    # Each output pixel reads the input at theta @ (x, y, 1); with y pointing down, this turns the content
    # counter-clockwise as displayed (pi / 2 == torch.rot90(images, 1, (-2, -1))).
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    theta = theta.to(images.device, torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if images.is_floating_point():
        return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                             align_corners=False)
    rotated = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return rotated.to(images.dtype)


def random_rotation(batch: dict, max_degrees: float) -> dict:
    """Rotate each sample of a collated batch by its own angle, uniform in [-max_degrees, max_degrees], the same
    way for every spatial key ((B, C, H, W) tensors: images, masks); other entries (labels, ids) pass through.

    Uses torch's global RNG, which the training loop reseeds every step (exact resume).
    """
    spatial = [key for key, value in batch.items() if torch.is_tensor(value) and value.dim() == 4]
    if max_degrees <= 0 or not spatial:
        return dict(batch)
    size = batch[spatial[0]].shape[0]
    angles = (torch.rand(size, dtype=torch.float64) * 2.0 - 1.0) * math.radians(max_degrees)  # on the CPU, as flips
    return {**batch, **{key: rotate(batch[key], angles) for key in spatial}}
