"""Seeded train/val/test splits stored in split.json: by subject, or by contiguous slabs with one subject.

split.json = {"unit": "subject" | "slice" | "image", "seed": int, "note": str, "train": [...], "val": [...],
"test": [...], "excluded_gap": [...] (slice unit only)}; subject units list subject ids, slice and image units
(class-folder images, data/class_folders.py) item ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

ITEM_UNITS = ("slice", "image")  # splits that list item ids rather than subjects

import numpy as np

from data.nifti import slice_index_of, subject_of
from utils.config import ConfigError
from utils.logging import get_logger

SPLITS = ("train", "val", "test")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be "
                          f">= 0 and sum to less than 1")


def split_by_subject(subject_ids: Sequence[str], val_fraction: float, test_fraction: float,
                     seed: int) -> dict:
    """Shuffle subjects with `seed` and deal them out; at least one val subject when there are two or more."""
    _check_fractions(val_fraction, test_fraction)
    count = len(subject_ids)
    num_val = max(1, round(count * val_fraction))
    num_test = round(count * test_fraction)
    if test_fraction > 0 and count - num_val >= 2:
        num_test = max(1, num_test)
    if count - num_val - num_test < 1:
        raise ConfigError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) leave no "
                          f"training subject out of {count}")
    if test_fraction > 0 and num_test == 0:
        get_logger().warning("data.test_fraction=%g: %d subjects are too few for a test subject beside the "
                             "validation and training ones; the test split is empty", test_fraction, count)
    order = [subject_ids[i] for i in np.random.default_rng(seed).permutation(count)]
    val, test, train = order[:num_val], order[num_val:num_val + num_test], order[num_val + num_test:]
    note = (f"split by subject with seed {seed}: {len(train)} train, {len(val)} val, {len(test)} test "
            f"subjects")
    return {"unit": "subject", "seed": seed, "note": note, "train": sorted(train), "val": sorted(val),
            "test": sorted(test)}


def split_by_slab(item_ids: Sequence[str], val_fraction: float, test_fraction: float, gap: int,
                  seed: int, multiple: int = 1) -> dict:
    """Split one subject's slices into contiguous slabs at seeded positions, leaving `gap` slices out on
    each side of every held-out slab so that neighbouring (near-identical) slices do not leak into training.

    Args:
        multiple: held-out slabs are rounded up to a multiple of this many slices (3D items of that depth).
    """
    _check_fractions(val_fraction, test_fraction)
    if gap < 0:
        raise ConfigError(f"data.slab_gap must be >= 0, got {gap}")
    items = sorted(item_ids, key=slice_index_of)
    count = len(items)
    def slab(fraction: float) -> int:
        return -(-max(1, round(count * fraction)) // multiple) * multiple

    held_out = [("val", slab(val_fraction))]
    if test_fraction > 0:
        held_out.append(("test", slab(test_fraction)))
    free = count - sum(size for _, size in held_out) - 2 * gap * len(held_out)
    if free < 1:
        raise ConfigError(f"{count} slices are too few for a slab split with data.slab_gap={gap}, "
                          f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: lower them")
    rng = np.random.default_rng(seed)
    held_out = [held_out[i] for i in rng.permutation(len(held_out))]
    # Stars and bars: the training slices fall into len(held_out) + 1 runs around the held-out slabs.
    cuts = np.sort(rng.integers(0, free + 1, size=len(held_out)))
    runs = np.diff(np.concatenate([[0], cuts, [free]])).tolist()
    labels = ["train"] * runs[0]
    for (name, size), run in zip(held_out, runs[1:]):
        labels += ["excluded_gap"] * gap + [name] * size + ["excluded_gap"] * gap + ["train"] * run
    split = {name: [item for item, label in zip(items, labels) if label == name] for name in SPLITS}
    subject = subject_of(items[0])
    note = (f"one subject ('{subject}'): split by contiguous slabs of slices with seed {seed}, leaving "
            f"{gap} slices out on each side of every held-out slab; neighbouring slices still correlate, "
            f"so held-out scores are optimistic")
    return {"unit": "slice", "seed": seed, "note": note, **split, "excluded_gap":
            [item for item, label in zip(items, labels) if label == "excluded_gap"]}


def make_split(item_ids: Sequence[str], val_fraction: float, test_fraction: float, gap: int,
               seed: int, multiple: int = 1) -> dict:
    """Split by subject, or by slabs (with a warning) when all items come from one subject."""
    subjects = list(dict.fromkeys(subject_of(i) for i in item_ids))
    if len(subjects) >= 2:
        return split_by_subject(subjects, val_fraction, test_fraction, seed)
    split = split_by_slab(item_ids, val_fraction, test_fraction, gap, seed, multiple)
    get_logger().warning(split["note"])
    return split


def read_split(path: Path, item_ids: Sequence[str], settings: Optional[dict] = None) -> dict:
    """Read split.json and check that it still describes this data and these split settings.

    Every subject or item it names must exist, every one of the data must be listed, and the settings it was
    made with (recorded under "settings") must equal `settings`: a split that changes within a run would
    move held-out data into training.
    """
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(split, dict) or split.get("unit") not in ("subject", *ITEM_UNITS):
        raise ConfigError(f"{path} must hold an object with \"unit\": \"subject\", \"slice\" or \"image\"")
    known = set(item_ids) if split["unit"] in ITEM_UNITS else {subject_of(i) for i in item_ids}
    seen: dict[str, str] = {}
    for name in (*SPLITS, "excluded_gap"):
        if name in ("train", "val") and not isinstance(split.get(name), list):
            raise ConfigError(f"{path} has no '{name}' list")
        split.setdefault(name, [])
        for entry in split[name]:
            if entry not in known:
                raise ConfigError(f"{split['unit']} '{entry}' in the '{name}' list of {path} is not in the "
                                  f"dataset (deleted, renamed or filtered out?)")
            if entry in seen:
                raise ConfigError(f"{split['unit']} '{entry}' is in both '{seen[entry]}' and '{name}' in {path}")
            seen[entry] = name
    unlisted = sorted(known - set(seen))
    if unlisted:
        raise ConfigError(f"the data has {len(unlisted)} {split['unit']}(s) that {path} does not list (e.g. "
                          f"'{unlisted[0]}'): the data changed since the split was made; use a new run.output_dir")
    for key, value in (settings or {}).items():
        made_with = split.get("settings", {}).get(key, value)
        if made_with != value:
            raise ConfigError(f"{path} was made with {key}={made_with} but the config says {value}: set it back, "
                              "or use a new run.output_dir (a run keeps its split)")
    return split


def write_split(path: Path, split: dict) -> None:
    """Write split.json atomically (temp file, then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(split, indent=1) + "\n")
    os.replace(temporary, path)


def items_of_split(split: dict, item_ids: Sequence[str]) -> dict[str, list[str]]:
    """The item ids of each split, in dataset order."""
    unit_of = (lambda i: i) if split["unit"] in ITEM_UNITS else subject_of
    members = {name: set(split.get(name, [])) for name in SPLITS}
    return {name: [i for i in item_ids if unit_of(i) in members[name]] for name in SPLITS}
