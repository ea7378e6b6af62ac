"""train_diffusion.py end to end on the real MNI152 demo data, with a tiny UNet and a few steps."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, UNet2DModel
from safetensors.torch import load_file

import train_diffusion
import utils.checkpoint
from tests.runs import read_metrics, run_script, tiny_args


def checkpoint_weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")


def timeless(rows):
    return [r for r in rows if not r[1].startswith("perf/")]


def test_run_directory_contract_and_export(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "logging.trackers=[csv,tensorboard]"))

    for name in ("config.yaml", "split.json", "metrics.csv", "final/unet", "final/scheduler", "final/task.yaml",
                 "checkpoints/checkpoint-4", "checkpoints/checkpoint-8", "checkpoints/best-val_loss/unet",
                 "checkpoints/best-val_ssim/unet", "logs"):
        assert (run / name).exists(), name
    assert list((run / "samples").glob("step-*.png"))
    assert list((run / "logs").rglob("events.out.tfevents.*"))

    rows = read_metrics(run)
    names = {n for _, n, _ in rows}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_t1", "train/loss_t1_in_seg",
            "train/loss_t1_out_seg", "val/loss", "val/ssim", "val/psnr"} <= names
    assert any(n.startswith("val/loss_t_q") for n in names)
    assert len(rows) == len({(s, n) for s, n, _ in rows}), "duplicate (step, name) rows"
    assert all(v not in ("", "nan") for _, _, v in rows)
    ssim = [float(v) for _, n, v in rows if n == "val/ssim"]
    assert all(-1 <= s <= 1 for s in ssim)

    split = json.loads((run / "split.json").read_text())
    assert split["unit"] == "slice" and split["val"] and not set(split["train"]) & set(split["val"])

    # final/ loads with diffusers alone, and holds the EMA weights that the last checkpoint also stores.
    unet = UNet2DModel.from_pretrained(run / "final", subfolder="unet")
    assert unet.config.in_channels == 1 + 3 and unet.config.out_channels == 1
    ema = load_file(run / "checkpoints" / "checkpoint-8" / "ema.safetensors")
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, ema[f"unet.{name}"]), name


def test_unconditional_ddpm_export_samples_with_ddim_pipeline(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "task.spatial_conditions=[]", "diffusion.strategy=ddpm",
                                   "diffusion.timestep_sampling=uniform", "diffusion.objective=v", "training.max_steps=4",
                                   "validation.sample_every=4"))
    pipe = DDIMPipeline.from_pretrained(run / "final")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()


def test_joint_image_and_mask_with_roi_weighted_loss(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "task.targets=[t1,seg]", "task.spatial_conditions=[]",
                                   "task.roi_mask=seg", "task.roi_weight=3.0", "training.max_steps=4"))
    names = {n for _, n, _ in read_metrics(run)}
    assert {"train/loss_t1", "train/loss_seg", "train/loss_seg_in_seg", "train/loss_seg_out_seg"} <= names
    unet = UNet2DModel.from_pretrained(run / "final", subfolder="unet")
    assert unet.config.in_channels == unet.config.out_channels == 1 + 3  # T1 plus one-hot grey/white matter


def test_exact_resume_matches_uninterrupted_run(tmp_path, demo_root):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["training.checkpoint_every=8", "data.flip_prob=0.5", "model.dropout=0.1"]
    train_diffusion.main(tiny_args(straight, demo_root, *common))
    # The same command twice, each invocation stopping after half of the steps.
    for _ in range(2):
        train_diffusion.main(tiny_args(resumed, demo_root, *common, "training.stop_after=4"))

    a, b = checkpoint_weights(straight, 8), checkpoint_weights(resumed, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    ema_a = load_file(straight / "checkpoints/checkpoint-8/ema.safetensors")
    ema_b = load_file(resumed / "checkpoints/checkpoint-8/ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # Every row but the wall-clock perf/ measurements is identical.
    assert timeless(read_metrics(straight)) == timeless(read_metrics(resumed))


def test_resume_after_kill_during_checkpoint_save(tmp_path, demo_root, monkeypatch):
    run = tmp_path / "run"
    args = tiny_args(run, demo_root, "training.checkpoint_every=2", "training.keep_last=5")

    real_save = utils.checkpoint.torch.save

    def dying_save(obj, path, *a, **k):
        if "checkpoint-6" in str(path):  # die half-way through writing checkpoint 6
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(utils.checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion.main(args)
    checkpoints = run / "checkpoints"
    assert (checkpoints / ".tmp-checkpoint-6").exists() and not (checkpoints / "checkpoint-6").exists()
    assert utils.checkpoint.list_checkpoints(checkpoints)[-1].name == "checkpoint-4"
    monkeypatch.undo()

    train_diffusion.main(args)  # the same command: resumes from checkpoint-4, finishes
    assert not (checkpoints / ".tmp-checkpoint-6").exists()
    assert [p.name for p in utils.checkpoint.list_checkpoints(checkpoints)][-1] == "checkpoint-8"
    straight = tmp_path / "straight"
    train_diffusion.main(tiny_args(straight, demo_root, "training.checkpoint_every=2", "training.keep_last=5"))
    a, b = checkpoint_weights(straight, 8), checkpoint_weights(run, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, demo_root, monkeypatch, capsys):
    import diffusion.task
    real_reduce = diffusion.task.Task.reduce
    calls = {"n": 0}

    def reduce_with_nan(self, elementwise, batch):
        calls["n"] += 1
        total, diagnostics = real_reduce(self, elementwise, batch)
        return (total * float("nan") if calls["n"] in (3, 4) or calls["n"] > 6 else total), diagnostics

    monkeypatch.setattr(diffusion.task.Task, "reduce", reduce_with_nan)
    run = tmp_path / "run"
    with pytest.raises(train_diffusion.TrainingDiverged, match="consecutive steps had a non-finite"):
        train_diffusion.main(tiny_args(run, demo_root, "training.max_steps=20", "training.max_consecutive_nonfinite=3",
                                       "validation.every=100", "validation.sample_every=100"))
    rows = read_metrics(run)
    # Steps 3 and 4 were skipped and counted, the run went on; 7, 8, 9 in a row stopped it at step 9.
    skipped = {s: float(v) for s, n, v in rows if n == "train/nonfinite_steps"}
    assert skipped[4] == 2 and skipped[8] == 4
    assert all(v != "nan" for _, _, v in rows), "skipped steps leaked into the logged averages"
    # The newest checkpoint (step 8, no update since step 6) is usable: finite weights, resumable.
    assert utils.checkpoint.list_checkpoints(run / "checkpoints")[-1].name == "checkpoint-8"
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(run, 8).values())
    assert json.loads((run / "checkpoints/checkpoint-8/state.json").read_text())["nonfinite_steps"] == 4


def test_existing_run_is_never_overwritten(tmp_path, demo_root):
    # A folder with a finished run, or any run with training.resume=never, is refused and left untouched.
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,name,value\n1,train/loss,0.5\n")
    for extra in ([], ["training.resume=never"]):
        result = run_script("train_diffusion.py", tiny_args(run, demo_root, *extra))
        assert result.returncode == 2
        assert "already holds" in result.stderr and "Traceback" not in result.stderr
        assert (run / "metrics.csv").read_text() == "step,name,value\n1,train/loss,0.5\n"
        if (run / "final").exists():
            (run / "final").rmdir()


@pytest.mark.parametrize("override, message", [
    ("data.root={missing} data.demo=''", "missing"),
    ("training.lrr=0.1", "did you mean 'training.lr'"),
    ("training.max_steps=ten", "training.max_steps"),
    ("task.targets=[t2]", "task.targets"),
    ("data.min_foreground=0.99", "min_foreground"),
    ("data.class_balanced=true", "data.class_balanced"),
])
def test_bad_input_exits_with_one_line(tmp_path, demo_root, override, message):
    run = tmp_path / "run"
    result = run_script("train_diffusion.py",
                        tiny_args(run, demo_root, *override.format(missing=tmp_path / "missing").split()))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()


def test_two_processes_synchronise_gradients_and_split_batches(tmp_path, demo_root):
    run = tmp_path / "run"
    result = run_script("train_diffusion.py", tiny_args(run, demo_root, "run.log_level=DEBUG"),
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                        launch=["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode == 0, result.stderr[-3000:]
    first = {rank: ids for rank, ids in re.findall(r"\[rank (\d)\].*step 0 micro-batch 0 items (\S+)", result.stderr)}
    assert set(first["0"].split(",")).isdisjoint(first["1"].split(",")), "ranks saw the same samples"
    checksums = dict(re.findall(r"\[rank (\d)\].*weights checksum (\S+)", result.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], checksums
    rows = read_metrics(run)
    assert len(rows) == len({(s, n) for s, n, _ in rows})
    assert (run / "final" / "unet").exists()


def test_independent_processes_launch_is_refused(tmp_path, demo_root, monkeypatch):
    # On a CPU-only machine this launch starts two processes that each see a world of one.
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    run = tmp_path / "run"
    result = run_script("train_diffusion.py", tiny_args(run, demo_root),
                        launch=["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode != 0
    assert "would train independently" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()


def test_training_beats_the_untrained_model_on_held_out_slices(tmp_path, demo_root):
    # The demo's claim at test size: mask -> T1 samples of held-out slices get much closer to the truth.
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "validation.at_start=true", "training.max_steps=80",
                                   "training.lr=0.002", "training.lr_warmup_steps=10", "training.ema_decay=0.9",
                                   "validation.every=80", "validation.sample_every=80", "validation.sampling_steps=10",
                                   "validation.num_samples=13", "training.checkpoint_every=80"))
    ssim = {s: float(v) for s, n, v in read_metrics(run) if n == "val/ssim"}
    assert ssim[0] < 0.2 and ssim[80] > ssim[0] + 0.3, ssim
