"""Autoencoders for latent diffusion: the builder (diffusers AutoencoderKL / VQModel in 2D, PatchVolume in 3D), the
training wrapper, and the frozen encode/decode interface that the latent cache and evaluation use.

Latents here are always raw: the KL posterior mean, or the VQ pre-quantisation latent. The scale and shift that
bring them to unit variance for diffusion are computed over a dataset and stored in the latent cache manifest
(`normalise` / `denormalise` below apply them), never inside the autoencoder.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import yaml
from diffusers import AutoencoderKL, VQModel
from torch import Tensor, nn

from models.losses import kl_divergence, vq_loss
from models.patchvolume import PatchVolume, load_patchvolume
from utils.config import ConfigError, VAEConfig
from utils.distributed import gather_objects
from utils.evaluation import image_scores, sharded_batches
from utils.export import gather_full_state, save_diffusers_model, write_on_rank0

AUTOENCODER_CLASSES = {"kl": AutoencoderKL, "vq": VQModel}
METADATA_FILE = "autoencoder.yaml"  # written beside vae/ in an exported final/ folder


def check_autoencoder_config(cfg: VAEConfig, sample_shape: Sequence[int] = (), key: str = "data.image_size"
                             ) -> None:
    """ConfigError naming the key for a `vae` section no autoencoder can be built from.

    Args:
        sample_shape: spatial sizes the autoencoder will see (image, 3D patch or volume); () when not known yet.
        key: the setting that gave `sample_shape`, for the error message.
    """
    if cfg.kind not in AUTOENCODER_CLASSES:
        raise ConfigError(f"vae.kind='{cfg.kind}' is not one of {list(AUTOENCODER_CLASSES)}")
    levels = len(cfg.block_out_channels)
    if levels == 0:
        raise ConfigError("vae.block_out_channels is empty: give one width per resolution level")
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ConfigError(f"vae.block_out_channels {bad} are not multiples of "
                          f"vae.norm_num_groups={cfg.norm_num_groups}")
    if cfg.latent_channels < 1:
        raise ConfigError(f"vae.latent_channels must be at least 1, got {cfg.latent_channels}")
    if cfg.kind == "vq" and cfg.num_vq_embeddings < 2:
        raise ConfigError(f"vae.num_vq_embeddings must be at least 2, got {cfg.num_vq_embeddings}")
    factor = 2 ** (levels - 1)
    if any(side % factor for side in sample_shape):
        value = sample_shape[0] if key.endswith("image_size") else list(sample_shape)
        raise ConfigError(f"{key}={value} must be divisible by {factor}, the downsampling of {levels} "
                          "vae.block_out_channels levels")


def build_autoencoder(cfg: VAEConfig, in_channels: int, sample_shape: Sequence[int] = ()
                      ) -> Union[AutoencoderKL, VQModel, PatchVolume]:
    """The autoencoder for `len(sample_shape)`-D images, one resolution level per `vae.block_out_channels` width.

    2D: an AutoencoderKL (vae.kind=kl) or VQModel (vq) with one DownEncoderBlock2D / UpDecoderBlock2D per width.
    3D: a PatchVolume (the architecture of 3D-MedDiffusion's autoencoder) with a Gaussian posterior (kl) or an EMA
    codebook with dead-code restarts (vq); `vae.block_out_channels: [48, 96, 192, 192]`, `latent_channels: 8`,
    `layers_per_block: 2`, `norm_num_groups: 24` and `num_vq_embeddings: 8192` build the public 8x model.

    Args:
        in_channels: channels of the concatenated `vae.inputs`; the decoder outputs as many.
        sample_shape: the training image's (patch's) spatial sizes: two or three of them.
    """
    vae = _build(cfg, in_channels, sample_shape)
    if cfg.gradient_checkpointing:
        if not vae._supports_gradient_checkpointing:
            raise ConfigError(f"vae.gradient_checkpointing: diffusers' {type(vae).__name__} does not support it "
                              "(2D vae.kind=vq); use vae.kind=kl or turn it off")
        vae.enable_gradient_checkpointing()
    return vae


def _build(cfg: VAEConfig, in_channels: int, sample_shape: Sequence[int]) -> Union[AutoencoderKL, VQModel, PatchVolume]:
    check_autoencoder_config(cfg, sample_shape)
    levels = len(cfg.block_out_channels)
    if len(sample_shape) == 3:
        return PatchVolume(n_hiddens=cfg.block_out_channels[0], downsample=2 ** (levels - 1),
                           embedding_dim=cfg.latent_channels, n_codes=cfg.num_vq_embeddings, image_channels=in_channels,
                           norm_groups=cfg.norm_num_groups, kind=cfg.kind,
                           block_out_channels=list(cfg.block_out_channels),
                           layers_per_block=cfg.layers_per_block, codebook_decay=cfg.codebook_decay,
                           restart_threshold=cfg.restart_threshold)
    common = dict(in_channels=in_channels, out_channels=in_channels,
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                  latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                  sample_size=sample_shape[0] if sample_shape else 32,
                  # 1.0: the latent scale lives in the latent cache manifest, not in the model.
                  scaling_factor=1.0)
    if cfg.kind == "vq":
        return VQModel(num_vq_embeddings=cfg.num_vq_embeddings, **common)
    return AutoencoderKL(**common)


def downsample_factor_of(vae: Union[AutoencoderKL, VQModel, PatchVolume]) -> int:
    if isinstance(vae, PatchVolume):
        return vae.config.downsample
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels_of(vae: Union[AutoencoderKL, VQModel, PatchVolume]) -> int:
    return vae.config.embedding_dim if isinstance(vae, PatchVolume) else vae.config.latent_channels


class TrainableAutoencoder(nn.Module):
    """model(x) -> (reconstruction, regulariser (B,)): the KL divergence (kl) or codebook + commitment loss (vq;
    commitment only for the 3D EMA codebook).

    One forward for the whole autoencoder, so DDP sees every parameter used in one call; holds no weights of its
    own, so `wrapper.vae` is exactly what `final/vae` exports.
    """

    def __init__(self, vae: Union[AutoencoderKL, VQModel, PatchVolume]):
        super().__init__()
        self.vae = vae
        self.is_vq = isinstance(vae, VQModel)
        self.is_3d = isinstance(vae, PatchVolume)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output convolution, where the adaptive GAN weight is measured."""
        return self.vae.last_layer if self.is_3d else self.vae.decoder.conv_out.weight

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_3d:
            return self.vae.autoencode(x)
        if self.is_vq:
            latents = self.vae.encode(x).latents  # (B, C, h, w) before quantisation
            quantised, _, (_, _, indices) = self.vae.quantize(latents)  # straight-through estimator
            b, c, h, w = latents.shape
            codes = self.vae.quantize.embedding(indices.view(-1)).view(b, h, w, c).permute(0, 3, 1, 2)
            reconstruction = self.vae.decode(quantised, force_not_quantize=True).sample
            return reconstruction, vq_loss(latents, codes, self.vae.quantize.beta, self.vae.quantize.legacy)
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample  # torch's RNG, reseeded every step
        return reconstruction, kl_divergence(posterior)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction (posterior mean, or quantised latent), for validation."""
        if self.is_3d:
            return self.vae(x)
        if self.is_vq:
            return self.vae.decode(self.vae.encode(x).latents).sample
        return self.vae.decode(self.vae.encode(x).latent_dist.mean).sample


def export_autoencoder(folder: Path, vae: Union[AutoencoderKL, VQModel], description: dict,
                       metric: Optional[dict] = None, card: str = "") -> Path:
    """Write vae/ (diffusers format), autoencoder.yaml (and metric.json for a best-<metric> folder, the model card
    README.md for final/),
    atomically: `AutoencoderKL.from_pretrained(folder, subfolder="vae")` (or VQModel) loads it. Every rank calls
    it: the weights are gathered from all of them and rank 0 writes.

    Args:
        vae: the bare diffusers model (unwrapped, possibly sharded, EMA weights already swapped in).
        description: inputs, normalisation, downsampling: what a user needs to feed the model.
    """
    state = gather_full_state(vae)

    def write(tmp: Path) -> None:
        save_diffusers_model(vae, state, tmp / "vae")
        (tmp / METADATA_FILE).write_text(yaml.safe_dump(description, sort_keys=False))
        if metric is not None:
            (tmp / "metric.json").write_text(json.dumps(metric, indent=2))
        if card:
            (tmp / "README.md").write_text(card)

    return write_on_rank0(folder, write)


def describe_autoencoder(vae: Union[AutoencoderKL, VQModel, PatchVolume], inputs: dict[str, int], dataset,
                         sample_shape: Sequence[int]) -> dict:
    """autoencoder.yaml: what a user (and encode_latents.py) needs to feed the model, and the items it was
    trained on (encode_latents.py refuses a cache that holds any of them out).

    Args:
        inputs: input name -> channels, in the order they are concatenated.
        dataset: the training dataset (its `normalization` record, `data_range` and `item_ids`).
        sample_shape: the spatial sizes it was trained at (image, or 3D patch).
    """
    factor, channels = downsample_factor_of(vae), latent_channels_of(vae)
    kind = ("vq" if vae.is_vq else "kl") if isinstance(vae, PatchVolume) else (
        "vq" if isinstance(vae, VQModel) else "kl")
    return {"kind": kind, "class": type(vae).__name__,
            "inputs": [{"name": n, "kind": "image", "channels": c} for n, c in inputs.items()],
            "input_layout": "the inputs' channels concatenated on dim 1, in this order",
            "normalization": dataset.normalization, "data_range": dataset.data_range,
            "sample_shape": list(sample_shape), "downsample_factor": factor, "latent_channels": channels,
            "latent_shape": [channels, *(side // factor for side in sample_shape)],
            "latents": "raw (KL posterior mean / VQ pre-quantisation latent); the scale and shift for diffusion "
                       "live in the latent cache manifest",
            "train_items": list(dataset.item_ids)}


@torch.no_grad()
def score_reconstructions(net: TrainableAutoencoder, dataset, indices: list[int], inputs: list[str], batch_size: int,
                          accelerator, rec_loss: Callable[[Tensor, Tensor], Tensor], keep=frozenset()) -> list[dict]:
    """Deterministic reconstructions of the items in `indices`, split across processes and gathered.

    Returns, on every process and in index order, one dict per item: index, item_id, the `image_scores` of the
    reconstruction against its input (volumes slice-wise, plus ssim_3d and psnr_3d), rec_loss and, for indices in
    `keep`, the input and its reconstruction as arrays (C, *spatial) for figures.
    """
    rows = []
    for idx, real, batch in sharded_batches(dataset, indices, batch_size, accelerator.process_index,
                                            accelerator.num_processes, accelerator.device):
        x = torch.cat([batch[n].float() for n in inputs], dim=1)  # (B, C, *spatial)
        with accelerator.autocast():
            reconstruction = net.reconstruct(x).float()
        losses = rec_loss(x, reconstruction).tolist()
        for j in range(real):
            scores = image_scores(reconstruction[j:j + 1], x[j:j + 1], dataset.data_range)
            rows.append({"index": idx[j], "item_id": batch["item_id"][j], **scores, "rec_loss": losses[j]})
            if idx[j] in keep:
                rows[-1].update(input=x[j].cpu().numpy(), reconstruction=reconstruction[j].cpu().numpy())
    return sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r["index"])


# ----------------------------------------------------------------------------------------------------------
# Latent normalisation (the parameters come from the latent cache manifest).

def latent_scaling(how: str, train_latents: Tensor, model: nn.Module) -> tuple[float, float]:
    """(scale, shift) of the latent normalisation `latent.scaling`.

    std: unit variance and zero mean over the training latents (one scalar pair for every channel).
    codebook_minmax: 3D-MedDiffusion's mapping of a VQ codebook's global range [min E, max E] onto [-1, 1], so that
    latents of a PatchVolume checkpoint are scaled as its authors' diffusion models expect.
    """
    if how == "codebook_minmax":
        check_codebook_scaling(model)
        low, high = float(model.codebook.embeddings.min()), float(model.codebook.embeddings.max())
        return 2.0 / (high - low), (high + low) / 2
    return float(1.0 / train_latents.std()), float(train_latents.mean())


def check_codebook_scaling(model: nn.Module) -> None:
    if not (isinstance(model, PatchVolume) and model.is_vq):
        raise ConfigError(f"latent.scaling=codebook_minmax needs a 3D VQ autoencoder (PatchVolume with a codebook), "
                          f"not a {type(model).__name__}{'' if not isinstance(model, PatchVolume) else ' (kl)'}; "
                          "use latent.scaling=std")


def normalise(z: Tensor, scale: float, shift: float) -> Tensor:
    """Raw latent -> diffusion space: (z - shift) * scale."""
    return (z - shift) * scale


def denormalise(z: Tensor, scale: float, shift: float) -> Tensor:
    """Diffusion space -> raw latent: z / scale + shift."""
    return z / scale + shift


# ----------------------------------------------------------------------------------------------------------
# Tiling.

def _ramp(length: int, overlap: int, device) -> Tensor:
    """Blending weights along one tile axis: linear over `overlap` at each end, 1 inside, never 0."""
    position = torch.arange(length, device=device, dtype=torch.float32)
    edge = torch.minimum(position + 1, length - position)
    return (edge / (overlap + 1)).clamp(max=1.0)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends at the border


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile_size: int, overlap: int, up: int = 1,
                down: int = 1) -> Tensor:
    """fn applied to overlapping tiles of x (B, C, H, W) or (B, C, D, H, W), blended linearly where they overlap.

    fn maps a (B, C, *tile) tile to (B, C', *tile * up / down); tile positions and sizes must be multiples of
    `down` (the caller checks). Each output voxel is the weighted mean of the tiles covering it, weights ramping
    linearly across the overlap, so there are no seams.

    Args:
        tile_size, overlap: in pixels (voxels) of x, the same along every spatial axis.
    """
    sizes = x.shape[2:]
    stride = tile_size - overlap
    blend = overlap * up // down
    out, weight = None, None
    for corner in itertools.product(*(_starts(size, tile_size, stride) for size in sizes)):
        window = tuple(slice(start, start + min(tile_size, size)) for start, size in zip(corner, sizes))
        result = fn(x[(slice(None), slice(None), *window)]).float()
        if out is None:
            out = x.new_zeros((x.shape[0], result.shape[1], *(size * up // down for size in sizes)),
                              dtype=torch.float32)
            weight = torch.zeros(out.shape[2:], device=out.device)
        mask = torch.ones((), device=out.device)
        for axis, length in enumerate(result.shape[2:]):  # the outer product of one ramp per axis
            mask = mask[..., None] * _ramp(length, blend, out.device).view(*[1] * axis, length)
        placed = tuple(slice(start * up // down, start * up // down + length)
                       for start, length in zip(corner, result.shape[2:]))
        out[(slice(None), slice(None), *placed)] += result * mask
        weight[placed] += mask
    return out / weight


# ----------------------------------------------------------------------------------------------------------
# Frozen autoencoder.

def _find_model_folder(folder: Path) -> Path:
    """The folder holding config.json: `folder` itself, or its vae/ (our final/ export, a diffusers pipeline)."""
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"autoencoder folder {folder} holds neither config.json nor vae/config.json "
                      "(expected an exported final/, a diffusers AutoencoderKL/VQModel folder or a pipeline)")


def model_identity(vae: nn.Module) -> str:
    """sha256 over the class, the config (without bookkeeping keys such as the path) and the weights in
    state-dict order: equal for the same model loaded twice, from any copy of its folder."""
    digest = hashlib.sha256(type(vae).__name__.encode())
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenAutoencoder:
    """A trained autoencoder in eval mode: encode images to raw latents and decode them back, without gradients.

    Attributes:
        model: the diffusers AutoencoderKL or VQModel.
        kind: "kl" or "vq".
        in_channels, latent_channels, downsample_factor: shapes: (B, in, H, W) <-> (B, latent, H/f, W/f).
        identity: sha256 of the class, config and weights (see `model_identity`); the latent cache records it.
        metadata: the export's autoencoder.yaml (inputs, normalisation), or {} for a plain diffusers folder.
    """

    def __init__(self, model: Union[AutoencoderKL, VQModel, PatchVolume], device: Union[str, torch.device] = "cpu",
                 tile_size: int = 0, tile_overlap: int = 16, metadata: Optional[dict] = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        if isinstance(model, PatchVolume):  # 3D: (B, C, D, H, W) <-> (B, latent, D/f, H/f, W/f)
            self.kind, self.spatial_dims, self.in_channels = "patchvolume", 3, model.config.image_channels
        else:
            self.kind, self.spatial_dims = ("vq" if isinstance(model, VQModel) else "kl"), 2
            self.in_channels = model.config.in_channels
        self.latent_channels, self.downsample_factor = latent_channels_of(model), downsample_factor_of(model)
        self.metadata = metadata or {}
        f = self.downsample_factor
        if tile_size and (tile_size % f or tile_overlap % f or not 0 <= tile_overlap < tile_size):
            raise ConfigError(f"latent.tile_size={tile_size} and latent.tile_overlap={tile_overlap} must be "
                              f"multiples of the downsampling factor {f}, with 0 <= overlap < tile_size")
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.identity = model_identity(self.model)

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu", tile_size: int = 0,
             tile_overlap: int = 16) -> "FrozenAutoencoder":
        """Load an exported final/ (vae/ + autoencoder.yaml), a bare AutoencoderKL/VQModel/PatchVolume folder, a
        diffusers pipeline folder with vae/, or a 3D-MedDiffusion PatchVolume Lightning checkpoint (.ckpt, read
        without unpickling arbitrary objects), from the local disk only."""
        folder = Path(folder)
        if folder.suffix == ".ckpt":
            if not folder.is_file():
                raise ConfigError(f"PatchVolume checkpoint not found: {folder}")
            return cls(load_patchvolume(folder), device, tile_size, tile_overlap)
        model_folder = _find_model_folder(folder)
        try:
            class_name = json.loads((model_folder / "config.json").read_text()).get("_class_name")
            model_class = {c.__name__: c for c in (*AUTOENCODER_CLASSES.values(), PatchVolume)}.get(class_name)
            if model_class is None:
                raise ConfigError(f"{model_folder / 'config.json'} describes a {class_name}, not an AutoencoderKL, "
                                  "VQModel or PatchVolume")
            model = model_class.from_pretrained(model_folder, local_files_only=True)
        except ConfigError:
            raise
        except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError...
            raise ConfigError(f"cannot load the autoencoder in {folder}: {str(error).splitlines()[0]}") from None
        # autoencoder.yaml sits beside vae/ in an export, also when the vae/ folder itself is named.
        beside = [model_folder.parent / METADATA_FILE] if model_folder.name == "vae" else []
        found = [f for f in [model_folder / METADATA_FILE, *beside] if f.is_file()]
        metadata = yaml.safe_load(found[0].read_text()) if found else {}
        return cls(model, device, tile_size, tile_overlap, metadata)

    def _check(self, x: Tensor, what: str, channels: int) -> Tensor:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != channels:
            layout = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(f"{what} expects (B, {channels}, {layout}), got shape {tuple(x.shape)}")
        return x.to(self.device, self.model.dtype)

    def _encode(self, x: Tensor) -> Tensor:
        if self.kind == "patchvolume":  # the continuous latent, as PatchVolume's own caches hold
            return self.model.encode(x)
        if self.kind == "vq":
            return self.model.encode(x).latents
        return self.model.encode(x).latent_dist.mean

    def _decode(self, z: Tensor) -> Tensor:
        if self.kind == "patchvolume":  # snaps each voxel to its nearest code: the same per tile as whole
            return self.model.decode(z)
        if self.kind == "vq":  # latents arrive quantised (see decode), so tiles are not quantised again
            return self.model.decode(z, force_not_quantize=True).sample
        return self.model.decode(z).sample

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, in_channels, *spatial), sides multiples of downsample_factor -> raw latents (B, C, *spatial/f)."""
        x = self._check(x, "encode", self.in_channels)
        f = self.downsample_factor
        if any(side % f for side in x.shape[2:]):
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the downsampling factor {f}")
        if self.tile_size and max(x.shape[2:]) > self.tile_size:
            return tiled_apply(self._encode, x, self.tile_size, self.tile_overlap, up=1, down=f)
        return self._encode(x).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Raw latents (B, latent_channels, *spatial) -> images (B, in_channels, *spatial*f); VQ latents are
        quantised."""
        z = self._check(z, "decode", self.latent_channels)
        if self.kind == "vq":
            z, _, _ = self.model.quantize(z)
        f = self.downsample_factor
        if self.tile_size and max(z.shape[2:]) * f > self.tile_size:
            return tiled_apply(self._decode, z, self.tile_size // f, self.tile_overlap // f, up=f, down=1)
        return self._decode(z).float()
