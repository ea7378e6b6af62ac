"""Run under `python -m torch.distributed.run --nproc_per_node 2`: evaluate.py's FID/KID on the held-out slices of a
trained run, with a feature network that counts the images it is given. Each rank writes <out_dir>/rank<r>.json
(images seen, scores); the test checks that the ranks shared the work and got the one-process numbers.

    python -m torch.distributed.run --nproc_per_node 2 tests/feature_sharding_probe.py <run_dir> <out_dir>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402
from data.sources import load_data  # noqa: E402
from utils.config import resolve  # noqa: E402


class CountingFeatures:
    """4 x 4 average-pooled images as features (B, 16), counting the images seen."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def distribution_scores(run: Path, rank: int, world_size: int) -> tuple[dict, int]:
    """(scores, images seen by this rank); the generated samples are the held-out slices flipped left-right."""
    cfg = resolve(run / "config.yaml", [])
    val = load_data(cfg, run, is_main_process=False, device="cpu").datasets["val"]
    items = [{"generated": [{"t1": val[i]["t1"].flip(-1).numpy()}]} for i in range(len(val))]
    features = CountingFeatures()
    scored = [evaluate.Field("t1", "image", 1)]
    scores = evaluate.distribution_scores(features, items, scored, val,
                                          SimpleNamespace(process_index=rank, num_processes=world_size))
    return scores, features.seen


def main(run: Path, out: Path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scores, seen = distribution_scores(run, rank, dist.get_world_size())
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "scores": scores}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
