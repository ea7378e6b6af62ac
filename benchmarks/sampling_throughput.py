"""Sampling throughput (items/s) at the demo size, DDIM 50 steps and rectified flow 25 steps, and the share of
time spent computing metrics.

    python benchmarks/sampling_throughput.py [--items 32] [section.key=value ...]

Uses the demo config's model and held-out slices with freshly initialised weights (speed does not depend on
training). Sampling and scoring go through the same functions as evaluate.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from data.sources import load_data, pixel_references  # noqa: E402
from diffusion import build_strategy  # noqa: E402
from diffusion.task import Task  # noqa: E402
from models.unet2d import build_denoiser  # noqa: E402
from utils import config as config_lib  # noqa: E402
from utils.evaluation import sample_items, score_item  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"DDIM 50 steps": ["diffusion.strategy=ddpm", "diffusion.timestep_sampling=uniform"],
            "rectified flow 25 steps": ["diffusion.strategy=rflow"]}
STEPS = {"DDIM 50 steps": 50, "rectified flow 25 steps": 25}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--items", type=int, default=32, help="held-out items sampled per setting (at most all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    accelerator = Accelerator()
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            cfg = config_lib.resolve(args.config, [*args.overrides, *overrides])
            bundle = load_data(cfg, Path(tmp) / name, True, accelerator.device)
            task = Task(cfg.task, bundle.fields, bundle.spatial_shape)
            net = build_denoiser(cfg.model, task).to(accelerator.device).eval()
            strategy, val = build_strategy(cfg.diffusion), bundle.datasets["val"]
            indices = list(range(min(args.items, len(val))))
            start = time.perf_counter()
            items = sample_items(strategy, net, task, val, indices, cfg.eval.batch_size, 0, STEPS[name],
                                 cfg.diffusion.guidance_scale, accelerator, scored=pixel_references(bundle, task),
                                 to_pixels=bundle.to_pixels)
            sampling = time.perf_counter() - start
            start = time.perf_counter()
            for item in items:
                score_item(pixel_references(bundle, task), item, val.data_range, task.region_mask)
            scoring = time.perf_counter() - start
            print(f"{name:24s}: {len(items) / sampling:7.2f} items/s; metrics {100 * scoring / sampling:.2f}% "
                  f"of sampling time (target < 5%); {len(items)} items, batch {cfg.eval.batch_size}")


if __name__ == "__main__":
    main()
