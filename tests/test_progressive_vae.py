"""vae.progressive: an autoencoder trained at 16 then 32 px on the real MNI152 demo slices; phases continue the
same weights, resume bitwise inside and between phases, and are refused when they cannot work."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_vae
from tests.runs import read_metrics, tiny_args
from utils.checkpoint import list_checkpoints
from utils.config import ConfigError

TINY_VAE = ["vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4", "vae.latent_channels=4",
            "vae.disc_channels=8", "vae.disc_layers=1", "vae.disc_weight=0.5", "vae.disc_start=2",
            "data.flip_prob=0.5"]
# 4 steps at 16 px (batch 6), then 4 at 32 px (batch 3): checkpoints at 4 (the phase boundary) and 8.
PHASES = "vae.progressive=[{image_size: 16, steps: 4, batch_size: 6}, {image_size: 32, steps: 4, batch_size: 3}]"


def vae_args(run_dir, demo_root, *overrides):
    return tiny_args(run_dir, demo_root, *TINY_VAE, PHASES, *overrides, config="configs/demo_vae.yaml")


def assert_same_weights(a, b, step):
    for name in ("model", "ema", "discriminator"):
        x = load_file(a / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")
        y = load_file(b / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name} differs at step {step}"


def timeless(run):
    return [row for row in read_metrics(run) if not row[1].startswith("perf/")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("progressive") / "run"
    train_vae.main(vae_args(run, demo_root))
    return run


def test_phases_train_at_their_sizes_and_validate_at_the_full_size(straight, demo_root, monkeypatch, tmp_path):
    rows = read_metrics(straight)
    phase = {step: float(v) for step, name, v in rows if name == "train/phase"}
    size = {step: float(v) for step, name, v in rows if name == "train/image_size"}
    assert phase == {2: 1, 4: 1, 6: 2, 8: 2} and size == {2: 16, 4: 16, 6: 32, 8: 32}
    # Every phase ends with a validation (at data.image_size, so the curves compare across phases).
    assert sorted(step for step, name, _ in rows if name == "val/psnr") == [4, 8]
    assert (straight / "final" / "vae").is_dir()
    # The autoencoder really sees the phase's size and batch.
    seen = []
    original = train_vae.AutoencoderLoss.__call__

    def recording(self, model, x, *args):
        seen.append(tuple(x.shape))
        return original(self, model, x, *args)

    monkeypatch.setattr(train_vae.AutoencoderLoss, "__call__", recording)
    train_vae.main(vae_args(tmp_path / "seen", demo_root, "validation.every=100"))
    assert seen == [(6, 1, 16, 16)] * 4 + [(3, 1, 32, 32)] * 4


@pytest.mark.parametrize("stop_after", [4, 6])  # at the phase boundary, and inside the second phase
def test_a_run_stopped_and_rerun_equals_the_uninterrupted_one(straight, tmp_path, demo_root, stop_after):
    run = tmp_path / "run"
    train_vae.main(vae_args(run, demo_root, f"training.stop_after={stop_after}"))
    assert list_checkpoints(run / "checkpoints")[-1].name == f"checkpoint-{stop_after}"
    assert not (run / "final").exists()
    train_vae.main(vae_args(run, demo_root))
    assert_same_weights(straight, run, 8)
    assert timeless(run) == timeless(straight)


@pytest.mark.parametrize("overrides, message", [
    (["training.max_steps=9"], r"add up to 8 steps but training.max_steps=9"),
    (["vae.progressive=[{image_size: 16, steps: 8, batch_size: 4}]"], "must train at data.image_size=32"),
    (["vae.progressive=[{image_size: 64, steps: 4, batch_size: 4}, {image_size: 32, steps: 4, batch_size: 4}]"],
     r"vae.progressive\[0\].image_size=64 exceeds data.image_size=32"),
    (["vae.progressive=[{image_size: 18, steps: 4, batch_size: 4}, {image_size: 32, steps: 4, batch_size: 4}]"],
     r"vae.progressive\[0\].image_size=18 must be divisible by 4"),
    (["vae.progressive=[{image_size: 16, steps: 4, batch_size: 0}, {image_size: 32, steps: 4, batch_size: 4}]"],
     r"vae.progressive\[0\].batch_size=0 must be >= 1"),
    (["vae.disc_layers=3"], "needs training samples of at least"),
])
def test_phases_that_cannot_work_are_refused_before_training(tmp_path, demo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_vae.main(vae_args(tmp_path / "run", demo_root, *overrides))
    assert not (tmp_path / "run").exists()
