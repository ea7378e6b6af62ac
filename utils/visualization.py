"""PNG figures for validation and evaluation: comparison grids, contour overlays, denoising strips, curves.

Images are numpy arrays in the normalised space [-1, 1]: (H, W) grey, or (H, W, 3) / (3, H, W) RGB. Integer or
bool arrays are label masks and are shown with a categorical colour map. Figures are drawn on a bare Agg
canvas (no pyplot), so plotting neither needs a display nor touches global matplotlib state. Volumes are
(D, H, W) with D the slice axis; volume_figure draws them as slice montages, orthogonal planes or projections.
comparison_figure, denoising_figure and curves_figure return the Figure (what tests read the drawn text of);
comparison_grid, denoising_strip and metric_curves save it as a PNG.
"""
from __future__ import annotations

import csv
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
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

def comparison_figure(rows: list[dict[str, np.ndarray]], data_range: float = 2.0,
                      titles: Optional[Sequence[str]] = None, notes: Optional[Sequence[str]] = None, title: str = "",
                      label_names: Optional[dict[int, str]] = None, error_unit: str = "normalised units",
                      error_scale: float = 1.0, items_as_columns: bool = False, items_per_row: int = 8) -> Figure:
    """One row per item: condition | generated | reference | |error|, for whichever keys are present.

    |error| = |generated - reference| (mean over RGB channels) times `error_scale` is added when both are images;
    it shares one colour scale across items, from 0 to the largest error in the figure, with one colour bar in
    `error_unit`. Keys other than the three known ones (e.g. a second generated modality) follow in their dict
    order. Mask labels present in any panel get a legend, named by `label_names` or "label <k>".

    Args:
        rows: one dict per item, key -> (H, W) image in [-1, 1] or integer label mask.
        data_range: width of the displayed intensity range, centred at 0 (2.0 shows [-1, 1]).
        titles: optional label per item (an item id).
        notes: optional text per item (its metrics), written under its generated panel.
        title: the figure's title (weights, step, sampler).
        error_scale: units of `error_unit` per normalised unit (e.g. HU per unit for CT).
        items_as_columns: one column per item (keys as rows), wrapping after `items_per_row` items: a compact
            layout for many small samples.
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    for name, labels in (("titles", titles), ("notes", notes)):
        if labels is not None and len(labels) != len(rows):
            raise ValueError(f"{len(labels)} {name} for {len(rows)} rows")
    keys = [k for k in COMPARISON_COLUMNS if any(k in row for row in rows)]
    keys += [k for row in rows for k in row if k not in keys and k not in COMPARISON_COLUMNS]
    keys = list(dict.fromkeys(keys))
    errors = [_error_map(row, error_scale) for row in rows]
    has_error = any(e is not None for e in errors)
    error_max = max((float(e.max()) for e in errors if e is not None), default=0.0) or 1e-6
    columns = keys + (["|error|"] if has_error else [])
    mask_values = _mask_values(rows)

    grid = _ItemGrid(len(rows), len(columns), items_as_columns, items_per_row)
    panel = _PANEL_INCHES if not items_as_columns else 1.6
    # The extra width holds the error colour bar, the extra height the title, the legend and the notes.
    extra_height = 0.3 + (0.35 if title else 0) + (0.35 if mask_values else 0)
    extra_height += 0.25 * grid.nrows if notes is not None and not items_as_columns else 0
    figure = _new_figure(panel * grid.ncols + (0.9 if has_error else 0.2), panel * grid.nrows + extra_height)
    axes = figure.subplots(grid.nrows, grid.ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")  # cells without a panel stay blank; drawn ones are switched back on
    error_image = None
    for i, row in enumerate(rows):
        for k, key in enumerate(columns):
            ax = axes[grid.cell(i, k)]
            if key == "|error|" and errors[i] is not None:
                ax.axis("on")
                error_image = ax.imshow(errors[i], cmap="magma", vmin=0, vmax=error_max, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            elif key in row:
                ax.axis("on")
                _show(ax, row[key], data_range)
    grid.label(axes, columns, titles, notes)
    if error_image is not None:
        # One bar for the whole grid (one scale): a bar beside some cells of a row would shift that row's panels.
        bar = figure.colorbar(error_image, ax=list(axes.flat), fraction=0.046 / grid.ncols, pad=0.01, aspect=15)
        bar.set_label(f"|error| ({error_unit})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    _label_legend(figure, mask_values, label_names or {})
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def comparison_grid(rows: list[dict[str, np.ndarray]], path: Path, data_range: float = 2.0,
                    titles: Optional[Sequence[str]] = None, **options) -> Path:
    """`comparison_figure` saved as a PNG at `path` (options: its keyword arguments)."""
    return _save(comparison_figure(rows, data_range, titles, **options), path)


class _ItemGrid:
    """Where item i's k-th panel sits: row i and column k, or (items as columns) column i in blocks of at most
    `per_row` items, each block one row per key."""

    def __init__(self, num_items: int, num_keys: int, items_as_columns: bool, per_row: int):
        self.num_keys, self.as_columns = num_keys, items_as_columns
        blocks = math.ceil(num_items / max(1, per_row))
        self.per_row = math.ceil(num_items / blocks)  # balanced blocks: 11 items in rows of 8 become 6 + 5
        self.nrows, self.ncols = (blocks * num_keys, self.per_row) if items_as_columns else (num_items, num_keys)

    def cell(self, item: int, key: int) -> tuple[int, int]:
        if not self.as_columns:
            return item, key
        return (item // self.per_row) * self.num_keys + key, item % self.per_row

    def label(self, axes: np.ndarray, columns: list[str], titles: Optional[Sequence[str]],
              notes: Optional[Sequence[str]]) -> None:
        """Key names, item titles and notes: keys head the columns (or start each row of a block); an item's
        title and note go left of and under its row, or above its column."""
        num_items = len(titles if titles is not None else notes if notes is not None else [])
        if not self.as_columns:
            for k, key in enumerate(columns):
                axes[0, k].set_title(key, fontsize=11)
            for i in range(num_items):
                if titles is not None:
                    axes[i, 0].set_ylabel(str(titles[i]), fontsize=9)
                if notes is not None and notes[i]:
                    # Under the generated panel, which the metrics score (else the first one).
                    k = columns.index("generated") if "generated" in columns else 0
                    axes[i, k].set_xlabel(notes[i], fontsize=8)
            return
        for block_top in range(0, self.nrows, self.num_keys):
            for k, key in enumerate(columns):
                ax = axes[block_top + k, 0]
                if not ax.axison:  # a switched-off axis hides its label: show it, frameless, for the label
                    ax.axis("on")
                    ax.set_frame_on(False)
                    ax.set_xticks([])
                    ax.set_yticks([])
                ax.set_ylabel(key, fontsize=9)
        for i in range(num_items):
            lines = [str(titles[i])] if titles is not None else []
            lines += [notes[i]] if notes is not None and notes[i] else []
            axes[self.cell(i, 0)].set_title("\n".join(lines), fontsize=8)


def _error_map(row: dict[str, np.ndarray], scale: float) -> Optional[np.ndarray]:
    """|generated - reference| times `scale` (mean over RGB channels), or None unless both are images."""
    if "generated" not in row or "reference" not in row:
        return None
    generated, reference = _to_hw_or_hwc(row["generated"]), _to_hw_or_hwc(row["reference"])
    if _is_mask(generated) or _is_mask(reference):
        return None
    error = np.abs(generated.astype(np.float64) - reference.astype(np.float64)) * scale
    return error.mean(axis=-1) if error.ndim == 3 else error


def _mask_values(rows: list[dict[str, np.ndarray]]) -> list[int]:
    """The labels (> 0) that the rows' label masks hold; RGB panels (contour overlays) are not masks."""
    values: set[int] = set()
    for row in rows:
        for array in row.values():
            array = _to_hw_or_hwc(array)
            if _is_mask(array) and array.ndim == 2:
                values.update(int(v) for v in np.unique(array) if v > 0)
    return sorted(values)


