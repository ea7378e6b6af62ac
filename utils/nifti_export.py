"""NIfTI outputs of evaluate.py (eval.save_nifti): the evaluated items of each held-out subject put back into that
subject's volume, so that ITK-SNAP or 3D Slicer overlays generated and real images in register with the source scan.

Space: the preprocessed grid, i.e. the source volume reoriented to RAS and resampled to data.spacing (`VolumeGrid`),
the grid every item was cut from, with its own affine in the scanner's mm space. A viewer places it on the source
file; when the source is already RAS and data.spacing is null, shape and affine are the source file's own. The
native grid would cost a second interpolation of every generated image (masks by nearest neighbour) and gain no
registration. A 2D slice is brought back from data.image_size to its plane (the resize undone, bilinear for images
and nearest for masks; the padding cut off) at its slice index; a 3D item as it is (only its centre pad/crop undone).
Voxels that were not generated (other slices, or what data.resize=false cropped away) are NaN in images and 0 in masks,
in every file alike, so that the files compare voxel by voxel.

Units: images float32 in the normalised range [-1, 1], or in HU for CT (data.normalization: ct; the recorded window
undone, so values lie inside it); the std over samples in the same units; masks uint8 (int16 above 255) labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from data.nifti import VolumeGrid, discover_subjects, header_grid, place_slice, subject_of
from data.volumes import place_volume
from diffusion.task import Field
from utils.config import Config, ConfigError, DataConfig
from utils.evaluation import uncertainty_maps

EMPTY_IMAGE = float("nan")  # image voxels that were not generated
EMPTY_LABEL = 0  # mask voxels that were not generated: background


def nifti_grids(cfg: Config, task, dataset) -> dict[str, VolumeGrid]:
    """Each subject's preprocessed grid, from the evaluated dataset or, for a latent cache, from the source files'
    headers under data.root; refused (naming the key) where items have no place in a source volume."""
    source = cfg.latent.source_kind if cfg.data.kind == "latent_cache" else cfg.data.kind
    if source != "nifti":
        raise ConfigError(f"eval.save_nifti=true writes volumes of NIfTI data, but this run's data is '{source}': "
                          "set eval.save_nifti=false")
    if not (task.is_conditional or task.vector):
        raise ConfigError("eval.save_nifti=true puts held-out items back into their scans, but this task is "
                          "unconditional (samples of noise have no place in a scan): set eval.save_nifti=false")
    grids = getattr(dataset, "grids", None)
    if grids:
        return grids
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"eval.save_nifti=true reads the geometry of the source scans (their headers) under "
                          f"data.root={root}, which does not exist: point data.root at the data the cache was "
                          "encoded from, or set eval.save_nifti=false")
    return {s.subject_id: header_grid(s, cfg.data, root) for s in discover_subjects(cfg.data)}


def write_nifti(folder: Path, items: list[dict], scored: Sequence[Field], grids: dict[str, VolumeGrid],
                data: DataConfig, normalization: dict) -> list[Path]:
    """<folder>/<subject>/generated_<field>.nii.gz (sample 1), reference_<field>, condition_<name> and, with several
    samples, std_<field>, each on the subject's preprocessed grid; returns the files written.

    Args:
        scored: the fields scored (in pixel space, decoded for latent runs); conditions are written when they lie
            on the same grid (not a latent-size mask).
        data: the run's data section: how items were cut (slice_axis, resize).
        normalization: the dataset's record; a CT window turns images back into HU.
    """
    by_subject: dict[str, list[dict]] = {}
    for item in items:
        by_subject.setdefault(subject_of(item["item_id"]), []).append(item)
    written = []
    for subject, subject_items in by_subject.items():
        if subject not in grids:
            raise ConfigError(f"eval.save_nifti: no source volume of subject '{subject}' under data.root={data.root}")
        volumes: dict[str, np.ndarray] = {}
        for item in subject_items:
            for name, array in item_arrays(item, scored).items():
                paste(volumes, name, item["item_id"], array, grids[subject], data)
        for name, volume in volumes.items():
            written.append(save_volume(folder / subject / f"{name}.nii.gz", volume, grids[subject].affine,
                                       hu_window(normalization), spread=name.startswith("std_")))
    return written


def item_arrays(item: dict, scored: Sequence[Field]) -> dict[str, np.ndarray]:
    """What is written of one item, by file name: sample 1 and the reference of each scored field, the std over
    samples (several samples), and the conditions on the generated images' grid."""
    grid = item["generated"][0][scored[0].name].shape[1:]
    arrays = {}
    for f in scored:
        arrays[f"generated_{f.name}"] = item["generated"][0][f.name]
        if f.name in item["reference"]:
            arrays[f"reference_{f.name}"] = item["reference"][f.name]
    arrays.update({f"std_{name}": std for name, std in uncertainty_maps(item, scored).items()})
    arrays.update({f"condition_{name}": value for name, value in item["condition"].items()
                   if value.shape[1:] == grid})
    return arrays


def paste(volumes: dict[str, np.ndarray], name: str, item_id: str, array: np.ndarray, grid: VolumeGrid,
          data: DataConfig) -> None:
    """Put one item's (C, H, W) slice or (C, D, H, W) volume into volumes[name], a (C, X, Y, Z) array on `grid`
    made on first use and empty elsewhere."""
    is_mask = np.issubdtype(array.dtype, np.integer)
    fill = EMPTY_LABEL if is_mask else EMPTY_IMAGE
    if array.ndim == 3:
        region, block = place_slice(item_id, array, grid, data.slice_axis, data.resize, is_mask, fill)
    else:
        region, block = place_volume(item_id, array, grid, data.slice_axis, fill)
    if name not in volumes:
        volumes[name] = np.full((array.shape[0], *grid.shape), fill, dtype=np.int64 if is_mask else np.float32)
    volumes[name][(slice(None), *region)] = block.numpy()


def hu_window(normalization: dict) -> Optional[tuple[float, float]]:
    """The CT window [low, high] in HU that images were normalised with; None for other normalisations."""
    window = normalization.get("window_hu") if normalization.get("method") == "ct_window" else None
    return None if window is None else (float(window[0]), float(window[1]))


def save_volume(path: Path, volume: np.ndarray, affine: np.ndarray, window: Optional[tuple[float, float]],
                spread: bool = False) -> Path:
    """Write a (C, X, Y, Z) volume: masks as integer labels, images as float32 (in HU with a CT `window`; `spread`:
    a standard deviation, scaled but not shifted); several channels along a 4th axis."""
    is_mask = np.issubdtype(volume.dtype, np.integer)
    if is_mask:
        values = volume.astype(np.uint8 if volume.max(initial=0) < 256 else np.int16)
        units = "labels"
    elif window is None:
        values, units = volume.astype(np.float32), "normalised [-1, 1]" if not spread else "normalised units"
    else:
        half = (window[1] - window[0]) / 2  # HU per normalised unit
        values = (volume * half if spread else window[0] + (volume + 1) * half).astype(np.float32)
        units = "HU"
    values = values[0] if values.shape[0] == 1 else np.moveaxis(values, 0, -1)
    image = nib.Nifti1Image(values, affine)
    # Both header transforms say the same, so every viewer (qform or sform first) puts it at the same place.
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    header = image.header
    header.set_xyzt_units("mm")
    empty = "0 = background or not evaluated" if is_mask else "NaN = not evaluated"
    header["descrip"] = f"{path.name.split('.')[0]}: {units}; {empty}"[:79].encode()
    if is_mask:
        header.set_intent("label")
    elif not spread:  # display range: the window, or the normalised range
        header["cal_min"], header["cal_max"] = window or (-1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
