"""Low-dose CT restoration of volumes end to end at test size: configs/demo_3d.yaml trained for a few steps on the
real pseudo-CT demo, then evaluated on one and on two processes."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage.metrics import structural_similarity

import evaluate
import train_diffusion
from models.unet2d import load_denoiser
from models.unet3d import UNet3DModel
from tests.runs import REPO, run_script

# 6 mm voxels: the 2 mm demo becomes 33 x 39 x 32 (x, y, z); items are slabs of 8 axial slices of 32 x 32.
TINY_3D = [
    "data.spacing=[6,6,6]", "data.volume_shape=[8,32,32]", "data.patch_size=[8,16,16]", "data.val_fraction=0.2",
    "data.slab_gap=1", "model.block_out_channels=[8,16]", "model.attention_levels=[false,true]",
    "model.attention_head_dim=8", "model.norm_num_groups=4", "training.batch_size=2", "training.max_steps=4",
    "training.lr_warmup_steps=1", "training.checkpoint_every=2", "training.log_every=2", "validation.every=2",
    "validation.sample_every=4", "validation.sampling_steps=2", "validation.at_start=false",
    "logging.trackers=[csv]", "eval.sampling_steps=2", "eval.batch_size=1",
]
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


def read_per_item(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory, ct_demo_root):
    run = tmp_path_factory.mktemp("ct3d") / "run"
    train_diffusion.main(["--config", str(REPO / "configs/demo_3d.yaml"), f"run.output_dir={run}",
                          f"data.root={ct_demo_root}", *TINY_3D])
    return run


def test_training_writes_a_3d_run(run_3d):
    split = json.loads((run_3d / "split.json").read_text())
    assert split["unit"] == "slice" and len(split["val"]) % 8 == 0
    assert set(split["degradation_seeds"]) == {"mni152"}  # the seed the low-dose volume was simulated with
    names = {row["name"] for row in csv.DictReader((run_3d / "metrics.csv").open())}
    assert {"val/loss", "val/ssim", "val/psnr_3d", "val/input_ssim", "perf/data_wait_fraction"} <= names
    assert (run_3d / "samples" / "step-0000004.png").stat().st_size > 10_000  # orthogonal views
    assert json.loads((run_3d / "final" / "unet" / "config.json").read_text())["_class_name"] == "UNet3DModel"


def test_the_export_loads_with_the_project_class_and_reproduces_a_forward_pass(run_3d):
    unet = UNet3DModel.from_pretrained(run_3d / "final", subfolder="unet").eval()
    # final/ holds the EMA weights, which the last checkpoint saved as well.
    ema = load_file(run_3d / "checkpoints" / "checkpoint-4" / "ema.safetensors")
    reference = load_denoiser(run_3d / "final").eval()
    reference.load_state_dict(ema)
    x, t = torch.randn(1, 2, 8, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, reference.unet(x, t).sample)


def test_evaluation_on_one_and_two_processes_agree_and_scores_recompute(run_3d, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(run_3d, single)
    evaluate.main(["--run", str(single), "eval.hu_metrics=true", "eval.overwrite=true"])
    result = run_script("evaluate.py", ["--run", str(run_3d), "eval.hu_metrics=true", "eval.overwrite=true"],
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = ("eval", "final-euler2")  # eval.sampling_steps=2 of the rectified-flow Euler sampler
    one = read_per_item(single.joinpath(*folder, "per_item.csv"))
    two = read_per_item(run_3d.joinpath(*folder, "per_item.csv"))
    assert [r["item_id"] for r in one] == [r["item_id"] for r in two] and len(one) >= 1
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in set(a) - {"item_id"}:
            assert abs(float(a[key]) - float(b[key])) < 1e-4, (a["item_id"], key, a[key], b[key])
    assert {"ssim", "psnr", "mae", "psnr_3d", "mae_hu", "rmse_hu", "input_ssim", "input_psnr",
            "input_mae_hu"} <= set(one[0])
    assert "ssim_3d" not in one[0]  # 8-slice slabs are thinner than the 11-voxel SSIM window

    out = single.joinpath(*folder)
    report = json.loads((out / "report.json").read_text())
    window = report["settings"]["normalization"]["window_hu"]
    for row in one:
        name = row["item_id"].replace("/", "__")
        npz = np.load(out / "samples" / f"{name}.npz")
        gen, ref, cond = npz["generated"][0, 0], npz["reference"][0], npz["condition"][0]
        assert gen.shape == ref.shape == cond.shape == (8, 32, 32)
        data_range = float(npz["data_range"])

        def slice_wise_ssim(x):
            return np.mean([structural_similarity(x[d], ref[d], gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=data_range)
                            for d in range(ref.shape[0])])

        assert abs(slice_wise_ssim(gen) - float(row["ssim"])) < 1e-3
        assert abs(slice_wise_ssim(cond) - float(row["input_ssim"])) < 1e-3  # the degraded-input baseline
        assert abs(10 * np.log10(data_range ** 2 / np.square(gen - ref).mean()) - float(row["psnr_3d"])) < 1e-3
        hu_per_unit = (window[1] - window[0]) / data_range
        assert abs(np.abs(gen - ref).mean() * hu_per_unit - float(row["mae_hu"])) < 1e-3
        for view in ("montage", "orthogonal", "mip"):
            assert (out / "volumes" / f"{name}-{view}.png").stat().st_size > 10_000


def test_the_2d_ct_preset_restores_slices_with_the_same_degradation(tmp_path, ct_demo_root):
    run = tmp_path / "run"
    tiny = ["data.spacing=[4,4,4]", "data.image_size=32", "model.block_out_channels=[16,32]", "model.attention_levels=[false,true]",
            "model.attention_head_dim=16", "training.batch_size=4", "training.max_steps=2", "training.lr_warmup_steps=1",
            "training.checkpoint_every=2", "validation.every=2", "validation.sample_every=2", "validation.num_samples=2",
            "validation.sampling_steps=2", "validation.at_start=false", "logging.trackers=[csv]"]
    train_diffusion.main(["--config", str(REPO / "configs/demo_ct_2d.yaml"), f"run.output_dir={run}",
                          f"data.root={ct_demo_root}", *tiny])  # 4 mm: a quick low-dose simulation
    evaluate.main(["--run", str(run), "eval.num_items=3", "eval.sampling_steps=2"])
    rows = read_per_item(run / "eval" / "final-euler2" / "per_item.csv")
    assert len(rows) == 3 and {"ssim", "input_ssim", "mae_hu", "input_mae_hu"} <= set(rows[0])
    assert "ssim_3d" not in rows[0]  # slices are scored as images
    npz = np.load(run / "eval" / "final-euler2" / "samples" / f"{rows[0]['item_id'].replace('/', '__')}.npz")
    assert npz["condition"].shape == npz["reference"].shape == (1, 32, 32)
    # The low-dose input is noisier than its target but close to it: the pair is aligned.
    assert 0.01 < np.abs(npz["condition"] - npz["reference"]).mean() < 0.3
