"""Train a 2D diffusion model (DDPM or rectified flow) on NIfTI slices with Accelerate.

    accelerate launch train_diffusion.py --config configs/demo.yaml [section.key=value ...]

Rerunning the same command continues the run from its newest complete checkpoint (training.resume=auto).
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from data import augment, balanced_weights
from data.arrays import to_device
from data.sources import load_data, pixel_references
from data.volumes import display_spacing
from diffusion import build_strategy
from diffusion.task import Task, build_task
from models import build_network
from models.losses import PerceptualLoss
from utils import config as config_lib
from utils.checkpoint import load_checkpoint
from utils.distributed import check_launch
from utils.ema import EMA
from utils.classification import confusion_figure, confusion_matrix
from utils.evaluation import (classification_summary, classify_items, evenly_spaced, heldout_loss, item_prediction,
                              mean_scores, sample_items, score_item, shown_condition)
from utils.export import export_final, export_weights
from utils.logging import setup_logging
from utils.lr_finder import run_lr_finder
from utils.model_card import model_card
from utils.run import Progress, StopSignals, checkpoint_if_due, start_training_run, stopped_before_the_end
from utils.tracking import MetricsLog
from utils.training import (NonFiniteGuard, RunningMeans, TrainingDiverged, build_lr_scheduler, build_optimizer,
                            compile_if_asked, seed_step, training_batches)
from utils.visualization import comparison_grid, dataset_label_names, figure_array, metric_note, volume_figure

# Best-model folders: metric -> whether lower is better.
BEST_METRICS = {"val/loss": True, "val/ssim": False, "val/f1": False}


def validate(step, cfg, strategy, model, ema, task, bundle, accelerator, metrics_log, state, logger):
    """Held-out metrics of the task (EMA weights swapped in), logged; the best weights by each kept."""
    net = accelerator.unwrap_model(model)
    with ema.swapped(model) if ema else nullcontext():
        net.eval()
        held_out = classification_results if task.kind == "classification" else generation_results
        results = held_out(step, cfg, strategy, net, task, bundle, accelerator, metrics_log)
        net.train()
        metrics_log.log(results, step)
        # Keep the best weights by each held-out metric (EMA weights are swapped in here).
        for name, lower_is_better in BEST_METRICS.items():
            if name not in results or not math.isfinite(results[name]):
                continue
            best = state["best"].get(name)
            if best is None or (results[name] < best if lower_is_better else results[name] > best):
                state["best"][name] = results[name]
                # Every rank exports (results are gathered, so all agree): sharded weights are gathered first.
                folder = Path(cfg.run.output_dir) / "checkpoints" / f"best-{name.replace('/', '_')}"
                export_weights(folder, net, {"metric": name, "value": results[name], "step": step})
                logger.info("new best %s = %.4f at step %d", name, results[name], step)


def is_due(step: int, every: int, cfg) -> bool:
    return step % every == 0 or step == cfg.training.max_steps


def generation_results(step, cfg, strategy, net, task, bundle, accelerator, metrics_log) -> dict:
    """Held-out loss every validation.every steps; sampling, SSIM/PSNR and figures every sample_every."""
    val, scored, results = bundle.datasets["val"], pixel_references(bundle, task), {}
    if is_due(step, cfg.validation.every, cfg):
        # Evenly spaced over the whole held-out set (every subject), the same items at every validation.
        indices = evenly_spaced(len(val), cfg.validation.num_items or len(val))
        results.update(heldout_loss(strategy, net, task, val, indices, cfg.training.batch_size, cfg.run.seed,
                                    accelerator))
    if is_due(step, cfg.validation.sample_every, cfg):
        # Evenly spaced held-out items, the same ones at every validation.
        indices = evenly_spaced(len(val), cfg.validation.num_samples)
        items = sample_items(strategy, net, task, val, indices, cfg.training.batch_size, cfg.run.seed,
                             cfg.validation.sampling_steps, cfg.diffusion.guidance_scale, accelerator,
                             scored=scored, to_pixels=bundle.to_pixels)
        scores = [score_item(scored, it, val.data_range, task.region_mask) for it in items] \
            if task.is_conditional else []
        results.update({f"val/{k}": v for k, v in mean_scores(scores).items()})
        if accelerator.is_main_process:
            rows = [{"condition": shown_condition(it, scored[0].name),
                     "generated": it["generated"][0][scored[0].name],
                     "reference": it["reference"].get(scored[0].name)} for it in items]
            rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
            path = Path(cfg.run.output_dir) / "samples" / f"step-{step:07d}.png"
            mean = metric_note(mean_scores(scores), scored[0].name)
            title = f"step {step}, {strategy.sampler} {cfg.validation.sampling_steps} steps"
            title += f": mean {mean}" if mean else ""
            if rows[0]["generated"].ndim == 4:  # (C, D, H, W): orthogonal views through the first volume
                grid = rows[0]["generated"].shape
                png = volume_figure({k: v[0] for k, v in rows[0].items() if v.shape[1:] == grid[1:]}, path,
                                    "orthogonal", title=f"{items[0]['item_id']}, {title}",
                                    spacing=display_spacing(cfg.data))
            else:  # items as columns: a compact grid whatever validation.num_samples is
                png = comparison_grid([{k: figure_array(v) for k, v in r.items()} for r in rows], path,
                                      titles=[it["item_id"] for it in items], title=f"validation samples, {title}",
                                      notes=[metric_note(s, scored[0].name) for s in scores] if scores else None,
                                      label_names=dataset_label_names(val), items_as_columns=True)
            metrics_log.log_image("samples", png, step)
    return results


def classification_results(step, cfg, strategy, net, task, bundle, accelerator, metrics_log) -> dict:
    """Every validation.every steps the auxiliary classifier's scores (val/aux_f1, ...) and, once the label
    diffusion trains, its held-out loss; every sample_every the label diffusion's scores (val/f1, ...) from
    validation.sampling_steps sampling steps, and a confusion-matrix figure."""
    val, results = bundle.datasets["val"], {}
    indices = evenly_spaced(len(val), cfg.validation.num_items or len(val))
    diffusing = not task.trains_auxiliary(step - 1)  # the last step taken trained the label diffusion
    sampled = diffusing and is_due(step, cfg.validation.sample_every, cfg)
    if diffusing and is_due(step, cfg.validation.every, cfg):
        results.update(heldout_loss(strategy, net, task, val, indices, cfg.training.batch_size, cfg.run.seed,
                                    accelerator))
    items = classify_items(strategy, net, task, val, indices, cfg.training.batch_size, cfg.run.seed,
                           cfg.validation.sampling_steps if sampled else 0, accelerator)
    results.update({f"val/{k}": v for k, v in classification_summary(items, task.num_classes).items()})
    if sampled and accelerator.is_main_process:
        labels = [it["label"] for it in items]
        predictions = [item_prediction(it)[0].argmax() for it in items]
        png = confusion_figure(confusion_matrix(labels, predictions, task.num_classes), task.class_names,
                               Path(cfg.run.output_dir) / "samples" / f"step-{step:07d}.png",
                               f"label diffusion, step {step}: F1 {results['val/f1']:.3f} "
                               f"(auxiliary {results['val/aux_f1']:.3f})")
        metrics_log.log_image("confusion", png, step)
    return results


QUARTILES = 4  # train/loss_t_q1..4: the loss of the samples whose diffusion time fell in each quarter of [0, 1]


def batch_loss(model, task: Task, strategy, batch: dict, cond_drop_prob: float,
               perceptual: Optional[PerceptualLoss] = None, step: int = -1) -> tuple[torch.Tensor, dict, dict]:
    """The mean training loss of a batch (conditions dropped with `cond_drop_prob`), its diagnostics, and per time
    quartile the (sum, count) of its samples' losses. With `perceptual`, each sample's loss adds
    task.perceptual_weight times the feature distance of its predicted x0 (logged as train/loss_perceptual).
    A classification run's first classifier.aux_steps steps train its auxiliary classifier instead."""
    if task.kind == "classification" and task.trains_auxiliary(step):
        per_sample, diagnostics = model(auxiliary_images=batch["image"], auxiliary_labels=batch["label"])
        return per_sample.mean(), diagnostics, {}
    x0, cond = task.targets_of(batch), task.condition_of(batch, cond_drop_prob)
    elementwise, t, *x0_hat = strategy.loss_terms(model, x0, cond, with_x0=perceptual is not None)
    per_sample, diagnostics = task.reduce(elementwise, batch)
    if perceptual is not None:
        distance = task.perceptual_distance(perceptual, x0, x0_hat[0])
        per_sample = per_sample + task.cfg.perceptual_weight * distance
        diagnostics["loss_perceptual"] = distance.mean()
    quartile = (t.detach() * QUARTILES).long().clamp(max=QUARTILES - 1)
    by_time = {f"loss_t_q{q + 1}": ((per_sample.detach().float() * (quartile == q)).sum(), (quartile == q).sum())
               for q in range(QUARTILES)}
    return per_sample.mean(), diagnostics, by_time


