"""3D denoiser: a volumetric diffusion UNet with the interface of diffusers' UNet2DModel.

`UNet3DModel(sample, timestep, class_labels).sample` takes and returns (B, C, D, H, W) volumes. It is a diffusers
ModelMixin + ConfigMixin, so `save_pretrained` / `from_pretrained(final, subfolder="unet")` work as for 2D, and
it exposes `time_embedding.linear_2.out_features`, which `Denoiser` reads to size the vector-condition table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.config import ConfigError, ModelConfig


@dataclass
class UNet3DOutput(BaseOutput):
    sample: torch.Tensor  # (B, C, D, H, W)


class ResnetBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv3d twice with a residual path; the time embedding scales and shifts the second norm.

    Args:
        time_embed_dim: width of the time (plus vector-condition) embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, norm_num_groups: int,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, D, H, W)
        scale, shift = self.time_proj(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock3D(nn.Module):
    """Multi-head self-attention over all D*H*W voxels, with a residual path."""

    def __init__(self, channels: int, head_dim: int, norm_num_groups: int):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C) with N = D*H*W
        q, k, v = self.qkv(tokens).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        out = self.proj_out(out.transpose(1, 2).reshape(b, -1, c))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, d, h, w)


class Downsample3D(nn.Module):
    """Halves D, H and W with a strided convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Doubles D, H and W: nearest neighbour, then a convolution (no checkerboard of a transposed conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep through a two-layer MLP (`linear_2.out_features` is its width)."""

    def __init__(self, channels: int, time_embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]  # (B, C/2)
        features = torch.cat([angles.cos(), angles.sin()], dim=1).to(self.linear_1.weight.dtype)  # (B, C)
        return self.linear_2(F.silu(self.linear_1(features)))  # (B, time_embed_dim)


class Level3D(nn.Module):
    """The residual blocks of one resolution level, with attention after each where configured."""

    def __init__(self, channels_in: Sequence[int], channels: int, time_embed_dim: int, attention: bool,
                 head_dim: int, norm_num_groups: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(c, channels, time_embed_dim, norm_num_groups, dropout)
                                     for c in channels_in)
        self.attentions = nn.ModuleList(AttentionBlock3D(channels, head_dim, norm_num_groups)
                                        for _ in channels_in) if attention else None


class UNet3DModel(ModelMixin, ConfigMixin):
    """Volumetric diffusion UNet: one level per entry of `block_out_channels`, halving D, H and W between levels.

    Args:
        sample_size: (D, H, W) the model was built for (informative; any shape the levels can halve works).
        block_out_channels: width of each level, finest first.
        layers_per_block: residual blocks per level on the way down (one more on the way up, for the skips).
        attention_levels: one flag per level; the middle block always attends.
        class_embed_type: "identity" adds `class_labels` (B, time_embed_dim) to the time embedding.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, sample_size: Optional[Sequence[int]] = None, in_channels: int = 1, out_channels: int = 1,
                 block_out_channels: Sequence[int] = (32, 64, 128), layers_per_block: int = 1,
                 attention_levels: Sequence[bool] = (False, False, True), attention_head_dim: int = 32,
                 norm_num_groups: int = 8, dropout: float = 0.0, class_embed_type: Optional[str] = None):
        super().__init__()
        if class_embed_type not in (None, "identity"):
            raise ValueError(f"class_embed_type={class_embed_type!r}; UNet3DModel supports None or 'identity'")
        widths = list(block_out_channels)
        time_embed_dim = 4 * widths[0]
        block = dict(time_embed_dim=time_embed_dim, head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
                     dropout=dropout)
        # Read by enable_gradient_checkpointing(); forward then recomputes each block in the backward pass.
        self.gradient_checkpointing = False

        self.time_embedding = TimestepEmbedding(widths[0], time_embed_dim)
        self.conv_in = nn.Conv3d(in_channels, widths[0], 3, padding=1)

        skip_channels, previous = [widths[0]], widths[0]
        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        for level, (width, attention) in enumerate(zip(widths, attention_levels)):
            self.down_blocks.append(Level3D([previous] + [width] * (layers_per_block - 1), width,
                                            attention=attention, **block))
            skip_channels += [width] * layers_per_block
            previous = width
            if level < len(widths) - 1:
                self.downsamplers.append(Downsample3D(width))
                skip_channels.append(width)

        self.mid_resnet_1 = ResnetBlock3D(previous, previous, time_embed_dim, norm_num_groups, dropout)
        self.mid_attention = AttentionBlock3D(previous, attention_head_dim, norm_num_groups)
        self.mid_resnet_2 = ResnetBlock3D(previous, previous, time_embed_dim, norm_num_groups, dropout)

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, channels_in = widths[level], []
            for _ in range(layers_per_block + 1):
                channels_in.append(previous + skip_channels.pop())
                previous = width
            self.up_blocks.append(Level3D(channels_in, width, attention=attention_levels[level], **block))
            if level > 0:
                self.upsamplers.append(Upsample3D(width))

        self.norm_out = nn.GroupNorm(norm_num_groups, widths[0])
        self.conv_out = nn.Conv3d(widths[0], out_channels, 3, padding=1)

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """One block, recomputed in the backward pass when gradient checkpointing is on (activations not kept)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _level(self, level: Level3D, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
               going_up: bool) -> torch.Tensor:
        for i, resnet in enumerate(level.resnets):
            if going_up:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, D, H, W)
            h = self._run(resnet, h, emb)
            if level.attentions is not None:
                h = self._run(level.attentions[i], h)
            if not going_up:
                skips.append(h)
        return h

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                class_labels: Optional[torch.Tensor] = None, return_dict: bool = True):
        """Denoiser output for `sample` (B, C_in, D, H, W) at `timestep` (B,) or scalar.

        Args:
            class_labels: (B, time_embed_dim) embedding added to the time embedding (class_embed_type "identity").
        """
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t  # (B,)
        emb = self.time_embedding(t)  # (B, E)
        if self.config.class_embed_type == "identity":
            if class_labels is None:
                raise ValueError("class_labels (B, time_embed_dim) are required with class_embed_type='identity'")
            emb = emb + class_labels.to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to a UNet3DModel built without class_embed_type='identity'")

        h = self.conv_in(sample)  # (B, C0, D, H, W)
        skips = [h]
        for level, down in enumerate(self.down_blocks):
            h = self._level(down, h, emb, skips, going_up=False)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)  # (B, C, D/2, H/2, W/2)
                skips.append(h)

        h = self._run(self.mid_resnet_1, h, emb)  # (B, C_last, D/2^L, H/2^L, W/2^L)
        h = self._run(self.mid_attention, h)
        h = self._run(self.mid_resnet_2, h, emb)

        for level, up in enumerate(self.up_blocks):
            h = self._level(up, h, emb, skips, going_up=True)
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h)  # (B, C, 2D, 2H, 2W)

        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, D, H, W)
        return UNet3DOutput(sample=out) if return_dict else (out,)


def check_unet3d_shape(cfg: ModelConfig, spatial_shape: Sequence[int], key: str = "volume shape") -> None:
    """ConfigError naming the shape (as `key`) and `model.block_out_channels` when the levels cannot halve it."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ConfigError(f"a UNet3D needs a (D, H, W) {key}, got {shape}")
    if any(s % factor for s in shape):
        raise ConfigError(f"{key} {shape} cannot be halved {len(cfg.block_out_channels) - 1} times for "
                          f"model.block_out_channels={list(cfg.block_out_channels)}: every side must be a "
                          f"multiple of {factor} (pad or crop the volume, or use fewer levels)")


def build_unet3d(cfg: ModelConfig, in_channels: int, out_channels: int, spatial_shape: Sequence[int],
                 vector_condition: bool = False) -> UNet3DModel:
    """A UNet3DModel from the `model` section, as `build_unet2d` builds the 2D one.

    Args:
        in_channels: target channels plus spatial-condition channels (they are concatenated to the input).
        out_channels: target channels.
        spatial_shape: (D, H, W) of the generated volumes.
        vector_condition: accept a class embedding (computed by `Denoiser`) added to the time embedding.
    """
    from models.unet2d import check_unet_config, unet_arguments  # imported here: models.unet2d imports this module

    check_unet_config(cfg)
    check_unet3d_shape(cfg, spatial_shape)
    unet = UNet3DModel(
        sample_size=[int(s) for s in spatial_shape],
        block_out_channels=list(cfg.block_out_channels),
        attention_levels=list(cfg.attention_levels),
        **unet_arguments(cfg, in_channels, out_channels, vector_condition),
    )
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet
