"""PatchGAN discriminator (Isola et al. 2017, pix2pix): a fully convolutional net that scores overlapping patches."""
from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from utils.config import ConfigError

NORMS = ("group", "none")
MAX_WIDTH_MULTIPLIER = 8  # as pix2pix: the width doubles per layer up to 8x the first


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """(B, C, H, W) images -> (B, 1, h, w) real/fake logits, one per receptive-field patch.

    Layers: a stride-2 4x4 conv, `num_layers - 1` more stride-2 convs with norm, one stride-1 conv with norm, and a
    stride-1 conv to one channel; LeakyReLU(0.2) between.

    Norm: GroupNorm or none. Not BatchNorm (pix2pix's choice): its batch statistics make a sample's score depend on
    the other samples in its per-GPU batch (and differ between training and eval), so the loss would change with
    the batch size and the number of GPUs, and real and fake images scored in one batch would leak into each other.

    Args:
        in_channels: image channels (those of vae.inputs).
        channels: width of the first layer (vae.disc_channels).
        num_layers: stride-2 layers (vae.disc_layers); each halves the resolution.
        norm: "group" (GroupNorm with `norm_num_groups`) or "none".
        spectral_norm: wrap every conv in spectral normalisation (Miyato et al. 2018), a Lipschitz constraint.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm: str = "group",
                 norm_num_groups: int = 8, spectral_norm: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"discriminator norm '{norm}' is not one of {list(NORMS)}")
        if num_layers < 1:
            raise ConfigError(f"vae.disc_layers must be at least 1, got {num_layers}")
        widths = [channels * min(2 ** i, MAX_WIDTH_MULTIPLIER) for i in range(num_layers + 1)]
        if norm == "group" and any(w % norm_num_groups for w in widths[1:]):
            raise ConfigError(f"discriminator widths {widths[1:]} (from vae.disc_channels={channels}) must be "
                              f"multiples of {norm_num_groups} GroupNorm groups")

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            # No conv bias before a norm: the norm's shift replaces it.
            normed = norm == "group"
            layers = [conv(c_in, c_out, stride, bias=not normed)]
            if normed:
                layers.append(nn.GroupNorm(norm_num_groups, c_out))
            return layers + [nn.LeakyReLU(0.2)]

        layers: list[nn.Module] = [conv(in_channels, widths[0], 2, bias=True), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers):
            layers += block(widths[i - 1], widths[i], stride=2)
        layers += block(widths[num_layers - 1], widths[num_layers], stride=1)
        layers.append(conv(widths[num_layers], 1, 1, bias=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w) logits
