"""The latent chain on the real pathology demo: train_vae.py -> encode_latents.py (2 processes) -> train_diffusion.py
on the cache -> evaluate.py in pixel space; plus the cache's refusals and resumable encoding."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file, save_file

import encode_latents
import evaluate
import train_diffusion
import train_vae
from data import build_datasets
from data.latent_cache import LatentCacheDataset, check_held_out
from tests.runs import REPO, read_metrics, run_script
from utils.config import ConfigError, resolve
from utils.logging import get_logger

TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("latent")
    data_root = base / "demo_ihc"  # the demo builds only into a folder of its own name
    common = [f"data.root={data_root}", "data.tile_size=32", "data.tile_stride=32", "logging.trackers=[csv]"]
    vae = base / "vae"
    train_vae.main(["--config", str(REPO / "configs/demo_pathology_vae.yaml"), f"run.output_dir={vae}", *common,
                    "vae.block_out_channels=[8,16,16]", "vae.disc_start=2", "vae.disc_channels=8",
                    "training.max_steps=3", "training.batch_size=4", "training.checkpoint_every=3",
                    "validation.every=3", "validation.num_items=4", "validation.num_samples=2"])
    ldm = ["--config", str(REPO / "configs/demo_pathology_ldm.yaml"), *common,
           f"latent.autoencoder={vae / 'final'}", "latent.shard_size=16", "latent.batch_size=8",
           "model.block_out_channels=[16,32]", "model.attention_head_dim=16"]
    return {"base": base, "vae": vae, "ldm": ldm, "data_root": data_root}


@pytest.fixture(scope="module")
def single_cache(chain):
    """The cache written by one process."""
    cache = chain["base"] / "cache1"
    encode(chain, cache)
    return cache


def encode(chain, cache, *extra, processes=1):
    args = [*chain["ldm"], f"latent.cache_dir={cache}", *extra]
    if processes == 1:
        encode_latents.main(args)
        return None
    return run_script("encode_latents.py", args, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                      launch=TWO_PROCESSES)


def shard_tensors(cache):
    return {p.name: load_file(p) for p in sorted(cache.glob("shard-*.safetensors"))}


def test_chain_vae_encode_on_two_processes_train_and_evaluate(chain, single_cache):
    cache = chain["base"] / "cache2"
    result = encode(chain, cache, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())

    # The cache holds every tile that passed the filter, once, in the split the source data gives.
    cfg = resolve(REPO / "configs/demo_pathology_ldm.yaml", chain["ldm"][2:] + [f"latent.cache_dir={cache}",
                                                                                  "data.kind=tiles"])
    source = build_datasets(cfg.data, chain["base"] / "split-check", cfg.run.seed)
    cached = [item for s in manifest["shards"] for item in s["items"]]
    assert len(cached) == len(set(cached)) == sum(len(d) for d in source.values())
    for split, dataset in source.items():
        assert LatentCacheDataset(cache, split).item_ids == dataset.item_ids
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["scale"] > 0
    assert manifest["reconstruction_psnr"] > 5

    # The same cache as one process would write, shard for shard.
    a, b = shard_tensors(cache), shard_tensors(single_cache)
    assert a.keys() == b.keys() and all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])

    # Train on the cache (class-distribution condition with dropout for guidance), then evaluate in pixels.
    run = chain["base"] / "ldm"
    train_diffusion.main([*chain["ldm"], f"latent.cache_dir={cache}", f"run.output_dir={run}",
                          "training.max_steps=4", "training.batch_size=8", "validation.every=4",
                          "validation.sample_every=4", "validation.sampling_steps=2", "validation.num_samples=3",
                          "training.checkpoint_every=4"])
    assert {"train/loss", "val/loss"} <= {n for _, n, _ in read_metrics(run)}
    assert UNet2DModel.from_pretrained(run / "final", subfolder="unet").config.class_embed_type == "identity"
    assert AutoencoderKL.from_pretrained(run / "final", subfolder="vae").config.latent_channels == 4
    assert (run / "final" / "vector_embedding.safetensors").is_file()
    assert json.loads((run / "split.json").read_text()) == manifest["split"]

    evaluate.main(["--run", str(run), "eval.num_items=4", "eval.sampling_steps=2", "eval.samples_per_item=2"])
    out = run / "eval" / "final-euler2"
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["diversity_msssim"]["n"] == 4
    npz = np.load(next((out / "samples").glob("*.npz")))
    assert npz["generated"].shape == (2, 3, 32, 32)  # decoded RGB tiles, two samples
    assert npz["generated"].min() >= -1 and npz["generated"].max() <= 1


def test_cache_of_another_encoder_is_refused(chain, single_cache, tmp_path):
    cache = single_cache
    other = tmp_path / "other"
    shutil.copytree(chain["vae"] / "final", other)
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[next(iter(state))] += 0.01
    save_file(state, weights)
    result = run_script("train_diffusion.py", [*chain["ldm"], f"latent.cache_dir={cache}",
                                               f"latent.autoencoder={other}", f"run.output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2 and "different autoencoder" in result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_shard_is_named(chain, single_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(single_cache, cache)
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run_script("train_diffusion.py", [*chain["ldm"], f"latent.cache_dir={cache}",
                                               f"run.output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2 and "shard-00001.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


def test_interrupted_encode_resumes_without_redoing_shards(chain, single_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(single_cache, cache)
    # An interruption: the manifest and the last shards were never written.
    (cache / "manifest.json").unlink()
    shards = sorted(cache.glob("shard-*.safetensors"))
    for late in shards[2:]:
        late.unlink()
    kept = {p.name: os.stat(p).st_mtime_ns for p in shards[:2]}
    encode(chain, cache)
    assert {p.name: os.stat(cache / p.name).st_mtime_ns for p in shards[:2]} == kept  # not re-encoded
    again, original = shard_tensors(cache), shard_tensors(single_cache)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[s][k], original[s][k]) for s in again for k in again[s])
    reference = json.loads((single_cache / "manifest.json").read_text())
    resumed = json.loads((cache / "manifest.json").read_text())
    assert resumed["scale"] == reference["scale"] and resumed["shards"] == reference["shards"]


def test_cache_dir_of_other_data_is_refused(chain, single_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(single_cache, cache)
    result = run_script("encode_latents.py", [*chain["ldm"], f"latent.cache_dir={cache}", "data.tile_stride=16"])
    assert result.returncode == 2 and "other data" in result.stderr


def test_autoencoder_export_records_its_training_items(chain):
    description = yaml.safe_load((chain["vae"] / "final" / "autoencoder.yaml").read_text())
    split = json.loads((chain["vae"] / "split.json").read_text())
    items = description["train_items"]
    assert split["unit"] == "subject" and len(items) == len(set(items)) > 0
    assert {item.rsplit("/", 1)[0] for item in items} == set(split["train"])


def test_cache_holding_out_training_items_of_the_autoencoder_is_refused(chain, tmp_path):
    """An image the autoencoder trained on, held out by the cache's split, stops encoding before any shard."""
    split = json.loads((chain["vae"] / "split.json").read_text())
    seen = next(image for image in split["train"] if image != "ihc_extra")  # a labelled image
    cache = tmp_path / "cache"
    cache.mkdir()
    swapped = {**split, "train": sorted(split["val"] + [i for i in split["train"] if i != seen]), "val": [seen]}
    (cache / "split.json").write_text(json.dumps(swapped))
    folder = re.escape(str(chain["vae"] / "final"))
    with pytest.raises(ConfigError, match=rf"\d+ of the \d+ val items of the latent cache \(e\.g\. "
                                          rf"'{seen}/y\d+_x\d+'\) were training items of the autoencoder {folder}"):
        encode(chain, cache)
    assert not list(cache.glob("shard-*"))


def test_autoencoder_without_recorded_training_items_is_warned_about(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    get_logger().addHandler(handler)
    try:
        check_held_out(None, {"val": ["a/y00000_x00000"]}, "external/vae", tmp_path)
        check_held_out(["a/y00000_x00000"], {"val": ["b/y00000_x00000"]}, "exported/final", tmp_path)
    finally:
        get_logger().removeHandler(handler)
    assert [(r.levelno, "external/vae" in r.getMessage()) for r in records] == [(logging.WARNING, True)]
