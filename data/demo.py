"""Demo datasets built from files that installed packages ship (no network)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.logging import get_logger

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
