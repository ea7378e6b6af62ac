"""Memory that gradient checkpointing saves at the demo sizes, and its step-time cost, in one run: the UNets of the
diffusion presets (model.gradient_checkpointing) and the autoencoders of the autoencoder presets
(vae.gradient_checkpointing), by default the 2D UNet and KL autoencoder and the 3D UNet and PatchVolume.

    python benchmarks/checkpointing_memory.py [--unet-configs configs/demo.yaml configs/demo_3d.yaml]
        [--vae-configs configs/demo_vae.yaml configs/demo_vae3d.yaml] [--steps 5] [--warmup 1] [--repeats 2]
        [--batch-size 0] [--device cpu] [--json out.json] [key=value ...]

Each network is built twice from the preset's seed, plain and checkpointed, and trained on the preset's batches
(3D autoencoders on its patches); key=value overrides apply to every preset. Three measures:
- saved MiB: what one training forward and loss keep for the backward pass, the tensors autograd saves
  (saved_tensors_hooks), each storage once, weights excluded. A checkpointed block keeps only its inputs. Exact and
  the same on any device.
- peak MiB: how far one forward + backward raises memory above the built network: torch.cuda.max_memory_allocated
  on a GPU; on the CPU the process's peak resident set (VmHWM, reset just before) over its resident set then, with
  glibc serving blocks over 64 KiB by mmap so that freed tensors leave the resident set (as in benchmarks/unet3d.py).
  It includes the gradients and the kernels' workspace, which checkpointing does not save.
- ms/step: bare_step.py's training step (loss, backward, clipping, AdamW), the mean of --steps after --warmup, the
  fastest of --repeats alternating rounds (load from elsewhere only ever slows a round down). The peak is the
  smallest of --repeats measurements, for the same reason.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bare_step import mean_step_seconds  # noqa: E402
from benchmarks.demo_networks import DemoNetwork, load_autoencoder, load_denoiser  # noqa: E402
from benchmarks.latent_vs_pixel_3d import saved_mib  # noqa: E402
from benchmarks.unet3d import rss_kib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def resident_set_follows_live_memory() -> bool:
    """Have glibc mmap blocks over 64 KiB, so that freeing one returns it to the OS; False where this process's
    peak resident set cannot be measured that way (no glibc, no /proc/self/clear_refs)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, 65536) == 1 and Path("/proc/self/clear_refs").exists()


def peak_mib(model: torch.nn.Module, net: DemoNetwork, device: str) -> float:
    """MiB by which one forward + backward of the first batch raises memory above the network without gradients."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    net.loss(model, net.batches[0]).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024
    model.zero_grad(set_to_none=True)
    return (peak - baseline) / 2 ** 20


def measure(net: DemoNetwork, args, peak_measurable: bool) -> dict:
    """Plain against checkpointed: saved MiB, peak MiB (None where not measurable) and seconds per step."""
    models = {"plain": net.build(False), "checkpointed": net.build(True)}
    rows = {name: {"step_s": float("inf"), "peak_mib": float("inf") if peak_measurable else None}
            for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            row = rows[name]
            row["step_s"] = min(row["step_s"], mean_step_seconds(model, net.task, net.strategy, net.batches,
                                                                 net.cfg, args.steps, args.warmup))
            if peak_measurable:  # after the steps: lazily made kernels and buffers already exist
                row["peak_mib"] = min(row["peak_mib"], peak_mib(model, net, args.device))
    for name, model in models.items():
        rows[name]["saved_mib"] = saved_mib(model, net.task, net.strategy, net.batches[0])
    plain, checkpointed = rows.values()
    peak_ratio = None  # at tiny sizes the rise can be nothing the resident set shows
    if peak_measurable and plain["peak_mib"] > 0:
        peak_ratio = checkpointed["peak_mib"] / plain["peak_mib"]
    inner = models["plain"].unet if hasattr(models["plain"], "unet") else models["plain"].vae
    return {"config": str(net.config), "network": type(inner).__name__, "batch_size": net.batch_size,
            "input": list(net.input_shape), "parameters": sum(p.numel() for p in inner.parameters()),
            "plain": plain, "checkpointed": checkpointed,
            "saved_ratio": checkpointed["saved_mib"] / plain["saved_mib"],
            "peak_ratio": peak_ratio,
            "time_ratio": checkpointed["step_s"] / plain["step_s"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-configs", type=Path, nargs="*",
                        default=[REPO / "configs" / "demo.yaml", REPO / "configs" / "demo_3d.yaml"])
    parser.add_argument("--vae-configs", type=Path, nargs="*",
                        default=[REPO / "configs" / "demo_vae.yaml", REPO / "configs" / "demo_vae3d.yaml"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the fastest is kept")
    parser.add_argument("--batch-size", type=int, default=0, help="items per step (0: each preset's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every preset")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (this torch build: " + torch.__version__ + ")")
    peak_measurable = args.device == "cuda" or resident_set_follows_live_memory()

    networks = {}
    with tempfile.TemporaryDirectory() as tmp:
        presets = [(load_denoiser, c) for c in args.unet_configs] + [(load_autoencoder, c) for c in args.vae_configs]
        for i, (load, config) in enumerate(presets):
            net = load(config, args.overrides, Path(tmp) / str(i), args.batch_size, args.device)
            networks[config.stem] = measure(net, args, peak_measurable)
    peak_source = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                   "peak resident set (VmHWM)" if peak_measurable else "not measurable here")
    results = {"command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *argv]),
               "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
               "peak": peak_source, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
               "networks": networks}

    print("command:", results["command"])
    print(f"torch {torch.__version__}, {args.device}, {results['threads']} threads; peak: {peak_source}; ms/step: "
          f"mean of {args.steps} steps after {args.warmup}, fastest of {args.repeats} rounds")
    print("| preset | network | batch x input | saved MiB plain | checkpointed | ratio | peak MiB plain "
          "| checkpointed | ratio | ms/step plain | checkpointed | time ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def mib(value):
        return "n/a" if value is None else f"{value:.1f}"

    for name, r in networks.items():
        plain, checkpointed = r["plain"], r["checkpointed"]
        peak_ratio = "n/a" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}"
        print(f"| {name} | {r['network']} | {r['batch_size']} x {tuple(r['input'])} | {plain['saved_mib']:.1f} | "
              f"{checkpointed['saved_mib']:.1f} | {r['saved_ratio']:.2f} | {mib(plain['peak_mib'])} | "
              f"{mib(checkpointed['peak_mib'])} | {peak_ratio} | {1000 * plain['step_s']:.0f} | "
              f"{1000 * checkpointed['step_s']:.0f} | {r['time_ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
