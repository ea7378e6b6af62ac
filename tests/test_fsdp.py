"""FSDP where a CPU can test it: torch FSDP2 on gloo with the wrap classes of configs/accelerate/fsdp.yaml, and
the full-state-dict checkpoint round trip of utils/checkpoint.py (Accelerate itself never enables FSDP on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.runs import REPO


def test_fsdp2_sharded_training_state_saves_and_resumes_exactly(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
               str(REPO / "tests" / "fsdp_checkpoint_probe.py"), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"result-rank{rank}.json").read_text())
        assert report["ok"] and report["wrapped_modules"] > 0
    assert (tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors").is_file()
