"""Autoencoder losses: reconstruction, perceptual, KL / VQ regularisers, adversarial, and the adaptive GAN weight.

Each loss returns one value per sample, shape (B,), of images (B, C, H, W) or volumes (B, C, D, H, W); the
training loop reduces. `AutoencoderLoss` puts the generator side together as in Esser et al. 2021 (taming
transformers) and Rombach et al. 2022 (latent diffusion):
    reconstruction + perceptual_weight * perceptual + kl_weight * KL (or codebook_weight * VQ)
    + disc_weight * adaptive_weight * generator adversarial loss.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import ConfigError, VAEConfig
from utils.metrics import FeatureExtractor

ADAPTIVE_WEIGHT_MAX = 1e4  # as taming transformers: bounds the weight while the GAN gradient is still tiny


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.flatten(1).mean(dim=1)


class ReconstructionLoss:
    """Mean absolute (l1) or squared (l2) error per sample."""

    def __init__(self, kind: str = "l1"):
        if kind not in ("l1", "l2"):
            raise ConfigError(f"vae.reconstruction_loss='{kind}' is not one of ['l1', 'l2']")
        self.kind = kind

    def __call__(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        error = reconstruction.float() - x.float()
        return _per_sample_mean(error.abs() if self.kind == "l1" else error.square())


class PerceptualLoss:
    """Distance between the features of a frozen local TorchScript network, per sample.

    The network follows utils.metrics.FeatureExtractor's contract (images (B, C, H, W) in [-1, 1], any resizing,
    renormalisation or grey -> RGB repetition inside the module) but may return one tensor or a tuple/list of
    tensors (several layers). Each layer's features are unit-normalised over their channel dimension, as in LPIPS
    (Zhang et al. 2018, without the learned per-channel weights), and the squared distances are averaged over
    positions and summed over layers. Gradients flow to the reconstruction, never into the network.

    Volumes (B, C, D, H, W) get a 2.5D loss: the feature network is 2D (pretrained 3D feature networks are rare and
    costly), so it compares slices. Slices in all three orientations (axial (C, H, W) at a depth index, coronal
    (C, D, W) at a height index, sagittal (C, D, H) at a width index) so that structure across the slice plane is
    judged too, not only in-plane texture. `slices_per_axis` distinct random indices per axis and sample (the same
    for x and the reconstruction) keep the cost at 3 * slices_per_axis 2D images per volume; over steps every slice
    is seen. The loss is the mean over those slices. The indices come from torch's global (CPU) RNG, which the
    training loop reseeds every step, so a resumed run draws the same slices.

    Args:
        path: the TorchScript file (vae.perceptual_network).
        device: where the network runs.
        slices_per_axis: random slices per axis and volume (vae.perceptual_slices); unused for images.
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu", slices_per_axis: int = 2):
        if slices_per_axis < 1:
            raise ConfigError(f"vae.perceptual_slices must be at least 1, got {slices_per_axis}")
        try:
            self.network = FeatureExtractor(path, device).network
        except ConfigError as error:
            raise ConfigError(f"vae.perceptual_network: {error}") from None
        for param in self.network.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self.path = Path(path)
        self.slices_per_axis = slices_per_axis

    def _features(self, images: Tensor) -> list[Tensor]:
        out = self.network(images.float())
        layers = list(out) if isinstance(out, (list, tuple)) else [out]
        if not layers or any(f.ndim < 2 or f.shape[0] != images.shape[0] for f in layers):
            raise ConfigError(f"vae.perceptual_network {self.path} must return (B, F, ...) features or a tuple "
                              f"of them, got shapes {[tuple(f.shape) for f in layers]}")
        return [f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in layers]

    def _distance(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """Per-image feature distance of (N, C, H, W) images, (N,)."""
        with torch.no_grad():
            reference = self._features(x)
        generated = self._features(reconstruction)
        return sum((g - r).square().sum(dim=1).flatten(1).mean(dim=1) for g, r in zip(generated, reference))

    def slice_indices(self, shape: torch.Size) -> list[Tensor]:
        """For volumes of `shape` (B, C, D, H, W): per spatial axis, (B, slices_per_axis) distinct random slice
        indices, drawn on the CPU so that they do not depend on the device."""
        b, k = shape[0], self.slices_per_axis
        if any(size < k for size in shape[2:]):
            raise ConfigError(f"vae.perceptual_slices={k} distinct slices per axis do not fit a {tuple(shape[2:])} "
                              f"volume; lower it or use larger volumes (data.patch_size)")
        return [torch.rand(b, size).argsort(dim=1)[:, :k] for size in shape[2:]]

    def __call__(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        if x.ndim == 4:  # (B, C, H, W)
            return self._distance(x, reconstruction)
        if x.ndim != 5 or reconstruction.shape != x.shape:
            raise ValueError(f"perceptual loss takes (B, C, H, W) or (B, C, D, H, W) pairs of one shape, got "
                             f"{tuple(x.shape)} and {tuple(reconstruction.shape)}")
        b, k = x.shape[0], self.slices_per_axis
        rows = torch.arange(b, device=x.device)[:, None]
        per_axis = []
        # Axis 2 gives axial (C, H, W) slices, 3 coronal (C, D, W), 4 sagittal (C, D, H): one batch per axis, as
        # the orientations differ in shape.
        for axis, index in zip((2, 3, 4), self.slice_indices(x.shape)):
            index = index.to(x.device)
            slices = [v.movedim(axis, 1)[rows, index].flatten(0, 1) for v in (x, reconstruction)]  # (B * k, C, ., .)
            per_axis.append(self._distance(*slices).view(b, k).mean(dim=1))
        return torch.stack(per_axis, dim=1).mean(dim=1)  # every axis has k slices: the mean over all 3 * k


def kl_divergence(posterior) -> Tensor:
    """KL(posterior || N(0, I)) of a diagonal Gaussian (diffusers' DiagonalGaussianDistribution or anything with
    `mean` and `logvar`), summed over all latent elements, (B,), for 2D or 3D latents.

    Summed, as in latent diffusion and MONAI: with a per-pixel mean reconstruction loss, vae.kl_weight ~1e-6
    keeps the latent close to, but not forced onto, a standard normal. Not `posterior.kl()`: diffusers sums over
    dims [1, 2, 3] only, which leaves a 3D latent's last axis unsummed.
    """
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def vq_loss(latents: Tensor, codes: Tensor, beta: float, legacy: bool = True) -> Tensor:
    """Codebook + commitment loss per sample (van den Oord et al. 2017), the per-sample form of diffusers'
    VectorQuantizer loss (`commit_loss` is its batch mean).

    Args:
        latents: encoder output before quantisation (B, C, h, w) or (B, C, d, h, w).
        codes: the chosen codebook vectors, of the same shape, with gradient to the codebook.
        beta, legacy: the quantizer's settings; legacy puts beta on the codebook term, as diffusers does.
    """
    commitment = _per_sample_mean((codes.detach() - latents).square())
    codebook = _per_sample_mean((codes - latents.detach()).square())
    return commitment + beta * codebook if legacy else beta * commitment + codebook


class AdversarialLoss:
    """Generator and discriminator sides of the hinge or least-squares (Mao et al. 2017) GAN loss, per sample."""

    def __init__(self, kind: str = "hinge"):
        if kind not in ("hinge", "least_squares"):
            raise ConfigError(f"vae.disc_loss='{kind}' is not one of ['hinge', 'least_squares']")
        self.kind = kind

    def generator(self, logits_fake: Tensor) -> Tensor:
        if self.kind == "hinge":
            return -_per_sample_mean(logits_fake.float())
        return _per_sample_mean((logits_fake.float() - 1).square())

    def discriminator(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        real, fake = logits_real.float(), logits_fake.float()
        if self.kind == "hinge":
            return 0.5 * (_per_sample_mean(F.relu(1 - real)) + _per_sample_mean(F.relu(1 + fake)))
        return 0.5 * (_per_sample_mean((real - 1).square()) + _per_sample_mean(fake.square()))


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor,
                    max_weight: float = ADAPTIVE_WEIGHT_MAX) -> Tensor:
    """||d rec / d last|| / (||d gan / d last|| + 1e-4), clamped to [0, max_weight] and detached.

    Esser et al. 2021 (taming transformers), eq. 7: balances the two gradients at the decoder's last layer, so the
    adversarial term neither swamps nor vanishes beside the reconstruction. Computed on this process's batch.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AutoencoderLoss:
    """Generator-side loss of a TrainableAutoencoder and the discriminator loss, from the vae.* settings."""

    def __init__(self, cfg: VAEConfig, device: Union[str, torch.device] = "cpu"):
        self.cfg = cfg
        self.reconstruction = ReconstructionLoss(cfg.reconstruction_loss)
        self.adversarial = AdversarialLoss(cfg.disc_loss)
        self.perceptual = (PerceptualLoss(cfg.perceptual_network, device, cfg.perceptual_slices)
                           if cfg.perceptual_network else None)
        self.regulariser_name = "vq_loss" if cfg.kind == "vq" else "kl"
        self.regulariser_weight = cfg.codebook_weight if cfg.kind == "vq" else cfg.kl_weight

    def __call__(self, model: nn.Module, x: Tensor, discriminator: Optional[nn.Module] = None,
                 last_layer: Optional[Tensor] = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(per-sample loss (B,), reconstruction, {name: detached batch mean}).

        Args:
            discriminator: the bare discriminator when the adversarial loss is on (its weights get no gradient
                from this loss), else None.
            last_layer: the decoder's last weight (for the adaptive weight), when `discriminator` is given.
        """
        reconstruction, regulariser = model(x)
        rec = self.reconstruction(x, reconstruction)
        logs = {"rec_loss": rec.mean(), self.regulariser_name: regulariser.mean()}
        if self.perceptual is not None:
            perceptual = self.perceptual(x, reconstruction)
            logs["perceptual"] = perceptual.mean()
            rec = rec + self.cfg.perceptual_weight * perceptual
        loss = rec + self.regulariser_weight * regulariser
        if discriminator is not None:
            with frozen(discriminator):
                g_loss = self.adversarial.generator(discriminator(reconstruction))
            weight = adaptive_weight(rec.mean(), g_loss.mean(), last_layer)
            loss = loss + self.cfg.disc_weight * weight * g_loss
            logs.update(g_loss=g_loss.mean(), adaptive_weight=weight)
        logs["loss"] = loss.mean()
        return loss, reconstruction, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, discriminator: nn.Module, x: Tensor, reconstruction: Tensor) -> Tensor:
        """Per-sample discriminator loss; real and reconstructed images go through in one batch (one DDP call)."""
        logits = discriminator(torch.cat([x, reconstruction.detach()]))
        real, fake = logits.chunk(2)
        return self.adversarial.discriminator(real, fake)


@contextmanager
def frozen(module: nn.Module):
    """The module's parameters require no gradient inside (a generator step through the discriminator)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)
