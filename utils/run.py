"""The start every training script shares: Accelerate with trackers, launch checks, logging, resume point."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from utils.checkpoint import prepare_run_dir, remove_incomplete, resolve_resume, save_checkpoint
from utils.config import Config
from utils.distributed import check_launch
from utils.logging import setup_logging
from utils.tracking import accelerate_trackers


def start_training_run(cfg: Config):
    """Accelerator, logger, run directory, its checkpoints folder and the checkpoint to resume (or None).

    Leftovers of a process killed while saving are removed first, so `training.resume=auto` only ever sees
    complete checkpoints; a fresh run on top of an existing one is refused before anything is written.
    """
    run_dir = Path(cfg.run.output_dir)
    trackers = accelerate_trackers(cfg.logging)
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, log_with=trackers or None,
                              project_dir=str(run_dir / "logs"))
    check_launch(accelerator)
    logger = setup_logging(cfg.run.log_level, accelerator.is_main_process)
    checkpoints = run_dir / "checkpoints"
    if accelerator.is_main_process:
        remove_incomplete(checkpoints)
    accelerator.wait_for_everyone()
    resume_from: Optional[Path] = resolve_resume(cfg.training.resume, checkpoints)
    prepare_run_dir(run_dir, resume_from, cfg, accelerator.is_main_process)
    return accelerator, logger, run_dir, checkpoints, resume_from


def stopped_before_the_end(step: int, cfg: Config, model, logger, metrics_log) -> bool:
    """After the loop: log a weights checksum (DEBUG, compared across ranks in tests); when training.stop_after
    ended this invocation before training.max_steps, say how to continue and close the log."""
    logger.debug("weights checksum %.10e", sum(float(p.detach().double().sum()) for p in model.parameters()))
    if step >= cfg.training.max_steps:
        return False
    logger.info("stopped at step %d (training.stop_after); rerun the same command to continue", step)
    metrics_log.close()
    return True


def checkpoint_if_due(step: int, start_step: int, cfg: Config, accelerator, checkpoints: Path, model, optimizer,
                      lr_scheduler, ema, state: dict, running, extra: Optional[dict] = None) -> bool:
    """Save at training.checkpoint_every, at the last step and when training.stop_after ends this invocation;
    returns whether it ends now."""
    stopping = cfg.training.stop_after > 0 and step - start_step >= cfg.training.stop_after
    if step % cfg.training.checkpoint_every == 0 or step == cfg.training.max_steps or stopping:
        state["step"] = step
        state["running"] = running.state_dict()
        save_checkpoint(accelerator, checkpoints, step, model, optimizer, lr_scheduler, ema, state,
                        cfg.training.keep_last, extra)
    return stopping
