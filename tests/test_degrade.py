"""Simulated degradations on real images: the Shepp-Logan phantom in HU and pydicom's CT test slice (low-dose CT),
and the MNI152 template (low resolution, thick slices)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from data.degrade import degrade, item_seed, low_dose_ct, low_resolution, thick_slices
from utils.config import ConfigError, DegradeConfig, resolve
from utils.config_checks import check_config

ANGLES = 180  # views for the 128-pixel phantom: fewer than the default, to keep the tests fast
# Water within 0 +- 7 HU is the ACR CT accreditation limit; a noiseless-enough round trip must do better.
HU_TOLERANCE = 5.0


@pytest.fixture(scope="module")
def phantom():
    """(hu, air, tissue): a 128x128 phantom in HU (air -1000, brain 0, features -50..100, skull 400) and masks of
    its uniform air and brain regions, 3 pixels away from any edge."""
    values = shepp_logan_phantom()  # 400x400: 0 outside, 1 skull, 0.2 brain, 0.1-0.4 features
    hu_fine = np.where(values == 0, -1000.0, (values - 0.2) * 500.0)
    hu = resize(hu_fine, (128, 128), order=1, anti_aliasing=True)
    air = binary_erosion(hu <= -999.0, iterations=3)
    tissue = binary_erosion(np.abs(hu) < 0.5, iterations=3)
    assert air.sum() > 1000 and tissue.sum() > 1000
    return hu, air, tissue


@pytest.fixture(scope="module")
def mni():
    """The 4 mm MNI152 T1 template cropped to an anisotropic (36, 48, 40) box around the brain."""
    from nilearn.datasets import load_mni152_template
    volume = load_mni152_template(resolution=4).get_fdata(dtype=np.float32)  # (50, 59, 48), 0 outside the head
    return np.ascontiguousarray(volume[7:43, 5:53, 4:44])


def gradient_energy(x: np.ndarray, axis: int) -> float:
    return float((np.diff(x, axis=axis) ** 2).sum())


# ---------------------------------------------------------------------------------------------------------
# Low-dose CT


def test_more_photons_give_less_noise(phantom):
    hu, _, tissue = phantom
    noiseless = low_dose_ct(hu, 1e12, 0, num_angles=ANGLES)  # the same projection and FBP, quantum noise ~1e-6
    noise, rmse = [], []
    for photons in (1e3, 1e4, 1e5):
        low_dose = low_dose_ct(hu, photons, 1, num_angles=ANGLES)
        noise.append(float((low_dose - noiseless)[tissue].std()))
        rmse.append(float(np.sqrt(((low_dose - hu) ** 2).mean())))
    # Measured: noise 157, 50, 16 HU; RMSE against the phantom 147, 59, 42 HU (the FBP's edge blur remains).
    assert noise[0] > noise[1] > noise[2] and rmse[0] > rmse[1] > rmse[2], (noise, rmse)
    # Quantum noise: the standard deviation scales as 1/sqrt(photons), sqrt(10) ~ 3.16 per decade.
    ratios = [noise[0] / noise[1], noise[1] / noise[2]]
    assert all(2.7 < r < 3.7 for r in ratios), ratios


def test_low_dose_of_a_real_ct_slice(tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    scan = dcmread(get_testdata_file("CT_small.dcm"))  # a 128 x 128 CT slice, 0.66 mm pixels
    hu = scan.pixel_array * float(scan.RescaleSlope) + float(scan.RescaleIntercept)
    pixel_mm = float(scan.PixelSpacing[0])
    body = binary_erosion(hu > -200, iterations=3)  # away from the edges the back-projection blurs
    noiseless = low_dose_ct(hu, 1e12, 0, pixel_size_mm=pixel_mm)
    noise = [float((low_dose_ct(hu, photons, 1, pixel_size_mm=pixel_mm) - noiseless)[body].std())
             for photons in (1e4, 1e5, 1e6)]
    # Measured: 62, 20 and 6 HU of noise in the body; sqrt(10) less per decade of photons.
    assert all(2.7 < a / b < 3.7 for a, b in zip(noise, noise[1:])), noise
    # The scan's tissue values survive the round trip: the body's mean HU within 2 HU.
    assert abs(noiseless[body].mean() - hu[body].mean()) < 2.0


def test_low_dose_is_reproducible_for_a_seed(phantom):
    hu = phantom[0][::2, ::2]
    first = low_dose_ct(hu, 1e4, 7, num_angles=ANGLES)
    assert np.array_equal(first, low_dose_ct(hu, 1e4, 7, num_angles=ANGLES))
    assert np.abs(first - low_dose_ct(hu, 1e4, 8, num_angles=ANGLES)).mean() > 5.0
    # A tensor gives the same numbers, as a tensor of its dtype.
    tensor = low_dose_ct(torch.from_numpy(hu).float(), 1e4, 7, num_angles=ANGLES)
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), first, atol=1e-3)


def test_air_and_water_survive_at_high_dose(phantom):
    hu, air, tissue = phantom
    # Not square (wide and tall, air columns added): padded into the projection circle and cropped back.
    pad = ((0, 0), (24, 24))
    wide = (np.pad(hu, pad, constant_values=-1000.0), np.pad(air, pad, constant_values=True), np.pad(tissue, pad))
    for image, air_mask, tissue_mask in ((hu, air, tissue), wide, tuple(a.T for a in wide)):
        restored = low_dose_ct(image, 1e8, 0, num_angles=ANGLES)
        assert restored.shape == image.shape
        for region, value in ((air_mask, -1000.0), (tissue_mask, 0.0)):
            # Measured: |mean error| < 0.1 HU; standard deviation 5-7 HU, the back-projection's ringing beside
            # edges (the same without noise), while 1e8 photons add 0.5 HU of noise.
            assert abs(restored[region].mean() - value) < HU_TOLERANCE
            assert restored[region].std() < 2 * HU_TOLERANCE


def test_volumes_are_slices_along_the_axis(phantom):
    slice_ = resize(phantom[0], (64, 64), order=1, anti_aliasing=True)
    volume = np.stack([slice_] * 3)  # (3, 64, 64): identical slices
    result = low_dose_ct(volume, 1e4, 3, num_angles=90)
    # The slices draw from one generator in order: the first is the 2D result, the others have their own noise.
    np.testing.assert_array_equal(result[0], low_dose_ct(slice_, 1e4, 3, num_angles=90))
    assert np.abs(result[1] - result[0]).mean() > 5.0
    moved = low_dose_ct(np.moveaxis(volume, 0, 2), 1e4, 3, axis=2, num_angles=90)
    np.testing.assert_array_equal(np.moveaxis(moved, 2, 0), result)


# ---------------------------------------------------------------------------------------------------------
# Low resolution and thick slices


def test_low_resolution_keeps_the_grid_and_removes_detail(mni):
    degraded = low_resolution(mni, [1, 2, 3])
    assert degraded.shape == mni.shape and degraded.dtype == mni.dtype
    drops = [gradient_energy(degraded, a) / gradient_energy(mni, a) for a in range(3)]
    assert drops[2] < drops[1] < drops[0] < 1.0, drops  # the more down-sampling, the less detail
    assert abs(degraded.mean() - mni.mean()) < 0.05 * mni.mean()  # averaging, not darkening: 2% measured
    np.testing.assert_array_equal(low_resolution(mni, 1), mni)
    # A 2D slice, as a tensor.
    slice_ = torch.from_numpy(mni[:, :, 20])
    degraded_slice = low_resolution(slice_, 2)
    assert isinstance(degraded_slice, torch.Tensor) and degraded_slice.shape == slice_.shape
    assert gradient_energy(degraded_slice.numpy(), 0) < 0.7 * gradient_energy(slice_.numpy(), 0)


def test_thick_slices_average_along_the_slice_axis(mni):
    thick = thick_slices(mni, 3, axis=1)  # 48 slices along axis 1: 16 thick ones
    assert thick.shape == mni.shape
    # The centre slice of each group of 3 is the group's mean.
    groups = mni.reshape(36, 16, 3, 40).mean(2)
    np.testing.assert_allclose(thick[:, 1::3], groups, atol=1e-5)
    along = gradient_energy(thick, 1) / gradient_energy(mni, 1)
    across = gradient_energy(thick, 0) / gradient_energy(mni, 0)
    assert along < 0.5 and along < across, (along, across)
    np.testing.assert_array_equal(thick_slices(mni, 1, axis=1), mni)
    # A 2D slice whose rows are the slice axis (e.g. a coronal view of an axial acquisition).
    coronal = mni[:, 24, :]
    thick_2d = thick_slices(coronal, 4, axis=1)
    assert thick_2d.shape == coronal.shape
    assert gradient_energy(thick_2d, 1) < 0.5 * gradient_energy(coronal, 1)


# ---------------------------------------------------------------------------------------------------------
# Dispatch, seeds and config


def test_degrade_dispatches_on_the_kind(phantom, mni):
    hu = phantom[0][::2, ::2]
    assert degrade(mni, DegradeConfig(), 0) is mni  # kind "" = none
    cfg = DegradeConfig(kind="low_dose_ct", photons=1e4)
    np.testing.assert_array_equal(degrade(hu, cfg, 5), low_dose_ct(hu, 1e4, 5))
    np.testing.assert_array_equal(degrade(mni, DegradeConfig(kind="low_resolution", factor=[2]), 0),
                                  low_resolution(mni, 2))
    np.testing.assert_array_equal(degrade(mni, DegradeConfig(kind="thick_slices", factor=[3]), 0, slice_axis=1),
                                  thick_slices(mni, 3, 1))
    with pytest.raises(ConfigError, match=r"data\.degrade\.factor=\[1\.0, 2\.0, 2\.0\] has 3 entries for 2D"):
        degrade(hu, DegradeConfig(kind="low_resolution", factor=[1.0, 2.0, 2.0]), 0)


def test_item_seeds_are_fixed():
    # A literal: the seed of an item must not change with the process, the session or PYTHONHASHSEED.
    assert item_seed(0, "mni152/z40") == 2748852422352986303
    assert len({item_seed(0, "a"), item_seed(0, "b"), item_seed(1, "a")}) == 3


@pytest.mark.parametrize("overrides, message", [
    (["data.degrade.kind=blur"], "data.degrade.kind='blur' is not one of"),
    (["data.degrade.kind=low_dose_ct", "data.degrade.photons=0"], "data.degrade.photons=0.0 must be"),
    (["data.degrade.photons=-1e4"], "data.degrade.photons"),
    (["data.degrade.factor=[1,0.5,2]"], "data.degrade.factor=[1.0, 0.5, 2.0] must be >= 1"),
    (["data.degrade.factor=[]"], "data.degrade.factor=[] must hold one number"),
    (["data.degrade.kind=thick_slices", "data.degrade.factor=[2.5]"], "one whole number for thick_slices"),
    (["data.degrade.seed=-1"], "data.degrade.seed=-1"),
])
def test_bad_degrade_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(resolve(None, overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_good_degrade_config_passes():
    for kind, factor in (("low_dose_ct", "[1]"), ("low_resolution", "[1,2,2.5]"), ("thick_slices", "[4]")):
        check_config(resolve(None, [f"data.degrade.kind={kind}", f"data.degrade.factor={factor}"]))
