"""Demo datasets built from files that installed packages ship (no network)."""
from __future__ import annotations

import os
import shutil
import uuid
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
MIN_TISSUE_PROBABILITY = 0.5  # below this, a voxel is background in the demo segmentation
BACKGROUND_NOISE = 1e-6  # nilearn's resampled template holds denormal values (~1e-45) outside the head


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

    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (temporary / "mni152").mkdir(parents=True)
        nib.save(t1, temporary / "mni152" / "t1.nii.gz")
        nib.save(seg_image, temporary / "mni152" / "seg.nii.gz")
        try:
            os.rename(temporary, root)
        except OSError:
            if not (root / "mni152" / "seg.nii.gz").is_file():
                raise
            # Another process finished the same build first; its copy is identical.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    get_logger().info("built the MNI152 demo dataset in %s", root)


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

    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir(parents=True)
        for name, (image, mask) in pieces.items():
            Image.fromarray(np.ascontiguousarray(image)).save(temporary / f"{name}.png")
            if mask is not None:
                Image.fromarray(np.ascontiguousarray(mask)).save(temporary / f"{name}_mask.png")
        try:
            os.rename(temporary, root)
        except OSError:
            if not (root / "ihc_extra.png").is_file():
                raise
            # Another process finished the same build first; its copy is identical.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    get_logger().info("built the immunohistochemistry tile demo in %s", root)
