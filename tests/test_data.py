"""data/: NIfTI slices, splits, demo data and flips, on the MNI152 template (nilearn) and nibabel's test files."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path as NIBABEL_DATA
from torch.utils.data import DataLoader, default_collate

from data import SliceDataset, build_datasets, build_mni152_demo, load_slice_dataset, random_flip
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

IMAGE_SIZE = 32


def make_cfg(root: Path, **overrides) -> DataConfig:
    settings = dict(root=str(root), images=["t1"], masks=["seg"], mask_classes={"seg": 3}, image_size=IMAGE_SIZE)
    settings.update(overrides)
    return DataConfig(**settings)


def save(path: Path, data: np.ndarray, affine: np.ndarray, endianness: str = "<") -> Path:
    """Write a NIfTI file with the array's dtype and the given byte order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine, header=nib.Nifti1Header(endianness=endianness))
    image.set_data_dtype(data.dtype.newbyteorder("="))
    nib.save(image, path)
    return path


def write_subject(root: Path, subject: str, t1: np.ndarray, seg: np.ndarray | None, affine: np.ndarray,
                  suffix: str = ".nii") -> None:
    save(root / subject / f"t1{suffix}", t1, affine)
    if seg is not None:
        save(root / subject / f"seg{suffix}", seg, affine)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo_mni152"
    build_mni152_demo(root)
    return root


@pytest.fixture(scope="session")
def mni(demo_root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1 float32, seg uint8, affine) of the MNI152 demo subject (RAS, 2 mm)."""
    t1 = nib.load(demo_root / "mni152" / "t1.nii.gz")
    seg = nib.load(demo_root / "mni152" / "seg.nii.gz")
    return t1.get_fdata(dtype=np.float32), np.asarray(seg.dataobj).astype(np.uint8), t1.affine


@pytest.fixture(scope="session")
def small(mni) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48x56x20 crop, off the midline because the template is left-right symmetric: fast to read."""
    t1, seg, affine = mni
    crop = (slice(20, 68), slice(30, 86), slice(40, 60))
    return t1[crop].copy(), seg[crop].copy(), affine


@pytest.fixture(scope="session")
def multi_root(tmp_path_factory, mni) -> Path:
    """Six subjects made from the template (40 axial slices): shifted, cropped, rescaled, .nii and .nii.gz."""
    t1, seg, affine = mni[0][:, :, 25:65].copy(), mni[1][:, :, 25:65].copy(), mni[2]
    root = tmp_path_factory.mktemp("multi") / "data"
    variants = {
        "sub-01": (t1, seg),
        "sub-02": (np.roll(t1, 4, axis=0), np.roll(seg, 4, axis=0)),
        "sub-03": (np.roll(t1, -3, axis=0) ** 1.5, np.roll(seg, -3, axis=0)),
        "sub-04": (t1[5:-5, 8:-8, 4:].copy(), seg[5:-5, 8:-8, 4:].copy()),
        "sub-05": (np.roll(t1, -6, axis=1), np.roll(seg, -6, axis=1)),
        "sub-06": (t1 * 3.0 + 0.5 * (t1 > 0), seg),
    }
    for subject, (image, mask) in variants.items():
        write_subject(root, subject, image, mask, affine, ".nii.gz" if subject == "sub-06" else ".nii")
    return root


@pytest.fixture(scope="session")
def demo_sets(tmp_path_factory, demo_root) -> dict[str, SliceDataset]:
    return build_datasets(make_cfg(demo_root), tmp_path_factory.mktemp("run"), seed=0)


# ---------------------------------------------------------------------------------------------------------
# Demo data and items


def test_demo_files_and_labels(demo_root, mni):
    t1, seg, affine = mni
    assert t1.shape == seg.shape == (99, 117, 95)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert set(np.unique(seg)) == {0, 1, 2}
    # Grey and white matter are each a sizeable part of the brain.
    assert 0.05 < (seg == 1).mean() < 0.3 and 0.05 < (seg == 2).mean() < 0.3
    assert [p.name for p in demo_root.parent.iterdir()] == [demo_root.name]  # no temp folder left


