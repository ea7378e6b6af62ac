"""train_vae.py end to end on the real MNI152 demo slices, the autoencoder losses, and FrozenAutoencoder."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from safetensors.torch import load_file

import train_vae
from data.nifti import load_slice_dataset
from models.autoencoder import (FrozenAutoencoder, TrainableAutoencoder, build_autoencoder, denormalise, normalise,
                                tiled_apply)
from models.discriminator import PatchDiscriminator
from models.losses import AdversarialLoss, AutoencoderLoss, PerceptualLoss, adaptive_weight
from tests.runs import read_metrics, run_script, tiny_args
from utils import config as config_lib
from utils import metrics
from utils.config import ConfigError, DataConfig, VAEConfig

# A tiny autoencoder (4x downsampling) and discriminator, on 32 x 32 slices; tests.runs.TINY sets the steps.
TINY_VAE = ["vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4", "vae.latent_channels=4",
            "vae.num_vq_embeddings=32", "vae.disc_channels=8", "vae.disc_layers=2", "data.flip_prob=0.5"]
GAN = ["vae.disc_weight=0.5", "vae.disc_start=4"]


def vae_args(run_dir, demo_root, *overrides):
    return tiny_args(run_dir, demo_root, *TINY_VAE, *overrides, config="configs/demo_vae.yaml")


def weights(run_dir, step, name="model"):
    return load_file(run_dir / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory, demo_root):
    """A KL-VAE trained 8 steps, with the PatchGAN loss from step 4."""
    run = tmp_path_factory.mktemp("kl") / "run"
    train_vae.main(vae_args(run, demo_root, *GAN))
    return run


def demo_slices(demo_root, size):
    return load_slice_dataset(DataConfig(root=str(demo_root), masks=["seg"], mask_classes={"seg": 3},
                                         filter_mask="seg", image_size=size))


def slices_of(run):
    """Four slices spread over the volume, preprocessed as the run's own config says."""
    cfg = config_lib.resolve(run / "config.yaml", [])
    dataset = load_slice_dataset(cfg.data)
    return torch.stack([dataset[i]["t1"] for i in range(0, len(dataset), len(dataset) // 4)][:4])


# ----------------------------------------------------------------------------------------------------------
# Training runs.

def test_kl_run_directory_contract_and_export(kl_run):
    for name in ("config.yaml", "split.json", "metrics.csv", "final/vae/config.json", "final/autoencoder.yaml",
                 "checkpoints/checkpoint-4/discriminator.safetensors", "checkpoints/checkpoint-8/ema.safetensors",
                 "checkpoints/best-val_psnr/vae", "checkpoints/best-val_psnr/metric.json"):
        assert (kl_run / name).exists(), name
    assert sorted(p.name for p in (kl_run / "samples").glob("*.png")) == ["step-0000004.png", "step-0000008.png"]

    rows = read_metrics(kl_run)
    assert len(rows) == len({(s, n) for s, n, _ in rows}), "duplicate (step, name) rows"
    names = {n for _, n, _ in rows}
    assert {"train/rec_loss", "train/kl", "train/g_loss", "train/d_loss", "train/adaptive_weight", "train/lr",
            "val/psnr", "val/ssim", "val/rec_loss"} <= names
    assert "train/perceptual" not in names  # off without vae.perceptual_network
    psnr = [float(v) for _, n, v in rows if n == "val/psnr"]
    assert len(psnr) == 2 and all(np.isfinite(psnr)) and psnr[-1] > 8  # dB; the untrained net gives ~5

    # final/vae loads with diffusers alone and holds the EMA weights that the last checkpoint also stores.
    vae = AutoencoderKL.from_pretrained(kl_run / "final", subfolder="vae")
    assert vae.config.in_channels == 1 and vae.config.latent_channels == 4
    ema = weights(kl_run, 8, "ema")
    assert all(torch.equal(t, ema[f"vae.{k}"]) for k, t in vae.state_dict().items())
    description = yaml.safe_load((kl_run / "final" / "autoencoder.yaml").read_text())
    assert description["downsample_factor"] == 4 and description["latent_shape"] == [4, 8, 8]
    assert description["inputs"] == [{"name": "t1", "kind": "image", "channels": 1}]
    assert description["data_range"] == 2.0 and description["normalization"]["method"] == "mri_percentile"


def test_adversarial_loss_starts_at_disc_start(kl_run):
    rows = read_metrics(kl_run)
    steps = {name: [s for s, n, _ in rows if n == name] for name in ("train/rec_loss", "train/d_loss", "train/g_loss")}
    # Steps 0-3 train without the discriminator: their averages are logged at steps 2 and 4.
    assert steps["train/rec_loss"] == [2, 4, 6, 8]
    assert steps["train/d_loss"] == steps["train/g_loss"] == [6, 8]
    weights_ = [float(v) for _, n, v in rows if n == "train/adaptive_weight"]
    assert weights_ and all(np.isfinite(w) and w > 0 for w in weights_)
    d_before = weights(kl_run, 4, "discriminator")
    d_after = weights(kl_run, 8, "discriminator")
    assert any(not torch.equal(d_before[k], d_after[k]) for k in d_before), "the discriminator never trained"


def test_exact_resume_matches_uninterrupted_run(kl_run, tmp_path, demo_root):
    resumed = tmp_path / "resumed"
    for _ in range(2):  # the same command twice, each invocation stopping after half of the steps
        train_vae.main(vae_args(resumed, demo_root, *GAN, "training.stop_after=4"))
    for name in ("model", "ema", "discriminator"):
        a, b = weights(kl_run, 8, name), weights(resumed, 8, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    assert read_metrics(kl_run) == read_metrics(resumed)


def test_vq_run_with_perceptual_loss(tmp_path, demo_root, perceptual_net):
    run = tmp_path / "run"
    train_vae.main(vae_args(run, demo_root, "vae.kind=vq", f"vae.perceptual_network={perceptual_net}",
                            "training.max_steps=4"))
    names = {n for _, n, _ in read_metrics(run)}
    assert {"train/rec_loss", "train/vq_loss", "train/perceptual", "val/psnr"} <= names
    assert not names & {"train/kl", "train/d_loss"}
    vae = VQModel.from_pretrained(run / "final", subfolder="vae")
    assert vae.config.num_vq_embeddings == 32
    frozen = FrozenAutoencoder.load(run / "final")
    x = slices_of(run)
    z = frozen.encode(x)
    assert frozen.kind == "vq" and z.shape == (len(x), 4, 8, 8)
    # decode quantises: latents that snap to the same codes decode identically.
    codes, _, _ = frozen.model.quantize(z)
    assert torch.allclose(frozen.decode(z), frozen.decode(codes), atol=1e-5)
    assert frozen.decode(z).shape == x.shape


def test_garbage_perceptual_network_is_a_one_line_error(tmp_path, demo_root, capsys):
    garbage = tmp_path / "features.pt"
    garbage.write_bytes(b"not a torchscript archive\n" * 10)
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_main(lambda: train_vae.main(vae_args(tmp_path / "run", demo_root,
                                                            f"vae.perceptual_network={garbage}")))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "vae.perceptual_network" in err[0] and str(garbage) in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("vae.inputs=[seg]", "label masks are not supported"),
    ("vae.inputs=[t2]", "vae.inputs"),
    ("vae.kind=gan", "vae.kind"),
    ("vae.block_out_channels=[8,10]", "vae.norm_num_groups"),
    ("vae.disc_loss=wasserstein", "vae.disc_loss"),
    ("vae.reconstruction_loss=huber", "vae.reconstruction_loss"),
    ("data.image_size=30", "data.image_size=30"),
])
def test_bad_settings_are_config_errors(tmp_path, demo_root, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_vae.main(vae_args(tmp_path / "run", demo_root, override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_processes_train_one_model_and_export(tmp_path, demo_root):
    run = tmp_path / "run"
    result = run_script("train_vae.py", vae_args(run, demo_root, *GAN, "run.log_level=DEBUG"),
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                        launch=["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode == 0, result.stderr[-3000:]
    first = dict(re.findall(r"\[rank (\d)\].*step 0 micro-batch 0 items (\S+)", result.stderr))
    assert set(first["0"].split(",")).isdisjoint(first["1"].split(",")), "ranks saw the same samples"
    checksums = dict(re.findall(r"\[rank (\d)\].*weights checksum (\S+)", result.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], checksums
    rows = read_metrics(run)
    assert len(rows) == len({(s, n) for s, n, _ in rows})
    assert {"train/d_loss", "val/psnr"} <= {n for _, n, _ in rows}
    assert AutoencoderKL.from_pretrained(run / "final", subfolder="vae").config.latent_channels == 4


# ----------------------------------------------------------------------------------------------------------
# FrozenAutoencoder.

def test_frozen_autoencoder_loads_every_folder_layout_with_one_identity(kl_run, tmp_path):
    final = FrozenAutoencoder.load(kl_run / "final")
    bare = FrozenAutoencoder.load(kl_run / "final" / "vae")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(kl_run / "final" / "vae", pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline",
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    in_pipeline = FrozenAutoencoder.load(pipeline)
    assert final.identity == bare.identity == in_pipeline.identity == FrozenAutoencoder.load(kl_run / "final").identity
    assert len(final.identity) == 64
    assert final.metadata["downsample_factor"] == 4 and bare.metadata["inputs"][0]["name"] == "t1"
    assert (final.kind, final.in_channels, final.latent_channels, final.downsample_factor) == ("kl", 1, 4, 4)

    # Other weights (one value changed), other identity.
    vae = AutoencoderKL.from_pretrained(kl_run / "final", subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3
    vae.save_pretrained(tmp_path / "changed")
    assert FrozenAutoencoder.load(tmp_path / "changed").identity != final.identity


def test_frozen_autoencoder_refuses_what_it_cannot_load(kl_run, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "empty"))):
        FrozenAutoencoder.load(tmp_path / "empty")
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConfigError, match="UNet2DModel, not an AutoencoderKL"):
        FrozenAutoencoder.load(tmp_path / "unet")
    broken = tmp_path / "broken"
    shutil.copytree(kl_run / "final" / "vae", broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=re.escape(str(broken))):
        FrozenAutoencoder.load(broken)
    with pytest.raises(ConfigError, match="latent.tile_size"):
        FrozenAutoencoder.load(kl_run / "final", tile_size=30)


def test_encode_is_the_posterior_mean_and_decode_inverts_shapes(kl_run):
    frozen = FrozenAutoencoder.load(kl_run / "final")
    x = slices_of(kl_run)  # (4, 1, 32, 32)
    z = frozen.encode(x)
    assert z.shape == (4, 4, 8, 8) and z.dtype == torch.float32 and not z.requires_grad
    assert torch.equal(z, frozen.encode(x)), "encoding is not deterministic"
    assert torch.allclose(z, frozen.model.encode(x).latent_dist.mean)
    reconstruction = frozen.decode(z)
    assert reconstruction.shape == x.shape
    assert float(metrics.psnr(reconstruction, x, 2.0).mean()) > 8
    scale, shift = 0.7, -0.2
    assert torch.allclose(denormalise(normalise(z, scale, shift), scale, shift), z, atol=1e-6)
    assert torch.allclose(normalise(z, scale, shift), (z - shift) * scale)
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        frozen.encode(torch.zeros(1, 1, 30, 32))


def test_tiling_blends_local_operators_exactly():
    # Operators acting on each 4x4 cell alone: tiling with linear blending must reproduce them exactly.
    x = torch.randn(2, 3, 80, 96)
    pooled = tiled_apply(lambda t: F.avg_pool2d(t, 4), x, tile_size=32, overlap=16, up=1, down=4)
    assert torch.allclose(pooled, F.avg_pool2d(x, 4), atol=1e-6)
    z = torch.randn(2, 3, 20, 24)
    upsampled = tiled_apply(lambda t: F.interpolate(t, scale_factor=4.0), z, tile_size=8, overlap=4, up=4, down=1)
    assert torch.allclose(upsampled, F.interpolate(z, scale_factor=4.0), atol=1e-6)


def test_tiled_reconstruction_of_a_larger_real_image_is_close_to_untiled(kl_run, demo_root):
    # The VAE trained on 32 x 32 slices; reconstruct the same slices at 64 x 64, in 32-pixel tiles.
    dataset = demo_slices(demo_root, 64)
    x = torch.stack([dataset[i]["t1"] for i in range(0, len(dataset), len(dataset) // 4)][:4])
    untiled = FrozenAutoencoder.load(kl_run / "final")
    tiled = FrozenAutoencoder.load(kl_run / "final", tile_size=32, tile_overlap=16)
    z_untiled, z_tiled = untiled.encode(x), tiled.encode(x)
    assert z_tiled.shape == z_untiled.shape == (4, 4, 16, 16) and not torch.equal(z_tiled, z_untiled)
    psnr_untiled = float(metrics.psnr(untiled.decode(z_untiled), x, 2.0).mean())
    psnr_tiled = float(metrics.psnr(tiled.decode(z_tiled), x, 2.0).mean())
    assert abs(psnr_tiled - psnr_untiled) < 1.5, (psnr_tiled, psnr_untiled)
    # A tile as large as the image is no tiling at all.
    whole = FrozenAutoencoder.load(kl_run / "final", tile_size=64, tile_overlap=16)
    assert torch.equal(whole.encode(x), z_untiled)


# ----------------------------------------------------------------------------------------------------------
# Losses and the discriminator.

def tiny_vae(kind="kl"):
    torch.manual_seed(0)
    cfg = VAEConfig(kind=kind, block_out_channels=[8, 16], norm_num_groups=4, num_vq_embeddings=16)
    return cfg, TrainableAutoencoder(build_autoencoder(cfg, 1, (16, 16)))


def test_vq_loss_is_diffusers_commit_loss_per_sample():
    _, model = tiny_vae("vq")
    x = torch.randn(3, 1, 16, 16)
    reconstruction, per_sample = model(x)
    output = model.vae(x)
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample.mean(), output.commit_loss, rtol=1e-5)
    assert torch.allclose(reconstruction, output.sample, atol=1e-6)


def test_perceptual_loss_changes_the_loss_and_leaves_its_network_frozen(perceptual_net):
    cfg, model = tiny_vae()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    plain = AutoencoderLoss(cfg)
    with_features = AutoencoderLoss(VAEConfig(**{**cfg.__dict__, "perceptual_network": str(perceptual_net),
                                                 "perceptual_weight": 0.5}))
    torch.manual_seed(1)
    loss_plain, _, _ = plain(model, x)
    torch.manual_seed(1)
    loss, _, logs = with_features(model, x)
    # The same posterior sample in both calls: the difference is exactly the weighted perceptual term.
    assert logs["perceptual"] > 0 and torch.all(loss > loss_plain)
    assert torch.allclose(loss.mean() - loss_plain.mean(), 0.5 * logs["perceptual"], rtol=1e-4)
    loss.mean().backward()
    assert all(p.grad is None for p in with_features.perceptual.network.parameters())
    assert model.last_layer.grad is not None
    # Identical images are at distance 0.
    assert torch.allclose(with_features.perceptual(x, x), torch.zeros(2))
    with pytest.raises(ConfigError, match="vae.perceptual_network"):
        PerceptualLoss(perceptual_net.parent / "missing.pt")


def test_adaptive_weight_balances_gradients_at_the_last_layer():
    layer = torch.nn.Conv2d(2, 1, 3, padding=1)
    h = torch.randn(2, 2, 8, 8)
    out = layer(h)
    rec, gan = out.abs().mean(), -(3 * out).mean()
    g_rec, = torch.autograd.grad(rec, layer.weight, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, layer.weight, retain_graph=True)
    weight = adaptive_weight(rec, gan, layer.weight)
    assert not weight.requires_grad and weight > 0
    assert torch.allclose(weight, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert adaptive_weight(rec, 1e-12 * out.mean(), layer.weight, max_weight=10.0) == 10.0  # clamped


def test_generator_and_discriminator_steps_touch_only_their_own_network():
    cfg, model = tiny_vae()
    cfg.disc_weight = 0.5
    disc = PatchDiscriminator(in_channels=1, channels=8, num_layers=2, norm_num_groups=4)
    loss_fn = AutoencoderLoss(cfg)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, reconstruction, logs = loss_fn(model, x, disc, model.last_layer)
    assert loss.shape == (2,) and logs["adaptive_weight"] > 0 and torch.isfinite(logs["g_loss"])
    loss.mean().backward()
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())
    vae_grad = model.last_layer.grad.clone()
    loss_fn.discriminator_loss(disc, x, reconstruction).mean().backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert torch.equal(model.last_layer.grad, vae_grad)


def test_adversarial_losses():
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    hinge, lsgan = AdversarialLoss("hinge"), AdversarialLoss("least_squares")
    assert torch.equal(hinge.discriminator(real, fake), torch.zeros(2))  # confident and right: no loss
    assert torch.allclose(hinge.discriminator(fake, real), torch.full((2,), 3.0))
    assert torch.allclose(hinge.generator(fake), torch.full((2,), 2.0))
    assert torch.allclose(lsgan.discriminator(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)), torch.zeros(2))
    assert torch.allclose(lsgan.generator(fake), torch.full((2,), 9.0))


@pytest.mark.parametrize("norm, spectral", [("group", False), ("none", True)])
def test_patch_discriminator_scores_each_sample_alone(norm, spectral):
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=2, channels=8, num_layers=3, norm=norm, norm_num_groups=4,
                              spectral_norm=spectral).eval()
    x = torch.randn(3, 2, 64, 64)
    logits = disc(x)
    assert logits.shape == (3, 1, 6, 6)
    # No batch statistics: a sample's score does not depend on the rest of its batch.
    assert torch.allclose(disc(x[:1]), logits[:1], atol=1e-5)
    with pytest.raises(ConfigError, match="norm"):
        PatchDiscriminator(norm="batch")
