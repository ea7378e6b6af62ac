"""2D slices of NIfTI volumes: discovery, decoding, reorientation, resampling, normalisation, slicing.

A dataset is a folder per subject (<root>/<subject>/<modality>.nii.gz) or an MSD-style <root>/dataset.json, whose
images may stack several modalities along a 4th axis; data.images name them by its "modality" map or by index.

Every volume is decoded and preprocessed once, when the dataset is built; a `SliceDataset` then only indexes
in-memory tensors, so no `.nii.gz` is decompressed during training.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from data.arrays import ArrayDataset
from data.degrade import degrade, item_seed
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

AXIS_LETTERS = "xyz"
DATA_RANGE = 2.0  # images live in [-1, 1]
AFFINE_TOLERANCE_MM = 1e-3  # float32 header round-off, far below any voxel size
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What nibabel, gzip and zlib raise for unreadable, truncated or corrupt files (header or data).
READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, ImageFileError, HeaderDataError)


@dataclass
class Subject:
    """One subject: an id, the file of each modality (images and masks) and, for modalities stacked along the
    4th axis of one file (MSD), their position on that axis."""

    subject_id: str
    files: dict[str, Path]
    channels: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class VolumeGrid:
    """The voxel grid a subject's volumes are preprocessed onto (RAS axes, at data.spacing) and its items are cut
    from: shape (X, Y, Z) and the voxel-to-mm affine, in the scanner space of the source file."""

    shape: tuple[int, int, int]
    affine: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# Discovery


def _display(path: Path, root: Path) -> str:
    """A path as the user wrote the layout: relative to the data root when it lies inside it."""
    for base in (root, root.resolve()):  # MSD paths are resolved, a data.root may be relative
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _find_modality(folder: Path, modality: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{modality}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _discover_folders(root: Path, modalities: list[str]) -> list[Subject]:
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {}
        for modality in modalities:
            path = _find_modality(folder, modality)
            if path is None:
                raise ConfigError(f"subject '{folder.name}' has no '{modality}' file: expected "
                                  f"{folder / (modality + '.nii.gz')} (or .nii)")
            files[modality] = path
        subjects.append(Subject(folder.name, files))
    return subjects


# ---------------------------------------------------------------------------------------------------------
# MSD-style dataset.json (Medical Segmentation Decathlon)


@dataclass
class MsdIndex:
    """What a dataset.json says: modality names by their index on the images' 4th axis (empty without a
    "modality" map), label names by label value, the training cases ({"image": ..., "label": ...}) and the
    test cases' image paths."""

    path: Path
    modalities: list[str]
    labels: dict[int, str]
    training: list[dict]
    test: list[str]


def _index_map(value, key: str, path: Path) -> dict[int, str]:
    """A dataset.json map like {"0": "FLAIR", "1": "T1w"} as {0: "FLAIR", 1: "T1w"}."""
    if not isinstance(value, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"'{key}' in {path} must map indices to names, like {{\"0\": \"...\", \"1\": \"...\"}}")
    return {int(k): v for k, v in sorted(value.items(), key=lambda kv: int(kv[0]))}


