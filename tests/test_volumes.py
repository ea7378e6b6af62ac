"""data.dims 3: volumes as items (data/volumes.py) on the real pseudo-CT demo and small synthetic subjects.

One subject is split by slabs of slices (held-out slabs of data.volume_shape[0] slices, training windows inside the
training runs), several subjects by subject (whole volumes at data.volume_shape); the simulated degraded image is
seeded per subject and matches the 2D build slice by slice; random training patches cut every key at one place;
bad volumes and 3D settings stop train_diffusion.py with one `error:` line.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from data import augment, build_datasets, random_patches
from data.degrade import item_seed
from data.volumes import SubjectVolumes
from tests.runs import run_script
from utils.config import ConfigError, DataConfig, DegradeConfig

DEPTH, SIDE = 16, 48  # the CT demo at 4 mm is (X, Y, Z) 50 x 58 x 48: axial slices 58 x 50, cropped to 48 x 48
LOW_DOSE = DegradeConfig(kind="low_dose_ct", photons=3e3, seed=7)
CT_WINDOW = [0.0, 1000.0]  # synthetic subjects hold "HU" in [0, 1000]: normalised = value / 500 - 1
SYNTHETIC_SHAPE = (20, 24, 18)  # (X, Y, Z), RAS at 1 mm: axial (D, H, W) = (18, 24, 20)


# ---------------------------------------------------------------------------------------------------------
# Data


def ct_cfg(root: Path, **overrides) -> DataConfig:
    settings = dict(root=str(root), dims=3, images=["ct"], normalization="ct", spacing=[4.0, 4.0, 4.0],
                    volume_shape=[DEPTH, SIDE, SIDE], slab_gap=2, image_size=SIDE, resize=False)
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.fixture(scope="module")
def ct_run(ct_demo_root, tmp_path_factory):
    """The CT demo as 3D items with a simulated low-dose image: (datasets, split.json, run folder)."""
    run = tmp_path_factory.mktemp("ct_run")
    datasets = build_datasets(ct_cfg(ct_demo_root, degrade=LOW_DOSE), run, seed=0)
    return datasets, json.loads((run / "split.json").read_text()), run


@pytest.fixture(scope="module")
def ct_volumes(ct_demo_root) -> dict[str, torch.Tensor]:
    """The preprocessed demo volume, (1, D, H, W) of every name, built a second time (same degradation seed)."""
    return SubjectVolumes(ct_cfg(ct_demo_root, degrade=LOW_DOSE)).volumes["mni152"]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def synthetic_subject(index: int, shape=SYNTHETIC_SHAPE) -> dict[str, np.ndarray]:
    """hd: a smooth ramp plus a subject-specific block, in [0, 1000]; ld: hd with seeded noise; seg: the block."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    hd = 100.0 + 20.0 * x + 10.0 * y + 5.0 * z + 50.0 * index
    seg = np.zeros(shape, np.uint8)
    seg[2 + index:8 + index, 3:12 + 2 * index, 4:10] = 1 + index % 2
    hd = np.where(seg > 0, 900.0, hd).astype(np.float32)
    ld = (hd + np.random.default_rng(index).normal(0, 30, shape)).clip(0, 1000).astype(np.float32)
    return {"hd": hd, "ld": ld, "seg": seg}


def write_subjects(root: Path, count: int = 3) -> dict[str, dict[str, np.ndarray]]:
    subjects = {f"sub-{i}": synthetic_subject(i) for i in range(count)}
    for subject, volumes in subjects.items():
        for name, data in volumes.items():
            save_nifti(root / subject / f"{name}.nii.gz", data)
    return subjects


def radiological(volume: np.ndarray) -> np.ndarray:
    """A RAS (X, Y, Z) array as axial (D, H, W) slices, written independently of data.nifti.to_slices: row r,
    column c of slice s is voxel (X - 1 - c, Y - 1 - r, s) (anterior at the top, patient's right on the left)."""
    return np.flip(volume, (0, 1)).transpose(2, 1, 0)


def slab_range(item_id: str) -> range:
    first, last = re.fullmatch(r"mni152/z(\d{3})-(\d{3})", item_id).groups()
    return range(int(first), int(last) + 1)


def slice_numbers(item_ids) -> list[int]:
    return [int(i.rsplit("/z", 1)[1]) for i in item_ids]


