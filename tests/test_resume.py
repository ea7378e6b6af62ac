"""Runs that survive what clusters and users do to them: several processes, stop signals, Ctrl-C during
start-up, damaged checkpoints, fp16 overflows, changed data. Tiny models on the real MNI152 demo slices."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import train_diffusion
import train_vae
import utils.run
from tests.runs import REPO, read_metrics, run_script, tiny_args
from utils.checkpoint import list_checkpoints
from utils.config import ConfigError

TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
CPU_GLOO = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
# 16 steps, a checkpoint at 8 and 16, validation at 8 and 16.
LONGER = ["training.max_steps=16", "training.checkpoint_every=8", "validation.every=8", "validation.sample_every=16",
          "training.keep_last=5"]


def timeless(rows):
    return [r for r in rows if not r[1].startswith("perf/")]


def assert_same_run(a, b, step):
    """Weights, EMA and every reproducible metrics.csv row of two runs are bitwise equal at `step`."""
    for name in ("model", "ema"):
        x = load_file(a / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")
        y = load_file(b / "checkpoints" / f"checkpoint-{step}" / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name} differs at step {step}"
    assert timeless(read_metrics(a)) == timeless(read_metrics(b))


def launch_two(run, demo_root, *overrides):
    result = run_script("train_diffusion.py", tiny_args(run, demo_root, *LONGER, *overrides), env=CPU_GLOO,
                        launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory, demo_root):
    """An uninterrupted 2-process run: the reference every interrupted one must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    launch_two(run, demo_root)
    return run


def test_two_process_run_resumes_on_two_and_on_one_process(straight_two, tmp_path, demo_root):
    run = tmp_path / "run"
    launch_two(run, demo_root, "training.stop_after=6")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-6"]
    # 2 -> 1 -> 2 on a copy: checkpoints hold full state dicts, so any process count continues them.
    other = tmp_path / "other"
    shutil.copytree(run, other)
    train_diffusion.main(tiny_args(other, demo_root, *LONGER, "training.stop_after=3"))
    assert list_checkpoints(other / "checkpoints")[-1].name == "checkpoint-9"
    launch_two(other, demo_root)
    assert (other / "final" / "unet").is_dir()
    # 2 -> 2 continues bitwise as if never stopped.
    launch_two(run, demo_root)
    assert_same_run(straight_two, run, 16)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in children]


