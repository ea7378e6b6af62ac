"""Training-step time and peak memory of UNet3DModel, with and without gradient checkpointing, against MONAI's
DiffusionModelUNet(spatial_dims=3) at the same widths, blocks per level, attention levels and head size.

    python benchmarks/unet3d.py [--shape 32 32 32] [--widths 32 64 128] [--steps 5] [--batch-size 1]

MONAI is needed for this benchmark only (`pip install monai`); without it the script says so and measures
UNet3DModel alone. Each configuration runs in a fresh subprocess so one does not inherit another's memory high-water
mark. A step is forward + MSE loss + backward + AdamW. Peak memory is `torch.cuda.max_memory_allocated` on a GPU;
on CPU it is the rise of the process's peak resident set (VmHWM, reset after the warm-up steps) over its resident
set at that point (model, batch and optimizer state built), so it counts activations, gradients and kernel
workspace; large blocks are mmap-ed so freed memory leaves the resident set. On a GPU the baseline is taken at the
same point. At CPU sizes the conv3d workspace, which checkpointing cannot save, weighs more than on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.unet3d import build_unet3d  # noqa: E402
from utils.config import ModelConfig  # noqa: E402

CONFIGURATIONS = ("unet3d", "unet3d+checkpointing", "monai")


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(name: str, args) -> torch.nn.Module:
    """The network of one configuration; both take (B, C, D, H, W) and a (B,) timestep."""
    if name == "monai":
        from monai.networks.nets import DiffusionModelUNet

        # MONAI's SDPA path (use_flash_attention) is its fastest and leanest; its default materialises N x N.
        return DiffusionModelUNet(spatial_dims=3, in_channels=args.in_channels, out_channels=1,
                                  num_res_blocks=args.layers_per_block, channels=args.widths,
                                  attention_levels=args.attention, norm_num_groups=args.norm_groups,
                                  num_head_channels=args.head_dim, use_flash_attention=True)
    cfg = ModelConfig(block_out_channels=args.widths, layers_per_block=args.layers_per_block,
                      attention_levels=args.attention, attention_head_dim=args.head_dim,
                      norm_num_groups=args.norm_groups, gradient_checkpointing=name.endswith("checkpointing"))
    unet = build_unet3d(cfg, args.in_channels, 1, args.shape)
    return TensorOutput(unet)


class TensorOutput(torch.nn.Module):
    """UNet3DModel returning the tensor, as MONAI's network does."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def measure(name: str, args) -> dict:
    """Median step time and peak memory of one configuration, in this process."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(name, args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, args.in_channels, *args.shape, device=device)
    target = torch.randn(args.batch_size, 1, *args.shape, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # also creates the optimizer state, which then counts in the baseline
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024
    return {"name": name, "device": device.type, "step_s": statistics.median(times),
            "peak_mib": (peak - baseline) / 2 ** 20, "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="D H W of the volumes")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--attention", type=lambda s: s.lower() in ("1", "true", "t"), nargs="+",
                        help="one true/false per level (default: the coarsest level only)")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--norm-groups", type=int, default=8)
    parser.add_argument("--in-channels", type=int, default=2, help="target plus condition channels")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--worker", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.attention = args.attention or [False] * (len(args.widths) - 1) + [True]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return

    names = list(CONFIGURATIONS)
    try:
        import monai  # noqa: F401
    except ImportError:
        print("MONAI is not installed (pip install monai): measuring UNet3DModel alone")
        names.remove("monai")
    results = {}
    for name in names:
        # A fresh process per configuration: peak memory is a high-water mark.
        command = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        # glibc returns mmap-ed blocks to the OS on free but keeps freed heap memory resident; with large blocks
        # mmap-ed, the resident set follows live memory and its peak is a fair CPU stand-in for a GPU's.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if run.returncode:
            print(f"{name} failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
            continue
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"shape {tuple(args.shape)}, batch {args.batch_size}, widths {args.widths}, attention {args.attention}, "
          f"{args.layers_per_block} block(s) per level, device {results['unet3d']['device']}, "
          f"threads {args.threads or torch.get_num_threads()}")
    print(f"{'configuration':24s} {'parameters':>11s} {'step s':>8s} {'peak MiB':>9s}")
    for name, r in results.items():
        print(f"{name:24s} {r['parameters']:11d} {r['step_s']:8.3f} {r['peak_mib']:9.1f}")
    if "monai" in results:
        monai_result = results["monai"]
        print(f"step time, no checkpointing / MONAI: {results['unet3d']['step_s'] / monai_result['step_s']:.2f}x "
              f"(target <= 1.0x)")
        print(f"peak memory, checkpointing / MONAI: "
              f"{results['unet3d+checkpointing']['peak_mib'] / monai_result['peak_mib']:.2f}x (target <= 0.6x)")


if __name__ == "__main__":
    main()
