"""Label-diffusion classification networks (DiffMIC-v2 style): ResNet backbones, the dual-granularity auxiliary
classifier whose global and local priors condition the diffusion, the guided prior map, and the label denoiser.

Shapes: images (B, C, H, W) with C 1 or 3; K classes; label maps and prior maps (B, K, Np, Np) with
Np = `classifier.prior_size`. The label denoiser has the `net(x_t, t, cond)` interface of every strategy.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import ResNetConfig, ResNetModel

from utils.config import ClassifierConfig, ConfigError

# A ResNet stem (7x7 stride-2 convolution, stride-2 max pool) divides the side by 4, every stage after the first
# by 2: the last feature map of an n-stage backbone is image_size / 2^(n + 1) pixels wide (at least 1).
STEM_STRIDE = 4
# Sinusoid frequencies of the timestep embedding; a learned layer maps them to `classifier.feature_dim`.
TIME_FREQUENCIES = 64
FUSION_BLOCKS = 2  # residual 3x3 blocks after the image-label fusion: Np is small, two already see the whole map
FEATURES_CACHE = "image_features"  # key under which sampling keeps the image features in the condition dict
ATTENTION_REDUCTION = 4  # hidden width of the patch attention = backbone width / 4 (512 -> 128 in ResNet-18)


# ----------------------------------------------------------------------------------------------------------
# Config checks and backbones.

def check_classifier_config(cfg: ClassifierConfig, image_size: int) -> None:
    """ConfigError naming the key for a `classifier` section no network can be built or trained from."""
    if not cfg.backbone_widths or any(w < 1 for w in cfg.backbone_widths):
        raise ConfigError(f"classifier.backbone_widths={list(cfg.backbone_widths)}: give one positive width per "
                          f"ResNet stage, e.g. [64, 128, 256, 512] for ResNet-18")
    if len(cfg.backbone_depths) != len(cfg.backbone_widths):
        raise ConfigError(f"classifier.backbone_depths has {len(cfg.backbone_depths)} entries but "
                          f"classifier.backbone_widths has {len(cfg.backbone_widths)}; give one depth per stage")
    if any(d < 1 for d in cfg.backbone_depths):
        raise ConfigError(f"classifier.backbone_depths={list(cfg.backbone_depths)}: every stage needs at least "
                          f"one block")
    if not 1 <= cfg.patch_size <= image_size:
        raise ConfigError(f"classifier.patch_size={cfg.patch_size} must be in [1, data.image_size={image_size}]: "
                          f"local patches are cropped from the image")
    for key, lowest in (("num_patches", 1), ("prior_size", 1), ("feature_dim", 1), ("aux_steps", 0),
                        ("focal_alpha", 0), ("focal_gamma", 0)):
        if getattr(cfg, key) < lowest:
            raise ConfigError(f"classifier.{key}={getattr(cfg, key)} must be at least {lowest}")
    if cfg.aux_steps > 0 and cfg.aux_lr <= 0:
        raise ConfigError(f"classifier.aux_lr={cfg.aux_lr} must be positive to train the auxiliary classifier "
                          f"for classifier.aux_steps={cfg.aux_steps} steps")
    if cfg.pretrained and not Path(cfg.pretrained).is_dir():
        raise ConfigError(f"classifier.pretrained={cfg.pretrained}: no such folder (a transformers ResNetModel "
                          f"saved with save_pretrained, or \"\" to train from scratch)")


def feature_map_side(cfg: ClassifierConfig, image_size: int) -> int:
    """The side of the backbone's last feature map (and of the saliency maps) for square images."""
    side = image_size
    for stride in [STEM_STRIDE] + [2] * (len(cfg.backbone_widths) - 1):
        side = math.ceil(side / stride)
    return max(side, 1)


