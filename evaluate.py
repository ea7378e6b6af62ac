"""Sample a trained model on all processes and compute metrics you can publish, plus figures.

    accelerate launch evaluate.py --run runs/demo [eval.weights=best-val_ssim eval.num_items=64 ...]

Every item has a fixed global index and its own seed, so the numbers do not depend on batch size or on the
number of processes. Writes report.json, per_item.csv, samples/<item>.npz and PNG figures (with eval.save_nifti also
nifti/<subject>/*.nii.gz) to <run>/eval/<weights>-<sampler><steps>/, e.g. eval/final-ddim50/.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm

from data.sources import load_data, pixel_references
from data.volumes import display_spacing
from diffusion import build_strategy
from diffusion.generate import generate
from diffusion.task import Field, Task, build_task
from models import build_network
from models.unet2d import load_denoiser
from utils import config as config_lib
from utils import metrics
from utils.checkpoint import atomic_write_text
from utils.config import ConfigError
from utils.distributed import check_launch
from utils.eval_folder import evaluation_folder, start_folder
from utils.classification import confusion_figure, confusion_matrix
from utils.export import exported_step
from utils.evaluation import (SeedItems, classification_summary, classify_items, evenly_spaced, item_prediction,
                              pooled_uncertainty, sample_items, score_item, shown_condition, summarise,
                              uncertainty_maps)
from utils.logging import setup_logging
from utils.model_card import with_evaluation
from utils.nifti_export import nifti_grids, write_nifti
from utils.visualization import (comparison_grid, dataset_label_names, denoising_strip, figure_array, metric_curves,
                                 metric_note, overlay_contours, uncertainty_grid, volume_figure)

MAX_VOLUME_FIGURES = 4  # held-out volumes drawn as montage, orthogonal views and MIPs


def load_weights(run_dir: Path, weights: str, cfg, task: Task) -> torch.nn.Module:
    """final/, checkpoints/best-<metric>/ (exports) or a checkpoint folder (EMA weights if saved)."""
    if weights == "final" or weights.startswith("best-"):
        folder = run_dir / "final" if weights == "final" else run_dir / "checkpoints" / weights
        if task.kind == "classification":
            from models.classifier import CLASSIFIER_CONFIG, LabelDiffusionClassifier
            marker, load = folder / CLASSIFIER_CONFIG, LabelDiffusionClassifier.load_export
        else:
            marker, load = folder / "unet" / "config.json", load_denoiser
        if not marker.is_file():
            raise ConfigError(f"eval.weights={weights}: {marker} does not exist in run {run_dir} "
                              "(train to the end, or name a checkpoint folder)")
        return load(folder)
    folder = Path(weights)
    found = next((f for f in (folder / "ema.safetensors", folder / "model.safetensors") if f.is_file()), None)
    if found is None:
        raise ConfigError(f"eval.weights={weights}: neither 'final', 'best-<metric>' nor a checkpoint folder "
                          "holding ema.safetensors or model.safetensors")
    net = build_network(cfg, task)
    net.load_state_dict(load_file(found))
    return net


def write_outputs(out: Path, items: list[dict], scores: list[dict], report: dict, scored: list[Field]) -> None:
    """per_item.csv, report.json and one .npz per item, in the normalised (pixel) space."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    names = sorted({k for s in scores for k in s})
    with (out / "per_item.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", *names])
        for item, score in zip(items, scores):
            writer.writerow([item["item_id"], *[f"{score.get(n, float('nan')):.8g}" for n in names]])
    for item in items:
        # generated (S, C, H, W) and reference (C, H, W) of the first scored field, plus every field by name;
        # with several samples also std_<field> (C, H, W), the per-pixel std over the samples.
        arrays = {"data_range": np.float64(report["data_range"])}
        arrays.update({f"std_{name}": std for name, std in uncertainty_maps(item, scored).items()})
        for k, f in enumerate(scored):
            generated = np.stack([g[f.name] for g in item["generated"]])
            arrays[f"generated_{f.name}"] = generated
            if k == 0:
                arrays["generated"] = generated
            if f.name in item["reference"]:
                arrays[f"reference_{f.name}"] = item["reference"][f.name]
                if k == 0:
                    arrays["reference"] = item["reference"][f.name]
        for k, (name, value) in enumerate(item["condition"].items()):
            arrays[f"condition_{name}"] = value
            if k == 0:
                arrays["condition"] = value
        np.savez_compressed(out / "samples" / f"{item['item_id'].replace('/', '__')}.npz", **arrays)
    (out / "report.json").write_text(json.dumps(report, indent=2))


