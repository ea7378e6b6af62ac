"""The start and end every training script shares: Accelerate with trackers, launch checks, logging, CPU threads,
the run directory and its resume point, progress output, stop signals and checkpoints."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from utils.checkpoint import restore_interrupted_replacements, resolve_resume, save_checkpoint
from utils.config import Config, ConfigError, to_yaml
from utils.distributed import check_launch
from utils.logging import setup_logging
from utils.tracking import accelerate_trackers

# What a start writes into the run directory before its first checkpoint.
RUN_FILES = ("config.yaml", "split.json", "metrics.csv", "logs", "samples", "checkpoints")


def start_training_run(cfg: Config):
    """Accelerator, logger, run directory, its checkpoints folder and the checkpoint to resume (or None).

    Folder replacements a killed process left half done are finished or undone first, so
    `training.resume=auto` only ever sees complete checkpoints and exports.
    """
    run_dir = Path(cfg.run.output_dir)
    trackers = accelerate_trackers(cfg.logging)
    # A classification run trains its auxiliary classifier, then its label denoiser: each stage leaves the other's
    # parameters without gradients, which DDP must be told to expect.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.task.kind == "classification")
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, log_with=trackers or None,
                              project_dir=str(run_dir / "logs"), kwargs_handlers=[ddp])
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    set_num_threads(cfg.run.num_threads, logger)
    checkpoints = run_dir / "checkpoints"
    if accelerator.is_main_process:
        restore_interrupted_replacements(run_dir)
        restore_interrupted_replacements(checkpoints)
    accelerator.wait_for_everyone()
    resume_from: Optional[Path] = resolve_resume(cfg.training.resume, checkpoints)
    prepare_run_dir(run_dir, resume_from, cfg, accelerator, logger)
    return accelerator, logger, run_dir, checkpoints, resume_from


def prepare_run_dir(run_dir: Path, resume_from: Optional[Path], cfg: Config, accelerator, logger) -> None:
    """Write config.yaml, keeping the previous one when a resumed run's config changed.

    With nothing to resume, files of an earlier start that never reached a checkpoint (Ctrl-C during start-up,
    a failed data load) are moved into `previous-start-<n>/` and the run starts again from step 0. A finished
    run (final/ without checkpoints) and `training.resume=never` on a used folder are refused instead.
    """
    leftovers = [n for n in RUN_FILES if (run_dir / n).exists()]
    if resume_from is None and leftovers and ((run_dir / "final").exists() or cfg.training.resume == "never"):
        why = "a finished run (final/)" if (run_dir / "final").exists() else f"a run ({', '.join(leftovers)})"
        raise ConfigError(f"run.output_dir={run_dir} already holds {why} and there is no checkpoint to resume; "
                          "choose another run.output_dir")
    accelerator.wait_for_everyone()  # every rank has looked before the main process moves anything
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved, new_text = run_dir / "config.yaml", to_yaml(cfg)
        if resume_from is None and leftovers:
            aside = next(run_dir / f"previous-start-{n}" for n in range(1, 10**6)
                         if not (run_dir / f"previous-start-{n}").exists())
            aside.mkdir()
            for name in leftovers:
                os.replace(run_dir / name, aside / name)
            logger.warning("%s holds no checkpoint to resume: starting again from step 0; the files of the "
                           "earlier start (%s) are kept in %s", run_dir, ", ".join(leftovers), aside)
        elif saved.exists() and saved.read_text() != new_text:
            os.replace(saved, run_dir / f"config-before-step-{resume_from.name.split('-')[-1]}.yaml")
        saved.write_text(new_text)
    accelerator.wait_for_everyone()


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def set_num_threads(requested: int, logger) -> int:
    """torch's intra-op threads: `run.num_threads`, else OMP_NUM_THREADS, else the cores this process may use
    shared among the processes on its node.

    More threads than free cores makes every operator wait for descheduled threads: with other work on a 2-core
    machine, two threads ran the demo's step 6x slower than one. The choice does not look at the machine's
    current load, so a resumed run uses the threads of the first one (and its floating-point reductions).
    """
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if requested:
        threads, why = requested, "run.num_threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads = max(1, available_cores() // processes)
        why = (f"{available_cores()} cores / {processes} process(es) on this node; on a machine shared with other "
               "work set run.num_threads lower")
    torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) per process (%s)", threads, why)
    return threads


class Progress:
    """A progress bar on a terminal; in a log file (a cluster job) one line every `every` steps, at most one
    per `min_interval` seconds, instead of a bar redrawn at every step."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool, logger, min_interval: float = 30.0):
        self.total, self.every, self.logger, self.min_interval = total, every, logger, min_interval
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=not self.interactive)
        self.enabled, self.start_step, self.start_time, self.last_line = enabled, initial, time.time(), 0.0
        self.values: dict = {}

    def set_values(self, values: dict) -> None:
        """The averages just logged, shown in the bar or the next line."""
        self.values = {k.split("/")[-1]: v for k, v in values.items()}
        if self.interactive:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.values.items()}, refresh=False)

    def update(self, step: int) -> None:
        if self.interactive:
            self.bar.update(step - self.bar.n)
            return
        now = time.time()
        due = step % self.every == 0 and now - self.last_line >= self.min_interval
        if not self.enabled or not (due or step == self.total or self.last_line == 0.0):
            return
        self.last_line = now
        rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
        left = time.strftime("%H:%M:%S", time.gmtime((self.total - step) / rate)) if rate > 0 else "?"
        shown = "".join(f" {k}={v:.4g}" for k, v in self.values.items())
        self.logger.info("step %d/%d%s, %.2f steps/s, %s left", step, self.total, shown, rate, left)

    def close(self) -> None:
        self.bar.close()


