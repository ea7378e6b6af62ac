"""PatchVolume, the 3D VQ autoencoder of 3D-MedDiffusion, state-dict compatible with the public
PatchVolume_4x / PatchVolume_8x Lightning checkpoints, and a loader for those checkpoints that runs no code
from the file. The same class, with widths, levels and codebook size from `vae.*`, is the 3D autoencoder that
train_vae.py trains: VQ with an EMA codebook and dead-code restarts, or KL with a Gaussian posterior.

Written from the architecture facts in shared/PATCHVOLUME.md, not from the original code. Latents are raw: the
continuous pre-quantisation latent (VQ) or the posterior mean (KL) from `encode`; a VQ `decode` snaps them to the
codebook first. The min-max normalisation that 3D-MedDiffusion applies before diffusion belongs to the latent
cache, not to this model.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.losses import kl_divergence
from utils.config import ConfigError
from utils.distributed import all_reduce_sum, broadcast_from_rank0

GROUP_NORM_EPS = 1e-6  # what the checkpoints were trained with (torch's default is 1e-5)
# Latent voxels per distance matrix in `quantize`: 32768 x 8192 codes x 4 bytes = 1 GiB at most.
QUANTIZE_CHUNK = 32768
MAX_CONFIG_VALUES = 100_000  # in a checkpoint's hyper-parameters; a real config has about fifty


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def stage_widths(n_hiddens: int, downsample: int) -> list[int]:
    """Channels of each encoder stage, finest first: doubling at every stride-2 stage, and a last stage (no
    stride) at the top width. 8x: [48, 96, 192, 192]; 4x: [48, 96, 96]."""
    stages = int(math.log2(downsample))
    return [n_hiddens * 2 ** i for i in range(stages)] + [n_hiddens * 2 ** (stages - 1)]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d twice plus a residual; `resConv` (1x1) carries the residual when the width
    changes. The attribute names are the checkpoints' key names."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        if in_channels != out_channels:
            self.resConv = nn.Conv3d(in_channels, out_channels, 1)  # registered first, as in the checkpoints
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.resConv(x) if hasattr(self, "resConv") else x) + h


class Attention3D(nn.Module):
    """Multi-head self-attention over all voxels plus a residual. The heads' total width (heads * head_dim,
    128 in the checkpoints) does not follow the channels, hence `to_out` maps it back."""

    def __init__(self, channels: int, heads: int, head_dim: int, norm_groups: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = _group_norm(channels, norm_groups)
        self.to_qkv = nn.Linear(channels, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Conv3d(heads * head_dim, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, d, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C) with N = D*H*W
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, head_dim)
                   for t in self.to_qkv(tokens).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        out = out.transpose(2, 3).reshape(b, -1, d, h, w)  # (B, heads*head_dim, D, H, W), heads outermost
        return x + self.to_out(out)


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the coarsest resolution."""

    def __init__(self, channels: int, heads: int, head_dim: int, norm_groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, norm_groups)
        self.attn = Attention3D(channels, heads, head_dim, norm_groups)
        self.res2 = ResBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Upsample(nn.Module):
    """Doubles D, H and W with a transposed convolution (a module of its own for the `up.conv_trans` keys)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_trans = nn.ConvTranspose3d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_trans(x)


class Stage(nn.Module):
    """Residual blocks `res1`, `res2`, ... (two in the public models), then resampling under `resample_name`
    ("down" in the encoder, "up" in the decoder)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, resample_name: str,
                 resample: nn.Module, layers: int = 2):
        super().__init__()
        self.blocks = [f"res{i + 1}" for i in range(layers)]
        for i, name in enumerate(self.blocks):
            self.add_module(name, ResBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups))
        self.resample_name = resample_name
        self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.blocks:
            x = getattr(self, name)(x)
        return getattr(self, self.resample_name)(x)


def _output_block(channels: int, out_channels: int, norm_groups: int) -> nn.Sequential:
    """GroupNorm, SiLU, Conv3d: `final_block.0` / `final_block.2` in the checkpoints."""
    return nn.Sequential(_group_norm(channels, norm_groups), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1))


