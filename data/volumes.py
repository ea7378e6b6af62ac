"""3D items of NIfTI volumes (data.dims: 3): whole volumes, slabs of a single subject, and random training patches.

A subject's volumes are preprocessed as for 2D slices (RAS, data.spacing, normalisation, simulated degradation)
and laid out as (1, D, H, W): D runs along data.slice_axis and every (H, W) slice is the 2D slice as
`to_slices` shows it, so a 2D and a 3D model of one dataset see the same orientation.

The split is made over slices, so split.json reads as in 2D: by subject when there are two or more, whole volumes
centre padded/cropped to data.volume_shape; with one subject, by contiguous slabs, held-out slabs a multiple of
D = data.volume_shape[0] slices (cut into items of D slices) and training items every window of D slices inside
the training slabs. Random patches (`random_patches`) are cut from training items in the training loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from data.nifti import (AXIS_LETTERS, SliceDataset, VolumeGrid, _check_config, _display, _normalization_record,
                        discover_subjects, from_slices, load_subject_volumes, mask_label_names, pad_or_crop,
                        plane_shape, slice_index_of, subject_of, to_slices)
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger


class VolumeDataset(SliceDataset):
    """In-memory volumes: item = {image name: float32 (1, D, H, W) in [-1, 1], mask name: int64 (1, D, H, W),
    "item_id": "<subject>" for a whole volume or "<subject>/<axis letter><first>-<last>" for a slab}."""


class SubjectVolumes:
    """Every subject's preprocessed volumes, (1, D, H, W) with H and W at data.volume_shape, D native; items are
    made per split by `dataset`."""

    def __init__(self, cfg: DataConfig):
        _check_config(cfg)
        self.cfg = cfg
        root = Path(cfg.root)
        subjects = discover_subjects(cfg)
        self.mask_labels = mask_label_names(cfg)
        self.volumes: dict[str, dict[str, torch.Tensor]] = {}
        self.clip_values: dict[str, dict[str, list[float]]] = {}
        self.grids: dict[str, VolumeGrid] = {}
        depth, height, width = cfg.volume_shape
        whole = len(subjects) > 1  # several subjects: every volume is one item of data.volume_shape
        minimum = list(cfg.patch_size or [1, 1, 1])  # a patch of padding is no training data
        for subject in subjects:
            volumes, self.clip_values[subject.subject_id], self.grids[subject.subject_id] = load_subject_volumes(
                subject, cfg, root)
            shown = _display(subject.files[cfg.images[0]], root)
            layout = {name: to_slices(v.float(), cfg.slice_axis).transpose(0, 1) for name, v in volumes.items()}
            shape = tuple(next(iter(layout.values())).shape[1:])
            if 1 in shape:
                raise ConfigError(f"{shown} is a 2D image (shape {shape} as (D, H, W) at data.spacing), but "
                                  "data.dims=3 needs volumes; use data.dims=2")
            if any(s < m for s, m in zip(shape, minimum)):
                raise ConfigError(f"{shown} has shape {shape} as (D, H, W) at data.spacing, smaller than "
                                  f"data.patch_size {minimum}: use a smaller patch or a finer data.spacing")
            size = (depth, height, width) if whole else (height, width)
            self.volumes[subject.subject_id] = {
                name: pad_or_crop(v, size, 0.0 if name in cfg.masks else -1.0).to(
                    torch.int64 if name in cfg.masks else torch.float32).contiguous()
                for name, v in layout.items()}
        letter = AXIS_LETTERS[cfg.slice_axis]
        # The units of the split: every slice of every subject, so split.json reads as for 2D data.
        self.item_ids = [f"{sid}/{letter}{i:03d}" for sid, v in self.volumes.items()
                         for i in range(next(iter(v.values())).shape[1])]
        get_logger().info("loaded %d subjects from %s as volumes of (D, H, W) %s", len(subjects), root,
                          list(cfg.volume_shape) if whole else ["slices", height, width])

    def dataset(self, slice_ids: Sequence[str], split: str) -> VolumeDataset:
        """The items of one split from its slices: whole volumes, or slabs of data.volume_shape[0] slices (held out:
        consecutive slabs; training: every window of that many consecutive slices)."""
        depth = self.cfg.volume_shape[0]
        letter = AXIS_LETTERS[self.cfg.slice_axis]
        by_subject: dict[str, list[int]] = {}
        for slice_id in slice_ids:
            by_subject.setdefault(subject_of(slice_id), []).append(slice_index_of(slice_id))
        parts: dict[str, list[torch.Tensor]] = {}
        item_ids: list[str] = []
        for subject, indices in by_subject.items():
            volumes = self.volumes[subject]
            total = next(iter(volumes.values())).shape[1]
            if len(indices) == total and len(self.volumes) > 1:  # a whole subject (already at volume_shape)
                starts, item_names = [None], [subject]
            else:
                starts = []
                for run in _runs(sorted(indices)):
                    stride = 1 if split == "train" else depth
                    starts += list(range(run[0], run[-1] + 2 - depth, stride))
                item_names = [f"{subject}/{letter}{s:03d}-{s + depth - 1:03d}" for s in starts]
            for start in starts:
                for name, volume in volumes.items():
                    parts.setdefault(name, []).append(volume if start is None else volume[:, start:start + depth])
            item_ids += item_names
        if not item_ids:
            raise ConfigError(f"the {split} split has no run of data.volume_shape[0]={depth} consecutive slices: lower "
                              "data.volume_shape[0] or data.slab_gap, or change data.val_fraction")
        arrays = {name: torch.stack(tensors) for name, tensors in parts.items()}
        subjects = set(by_subject)
        return VolumeDataset(arrays, item_ids, self.cfg.image_names(), list(self.cfg.masks),
                             _normalization_record(self.cfg),
                             {k: v for k, v in self.clip_values.items() if k in subjects}, self.mask_labels,
                             {k: v for k, v in self.grids.items() if k in subjects})


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted slice indices grouped into runs of consecutive ones."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def random_patches(batch: dict, patch_size: Sequence[int], foreground_prob: float, foreground_key: str,
                   threshold: float) -> dict:
    """Cut one random (D, H, W) patch per sample from every volume of a collated batch (same place in each).

    With probability `foreground_prob` a patch is centred on a random foreground voxel (batch[foreground_key] above
    `threshold`), else placed uniformly. Uses torch's global RNG, which the training loop reseeds every step, so a
    resumed run cuts the same patches.
    """
    spatial = [k for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 5]
    shape = batch[spatial[0]].shape[2:]
    if tuple(shape) == tuple(patch_size):
        return dict(batch)
    out = dict(batch)
    crops = {k: [] for k in spatial}
    for b in range(batch[spatial[0]].shape[0]):
        high = torch.tensor([s - p for s, p in zip(shape, patch_size)])
        start = (torch.rand(3) * (high + 1)).long().clamp(max=high)
        if torch.rand(()) < foreground_prob:
            foreground = torch.nonzero(batch[foreground_key][b, 0] > threshold)
            if len(foreground):
                centre = foreground[torch.randint(len(foreground), ()).item()].cpu()
                start = (centre - torch.tensor(patch_size) // 2).clamp(min=0).minimum(high)
        region = tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch_size))
        for k in spatial:
            crops[k].append(batch[k][(b, slice(None), *region)])
    out.update({k: torch.stack(v) for k, v in crops.items()})
    return out


def display_spacing(cfg: DataConfig) -> tuple[float, float, float]:
    """Voxel size (D, H, W) in mm of the items' layout, from data.spacing (isotropic when it keeps native sizes)."""
    if cfg.spacing is None:
        return (1.0, 1.0, 1.0)
    # to_slices: D is slice_axis; of the other two RAS axes (a, b), H runs along b and W along a.
    a, b = (axis for axis in range(3) if axis != cfg.slice_axis)
    return (float(cfg.spacing[cfg.slice_axis]), float(cfg.spacing[b]), float(cfg.spacing[a]))


def slab_start_of(item_id: str) -> int | None:
    """The first slice of a 3D item: "sub-01/z016-031" -> 16; None for a whole volume ("sub-01")."""
    if "/" not in item_id:
        return None
    return int(item_id.rsplit("/", 1)[1][1:].split("-")[0])


def place_volume(item_id: str, volume, grid: VolumeGrid, slice_axis: int,
                 fill: float) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Where a 3D item's (C, D, H, W) volume lies in its subject's grid and its values there, without interpolation:
    (the index of its slab, a (C, *slab shape) block). The centre pad/crop to data.volume_shape is undone: what
    padding added is cut off, what cropping cut off is `fill`."""
    x = torch.as_tensor(volume)
    plane = plane_shape(grid.shape, slice_axis)
    start = slab_start_of(item_id)
    if start is None:  # a whole volume, padded or cropped along D as well
        x, start = pad_or_crop(x, (grid.shape[slice_axis], *plane), fill), 0
    else:
        x = pad_or_crop(x, plane, fill)
    region = [slice(None)] * 3
    region[slice_axis] = slice(start, start + x.shape[1])
    return tuple(region), from_slices(x.transpose(0, 1), slice_axis)
