"""PNG figures for validation and evaluation: comparison grids, contour overlays, denoising strips, curves.

Images are numpy arrays in the normalised space [-1, 1]: (H, W) grey, or (H, W, 3) / (3, H, W) RGB. Integer or
bool arrays are label masks and are shown with a categorical colour map. Figures are drawn on a bare Agg
canvas (no pyplot), so plotting neither needs a display nor touches global matplotlib state. Volumes are
(D, H, W) with D the slice axis; volume_figure draws them as slice montages, orthogonal planes or projections.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from PIL import Image
from skimage.segmentation import find_boundaries

# Column order of comparison_grid; other keys follow in the order the first row gives them.
COMPARISON_COLUMNS = ("condition", "generated", "reference")
_LABEL_COLOURS = colormaps["tab10"].colors  # distinct colours for labels 1..10 (0 is background)
_PANEL_INCHES = 2.2
_DPI = 100


# ----------------------------------------------------------------------------------------------------------
# Array helpers.

def _is_mask(array: np.ndarray) -> bool:
    return array.dtype == bool or np.issubdtype(array.dtype, np.integer)


def _to_hw_or_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3); channel-first (1|3, H, W) and singleton channels are moved or squeezed."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3):
        return array
    raise ValueError(f"expected a 2D image (H, W), (H, W, 3) or (3, H, W), got shape {array.shape}")


def _label_cmap(num_labels: int) -> tuple[ListedColormap, BoundaryNorm]:
    """Black background and one tab10 colour per label, each label a solid block."""
    colours = [(0.0, 0.0, 0.0)] + [_LABEL_COLOURS[(i - 1) % len(_LABEL_COLOURS)] for i in range(1, num_labels)]
    return ListedColormap(colours), BoundaryNorm(np.arange(num_labels + 1) - 0.5, num_labels)


def _to_rgb_uint8(array: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """(H, W, 3) uint8 of a normalised image (shown on [-data_range/2, data_range/2]) or a label mask."""
    array = _to_hw_or_hwc(array)
    if _is_mask(array):
        labels = array.astype(np.int64)
        cmap, norm = _label_cmap(max(int(labels.max()) + 1, 2))
        return (cmap(norm(labels))[..., :3] * 255).round().astype(np.uint8)
    scaled = (array.astype(np.float64) / data_range + 0.5).clip(0, 1)
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    return (scaled * 255).round().astype(np.uint8)


def _new_figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def _show_magnitude(figure, ax, array: np.ndarray, vmax: float, unit: str = "") -> None:
    """Draw a non-negative map (an error, a spread) from 0 to `vmax` with its colour bar, without ticks."""
    image = ax.imshow(array, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    bar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    if unit:
        bar.set_label(unit, fontsize=7)


def _show(ax, array: np.ndarray, data_range: float) -> None:
    """Draw an image or a label mask without ticks, keeping square pixels."""
    array = _to_hw_or_hwc(array)
    if _is_mask(array):
        labels = array.astype(np.int64)
        cmap, norm = _label_cmap(max(int(labels.max()) + 1, 2))
        ax.imshow(labels, cmap=cmap, norm=norm, interpolation="nearest")
    elif array.ndim == 3:
        ax.imshow(_to_rgb_uint8(array, data_range), interpolation="nearest")
    else:
        ax.imshow(array, cmap="gray", vmin=-data_range / 2, vmax=data_range / 2, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------------------------------------
# Figures.

def comparison_grid(rows: list[dict[str, np.ndarray]], path: Path, data_range: float = 2.0,
                    titles: Optional[Sequence[str]] = None) -> Path:
    """One row per item: condition | generated | reference | |error|, for whichever keys are present.

    |error| = |generated - reference| (mean over RGB channels) is added when both are images; it shares one
    colour scale across rows, from 0 to the largest error in the figure, with a colour bar per row.
    Keys other than the three known ones (e.g. a second generated modality) follow in their dict order.

    Args:
        rows: one dict per item, key -> (H, W) image in [-1, 1] or integer label mask.
        data_range: width of the displayed intensity range, centred at 0 (2.0 shows [-1, 1]).
        titles: optional label per row (an item id), written left of the row.
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    keys = [k for k in COMPARISON_COLUMNS if any(k in row for row in rows)]
    keys += [k for row in rows for k in row if k not in keys and k not in COMPARISON_COLUMNS]
    keys = list(dict.fromkeys(keys))

    def error_of(row: dict[str, np.ndarray]) -> Optional[np.ndarray]:
        if "generated" not in row or "reference" not in row:
            return None
        generated, reference = _to_hw_or_hwc(row["generated"]), _to_hw_or_hwc(row["reference"])
        if _is_mask(generated) or _is_mask(reference):
            return None
        error = np.abs(generated.astype(np.float64) - reference.astype(np.float64))
        return error.mean(axis=-1) if error.ndim == 3 else error

    errors = [error_of(row) for row in rows]
    has_error = any(e is not None for e in errors)
    error_max = max((float(e.max()) for e in errors if e is not None), default=0.0) or 1e-6
    columns = keys + (["|error|"] if has_error else [])

    # The extra width holds the error colour bar; constrained layout takes it from the error panel's slot.
    figure = _new_figure(_PANEL_INCHES * len(columns) + (0.6 if has_error else 0.2), _PANEL_INCHES * len(rows) + 0.3)
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, key in enumerate(columns):
            ax = axes[r, c]
            if r == 0:
                ax.set_title(key, fontsize=11)
            if key == "|error|":
                if errors[r] is None:
                    ax.axis("off")
                    continue
                _show_magnitude(figure, ax, errors[r], error_max)
            elif key in row:
                _show(ax, row[key], data_range)
            else:
                ax.axis("off")
        if titles is not None:
            axes[r, 0].set_ylabel(str(titles[r]), fontsize=9)
    return _save(figure, path)


