"""evaluate.py on a tiny model trained on the MNI152 demo: outputs, recomputable metrics, 1 vs 2 processes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import evaluate
import train_diffusion
from tests import feature_sharding_probe
from tests.runs import REPO, read_metrics, run_script, tiny_args

# Every test evaluates the one run again with these settings, into eval/final-euler3/ (rectified flow: Euler).
EVAL = ["eval.num_items=6", "eval.batch_size=4", "eval.sampling_steps=3", "eval.num_figures=3", "eval.overwrite=true"]
OUT = ("eval", "final-euler3")
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("eval") / "run"
    # Validation samples every held-out slice at the last step, with the run's seed: evaluate.py with the same
    # seed and steps must reproduce its number exactly (one metric implementation).
    train_diffusion.main(tiny_args(run, demo_root, "validation.num_samples=100", "training.max_steps=6",
                                   "validation.sample_every=6", "validation.every=6"))
    return run


def read_per_item(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_outputs_and_metrics_recomputed_from_npz(trained_run):
    evaluate.main(["--run", str(trained_run), *EVAL])
    out = trained_run.joinpath(*OUT)
    report = json.loads((out / "report.json").read_text())
    assert report["data_range"] == 2.0 and report["settings"]["num_items"] == 6
    rows = read_per_item(out / "per_item.csv")
    assert len(rows) == 6 and len({r["item_id"] for r in rows}) == 6
    assert {"ssim", "psnr", "mae", "mse", "ssim_in_seg", "psnr_out_seg", "mae_in_seg"} <= set(rows[0])
    for name in ("comparison.png", "denoising.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000

    for row in rows:
        npz = np.load(out / "samples" / f"{row['item_id'].replace('/', '__')}.npz")
        gen, ref, cond = npz["generated"][0, 0], npz["reference"][0], npz["condition"][0]
        data_range = float(npz["data_range"])
        ssim = structural_similarity(gen, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=data_range)
        assert abs(ssim - float(row["ssim"])) < 1e-3
        assert abs(peak_signal_noise_ratio(ref, gen, data_range=data_range) - float(row["psnr"])) < 1e-3
        assert abs(np.abs(gen - ref).mean() - float(row["mae"])) < 1e-5
        inside = cond > 0
        assert abs(np.abs(gen - ref)[inside].mean() - float(row["mae_in_seg"])) < 1e-5
        mse_out = np.square(gen - ref)[~inside].mean()
        assert abs(10 * np.log10(data_range ** 2 / mse_out) - float(row["psnr_out_seg"])) < 1e-3
        _, ssim_map = structural_similarity(gen, ref, gaussian_weights=True, sigma=1.5, full=True,
                                            use_sample_covariance=False, data_range=data_range)
        valid = np.zeros_like(inside)
        valid[5:-5, 5:-5] = True  # skimage averages the region the 11-tap window fully covers
        assert abs(ssim_map[valid & inside].mean() - float(row["ssim_in_seg"])) < 1e-3

    means = report["metrics"]
    assert abs(means["ssim"]["mean"] - np.mean([float(r["ssim"]) for r in rows])) < 1e-6
    assert means["ssim"]["n"] == 6


def test_validation_and_evaluation_share_one_metric_implementation(trained_run):
    steps = 3  # the tiny run's validation.sampling_steps
    evaluate.main(["--run", str(trained_run), "eval.seed=0", f"eval.sampling_steps={steps}", "eval.num_items=0",
                   "eval.batch_size=5", "eval.overwrite=true"])
    report = json.loads((trained_run.joinpath(*OUT) / "report.json").read_text())
    logged = {n: float(v) for s, n, v in read_metrics(trained_run) if s == 6 and not n.endswith("_items")}
    assert report["settings"]["num_items"] == 13
    for name in ("ssim", "psnr", "mae"):
        assert abs(report["metrics"][name]["mean"] - logged[f"val/{name}"]) < 1e-4, name


def test_one_and_two_processes_agree(trained_run, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(trained_run, single)
    evaluate.main(["--run", str(single), *EVAL, "eval.samples_per_item=2"])
    result = run_script("evaluate.py", ["--run", str(trained_run), *EVAL, "eval.samples_per_item=2"],
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    one = read_per_item(single.joinpath(*OUT, "per_item.csv"))
    two = read_per_item(trained_run.joinpath(*OUT, "per_item.csv"))
    assert [r["item_id"] for r in one] == [r["item_id"] for r in two]
    assert "diversity_msssim" in one[0]
    for a, b in zip(one, two):
        for key in a:
            if key != "item_id":
                assert abs(float(a[key]) - float(b[key])) < 1e-4, (a["item_id"], key)
    report_one = json.loads(single.joinpath(*OUT, "report.json").read_text())
    report_two = json.loads(trained_run.joinpath(*OUT, "report.json").read_text())
    assert report_two["settings"]["num_processes"] == 2
    for name, stats in report_one["metrics"].items():
        assert stats["n"] == report_two["metrics"][name]["n"]
        assert abs(stats["mean"] - report_two["metrics"][name]["mean"]) < 1e-4


def test_fid_and_kid_with_a_local_feature_network(trained_run, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    evaluate.main(["--run", str(trained_run), *EVAL, f"eval.feature_network={path}"])
    report = json.loads(trained_run.joinpath(*OUT, "report.json").read_text())
    assert report["metrics"]["fid"]["value"] >= 0 and report["metrics"]["fid"]["n"] == 6
    assert np.isfinite(report["metrics"]["kid"]["mean"])


def test_num_items_are_spread_over_the_held_out_set_and_clamped_to_the_data_range(trained_run):
    evaluate.main(["--run", str(trained_run), "eval.num_items=3", "eval.sampling_steps=3", "eval.overwrite=true"])
    val_ids = json.loads((trained_run / "split.json").read_text())["val"]
    ids = [r["item_id"] for r in read_per_item(trained_run.joinpath(*OUT, "per_item.csv"))]
    # Not the leading slices of the held-out slab: its first and last slice, and one between.
    assert len(set(ids)) == 3 and ids[0] == val_ids[0] and ids[-1] == val_ids[-1] and ids[1] in val_ids[1:-1]
    for item_id in ids:
        generated = np.load(trained_run.joinpath(*OUT, "samples", f"{item_id.replace('/', '__')}.npz"))["generated"]
        assert -1 <= generated.min() and generated.max() <= 1  # a barely trained model overshoots [-1, 1]


def test_fid_features_are_computed_once_across_processes(trained_run, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
               str(REPO / "tests" / "feature_sharding_probe.py"), str(trained_run), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone, seen = feature_sharding_probe.distribution_scores(trained_run, 0, 1)
    assert ranks[0]["seen"] + ranks[1]["seen"] == seen and 0 < ranks[0]["seen"] < seen  # each image once
    for report in ranks:
        assert report["scores"]["fid"]["n"] == alone["fid"]["n"] and report["scores"]["kid"]["n"] == alone["kid"]["n"]
        assert abs(report["scores"]["fid"]["value"] - alone["fid"]["value"]) < 1e-6 * max(1.0, alone["fid"]["value"])
        assert abs(report["scores"]["kid"]["mean"] - alone["kid"]["mean"]) < 1e-6


def test_unconditional_items_are_seeds(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "task.spatial_conditions=[]", "training.max_steps=2"))
    evaluate.main(["--run", str(run), "eval.num_items=3", "eval.sampling_steps=2", "eval.samples_per_item=2"])
    rows = read_per_item(run / "eval" / "final-euler2" / "per_item.csv")
    assert [r["item_id"] for r in rows] == ["sample-00000", "sample-00001", "sample-00002"]
    assert all(0 <= float(r["diversity_msssim"]) <= 1 for r in rows)


def test_bad_input_one_line_errors(trained_run, tmp_path):
    no_final = tmp_path / "no_final"
    shutil.copytree(trained_run, no_final)
    shutil.rmtree(no_final / "final")
    result = run_script("evaluate.py", ["--run", str(no_final), *EVAL])
    assert result.returncode == 2 and "final" in result.stderr and "Traceback" not in result.stderr

    stale = tmp_path / "stale"
    shutil.copytree(trained_run, stale)
    split = json.loads((stale / "split.json").read_text())
    split["val"][0] = "mni152/z999"
    (stale / "split.json").write_text(json.dumps(split))
    result = run_script("evaluate.py", ["--run", str(stale), *EVAL])
    assert result.returncode == 2 and "mni152/z999" in result.stderr and "Traceback" not in result.stderr

    garbage = tmp_path / "features.pt"
    garbage.write_bytes(b"not a network")
    result = run_script("evaluate.py", ["--run", str(trained_run), *EVAL, f"eval.feature_network={garbage}"])
    assert result.returncode == 2 and str(garbage) in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1

    result = run_script("evaluate.py", ["--run", str(trained_run), *EVAL, "eval.data_range=2000"])
    assert result.returncode == 2 and "eval.data_range" in result.stderr
