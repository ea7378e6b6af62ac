"""PatchGAN discriminator (Isola et al. 2017, pix2pix): a fully convolutional net that scores overlapping patches,
of images or, with `spatial_dims=3`, of volumes (the 3D PatchGAN of 3D-MedDiffusion and MONAI)."""
from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from utils.config import ConfigError

NORMS = ("group", "none")
MAX_WIDTH_MULTIPLIER = 8  # as pix2pix: the width doubles per layer up to 8x the first
CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """(B, C, H, W) images -> (B, 1, h, w), or (B, C, D, H, W) volumes -> (B, 1, d, h, w), real/fake logits, one
    per receptive-field patch.

    Layers: a stride-2 conv with kernel 4 (4x4, or 4x4x4 in 3D), `num_layers - 1` more stride-2 convs with norm,
    one stride-1 conv with norm, and a stride-1 conv to one channel; LeakyReLU(0.2) between.

    Norm: GroupNorm or none. Not BatchNorm (pix2pix's choice): its batch statistics make a sample's score depend on
    the other samples in its per-GPU batch (and differ between training and eval), so the loss would change with
    the batch size and the number of GPUs, and real and fake images scored in one batch would leak into each other.

    Args:
        in_channels: image channels (those of vae.inputs).
        channels: width of the first layer (vae.disc_channels).
        num_layers: stride-2 layers (vae.disc_layers); each halves the resolution.
        norm: "group" (GroupNorm with `norm_num_groups`) or "none".
        spectral_norm: wrap every conv in spectral normalisation (Miyato et al. 2018), a Lipschitz constraint.
        spatial_dims: 2 for images, 3 for volumes (data.dims).
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm: str = "group",
                 norm_num_groups: int = 8, spectral_norm: bool = False, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in CONVS:
            raise ConfigError(f"data.dims must be 2 (images) or 3 (volumes) for the PatchGAN discriminator, "
                              f"got {spatial_dims}")
        if norm not in NORMS:
            raise ConfigError(f"discriminator norm '{norm}' is not one of {list(NORMS)}")
        if num_layers < 1:
            raise ConfigError(f"vae.disc_layers must be at least 1, got {num_layers}")
        widths = [channels * min(2 ** i, MAX_WIDTH_MULTIPLIER) for i in range(num_layers + 1)]
        if norm == "group" and any(w % norm_num_groups for w in widths[1:]):
            raise ConfigError(f"discriminator widths {widths[1:]} (from vae.disc_channels={channels}) must be "
                              f"multiples of {norm_num_groups} GroupNorm groups")

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = CONVS[spatial_dims](c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias)
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

    @staticmethod
    def min_input_size(num_layers: int) -> int:
        """The smallest side that still gives one logit: each stride-2 layer halves it, the two stride-1 4x4
        layers take one voxel each."""
        return 3 * 2 ** num_layers

    def forward(self, x: Tensor) -> Tensor:
        # Conv3d would take a (B, C, H, W) batch as one unbatched (C, D, H, W) volume: refuse it, don't score it.
        if x.ndim != self.config.spatial_dims + 2:
            raise ValueError(f"a {self.config.spatial_dims}D discriminator takes (B, C, "
                             f"{'D, ' if self.config.spatial_dims == 3 else ''}H, W) inputs, got {tuple(x.shape)}")
        return self.net(x)  # (B, 1, h, w) or (B, 1, d, h, w) logits