def uncertainty_grid(rows: list[dict[str, np.ndarray]], path: Path, unit: str,
                     titles: Optional[Sequence[str]] = None) -> Path:
    """One row per item of non-negative maps, e.g. std over samples | |sample 1 - reference|, each with a colour
    bar in `unit`; each column shares one scale (0 to its largest value) across rows.

    Args:
        rows: one dict per item, column title -> (H, W) map, or (C, H, W) (the mean over channels is drawn).
        unit: what the values are in, written on the colour bars ("normalised units", "HU").
        titles: optional label per row (an item id), written left of the row.
    """
    if not rows:
        raise ValueError("uncertainty_grid needs at least one row")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    maps = [{k: (v.mean(0) if v.ndim == 3 else v).astype(np.float64) for k, v in row.items()} for row in rows]
    vmax = {k: max((float(m[k].max()) for m in maps if k in m), default=0.0) or 1e-6 for k in columns}
    figure = _new_figure((_PANEL_INCHES + 0.6) * len(columns), _PANEL_INCHES * len(rows) + 0.3)
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(maps):
        for c, key in enumerate(columns):
            ax = axes[r, c]
            if r == 0:
                ax.set_title(key, fontsize=10)
            if key not in row:
                ax.axis("off")
                continue
            _show_magnitude(figure, ax, row[key], vmax[key], unit)
        if titles is not None:
            axes[r, 0].set_ylabel(str(titles[r]), fontsize=9)
    return _save(figure, path)