def figures(out: Path, run_dir: Path, items: list[dict], count: int, strip: dict, shown: Field,
            paired: bool, spacing=(1.0, 1.0, 1.0), hu_per_unit: float = 0.0, scores: list[dict] | None = None,
            settings: dict | None = None, label_names: dict[int, str] | None = None) -> None:
    """comparison.png (condition | generated | reference | error, contours; each row's metrics, a legend of the
    mask labels, the weights, step and sampler in the title), denoising.png, training curves; with several samples
    per item uncertainty.png (std over samples | |sample 1 - reference|); for volumes also
    volumes/<item>-montage.png, -orthogonal.png and -mip.png.

    Args:
        paired: whether the reference is the generated item's own ground truth (a spatial condition); a vector
            condition only shares the class make-up with its held-out tile, so no error map is drawn then.
        spacing: voxel size (D, H, W) in mm of volumes, for their aspect ratio.
        hu_per_unit: Hounsfield units per normalised unit (> 0: error maps and uncertainty.png are drawn in HU).
        scores: each item's metrics (score_item), written beside its row.
        settings: report.json's settings (weights, split, sampler, sampling_steps), for the title.
        label_names: mask label value -> class name, for the legend ("label <k>" where missing).
    """
    scale, unit = (hu_per_unit, "HU") if hu_per_unit > 0 else (1.0, "normalised units")
    title = ""
    if settings:
        step = exported_step(run_dir, settings["weights"])
        title = (f"{run_dir.name}, {settings['split']} split: {settings['weights']} weights"
                 f"{f' (step {step})' if step is not None else ''}, {settings['sampler']} sampler, "
                 f"{settings['sampling_steps']} steps")
    rows, titles = [], []
    for item in items[:count]:
        row = {"generated": figure_array(item["generated"][0][shown.name])}
        reference = item["reference"].get(shown.name)
        if item["condition"]:
            cond = figure_array(shown_condition(item, shown.name))
            row["condition"] = cond
            if reference is not None and reference.shape[0] == 1 and np.issubdtype(cond.dtype, np.integer) \
                    and cond.shape == figure_array(reference).shape:
                row["reference + mask contours"] = overlay_contours(figure_array(reference), cond)
        if reference is not None:
            row["reference" if paired else "held-out tile, same condition"] = figure_array(reference)
        rows.append(row)
        titles.append(item["item_id"])
    notes = [metric_note(s, shown.name) for s in scores[:count]] if scores else None
    comparison_grid(rows, out / "comparison.png", titles=titles, notes=notes, title=title, label_names=label_names,
                    error_unit=unit, error_scale=scale)
    if uncertainty_maps(items[0], [shown]):  # several samples per item (none for a mask field)
        rows = []
        for item in items[:count]:
            row = {f"std over {len(item['generated'])} samples": uncertainty_maps(item, [shown])[shown.name]}
            if paired and shown.name in item["reference"]:
                row["|sample 1 - reference|"] = np.abs(item["generated"][0][shown.name] - item["reference"][shown.name])
            rows.append({k: figure_array(v) * scale for k, v in row.items()})
        uncertainty_grid(rows, out / "uncertainty.png", unit, titles=titles)
    else:  # one sample: no spread, and no figure left over from an earlier evaluation with several
        (out / "uncertainty.png").unlink(missing_ok=True)
    for item in items[:min(count, MAX_VOLUME_FIGURES)]:
        generated = item["generated"][0][shown.name]
        if generated.ndim != 4:  # (C, D, H, W) volumes only
            break
        volumes = {"condition": shown_condition(item, shown.name), "generated": generated,
                   "reference": item["reference"].get(shown.name)}
        volumes = {k: v[0] for k, v in volumes.items() if v is not None and v.shape[1:] == generated.shape[1:]}
        name = item["item_id"].replace("/", "__")
        for view in ("montage", "orthogonal", "mip"):
            volume_figure(volumes, out / "volumes" / f"{name}-{view}.png", view, title=item["item_id"],
                          spacing=spacing)
    denoising_strip(strip["x0"], strip["t"], out / "denoising.png", item_id=strip["item_id"])
    if (run_dir / "metrics.csv").is_file():
        metric_curves(run_dir / "metrics.csv", out / "training_curves.png")


def main(argv=None):
    # Configuration: the run's own config.yaml plus overrides.
    args, cfg = config_lib.parse_args(argv, __doc__, run_flag=True)
    if args.run is None:
        raise ConfigError("evaluate.py needs --run <output_dir> (a training run directory)")
    run_dir, ev = args.run, cfg.eval
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision)
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    if not (run_dir / "split.json").is_file():
        raise ConfigError(f"run directory {run_dir} has no split.json; it is written when training starts")
    # The sampler names the output folder, which is refused before anything is loaded when it holds a report.
    strategy = build_strategy(cfg.diffusion)
    out = evaluation_folder(run_dir, ev, strategy.sampler)

    # Data, task, weights.
    cfg.data.demo = ""  # evaluation reads the data the run trained on; it never builds a dataset
    bundle = load_data(cfg, run_dir, is_main_process=False, device=accelerator.device)
    if ev.split not in bundle.datasets:
        raise ConfigError(f"eval.split={ev.split}: the run has no such split (data.test_fraction is 0, or class "
                          "folders without <data.root>/test/)")
    task = build_task(cfg, bundle)
    net = load_weights(run_dir, ev.weights, cfg, task).to(accelerator.device).eval()
    reference_set = bundle.datasets[ev.split]
    # Refused now rather than after sampling: NIfTI outputs of items that have no place in a scan.
    grids = nifti_grids(cfg, task, reference_set) if ev.save_nifti else None
    if task.kind == "classification":
        task.auxiliary = net.auxiliary
        return evaluate_classifier(cfg, run_dir, out, task, strategy, net, reference_set, accelerator, logger)
    scored = pixel_references(bundle, task)
    data_range = ev.data_range or reference_set.data_range
    if ev.data_range:
        image = next(f.name for f in scored if not f.is_mask)
        sample = torch.stack([reference_set[i][image] for i in range(min(len(reference_set), 16))])
        metrics.check_data_range(ev.data_range, sample, name="eval.data_range")
    hu_per_unit = 0.0
    if ev.hu_metrics:
        window = reference_set.normalization.get("window_hu")
        if window is None:
            raise ConfigError("eval.hu_metrics=true needs CT data normalised with a HU window (data.normalization: ct); "
                              f"this run's images were normalised by {reference_set.normalization.get('method')}")
        hu_per_unit = (window[1] - window[0]) / data_range  # the window spans the data range
    features = metrics.FeatureExtractor(ev.feature_network, accelerator.device, ev.feature_channels or None) \
        if ev.feature_network else None

    # Items: held-out items (for their conditions), eval.num_items of them evenly spaced over the whole set (the
    # leading ones would be one or two subjects); or eval.num_items seeds (unconditional).
    if task.is_conditional or task.vector:
        items_set = reference_set
        count = min(ev.num_items, len(items_set)) if ev.num_items > 0 else len(items_set)
        indices = evenly_spaced(len(items_set), count)
    else:
        count = ev.num_items or 16
        items_set = SeedItems(count)
        indices = list(range(count))
    logger.info("evaluating %s (%s) on %d %s items, %d sample(s) each, %d steps, %d process(es)",
                run_dir, ev.weights, count, ev.split if task.is_conditional or task.vector else "unconditional",
                ev.samples_per_item, ev.sampling_steps, accelerator.num_processes)

    # Sample and score.
    progress = tqdm(total=count, desc="eval", disable=not accelerator.is_main_process, dynamic_ncols=True)
    items = sample_items(strategy, net, task, items_set, indices, ev.batch_size, ev.seed, ev.sampling_steps,
                         cfg.diffusion.guidance_scale, accelerator, ev.samples_per_item, progress,
                         scored=scored, to_pixels=bundle.to_pixels)
    progress.close()
    # Per-item comparisons need a reference that the conditions pin down (a spatial condition).
    paired = items if task.is_conditional else [{**item, "reference": {}} for item in items]
    scores = [score_item(scored, item, data_range, task.region_mask, hu_per_unit) for item in paired]
    fid_scores = {}
    if features is not None:
        fid_scores = distribution_scores(features, items, scored, reference_set, accelerator)

    # Write (one writer).
    if accelerator.is_main_process:
        start_folder(out)
        # Uncertainty entries get their pooled (all-pixel) value beside the per-item mean.
        pooled = pooled_uncertainty(paired, scored)
        summary = {k: {**v, **pooled.get(k, {})} for k, v in summarise(scores).items()}
        report = {"metrics": {**summary, **fid_scores}, "data_range": data_range,
                  "settings": {"weights": ev.weights, "split": ev.split, "num_items": count,
                               "samples_per_item": ev.samples_per_item, "sampling_steps": ev.sampling_steps,
                               "strategy": cfg.diffusion.strategy, "sampler": strategy.sampler,
                               "guidance_scale": cfg.diffusion.guidance_scale,
                               "seed": ev.seed, "num_processes": accelerator.num_processes,
                               "normalization": reference_set.normalization}}
        write_outputs(out, items, scores, report, scored)
        if grids is not None:
            written = write_nifti(out / "nifti", items, scored, grids, cfg.data, reference_set.normalization)
            logger.info("wrote %d NIfTI volumes to %s", len(written), out / "nifti")
        card = run_dir / "final" / "README.md"
        if ev.weights == "final" and card.is_file():  # the shared export says how it evaluated
            note = f", files in `{out.relative_to(run_dir)}/`"
            atomic_write_text(card, with_evaluation(card.read_text(), report, note))
        strip = denoising_trajectory(strategy, net, task, items_set, ev, accelerator.device, bundle.to_pixels,
                                     scored[0].name)
        figures(out, run_dir, items, ev.num_figures, strip, scored[0], paired=task.is_conditional,
                spacing=display_spacing(cfg.data), hu_per_unit=hu_per_unit, scores=scores,
                settings=report["settings"], label_names=dataset_label_names(reference_set))
        logger.info("%s", ", ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None))
        logger.info("wrote %s", out)
    accelerator.wait_for_everyone()


def evaluate_classifier(cfg, run_dir: Path, out: Path, task, strategy, net, reference_set, accelerator,
                        logger) -> None:
    """Label diffusion and auxiliary classifier on the evaluated split, written to `out`: report.json (both
    classifiers' scores, and how well the spread of eval.samples_per_item samples flags errors), per_item.csv
    (labels, predictions, probabilities, uncertainty), confusion.png and confusion_auxiliary.png."""
    ev = cfg.eval
    count = min(ev.num_items, len(reference_set)) if ev.num_items > 0 else len(reference_set)
    indices = evenly_spaced(len(reference_set), count)
    logger.info("evaluating %s (%s) on %d %s images, %d sample(s) each, %d steps, %d process(es)", run_dir,
                ev.weights, count, ev.split, ev.samples_per_item, ev.sampling_steps, accelerator.num_processes)
    progress = tqdm(total=count, desc="eval", disable=not accelerator.is_main_process, dynamic_ncols=True)
    items = classify_items(strategy, net, task, reference_set, indices, ev.batch_size, ev.seed, ev.sampling_steps,
                           accelerator, ev.samples_per_item, progress)
    progress.close()
    if accelerator.is_main_process:
        start_folder(out)
        summary = classification_summary(items, task.num_classes)
        report = {"metrics": {name: {"value": value, "n": len(items)} for name, value in summary.items()},
                  "classes": task.class_names,
                  "settings": {"weights": ev.weights, "split": ev.split, "num_items": count,
                               "samples_per_item": ev.samples_per_item, "sampling_steps": ev.sampling_steps,
                               "strategy": cfg.diffusion.strategy, "sampler": strategy.sampler, "seed": ev.seed,
                               "num_processes": accelerator.num_processes,
                               "normalization": reference_set.normalization}}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        write_classification_items(out / "per_item.csv", items, task.class_names)
        labels = [it["label"] for it in items]
        for name, probabilities in (("confusion", [item_prediction(it)[0] for it in items]),
                                    ("confusion_auxiliary", [it["auxiliary"] for it in items])):
            who = "label diffusion" if name == "confusion" else "auxiliary classifier"
            key = "f1" if name == "confusion" else "aux_f1"
            confusion_figure(confusion_matrix(labels, np.argmax(probabilities, axis=1), task.num_classes),
                             task.class_names, out / f"{name}.png",
                             f"{who}, {ev.split} ({ev.weights}): macro F1 {summary[key]:.3f}")
        if (run_dir / "metrics.csv").is_file():
            metric_curves(run_dir / "metrics.csv", out / "training_curves.png")
        card = run_dir / "final" / "README.md"
        if ev.weights == "final" and card.is_file():
            note = f", files in `{out.relative_to(run_dir)}/`"
            atomic_write_text(card, with_evaluation(card.read_text(), report, note))
        logger.info("label diffusion: %s; auxiliary: %s",
                    ", ".join(f"{k} {summary[k]:.4f}" for k in ("accuracy", "f1", "auc_ovr", "kappa")),
                    ", ".join(f"{k} {summary['aux_' + k]:.4f}" for k in ("accuracy", "f1", "auc_ovr", "kappa")))
        logger.info("wrote %s", out)
    accelerator.wait_for_everyone()


def write_classification_items(path: Path, items: list[dict], class_names: list[str]) -> None:
    """One row per image: its label, the label diffusion's prediction, probabilities and uncertainty, and the
    auxiliary classifier's prediction and probabilities (its global and local heads averaged)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "label", "prediction", *[f"p_{c}" for c in class_names], "uncertainty",
                         "aux_prediction", *[f"aux_p_{c}" for c in class_names]])
        for item in items:
            probabilities, uncertainty = item_prediction(item)
            writer.writerow([item["item_id"], item["label"], int(probabilities.argmax()),
                             *[f"{p:.8g}" for p in probabilities], f"{uncertainty:.8g}",
                             int(item["auxiliary"].argmax()), *[f"{p:.8g}" for p in item["auxiliary"]]])


def distribution_scores(features, items: list[dict], scored: list[Field], reference_set, accelerator) -> dict:
    """FID and KID between all generated samples and the held-out images, on the first scored image.

    Every process extracts the features of its own share of both sets; all processes get all features.
    """
    image = next((f.name for f in scored if not f.is_mask), None)
    if image is None:
        return {}
    generated = [g[image] for it in items for g in it["generated"]]
    rank, world_size = accelerator.process_index, accelerator.num_processes
    f_gen = metrics.sharded_features(features, lambda i: torch.from_numpy(generated[i]), len(generated), rank,
                                     world_size)
    f_ref = metrics.sharded_features(features, lambda i: reference_set[i][image].float(), len(reference_set), rank,
                                     world_size)
    kid_mean, kid_std = metrics.kid(f_gen, f_ref, subset_size=min(len(f_gen), len(f_ref), 1000))
    return {"fid": {"value": metrics.fid_from_features(f_gen, f_ref), "n": len(f_gen), "n_reference": len(f_ref)},
            "kid": {"mean": kid_mean, "std": kid_std, "n": len(f_gen)}}


@torch.no_grad()
def denoising_trajectory(strategy, net, task: Task, items_set, ev, device, to_pixels, shown: str) -> dict:
    """Predicted x0 along the sampling path of item 0, in pixel space, at every step (the denoising strip figure
    picks log-spaced ones), with the times and the item's id."""
    item = items_set[0]
    batch = {k: (v[None].to(device) if torch.is_tensor(v) else [v]) for k, v in item.items()}
    strip = {"x0": [], "t": [], "item_id": item["item_id"]}

    def record(i, t, x_t, x0_pred):
        decoded = task.decode(x0_pred.float())
        if to_pixels is not None:
            decoded.update(to_pixels(decoded))
        strip["x0"].append(figure_array(decoded[shown][0].cpu().numpy()))
        strip["t"].append(float(t))

    generate(strategy, net, task, batch, [0], ev.seed, ev.sampling_steps, device, callback=record)
    return strip


if __name__ == "__main__":
    config_lib.run_main(main)