class StopSignals:
    """SIGTERM, SIGUSR1 (what SLURM sends ahead of a time limit or preemption) and SIGINT (Ctrl-C) ask the run
    to stop after the current optimizer step with a checkpoint; a second Ctrl-C aborts at once.

    Used as a context manager around the training loop; the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, logger):
        self.logger, self.received, self.previous = logger, "", {}

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name
        self.logger.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again aborts now)",
                            signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """Whether any process received a stop signal. All processes get the same answer at the same step,
        or one would wait forever in the checkpoint's collectives for the others."""
        if accelerator.num_processes == 1:
            return bool(self.received)
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def stopped_before_the_end(step: int, cfg: Config, model, logger, metrics_log, reason: str) -> bool:
    """After the loop: log a checksum of the weights and buffers (DEBUG, compared across ranks in tests); when the
    run stopped before training.max_steps, say why and how to continue, and close the log."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    logger.debug("weights checksum %.10e", sum(float(t.detach().double().sum()) for t in tensors))
    if step >= cfg.training.max_steps:
        return False
    logger.info("stopped at step %d (%s) with a checkpoint; rerun the same command to continue", step, reason)
    metrics_log.close()
    return True


def checkpoint_if_due(step: int, start_step: int, cfg: Config, accelerator, checkpoints: Path, model, optimizer,
                      lr_scheduler, ema, state: dict, running, stop: StopSignals,
                      extra: Optional[dict] = None) -> str:
    """Save at training.checkpoint_every, at the last step and when this invocation ends early; returns why it
    ends now (training.stop_after, or the stop signal's name), or "" to go on."""
    reason = ""
    if cfg.training.stop_after > 0 and step - start_step >= cfg.training.stop_after:
        reason = "training.stop_after"
    elif step < cfg.training.max_steps and stop.requested(accelerator):
        reason = stop.received or "a stop signal on another process"
    if step % cfg.training.checkpoint_every == 0 or step == cfg.training.max_steps or reason:
        state["step"] = step
        state["running"] = running.state_dict()
        save_checkpoint(accelerator, checkpoints, step, model, optimizer, lr_scheduler, ema, state,
                        cfg.training.keep_last, extra)
    return reason
