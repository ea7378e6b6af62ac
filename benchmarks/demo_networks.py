"""The presets' networks as the benchmarks train them: a denoiser with its task, strategy and batches (what
bare_step.mean_step_seconds takes), or an autoencoder whose loss is put in the same task-and-strategy shape."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.bare_step import collated_batches
from data import augment, build_datasets
from data.arrays import to_device
from diffusion import build_strategy
from diffusion.task import Task, fields_from_config
from models.autoencoder import TrainableAutoencoder, build_autoencoder
from models.losses import AutoencoderLoss
from models.unet2d import build_denoiser
from utils import config as config_lib


class AutoencoderObjective:
    """train_vae.py's autoencoder loss before its adversarial loss starts (reconstruction plus the weighted KL or
    codebook loss), shaped as a task and a strategy so that the denoisers' step code runs it unchanged."""

    def __init__(self, cfg: config_lib.VAEConfig, device):
        self.inputs = list(cfg.inputs)
        self.loss_fn = AutoencoderLoss(cfg, device)

    def targets_of(self, batch: dict) -> torch.Tensor:
        return torch.cat([batch[n].float() for n in self.inputs], dim=1)  # (B, C, *spatial)

    def condition_of(self, batch: dict, drop_prob: float = 0.0) -> None:
        return None

    def loss_terms(self, model, x: torch.Tensor, cond, noise=None, t=None) -> tuple[torch.Tensor, None]:
        return self.loss_fn(model, x)[0], None  # per-sample loss (B,)

    def reduce(self, per_sample: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        return per_sample, {}


@dataclass
class DemoNetwork:
    """One preset's network, its training batches (in memory, on the device) and its loss."""

    config: Path
    cfg: config_lib.Config
    task: object  # a Task, or an AutoencoderObjective
    strategy: object  # a diffusion strategy, or the same AutoencoderObjective
    batches: list[dict]
    make: Callable[[bool], torch.nn.Module]  # gradient_checkpointing -> the network on the device

    @property
    def batch_size(self) -> int:
        return len(self.batches[0]["item_id"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of what the network is trained to produce."""
        return tuple(self.task.targets_of(self.batches[0]).shape[1:])

    def build(self, gradient_checkpointing: bool = False) -> torch.nn.Module:
        torch.manual_seed(self.cfg.run.seed)  # every variant starts from the same weights
        return self.make(gradient_checkpointing)

    def loss(self, model: torch.nn.Module, batch: dict, seed: Optional[int] = None) -> torch.Tensor:
        """The mean training loss of `batch` as bare_step's step computes it. With `seed`, the noise, times and
        (autoencoders) posterior sample are drawn from it, so two models see exactly the same draws."""
        x0, cond = self.task.targets_of(batch), self.task.condition_of(batch)
        noise = t = None
        if seed is not None:
            generator = torch.Generator(x0.device).manual_seed(seed)
            noise = torch.empty_like(x0).normal_(generator=generator)  # x0's memory format, as randn_like keeps
            t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
            torch.manual_seed(seed)  # draws inside the network
        elementwise = self.strategy.loss_terms(model, x0, cond, noise, t)[0]
        return self.task.reduce(elementwise, batch)[0].mean()


def preset_batches(cfg: config_lib.Config, split_dir: Path, batch_size: int, device, count: int) -> list[dict]:
    """`count` training batches as the training scripts hand them to the network: collated, then augmented
    (3D patches, flips)."""
    datasets = build_datasets(cfg.data, split_dir, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # the patches and flips
    return [augment(to_device(batch, device), cfg.data)
            for batch in collated_batches(datasets["train"], batch_size, count)]


def load_denoiser(config: Path, overrides: list[str], split_dir: Path, batch_size: int = 0,
                  device: str = "cpu", count: int = 4) -> DemoNetwork:
    """The denoiser of a diffusion preset (2D or 3D by its data), built as train_diffusion.py builds it.

    Args:
        batch_size: items per batch (0: the preset's training.batch_size).
        count: batches kept in memory; the steps cycle through them.
    """
    cfg = config_lib.resolve(config, overrides)
    batches = preset_batches(cfg, split_dir, batch_size or cfg.training.batch_size, device, count)
    task = Task(cfg.task, fields_from_config(cfg.data), tuple(batches[0][cfg.task.targets[0]].shape[2:]))

    def make(checkpointing: bool) -> torch.nn.Module:
        model_cfg = dataclasses.replace(cfg.model, gradient_checkpointing=checkpointing)
        return build_denoiser(model_cfg, task).to(device)

    return DemoNetwork(config, cfg, task, build_strategy(cfg.diffusion), batches, make)


def load_autoencoder(config: Path, overrides: list[str], split_dir: Path, batch_size: int = 0,
                     device: str = "cpu", count: int = 4) -> DemoNetwork:
    """The autoencoder of an autoencoder preset (2D, or a PatchVolume on 3D patches), as train_vae.py builds it."""
    cfg = config_lib.resolve(config, overrides)
    batches = preset_batches(cfg, split_dir, batch_size or cfg.training.batch_size, device, count)
    objective = AutoencoderObjective(cfg.vae, device)
    channels = objective.targets_of(batches[0]).shape[1]

    def make(checkpointing: bool) -> torch.nn.Module:
        vae_cfg = dataclasses.replace(cfg.vae, gradient_checkpointing=checkpointing)
        return TrainableAutoencoder(build_autoencoder(vae_cfg, channels, cfg.data.training_shape())).to(device)

    return DemoNetwork(config, cfg, objective, objective, batches, make)
