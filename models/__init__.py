"""Networks: 2D and 3D UNets, autoencoders, discriminators, losses and the label-diffusion classifier."""
from __future__ import annotations

from torch import nn

from models.unet2d import build_denoiser
from utils.config import Config


def build_network(cfg: Config, task) -> nn.Module:
    """The network a task trains: a UNet denoiser (`model` section), or for classification the auxiliary
    classifier and label denoiser in one module (`classifier` section)."""
    if task.kind == "classification":
        from models.classifier import LabelDiffusionClassifier  # imports transformers: only when classifying
        return LabelDiffusionClassifier(cfg.classifier, task.image.channels, task.num_classes, task.image_size)
    return build_denoiser(cfg.model, task)
