"""Low-dose -> high-dose CT in the latent space of a frozen 3D autoencoder, on the pseudo-CT demo: train_vae.py trains
a small 3D VQ autoencoder (PatchVolume architecture), encode_latents.py writes each image's own latent
(latent.encode_each) on one and on two processes with the codebook min/max scaling, then a UNet3D trains on the cache
and evaluate.py scores decoded samples, and the decoded low-dose input, in pixel space."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import encode_latents
import evaluate
import train_diffusion
import train_vae
from data.latent_cache import read_manifest
from models.autoencoder import FrozenAutoencoder
from models.patchvolume import PatchVolume
from tests.runs import REPO, read_metrics, run_script
from tests.test_vae3d import TINY_VAE3D

TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
# 6 mm voxels, slabs of 8 x 32 x 32 -> latents of 4 x 2 x 8 x 8 (the autoencoder halves each side twice).
LATENT_3D = [
    "data.kind=latent_cache", "latent.source_kind=nifti", "data.spacing=[6,6,6]", "data.volume_shape=[8,32,32]",
    "data.val_fraction=0.2", "data.slab_gap=1", "data.flip_prob=0", "latent.encode_each=[ct,ld]",
    "latent.scaling=codebook_minmax",
    "latent.shard_size=4", "latent.batch_size=2", "task.targets=[ct_latent]", "task.spatial_conditions=[ld_latent]",
    "model.block_out_channels=[8,16]", "model.attention_levels=[false,true]", "model.attention_head_dim=8",
    "model.norm_num_groups=4", "training.batch_size=2", "training.max_steps=2", "training.lr_warmup_steps=1",
    "training.checkpoint_every=2", "training.log_every=1", "validation.every=2", "validation.sample_every=2",
    "validation.sampling_steps=2", "validation.at_start=false", "logging.trackers=[csv]", "eval.sampling_steps=2",
    "eval.batch_size=1",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ct_demo_root):
    base = tmp_path_factory.mktemp("latent3d")
    train_vae.main(["--config", str(REPO / "configs/demo_vae3d.yaml"), f"run.output_dir={base / 'vae'}",
                    f"data.root={ct_demo_root}", *TINY_VAE3D, "vae.disc_weight=0"])
    args = ["--config", str(REPO / "configs/demo_3d.yaml"), f"data.root={ct_demo_root}",
            f"latent.autoencoder={base / 'vae' / 'final'}", *LATENT_3D]
    encode_latents.main([*args, f"latent.cache_dir={base / 'cache1'}"])
    return base, args


def test_each_image_gets_its_own_latent_and_two_processes_write_the_same_cache(setup):
    base, args = setup
    manifest = read_manifest(base / "cache1")
    assert set(manifest["fields"]) == {"ct_latent", "ld_latent"} and manifest["latent_shape"] == [4, 2, 8, 8]
    assert manifest["pixel_inputs"] == {"ct": 1, "ld": 1} and manifest["encoder"]["kind"] == "patchvolume"
    # 3D-MedDiffusion's normalisation: the trained codebook's range maps onto [-1, 1].
    codebook = FrozenAutoencoder.load(base / "vae" / "final").model.codebook.embeddings
    assert manifest["scaling"] == "codebook_minmax"
    assert (float(codebook.min()) - manifest["shift"]) * manifest["scale"] == pytest.approx(-1, abs=1e-6)
    assert (float(codebook.max()) - manifest["shift"]) * manifest["scale"] == pytest.approx(1, abs=1e-6)
    result = run_script("encode_latents.py", [*args, f"latent.cache_dir={base / 'cache2'}"],
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(base / "cache2")["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        one, two = load_file(base / "cache1" / shard["file"]), load_file(base / "cache2" / shard["file"])
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), shard["file"]
        held_out = shard["split"] != "train"
        assert ({"ct", "ld"} <= set(one)) == held_out  # pixels kept for scoring held-out items only


def test_latent_restoration_trains_and_is_scored_in_pixel_space(setup):
    base, args = setup
    run = base / "run"
    train_diffusion.main([*args, f"latent.cache_dir={base / 'cache1'}", f"run.output_dir={run}"])
    evaluate.main(["--run", str(run), "eval.hu_metrics=true"])
    out = run / "eval" / "final-euler2"
    with (out / "per_item.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {"ssim", "psnr", "input_ssim", "input_psnr", "mae_hu", "autoencoder_ssim"} <= set(rows[0])
    # The autoencoder's ceiling: the target's own latent decoded, scored as the VAE's validation scored it.
    vae_val = {n: float(v) for s, n, v in read_metrics(base / "vae") if n == "val/ssim"}
    assert float(rows[0]["autoencoder_ssim"]) == pytest.approx(vae_val["val/ssim"], abs=0.02)
    npz = np.load(out / "samples" / f"{rows[0]['item_id'].replace('/', '__')}.npz")
    # Scored in pixel space: the decoded sample against the source slab; the decoded low-dose latent is the
    # baseline (the condition on the target's grid).
    assert npz["generated"].shape == (1, 1, 8, 32, 32) and npz["reference"].shape == (1, 8, 32, 32)
    assert npz["condition_ld"].shape == (1, 8, 32, 32) and npz["condition_ld_latent"].shape == (4, 2, 8, 8)
    assert json.loads((run / "final" / "unet" / "config.json").read_text())["_class_name"] == "UNet3DModel"
    assert (out / "volumes").is_dir()


def test_a_cache_of_another_3d_autoencoder_is_refused(setup):
    from utils.config import ConfigError

    base, args = setup
    torch.manual_seed(1)  # the same architecture, other weights
    PatchVolume.from_config(PatchVolume.load_config(base / "vae" / "final" / "vae")).save_pretrained(base / "other")
    with pytest.raises(ConfigError, match="different autoencoder"):
        train_diffusion.main([*args, f"latent.cache_dir={base / 'cache1'}", f"latent.autoencoder={base / 'other'}",
                              f"run.output_dir={base / 'refused'}"])
