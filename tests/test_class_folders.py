"""data/class_folders.py and the IHC class-folder demo: loading, colours, normalisations, the stratified split,
class balance, augmentation, NIfTI images and refused input.

Real data: 32 px tiles of scikit-image's immunohistochemistry image, labelled by their dominant stain.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.data import immunohistochemistry
from torch.utils.data import DataLoader, WeightedRandomSampler

from data import augment, balanced_weights, build_datasets, build_ihc_classes_demo, load_class_folders, random_flip
from data.class_folders import IMAGENET_MEAN, IMAGENET_STD, LUMA_WEIGHTS, ClassFolderDataset, rotate
from data.demo import ihc_classes, ihc_tile_class
from utils.config import ConfigError, DataConfig, resolve
from utils.config_checks import check_config

CLASSES = ["dab", "haematoxylin", "little_stain"]
TRAIN_COUNTS = {"dab": 96, "haematoxylin": 62, "little_stain": 34}
TEST_COUNTS = {"dab": 23, "haematoxylin": 20, "little_stain": 21}
TILE = 32


def make_cfg(root: Path, **overrides) -> DataConfig:
    settings = dict(kind="class_folders", root=str(root), image_size=TILE, normalization="intensity", color="rgb")
    settings.update(overrides)
    return DataConfig(**settings)


def save_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def two_classes(root: Path, size: int = 8, per_class: int = 2) -> Path:
    """A minimal valid layout: train/a and train/b with `per_class` grey PNGs each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for k in range(per_class):
            save_png(root / "train" / name / f"{k}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ihc_classes") / "demo_ihc_classes"
    build_ihc_classes_demo(root)
    return root


@pytest.fixture(scope="session")
def demo_dataset(demo_root) -> ClassFolderDataset:
    return load_class_folders(make_cfg(demo_root))


# ---------------------------------------------------------------------------------------------------------
# Demo


def test_demo_tiles_follow_the_labelling_rule(demo_root):
    assert sorted(p.name for p in demo_root.parent.iterdir()) == [demo_root.name]  # no temp folder left
    record = json.loads((demo_root / "labels.json").read_text())
    assert record["counts"] == {"train": TRAIN_COUNTS, "test": TEST_COUNTS}
    rgb = immunohistochemistry()
    pixel_classes = ihc_classes(rgb)
    for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
        assert sorted(p.name for p in (demo_root / split).iterdir()) == CLASSES
        for name in CLASSES:
            files = sorted((demo_root / split / name).glob("*.png"))
            assert len(files) == counts[name]
            for path in files:
                y, x = map(int, re.fullmatch(r"y(\d{3})_x(\d{3})\.png", path.name).groups())
                window = (slice(y, y + TILE), slice(x, x + TILE))
                assert (y >= 384) == (split == "test")  # the bottom quarter is held out whole
                assert np.array_equal(np.asarray(Image.open(path)), rgb[window])
                assert ihc_tile_class(pixel_classes[window]) == name


def test_demo_classes_are_learnable_but_not_trivial(demo_dataset):
    """Nearest class mean of the tiles' mean colour: well above chance on test/, far from perfect."""
    images, labels = demo_dataset.arrays["image"], demo_dataset.arrays["label"]
    is_test = torch.tensor([i.startswith("test/") for i in demo_dataset.item_ids])
    colour = images.mean(dim=(2, 3))  # (N, 3)
    centres = torch.stack([colour[~is_test & (labels == c)].mean(0) for c in range(3)])
    predicted = torch.cdist(colour[is_test], centres).argmin(1)
    accuracy = (predicted == labels[is_test]).float().mean().item()
    chance = max(TEST_COUNTS.values()) / sum(TEST_COUNTS.values())
    assert chance + 0.2 < accuracy < 0.95


# ---------------------------------------------------------------------------------------------------------
# Loading


