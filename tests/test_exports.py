"""Exports and validation on the real MNI152 demo: the diffusers files an export writes, best-val_ssim of a
multi-target task, held-out loss items and their independence of the batch size, and the export of an
unconditional latent DDPM."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file

import encode_latents
import train_diffusion
import train_vae
from diffusion.task import Field, Task
from models.autoencoder import FrozenAutoencoder
from models.unet2d import build_denoiser, load_denoiser
from tests.runs import read_metrics, tiny_args
from utils.config import ModelConfig, TaskConfig
from utils.export import export_weights


def test_export_writes_what_save_pretrained_writes(tmp_path):
    fields = {"t1": Field("t1", "image", 1), "class_dist": Field("class_dist", "vector", 3)}
    task = Task(TaskConfig(targets=["t1"], vector_condition="class_dist"), fields, (16, 16))
    torch.manual_seed(0)
    denoiser = build_denoiser(ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True],
                                          attention_head_dim=16), task)
    export_weights(tmp_path / "best-val_loss", denoiser, {"metric": "val/loss", "value": 0.5, "step": 3})
    denoiser.unet.save_pretrained(tmp_path / "reference")

    exported = tmp_path / "best-val_loss" / "unet"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert json.loads((exported / "config.json").read_text()) == \
        json.loads((tmp_path / "reference" / "config.json").read_text())
    loaded = load_denoiser(tmp_path / "best-val_loss")
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "best-val_loss" / "metric.json").read_text())["step"] == 3


@pytest.fixture(scope="module")
def two_modalities(tmp_path_factory, demo_root):
    """The demo subject plus a second, contrast-inverted image of the same head (a T2-like modality)."""
    root = tmp_path_factory.mktemp("data") / "two"
    shutil.copytree(demo_root, root)
    t1 = nib.load(root / "mni152" / "t1.nii.gz")
    data = t1.get_fdata(dtype=np.float32)
    inverted = np.where(data > 0, data.max() - data, 0).astype(np.float32)
    nib.save(nib.Nifti1Image(inverted, t1.affine), root / "mni152" / "inverted.nii.gz")
    return root


def test_best_val_ssim_of_a_two_modality_task_is_chosen_by_the_mean_over_targets(tmp_path, two_modalities):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, two_modalities, "data.images=[t1,inverted]", "task.targets=[t1,inverted]",
                                   "training.max_steps=4", "validation.sample_every=4"))
    logged = {n: float(v) for s, n, v in read_metrics(run) if s == 4 and not n.endswith("_items")}
    assert abs(logged["val/ssim"] - (logged["val/ssim_t1"] + logged["val/ssim_inverted"]) / 2) < 1e-6
    best = json.loads((run / "checkpoints" / "best-val_ssim" / "metric.json").read_text())
    assert best["metric"] == "val/ssim" and best["step"] == 4 and abs(best["value"] - logged["val/ssim"]) < 1e-6
    assert UNet2DModel.from_pretrained(run / "checkpoints" / "best-val_ssim", subfolder="unet").config.out_channels == 2


def test_heldout_loss_spans_the_held_out_set_and_ignores_the_batch_size(tmp_path, demo_root, monkeypatch):
    calls = []

    def recording(strategy, net, task, dataset, indices, batch_size, seed, accelerator):
        result = heldout_loss(strategy, net, task, dataset, indices, batch_size, seed, accelerator)
        # The same items in batches of 3 (the last one padded): each item has its own noise and time.
        rebatched = heldout_loss(strategy, net, task, dataset, indices, 3, seed, accelerator)
        calls.append({"num_val": len(dataset), "indices": list(indices), "result": result, "rebatched": rebatched})
        return result

    heldout_loss = train_diffusion.heldout_loss
    monkeypatch.setattr(train_diffusion, "heldout_loss", recording)
    train_diffusion.main(tiny_args(tmp_path / "run", demo_root, "training.max_steps=1", "validation.sample_every=100"))
    (call,) = calls
    indices, num_val = call["indices"], call["num_val"]
    assert len(indices) == 8 < num_val  # validation.num_items=8
    assert indices[0] == 0 and indices[-1] == num_val - 1, f"{indices} are not spread over {num_val} items"
    assert call["result"].keys() == call["rebatched"].keys() and "val/loss" in call["result"]
    for name, value in call["result"].items():
        assert abs(value - call["rebatched"][name]) < 1e-5 * max(1.0, abs(value)), name


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("vae") / "run"
    train_vae.main(tiny_args(run, demo_root, "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4",
                             "training.max_steps=4", config="configs/demo_vae.yaml"))
    return run


def test_autoencoder_exports_hold_the_ema_weights(vae_run):
    ema = load_file(vae_run / "checkpoints" / "checkpoint-4" / "ema.safetensors")
    vae = AutoencoderKL.from_pretrained(vae_run / "final", subfolder="vae")
    for name, tensor in vae.state_dict().items():
        assert torch.equal(tensor, ema[f"vae.{name}"]), name
    best = vae_run / "checkpoints" / "best-val_psnr"
    assert json.loads((best / "metric.json").read_text())["metric"] == "val/psnr"
    assert FrozenAutoencoder.load(best).latent_channels == 4


def test_unconditional_latent_ddpm_declares_no_pixel_pipeline(tmp_path, demo_root, vae_run):
    ldm = tiny_args(tmp_path / "run", demo_root, f"latent.autoencoder={vae_run / 'final'}",
                    f"latent.cache_dir={tmp_path / 'cache'}", config="configs/demo_ldm.yaml")
    encode_latents.main(ldm)
    train_diffusion.main([*ldm, "task.spatial_conditions=[]", "diffusion.strategy=ddpm",
                          "diffusion.timestep_sampling=uniform", "training.max_steps=2", "validation.every=2",
                          "validation.sample_every=2"])
    final = tmp_path / "run" / "final"
    # DDIMPipeline would return undecoded latents as images; the export says how to decode them instead.
    assert not (final / "model_index.json").exists()
    assert UNet2DModel.from_pretrained(final, subfolder="unet").config.in_channels == 4
    assert FrozenAutoencoder.load(final).identity == FrozenAutoencoder.load(vae_run / "final").identity
