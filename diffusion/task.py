"""The generative task: which named arrays are generated (targets) given which (conditions).

A batch is a dict of named tensors: images (B, C, H, W), masks (B, 1, H, W) of integer labels and vectors
(B, K) such as class distributions. Masks enter the network one-hot, scaled to [-1, 1], so a generated mask is
decoded with an argmax. A vector condition enters as K + 1 weights over learned class embeddings, the last one
being the null condition used when the condition is dropped (classifier-free guidance) or unknown.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.config import Config, ConfigError, DataConfig, TaskConfig


@dataclass
class Field:
    name: str
    kind: str  # image | mask | vector
    channels: int  # image channels, mask labels (background included) or vector length

    @property
    def is_mask(self) -> bool:
        return self.kind == "mask"


def fields_from_config(data: DataConfig) -> dict[str, Field]:
    """The named arrays a pixel-space dataset provides, as the data config describes them."""
    if data.kind == "tiles":
        return {"image": Field("image", "image", 3), "mask": Field("mask", "mask", data.tile_classes),
                "class_dist": Field("class_dist", "vector", data.tile_classes)}
    fields = {name: Field(name, "image", 1) for name in data.image_names()}
    for name in data.masks:
        if data.mask_classes.get(name, 0) < 2:
            raise ConfigError(f"mask '{name}' needs data.mask_classes.{name} >= 2 (labels incl. background)")
        fields[name] = Field(name, "mask", data.mask_classes[name])
    return fields


class Task:
    """Targets and conditions of one training run.

    Args:
        fields: what the dataset provides (see `fields_from_config`; a latent cache describes its own).
        spatial_shape: (H, W) of the generated arrays.
    """

    kind = "generation"

    def __init__(self, cfg: TaskConfig, fields: dict[str, Field], spatial_shape: tuple[int, ...]):
        self.cfg = cfg
        spatial = sorted(n for n, f in fields.items() if f.kind != "vector")
        for key, names in (("task.targets", cfg.targets), ("task.spatial_conditions", cfg.spatial_conditions)):
            for name in names:
                if name not in spatial:
                    raise ConfigError(f"{key} names '{name}'; the dataset provides {spatial}")
        if not cfg.targets:
            raise ConfigError("task.targets is empty: name at least one image or mask to generate")
        masks = [n for n, f in fields.items() if f.is_mask]
        if cfg.roi_mask and cfg.roi_mask not in masks:
            raise ConfigError(f"task.roi_mask='{cfg.roi_mask}' is not one of the dataset's masks {masks}")
        unknown_weights = set(cfg.loss_weights) - set(cfg.targets)
        if unknown_weights:
            raise ConfigError(f"task.loss_weights names {sorted(unknown_weights)}, not in task.targets {cfg.targets}")
        vectors = [n for n, f in fields.items() if f.kind == "vector"]
        if cfg.vector_condition and cfg.vector_condition not in vectors:
            raise ConfigError(f"task.vector_condition='{cfg.vector_condition}'; the dataset provides vectors "
                              f"{vectors}")
        if cfg.perceptual_weight > 0 and not any(fields[n].kind == "image" for n in cfg.targets):
            raise ConfigError(f"task.perceptual_weight compares images, and task.targets {cfg.targets} holds none")
        if not 0 <= cfg.cond_drop_prob < 1:
            raise ConfigError(f"task.cond_drop_prob={cfg.cond_drop_prob} must be in [0, 1)")

        self.spatial_shape = tuple(spatial_shape)
        self.targets = [fields[n] for n in cfg.targets]
        self.conditions = [fields[n] for n in cfg.spatial_conditions]
        self.vector = fields[cfg.vector_condition] if cfg.vector_condition else None
        # The region whose loss is logged separately: the ROI mask, else the first mask the task uses.
        masks_used = [f.name for f in self.targets + self.conditions if f.is_mask]
        self.region_mask = cfg.roi_mask or (masks_used[0] if masks_used else "")

    @property
    def vector_dim(self) -> int:
        """Length of the network's vector input: K class weights plus the null entry (0 = none)."""
        return self.vector.channels + 1 if self.vector else 0

    @property
    def target_channels(self) -> int:
        return sum(f.channels for f in self.targets)

    @property
    def condition_channels(self) -> int:
        return sum(f.channels for f in self.conditions)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.target_channels, *self.spatial_shape)  # (C, H, W)

    @property
    def is_conditional(self) -> bool:
        """Whether samples have a reference to compare with (a spatial condition pins down the target)."""
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
        """Network conditions; with drop_prob each sample's conditions are replaced by the null condition.

        Spatial conditions: one tensor of channels. Vector condition: (B, K + 1) weights whose last entry marks
        the null condition, used for dropped samples and for unlabelled ones (all-zero class vectors).
        """
        cond = {}
        if not (self.conditions or self.vector):
            return cond
        batch_size = len(batch["item_id"])
        device = next(v.device for v in batch.values() if torch.is_tensor(v))
        keep = torch.ones(batch_size, dtype=torch.bool, device=device)
        if drop_prob > 0:
            keep = torch.rand(batch_size, device=device) >= drop_prob
        if self.conditions:
            spatial = torch.cat([self._encode(f, batch[f.name]) for f in self.conditions], dim=1)
            cond["spatial"] = spatial * keep.view(-1, *[1] * (spatial.dim() - 1))
        if self.vector:
            weights = batch[self.vector.name].float()  # (B, K)
            known = keep & (weights.sum(dim=1) > 0)
            weights = weights * known[:, None]
            cond["vector"] = torch.cat([weights, (~known).float()[:, None]], dim=1)  # (B, K + 1)
        return cond

    def null_condition(self, cond: dict) -> dict:
        null = {k: torch.zeros_like(v) for k, v in cond.items()}
        if "vector" in null:
            null["vector"][:, -1] = 1.0
        return null

    def describe(self, dataset) -> dict:
        """What a user of an exported model needs to know to feed it (written to final/task.yaml)."""
        def entry(f: Field) -> dict:
            return {"name": f.name, "kind": f.kind, "channels": f.channels}

        return {
            "targets": [entry(f) for f in self.targets],
            "spatial_conditions": [entry(f) for f in self.conditions],
            "vector_condition": entry(self.vector) if self.vector else None,
            "mask_encoding": "one-hot scaled to [-1, 1]; decode with argmax over the mask's channels",
            "input_layout": "x_t channels then spatial-condition channels, concatenated on dim 1",
            "vector_encoding": "class_labels = [weights (K), null flag] @ vector_embedding.safetensors['weight']"
                               if self.vector else None,
            "normalization": dataset.normalization,
            "data_range": dataset.data_range,
            "spatial_shape": list(self.spatial_shape),
        }

    def decode(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split generated channels back into named arrays: images (B, 1, H, W), masks as labels (B, 1, H, W)."""
        out, start = {}, 0
        for f in self.targets:
            chunk = x0[:, start:start + f.channels]
            out[f.name] = chunk.argmax(dim=1, keepdim=True) if f.is_mask else chunk
            start += f.channels
        return out

    def perceptual_distance(self, perceptual, x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        """Per-sample (B,) feature distance between the predicted clean sample and x0, summed over the image
        targets (masks are not images). The prediction is clamped to the data range [-1, 1] the feature network
        expects: at high noise an eps-prediction implies x0 values far outside it."""
        total, start = x0.new_zeros(x0.shape[0]), 0
        for f in self.targets:
            if f.kind == "image":
                channels = slice(start, start + f.channels)
                total = total + perceptual(x0[:, channels], x0_hat[:, channels].clamp(-1, 1))
            start += f.channels
        return total

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


def build_task(cfg: Config, bundle) -> Task:
    """The run's task (`task.kind`): generating the dataset's targets, or classifying images by label diffusion
    (diffusion.classification.LabelDiffusionTask, the same interface)."""
    if cfg.task.kind == "classification":
        from diffusion.classification import LabelDiffusionTask  # imports transformers: only when classifying
        return LabelDiffusionTask(cfg.task, cfg.classifier, bundle.fields["image"],
                                  bundle.datasets["train"].class_names, cfg.data.image_size)
    return Task(cfg.task, bundle.fields, bundle.spatial_shape)