def _label_legend(figure: Figure, values: Sequence[int], names: dict[int, str]) -> None:
    """A legend under the figure: one patch per label in its colour in the masks and the contour overlays."""
    if not values:
        return
    handles = [Patch(color=_LABEL_COLOURS[(v - 1) % len(_LABEL_COLOURS)], label=names.get(v, f"label {v}"))
               for v in values]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8,
                  frameon=False, title="mask labels", title_fontsize=8)


def dataset_label_names(dataset) -> dict[int, str]:
    """Label value -> class name of the dataset's first mask, where the data records them (an MSD dataset.json's
    'labels', as `mask_labels`); {} otherwise, and figures then say "label <k>"."""
    recorded = getattr(dataset, "mask_labels", None) or {}
    return dict(next(iter(recorded.values()), {}))


def metric_note(scores: dict[str, float], field: str = "") -> str:
    """One line of an item's scores for a figure: "SSIM 0.912, PSNR 27.1 dB" (and MAE in HU when scored), or the
    Dice per label of a mask; "" when there is nothing to say.

    Args:
        scores: metric name -> value, as utils.evaluation.score_item names them.
        field: the drawn field; with several scored fields the metrics carry its name (ssim_t1).
    """
    def value(metric: str) -> Optional[float]:
        for key in ((f"{metric}_{field}",) if field else ()) + (metric,):
            if key in scores and math.isfinite(scores[key]):
                return scores[key]
        return None

    shown = {"ssim": "SSIM {:.3f}", "psnr": "PSNR {:.1f} dB", "mae_hu": "MAE {:.1f} HU"}
    parts = [text.format(value(metric)) for metric, text in shown.items() if value(metric) is not None]
    if not parts:  # a generated mask: Dice per label (dice_<k>, or dice_<field>_<k> with several fields)
        prefix = f"dice_{field}_" if field and any(k.startswith(f"dice_{field}_") for k in scores) else "dice_"
        dice = sorted((int(k[len(prefix):]), v) for k, v in scores.items()
                      if k.startswith(prefix) and k[len(prefix):].isdigit() and math.isfinite(v))
        if dice:
            parts.append("Dice " + " / ".join(f"{v:.3f}" for _, v in dice))
    return ", ".join(parts)


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


