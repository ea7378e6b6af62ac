"""training.keep_last: saving a checkpoint removes exactly the oldest ones, by step number."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from utils.checkpoint import save_checkpoint


@pytest.fixture
def save(tmp_path):
    """save(step, keep_last) for a tiny model on one process (a stand-in for the Accelerator)."""
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, scaler=None)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"

    def save(step: int, keep_last: int) -> set[str]:
        save_checkpoint(accelerator, root, step, model, optimizer, lr_scheduler, None, {}, keep_last)
        return {p.name for p in root.iterdir()}

    return save, root


def test_keep_last_removes_exactly_the_oldest_checkpoints(save):
    save, root = save
    (root / "best-val_loss").mkdir(parents=True)  # not a checkpoint-<step>: never pruned
    assert save(5, 2) == {"best-val_loss", "checkpoint-5"}
    assert save(50, 2) == {"best-val_loss", "checkpoint-5", "checkpoint-50"}
    # Numeric order: "checkpoint-100" sorts before "checkpoint-5" and "checkpoint-50" as text.
    assert save(100, 2) == {"best-val_loss", "checkpoint-50", "checkpoint-100"}
    assert save(200, 2) == {"best-val_loss", "checkpoint-100", "checkpoint-200"}
    # Saving the newest step again (the last step after a resume) replaces it and removes nothing else.
    assert save(200, 2) == {"best-val_loss", "checkpoint-100", "checkpoint-200"}
    assert save(300, 3) == {"best-val_loss", "checkpoint-100", "checkpoint-200", "checkpoint-300"}
    assert save(400, 1) == {"best-val_loss", "checkpoint-400"}


def test_keep_last_zero_keeps_every_checkpoint(save):
    save, _ = save
    for step in (1, 2, 3):
        kept = save(step, 0)
    assert kept == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
