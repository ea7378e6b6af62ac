"""data/tiles.py and the IHC demo: tiling, tissue filter, class distributions, splits, balance, bad input.

Real data: scikit-image's immunohistochemistry image (the demo cuts it into four labelled images and one
unlabelled one).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.color import rgb2hed, rgb2hsv
from skimage.data import immunohistochemistry
from skimage.filters import threshold_otsu
from torch.utils.data import DataLoader, WeightedRandomSampler

from data import TileDataset, balanced_weights, build_datasets, build_ihc_demo, load_tile_dataset, random_flip
from data.demo import ihc_classes
from utils.config import ConfigError, DataConfig
from utils.logging import get_logger

TILE = 32
LABELLED = ["ihc_q0", "ihc_q1", "ihc_q2", "ihc_q3"]


def make_cfg(root: Path, **overrides) -> DataConfig:
    settings = dict(kind="tiles", root=str(root), tile_size=TILE, image_size=TILE, min_tissue=0.5, tile_classes=3)
    settings.update(overrides)
    return DataConfig(**settings)


def read_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))  # a writable copy


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def origin_of(item_id: str) -> tuple[int, int]:
    y, x = re.fullmatch(r"[^/]+/y(\d{5})_x(\d{5})", item_id).groups()
    return int(y), int(x)


@pytest.fixture(scope="session")
def ihc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ihc") / "demo_ihc"
    build_ihc_demo(root)
    return root


@pytest.fixture(scope="session")
def ihc_tiles(ihc_root) -> TileDataset:
    """All tiles of the demo: 32 px, half-overlapping, so that every class dominates some tiles."""
    return load_tile_dataset(make_cfg(ihc_root, tile_stride=16))


@pytest.fixture
def capture_log():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    get_logger().addHandler(handler)
    yield records
    get_logger().removeHandler(handler)


# ---------------------------------------------------------------------------------------------------------
# Demo


def test_demo_pieces_and_stain_classes(ihc_root):
    assert sorted(p.name for p in ihc_root.parent.iterdir()) == [ihc_root.name]  # no temp folder left
    expected = {f"{n}.png" for n in LABELLED} | {f"{n}_mask.png" for n in LABELLED} | {"ihc_extra.png"}
    assert {p.name for p in ihc_root.iterdir()} == expected
    # The pieces tile the original image exactly, so no tissue is in two images.
    pieces = {name: read_png(ihc_root / f"{name}.png") for name in [*LABELLED, "ihc_extra"]}
    left = np.concatenate([np.concatenate([pieces["ihc_q0"], pieces["ihc_q1"]], 1),
                           np.concatenate([pieces["ihc_q2"], pieces["ihc_q3"]], 1)], 0)
    original = immunohistochemistry()
    assert np.array_equal(np.concatenate([left, pieces["ihc_extra"]], 1), original)
    masks = np.concatenate([np.concatenate([read_png(ihc_root / f"ihc_q{i}_mask.png") for i in (0, 1)], 1),
                            np.concatenate([read_png(ihc_root / f"ihc_q{i}_mask.png") for i in (2, 3)], 1)], 0)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1, 2}
    shares = [(masks == k).mean() for k in range(3)]
    assert all(0.1 < share < 0.7 for share in shares), shares
    # The classes mean what they say: DAB density highest in class 2, haematoxylin in class 1, and the
    # background (class 0) is the palest.
    hed = rgb2hed(left)
    dab, haematoxylin = hed[..., 2], hed[..., 0]
    assert dab[masks == 2].mean() > 2 * max(dab[masks == 1].mean(), dab[masks == 0].mean())
    assert haematoxylin[masks == 1].mean() > 1.3 * max(haematoxylin[masks == 2].mean(), haematoxylin[masks == 0].mean())
    brightness = left.astype(float).mean(-1)
    assert brightness[masks == 0].mean() > brightness[masks != 0].mean() + 20


def test_demo_is_built_on_first_use_through_build_datasets(tmp_path):
    root = tmp_path / "fresh" / "demo_ihc"  # the demo builds only into a folder of its own name
    cfg = make_cfg(root, demo="ihc")
    datasets = build_datasets(cfg, tmp_path / "run", seed=0)
    assert (root / "ihc_q0_mask.png").is_file() and (root / "ihc_extra.png").is_file()
    assert sorted(p.name for p in root.parent.iterdir()) == ["demo_ihc"]
    assert len(datasets["train"]) > 0 and len(datasets["val"]) > 0
    stamp = (root / "ihc_q0.png").stat().st_mtime_ns
    again = build_datasets(cfg, tmp_path / "run", seed=0)  # reuses both the demo folder and split.json
    assert (root / "ihc_q0.png").stat().st_mtime_ns == stamp
    assert again["val"].item_ids == datasets["val"].item_ids


# ---------------------------------------------------------------------------------------------------------
# Tiling, tissue filter, items


def expected_tiles(root: Path, tile: int, stride: int, min_tissue: float) -> list[str]:
    """Tile ids recomputed with skimage's HSV and plain loops over the grid."""
    ids = []
    for path in sorted(p for p in root.glob("*.png") if not p.stem.endswith("_mask")):
        rgb = read_png(path)
        sat = rgb2hsv(rgb)[..., 1]
        tissue = sat > threshold_otsu(sat)
        for y in range(0, rgb.shape[0] - tile + 1, stride):
            for x in range(0, rgb.shape[1] - tile + 1, stride):
                if tissue[y:y + tile, x:x + tile].mean() >= min_tissue:
                    ids.append(f"{path.stem}/y{y:05d}_x{x:05d}")
    return ids


