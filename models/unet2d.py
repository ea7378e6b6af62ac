"""The denoiser: a diffusers UNet2DModel built from the config (UNet3DModel for volumes), plus the conditioning
wrapper."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file
from torch import nn

from models.unet3d import UNet3DModel, build_unet3d
from utils.config import ConfigError, ModelConfig


def build_unet2d(cfg: ModelConfig, in_channels: int, out_channels: int, sample_size: int,
                 vector_condition: bool = False) -> UNet2DModel:
    """A UNet2DModel with one down/up block per width; attention where `attention_levels` says so.

    Args:
        in_channels: target channels plus spatial-condition channels (they are concatenated to the input).
        out_channels: target channels (the network predicts eps, x0, v or a velocity for each of them).
        vector_condition: accept a class embedding (computed by `Denoiser`) added to the time embedding.
    """
    check_unet_config(cfg, sample_size)
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(cfg.attention_levels))
    unet = UNet2DModel(
        sample_size=sample_size,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        **unet_arguments(cfg, in_channels, out_channels, vector_condition),
    )
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def unet_arguments(cfg: ModelConfig, in_channels: int, out_channels: int, vector_condition: bool) -> dict:
    """The settings the 2D and the 3D UNet both take from the `model` section."""
    return dict(in_channels=in_channels, out_channels=out_channels, layers_per_block=cfg.layers_per_block,
                attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout,
                class_embed_type="identity" if vector_condition else None)


def check_unet_config(cfg: ModelConfig, sample_size: int = 0) -> None:
    """ConfigError naming the key for a `model` section no UNet can be built from (sample_size 0: unknown)."""
    levels = len(cfg.block_out_channels)
    if len(cfg.attention_levels) != levels:
        raise ConfigError(f"model.attention_levels has {len(cfg.attention_levels)} entries but "
                          f"model.block_out_channels has {levels}; give one true/false per level")
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ConfigError(f"model.block_out_channels {bad} are not multiples of model.norm_num_groups="
                          f"{cfg.norm_num_groups}")
    attention_widths = [c for c, a in zip(cfg.block_out_channels, cfg.attention_levels) if a]
    attention_widths.append(cfg.block_out_channels[-1])  # the middle block always attends
    if any(c % cfg.attention_head_dim for c in attention_widths):
        raise ConfigError(f"model.attention_head_dim={cfg.attention_head_dim} must divide the widths with "
                          f"attention {sorted(set(attention_widths))} (the middle block always has attention)")
    if sample_size % 2 ** (levels - 1):
        raise ConfigError(f"data.image_size={sample_size} must be divisible by {2 ** (levels - 1)} "
                          f"for {levels} UNet levels")


class Denoiser(nn.Module):
    """net(x_t, t, cond): concatenates spatial conditions to the input and embeds the vector condition.

    A vector condition (B, K + 1) holds weights over K classes plus a null entry; its embedding is the same
    weighted sum of K + 1 learned class embeddings, so a plain label (one-hot), a class distribution and the
    null condition of classifier-free guidance share one path. The embedding table is the only weight outside
    `unet`; export writes it beside `final/unet`.
    """

    def __init__(self, unet: Union[UNet2DModel, UNet3DModel], vector_dim: int = 0):
        super().__init__()
        self.unet = unet
        self.vector_embedding = None
        if vector_dim:
            time_embed_dim = unet.time_embedding.linear_2.out_features
            self.vector_embedding = nn.Parameter(torch.randn(vector_dim, time_embed_dim) * 0.02)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        cond = cond or {}
        spatial, vector = cond.get("spatial"), cond.get("vector")
        net_input = x_t if spatial is None else torch.cat([x_t, spatial.to(x_t.dtype)], dim=1)  # (B, C+S, [D,] H, W)
        class_labels = None
        if self.vector_embedding is not None:
            class_labels = vector.to(self.vector_embedding.dtype) @ self.vector_embedding  # (B, D_time)
        return self.unet(net_input, t, class_labels=class_labels).sample  # (B, C, [D,] H, W)


def build_denoiser(cfg: ModelConfig, task) -> Denoiser:
    """The network a task needs: its targets plus spatial conditions in, its targets out, its vector condition.

    The task's spatial shape picks the UNet: (H, W) a UNet2DModel, (D, H, W) a UNet3DModel.
    """
    channels = (task.target_channels + task.condition_channels, task.target_channels)
    if len(task.spatial_shape) == 2:
        unet = build_unet2d(cfg, *channels, task.spatial_shape[-1], vector_condition=task.vector_dim > 0)
    elif len(task.spatial_shape) == 3:
        unet = build_unet3d(cfg, *channels, task.spatial_shape, vector_condition=task.vector_dim > 0)
    else:
        raise ConfigError(f"generated arrays of shape {tuple(task.spatial_shape)}: only 2D (H, W) and 3D (D, H, W) "
                          f"UNets exist")
    return Denoiser(unet, task.vector_dim)


VECTOR_EMBEDDING_FILE = "vector_embedding.safetensors"
UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet3DModel)}  # by unet/config.json's _class_name


def load_denoiser(folder: Path) -> Denoiser:
    """An exported denoiser (final/ or checkpoints/best-<metric>/, written by utils/export.py)."""
    class_name = json.loads((folder / "unet" / "config.json").read_text())["_class_name"]
    if class_name not in UNET_CLASSES:
        raise ValueError(f"{folder / 'unet' / 'config.json'} holds a {class_name}; "
                         f"expected one of {list(UNET_CLASSES)}")
    unet = UNET_CLASSES[class_name].from_pretrained(folder, subfolder="unet")
    embedding = folder / VECTOR_EMBEDDING_FILE
    if not embedding.is_file():
        return Denoiser(unet)
    weight = load_file(embedding)["weight"]
    denoiser = Denoiser(unet, weight.shape[0])
    denoiser.vector_embedding.data.copy_(weight)
    return denoiser
