"""How to diffuse: `ddpm` and `rflow` strategies, built from the `diffusion` config section."""
from __future__ import annotations

from diffusion.common import Strategy, append_dims, guided
from diffusion.ddpm import BETA_SCHEDULES, DDPM, LOSS_WEIGHTINGS, PREDICTION_TYPES
from diffusion.rflow import TIMESTEP_SAMPLINGS, RectifiedFlow
from utils.config import ConfigError, DiffusionConfig

STRATEGIES: dict[str, type] = {"ddpm": DDPM, "rflow": RectifiedFlow}
SAMPLERS = {"ddpm": ("ddim",), "rflow": ("euler",)}

__all__ = ["STRATEGIES", "Strategy", "DDPM", "RectifiedFlow", "build_strategy", "append_dims", "guided"]


def _choice(key: str, value: str, valid, why: str = "") -> None:
    if value not in valid:
        raise ConfigError(f"diffusion.{key}='{value}' is not one of {' | '.join(valid)}{why}")


def _positive(cfg: DiffusionConfig, *keys: str, minimum: float = 0.0) -> None:
    for key in keys:
        if not getattr(cfg, key) > minimum:
            raise ConfigError(f"diffusion.{key}={getattr(cfg, key)} must be > {minimum}")


def build_strategy(cfg: DiffusionConfig) -> Strategy:
    """The strategy the config names, after checking its values (ConfigError naming the key)."""
    _choice("strategy", cfg.strategy, tuple(STRATEGIES))
    _choice("objective", cfg.objective, tuple(PREDICTION_TYPES))
    _choice("beta_schedule", cfg.beta_schedule, tuple(BETA_SCHEDULES))
    _choice("loss_weighting", cfg.loss_weighting, LOSS_WEIGHTINGS)
    _choice("timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    _positive(cfg, "num_train_timesteps", minimum=1)
    _positive(cfg, "sampling_steps")
    why = f" for strategy '{cfg.strategy}'"
    if cfg.sampler:  # "" = the strategy's own sampler
        _choice("sampler", cfg.sampler, SAMPLERS[cfg.strategy], why)
    if cfg.strategy == "ddpm":
        _choice("timestep_sampling", cfg.timestep_sampling, ("uniform",), why + " (logit_normal is rflow's)")
        if cfg.loss_weighting == "min_snr":
            _positive(cfg, "min_snr_gamma")
        if cfg.loss_weighting == "p2":
            _positive(cfg, "p2_k")
            if cfg.p2_gamma < 0:
                raise ConfigError(f"diffusion.p2_gamma={cfg.p2_gamma} must be >= 0")
        if cfg.sampling_steps > cfg.num_train_timesteps:
            raise ConfigError(f"diffusion.sampling_steps={cfg.sampling_steps} must be <= "
                              f"diffusion.num_train_timesteps={cfg.num_train_timesteps}")
        return DDPM(cfg.num_train_timesteps, cfg.beta_schedule, cfg.objective, cfg.loss_weighting,
                    cfg.min_snr_gamma, cfg.p2_gamma, cfg.p2_k)
    # rflow always predicts the velocity; `objective` and `beta_schedule` are ddpm's and unused here.
    _choice("loss_weighting", cfg.loss_weighting, ("none",), why)
    if cfg.timestep_sampling == "logit_normal":
        _positive(cfg, "logit_std")
    return RectifiedFlow(cfg.num_train_timesteps, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std)