def log_spaced_indices(times: Sequence[float], count: int) -> list[int]:
    """Indices of about `count` of `times` whose t values are evenly spaced in log t, in trajectory order.

    Noise levels are compared by ratio (as in log-SNR), so a strip at log-spaced t gives the last, nearly clean
    steps where fine detail appears as much room as the first ones. A recorded t = 0 (the clean end) is kept.
    """
    t = np.asarray(times, dtype=np.float64)
    if len(t) <= count:
        return list(range(len(t)))
    positive = np.flatnonzero(t > 0)
    if len(positive) == 0:
        return list(range(len(t)))[-count:]
    clean_end = list(np.flatnonzero(t <= 0)[-1:])
    targets = np.log(np.geomspace(t[positive].max(), t[positive].min(), count - len(clean_end)))
    picks = {int(positive[np.argmin(np.abs(np.log(t[positive]) - target))]) for target in targets}
    return sorted(picks | {int(i) for i in clean_end})


def denoising_figure(x0_preds: list[np.ndarray], times: list[float], item_id: str = "", num_panels: int = 8,
                     ncols: int = 8) -> Figure:
    """The model's x0 prediction while sampling one item, at about `num_panels` log-spaced times, titled with t.

    Args:
        x0_preds: images in [-1, 1] (or label masks), one per sampling step.
        times: the sampling time t in [0, 1] of each prediction.
        item_id: the sampled item, named in the title.
        ncols: panels per row; longer sequences wrap.
    """
    if len(x0_preds) != len(times) or not x0_preds:
        raise ValueError(f"need one time per prediction, got {len(x0_preds)} predictions and {len(times)} times")
    shown = log_spaced_indices(times, num_panels)
    ncols = min(ncols, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    figure = _new_figure(1.8 * ncols, 1.9 * nrows + 0.4)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown):
        _show(ax, x0_preds[index], 2.0)
        ax.set_title(f"t={float(times[index]):.3g}", fontsize=10)
    sampled = f" {item_id}" if item_id else ""
    figure.suptitle(f"predicted x0 while sampling{sampled}: {len(shown)} of {len(times)} steps, at log-spaced t",
                    fontsize=11)
    return figure


