"""Latent cache throughput: encode_latents.py on 1 and 2 processes against the bare encoder on the same batches,
and the cache loader against building the items from the source files. 2D tiles or slices, or 3D volumes: the
presets decide.

    python benchmarks/latent_throughput.py [--config configs/demo_pathology_ldm.yaml] [--threads 1] [key=value ...]
    python benchmarks/latent_throughput.py --config configs/demo_ldm3d.yaml --vae-config configs/demo_vae3d.yaml
    # the same with 38 volumes instead of 10 (2 mm voxels, the same 16 x 48 x 48 items) and shards that split evenly
    python benchmarks/latent_throughput.py --config configs/demo_ldm3d.yaml --vae-config configs/demo_vae3d.yaml \\
        "data.spacing=[2,2,2]" latent.shard_size=2

The autoencoder is the VAE preset's architecture, built for its training samples' dims, freshly initialised and
exported to a temporary folder: speed does not depend on its weights. Everything runs on the CPU with --threads
torch threads per process: the bare encoder in this process, encode_latents.py under `accelerate launch` on 1 and
on 2 processes (on 2 cores, 1 thread each is the fair comparison). Each launch is timed in encode_latents.main()
(model and source loading, shards, the manifest's decode check; not the interpreter's start-up and imports) and in
its shard loop, the part that grows with the data set: on the small demos the fixed costs dominate the first.
Round-robin shards bound the 2-process speed-up; the output says by how much (a smaller latent.shard_size
balances them). Source decoding is what training without a cache pays to build its items from the image files
(read, resample, normalise, degrade, cut).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
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
from models.autoencoder import FrozenAutoencoder, build_autoencoder, describe_autoencoder, export_autoencoder  # noqa: E402
from utils import config as config_lib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def launch_encode(args, tmp: Path, processes: int) -> dict:
    """Seconds of one `accelerate launch encode_latents.py` run on the CPU, from the first process entering its
    main() to the last one leaving it, and in its shard loop (the first shard's start to the last shard's end), and
    the torch threads of each process."""
    timings = tmp / f"timings{processes}"
    timings.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(args.threads),
               *(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
               str(Path(__file__).resolve()), "--worker", str(timings), "--threads", str(args.threads),
               "--config", str(args.config), *args.overrides, f"latent.cache_dir={tmp / f'cache{processes}'}",
               f"latent.autoencoder={tmp / 'vae'}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"encode_latents.py on {processes} process(es) failed:\n{run.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(timings.glob("rank*.json"))]

    def span(key: str) -> float:
        spans = [r[key] for r in ranks if r[key]]
        return max(end for _, end in spans) - min(start for start, _ in spans)

    return {"main": span("main"), "shards": span("shards"), "threads": [r["threads"] for r in ranks]}


def worker(args) -> None:
    """One process of launch_encode: encode_latents.main, recording when this process encodes and writes shards."""
    spans = []

    def timed(fn):
        def wrapper(*a, **kw):
            start = time.time()  # wall clock: comparable across the processes of one machine
            result = fn(*a, **kw)
            spans.append((start, time.time()))
            return result
        return wrapper

    # main() looks these up when it calls them, so the shard loop is timed without touching the script.
    encode_latents.encode_shard = timed(encode_latents.encode_shard)
    encode_latents.write_shard = timed(encode_latents.write_shard)
    start = time.time()
    encode_latents.main(["--config", str(args.config), *args.overrides])
    record = {"threads": torch.get_num_threads(), "main": [start, time.time()],
              "shards": [spans[0][0], spans[-1][1]] if spans else None}
    (args.worker / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_pathology_ldm.yaml")
    parser.add_argument("--vae-config", type=Path, default=REPO / "configs" / "demo_pathology_vae.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a process of launch_encode
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = config_lib.resolve(args.config, args.overrides)
        source = dataclasses.replace(cfg.data, kind=cfg.latent.source_kind)
        datasets = build_datasets(source, tmp / "split", cfg.run.seed)
        vae_preset = config_lib.resolve(args.vae_config, [])
        channels = {n: datasets["train"][0][n].shape[0] for n in vae_preset.vae.inputs}
        sample_shape = vae_preset.data.training_shape()  # 2 or 3 sizes: a 2D autoencoder or a PatchVolume
        torch.manual_seed(0)
        vae = build_autoencoder(vae_preset.vae, sum(channels.values()), sample_shape)
        export_autoencoder(tmp / "vae", vae, describe_autoencoder(vae, channels, datasets["train"], sample_shape))

        # The bare encoder on the batches encode_latents.py makes (collate included: it is part of the input), one
        # encoder call per latent (latent.encode_each: each image into its own).
        autoencoder = FrozenAutoencoder.load(tmp / "vae")
        latents = encode_latents.latents_of(list(channels), cfg.latent.encode_each)
        items = [d[i] for d in datasets.values() for i in range(len(d))]
        start = time.perf_counter()
        for b in range(0, len(items), cfg.latent.batch_size):
            batch = default_collate(items[b:b + cfg.latent.batch_size])
            shapes = {latent: tuple(autoencoder.encode(torch.cat([batch[n] for n in names], dim=1)).shape[1:])
                      for latent, names in latents.items()}
        bare = len(items) / (time.perf_counter() - start)

        # encode_latents.py on 1 and 2 processes; round-robin shards bound the speed-up of 2.
        script = {processes: launch_encode(args, tmp, processes) for processes in (1, 2)}
        shards = encode_latents.plan_shards(datasets, cfg.latent.shard_size)
        per_process = [sum(len(s["items"]) for s in shards[rank::2]) for rank in range(2)]

        # Loading: one pass over the training items from the cache vs building them from the source files.
        cache = LatentCacheDataset(tmp / "cache1", "train")
        loader = DataLoader(cache, batch_size=cfg.training.batch_size, shuffle=True)
        epochs = max(1, 8192 // len(cache))  # enough batches that the loader's start-up does not dominate
        start = time.perf_counter()
        for _ in range(epochs):
            for _ in loader:
                pass
        from_cache = epochs * len(cache) / (time.perf_counter() - start)
        start = time.perf_counter()
        built = build_datasets(source, tmp / "decode", cfg.run.seed)
        from_source = sum(len(d) for d in built.values()) / (time.perf_counter() - start)

    unit = "volumes" if autoencoder.spatial_dims == 3 else "items"
    one, two = ({k: len(items) / v for k, v in script[p].items() if k != "threads"} for p in (1, 2))
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"threads: {torch.get_num_threads()} torch thread(s) here (the bare encoder); in each encode_latents.py "
          f"process (OMP_NUM_THREADS={args.threads}): 1 process {script[1]['threads']}, 2 processes "
          f"{script[2]['threads']}; CPU, {os.cpu_count()} cores")
    print(f"data: {len(items)} {unit} of {tuple(items[0][next(iter(channels))].shape)} "
          f"({', '.join(f'{len(d)} {n}' for n, d in datasets.items())}); "
          f"latents {', '.join(f'{k} {v}' for k, v in shapes.items())}; "
          f"{len(shards)} shards (latent.shard_size={cfg.latent.shard_size}), {unit} per process on 2: {per_process}")
    print(f"{'':34s} {unit + '/s':>10s}")
    print(f"{'encoder alone':34s} {bare:10.1f}")
    print(f"{'encode_latents.py, 1 proc, shards':34s} {one['shards']:10.1f}  "
          f"({one['shards'] / bare:.2f}x the encoder alone, target >= 0.9x)")
    print(f"{'encode_latents.py, 2 proc, shards':34s} {two['shards']:10.1f}  "
          f"({two['shards'] / one['shards']:.2f}x 1 process, target >= 1.8x; shards allow "
          f"{len(items) / max(per_process):.2f}x)")
    print(f"{'encode_latents.py, 1 proc, total':34s} {one['main']:10.1f}  "
          f"({one['main'] / bare:.2f}x the encoder alone)")
    print(f"{'encode_latents.py, 2 proc, total':34s} {two['main']:10.1f}  "
          f"({two['main'] / one['main']:.2f}x 1 process)")
    print(f"{'cache loader':34s} {from_cache:10.1f}")
    print(f"{'source decoding':34s} {from_source:10.1f}  (cache is {from_cache / from_source:.1f}x faster, "
          "target >= 20x)")
    print("shards: the script's shard loop (encode, write); total: its main() (model and source loading, shards, "
          "manifest and its decode check; not the interpreter's start-up); both from the first process to the last")

if __name__ == "__main__":
    main()
