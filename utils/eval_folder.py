"""Where evaluate.py writes: <run>/eval/<weights>-<sampler><steps>/ (e.g. eval/final-ddim50/,
eval/best-val_ssim-dpm_solver10/; `-test` appended for eval.split=test), so that evaluations of one run with other
weights or sampling settings sit side by side. A folder that already holds a report is kept unless
eval.overwrite=true, which replaces it.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from utils.config import ConfigError, EvalConfig

REPORT = "report.json"


def evaluation_name(weights: str, sampler: str, steps: int, split: str = "val") -> str:
    """The folder name of one evaluation: the weights (a checkpoint folder by its own name), the sampler and its
    steps, and the split when it is not the validation split."""
    label = weights if weights == "final" or weights.startswith("best-") else Path(weights).name
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)  # a path's odd characters make no folder names
    return f"{label}-{sampler}{steps}" + ("" if split == "val" else f"-{split}")


def evaluation_folder(run_dir: Path, ev: EvalConfig, sampler: str) -> Path:
    """The evaluation's folder under <run>/eval/; refused when it holds a report and eval.overwrite is false."""
    folder = Path(run_dir) / "eval" / evaluation_name(ev.weights, sampler, ev.sampling_steps, ev.split)
    if (folder / REPORT).is_file() and not ev.overwrite:
        raise ConfigError(f"{folder} already holds an evaluation ({REPORT}): set eval.overwrite=true to replace it, "
                          "or change eval.weights, diffusion.sampler or eval.sampling_steps to evaluate beside it")
    return folder


def start_folder(folder: Path) -> Path:
    """An empty evaluation folder: an earlier evaluation there is removed whole, so that none of its files (samples
    of other items, figures, volumes) mix with the new report."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder
