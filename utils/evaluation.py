"""Held-out loss and sampled-item scoring, shared by validation during training and evaluate.py.

Items are addressed by their global index in the dataset: each process handles a contiguous block, every
process runs the same number of batches (the last ones padded with a repeated item whose result is dropped,
which keeps FSDP's collective forward passes in step), and the results are gathered in index order. A number
therefore does not depend on how many processes computed it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from data.arrays import to_device
from diffusion.generate import generate, item_noise, item_uniform
from diffusion.task import Field, Task
from utils import metrics
from utils.classification import classification_scores, uncertainty_auroc
from utils.distributed import gather_objects, shard


def evenly_spaced(num_items: int, count: int) -> list[int]:
    """`count` item indices spread over the whole dataset: the same held-out items at every validation."""
    count = min(count, num_items)
    return sorted({round(i * (num_items - 1) / max(count - 1, 1)) for i in range(count)})


def sharded_batches(dataset, indices: Sequence[int], batch_size: int, rank: int, world_size: int,
                    device) -> Iterator[tuple[list[int], int, dict]]:
    """Yield (global indices, number of real items, collated batch) for this rank's block of `indices`."""
    mine = [indices[i] for i in shard(len(indices), rank, world_size)]
    num_batches = math.ceil(math.ceil(len(indices) / world_size) / batch_size)
    for b in range(num_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        filler = (chunk or mine or list(indices))[-1]
        # A short batch is padded to full size; a rank with nothing left runs one dummy item, which keeps the
        # collective calls matched. Padding results are dropped (only the first `real` count).
        padded = chunk + [filler] * (batch_size - len(chunk)) if chunk else [filler]
        yield padded, len(chunk), to_device(default_collate([dataset[i] for i in padded]), device)


@torch.no_grad()
def heldout_loss(strategy, net, task: Task, dataset, indices: Sequence[int], batch_size: int, seed: int,
                 accelerator) -> dict[str, float]:
    """Mean held-out loss with per-item noise and times, overall and per diffusion-time quartile."""
    rows = []
    for idx, real, batch in sharded_batches(dataset, indices, batch_size, accelerator.process_index,
                                            accelerator.num_processes, accelerator.device):
        x0 = task.targets_of(batch)
        noise = item_noise(x0.shape[1:], idx, seed, x0.device)
        # Each item's time comes from its own seed too, so an item is scored at the same t at every validation.
        t = item_uniform(idx, seed, x0.device)
        with accelerator.autocast():
            elementwise, times = strategy.loss_terms(net, x0, task.condition_of(batch), noise=noise, t=t)
        per_sample, _ = task.reduce(elementwise, batch)
        rows += list(zip(idx[:real], per_sample[:real].float().cpu().tolist(), times[:real].float().cpu().tolist()))
    rows = sorted(r for part in gather_objects(rows) for r in part)
    losses = np.array([r[1] for r in rows])
    quartile = np.minimum((np.array([r[2] for r in rows]) * 4).astype(int), 3)
    out = {"val/loss": float(losses.mean())}
    for q in range(4):
        if (quartile == q).any():
            out[f"val/loss_t_q{q + 1}"] = float(losses[quartile == q].mean())
    return out


def _labels_of(region_mask: str, item: dict, shape) -> Optional[np.ndarray]:
    """The item's region mask labels (1, *spatial), when a mask of the scored size is available."""
    labels = item["condition"].get(region_mask, item["reference"].get(region_mask)) if region_mask else None
    if labels is None or tuple(labels.shape[1:]) != tuple(shape[2:]):
        return None  # e.g. a latent-size mask cannot select pixels of the decoded image
    return labels


def _region_of(region_mask: str, item: dict, shape) -> Optional[torch.Tensor]:
    """The item's region-of-interest mask (1, 1, *spatial) bool, when a mask of the scored size is available."""
    labels = _labels_of(region_mask, item, shape)
    return None if labels is None else torch.from_numpy(labels)[None] > 0


def _slices(x: torch.Tensor) -> torch.Tensor:
    """(1, C, D, H, W) -> (D, C, H, W): a volume's slices along its slice axis as a batch of images."""
    return x[0].movedim(1, 0)


def _per_image(gen: torch.Tensor, ref: torch.Tensor, data_range: float,
               mask: Optional[torch.Tensor]) -> dict[str, np.ndarray]:
    """Each metric per image of a batch (B, C, H, W)."""
    return {"ssim": metrics.ssim(gen, ref, data_range, mask=mask).cpu().numpy(),
            "psnr": metrics.psnr(gen, ref, data_range, mask=mask).cpu().numpy(),
            "mae": metrics.mae(gen, ref, mask=mask).cpu().numpy(), "mse": metrics.mse(gen, ref, mask=mask).cpu().numpy()}


def image_scores(gen: torch.Tensor, ref: torch.Tensor, data_range: float,
                 mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """SSIM, PSNR, MAE and MSE of one generated image (1, C, H, W) or volume (1, C, D, H, W) against its reference.

    A volume is scored as CT and MRI papers do: each metric is the mean over its slices along the slice axis
    (slices where a metric is undefined, such as PSNR of identical empty slices or an empty region, left out),
    plus the volumetric `ssim_3d` and `psnr_3d`.
    """
    if gen.dim() == 4:
        return {name: float(values[0]) for name, values in _per_image(gen, ref, data_range, mask).items()}
    per_slice = _per_image(_slices(gen), _slices(ref), data_range, None if mask is None else _slices(mask))
    scores = {name: _finite_mean(values) for name, values in per_slice.items()}
    if min(gen.shape[2:]) >= metrics.ssim_window():  # a slab thinner than the window has no volumetric SSIM
        scores["ssim_3d"] = float(metrics.ssim(gen, ref, data_range, mask=mask)[0])
    scores["psnr_3d"] = float(metrics.psnr(gen, ref, data_range, mask=mask)[0])
    return scores


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def score_item(fields: Sequence[Field], item: dict, data_range: float, region_mask: str = "",
               hu_per_unit: float = 0.0) -> dict[str, float]:
    """Metrics of one sampled item (see `sample_items`) against its reference, for each scored field.

    Images: SSIM, PSNR, MAE, MSE (`image_scores`: volumes slice-wise, plus ssim_3d and psnr_3d), the same inside/
    outside `region_mask` when one of the scored size is available with the sharpness of the image on that mask's
    label boundaries against the reference's (`boundary_sharpness`, 1 = as sharp), and the same again for the degraded input
    against the reference (`input_ssim`, ...) when the item's condition is an image of the reference's shape: the
    baseline a restoration model must beat; in latent space also for the reference's own latent decoded
    (`autoencoder_ssim`, ...): the ceiling the autoencoder sets. Masks: Dice per label. Several samples per item:
    diversity (mean pairwise MS-SSIM). With several fields the names carry the field (`ssim_t1`) and `ssim` is the mean over the
    image fields. Several samples per item also give `uncertainty_mean` (mean per-pixel std over the samples) and
    `uncertainty_error_correlation` (see `pooled_uncertainty`). Items without a reference (unconditional tasks)
    get diversity and uncertainty_mean only.

    Args:
        hu_per_unit: Hounsfield units per normalised unit (half the CT window); > 0 adds `mae_hu` and `rmse_hu`.
    """
    scores = {}
    uncertainty = uncertainty_maps(item, fields)
    for f in fields:
        suffix = "" if len(fields) == 1 else f"_{f.name}"
        gen = torch.from_numpy(item["generated"][0][f.name])[None]  # (1, C, *spatial)
        ref = item["reference"].get(f.name)
        if ref is not None and f.is_mask:
            dice = metrics.dice_per_label(gen, torch.from_numpy(ref)[None], f.channels)[0]
            scores.update({f"dice{suffix}_{label}": v for label, v in enumerate(dice.tolist(), start=1)})
        elif ref is not None:
            ref = torch.from_numpy(ref)[None].float()
            labels = _labels_of(region_mask, item, ref.shape)
            region = _region_of(region_mask, item, ref.shape)
            regions = {"": None}
            if region is not None:
                regions.update({f"_in_{region_mask}": region, f"_out_{region_mask}": ~region})
            degraded = next((torch.from_numpy(c)[None].float() for c in item["condition"].values()
                             if np.issubdtype(c.dtype, np.floating) and c.shape == ref.shape[1:]), None)
            autoencoded = item.get("autoencoded", {}).get(f.name)
            autoencoded = None if autoencoded is None else torch.from_numpy(autoencoded)[None].float()
            for prefix, candidate in (("", gen.float()), ("input_", degraded), ("autoencoder_", autoencoded)):
                if candidate is None:
                    continue
                for name, mask in regions.items():
                    for metric, value in image_scores(candidate, ref, data_range, mask).items():
                        scores[f"{prefix}{metric}{suffix}{name}"] = value
                if labels is not None:  # edge sharpness where the mask's labels change, against the reference's
                    scores[f"{prefix}boundary_sharpness{suffix}"] = metrics.boundary_sharpness(
                        candidate[0].numpy(), ref[0].numpy(), labels)
                if hu_per_unit > 0:
                    per_slice = (candidate - ref).abs() if candidate.dim() == 4 else _slices(candidate - ref).abs()
                    scores[f"{prefix}mae_hu{suffix}"] = float(per_slice.double().mean()) * hu_per_unit
                    rmse = per_slice.double().pow(2).flatten(1).mean(1).sqrt().mean()
                    scores[f"{prefix}rmse_hu{suffix}"] = float(rmse) * hu_per_unit
        if f.name in uncertainty:
            scores[f"uncertainty_mean{suffix}"] = float(uncertainty[f.name].mean())
            if ref is not None:
                scores[f"uncertainty_error_correlation{suffix}"] = pearson_correlation(
                    uncertainty[f.name], mean_sample_error(item, f.name))
        if len(item["generated"]) > 1 and not f.is_mask:
            samples = torch.stack([torch.from_numpy(g[f.name]).float() for g in item["generated"]])
            # Volumes (S, C, D, H, W): the mean over slices of the diversity of each slice.
            per_slice = [samples] if samples.dim() == 4 else samples.unbind(2)
            scores[f"diversity_msssim{suffix}"] = float(np.mean(
                [float(metrics.pairwise_ms_ssim(s, data_range)) for s in per_slice]))
    per_image = [scores[f"ssim_{f.name}"] for f in fields if f"ssim_{f.name}" in scores]
    if per_image:  # several scored fields: one SSIM over the images too, which selects best-val_ssim
        scores["ssim"] = float(np.mean(per_image))
    return scores


def uncertainty_maps(item: dict, fields: Sequence[Field]) -> dict[str, np.ndarray]:
    """Per-pixel (per-voxel) standard deviation over an item's samples, {name: (C, *spatial) float32}, for each
    image field; empty with a single sample (no spread to measure)."""
    if len(item["generated"]) < 2:
        return {}
    # float64, so identical samples give exactly 0 (a float32 mean of 3 equal values need not round back).
    return {f.name: np.stack([g[f.name] for g in item["generated"]]).astype(np.float64).std(0).astype(np.float32)
            for f in fields if not f.is_mask}


def mean_sample_error(item: dict, name: str) -> np.ndarray:
    """|mean over samples - reference| per pixel (C, *spatial): the error of the estimate the std is the spread of."""
    mean = np.stack([g[name] for g in item["generated"]]).astype(np.float64).mean(0)
    return np.abs(mean - item["reference"][name])


def pearson_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two arrays' values (flattened, float64); NaN when either is constant or empty."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"pearson_correlation needs arrays of one size, got {x.size} and {y.size} values")
    if x.size == 0:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def pooled_uncertainty(items: list[dict], fields: Sequence[Field]) -> dict[str, dict]:
    """Pearson correlation of the per-pixel std over samples with the per-pixel |error| of the sample mean, and the
    mean std, pooled over all pixels of all items with a reference, per image field (names as in `score_item`).

    Every process holds all items (`sample_items` gathers them), so the pooled numbers do not depend on the
    number of processes. Empty with one sample per item. An undefined correlation (all stds 0) is None.
    """
    pooled = {}
    image_fields = [f for f in fields if not f.is_mask]
    for f in image_fields:
        suffix = "" if len(fields) == 1 else f"_{f.name}"
        maps = [(uncertainty_maps(it, [f]).get(f.name), it) for it in items]
        maps = [(std, it) for std, it in maps if std is not None]
        if not maps:
            continue
        pooled[f"uncertainty_mean{suffix}"] = {
            "pooled": float(np.concatenate([std.ravel() for std, _ in maps]).astype(np.float64).mean())}
        paired = [(std, it) for std, it in maps if f.name in it["reference"]]
        if paired:
            # Holds two arrays per item beside the S samples per item already held: no new order of memory.
            r = pearson_correlation(np.concatenate([std.ravel() for std, _ in paired]),
                                    np.concatenate([mean_sample_error(it, f.name).ravel() for _, it in paired]))
            pooled[f"uncertainty_error_correlation{suffix}"] = {
                "pooled": r if np.isfinite(r) else None, "pixels": int(sum(std.size for std, _ in paired)),
                "error_of": "mean of the samples"}
    return pooled


def summarise(scores: list[dict[str, float]]) -> dict[str, dict]:
    """Mean, standard deviation and count of each metric over items, non-finite values left out (and counted
    out of n: an item with an empty region has no in-region score)."""
    summary = {}
    for name in sorted({k for s in scores for k in s}):
        values = np.array([s.get(name, np.nan) for s in scores], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[name] = {"mean": float(finite.mean()) if finite.size else None,
                         "std": float(finite.std()) if finite.size else None, "n": int(finite.size)}
    return summary


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric that has a finite value (for validation logs)."""
    return {k: v["mean"] for k, v in summarise(scores).items() if v["mean"] is not None}


def shown_condition(item: dict, shown: str) -> Optional[np.ndarray]:
    """The condition a figure draws beside the generated `shown` image: the first one on its grid (a decoded
    latent condition rather than the latent), else the first one."""
    conditions = list(item["condition"].values())
    grid = item["generated"][0][shown].shape[1:]
    return next((c for c in conditions if c.shape[1:] == grid), conditions[0] if conditions else None)


class SeedItems(torch.utils.data.Dataset):
    """Items of an unconditional task: nothing but an id; the item index seeds the sample."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {"item_id": f"sample-{index:05d}"}


@torch.no_grad()
def sample_items(strategy, net, task: Task, dataset, indices: Sequence[int], batch_size: int, seed: int, steps: int,
                 guidance_scale: float, accelerator, samples_per_item: int = 1, progress=None,
                 scored: Optional[Sequence[Field]] = None, to_pixels: Optional[Callable] = None) -> list[dict]:
    """Generate every item in `indices` once per sample (sample s of item i uses noise seeded by seed + s, i).

    Args:
        scored: the fields scored later (default: the task's targets); their references are kept.
        to_pixels: maps the decoded targets to the scored fields (latent -> pixel space).

    Returns, on every process, one dict per item in index order: index, item_id, generated (list over samples
    of {name: array (C, H, W)}, masks as labels), reference and condition ({name: array (C, H, W)}), and
    autoencoded ({name: array}: the reference's latent decoded, in latent space; else empty).
    """
    scored = list(scored or task.targets)
    results = []
    for idx, real, batch in sharded_batches(dataset, indices, batch_size, accelerator.process_index,
                                            accelerator.num_processes, accelerator.device):
        samples = []
        for s in range(samples_per_item):
            with accelerator.autocast():
                x0 = generate(strategy, net, task, batch, idx, seed + s, steps, accelerator.device, guidance_scale)
            decoded = task.decode(x0.float())  # images float32, masks integer labels
            if to_pixels is not None:
                decoded.update(to_pixels(decoded))
            # Scored inside the data range [-1, 1], as decoded latents are: overshoot is no intensity.
            decoded.update({f.name: decoded[f.name].clamp(-1, 1) for f in scored if not f.is_mask})
            samples.append({k: v.cpu().numpy() for k, v in decoded.items()})
        conditions = {f.name: batch[f.name] for f in task.conditions}
        autoencoded = {}
        if to_pixels is not None:  # a latent condition decoded too: the decoded degraded input is the baseline
            conditions.update(to_pixels(conditions))
            # The reference's own latent decoded: the autoencoder's ceiling on what any latent model can reach.
            autoencoded = {k: v.clamp(-1, 1) for k, v in to_pixels({f.name: batch[f.name].float()
                                                                    for f in task.targets}).items()}
        for j in range(real):
            results.append({
                "index": idx[j],
                "item_id": batch["item_id"][j],
                "generated": [{k: v[j] for k, v in sample.items()} for sample in samples],
                "reference": {f.name: batch[f.name][j].cpu().numpy() for f in scored if f.name in batch},
                "condition": {name: value[j].cpu().numpy() for name, value in conditions.items()},
                "autoencoded": {name: value[j].cpu().numpy() for name, value in autoencoded.items()},
            })
        if progress is not None:
            progress.update(min(real * accelerator.num_processes, progress.total - progress.n))
    return sorted((r for part in gather_objects(results) for r in part), key=lambda r: r["index"])


@torch.no_grad()
def classify_items(strategy, net, task, dataset, indices: Sequence[int], batch_size: int, seed: int, steps: int,
                   accelerator, samples_per_item: int = 1, progress=None) -> list[dict]:
    """The auxiliary classifier's and, with `steps` > 0, the label diffusion's class probabilities of every item in
    `indices` (sample s of item i starts from noise seeded by seed + s, i), on every process in index order.

    Returns one dict per item: index, item_id, label, global and local (the auxiliary heads' probabilities, (K,)),
    auxiliary (their mean, the auxiliary classifier's prediction) and, with steps > 0, samples (S, K).
    """
    results = []
    for idx, real, batch in sharded_batches(dataset, indices, batch_size, accelerator.process_index,
                                            accelerator.num_processes, accelerator.device):
        global_probs, local_probs = task.auxiliary_probabilities(batch["image"])
        samples = []
        for s in range(samples_per_item if steps > 0 else 0):
            with accelerator.autocast():
                x0 = generate(strategy, net, task, batch, idx, seed + s, steps, accelerator.device)
            samples.append(task.probabilities(x0, batch).cpu().numpy())
        for j in range(real):
            item = {"index": idx[j], "item_id": batch["item_id"][j], "label": int(batch["label"][j]),
                    "global": global_probs[j].cpu().numpy(), "local": local_probs[j].cpu().numpy()}
            item["auxiliary"] = (item["global"] + item["local"]) / 2
            if samples:
                item["samples"] = np.stack([sample[j] for sample in samples])
            results.append(item)
        if progress is not None:
            progress.update(min(real * accelerator.num_processes, progress.total - progress.n))
    return sorted((r for part in gather_objects(results) for r in part), key=lambda r: r["index"])


def item_prediction(item: dict) -> tuple[np.ndarray, float]:
    """An item's label-diffusion probabilities (the mean over its samples) and uncertainty: the spread of its
    samples, the standard deviation over samples of each class probability averaged over classes (0 for one)."""
    samples = item["samples"].astype(np.float64)
    return samples.mean(axis=0), float(samples.std(axis=0).mean())


def classification_summary(items: list[dict], num_classes: int) -> dict[str, float]:
    """Scores of the auxiliary classifier (`aux_` names) and, when the items were sampled, of the label
    diffusion, plus how well its uncertainty flags its errors (`uncertainty_error_auroc`)."""
    labels = np.array([it["label"] for it in items])
    summary = {f"aux_{k}": v for k, v in classification_scores(
        labels, np.stack([it["auxiliary"] for it in items]), num_classes).items()}
    if "samples" in items[0]:
        probabilities, uncertainty = zip(*map(item_prediction, items))
        probabilities = np.stack(probabilities)
        summary.update(classification_scores(labels, probabilities, num_classes))
        summary["uncertainty_mean"] = float(np.mean(uncertainty))
        summary["uncertainty_error_auroc"] = uncertainty_auroc(np.array(uncertainty),
                                                               probabilities.argmax(1) == labels)
    return summary
