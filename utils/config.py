"""Typed configuration: nested dataclasses, YAML presets, dotted command-line overrides.

Every script calls `parse_args(argv, ...)`; unknown keys, wrongly typed values and values that cannot work
(utils/config_checks.py) stop the run before any data is read, with a one-line message naming the key.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
# Keys that existed once: a config that still sets one is told what replaced it.
REMOVED_KEYS = {
    "diffusion.sampling_steps": "it was read nowhere; validation.sampling_steps and eval.sampling_steps set the steps",
    "validation.max_batches": "validation.num_items sets how many held-out items are scored, whatever the batch size",
}
RESUME_MODES = ("auto", "never", "latest")  # training.resume, else a checkpoint folder


class ConfigError(ValueError):
    """Bad user input (config, data or run directory): reported as one line, without a traceback."""


def check_choice(key: str, value: Any, valid, why: str = "") -> None:
    """Raise a ConfigError naming the dotted `key` unless `value` is one of `valid`."""
    if value not in valid:
        raise ConfigError(f"{key}='{value}' is not one of {' | '.join(valid)}{why}")


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"  # the run directory: config, split, metrics, checkpoints, exports, eval
    seed: int = 0  # weights, noise and batch order; the same seed and config give the same run
    log_level: str = "INFO"  # DEBUG also logs the items of every micro-batch
    num_threads: int = 0  # torch intra-op threads per process; 0 = the cores available / processes on the node


@dataclass
class DegradeConfig:
    kind: str = ""  # "" (none) | low_dose_ct | low_resolution | thick_slices: simulated from the target
    photons: float = 1.0e4  # low_dose_ct: incident photons per detector bin and view (fewer = noisier)
    # low_resolution: down-sampling per array axis, or one for all; thick_slices: one whole number, the thin
    # slices averaged into each thick one along data.slice_axis
    factor: list[float] = field(default_factory=lambda: [2.0])
    seed: int = 0  # each subject's degradation is seeded by (this, subject id): the same pairs whatever run.seed
    source: str = ""  # the image modality degraded ("" = the first of data.images)
    name: str = "ld"  # the name the degraded image goes by (e.g. in task.spatial_conditions)


@dataclass
class DataConfig:
    kind: str = "nifti"  # nifti | tiles | class_folders | latent_cache
    dims: int = 2  # nifti: 2 = items are slices; 3 = items are volumes (whole, or slabs of a single subject)
    # the data folder: <subject>/<modality>.nii.gz folders or an MSD dataset.json (nifti), image files (tiles),
    # train/<class>/ folders (class_folders)
    root: str = "data/demo_mni152"
    # build this demo dataset at `root` when it does not exist, only into a folder of the demo's own name (e.g.
    # data/demo_mni152), so that a mistyped root is refused ("" = never)
    demo: str = ""
    images: list[str] = field(default_factory=lambda: ["t1"])  # image modalities per subject (MSD: names or indices)
    masks: list[str] = field(default_factory=list)  # integer label volumes read per subject (0 = background)
    mask_classes: dict[str, int] = field(default_factory=dict)  # labels per mask, background included
    normalization: str = "mri"  # mri | ct
    # mri: each volume clipped at these percentiles of its non-zero voxels, then mapped to [-1, 1]
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # ct: the HU window [low, high] mapped to [-1, 1]; values outside are clipped (soft tissue [-160, 240])
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    spacing: Optional[list[float]] = None  # resample to this voxel size in mm (x, y, z); null keeps native
    slice_axis: int = 2  # 0 sagittal, 1 coronal, 2 axial (after reorientation to RAS)
    image_size: int = 64  # 2D items are image_size x image_size pixels
    resize: bool = True  # pad to square then resize; false: centre pad/crop to image_size
    # data.dims 3: every volume is centre padded/cropped to (D, H, W), D along data.slice_axis, H and W the slice
    # as 2D shows it; with a single subject, items are slabs of D slices
    volume_shape: list[int] = field(default_factory=list)
    patch_size: list[int] = field(default_factory=list)  # data.dims 3: train on random (D, H, W) patches; [] = whole
    patch_foreground: float = 0.5  # share of patches centred on a foreground voxel (filter_mask or intensity)
    filter_mask: str = ""  # mask whose foreground decides which slices are kept ("" = image intensity)
    min_foreground: float = 0.05  # keep slices with at least this fraction of foreground pixels
    intensity_threshold: float = -0.9  # foreground = normalised intensity above this (without filter_mask)
    flip_prob: float = 0.0  # probability of a left-right flip of a training sample
    val_fraction: float = 0.2  # share of subjects held out for validation (at least one; one subject: a slab)
    test_fraction: float = 0.0  # share of subjects held out for eval.split=test, never seen in training
    slab_gap: int = 4  # slices left out between slabs when a single subject is split
    num_workers: int = 0  # DataLoader worker processes per training process (0 = load in the main one)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)  # degraded input simulated from the target
    # Pathology tiles (data.kind: tiles): <root>/<name>.png|.tif images, optional <name>_mask.png class ids.
    tile_size: int = 64  # tiles cut from each image, in pixels (then resized to image_size if different)
    tile_stride: int = 0  # 0 = tile_size (no overlap)
    min_tissue: float = 0.5  # keep tiles with at least this fraction of tissue (Otsu on saturation)
    tile_classes: int = 3  # classes in the masks (0 = background); the class-distribution vector length
    class_balanced: bool = False  # sample training items balanced by their (dominant) class
    # Class folders (data.kind: class_folders): <root>/train/<class>/*.png|jpg|tif|nii.gz, optional <root>/test/.
    color: str = "rgb"  # rgb | grey: every image is converted to this on load
    rotate_degrees: float = 0.0  # training only: random rotation by up to this many degrees

    def image_names(self) -> list[str]:
        """The images an item holds: data.images, then the simulated degraded image when there is one."""
        return list(self.images) + ([self.degrade.name] if self.degrade.kind else [])

    def training_shape(self) -> list[int]:
        """Spatial sizes of a training sample: the 3D patch or volume, or the 2D slice or tile."""
        if self.dims == 3:
            return list(self.patch_size or self.volume_shape)
        return [self.image_size] * 2


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # UNet widths, one per level
    layers_per_block: int = 1  # residual blocks per level
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])  # self-attention per level
    attention_head_dim: int = 32  # channels per attention head (divides the widths with attention)
    norm_num_groups: int = 8  # GroupNorm groups (divides every width)
    dropout: float = 0.0  # in the residual blocks
    gradient_checkpointing: bool = False  # recompute each UNet block in the backward pass: less memory, more compute


@dataclass
class TaskConfig:
    # generation: diffuse the targets (images, masks, latents); classification: diffuse a label map (DiffMIC-v2,
    # data.kind: class_folders, the classifier section)
    kind: str = "generation"
    targets: list[str] = field(default_factory=lambda: ["t1"])  # data names generated, concatenated channel-wise
    # data names given to the network beside x_t (a mask for mask -> image, the degraded image for restoration)
    spatial_conditions: list[str] = field(default_factory=list)
    vector_condition: str = ""  # e.g. class_dist: embedded and added to the time embedding
    cond_drop_prob: float = 0.0  # drop all conditions of a sample with this probability (guidance)
    loss_weights: dict[str, float] = field(default_factory=dict)  # per target, default 1
    roi_mask: str = ""  # mask whose foreground up-weights the loss ("" = none)
    roi_weight: float = 1.0  # loss weight of the pixels inside roi_mask (outside: 1)
    # Feature-space loss on the predicted x0 against x0 (images only), weighted per sample; uses
    # vae.perceptual_network, the local feature network of the autoencoder's perceptual loss. 0 = off
    perceptual_weight: float = 0.0


@dataclass
class DiffusionConfig:
    strategy: str = "ddpm"  # ddpm | rflow
    objective: str = "eps"  # ddpm: eps | x0 | v
    beta_schedule: str = "linear"  # ddpm: linear | scaled_linear | cosine
    num_train_timesteps: int = 1000  # ddpm: discrete noise levels; rflow: the scale of t given to the network
    loss_weighting: str = "none"  # ddpm: none | min_snr | p2
    min_snr_gamma: float = 5.0  # min_snr: loss weight min(SNR, gamma) / SNR (in eps terms), gamma = this
    p2_gamma: float = 1.0  # p2: weight 1 / (p2_k + SNR)^p2_gamma
    p2_k: float = 1.0  # p2: see p2_gamma
    timestep_sampling: str = "uniform"  # rflow: uniform | logit_normal
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(n), n ~ N(logit_mean, logit_std)
    logit_std: float = 1.0  # logit_normal: see logit_mean
    sampler: str = ""  # ddpm: ddim | dpm_solver; rflow: euler | heun; "" = ddim for ddpm, euler for rflow
    guidance_scale: float = 1.0  # classifier-free guidance when sampling (1 = none; > 1 needs cond_drop_prob > 0)


@dataclass
class TrainingConfig:
    max_steps: int = 1000  # optimizer steps of the whole run
    batch_size: int = 16  # per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch: batch_size x this x processes)
    lr: float = 2e-4  # peak learning rate of AdamW (after warmup)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decays
    lr_schedule: str = "cosine"  # constant | linear | cosine | one_cycle
    lr_warmup_steps: int = 100  # linear warmup from 0 to lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    ema_decay: float = 0.999  # 0 disables EMA
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): early averages forget the init
    checkpoint_every: int = 500  # steps between resumable checkpoints (also at the end and on SIGTERM)
    keep_last: int = 2  # newest checkpoints kept (best-* folders are separate); 0 = all
    resume: str = "auto"  # auto | never | latest | <checkpoint path>
    stop_after: int = 0  # end this invocation after N steps with a checkpoint (time-limited jobs); 0 = never
    max_consecutive_nonfinite: int = 10  # skipped non-finite steps in a row that stop the run
    log_every: int = 10  # steps between metrics.csv rows (averages over those steps)
    compile: bool = False  # torch.compile the network being trained (denoiser or autoencoder)
    compile_backend: str = "inductor"  # torch.compile backend: inductor (generated kernels) | aot_eager | ...


@dataclass
class ValidationConfig:
    every: int = 200  # held-out loss
    sample_every: int = 500  # sampling, SSIM/PSNR, figures
    num_samples: int = 8  # held-out items sampled and scored (SSIM/PSNR) at each sampling validation
    num_items: int = 64  # held-out items (evenly spaced) scored by the held-out loss; 0 = all
    sampling_steps: int = 25  # sampler steps for validation samples
    at_start: bool = False  # also validate the untrained model at step 0 (a baseline for the curves)


@dataclass
class LoggingConfig:
    trackers: list[str] = field(default_factory=lambda: ["csv"])  # csv | tensorboard | wandb
    wandb_project: str = "medical-diffusion"  # the project name given to the trackers (wandb's project)
    wandb_mode: str = "offline"  # offline | online | disabled


@dataclass
class LatentConfig:
    autoencoder: str = ""  # folder of an exported (final/) or diffusers-format AutoencoderKL / VQModel
    cache_dir: str = ""  # latent cache written by encode_latents.py and read with data.kind: latent_cache
    source_kind: str = "nifti"  # what encode_latents.py reads with the data section: nifti | tiles
    # images encoded one at a time, each into its own <name>_latent (e.g. [ct, ld] for low -> high dose); [] = the
    # autoencoder's inputs together into one "latent"
    encode_each: list[str] = field(default_factory=list)
    batch_size: int = 16  # items per encoder call, per process
    shard_size: int = 256  # items per cache shard
    tile_size: int = 0  # > 0: encode/decode in overlapping tiles of this many pixels (large images)
    tile_overlap: int = 16  # pixels of overlap between tiles, blended linearly
    # std: (z - mean) / std over the training latents | codebook_minmax: a 3D VQ codebook's range mapped to
    # [-1, 1] (3D-MedDiffusion's normalisation for PatchVolume latents)
    scaling: str = "std"


@dataclass
class ProgressivePhase:
    image_size: int = 64  # the side of the phase's training images (the data resized, antialiased)
    steps: int = 1000
    batch_size: int = 16  # per process


@dataclass
class VAEConfig:
    # kl | vq: diffusers AutoencoderKL / VQModel in 2D; in 3D (data.dims: 3) the PatchVolume architecture with a
    # Gaussian posterior (kl) or an EMA codebook with dead-code restarts (vq)
    kind: str = "kl"
    inputs: list[str] = field(default_factory=lambda: ["t1"])  # data names concatenated as input channels
    latent_channels: int = 4  # channels of the latent the diffusion model works in
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 2^(levels-1) downsampling
    layers_per_block: int = 1  # residual blocks per level of encoder and decoder
    norm_num_groups: int = 8  # GroupNorm groups (divides every width)
    num_vq_embeddings: int = 256  # codebook size (vq)
    codebook_decay: float = 0.99  # 3D vq: EMA decay of the code usage counts and sums
    restart_threshold: float = 1.0  # 3D vq: codes whose EMA usage falls below this restart at encoder outputs
    reconstruction_loss: str = "l1"  # l1 | l2
    kl_weight: float = 1.0e-6  # weight of the KL term (kl)
    codebook_weight: float = 1.0  # weight of the codebook + commitment loss (vq)
    perceptual_network: str = ""  # local TorchScript feature network for the perceptual loss ("" = off)
    perceptual_weight: float = 0.1  # weight of the perceptual loss (with perceptual_network)
    perceptual_slices: int = 2  # 3D: random slices per axis and sample that the 2D feature network sees (2.5D)
    disc_start: int = 0  # step at which the adversarial loss starts
    disc_weight: float = 0.0  # 0 = no adversarial loss; else the PatchGAN loss weight (times adaptive weight)
    disc_loss: str = "hinge"  # hinge | least_squares
    disc_channels: int = 32  # PatchGAN width of its first layer
    disc_layers: int = 3  # PatchGAN stride-2 layers, each halving the resolution (more: larger patches judged)
    gradient_checkpointing: bool = False  # recompute encoder/decoder blocks in the backward pass: less memory
    # 2D progressive resolution: phases trained one after another, each continuing from the previous weights on the
    # same images resized, e.g. [{image_size: 64, steps: 2000, batch_size: 16}, {image_size: 128, steps: 1000,
    # batch_size: 4}]; the steps add up to training.max_steps and the last phase is at data.image_size, where
    # validation always runs. [] = one phase at data.image_size and training.batch_size
    progressive: list[ProgressivePhase] = field(default_factory=list)


@dataclass
class ClassifierConfig:
    """Label-diffusion classification (DiffMIC-v2 style; data.kind: class_folders): an auxiliary classifier
    (global and local heads) trained first and then frozen gives a prior map that a denoiser refines."""
    backbone_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # ResNet-18: [64, 128, 256, 512]
    backbone_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # ResNet-18: [2, 2, 2, 2]
    pretrained: str = ""  # local folder of transformers ResNetModel weights for the backbones ("" = from scratch)
    num_patches: int = 6  # the local head's most salient patches per image
    patch_size: int = 16  # pixels of a local patch (at data.image_size)
    prior_size: int = 6  # Np: the guided prior map and the label map are Np x Np
    feature_dim: int = 128  # width of the denoiser's image features and label embedding
    aux_steps: int = 500  # stage 1: optimizer steps training the auxiliary classifier, then it is frozen
    aux_lr: float = 1e-3  # learning rate of the auxiliary classifier in stage 1
    focal_alpha: float = 10.0  # per-sample loss weight 1 + alpha * (1 - p)^gamma, p the prior's true-class prob
    focal_gamma: float = 1.0  # see focal_alpha


@dataclass
class EvalConfig:
    num_items: int = 0  # conditional: cap on held-out items (0 = all); unconditional: number of samples
    sampling_steps: int = 50  # sampler steps per sample
    samples_per_item: int = 1  # > 1 also scores diversity (mean pairwise MS-SSIM)
    weights: str = "final"  # final | best-<metric> (e.g. best-val_loss) | a checkpoint folder
    split: str = "val"  # val | test
    batch_size: int = 8  # per process
    seed: int = 1234  # sample s of item i starts from noise seeded by (seed + s, i)
    data_range: float = 0.0  # 0 = from the recorded normalisation (2.0 for [-1, 1])
    feature_network: str = ""  # local TorchScript file mapping images to features, for FID/KID ("" = off)
    feature_channels: int = 0  # repeat grey images to this many channels for the feature network (0 = as is)
    num_figures: int = 8  # items shown in comparison.png of the evaluation folder
    hu_metrics: bool = False  # CT (data.normalization: ct): also MAE and RMSE in Hounsfield units
    save_nifti: bool = False  # also nifti/<subject>/*.nii.gz on the scans' grid ([-1, 1] or HU; NaN: not generated)
    overwrite: bool = False  # replace an evaluation folder (eval/<weights>-<sampler><steps>/) that holds a report


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, (dict, DictConfig)) and not dotted.endswith(("mask_classes", "loss_weights")):
            keys += _all_keys(value, dotted + ".")
    return keys


def _explain(error: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line naming the key and the closest valid one."""
    key = getattr(error, "full_key", None) or "?"
    if key in REMOVED_KEYS:
        return ConfigError(f"config key '{key}' in {source} was removed: {REMOVED_KEYS[key]}; delete it")
    if "not in struct" in str(error) or "Key '" in str(error) and "not" in str(error):
        valid = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    message = str(error).splitlines()[0]
    return ConfigError(f"bad value for config key '{key}' in {source}: {message}")


def merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        raise _explain(error, source) from None


def resolve(yaml_path: Optional[Path], overrides: list[str]) -> Config:
    """Schema defaults <- YAML preset <- dotted overrides, validated against the schema."""
    cfg = OmegaConf.structured(Config)
    if yaml_path is not None:
        if not yaml_path.is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        cfg = merge(cfg, OmegaConf.load(yaml_path), str(yaml_path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        cfg = merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: Path) -> None:
    path.write_text(to_yaml(cfg))


def parse_args(argv: Optional[list[str]], description: str, default_config: Optional[str] = None,
               run_flag: bool = False, denoiser: bool = True, lr_finder: bool = False
               ) -> tuple[argparse.Namespace, Config]:
    """Parse `--config`, `--print-config`, optional `--run` and dotted overrides into a Config.

    Args:
        denoiser: the script builds the `model` section's UNet (its widths are checked against the image size).
        lr_finder: the script trains, so it offers the LR range test (`--find-lr`, utils/lr_finder.py).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--explain", action="store_true",
                        help="with --print-config: one dotted key a line, each with its comment from utils/config.py")
    if run_flag:
        parser.add_argument("--run", type=Path, default=None, help="run directory; reads its config.yaml")
    if lr_finder:
        parser.add_argument("--find-lr", action="store_true",
                            help="run the LR range test instead of training; writes run.output_dir/lr_finder.*")
        parser.add_argument("--find-lr-steps", type=int, default=100, help="at most this many sweep steps")
        parser.add_argument("--find-lr-min", type=float, default=1e-7, help="the sweep's first LR")
        parser.add_argument("--find-lr-max", type=float, default=1.0, help="the sweep's last LR")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-4")
    args = parser.parse_args(argv)
    if args.explain and not args.print_config:
        parser.error("--explain goes with --print-config")
    yaml_path = args.config
    if run_flag and args.run is not None and yaml_path is None:
        yaml_path = args.run / "config.yaml"
        if not yaml_path.is_file():
            raise ConfigError(f"run directory {args.run} has no config.yaml")
    if yaml_path is None and default_config is not None:
        yaml_path = REPO_ROOT / default_config
    cfg = resolve(yaml_path, args.overrides)
    # Imported here: the modules that own the valid choices import this one.
    from utils.config_checks import check_config
    check_config(cfg, denoiser)
    if run_flag and args.run is not None:
        cfg.run.output_dir = str(args.run)
    if args.print_config:
        from utils.config_help import explained_yaml
        print(explained_yaml(cfg) if args.explain else to_yaml(cfg), end="")
        sys.exit(0)
    return args, cfg


def run_main(main, *also_expected: type) -> None:
    """Run a script's main; bad input (ConfigError and `also_expected`) exits 2 with one line, no traceback."""
    try:
        main()
    except (ConfigError, *also_expected) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
