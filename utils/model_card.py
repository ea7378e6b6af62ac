"""`final/README.md`: a Hugging Face model card for an exported model, so the folder can be shared as it is.

The YAML header says what the model is (library, tags, task); the body what it was trained on and how (data, the
settings that matter, the command), how well it did on held-out data (the last validation metrics), how to load it,
and its limits. evaluate.py adds its report as an "Evaluation" section.
"""
from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional

import yaml

EVALUATION_HEADING = "## Evaluation"
# data.demo -> what its images were made from.
DEMO_SOURCES = {"mni152": "nilearn's MNI152 template (synthetic, one subject)",
                "mni152_ct": "nilearn's MNI152 template as pseudo-CT (synthetic, one subject)",
                "ihc": "scikit-image's immunohistochemistry image (one slide)",
                "ihc_classes": "tiles of scikit-image's immunohistochemistry image (one slide)"}


def training_command(script: str, argv: Optional[list[str]]) -> str:
    """The script's command line as a user would retype it (the launcher's own arguments are not visible here).

    Args:
        argv: the arguments main() was given; None = the process's own (sys.argv[1:]).
    """
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def last_validation(run_dir: Path) -> dict[str, tuple[int, float]]:
    """The newest value (and its step) of every `val/` metric in the run's metrics.csv."""
    path = run_dir / "metrics.csv"
    latest: dict[str, tuple[int, float]] = {}
    if path.is_file():
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["name"].startswith("val/") and "_in_" not in row["name"] and "_out_" not in row["name"]:
                    latest[row["name"]] = (int(row["step"]), float(row["value"]))
    return latest


def _split_summary(run_dir: Path) -> str:
    path = run_dir / "split.json"
    if not path.is_file():
        return ""
    split = json.loads(path.read_text())
    counts = {name: len(items) for name, items in split.items() if isinstance(items, list)}
    text = ", ".join(f"{count} {name}" for name, count in counts.items())
    return f"{text} ({split['unit']}s)" if "unit" in split else text


def _what(cfg, kind: str) -> tuple[str, list[str], str]:
    """(one sentence, tags, pipeline tag) for a diffusion model or an autoencoder."""
    dims = f"{cfg.data.dims}d" if cfg.data.kind == "nifti" else "2d"
    modality = "ct" if cfg.data.normalization == "ct" else ("pathology" if cfg.data.kind == "tiles" else "mri")
    if cfg.task.kind == "classification":
        sentence = ("A label-diffusion image classifier (DiffMIC-v2 style): a frozen auxiliary classifier's priors "
                    "refined by DDPM on label maps.")
        return sentence, ["medical-imaging", "2d", "image-classification", "label-diffusion"], "image-classification"
    if kind == "autoencoder":
        sentence = (f"A {cfg.vae.kind.upper()} autoencoder of {', '.join(cfg.vae.inputs)} "
                    f"({'volumes' if cfg.data.dims == 3 else 'images'}) for latent diffusion.")
        return sentence, ["medical-imaging", modality, dims, "autoencoder", cfg.vae.kind], "image-to-image"
    targets, conditions = ", ".join(cfg.task.targets), list(cfg.task.spatial_conditions)
    if cfg.task.vector_condition:
        conditions.append(f"the class vector {cfg.task.vector_condition}")
    sentence = f"A {cfg.diffusion.strategy} diffusion model that generates {targets}" + (
        f" given {', '.join(conditions)}." if conditions else ", unconditionally.")
    tags = ["medical-imaging", modality, dims, cfg.diffusion.strategy]
    if cfg.data.kind == "latent_cache":
        tags.append("latent-diffusion")
    pipeline_tag = "image-to-image" if conditions else "unconditional-image-generation"
    return sentence, tags, pipeline_tag


