"""How to diffuse: `ddpm` and `rflow` strategies, built from the `diffusion` config section."""
from __future__ import annotations

from diffusion.common import Strategy, append_dims, guided
from diffusion import ddpm, rflow
from diffusion.ddpm import BETA_SCHEDULES, DDPM, LOSS_WEIGHTINGS, PREDICTION_TYPES
from diffusion.rflow import TIMESTEP_SAMPLINGS, RectifiedFlow
from utils.config import ConfigError, DiffusionConfig, check_choice

STRATEGIES: dict[str, type] = {"ddpm": DDPM, "rflow": RectifiedFlow}
SAMPLERS = {"ddpm": ddpm.SAMPLERS, "rflow": rflow.SAMPLERS}  # the first is each strategy's default

__all__ = ["STRATEGIES", "Strategy", "DDPM", "RectifiedFlow", "build_strategy", "check_config", "append_dims",
           "guided"]


def _positive(cfg: DiffusionConfig, *keys: str, minimum: float = 0.0) -> None:
    for key in keys:
        if not getattr(cfg, key) > minimum:
            raise ConfigError(f"diffusion.{key}={getattr(cfg, key)} must be > {minimum}")


def check_config(cfg: DiffusionConfig) -> None:
    """Reject diffusion settings that are unknown or known not to work, naming the key (ConfigError)."""
    check_choice("diffusion.strategy", cfg.strategy, tuple(STRATEGIES))
    check_choice("diffusion.objective", cfg.objective, tuple(PREDICTION_TYPES))
    check_choice("diffusion.beta_schedule", cfg.beta_schedule, tuple(BETA_SCHEDULES))
    check_choice("diffusion.loss_weighting", cfg.loss_weighting, LOSS_WEIGHTINGS)
    check_choice("diffusion.timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    _positive(cfg, "num_train_timesteps", minimum=1)
    why = f" for strategy '{cfg.strategy}'"
    if cfg.sampler:  # "" = the strategy's own sampler
        check_choice("diffusion.sampler", cfg.sampler, SAMPLERS[cfg.strategy], why)
    if cfg.strategy == "ddpm":
        if cfg.timestep_sampling != "uniform":
            raise ConfigError(f"diffusion.timestep_sampling={cfg.timestep_sampling} is rflow's; with "
                              "diffusion.strategy=ddpm use diffusion.timestep_sampling=uniform")
        if cfg.beta_schedule == "cosine" and cfg.objective == "eps":
            # The cosine schedule ends at alpha_bar ~2e-9: the first DDIM step's x0 = (x_t - sigma eps) / alpha
            # multiplies the eps error by ~2e4 (~160 on the linear schedule).
            raise ConfigError("diffusion.beta_schedule=cosine with diffusion.objective=eps multiplies the eps error "
                              "by ~2e4 at the first sampling step; use diffusion.objective=v or x0")
        if cfg.loss_weighting == "min_snr":
            _positive(cfg, "min_snr_gamma")
        if cfg.loss_weighting == "p2":
            _positive(cfg, "p2_k")
            if cfg.p2_gamma < 0:
                raise ConfigError(f"diffusion.p2_gamma={cfg.p2_gamma} must be >= 0")
        return
    # rflow always predicts the velocity; `objective` and `beta_schedule` are ddpm's and unused here.
    check_choice("diffusion.loss_weighting", cfg.loss_weighting, ("none",), why)
    if cfg.timestep_sampling == "logit_normal":
        _positive(cfg, "logit_std")


def build_strategy(cfg: DiffusionConfig) -> Strategy:
    """The strategy the config names, after `check_config`."""
    check_config(cfg)
    sampler = cfg.sampler or SAMPLERS[cfg.strategy][0]
    if cfg.strategy == "ddpm":
        return DDPM(cfg.num_train_timesteps, cfg.beta_schedule, cfg.objective, cfg.loss_weighting,
                    cfg.min_snr_gamma, cfg.p2_gamma, cfg.p2_k, sampler)
    return RectifiedFlow(cfg.num_train_timesteps, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, sampler)
