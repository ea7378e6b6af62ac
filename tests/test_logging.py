"""Trackers: the offline wandb run, TensorBoard and metrics.csv hold the same metrics at the same global steps."""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

from tests.runs import read_metrics, run_script, tiny_args

WANDB_HEADER = 7  # b":W&B", magic 0xBEE1, version byte
BLOCK = 32768  # LevelDB log block; a chunk header never straddles two blocks
FULL, LAST = 1, 4  # chunk types: a record is FULL, or FIRST, MIDDLE..., LAST


def read_wandb_history(path: Path) -> dict[int, dict[str, object]]:
    """step -> logged values of an offline `.wandb` file: wandb's protobuf Records in a LevelDB-style log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    history, record, pos = {}, b"", WANDB_HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert checksum == zlib.crc32(bytes([kind]) + chunk), f"corrupt chunk at byte {pos} of {path}"
        record, pos = record + chunk, pos + 7 + length
        if kind not in (FULL, LAST):
            continue
        message = wandb_internal_pb2.Record.FromString(record)
        record = b""
        if message.WhichOneof("record_type") == "history":
            values = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                      for item in message.history.item}
            history[int(values["_step"])] = values
    return history


def test_wandb_offline_tensorboard_and_csv_share_steps_and_values(tmp_path, demo_root):
    # WANDB_MODE in the environment would disable wandb; logging.wandb_mode (offline by default) wins.
    run = tmp_path / "run"
    result = run_script("train_diffusion.py", tiny_args(run, demo_root, "logging.trackers=[csv,tensorboard,wandb]",
                                                        "training.max_steps=4", "validation.sample_every=4"),
                        env={"WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((run / "logs").rglob("offline-run-*/*.wandb"))
    assert len(files) == 1, "no offline wandb run written"
    history = read_wandb_history(files[0])

    rows = [(s, n, v if n.endswith("_items") else float(v)) for s, n, v in read_metrics(run)]  # item ids are text
    csv_steps = sorted({s for s, n, _ in rows if n == "train/loss"})
    assert csv_steps == [2, 4] and {s for s, n, _ in rows if n == "val/loss"} == {4}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train/loss")}) == csv_steps
    # Every CSV row is in the wandb history at the same step, with the same value (the CSV keeps 8 digits).
    for step, name, value in rows:
        assert step in history and name in history[step], (step, name, sorted(history))
        if isinstance(value, str):
            assert history[step][name] == value, (step, name)
        else:
            assert math.isclose(history[step][name], value, rel_tol=1e-6, abs_tol=1e-12), (step, name)
    # Nothing else but the sample figure, logged at the step of the validation that drew it.
    scalars = {(s, n) for s, values in history.items() for n in values if not n.startswith("_") and "." not in n}
    assert scalars == {(s, n) for s, n, _ in rows}
    assert [(s, values.get("samples._type")) for s, values in history.items() if "samples._type" in values] == [
        (4, "image-file")]
