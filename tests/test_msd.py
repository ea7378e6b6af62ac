"""MSD-style datasets (dataset.json, 4D multi-modal images): modalities by name or index, labels, training/test
lists, refusals, and a mask -> modality run of configs/mri_own_data.yaml that trains and evaluates.

The data: nilearn's MNI152 T1 template and grey-matter probability map as two "modalities" of one 4D file, with
an integer tissue label volume, at 4 mm; cases differ by a shift, a flip and a crop.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import train_diffusion
from data import build_datasets, load_slice_dataset
from data.nifti import discover_subjects, load_subject_volumes, normalize_image
from tests.runs import tiny_args
from utils.config import ConfigError, DataConfig

MODALITIES = {"0": "T1w", "1": "GM"}
LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
TRAINING = ("case_00", "case_01", "case_02", "case_03")
TEST = ("case_09",)
# How each case is made from the template: (X, Y, Z) arrays -> (X', Y', Z') arrays.
VARIANTS = {
    "case_00": lambda a: a,
    "case_01": lambda a: np.roll(a, 3, axis=0),
    "case_02": lambda a: a[::-1].copy(),  # mirrored left-right
    "case_03": lambda a: a[2:-2, 3:-3, 1:].copy(),
    "case_09": lambda a: np.roll(a, -2, axis=1),
}


@pytest.fixture(scope="module")
def sources() -> dict[str, np.ndarray]:
    """t1, gm (float32) and seg (uint8: 0 background, 1 grey, 2 white matter) at 4 mm, and their RAS affine."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    template = load_mni152_template(resolution=2)
    every_other = (slice(None, None, 2),) * 3
    t1 = template.get_fdata(dtype=np.float32)[every_other]
    t1[np.abs(t1) < 1e-6] = 0.0  # the template's denormal background: "non-zero voxels" should mean the head
    gm = load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)[every_other]
    wm = load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)[every_other]
    seg = np.where(np.maximum(gm, wm) >= 0.5, np.stack([gm, wm]).argmax(0) + 1, 0).astype(np.uint8)
    affine = template.affine.copy()
    affine[:3, :3] *= 2
    return {"t1": t1, "gm": gm, "seg": seg, "affine": affine}


def write_msd(root: Path, sources: dict, *, modality: dict | None = MODALITIES, labels: dict | None = LABELS,
              training=TRAINING, test=TEST, stacked=("t1", "gm")) -> Path:
    """An MSD folder: imagesTr/<case>.nii.gz holding `stacked` along a 4th axis, labelsTr/, imagesTs/, dataset.json."""
    for case in (*training, *test):
        image = np.stack([VARIANTS[case](sources[name]) for name in stacked], axis=-1)
        folder = "imagesTs" if case in test else "imagesTr"
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, sources["affine"]), root / folder / f"{case}.nii.gz")
        if case in training:
            (root / "labelsTr").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(VARIANTS[case](sources["seg"]), sources["affine"]),
                     root / "labelsTr" / f"{case}.nii.gz")
    index = {"name": "MNI152 two-modality test set",
             "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
             "test": [f"./imagesTs/{c}.nii.gz" for c in test]}
    index.update({key: value for key, value in (("modality", modality), ("labels", labels)) if value is not None})
    (root / "dataset.json").write_text(json.dumps(index, indent=1))
    return root


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory, sources) -> Path:
    return write_msd(tmp_path_factory.mktemp("msd") / "Task99_MNI", sources)


def msd_cfg(root: Path, **overrides) -> DataConfig:
    settings = dict(root=str(root), images=["gm"], masks=["seg"], image_size=32)
    settings.update(overrides)
    return DataConfig(**settings)


# ---------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("names", [["GM", "t1w"], ["1", "0"], ["gm", "0"]], ids=["names", "indices", "mixed"])
def test_modalities_are_the_positions_on_the_4th_axis(msd_root, sources, names):
    cfg = msd_cfg(msd_root, images=names)
    subjects = discover_subjects(cfg)
    assert [s.subject_id for s in subjects] == list(TRAINING)  # the test case is not a subject
    for subject in subjects:
        volumes, _, _ = load_subject_volumes(subject, cfg, msd_root)
        for name, source in zip(names, ("gm", "t1")):
            # The template is RAS already, so the loaded volume is the source array, normalised.
            expected = normalize_image(VARIANTS[subject.subject_id](sources[source]), cfg, name)[0]
            assert torch.equal(volumes[name], torch.from_numpy(expected)), (subject.subject_id, name)
        assert torch.equal(volumes["seg"], torch.from_numpy(VARIANTS[subject.subject_id](sources["seg"])).long())
    # The two modalities really are different arrays (not one position read twice).
    assert not torch.equal(volumes[names[0]], volumes[names[1]])