def _run(owner: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    """One stage or middle block, recomputed in the backward pass when the owner's gradient checkpointing is on."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class Encoder(nn.Module):
    """(B, image_channels, D, H, W) -> (B, embedding_dim, D/f, H/f, W/f); every stage but the last halves."""

    def __init__(self, image_channels: int, widths: list[int], embedding_dim: int, norm_groups: int, heads: int,
                 head_dim: int, layers: int):
        super().__init__()
        self.gradient_checkpointing = False  # set by PatchVolume.enable_gradient_checkpointing()
        last = len(widths) - 1
        # conv_blocks registered before conv_first: the checkpoints' key order.
        self.conv_blocks = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], width, norm_groups, "down",
                  nn.Conv3d(width, width, 4, stride=2, padding=1) if i < last else nn.Identity(), layers)
            for i, width in enumerate(widths))
        self.conv_first = nn.Conv3d(image_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[-1], heads, head_dim, norm_groups)
        self.final_block = _output_block(widths[-1], embedding_dim, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_first(x)  # (B, C0, D, H, W)
        for stage in self.conv_blocks:
            h = _run(self, stage, h)  # (B, C, D/2, H/2, W/2) but after the last stage
        return self.final_block(_run(self, self.mid_block, h))  # (B, embedding_dim, D/f, H/f, W/f)


class Decoder(nn.Module):
    """(B, embedding_dim, d, h, w) -> (B, image_channels, d*f, h*f, w*f): the encoder's widths reversed."""

    def __init__(self, image_channels: int, widths: list[int], embedding_dim: int, norm_groups: int, heads: int,
                 head_dim: int, layers: int):
        super().__init__()
        self.gradient_checkpointing = False  # set by PatchVolume.enable_gradient_checkpointing()
        widths = widths[::-1]
        last = len(widths) - 1
        self.conv_first = nn.Conv3d(embedding_dim, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], heads, head_dim, norm_groups)
        self.conv_blocks = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], width, norm_groups, "up", Upsample(width) if i < last else nn.Identity(),
                  layers)
            for i, width in enumerate(widths))
        self.final_block = _output_block(widths[-1], image_channels, norm_groups)

    def forward(self, z: Tensor) -> Tensor:
        h = _run(self, self.mid_block, self.conv_first(z))  # (B, C_top, d, h, w)
        for stage in self.conv_blocks:
            h = _run(self, stage, h)  # (B, C, 2d, 2h, 2w) but after the last stage
        return self.final_block(h)  # (B, image_channels, D, H, W); no clamp, as trained


