"""Classification by label diffusion end to end on the IHC stain-class demo: stage 1 (auxiliary classifier) ->
stage 2 (label diffusion) -> evaluate.py on the test folder, on 1 and 2 processes; exact resume across the stages;
reported metrics equal to scikit-learn's on the saved predictions; bad class folders refused with one line."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn import metrics as sk

import evaluate
import train_diffusion
from data.demo import build_ihc_classes_demo
from tests.runs import REPO, read_metrics, run_script
from tests.test_classification_metrics import sklearn_hard_scores
from tests.test_class_folders import _empty_class, _single_class, _truncated_png, _unknown_test_class
from tests.test_resume import CPU_GLOO, TWO_PROCESSES
from utils.checkpoint import list_checkpoints
from utils.config import ConfigError

# 12 steps: 6 of the auxiliary classifier, then 6 of the label diffusion; checkpoints at 6 and 12.
TINY = ["classifier.backbone_widths=[8,16]", "classifier.feature_dim=16", "classifier.aux_steps=6",
        "training.max_steps=12", "training.batch_size=8", "training.lr_warmup_steps=2", "training.checkpoint_every=6",
        "training.log_every=3", "validation.every=6", "validation.sample_every=12", "validation.num_items=12",
        "validation.sampling_steps=3", "eval.sampling_steps=3", "eval.samples_per_item=2", "eval.num_items=24",
        "logging.trackers=[csv]"]


def classifier_args(run, root, *overrides):
    return ["--config", str(REPO / "configs" / "demo_classifier.yaml"), f"run.output_dir={run}", f"data.root={root}",
            *TINY, *overrides]


@pytest.fixture(scope="module")
def ihc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "demo_ihc_classes"
    build_ihc_classes_demo(root)
    return root


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ihc_root):
    run = tmp_path_factory.mktemp("classifier") / "run"
    train_diffusion.main(classifier_args(run, ihc_root))
    return run


def read_items(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_stages_train_validate_and_export(straight):
    rows = read_metrics(straight)
    names = {(step, name) for step, name, _ in rows}
    # Stage 1 logs the auxiliary classifier's loss; stage 2 the label diffusion's.
    assert (3, "train/aux/global_ce") in names and (3, "train/loss_label_map") not in names
    assert (9, "train/loss_label_map") in names and (9, "train/focal_weight") in names
    # Its scores at the end of stage 1; then the held-out loss and, when sampled, the label diffusion's scores.
    assert (6, "val/aux_f1") in names and (6, "val/loss") not in names and (6, "val/f1") not in names
    assert {(12, "val/loss"), (12, "val/f1"), (12, "val/aux_f1"), (12, "val/auc_ovr")} <= names
    aux_f1 = {step: float(v) for step, name, v in rows if name == "val/aux_f1"}
    assert aux_f1[6] == aux_f1[12]  # frozen after stage 1
    for folder in ("final", "checkpoints/best-val_f1", "checkpoints/best-val_loss"):
        assert (straight / folder / "classifier.safetensors").is_file(), folder
    assert (straight / "samples" / "step-0000012.png").is_file()  # the confusion matrix
    card = (straight / "final" / "README.md").read_text()
    assert "classification" in card


@pytest.mark.parametrize("stop_after", [6, 9])  # at the end of stage 1, and inside stage 2
def test_a_stopped_run_resumes_exactly_across_the_stages(straight, tmp_path, ihc_root, stop_after):
    run = tmp_path / "run"
    train_diffusion.main(classifier_args(run, ihc_root, f"training.stop_after={stop_after}"))
    assert list_checkpoints(run / "checkpoints")[-1].name == f"checkpoint-{stop_after}"
    train_diffusion.main(classifier_args(run, ihc_root))
    for name in ("model", "ema"):
        a = load_file(straight / "checkpoints" / "checkpoint-12" / f"{name}.safetensors")
        b = load_file(run / "checkpoints" / "checkpoint-12" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    timeless = [r for r in read_metrics(run) if not r[1].startswith("perf/")]
    assert timeless == [r for r in read_metrics(straight) if not r[1].startswith("perf/")]


def test_evaluation_reports_metrics_equal_to_scikit_learn(straight):
    evaluate.main(["--run", str(straight), "eval.weights=final"])
    out = straight / "eval" / "final-ddim3-test"  # eval.sampling_steps=3 DDIM steps on the test split
    report = json.loads((out / "report.json").read_text())
    items = read_items(out / "per_item.csv")
    classes = report["classes"]
    assert len(items) == 24 and all(row["item_id"].startswith("test/") for row in items)  # the test folder
    labels = np.array([int(r["label"]) for r in items])
    for prefix in ("", "aux_"):
        probabilities = np.array([[float(r[f"{prefix}p_{c}"]) for c in classes] for r in items])
        predictions = np.array([int(r[f"{prefix}prediction"]) for r in items])
        assert np.array_equal(predictions, probabilities.argmax(1))
        assert np.allclose(probabilities.sum(1), 1, atol=1e-6)
        expected = {**sklearn_hard_scores(labels, predictions, len(classes)),
                    "auc_ovr": sk.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"),
                    "auc_ovo": sk.roc_auc_score(labels, probabilities, multi_class="ovo", average="macro")}
        for name, value in expected.items():
            assert report["metrics"][prefix + name]["value"] == pytest.approx(value, abs=1e-6), prefix + name
    # The uncertainty (the spread of 2 samples) against the errors.
    uncertainty = np.array([float(r["uncertainty"]) for r in items])
    errors = np.array([int(r["prediction"]) != int(r["label"]) for r in items])
    assert (uncertainty > 0).all()
    if 0 < errors.sum() < len(errors):
        assert report["metrics"]["uncertainty_error_auroc"]["value"] == pytest.approx(
            sk.roc_auc_score(errors, uncertainty), abs=1e-9)
    for figure in ("confusion.png", "confusion_auxiliary.png"):
        assert (out / figure).is_file()
    assert "## Evaluation" in (straight / "final" / "README.md").read_text()


def test_two_processes_train_and_predict_as_one(tmp_path, ihc_root):
    run = tmp_path / "run"
    result = run_script("train_diffusion.py", classifier_args(run, ihc_root), env=CPU_GLOO, launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = {}
    for processes in (1, 2):
        result = run_script("evaluate.py", ["--run", str(run), "eval.weights=final", "eval.overwrite=true"],
                            env=CPU_GLOO, launch=TWO_PROCESSES if processes == 2 else None)
        assert result.returncode == 0, result.stderr[-3000:]
        out = run / "eval" / "final-ddim3-test"
        predictions[processes] = read_items(out / "per_item.csv")
        assert json.loads((out / "report.json").read_text())["settings"]["num_processes"] == processes
    assert predictions[1] == predictions[2]


@pytest.mark.parametrize("make_bad", [_empty_class, _single_class, _unknown_test_class, _truncated_png])
def test_bad_class_folders_are_refused_before_training(tmp_path, make_bad):
    root = tmp_path / "data"
    named = make_bad(root)
    with pytest.raises(ConfigError) as error:
        train_diffusion.main(classifier_args(tmp_path / "run", root, "data.demo=''", "data.image_size=16",
                                             "classifier.patch_size=4"))
    assert re.search(named, str(error.value)) if named.startswith("test class") else named in str(error.value)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_the_script_reports_a_bad_folder_in_one_line(tmp_path):
    root = tmp_path / "data"
    folder = _empty_class(root)
    result = run_script("train_diffusion.py", classifier_args(tmp_path / "run", root, "data.demo=''"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and folder in lines[-1]
    assert "Traceback" not in result.stderr


def test_throughput_benchmark_measures_every_stage(tmp_path):
    out = tmp_path / "rates.json"
    result = run_script("benchmarks/classifier_throughput.py", ["--batch-size", "4", "--repeats", "1", "--json",
                                                                str(out), "classifier.backbone_widths=[8,16]"])
    assert result.returncode == 0, result.stderr[-3000:]
    rates = json.loads(out.read_text())["images_per_s"]
    assert len(rates) == 4 and all(rate > 0 for rate in rates.values())
