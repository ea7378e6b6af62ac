"""Datasets: 2D slices of NIfTI volumes, pathology tiles or class-folder images, their seeded split, demo data
and augmentation."""
from __future__ import annotations

from pathlib import Path

from data.class_folders import ClassFolderDataset, load_class_folders, make_class_split, random_rotation
from data.degrade import item_seed
from data.demo import build_ihc_classes_demo, build_ihc_demo, build_mni152_ct_demo, build_mni152_demo
from data.nifti import SliceDataset, load_slice_dataset, random_flip, subject_of
from data.split import items_of_split, make_split, read_split, write_split
from data.tiles import TileDataset, balanced_weights, load_tile_dataset, make_tile_split
from data.volumes import SubjectVolumes, VolumeDataset, random_patches
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

# data.kind -> what one item of the dataset is called in messages.
KINDS = {"nifti": "slices", "tiles": "tiles", "class_folders": "images"}
# data.demo -> (builder, the data.kind it builds).
DEMOS = {"mni152": (build_mni152_demo, "nifti"), "mni152_ct": (build_mni152_ct_demo, "nifti"),
         "ihc": (build_ihc_demo, "tiles"), "ihc_classes": (build_ihc_classes_demo, "class_folders")}
# data.demo -> the demo's own folder (the data.root its preset ships with). A demo is built only into a missing folder
# of that name, here or elsewhere (e.g. on a scratch disk), so that a mistyped data.root is refused, not silently
# replaced by the demo.
DEMO_ROOTS = {"mni152": "data/demo_mni152", "mni152_ct": "data/demo_mni152_ct", "ihc": "data/demo_ihc",
              "ihc_classes": "data/demo_ihc_classes"}

__all__ = ["ClassFolderDataset", "SliceDataset", "TileDataset", "VolumeDataset", "balanced_weights", "build_datasets",
           "build_ihc_classes_demo", "build_ihc_demo", "build_mni152_ct_demo", "build_mni152_demo", "augment",
           "load_class_folders", "load_slice_dataset", "load_tile_dataset", "random_flip", "random_rotation"]


def build_datasets(cfg: DataConfig, run_dir: Path, seed: int, *,
                   is_main_process: bool = True) -> dict[str, SliceDataset | TileDataset | ClassFolderDataset]:
    """Build {"train", "val"[, "test"]} datasets of cfg.kind ("nifti" slices, pathology "tiles" or
    "class_folders" images) split as <run_dir>/split.json; "test" exists when cfg.test_fraction > 0, or for
    class folders when <root>/test/ exists.

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
    if cfg.kind not in KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(KINDS)}, got '{cfg.kind}'")
    if cfg.demo:
        if cfg.demo not in DEMOS:
            raise ConfigError(f"data.demo: unknown demo '{cfg.demo}' (known: {', '.join(DEMOS)})")
        build_demo, demo_kind = DEMOS[cfg.demo]
        if demo_kind != cfg.kind:
            raise ConfigError(f"data.demo '{cfg.demo}' is a {demo_kind} dataset: set data.kind={demo_kind} "
                              f"(now '{cfg.kind}')")
        if not root.exists():
            check_demo_root(cfg.demo, root)
            build_demo(root)
    if cfg.kind == "tiles":
        dataset = load_tile_dataset(cfg)
    elif cfg.kind == "class_folders":
        dataset = load_class_folders(cfg)
    else:
        dataset = SubjectVolumes(cfg) if cfg.dims == 3 else load_slice_dataset(cfg)
    unit = KINDS[cfg.kind] if cfg.kind != "nifti" or cfg.dims == 2 else "volumes"

    # Split.
    split_path = Path(run_dir) / "split.json"
    # What a split is made from; its seed is recorded too but not compared, so a hand-edited split.json wins.
    settings = {"data.val_fraction": cfg.val_fraction, "data.test_fraction": cfg.test_fraction,
                "data.slab_gap": cfg.slab_gap}
    if cfg.kind == "class_folders":  # its test set is a folder and it has no slabs
        settings = {"data.val_fraction": cfg.val_fraction}
    if split_path.is_file():
        split = read_split(split_path, dataset.item_ids, settings)
        source = str(split_path)
        logger.info("reusing the %s split in %s", split["unit"], split_path)
    else:
        if cfg.kind == "tiles":
            split = make_tile_split(dataset, cfg, seed)
        elif cfg.kind == "class_folders":
            split = make_class_split(dataset, cfg.val_fraction, seed)
        else:
            # Held-out slabs of a single subject's volume hold whole 3D items of data.volume_shape[0] slices.
            multiple = cfg.volume_shape[0] if cfg.dims == 3 else 1
            split = make_split(dataset.item_ids, cfg.val_fraction, cfg.test_fraction, cfg.slab_gap, seed, multiple)
        source = "data.val_fraction" if cfg.kind == "class_folders" else "data.val_fraction / data.test_fraction"
        split["settings"] = settings
        if cfg.kind == "nifti" and cfg.degrade.kind:  # the seed each subject's degraded image was simulated with
            split["degradation_seeds"] = {subject: item_seed(cfg.degrade.seed, subject)
                                          for subject in dict.fromkeys(map(subject_of, dataset.item_ids))}
        if is_main_process:
            write_split(split_path, split)
    items = items_of_split(split, dataset.item_ids)
    for name in ("train", "val"):
        if not items[name]:
            raise ConfigError(f"the {name} split is empty (no {unit}) according to {source}")
    has_test = cfg.test_fraction > 0 or (cfg.kind == "class_folders" and bool(items["test"]))
    names = ("train", "val", "test") if has_test else ("train", "val")
    if isinstance(dataset, SubjectVolumes):
        datasets = {name: dataset.dataset(items[name], name) for name in names}
    else:
        datasets = {name: dataset.subset(items[name]) for name in names}
    logger.info("split (%s): %s (%s)", split["unit"],
                ", ".join(f"{len(datasets[n])} {n}" for n in names) + f" {unit}", split.get("note", ""))
    return datasets


def check_demo_root(demo: str, root: Path) -> None:
    """Refuse to build demo `demo` at a missing `root` that is not a folder of the demo's own name."""
    own = Path(DEMO_ROOTS[demo])
    if root.name != own.name:
        raise ConfigError(f"data.root={root} does not exist; data.demo={demo} builds the demo only into its own "
                          f"folder {own} (or another folder named {own.name}): for your data fix data.root and set "
                          f"data.demo='', for the demo leave data.root={own}")


def augment(batch: dict, cfg: DataConfig) -> dict:
    """Training-time changes to a collated batch on its device: random 3D patches, then left-right flips, then
    (class folders) random rotations."""
    if cfg.kind == "nifti" and cfg.dims == 3 and cfg.patch_size:
        batch = random_patches(batch, cfg.patch_size, cfg.patch_foreground, cfg.filter_mask or cfg.images[0],
                               0 if cfg.filter_mask else cfg.intensity_threshold)
    batch = random_flip(batch, cfg.flip_prob)
    if cfg.kind == "class_folders":
        batch = random_rotation(batch, cfg.rotate_degrees)
    return batch
