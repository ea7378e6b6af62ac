"""Train an autoencoder (KL or VQ) for latent diffusion, with optional perceptual and PatchGAN losses.

    accelerate launch train_vae.py --config configs/demo_vae.yaml [section.key=value ...]

2D slices and tiles train a diffusers AutoencoderKL / VQModel; 3D volumes (data.dims: 3) a PatchVolume, on random
patches (data.patch_size) with a 2.5D perceptual loss and a 3D PatchGAN. Rerunning the same command continues the
run from its newest complete checkpoint (training.resume=auto). The export final/vae loads with
AutoencoderKL.from_pretrained(final, subfolder="vae") (VQModel for vae.kind=vq, PatchVolume in 3D), and final/ is
what latent.autoencoder names for encode_latents.py.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from data import augment, build_datasets
from data.arrays import to_device
from models.autoencoder import (TrainableAutoencoder, build_autoencoder, check_autoencoder_config,
                                describe_autoencoder, export_autoencoder, score_reconstructions)
from models.discriminator import PatchDiscriminator
from models.losses import AutoencoderLoss
from utils import config as config_lib
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError
from utils.distributed import check_launch
from utils.ema import EMA
from utils.evaluation import evenly_spaced
from utils.logging import setup_logging
from utils.lr_finder import run_lr_finder
from utils.model_card import model_card
from utils.run import Progress, StopSignals, checkpoint_if_due, start_training_run, stopped_before_the_end
from utils.tracking import MetricsLog
from utils.training import (NonFiniteGuard, RunningMeans, TrainingDiverged, build_lr_scheduler, build_optimizer,
                            compile_if_asked, seed_step, training_batches)
from utils.visualization import comparison_grid, figure_array

BEST_METRIC = "val/psnr"  # higher is better; checkpoints/best-val_psnr/ holds those weights


def check_config(cfg) -> None:
    """Settings this script cannot honour, rejected before anything is written."""
    masks = [n for n in cfg.vae.inputs if n in cfg.data.masks]
    if masks or not cfg.vae.inputs:
        raise ConfigError(f"vae.inputs={cfg.vae.inputs}: name image modalities from data.images {cfg.data.images}; "
                          "label masks are not supported as autoencoder input")
    # Training patches and the whole held-out volumes both go through the autoencoder.
    if cfg.data.dims == 3:
        for key in ("data.patch_size", "data.volume_shape"):
            check_autoencoder_config(cfg.vae, getattr(cfg.data, key.split(".")[1]), key)
    else:
        check_autoencoder_config(cfg.vae, cfg.data.training_shape())
    if cfg.vae.perceptual_network and cfg.data.dims == 3 and cfg.vae.perceptual_slices > min(cfg.data.training_shape()):
        raise ConfigError(f"vae.perceptual_slices={cfg.vae.perceptual_slices} distinct slices per axis do not fit "
                          f"training samples of {cfg.data.training_shape()}")
    if cfg.vae.gradient_checkpointing and cfg.vae.kind == "vq" and cfg.data.dims == 2:
        raise ConfigError("vae.gradient_checkpointing: diffusers' VQModel does not support it (2D vae.kind=vq); "
                          "use vae.kind=kl or turn it off")
    check_progressive_config(cfg)
    smallest = PatchDiscriminator.min_input_size(cfg.vae.disc_layers)
    sides = [min(cfg.data.training_shape())] + [phase.image_size for phase in cfg.vae.progressive]
    if cfg.vae.disc_weight > 0 and min(sides) < smallest:
        raise ConfigError(f"vae.disc_layers={cfg.vae.disc_layers} needs training samples of at least {smallest} per "
                          f"side, got {min(sides)} (data.patch_size / volume_shape / image_size / vae.progressive); "
                          "use fewer discriminator layers")
    if cfg.vae.disc_weight > 0 and cfg.training.mixed_precision == "fp16":
        # One loss scaler shared by two optimizers would unscale the discriminator's gradients twice.
        raise ConfigError("training.mixed_precision=fp16 is not supported with vae.disc_weight > 0; use bf16")


def check_progressive_config(cfg) -> None:
    """vae.progressive phases that cannot work, refused naming the phase's key."""
    if not cfg.vae.progressive:
        return
    if cfg.data.dims != 2:
        raise ConfigError("vae.progressive trains 2D images at growing sizes; 3D autoencoders train on "
                          "data.patch_size patches: use vae.progressive=[]")
    total = sum(phase.steps for phase in cfg.vae.progressive)
    if total != cfg.training.max_steps:
        raise ConfigError(f"the vae.progressive phases add up to {total} steps but training.max_steps="
                          f"{cfg.training.max_steps}; make them equal")
    for index, phase in enumerate(cfg.vae.progressive):
        key = f"vae.progressive[{index}]"
        for name in ("image_size", "steps", "batch_size"):
            if getattr(phase, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(phase, name)} must be >= 1")
        if phase.image_size > cfg.data.image_size:
            raise ConfigError(f"{key}.image_size={phase.image_size} exceeds data.image_size={cfg.data.image_size}: "
                              "phases train on the data resized down")
        check_autoencoder_config(cfg.vae, [phase.image_size] * 2, f"{key}.image_size")
    if cfg.vae.progressive[-1].image_size != cfg.data.image_size:
        raise ConfigError(f"the last vae.progressive phase trains at {cfg.vae.progressive[-1].image_size} px; it must "
                          f"train at data.image_size={cfg.data.image_size}, where validation runs")