def perceptual_term(cfg, device) -> Optional[PerceptualLoss]:
    """The feature network of task.perceptual_weight (vae.perceptual_network, 2.5D for volumes), or None."""
    if cfg.task.perceptual_weight == 0:
        return None
    return PerceptualLoss(cfg.vae.perceptual_network, device, cfg.vae.perceptual_slices)


@torch.no_grad()
def forward_flops(model, task: Task, strategy, dataset, device) -> float:
    """FLOPs of the denoiser's forward pass on one training item at its training size (torch's flop counter;
    the backward pass costs about twice as much again)."""
    batch = to_device(default_collate([dataset[0]]), device)
    # Eagerly under training.compile: a first call traced under the counter would leave the model uncompiled.
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        strategy.loss_terms(model, task.targets_of(batch), task.condition_of(batch))
    return float(counter.get_total_flops())


def find_lr(cfg, args) -> None:
    """The LR range test on the run's data, model and loss; writes lr_finder.json and lr_finder.png into
    run.output_dir, and no checkpoint, config or split."""
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision)
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    with tempfile.TemporaryDirectory() as scratch:  # the split and data records stay out of the run directory
        bundle = load_data(cfg, Path(scratch), True, accelerator.device)
    task = build_task(cfg, bundle)
    strategy = build_strategy(cfg.diffusion)
    set_seed(cfg.run.seed)
    model = compile_if_asked(build_network(cfg, task), cfg.training)
    if task.kind == "classification":
        task.auxiliary = model.auxiliary
    model, optimizer = accelerator.prepare(model, build_optimizer(model.parameters(), cfg.training))
    batches = training_batches(bundle.datasets["train"], cfg.training, cfg.data, accelerator, cfg.run.seed, 0)
    perceptual = perceptual_term(cfg, accelerator.device)

    def next_loss() -> torch.Tensor:
        batch = augment(to_device(next(batches), accelerator.device), cfg.data)
        return batch_loss(model, task, strategy, batch, cfg.task.cond_drop_prob, perceptual)[0]

    run_lr_finder(cfg, args, accelerator, model, optimizer, next_loss, logger)


