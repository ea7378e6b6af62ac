"""Demo datasets built from files that installed packages ship (no network)."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry
from skimage.filters import gaussian, threshold_otsu

from utils.logging import get_logger

# IHC demo: stain densities are smoothed over a few pixels so the classes form regions, not speckle.
STAIN_SMOOTHING_SIGMA = 1.5
# Labelled pieces: the left 384 columns of the 512x512 image cut 2x2 into 256x192 images; the right 128
# columns are the unlabelled extra image, disjoint from them so that no held-out tissue leaks into training.
IHC_LABELLED_COLUMNS = 384
# IHC class-folder demo (build_ihc_classes_demo): 32 px tiles named by how much of them each stain covers. The
# thresholds give three classes of comparable size that overlap in colour near the thresholds (not trivial).
IHC_CLASS_TILE = 32
IHC_DAB_TILE_SHARE = 0.5  # at least half the tile's pixels DAB-dominant: "dab"
IHC_HAEMATOXYLIN_TILE_SHARE = 0.2  # otherwise, at least a fifth haematoxylin-dominant: "haematoxylin"
IHC_TEST_TILE_ROWS = 4  # the bottom rows of tiles (a quarter of the image) are test/, never train/
MIN_TISSUE_PROBABILITY = 0.5  # below this, a voxel is background in the demo segmentation
BACKGROUND_NOISE = 1e-6  # nilearn's resampled template holds denormal values (~1e-45) outside the head

# Pseudo-CT demo (build_mni152_ct_demo): typical CT numbers in Hounsfield units (water 0, air -1000).
HU_AIR = -1000.0
HU_GREY_MATTER = 40.0  # grey matter: about 35-45 HU on non-contrast head CT
HU_WHITE_MATTER = 25.0  # white matter: about 20-30 HU
HU_CSF = 8.0  # cerebrospinal fluid: about 0-15 HU
HU_BONE = 800.0  # skull: cortical tables +1000 HU and more, the diploe between them less; +800 HU on average
HU_SOFT_TISSUE = 40.0  # scalp skin, galea and muscle: about 35-55 HU
HU_FAT = -90.0  # subcutaneous fat: about -120 to -60 HU
# nilearn's MNI152 T1 is skull-stripped (scaled to [0, 1]; every non-zero voxel is >= 0.12 and lies within a voxel
# of its brain mask), so it holds no skull or scalp to threshold. Intracranial = the T1 above this (well above
# the denormal background, well below the darkest brain voxel), holes filled; skull and scalp are then drawn
# as shells around it.
CT_INTRACRANIAL_THRESHOLD = 0.05
# The shells around the intracranial region, inside out: (outer distance from it in mm, HU). Adult skull is
# about 5-7 mm thick; the scalp (galea/muscle, subcutaneous fat, skin) 5-8 mm, its fat drawn 4 mm thick so that
# at 2 mm voxels it keeps about its own value after the smoothing below.
CT_SHELLS_MM = ((6.0, HU_BONE), (8.0, HU_SOFT_TISSUE), (12.0, HU_FAT), (14.0, HU_SOFT_TISSUE))
CT_SMOOTHING_SIGMA = 0.5  # voxels: softens tissue boundaries a little (partial volume), the map stays noise-free


def _write_dataset(root: Path, files: Mapping[str, Callable[[Path], object]], done_marker: str) -> None:
    """Write a dataset folder `root` all at once: each `files` entry (a path relative to `root` -> a callable
    that writes that file at the path it is given) is written, in order, into a temporary sibling folder that
    is then renamed to `root`.

    So a killed build leaves no half dataset at `root`, and processes that build at the same time do not clash:
    the first rename wins, and a later one that fails because `root` already holds `done_marker` (a path
    relative to `root`, one of `files`) keeps that copy, the same build. Any other failure is raised. The
    temporary folder is removed in every case; temporary folders of other (or killed) builds are left alone.
    """
    if done_marker not in files:
        raise ValueError(f"done marker '{done_marker}' is not one of the files to write")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir(parents=True)
        for relative, write in files.items():
            path = temporary / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        try:
            os.rename(temporary, root)
        except OSError:
            if not (root / done_marker).is_file():
                raise
            # Another process finished the same build first; its copy is identical.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def build_mni152_demo(root: Path) -> None:
    """Write <root>/mni152/t1.nii.gz and seg.nii.gz (0 background, 1 grey matter, 2 white matter) from
    nilearn's bundled 2 mm MNI152 template and tissue maps.

    Built in a temporary folder that is then renamed to `root`, so a killed build leaves no half dataset and
    processes that build at the same time do not clash (the first rename wins).
    """
    # nilearn takes seconds to import; only the demo needs it.
    from nilearn.datasets import (load_mni152_gm_template, load_mni152_template,
                                  load_mni152_wm_template)

    root = Path(root)
    template = load_mni152_template(resolution=2)
    grey = load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    white = load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    tissue = np.stack([grey, white])
    seg = np.where(tissue.max(0) >= MIN_TISSUE_PROBABILITY, tissue.argmax(0) + 1, 0).astype(np.uint8)
    t1_data = template.get_fdata(dtype=np.float32)
    # Flush the denormal noise to 0 so that "non-zero voxels" (MRI percentile normalisation) means the head.
    t1_data[np.abs(t1_data) < BACKGROUND_NOISE] = 0.0
    t1 = nib.Nifti1Image(t1_data, template.affine)
    seg_image = nib.Nifti1Image(seg, template.affine)
    seg_image.set_data_dtype(np.uint8)

    _write_dataset(root, {"mni152/t1.nii.gz": partial(nib.save, t1),
                          "mni152/seg.nii.gz": partial(nib.save, seg_image)}, done_marker="mni152/seg.nii.gz")
    get_logger().info("built the MNI152 demo dataset in %s", root)


def mni152_pseudo_ct(t1: np.ndarray, grey: np.ndarray, white: np.ndarray, zooms) -> np.ndarray:
    """Float32 HU map of the pseudo-CT (see build_mni152_ct_demo) from the template's T1 (denormal background
    flushed to 0), grey and white matter probabilities and voxel sizes in mm, before rounding."""
    # Imported here like nilearn: only this demo needs scipy.ndimage.
    from scipy.ndimage import binary_fill_holes, distance_transform_edt, gaussian_filter

    intracranial = binary_fill_holes(t1 > CT_INTRACRANIAL_THRESHOLD)
    # Inside: the probability-weighted brain tissues, the rest of each voxel CSF (ventricles, sulci).
    grey = np.clip(grey, 0.0, 1.0)
    white = np.clip(white, 0.0, 1.0 - grey)
    brain = grey * HU_GREY_MATTER + white * HU_WHITE_MATTER + (1.0 - grey - white) * HU_CSF
    hu = np.where(intracranial, brain, HU_AIR).astype(np.float32)
    # Outside: skull and scalp as shells by distance (mm) from the intracranial region, then air.
    distance = distance_transform_edt(~intracranial, sampling=zooms)
    inner = 0.0
    for outer, value in CT_SHELLS_MM:
        hu[(distance > inner) & (distance <= outer)] = value
        inner = outer
    return gaussian_filter(hu, sigma=CT_SMOOTHING_SIGMA, mode="nearest")


def build_mni152_ct_demo(root: Path) -> None:
    """Write <root>/mni152/ct.nii.gz: a synthetic CT-like volume (int16 Hounsfield units, 2 mm, on the
    template's affine) derived from nilearn's bundled MNI152 MRI template, the noise-free high-dose target of
    low-dose CT restoration demos. It is made for demos and tests; its numbers are textbook CT values painted
    on an MRI atlas, not physiology or a real scan.

    Inside the skull-stripped template (the intracranial region) each voxel mixes grey matter (40 HU), white
    matter (25 HU) and CSF (8 HU) by the template's tissue probabilities. The template holds no skull or
    scalp, so they are drawn as shells around that region (see CT_SHELLS_MM): 6 mm of bone (+800 HU), then
    2 mm of soft tissue (+40 HU), 4 mm of fat (-90 HU) and 2 mm of skin (+40 HU); air (-1000 HU) outside. The
    brain stem leaves the field of view at its lower edge, where the shells stay open. The map is smoothed
    (Gaussian, CT_SMOOTHING_SIGMA voxels) so tissue boundaries are not steps, and has no noise.

    Built in a temporary folder renamed to `root`, like build_mni152_demo.
    """
    from nilearn.datasets import (load_mni152_gm_template, load_mni152_template,
                                  load_mni152_wm_template)

    root = Path(root)
    template = load_mni152_template(resolution=2)
    t1 = template.get_fdata(dtype=np.float32)
    t1[np.abs(t1) < BACKGROUND_NOISE] = 0.0  # the denormal background, as in build_mni152_demo
    grey = load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    white = load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    hu = mni152_pseudo_ct(t1, grey, white, template.header.get_zooms()[:3])
    limits = np.iinfo(np.int16)
    ct = np.clip(np.rint(hu), limits.min, limits.max).astype(np.int16)
    ct_image = nib.Nifti1Image(ct, template.affine)
    ct_image.set_data_dtype(np.int16)
    ct_image.header["descrip"] = b"synthetic CT-like HU from the MNI152 MRI template"
    _write_dataset(root, {"mni152/ct.nii.gz": partial(nib.save, ct_image)}, done_marker="mni152/ct.nii.gz")
    get_logger().info("built the MNI152 pseudo-CT demo dataset in %s", root)


def ihc_classes(rgb: np.ndarray) -> np.ndarray:
    """(H, W) uint8 classes of an IHC image by colour deconvolution: 0 background (little stain),
    1 haematoxylin-dominant (nuclei), 2 DAB-dominant (the brown immunostain).

    Each stain's density (skimage.color.rgb2hed) is divided by its Otsu threshold over the image; a pixel is
    stained when either ratio reaches 1, and takes the class of the larger ratio.
    """
    hed = rgb2hed(rgb)
    haematoxylin = gaussian(hed[..., 0], sigma=STAIN_SMOOTHING_SIGMA)
    dab = gaussian(hed[..., 2], sigma=STAIN_SMOOTHING_SIGMA)
    haematoxylin /= threshold_otsu(haematoxylin)
    dab /= threshold_otsu(dab)
    stained = np.maximum(haematoxylin, dab) >= 1.0
    return np.where(stained, 1 + (dab > haematoxylin), 0).astype(np.uint8)


def build_ihc_demo(root: Path) -> None:
    """Write a pathology-tile demo (data.kind: tiles) from scikit-image's 512x512 immunohistochemistry image:
    <root>/ihc_q0.png .. ihc_q3.png with ihc_q<i>_mask.png (uint8 classes of `ihc_classes`), and ihc_extra.png
    without a mask (unlabelled data).

    The labelled images are the 2x2 pieces (256x192) of the image's left 384 columns, so that a split by
    image has subjects to deal out; the extra image is the right 128 columns. Built in a temporary folder
    renamed to `root`, like build_mni152_demo.
    """
    root = Path(root)
    rgb = immunohistochemistry()
    classes = ihc_classes(rgb)
    height, width = rgb.shape[:2]
    pieces = {}
    for index, (top, left) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        rows = slice(top * height // 2, (top + 1) * height // 2)
        columns = slice(left * IHC_LABELLED_COLUMNS // 2, (left + 1) * IHC_LABELLED_COLUMNS // 2)
        pieces[f"ihc_q{index}"] = (rgb[rows, columns], classes[rows, columns])
    pieces["ihc_extra"] = (rgb[:, IHC_LABELLED_COLUMNS:], None)

    files = {}
    for name, (image, mask) in pieces.items():
        files[f"{name}.png"] = Image.fromarray(np.ascontiguousarray(image)).save
        if mask is not None:
            files[f"{name}_mask.png"] = Image.fromarray(np.ascontiguousarray(mask)).save
    _write_dataset(root, files, done_marker="ihc_extra.png")
    get_logger().info("built the immunohistochemistry tile demo in %s", root)


def ihc_tile_class(pixel_classes: np.ndarray) -> str:
    """The class folder of a tile from its `ihc_classes` pixels (see build_ihc_classes_demo)."""
    if np.mean(pixel_classes == 2) >= IHC_DAB_TILE_SHARE:
        return "dab"
    if np.mean(pixel_classes == 1) >= IHC_HAEMATOXYLIN_TILE_SHARE:
        return "haematoxylin"
    return "little_stain"


def build_ihc_classes_demo(root: Path) -> None:
    """Write an image-classification demo (data.kind: class_folders) from scikit-image's 512x512
    immunohistochemistry image: non-overlapping 32x32 RGB tiles as <root>/train|test/<class>/y<row>_x<col>.png,
    and <root>/labels.json recording the rule and the counts.

    Labelling rule: each pixel is background, haematoxylin-dominant or DAB-dominant (`ihc_classes`, colour
    deconvolution). A tile is "dab" when at least IHC_DAB_TILE_SHARE (half) of its pixels are DAB-dominant (the
    brown immunostained epithelium), else "haematoxylin" when at least IHC_HAEMATOXYLIN_TILE_SHARE (a fifth) are
    haematoxylin-dominant (nuclei-rich stroma), else "little_stain" (glass, lumen, loose stroma). test/ holds the
    tiles of the bottom IHC_TEST_TILE_ROWS rows of tiles (rows 384-511), so no test pixel appears in train/:
    train/ has 96 dab, 62 haematoxylin, 34 little_stain tiles; test/ 23, 20 and 21.

    Built in a temporary folder renamed to `root`, like build_mni152_demo.
    """
    root = Path(root)
    rgb = immunohistochemistry()
    pixel_classes = ihc_classes(rgb)
    tile = IHC_CLASS_TILE
    rows, columns = rgb.shape[0] // tile, rgb.shape[1] // tile
    files = {}
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for row in range(rows):
        split = "test" if row >= rows - IHC_TEST_TILE_ROWS else "train"
        for column in range(columns):
            window = (slice(row * tile, (row + 1) * tile), slice(column * tile, (column + 1) * tile))
            label = ihc_tile_class(pixel_classes[window])
            counts[split][label] = counts[split].get(label, 0) + 1
            name = f"{split}/{label}/y{row * tile:03d}_x{column * tile:03d}.png"
            files[name] = Image.fromarray(np.ascontiguousarray(rgb[window])).save
    record = {
        "source": "skimage.data.immunohistochemistry() (512x512 RGB, IHC: haematoxylin and DAB)",
        "tile_size": tile,
        "rule": (f"pixel classes by colour deconvolution (data.demo.ihc_classes); 'dab' when >= "
                 f"{IHC_DAB_TILE_SHARE} of the tile's pixels are DAB-dominant, else 'haematoxylin' when >= "
                 f"{IHC_HAEMATOXYLIN_TILE_SHARE} are haematoxylin-dominant, else 'little_stain'"),
        "test_region": f"rows {(rows - IHC_TEST_TILE_ROWS) * tile}-{rows * tile - 1} (train/ is the rows above)",
        "counts": {split: dict(sorted(found.items())) for split, found in counts.items()},
    }
    files["labels.json"] = lambda path: path.write_text(json.dumps(record, indent=1) + "\n")
    _write_dataset(root, files, done_marker="labels.json")
    get_logger().info("built the immunohistochemistry class-folder demo in %s", root)
