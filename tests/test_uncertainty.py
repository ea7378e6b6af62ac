"""Uncertainty maps of evaluate.py: per-pixel std over samples, its figure, and its correlation with the error."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import diffusion.generate
import evaluate
import train_diffusion
from tests.runs import tiny_args
from utils.evaluation import pearson_correlation

# Each test evaluates the one run again, into eval/final-euler3/.
EVAL = ["eval.num_items=4", "eval.batch_size=4", "eval.sampling_steps=3", "eval.num_figures=2", "eval.seed=0",
        "eval.overwrite=true"]
OUT = ("eval", "final-euler3")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("uncertainty") / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=4", "validation.every=4",
                                   "validation.sample_every=4", "training.checkpoint_every=4"))
    return run


def evaluated(run):
    """(report, per-item rows, {item_id: npz}) of the run's last evaluation."""
    out = run.joinpath(*OUT)
    with (out / "per_item.csv").open() as f:
        rows = list(csv.DictReader(f))
    npz = {r["item_id"]: np.load(out / "samples" / f"{r['item_id'].replace('/', '__')}.npz") for r in rows}
    return json.loads((out / "report.json").read_text()), rows, npz


def test_pearson_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8))
    y = 0.5 * x + rng.normal(size=(3, 8, 8))
    assert abs(pearson_correlation(x, y) - np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 1e-12
    assert abs(pearson_correlation(x, -2 * x + 1) + 1) < 1e-12
    assert math.isnan(pearson_correlation(np.zeros(5), np.arange(5.0)))  # constant: undefined, not a crash
    with pytest.raises(ValueError, match="5 and 4"):
        pearson_correlation(np.zeros(5), np.zeros(4))


def test_std_maps_figure_and_correlation(trained_run):
    evaluate.main(["--run", str(trained_run), *EVAL, "eval.samples_per_item=3"])
    report, rows, npz = evaluated(trained_run)
    assert trained_run.joinpath(*OUT, "uncertainty.png").stat().st_size > 1000

    stds, errors = [], []
    for row in rows:
        arrays = npz[row["item_id"]]
        generated, reference = arrays["generated_t1"], arrays["reference_t1"]  # (S, C, H, W), (C, H, W)
        std = arrays["std_t1"]
        assert std.shape == reference.shape and np.allclose(std, generated.std(0), atol=1e-6)
        stds.append(std)
        errors.append(np.abs(generated.astype(np.float64).mean(0) - reference))
        r = float(row["uncertainty_error_correlation"])
        assert -1 <= r <= 1
        assert abs(r - np.corrcoef(std.ravel(), errors[-1].ravel())[0, 1]) < 1e-4
        assert abs(float(row["uncertainty_mean"]) - std.mean()) < 1e-6
    assert max(s.max() for s in stds) > 0  # different noise per sample: the samples differ

    correlation = report["metrics"]["uncertainty_error_correlation"]
    expected = np.corrcoef(np.concatenate([s.ravel() for s in stds]), np.concatenate([e.ravel() for e in errors]))
    assert -1 <= correlation["pooled"] <= 1 and abs(correlation["pooled"] - expected[0, 1]) < 1e-4
    assert correlation["pixels"] == sum(s.size for s in stds) and correlation["error_of"] == "mean of the samples"
    assert correlation["n"] == len(rows)
    assert abs(report["metrics"]["uncertainty_mean"]["pooled"] - np.mean(stds)) < 1e-6


def test_std_is_zero_when_every_sample_gets_the_same_noise(trained_run, monkeypatch):
    item_noise = diffusion.generate.item_noise

    def sample_zero_noise(shape, item_indices, seed, device):  # sample s is seeded by eval.seed + s; eval.seed=0
        return item_noise(shape, item_indices, 0, device)

    monkeypatch.setattr(diffusion.generate, "item_noise", sample_zero_noise)
    evaluate.main(["--run", str(trained_run), *EVAL, "eval.samples_per_item=2"])
    report, rows, npz = evaluated(trained_run)
    for row in rows:
        assert np.all(npz[row["item_id"]]["std_t1"] == 0)
        assert math.isnan(float(row["uncertainty_error_correlation"])) and float(row["uncertainty_mean"]) == 0
    correlation = report["metrics"]["uncertainty_error_correlation"]
    assert correlation["pooled"] is None and correlation["mean"] is None and correlation["n"] == 0
    assert report["metrics"]["uncertainty_mean"]["pooled"] == 0


def test_one_sample_writes_no_uncertainty(trained_run):
    evaluate.main(["--run", str(trained_run), *EVAL, "eval.samples_per_item=2"])
    assert trained_run.joinpath(*OUT, "uncertainty.png").is_file()
    evaluate.main(["--run", str(trained_run), *EVAL])
    report, rows, npz = evaluated(trained_run)
    assert not trained_run.joinpath(*OUT, "uncertainty.png").exists()  # the earlier figure is not left behind
    assert not any(k.startswith("uncertainty") for k in [*report["metrics"], *rows[0]])
    assert not any(k.startswith("std_") for arrays in npz.values() for k in arrays.files)