def runs_of(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# ---------------------------------------------------------------------------------------------------------
# 1. One subject: slabs


def test_one_subject_split_by_slabs(ct_run, ct_volumes):
    datasets, split, _ = ct_run
    assert set(datasets) == {"train", "val"}
    assert split["unit"] == "slice" and split["seed"] == 0
    assert "one subject ('mni152')" in split["note"] and "slabs" in split["note"] and "2 slices" in split["note"]
    index = {name: slice_numbers(split[name]) for name in ("train", "val", "excluded_gap")}
    assert sorted(sum(index.values(), [])) == list(range(48))  # every slice of the 48 at 4 mm, once
    assert len(index["val"]) % DEPTH == 0 and index["val"]
    assert all(len(run) % DEPTH == 0 for run in runs_of(index["val"]))
    assert min(abs(t - v) for t in index["train"] for v in index["val"]) > 2  # data.slab_gap

    # Held out: consecutive slabs of DEPTH slices, exactly the val slices.
    val = datasets["val"]
    assert all(re.fullmatch(r"mni152/z\d{3}-\d{3}", i) for i in val.item_ids)
    covered = [s for i in val.item_ids for s in slab_range(i)]
    assert covered == sorted(index["val"]) and all(len(slab_range(i)) == DEPTH for i in val.item_ids)
    # Training: every window of DEPTH slices inside the training runs, and nothing else.
    train_set = set(index["train"])
    windows = [s for s in range(48) if all(t in train_set for t in range(s, s + DEPTH))]
    assert windows and [slab_range(i)[0] for i in datasets["train"].item_ids] == windows

    # Items are slabs of the preprocessed volume (built again: the same degraded image).
    assert ct_volumes["ct"].shape == ct_volumes["ld"].shape == (1, 48, SIDE, SIDE)
    for dataset in datasets.values():
        for position, item_id in enumerate(dataset.item_ids):
            item = dataset[position]
            assert item["item_id"] == item_id and set(item) == {"ct", "ld", "item_id"}
            first = slab_range(item_id)[0]
            for name in ("ct", "ld"):
                assert item[name].shape == (1, DEPTH, SIDE, SIDE) and item[name].dtype == torch.float32
                assert torch.equal(item[name], ct_volumes[name][:, first:first + DEPTH])
    assert datasets["train"].normalization["method"] == "ct_window"
    assert datasets["train"].clip_values == {"mni152": {"ct": [-1000.0, 1000.0]}}


def test_one_subject_val_and_test_slabs(ct_demo_root, tmp_path):
    """Held-out slabs longer than data.volume_shape[0] are cut into consecutive items; a test slab too."""
    cfg = ct_cfg(ct_demo_root, volume_shape=[8, SIDE, SIDE], val_fraction=0.3, test_fraction=0.2, slab_gap=1)
    datasets = build_datasets(cfg, tmp_path, seed=3)
    split = json.loads((tmp_path / "split.json").read_text())
    volume = SubjectVolumes(cfg).volumes["mni152"]["ct"]
    train = set(slice_numbers(split["train"]))
    for name, slices in (("val", 16), ("test", 16)):  # round(48 * 0.3) = 14 and 10 slices -> two slabs of 8
        index = slice_numbers(split[name])
        assert len(index) == slices and index == list(range(index[0], index[0] + slices))
        assert min(abs(t - v) for t in train for v in index) > 1
        items = datasets[name].item_ids
        assert items == [f"mni152/z{s:03d}-{s + 7:03d}" for s in index[::8]]
        for position, item_id in enumerate(items):
            first = slab_range(item_id)[0]
            assert torch.equal(datasets[name][position]["ct"], volume[:, first:first + 8])
    windows = [s for s in range(48) if all(t in train for t in range(s, s + 8))]
    assert [slab_range(i)[0] for i in datasets["train"].item_ids] == windows


# ---------------------------------------------------------------------------------------------------------
# 2. Several subjects: whole volumes


def test_several_subjects_whole_volumes_padded_and_cropped(tmp_path):
    sources = write_subjects(tmp_path / "data")
    # (D, H, W) = (18, 24, 20) -> (16, 32, 16): D and W centre-cropped (by 1 and 2), H padded by 4 on each side.
    cfg = DataConfig(root=str(tmp_path / "data"), dims=3, images=["hd", "ld"], masks=["seg"],
                     mask_classes={"seg": 3}, normalization="ct", ct_window=CT_WINDOW, volume_shape=[16, 32, 16],
                     val_fraction=0.34)
    datasets = build_datasets(cfg, tmp_path / "run", seed=1)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["unit"] == "subject" and "degradation_seeds" not in split
    assert (len(split["train"]), len(split["val"])) == (2, 1)
    assert sorted(split["train"] + split["val"]) == sorted(sources)
    seen = []
    for name in ("train", "val"):
        dataset = datasets[name]
        assert dataset.item_ids == split[name]  # item ids are subject ids
        for position, subject in enumerate(dataset.item_ids):
            item, source = dataset[position], sources[subject]
            seen.append(subject)
            for key in ("hd", "ld", "seg"):
                assert item[key].shape == (1, 16, 32, 16)
            assert item["seg"].dtype == torch.int64 and item["hd"].dtype == torch.float32
            for key, fill in (("hd", -1.0), ("ld", -1.0), ("seg", 0)):
                volume = item[key][0].numpy()
                assert np.all(volume[:, :4] == fill) and np.all(volume[:, -4:] == fill)  # the padded rows
                expected = radiological(source[key])[1:17, :, 2:18]  # the centre: cropped source
                if key != "seg":
                    expected = expected / 500.0 - 1.0
                np.testing.assert_allclose(volume[:, 4:28], expected, rtol=0, atol=1e-5)
    assert sorted(seen) == sorted(sources)
    # Different subjects, different content.
    volumes = [datasets["train"][0]["hd"], datasets["train"][1]["hd"], datasets["val"][0]["hd"]]
    assert not torch.equal(volumes[0], volumes[1]) and not torch.equal(volumes[0], volumes[2])


# ---------------------------------------------------------------------------------------------------------
# 3. Degradation


def test_degradation_is_seeded_per_subject_and_recorded(ct_demo_root, ct_run, ct_volumes):
    datasets, split, _ = ct_run
    ct, ld = ct_volumes["ct"], ct_volumes["ld"]
    head = ct > -0.9
    difference = (ld - ct).abs()
    assert difference.mean() > 0.005 and difference[head].mean() < 0.2  # noisy, yet the same image
    assert torch.corrcoef(torch.stack([ct.flatten(), ld.flatten()]))[0, 1] > 0.9
    assert split["degradation_seeds"] == {"mni152": item_seed(LOW_DOSE.seed, "mni152")}
    # Rebuilt with the same seed (ct_volumes is a second build): identical; with another seed: another noise.
    first = slab_range(datasets["val"].item_ids[0])[0]
    assert torch.equal(datasets["val"][0]["ld"], ld[:, first:first + DEPTH])
    other_cfg = ct_cfg(ct_demo_root, degrade=DegradeConfig(kind="low_dose_ct", photons=LOW_DOSE.photons, seed=8))
    other = SubjectVolumes(other_cfg)
    assert torch.equal(other.volumes["mni152"]["ct"], ct)
    assert not torch.equal(other.volumes["mni152"]["ld"], ld)
    assert (other.volumes["mni152"]["ld"] - ld).abs().mean() > 0.005


def test_degraded_slices_match_the_2d_build(ct_demo_root, ct_volumes, tmp_path):
    """The degradation acts on the volume before slicing: the 2D build's ld slices are slices of the 3D ld."""
    datasets = build_datasets(ct_cfg(ct_demo_root, dims=2, degrade=LOW_DOSE), tmp_path, seed=0)
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["unit"] == "slice" and split["degradation_seeds"] == {"mni152": item_seed(LOW_DOSE.seed, "mni152")}
    compared = 0
    for dataset in datasets.values():
        for position, item_id in enumerate(dataset.item_ids):
            index = int(item_id.rsplit("/z", 1)[1])
            for name in ("ct", "ld"):
                assert dataset[position][name].shape == (1, SIDE, SIDE)
                assert torch.equal(dataset[position][name], ct_volumes[name][:, index]), (item_id, name)
            compared += 1
    assert compared > 20 and len(datasets["val"]) > 0


def test_several_subjects_degradation_seeds(tmp_path):
    write_subjects(tmp_path / "data")
    cfg = DataConfig(root=str(tmp_path / "data"), dims=3, images=["hd"], normalization="ct", ct_window=CT_WINDOW,
                     volume_shape=[16, 32, 16], degrade=DegradeConfig(kind="low_dose_ct", photons=1e3, seed=2,
                                                                       name="noisy"))
    datasets = build_datasets(cfg, tmp_path / "run", seed=0)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["degradation_seeds"] == {f"sub-{i}": item_seed(2, f"sub-{i}") for i in range(3)}
    assert len(set(split["degradation_seeds"].values())) == 3
    item = datasets["val"][0]
    assert set(item) == {"hd", "noisy", "item_id"} and item["noisy"].shape == (1, 16, 32, 16)
    assert not torch.equal(item["noisy"][:, :, 4:28], item["hd"][:, :, 4:28])
    # Padded (H 24 -> 32) after the degradation, like the target: no noise in the padding.
    assert torch.all(item["noisy"][:, :, :4] == -1) and torch.all(item["noisy"][:, :, 28:] == -1)
    # The same subject in another run: the same degraded volume.
    again = build_datasets(cfg, tmp_path / "again", seed=5)
    volumes = {i: again[n][p]["noisy"] for n in again for p, i in enumerate(again[n].item_ids)}
    assert torch.equal(volumes[item["item_id"]], item["noisy"])


# ---------------------------------------------------------------------------------------------------------
# 4. Random patches


def coordinate_batch(batch_size: int = 4, shape=(10, 12, 14)) -> dict:
    """hd[b, 0, d, h, w] = b * 1e6 + d * 1e4 + h * 100 + w; ld = hd + 0.5; seg the same code as integers."""
    b, d, h, w = torch.meshgrid(*(torch.arange(s) for s in (batch_size, *shape)), indexing="ij")
    code = (b * 1_000_000 + d * 10_000 + h * 100 + w)[:, None]
    return {"hd": code.double(), "ld": code.double() + 0.5, "seg": code.clone(),
            "item_id": [f"s{i}" for i in range(batch_size)], "class_dist": torch.ones(batch_size, 3)}


def patch_starts(patch: torch.Tensor, size) -> list[tuple[int, ...]]:
    """Each sample's patch start, after checking that the patch is the contiguous block of codes there."""
    starts = []
    for b in range(patch.shape[0]):
        corner = int(patch[b, 0, 0, 0, 0])
        sample, d0, h0, w0 = corner // 1_000_000, corner // 10_000 % 100, corner // 100 % 100, corner % 100
        assert sample == b
        d, h, w = torch.meshgrid(*(torch.arange(s) for s in size), indexing="ij")
        assert torch.equal(patch[b, 0].long(), corner + d * 10_000 + h * 100 + w)
        starts.append((d0, h0, w0))
    return starts


def test_random_patches_cut_every_key_at_one_place():
    batch, size = coordinate_batch(8), (4, 5, 6)
    torch.manual_seed(0)
    out = random_patches(batch, size, 0.0, "hd", -0.9)
    for key in ("hd", "ld", "seg"):
        assert out[key].shape == (8, 1, *size) and out[key].dtype == batch[key].dtype
    starts = patch_starts(out["hd"], size)
    assert patch_starts(out["seg"], size) == starts and torch.equal(out["ld"], out["hd"] + 0.5)
    assert all(0 <= s <= full - p for start in starts for s, full, p in zip(start, (10, 12, 14), size))
    assert len(set(starts)) > 1  # random places
    assert out["item_id"] == batch["item_id"] and out["class_dist"] is batch["class_dist"]
    assert batch["hd"].shape == (8, 1, 10, 12, 14)  # the batch itself is left alone
    torch.manual_seed(0)
    again = random_patches(batch, size, 0.0, "hd", -0.9)
    assert all(torch.equal(again[k], out[k]) for k in ("hd", "ld", "seg"))
    torch.manual_seed(1)
    assert patch_starts(random_patches(batch, size, 0.0, "hd", -0.9)["hd"], size) != starts
    # Whole volumes when the patch is the volume.
    assert random_patches(batch, (10, 12, 14), 1.0, "hd", -0.9)["hd"] is batch["hd"]
    # Every place is reachable, the last one included.
    places = set()
    for seed in range(200):
        torch.manual_seed(seed)
        places.update(patch_starts(random_patches(coordinate_batch(1, (3, 3, 3)), (2, 2, 2), 0.0, "hd", 0)["hd"],
                                   (2, 2, 2)))
    assert places == {(d, h, w) for d in (0, 1) for h in (0, 1) for w in (0, 1)}


@pytest.mark.parametrize("filter_mask", ["", "seg"])
def test_augment_centres_patches_on_foreground(filter_mask):
    """patch_foreground=1: each patch is centred on a foreground voxel (image above data.intensity_threshold, or
    data.filter_mask > 0), clamped inside the volume when that voxel lies near the border."""
    shape, size = (12, 16, 16), [4, 6, 8]
    cfg = DataConfig(dims=3, images=["hd", "ld"], masks=["seg"], volume_shape=list(shape), patch_size=size,
                     patch_foreground=1.0, flip_prob=0.0, filter_mask=filter_mask)
    coords = coordinate_batch(6, shape)
    batch = {"hd": torch.full((6, 1, *shape), -1.0), "seg": torch.zeros((6, 1, *shape), dtype=torch.int64),
             "ld": coords["hd"].float(), "item_id": coords["item_id"]}
    interior = [(5, 7, 9), (2, 3, 4), (9, 12, 11), (6, 8, 8)]
    border = [(0, 0, 0), (11, 15, 15)]
    for b, voxel in enumerate(interior + border):
        batch["hd" if not filter_mask else "seg"][(b, 0, *voxel)] = 1
    if filter_mask:  # the image's own foreground is elsewhere and must be ignored
        batch["hd"][:, :, 0, 0, :] = 1.0
    for seed in range(3):
        torch.manual_seed(seed)
        out = augment(batch, cfg)
        key = "seg" if filter_mask else "hd"
        assert out["hd"].shape == out["seg"].shape == out["ld"].shape == (6, 1, *size)
        for b, voxel in enumerate(interior):
            assert out[key][(b, 0, *(p // 2 for p in size))] == 1  # at the patch centre
            start = tuple(v - p // 2 for v, p in zip(voxel, size))
            assert patch_starts(out["ld"], size)[b] == start
        for b in range(len(interior), 6):
            assert int((out[key][b] == 1).sum()) == 1  # clamped, still inside
        torch.manual_seed(seed)
        assert torch.equal(augment(batch, cfg)["ld"], out["ld"])


def test_augment_flips_after_the_patch_keep_keys_aligned():
    cfg = DataConfig(dims=3, images=["hd", "ld"], masks=["seg"], volume_shape=[10, 12, 14], patch_size=[4, 6, 6],
                     patch_foreground=0.0, flip_prob=0.5)
    batch = coordinate_batch(16)
    torch.manual_seed(0)
    out = augment(batch, cfg)
    assert out["hd"].shape == (16, 1, 4, 6, 6)
    assert torch.equal(out["ld"], out["hd"] + 0.5) and torch.equal(out["seg"], out["hd"].long())
    flipped = out["hd"][:, 0, 0, 0, 0] > out["hd"][:, 0, 0, 0, -1]
    assert 0 < int(flipped.sum()) < 16
    # Without data.patch_size: whole items.
    whole = augment(batch, DataConfig(dims=3, volume_shape=[10, 12, 14], flip_prob=0.0))
    assert whole["hd"].shape == batch["hd"].shape


def test_volumes_that_cannot_make_items_are_refused(ct_demo_root, tmp_path):
    _flat(tmp_path / "flat", (64, 64))
    with pytest.raises(ConfigError, match=r"expected a 3D volume, got shape \(64, 64\) in sub-0/hd\.nii\.gz"):
        SubjectVolumes(DataConfig(root=str(tmp_path / "flat"), dims=3, images=["hd"], volume_shape=[1, 64, 64]))
    # One subject: 48 slices leave no training run of 32 next to a held-out slab of 32.
    with pytest.raises(ConfigError, match=r"the train split has no run of data\.volume_shape\[0\]=32"):
        build_datasets(ct_cfg(ct_demo_root, volume_shape=[32, SIDE, SIDE]), tmp_path / "run", seed=0)


# ---------------------------------------------------------------------------------------------------------
# 5. Bad volumes and 3D settings through train_diffusion.py


def base_config(run_dir: Path, root: Path) -> dict:
    """A tiny 3D ld -> hd run on the synthetic subjects (it never gets to train)."""
    return {
        "run": {"output_dir": str(run_dir), "seed": 0, "log_level": "WARNING"},  # stderr: only the error
        "data": {"kind": "nifti", "dims": 3, "root": str(root), "images": ["hd", "ld"], "masks": [],
                 "normalization": "ct", "ct_window": CT_WINDOW, "volume_shape": [16, 24, 16],
                 "patch_size": [8, 8, 8], "val_fraction": 0.34, "flip_prob": 0.0},
        "model": {"block_out_channels": [8, 16], "attention_levels": [False, False], "attention_head_dim": 8,
                  "norm_num_groups": 8},
        "task": {"targets": ["hd"], "spatial_conditions": ["ld"]},
        "training": {"max_steps": 2, "batch_size": 2, "lr_warmup_steps": 0, "checkpoint_every": 1},
        "validation": {"every": 1, "sample_every": 2, "num_samples": 1, "sampling_steps": 2},
        "eval": {"sampling_steps": 2},
        "logging": {"trackers": ["csv"]},
    }


def _shrink(root: Path) -> None:  # one subject's volumes shorter than data.patch_size along D (axial = z)
    for name in ("hd", "ld"):
        save_nifti(root / "sub-1" / f"{name}.nii.gz", synthetic_subject(1, (20, 24, 6))[name])


def _ld_shape(root: Path) -> None:
    save_nifti(root / "sub-2" / "ld.nii.gz", synthetic_subject(2, (20, 24, 17))["ld"])


def _ld_affine(root: Path) -> None:
    affine = np.eye(4)
    affine[:3, 3] = [0.0, 3.0, 0.0]  # shifted by 3 mm
    save_nifti(root / "sub-2" / "ld.nii.gz", synthetic_subject(2)["ld"], affine)


def _flat(root: Path, shape=(64, 64, 1)) -> None:  # a 2D image saved as a NIfTI file
    for name in ("hd", "ld"):
        save_nifti(root / "sub-0" / f"{name}.nii.gz", np.linspace(0, 900, 64 * 64, dtype=np.float32).reshape(shape))


# case -> (change to the data, changes to the config, what the error line must name, whether it is a data error)
CASES = {
    "volume-smaller-than-patch": (_shrink, {}, "sub-1/hd.nii.gz", True),
    "ld-shape-differs": (_ld_shape, {}, "sub-2/ld.nii.gz", True),
    "ld-affine-differs": (_ld_affine, {}, "sub-2/ld.nii.gz", True),
    "2d-file": (_flat, {}, "sub-0/hd.nii.gz", True),
    "patch-larger-than-volume": (None, {"patch_size": [8, 32, 8]}, "data.patch_size", False),
    "volume-shape-not-halvable": (None, {"volume_shape": [18, 48, 48], "patch_size": [],
                                         "model.block_out_channels": [8, 16, 32],
                                         "model.attention_levels": [False, False, False]},
                                  "data.volume_shape", False),
    "unknown-degrade-kind": (None, {"degrade": {"kind": "blur", "name": "noisy"}}, "data.degrade.kind", False),
    "degrade-name-is-an-image": (None, {"images": ["hd"], "degrade": {"kind": "low_resolution", "name": "hd"}},
                                 "data.degrade.name", False),
}


def _run_case(case: str, tmp: Path):
    change, settings, _, _ = CASES[case]
    write_subjects(tmp / "data")
    if change is not None:
        change(tmp / "data")
    config = base_config(tmp / "run", tmp / "data")
    for key, value in settings.items():
        section, name = key.split(".") if "." in key else ("data", key)
        config[section][name] = value
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return run_script("train_diffusion.py", ["--config", str(tmp / "config.yaml")], timeout=300)


@pytest.fixture(scope="module", autouse=True)
def outcomes(request, tmp_path_factory):
    """The selected cases, started in the background when the module starts so that they (mostly imports) overlap
    the tests above: case -> (future of the finished process, its folder)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and item.originalname == "test_bad_volume_input_is_one_error_line"]
    folders = {case: tmp_path_factory.mktemp(case) for case in selected}
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        yield {case: (pool.submit(_run_case, case, folders[case]), folders[case]) for case in selected}


@pytest.mark.parametrize("case", CASES)
def test_bad_volume_input_is_one_error_line(outcomes, case):
    future, tmp = outcomes[case]
    result = future.result()
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert CASES[case][2] in lines[0], lines[0]
    if case == "volume-shape-not-halvable":
        assert "model.block_out_channels" in lines[0]
    if case == "degrade-name-is-an-image":
        assert "data.images" in lines[0]
    if CASES[case][3]:  # refused while reading the data: before any split or training
        assert (tmp / "run" / "config.yaml").is_file()
        assert not any((tmp / "run" / name).exists() for name in ("split.json", "checkpoints", "metrics.csv"))
    else:  # refused with the config, before anything is written
        assert not (tmp / "run").exists()