@dataclass
class Phase:
    """Training steps [start, end) at one image size and batch size (vae.progressive)."""
    number: int  # from 1
    start: int
    end: int
    image_size: int  # 0: as the data comes
    batch_size: int


def training_phases(cfg) -> list[Phase]:
    """vae.progressive as consecutive step ranges; without it, one phase over the whole run."""
    if not cfg.vae.progressive:
        return [Phase(1, 0, cfg.training.max_steps, 0, cfg.training.batch_size)]
    phases, start = [], 0
    for number, phase in enumerate(cfg.vae.progressive, 1):
        phases.append(Phase(number, start, start + phase.steps, phase.image_size, phase.batch_size))
        start += phase.steps
    return phases


def phase_batches(phases: list[Phase], step: int, datasets, cfg, accelerator) -> tuple[Phase, object]:
    """The phase that holds `step`, and its batches from `step` on: micro-batch k of a phase is a pure function of
    (run.seed + phase, k), so a run resumed inside or between phases continues the same sequence."""
    phase = next(p for p in phases if p.start <= step < p.end)
    training = dataclasses.replace(cfg.training, batch_size=phase.batch_size)
    return phase, training_batches(datasets["train"], training, cfg.data, accelerator, cfg.run.seed + phase.number - 1,
                                   step - phase.start)


def resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images (B, C, H, W) resized to side x side (antialiased, so a smaller phase sees the image, not aliasing)."""
    if not side or x.shape[-2:] == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def validate(step, cfg, model, ema, loss_fn, datasets, accelerator, metrics_log, state, description, logger):
    """Reconstruction PSNR/SSIM/loss on held-out slices (split across processes), a figure, the best weights."""
    val, net = datasets["val"], accelerator.unwrap_model(model)
    # Evenly spaced held-out items, the same ones at every validation; some of them go into the figure.
    indices = evenly_spaced(len(val), cfg.validation.num_items or len(val))
    shown = set(indices[::max(len(indices) // max(cfg.validation.num_samples, 1), 1)][:cfg.validation.num_samples])
    with ema.swapped(model) if ema else nullcontext():
        net.eval()
        items = score_reconstructions(net, val, indices, cfg.vae.inputs, cfg.training.batch_size, accelerator,
                                      loss_fn.reconstruction, shown)
        net.train()
        names = [k for k in ("psnr", "ssim", "psnr_3d", "ssim_3d", "rec_loss") if k in items[0]]
        results = {f"val/{k}": float(np.nanmean([it[k] for it in items])) for k in names}
        metrics_log.log(results, step)
        if accelerator.is_main_process:
            # Reconstruction | input | |error|, the first channel of each (RGB tiles stay RGB).
            figure = [{"generated": it["reconstruction"], "reference": it["input"]} for it in items if "input" in it]
            png = comparison_grid([{k: figure_array(v) for k, v in row.items()} for row in figure],
                                  Path(cfg.run.output_dir) / "samples" / f"step-{step:07d}.png", val.data_range,
                                  titles=[it["item_id"] for it in items if "input" in it])
            metrics_log.log_image("reconstructions", png, step)
        # Keep the best weights by val/psnr (EMA weights are swapped in here).
        best = state["best"].get(BEST_METRIC)
        if math.isfinite(results[BEST_METRIC]) and (best is None or results[BEST_METRIC] > best):
            state["best"][BEST_METRIC] = results[BEST_METRIC]
            # Every rank exports (results are gathered, so all agree): sharded weights are gathered first.
            folder = Path(cfg.run.output_dir) / "checkpoints" / f"best-{BEST_METRIC.replace('/', '_')}"
            export_autoencoder(folder, net.vae, description,
                               {"metric": BEST_METRIC, "value": results[BEST_METRIC], "step": step})
            logger.info("new best %s = %.3f at step %d", BEST_METRIC, results[BEST_METRIC], step)


def find_lr(cfg, args) -> None:
    """The LR range test of the autoencoder (reconstruction and regulariser losses; the adversarial loss starts
    later in training and is left out); writes lr_finder.json and lr_finder.png into run.output_dir only."""
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision)
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    with tempfile.TemporaryDirectory() as scratch:  # the split stays out of the run directory
        datasets = build_datasets(cfg.data, Path(scratch), cfg.run.seed, is_main_process=True)
    loss_fn = AutoencoderLoss(cfg.vae, accelerator.device)
    set_seed(cfg.run.seed)
    channels = sum(int(datasets["train"][0][n].shape[0]) for n in cfg.vae.inputs)
    model = compile_if_asked(TrainableAutoencoder(build_autoencoder(cfg.vae, channels, cfg.data.training_shape())),
                             cfg.training)
    model, optimizer = accelerator.prepare(model, build_optimizer(model.parameters(), cfg.training))
    batches = training_batches(datasets["train"], cfg.training, cfg.data, accelerator, cfg.run.seed, 0)

    def next_loss() -> torch.Tensor:
        batch = augment(to_device(next(batches), accelerator.device), cfg.data)
        return loss_fn(model, torch.cat([batch[n].float() for n in cfg.vae.inputs], dim=1))[0].mean()

    run_lr_finder(cfg, args, accelerator, model, optimizer, next_loss, logger)


def main(argv=None):
    # Configuration and launch checks.
    args, cfg = config_lib.parse_args(argv, __doc__, default_config="configs/demo_vae.yaml", denoiser=False,
                                      lr_finder=True)
    check_config(cfg)
    if args.find_lr:
        return find_lr(cfg, args)
    accelerator, logger, run_dir, checkpoints, resume_from = start_training_run(cfg)

    # Data, losses, autoencoder and discriminator. Everything that can reject the input runs before any training.
    datasets = build_datasets(cfg.data, run_dir, cfg.run.seed, is_main_process=accelerator.is_main_process)
    images = getattr(datasets["train"], "image_names", cfg.data.images)
    if set(cfg.vae.inputs) - set(images):
        raise ConfigError(f"vae.inputs {cfg.vae.inputs} must name image modalities of the dataset {images} "
                          "(label masks are not supported as autoencoder input)")
    channels = {n: int(datasets["train"][0][n].shape[0]) for n in cfg.vae.inputs}
    loss_fn = AutoencoderLoss(cfg.vae, accelerator.device)
    set_seed(cfg.run.seed)  # the initial weights
    vae = build_autoencoder(cfg.vae, sum(channels.values()), cfg.data.training_shape())
    model = compile_if_asked(TrainableAutoencoder(vae), cfg.training)
    optimizer = build_optimizer(model.parameters(), cfg.training)
    # LR schedulers are stepped by hand once per optimizer step (see train_diffusion.py).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.training)
    # Autoencoders are small: DDP, not FSDP (the adaptive weight needs the whole decoder's last layer).
    adversarial, extra = cfg.vae.disc_weight > 0, {}
    if adversarial:
        disc = PatchDiscriminator(sum(channels.values()), cfg.vae.disc_channels, cfg.vae.disc_layers,
                                  norm_num_groups=cfg.vae.norm_num_groups, spatial_dims=cfg.data.dims)
        disc_optimizer = build_optimizer(disc.parameters(), cfg.training)
        disc_scheduler = build_lr_scheduler(disc_optimizer, cfg.training)
        model, optimizer, disc, disc_optimizer = accelerator.prepare(model, optimizer, disc, disc_optimizer)
        extra["discriminator"] = (disc, disc_optimizer, disc_scheduler)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, cfg.training.ema_decay, cfg.training.ema_warmup) if cfg.training.ema_decay > 0 else None
    description = describe_autoencoder(vae, channels, datasets["train"], cfg.data.training_shape())
    logger.info("%d train / %d val items; %s %.2fM parameters, latents %s", len(datasets["train"]),
                len(datasets["val"]), type(vae).__name__, sum(p.numel() for p in vae.parameters()) / 1e6,
                description["latent_shape"])

    state = {"step": 0, "nonfinite_steps": 0, "best": {}, "running": {}}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, lr_scheduler, ema, extra, accelerator.scaler)
        logger.info("resumed from %s (step %d)", resume_from, state["step"])
    metrics_log = MetricsLog(accelerator, run_dir, cfg.logging, config_lib.OmegaConf.to_container(
        config_lib.OmegaConf.structured(cfg)), state["step"] if resume_from else None)

    accum, step = cfg.training.grad_accum_steps, state["step"]
    phases, phase = training_phases(cfg), None
    # d_loss and g_loss only count the steps after vae.disc_start.
    running = RunningMeans(accelerator.device, state["running"])
    last_layer = accelerator.unwrap_model(model).last_layer
    bare_disc = accelerator.unwrap_model(disc) if adversarial else None
    guard = NonFiniteGuard(state, cfg.training.max_consecutive_nonfinite, checkpoints, hint="lower training.lr")
    max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
    progress = Progress(cfg.training.max_steps, step, cfg.training.log_every, accelerator.is_main_process, logger)
    validation = (cfg, model, ema, loss_fn, datasets, accelerator, metrics_log, state, description, logger)
    if step == 0 and cfg.validation.at_start:
        validate(0, *validation)
    start_step, stop_reason = step, ""
    # From here on SIGTERM, SIGUSR1 and Ctrl-C end the run after the current step, with a checkpoint.
    with StopSignals(logger) as stop:
        while step < cfg.training.max_steps and not stop_reason:
            if phase is None or step == phase.end:
                phase, batches = phase_batches(phases, step, datasets, cfg, accelerator)
                if len(phases) > 1:
                    logger.info("phase %d of %d: %d px, batch %d, steps %d-%d", phase.number, len(phases),
                                phase.image_size, phase.batch_size, phase.start + 1, phase.end)
            seed_step(cfg.run.seed, step, accelerator.process_index)
            gan = adversarial and step >= cfg.vae.disc_start
            # Accumulate gradients of both networks; only the last micro-batch synchronises them across processes.
            step_values = {}
            for micro in range(accum):
                batch = next(batches)
                logger.debug("step %d micro-batch %d items %s", step, micro, ",".join(batch["item_id"]))
                batch = augment(to_device(batch, accelerator.device), cfg.data)
                x = resized(torch.cat([batch[n].float() for n in cfg.vae.inputs], dim=1), phase.image_size)
                with accelerator.no_sync(model) if micro < accum - 1 else nullcontext(), accelerator.autocast():
                    loss, reconstruction, values = loss_fn(model, x, bare_disc if gan else None, last_layer)
                accelerator.backward(loss.mean() / accum)
                if gan:  # the discriminator sees the reconstruction from before this step's update, as in taming
                    with accelerator.no_sync(disc) if micro < accum - 1 else nullcontext(), accelerator.autocast():
                        d_loss = loss_fn.discriminator_loss(disc, x, reconstruction)
                    accelerator.backward(d_loss.mean() / accum)
                    values["d_loss"] = d_loss.detach().mean().float()
                for name, value in values.items():
                    step_values[name] = step_values.get(name, 0.0) + value / accum

            # Clip and step both networks, unless a gradient is not finite (then neither steps).
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            norms = [grad_norm, accelerator.clip_grad_norm_(disc.parameters(), max_norm)] if gan else [grad_norm]
            finite = bool(torch.isfinite(torch.stack(norms)).all())  # one host sync per optimizer step
            if finite or accelerator.scaler is not None:
                optimizer.step()  # under fp16 the loss scaler skips a non-finite step and lowers its scale
            if finite and gan:
                disc_optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            if adversarial:
                disc_optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # the schedule follows the global step, before disc_start too
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    disc_scheduler.step()
            step += 1
            if finite:
                running.add({**step_values, "grad_norm": grad_norm.detach().float()})
                if ema is not None:
                    ema.update(model, step)
            guard.record(finite, step, logger)

            # Log averages over the steps since the last log (the only host syncs for logging).
            if step % cfg.training.log_every == 0 or step == cfg.training.max_steps:
                values = {f"train/{k}": v for k, v in running.pop_means().items()}
                values.update({"train/lr": lr_scheduler.get_last_lr()[0],
                               "train/nonfinite_steps": state["nonfinite_steps"]})
                if len(phases) > 1:
                    values.update({"train/phase": phase.number, "train/image_size": phase.image_size})
                metrics_log.log(values, step)
                progress.set_values({k: values[k] for k in ("train/rec_loss", "train/lr") if k in values})

            # Validation runs at data.image_size, so its curves compare across phases; every phase ends with one.
            if step % cfg.validation.every == 0 or step == cfg.training.max_steps or \
                    (len(phases) > 1 and step == phase.end):
                validate(step, *validation)

            stop_reason = checkpoint_if_due(step, start_step, cfg, accelerator, checkpoints, model, optimizer,
                                            lr_scheduler, ema, state, running, stop, extra)
            progress.update(step)
    progress.close()
    if stopped_before_the_end(step, cfg, model, logger, metrics_log, stop_reason):
        return

    # Export the EMA weights in diffusers format (on every rank: sharded weights are gathered, rank 0 writes).
    with ema.swapped(model) if ema else nullcontext():
        export_autoencoder(run_dir / "final", accelerator.unwrap_model(model).vae, description,
                           card=model_card(cfg, run_dir, argv, "autoencoder"))
    metrics_log.close()
    logger.info("done: %s", run_dir / "final")


if __name__ == "__main__":
    config_lib.run_main(main, TrainingDiverged)