@pytest.mark.parametrize("tile, stride, min_tissue, image_size", [(32, 0, 0.5, 32), (48, 20, 0.3, 24)])
def test_tiles_are_the_grid_positions_that_pass_the_tissue_filter(ihc_root, tile, stride, min_tissue, image_size):
    cfg = make_cfg(ihc_root, tile_size=tile, tile_stride=stride, min_tissue=min_tissue, image_size=image_size)
    dataset = load_tile_dataset(cfg)
    expected = expected_tiles(ihc_root, tile, stride or tile, min_tissue)
    assert dataset.item_ids == expected
    positions = sum(len(range(0, h - tile + 1, stride or tile)) * len(range(0, w - tile + 1, stride or tile))
                    for h, w in [(256, 192)] * 4 + [(512, 128)])
    assert 0.2 * positions < len(expected) < 0.9 * positions  # the filter does filter
    images = dataset.arrays["image"]
    assert images.shape == (len(expected), 3, image_size, image_size) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Each tile shows its place in the source image.
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        name = dataset.item_ids[index].split("/")[0]
        y, x = origin_of(dataset.item_ids[index])
        crop = read_png(ihc_root / f"{name}.png")[y:y + tile, x:x + tile]
        reference = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1
        if image_size == tile:
            assert torch.equal(dataset[index]["image"], reference)
        else:  # antialiased: the colour means survive the resizing
            assert torch.allclose(dataset[index]["image"].mean((1, 2)), reference.mean((1, 2)), atol=0.01)


def test_saturation_matches_skimage_hsv(ihc_root):
    from data.tiles import saturation
    rgb = read_png(ihc_root / "ihc_q3.png")
    assert np.allclose(saturation(rgb), rgb2hsv(rgb)[..., 1], atol=1e-6)
    black = np.zeros((4, 4, 3), np.uint8)
    assert np.array_equal(saturation(black), np.zeros((4, 4), np.float32))