def test_demo_is_built_when_root_is_missing(tmp_path):
    root = tmp_path / "fresh" / "demo_mni152"  # the demo builds only into a folder of its own name
    datasets = build_datasets(make_cfg(root, demo="mni152"), tmp_path / "run", seed=0)
    assert (root / "mni152" / "t1.nii.gz").is_file() and (root / "mni152" / "seg.nii.gz").is_file()
    assert len(datasets["train"]) > 0 and sorted(p.name for p in root.parent.iterdir()) == ["demo_mni152"]


def test_items_shapes_dtypes_ranges(demo_sets):
    train = demo_sets["train"]
    assert set(demo_sets) == {"train", "val"}
    item = train[0]
    assert set(item) == {"t1", "seg", "item_id"}
    assert item["t1"].shape == item["seg"].shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert item["t1"].dtype == torch.float32 and item["seg"].dtype == torch.int64
    images = torch.stack([train[i]["t1"] for i in range(len(train))])
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() > 0.99  # the full range is used
    labels = torch.stack([train[i]["seg"] for i in range(len(train))])
    assert set(labels.unique().tolist()) == {0, 1, 2}
    assert all(re.fullmatch(r"mni152/z\d{3}", i) for i in train.item_ids)
    assert train.data_range == 2.0 and train.image_names == ["t1"] and train.mask_names == ["seg"]
    record = json.loads(json.dumps(train.normalization))
    assert record["method"] == "mri_percentile" and record["data_range"] == 2.0
    low, high = train.clip_values["mni152"]["t1"]
    assert 0 < low < high < 1.0  # the template's intensities lie in (0, 1]


def test_default_collate_works_without_the_files(tmp_path, multi_root):
    """Everything is decoded once at construction: deleting the files does not disturb iteration."""
    root = tmp_path / "copy"
    shutil.copytree(multi_root, root)
    train = build_datasets(make_cfg(root), tmp_path / "run", seed=1)["train"]
    shutil.rmtree(root)
    batch = next(iter(DataLoader(train, batch_size=8, shuffle=True)))
    assert batch["t1"].shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE) and batch["t1"].dtype == torch.float32
    assert batch["seg"].shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE) and batch["seg"].dtype == torch.int64
    assert len(batch["item_id"]) == 8 and all(isinstance(i, str) for i in batch["item_id"])


def test_labels_and_orientation_are_preserved(tmp_path, demo_root, mni):
    """Without resizing, slice z045 is the radiological view of the volume: np.fliplr(np.rot90(.)), padded."""
    t1, seg, affine = mni
    marked = seg.copy()
    marked[70:80, 80:90, 40:50] = 3  # a marker in the patient's right (high x in RAS), anterior (high y)
    write_subject(tmp_path, "s1", t1, marked, affine)
    dataset = load_slice_dataset(make_cfg(tmp_path, image_size=128, resize=False, mask_classes={"seg": 4}))
    item = dataset[dataset.item_ids.index("s1/z045")]
    view = np.fliplr(np.rot90(marked[:, :, 45]))  # (117, 99)
    expected = np.zeros((128, 128), np.int64)
    expected[5:5 + 117, 14:14 + 99] = view
    assert np.array_equal(item["seg"][0].numpy(), expected)
    rows, columns = np.nonzero(item["seg"][0].numpy() == 3)
    assert rows.max() < 64 and columns.max() < 64  # anterior at the top, patient's right on the viewer's left
    image = item["t1"][0].numpy()
    assert np.all(image[:5] == -1.0) and np.all(image[:, :14] == -1.0)  # padded with the image minimum
    # Intensities keep their order: grey matter darker than white matter in T1.
    inside = image[5:122, 14:113]
    assert inside[view == 1].mean() < inside[view == 2].mean()
    # With resizing, labels stay labels and keep their proportions.
    labels = load_slice_dataset(make_cfg(demo_root, min_foreground=0.0)).arrays["seg"]
    assert set(labels.unique().tolist()) == {0, 1, 2}
    for label in (1, 2):
        share = (labels == label).sum() / (labels > 0).sum()
        assert abs(share - (seg == label).sum() / (seg > 0).sum()) < 0.03