def read_msd_index(root: Path) -> MsdIndex:
    """Read and check <root>/dataset.json (MSD layout)."""
    path = root / "dataset.json"
    try:
        index = json.loads(path.read_text())
        training = index["training"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot read the 'training' list of {path}: {error}") from None
    modalities = _index_map(index.get("modality", {}), "modality", path)
    if list(modalities) != list(range(len(modalities))):
        raise ConfigError(f"the 'modality' map of {path} must number its modalities 0, 1, 2, ... (the positions "
                          f"on the images' 4th axis), got {list(modalities)}")
    test = index.get("test", [])
    if isinstance(test, list):  # MSD lists test images as paths; some tools write {"image": path} entries
        test = [entry.get("image") if isinstance(entry, dict) else entry for entry in test]
    if not isinstance(training, list) or not isinstance(test, list) or not all(isinstance(e, str) for e in test):
        raise ConfigError(f"{path} must hold a 'training' list of {{\"image\": ..., \"label\": ...}} entries and a "
                          "'test' list of image paths")
    return MsdIndex(path, list(modalities.values()), _index_map(index.get("labels", {}), "labels", path),
                    training, test)


def _describe_modalities(index: MsdIndex) -> str:
    return ", ".join(f"{name} ({position})" for position, name in enumerate(index.modalities))


def _modality_position(name: str, index: MsdIndex) -> int:
    """The 4th-axis position of data.images entry `name`: a modality name (case-insensitive) or an index."""
    matches = [p for p, known in enumerate(index.modalities) if known.lower() == name.lower()]
    if len(matches) > 1:
        raise ConfigError(f"data.images names '{name}', which matches several modalities of {index.path} "
                          f"({_describe_modalities(index)}): name it by its index")
    if matches:
        return matches[0]
    if name.isdigit() and int(name) < len(index.modalities):
        return int(name)
    raise ConfigError(f"data.images names '{name}', which is not a modality of {index.path}: available "
                      f"{_describe_modalities(index)} (by name, any case, or by index)")


def _image_positions(cfg: DataConfig, index: MsdIndex) -> dict[str, int | None]:
    """data.images -> 4th-axis position in the "image" files (None: the file is one 3D image)."""
    if index.modalities:
        return {name: _modality_position(name, index) for name in cfg.images}
    if len(cfg.images) != 1:
        raise ConfigError(f"{index.path} has no 'modality' map, so its images hold one modality each, but "
                          f"data.images={list(cfg.images)}: name one image, or add a 'modality' map")
    return {cfg.images[0]: None}


def _check_image_layout(path: Path, shown: str, index: MsdIndex) -> None:
    """Refuse an "image" file whose 4th axis does not hold the modalities that dataset.json names."""
    try:
        shape = tuple(nib.load(path).shape)  # the header only: nothing is decompressed
    except READ_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read NIfTI file {shown}: {message}") from None
    channels = shape[3] if len(shape) == 4 else 1
    if channels == len(index.modalities) or (channels == 1 and not index.modalities):
        return
    if not index.modalities:
        raise ConfigError(f"{shown} holds {channels} modalities along its 4th axis (shape {shape}), but {index.path} "
                          f"has no 'modality' map naming them (positions 0-{channels - 1}): add one, e.g. "
                          f"\"modality\": {{\"0\": \"FLAIR\", \"1\": \"T1w\"}}, and name them in data.images")
    raise ConfigError(f"{shown} holds {channels} modalities along its 4th axis (shape {shape}), but the "
                      f"'modality' map of {index.path} names {len(index.modalities)}: {_describe_modalities(index)}")


def _msd_case(position: int, entry, keys: dict[str, str], root: Path, index: MsdIndex) -> dict[str, Path]:
    """The files of one 'training' entry: name -> path, for each data name -> dataset.json key in `keys`."""
    files = {}
    for name, key in keys.items():
        if not isinstance(entry, dict) or key not in entry:
            raise ConfigError(f"entry {position} of the 'training' list in {index.path} has no '{key}'")
        path = (root / entry[key]).resolve()
        if not path.is_file():
            raise ConfigError(f"file '{entry[key]}' listed in {index.path} does not exist: {path}")
        files[name] = path
    return files


def _check_mask_classes(cfg: DataConfig, index: MsdIndex) -> None:
    """dataset.json's 'labels' fill data.mask_classes of the label mask when it is not set, and must agree
    with it when it is."""
    if not cfg.masks or not index.labels:
        return
    mask, count = cfg.masks[0], max(index.labels) + 1
    named = ", ".join(f"{value} {name}" for value, name in index.labels.items())
    if mask not in cfg.mask_classes:
        cfg.mask_classes[mask] = count
        get_logger().info("data.mask_classes.%s=%d from the labels of %s (%s)", mask, count, index.path, named)
    elif cfg.mask_classes[mask] != count:
        raise ConfigError(f"data.mask_classes.{mask}={cfg.mask_classes[mask]}, but the 'labels' of {index.path} "
                          f"name {count} classes ({named}): set data.mask_classes.{mask}={count}")


def _discover_msd(root: Path, cfg: DataConfig) -> list[Subject]:
    """MSD-style dataset.json: data.images are modalities of its "image" files (by name or index; a 4D file is
    split along its 4th axis), data.masks[0] (if any) its "label". The 'test' cases are never loaded."""
    index = read_msd_index(root)
    if len(cfg.masks) > 1:
        raise ConfigError(f"{index.path} provides one label per subject, but data.masks={list(cfg.masks)}")
    positions = _image_positions(cfg, index)
    _check_mask_classes(cfg, index)
    keys = {**{name: "image" for name in cfg.images}, **({cfg.masks[0]: "label"} if cfg.masks else {})}
    subjects = []
    for position, entry in enumerate(index.training):
        files = _msd_case(position, entry, keys, root, index)
        _check_image_layout(files[cfg.images[0]], _display(files[cfg.images[0]], root), index)
        channels = {name: p for name, p in positions.items() if p is not None}
        subjects.append(Subject(_strip_nifti_suffix(Path(entry["image"]).name), files, channels))
    _check_test_cases([s.subject_id for s in subjects], index)
    return subjects


def _check_test_cases(training_ids: list[str], index: MsdIndex) -> None:
    """Test cases never train: refuse one that is also a training case, and say that they are left out."""
    test_ids = [_strip_nifti_suffix(Path(path).name) for path in index.test]
    both = sorted(set(test_ids) & set(training_ids))
    if both:
        raise ConfigError(f"case '{both[0]}' is in both the 'training' and the 'test' list of {index.path}: "
                          "test cases must never train")
    if test_ids:
        get_logger().info("%d 'test' cases of %s are not loaded (no labels, never trained on); the held-out "
                          "subjects come from its 'training' list", len(test_ids), index.path)


def mask_label_names(cfg: DataConfig) -> dict[str, dict[int, str]]:
    """Names of the label values of each mask, from an MSD dataset.json's 'labels' ({} without one)."""
    path = Path(cfg.root) / "dataset.json"
    if not cfg.masks or not path.is_file():
        return {}
    labels = read_msd_index(Path(cfg.root)).labels
    return {cfg.masks[0]: labels} if labels else {}


def discover_subjects(cfg: DataConfig) -> list[Subject]:
    """List the subjects under cfg.root: one folder per subject, or an MSD-style dataset.json."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: data folder not found: {root}")
    modalities = list(cfg.images) + list(cfg.masks)
    if (root / "dataset.json").is_file():
        subjects = _discover_msd(root.resolve(), cfg)
    else:
        subjects = _discover_folders(root, modalities)
    if not subjects:
        raise ConfigError(f"data.root: no subjects in {root} (expected <subject>/<modality>.nii.gz folders "
                          f"or a dataset.json)")
    ids = [s.subject_id for s in subjects]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"data.root: subject id '{duplicate}' appears twice in {root}")
    return subjects


# ---------------------------------------------------------------------------------------------------------
# Volumes


def load_volume(path: Path, name: str, stacked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume reoriented to RAS; returns (float32 array, its RAS voxel-to-mm affine).

    Args:
        path: the file.
        name: how errors name the file (e.g. "sub-007/seg.nii.gz").
        stacked: the file holds volumes stacked along a 4th axis (an MSD image of several modalities): the
            array is (X, Y, Z, C), C = 1 for a 3D file.
    """
    axes = 4 if stacked else 3
    try:
        image = nib.load(path)
        shape = tuple(image.shape)
        if len(shape) < 3 or any(size != 1 for size in shape[axes:]):
            hint = " (a 4D file of several modalities needs an MSD-style dataset.json with a 'modality' map)"
            expected = "a 3D volume or a 4D stack of them" if stacked else "a 3D volume"
            raise ConfigError(f"expected {expected}, got shape {shape} in {name}" + (hint if len(shape) == 4 else ""))
        if len(shape) > axes:  # trailing singleton dimensions, e.g. (X, Y, Z, 1)
            image = image.slicer[(slice(None),) * axes + (0,) * (len(shape) - axes)]
        image = nib.as_closest_canonical(image)  # reorients the three spatial axes, keeps a 4th
        # Read here, inside the try: a truncated .nii.gz only fails when its data is decompressed.
        volume = np.ascontiguousarray(image.get_fdata(dtype=np.float32))
    except ConfigError:
        raise
    except READ_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read NIfTI file {name}: {message}") from None
    if not np.isfinite(volume).all():
        raise ConfigError(f"{int((~np.isfinite(volume)).sum())} voxels are NaN or Inf in {name}")
    if stacked and volume.ndim == 3:
        volume = volume[..., None]
    return volume, image.affine.astype(np.float64)


def _read_modality(subject: Subject, name: str, shown: str, stacks: dict[Path, tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One modality of a subject: its own 3D file, or its position on the 4th axis of a file it shares with
    other modalities; `stacks` keeps such a file once decoded, so it is decompressed once per subject."""
    path = subject.files[name]
    if name not in subject.channels:
        return load_volume(path, shown)
    if path not in stacks:
        stacks[path] = load_volume(path, shown, stacked=True)
    stack, affine = stacks[path]
    return np.ascontiguousarray(stack[..., subject.channels[name]]), affine


def resample(volume: torch.Tensor, shape: Sequence[int], is_mask: bool) -> torch.Tensor:
    """Resample a (X, Y, Z) volume to `shape`: trilinear for images, nearest for label masks."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    x = volume[None, None]  # (1, 1, X, Y, Z)
    if is_mask:
        x = F.interpolate(x, size=tuple(shape), mode="nearest-exact")
    else:
        x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    return x[0, 0]


def grid_at_spacing(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None) -> VolumeGrid:
    """The grid that `resample` puts a RAS volume of `shape` and `affine` on for data.spacing (None: its own grid).

    Without align_corners, interpolation puts the centre of output voxel j at input index (j + 0.5) * n_in / n_out
    - 0.5; the affine says the same, so the voxel size it records is the effective one (data.spacing up to the
    rounding of the shape).
    """
    shape = tuple(int(n) for n in shape[:3])
    if spacing is None:
        return VolumeGrid(shape, np.asarray(affine, dtype=np.float64))
    voxel_size = nib.affines.voxel_sizes(affine)
    target = tuple(max(1, round(n * v / s)) for n, v, s in zip(shape, voxel_size, spacing))
    ratio = np.array(shape, dtype=np.float64) / np.array(target, dtype=np.float64)
    index_map = np.diag([*ratio, 1.0])
    index_map[:3, 3] = 0.5 * ratio - 0.5
    return VolumeGrid(target, np.asarray(affine, dtype=np.float64) @ index_map)


def header_grid(subject: Subject, cfg: DataConfig, root: Path) -> VolumeGrid:
    """A subject's preprocessed grid from the header of its first image alone, without decoding any voxels: for
    runs that never load the source volumes (a latent cache), the grid `load_subject_volumes` would use."""
    path = subject.files[cfg.images[0]]
    try:
        image = nib.load(path)
    except READ_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read NIfTI file {_display(path, root)}: {message}") from None
    shape = tuple(image.shape[:3])
    # nibabel's own reorientation (the one load_volume applies) on a zero-strided stand-in of the voxel array.
    stand_in = nib.Nifti1Image(np.broadcast_to(np.zeros((), np.uint8), shape), image.affine)
    canonical = nib.as_closest_canonical(stand_in)
    return grid_at_spacing(canonical.shape, canonical.affine, cfg.spacing)


def normalize_image(volume: np.ndarray, cfg: DataConfig, name: str,
                    clip: Sequence[float] | None = None) -> tuple[np.ndarray, list[float]]:
    """Clip to the MRI percentiles (non-zero voxels) or the CT window, or to `clip` when given, then map
    linearly to [-1, 1].

    Returns the normalised volume and the [low, high] clip values used.
    """
    if clip is not None:
        low, high = (float(v) for v in clip)
    elif cfg.normalization == "ct":
        low, high = (float(v) for v in cfg.ct_window)
    else:
        foreground = volume[volume != 0]
        if foreground.size == 0:
            raise ConfigError(f"image is all zeros in {name}")
        low, high = (float(v) for v in np.percentile(foreground, cfg.mri_percentiles))
        if high <= low:
            raise ConfigError(f"image has (almost) constant intensity {low} in {name}: data.mri_percentiles "
                              f"{cfg.mri_percentiles} give an empty intensity range")
    scaled = (np.clip(volume, low, high) - low) / (high - low) * 2.0 - 1.0
    return scaled.astype(np.float32), [low, high]


def check_mask(volume: np.ndarray, num_classes: int | None, name: str) -> np.ndarray:
    """Turn a mask volume into int64 labels; reject fractional, negative or too-large labels."""
    labels = np.rint(volume)
    if not np.array_equal(labels, volume):
        raise ConfigError(f"mask has non-integer values in {name} (expected integer labels)")
    if labels.min() < 0:
        raise ConfigError(f"mask has negative label {int(labels.min())} in {name}")
    if num_classes is not None and labels.max() >= num_classes:
        raise ConfigError(f"mask label {int(labels.max())} >= data.mask_classes {num_classes} in {name}")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Slices


def to_slices(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """Cut a RAS (X, Y, Z) volume into (S, 1, H, W) slices along `axis`, in the radiological view.

    np.rot90 puts anterior/superior at the top; the extra left-right flip puts the patient's right on the
    viewer's left (axial, coronal) and anterior on the left (sagittal), as radiology viewers show them.
    """
    slices = volume.movedim(axis, 0)  # (S, A, B)
    # == np.fliplr(np.rot90(slice)) for every slice: out[r, c] = slice[A - 1 - c, B - 1 - r]
    slices = slices.flip(1, 2).transpose(1, 2)  # (S, B, A)
    return slices[:, None].contiguous()


def pad_or_crop(x: torch.Tensor, size: Sequence[int], fill: float) -> torch.Tensor:
    """Centre-pad (with `fill`) or centre-crop the last len(size) dims of `x` to `size`."""
    for dim, target in zip(range(-len(size), 0), size):
        current = x.shape[dim]
        if current > target:
            x = x.narrow(dim, (current - target) // 2, target)
        elif current < target:
            before = (target - current) // 2
            pad = [0, 0] * -dim  # F.pad pads the last dimension first
            pad[-2], pad[-1] = before, target - current - before
            x = F.pad(x, pad, value=fill)
    return x


def fit_slices(slices: torch.Tensor, image_size: int, resize: bool, is_mask: bool) -> torch.Tensor:
    """Bring (S, 1, H, W) slices to (S, 1, image_size, image_size).

    Args:
        resize: pad to square, then resize (bilinear + antialias for images, nearest for masks);
            otherwise centre pad/crop without changing the pixel size.
        is_mask: pad masks with 0 (background) and images with -1 (the normalised minimum).
    """
    fill = 0.0 if is_mask else -1.0
    if not resize:
        return pad_or_crop(slices, (image_size, image_size), fill)
    side = max(slices.shape[-2:])
    square = pad_or_crop(slices, (side, side), fill)
    if side == image_size:
        return square
    if is_mask:
        return F.interpolate(square, size=(image_size, image_size), mode="nearest-exact")
    resized = F.interpolate(square, size=(image_size, image_size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.clamp_(-1.0, 1.0)


def unfit_slices(slices: torch.Tensor, plane: Sequence[int], resize: bool, is_mask: bool,
                 fill: float) -> torch.Tensor:
    """Undo `fit_slices`: (S, C, image_size, image_size) -> (S, C, *plane), `plane` the (H, W) of `to_slices`.

    With `resize` the square is resized back (bilinear for images, nearest for masks, the same pixel centres as
    on the way in), then the padding is cut off; without it, what centre-cropping cut off is `fill`.
    """
    if resize and slices.shape[-1] != max(plane):
        side = (max(plane),) * 2
        if is_mask:
            slices = F.interpolate(slices.float(), size=side, mode="nearest-exact").to(slices.dtype)
        else:
            slices = F.interpolate(slices.float(), size=side, mode="bilinear", antialias=True, align_corners=False)
    return pad_or_crop(slices, plane, fill)


def from_slices(slices: torch.Tensor, axis: int) -> torch.Tensor:
    """Undo `to_slices`: (S, C, H, W) slices -> a (C, X, Y, Z) RAS block whose S slices run along `axis`."""
    planes = slices.transpose(-1, -2).flip(-2, -1)  # (S, C, A, B): the rotation and flip of to_slices undone
    return planes.transpose(0, 1).movedim(1, axis + 1)


def plane_shape(grid_shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(H, W) of the slices `to_slices` cuts from a volume of `grid_shape` along `axis`."""
    a, b = (grid_shape[k] for k in range(3) if k != axis)
    return b, a


def place_slice(item_id: str, image, grid: VolumeGrid, slice_axis: int, resize: bool, is_mask: bool,
                fill: float) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Where a 2D item's (C, image_size, image_size) image lies in its subject's grid and its values there:
    (the index of the one-voxel-thick plane at the item's slice, a (C, *that plane's shape) block)."""
    plane = unfit_slices(torch.as_tensor(image)[None], plane_shape(grid.shape, slice_axis), resize, is_mask, fill)
    index = slice_index_of(item_id)
    region = [slice(None)] * 3
    region[slice_axis] = slice(index, index + 1)
    return tuple(region), from_slices(plane, slice_axis)


def keep_slices(slices: dict[str, torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """Boolean (S,) of the slices whose foreground fraction reaches cfg.min_foreground."""
    if cfg.filter_mask:
        foreground = slices[cfg.filter_mask] > 0
    else:
        foreground = slices[cfg.images[0]] > cfg.intensity_threshold
    return foreground.flatten(1).float().mean(1) >= cfg.min_foreground


# ---------------------------------------------------------------------------------------------------------
# Dataset


class SliceDataset(ArrayDataset):
    """In-memory 2D slices: item = {image name: float32 (1, H, W) in [-1, 1], mask name: int64 (1, H, W),
    "item_id": "<subject>/<axis letter><slice index>"}."""

    data_range: float = DATA_RANGE

    def __init__(self, arrays: dict[str, torch.Tensor], item_ids: list[str], image_names: list[str],
                 mask_names: list[str], normalization: dict,
                 clip_values: dict[str, dict[str, list[float]]] | None = None,
                 mask_labels: dict[str, dict[int, str]] | None = None,
                 grids: dict[str, VolumeGrid] | None = None) -> None:
        """
        Args:
            arrays: name -> (N, 1, H, W) tensor, float32 for images and int64 for masks.
            item_ids: N ids, in the order of the arrays' first dimension.
            normalization: how images were mapped to [-1, 1]: method and parameters (JSON-serialisable).
            clip_values: subject -> image name -> the [low, high] intensities mapped to [-1, 1]; kept apart from
                `normalization`, which describes the method and goes into exported model metadata.
            mask_labels: mask name -> label value -> class name, where the data names them (an MSD dataset.json's
                'labels'); figures and exports may use them.
            grids: subject -> the preprocessed grid its items were cut from (item ids name the slice), so that
                outputs can be put back in register with the source scan.
        """
        super().__init__(arrays, item_ids)
        self.image_names = list(image_names)
        self.mask_names = list(mask_names)
        self.normalization = normalization
        self.clip_values = clip_values or {}
        self.mask_labels = mask_labels or {}
        self.grids = grids or {}

    @property
    def subject_ids(self) -> list[str]:
        """Subjects of the items, in order of first appearance."""
        return list(dict.fromkeys(subject_of(item_id) for item_id in self.item_ids))

    def subset(self, item_ids: Sequence[str]) -> SliceDataset:
        """A dataset of the given items (in the given order); the tensors are copied, not re-decoded."""
        missing = [i for i in item_ids if i not in self._index]
        if missing:
            raise KeyError(f"unknown item id {missing[0]!r}")
        index = torch.tensor([self._index[i] for i in item_ids], dtype=torch.long)
        arrays = {name: tensor[index] for name, tensor in self.arrays.items()}
        subjects = {subject_of(i) for i in item_ids}
        clip_values = {k: v for k, v in self.clip_values.items() if k in subjects}
        grids = {k: v for k, v in self.grids.items() if k in subjects}
        return type(self)(arrays, list(item_ids), self.image_names, self.mask_names, self.normalization,
                          clip_values, self.mask_labels, grids)


def _check_config(cfg: DataConfig) -> None:
    """Reject data settings that cannot work, naming the key, before any file is read."""
    if not cfg.images:
        raise ConfigError("data.images is empty: name at least one image modality")
    if cfg.normalization not in ("mri", "ct"):
        raise ConfigError(f"data.normalization must be 'mri' or 'ct', got '{cfg.normalization}'")
    if cfg.slice_axis not in (0, 1, 2):
        raise ConfigError(f"data.slice_axis must be 0, 1 or 2, got {cfg.slice_axis}")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {cfg.image_size}")
    if cfg.filter_mask and cfg.filter_mask not in cfg.masks:
        raise ConfigError(f"data.filter_mask '{cfg.filter_mask}' is not one of data.masks {list(cfg.masks)}")
    unknown = sorted(set(cfg.mask_classes) - set(cfg.masks))
    if unknown:
        raise ConfigError(f"data.mask_classes names '{unknown[0]}', which is not one of data.masks "
                          f"{list(cfg.masks)}")
    low, high = cfg.mri_percentiles
    if not 0 <= low < high <= 100:
        raise ConfigError(f"data.mri_percentiles must satisfy 0 <= low < high <= 100, got {cfg.mri_percentiles}")
    if cfg.ct_window[0] >= cfg.ct_window[1]:
        raise ConfigError(f"data.ct_window must be [low, high] with low < high, got {cfg.ct_window}")
    if cfg.spacing is not None and (len(cfg.spacing) != 3 or min(cfg.spacing) <= 0):
        raise ConfigError(f"data.spacing must be three positive sizes in mm (x, y, z), got {cfg.spacing}")
    if cfg.dims not in (2, 3):
        raise ConfigError(f"data.dims must be 2 (slices) or 3 (volumes), got {cfg.dims}")
    if cfg.dims == 3:
        if len(cfg.volume_shape) != 3 or min(cfg.volume_shape) < 1:
            raise ConfigError(f"data.volume_shape must be three positive sizes (D, H, W) with data.dims=3, got "
                              f"{list(cfg.volume_shape)}")
        if cfg.patch_size and (len(cfg.patch_size) != 3 or min(cfg.patch_size) < 1):
            raise ConfigError(f"data.patch_size must be [] (whole volumes) or three positive sizes (D, H, W), got "
                              f"{list(cfg.patch_size)}")
        if any(p > v for p, v in zip(cfg.patch_size, cfg.volume_shape)):
            raise ConfigError(f"data.patch_size {list(cfg.patch_size)} is larger than the volumes it is cut from, "
                              f"data.volume_shape {list(cfg.volume_shape)}")
    if not 0 <= cfg.patch_foreground <= 1:
        raise ConfigError(f"data.patch_foreground={cfg.patch_foreground} must be in [0, 1]")
    if cfg.degrade.kind:
        if cfg.degrade.source and cfg.degrade.source not in cfg.images:
            raise ConfigError(f"data.degrade.source='{cfg.degrade.source}' is not one of data.images {list(cfg.images)}")
        if cfg.degrade.name in list(cfg.images) + list(cfg.masks):
            raise ConfigError(f"data.degrade.name='{cfg.degrade.name}' is already a modality in data.images or "
                              "data.masks: give the degraded image a name of its own")


def load_subject_volumes(subject: Subject, cfg: DataConfig, root: Path
                         ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], VolumeGrid]:
    """Decode and preprocess one subject's volumes on one RAS grid at data.spacing.

    Returns name -> (X, Y, Z) tensor (images float32 in [-1, 1], masks int64 labels, plus the simulated degraded
    image under data.degrade.name when data.degrade.kind is set), the [low, high] clip values of each image, and
    the grid (shape and affine) they are on.
    """
    reference_name = cfg.images[0]
    degrade_source = cfg.degrade.source or reference_name
    volumes: dict[str, torch.Tensor] = {}
    clip_values: dict[str, list[float]] = {}
    native_shape: tuple[int, ...] = ()
    voxel_size: tuple[float, ...] = ()
    native_affine = np.eye(4)
    grid = VolumeGrid((), native_affine)  # set by the first image, the reference
    stacks: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    for name in list(cfg.images) + list(cfg.masks):
        is_mask = name in cfg.masks
        display = _display(subject.files[name], root)
        volume, affine = _read_modality(subject, name, display, stacks)
        if name == reference_name:
            native_shape, native_affine = volume.shape, affine
            grid = grid_at_spacing(native_shape, native_affine, cfg.spacing)
            voxel_size = tuple(float(v) for v in (nib.affines.voxel_sizes(affine) if cfg.spacing is None
                                                  else cfg.spacing))
        elif volume.shape != native_shape:
            kind = "mask" if is_mask else f"'{name}'"
            raise ConfigError(f"{kind} shape {volume.shape} != image shape {native_shape} in {display}")
        elif not np.allclose(affine, native_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
            # Same shape on another grid (shifted, rotated, other spacing): voxels would pair up wrongly.
            difference = float(np.abs(affine - native_affine).max())
            raise ConfigError(f"affine of {display} differs from that of "
                              f"{_display(subject.files[reference_name], root)} by up to {difference:.4g} mm "
                              "after reorientation to RAS: resample both onto one grid")
        if is_mask:
            labels = torch.from_numpy(check_mask(volume, cfg.mask_classes.get(name), display)).float()
            volumes[name] = resample(labels, grid.shape, is_mask=True).long()
            continue
        # Resampled before the clip to the intensity window, so that both act on the scanner's intensities.
        raw = resample(torch.from_numpy(volume), grid.shape, is_mask=False)
        normalised, clip_values[name] = normalize_image(raw.numpy(), cfg, display)
        volumes[name] = torch.from_numpy(normalised)
        if cfg.degrade.kind and name == degrade_source:
            in_plane = [size for axis, size in enumerate(voxel_size) if axis != cfg.slice_axis]
            degraded = degrade(raw, cfg.degrade, item_seed(cfg.degrade.seed, subject.subject_id),
                               slice_axis=cfg.slice_axis, pixel_size_mm=float(np.mean(in_plane)))
            # The target's clip values: degraded and target share one intensity scale.
            volumes[cfg.degrade.name] = torch.from_numpy(
                normalize_image(degraded.numpy(), cfg, display, clip=clip_values[name])[0])
    return volumes, clip_values, grid


def _load_subject(subject: Subject, cfg: DataConfig, root: Path
                  ) -> tuple[dict[str, torch.Tensor], list[int], dict[str, list[float]], VolumeGrid]:
    """Decode and preprocess one subject: (name -> kept (S, 1, H, W) slices, kept slice indices, clip values, the
    grid the slices were cut from)."""
    volumes, clip_values, grid = load_subject_volumes(subject, cfg, root)
    slices = {}
    for name, volume in volumes.items():
        is_mask = volume.dtype == torch.int64
        fitted = fit_slices(to_slices(volume.float(), cfg.slice_axis), cfg.image_size, cfg.resize, is_mask)
        slices[name] = fitted.long() if is_mask else fitted
    keep = keep_slices(slices, cfg)
    kept = {name: tensor[keep] for name, tensor in slices.items()}
    return kept, torch.nonzero(keep).flatten().tolist(), clip_values, grid


def _normalization_record(cfg: DataConfig) -> dict:
    if cfg.normalization == "ct":
        record = {"method": "ct_window", "window_hu": [float(v) for v in cfg.ct_window]}
    else:
        record = {"method": "mri_percentile", "percentiles": [float(v) for v in cfg.mri_percentiles],
                  "nonzero_voxels_only": True}
    record.update({"output_range": [-1.0, 1.0], "data_range": DATA_RANGE})
    if cfg.degrade.kind:  # how the degraded input was simulated (its seed per subject is in split.json)
        record["degraded_input"] = {"name": cfg.degrade.name, "source": cfg.degrade.source or cfg.images[0],
                                    "kind": cfg.degrade.kind, "photons": cfg.degrade.photons,
                                    "factor": list(cfg.degrade.factor), "seed": cfg.degrade.seed,
                                    "normalised_with": "the source image's clip values"}
    return record


def _empty_filter_message(cfg: DataConfig) -> str:
    if cfg.filter_mask:
        return (f"no slices left after filtering: lower data.min_foreground (now {cfg.min_foreground}) "
                f"or check data.filter_mask '{cfg.filter_mask}'")
    return (f"no slices left after filtering: lower data.min_foreground (now {cfg.min_foreground}) or "
            f"data.intensity_threshold (now {cfg.intensity_threshold})")


def load_slice_dataset(cfg: DataConfig) -> SliceDataset:
    """Decode every subject under cfg.root once and return all kept slices as one in-memory dataset."""
    _check_config(cfg)
    logger = get_logger()
    root = Path(cfg.root)
    subjects = discover_subjects(cfg)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in cfg.image_names() + list(cfg.masks)}
    item_ids: list[str] = []
    clip_values: dict[str, dict[str, list[float]]] = {}
    grids: dict[str, VolumeGrid] = {}
    letter = AXIS_LETTERS[cfg.slice_axis]
    for subject in subjects:
        slices, indices, clip_values[subject.subject_id], grids[subject.subject_id] = _load_subject(subject, cfg, root)
        for name, tensor in slices.items():
            parts[name].append(tensor)
        item_ids += [f"{subject.subject_id}/{letter}{index:03d}" for index in indices]
    if not item_ids:
        raise ConfigError(_empty_filter_message(cfg))
    arrays = {name: torch.cat(tensors) for name, tensors in parts.items()}
    logger.info("loaded %d subjects from %s: %d slices of %dx%d along %s kept", len(subjects), root,
                len(item_ids), cfg.image_size, cfg.image_size, letter)
    return SliceDataset(arrays, item_ids, cfg.image_names(), list(cfg.masks), _normalization_record(cfg),
                        clip_values, mask_label_names(cfg), grids)


def random_flip(batch: dict, prob: float) -> dict:
    """Left-right flip each sample of a collated batch with probability `prob`, the same way for every
    spatial key ((B, C, H, W) or (B, C, D, H, W) tensors: images and masks); other entries pass through.

    Uses torch's global RNG, which the training loop reseeds every step (exact resume).
    Note: for sagittal slices (data.slice_axis=0) the width axis is anterior-posterior.
    """
    spatial = [key for key, value in batch.items() if torch.is_tensor(value) and value.dim() >= 4]
    if prob <= 0 or not spatial:
        return dict(batch)
    size = batch[spatial[0]].shape[0]
    flip = torch.rand(size) < prob
    out = dict(batch)
    for key in spatial:
        value = batch[key]
        mask = flip.to(value.device).view(size, *[1] * (value.dim() - 1))
        out[key] = torch.where(mask, value.flip(-1), value)
    return out


def subject_of(item_id: str) -> str:
    """The subject id of an item id like "sub-01/z045"."""
    return item_id.rsplit("/", 1)[0]


def slice_index_of(item_id: str) -> int:
    """The slice index of an item id like "sub-01/z045"."""
    return int(item_id.rsplit("/", 1)[1][1:])
