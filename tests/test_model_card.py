"""final/README.md: a Hugging Face model card written by train_diffusion.py and train_vae.py, completed by
evaluate.py, parsed here with huggingface_hub as the Hub would."""
from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

import evaluate
import train_diffusion
import train_vae
from tests.runs import tiny_args
from utils.model_card import EVALUATION_HEADING


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("card") / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=4", "validation.sample_every=4"))
    return run


def test_the_final_export_carries_a_model_card(diffusion_run):
    card = ModelCard.load(diffusion_run / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-to-image"
    assert {"medical-imaging", "mri", "2d", "rflow"} <= set(meta["tags"])
    text = card.text
    assert "generates t1 given seg" in text and "synthetic, one subject" in text
    assert "training.max_steps=4" in text  # the command that trained it
    assert "| `val/ssim` |" in text and "| `val/loss` |" in text  # the held-out metrics, with their step
    assert "not a medical device" in text and "optimistic" in text  # the limits
    assert 'UNet2DModel.from_pretrained("final", subfolder="unet")' in text


def test_evaluate_adds_its_report_once(diffusion_run):
    for _ in range(2):  # a second evaluation replaces the section
        evaluate.main(["--run", str(diffusion_run), "eval.sampling_steps=2", "eval.num_items=3", "eval.overwrite=true"])
    text = (diffusion_run / "final" / "README.md").read_text()
    assert text.count(EVALUATION_HEADING) == 1
    evaluation = text.split(EVALUATION_HEADING)[1]
    assert "sampling_steps 2" in evaluation and "| `ssim` |" in evaluation and "| 3 |" in evaluation
    assert ModelCard(text).data.to_dict()["library_name"] == "diffusers"


def test_the_autoencoder_export_carries_a_model_card(tmp_path, demo_root):
    run = tmp_path / "vae"
    train_vae.main(tiny_args(run, demo_root, "vae.block_out_channels=[8,16]", "vae.norm_num_groups=4",
                             "training.max_steps=2", "validation.every=2", config="configs/demo_vae.yaml"))
    card = ModelCard.load(run / "final" / "README.md")
    assert "autoencoder" in card.data.to_dict()["tags"] and "| `val/psnr` |" in card.text
    assert "FrozenAutoencoder.load" in card.text
