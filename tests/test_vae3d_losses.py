"""The autoencoder losses and the PatchGAN discriminator on volumes (B, C, D, H, W): 3D PatchGAN, 2.5D perceptual
loss, KL over 3D latents, and AutoencoderLoss with a 3D discriminator."""
from __future__ import annotations


import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from models.discriminator import PatchDiscriminator
from models.losses import AutoencoderLoss, PerceptualLoss, kl_divergence
from tests.conftest import save_feature_network
from utils.config import ConfigError, VAEConfig

CHANNELS = 2  # two input channels, so that a slicing that mixes channels with a spatial axis shows


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """tanh, not relu: no exactly-zero gradients, so the gradient test below can tell the slices that were
    compared from those that were not."""
    return save_feature_network(tmp_path_factory.mktemp("nets") / "features.pt", CHANNELS, torch.tanh)


def volumes(seed=0, shape=(2, CHANNELS, 6, 8, 10)):
    """A volume pair with distinct D, H, W, so that a slice taken along the wrong axis has the wrong shape."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator) * 2 - 1
    return x, (x + 0.3 * torch.randn(shape, generator=generator)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# The 3D PatchGAN.

@pytest.mark.parametrize("norm, spectral", [("group", False), ("none", True)])
def test_3d_patch_discriminator_scores_each_sample_alone(norm, spectral):
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1, channels=8, num_layers=2, norm=norm, norm_num_groups=4,
                              spectral_norm=spectral, spatial_dims=3).eval()
    assert disc.config.spatial_dims == 3
    convs = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert len(convs) == 4 and all(isinstance(m, nn.Conv3d) and m.kernel_size == (4, 4, 4) for m in convs)
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    logits = disc(x)
    # 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, kernel 4, padding 1), along each axis.
    assert logits.shape == (2, 1, 6, 6, 6)
    # No batch statistics: a sample's score does not depend on the rest of its batch.
    assert torch.allclose(disc(x[1:]), logits[1:], atol=1e-5)
    # Each axis keeps its own size: 16 -> 2, 32 -> 6, 24 -> 4.
    assert disc(torch.randn(1, 1, 16, 32, 24)).shape == (1, 1, 2, 6, 4)

    logits.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_discriminator_dims_are_checked():
    rebuilt = PatchDiscriminator.from_config(PatchDiscriminator(channels=8, spatial_dims=3).config)
    assert isinstance(rebuilt.net[0], nn.Conv3d)
    assert isinstance(PatchDiscriminator(channels=8).net[0], nn.Conv2d)  # 2D stays the default
    with pytest.raises(ConfigError, match="data.dims"):
        PatchDiscriminator(spatial_dims=4)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\).*\(2, 1, 16, 16\)"):
        rebuilt(torch.zeros(2, 1, 16, 16))


# ----------------------------------------------------------------------------------------------------------
# The 2.5D perceptual loss.

def slices_through(volume, axis, index):
    """Slice `index` of one (C, D, H, W) volume along spatial `axis` (0 = D, 1 = H, 2 = W): (C, H, W) axial,
    (C, D, W) coronal, (C, D, H) sagittal."""
    return volume.select(1 + axis, index)


def test_perceptual_25d_is_the_mean_of_2d_losses_over_the_chosen_slices(feature_net):
    loss = PerceptualLoss(feature_net, slices_per_axis=2)
    x, y = volumes()
    assert torch.equal(loss(x, x), torch.zeros(2))
    torch.manual_seed(5)
    value = loss(x, y)
    assert value.shape == (2,) and torch.all(value > 0)

    torch.manual_seed(5)
    indices = loss.slice_indices(x.shape)
    assert [tuple(i.shape) for i in indices] == [(2, 2)] * 3
    for index, size in zip(indices, x.shape[2:]):
        assert index.min() >= 0 and index.max() < size
        assert all(len(set(row.tolist())) == 2 for row in index), "a volume got the same slice twice"
    # The 2D loss of each chosen axial (C, H, W), coronal (C, D, W) and sagittal (C, D, H) slice, one at a time.
    for b in range(2):
        per_slice = [loss(slices_through(x[b], axis, i)[None], slices_through(y[b], axis, i)[None])
                     for axis in range(3) for i in indices[axis][b].tolist()]
        assert torch.allclose(value[b], torch.cat(per_slice).mean(), rtol=1e-5)

    # Reproducible under the same seed, other slices (so other values) under others.
    torch.manual_seed(5)
    assert torch.equal(loss(x, y), value)
    others = set()
    for seed in range(4):
        torch.manual_seed(seed)
        others.add(tuple(loss(x, y).tolist()))
    assert len(others) > 1


def test_perceptual_25d_sees_a_voxel_only_through_a_slice_that_crosses_it(feature_net):
    loss = PerceptualLoss(feature_net, slices_per_axis=1)
    x, _ = volumes(1)
    y = x.clone()
    d, h, w = 2, 5, 7
    y[0, :, d, h, w] += 1.0  # sample 0 differs in one voxel, sample 1 not at all
    crossed = set()
    for seed in range(40):
        torch.manual_seed(seed)
        (axial, coronal, sagittal) = [i[0, 0].item() for i in loss.slice_indices(x.shape)]
        torch.manual_seed(seed)
        value = loss(x, y)
        hit = axial == d or coronal == h or sagittal == w
        assert (value[0] > 0) == hit, (seed, axial, coronal, sagittal)
        assert value[1] == 0
        crossed.add(hit)
    assert crossed == {True, False}  # both cases occurred


def test_perceptual_25d_gradient_reaches_only_the_chosen_slices(feature_net):
    loss = PerceptualLoss(feature_net, slices_per_axis=2)
    x, y = volumes(2)
    y.requires_grad_(True)
    torch.manual_seed(7)
    loss(x, y).sum().backward()
    assert all(p.grad is None for p in loss.network.parameters())
    torch.manual_seed(7)
    indices = loss.slice_indices(x.shape)
    for b in range(2):
        on_slices = torch.zeros(x.shape[2:], dtype=torch.bool)
        on_slices[indices[0][b]] = True
        on_slices[:, indices[1][b]] = True
        on_slices[:, :, indices[2][b]] = True
        grad = y.grad[b].abs().sum(dim=0)  # (D, H, W)
        assert torch.all(grad[~on_slices] == 0), "gradient off the chosen slices"
        for axis in range(3):
            for i in indices[axis][b].tolist():
                assert slices_through(grad[None], axis, i).sum() > 0, (b, axis, i)


def test_perceptual_2d_is_unchanged_and_settings_are_checked(feature_net):
    loss = PerceptualLoss(feature_net, slices_per_axis=3)
    x, y = volumes(3, (2, CHANNELS, 12, 12))
    state = torch.get_rng_state()
    value = loss(x, y)
    assert torch.equal(torch.get_rng_state(), state), "images draw no slices"
    unit = [[f / f.norm(dim=1, keepdim=True) for f in loss.network(t)] for t in (x, y)]  # LPIPS-style, per layer
    expected = sum((g - r).square().sum(dim=1).mean(dim=(1, 2)) for r, g in zip(*unit))
    assert torch.allclose(value, expected)
    with pytest.raises(ConfigError, match="vae.perceptual_slices"):
        PerceptualLoss(feature_net, slices_per_axis=0)
    with pytest.raises(ConfigError, match=r"vae.perceptual_slices=3 .*\(6, 2, 10\) volume"):
        loss(*volumes(0, (1, CHANNELS, 6, 2, 10)))


# ----------------------------------------------------------------------------------------------------------
# KL divergence.

def test_kl_divergence_matches_diffusers_in_2d_and_sums_every_latent_axis_in_3d():
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 5))
    assert torch.allclose(kl_divergence(posterior), posterior.kl(), rtol=1e-6)
    assert torch.equal(kl_divergence(DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))), torch.zeros(2))

    parameters = torch.randn(2, 8, 3, 4, 5)  # (B, 2 * C, d, h, w)
    kl = kl_divergence(DiagonalGaussianDistribution(parameters))
    assert kl.shape == (2,)
    # The KL of independent depth slices adds up.
    per_depth = [DiagonalGaussianDistribution(parameters[:, :, i]).kl() for i in range(3)]
    assert torch.allclose(kl, sum(per_depth), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# AutoencoderLoss on volumes.

class TinyVolumeAutoencoder(nn.Module):
    """Stand-in for TrainableAutoencoder: model(x) -> (reconstruction, regulariser (B,))."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv3d(CHANNELS, 4, 3, padding=1)
        self.out = nn.Conv3d(4, CHANNELS, 3, padding=1)

    @property
    def last_layer(self):
        return self.out.weight

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.out(h), h.square().flatten(1).mean(dim=1)


