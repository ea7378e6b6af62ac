"""data/demo.py: the MNI152 pseudo-CT demo (built for real, once per module), the shared temporary-folder
writer of the demo builders, and the other builders after that refactor."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import (load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template,
                              load_mni152_wm_template)

from data.demo import HU_AIR, _write_dataset, build_ihc_demo, build_mni152_ct_demo, build_mni152_demo

CT = Path("mni152") / "ct.nii.gz"


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct") / "ct_demo"
    build_mni152_ct_demo(root)
    return root


@pytest.fixture(scope="module")
def ct(ct_root) -> np.ndarray:
    return np.asarray(nib.load(ct_root / CT).dataobj)


@pytest.fixture(scope="module")
def maps() -> dict[str, np.ndarray]:
    return {"grey": load_mni152_gm_template(resolution=2).get_fdata(),
            "white": load_mni152_wm_template(resolution=2).get_fdata(),
            "brain": load_mni152_brain_mask(resolution=2).get_fdata() > 0.5}


def test_ct_file_grid_and_type(ct_root, ct):
    image = nib.load(ct_root / CT)
    template = load_mni152_template(resolution=2)
    # nilearn >= 0.10 ships the 2009 template: (99, 117, 95) at 2 mm (the 2 mm FSL grid was (91, 109, 91)).
    assert image.shape == template.shape == (99, 117, 95)
    assert image.get_data_dtype() == np.int16 and ct.dtype == np.int16
    assert np.array_equal(image.affine, template.affine)
    assert image.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
    assert sorted(p.name for p in ct_root.parent.iterdir()) == [ct_root.name]  # no temporary folder left


def test_ct_air_and_range(ct):
    corners = ct[np.ix_([0, -1], [0, -1], [0, -1])]
    assert (corners == HU_AIR).all()
    assert ct.min() == HU_AIR and ct.max() <= 1000
    assert (ct == HU_AIR).mean() > 0.5  # the head fills about a third of the field of view


def test_ct_brain_tissues(ct, maps):
    white = np.median(ct[maps["white"] > 0.9])
    grey = np.median(ct[maps["grey"] > 0.9])
    assert 15 <= white <= 35 and 30 <= grey <= 50 and grey > white


def test_ct_skull_lies_outside_the_brain(ct, maps):
    head = ct > -500
    bone = ct >= 500
    assert bone.sum() >= 0.01 * head.sum()
    assert not (bone & maps["brain"]).any()
    # The skull covers the brain: bone above the brain's top slice, and air beyond it.
    top = maps["brain"].any(axis=(0, 1)).nonzero()[0].max()
    assert bone[:, :, top + 1:].any() and (ct[:, :, top + 10:] == HU_AIR).all()


def test_ct_is_smooth_not_noisy(ct, maps):
    # Noise-free: deep white matter is nearly flat. Smoothed: more values than the tissue constants.
    assert ct[maps["white"] > 0.95].std() < 3
    assert len(np.unique(ct[ct > -500])) > 50


def test_ct_build_twice_is_a_no_op(ct_root):
    path = ct_root / CT
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    build_mni152_ct_demo(ct_root)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in ct_root.parent.iterdir()) == [ct_root.name]


def test_ct_build_with_a_stale_temporary_folder(tmp_path, ct_root):
    # A killed build's leftover (other pid) does not clash; it is left alone.
    stale = tmp_path / ".ct_demo.tmp-1-deadbeef"
    (stale / "mni152").mkdir(parents=True)
    (stale / "mni152" / "ct.nii.gz").write_bytes(b"half")
    root = tmp_path / "ct_demo"
    build_mni152_ct_demo(root)
    assert (root / CT).read_bytes() == (ct_root / CT).read_bytes()  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([stale.name, root.name])


def test_write_dataset_accepts_the_winner_and_cleans_up(tmp_path):
    root = tmp_path / "data"
    _write_dataset(root, {"a/x.txt": lambda p: p.write_text("one"), "done.txt": lambda p: p.write_text("")},
                   done_marker="done.txt")
    assert (root / "a" / "x.txt").read_text() == "one" and (root / "done.txt").is_file()
    # Another build finds `root` finished (it holds the marker): that copy is kept.
    _write_dataset(root, {"a/x.txt": lambda p: p.write_text("two"), "done.txt": lambda p: p.write_text("")},
                   done_marker="done.txt")
    assert (root / "a" / "x.txt").read_text() == "one"
    # `root` exists without the marker: the failed rename is raised, and the temporary folder removed anyway.
    other = tmp_path / "other"
    (other / "junk").mkdir(parents=True)
    with pytest.raises(OSError):
        _write_dataset(other, {"done.txt": lambda p: p.write_text("")}, done_marker="done.txt")
    # A writer that fails leaves nothing.
    with pytest.raises(RuntimeError):
        _write_dataset(tmp_path / "broken", {"done.txt": _fail}, done_marker="done.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other"]
    with pytest.raises(ValueError):
        _write_dataset(tmp_path / "x", {"a.txt": lambda p: p.write_text("")}, done_marker="b.txt")


def _fail(path: Path) -> None:
    path.write_text("half")
    raise RuntimeError("killed")


def test_other_demos_still_build(tmp_path):
    mni = tmp_path / "mni"
    build_mni152_demo(mni)
    assert sorted(os.listdir(mni / "mni152")) == ["seg.nii.gz", "t1.nii.gz"]
    assert nib.load(mni / "mni152" / "seg.nii.gz").get_data_dtype() == np.uint8
    ihc = tmp_path / "ihc"
    build_ihc_demo(ihc)
    assert sorted(os.listdir(ihc)) == sorted([f"ihc_q{i}{s}.png" for i in range(4) for s in ("", "_mask")]
                                             + ["ihc_extra.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ihc", "mni"]