def test_name_and_index_give_the_same_slices(msd_root):
    by_name = load_slice_dataset(msd_cfg(msd_root, images=["GM"]))
    by_index = load_slice_dataset(msd_cfg(msd_root, images=["1"]))
    assert by_name.item_ids == by_index.item_ids and len(by_name) > 20
    assert torch.equal(by_name.arrays["GM"], by_index.arrays["1"])
    assert set(by_name.subject_ids) == set(TRAINING)


def test_labels_fill_mask_classes_and_name_the_classes(msd_root, tmp_path):
    cfg = msd_cfg(msd_root)
    assert cfg.mask_classes == {}
    datasets = build_datasets(cfg, tmp_path / "run", seed=0)
    assert cfg.mask_classes == {"seg": 3}
    assert datasets["train"].mask_labels == {"seg": {0: "background", 1: "grey matter", 2: "white matter"}}
    assert datasets["val"].mask_labels == datasets["train"].mask_labels
    assert int(datasets["train"].arrays["seg"].max()) == 2


def test_test_cases_never_train(msd_root, tmp_path):
    datasets = build_datasets(msd_cfg(msd_root, test_fraction=0.25), tmp_path / "run", seed=0)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["unit"] == "subject"
    assert sorted(split["train"] + split["val"] + split["test"]) == list(TRAINING)
    assert len(split["val"]) == 1 and len(split["test"]) == 1
    every_item = [item for dataset in datasets.values() for item in dataset.item_ids]
    assert not any(item.startswith(f"{TEST[0]}/") for item in every_item)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line naming the file or dataset.json and what is available


def test_4d_images_without_a_modality_map_are_refused(tmp_path, sources):
    root = write_msd(tmp_path / "msd", sources, modality=None, training=TRAINING[:2], test=())
    with pytest.raises(ConfigError) as error:
        build_datasets(msd_cfg(root, images=["image"]), tmp_path / "run", seed=0)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(r"imagesTr/case_00\.nii\.gz holds 2 modalities along its 4th axis \(shape \(50, 59, 48, 2\)\), "
                     r"but .*dataset\.json has no 'modality' map naming them \(positions 0-1\)", message), message


def test_a_modality_absent_from_the_map_is_refused_with_the_names_available(msd_root, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_datasets(msd_cfg(msd_root, images=["FLAIR"]), tmp_path / "run", seed=0)
    message = str(error.value)
    assert "\n" not in message and str(msd_root / "dataset.json") in message
    assert "data.images names 'FLAIR'" in message and "available T1w (0), GM (1)" in message
    with pytest.raises(ConfigError, match=r"data\.images names '2'.*available T1w \(0\), GM \(1\)"):
        build_datasets(msd_cfg(msd_root, images=["2"]), tmp_path / "run", seed=0)


def test_a_file_with_other_modalities_than_the_map_is_refused(tmp_path, sources):
    root = write_msd(tmp_path / "msd", sources, modality={"0": "T1w", "1": "GM", "2": "FLAIR"}, test=())
    with pytest.raises(ConfigError, match=r"imagesTr/case_00\.nii\.gz holds 2 modalities .* 'modality' map of .*"
                                          r"dataset\.json names 3: T1w \(0\), GM \(1\), FLAIR \(2\)"):
        build_datasets(msd_cfg(root), tmp_path / "run", seed=0)


def test_mask_classes_that_disagree_with_the_labels_are_refused(msd_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.mask_classes\.seg=4, but the 'labels' of .*dataset\.json name 3 "
                                          r"classes \(0 background, 1 grey matter, 2 white matter\): set "
                                          r"data\.mask_classes\.seg=3"):
        build_datasets(msd_cfg(msd_root, mask_classes={"seg": 4}), tmp_path / "run", seed=0)


def test_a_case_in_both_lists_is_refused(tmp_path, sources):
    root = write_msd(tmp_path / "msd", sources, training=TRAINING[:2], test=())
    index = json.loads((root / "dataset.json").read_text())
    index["test"] = ["./imagesTr/case_01.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"case 'case_01' is in both the 'training' and the 'test' list of "):
        build_datasets(msd_cfg(root), tmp_path / "run", seed=0)


# ---------------------------------------------------------------------------------------------------------
# End to end: mask -> modality B with the own-data preset


def test_mask_to_second_modality_trains_and_evaluates(msd_root, tmp_path):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, msd_root, "data.images=[gm]", "task.targets=[gm]",
                                   config="configs/mri_own_data.yaml"))
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == list(TRAINING) and split["val"]
    assert (run / "final" / "unet" / "config.json").is_file()
    unet_config = json.loads((run / "final" / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 1 + 3 and unet_config["out_channels"] == 1  # gm + one-hot seg -> gm

    evaluate.main(["--run", str(run), "eval.sampling_steps=3", "eval.num_items=4"])
    reports = sorted(run.glob("eval/**/report.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["settings"]["num_items"] == 4
    assert 0 < report["metrics"]["ssim"]["mean"] <= 1 and np.isfinite(report["metrics"]["psnr"]["mean"])
