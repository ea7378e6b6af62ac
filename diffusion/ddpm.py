"""Discrete-time DDPM (Ho et al. 2020): eps | x0 | v objectives, SNR loss weighting, DDIM or DPM-Solver++ sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from diffusion.common import Callback, Net, Strategy, append_dims, guided

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")
SAMPLERS = ("ddim", "dpm_solver")


class DDPM(Strategy):
    """Variance-preserving diffusion x_t = alpha_t x0 + sigma_t eps over `num_train_timesteps` discrete steps.

    Args:
        objective: what the net predicts: eps (noise), x0 (clean data) or v = alpha_t eps - sigma_t x0.
        loss_weighting: none, min_snr (Hang et al. 2023, gamma = min_snr_gamma) or p2 (Choi et al. 2022,
            1 / (p2_k + SNR)^p2_gamma on the eps loss); both are converted to the objective trained.
        sampler: ddim (Song et al. 2021, eta = 0) or dpm_solver (DPM-Solver++ 2M, Lu et al. 2022: second order
            multistep, good samples in 10-20 steps).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", objective: str = "eps",
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
                 p2_k: float = 1.0, sampler: str = "ddim"):
        self.num_train_timesteps = num_train_timesteps
        self.objective = objective
        self.sampler = sampler
        # clip_sample=False: latents and CT/MR intensities are not guaranteed to lie in [-1, 1].
        self.scheduler_kwargs = dict(num_train_timesteps=num_train_timesteps, clip_sample=False,
                                     beta_schedule=BETA_SCHEDULES[beta_schedule],
                                     prediction_type=PREDICTION_TYPES[objective])
        alphas_cumprod = DDPMScheduler(**self.scheduler_kwargs).alphas_cumprod.double()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        # ||eps error||^2 / ||objective error||^2 at each t: turns an eps-loss weight into one for the objective.
        eps_per_objective = {"eps": torch.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}[objective]
        if loss_weighting == "min_snr":  # min(SNR, gamma) on the x0 loss = min(SNR, gamma) / SNR on the eps loss
            weights = snr.clamp(max=min_snr_gamma) / snr * eps_per_objective
        elif loss_weighting == "p2":
            weights = eps_per_objective / (p2_k + snr) ** p2_gamma
        else:
            weights = torch.ones_like(snr)
        self.alphas_cumprod = alphas_cumprod.float()
        self.weights = weights.float()  # (T,) per-timestep weight of the objective's squared error
        self._tables = {"alpha": alphas_cumprod.sqrt().float(), "sigma": (1 - alphas_cumprod).sqrt().float(),
                        "weight": self.weights}
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """The per-timestep tables on `device`, copied there once."""
        if device not in self._device_tables:
            self._device_tables[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._device_tables[device]

    def loss_terms(self, net: Net, x0: Tensor, cond: Any, noise: Optional[Tensor] = None,
                   t: Optional[Tensor] = None, with_x0: bool = False) -> tuple[Tensor, ...]:
        """Weighted squared error of the objective (B, C, *spatial) and normalised times t / (T - 1) (B,).

        Args:
            noise, t: fixed noise and times in [0, 1) (held-out loss); drawn from the global RNG when None.
            with_x0: also return the clean sample the prediction implies (B, C, *spatial), differentiable.
        """
        x0 = x0.float()
        tables = self._on(x0.device)
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        else:
            t = (t * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        noise = torch.randn_like(x0) if noise is None else noise.float()
        alpha, sigma = (append_dims(tables[k][t], x0.ndim) for k in ("alpha", "sigma"))
        x_t = alpha * x0 + sigma * noise
        target = {"eps": noise, "x0": x0, "v": alpha * noise - sigma * x0}[self.objective]
        # A bf16/fp16 prediction is promoted to float32 by the float32 target.
        prediction = net(x_t, t.float(), cond)
        terms = (prediction - target).square() * append_dims(tables["weight"][t], x0.ndim)
        times = t.float() / (self.num_train_timesteps - 1)
        if not with_x0:
            return terms, times
        x0_hat = {"eps": (x_t - sigma * prediction) / alpha, "x0": prediction,
                  "v": alpha * x_t - sigma * prediction}[self.objective]
        return terms, times, x0_hat.float()

    def sampling_scheduler(self) -> DDIMScheduler | DPMSolverMultistepScheduler:
        """The deterministic sampler over the training betas; trailing spacing starts at the last training step."""
        if self.sampler == "dpm_solver":
            kwargs = {k: v for k, v in self.scheduler_kwargs.items() if k != "clip_sample"}
            # Steps uniform in log-SNR (use_lu_lambdas), as the DPM-Solver paper does: with uniform timesteps the
            # first steps cross most of the noise in one jump, and 10 steps land no closer than DDIM's 10.
            return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2,
                                               use_lu_lambdas=True, final_sigmas_type="zero")
        return DDIMScheduler(**self.scheduler_kwargs, set_alpha_to_one=True, timestep_spacing="trailing")

    def predicted_x0(self, prediction: Tensor, x_t: Tensor, t: int) -> Tensor:
        """The clean sample the net's prediction at step t implies."""
        alpha, sigma = float(self._tables["alpha"][t]), float(self._tables["sigma"][t])
        if self.objective == "eps":
            return (x_t - sigma * prediction) / alpha
        if self.objective == "v":
            return alpha * x_t - sigma * prediction
        return prediction

    @torch.no_grad()
    def sample(self, net: Net, noise: Tensor, cond: Any, steps: int, guidance_scale: float = 1.0,
               null_cond: Any = None, callback: Optional[Callback] = None) -> Tensor:
        """Deterministic DDIM (eta = 0) or DPM-Solver++ with diffusers' scheduler steps."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}], got {steps}")
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(steps)  # timesteps stay on the host: step() indexes its host tables with them
        x = noise
        for i, t in enumerate(scheduler.timesteps.tolist()):
            t_net = torch.full((x.shape[0],), float(t), device=x.device)
            prediction = guided(net, x, t_net, cond, guidance_scale, null_cond).to(x.dtype)
            out = scheduler.step(prediction, t, x)
            if callback is not None:  # DDIM reports its x0; DPM-Solver's is the same formula
                x0 = getattr(out, "pred_original_sample", None)
                callback(i, t / (self.num_train_timesteps - 1), x,
                         self.predicted_x0(prediction, x, t) if x0 is None else x0)
            x = out.prev_sample
        return x

    def export_scheduler(self, folder: Path) -> None:
        """Save the scheduler config (same betas and prediction type) that `sample` uses."""
        self.sampling_scheduler().save_pretrained(folder)