def model_card(cfg, run_dir: Path, argv: Optional[list[str]], kind: str = "diffusion") -> str:
    """The card's text for the run in `run_dir` (config `cfg`, script arguments `argv`), a diffusion model or an
    autoencoder."""
    sentence, tags, pipeline_tag = _what(cfg, kind)
    classifier = cfg.task.kind == "classification"
    # A classifier's export is two PyTorch networks in safetensors, not a diffusers model.
    header = yaml.safe_dump({"library_name": "pytorch" if classifier else "diffusers", "tags": tags,
                             "pipeline_tag": pipeline_tag}, sort_keys=False)
    data = cfg.data
    source = f"the `{data.demo}` demo dataset built from {DEMO_SOURCES.get(data.demo, 'package-shipped data')}" \
        if data.demo else f"`{data.root}`"
    data_lines = [f"- Source: {source}; kind `{data.kind}`" + (f" (from `{cfg.latent.source_kind}`)"
                                                               if data.kind == "latent_cache" else ""),
                  (f"- Class folders, {data.color} images" if classifier else
                   f"- Images {list(data.images)}, masks {list(data.masks)}") + f", normalisation `{data.normalization}`"
                  + (f" (window {list(data.ct_window)} HU)" if data.normalization == "ct" else ""),
                  f"- Items: {'volumes ' + str(list(data.volume_shape)) if data.dims == 3 else f'{data.image_size} px'}"
                  + (f", voxel spacing {list(data.spacing)} mm" if data.spacing else "")]
    if data.degrade.kind:
        data_lines.append(f"- Degraded input `{data.degrade.name}` simulated by `{data.degrade.kind}` "
                          f"(seed {data.degrade.seed})")
    split = _split_summary(run_dir)
    if split:
        data_lines.append(f"- Split (`split.json`): {split}")
    t = cfg.training
    if kind == "autoencoder":
        model = (f"`{cfg.vae.kind}`, widths {list(cfg.vae.block_out_channels)}, "
                 f"{cfg.vae.latent_channels} latent channels")
        load = "from models.autoencoder import FrozenAutoencoder\nvae = FrozenAutoencoder.load(\"final\")"
    elif classifier:
        c = cfg.classifier
        model = (f"auxiliary classifier (ResNet widths {list(c.backbone_widths)}, depths {list(c.backbone_depths)}; "
                 f"{c.aux_steps} steps), label denoiser of width {c.feature_dim} on {c.prior_size} x {c.prior_size} "
                 f"label maps, strategy `{cfg.diffusion.strategy}` (objective `{cfg.diffusion.objective}`)")
        load = ("from models.classifier import LabelDiffusionClassifier\n"
                "net = LabelDiffusionClassifier.load_export(\"final\")  # classes and inputs: final/task.yaml")
    else:
        model = (f"UNet widths {list(cfg.model.block_out_channels)}, strategy `{cfg.diffusion.strategy}`"
                 + (f" (objective `{cfg.diffusion.objective}`)" if cfg.diffusion.strategy == "ddpm" else ""))
        unet = "UNet3DModel" if data.dims == 3 else "UNet2DModel"
        import_line = "from models.unet3d import UNet3DModel" if data.dims == 3 else "from diffusers import UNet2DModel"
        load = f"{import_line}\nunet = {unet}.from_pretrained(\"final\", subfolder=\"unet\")  # inputs: final/task.yaml"
    validation = last_validation(run_dir)
    metric_lines = [f"| `{name}` | {value:.4g} | {step} |" for name, (step, value) in sorted(validation.items())]
    limits = ["- Research use only; not a medical device and not validated for any clinical decision."]
    if data.demo:
        limits.append(f"- Trained on a demo built from {DEMO_SOURCES.get(data.demo, 'package-shipped data')}: a test "
                      "that the code runs, not a model to use.")
    if split and "slice" in split:
        limits.append("- One subject, split by slabs of slices: neighbouring slices correlate, so held-out scores are "
                      "optimistic.")
    body = [f"# {run_dir.name}", "", sentence, "", "## Data", "", *data_lines, "", "## Training", "",
            f"- Model: {model}", f"- {t.max_steps} steps, batch {t.batch_size} per process x {t.grad_accum_steps} "
            f"accumulation, lr {t.lr:g} ({t.lr_schedule}), precision `{t.mixed_precision}`, EMA {t.ema_decay:g}, "
            f"seed {cfg.run.seed}", "- Full configuration: `config.yaml` in the run directory", "",
            "Command:", "", "```bash",
            training_command("train_vae.py" if kind == "autoencoder" else "train_diffusion.py", argv), "```", "", "## Validation (held-out, last values)", "",
            "| metric | value | step |", "|---|---|---|", *metric_lines, "", "## Use", "", "```python", load, "```",
            "", "## Limits", "", *limits, ""]
    return f"---\n{header}---\n\n" + "\n".join(body)


def with_evaluation(card: str, report: dict, settings_note: str = "") -> str:
    """The card with its Evaluation section (evaluate.py's report.json means) replaced or added."""
    card = card.split(f"\n{EVALUATION_HEADING}\n")[0].rstrip() + "\n"
    # Per-item metrics report their mean over items, set-level ones (F1, AUC) their value over the set.
    values = {name: value.get("mean", value.get("value")) for name, value in report["metrics"].items()
              if isinstance(value, dict)}
    rows = [f"| `{name}` | {values[name]:.4g} | {report['metrics'][name]['n']} |" for name in sorted(values)
            if values[name] is not None and math.isfinite(values[name])]
    settings = report.get("settings", {})
    described = ", ".join(f"{k} {settings[k]}" for k in ("weights", "split", "sampler", "sampling_steps")
                          if k in settings)
    return card + "\n".join(["", EVALUATION_HEADING, "", f"`evaluate.py` ({described}){settings_note}:", "",
                             "| metric | mean | items |", "|---|---|---|", *rows, ""])
