"""Training-step throughput of the demo's 2D denoiser and 2D autoencoder: plain, torch.compile, channels-last and
both, in one run.

    python benchmarks/compile_speed.py [--which both] [--steps 20] [--warmup 3] [--repeats 2] [--batch-size 0]
        [--device cpu] [--backend inductor] [--json out.json] [key=value ...]

The denoiser is configs/demo.yaml's (--config: a T1 slice given its one-hot tissue mask, rectified flow), the
autoencoder configs/demo_vae.yaml's KL autoencoder (--vae-config); key=value overrides apply to both presets. Every
variant starts from the same freshly initialised weights (speed does not depend on training). A step is
bare_step.py's on in-memory batches: the training loss, backward, gradient clipping with its one host sync, AdamW;
the autoencoder's loss is train_vae.py's before its adversarial loss starts. Variants: compile is training.compile
(compile_if_asked: nn.Module.compile with --backend); channels-last puts the weights and the batches in
torch.channels_last; both does both.

Each variant first computes the loss of the first batch with fixed noise, times and posterior sample, and backward:
the loss must equal the plain model's within LOSS_RTOL (else the script stops). Compilation happens there; then
--warmup steps. "compile s" is that warm-up time beyond what as many steps take once warm; inductor keeps what it
compiled on disk, so a rerun compiles faster (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 times a cold compile). Timed
steps run after every variant is warm, in --repeats alternating rounds, the fastest round kept: on a shared CPU,
load from elsewhere only ever slows a round down.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bare_step import mean_step_seconds  # noqa: E402
from benchmarks.demo_networks import DemoNetwork, load_autoencoder, load_denoiser  # noqa: E402
from utils.training import compile_if_asked  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"plain": (False, False), "compile": (True, False), "channels-last": (False, True),
            "compile + channels-last": (True, True)}  # name: (compiled, channels-last)
# float32 reorderings (inductor's fused kernels, channels-last convolutions) move a mean loss by 1e-7 to 1e-6
# relative; a wrong layout, a dropped term or a different random draw moves it by far more than 1e-4.
LOSS_RTOL = 1e-4


def channels_last(batch: dict) -> dict:
    """The batch with its 4D tensors (images, masks) in torch.channels_last."""
    return {k: v.to(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
            for k, v in batch.items()}


def warm_variant(net: DemoNetwork, compiled: bool, last: bool, backend: str, warmup: int) -> dict:
    """Build one variant, check its first-batch loss and warm it up; its model and batches for the timed rounds."""
    model = net.build()
    batches = net.batches
    if last:
        model = model.to(memory_format=torch.channels_last)
        batches = [channels_last(b) for b in batches]
    compile_if_asked(model, dataclasses.replace(net.cfg.training, compile=compiled, compile_backend=backend))
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    # Inductor's kernels draw their own random numbers; torch's RNG gives the compiled autoencoder the plain
    # model's posterior sample (one small draw per step, no measurable cost) so the losses can be compared.
    with torch._inductor.config.patch(fallback_random=True):
        loss = net.loss(model, batches[0], seed=0)
        loss.backward()  # compiles the backward graph
        loss = loss.detach().item()  # host sync, after the backward on the device's stream
    model.zero_grad(set_to_none=True)
    if warmup:
        mean_step_seconds(model, net.task, net.strategy, batches, net.cfg, warmup, 0)
    warmup_s = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"] - graphs
    if compiled and not graphs:  # dynamo falls back to eager code silently, e.g. past its recompile limit
        raise RuntimeError(f"{net.config.name}: torch.compile compiled no graph; the compile rows would be eager")
    return {"model": model, "batches": batches, "loss": loss, "warmup_s": warmup_s, "graphs": graphs}


def measure(net: DemoNetwork, args) -> dict:
    """Every variant of one network: first-batch loss, compile seconds and steady samples/s."""
    warm = {}
    for name, flags in VARIANTS.items():  # plain first: the others' losses are checked against it
        warm[name] = w = warm_variant(net, *flags, args.backend, args.warmup)
        plain = warm["plain"]["loss"]
        w["loss_rel_diff"] = abs(w["loss"] - plain) / abs(plain)
        if not w["loss_rel_diff"] <= LOSS_RTOL:  # also stops on a NaN loss
            raise AssertionError(f"{net.config.name}, {name}: first-batch loss {w['loss']:.8g} differs from the "
                                 f"plain model's {plain:.8g} by {w['loss_rel_diff']:.2e} relative (> {LOSS_RTOL})")

    graphs = counters["stats"]["unique_graphs"]
    step_s = {name: float("inf") for name in warm}
    for _ in range(args.repeats):
        for name, w in warm.items():
            # One untimed step per round: the fresh optimizer's state.
            step_s[name] = min(step_s[name], mean_step_seconds(w["model"], net.task, net.strategy, w["batches"],
                                                               net.cfg, args.steps, 1))
    if counters["stats"]["unique_graphs"] != graphs:
        raise RuntimeError(f"{net.config.name}: a variant recompiled during the timed steps; raise --warmup")

    rows = {}
    for name, w in warm.items():
        rows[name] = {"step_s": step_s[name], "samples_s": net.batch_size / step_s[name],
                      "speedup": step_s["plain"] / step_s[name],
                      "compile_s": w["warmup_s"] - (args.warmup + 1) * step_s[name],  # the check is one more step
                      "warmup_s": w["warmup_s"], "graphs": w["graphs"], "loss": w["loss"],
                      "loss_rel_diff": w["loss_rel_diff"], "loss_checked": True}
    return {"config": str(net.config), "batch_size": net.batch_size, "input": list(net.input_shape),
            "parameters": sum(p.numel() for p in warm["plain"]["model"].parameters()), "variants": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="the denoiser's preset")
    parser.add_argument("--vae-config", type=Path, default=REPO / "configs" / "demo_vae.yaml",
                        help="the autoencoder's preset")
    parser.add_argument("--which", choices=("denoiser", "autoencoder", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the loss check")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed rounds; the fastest is kept")
    parser.add_argument("--batch-size", type=int, default=0, help="items per step (0: the presets')")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="inductor", help="training.compile_backend (aot_eager: no kernels "
                        "generated, seconds to compile)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both presets")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (this torch build: " + torch.__version__ + ")")

    networks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, load, config in (("denoiser", load_denoiser, args.config),
                                   ("autoencoder", load_autoencoder, args.vae_config)):
            if args.which in (name, "both"):
                networks[name] = load(config, args.overrides, Path(tmp) / name, args.batch_size, args.device)
    results = {"command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *argv]),
               "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
               "backend": args.backend, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
               "loss_rtol": LOSS_RTOL, "networks": {name: measure(net, args) for name, net in networks.items()}}

    print("command:", results["command"])
    print(f"torch {torch.__version__}, {args.device}, {results['threads']} threads, backend {args.backend}; mean of "
          f"{args.steps} timed steps, fastest of {args.repeats} rounds; loss check rtol {LOSS_RTOL:g}")
    print("| network | batch | variant | ms/step | samples/s | vs plain | compile s | first-batch loss | rel. diff |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, network in results["networks"].items():
        for variant, r in network["variants"].items():
            compile_s = f"{r['compile_s']:.1f}" if r["graphs"] else "-"  # uncompiled: only noise
            print(f"| {name} | {network['batch_size']} | {variant} | {1000 * r['step_s']:.1f} | {r['samples_s']:.1f} "
                  f"| {r['speedup']:.2f}x | {compile_s} | {r['loss']:.6f} | {r['loss_rel_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