@pytest.mark.parametrize("axis, letter, count", [(0, "x", 99), (1, "y", 117)])
def test_slice_axis_letters(demo_root, axis, letter, count):
    dataset = load_slice_dataset(make_cfg(demo_root, slice_axis=axis, min_foreground=0.0))
    assert len(dataset) == count and dataset.item_ids[7] == f"mni152/{letter}007"


def test_msd_dataset_json(tmp_path, small):
    t1, seg, affine = small
    for name, shift in (("brain_a", 0), ("brain_b", 3)):
        save(tmp_path / "imagesTr" / f"{name}.nii.gz", np.roll(t1, shift, 0), affine)
        save(tmp_path / "labelsTr" / f"{name}.nii.gz", np.roll(seg, shift, 0), affine)
    entries = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("brain_a", "brain_b")]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
    datasets = build_datasets(make_cfg(tmp_path, images=["image"], masks=["label"], mask_classes={"label": 3}),
                              tmp_path / "run", seed=0)
    assert {datasets["train"].subject_ids[0], datasets["val"].subject_ids[0]} == {"brain_a", "brain_b"}
    assert datasets["train"][0]["label"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------
# Splits


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_split_by_subject_is_disjoint_and_reproducible(tmp_path, multi_root):
    cfg = make_cfg(multi_root, val_fraction=0.34, test_fraction=0.17)
    datasets = build_datasets(cfg, tmp_path / "a", seed=3)
    split = read_json(tmp_path / "a" / "split.json")
    assert split["unit"] == "subject" and split["seed"] == 3
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (3, 2, 1)
    subjects = {name: set(datasets[name].subject_ids) for name in ("train", "val", "test")}
    assert subjects == {name: set(split[name]) for name in ("train", "val", "test")}
    assert set().union(*subjects.values()) == {f"sub-0{i}" for i in range(1, 7)}
    assert sum(len(s) for s in subjects.values()) == 6  # no subject in two splits
    again = build_datasets(cfg, tmp_path / "b", seed=3)
    assert read_json(tmp_path / "b" / "split.json") == split
    assert all(again[n].item_ids == datasets[n].item_ids for n in datasets)
    assert all(torch.equal(again[n].arrays["t1"], datasets[n].arrays["t1"]) for n in datasets)
    # Other processes compute the same split without touching the file.
    worker = build_datasets(cfg, tmp_path / "c", seed=3, is_main_process=False)
    assert not (tmp_path / "c" / "split.json").exists()
    assert all(worker[n].item_ids == datasets[n].item_ids for n in datasets)


def test_single_subject_slab_split_leaves_a_gap(tmp_path, demo_root):
    logger = get_logger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        datasets = build_datasets(make_cfg(demo_root, slab_gap=3, test_fraction=0.15), tmp_path, seed=5)
    finally:
        logger.removeHandler(handler)
    split = read_json(tmp_path / "split.json")
    assert split["unit"] == "slice" and "slab" in split["note"]
    assert any(r.levelno == logging.WARNING and "slab" in r.getMessage() for r in records)
    index = {name: [int(i.split("/z")[1]) for i in split[name]] for name in ("train", "val", "test")}
    for held_out in ("val", "test"):
        slab = index[held_out]
        assert slab and slab == list(range(slab[0], slab[-1] + 1))  # contiguous
        assert min(abs(t - v) for t in index["train"] for v in slab) > 3  # the gap
    assert len(split["excluded_gap"]) == 2 * 3 * 2
    kept = load_slice_dataset(make_cfg(demo_root)).item_ids
    assert sorted(split["train"] + split["val"] + split["test"] + split["excluded_gap"]) == sorted(kept)
    assert datasets["val"].item_ids == split["val"] and datasets["test"].item_ids == split["test"]


def test_split_json_is_reused_and_validated(tmp_path, multi_root):
    cfg = make_cfg(multi_root)
    build_datasets(cfg, tmp_path, seed=0)
    path = tmp_path / "split.json"
    split = read_json(path)
    moved = split["train"].pop()
    split["val"].append(moved)
    path.write_text(json.dumps(split))
    datasets = build_datasets(cfg, tmp_path, seed=123)  # the file wins over the seed
    assert set(datasets["val"].subject_ids) == set(split["val"]) and moved in datasets["val"].subject_ids
    assert moved not in datasets["train"].subject_ids

    split["train"].append("sub-99")
    path.write_text(json.dumps(split))
    with pytest.raises(ConfigError, match=r"sub-99.*split\.json"):
        build_datasets(cfg, tmp_path, seed=0)

    split["train"].remove("sub-99")
    split["train"] += split["val"]
    split["val"] = []
    path.write_text(json.dumps(split))
    with pytest.raises(ConfigError, match=r"val split is empty.*split\.json"):
        build_datasets(cfg, tmp_path, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one-line ConfigError naming the file or key


def case_missing_root(root, small):
    return make_cfg(root / "nowhere"), r"data\.root.*nowhere"


def case_missing_modality(root, small):
    t1, _, affine = small
    write_subject(root, "sub-01", t1, None, affine)
    return make_cfg(root), re.escape(str(root / "sub-01" / "seg.nii.gz"))


def case_truncated_gz(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine, ".nii.gz")
    path = root / "sub-01" / "t1.nii.gz"
    path.write_bytes(path.read_bytes()[:2000])  # the header is intact, the data stream is cut
    return make_cfg(root), r"cannot read .*sub-01/t1\.nii\.gz"


def case_corrupt_gz(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine, ".nii.gz")
    path = root / "sub-01" / "seg.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # zeroed bytes inside the deflate stream
    path.write_bytes(bytes(raw))
    return make_cfg(root), r"cannot read .*sub-01/seg\.nii\.gz"


def case_truncated_nii(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine)
    path = root / "sub-01" / "t1.nii"
    path.write_bytes(path.read_bytes()[:-100])
    return make_cfg(root), r"cannot read .*sub-01/t1\.nii"


def case_mask_shape(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-007", t1, seg[:, :, :-1].copy(), affine, ".nii.gz")
    return make_cfg(root), re.escape("mask shape (48, 56, 19) != image shape (48, 56, 20) in sub-007/seg.nii.gz")


def case_mask_affine(root, small):
    t1, seg, affine = small
    shifted = affine.copy()
    shifted[:3, 3] += [2.0, 0.0, 0.0]  # the same shape, one voxel to the side
    save(root / "sub-01" / "t1.nii.gz", t1, affine)
    save(root / "sub-01" / "seg.nii.gz", seg, shifted)
    return make_cfg(root), r"affine of sub-01/seg\.nii\.gz differs from that of sub-01/t1\.nii\.gz by up to 2 mm"


def case_4d(root, small):
    (root / "sub-01").mkdir(parents=True)
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", root / "sub-01" / "t1.nii.gz")
    return make_cfg(root, masks=[], mask_classes={}), r"3D.*\(128, 96, 24, 2\) in sub-01/t1\.nii\.gz"


def case_nan(root, small):
    t1, seg, affine = small
    t1 = t1.copy()
    t1[10, 10, 10] = np.nan
    t1[11, 10, 10] = np.inf
    write_subject(root, "sub-01", t1, seg, affine)
    return make_cfg(root), r"NaN or Inf in sub-01/t1\.nii"


def case_label_too_large(root, small):
    t1, seg, affine = small
    seg = seg.copy()
    seg[20, 20, 5] = 5
    write_subject(root, "sub-01", t1, seg, affine)
    return make_cfg(root), r"label 5 >= data\.mask_classes 3 in sub-01/seg\.nii"


def case_filtered_empty(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine)
    return make_cfg(root, min_foreground=1.0), r"data\.min_foreground.*data\.intensity_threshold"


def case_mask_filtered_empty(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine)
    return make_cfg(root, filter_mask="seg", min_foreground=0.99), r"data\.min_foreground.*data\.filter_mask"


def case_empty_train(root, small):
    t1, seg, affine = small
    write_subject(root, "sub-01", t1, seg, affine)
    write_subject(root, "sub-02", t1[::-1].copy(), seg, affine)
    return make_cfg(root, val_fraction=0.8), r"data\.val_fraction.*no training subject"


def case_unknown_filter_mask(root, small):
    return make_cfg(root, filter_mask="brain"), r"data\.filter_mask 'brain'"


def case_msd_missing_label(root, small):
    t1, _, affine = small
    save(root / "imagesTr" / "a.nii.gz", t1, affine)
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz"}]}))
    return make_cfg(root), r"dataset\.json has no 'label'"


@pytest.mark.parametrize("case", [value for name, value in sorted(globals().items()) if name.startswith("case_")],
                         ids=lambda case: case.__name__[5:])
def test_bad_input_raises_config_error(tmp_path, small, case):
    root = tmp_path / "data"
    root.mkdir()
    cfg, pattern = case(root, small)
    with pytest.raises(ConfigError, match=pattern) as error:
        build_datasets(cfg, tmp_path / "run", seed=0)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "split.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Odd but valid input


def assert_same_tensors(a: SliceDataset, b: SliceDataset) -> None:
    assert a.item_ids == b.item_ids
    assert set(a.arrays) == set(b.arrays)
    assert all(torch.equal(a.arrays[name], b.arrays[name]) for name in a.arrays)


def test_big_endian_int16_las_file_matches_its_ras_float_copy(tmp_path):
    """nibabel's anatomical.nii is big-endian int16 in LAS; a native float32 RAS copy gives the same slices."""
    original = nib.load(NIBABEL_DATA / "anatomical.nii")
    assert original.get_data_dtype() == np.dtype(">i2") and nib.aff2axcodes(original.affine) == ("L", "A", "S")
    (tmp_path / "las" / "s1").mkdir(parents=True)
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "las" / "s1" / "t1.nii")
    canonical = nib.as_closest_canonical(original)
    save(tmp_path / "ras" / "s1" / "t1.nii.gz", canonical.get_fdata(dtype=np.float32), canonical.affine)
    for axis in (0, 2):
        settings = dict(masks=[], mask_classes={}, slice_axis=axis, min_foreground=0.2)
        las = load_slice_dataset(make_cfg(tmp_path / "las", **settings))
        ras = load_slice_dataset(make_cfg(tmp_path / "ras", **settings))
        assert len(las) > 5
        assert_same_tensors(las, ras)


def test_lps_and_permuted_affines_match_ras(tmp_path, small):
    t1, seg, affine = small
    write_subject(tmp_path / "ras", "s1", t1, seg, affine)
    ras_image = nib.Nifti1Image(t1, affine)
    ras_seg = nib.Nifti1Image(seg, affine)
    for codes in (("L", "P", "S"), ("S", "L", "P")):
        transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                    nib.orientations.axcodes2ornt(codes))
        image, mask = ras_image.as_reoriented(transform), ras_seg.as_reoriented(transform)
        assert nib.aff2axcodes(image.affine) == codes
        folder = tmp_path / "".join(codes)
        write_subject(folder, "s1", np.asarray(image.dataobj), np.asarray(mask.dataobj), image.affine)
        cfg = dict(min_foreground=0.1)
        assert_same_tensors(load_slice_dataset(make_cfg(folder, **cfg)),
                            load_slice_dataset(make_cfg(tmp_path / "ras", **cfg)))


def test_mask_in_another_orientation_on_the_same_grid_is_accepted(tmp_path, small):
    """Affines are compared after reorientation to RAS, with a tolerance for float32 header round-off."""
    t1, seg, affine = small
    write_subject(tmp_path / "ras", "s1", t1, seg, affine)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(("L", "P", "S")))
    mask = nib.Nifti1Image(seg, affine).as_reoriented(transform)
    jittered = mask.affine.copy()
    jittered[:3, 3] += 1e-5
    save(tmp_path / "mixed" / "s1" / "t1.nii", t1, affine)
    save(tmp_path / "mixed" / "s1" / "seg.nii", np.asarray(mask.dataobj), jittered)
    assert_same_tensors(load_slice_dataset(make_cfg(tmp_path / "mixed")),
                        load_slice_dataset(make_cfg(tmp_path / "ras")))


