"""The own-data presets (configs/mri_own_data.yaml, configs/ct_own_data.yaml) at test size on folders of scans
made from package-shipped volumes, after setting only data.root; and the demo is built only when asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import evaluate
import train_diffusion
from data import DEMO_ROOTS, build_datasets
from tests.runs import REPO, TINY, tiny_args
from utils.config import ConfigError, resolve

# Three subjects from one template: shifted, mirrored and a different axial range, so the split is by subject.
SUBJECTS = {
    "sub-01": lambda a: a[:, :, 30:60],
    "sub-02": lambda a: np.roll(a, 4, axis=0)[:, :, 34:64],
    "sub-03": lambda a: a[::-1, :, 26:56],
}
CT_SLICES = 8  # the low-dose simulation costs about 0.3 s per 2 mm axial slice on a CPU core


def write_subjects(source: Path, root: Path, names: list[str], keep_slices=None) -> Path:
    """<root>/<subject>/<name>.nii.gz for each name, cut from <source>/<name>.nii.gz by SUBJECTS."""
    for subject, cut in SUBJECTS.items():
        (root / subject).mkdir(parents=True)
        for name in names:
            image = nib.load(source / f"{name}.nii.gz")
            data = cut(np.asanyarray(image.dataobj))
            if keep_slices:
                data = data[:, :, :keep_slices]
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine), root / subject / f"{name}.nii.gz")
    return root


def check_trained_and_evaluated(run: Path) -> dict:
    """The run's subject split (three subjects: two train, one held out), final export and one evaluation report."""
    split = json.loads((run / "split.json").read_text())
    assert split["unit"] == "subject" and len(split["train"]) == 2 and len(split["val"]) == 1
    assert sorted(split["train"] + split["val"]) == sorted(SUBJECTS)
    assert "2 train, 1 val, 0 test subjects" in split["note"]
    assert (run / "final" / "unet" / "config.json").is_file()
    evaluate.main(["--run", str(run), "eval.sampling_steps=3", "eval.num_items=4"])
    reports = sorted(run.glob("eval/**/report.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["settings"]["num_items"] == 4 and np.isfinite(report["metrics"]["psnr"]["mean"])
    return report


def test_mri_preset_runs_on_a_folder_of_subjects(tmp_path, demo_root):
    root = write_subjects(demo_root / "mni152", tmp_path / "scans", ["t1", "seg"])
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, root, config="configs/mri_own_data.yaml"))
    check_trained_and_evaluated(run)


def test_ct_preset_runs_on_a_folder_of_subjects(tmp_path, ct_demo_root):
    root = write_subjects(ct_demo_root / "mni152", tmp_path / "scans", ["ct"], keep_slices=CT_SLICES)
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, root, config="configs/ct_own_data.yaml"))
    report = check_trained_and_evaluated(run)
    assert "mae_hu" in report["metrics"]  # eval.hu_metrics: true in the preset


# ---------------------------------------------------------------------------------------------------------
# The demo is built only when asked for


def test_demo_preset_with_a_mistyped_root_is_refused_naming_it(tmp_path):
    mistyped = tmp_path / "my_scnas"
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        train_diffusion.main(tiny_args(run, mistyped))  # configs/demo.yaml: data.demo=mni152
    message = str(error.value)
    assert "\n" not in message and f"data.root={mistyped} does not exist" in message
    assert "data.demo=''" in message and "data.root=data/demo_mni152" in message
    assert not mistyped.exists() and not (run / "checkpoints").exists()


def test_demo_is_built_in_a_missing_folder_of_its_own_name(tmp_path):
    root = tmp_path / "scratch" / "demo_mni152"
    cfg = resolve(REPO / "configs/demo.yaml", [f"data.root={root}", *TINY])
    datasets = build_datasets(cfg.data, tmp_path / "run", cfg.run.seed)
    assert (root / "mni152" / "t1.nii.gz").is_file() and len(datasets["train"]) > 0


def test_every_demo_preset_ships_with_the_demo_s_own_folder():
    presets = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]
    demos = {(p["data"]["demo"], p["data"]["root"]) for p in presets if p.get("data", {}).get("demo")}
    assert demos and all(DEMO_ROOTS[demo] == root for demo, root in demos), demos
    assert {demo for demo, _ in demos} <= set(DEMO_ROOTS)
