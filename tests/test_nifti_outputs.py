"""evaluate.py's NIfTI outputs (eval.save_nifti) on the real MNI152 demos: generated slices back on the scan's grid in
register with their references, 3D items and CT in HU; and its evaluation folders eval/<weights>-<sampler><steps>/."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to

import evaluate
import train_diffusion
from data import build_datasets
from data.nifti import (discover_subjects, fit_slices, from_slices, header_grid, load_slice_dataset,
                        load_subject_volumes, normalize_image, plane_shape, slice_index_of, to_slices)
from diffusion.task import Field
from tests.runs import tiny_args
from utils import config as config_lib
from utils.config import Config, ConfigError, DataConfig, resolve
from utils.eval_folder import evaluation_name
from utils.nifti_export import nifti_grids, write_nifti

# 4 mm voxels: a (50, 58, 48) grid unlike the source's, and axial slices of 58 x 50 centre padded to 64 (no resize),
# so the way back is exact and every voxel can be compared.
GRID = ["data.spacing=[4,4,4]", "data.resize=false", "data.image_size=64"]
EVAL = ["eval.num_items=4", "eval.batch_size=4", "eval.sampling_steps=2"]
FILES = ("generated_t1", "reference_t1", "std_t1", "condition_seg")


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("nifti") / "run"
    train_diffusion.main(tiny_args(run, demo_root, *GRID, "training.max_steps=2", "validation.every=2",
                                   "validation.sample_every=2", "training.checkpoint_every=2"))
    evaluate.main(["--run", str(run), *EVAL, "eval.samples_per_item=2", "eval.save_nifti=true"])
    return run


def cut(volume: np.ndarray, data: DataConfig, is_mask: bool = False) -> torch.Tensor:
    """The data pipeline's own way from a volume on the grid to (S, 1, image_size, image_size) slices."""
    return fit_slices(to_slices(torch.from_numpy(volume).float(), data.slice_axis), data.image_size, data.resize,
                      is_mask)