def test_items_classes_and_counts(demo_dataset, demo_root):
    assert demo_dataset.class_names == CLASSES and demo_dataset.num_classes == 3
    assert demo_dataset.image_names == ["image"]
    assert len(demo_dataset) == sum(TRAIN_COUNTS.values()) + sum(TEST_COUNTS.values())
    totals = [TRAIN_COUNTS[c] + TEST_COUNTS[c] for c in CLASSES]
    assert torch.bincount(demo_dataset.dominant_class).tolist() == totals
    item = demo_dataset[0]
    assert item["image"].shape == (3, TILE, TILE) and item["image"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.int64
    for index in (0, 100, 200, 255):
        item = demo_dataset[index]
        split, name, file_name = item["item_id"].split("/")
        assert CLASSES[int(item["label"])] == name and (demo_root / split / name / file_name).is_file()


@pytest.mark.parametrize("color,normalization", [("rgb", "intensity"), ("grey", "intensity"), ("rgb", "imagenet")])
def test_colours_and_normalisations(demo_dataset, demo_root, color, normalization):
    dataset = demo_dataset if (color, normalization) == ("rgb", "intensity") else load_class_folders(
        make_cfg(demo_root, color=color, normalization=normalization))
    item = dataset[17]
    pixels = png_pixels(demo_root / item["item_id"])  # (H, W, 3) in [0, 1]
    if color == "grey":
        pixels = pixels @ np.asarray(LUMA_WEIGHTS, np.float32)[:, None]
    expected = torch.from_numpy(pixels).permute(2, 0, 1)
    if normalization == "imagenet":
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        expected = (expected - mean) / std
        assert dataset.data_range == pytest.approx(1 / 0.224)
        assert dataset.normalization["mean"] == list(IMAGENET_MEAN)
    else:
        expected = expected * 2 - 1
        assert dataset.data_range == 2.0 and dataset.normalization["output_range"] == [-1.0, 1.0]
        assert -1.0 <= dataset.arrays["image"].min() and dataset.arrays["image"].max() <= 1.0
    assert item["image"].shape == (1 if color == "grey" else 3, TILE, TILE)
    torch.testing.assert_close(item["image"], expected, atol=1e-5, rtol=0)
    assert dataset.normalization["method"] == normalization and dataset.normalization["color"] == color


def test_resize_pads_to_square_and_centre_crop_keeps_pixels(tmp_path):
    root = two_classes(tmp_path / "data")
    wide = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))  # (20, 40): a left-right ramp
    save_png(root / "train" / "a" / "wide.png", wide)
    resized = load_class_folders(make_cfg(root, color="grey", image_size=16, resize=True))
    image = resized[resized.item_ids.index("train/a/wide.png")]["image"][0]
    black = torch.full((3, 16), -1.0)  # 10 of 40 rows padded black on each side: 4 of 16 after resizing
    torch.testing.assert_close(image[:3], black)
    torch.testing.assert_close(image[-3:], black)
    assert image[8, 0] < -0.8 and image[8, -1] > 0.8
    cropped = load_class_folders(make_cfg(root, color="grey", image_size=16, resize=False))
    image = cropped[cropped.item_ids.index("train/a/wide.png")]["image"][0]
    torch.testing.assert_close(image, torch.from_numpy(wide[2:18, 12:28] / 127.5 - 1).float())