class ResNetBackbone(nn.Module):
    """A transformers ResNetModel that returns its last feature map (B, C, h, w).

    Grey images are repeated to three channels when the loaded weights expect RGB (ImageNet weights).
    """

    def __init__(self, resnet: ResNetModel, in_channels: int):
        super().__init__()
        self.resnet = resnet
        self.expand_grey = resnet.config.num_channels != in_channels
        self.out_channels = resnet.config.hidden_sizes[-1]

    def forward(self, images: Tensor) -> Tensor:
        if self.expand_grey:
            images = images.expand(-1, self.resnet.config.num_channels, -1, -1)
        return self.resnet(images).last_hidden_state  # (B, C, h, w)


def resnet_config(cfg: ClassifierConfig, in_channels: int) -> ResNetConfig:
    """Basic-block ResNet settings (ResNet-18 style) from the `classifier` section; the stem is as wide as stage 1."""
    return ResNetConfig(num_channels=in_channels, embedding_size=cfg.backbone_widths[0],
                        hidden_sizes=list(cfg.backbone_widths), depths=list(cfg.backbone_depths), layer_type="basic")


def _load_pretrained(cfg: ClassifierConfig, in_channels: int) -> ResNetModel:
    folder = Path(cfg.pretrained)
    if not folder.is_dir():
        raise ConfigError(f"classifier.pretrained={cfg.pretrained}: no such folder (a transformers ResNetModel "
                          f"saved with save_pretrained, or \"\" to train from scratch)")
    try:
        resnet = ResNetModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"classifier.pretrained={folder} does not hold a transformers ResNetModel: {error}") from None
    loaded = resnet.config
    if list(loaded.hidden_sizes) != list(cfg.backbone_widths) or list(loaded.depths) != list(cfg.backbone_depths):
        raise ConfigError(f"classifier.backbone_widths={list(cfg.backbone_widths)} and classifier.backbone_depths="
                          f"{list(cfg.backbone_depths)} differ from the ResNet in classifier.pretrained={folder} "
                          f"(widths {list(loaded.hidden_sizes)}, depths {list(loaded.depths)}); set them to match")
    if loaded.num_channels != in_channels and not (in_channels == 1 and loaded.num_channels == 3):
        raise ConfigError(f"the ResNet in classifier.pretrained={folder} takes {loaded.num_channels} channels but the "
                          f"images have {in_channels}")
    return resnet


def build_backbone(cfg: ClassifierConfig, in_channels: int, weight_channels: int = 0) -> ResNetBackbone:
    """A basic-block ResNet returning its last feature map, from scratch or from `classifier.pretrained`.

    Nothing is ever downloaded: pretrained weights come from a local folder only, written by save_pretrained of a
    ResNetModel or a ResNetForImageClassification (whose classification head is left out). `weight_channels`: the
    input channels of the weights when they differ from the images' (an export of grey images on RGB weights).
    """
    if cfg.pretrained:
        resnet = _load_pretrained(cfg, in_channels)
    else:
        resnet = ResNetModel(resnet_config(cfg, weight_channels or in_channels))
    return ResNetBackbone(resnet, in_channels)


# ----------------------------------------------------------------------------------------------------------
# Auxiliary classifier: a global head on the whole image and a local head on its most salient patches.

def top_fraction_pool(saliency: Tensor, fraction: float) -> Tensor:
    """Mean of the largest `fraction` of each map's values (at least one): (B, K, h, w) -> (B, K)."""
    flat = saliency.flatten(2)
    count = max(1, round(flat.shape[-1] * fraction))
    return flat.topk(count, dim=-1).values.mean(-1)