def read(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


def test_generated_slices_sit_on_the_scan_grid_where_their_references_are(run):
    cfg = resolve(run / "config.yaml", [])
    subject = discover_subjects(cfg.data)[0]
    volumes, clip_values, grid = load_subject_volumes(subject, cfg.data, Path(cfg.data.root))
    folder = run / "eval" / "final-euler2"
    files = {name: read(folder / "nifti" / subject.subject_id / f"{name}.nii.gz") for name in FILES}
    for name, (values, image) in files.items():
        assert values.shape == grid.shape == (50, 58, 48), name
        np.testing.assert_allclose(image.affine, grid.affine, atol=1e-4)  # the header stores float32
        assert image.header.get_xyzt_units()[0] == "mm"

    # The affine is the grid's on the scanner: resampling the source file through it gives the dataset's volume.
    source = nib.load(subject.files["t1"])
    through_affine = resample_from_to(source, (grid.shape, files["reference_t1"][1].affine), order=1)
    expected = normalize_image(through_affine.get_fdata(dtype=np.float32), cfg.data, "t1", clip_values["t1"])[0]
    np.testing.assert_allclose(expected, volumes["t1"].numpy(), atol=1e-4)

    ids = sorted(p.stem.replace("__", "/") for p in (folder / "samples").glob("*.npz"))
    indices = [slice_index_of(i) for i in ids]
    assert len(indices) == 4
    generated, reference, std, seg = (files[name][0] for name in FILES)
    scan = cut(np.ones(grid.shape, np.float32), cfg.data)[0] > 0  # the slice's pixels; the rest is padding
    for item_id, k in zip(ids, indices):
        npz = np.load(folder / "samples" / f"{item_id.replace('/', '__')}.npz")
        # Cut again by the pipeline, each file's slice k is the item's own array: the positions agree. (What the
        # model drew on the padding has no place in the scan.)
        assert torch.equal(cut(reference, cfg.data)[k], torch.from_numpy(npz["reference_t1"]))
        assert torch.equal(cut(generated, cfg.data)[k][scan], torch.from_numpy(npz["generated_t1"][0])[scan])
        assert torch.equal(cut(std, cfg.data)[k][scan], torch.from_numpy(npz["std_t1"])[scan])
        assert torch.equal(cut(seg, cfg.data, is_mask=True)[k].long(), torch.from_numpy(npz["condition_seg"]))
        # And the reference slice is the dataset's own volume at slice k, voxel for voxel.
        assert np.array_equal(reference[..., k], volumes["t1"][..., k].numpy())
        assert np.array_equal(seg[..., k], volumes["seg"][..., k].numpy())

    # Slices that were not evaluated are NaN (images) and 0 (masks); evaluated ones are complete.
    others = [k for k in range(grid.shape[2]) if k not in indices]
    for values in (generated, reference, std):
        assert np.isnan(values[..., others]).all() and np.isfinite(values[..., indices]).all()
    assert seg.dtype == np.uint8 and not seg[..., others].any()
    assert set(np.unique(seg[..., indices])) == {0, 1, 2}
    assert files["condition_seg"][1].header.get_intent()[0] == "label"
    assert -1 <= np.nanmin(generated) and np.nanmax(generated) <= 1 and np.nanmax(std) > 0


def test_resized_slices_keep_the_source_file_geometry(demo_root, tmp_path):
    # The demo's own layout: 117 x 99 axial slices padded to square and resized to 32 x 32, no resampling.
    data = DataConfig(root=str(demo_root), images=["t1"], masks=["seg"], mask_classes={"seg": 3}, image_size=32,
                      filter_mask="seg")
    dataset = load_slice_dataset(data)
    chosen = [dataset[i] for i in (0, len(dataset) // 2, len(dataset) - 1)]
    items = [{"item_id": it["item_id"], "generated": [{"t1": it["t1"].numpy()}], "reference": {"t1": it["t1"].numpy()},
              "condition": {"seg": it["seg"].numpy()}} for it in chosen]
    written = write_nifti(tmp_path, items, [Field("t1", "image", 1)], dataset.grids, data, dataset.normalization)
    assert sorted(p.name for p in written) == ["condition_seg.nii.gz", "generated_t1.nii.gz", "reference_t1.nii.gz"]
    source = nib.load(demo_root / "mni152" / "t1.nii.gz")  # already RAS: the grid is the file's own
    reference, image = read(tmp_path / "mni152" / "reference_t1.nii.gz")
    seg = read(tmp_path / "mni152" / "condition_seg.nii.gz")[0]
    assert reference.shape == source.shape and np.allclose(image.affine, source.affine, atol=1e-4)
    volumes, _, _ = load_subject_volumes(discover_subjects(data)[0], data, demo_root)
    for item in chosen:
        k = slice_index_of(item["item_id"])
        assert torch.equal(cut(seg, data, is_mask=True)[k].long(), item["seg"])  # nearest there and back: exact
        # Resized down and up again, the slice is a blurred copy of the scan's slice k, closer to it than to its
        # neighbours; the mask, by nearest neighbour, mostly the scan's own.
        truth = volumes["t1"].numpy()
        error = {d: np.abs(reference[..., k] - truth[..., k + d]).mean() for d in (-1, 0, 1) if 0 <= k + d < 95}
        assert all(error[0] < e for d, e in error.items() if d)
        assert np.corrcoef(reference[..., k].ravel(), truth[..., k].ravel())[0, 1] > 0.93
        labels = volumes["seg"].numpy()
        assert (seg[..., k] == labels[..., k]).mean() > max(0.85, (seg[..., k] == labels[:, ::-1, k]).mean())


def test_slices_go_back_along_every_axis(demo_root):
    data = DataConfig(root=str(demo_root))
    volume = load_subject_volumes(discover_subjects(data)[0], data, demo_root)[0]["t1"]  # (99, 117, 95)
    for axis in range(3):
        slices = to_slices(volume, axis)
        assert tuple(slices.shape[-2:]) == plane_shape(volume.shape, axis)
        assert torch.equal(from_slices(slices, axis)[0], volume), axis


def test_the_grid_from_headers_alone_is_the_decoded_one(demo_root, tmp_path):
    """Latent runs read the grid from the headers: the same as decoding gives, for a file stored in another
    orientation too."""
    source = nib.load(demo_root / "mni152" / "t1.nii.gz")
    turned = source.as_reoriented(nib.orientations.axcodes2ornt(("P", "L", "S")))  # axes swapped, two flipped
    (tmp_path / "sub-01").mkdir()
    nib.save(turned, tmp_path / "sub-01" / "t1.nii.gz")
    for spacing in (None, [3.0, 2.5, 4.0]):
        data = DataConfig(root=str(tmp_path), images=["t1"], spacing=spacing)
        subject = discover_subjects(data)[0]
        decoded = load_subject_volumes(subject, data, tmp_path)[2]
        from_header = header_grid(subject, data, tmp_path)
        assert from_header.shape == decoded.shape and np.allclose(from_header.affine, decoded.affine)
        if spacing is None:  # back on the RAS axes of the original file
            assert decoded.shape == source.shape and np.allclose(decoded.affine, source.affine)


def test_volumes_are_written_as_they_are_in_hu(ct_demo_root, tmp_path):
    """3D items of the pseudo-CT: a slab of one subject, and whole volumes of two (cropped to data.volume_shape),
    pasted on the grid without interpolation, in HU."""
    two = tmp_path / "two"
    for name in ("a", "b"):
        (two / name).mkdir(parents=True)
        (two / name / "ct.nii.gz").symlink_to(ct_demo_root / "mni152" / "ct.nii.gz")
    window = [-100.0, 150.0]
    for root, whole in ((ct_demo_root, False), (two, True)):
        data = DataConfig(root=str(root), dims=3, images=["ct"], normalization="ct", ct_window=window,
                          spacing=[4.0, 4.0, 4.0], volume_shape=[16, 48, 48], val_fraction=0.3, slab_gap=2)
        run = tmp_path / f"run-{root.name}"
        run.mkdir()
        held_out = build_datasets(data, run, seed=0)["val"]
        item = held_out[0]
        assert ("/" not in item["item_id"]) == whole  # "a", or a slab "mni152/z031-046"
        ct = item["ct"].numpy()
        items = [{"item_id": item["item_id"], "generated": [{"ct": ct}, {"ct": ct * 0.5}], "reference": {"ct": ct},
                  "condition": {}}]
        out = tmp_path / f"nifti-{root.name}"
        write_nifti(out, items, [Field("ct", "image", 1)], held_out.grids, data, held_out.normalization)
        subject = held_out.subject_ids[0]
        grid = held_out.grids[subject]
        reference, image = read(out / subject / "reference_ct.nii.gz")
        std = read(out / subject / "std_ct.nii.gz")[0]
        assert reference.shape == grid.shape == (50, 58, 48) and np.allclose(image.affine, grid.affine, atol=1e-4)
        volume = load_subject_volumes(discover_subjects(data)[0], data, root)[0]["ct"].numpy()
        hu = window[0] + (volume + 1) / 2 * (window[1] - window[0])
        kept = np.isfinite(reference)
        # Depth: the slab's 16 slices, or the whole volume's central 16 of 48; in-plane 58 x 50 cropped to 48 x 48.
        first = 16 if whole else int(item["item_id"].split("/z")[1].split("-")[0])
        expected = np.zeros(grid.shape, bool)
        expected[1:49, 5:53, first:first + 16] = True
        assert np.array_equal(kept, expected)
        np.testing.assert_allclose(reference[kept], hu[kept], atol=1e-3)
        assert window[0] <= reference[kept].min() and reference[kept].max() <= window[1]
        # The std of samples x and x / 2 is |x| / 4, in HU per normalised unit.
        np.testing.assert_allclose(std[kept], np.abs(volume[kept]) / 4 * (window[1] - window[0]) / 2, atol=1e-3)


def test_evaluations_sit_side_by_side_and_are_replaced_only_when_asked(run, capsys):
    first = run / "eval" / "final-euler2"
    evaluate.main(["--run", str(run), *EVAL[:2], "eval.sampling_steps=3"])
    second = run / "eval" / "final-euler3"
    assert (first / "report.json").is_file() and (first / "nifti").is_dir()  # the earlier evaluation stays
    assert json.loads((second / "report.json").read_text())["settings"]["sampling_steps"] == 3
    assert "files in `eval/final-euler3/`" in (run / "final" / "README.md").read_text()

    report = (second / "report.json").read_text()
    with pytest.raises(SystemExit) as refused:
        config_lib.run_main(lambda: evaluate.main(["--run", str(run), *EVAL[:2], "eval.sampling_steps=3"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert refused.value.code == 2 and len(errors) == 1
    assert str(second) in errors[0] and "eval.overwrite=true" in errors[0]
    assert (second / "report.json").read_text() == report

    evaluate.main(["--run", str(run), "eval.num_items=2", "eval.sampling_steps=3", "eval.overwrite=true"])
    assert json.loads((second / "report.json").read_text())["settings"]["num_items"] == 2
    assert len(list((second / "samples").glob("*.npz"))) == 2  # nothing left of the earlier evaluation


def test_folder_names_and_where_nifti_outputs_are_refused(run):
    assert evaluation_name("final", "ddim", 50) == "final-ddim50"
    assert evaluation_name("best-val_ssim", "dpm_solver", 10) == "best-val_ssim-dpm_solver10"
    assert evaluation_name(str(run / "checkpoints" / "checkpoint-2") + "/", "euler", 3) == "checkpoint-2-euler3"
    assert evaluation_name("final", "euler", 25, split="test") == "final-euler25-test"
    cfg = Config()
    with pytest.raises(ConfigError, match="unconditional.*eval.save_nifti=false"):
        nifti_grids(cfg, SimpleNamespace(is_conditional=False, vector=None), None)
    cfg.data.kind = "tiles"
    with pytest.raises(ConfigError, match="'tiles'.*eval.save_nifti=false"):
        nifti_grids(cfg, SimpleNamespace(is_conditional=True, vector=None), None)
