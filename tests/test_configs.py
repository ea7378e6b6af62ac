"""Every preset in configs/ resolves against the schema, documents each key, and builds its networks."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import yaml

from diffusion import build_strategy
from diffusion.classification import LabelDiffusionTask
from diffusion.task import Field, Task, fields_from_config
from models import build_network
from models.autoencoder import build_autoencoder, latent_channels_of
from models.patchvolume import PatchVolume
from models.unet2d import build_denoiser
from utils.config import ConfigError, resolve
from utils.config_checks import check_config
from tests.runs import REPO

PRESETS = sorted((REPO / "configs").glob("*.yaml"))
KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w]*:\s*(\S.*)?$")


def test_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"demo.yaml", "demo_vae.yaml", "demo_ldm.yaml", "demo_pathology_vae.yaml",
            "demo_pathology_ldm.yaml", "demo_3d.yaml", "demo_ct_2d.yaml", "ct_restore_3d_gpu.yaml", "demo_vae3d.yaml",
            "demo_ldm3d.yaml", "ct_sr_ldm3d_gpu.yaml", "demo_classifier.yaml",
            "classifier_gpu.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_key_has_a_comment(preset):
    undocumented = [line for line in preset.read_text().splitlines()
                    if KEY_LINE.match(line) and not line.rstrip().endswith(":") and "#" not in line]
    sections = [line for line in preset.read_text().splitlines()
                if KEY_LINE.match(line) and line.rstrip().endswith(":") and line.startswith("  ")]
    assert not undocumented and not sections, undocumented + sections


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_resolves_and_builds_its_networks(preset):
    cfg = resolve(preset, [])
    check_config(cfg)
    with torch.device("meta"):  # shapes only: the GPU presets' networks would take gigabytes
        if "vae" in yaml.safe_load(preset.read_text()):
            channels = 3 if cfg.data.kind == "tiles" else len(cfg.vae.inputs)
            vae = build_autoencoder(cfg.vae, channels, cfg.data.training_shape())
            assert latent_channels_of(vae) == cfg.vae.latent_channels
            assert isinstance(vae, PatchVolume) == (cfg.data.dims == 3)
            return
        build_strategy(cfg.diffusion)
        if cfg.task.kind == "classification":
            image = Field("image", "image", 3 if cfg.data.color == "rgb" else 1)
            task = LabelDiffusionTask(cfg.task, cfg.classifier, image, ["a", "b", "c"], cfg.data.image_size)
            net = build_network(cfg, task)
            assert net.denoiser.output[-1].out_channels == 3
            return
        if cfg.data.kind == "latent_cache":
            # The cache describes its fields; a latent is an image of the autoencoder's latent channels.
            source = fields_from_config(cfg.data.__class__(**{**cfg.data.__dict__, "kind": cfg.latent.source_kind}))
            channels = 8 if cfg.data.dims == 3 else 4
            latents = [f"{n}_latent" for n in cfg.latent.encode_each] or ["latent"]
            fields = {**{n: Field(n, "image", channels) for n in latents},
                      **{n: f for n, f in source.items() if f.kind != "image"}}
            factor = 4 if "demo" in preset.name else 8
            sides = cfg.data.volume_shape if cfg.data.dims == 3 else [cfg.data.image_size] * 2
            shape = tuple(side // factor for side in sides)
        else:
            fields = fields_from_config(cfg.data)
            shape = tuple(cfg.data.volume_shape) if cfg.data.dims == 3 else (cfg.data.image_size,) * 2
        task = Task(cfg.task, fields, shape)
        net = build_denoiser(cfg.model, task)
    assert net.unet.config.out_channels == task.target_channels
    assert net.unet.__class__.__name__ == ("UNet3DModel" if len(shape) == 3 else "UNet2DModel")


def test_print_config_round_trips(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_diffusion.py"), "--print-config",
                             "training.lr=0.00123", "diffusion.strategy=ddpm",
                             "diffusion.timestep_sampling=uniform"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(result.stdout)
    cfg = resolve(saved, [])
    assert cfg.training.lr == 0.00123 and cfg.diffusion.strategy == "ddpm"
    assert cfg == resolve(REPO / "configs/demo.yaml", ["training.lr=0.00123", "diffusion.strategy=ddpm",
                                                       "diffusion.timestep_sampling=uniform"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.block_out_channel'.*model.block_out_channels"):
        resolve(None, ["model.block_out_channel=[8]"])
    with pytest.raises(ConfigError, match="training.batch_size"):
        resolve(None, ["training.batch_size=1.5x"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        resolve(None, ["training.lr"])


@pytest.mark.parametrize("overrides, message", [
    (["training.batch_size=0"], "training.batch_size=0 must be >= 1"),
    (["validation.every=0"], "validation.every"),
    (["run.num_threads=-1"], "run.num_threads"),
    (["data.flip_prob=1.0"], "data.flip_prob=1.0 must be in [0, 1)"),
    (["training.ema_decay=1.0"], "training.ema_decay"),
    (["training.adam_betas=[0.9]"], "training.adam_betas"),
    (["training.adam_betas=[0.9,1.5]"], "training.adam_betas"),
    (["model.block_out_channels=[]"], "model.block_out_channels"),
    (["task.loss_weights={t1: -1.0}"], "task.loss_weights"),
    (["training.lr_schedule=step"], "training.lr_schedule='step' is not one of constant"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode"),
    (["vae.kind=vqgan"], "vae.kind"),
    (["vae.disc_loss=wasserstein"], "vae.disc_loss"),
    (["eval.split=train"], "eval.split"),
    (["training.resume="], "training.resume"),
    (["data.kind=dicom"], "data.kind"),
    (["latent.source_kind=dicom"], "latent.source_kind"),
    (["data.demo=ihc"], "data.kind=tiles"),
    (["data.kind=tiles", "data.tile_size=0"], "data.tile_size"),
    (["data.kind=latent_cache"], "latent.cache_dir and latent.autoencoder"),
    (["diffusion.strategy=edm"], "diffusion.strategy"),
    (["diffusion.strategy=rflow", "diffusion.sampler=ddim"], "diffusion.sampler"),
    (["validation.sampling_steps=1001"], "validation.sampling_steps=1001 must be <= diffusion.num_train_timesteps"),
    (["diffusion.guidance_scale=0"], "task.cond_drop_prob"),
    (["model.attention_levels=[false,true]"], "model.attention_levels has 2 entries"),
    (["model.block_out_channels=[32,60,128]"], "model.norm_num_groups"),
    (["model.attention_head_dim=48"], "model.attention_head_dim=48"),
    (["data.image_size=66"], "data.image_size=66 must be divisible by 4"),
    (["vae.block_out_channels=[32,60]"], "vae.norm_num_groups"),
])
def test_check_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(resolve(None, overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_config_accepts_what_works():
    check_config(resolve(None, []))
    check_config(resolve(None, ["diffusion.guidance_scale=2", "task.cond_drop_prob=0.1"]))
    check_config(resolve(None, ["diffusion.strategy=rflow", "validation.sampling_steps=5000"]))  # rflow: any count
    # A resume folder that is gone (rotated away) is refused when a run resumes, not when evaluate.py reads its run.
    check_config(resolve(None, ["training.resume=runs/x/checkpoints/checkpoint-500"]))


@pytest.mark.parametrize("key, replacement", [("diffusion.sampling_steps=25", "eval.sampling_steps"),
                                              ("validation.max_batches=4", "validation.num_items")])
def test_removed_keys_say_what_replaced_them(tmp_path, key, replacement):
    preset = tmp_path / "old.yaml"
    section, rest = key.split(".")
    name, value = rest.split("=")
    preset.write_text(f"{section}:\n  {name}: {value}\n")
    for source in ([preset, []], [None, [key]]):
        with pytest.raises(ConfigError, match=rf"'{section}\.{name}' .* was removed: .*{replacement}"):
            resolve(*source)
