"""metrics.csv (always) plus Accelerate's trackers (TensorBoard, wandb), all on one global step.

Only the main process writes. On resume, rows logged after the checkpoint being resumed are dropped: those
steps run again, so every (step, name) appears once across any number of interruptions.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

import numpy as np

from utils.checkpoint import atomic_write_text
from utils.config import LoggingConfig

KNOWN_TRACKERS = ("csv", "tensorboard", "wandb")


def accelerate_trackers(cfg: LoggingConfig) -> list[str]:
    """Accelerate's tracker names for logging.trackers (checked by utils/config_checks.py)."""
    if "wandb" in cfg.trackers:
        # Offline by default: runs on clusters without network, synced later with `wandb sync`. The config
        # wins over a WANDB_MODE left in the environment, so the saved config.yaml says what the run did.
        os.environ["WANDB_MODE"] = cfg.wandb_mode
    return [t for t in cfg.trackers if t != "csv"]


class MetricsLog:
    def __init__(self, accelerator, run_dir: Path, cfg: LoggingConfig, run_config: dict,
                 resume_step: Optional[int]):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.csv"
        self.trackers = accelerate_trackers(cfg)
        if accelerator.is_main_process:
            self._truncate_after(resume_step)
        if self.trackers:
            accelerator.init_trackers(cfg.wandb_project, config=_flatten(run_config),
                                      init_kwargs={"wandb": {"dir": str(run_dir / "logs"),
                                                             "name": run_dir.name}})

    def _truncate_after(self, resume_step: Optional[int]) -> None:
        rows = []
        if self.path.exists() and resume_step is not None:
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["step", "name", "value"])
        writer.writerows([r["step"], r["name"], r["value"]] for r in rows)
        atomic_write_text(self.path, text.getvalue())

    def log(self, values: dict[str, float | str], step: int) -> None:
        """Numbers, and text such as item ids (a quoted CSV cell; TensorBoard and wandb show it as text)."""
        values = {k: v if isinstance(v, str) else float(v) for k, v in values.items()}
        if not values:
            return
        if self.accelerator.is_main_process:
            with self.path.open("a", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerows([step, name, value if isinstance(value, str) else f"{value:.8g}"]
                                 for name, value in values.items())
        if self.trackers:
            self.accelerator.log(values, step=step)

    def log_image(self, name: str, png_path: Path, step: int) -> None:
        """Send a figure already written to disk to the image-capable trackers."""
        if not self.accelerator.is_main_process or not self.trackers:
            return
        from PIL import Image
        image = np.asarray(Image.open(png_path).convert("RGB"))
        if "tensorboard" in self.trackers:
            self.accelerator.get_tracker("tensorboard").writer.add_image(name, image, step, dataformats="HWC")
        if "wandb" in self.trackers:
            import wandb
            self.accelerator.get_tracker("wandb").log({name: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
