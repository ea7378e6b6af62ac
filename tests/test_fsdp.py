"""FSDP where a CPU can test it: torch FSDP2 on gloo with the wrap classes of configs/accelerate/fsdp.yaml, the
full-state-dict checkpoint round trip of utils/checkpoint.py, and the diffusers-format exports of a sharded
denoiser and autoencoder (Accelerate itself never enables FSDP on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file

from models.autoencoder import FrozenAutoencoder
from models.unet2d import load_denoiser
from models.unet3d import UNet3DModel
from tests.runs import REPO


def run_probe(out, *args: str, port: int):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "fsdp_checkpoint_probe.py"), str(out), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return run_probe(tmp_path_factory.mktemp("fsdp"), port=29731)


def assert_equal_states(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    different = [k for k in loaded if not torch.equal(loaded[k], expected[k])]
    assert not different, different[:3]


def test_fsdp2_sharded_training_state_saves_and_resumes_exactly(probe):
    for rank in (0, 1):
        report = json.loads((probe / f"result-rank{rank}.json").read_text())
        assert report["ok"] and report["wrapped_modules"] > 0
    assert (probe / "checkpoints" / "checkpoint-1" / "model.safetensors").is_file()


def test_exports_of_a_sharded_model_hold_the_full_ema_weights(probe):
    expected = load_file(probe / "expected-denoiser.safetensors")
    unet_expected = {k.removeprefix("unet."): v for k, v in expected.items() if k.startswith("unet.")}
    for folder in (probe / "checkpoints" / "best-val_loss", probe / "final"):
        assert_equal_states(UNet2DModel.from_pretrained(folder, subfolder="unet").state_dict(), unet_expected)
        assert_equal_states(load_denoiser(folder).state_dict(), expected)
    assert json.loads((probe / "checkpoints" / "best-val_loss" / "metric.json").read_text())["step"] == 2
    assert (probe / "final" / "scheduler" / "scheduler_config.json").is_file()
    assert_equal_states(AutoencoderKL.from_pretrained(probe / "final", subfolder="vae").state_dict(),
                        load_file(probe / "expected-frozen_vae.safetensors"))
    assert not list(probe.rglob(".tmp-*")), "a temporary export folder was left behind"


def test_export_of_a_sharded_autoencoder_loads_unsharded(probe):
    expected = {k.removeprefix("vae."): v for k, v in load_file(probe / "expected-autoencoder.safetensors").items()}
    assert_equal_states(AutoencoderKL.from_pretrained(probe / "vae", subfolder="vae").state_dict(), expected)
    frozen = FrozenAutoencoder.load(probe / "vae")
    assert frozen.metadata == {"kind": "kl"} and frozen.latent_channels == 4
    assert json.loads((probe / "vae" / "metric.json").read_text())["metric"] == "val/psnr"


def test_a_sharded_unet3d_checkpoints_resumes_and_exports(tmp_path):
    out = run_probe(tmp_path, "3d", port=29733)  # the probe asserts the checkpoint round trip and the resumed step
    for rank in (0, 1):
        assert json.loads((out / f"result-rank{rank}.json").read_text())["wrapped_modules"] > 0
    expected = load_file(out / "expected-denoiser.safetensors")
    unet_expected = {k.removeprefix("unet."): v for k, v in expected.items() if k.startswith("unet.")}
    for folder in (out / "checkpoints" / "best-val_loss", out / "final"):
        assert_equal_states(UNet3DModel.from_pretrained(folder, subfolder="unet").state_dict(), unet_expected)
        assert_equal_states(load_denoiser(folder).state_dict(), expected)
