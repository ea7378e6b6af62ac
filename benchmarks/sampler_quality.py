"""Held-out SSIM and PSNR of a trained run at 10, 25 and 50 sampling steps for each sampler of its strategy
(ddpm: DDIM, DPM-Solver++; rflow: Euler, Heun), with the net calls each takes.

    python benchmarks/sampler_quality.py --run runs/demo [--steps 10 25 50] [section.key=value ...]

Samples and scores as evaluate.py does (the run's own held-out items, its final weights, eval.seed), on one process,
without writing into the run directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from data.sources import load_data, pixel_references  # noqa: E402
from diffusion import SAMPLERS, build_strategy  # noqa: E402
from diffusion.task import Task  # noqa: E402
from evaluate import load_weights  # noqa: E402
from utils import config as config_lib  # noqa: E402
from utils.evaluation import evenly_spaced, sample_items, score_item  # noqa: E402


class CountingNet:
    """The denoiser, counting its calls (one per net evaluation of a batch)."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a trained run directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = config_lib.resolve(args.run / "config.yaml", args.overrides)
    cfg.data.demo = ""  # the run's own data, never rebuilt
    accelerator = Accelerator()
    bundle = load_data(cfg, args.run, is_main_process=False, device=accelerator.device)
    task = Task(cfg.task, bundle.fields, bundle.spatial_shape)
    scored = pixel_references(bundle, task)
    net = load_weights(args.run, cfg.eval.weights, cfg, task).to(accelerator.device).eval()
    val = bundle.datasets[cfg.eval.split]
    indices = evenly_spaced(len(val), min(cfg.eval.num_items, len(val)) if cfg.eval.num_items else len(val))

    results = {}
    print(f"{args.run}: {cfg.diffusion.strategy}, {len(indices)} {cfg.eval.split} items, {cfg.eval.weights} weights")
    print(f"{'sampler':12s} {'steps':>5s} {'net calls':>9s} {'SSIM':>7s} {'PSNR':>7s}")
    for sampler in SAMPLERS[cfg.diffusion.strategy]:
        strategy = build_strategy(config_lib.resolve(args.run / "config.yaml",
                                                     [*args.overrides, f"diffusion.sampler={sampler}"]).diffusion)
        for steps in args.steps:
            counting = CountingNet(net)
            items = sample_items(strategy, counting, task, val, indices, cfg.eval.batch_size, cfg.eval.seed, steps,
                                 cfg.diffusion.guidance_scale, accelerator, scored=scored, to_pixels=bundle.to_pixels)
            scores = [score_item(scored, item, val.data_range, task.region_mask) for item in items]
            batches = -(-len(indices) // cfg.eval.batch_size)
            row = {"net_calls": counting.calls // batches, "ssim": float(np.mean([s["ssim"] for s in scores])),
                   "psnr": float(np.mean([s["psnr"] for s in scores]))}
            results[(sampler, steps)] = row
            print(f"{sampler:12s} {steps:5d} {row['net_calls']:9d} {row['ssim']:7.4f} {row['psnr']:7.2f}")
    return results


if __name__ == "__main__":
    main()