def test_big_endian_float_and_int16_ct(tmp_path, small):
    t1, seg, affine = small
    hounsfield = np.round(t1 / t1.max() * 1800 - 1000).astype(np.int16)  # CT-like, stored as int16
    save(tmp_path / "int16" / "s1" / "ct.nii", hounsfield, affine)
    save(tmp_path / "big" / "s1" / "ct.nii", hounsfield.astype(np.float32), affine, endianness=">")
    assert nib.load(tmp_path / "big" / "s1" / "ct.nii").get_data_dtype() == np.dtype(">f4")
    settings = dict(images=["ct"], masks=[], mask_classes={}, normalization="ct", ct_window=[-1000.0, 800.0])
    from_int = load_slice_dataset(make_cfg(tmp_path / "int16", **settings))
    from_big = load_slice_dataset(make_cfg(tmp_path / "big", **settings))
    assert_same_tensors(from_int, from_big)
    assert from_int.arrays["ct"].min() == -1.0 and from_int.arrays["ct"].max() > 0.95
    assert from_int.normalization["method"] == "ct_window"


def test_anisotropic_volume_is_resampled_to_spacing(tmp_path, mni):
    t1, seg, affine = mni
    thick = affine.copy()
    thick[:3, 2] *= 2  # 4 mm slices
    write_subject(tmp_path / "thick", "s1", t1[:, :, ::2].copy(), seg[:, :, ::2].copy(), thick)
    write_subject(tmp_path / "fine", "s1", t1, seg, affine)
    native = load_slice_dataset(make_cfg(tmp_path / "thick", min_foreground=0.0))
    resampled = load_slice_dataset(make_cfg(tmp_path / "thick", min_foreground=0.0, spacing=[2.0, 2.0, 2.0]))
    fine = load_slice_dataset(make_cfg(tmp_path / "fine", min_foreground=0.0))
    assert len(native) == 48 and len(resampled) == 96 and len(fine) == 95
    # Resampled slice j lies 1 mm from template slice j (voxel edges, not centres, are aligned).
    for j in (30, 50, 70):
        difference = (resampled[j]["t1"] - fine[j]["t1"]).abs().mean()
        assert difference < 0.1, (j, difference)
    assert set(resampled.arrays["seg"].unique().tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def test_random_flip_is_consistent_across_keys(multi_root):
    train = load_slice_dataset(make_cfg(multi_root))
    # Slices whose mask is not left-right symmetric, so that a flip is visible in both keys.
    chosen = [i for i in range(len(train)) if not torch.equal(train[i]["seg"], train[i]["seg"].flip(-1))][:16]
    batch = default_collate([train[i] for i in chosen])
    batch["label"] = torch.arange(16)  # a vector entry passes through
    torch.manual_seed(0)
    flipped = random_flip(batch, 0.5)
    torch.manual_seed(0)
    again = random_flip(batch, 0.5)
    assert torch.equal(flipped["t1"], again["t1"]) and torch.equal(flipped["seg"], again["seg"])  # seeded
    decisions = []
    for i in range(16):
        image_flipped = torch.equal(flipped["t1"][i], batch["t1"][i].flip(-1))
        mask_flipped = torch.equal(flipped["seg"][i], batch["seg"][i].flip(-1))
        assert image_flipped == mask_flipped
        assert image_flipped or (torch.equal(flipped["t1"][i], batch["t1"][i])
                                 and torch.equal(flipped["seg"][i], batch["seg"][i]))
        decisions.append(image_flipped)
    assert 0 < sum(decisions) < 16
    assert flipped["seg"].dtype == torch.int64 and flipped["item_id"] == batch["item_id"]
    assert torch.equal(flipped["label"], batch["label"])
    always = random_flip(batch, 1.0)
    assert torch.equal(always["t1"], batch["t1"].flip(-1)) and torch.equal(always["seg"], batch["seg"].flip(-1))
    never = random_flip(batch, 0.0)
    assert torch.equal(never["t1"], batch["t1"]) and torch.equal(never["seg"], batch["seg"])