class Codebook(nn.Module):
    """The code vectors (`embeddings`) and their EMA statistics: usage counts `N` and sums `z_avg` (van den Oord
    et al. 2017, appendix; the buffer names are the checkpoints').

    Codes are never trained by gradient. In training mode each call moves the statistics towards the batch's
    assignments and sets every code to its running mean; codes whose usage falls below `restart_threshold` restart
    at encoder outputs of the batch (Dhariwal et al. 2020, Jukebox), so that no code stays dead. Counts and sums
    are summed over all processes and the restart vectors come from rank 0: every process keeps the same codebook.
    """

    def __init__(self, n_codes: int, embedding_dim: int, decay: float = 0.99, restart_threshold: float = 1.0):
        super().__init__()
        self.decay, self.restart_threshold = decay, restart_threshold
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())

    def nearest(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Each voxel's latent vector snapped to its nearest code (Euclidean, as trained).

        Returns:
            codes: (B, embedding_dim, d, h, w), the code vectors; indices: (B, d, h, w), their rows.
        """
        codebook = self.embeddings  # (n_codes, C)
        flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])  # (B*d*h*w, C)
        code_norms = codebook.square().sum(dim=1)  # (n_codes,)
        # |z|^2 - 2 z.E + |E|^2, in chunks so that the distance matrix stays small for whole volumes.
        indices = torch.cat([(chunk.square().sum(dim=1, keepdim=True) - 2 * chunk @ codebook.t() + code_norms)
                             .argmin(dim=1) for chunk in flat.split(QUANTIZE_CHUNK)])
        indices = indices.view(z.shape[0], *z.shape[2:])  # (B, d, h, w)
        return F.embedding(indices, codebook).movedim(-1, 1).to(z.dtype), indices

    @torch.no_grad()
    def update(self, z: Tensor, indices: Tensor) -> None:
        """One EMA step towards the assignment of latents z (B, C, d, h, w) to codes `indices`, then restarts."""
        flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])  # (M, C)
        counts = torch.bincount(indices.view(-1), minlength=len(self.N)).float()
        sums = torch.zeros_like(self.z_avg).index_add_(0, indices.view(-1), flat)
        all_reduce_sum(counts, sums)
        self.N.lerp_(counts, 1 - self.decay)
        self.z_avg.lerp_(sums, 1 - self.decay)
        # Each code is the mean of the vectors assigned to it. A code that has (almost) never been used keeps its
        # vector: dividing by a vanishing count would throw it far away, and it would wander back only slowly.
        live = self.N > 1e-5
        self.embeddings[live] = self.z_avg[live] / self.N[live, None]
        dead = self.N < self.restart_threshold  # the same on every rank: N is summed over all of them
        if dead.any():
            # Candidates from the global RNG, which the training loop reseeds every step: exact on resume.
            candidates = flat[torch.randint(len(flat), (len(self.N),), device=flat.device)]
            broadcast_from_rank0(candidates)
            self.embeddings[dead] = candidates[dead]
            self.z_avg[dead] = candidates[dead]  # a restarted code counts as used once, so its mean is itself
            self.N[dead] = 1.0

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`nearest`, and in training mode the EMA update with this batch (the codes from before it)."""
        codes, indices = self.nearest(z)
        if self.training:
            self.update(z, indices)
        return codes, indices


class PatchVolume(ModelMixin, ConfigMixin):
    """The 3D-MedDiffusion autoencoder: volumes in [-1, 1] <-> latents downsampled `downsample` times per axis.

    Args:
        n_hiddens: channels of the first stage; they double at every stride-2 stage.
        downsample: per-axis downsampling, a power of two (log2 stride-2 stages): 4 and 8 in the public models.
        embedding_dim: latent channels (and code vector length).
        n_codes: codebook size (vq).
        norm_groups: GroupNorm groups (24 in the public models; not recorded in the weights' shapes).
        attention_heads, attention_head_dim: of the middle blocks' attention (4 x 32 in the public models).
        kind: "vq" (the public models) or "kl": `pre_vq_conv` then gives the posterior's mean and log-variance
            (2 * embedding_dim channels) and there is no codebook.
        block_out_channels: the stage widths, finest first (default: from n_hiddens and downsample as the public
            models: [48, 96, 192, 192] for 8x); every stage but the last halves the resolution.
        layers_per_block: residual blocks per stage (2 in the public models).
        commitment_beta, codebook_decay, restart_threshold: VQ training (see `Codebook`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, n_hiddens: int = 48, downsample: int = 8, embedding_dim: int = 8, n_codes: int = 8192,
                 image_channels: int = 1, norm_groups: int = 24, attention_heads: int = 4,
                 attention_head_dim: int = 32, kind: str = "vq", block_out_channels: Optional[list[int]] = None,
                 layers_per_block: int = 2, commitment_beta: float = 0.25, codebook_decay: float = 0.99,
                 restart_threshold: float = 1.0):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ConfigError(f"PatchVolume downsample={downsample} must be a power of two >= 2 "
                              "(the public models use 4 and 8)")
        if kind not in ("vq", "kl"):
            raise ConfigError(f"PatchVolume kind='{kind}' is not one of ['vq', 'kl']")
        widths = list(block_out_channels) if block_out_channels else stage_widths(n_hiddens, downsample)
        if widths[0] != n_hiddens or 2 ** (len(widths) - 1) != downsample:
            raise ConfigError(f"PatchVolume block_out_channels={widths} give n_hiddens={widths[0]} and downsample="
                              f"{2 ** (len(widths) - 1)}, not {n_hiddens} and {downsample}")
        if any(w % norm_groups for w in widths):
            raise ConfigError(f"PatchVolume n_hiddens={n_hiddens} must be a multiple of norm_groups={norm_groups} "
                              f"(the stage widths are {widths})")
        blocks = dict(widths=widths, embedding_dim=embedding_dim, norm_groups=norm_groups, heads=attention_heads,
                      head_dim=attention_head_dim, layers=layers_per_block)
        self.is_vq = kind == "vq"
        self.encoder = Encoder(image_channels, **blocks)
        self.decoder = Decoder(image_channels, **blocks)
        self.pre_vq_conv = nn.Conv3d(embedding_dim, embedding_dim * (1 if self.is_vq else 2), 1)
        self.post_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, 1)
        if self.is_vq:
            self.codebook = Codebook(n_codes, embedding_dim, codebook_decay, restart_threshold)

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """KL models: the Gaussian posterior over latents of volumes x."""
        return DiagonalGaussianDistribution(self.pre_vq_conv(self.encoder(x)))

    def encode(self, x: Tensor) -> Tensor:
        """Volumes (B, image_channels, D, H, W), sides multiples of `downsample` -> continuous latents
        (B, embedding_dim, D/f, H/f, W/f): not quantised (vq), the posterior mean (kl)."""
        if self.is_vq:
            return self.pre_vq_conv(self.encoder(x))
        return self.posterior(x).mean

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(codes (B, C, d, h, w), indices (B, d, h, w)): each latent vector's nearest code; no EMA update."""
        return self.codebook.nearest(z)

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        """Latents (B, embedding_dim, d, h, w) -> volumes (B, image_channels, d*f, h*f, w*f), not clamped; a VQ
        model snaps the latents to their nearest codes first (unless `quantize` is False)."""
        if self.is_vq and quantize:
            z = self.quantize(z)[0]
        return self.decoder(self.post_vq_conv(z))

    def forward(self, x: Tensor) -> Tensor:
        """The deterministic reconstruction of x (quantised, or from the posterior mean)."""
        return self.decode(self.encode(x))

    def autoencode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: (reconstruction, regulariser per sample (B,)).

        VQ: the straight-through estimator and the commitment loss `commitment_beta * |z - sg(code)|^2` (the codes
        follow the encoder by EMA, so there is no codebook loss); in training mode the codebook is updated. KL: a
        posterior sample (torch's RNG) and the KL divergence to N(0, I), summed over latent elements.
        """
        if not self.is_vq:
            posterior = self.posterior(x)
            return self.decode(posterior.sample()), kl_divergence(posterior)
        z = self.encode(x)
        codes, _ = self.codebook(z)
        commitment = (z - codes.detach()).float().square().flatten(1).mean(dim=1)
        return self.decode(z + (codes - z).detach(), quantize=False), self.config.commitment_beta * commitment

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output convolution (for the adaptive GAN weight)."""
        return self.decoder.final_block[2].weight


# ----------------------------------------------------------------------------------------------------------
# Loading the public Lightning checkpoints.

KEPT_PREFIXES = ("encoder.", "decoder.", "pre_vq_conv.", "post_vq_conv.", "codebook.")
# hyper_parameters key (in the pickled omegaconf config, under cfg.model / cfg.dataset) -> PatchVolume argument.
HYPER_PARAMETERS = {"n_hiddens": "n_hiddens", "downsample": "downsample", "embedding_dim": "embedding_dim",
                    "n_codes": "n_codes", "image_channels": "image_channels", "num_groups": "norm_groups"}
# Globals that a pickled omegaconf DictConfig names, besides torch's own allow-list (tensors, plain containers).
CONFIG_GLOBALS = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode", "collections.defaultdict", "typing.Any", "builtins.dict", "builtins.list",
    "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.bytes", "builtins.object",
)


class PickledStandIn:
    """Inert stand-in for an allow-listed config class or type named in a checkpoint: it only records what
    the pickle hands it (arguments, state), so no omegaconf (or other) code runs while loading."""

    global_name = ""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# One subclass per name: torch's weights-only unpickler may create and fill instances of these, nothing else.
STAND_INS = [(type(name.rsplit(".", 1)[1], (PickledStandIn,), {"global_name": name}), name)
             for name in CONFIG_GLOBALS]


def _first_line(error: BaseException) -> str:
    """The line of a (torch.load) error that says what was refused, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "GLOBAL" in line or "WeightsUnpickler error" in line), lines[0])


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's top-level dict, read with torch's weights-only unpickler: tensors, plain containers
    and the inert config stand-ins; any other global is refused (ConfigError naming it) before unpickling."""
    if not path.is_file():
        raise ConfigError(f"PatchVolume checkpoint {path} does not exist")
    with torch.serialization.safe_globals(STAND_INS):
        try:  # a static scan of the pickle first, so the error can name every offending global
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as error:
            raise ConfigError(f"{path} is not a torch.save checkpoint: {_first_line(error)}") from None
        if unsafe:
            raise ConfigError(f"refusing to load {path}: it pickles {', '.join(unsafe)}, outside the allow-list "
                              "(tensors, plain containers, omegaconf configs); unpickling it could run code")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise ConfigError(f"refusing to load {path}: {_first_line(error)}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path} holds no state_dict: not a Lightning checkpoint")
    return checkpoint


def _plain(config: Any, path: Path) -> Any:
    """A config as unpickled (stand-ins for DictConfig, ListConfig and their nodes) as plain dicts and lists."""
    remaining = [MAX_CONFIG_VALUES]

    def convert(value: Any, depth: int) -> Any:
        remaining[0] -= 1
        if remaining[0] < 0:  # a pickle can share one container many times over: exponential when expanded
            raise ConfigError(f"{path}: hyper_parameters hold over {MAX_CONFIG_VALUES} values; not a training config")
        if depth > 64:  # a pickle can also build cycles; real configs are a few levels deep
            return None
        if isinstance(value, PickledStandIn):
            state = getattr(value, "state", None)
            if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig
                return convert(state["_content"], depth + 1)
            if isinstance(state, dict) and "_val" in state:  # a value node
                return convert(state["_val"], depth + 1)
            return None
        if isinstance(value, dict):
            return {k: convert(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, depth + 1) for v in value]
        return value

    return convert(config, 0)


def _find(tree: Any, key: str) -> Any:
    """The value of the first `key` met depth-first in nested dicts and lists (None when absent)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    return next((found for child in children if (found := _find(child, key)) is not None), None)


def _config_from_state(state: dict[str, Tensor], path: Path) -> dict[str, int]:
    """The PatchVolume arguments that the state-dict shapes determine (all but norm_groups)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ConfigError(f"{path}: state_dict lacks {key}, which every PatchVolume checkpoint has")
        return tuple(state[key].shape)

    stride_stages = sum(1 for key in state if re.fullmatch(r"encoder\.conv_blocks\.\d+\.down\.weight", key))
    return dict(n_hiddens=shape("encoder.conv_first.weight")[0], image_channels=shape("encoder.conv_first.weight")[1],
                embedding_dim=shape("pre_vq_conv.weight")[0], n_codes=shape("codebook.embeddings")[0],
                downsample=2 ** stride_stages)


def _cross_check(config: dict[str, int], hyper_parameters: Any, path: Path) -> dict[str, int]:
    """`config` plus norm_groups from the hyper-parameters; ConfigError where they contradict the shapes."""
    hparams = _plain(hyper_parameters, path)
    norm_type = _find(hparams, "norm_type")
    if norm_type not in (None, "group"):
        raise ConfigError(f"{path}: hyper_parameters give norm_type={norm_type!r}; PatchVolume supports 'group'")
    for name, argument in HYPER_PARAMETERS.items():
        value = _find(hparams, name)
        if value is None:
            continue
        if name == "downsample" and isinstance(value, list):  # [8, 8, 8]: per axis
            if len(set(value)) != 1:
                raise ConfigError(f"{path}: hyper_parameters give downsample={value}; PatchVolume supports the "
                                  "same downsampling on every axis")
            value = value[0]
        if argument not in config:
            config[argument] = value
        elif value != config[argument]:
            raise ConfigError(f"{path}: hyper_parameters give {name}={value} but the state_dict shapes give "
                              f"{config[argument]}")
    return config


def load_patchvolume(path: Union[str, Path], norm_groups: Optional[int] = None) -> PatchVolume:
    """A PatchVolume (eval mode) from a public 3D-MedDiffusion Lightning checkpoint, e.g. PatchVolume_8x_s2.ckpt.

    Only encoder., decoder., pre_vq_conv., post_vq_conv. and codebook. weights are kept (discriminators and
    the perceptual loss are dropped); the architecture comes from their shapes, cross-checked against the
    pickled hyper-parameters.

    Args:
        norm_groups: GroupNorm groups when the checkpoint's hyper-parameters lack `num_groups` (default 24).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state = {k: v for k, v in checkpoint["state_dict"].items() if isinstance(k, str) and k.startswith(KEPT_PREFIXES)}
    bad = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise ConfigError(f"{path}: state_dict entry {bad} is a {type(state[bad]).__name__}, not a tensor")
    config = _cross_check(_config_from_state(state, path), checkpoint.get("hyper_parameters"), path)
    if norm_groups is not None:
        config["norm_groups"] = norm_groups
    try:
        model = PatchVolume(**config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ConfigError(f"{path}: state_dict lacks {key}, which PatchVolume({config}) has")
        if state[key].shape != tensor.shape:
            raise ConfigError(f"{path}: {key} has shape {tuple(state[key].shape)}, PatchVolume({config}) "
                              f"expects {tuple(tensor.shape)}")
    extra = next((key for key in state if key not in expected), None)
    if extra is not None:
        raise ConfigError(f"{path}: unexpected state_dict key {extra} for PatchVolume({config})")
    model.load_state_dict(state)
    return model.eval()