def overlay_contours(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image in [-1, 1] with the boundary of each label drawn in its colour.

    Args:
        image: (H, W) grey or RGB image in [-1, 1].
        mask: (H, W) integer labels, 0 = background.
    """
    rgb = _to_rgb_uint8(image)
    labels = _to_hw_or_hwc(mask).astype(np.int64)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {labels.shape} != image shape {rgb.shape[:2]}")
    # 'inner' marks boundary pixels inside each object, so every contour pixel carries its own label.
    boundary = find_boundaries(labels, mode="inner") & (labels > 0)
    colours = (np.asarray(_LABEL_COLOURS) * 255).round().astype(np.uint8)
    rgb[boundary] = colours[(labels[boundary] - 1) % len(colours)]
    return rgb


def denoising_strip(x0_preds: list[np.ndarray], times: list[float], path: Path, ncols: int = 8) -> Path:
    """The model's x0 prediction at successive sampling times, left to right, titled with t.

    Args:
        x0_preds: images in [-1, 1] (or label masks), one per time.
        times: the sampling time of each prediction (t, or the timestep index for DDPM).
        ncols: panels per row; longer sequences wrap.
    """
    if len(x0_preds) != len(times) or not x0_preds:
        raise ValueError(f"need one time per prediction, got {len(x0_preds)} predictions and {len(times)} times")
    ncols = min(ncols, len(x0_preds))
    nrows = math.ceil(len(x0_preds) / ncols)
    figure = _new_figure(1.8 * ncols, 1.9 * nrows + 0.3)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(x0_preds):
            ax.axis("off")
            continue
        _show(ax, x0_preds[i], 2.0)
        time = times[i]
        ax.set_title(f"t={time:g}" if float(time).is_integer() else f"t={time:.3f}", fontsize=10)
    figure.suptitle("predicted x0 during sampling", fontsize=11)
    return _save(figure, path)


def _read_metrics(metrics_csv: Path) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (steps, values) from a long-format step,name,value CSV; non-finite values are skipped."""
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    with open(metrics_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"step", "name", "value"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{metrics_csv} lacks columns {sorted(missing)}; expected step,name,value")
        for record in reader:
            try:
                step, value = float(record["step"]), float(record["value"])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                steps, values = series[record["name"]]
                steps.append(step)
                values.append(value)
    return dict(series)


def metric_curves(metrics_csv: Path, path: Path, ncols: int = 3) -> Path:
    """One panel per metric name from a long-format metrics.csv (step,name,value), value against step.

    Losses that are positive and span more than two decades get a log y-axis. An empty file gives a figure
    that says so, so a validation hook can call this before anything is logged.
    """
    series = _read_metrics(Path(metrics_csv))
    if not series:
        figure = _new_figure(4, 2)
        figure.text(0.5, 0.5, f"no metrics recorded yet in {Path(metrics_csv).name}", ha="center", va="center")
        return _save(figure, path)
    names = sorted(series)
    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    figure = _new_figure(4.0 * ncols, 2.8 * nrows)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = (np.asarray(v) for v in series[name])
        order = np.argsort(steps, kind="stable")
        # Sparse series (validation) get markers so single points are visible.
        ax.plot(steps[order], values[order], marker="o" if len(values) <= 50 else None, markersize=3, lw=1.2)
        if "loss" in name and values.min() > 0 and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save(figure, path)


def image_grid(images: list[np.ndarray], path: Path, ncols: int, zoom: int = 1, pad: int = 2) -> Path:
    """A plain grid of samples at their pixel size (times `zoom`), separated by `pad` white pixels.

    Args:
        images: (H, W) or RGB images in [-1, 1], or label masks, all of one size.
        zoom: integer nearest-neighbour magnification, for small (e.g. 64 x 64) samples.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = [_to_rgb_uint8(image) for image in images]
    if len({t.shape for t in tiles}) != 1:
        raise ValueError(f"images differ in size: {sorted({t.shape[:2] for t in tiles})}")
    if zoom > 1:
        tiles = [t.repeat(zoom, axis=0).repeat(zoom, axis=1) for t in tiles]
    height, width = tiles[0].shape[:2]
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    canvas = np.full((nrows * (height + pad) + pad, ncols * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top = pad + (i // ncols) * (height + pad)
        left = pad + (i % ncols) * (width + pad)
        canvas[top:top + height, left:left + width] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, format="PNG")
    return path


def figure_array(array: np.ndarray) -> np.ndarray:
    """An item's (C, H, W) array as the 2D figures draw it: (H, W) for one channel, colour (3, H, W) as is; a
    (1, D, H, W) volume by its middle slice (volume_figure shows volumes whole)."""
    if array.ndim == 4:
        return array[0, array.shape[1] // 2]
    return array[0] if array.shape[0] == 1 else array


# ----------------------------------------------------------------------------------------------------------
# Volumes.

VOLUME_VIEWS = ("montage", "orthogonal", "mip")


def _as_volume(array: np.ndarray) -> np.ndarray:
    """(D, H, W); a singleton channel (1, D, H, W) is squeezed."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a volume (D, H, W) or (1, D, H, W), got shape {array.shape}")
    return array


def _volume_panels(volume: np.ndarray, view: str, num_slices: int = 6,
                   plane_names: Sequence[str] = ("axial", "coronal", "sagittal")
                   ) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """(column title, 2D panel, (row axis, column axis) of the volume) for each column of a view.

    Every view cuts or projects across one axis per column, so all three share this code. Planes that contain D
    are flipped vertically: D rises towards the top of the patient, and the top of the screen should show it.
    """
    volume = _as_volume(volume)
    if view == "montage":
        # The inner 80% of D: the outermost slices of a scan are mostly padding or partial-volume edges.
        indices = np.unique(np.round(np.linspace(0.1, 0.9, num_slices) * (volume.shape[0] - 1)).astype(int))
        cuts = [(f"slice {i}", 0, volume[i]) for i in indices]
    elif view == "orthogonal":
        cuts = [(name, axis, np.take(volume, size // 2, axis=axis))
                for axis, (name, size) in enumerate(zip(plane_names, volume.shape))]
    elif view == "mip":
        cuts = [(f"MIP along {'DHW'[axis]} ({name})", axis, volume.max(axis=axis))
                for axis, name in enumerate(plane_names)]
    else:
        raise ValueError(f"unknown view {view!r}; expected one of {VOLUME_VIEWS}")
    return [(title, panel if axis == 0 else panel[::-1], tuple(a for a in range(3) if a != axis))
            for title, axis, panel in cuts]


def volume_figure(volumes: dict[str, np.ndarray], path: Path, view: str, title: str = "", num_slices: int = 6,
                  data_range: float = 2.0, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  plane_names: Sequence[str] = ("axial", "coronal", "sagittal")) -> Path:
    """One row per volume, in dict order, of D slices ("montage"), three central planes ("orthogonal") or
    maximum-intensity projections ("mip"), and an |error| row when generated and reference are both images.

    The error row is |generated - reference| of the panels shown (for "mip", the difference of the MIPs, which
    shows what a reader of the projections sees), on one magma scale from 0 to its largest value. Pixels are
    drawn with the voxel spacing's aspect, so thick slices do not look squashed in the planes that contain D.

    Args:
        volumes: key -> (D, H, W) or (1, D, H, W) volume in [-1, 1], or integer label mask, all of one shape.
        view: one of VOLUME_VIEWS.
        num_slices: columns of the montage, evenly spaced over the inner 80% of D (fewer when D is small).
        data_range: width of the displayed intensity range, centred at 0 (2.0 shows [-1, 1]).
        spacing: mm per voxel along D, H, W.
        plane_names: names of the planes across D, H and W, for the column titles.
    """
    if not volumes:
        raise ValueError("volume_figure needs at least one volume")
    if view not in VOLUME_VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VOLUME_VIEWS}")
    if len(spacing) != 3 or min(spacing) <= 0 or len(plane_names) != 3 or num_slices < 1:
        raise ValueError(f"need 3 positive spacings, 3 plane names and num_slices >= 1, got {tuple(spacing)}, "
                         f"{tuple(plane_names)} and {num_slices}")
    arrays = {key: _as_volume(volume) for key, volume in volumes.items()}
    if len({a.shape for a in arrays.values()}) != 1:
        raise ValueError(f"volumes differ in shape: { {key: a.shape for key, a in arrays.items()} }")
    rows = {key: _volume_panels(a, view, num_slices, plane_names) for key, a in arrays.items()}
    error_key = "|error| of MIPs" if view == "mip" else "|error|"
    has_error = "generated" in arrays and "reference" in arrays and not (
        _is_mask(arrays["generated"]) or _is_mask(arrays["reference"]))
    if has_error:
        rows[error_key] = [(column, np.abs(g.astype(np.float64) - r.astype(np.float64)), axes)
                           for (column, g, axes), (_, r, _) in zip(rows["generated"], rows["reference"])]
        error_max = max(float(panel.max()) for _, panel, _ in rows[error_key]) or 1e-6

    ncols = len(next(iter(rows.values())))
    figure = _new_figure(_PANEL_INCHES * ncols + (0.8 if has_error else 0.2),
                         _PANEL_INCHES * len(rows) + (0.6 if title else 0.3))
    axes = figure.subplots(len(rows), ncols, squeeze=False)
    for r, (key, panels) in enumerate(rows.items()):
        for c, (column, panel, (row_axis, col_axis)) in enumerate(panels):
            ax = axes[r, c]
            if key == error_key and has_error:
                image = ax.imshow(panel, cmap="magma", vmin=0, vmax=error_max, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                _show(ax, panel, data_range)
            ax.set_aspect(spacing[row_axis] / spacing[col_axis])  # mm per row over mm per column
            if r == 0:
                ax.set_title(column, fontsize=10)
        axes[r, 0].set_ylabel(key, fontsize=10)
    if has_error:
        bar = figure.colorbar(image, ax=list(axes[-1]), shrink=0.9, pad=0.02)
        bar.set_label("|error| (normalised units)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=11)
    return _save(figure, path)
