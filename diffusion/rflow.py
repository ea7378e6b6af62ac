"""Rectified flow (Liu et al. 2022): straight paths x_t = (1 - t) x0 + t eps, velocity target, Euler sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffusion.common import Callback, Net, Strategy, append_dims, guided

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


class RectifiedFlow(Strategy):
    """Flow matching on straight paths; the net predicts the velocity v = eps - x0.

    Args:
        num_train_timesteps: scale of the network time: the net receives t * num_train_timesteps.
        timestep_sampling: t ~ uniform(0, 1), or logit-normal (Esser et al. 2024): sigmoid(N(logit_mean,
            logit_std^2)), which spends more training on intermediate times.
    """

    def __init__(self, num_train_timesteps: int = 1000, timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        """Training times t in [0, 1) (B,), from torch's global RNG."""
        if self.timestep_sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch_size, device=device))
        return torch.rand(batch_size, device=device)

    def loss_terms(self, net: Net, x0: Tensor, cond: Any, noise: Optional[Tensor] = None,
                   t: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Squared velocity error (B, C, *spatial) and the times t (B,), 0 = clean.

        Args:
            noise, t: fixed noise and times in [0, 1) (held-out loss); drawn from the global RNG when None.
        """
        x0 = x0.float()
        t = self.sample_times(x0.shape[0], x0.device) if t is None else t.float()
        noise = torch.randn_like(x0) if noise is None else noise.float()
        t_b = append_dims(t, x0.ndim)
        x_t = (1 - t_b) * x0 + t_b * noise
        # A bf16/fp16 prediction is promoted to float32 by the float32 target.
        return (net(x_t, t * self.num_train_timesteps, cond) - (noise - x0)).square(), t

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, cond: Any, steps: int, guidance_scale: float = 1.0,
               null_cond: Any = None, callback: Optional[Callback] = None) -> Tensor:
        """Euler integration of dx/dt = v from t = 1 to 0 in `steps` uniform steps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        times = [1 - i / steps for i in range(steps)] + [0.0]
        x = noise
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            t_net = torch.full((x.shape[0],), t * self.num_train_timesteps, device=x.device)
            velocity = guided(net, x, t_net, cond, guidance_scale, null_cond).to(x.dtype)
            if callback is not None:
                callback(i, t, x, x - t * velocity)
            x = x + (t_next - t) * velocity
        return x

    def export_scheduler(self, folder: Path) -> None:
        """Save a FlowMatchEulerDiscreteScheduler config (no shift; same time scale) for diffusers pipelines."""
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0).save_pretrained(folder)
