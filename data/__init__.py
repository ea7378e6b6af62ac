"""Datasets: 2D slices of NIfTI volumes, their seeded split, demo data and augmentation."""
from __future__ import annotations

from pathlib import Path

from data.demo import build_mni152_demo
from data.nifti import SliceDataset, load_slice_dataset, random_flip
from data.split import items_of_split, make_split, read_split, write_split
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

DEMOS = {"mni152": build_mni152_demo}

__all__ = ["SliceDataset", "build_datasets", "build_mni152_demo", "load_slice_dataset", "random_flip"]


def build_datasets(cfg: DataConfig, run_dir: Path, seed: int, *,
                   is_main_process: bool = True) -> dict[str, SliceDataset]:
    """Build {"train", "val"[, "test" when cfg.test_fraction > 0]} slice datasets split as <run_dir>/split.json.

    The split file is reused when present (resume) and otherwise created from `seed`; only the main process
    writes it, the others compute the same split, so processes never race on the file.

    Args:
        cfg: the data section of the config.
        run_dir: the run directory that holds split.json.
        seed: seeds a new split (ignored when split.json exists).
        is_main_process: whether this process may write split.json.
    """
    logger = get_logger()
    root = Path(cfg.root)
    if cfg.demo and cfg.demo not in DEMOS:
        raise ConfigError(f"data.demo: unknown demo '{cfg.demo}' (known: {', '.join(DEMOS)})")
    if cfg.demo and not root.exists():
        DEMOS[cfg.demo](root)
    dataset = load_slice_dataset(cfg)

    # Split.
    split_path = Path(run_dir) / "split.json"
    if split_path.is_file():
        split = read_split(split_path, dataset.item_ids)
        source = str(split_path)
        logger.info("reusing the %s split in %s", split["unit"], split_path)
    else:
        split = make_split(dataset.item_ids, cfg.val_fraction, cfg.test_fraction, cfg.slab_gap, seed)
        source = "data.val_fraction / data.test_fraction"
        if is_main_process:
            write_split(split_path, split)
    items = items_of_split(split, dataset.item_ids)
    for name in ("train", "val"):
        if not items[name]:
            raise ConfigError(f"the {name} split is empty (no slices) according to {source}")
    names = ("train", "val", "test") if cfg.test_fraction > 0 else ("train", "val")
    datasets = {name: dataset.subset(items[name]) for name in names}
    logger.info("split (%s): %s", split["unit"],
                ", ".join(f"{len(datasets[n])} {n}" for n in names) + " slices")
    return datasets
