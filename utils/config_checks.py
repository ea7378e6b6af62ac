"""Config values that cannot work, refused before any data is read: `check_config(cfg)` raises a ConfigError
naming the dotted key and what to use instead.

The valid choices come from the modules that implement them; those import utils.config, so utils.config imports
this module only when it checks.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

from accelerate.utils import PrecisionType

import diffusion
from data import DEMOS, KINDS, check_demo_root, class_folders, nifti, tiles
from data.degrade import check_degrade_config
from models.autoencoder import check_autoencoder_config
from models.losses import AdversarialLoss, ReconstructionLoss
from models.unet2d import check_unet_config
from models.unet3d import check_unet3d_shape
from utils.config import RESUME_MODES, Config, ConfigError, check_choice
from utils.tracking import KNOWN_TRACKERS
from utils.training import LR_SCHEDULES

LATENT_CACHE = "latent_cache"  # data.kind of a diffusion run on encode_latents.py's cache
WANDB_MODES = ("online", "offline", "disabled")

# Sizes, counts and periods.
AT_LEAST_ONE = (
    "data.image_size", "model.layers_per_block", "model.attention_head_dim", "model.norm_num_groups",
    "training.max_steps", "training.batch_size", "training.grad_accum_steps", "training.checkpoint_every",
    "training.log_every", "training.max_consecutive_nonfinite", "validation.every", "validation.sample_every",
    "validation.num_samples", "validation.sampling_steps", "latent.batch_size",
    "latent.shard_size", "vae.latent_channels", "vae.layers_per_block", "vae.norm_num_groups", "vae.disc_channels",
    "vae.disc_layers", "vae.perceptual_slices", "eval.sampling_steps", "eval.samples_per_item", "eval.batch_size")
# Where 0 means none, off or automatic.
AT_LEAST_ZERO = (
    "run.seed", "run.num_threads", "data.num_workers", "data.slab_gap", "task.roi_weight", "task.perceptual_weight",
    "diffusion.guidance_scale", "training.weight_decay", "training.lr_warmup_steps", "training.max_grad_norm",
    "training.keep_last", "training.stop_after", "validation.num_items", "latent.tile_size", "latent.tile_overlap",
    "vae.kl_weight", "vae.codebook_weight", "vae.perceptual_weight", "vae.restart_threshold", "vae.disc_start",
    "vae.disc_weight", "eval.num_items", "eval.data_range", "eval.feature_channels", "eval.num_figures")
# Probabilities and fractions.
IN_ZERO_ONE = (
    "data.min_foreground", "data.flip_prob", "data.val_fraction", "data.test_fraction", "task.cond_drop_prob",
    "model.dropout", "training.ema_decay", "vae.codebook_decay")
PAIRS = ("data.mri_percentiles", "data.ct_window", "training.adam_betas")  # [low, high] or [beta1, beta2]


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _choice(cfg: Config, key: str, valid) -> None:
    check_choice(key, _value(cfg, key), valid)


def check_config(cfg: Config, denoiser: bool = True) -> None:
    """Raise ConfigError for the first value that cannot work; touches no data.

    Settings that depend on the data (task names, image sizes against network depth) are checked where the data
    is known. `denoiser`: the `model` section's UNet is built (not by train_vae.py), so its shapes matter.
    """
    # Names.
    _choice(cfg, "run.log_level", logging.getLevelNamesMapping())
    _choice(cfg, "data.kind", (*KINDS, LATENT_CACHE))
    _choice(cfg, "latent.source_kind", ("nifti", "tiles"))  # what encode_latents.py reads
    _choice(cfg, "training.lr_schedule", LR_SCHEDULES)
    _choice(cfg, "training.mixed_precision", PrecisionType.list())
    _choice(cfg, "logging.wandb_mode", WANDB_MODES)
    _choice(cfg, "eval.split", ("val", "test"))
    _choice(cfg, "latent.scaling", ("std", "codebook_minmax"))
    _choice(cfg, "task.kind", ("generation", "classification"))
    if cfg.training.compile:
        import torch._dynamo  # imported only when asked for: it takes a second
        _choice(cfg, "training.compile_backend", torch._dynamo.list_backends(exclude_tags=()))
    for tracker in cfg.logging.trackers:
        check_choice("logging.trackers", tracker, KNOWN_TRACKERS)
    ReconstructionLoss(cfg.vae.reconstruction_loss)  # their constructors check the loss names
    AdversarialLoss(cfg.vae.disc_loss)
    resume = cfg.training.resume
    if resume not in RESUME_MODES and not (resume and Path(resume).exists()):
        # Only a misspelt keyword is refused here: a missing folder is refused when a run resumes from it, and
        # evaluate.py still reads a run whose resume folder was rotated away since.
        close = difflib.get_close_matches(resume, RESUME_MODES, n=1)
        if close or not resume:
            raise ConfigError(f"training.resume='{resume}' is neither {' | '.join(RESUME_MODES)} nor a checkpoint "
                              "folder" + (f"; did you mean '{close[0]}'?" if close else ""))

    # Ranges.
    if not cfg.training.lr > 0:
        raise ConfigError(f"training.lr={cfg.training.lr} must be > 0")
    for key in AT_LEAST_ONE:
        if _value(cfg, key) < 1:
            raise ConfigError(f"{key}={_value(cfg, key)} must be >= 1")
    for key in AT_LEAST_ZERO:
        if _value(cfg, key) < 0:
            raise ConfigError(f"{key}={_value(cfg, key)} must be >= 0")
    for key in IN_ZERO_ONE:
        if not 0 <= _value(cfg, key) < 1:
            raise ConfigError(f"{key}={_value(cfg, key)} must be in [0, 1)")
    for key in PAIRS:
        if len(_value(cfg, key)) != 2:
            raise ConfigError(f"{key}={_value(cfg, key)} must hold two numbers")
    if not all(0 <= b < 1 for b in cfg.training.adam_betas):
        raise ConfigError(f"training.adam_betas={cfg.training.adam_betas} must lie in [0, 1)")
    for key in ("model.block_out_channels", "vae.block_out_channels"):
        if not _value(cfg, key) or min(_value(cfg, key)) < 1:
            raise ConfigError(f"{key}={_value(cfg, key)} must give one positive width per resolution level")
    # The networks: widths, groups, heads and levels (the pixel-space image size too; a latent one needs the
    # autoencoder, and the autoencoder's image size matters only to train_vae.py: both are checked at build).
    volumes = cfg.data.kind == "nifti" and cfg.data.dims == 3
    check_unet_config(cfg.model, 0 if cfg.data.kind == LATENT_CACHE or volumes or not denoiser else cfg.data.image_size)
    check_autoencoder_config(cfg.vae)
    negative = {k: w for k, w in cfg.task.loss_weights.items() if w < 0}
    if negative:
        raise ConfigError(f"task.loss_weights {negative} must be >= 0")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction = {cfg.data.val_fraction + cfg.data.test_fraction:g}"
                          " leaves no training data; it must be < 1")

    # The data source: demo, and the settings of the kind that reads the files.
    source_kind = cfg.latent.source_kind if cfg.data.kind == LATENT_CACHE else cfg.data.kind
    if cfg.data.demo:
        _choice(cfg, "data.demo", tuple(DEMOS))
        if DEMOS[cfg.data.demo][1] != source_kind:
            raise ConfigError(f"data.demo={cfg.data.demo} builds a {DEMOS[cfg.data.demo][1]} dataset, not "
                              f"{source_kind}; set data.kind={DEMOS[cfg.data.demo][1]} or data.demo=''")
        if not Path(cfg.data.root).exists():  # before the run folder is made: a mistyped root is no demo request
            check_demo_root(cfg.data.demo, Path(cfg.data.root))
    {"tiles": tiles, "class_folders": class_folders}.get(source_kind, nifti)._check_config(cfg.data)  # reader checks
    check_degrade_config(cfg.data.degrade)
    if volumes and denoiser:  # the shapes the UNet3D sees: held-out volumes and training patches
        for key in ("data.volume_shape", "data.patch_size"):
            if _value(cfg, key):
                check_unet3d_shape(cfg.model, _value(cfg, key), key)

    # Diffusion, and the combinations known not to work.
    diffusion.check_config(cfg.diffusion)
    if cfg.diffusion.strategy == "ddpm":
        for key in ("validation.sampling_steps", "eval.sampling_steps"):
            if _value(cfg, key) > cfg.diffusion.num_train_timesteps:
                raise ConfigError(f"{key}={_value(cfg, key)} must be <= diffusion.num_train_timesteps="
                                  f"{cfg.diffusion.num_train_timesteps} for ddpm")
    if cfg.diffusion.guidance_scale != 1 and cfg.task.cond_drop_prob == 0:
        raise ConfigError(f"diffusion.guidance_scale={cfg.diffusion.guidance_scale} needs a null condition, which "
                          "task.cond_drop_prob=0 never trains; set task.cond_drop_prob (e.g. 0.1) or "
                          "diffusion.guidance_scale=1")
    if (cfg.task.kind == "classification") != (cfg.data.kind == "class_folders"):
        raise ConfigError(f"task.kind={cfg.task.kind} with data.kind={cfg.data.kind}: classification runs on "
                          "class folders, and class folders are only classified; set both or neither")
    if cfg.task.kind == "classification":
        from models.classifier import check_classifier_config  # imports transformers: only when classifying
        check_classifier_config(cfg.classifier, cfg.data.image_size)
        if cfg.classifier.aux_steps >= cfg.training.max_steps:
            raise ConfigError(f"classifier.aux_steps={cfg.classifier.aux_steps} leaves no step of training.max_steps="
                              f"{cfg.training.max_steps} for the label diffusion; lower it or raise max_steps")
    if cfg.task.perceptual_weight > 0 and not cfg.vae.perceptual_network:
        raise ConfigError("task.perceptual_weight > 0 needs vae.perceptual_network, the local TorchScript feature "
                          "network it compares images with")
    if cfg.data.kind == LATENT_CACHE:
        if cfg.task.perceptual_weight > 0:
            raise ConfigError("task.perceptual_weight compares images, and a latent_cache run predicts latents; "
                              "use task.perceptual_weight=0")
        if cfg.data.flip_prob > 0:
            raise ConfigError("data.flip_prob > 0 with data.kind=latent_cache flips latents, which is not the "
                              "latent of a flipped image; use data.flip_prob=0")
        if not (cfg.latent.cache_dir and cfg.latent.autoencoder):
            raise ConfigError("data.kind=latent_cache needs latent.cache_dir and latent.autoencoder")
