"""Simulated degradations of a high-quality image or volume, for degraded -> high-quality pairs.

Pure functions on numpy arrays or torch tensors, 2D (H, W) and 3D (D, H, W) alike; each returns the type, device
and (floating) dtype it was given, at the input's shape. They take intensities before normalisation: HU for
`low_dose_ct`, whose physics needs them; `low_resolution` and `thick_slices` are linear and so commute with the
affine map to [-1, 1] (not with its clip). Normalise the degraded array with the target's clip values so that
both share one intensity scale.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import iradon, radon

from utils.config import ConfigError, DegradeConfig

KINDS = ("low_dose_ct", "low_resolution", "thick_slices")  # data.degrade.kind; "" = no degradation
# Linear attenuation of water, /mm, at about 60 keV (NIST XCOM: 0.206 cm^2/g), near a CT beam's effective energy.
MU_WATER_PER_MM = 0.02
# A detector bin that counted no photon reads as one: the log of zero counts is undefined.
MIN_COUNT = 1.0
UPSAMPLE_MODES = {2: "bilinear", 3: "trilinear"}

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def check_degrade_config(cfg: DegradeConfig) -> None:
    """ConfigError naming the key for a `data.degrade` section no degradation can run with."""
    if cfg.kind not in ("", *KINDS):
        raise ConfigError(f"data.degrade.kind='{cfg.kind}' is not one of '' (none) | {' | '.join(KINDS)}")
    if not 0 < cfg.photons < math.inf:
        raise ConfigError(f"data.degrade.photons={cfg.photons} must be a finite number > 0 (incident photons per "
                          "detector bin, e.g. 1e4)")
    if not 1 <= len(cfg.factor) <= 3:
        raise ConfigError(f"data.degrade.factor={cfg.factor} must hold one number (every axis) or one per axis")
    if min(cfg.factor) < 1:
        raise ConfigError(f"data.degrade.factor={cfg.factor} must be >= 1 on every axis (1 = unchanged)")
    if cfg.kind == "thick_slices" and (len(cfg.factor) != 1 or cfg.factor[0] != int(cfg.factor[0])):
        raise ConfigError(f"data.degrade.factor={cfg.factor} must be one whole number for thick_slices (thin "
                          "slices averaged into one thick slice)")
    if cfg.seed < 0:
        raise ConfigError(f"data.degrade.seed={cfg.seed} must be >= 0")


def item_seed(seed: int, item_id: str) -> int:
    """A seed for one item's degradation, the same in every process and session (unlike Python's `hash`)."""
    digest = hashlib.sha256(f"{seed}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative, as numpy's generators want


def degrade(x: Array, cfg: DegradeConfig, seed: int, *, slice_axis: int = 0, pixel_size_mm: float = 1.0) -> Array:
    """Degrade a high-quality image or volume as `cfg.kind` says ("" returns `x` itself).

    Args:
        x: (H, W) or (D, H, W) intensities before normalisation: HU for low_dose_ct.
        cfg: the data.degrade section.
        seed: this item's seed, `item_seed(cfg.seed, item_id)`, so a held-out pair is the same in every run.
        slice_axis: the array axis the slices are stacked along (data.slice_axis in the array's layout):
            low_dose_ct reconstructs each slice of a volume, thick_slices averages along it.
        pixel_size_mm: in-plane pixel size of the slices (square pixels), for the attenuation in low_dose_ct.
    """
    if cfg.kind == "":
        return x
    if cfg.kind == "low_dose_ct":
        return low_dose_ct(x, cfg.photons, seed, axis=slice_axis, pixel_size_mm=pixel_size_mm)
    if cfg.kind == "thick_slices":
        return thick_slices(x, int(cfg.factor[0]), slice_axis)
    if len(cfg.factor) not in (1, x.ndim):
        raise ConfigError(f"data.degrade.factor={cfg.factor} has {len(cfg.factor)} entries for {x.ndim}D items of "
                          f"shape {tuple(x.shape)}; give one number or {x.ndim}")
    return low_resolution(x, cfg.factor)


# ---------------------------------------------------------------------------------------------------------
# Low-dose CT


def low_dose_ct(hu: Array, photons: float, seed: int, *, axis: int = 0, pixel_size_mm: float = 1.0,
                num_angles: int = 0) -> Array:
    """Low-dose CT of each slice: parallel-beam projection, Poisson noise at `photons`, ramp-filtered back-projection.

    The result is in HU and is not clipped (noise in air goes below -1000); HU below -1000 (scanner padding)
    count as air. Give whole slices, not patches: a scanner projects the whole body, and a cut through it is a
    hard edge that the back-projection rings at.

    Args:
        hu: (H, W) slice or (D, H, W) volume in HU; slices of any aspect ratio.
        photons: incident photons per detector bin and view; noise in HU scales as 1/sqrt(photons).
        seed: seeds the Poisson noise; the slices of a volume draw from one generator in order.
        axis: the axis of a volume that the slices are stacked along.
        pixel_size_mm: pixel size in mm: larger pixels attenuate more per pixel, as a larger body does.
        num_angles: views over 180 degrees; 0 = pi/2 per pixel of the padded side, enough that the
            view count adds no streaks of its own.
    """
    if hu.ndim not in (2, 3):
        raise ValueError(f"expected a 2D (H, W) slice or 3D (D, H, W) volume, got shape {tuple(hu.shape)}")
    volume = _to_numpy(hu).astype(np.float64)
    slices = volume[None] if volume.ndim == 2 else np.moveaxis(volume, axis, 0)
    rng = np.random.default_rng(seed)
    mu_water = MU_WATER_PER_MM * pixel_size_mm  # per pixel, so that line integrals come out dimensionless
    result = np.stack([_low_dose_slice(s, photons, rng, mu_water, num_angles) for s in slices])
    result = result[0] if volume.ndim == 2 else np.moveaxis(result, 0, axis)
    return _like(result, hu)


def _low_dose_slice(hu: np.ndarray, photons: float, rng: np.random.Generator, mu_water: float,
                    num_angles: int) -> np.ndarray:
    height, width = hu.shape
    # radon(circle=True) sees only the inscribed circle: pad with air to a square whose circle holds the
    # whole slice, corners included.
    side = math.ceil(math.hypot(height, width)) + 2
    top, left = (side - height) // 2, (side - width) // 2
    mu = np.zeros((side, side))
    mu[top:top + height, left:left + width] = np.clip(mu_water * (1.0 + hu / 1000.0), 0.0, None)
    theta = np.linspace(0.0, 180.0, num_angles or math.ceil(math.pi / 2 * side), endpoint=False)
    line_integrals = radon(mu, theta, circle=True)
    counts = rng.poisson(photons * np.exp(-line_integrals))
    noisy = -np.log(np.maximum(counts, MIN_COUNT) / photons)
    mu_noisy = iradon(noisy, theta, output_size=side, filter_name="ramp", circle=True)
    return (mu_noisy[top:top + height, left:left + width] / mu_water - 1.0) * 1000.0


# ---------------------------------------------------------------------------------------------------------
# Resolution


def low_resolution(x: Array, factor: float | Sequence[float]) -> Array:
    """Average down by `factor` per axis (box filter), then interpolate (bi/trilinear) back to the input's grid.

    Args:
        x: (H, W) slice or (D, H, W) volume.
        factor: one factor (or a one-entry list) for every axis, or one per axis, each >= 1 (1 = unchanged); the
            coarse grid has round(size / factor) samples along an axis.
    """
    if x.ndim not in UPSAMPLE_MODES:
        raise ValueError(f"expected a 2D (H, W) slice or 3D (D, H, W) volume, got shape {tuple(x.shape)}")
    factors = [float(f) for f in (factor if isinstance(factor, Sequence) else [factor])]
    factors = factors * x.ndim if len(factors) == 1 else factors
    if len(factors) != x.ndim or min(factors) < 1:
        raise ValueError(f"factor {factor} must be one number or {x.ndim} numbers, each >= 1")
    tensor = torch.as_tensor(x)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    shape = tuple(tensor.shape)
    coarse = [max(1, round(size / f)) for size, f in zip(shape, factors)]
    # 'area' averages the fine samples inside each coarse one, as a larger detector element would; both steps
    # place samples at cell centres (align_corners=False), so the grids line up.
    y = F.interpolate(tensor[None, None], size=coarse, mode="area")  # (1, 1, *coarse)
    y = F.interpolate(y, size=shape, mode=UPSAMPLE_MODES[x.ndim], align_corners=False)
    return _like(y[0, 0], x)


def thick_slices(x: Array, factor: int, axis: int) -> Array:
    """Average groups of `factor` slices along `axis` into thick slices, then interpolate back to the thin grid.

    A low-resolution degradation along one axis only; when the slice count is not a multiple of `factor`, the
    groups hold about `factor` slices each.

    Args:
        x: (H, W) slice or (D, H, W) volume.
        factor: thin slices per thick slice (>= 1).
        axis: the axis the slices are stacked along.
    """
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for shape {tuple(x.shape)}")
    factors = [1.0] * x.ndim
    factors[axis] = factor
    return low_resolution(x, factors)


# ---------------------------------------------------------------------------------------------------------
# Array types


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(result: np.ndarray | torch.Tensor, x: Array) -> Array:
    """`result` as the type of `x`: same device, and same dtype when `x` is floating (else float32)."""
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.as_tensor(result).to(device=x.device, dtype=dtype)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return _to_numpy(result).astype(dtype, copy=False)
