"""The generative task: which named arrays are generated (targets) given which (conditions).

A batch is a dict of named tensors: images (B, 1, H, W) in [-1, 1] and masks (B, 1, H, W) of integer labels.
Masks enter the network one-hot, scaled to [-1, 1], so a generated mask is decoded with an argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.config import ConfigError, DataConfig, TaskConfig


@dataclass
class Field:
    name: str
    is_mask: bool
    channels: int


class Task:
    def __init__(self, cfg: TaskConfig, data: DataConfig):
        self.cfg = cfg
        known = set(data.images) | set(data.masks)
        for key, names in (("task.targets", cfg.targets), ("task.spatial_conditions", cfg.spatial_conditions)):
            for name in names:
                if name not in known:
                    raise ConfigError(f"{key} names '{name}', which is not in data.images {data.images} "
                                      f"or data.masks {data.masks}")
        if not cfg.targets:
            raise ConfigError("task.targets is empty: name at least one image or mask to generate")
        for name in (*cfg.targets, *cfg.spatial_conditions):
            if name in data.masks and data.mask_classes.get(name, 0) < 2:
                raise ConfigError(f"mask '{name}' needs data.mask_classes.{name} >= 2 (labels incl. background)")
        if cfg.roi_mask and cfg.roi_mask not in data.masks:
            raise ConfigError(f"task.roi_mask='{cfg.roi_mask}' is not in data.masks {data.masks}")
        unknown_weights = set(cfg.loss_weights) - set(cfg.targets)
        if unknown_weights:
            raise ConfigError(f"task.loss_weights names {sorted(unknown_weights)}, not in task.targets {cfg.targets}")
        if cfg.vector_condition:
            raise ConfigError("task.vector_condition needs a dataset that provides vectors (latent/pathology data)")

        def field(name: str) -> Field:
            is_mask = name in data.masks
            return Field(name, is_mask, data.mask_classes[name] if is_mask else 1)

        self.image_size = data.image_size
        self.targets = [field(n) for n in cfg.targets]
        self.conditions = [field(n) for n in cfg.spatial_conditions]
        # The region whose loss is logged separately: the ROI mask, else the first mask the task uses.
        masks_used = [f.name for f in self.targets + self.conditions if f.is_mask]
        self.region_mask = cfg.roi_mask or (masks_used[0] if masks_used else "")

    @property
    def target_channels(self) -> int:
        return sum(f.channels for f in self.targets)

    @property
    def condition_channels(self) -> int:
        return sum(f.channels for f in self.conditions)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.target_channels, self.image_size, self.image_size)  # (C, H, W)

    @property
    def is_conditional(self) -> bool:
        return bool(self.conditions)

    @staticmethod
    def _encode(field: Field, value: torch.Tensor) -> torch.Tensor:
        if not field.is_mask:
            return value.float()
        one_hot = F.one_hot(value[:, 0].long(), field.channels)  # (B, H, W, K)
        return one_hot.movedim(-1, 1).float() * 2 - 1  # (B, K, H, W) in {-1, 1}

    def targets_of(self, batch: dict) -> torch.Tensor:
        return torch.cat([self._encode(f, batch[f.name]) for f in self.targets], dim=1)

    def condition_of(self, batch: dict, drop_prob: float = 0.0) -> dict:
        """Network conditions; with drop_prob each sample's conditions are replaced by the null condition."""
        if not self.conditions:
            return {}
        spatial = torch.cat([self._encode(f, batch[f.name]) for f in self.conditions], dim=1)
        if drop_prob > 0:
            keep = torch.rand(spatial.shape[0], device=spatial.device) >= drop_prob
            spatial = spatial * keep.view(-1, *[1] * (spatial.dim() - 1))
        return {"spatial": spatial}

    def describe(self, dataset) -> dict:
        """What a user of an exported model needs to know to feed it (written to final/task.yaml)."""
        return {
            "targets": [{"name": f.name, "kind": "mask" if f.is_mask else "image", "channels": f.channels}
                        for f in self.targets],
            "spatial_conditions": [{"name": f.name, "kind": "mask" if f.is_mask else "image",
                                    "channels": f.channels} for f in self.conditions],
            "mask_encoding": "one-hot scaled to [-1, 1]; decode with argmax over the mask's channels",
            "input_layout": "x_t channels then spatial-condition channels, concatenated on dim 1",
            "normalization": dataset.normalization,
            "data_range": dataset.data_range,
            "image_size": self.image_size,
        }

    def null_condition(self, cond: dict) -> dict:
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def decode(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split generated channels back into named arrays: images (B, 1, H, W), masks as labels (B, 1, H, W)."""
        out, start = {}, 0
        for f in self.targets:
            chunk = x0[:, start:start + f.channels]
            out[f.name] = chunk.argmax(dim=1, keepdim=True) if f.is_mask else chunk
            start += f.channels
        return out

    def reduce(self, elementwise: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss (B,) from the strategy's elementwise loss, and batch-level diagnostics.

        The total is the sum over targets of loss_weight * mean over that target's channels and pixels, with
        pixels inside `task.roi_mask` weighted by `task.roi_weight`. Diagnostics are unweighted per-target
        means, plus means inside and outside the region mask; they stay on the device (no host sync).
        """
        region = None
        if self.region_mask:
            region = (batch[self.region_mask] > 0).to(elementwise.dtype)  # (B, 1, H, W)
        pixel_weight = 1.0
        if self.cfg.roi_mask and self.cfg.roi_weight != 1.0:
            pixel_weight = 1.0 + (self.cfg.roi_weight - 1.0) * region
        total = elementwise.new_zeros(elementwise.shape[0])
        diagnostics, start = {}, 0
        for f in self.targets:
            chunk = elementwise[:, start:start + f.channels].float()
            start += f.channels
            total = total + self.cfg.loss_weights.get(f.name, 1.0) * (chunk * pixel_weight).mean(
                dim=tuple(range(1, chunk.dim())))
            diagnostics[f"loss_{f.name}"] = chunk.mean()
            if region is not None:
                per_pixel = chunk.mean(dim=1, keepdim=True)
                diagnostics[f"loss_{f.name}_in_{self.region_mask}"] = (
                    (per_pixel * region).sum() / region.sum().clamp_min(1))
                diagnostics[f"loss_{f.name}_out_{self.region_mask}"] = (
                    (per_pixel * (1 - region)).sum() / (1 - region).sum().clamp_min(1))
        return total, diagnostics
