"""Image metrics (SSIM, MS-SSIM, PSNR, MAE, MSE, Dice) and distribution metrics (FID, KID).

Image metrics take batched float tensors (B, C, H, W) or (B, C, D, H, W) in the normalised space, run on
whatever device the tensors are on and return one value per sample, shape (B,): the caller gathers those across
processes and averages, so a metric never depends on the batch size or the number of processes.

SSIM follows Wang et al. (2004) and agrees with `skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=...)`: the SSIM map is averaged over the valid region only,
i.e. (win - 1) // 2 voxels are left out on every side (torchmetrics pads instead, which differs by ~2e-3).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.config import ConfigError
from utils.distributed import gather_objects, shard

# Images are normalised to [-1, 1] (MRI percentile clip, CT HU window), so the width of the intensity range,
# which PSNR and SSIM need as `data_range`, is 2.
DATA_RANGE_NORMALISED = 2.0

# Wang, Simoncelli & Bovik (2003), "Multiscale structural similarity for image quality assessment", Table 1.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# check_data_range: a configured data_range more than this many times wider than the data's extent, or an
# extent more than this many times wider than data_range, is a configuration mistake, not sample noise.
_RANGE_TOO_WIDE = 10.0
_RANGE_TOO_NARROW = 1.5

ArrayLike = Union[Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# Input checks and helpers.

def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W) tensors, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"expected float tensors, got {x.dtype} and {y.dtype}")


def _check_mask(mask: Tensor, x: Tensor) -> Tensor:
    """Returns the mask as a bool tensor (B, 1, *spatial) after checking it fits `x`."""
    if mask.ndim == x.ndim - 1:
        mask = mask.unsqueeze(1)  # (B, *spatial) -> (B, 1, *spatial)
    if mask.ndim != x.ndim or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] or mask.shape[1] != 1:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit images {tuple(x.shape)}; "
                         f"expected (B, 1, *spatial) = {(x.shape[0], 1, *x.shape[2:])}")
    return mask.to(device=x.device, dtype=torch.bool)


def _reduce_dtype(x: Tensor) -> torch.dtype:
    # float64 sums make PSNR agree with scikit-image to ~1e-6 dB; MPS has no float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


def _masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Per-sample mean of `values` (B, C, *spatial) over all voxels, or over the voxels where mask (B, 1, ...) is true.

    A sample whose mask is empty gets NaN: there is nothing to measure, and a zero would bias the average.
    """
    flat = values.flatten(1)
    if mask is None:
        return flat.mean(dim=1)
    weights = mask.expand_as(values).flatten(1).to(values.dtype)
    return (flat * weights).sum(dim=1) / weights.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Pixel-wise metrics.

