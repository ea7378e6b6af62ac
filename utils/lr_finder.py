"""Learning-rate range test (Smith 2017): train with an exponentially growing LR and watch the loss.

    python train_diffusion.py --find-lr [--find-lr-steps 100] --config ...   (train_vae.py alike)

The sweep runs the real data, model and loss for at most `steps` optimizer steps, from `lr_min` to `lr_max`, and
stops once the smoothed loss diverges (4x its minimum, or not finite). It writes `lr_finder.json` and
`lr_finder.png` into run.output_dir and nothing else: no checkpoint, config or split is written there.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.training import seed_step

SMOOTHING = 0.9  # EMA of the loss (bias-corrected), so that one noisy batch does not end the sweep
DIVERGENCE = 4.0  # the sweep stops when the smoothed loss exceeds this multiple of its minimum


def lr_sweep(train_step: Callable[[float], float], lr_min: float, lr_max: float, steps: int) -> dict:
    """Run `train_step(lr) -> loss` at exponentially spaced LRs from lr_min to lr_max; the curve and suggestions.

    Suggestions (both inside the swept range):
        suggested_lr_steepest: where the smoothed loss falls fastest against log(lr).
        suggested_lr_divergence: a tenth of the LR of the lowest smoothed loss, past which the loss climbs
            towards divergence ("10x before divergence").
    """
    if not 0 < lr_min < lr_max or steps < 3:
        raise ValueError(f"an LR sweep needs 0 < lr_min < lr_max and at least 3 steps, got {lr_min}, {lr_max}, "
                         f"{steps}")
    lrs, losses, smoothed, average, stopped = [], [], [], 0.0, "reached lr_max"
    for k in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (k / (steps - 1))
        loss = float(train_step(lr))
        if not math.isfinite(loss):
            stopped = f"non-finite loss at lr {lr:.3g}"
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(average / (1 - SMOOTHING ** (k + 1)))
        if smoothed[-1] > DIVERGENCE * min(smoothed):
            stopped = f"diverged at lr {lr:.3g}"
            break
    if len(lrs) < 3:
        raise ValueError(f"the LR sweep stopped after {len(lrs)} steps ({stopped}); lower lr_min")
    log_lr, curve = np.log10(lrs), np.array(smoothed)
    lowest = int(curve.argmin())
    # The steepest descent before the minimum (after it the loss only rises).
    slope = np.gradient(curve[:max(lowest, 2) + 1], log_lr[:max(lowest, 2) + 1])
    steepest = lrs[int(slope.argmin())]
    return {"lr_min": lr_min, "lr_max": lr_max, "steps_run": len(lrs), "stopped": stopped,
            "suggested_lr_steepest": steepest, "suggested_lr_divergence": max(lrs[lowest] / 10, lr_min),
            "lr": lrs, "loss": losses, "smoothed_loss": smoothed}


def run_lr_finder(cfg, args, accelerator, model, optimizer, next_loss: Callable[[], torch.Tensor], logger) -> dict:
    """The sweep with a script's own model, optimizer (both prepared) and loss: `next_loss()` draws the next
    training batch and returns its mean loss. One micro-batch per step, clipped as in training; the loss is averaged
    over processes, so every process takes the same path. Rank 0 writes the results."""
    max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
    step = 0

    def train_step(lr: float) -> float:
        nonlocal step
        seed_step(cfg.run.seed, step, accelerator.process_index)  # the noise, patches and flips of this step
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            loss = next_loss()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(accelerator.reduce(loss.detach().float(), "mean"))

    result = lr_sweep(train_step, args.find_lr_min, args.find_lr_max, args.find_lr_steps)
    if accelerator.is_main_process:
        write_lr_finder(result, Path(cfg.run.output_dir))
        logger.info("LR range test (%s): steepest descent at %.2g, 10x before divergence %.2g; see %s",
                    result["stopped"], result["suggested_lr_steepest"], result["suggested_lr_divergence"],
                    Path(cfg.run.output_dir) / "lr_finder.png")
    return result


def write_lr_finder(result: dict, folder: Path) -> None:
    """lr_finder.json (the sweep and its suggestions) and lr_finder.png (smoothed loss against LR, marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lr_finder.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(result["lr"], result["loss"], color="0.8", lw=0.8, label="loss")
    ax.plot(result["lr"], result["smoothed_loss"], color="C0", label="smoothed loss")
    for key, colour in (("suggested_lr_steepest", "C1"), ("suggested_lr_divergence", "C2")):
        ax.axvline(result[key], color=colour, ls="--", label=f"{key.removeprefix('suggested_lr_')}: {result[key]:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title=f"LR range test ({result['steps_run']} steps, {result['stopped']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "lr_finder.png")
    plt.close(fig)
