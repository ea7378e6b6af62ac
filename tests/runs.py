"""Helpers for tests that run the scripts: tiny settings on the real MNI152 demo data."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny model and a few steps: seconds per run on a 2-core CPU, the real demo data and code paths.
TINY = [
    "data.image_size=32",
    "model.block_out_channels=[16,32]",
    "model.attention_levels=[false,true]",
    "model.attention_head_dim=16",
    "training.batch_size=4",
    "training.max_steps=8",
    "training.lr_warmup_steps=2",
    "training.checkpoint_every=4",
    "training.log_every=2",
    "validation.every=4",
    "validation.sample_every=8",
    "validation.num_samples=3",
    "validation.num_items=8",
    "validation.sampling_steps=3",
    "validation.at_start=false",
    "eval.sampling_steps=3",
    "logging.trackers=[csv]",
]


def tiny_args(run_dir: Path, data_root: Path, *overrides: str, config: str = "configs/demo.yaml") -> list[str]:
    return ["--config", str(REPO / config), f"run.output_dir={run_dir}", f"data.root={data_root}", *TINY,
            *overrides]


def run_script(script: str, args: list[str], env: dict | None = None, launch: list[str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter (optionally under `accelerate launch`), from the repo root."""
    command = [*(launch or [sys.executable]), str(REPO / script), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[tuple[int, str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [(int(r["step"]), r["name"], r["value"]) for r in csv.DictReader(f)]