def mse(x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error per sample (B,); with `mask`, over the mask's voxels (all channels)."""
    _check_pair(x, y)
    mask = _check_mask(mask, x) if mask is not None else None
    dtype = _reduce_dtype(x)
    return _masked_mean((x.to(dtype) - y.to(dtype)) ** 2, mask)


def mae(x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean absolute error per sample (B,); with `mask`, over the mask's voxels (all channels)."""
    _check_pair(x, y)
    mask = _check_mask(mask, x) if mask is not None else None
    dtype = _reduce_dtype(x)
    return _masked_mean((x.to(dtype) - y.to(dtype)).abs(), mask)


def psnr(x: Tensor, y: Tensor, data_range: float, mask: Optional[Tensor] = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample (B,), as `skimage.metrics.peak_signal_noise_ratio`.

    Identical samples give +inf, as in scikit-image; an empty mask gives NaN.

    Args:
        data_range: width of the intensity range (DATA_RANGE_NORMALISED for data in [-1, 1]), not the
            maximum value: PSNR = 10 log10(data_range^2 / MSE).
    """
    err = mse(x, y, mask)
    return 10.0 * torch.log10(data_range**2 / err)


# ----------------------------------------------------------------------------------------------------------
# SSIM.

def ssim_window(sigma: float = 1.5, truncate: float = 3.5) -> int:
    """Side of the Gaussian SSIM window in voxels: images must be at least this large along every axis."""
    return 2 * int(truncate * sigma + 0.5) + 1


def _gaussian_kernel1d(sigma: float, truncate: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The normalised 1D Gaussian of scipy.ndimage.gaussian_filter: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    return kernel / kernel.sum()


def _filter_valid(t: Tensor, kernel: Tensor) -> Tensor:
    """Separable Gaussian filter of every channel of (N, C, *spatial), keeping only the valid region.

    Without padding, each output voxel sees only real input voxels; this equals scikit-image's filtered map
    cropped by the kernel radius, so its padding mode never matters.
    """
    spatial_dims = t.ndim - 2
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    channels = t.shape[1]
    for axis in range(spatial_dims):
        shape = [1] * spatial_dims
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        t = conv(t, weight, groups=channels)
    return t


def _ssim_cs_maps(x: Tensor, y: Tensor, data_range: float, sigma: float, truncate: float, k1: float,
                  k2: float) -> tuple[Tensor, Tensor]:
    """SSIM map and contrast-structure map over the valid region, each (B, C, *valid_spatial)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # half precision loses the variances
    x, y = x.to(dtype), y.to(dtype)
    kernel = _gaussian_kernel1d(sigma, truncate, x.device, dtype)
    win = kernel.numel()
    if min(x.shape[2:]) < win:
        raise ValueError(f"images of spatial shape {tuple(x.shape[2:])} are smaller than the {win}-voxel "
                         f"Gaussian window (sigma={sigma}, truncate={truncate}); use a smaller sigma, or "
                         f"score volumes with few slices slice by slice (utils.evaluation.image_scores)")
    channels = x.shape[1]
    # One grouped convolution for the five filtered quantities.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mu_x, mu_y, xx, yy, xy = _filter_valid(stacked, kernel).split(channels, dim=1)
    # Population (co)variances, as Wang et al. (use_sample_covariance=False in scikit-image).
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov_xy = xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return luminance * cs, cs


def _crop_mask(mask: Tensor, valid_shape: torch.Size) -> Tensor:
    """The part of mask (B, 1, *spatial) that lies over the valid region of the SSIM map."""
    slices = [slice(None), slice(None)]
    for full, valid in zip(mask.shape[2:], valid_shape):
        pad = (full - valid) // 2
        slices.append(slice(pad, pad + valid))
    return mask[tuple(slices)]


def ssim(x: Tensor, y: Tensor, data_range: float, *, sigma: float = 1.5, truncate: float = 3.5,
         k1: float = 0.01, k2: float = 0.03, mask: Optional[Tensor] = None) -> Tensor:
    """Gaussian SSIM per sample (B,), averaged over channels and the valid region (2D) or volume (3D).

    Matches `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=..., channel_axis=...)`. 3D inputs use a 3D Gaussian window.

    Args:
        data_range: width of the intensity range (DATA_RANGE_NORMALISED for data in [-1, 1]).
        mask: optional bool (B, 1, *spatial); the SSIM map is averaged over the mask's voxels that lie in the
            valid region (NaN for a sample with none there). Pass ~mask for the background.
    """
    _check_pair(x, y)
    mask = _check_mask(mask, x) if mask is not None else None
    ssim_map, _ = _ssim_cs_maps(x, y, data_range, sigma, truncate, k1, k2)
    if mask is not None:
        mask = _crop_mask(mask, ssim_map.shape[2:])
    return _masked_mean(ssim_map.to(_reduce_dtype(ssim_map)), mask)


def ms_ssim(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Multi-scale SSIM per sample (B,) (Wang et al. 2003): prod_j cs_j^w_j * ssim_M^w_M, standard 5 weights.

    Each scale halves the image with 2x2 (2x2x2) average pooling. When the smallest spatial side is too short
    for five scales (the 11-voxel window must fit at the coarsest one: 176 voxels), only the scales that fit
    are used and their weights are renormalised to sum to 1, so an identical pair still scores exactly 1.
    Negative cs/SSIM values are clamped to 0 before the fractional powers (they would give NaN).
    """
    _check_pair(x, y)
    win = _gaussian_kernel1d(1.5, 3.5, x.device, torch.float32).numel()
    shortest = min(x.shape[2:])
    num_scales = 0
    while num_scales < len(MS_SSIM_WEIGHTS) and shortest // 2**num_scales >= win:
        num_scales += 1
    if num_scales == 0:
        raise ValueError(f"images of spatial shape {tuple(x.shape[2:])} are smaller than the {win}-voxel "
                         f"SSIM window; MS-SSIM needs at least {win} voxels per side")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:num_scales], dtype=torch.float64, device=x.device)
    weights = weights / weights.sum()
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    log_terms = []
    for scale in range(num_scales):
        ssim_map, cs_map = _ssim_cs_maps(x, y, data_range, 1.5, 3.5, 0.01, 0.03)
        last = scale == num_scales - 1
        value = (ssim_map if last else cs_map).flatten(1).to(torch.float64).mean(dim=1)
        log_terms.append(weights[scale] * torch.log(value.clamp_min(0)))
        if not last:
            x, y = pool(x, 2), pool(y, 2)
    return torch.exp(torch.stack(log_terms).sum(dim=0))


def pairwise_ms_ssim(samples: Tensor, data_range: float = DATA_RANGE_NORMALISED,
                     max_pairs_per_batch: int = 64) -> Tensor:
    """Mean MS-SSIM over all pairs of samples generated for one condition (0-dim tensor).

    A diversity measure: close to 1 when the samples are nearly identical (mode collapse), lower when varied.

    Args:
        samples: (S, C, H, W) or (S, C, D, H, W) with S >= 2.
        max_pairs_per_batch: pairs scored at once, to bound memory when S is large.
    """
    if samples.shape[0] < 2:
        raise ValueError(f"pairwise_ms_ssim needs at least 2 samples, got {samples.shape[0]}")
    first, second = torch.triu_indices(samples.shape[0], samples.shape[0], offset=1, device=samples.device)
    scores = [ms_ssim(samples[first[i:i + max_pairs_per_batch]], samples[second[i:i + max_pairs_per_batch]],
                      data_range)
              for i in range(0, first.numel(), max_pairs_per_batch)]
    return torch.cat(scores).mean()


# ----------------------------------------------------------------------------------------------------------
# Segmentation.

def dice_per_label(pred_labels: Tensor, ref_labels: Tensor, num_labels: int) -> Tensor:
    """Dice coefficient of labels 1..num_labels-1 per sample, (B, num_labels - 1); NaN where both are empty.

    Args:
        pred_labels, ref_labels: integer label maps of the same shape, (B, ...) or (B, 1, ...).
        num_labels: number of labels including background 0.
    """
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"label maps differ in shape: {tuple(pred_labels.shape)} vs {tuple(ref_labels.shape)}")
    for labels in (pred_labels, ref_labels):
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"dice_per_label expects integer label maps, got {labels.dtype}; convert generated "
                            f"masks to labels first")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(f"labels span [{int(labels.min())}, {int(labels.max())}] but num_labels={num_labels}")
    pred = pred_labels.flatten(1)
    ref = ref_labels.flatten(1)
    scores = []
    for label in range(1, num_labels):
        p, r = pred == label, ref == label
        overlap = (p & r).sum(dim=1).to(torch.float64)
        total = (p.sum(dim=1) + r.sum(dim=1)).to(torch.float64)
        scores.append(2 * overlap / total)  # 0/0 = NaN where the label is absent from both
    return torch.stack(scores, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Configuration check.

def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Where a label map changes: bool of the map's shape, true on both sides of every change between neighbours
    along any axis (background to tissue and between tissues alike)."""
    edges = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        change = np.diff(labels, axis=axis) != 0
        before = [slice(None)] * labels.ndim
        after = [slice(None)] * labels.ndim
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        edges[tuple(before)] |= change
        edges[tuple(after)] |= change
    return edges


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """|grad| of a (C, *spatial) image by central differences, the channels' squares summed: (*spatial)."""
    image = np.asarray(image, dtype=np.float64)
    squares = sum(np.square(g) for c in image for g in np.gradient(c))
    return np.sqrt(squares)


def boundary_sharpness(generated: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> float:
    """Mean gradient magnitude of `generated` on the boundaries of a label map, over the reference's there.

    1 means edges as sharp as the reference's, below 1 blurred, above 1 over-sharpened or noisy. Images are
    (C, *spatial), labels (*spatial) or (1, *spatial). NaN when the labels have no boundary or the reference is
    flat on it.
    """
    labels = np.asarray(labels).reshape(np.shape(generated)[1:])
    edges = label_boundaries(labels)
    reference_edge = gradient_magnitude(reference)[edges].mean() if edges.any() else 0.0
    if reference_edge == 0:
        return float("nan")
    return float(gradient_magnitude(generated)[edges].mean() / reference_edge)


def check_data_range(data_range: float, *tensors: Tensor, name: str = "data_range") -> None:
    """Raise ConfigError when `data_range` does not describe the intensities of `tensors`.

    The data's extent is max(max - min, max |value|) over the finite values of all tensors; the max |value|
    term keeps a nearly uniform image (all background) from looking like a tiny range. Generated samples that
    overshoot the range a little, or images that use only part of it, pass.

    Args:
        name: the config key that set `data_range`, for the message.
    """
    if not data_range > 0:
        raise ConfigError(f"{name}={data_range:g} must be positive (the width of the intensity range)")
    finite = [t.detach()[torch.isfinite(t.detach())] for t in tensors]
    finite = [t for t in finite if t.numel()]
    if not finite:
        return
    low = min(float(t.min()) for t in finite)
    high = max(float(t.max()) for t in finite)
    extent = max(high - low, abs(low), abs(high))
    if extent == 0:
        return  # all zeros: no scale to compare with
    if data_range > _RANGE_TOO_WIDE * extent or extent > _RANGE_TOO_NARROW * data_range:
        effect = "inflated" if data_range > extent else "deflated"
        shift_db = 20 * math.log10(data_range / extent)
        raise ConfigError(
            f"{name}={data_range:g} but the data span [{low:.4g}, {high:.4g}]: PSNR would be {effect} by "
            f"{abs(shift_db):.1f} dB and SSIM's constants C1, C2 would be mis-scaled; set {name} to the width "
            f"of the intensity range the data were normalised to ({DATA_RANGE_NORMALISED:g} for [-1, 1], "
            f"about {high - low:.4g} for these values)")


# ----------------------------------------------------------------------------------------------------------
# Distribution metrics.

def _to_float64(a: ArrayLike) -> Tensor:
    return torch.as_tensor(a).detach().to(device="cpu", dtype=torch.float64)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues set to 0)."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)); the trace of the matrix square root is taken
    from the eigenvalues of the symmetric sigma1^(1/2) sigma2 sigma1^(1/2), which has the same spectrum and,
    unlike scipy.linalg.sqrtm of the non-symmetric product, never turns complex.
    """
    mu1, mu2, sigma1, sigma2 = (_to_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"inconsistent shapes: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    sigma1 = (sigma1 + sigma1.T) / 2  # remove rounding asymmetry before eigh
    sigma2 = (sigma2 + sigma2.T) / 2
    root1 = _sqrtm_psd(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance)


def feature_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64 on the CPU."""
    feats = _to_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected features (N >= 2, F), got shape {tuple(feats.shape)}")
    return feats.mean(dim=0), torch.cov(feats.T)


def fid_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """Fréchet Inception Distance between two feature sets (N1, F) and (N2, F).

    FID is biased upward for small N; compare runs only at the same number of samples.
    """
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / F + 1)^3 of Bińkowski et al. (2018)."""
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    m = x.shape[0]
    # Unbiased: the diagonal k(a, a) terms are left out of the within-set sums.
    within = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return within / (m * (m - 1)) - 2 * k_xy.mean()


def kid(feats1: ArrayLike, feats2: ArrayLike, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    Unbiased, so it can be slightly negative for matching distributions.

    Args:
        subset_size: features per subset, capped at the smaller set's size (at least 2).
        seed: seed of the subset draws, so the value is reproducible.
    """
    x, y = _to_float64(feats1), _to_float64(feats2)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected features (N1, F) and (N2, F), got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {x.shape[0]} and {y.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack([
        _mmd2_unbiased(x[torch.randperm(x.shape[0], generator=generator)[:size]],
                       y[torch.randperm(y.shape[0], generator=generator)[:size]])
        for _ in range(subsets)])
    std = float(values.std()) if subsets > 1 else 0.0
    return float(values.mean()), std


def sharded_features(extractor: Callable[[Tensor], Tensor], image: Callable[[int], Tensor], count: int, rank: int,
                     world_size: int, batch_size: int = 64) -> Tensor:
    """Features (count, F) of images 0 .. count - 1, each extracted by one process only, gathered in order.

    Every process must call it (the features are gathered across processes).

    Args:
        image: index -> image (C, H, W) in [-1, 1]; called only for this process's share.
    """
    mine = shard(count, rank, world_size)
    parts = [extractor(torch.stack([image(i) for i in mine[b:b + batch_size]])).cpu()
             for b in range(0, len(mine), batch_size)]
    return torch.cat([f for part in gather_objects(parts) for f in part])


class FeatureExtractor:
    """A feature network for FID/KID, loaded from a local TorchScript file (never downloaded).

    Contract: the file holds a TorchScript module (`torch.jit.save`) whose forward maps float images
    (B, C, H, W) in [-1, 1] to features (B, F) (trailing singleton dims, as after global pooling, are
    flattened). Any resizing or renormalisation a pretrained network needs belongs inside that module, so one
    file fully defines the features. TorchScript because it loads without the defining code and without
    unpickling, and because it is the format the standard FID Inception network is published in.

    Args:
        path: the TorchScript file (named in the config).
        device: where the network runs.
        channels: repeat single-channel images to this many channels (e.g. 3 for an RGB network); None
            passes images through unchanged.
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 channels: Optional[int] = None):
        self.path = Path(path)
        self.device = torch.device(device)
        self.channels = channels
        if not self.path.is_file():
            raise ConfigError(f"feature network file not found: {self.path}")
        try:
            with warnings.catch_warnings():
                # torch>=2.9 marks TorchScript deprecated; it still loads, and FID networks ship in it.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.network = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as error:  # torch raises RuntimeError or ValueError depending on the damage
            raise ConfigError(f"could not load feature network {self.path} as a TorchScript module "
                              f"(save it with torch.jit.save(torch.jit.script(net), path)): {error}") from error
        self.network.eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features (B, F) in float32 of images (B, C, H, W) in [-1, 1]."""
        images = images.to(self.device, torch.float32)
        if self.channels is not None and images.shape[1] == 1:
            images = images.expand(-1, self.channels, -1, -1)
        features = self.network(images)
        if features.ndim > 2 and all(s == 1 for s in features.shape[2:]):
            features = features.flatten(1)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ConfigError(f"feature network {self.path} returned shape {tuple(features.shape)} for "
                              f"{images.shape[0]} images; it must return (B, F)")
        return features.float()