def test_autoencoder_loss_with_a_3d_discriminator(feature_net):
    torch.manual_seed(0)
    model = TinyVolumeAutoencoder()
    disc = PatchDiscriminator(in_channels=CHANNELS, channels=8, num_layers=2, norm_num_groups=4, spatial_dims=3)
    cfg = VAEConfig(perceptual_network=str(feature_net), perceptual_slices=3, disc_weight=0.5)
    loss_fn = AutoencoderLoss(cfg)
    assert loss_fn.perceptual.slices_per_axis == 3
    x = torch.rand(2, CHANNELS, 16, 16, 16) * 2 - 1

    loss, reconstruction, logs = loss_fn(model, x, disc, model.last_layer)
    assert reconstruction.shape == x.shape and loss.shape == (2,) and torch.all(torch.isfinite(loss))
    assert all(torch.isfinite(v) for v in logs.values())
    assert logs["perceptual"] > 0 and logs["adaptive_weight"] > 0
    loss.mean().backward()
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())
    assert model.last_layer.grad is not None and model.last_layer.grad.abs().sum() > 0
    vae_grad = model.last_layer.grad.clone()

    d_loss = loss_fn.discriminator_loss(disc, x, reconstruction)
    assert d_loss.shape == (2,) and torch.all(torch.isfinite(d_loss))
    # Per sample: scoring one volume alone gives its share of the batch's loss.
    assert torch.allclose(loss_fn.discriminator_loss(disc, x[:1], reconstruction[:1]), d_loss[:1], atol=1e-5)
    d_loss.mean().backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert torch.equal(model.last_layer.grad, vae_grad)