def denoising_strip(x0_preds: list[np.ndarray], times: list[float], path: Path, item_id: str = "",
                    num_panels: int = 8, ncols: int = 8) -> Path:
    """`denoising_figure` saved as a PNG at `path`."""
    return _save(denoising_figure(x0_preds, times, item_id, num_panels, ncols), path)


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


# Panels of metric_curves, in this order; names with other prefixes (model/, ...) go under "other".
CURVE_GROUPS = {"train/": "training", "val/": "validation", "perf/": "timing (wall clock)"}
# The times each loss_t_q<k> series covers (t = 0 clean, 1 pure noise; as the training loop's QUARTILES bins them).
_QUARTILE_SPANS = {"1": "[0, 0.25): nearly clean", "2": "[0.25, 0.5)", "3": "[0.5, 0.75)",
                   "4": "[0.75, 1]: nearly noise"}


def _group_of(name: str) -> str:
    return next((group for prefix, group in CURVE_GROUPS.items() if name.startswith(prefix)), "other")


def _is_flat(values: Sequence[float]) -> bool:
    """One value, or values that do not change (e.g. train/nonfinite_steps at 0, a constant LR): not a curve."""
    return len(values) < 2 or float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.max(np.abs(values))))


def _quartile_note(name: str) -> str:
    """What a loss_t_q<k> series is, for the line under its panel ("" for other series)."""
    quartile = name.rsplit("loss_t_q", 1)[-1] if "loss_t_q" in name else ""
    if quartile not in _QUARTILE_SPANS:
        return ""
    who = "held-out items" if name.startswith("val/") else "training samples"
    return f"loss of the {who} with t in {_QUARTILE_SPANS[quartile]}"


def _sorted_series(series: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = (np.asarray(v) for v in series[name])
    order = np.argsort(steps, kind="stable")
    return steps[order], values[order]


def _loss_rise_note(series: dict) -> str:
    """Why val/loss rises while val/ssim improves, when the curves show it (as on the one-subject demo); else ""."""
    if "val/loss" not in series or "val/ssim" not in series:
        return ""
    (loss_steps, loss), (ssim_steps, ssim) = _sorted_series(series, "val/loss"), _sorted_series(series, "val/ssim")
    lowest_at, best_ssim_at = loss_steps[np.argmin(loss)], ssim_steps[np.argmax(ssim)]
    if loss[-1] <= 1.05 * loss.min() or best_ssim_at <= lowest_at:
        return ""
    rises = {name: _sorted_series(series, name)[1] for name in series if name.startswith("val/loss_t_q")}
    rises = {name: v[-1] / v.min() for name, v in rises.items() if v.min() > 0}
    steepest = max(rises, key=rises.get) if rises else ""
    note = (f"val/loss is lowest at step {lowest_at:g} and rises after it{f' (mostly {steepest})' if steepest else ''}"
            f", while val/ssim keeps improving (best at step {best_ssim_at:g}). ")
    if steepest.endswith("q1"):
        note += ("Near t = 0 the target is mostly the noise, which the model recovers only by recalling the clean "
                 "image: trained on few subjects it recalls its training slices, and misses on held-out ones. "
                 "Samplers take small steps there, so the samples still improve. ")
    else:
        note += "The held-out loss grades single denoising steps at every noise level, SSIM grades finished samples. "
    return note + "Evaluate checkpoints/best-val_ssim; best-val_loss marks where the held-out loss turned."


def curves_figure(metrics_csv: Path, ncols: int = 3) -> Figure:
    """One panel per varying metric of a long-format metrics.csv (step,name,value), value against step, grouped
    into training / validation / timing (wall clock) / other. Series with one value or a constant one are listed
    with their value under the figure instead of drawn; loss_t_q<k> panels say which times they cover; a note under
    the validation panels explains a held-out loss that rises while SSIM improves.

    Losses that are positive and span more than two decades get a log y-axis. An empty file gives a figure
    that says so, so a validation hook can call this before anything is logged.
    """
    series = _read_metrics(Path(metrics_csv))
    if not series:
        figure = _new_figure(4, 2)
        figure.text(0.5, 0.5, f"no metrics recorded yet in {Path(metrics_csv).name}", ha="center", va="center")
        return figure
    drawn = [name for name in sorted(series) if not _is_flat(series[name][1])]
    groups = {group: [n for n in drawn if _group_of(n) == group] for group in [*CURVE_GROUPS.values(), "other"]}
    groups = {group: names for group, names in groups.items() if names}
    ncols = max(1, min(ncols, max((len(names) for names in groups.values()), default=1)))
    flat = [f"{name} = {_sorted_series(series, name)[1][-1]:.4g}" for name in sorted(series) if name not in drawn]
    flat_note = "Not drawn (one value, or constant): " + ", ".join(flat) if flat else ""
    group_notes = {"validation": _loss_rise_note(series)}
    chars = int(4.0 * ncols * 15)  # characters of 8-point text per line across the figure

    def text_inches(text: str) -> float:
        return 0.15 * len(textwrap.wrap(text, chars))

    heights = [2.9 * math.ceil(len(names) / ncols) + 0.4 + text_inches(group_notes.get(group, ""))
               for group, names in groups.items()]
    figure = _new_figure(4.0 * ncols, max(sum(heights) + 0.3 + text_inches(flat_note), 1.5))
    if groups:
        subfigures = figure.subfigures(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
        for subfigure, (group, names) in zip(subfigures, groups.items()):
            _draw_group(subfigure, group, names, series, ncols)
            if group_notes.get(group):
                subfigure.supxlabel(textwrap.fill(group_notes[group], chars), fontsize=8, ha="left", x=0.01)
    if flat_note:
        figure.supxlabel(textwrap.fill(flat_note, chars), fontsize=8, ha="left", x=0.01)
    return figure


def _draw_group(subfigure, group: str, names: list[str], series: dict, ncols: int) -> None:
    """One group's panels in rows of `ncols`, under the group's name."""
    subfigure.suptitle(group, fontsize=12, fontweight="bold", x=0.01, ha="left")
    axes = subfigure.subplots(math.ceil(len(names) / ncols), ncols, squeeze=False)
    for ax in list(axes.flat)[len(names):]:
        ax.remove()  # the grid keeps its shape, so panels line up across groups
    for ax, name in zip(axes.flat, names):
        steps, values = _sorted_series(series, name)
        # Sparse series (validation) get markers so single points are visible.
        ax.plot(steps, values, marker="o" if len(values) <= 50 else None, markersize=3, lw=1.2)
        if "loss" in name and values.min() > 0 and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        note = _quartile_note(name)
        ax.set_xlabel(f"step\n{note}" if note else "step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)


def metric_curves(metrics_csv: Path, path: Path, ncols: int = 3) -> Path:
    """`curves_figure` of a metrics.csv saved as a PNG at `path`."""
    return _save(curves_figure(metrics_csv, ncols), path)


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
