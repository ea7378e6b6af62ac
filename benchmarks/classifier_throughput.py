"""Label-diffusion classification at the demo size: images/s of training (each stage's optimizer step) and of
sampling (the auxiliary priors plus `--steps` DDIM steps, as evaluate.py predicts), against the auxiliary
classifier's own forward pass.

    python benchmarks/classifier_throughput.py [--batch-size 32] [--steps 10] [--json out.json] [section.key=value ...]

Uses configs/demo_classifier.yaml's networks, freshly initialised (speed does not depend on training), on the
IHC demo's training images, built in a temporary folder. Every figure is measured in this one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bare_step import collated_batches  # noqa: E402
from data.sources import load_data  # noqa: E402
from diffusion import build_strategy  # noqa: E402
from diffusion.generate import generate  # noqa: E402
from diffusion.task import build_task  # noqa: E402
from models import build_network  # noqa: E402
from utils import config as config_lib  # noqa: E402
from utils.training import build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def images_per_second(run_batch, batches: list[dict], repeats: int, warmup: int = 2) -> float:
    """Images per second of `run_batch(batch)` over `repeats` batches after `warmup` untimed ones."""
    for i in range(warmup):
        run_batch(batches[i % len(batches)])
    start = time.perf_counter()
    for i in range(repeats):
        run_batch(batches[i % len(batches)])
    return repeats * len(batches[0]["item_id"]) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_classifier.yaml")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="DDIM sampling steps")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = config_lib.resolve(args.config, [f"data.root={scratch}/demo_ihc_classes", *args.overrides])
        bundle = load_data(cfg, Path(scratch), True, "cpu")
    task, strategy = build_task(cfg, bundle), build_strategy(cfg.diffusion)
    torch.manual_seed(cfg.run.seed)
    net = build_network(cfg, task)
    task.auxiliary = net.auxiliary
    optimizer = build_optimizer(net.parameter_groups(cfg.classifier.aux_lr), cfg.training)
    batches = collated_batches(bundle.datasets["train"], args.batch_size, 4)

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def auxiliary_step(batch):
        optimizer_step(net(auxiliary_images=batch["image"], auxiliary_labels=batch["label"])[0].mean())

    def diffusion_step(batch):
        batch = dict(batch)  # a fresh prior every step, as training computes it
        elementwise, _ = strategy.loss_terms(net, task.targets_of(batch), task.condition_of(batch))
        optimizer_step(task.reduce(elementwise, batch)[0].mean())

    @torch.no_grad()
    def auxiliary_forward(batch):
        task.auxiliary_probabilities(batch["image"])

    @torch.no_grad()
    def sampling(batch):
        batch = dict(batch)
        x0 = generate(strategy, net, task, batch, range(len(batch["item_id"])), cfg.run.seed, args.steps, "cpu")
        task.probabilities(x0, batch)

    net.train()
    rates = {"stage 1 training step (auxiliary)": images_per_second(auxiliary_step, batches, args.repeats),
             "stage 2 training step (label diffusion)": images_per_second(diffusion_step, batches, args.repeats)}
    net.eval()
    rates["auxiliary forward (the baseline)"] = images_per_second(auxiliary_forward, batches, args.repeats)
    rates[f"sampling, {args.steps} DDIM steps"] = images_per_second(sampling, batches, args.repeats)
    baseline = rates["auxiliary forward (the baseline)"]
    print(f"python benchmarks/classifier_throughput.py --batch-size {args.batch_size} --steps {args.steps}")
    print(f"{'':42s} {'images/s':>10s} {'ms/image':>9s} {'time x aux forward':>20s}")
    for name, rate in rates.items():
        print(f"{name:42s} {rate:10.1f} {1000 / rate:9.2f} {baseline / rate:19.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": rates, "batch_size": args.batch_size,
                                         "sampling_steps": args.steps, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
