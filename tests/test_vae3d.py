"""3D autoencoders: train_vae.py on random patches of the real pseudo-CT demo (configs/demo_vae3d.yaml at test size),
the PatchVolume architecture built from vae.* (the public 4x and 8x models included), the EMA codebook with
dead-code restarts on one and on two processes, the KL variant, and the codebook min/max latent scaling."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

import train_vae
from models.autoencoder import FrozenAutoencoder, TrainableAutoencoder, build_autoencoder, latent_scaling
from models.losses import kl_divergence
from models.patchvolume import Codebook, PatchVolume
from tests.runs import REPO, read_metrics, run_script
from utils.config import ConfigError, VAEConfig

# 6 mm voxels: slabs of 8 x 32 x 32 held out, 8 x 16 x 16 training patches, 4x downsampling, 32 codes.
TINY_VAE3D = [
    "data.spacing=[6,6,6]", "data.volume_shape=[8,32,32]", "data.patch_size=[8,16,16]", "data.val_fraction=0.2",
    "data.slab_gap=1", "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4", "vae.latent_channels=4",
    "vae.num_vq_embeddings=32", "vae.restart_threshold=0.5", "vae.disc_channels=8", "vae.disc_layers=1",
    "vae.disc_weight=0.5", "vae.disc_start=2", "training.batch_size=2", "training.max_steps=4",
    "training.lr_warmup_steps=1", "training.checkpoint_every=2", "training.log_every=2", "validation.every=2",
    "validation.num_samples=1", "validation.at_start=false", "logging.trackers=[csv]",
]
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


def vae3d_args(run, ct_demo_root, *overrides):
    return ["--config", str(REPO / "configs/demo_vae3d.yaml"), f"run.output_dir={run}", f"data.root={ct_demo_root}",
            *TINY_VAE3D, *overrides]


def weights(run, step, name="model"):
    return load_file(run / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, ct_demo_root, perceptual_net):
    """A 3D VQ autoencoder trained 4 steps with the 2.5D perceptual loss and the 3D PatchGAN from step 2."""
    run = tmp_path_factory.mktemp("vq3d") / "run"
    train_vae.main(vae3d_args(run, ct_demo_root, f"vae.perceptual_network={perceptual_net}"))
    return run


def test_3d_vq_run_trains_on_patches_and_exports_a_patchvolume(vq_run, ct_demo_root):
    names = {n for _, n, _ in read_metrics(vq_run)}
    assert {"train/rec_loss", "train/vq_loss", "train/perceptual", "train/g_loss", "train/d_loss", "val/psnr",
            "val/ssim", "val/psnr_3d"} <= names
    # The discriminator is a 3D PatchGAN and it trained.
    before, after = weights(vq_run, 2, "discriminator"), weights(vq_run, 4, "discriminator")
    assert before["net.0.weight"].ndim == 5 and any(not torch.equal(before[k], after[k]) for k in before)
    # The codebook was trained by EMA (no gradient): its buffers moved between checkpoints.
    two, four = weights(vq_run, 2), weights(vq_run, 4)
    assert not torch.equal(two["vae.codebook.embeddings"], four["vae.codebook.embeddings"])

    description = yaml.safe_load((vq_run / "final" / "autoencoder.yaml").read_text())
    assert description["class"] == "PatchVolume" and description["kind"] == "vq"
    assert description["sample_shape"] == [8, 16, 16] and description["latent_shape"] == [4, 2, 4, 4]
    frozen = FrozenAutoencoder.load(vq_run / "final")
    assert (frozen.kind, frozen.spatial_dims, frozen.latent_channels, frozen.downsample_factor) == (
        "patchvolume", 3, 4, 4)
    assert frozen.model.config.block_out_channels == [8, 16, 16] and frozen.model.config.layers_per_block == 1
    x = torch.rand(1, 1, 8, 32, 32) * 2 - 1
    z = frozen.encode(x)
    assert z.shape == (1, 4, 2, 8, 8) and frozen.decode(z).shape == x.shape
    assert torch.equal(frozen.model.codebook.embeddings, four["vae.codebook.embeddings"])  # ema_decay 0: as trained


def test_3d_resume_is_exact_codebook_and_discriminator_included(vq_run, tmp_path, ct_demo_root, perceptual_net):
    resumed = tmp_path / "resumed"
    for _ in range(2):  # the same command twice, each invocation stopping after half of the steps
        train_vae.main(vae3d_args(resumed, ct_demo_root, f"vae.perceptual_network={perceptual_net}",
                                  "training.stop_after=2"))
    for name in ("model", "discriminator"):
        a, b = weights(vq_run, 4, name), weights(resumed, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    assert read_metrics(vq_run) == read_metrics(resumed)


def test_two_processes_keep_one_codebook(tmp_path, ct_demo_root):
    run = tmp_path / "run"
    result = run_script("train_vae.py", vae3d_args(run, ct_demo_root, "run.log_level=DEBUG", "training.max_steps=2",
                                                   "vae.disc_weight=0"),
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    # The checksum covers the codebook buffers: each rank updated them from its own patches.
    checksums = dict(re.findall(r"\[rank (\d)\].*weights checksum (\S+)", result.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], checksums
    assert FrozenAutoencoder.load(run / "final").kind == "patchvolume"


# ----------------------------------------------------------------------------------------------------------
# The EMA codebook.

def test_codebook_follows_its_assignments_and_restarts_dead_codes():
    torch.manual_seed(0)
    # Eight latent vectors near the first two codes; codes 2 and 3 are far away and unused so far.
    cluster = torch.tensor([[2.0, 1.0], [1.0, 2.0], [2.0, 2.0], [1.0, 1.0], [-2.0, -1.0], [-1.0, -2.0],
                            [-2.0, -2.0], [-1.0, -1.0]])
    z = cluster.t().reshape(1, 2, 2, 2, 2)  # (B, C, d, h, w) with the vectors along the voxels

    def codebook(restart_threshold):
        book = Codebook(n_codes=4, embedding_dim=2, decay=0.5, restart_threshold=restart_threshold).train()
        book.embeddings.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [50.0, 50.0], [60.0, 60.0]]))
        book.z_avg.copy_(book.embeddings)
        book.N.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
        return book

    # One step: counts (4, 4, 0, 0) and sums (6, 6), (-6, -6) halfway into the statistics.
    book = codebook(restart_threshold=0.5)
    _, indices = book(z)
    assert set(indices.view(-1).tolist()) == {0, 1}  # assigned with the codes from before the update
    assert torch.allclose(book.N, torch.tensor([2.5, 2.5, 1.0, 1.0]))
    assert torch.allclose(book.embeddings[:2], torch.tensor([[1.4, 1.4], [-1.4, -1.4]]), atol=1e-4)
    # The dead codes restarted at latent vectors of the batch, counted as used once.
    rows = {tuple(v) for v in cluster.tolist()}
    assert all(tuple(v) in rows for v in book.embeddings[2:].tolist())
    assert torch.equal(book.z_avg[2:], book.embeddings[2:])

    # Without restarts the used codes converge to their clusters' means, the counts to their usage.
    book = codebook(restart_threshold=0.0)
    for _ in range(30):
        book(z)
    assert torch.allclose(book.embeddings[:2], torch.tensor([[1.5, 1.5], [-1.5, -1.5]]), atol=1e-4)
    assert torch.allclose(book.N[:2], torch.tensor([4.0, 4.0]), atol=1e-4)

    # Eval mode: lookups only.
    book.eval()
    state = {k: v.clone() for k, v in book.state_dict().items()}
    book(z + 5)
    assert all(torch.equal(state[k], v) for k, v in book.state_dict().items())


def _updated_codebook(z: torch.Tensor, restart_threshold: float) -> Codebook:
    """A 16-code codebook after five training calls on z, from the same start everywhere."""
    codebook = Codebook(n_codes=16, embedding_dim=3, decay=0.9, restart_threshold=restart_threshold).train()
    codebook.embeddings.copy_(torch.randn(16, 3, generator=torch.Generator().manual_seed(7)))
    codebook.z_avg.copy_(codebook.embeddings)
    codebook.N.fill_(1.0)
    for _ in range(5):
        codebook(z)
    return codebook


def _latents(rank: int) -> torch.Tensor:
    return torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(rank))  # other data per rank


def _codebook_worker(rank, folder, restart_threshold):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # each rank would draw other restart candidates
        codebook = _updated_codebook(_latents(rank), restart_threshold)
        torch.save({k: v.clone() for k, v in codebook.state_dict().items()}, f"{folder}/state.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("restart_threshold", [0.3, 0.0])
def test_codebook_statistics_are_summed_over_processes(tmp_path, restart_threshold):
    mp.spawn(_codebook_worker, args=(str(tmp_path), restart_threshold), nprocs=2)
    states = [torch.load(tmp_path / f"state.{rank}", weights_only=True) for rank in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # one codebook on both ranks
    if restart_threshold == 0:  # without restarts, two processes update as one process over both batches
        both = _updated_codebook(torch.cat([_latents(0), _latents(1)]), 0.0)
        assert torch.allclose(states[0]["embeddings"], both.embeddings, atol=1e-5)
        assert torch.allclose(states[0]["N"], both.N, atol=1e-5)
        assert not torch.allclose(both.embeddings, _updated_codebook(_latents(0), 0.0).embeddings)
    else:  # codes restarted in the last call (their count is exactly 1), with the same candidates on both ranks
        assert bool((states[0]["N"] == 1.0).any())


# ----------------------------------------------------------------------------------------------------------
# The architecture from vae.*.

@pytest.mark.parametrize("widths, keys, parameters", [([48, 96, 192, 192], 209, 34_818_921),
                                                      ([48, 96, 96], 169, 8_485_641)])
def test_vae_settings_build_the_public_patchvolume_models(widths, keys, parameters):
    cfg = VAEConfig(kind="vq", block_out_channels=widths, latent_channels=8, layers_per_block=2, norm_num_groups=24,
                    num_vq_embeddings=8192)
    model = build_autoencoder(cfg, 1, (64, 64, 64))
    public = PatchVolume(downsample=2 ** (len(widths) - 1))
    assert len(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == parameters
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in public.state_dict().items()}
    assert list(model.state_dict()) == list(public.state_dict())  # the checkpoints' key order


def test_kl_3d_autoencoder_samples_its_posterior_and_encodes_its_mean(tmp_path):
    torch.manual_seed(0)
    cfg = VAEConfig(kind="kl", block_out_channels=[8, 16], latent_channels=3, norm_num_groups=4)
    vae = build_autoencoder(cfg, 2, (8, 16, 16))
    assert not hasattr(vae, "codebook") and vae.pre_vq_conv.out_channels == 6
    model = TrainableAutoencoder(vae)
    x = torch.rand(2, 2, 8, 16, 16) * 2 - 1
    reconstruction, kl = model(x)
    posterior = vae.posterior(x)
    assert reconstruction.shape == x.shape and kl.shape == (2,) and torch.all(kl > 0)
    assert torch.allclose(kl, kl_divergence(posterior))
    assert torch.equal(vae.encode(x), posterior.mean) and vae.encode(x).shape == (2, 3, 4, 8, 8)
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))  # deterministic: the mean
    (reconstruction.mean() + kl.mean()).backward()
    assert model.last_layer.grad is not None
    vae.save_pretrained(tmp_path / "kl")
    frozen = FrozenAutoencoder.load(tmp_path / "kl")
    assert torch.allclose(frozen.encode(x), posterior.mean, atol=1e-6)
    with pytest.raises(ConfigError, match="latent.scaling=codebook_minmax"):
        latent_scaling("codebook_minmax", posterior.mean, vae)


def test_codebook_minmax_scaling_maps_the_codebook_range_to_plus_minus_one():
    torch.manual_seed(0)
    vae = PatchVolume(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=32, norm_groups=4)
    scale, shift = latent_scaling("codebook_minmax", torch.randn(10), vae)
    codebook = vae.codebook.embeddings
    assert torch.allclose((codebook.min() - shift) * scale, torch.tensor(-1.0))
    assert torch.allclose((codebook.max() - shift) * scale, torch.tensor(1.0))
    latents = torch.randn(100) * 3 + 2
    assert latent_scaling("std", latents, vae) == pytest.approx((1 / float(latents.std()), float(latents.mean())))


@pytest.mark.parametrize("overrides, message", [
    (["vae.block_out_channels=[8,16,16,16]", "data.volume_shape=[12,32,32]"],
     r"data.volume_shape=\[12, 32, 32\] must be divisible by 8"),
    (["data.patch_size=[6,16,16]"], r"data.patch_size=\[6, 16, 16\] must be divisible by 4"),
    (["vae.codebook_decay=1.5"], "vae.codebook_decay"),
    (["vae.kind=fsq"], "vae.kind"),
    (["vae.disc_layers=2"], "at least 12 per side"),
])
def test_3d_settings_that_cannot_work_are_refused_before_training(tmp_path, ct_demo_root, overrides, message):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_vae.main(vae3d_args(run, ct_demo_root, *overrides))
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("kind, shape", [("kl", (16, 16)), ("kl", (8, 16, 16)), ("vq", (8, 16, 16))])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, shape):
    """vae.gradient_checkpointing recomputes blocks in the backward pass: the same loss and gradients (to float
    rounding, 1e-5), and a state dict that loads into the plain model."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = VAEConfig(kind=kind, block_out_channels=[8, 16], latent_channels=3, norm_num_groups=4,
                        num_vq_embeddings=16, restart_threshold=0.0, gradient_checkpointing=checkpointing)
        model = TrainableAutoencoder(build_autoencoder(cfg, 1, shape))
        assert model.vae.is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)  # the same posterior sample in both
        x = torch.rand(2, 1, *shape) * 2 - 1
        reconstruction, regulariser = model(x)
        loss = (reconstruction - x).abs().mean() + regulariser.mean()
        loss.backward()
        results.append((model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_loss, plain_grads), (checkpointed, loss, grads) = results
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-5) for n in plain_grads)
    plain.load_state_dict(checkpointed.state_dict())  # no wrapper prefixes in the keys


def test_gradient_checkpointing_of_a_2d_vq_model_is_refused(tmp_path, demo_root):
    with pytest.raises(ConfigError, match="vae.gradient_checkpointing"):
        train_vae.main(["--config", str(REPO / "configs/demo_vae.yaml"), f"run.output_dir={tmp_path / 'run'}",
                        f"data.root={demo_root}", "vae.kind=vq", "vae.gradient_checkpointing=true"])
    assert not (tmp_path / "run").exists()
