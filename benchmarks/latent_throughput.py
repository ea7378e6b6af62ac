"""Latent cache throughput: encode_latents.py against the bare encoder on the same batches, and the cache
loader against decoding the source images.

    python benchmarks/latent_throughput.py [--config configs/demo_pathology_ldm.yaml] [section.key=value ...]

The autoencoder is the preset's architecture (configs/demo_pathology_vae.yaml), freshly initialised and
exported to a temporary folder: speed does not depend on its weights. Source decoding is what training without
a cache pays to turn the image files into tiles or slices (read, decode, normalise, cut).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import encode_latents  # noqa: E402
from data import build_datasets  # noqa: E402
from data.latent_cache import LatentCacheDataset  # noqa: E402
from data.nifti import load_slice_dataset  # noqa: E402
from data.tiles import load_tile_dataset  # noqa: E402
from models.autoencoder import FrozenAutoencoder, build_autoencoder, describe_autoencoder, export_autoencoder  # noqa: E402
from utils import config as config_lib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_pathology_ldm.yaml")
    parser.add_argument("--vae-config", type=Path, default=REPO / "configs" / "demo_pathology_vae.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = config_lib.resolve(args.config, [*args.overrides, f"latent.cache_dir={tmp / 'cache'}",
                                               f"latent.autoencoder={tmp / 'vae'}"])
        source = dataclasses.replace(cfg.data, kind=cfg.latent.source_kind)
        datasets = build_datasets(source, tmp / "split", cfg.run.seed)
        vae_cfg = config_lib.resolve(args.vae_config, []).vae
        torch.manual_seed(0)
        vae = build_autoencoder(vae_cfg, sum(datasets["train"][0][n].shape[0] for n in vae_cfg.inputs))
        export_autoencoder(tmp / "vae", vae, describe_autoencoder(
            vae, {n: datasets["train"][0][n].shape[0] for n in vae_cfg.inputs}, datasets["train"], cfg.data.image_size))

        # The bare encoder on the batches encode_latents.py makes (collate included: it is part of the input).
        autoencoder = FrozenAutoencoder.load(tmp / "vae")
        items = [d[i] for d in datasets.values() for i in range(len(d))]
        start = time.perf_counter()
        for b in range(0, len(items), cfg.latent.batch_size):
            batch = default_collate(items[b:b + cfg.latent.batch_size])
            autoencoder.encode(torch.cat([batch[n] for n in vae_cfg.inputs], dim=1))
        bare = len(items) / (time.perf_counter() - start)
        start = time.perf_counter()
        encode_latents.main(["--config", str(args.config), *args.overrides, f"latent.cache_dir={tmp / 'cache'}",
                             f"latent.autoencoder={tmp / 'vae'}"])
        script = len(items) / (time.perf_counter() - start)

        # Loading: one pass over the training items from the cache vs decoding them from the source files.
        cache = LatentCacheDataset(tmp / "cache", "train")
        loader = DataLoader(cache, batch_size=cfg.training.batch_size, shuffle=True)
        epochs = max(1, 8192 // len(cache))  # enough batches that the loader's start-up does not dominate
        start = time.perf_counter()
        for _ in range(epochs):
            for _ in loader:
                pass
        from_cache = epochs * len(cache) / (time.perf_counter() - start)
        start = time.perf_counter()
        decoded = (load_tile_dataset if source.kind == "tiles" else load_slice_dataset)(source)
        from_source = len(decoded) / (time.perf_counter() - start)

    print(f"encoder alone      : {bare:9.1f} items/s")
    print(f"encode_latents.py  : {script:9.1f} items/s  ({script / bare:.2f}x the encoder alone, target >= 0.9x; "
          "includes data loading, writing shards and the manifest)")
    print(f"cache loader       : {from_cache:9.1f} items/s")
    print(f"source decoding    : {from_source:9.1f} items/s  (cache is {from_cache / from_source:.1f}x faster, "
          "target >= 20x)")


if __name__ == "__main__":
    main()
