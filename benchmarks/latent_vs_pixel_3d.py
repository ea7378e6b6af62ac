"""Training-step time of the UNet3D in pixel space against latent space, at the 3D presets' settings.

    python benchmarks/latent_vs_pixel_3d.py [--steps 20] [--warmup 3] [--repeats 2] [--threads 0] [key=value ...]

Pixel space: configs/demo_3d.yaml, its model section and batch size, a 1 x 16 x 48 x 48 target given a 1-channel
condition. Latent space: configs/demo_ldm3d.yaml, a 4 x 8 x 24 x 24 target given a 4-channel condition, the
latents of the autoencoder of configs/demo_vae3d.yaml. A third row puts the pixel preset's UNet (its widths, blocks
and attention; the first and last convolutions follow the channels) on the latents at the latent preset's batch
size, which separates what the smaller input saves from what the smaller model saves. A step is the one
train_diffusion.py takes: the strategy's elementwise loss reduced by the task, backward, gradient clipping with its
host sync, AdamW. Batches are the demo's slabs and those slabs encoded by the preset's autoencoder, freshly
initialised: the time of a step does not depend on the weights or the values. The timed steps' mean is kept, best
of --repeats alternating rounds (load from elsewhere only ever slows a round down). "saved MiB" is what one forward
pass and loss keep for the backward pass (tensors saved by autograd, each storage once): the activation memory of
a step, on any device. key=value overrides apply to both presets.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bare_step import collated_batches, mean_step_seconds  # noqa: E402
from data import build_datasets  # noqa: E402
from diffusion import build_strategy  # noqa: E402
from diffusion.task import Field, Task, fields_from_config  # noqa: E402
from encode_latents import latents_of  # noqa: E402
from models.autoencoder import FrozenAutoencoder, build_autoencoder  # noqa: E402
from models.unet2d import build_denoiser  # noqa: E402
from utils import config as config_lib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def slab_batches(data_cfg, seed: int, batch_size: int, tmp: Path, count: int = 4) -> list[dict]:
    """`count` collated training batches of the preset's source slabs."""
    return collated_batches(build_datasets(data_cfg, tmp, seed)["train"], batch_size, count)


def encode_batches(batches: list[dict], autoencoder: FrozenAutoencoder, latents: dict[str, list[str]]) -> list[dict]:
    """Each batch's images as the latents encode_latents.py would cache (raw: the scale does not change speed)."""
    return [{"item_id": b["item_id"], **{name: autoencoder.encode(torch.cat([b[n] for n in names], dim=1))
                                         for name, names in latents.items()}} for b in batches]


def saved_mib(model, task: Task, strategy, batch: dict) -> float:
    """MiB that one forward pass and the loss keep for the backward pass (activations: each storage once, the
    weights that layers save not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        elementwise, _ = strategy.loss_terms(model, task.targets_of(batch), task.condition_of(batch))
        task.reduce(elementwise, batch)[0].mean()
    return sum(storages.values()) / 2 ** 20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixel-config", type=Path, default=REPO / "configs" / "demo_3d.yaml")
    parser.add_argument("--latent-config", type=Path, default=REPO / "configs" / "demo_ldm3d.yaml")
    parser.add_argument("--vae-config", type=Path, default=REPO / "configs" / "demo_vae3d.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the fastest of each is kept")
    parser.add_argument("--batch-size", type=int, default=0, help="one batch size for all rows (0: the presets')")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pixel = config_lib.resolve(args.pixel_config, args.overrides)
    latent = config_lib.resolve(args.latent_config, args.overrides)
    vae_preset = config_lib.resolve(args.vae_config, [])

    # Batches: the pixel preset's slabs; the latent preset's source slabs encoded image by image.
    with tempfile.TemporaryDirectory() as tmp:
        pixel_batches = slab_batches(pixel.data, pixel.run.seed, args.batch_size or pixel.training.batch_size,
                                     Path(tmp) / "pixel")
        source = dataclasses.replace(latent.data, kind=latent.latent.source_kind)
        source_batches = slab_batches(source, latent.run.seed, args.batch_size or latent.training.batch_size,
                                      Path(tmp) / "latent")
    latents = latents_of(vae_preset.vae.inputs, latent.latent.encode_each)
    channels = sum(source_batches[0][n].shape[1] for n in next(iter(latents.values())))
    torch.manual_seed(0)
    autoencoder = FrozenAutoencoder(build_autoencoder(vae_preset.vae, channels, vae_preset.data.training_shape()))
    latent_batches = encode_batches(source_batches, autoencoder, latents)
    latent_fields = {name: Field(name, "image", autoencoder.latent_channels) for name in latents}

    # Tasks and models, each built as train_diffusion.py builds it.
    pixel_task = Task(pixel.task, fields_from_config(pixel.data), pixel_batches[0][pixel.task.targets[0]].shape[2:])
    latent_task = Task(latent.task, latent_fields, latent_batches[0][latent.task.targets[0]].shape[2:])
    rows = {"pixel (pixel preset's UNet)": (pixel, pixel.model, pixel_task, pixel_batches),
            "latent (latent preset's UNet)": (latent, latent.model, latent_task, latent_batches),
            "latent, pixel preset's UNet": (latent, pixel.model, latent_task, latent_batches)}
    results = {name: {"step_s": float("inf")} for name in rows}
    for _ in range(args.repeats):
        for name, (cfg, model_cfg, task, batches) in rows.items():
            torch.manual_seed(cfg.run.seed)  # the initial weights
            model = build_denoiser(model_cfg, task)
            strategy = build_strategy(cfg.diffusion)
            step_s = mean_step_seconds(model, task, strategy, batches, cfg, args.steps, args.warmup)
            results[name] = {"step_s": min(step_s, results[name]["step_s"]), "batch": len(batches[0]["item_id"]),
                             "widths": list(model_cfg.block_out_channels),
                             "input": (task.target_channels + task.condition_channels, *task.spatial_shape),
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "saved_mib": saved_mib(model, task, strategy, batches[0])}

    print("command:", shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *argv]))
    print(f"torch threads: {torch.get_num_threads()} (every row), CPU; strategy {pixel.diffusion.strategy} (pixel), "
          f"{latent.diffusion.strategy} (latent); mean of {args.steps} timed steps after {args.warmup}, best of "
          f"{args.repeats} rounds")
    print(f"{'':30s} {'input (C, D, H, W)':>18s} {'UNet widths':>13s} {'batch':>5s} {'parameters':>10s} "
          f"{'ms/step':>9s} {'samples/s':>9s} {'saved MiB':>9s}")
    for name, r in results.items():
        r["samples_s"] = r["batch"] / r["step_s"]
        print(f"{name:30s} {str(r['input']):>18s} {str(r['widths']):>13s} {r['batch']:5d} {r['parameters']:10d} "
              f"{1000 * r['step_s']:9.1f} {r['samples_s']:9.2f} {r['saved_mib']:9.1f}")
    px, lt, same = results.values()
    print(f"latent over pixel, at the presets: {lt['samples_s'] / px['samples_s']:.1f}x the samples/s "
          f"({px['step_s'] / lt['step_s']:.1f}x per step)")
    print(f"  from the input (the pixel preset's UNet on latents): {same['samples_s'] / px['samples_s']:.1f}x "
          f"(per step {px['step_s'] / same['step_s']:.1f}x)")
    print(f"  from the latent preset's UNet on top of that:       {lt['samples_s'] / same['samples_s']:.1f}x")
    return results


if __name__ == "__main__":
    main()
