"""2D denoiser: a diffusers UNet2DModel built from the config, plus the conditioning wrapper."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import UNet2DModel
from torch import nn

from utils.config import ConfigError, ModelConfig


def build_unet2d(cfg: ModelConfig, in_channels: int, out_channels: int, sample_size: int) -> UNet2DModel:
    """A UNet2DModel with one down/up block per width; attention where `attention_levels` says so.

    Args:
        in_channels: target channels plus spatial-condition channels (they are concatenated to the input).
        out_channels: target channels (the network predicts eps, x0, v or a velocity for each of them).
    """
    levels = len(cfg.block_out_channels)
    if len(cfg.attention_levels) != levels:
        raise ConfigError(f"model.attention_levels has {len(cfg.attention_levels)} entries but "
                          f"model.block_out_channels has {levels}; give one true/false per level")
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ConfigError(f"model.block_out_channels {bad} are not multiples of model.norm_num_groups="
                          f"{cfg.norm_num_groups}")
    if sample_size % 2 ** (levels - 1):
        raise ConfigError(f"data.image_size={sample_size} must be divisible by {2 ** (levels - 1)} "
                          f"for {levels} UNet levels")
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        # One extra embedding row is the null class used when the label is dropped for guidance.
        num_class_embeds=cfg.num_class_embeds + 1 if cfg.num_class_embeds > 0 else None,
    )


class Denoiser(nn.Module):
    """net(x_t, t, cond): concatenates spatial conditions to the input and passes the label condition on.

    The wrapper holds no weights of its own, so `denoiser.unet` is exactly what `final/unet` exports.
    """

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        cond = cond or {}
        spatial, label = cond.get("spatial"), cond.get("label")
        net_input = x_t if spatial is None else torch.cat([x_t, spatial.to(x_t.dtype)], dim=1)  # (B, C+S, H, W)
        return self.unet(net_input, t, class_labels=label).sample  # (B, C, H, W)