def test_sigterm_stops_every_rank_with_a_checkpoint_and_the_rerun_is_exact(straight_two, tmp_path, demo_root):
    run = tmp_path / "run"
    args = tiny_args(run, demo_root, *LONGER, "run.log_level=DEBUG")
    launcher = subprocess.Popen([*TWO_PROCESSES, str(REPO / "train_diffusion.py"), *args], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **CPU_GLOO},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until training has logged step 2, then signal one rank only: the other must learn of it and stop
    # at the same step, or it would wait forever in the checkpoint's collectives.
    deadline = time.time() + 120
    while not ((run / "metrics.csv").exists() and "2,train/loss" in (run / "metrics.csv").read_text()):
        assert time.time() < deadline and launcher.poll() is None, "training did not start"
        time.sleep(0.05)
    pids = worker_pids(launcher)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, stderr[-3000:]  # both ranks exited 0
    assert "SIGTERM received" in stderr
    stopped = [p for p in list_checkpoints(run / "checkpoints")]
    assert stopped and 2 <= int(stopped[-1].name.split("-")[1]) < 16, stopped
    for rank in (0, 1):
        assert f"[rank {rank}]" in stderr and "weights checksum" in stderr
    assert not (run / "final").exists()
    # The same command again: continues and ends bitwise equal to the uninterrupted run.
    result = run_script("train_diffusion.py", [a for a in args if a != "run.log_level=DEBUG"], env=CPU_GLOO,
                        launch=TWO_PROCESSES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(straight_two, run, 16)


def signal_at(monkeypatch, module, when: dict[int, list[int]]):
    """Send this process the given signals just before optimizer step `step` (0-based) starts."""
    real = module.seed_step

    def seed_step(seed, step, rank):
        for sig in when.get(step, []):
            os.kill(os.getpid(), sig)
        return real(seed, step, rank)

    monkeypatch.setattr(module, "seed_step", seed_step)


def test_ctrl_c_checkpoints_and_exits_cleanly_then_the_rerun_is_exact(tmp_path, demo_root, monkeypatch, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train_diffusion.main(tiny_args(straight, demo_root, "data.flip_prob=0.5", "model.dropout=0.1"))
    args = tiny_args(run, demo_root, "data.flip_prob=0.5", "model.dropout=0.1")
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        signal_at(patch, train_diffusion, {2: [signal.SIGINT]})
        train_diffusion.main(args)  # returns normally: the script exits 0
    log = capsys.readouterr().err
    assert "SIGINT received" in log and "stopped at step 3 (SIGINT)" in log
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is handler, "the previous handler was not restored"
    train_diffusion.main(args)
    assert_same_run(straight, run, 8)


def test_second_ctrl_c_aborts_at_once(tmp_path, demo_root, monkeypatch):
    run = tmp_path / "run"
    signal_at(monkeypatch, train_diffusion, {2: [signal.SIGINT, signal.SIGINT]})
    with pytest.raises(KeyboardInterrupt):
        train_diffusion.main(tiny_args(run, demo_root))
    assert not list_checkpoints(run / "checkpoints")


def test_vae_stops_on_sigusr1_with_a_checkpoint(tmp_path, demo_root, monkeypatch):
    run = tmp_path / "run"
    signal_at(monkeypatch, train_vae, {1: [signal.SIGUSR1]})
    args = tiny_args(run, demo_root, "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4",
                     config="configs/demo_vae.yaml")
    train_vae.main(args)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-2"]
    monkeypatch.undo()
    train_vae.main(args)
    assert (run / "final" / "vae").is_dir()


def test_rerun_after_ctrl_c_during_start_up_trains(tmp_path, demo_root, monkeypatch):
    run = tmp_path / "run"
    args = tiny_args(run, demo_root, "validation.at_start=true", "training.max_steps=4")
    # Ctrl-C after the step-0 validation wrote metrics.csv and a best-* folder, before any checkpoint.
    with monkeypatch.context() as patch:
        patch.setattr(train_diffusion, "seed_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train_diffusion.main(args)
    assert (run / "metrics.csv").exists() and not list_checkpoints(run / "checkpoints")
    first_rows = (run / "metrics.csv").read_text()
    result = run_script("train_diffusion.py", args)  # the same command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting again from step 0" in result.stderr
    assert (run / "final" / "unet").is_dir()
    assert (run / "previous-start-1" / "metrics.csv").read_text() == first_rows  # kept aside, not lost


def test_rerun_with_a_changed_config_after_a_failed_start_starts_cleanly(tmp_path, demo_root, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # fails after config.yaml and split.json were written
        patch.setattr(train_diffusion, "build_network", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
        with pytest.raises(ValueError):
            train_diffusion.main(tiny_args(run, demo_root))
    assert (run / "config.yaml").exists()
    train_diffusion.main(tiny_args(run, demo_root, "training.lr=0.001", "training.max_steps=4"))
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert (run / "previous-start-1" / "config.yaml").exists() and (run / "final" / "unet").is_dir()


def test_a_finished_run_without_checkpoints_is_not_restarted(tmp_path, demo_root):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,name,value\n1,train/loss,0.5\n")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train_diffusion.main(tiny_args(run, demo_root))
    assert (run / "metrics.csv").read_text() == "step,name,value\n1,train/loss,0.5\n"


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "ema.safetensors"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, demo_root, damaged, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train_diffusion.main(tiny_args(straight, demo_root, "training.max_steps=8"))
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=8"))
    # A node crash after the rename but before the data reached the disk: the file is cut short.
    path = run / "checkpoints" / "checkpoint-8" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    train_diffusion.main(tiny_args(run, demo_root))
    assert f"skipping checkpoint {run / 'checkpoints' / 'checkpoint-8'}: {damaged}" in capsys.readouterr().err
    assert_same_run(straight, run, 8)  # steps 5-8 ran again from checkpoint-4


def test_interrupted_replacement_of_a_best_folder_is_restored(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=4"))
    best = run / "checkpoints" / "best-val_loss"
    # Killed between the two renames of a replacement: only the moved-aside old version exists.
    best.rename(best.with_name(".tmp-old-best-val_loss"))
    (run / "checkpoints" / ".tmp-best-val_loss").mkdir()  # the unfinished new version
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=1"))
    assert (best / "unet").is_dir() and json.loads((best / "metric.json").read_text())["step"] == 4
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_changed_split_settings_are_refused(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=4"))
    with pytest.raises(ConfigError, match="data.val_fraction=0.2 but the config says 0.3"):
        train_diffusion.main(tiny_args(run, demo_root, "data.val_fraction=0.3"))
    split = json.loads((run / "split.json").read_text())
    split["train"] = split["train"][1:]  # an item of the data no longer in any list
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ConfigError, match="does not list"):
        train_diffusion.main(tiny_args(run, demo_root))


class LossScaledAccelerator(Accelerator):
    """fp16's loss-scaler bookkeeping on a CPU: a real GradScaler around fp32 math (CPU autocast has no fp16
    scaler path in Accelerate)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
        self.native_amp = True

    @property
    def mixed_precision(self):
        return "fp16"


def overflow_at(monkeypatch, module, target, method: str, steps: set[int]):
    """Make the loss infinite at the given optimizer steps (0-based), as an fp16 overflow would."""
    current = {"step": -1}
    real_seed, real_method = module.seed_step, getattr(target, method)

    def seed_step(seed, step, rank):
        current["step"] = step
        return real_seed(seed, step, rank)

    def overflowing(self, *args, **kwargs):
        out = real_method(self, *args, **kwargs)
        return (out[0] * float("inf"), *out[1:]) if current["step"] in steps else out

    monkeypatch.setattr(module, "seed_step", seed_step)
    monkeypatch.setattr(target, method, overflowing)


def scaler_state(run, step):
    return json.loads((run / "checkpoints" / f"checkpoint-{step}" / "grad_scaler.json").read_text())


def test_fp16_loss_scaler_survives_an_overflow_and_resumes_exactly(tmp_path, demo_root, monkeypatch):
    import diffusion.task
    monkeypatch.setattr(utils.run, "Accelerator", LossScaledAccelerator)
    overflow_at(monkeypatch, train_diffusion, diffusion.task.Task, "reduce", {2})
    straight, run = tmp_path / "straight", tmp_path / "run"
    train_diffusion.main(tiny_args(straight, demo_root))
    # Step 3 overflowed: skipped by the scaler, which halved its scale, then grew it back every 3 good steps.
    assert scaler_state(straight, 4)["scale"] == 2.0 ** 7
    assert scaler_state(straight, 8)["scale"] == 2.0 ** 8
    skipped = {s: float(v) for s, n, v in read_metrics(straight) if n == "train/nonfinite_steps"}
    assert skipped[4] == 1
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=4"))
    train_diffusion.main(tiny_args(run, demo_root))  # restores the scale instead of settling it again
    assert scaler_state(run, 8) == scaler_state(straight, 8)
    assert_same_run(straight, run, 8)


def test_fp16_autoencoder_run_survives_a_skipped_step(tmp_path, demo_root, monkeypatch):
    from models.losses import AutoencoderLoss
    monkeypatch.setattr(utils.run, "Accelerator", LossScaledAccelerator)
    overflow_at(monkeypatch, train_vae, AutoencoderLoss, "__call__", {2})
    run = tmp_path / "run"
    train_vae.main(tiny_args(run, demo_root, "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4",
                             config="configs/demo_vae.yaml"))
    assert (run / "final" / "vae").is_dir()
    assert scaler_state(run, 4)["scale"] == 2.0 ** 7
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoints/checkpoint-8/model.safetensors").values())


def test_nonfinite_discriminator_step_is_skipped_for_both_networks(tmp_path, demo_root, monkeypatch):
    from models.losses import AutoencoderLoss
    current = {"step": -1}
    real_seed, real_d_loss = train_vae.seed_step, AutoencoderLoss.discriminator_loss

    def seed_step(seed, step, rank):
        current["step"] = step
        return real_seed(seed, step, rank)

    def d_loss(self, *args):
        return real_d_loss(self, *args) * (float("nan") if current["step"] == 5 else 1.0)

    monkeypatch.setattr(train_vae, "seed_step", seed_step)
    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", d_loss)
    run = tmp_path / "run"
    train_vae.main(tiny_args(run, demo_root, "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4",
                             "vae.disc_weight=0.5", "vae.disc_start=4", "vae.disc_channels=8", "vae.disc_layers=2",
                             "training.checkpoint_every=2", "training.keep_last=5", config="configs/demo_vae.yaml"))
    skipped = {s: float(v) for s, n, v in read_metrics(run) if n == "train/nonfinite_steps"}
    assert skipped[6] == 1 and skipped[4] == 0
    for name in ("model", "discriminator"):  # neither network stepped at step 6, and both stay finite
        at5 = load_file(run / "checkpoints/checkpoint-6" / f"{name}.safetensors")
        assert all(torch.isfinite(t).all() for t in at5.values())


def test_non_interactive_progress_is_one_line_per_interval(tmp_path, demo_root):
    run = tmp_path / "run"
    result = run_script("train_diffusion.py", tiny_args(run, demo_root, "training.max_steps=8"),
                        env={"TQDM_DISABLE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr  # no bar redrawn in a log file
    lines = [line for line in result.stderr.splitlines() if " step " in line and "steps/s" in line]
    # The first line, then one per 30 s at most (none in a run this short), and the last.
    assert len(lines) == 2 and "step 8/8" in lines[-1], lines
    assert "CPU thread(s) per process" in result.stderr


def test_threads_follow_the_cores_and_the_processes_on_the_node(monkeypatch):
    logger = logging.getLogger("meddiff")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils.run, "available_cores", lambda: 8)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert utils.run.set_num_threads(0, logger) == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert utils.run.set_num_threads(0, logger) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert utils.run.set_num_threads(0, logger) == 3
        assert utils.run.set_num_threads(5, logger) == 5 and torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def test_slurm_template_quotes_overrides_and_requeues_on_the_time_limit_signal(tmp_path):
    # Stand-ins for srun, scontrol and accelerate record what the template runs.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "scontrol": f'echo "scontrol $*" >> {log}; [ "$1" = show ] && echo node1 || true',
        "srun": 'shift; exec "$@"',  # drop --kill-on-bad-exit; signals reach the task as srun forwards them
        "accelerate": f'for a in "$@"; do echo "arg:$a" >> {log}; done; '
                      'trap "echo term >> ' + str(log) + '; exit 0" TERM; sleep 30 & wait',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "42"}
    job = subprocess.Popen(["bash", str(REPO / "slurm" / "train_multinode.sbatch"), "configs/demo.yaml",
                            "task.targets=[t1,seg]", "run.output_dir=runs/with space"], cwd=tmp_path, env=env)
    deadline = time.time() + 20
    while not (log.exists() and "arg:run.output_dir=runs/with space" in log.read_text()):
        assert time.time() < deadline, log.read_text() if log.exists() else "nothing ran"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends ahead of the time limit
    assert job.wait(timeout=20) == 0
    calls = log.read_text()
    assert "arg:task.targets=[t1,seg]" in calls and "arg:--config" in calls
    assert "term" in calls and "scontrol requeue 42" in calls


def test_two_process_autoencoder_run_resumes_exactly_and_on_one_process(tmp_path, demo_root):
    vae = ["vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=4", "vae.disc_weight=0.5", "vae.disc_start=2",
           "vae.disc_channels=8", "vae.disc_layers=2", "training.keep_last=5"]

    def launch(run, *overrides):
        result = run_script("train_vae.py", tiny_args(run, demo_root, *vae, *overrides, config="configs/demo_vae.yaml"),
                            env=CPU_GLOO, launch=TWO_PROCESSES)
        assert result.returncode == 0, result.stderr[-3000:]

    straight, run, other = tmp_path / "straight", tmp_path / "run", tmp_path / "other"
    launch(straight)
    launch(run, "training.stop_after=4")
    shutil.copytree(run, other)
    launch(run)
    for name in ("model", "ema", "discriminator"):
        a = load_file(straight / "checkpoints/checkpoint-8" / f"{name}.safetensors")
        b = load_file(run / "checkpoints/checkpoint-8" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert timeless(read_metrics(straight)) == timeless(read_metrics(run))
    # 2 -> 1: the discriminator and both optimizers load into one process too.
    train_vae.main(tiny_args(other, demo_root, *vae, config="configs/demo_vae.yaml"))
    assert (other / "final" / "vae").is_dir()


def test_a_checkpoint_that_does_not_fit_the_model_names_the_mismatch(tmp_path, demo_root):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "training.stop_after=4"))
    with pytest.raises(ConfigError) as error:
        train_diffusion.main(tiny_args(run, demo_root, "model.block_out_channels=[16,48]",
                                       "model.attention_head_dim=16"))
    message = str(error.value)
    assert "cannot resume from" in message and "size mismatch for" in message, message
