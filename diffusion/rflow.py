"""Rectified flow (Liu et al. 2022): straight paths x_t = (1 - t) x0 + t eps, velocity target, Euler or Heun
sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from torch import Tensor

from diffusion.common import Callback, Net, Strategy, append_dims, guided

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")


class RectifiedFlow(Strategy):
    """Flow matching on straight paths; the net predicts the velocity v = eps - x0.

    Args:
        num_train_timesteps: scale of the network time: the net receives t * num_train_timesteps.
        timestep_sampling: t ~ uniform(0, 1), or logit-normal (Esser et al. 2024): sigmoid(N(logit_mean,
            logit_std^2)), which spends more training on intermediate times.
        sampler: euler (one net evaluation per step) or heun (Karras et al. 2022: the Euler step corrected with the
            velocity at its end, second order; two evaluations per step, one on the last).
    """

    def __init__(self, num_train_timesteps: int = 1000, timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, sampler: str = "euler"):
        self.num_train_timesteps = num_train_timesteps
        self.sampler = sampler
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        """Training times t in [0, 1) (B,), from torch's global RNG."""
        if self.timestep_sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch_size, device=device))
        return torch.rand(batch_size, device=device)

    def loss_terms(self, net: Net, x0: Tensor, cond: Any, noise: Optional[Tensor] = None,
                   t: Optional[Tensor] = None, with_x0: bool = False) -> tuple[Tensor, ...]:
        """Squared velocity error (B, C, *spatial) and the times t (B,), 0 = clean.

        Args:
            noise, t: fixed noise and times in [0, 1) (held-out loss); drawn from the global RNG when None.
            with_x0: also return the clean sample the prediction implies, x_t - t v (B, C, *spatial).
        """
        x0 = x0.float()
        t = self.sample_times(x0.shape[0], x0.device) if t is None else t.float()
        noise = torch.randn_like(x0) if noise is None else noise.float()
        t_b = append_dims(t, x0.ndim)
        x_t = (1 - t_b) * x0 + t_b * noise
        # A bf16/fp16 prediction is promoted to float32 by the float32 target.
        velocity = net(x_t, t * self.num_train_timesteps, cond)
        terms = (velocity - (noise - x0)).square()
        return (terms, t, (x_t - t_b * velocity).float()) if with_x0 else (terms, t)

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, cond: Any, steps: int, guidance_scale: float = 1.0,
               null_cond: Any = None, callback: Optional[Callback] = None) -> Tensor:
        """Integrate dx/dt = v from t = 1 to 0 in `steps` uniform steps, by Euler or Heun."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        times = [1 - i / steps for i in range(steps)] + [0.0]

        def velocity(x: Tensor, t: float) -> Tensor:
            t_net = torch.full((x.shape[0],), t * self.num_train_timesteps, device=x.device)
            return guided(net, x, t_net, cond, guidance_scale, null_cond).to(x.dtype)

        x = noise
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            v = velocity(x, t)
            if callback is not None:
                callback(i, t, x, x - t * v)
            x_next = x + (t_next - t) * v
            if self.sampler == "heun" and t_next > 0:  # the last step stays Euler, as in Karras et al.
                x_next = x + (t_next - t) * (v + velocity(x_next, t_next)) / 2
            x = x_next
        return x

    def export_scheduler(self, folder: Path) -> None:
        """Save the FlowMatch scheduler config of the sampler (no shift; same time scale) for diffusers pipelines."""
        scheduler = FlowMatchHeunDiscreteScheduler if self.sampler == "heun" else FlowMatchEulerDiscreteScheduler
        scheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0).save_pretrained(folder)
