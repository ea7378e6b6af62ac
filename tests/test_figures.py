"""Figures say what they show: legends, per-item metrics, titles, units, curve groups and notes, log-spaced
denoising steps (checked on the drawn text); `--print-config --explain` gives each key its comment from the code."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.legend import Legend
from matplotlib.text import Text
from omegaconf import OmegaConf
from skimage import data
from skimage.transform import resize

import encode_latents
import evaluate
import train_diffusion
import train_vae
from tests.runs import REPO, tiny_args
from utils import config as config_lib
from utils import visualization
from utils.config_help import field_comments
from utils.visualization import (comparison_figure, curves_figure, dataset_label_names, denoising_figure,
                                 log_spaced_indices, metric_note)


def texts(figure) -> list[str]:
    """Every non-empty text drawn in a figure: titles, axis labels, legend entries, notes, tick labels."""
    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]


def legend_labels(figure) -> list[str]:
    return [t.get_text() for legend in figure.findobj(Legend) for t in legend.get_texts()]


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return resize(data.shepp_logan_phantom(), (48, 48), order=1) * 2 - 1


@pytest.fixture(scope="module")
def labels(phantom) -> np.ndarray:
    return (phantom > -0.9).astype(np.int64) + (phantom > 0.5)


# ----------------------------------------------------------------------------------------------------------
# Comparison grids.

def test_comparison_figure_has_legend_row_metrics_title_and_error_unit(phantom, labels):
    shifted = np.clip(phantom + 0.1, -1, 1)
    rows = [dict(condition=labels, generated=shifted, reference=phantom), dict(condition=labels, generated=phantom,
                                                                             reference=phantom)]
    figure = comparison_figure(rows, titles=["sub-1/z010", "sub-1/z020"], notes=["SSIM 0.812, PSNR 24.1 dB", ""],
                               title="run: final weights (step 40), euler sampler, 3 steps",
                               label_names={1: "grey matter"}, error_unit="HU", error_scale=500.0)
    # The legend names label 1 as recorded and label 2 by its value; only labels present in a mask are listed.
    assert legend_labels(figure) == ["grey matter", "label 2"]
    assert figure.get_suptitle() == "run: final weights (step 40), euler sampler, 3 steps"
    axes = np.array(figure.axes[:8]).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == ["condition", "generated", "reference", "|error|"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["sub-1/z010", "sub-1/z020"]
    assert axes[0, 1].get_xlabel() == "SSIM 0.812, PSNR 24.1 dB"  # under the generated panel of its row
    assert axes[1, 1].get_xlabel() == ""
    # The error panel is in HU, on one scale, and its colour bar says so.
    np.testing.assert_allclose(axes[0, 3].get_images()[0].get_array(), np.abs(shifted - phantom) * 500)
    assert figure.axes[8].get_ylabel() == "|error| (HU)"
    assert len(figure.axes) == 9  # one colour bar for the grid

    # Without label names, labels are numbered; without masks, no legend.
    unnamed = comparison_figure(rows[:1])
    assert legend_labels(unnamed) == ["label 1", "label 2"]
    assert unnamed.axes[-1].get_ylabel() == "|error| (normalised units)"
    assert legend_labels(comparison_figure([dict(generated=phantom, reference=shifted)])) == []
    with pytest.raises(ValueError, match="1 notes for 2 rows"):
        comparison_figure(rows, notes=["x"])


def test_validation_layout_puts_items_in_columns(phantom, labels):
    rows = [dict(condition=labels, generated=phantom, reference=phantom) for _ in range(5)]
    ids = [f"sub-1/z{i:03d}" for i in range(5)]
    notes = [f"SSIM 0.{90 + i}" for i in range(5)]
    figure = comparison_figure(rows, titles=ids, notes=notes, title="validation samples, step 8", items_as_columns=True,
                               items_per_row=3)
    # 5 items in rows of at most 3: two balanced blocks (3 + 2) of 4 rows (condition, generated, reference, |error|).
    panels = np.array(figure.axes[:24]).reshape(8, 3)
    assert [ax.get_ylabel() for ax in panels[:, 0]] == ["condition", "generated", "reference", "|error|"] * 2
    assert [ax.get_title() for ax in panels[0]] == [f"{i}\n{n}" for i, n in zip(ids[:3], notes[:3])]
    assert [ax.get_title() for ax in panels[4, :2]] == [f"{i}\n{n}" for i, n in zip(ids[3:], notes[3:])]
    assert not panels[4, 2].axison  # no sixth item
    width, height = figure.get_size_inches()
    wide = comparison_figure(rows, titles=ids, items_as_columns=True)  # one block: wider than high
    assert wide.get_size_inches()[0] > wide.get_size_inches()[1] and width < wide.get_size_inches()[0]


def test_metric_note_and_label_names():
    assert metric_note({"ssim": 0.91234, "psnr": 27.06, "mae": 0.1}) == "SSIM 0.912, PSNR 27.1 dB"
    # Several fields: the drawn field's own scores, not the mean "ssim"; HU when scored.
    scores = {"ssim": 0.5, "ssim_ct": 0.8, "psnr_ct": 30.0, "mae_hu_ct": 12.34, "ssim_t1": 0.2}
    assert metric_note(scores, "ct") == "SSIM 0.800, PSNR 30.0 dB, MAE 12.3 HU"
    assert metric_note({"dice_1": 0.9, "dice_2": 0.75, "dice_10": float("nan")}, "seg") == "Dice 0.900 / 0.750"
    assert metric_note({"dice_seg_2": 0.5, "dice_seg_1": 0.25, "ssim_t1": 0.7}, "seg") == "Dice 0.250 / 0.500"
    assert metric_note({"diversity_msssim": 0.3, "ssim": float("nan")}) == ""

    class Recorded:
        mask_labels = {"seg": {0: "background", 1: "grey matter", 2: "white matter"}}
    assert dataset_label_names(Recorded()) == {0: "background", 1: "grey matter", 2: "white matter"}
    assert dataset_label_names(object()) == {}


# ----------------------------------------------------------------------------------------------------------
# Training curves.

def write_metrics(path: Path, val_loss: list[float]) -> Path:
    """A metrics.csv with training, validation, timing and constant rows, and a text row."""
    lines = ["step,name,value"]
    for step in range(10, 410, 10):
        lines += [f"{step},train/loss,{1 / step}", f"{step},train/lr,0.001", f"{step},train/nonfinite_steps,0",
                  f"{step},perf/samples_per_s,{30 + step % 7}", f"{step},train/worst_batch_items,sub-1/z003 sub-1/z007"]
    for k, step in enumerate((100, 200, 300, 400)):
        quartiles = [val_loss[k] * 4 - 0.3, 0.1 + k / 1000, 0.1 - k / 100, 0.1 - k / 50]  # q1 carries any rise
        lines += [f"{step},val/loss,{val_loss[k]}", f"{step},val/ssim,{0.6 + k / 10}"]
        lines += [f"{step},val/loss_t_q{q + 1},{value}" for q, value in enumerate(quartiles)]
    lines.append("0,model/gflops_per_sample,0.125")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_curves_are_grouped_drop_flat_series_and_explain_quartiles(tmp_path):
    figure = curves_figure(write_metrics(tmp_path / "metrics.csv", [0.3, 0.25, 0.32, 0.4]))
    groups = {sub.get_suptitle(): [ax.get_title() for ax in sub.axes] for sub in figure.subfigs}
    assert groups == {"training": ["train/loss"],
                      "validation": ["val/loss", "val/loss_t_q1", "val/loss_t_q2", "val/loss_t_q3", "val/loss_t_q4",
                                     "val/ssim"],
                      "timing (wall clock)": ["perf/samples_per_s"]}
    # Constant and single-value series are not drawn but listed with their value; the text row is skipped.
    flat = " ".join(figure.get_supxlabel().split())
    assert flat.startswith("Not drawn (one value, or constant):")
    for name, value in (("model/gflops_per_sample", "0.125"), ("train/lr", "0.001"), ("train/nonfinite_steps", "0")):
        assert f"{name} = {value}" in flat
    assert "worst_batch_items" not in " ".join(texts(figure))
    # Each quartile panel says which times it covers.
    panels = {ax.get_title(): ax for ax in figure.axes}
    assert panels["val/loss_t_q1"].get_xlabel() == "step\nloss of the held-out items with t in [0, 0.25): nearly clean"
    assert panels["val/loss_t_q4"].get_xlabel().endswith("t in [0.75, 1]: nearly noise")
    assert panels["val/loss"].get_xlabel() == "step"

    # val/loss lowest at step 200 then rising (in q1) while val/ssim improves to step 400: the note says why and
    # which weights to evaluate.
    validation = next(sub for sub in figure.subfigs if sub.get_suptitle() == "validation")
    note = " ".join(validation.get_supxlabel().split())
    assert note.startswith("val/loss is lowest at step 200 and rises after it (mostly val/loss_t_q1), while val/ssim "
                           "keeps improving (best at step 400).")
    assert "recalls its training slices" in note and "Evaluate checkpoints/best-val_ssim" in note


def test_no_loss_note_when_the_held_out_loss_keeps_falling(tmp_path):
    figure = curves_figure(write_metrics(tmp_path / "metrics.csv", [0.4, 0.3, 0.25, 0.2]))
    validation = next(sub for sub in figure.subfigs if sub.get_suptitle() == "validation")
    assert validation.get_supxlabel() == ""
    assert not any("best-val_ssim" in t for t in texts(figure))


# ----------------------------------------------------------------------------------------------------------
# Denoising strip.

def t_labels(figure) -> list[float]:
    return [float(re.fullmatch(r"t=(\S+)", ax.get_title()).group(1)) for ax in figure.axes if ax.get_title()]


def test_denoising_figure_shows_log_spaced_times_and_the_item(phantom):
    times = list(np.linspace(1.0, 0.02, 50))  # 50 uniform Euler steps
    preds = [np.clip((1 - t) * phantom, -1, 1) for t in times]
    figure = denoising_figure(preds, times, item_id="sub-1/z030")
    assert "sub-1/z030" in figure.get_suptitle() and "8 of 50 steps" in figure.get_suptitle()
    shown = t_labels(figure)
    assert len(shown) == 8 and shown[0] == 1.0 and shown[-1] == pytest.approx(0.02)
    # Evenly spaced in log t: each t about (0.02)^(1/7) = 0.57 times the previous (the grid is 0.02 apart).
    ratios = np.array(shown[1:]) / np.array(shown[:-1])
    assert np.all(np.abs(ratios - 0.02 ** (1 / 7)) < 0.12), ratios
    # The panels draw the predictions of those steps.
    drawn = [ax.get_images()[0].get_array() for ax in figure.axes if ax.get_title()]
    for image, t in zip(drawn, shown):
        np.testing.assert_allclose(image, np.clip((1 - t) * phantom, -1, 1), atol=1e-6)

    # DDPM-style times ending at t = 0: the clean end is kept; short trajectories are shown whole.
    ddim = [t / 999 for t in range(999, -1, -20)] + [0.0]
    picked = log_spaced_indices(ddim, 8)
    assert picked[0] == 0 and picked[-1] == len(ddim) - 1 and len(picked) <= 8
    assert log_spaced_indices([1.0, 0.5, 0.0], 8) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# --print-config --explain.

def explained(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        config_lib.parse_args(argv, "test", default_config="configs/demo.yaml")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_print_config_explain_gives_each_key_its_comment_as_yaml(capsys):
    out = explained(capsys, ["--print-config", "--explain", "data.intensity_threshold=-0.8"])
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if line and not line.startswith("#")}
    comments = field_comments(config_lib)["DataConfig"]
    assert lines["data.intensity_threshold"] == f"data.intensity_threshold: -0.8  # {comments['intensity_threshold']}"
    assert comments["intensity_threshold"].startswith("foreground = normalised intensity above this")
    # Comments written above a field count too, over several lines.
    assert lines["data.ct_window"] == f"data.ct_window: [-1000.0, 1000.0]  # {comments['ct_window']}"
    assert comments["ct_window"].startswith("ct: the HU window [low, high] mapped to [-1, 1]")
    factor = field_comments(config_lib)["DegradeConfig"]["factor"]
    assert factor.startswith("low_resolution: down-sampling per array axis") and factor.endswith(
        "the thin slices averaged into each thick one along data.slice_axis")
    # Valid YAML whose dotted keys hold the resolved values; every key of the schema is explained.
    parsed = yaml.safe_load(out)
    cfg = config_lib.resolve(REPO / "configs/demo.yaml", ["data.intensity_threshold=-0.8"])
    structured = OmegaConf.structured(cfg)
    for key, value in parsed.items():
        expected = OmegaConf.select(structured, key)
        assert value == (OmegaConf.to_container(expected) if OmegaConf.is_config(expected) else expected), key
    assert len(parsed) == len(lines) > 150
    assert [key for key, line in lines.items() if "  # " not in line] == []
    assert "# classifier: Label-diffusion classification" in out  # a section's docstring heads it

    # --print-config alone is unchanged; --explain alone is refused.
    plain = explained(capsys, ["--print-config", "data.intensity_threshold=-0.8"])
    assert "#" not in plain and config_lib.OmegaConf.create(plain).data.intensity_threshold == -0.8
    with pytest.raises(SystemExit) as exit_info:
        config_lib.parse_args(["--explain"], "test")
    assert exit_info.value.code == 2
    assert "--explain goes with --print-config" in capsys.readouterr().err


@pytest.mark.parametrize("script", [train_vae, encode_latents, evaluate])
def test_every_script_explains(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--print-config", "--explain", "vae.kl_weight=2e-6"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("vae.kl_weight:"))
    assert line == "vae.kl_weight: 2.0e-06  # weight of the KL term (kl)"
    assert yaml.safe_load(out)["vae.kl_weight"] == 2e-6


# ----------------------------------------------------------------------------------------------------------
# A tiny real run: the validation figure and the evaluation figures carry their text.

def test_tiny_run_figures_carry_steps_metrics_and_legend(tmp_path, demo_root, monkeypatch):
    drawn = {}
    save = visualization._save

    def capture(figure, path):
        drawn[Path(path).name] = figure
        return save(figure, path)

    monkeypatch.setattr(visualization, "_save", capture)
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=4", "validation.every=4",
                                   "validation.sample_every=4", "training.checkpoint_every=4"))
    samples = drawn["step-0000004.png"]
    assert re.fullmatch(r"validation samples, step 4, euler 3 steps: mean SSIM \d\.\d{3}, PSNR \d+\.\d dB",
                        samples.get_suptitle())
    item_titles = [ax.get_title() for ax in samples.axes if "\n" in ax.get_title()]
    assert len(item_titles) == 3 and all(re.search(r"\nSSIM \d\.\d{3}, PSNR \d+\.\d dB$", t) for t in item_titles)
    assert legend_labels(samples) == ["label 1", "label 2"]  # the demo's folders name no labels

    evaluate.main(["--run", str(run), "eval.sampling_steps=3", "eval.num_items=2", "eval.num_figures=2"])
    comparison = drawn["comparison.png"]
    assert comparison.get_suptitle() == "run, val split: final weights (step 4), euler sampler, 3 steps"
    notes = [ax.get_xlabel() for ax in comparison.axes if ax.get_xlabel()]
    assert len(notes) == 2 and all(re.fullmatch(r"SSIM \d\.\d{3}, PSNR \d+\.\d dB", n) for n in notes)
    assert legend_labels(comparison) == ["label 1", "label 2"]
    assert "|error| (normalised units)" in texts(comparison)
    strip = drawn["denoising.png"]
    assert re.search(r"sampling \S+/\S+: 3 of 3 steps", strip.get_suptitle())
    assert t_labels(strip) == pytest.approx([1.0, 2 / 3, 1 / 3], abs=1e-3)
    # One validation so far: its values are listed under the curves, not drawn as single points.
    curves = drawn["training_curves.png"]
    assert [sub.get_suptitle() for sub in curves.subfigs] == ["training", "timing (wall clock)"]
    listed = " ".join(curves.get_supxlabel().split())
    assert "train/nonfinite_steps = 0" in listed and re.search(r"val/ssim = \d\.\d+", listed)
    assert math.isfinite(float(re.search(r"SSIM (\S+),", notes[0]).group(1)))