def test_image_formats(tmp_path):
    root = two_classes(tmp_path / "data")
    folder = root / "train" / "a"
    ramp16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(ramp16).save(folder / "deep.png")  # 16-bit grey
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # fully transparent red: alpha is dropped, not composited
    save_png(folder / "alpha.png", rgba, "RGBA")
    planes = np.stack([np.full((8, 8), value, np.uint8) for value in (10, 51, 200)])  # (3, H, W)
    tifffile.imwrite(folder / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    save_png(folder / "photo.jpg", np.full((8, 8, 3), 128, np.uint8))
    ramp_float = np.linspace(-5.0, 3.0, 64, dtype=np.float32).reshape(8, 8)  # no fixed range: min-max scaled
    tifffile.imwrite(folder / "float.tif", ramp_float)
    dataset = load_class_folders(make_cfg(root, image_size=8))
    def image(name):
        return dataset[dataset.item_ids.index(f"train/a/{name}")]["image"]

    torch.testing.assert_close(image("deep.png")[0], torch.from_numpy(ramp16 / 65535 * 2 - 1).float())
    assert torch.equal(image("deep.png")[0], image("deep.png")[2])  # grey repeated to RGB
    torch.testing.assert_close(image("alpha.png")[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(image("planar.tif"), torch.from_numpy(planes / 127.5 - 1).float())
    assert image("photo.jpg").sub(128 / 127.5 - 1).abs().max() < 0.05  # JPEG is lossy
    torch.testing.assert_close(image("float.tif")[1], torch.from_numpy((ramp_float + 5) / 8 * 2 - 1))


def test_grey_nifti_images(tmp_path):
    root = two_classes(tmp_path / "data", size=24)
    slice_2d = np.arange(20 * 24, dtype=np.float32).reshape(20, 24) * 3.0 - 700.0  # (X, Y), e.g. HU
    nib.save(nib.Nifti1Image(slice_2d, np.eye(4)), root / "train" / "a" / "flat.nii.gz")
    nib.save(nib.Nifti1Image(slice_2d[..., None], np.eye(4)), root / "train" / "b" / "one_slice.nii.gz")
    dataset = load_class_folders(make_cfg(root, color="grey", image_size=24, resize=False))
    # Min-max scaled per image, shown as data/nifti.py shows slices: np.fliplr(np.rot90(slice)), (24, 20).
    view = np.fliplr(np.rot90(slice_2d))
    expected = torch.from_numpy((view - view.min()) / (view.max() - view.min()) * 2 - 1).float()
    for item_id in ("train/a/flat.nii.gz", "train/b/one_slice.nii.gz"):
        image = dataset[dataset.item_ids.index(item_id)]["image"]
        assert image.shape == (1, 24, 24)
        torch.testing.assert_close(image[0, :, 2:22], expected)
        assert torch.all(image[0, :, :2] == -1)  # the 20 columns centre-padded to 24


# ---------------------------------------------------------------------------------------------------------
# Split and class balance


def test_split_is_stratified_seeded_and_reused(demo_root, tmp_path):
    cfg = make_cfg(demo_root)
    datasets = build_datasets(cfg, tmp_path / "run", seed=0)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["unit"] == "image" and split["settings"] == {"data.val_fraction": 0.2}
    train, val, test = (set(datasets[name].item_ids) for name in ("train", "val", "test"))
    assert (set(split["train"]), set(split["val"]), set(split["test"])) == (train, val, test)
    assert not train & val and not (train | val) & test
    assert len(train | val) == sum(TRAIN_COUNTS.values())  # all of train/
    assert all(i.startswith("train/") for i in train | val) and all(i.startswith("test/") for i in test)
    assert len(test) == sum(TEST_COUNTS.values())
    for label, name in enumerate(CLASSES):
        val_count = int((datasets["val"].dominant_class == label).sum())
        assert val_count == round(TRAIN_COUNTS[name] * 0.2)
        assert int((datasets["test"].dominant_class == label).sum()) == TEST_COUNTS[name]
    assert datasets["test"].class_names == CLASSES

    again = build_datasets(cfg, tmp_path / "same_seed", seed=0)
    assert again["val"].item_ids == datasets["val"].item_ids
    other = build_datasets(cfg, tmp_path / "other_seed", seed=1)
    assert other["val"].item_ids != datasets["val"].item_ids
    resumed = build_datasets(cfg, tmp_path / "run", seed=1)  # split.json wins over the seed
    assert resumed["val"].item_ids == datasets["val"].item_ids
    with pytest.raises(ConfigError, match=r"split\.json was made with data\.val_fraction=0\.2"):
        build_datasets(make_cfg(demo_root, val_fraction=0.3), tmp_path / "run", seed=0)


def test_every_class_with_two_images_keeps_a_val_item(tmp_path):
    root = two_classes(tmp_path / "data", per_class=2)
    for k in range(5):
        save_png(root / "train" / "c" / f"{k}.png", np.full((8, 8), 40 * k, np.uint8))
    save_png(root / "train" / "d" / "only.png", np.zeros((8, 8), np.uint8))
    datasets = build_datasets(make_cfg(root, image_size=8, val_fraction=0.1), tmp_path / "run", seed=3)
    assert torch.bincount(datasets["val"].dominant_class, minlength=4).tolist() == [1, 1, 1, 0]
    assert torch.bincount(datasets["train"].dominant_class, minlength=4).tolist() == [1, 1, 4, 1]
    assert "test" not in datasets  # no test/ folder


def test_balanced_weights_equalise_classes(demo_root, tmp_path):
    train = build_datasets(make_cfg(demo_root), tmp_path / "run", seed=0)["train"]
    weights = balanced_weights(train)
    per_class = torch.stack([weights[train.dominant_class == c].sum() for c in range(3)])
    torch.testing.assert_close(per_class, torch.ones(3, dtype=torch.float64))
    drawn = train.dominant_class[torch.multinomial(weights, 6000, replacement=True, generator=torch.Generator()
                                                   .manual_seed(0))]
    assert torch.bincount(drawn).min() > 1800  # ~2000 each, though the classes hold 77, 50 and 27 items


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def test_rotation_of_a_quarter_turn_is_rot90():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    quarter = torch.full((2,), math.pi / 2)
    torch.testing.assert_close(rotate(images, quarter), torch.rot90(images, 1, (-2, -1)), atol=1e-4, rtol=0)
    masks = (images > 100).long()
    assert torch.equal(rotate(masks, quarter), torch.rot90(masks, 1, (-2, -1)))


def test_augment_changes_images_not_labels_reproducibly(demo_dataset):
    batch = next(iter(DataLoader(demo_dataset, batch_size=16)))
    cfg = make_cfg("unused", flip_prob=0.5, rotate_degrees=30.0)
    torch.manual_seed(0)
    first = augment(batch, cfg)
    torch.manual_seed(0)
    second = augment(batch, cfg)
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["label"], batch["label"]) and first["item_id"] == batch["item_id"]
    changed = (first["image"] - batch["image"]).flatten(1).abs().amax(1) > 0.1
    assert changed.all()  # every sample is rotated by a random angle
    # Bilinear samples of the image: the values stay within its range.
    assert first["image"].min() >= batch["image"].min() - 1e-5 and first["image"].max() <= batch["image"].max() + 1e-5
    torch.manual_seed(1)
    assert not torch.equal(augment(batch, cfg)["image"], first["image"])


def test_other_kinds_are_not_rotated(demo_dataset):
    batch = next(iter(DataLoader(demo_dataset, batch_size=8)))
    tiles_cfg = DataConfig(kind="tiles", flip_prob=0.5, rotate_degrees=30.0)
    torch.manual_seed(0)
    augmented = augment(batch, tiles_cfg)
    torch.manual_seed(0)
    assert torch.equal(augmented["image"], random_flip(batch, 0.5)["image"])


# ---------------------------------------------------------------------------------------------------------
# Refused input


def _empty_class(root: Path) -> str:
    (root / "train" / "b").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        save_png(root / "train" / "a" / name, np.zeros((8, 8), np.uint8))
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    return str(root / "train" / "b")


def _single_class(root: Path) -> str:
    save_png(root / "train" / "a" / "0.png", np.zeros((8, 8), np.uint8))
    return str(root)


def _unknown_test_class(root: Path) -> str:
    two_classes(root)
    save_png(root / "test" / "zebra" / "0.png", np.zeros((8, 8), np.uint8))
    return r"test class 'zebra'.*\(classes: a, b\)"


def _truncated_png(root: Path) -> str:
    two_classes(root)
    path = save_png(root / "train" / "b" / "cut.png", np.zeros((64, 64), np.uint8))
    path.write_bytes(path.read_bytes()[:60])
    return str(path)


def _corrupt_nifti(root: Path) -> str:
    two_classes(root)
    path = root / "train" / "a" / "scan.nii.gz"
    path.write_bytes(b"not a gzip file")
    return str(path)


def _cmyk_jpeg(root: Path) -> str:
    two_classes(root)
    path = root / "train" / "a" / "print.jpg"
    Image.new("CMYK", (8, 8)).save(path)
    return str(path) + ": save it as an RGB or greyscale image"


def _two_slice_nifti(root: Path) -> str:
    two_classes(root)
    path = root / "train" / "a" / "stack.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), path)
    return str(path)


def _no_train_folder(root: Path) -> str:
    save_png(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    return str(root)


@pytest.mark.parametrize("make_bad", [_empty_class, _single_class, _unknown_test_class, _truncated_png,
                                      _corrupt_nifti, _cmyk_jpeg, _two_slice_nifti, _no_train_folder])
def test_bad_folders_are_refused_naming_the_folder_or_file(tmp_path, make_bad):
    root = tmp_path / "data"
    named = make_bad(root)
    with pytest.raises(ConfigError) as error:
        build_datasets(make_cfg(root, image_size=8), tmp_path / "run", seed=0)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(named, message) if named.startswith("test class") else named in message
    assert not (tmp_path / "run" / "split.json").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"normalization": "mri"}, "data.normalization must be imagenet or intensity"),
    ({"normalization": "imagenet", "color": "grey"}, "data.normalization=imagenet needs data.color=rgb"),
    ({"color": "gray"}, "data.color must be rgb or grey"),
    ({"rotate_degrees": -5.0}, "data.rotate_degrees"),
    ({"test_fraction": 0.2}, "the test set is <data.root>/test/"),
])
def test_bad_settings_are_refused_before_reading(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_class_folders(make_cfg(tmp_path / "does_not_exist", **overrides))
    dotted = [f"data.{key}={value}" for key, value in overrides.items()]
    cfg = resolve(None, ["data.kind=class_folders", "data.normalization=intensity", *dotted])
    with pytest.raises(ConfigError, match=re.escape(match)):
        check_config(cfg, denoiser=False)


# ---------------------------------------------------------------------------------------------------------
# End to end through the config


def test_resolved_config_builds_the_demo_and_batches(tmp_path):
    root = tmp_path / "demo_ihc_classes"
    cfg = resolve(None, ["data.kind=class_folders", "task.kind=classification", "data.demo=ihc_classes",
                         f"data.root={root}", "data.normalization=imagenet", "data.image_size=24", "data.class_balanced=true",
                         "data.flip_prob=0.5", "data.rotate_degrees=15"])
    check_config(cfg, denoiser=False)
    datasets = build_datasets(cfg.data, tmp_path / "run", cfg.run.seed)
    assert (root / "labels.json").is_file()
    assert {name: len(d) for name, d in datasets.items()} == {"train": 154, "val": 38, "test": 64}
    weights = balanced_weights(datasets["train"])
    sampler = WeightedRandomSampler(weights, num_samples=32, generator=torch.Generator().manual_seed(0))
    batch = augment(next(iter(DataLoader(datasets["train"], batch_size=32, sampler=sampler))), cfg.data)
    assert batch["image"].shape == (32, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == torch.int64
    assert datasets["val"].normalization["method"] == "imagenet"