def test_items_class_distributions_and_unlabelled_tiles(ihc_root, ihc_tiles):
    item = ihc_tiles[0]
    assert set(item) == {"image", "mask", "class_dist", "labelled", "item_id"}
    assert item["image"].shape == (3, TILE, TILE) and item["mask"].shape == (1, TILE, TILE)
    assert item["mask"].dtype == torch.int64 and item["class_dist"].dtype == torch.float32
    assert item["class_dist"].shape == (3,) and item["labelled"].dtype == torch.bool and item["labelled"].dim() == 0
    assert ihc_tiles.data_range == 2.0 and ihc_tiles.image_names == ["image"] and ihc_tiles.mask_names == ["mask"]
    assert json.loads(json.dumps(ihc_tiles.normalization)) == {"method": "rgb_uint8", "range": [-1, 1]}

    names = [i.split("/")[0] for i in ihc_tiles.item_ids]
    labelled = ihc_tiles.arrays["labelled"]
    assert labelled.tolist() == [n != "ihc_extra" for n in names]
    dist = ihc_tiles.arrays["class_dist"]
    # Labelled: the class fractions of the tile's own mask pixels, summing to 1.
    assert torch.allclose(dist[labelled].sum(1), torch.ones(int(labelled.sum())))
    masks = {name: read_png(ihc_root / f"{name}_mask.png") for name in LABELLED}
    for index in np.flatnonzero(labelled.numpy())[::7]:
        name, (y, x) = names[index], origin_of(ihc_tiles.item_ids[index])
        crop = masks[name][y:y + TILE, x:x + TILE]
        fractions = np.bincount(crop.ravel(), minlength=3) / crop.size
        assert np.allclose(dist[index].numpy(), fractions, atol=1e-6)
        assert np.array_equal(ihc_tiles[index]["mask"][0].numpy(), crop)
        assert ihc_tiles.dominant_class[index] == int(np.argmax(fractions))
    # Unlabelled: zero vector, zero mask, dominant class -1.
    assert not dist[~labelled].any() and not ihc_tiles.arrays["mask"][~labelled].any()
    assert (ihc_tiles.dominant_class[~labelled] == -1).all() and (~labelled).sum() > 10
    assert set(ihc_tiles.dominant_class.tolist()) == {-1, 0, 1, 2}


def test_class_dist_is_measured_before_resizing(ihc_root):
    """With tiles resized 64 -> 16 px, class_dist stays the fractions of the 64x64 tile; the nearest-neighbour
    mask agrees roughly."""
    dataset = load_tile_dataset(make_cfg(ihc_root, tile_size=64, image_size=16))
    labelled = dataset.arrays["labelled"]
    mask = read_png(ihc_root / "ihc_q1_mask.png")
    index = next(i for i, item_id in enumerate(dataset.item_ids) if item_id.startswith("ihc_q1/"))
    y, x = origin_of(dataset.item_ids[index])
    crop = mask[y:y + 64, x:x + 64]
    assert np.allclose(dataset[index]["class_dist"].numpy(), np.bincount(crop.ravel(), minlength=3) / crop.size)
    small = dataset.arrays["mask"][labelled].flatten(1)
    small_dist = torch.stack([(small == k).float().mean(1) for k in range(3)], 1)
    assert (small_dist - dataset.arrays["class_dist"][labelled]).abs().max() < 0.15
    assert set(small.unique().tolist()) <= {0, 1, 2}


def test_tiff_rgba_and_palette_inputs_give_the_same_tiles(tmp_path, ihc_root):
    rgb, mask = read_png(ihc_root / "ihc_q2.png"), read_png(ihc_root / "ihc_q2_mask.png")
    reference = load_tile_dataset(make_cfg(_one_image(tmp_path / "png", rgb, mask)))
    tif = tmp_path / "tif"
    tif.mkdir()
    tifffile.imwrite(tif / "ihc_q2.tiff", rgb, compression="zlib")
    tifffile.imwrite(tif / "ihc_q2_mask.tif", mask)
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(rgba / "ihc_q2.png")
    Image.fromarray(mask).convert("P").save(rgba / "ihc_q2_mask.png")  # palette indices are the class ids
    assert Image.open(rgba / "ihc_q2_mask.png").mode == "P"
    for folder in (tif, rgba):
        other = load_tile_dataset(make_cfg(folder))
        assert other.item_ids == reference.item_ids
        assert all(torch.equal(other.arrays[k], reference.arrays[k]) for k in reference.arrays)