def class_agnostic_saliency(saliency: Tensor) -> Tensor:
    """Sum over classes of each class map scaled to [0, 1], so no class dominates by its scale: (B, K, h, w) ->
    (B, 1, h, w)."""
    flat = saliency.flatten(2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    # A constant map carries no location; it becomes zero instead of 0 / 0.
    return ((saliency - low) / (high - low).clamp_min(torch.finfo(saliency.dtype).tiny)).sum(1, keepdim=True)


def _square_mask(corners: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """(B, 1, H, W) float mask of the patch_size square at each (row, col) corner (B, 2)."""
    rows = torch.arange(height, device=corners.device)
    cols = torch.arange(width, device=corners.device)
    in_rows = (rows >= corners[:, :1]) & (rows < corners[:, :1] + patch_size)  # (B, H)
    in_cols = (cols >= corners[:, 1:]) & (cols < corners[:, 1:] + patch_size)  # (B, W)
    return (in_rows[:, None, :, None] & in_cols[:, None, None, :]).float()


@torch.no_grad()
def select_patches(saliency: Tensor, image_size: tuple[int, int], patch_size: int, num_patches: int) -> Tensor:
    """Upper-left pixel corners (B, k, 2) as (row, col) of the `num_patches` most salient patches, chosen greedily.

    The class-agnostic saliency is upsampled (bilinear) to the image; each candidate patch scores its mean
    saliency. Each step keeps the candidates that overlap the patches already chosen the least (none, while
    non-overlapping ones are left) and takes the highest-scoring of them (the first in raster order on ties).
    """
    saliency = F.interpolate(class_agnostic_saliency(saliency.float()), size=tuple(image_size), mode="bilinear",
                             align_corners=False)  # (B, 1, H, W)
    height, width = saliency.shape[-2:]
    scores = F.avg_pool2d(saliency, patch_size, stride=1)[:, 0]  # (B, H - P + 1, W - P + 1): score per corner
    covered = torch.zeros_like(saliency)  # pixels inside the patches chosen so far
    corners = []
    for _ in range(num_patches):
        overlap = (F.avg_pool2d(covered, patch_size, stride=1)[:, 0] * patch_size ** 2).round()  # pixels shared
        least = overlap.flatten(1).amin(1)[:, None, None]
        candidates = torch.where(overlap == least, scores, -math.inf).flatten(1)
        index = candidates.argmax(1)  # (B,)
        corner = torch.stack([index // scores.shape[-1], index % scores.shape[-1]], dim=-1)  # (B, 2)
        covered = torch.maximum(covered, _square_mask(corner, patch_size, height, width))
        corners.append(corner)
    return torch.stack(corners, dim=1)  # (B, k, 2)


def crop_patches(images: Tensor, corners: Tensor, patch_size: int) -> Tensor:
    """The patches (B, k, C, P, P) of images (B, C, H, W) whose upper-left pixels are corners (B, k, 2)."""
    offsets = torch.arange(patch_size, device=images.device)
    rows = corners[..., 0, None] + offsets  # (B, k, P)
    cols = corners[..., 1, None] + offsets
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    patches = images.permute(0, 2, 3, 1)[batch, rows[..., :, None], cols[..., None, :]]  # (B, k, P, P, C)
    return patches.permute(0, 1, 4, 2, 3)


class GatedAttention(nn.Module):
    """Gated attention over a bag of instances (Ilse et al. 2018): (B, k, D) -> weights (B, k) summing to 1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.value = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, instances: Tensor) -> Tensor:
        hidden = torch.tanh(self.value(instances)) * torch.sigmoid(self.gate(instances))
        return self.score(hidden).squeeze(-1).softmax(dim=-1)


class AuxiliaryClassifier(nn.Module):
    """Dual-granularity guidance (DCG): global logits from the whole image, local logits from its salient patches.

    Global head: a ResNet, a 1x1 convolution to one saliency map per class, and top-`top_fraction` pooling of
    each map into a logit (1.0 = mean pooling, what DiffMIC-v2 uses). Local head: the `classifier.num_patches`
    most salient `classifier.patch_size`-pixel patches (`select_patches`) are cropped from the image, encoded by
    a second ResNet, and averaged with gated-attention weights (multiple-instance learning) into a logit vector.
    The saliency maps are `feature_map_side` cells wide: fewer backbone stages give finer patch locations on
    small images. The ResNets hold batch norm: outputs are deterministic in eval mode.
    """

    def __init__(self, cfg: ClassifierConfig, in_channels: int, num_classes: int, image_size: int,
                 top_fraction: float = 1.0, weight_channels: int = 0):
        super().__init__()
        check_classifier_config(cfg, image_size)
        self.num_patches, self.patch_size, self.top_fraction = cfg.num_patches, cfg.patch_size, top_fraction
        self.global_backbone = build_backbone(cfg, in_channels, weight_channels)
        width = self.global_backbone.out_channels
        self.saliency_head = nn.Conv2d(width, num_classes, kernel_size=1, bias=False)
        self.local_backbone = build_backbone(cfg, in_channels, weight_channels)
        self.patch_attention = GatedAttention(width, max(width // ATTENTION_REDUCTION, 1))
        self.local_head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """global_logits (B, K), local_logits (B, K), saliency (B, K, h, w), patch_corners (B, k, 2) as (row, col)
        pixels, patch_attention (B, k)."""
        if min(images.shape[-2:]) < self.patch_size:
            raise ValueError(f"images {tuple(images.shape)} are smaller than classifier.patch_size={self.patch_size}")
        saliency = self.saliency_head(self.global_backbone(images))  # (B, K, h, w)
        global_logits = top_fraction_pool(saliency, self.top_fraction)
        corners = select_patches(saliency, images.shape[-2:], self.patch_size, self.num_patches)
        patches = crop_patches(images, corners, self.patch_size)  # (B, k, C, P, P)
        features = self.local_backbone(patches.flatten(0, 1)).mean((-2, -1))  # (B * k, D)
        features = features.view(images.shape[0], self.num_patches, -1)  # (B, k, D)
        attention = self.patch_attention(features)  # (B, k)
        local_logits = self.local_head((attention[..., None] * features).sum(1))  # (B, K)
        return {"global_logits": global_logits, "local_logits": local_logits, "saliency": saliency,
                "patch_corners": corners, "patch_attention": attention}

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample loss (B,): cross-entropy of the global plus that of the local head; batch-mean diagnostics
        (detached, no host sync): aux/global_ce, aux/local_ce, aux/global_accuracy, aux/local_accuracy."""
        out = self(images)
        global_ce = F.cross_entropy(out["global_logits"], labels, reduction="none")
        local_ce = F.cross_entropy(out["local_logits"], labels, reduction="none")
        diagnostics = {
            "aux/global_ce": global_ce.detach().mean(), "aux/local_ce": local_ce.detach().mean(),
            "aux/global_accuracy": (out["global_logits"].argmax(1) == labels).float().mean().detach(),
            "aux/local_accuracy": (out["local_logits"].argmax(1) == labels).float().mean().detach()}
        return global_ce + local_ce, diagnostics

    @torch.no_grad()
    def priors(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Global and local class probabilities (B, K) each: the condition of the label diffusion."""
        out = self(images)
        return out["global_logits"].float().softmax(1), out["local_logits"].float().softmax(1)


# ----------------------------------------------------------------------------------------------------------
# Guided prior map and focal weights.

def guided_prior_map(global_probs: Tensor, local_probs: Tensor, size: int) -> Tensor:
    """The Np x Np prior map (B, K, Np, Np) whose cell (i, j) is (1 - w) * global + w * local, w = |i - j| / (Np - 1).

    As in DiffMIC-v2: the diagonal holds the global prior, the two off-diagonal corners (0, Np - 1) and
    (Np - 1, 0) hold the local prior, and cells in between move linearly from one to the other with their
    distance to the diagonal. Every cell is a convex mix of two probability vectors, so a probability vector.
    Np = 1 is the global prior alone.
    """
    index = torch.arange(size, device=global_probs.device, dtype=global_probs.dtype)
    local_weight = (index[:, None] - index[None, :]).abs() / max(size - 1, 1)  # (Np, Np), 0 on the diagonal
    return global_probs[..., None, None] + local_weight * (local_probs - global_probs)[..., None, None]


def focal_weights(prior_map: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-sample loss weights (B,) 1 + alpha * (1 - p)^gamma, p the prior map's true-class probability averaged
    over its cells: samples the auxiliary classifier gets wrong weigh more."""
    p_true = prior_map.float().mean((-2, -1)).gather(1, labels.long()[:, None]).squeeze(1)  # (B,)
    return 1 + alpha * (1 - p_true).clamp_min(0) ** gamma


# ----------------------------------------------------------------------------------------------------------
# Label denoiser.

def timestep_embedding(t: Tensor, frequencies: int = TIME_FREQUENCIES) -> Tensor:
    """Sinusoidal embedding (B, frequencies) of timesteps t (B,), on the periods of Vaswani et al. (2017)."""
    half = frequencies // 2
    rates = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * rates  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 32), channels)  # 32 groups where the width allows it


class FusionBlock(nn.Module):
    """Residual block on the fused label map: norm, SiLU, 3x3 conv, timestep scale and shift, norm, SiLU, 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(dim), nn.Conv2d(dim, dim, 3, padding=1)
        self.time_scale_shift = nn.Linear(dim, 2 * dim)
        self.norm2, self.conv2 = _group_norm(dim), nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, h: Tensor, time: Tensor) -> Tensor:
        scale, shift = self.time_scale_shift(time)[..., None, None].chunk(2, dim=1)  # (B, D, 1, 1) each
        update = self.conv1(F.silu(self.norm1(h))) * (1 + scale) + shift
        return h + self.conv2(F.silu(self.norm2(update)))


class LabelDenoiser(nn.Module):
    """net(x_t, t, cond): the noise in a noisy label map (B, K, Np, Np) given the image and the guided prior map.

    The noisy map and the prior map are embedded per position (1x1 conv) and shifted by the timestep embedding,
    then multiplied elementwise by image features pooled to Np x Np (the fusion DiffMIC uses), refined by
    residual 3x3 blocks modulated by the timestep, and projected to K channels. Width `classifier.feature_dim`.

    Args of forward:
        t: (B,) timesteps as floats (the DDPM strategy passes the integer step), or one value for all.
        cond: {"image": (B, C, H, W), "prior": (B, K, Np, Np)}.
    """

    def __init__(self, cfg: ClassifierConfig, in_channels: int, num_classes: int, weight_channels: int = 0):
        super().__init__()
        dim = cfg.feature_dim
        self.prior_size = cfg.prior_size
        self.image_encoder = build_backbone(cfg, in_channels, weight_channels)
        self.image_projection = nn.Conv2d(self.image_encoder.out_channels, dim, kernel_size=1)
        self.label_embedding = nn.Conv2d(2 * num_classes, dim, kernel_size=1)
        self.time_embedding = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(FusionBlock(dim) for _ in range(FUSION_BLOCKS))
        self.output = nn.Sequential(_group_norm(dim), nn.SiLU(), nn.Conv2d(dim, num_classes, kernel_size=1))

    def image_features(self, image: Tensor) -> Tensor:
        """(B, D, Np, Np): the image encoder's features pooled to the label map's cells."""
        features = self.image_projection(self.image_encoder(image))  # (B, D, h, w)
        return F.adaptive_avg_pool2d(features, self.prior_size)

    def forward(self, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        image, prior = cond["image"], cond["prior"]
        if x_t.shape != prior.shape or x_t.shape[-1] != self.prior_size:
            raise ValueError(f"label map {tuple(x_t.shape)} and prior map {tuple(prior.shape)} must both be "
                             f"(B, K, {self.prior_size}, {self.prior_size}) (classifier.prior_size)")
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        if torch.is_grad_enabled():
            features = self.image_features(image.to(x_t.dtype))
        else:  # sampling: the image is the same at every step, so its features are computed once per condition
            if FEATURES_CACHE not in cond:
                cond[FEATURES_CACHE] = self.image_features(image.to(x_t.dtype))
            features = cond[FEATURES_CACHE]
        time = self.time_embedding(timestep_embedding(t).to(x_t.dtype))  # (B, D)
        h = self.label_embedding(torch.cat([x_t, prior.to(x_t.dtype)], dim=1)) + time[..., None, None]  # (B, D, Np, Np)
        h = h * features
        for block in self.blocks:
            h = block(h, time)
        return self.output(h)  # (B, K, Np, Np)


# ----------------------------------------------------------------------------------------------------------
# The trained network: auxiliary classifier and label denoiser in one module, and its export.

CLASSIFIER_WEIGHTS = "classifier.safetensors"  # final/ and best-<metric>/ of a classification run
CLASSIFIER_CONFIG = "classifier.json"


class LabelDiffusionClassifier(nn.Module):
    """The auxiliary classifier (stage 1, then frozen) and the label denoiser (stage 2) of one run.

    One module, so one optimizer, one EMA, one checkpoint and one DDP wrapper serve both stages. Both stages'
    training passes go through `forward` (DDP synchronises only what its wrapper's forward computed):
    `net(x_t, t, cond)` is the denoiser, `net(auxiliary_images=..., auxiliary_labels=...)` the auxiliary
    classifier's per-sample loss and diagnostics.
    """

    def __init__(self, cfg: ClassifierConfig, in_channels: int, num_classes: int, image_size: int,
                 weight_channels: int = 0):
        super().__init__()
        self.auxiliary = AuxiliaryClassifier(cfg, in_channels, num_classes, image_size,
                                             weight_channels=weight_channels)
        self.denoiser = LabelDenoiser(cfg, in_channels, num_classes, weight_channels)
        # What rebuilds it without classifier.pretrained: RGB weights may serve grey images.
        self.settings = {"classifier": dict(vars(cfg)), "in_channels": in_channels, "num_classes": num_classes,
                         "image_size": image_size,
                         "weight_channels": self.auxiliary.global_backbone.resnet.config.num_channels}

    def forward(self, x_t: Tensor = None, t: Tensor = None, cond: dict = None, *,
                auxiliary_images: Tensor = None, auxiliary_labels: Tensor = None):
        if auxiliary_images is not None:
            return self.auxiliary.loss(auxiliary_images, auxiliary_labels)
        return self.denoiser(x_t, t, cond)

    def parameter_groups(self, auxiliary_lr: float) -> list[dict]:
        """Optimizer groups: the auxiliary classifier at `auxiliary_lr`, the denoiser at the optimizer's lr."""
        return [{"params": list(self.auxiliary.parameters()), "lr": auxiliary_lr},
                {"params": list(self.denoiser.parameters())}]

    def save_export(self, state: dict[str, Tensor], folder: Path) -> None:
        """classifier.safetensors (the gathered `state`) and classifier.json (what rebuilds the module)."""
        save_file({k: v.contiguous() for k, v in state.items()}, folder / CLASSIFIER_WEIGHTS)
        (folder / CLASSIFIER_CONFIG).write_text(json.dumps(self.settings, indent=2))

    @classmethod
    def load_export(cls, folder: Path) -> "LabelDiffusionClassifier":
        """The module `save_export` wrote into `folder` (final/ or checkpoints/best-<metric>/)."""
        settings = json.loads((Path(folder) / CLASSIFIER_CONFIG).read_text())
        cfg = ClassifierConfig(**{**settings["classifier"], "pretrained": ""})  # the weights are in the export
        net = cls(cfg, settings["in_channels"], settings["num_classes"], settings["image_size"],
                  settings["weight_channels"])
        net.load_state_dict(load_file(Path(folder) / CLASSIFIER_WEIGHTS))
        return net
