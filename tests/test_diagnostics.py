"""Training diagnostics on the MNI152 demo at test size, in metrics.csv: the loss per diffusion-time quartile, the
model's FLOPs per sample, the worst batch since the last log, and the sharpness of generated images at mask edges."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from skimage.filters import gaussian

import train_diffusion
from tests.runs import read_metrics, tiny_args
from utils.metrics import boundary_sharpness, label_boundaries
from utils.training import RunningMeans


def test_loss_per_time_quartile_and_flops_are_logged(tmp_path, demo_root):
    runs = {}
    for size in (32, 64):
        runs[size] = tmp_path / f"run{size}"
        train_diffusion.main(tiny_args(runs[size], demo_root, f"data.image_size={size}", "training.max_steps=4",
                                       "training.log_every=4", "training.batch_size=8",
                                       "diffusion.timestep_sampling=uniform"))
    rows = read_metrics(runs[32])
    quartiles = {(step, name): float(v) for step, name, v in rows if name.startswith("train/loss_t_q")}
    # Each log averages the samples whose time fell in the quartile (a quartile no sample fell in is left out).
    assert {name for _, name in quartiles} == {f"train/loss_t_q{q}" for q in (1, 2, 3, 4)}
    assert all(math.isfinite(v) and v > 0 for v in quartiles.values())
    flops = {size: [float(v) for step, name, v in read_metrics(run) if name == "model/gflops_per_sample"]
             for size, run in runs.items()}
    assert all(len(f) == 1 and f[0] > 0 for f in flops.values())  # logged once, at step 0
    # Convolutions dominate: four times the pixels, about four times the FLOPs (attention grows faster).
    assert 3.8 < flops[64][0] / flops[32][0] < 6


def test_worst_batch_and_boundary_sharpness_are_logged(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=4", "training.log_every=2"))
    rows = {(step, name): value for step, name, value in read_metrics(run)}
    train_ids = set(json.loads((run / "split.json").read_text())["train"])
    for step in (2, 4):
        items = rows[(step, "train/worst_batch_items")].split(" ")
        assert len(items) == 4 and set(items) <= train_ids  # one training batch (training.batch_size=4)
        # The worst micro-batch's mean loss is at least the mean over the steps.
        assert float(rows[(step, "train/worst_batch_loss")]) >= float(rows[(step, "train/loss")])
    sharpness = float(rows[(4, "val/boundary_sharpness")])  # the demo generates t1 from its tissue mask
    assert math.isfinite(sharpness) and sharpness > 0


def test_the_worst_batch_is_the_highest_loss_and_survives_a_checkpoint():
    running = RunningMeans("cpu")
    for loss, ids in ((1.0, ["a", "b"]), (3.0, ["c", "d"]), (2.0, ["e", "f"])):
        running.add_batch(torch.tensor(loss), ids)
    restored = RunningMeans("cpu", json.loads(json.dumps(running.state_dict())))  # as a checkpoint stores it
    for means in (running, restored):
        means.add_batch(torch.tensor(2.5), ["g", "h"])
        assert means.pop_worst_batch() == {"worst_batch_loss": 3.0, "worst_batch_items": "c d"}
        assert means.pop_worst_batch() == {}  # a new window starts after each log
    # Non-finite losses are left out, as in the averages (the step is skipped and counted).
    running.add_batch(torch.tensor(5.0), ["a"])
    running.add_batch(torch.tensor(float("nan")), ["x"])
    assert running.pop_worst_batch()["worst_batch_items"] == "a"
    running.add_batch(torch.tensor(float("inf")), ["x"])
    assert running.pop_worst_batch() == {}


def test_boundary_sharpness_compares_edges_with_the_reference():
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[8:24, 8:24] = 1
    labels[12:20, 12:20] = 2
    edges = label_boundaries(labels)
    assert edges[8, 8:24].all() and edges[7, 8:24].all() and edges[12, 12:20].all()  # both sides of each change
    # Each square's inner ring (4 sides, corners once) and the outer ring beside its sides (no diagonal corners).
    assert not edges[0].any() and not edges[16, 16] and edges.sum() == (4 * 16 - 4) + 4 * 16 + (4 * 8 - 4) + 4 * 8
    reference = (labels.astype(np.float64) - 1)[None]  # (1, H, W): intensity steps at the label changes
    blurred = gaussian(reference[0], sigma=1.5)[None]
    assert boundary_sharpness(reference, reference, labels) == pytest.approx(1.0)
    assert boundary_sharpness(blurred, reference, labels) < 0.7
    assert boundary_sharpness(2 * reference, reference, labels) == pytest.approx(2.0)
    assert math.isnan(boundary_sharpness(reference, reference, np.zeros_like(labels)))  # no boundary