def main(argv=None):
    # Configuration and launch checks.
    args, cfg = config_lib.parse_args(argv, __doc__, default_config="configs/demo.yaml", lr_finder=True)
    if args.find_lr:
        return find_lr(cfg, args)
    accelerator, logger, run_dir, checkpoints, resume_from = start_training_run(cfg)

    # Data, task, model, strategy. Everything that can reject the input runs before any training.
    bundle = load_data(cfg, run_dir, accelerator.is_main_process, accelerator.device)
    datasets = bundle.datasets
    task = build_task(cfg, bundle)
    strategy = build_strategy(cfg.diffusion)
    perceptual = perceptual_term(cfg, accelerator.device)
    set_seed(cfg.run.seed)  # the initial weights
    model = compile_if_asked(build_network(cfg, task), cfg.training)
    parameters = model.parameters()
    if task.kind == "classification":  # the frozen classifier whose priors the label diffusion starts from
        task.auxiliary = model.auxiliary
        parameters = model.parameter_groups(cfg.classifier.aux_lr)
    optimizer = build_optimizer(parameters, cfg.training)
    # The LR scheduler is stepped by hand once per optimizer step; Accelerate's wrapper would step it once
    # per process and tie the schedule to the number of GPUs.
    lr_scheduler = build_lr_scheduler(optimizer, cfg.training)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, cfg.training.ema_decay, cfg.training.ema_warmup) if cfg.training.ema_decay > 0 else None
    logger.info("%d train / %d val items; %s %.2fM parameters", len(datasets["train"]), len(datasets["val"]),
                type(accelerator.unwrap_model(model)).__name__, sum(p.numel() for p in model.parameters()) / 1e6)

    state = {"step": 0, "nonfinite_steps": 0, "best": {}, "running": {}}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, lr_scheduler, ema, scaler=accelerator.scaler)
        logger.info("resumed from %s (step %d)", resume_from, state["step"])
    metrics_log = MetricsLog(accelerator, run_dir, cfg.logging, config_lib.OmegaConf.to_container(
        config_lib.OmegaConf.structured(cfg)), state["step"] if resume_from else None)

    # Batches: micro-batch k is a pure function of k, so a resumed run continues the same sequence.
    accum, step = cfg.training.grad_accum_steps, state["step"]
    weights = balanced_weights(datasets["train"]) if cfg.data.class_balanced else None
    batches = training_batches(datasets["train"], cfg.training, cfg.data, accelerator, cfg.run.seed, step, weights)
    running = RunningMeans(accelerator.device, state["running"])
    guard = NonFiniteGuard(state, cfg.training.max_consecutive_nonfinite, checkpoints,
                           hint="lower training.lr, or use bf16 instead of fp16")
    max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
    progress = Progress(cfg.training.max_steps, step, cfg.training.log_every, accelerator.is_main_process, logger)

    if step == 0 and accelerator.distributed_type != DistributedType.FSDP:  # FSDP's sharded forward is not counted
        flops = forward_flops(model, task, strategy, datasets["train"], accelerator.device)
        metrics_log.log({"model/gflops_per_sample": flops / 1e9}, 0)
        logger.info("%.3g GFLOPs per sample and training forward pass", flops / 1e9)
    if step == 0 and cfg.validation.at_start:
        validate(0, cfg, strategy, model, ema, task, bundle, accelerator, metrics_log, state, logger)
    start_step, stop_reason = step, ""
    timing = {"start": time.perf_counter(), "data": 0.0, "samples": 0}
    # From here on SIGTERM, SIGUSR1 and Ctrl-C end the run after the current step, with a checkpoint.
    with StopSignals(logger) as stop:
        while step < cfg.training.max_steps and not stop_reason:
            if ema is not None and task.kind == "classification" and step == cfg.classifier.aux_steps:
                # The auxiliary classifier is frozen from here on, at its average (what stage 1's validation
                # scored): training, validation and export then share one set of priors.
                ema.apply_to(model, accelerator.unwrap_model(model).auxiliary.parameters())
            seed_step(cfg.run.seed, step, accelerator.process_index)
            # Accumulate gradients; only the last micro-batch synchronises them across processes.
            step_values, step_by_time = {}, {}
            for micro in range(accum):
                data_start = time.perf_counter()
                batch = next(batches)
                logger.debug("step %d micro-batch %d items %s", step, micro, ",".join(batch["item_id"]))
                batch = augment(to_device(batch, accelerator.device), cfg.data)
                timing["data"] += time.perf_counter() - data_start
                with accelerator.no_sync(model) if micro < accum - 1 else nullcontext(), accelerator.autocast():
                    loss, diagnostics, by_time = batch_loss(model, task, strategy, batch, cfg.task.cond_drop_prob,
                                                            perceptual, step)
                accelerator.backward(loss / accum)
                running.add_batch(loss, batch["item_id"])
                for name, value in {"loss": loss, **diagnostics}.items():
                    step_values[name] = step_values.get(name, 0.0) + value.detach().float() / accum
                for name, (total, count) in by_time.items():
                    before = step_by_time.get(name, (0.0, 0))
                    step_by_time[name] = (before[0] + total, before[1] + count)

            # Clip and step, unless the gradient is not finite.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            finite = bool(torch.isfinite(grad_norm))  # one host sync per optimizer step, as fp16 loss scaling makes
            if finite or accelerator.scaler is not None:
                optimizer.step()  # under fp16 the loss scaler skips a non-finite step and lowers its scale
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            step += 1
            timing["samples"] += cfg.training.batch_size * accum * accelerator.num_processes
            if finite:
                # Averages cover the steps that were taken; skipped ones are counted in train/nonfinite_steps.
                running.add({**step_values, "grad_norm": grad_norm.detach().float()})
                running.add_counted(step_by_time)
                if ema is not None:
                    ema.update(model, step)
            guard.record(finite, step, logger)

            # Log averages over the steps since the last log (the only host syncs for logging). perf/ rows are
            # wall-clock measurements: the only rows that differ between otherwise identical runs.
            if step % cfg.training.log_every == 0 or step == cfg.training.max_steps:
                values = {f"train/{k}": v for k, v in {**running.pop_means(), **running.pop_worst_batch()}.items()}
                values.update({"train/lr": lr_scheduler.get_last_lr()[0],
                               "train/nonfinite_steps": state["nonfinite_steps"]})
                elapsed = time.perf_counter() - timing["start"]
                values.update({"perf/samples_per_s": timing["samples"] / elapsed,
                               "perf/data_wait_fraction": timing["data"] / elapsed})
                metrics_log.log(values, step)
                progress.set_values({k: values[k] for k in ("train/loss", "train/lr") if k in values})
                timing = {"start": time.perf_counter(), "data": 0.0, "samples": 0}

            paused = time.perf_counter()  # validation and checkpoints do not count as training throughput
            stage_end = task.kind == "classification" and step == cfg.classifier.aux_steps
            if step % cfg.validation.every == 0 or step % cfg.validation.sample_every == 0 \
                    or step == cfg.training.max_steps or stage_end:
                validate(step, cfg, strategy, model, ema, task, bundle, accelerator, metrics_log, state, logger)

            stop_reason = checkpoint_if_due(step, start_step, cfg, accelerator, checkpoints, model, optimizer,
                                            lr_scheduler, ema, state, running, stop)
            timing["start"] += time.perf_counter() - paused
            progress.update(step)
    progress.close()
    if stopped_before_the_end(step, cfg, model, logger, metrics_log, stop_reason):
        return

    # Export the EMA weights in diffusers format (on every rank: sharded weights are gathered, rank 0 writes).
    with ema.swapped(model) if ema else nullcontext():
        info = task.describe(datasets["train"])
        vae = None
        if bundle.autoencoder is not None:  # latent diffusion: x0 = (vae latent - shift) * scale
            info["latent"] = {"scale": datasets["train"].scale, "shift": datasets["train"].shift}
            vae = bundle.autoencoder.model
        # DDIMPipeline samples an unconditional pixel-space DDPM; for a latent one it would return latents.
        stock_pipeline = cfg.diffusion.strategy == "ddpm" and vae is None and not (task.is_conditional or task.vector)
        export_final(run_dir / "final", accelerator.unwrap_model(model), strategy, info,
                     "DDIMPipeline" if stock_pipeline else "", vae=vae, card=model_card(cfg, run_dir, argv))
    metrics_log.close()
    logger.info("done: %s", run_dir / "final")


if __name__ == "__main__":
    config_lib.run_main(main, TrainingDiverged)
