"""Pieces shared by the strategies: broadcasting per-sample values, classifier-free guidance, the interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor

# net(x_t, t, cond) -> prediction; t is the network time (B,) as float.
Net = Callable[[Tensor, Tensor, Any], Tensor]
# callback(i, t, x_t, x0_pred): step index, normalised time of x_t, the state, the clean-data prediction from it.
Callback = Callable[[int, float, Tensor, Tensor], None]


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against (B, C, *spatial), 2D or 3D alike."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def guided(net: Net, x: Tensor, t: Tensor, cond: Any, guidance_scale: float = 1.0,
           null_cond: Any = None) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + s * (cond - uncond); one call when s == 1."""
    if guidance_scale == 1.0:
        return net(x, t, cond)
    if null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs null_cond (the dropped condition)")
    # Two calls rather than one doubled batch: `cond` is opaque here, so it cannot be concatenated.
    uncond = net(x, t, null_cond)
    return uncond + guidance_scale * (net(x, t, cond) - uncond)


class Strategy:
    """How to diffuse: a per-sample training loss, a deterministic sampler and a diffusers scheduler export."""

    num_train_timesteps: int

    def loss_terms(self, net: Net, x0: Tensor, cond: Any, noise: Optional[Tensor] = None,
                   t: Optional[Tensor] = None, with_x0: bool = False) -> tuple[Tensor, ...]:
        """Weighted elementwise loss (B, C, *spatial) in float32 and normalised times (B,), 0 = clean; with
        `with_x0` also the clean sample the prediction implies (B, C, *spatial), differentiable.

        Training draws `noise` and `t` from the global RNG; a held-out loss passes them fixed per item.
        """
        raise NotImplementedError

    def loss(self, net: Net, x0: Tensor, cond: Any) -> Tensor:
        """Per-sample loss (B,): the elementwise terms averaged over all non-batch dims."""
        terms, _ = self.loss_terms(net, x0, cond)
        return terms.flatten(1).mean(dim=1)

    def sample(self, net: Net, noise: Tensor, cond: Any, steps: int, guidance_scale: float = 1.0,
               null_cond: Any = None, callback: Optional[Callback] = None) -> Tensor:
        """Map `noise` to data deterministically in `steps` network evaluations (twice that with guidance)."""
        raise NotImplementedError

    def export_scheduler(self, folder: Path) -> None:
        """Save the diffusers scheduler config that samples this model."""
        raise NotImplementedError
