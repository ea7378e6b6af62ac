"""The LR range test (`--find-lr`) on the MNI152 demo at test size, and the sweep's suggestions on known curves."""
from __future__ import annotations

import json
import math

import pytest

import train_diffusion
import train_vae
from tests.runs import tiny_args
from utils.lr_finder import lr_sweep


def test_find_lr_writes_its_figure_and_suggestions_and_touches_no_checkpoint(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=2", "training.checkpoint_every=2",
                                   "validation.every=2", "validation.sample_every=2"))
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}
    train_diffusion.main(["--find-lr", "--find-lr-steps", "40", "--find-lr-min", "1e-6", "--find-lr-max", "10",
                          *tiny_args(run, demo_root, "training.max_steps=2")])
    result = json.loads((run / "lr_finder.json").read_text())
    assert (run / "lr_finder.png").stat().st_size > 1000
    assert (result["lr_min"], result["lr_max"]) == (1e-6, 10)
    for key in ("suggested_lr_steepest", "suggested_lr_divergence"):
        assert math.isfinite(result[key]) and 1e-6 <= result[key] <= 10, key
    assert 3 <= result["steps_run"] <= 40 and len(result["lr"]) == result["steps_run"]
    after = {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # the run's checkpoints are untouched


def test_sweep_suggestions_on_a_known_curve():
    # Loss falls fastest around lr = 1e-3 (a logistic step in log10 lr), is lowest near 1e-1, and explodes past 1.
    def loss(lr):
        x = math.log10(lr)
        return 1 / (1 + math.exp(4 * (x + 3))) + 0.1 + (100 * (lr - 1) if lr > 1 else 0)

    result = lr_sweep(loss, 1e-6, 100, 200)
    assert result["stopped"].startswith("diverged")
    assert 10 ** -3.5 < result["suggested_lr_steepest"] < 10 ** -2.5
    assert result["suggested_lr_divergence"] < result["lr"][-1] / 5
    with pytest.raises(ValueError, match="lr_min < lr_max"):
        lr_sweep(loss, 1.0, 0.1, 10)


def test_find_lr_for_the_autoencoder(tmp_path, demo_root):
    run = tmp_path / "vae"
    train_vae.main(["--find-lr", "--find-lr-steps", "20", *tiny_args(run, demo_root, "vae.block_out_channels=[8,16]",
                                                                     "vae.norm_num_groups=4",
                                                                     config="configs/demo_vae.yaml")])
    result = json.loads((run / "lr_finder.json").read_text())
    assert result["lr_min"] <= result["suggested_lr_divergence"] <= result["lr_max"]
    assert sorted(p.name for p in run.iterdir()) == ["lr_finder.json", "lr_finder.png"]  # nothing else written