def _one_image(root: Path, rgb: np.ndarray, mask: np.ndarray | None, name: str = "ihc_q2") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / f"{name}_mask.png")
    return root


def test_default_collate_and_flips(ihc_tiles):
    batch = next(iter(DataLoader(ihc_tiles, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["image"].shape == (8, 3, TILE, TILE) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (8, 1, TILE, TILE) and batch["mask"].dtype == torch.int64
    assert batch["class_dist"].shape == (8, 3) and batch["labelled"].shape == (8,)
    assert batch["labelled"].dtype == torch.bool and len(batch["item_id"]) == 8
    torch.manual_seed(0)
    flipped = random_flip(batch, prob=1.0)
    assert torch.equal(flipped["image"], batch["image"].flip(-1))
    assert torch.equal(flipped["mask"], batch["mask"].flip(-1))
    assert torch.equal(flipped["class_dist"], batch["class_dist"])  # a flip does not change the fractions


# ---------------------------------------------------------------------------------------------------------
# Splits


def test_split_by_image_is_disjoint_reproducible_and_reused(tmp_path, ihc_root):
    cfg = make_cfg(ihc_root, val_fraction=0.25, test_fraction=0.25)
    datasets = build_datasets(cfg, tmp_path / "a", seed=3)
    split = read_json(tmp_path / "a" / "split.json")
    assert split["unit"] == "subject" and split["seed"] == 3
    assert (len(split["val"]), len(split["test"])) == (1, 1) and "ihc_extra" in split["train"]
    subjects = {name: set(datasets[name].subject_ids) for name in ("train", "val", "test")}
    assert subjects == {name: set(split[name]) for name in ("train", "val", "test")}
    assert sum(len(s) for s in subjects.values()) == 5 == len(set().union(*subjects.values()))
    assert all(datasets[n].arrays["labelled"].all() for n in ("val", "test"))  # held-out images have masks
    # Same seed, other run: the same split; other processes do not write the file.
    again = build_datasets(cfg, tmp_path / "b", seed=3, is_main_process=False)
    assert not (tmp_path / "b" / "split.json").exists()
    assert all(again[n].item_ids == datasets[n].item_ids for n in datasets)
    # The seed matters: over a few seeds, more than one image is held out for validation.
    assert len({build_datasets(cfg, tmp_path / f"s{s}", seed=s)["val"].subject_ids[0] for s in range(6)}) > 1
    # An existing split.json wins over the seed, and is validated.
    path = tmp_path / "a" / "split.json"
    split["train"].remove("ihc_extra")
    split["val"].append("ihc_extra")
    path.write_text(json.dumps(split))
    assert "ihc_extra" in build_datasets(cfg, tmp_path / "a", seed=99)["val"].subject_ids
    split["val"].append("slide-99")
    path.write_text(json.dumps(split))
    with pytest.raises(ConfigError, match=r"slide-99.*split\.json"):
        build_datasets(cfg, tmp_path / "a", seed=3)


@pytest.mark.parametrize("stride", [0, 16])
def test_single_labelled_image_is_split_by_row_bands_with_a_gap(tmp_path, ihc_root, capture_log, stride):
    rgb = immunohistochemistry()
    root = _one_image(tmp_path / "data", rgb, ihc_classes(rgb), name="whole")
    shutil.copy(ihc_root / "ihc_extra.png", root / "extra.png")  # unlabelled: always trains
    cfg = make_cfg(root, tile_stride=stride, val_fraction=0.2, test_fraction=0.2)
    datasets = build_datasets(cfg, tmp_path / "run", seed=1)
    split = read_json(tmp_path / "run" / "split.json")
    assert split["unit"] == "slice" and "row" in split["note"]
    assert any(r.levelno == logging.WARNING and "row" in r.getMessage() for r in capture_log)
    everything = load_tile_dataset(cfg).item_ids
    assert sorted(split["train"] + split["val"] + split["test"] + split["excluded_gap"]) == sorted(everything)
    assert all(i in split["train"] for i in everything if i.startswith("extra/"))
    rows = {name: {origin_of(i)[0] for i in split[name] if i.startswith("whole/")}
            for name in ("train", "val", "test", "excluded_gap")}
    all_rows = sorted({origin_of(i)[0] for i in everything if i.startswith("whole/")})
    for held_out in ("val", "test"):
        band = sorted(rows[held_out])
        assert band and band == all_rows[all_rows.index(band[0]):all_rows.index(band[-1]) + 1]  # contiguous
        # A whole tile of pixels between any training tile and any held-out tile.
        assert min(abs(t - h) for t in rows["train"] for h in band) >= 2 * TILE
        assert datasets[held_out].item_ids == split[held_out]
    assert rows["excluded_gap"]


# ---------------------------------------------------------------------------------------------------------
# Class balance


def test_balanced_weights_equalise_dominant_classes(ihc_tiles):
    weights = balanced_weights(ihc_tiles)
    dominant = ihc_tiles.dominant_class
    assert weights.shape == (len(ihc_tiles),) and (weights > 0).all()
    counts = torch.bincount(dominant[dominant >= 0])
    assert counts.max() > 5 * counts.min()  # the demo is imbalanced to begin with
    # In expectation every dominant class is drawn equally often...
    mass = torch.stack([weights[dominant == c].sum() for c in range(3)])
    assert torch.allclose(mass, mass.mean().expand(3), rtol=1e-9)
    # ...and unlabelled tiles as often as an average labelled tile.
    assert torch.allclose(weights[dominant == -1], weights[dominant >= 0].mean().expand(int((dominant == -1).sum())))
    sampler = WeightedRandomSampler(weights, 30000, generator=torch.Generator().manual_seed(0))
    drawn = dominant[torch.tensor(list(sampler))]
    shares = torch.bincount(drawn[drawn >= 0], minlength=3).double() / (drawn >= 0).sum()
    assert (shares - 1 / 3).abs().max() < 0.02
    unlabelled = ihc_tiles.subset([i for i in ihc_tiles.item_ids if i.startswith("ihc_extra/")])
    assert torch.equal(balanced_weights(unlabelled), torch.ones(len(unlabelled), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Bad input: one-line ConfigError naming the file or key


def _demo_copy(root: Path, ihc_root: Path, names=("ihc_q0", "ihc_q1")) -> None:
    for name in names:
        for suffix in (".png", "_mask.png"):
            shutil.copy(ihc_root / f"{name}{suffix}", root / f"{name}{suffix}")


def case_missing_root(root, ihc_root):
    return make_cfg(root / "nowhere"), r"data\.root.*nowhere"


def case_no_images(root, ihc_root):
    (root / "notes.txt").write_text("no images here")
    return make_cfg(root), rf"no images in {re.escape(str(root))}"


def case_truncated_png(root, ihc_root):
    _demo_copy(root, ihc_root)
    path = root / "ihc_q1.png"
    path.write_bytes(path.read_bytes()[:20000])
    return make_cfg(root), r"cannot read image file ihc_q1\.png"


def case_garbage_tif(root, ihc_root):
    _demo_copy(root, ihc_root)
    (root / "slide.tif").write_bytes(b"not a tiff " * 100)
    return make_cfg(root), r"cannot read image file slide\.tif"


def case_truncated_tif(root, ihc_root):
    _demo_copy(root, ihc_root)
    tifffile.imwrite(root / "slide.tif", read_png(ihc_root / "ihc_q2.png"), compression="zlib")
    data = (root / "slide.tif").read_bytes()
    (root / "slide.tif").write_bytes(data[:len(data) // 2])
    return make_cfg(root), r"cannot read image file slide\.tif"


def case_mask_shape(root, ihc_root):
    _demo_copy(root, ihc_root)
    mask = read_png(root / "ihc_q0_mask.png")
    Image.fromarray(mask[:-1]).save(root / "ihc_q0_mask.png")
    return make_cfg(root), re.escape("mask shape (255, 192) != image shape (256, 192) in ihc_q0_mask.png")


def case_label_too_large(root, ihc_root):
    _demo_copy(root, ihc_root)
    return make_cfg(root, tile_classes=2), r"mask label 2 >= data\.tile_classes 2 in ihc_q0_mask\.png"


def case_rgb_mask(root, ihc_root):
    _demo_copy(root, ihc_root)
    Image.open(root / "ihc_q1_mask.png").convert("RGB").save(root / "ihc_q1_mask.png")
    return make_cfg(root), r"mode 'RGB' in ihc_q1_mask\.png"


def case_float_tif_mask(root, ihc_root):
    _demo_copy(root, ihc_root)
    (root / "ihc_q1_mask.png").unlink()
    tifffile.imwrite(root / "ihc_q1_mask.tif", read_png(ihc_root / "ihc_q1_mask.png") + np.float32(0.5))
    return make_cfg(root), r"non-integer values in ihc_q1_mask\.tif"


def case_grey_image(root, ihc_root):
    _demo_copy(root, ihc_root)
    Image.open(root / "ihc_q0.png").convert("L").save(root / "ihc_q0.png")
    return make_cfg(root), r"greyscale \(mode 'L'\) in ihc_q0\.png"


def case_16_bit_tif(root, ihc_root):
    _demo_copy(root, ihc_root)
    tifffile.imwrite(root / "scan.tif", read_png(ihc_root / "ihc_q2.png").astype(np.uint16) * 257)
    return make_cfg(root), r"uint16 pixels in scan\.tif"


def case_orphan_mask(root, ihc_root):
    _demo_copy(root, ihc_root)
    shutil.copy(root / "ihc_q0_mask.png", root / "ghost_mask.png")
    return make_cfg(root), r"mask ghost_mask\.png has no image ghost"


def case_same_name_twice(root, ihc_root):
    _demo_copy(root, ihc_root)
    tifffile.imwrite(root / "ihc_q0.tif", read_png(ihc_root / "ihc_q0.png"))
    return make_cfg(root), r"'ihc_q0' has two images .*ihc_q0\.png and ihc_q0\.tif"


def case_filtered_empty(root, ihc_root):
    _demo_copy(root, ihc_root)
    return make_cfg(root, tile_size=128, min_tissue=1.0), r"no tiles left after the tissue filter.*data\.min_tissue"


def case_tile_larger_than_images(root, ihc_root):
    _demo_copy(root, ihc_root)
    return make_cfg(root, tile_size=300), r"smaller than data\.tile_size \(300 px\)"


def case_bad_tile_size(root, ihc_root):
    return make_cfg(root, tile_size=0), r"data\.tile_size must be positive"


def case_demo_of_other_kind(root, ihc_root):
    return make_cfg(root / "new", demo="ihc", kind="nifti"), r"data\.demo 'ihc'.*data\.kind=tiles"


def case_unknown_kind(root, ihc_root):
    return make_cfg(root, kind="slides"), r"data\.kind must be one of nifti, tiles, class_folders, got 'slides'"


def case_empty_train(root, ihc_root):
    _demo_copy(root, ihc_root)
    return make_cfg(root, val_fraction=0.8), r"data\.val_fraction.*no training subject"


def case_one_image_too_small_for_bands(root, ihc_root):
    _demo_copy(root, ihc_root, names=("ihc_q3",))
    return make_cfg(root, tile_size=64), r"rows of tiles in ihc_q3 are too few for a row-band split.*data\.val_fraction"


@pytest.mark.parametrize("case", [value for name, value in sorted(globals().items()) if name.startswith("case_")],
                         ids=lambda case: case.__name__[5:])
def test_bad_input_raises_config_error(tmp_path, ihc_root, case):
    root = tmp_path / "data"
    root.mkdir()
    cfg, pattern = case(root, ihc_root)
    with pytest.raises(ConfigError, match=pattern) as error:
        build_datasets(cfg, tmp_path / "run", seed=0)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "split.json").exists()
