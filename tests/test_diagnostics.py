"""Training diagnostics on the MNI152 demo at test size: the loss per diffusion-time quartile and the model's FLOPs
per sample, in metrics.csv."""
from __future__ import annotations

import math

import train_diffusion
from tests.runs import read_metrics, tiny_args


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
