"""utils.metrics against scikit-image, numpy and closed forms, on real images shipped with installed packages."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from skimage import data
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

from utils.config import ConfigError
from utils.metrics import (DATA_RANGE_NORMALISED, FeatureExtractor, check_data_range, dice_per_label,
                           fid_from_features, frechet_distance, kid, mae, ms_ssim, mse, pairwise_ms_ssim, psnr,
                           ssim, ssim_window)
from utils.evaluation import image_scores

TOL = 1e-3


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Min-max normalise to [-1, 1] in float64, the space the metrics see."""
    image = image.astype(np.float64)
    return (image - image.min()) / (image.max() - image.min()) * 2 - 1


def degrade(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A noisy or blurred version of a [-1, 1] image, still clipped to [-1, 1]."""
    if kind == "noise":
        noisy = image + np.random.default_rng(seed).normal(0, 0.15, image.shape)
        return noisy.clip(-1, 1)
    channel_axis = -1 if image.ndim == 3 and image.shape[-1] == 3 else None
    return gaussian(image, sigma=2.0, channel_axis=channel_axis)


def sk_ssim(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=DATA_RANGE_NORMALISED, **kwargs)


def grey_batch(*images: np.ndarray) -> torch.Tensor:
    """(H, W) or (D, H, W) arrays -> (B, 1, ...) float32 tensor."""
    return torch.tensor(np.stack(images), dtype=torch.float32).unsqueeze(1)


def rgb_batch(*images: np.ndarray) -> torch.Tensor:
    """(H, W, 3) arrays -> (B, 3, H, W) float32 tensor."""
    return torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return to_unit_range(data.camera())


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return to_unit_range(data.shepp_logan_phantom())


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """The MNI152 T1 template at 2 mm, (99, 117, 95), in [-1, 1]."""
    from nilearn.datasets import load_mni152_template

    return to_unit_range(load_mni152_template(resolution=2).get_fdata())


@pytest.fixture(scope="module")
def mni_labels(mni: np.ndarray) -> np.ndarray:
    """Three-class intensity labels of the template: 0 outside, 1 darker tissue, 2 brighter tissue."""
    return (mni > -0.6).astype(np.int64) + (mni > 0.2)


# ----------------------------------------------------------------------------------------------------------
# SSIM and PSNR against scikit-image.

@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_ssim_psnr_grey_match_skimage_per_sample(camera, phantom, kind):
    # Two different images of one batch: each sample must get its own value.
    phantom = resize(phantom, camera.shape, order=1)
    refs, others = [camera, phantom], [degrade(camera, kind), degrade(phantom, kind, seed=1)]
    ours_ssim = ssim(grey_batch(*refs), grey_batch(*others), DATA_RANGE_NORMALISED)
    ours_psnr = psnr(grey_batch(*refs), grey_batch(*others), DATA_RANGE_NORMALISED)
    assert ours_ssim.shape == ours_psnr.shape == (2,)
    for i, (ref, other) in enumerate(zip(refs, others)):
        assert ours_ssim[i].item() == pytest.approx(sk_ssim(ref, other), abs=TOL)
        # float32 inputs: compare against skimage on the same float32-rounded values.
        expected = peak_signal_noise_ratio(ref.astype(np.float32), other.astype(np.float32),
                                           data_range=DATA_RANGE_NORMALISED)
        assert ours_psnr[i].item() == pytest.approx(expected, abs=TOL)
    assert ours_ssim[0] != pytest.approx(ours_ssim[1].item(), abs=1e-3)


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_ssim_psnr_multichannel_match_skimage(kind):
    tiles = [to_unit_range(data.immunohistochemistry()[:256, :256]),
             to_unit_range(data.retina()[500:756, 500:756])]
    others = [degrade(t, kind, seed=i) for i, t in enumerate(tiles)]
    ours_ssim = ssim(rgb_batch(*tiles), rgb_batch(*others), DATA_RANGE_NORMALISED)
    ours_psnr = psnr(rgb_batch(*tiles), rgb_batch(*others), DATA_RANGE_NORMALISED)
    for i, (ref, other) in enumerate(zip(tiles, others)):
        assert ours_ssim[i].item() == pytest.approx(sk_ssim(ref, other, channel_axis=-1), abs=TOL)
        expected = peak_signal_noise_ratio(ref.astype(np.float32), other.astype(np.float32), data_range=2.0)
        assert ours_psnr[i].item() == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_ssim_3d_volumetric_matches_skimage(mni, kind):
    other = degrade(mni, kind)
    ours = ssim(grey_batch(mni), grey_batch(other), DATA_RANGE_NORMALISED)
    # A 3D array makes scikit-image filter with a 3D Gaussian: the volumetric SSIM.
    assert ours.item() == pytest.approx(sk_ssim(mni, other), abs=TOL)
    assert psnr(grey_batch(mni), grey_batch(other), 2.0).item() == pytest.approx(
        peak_signal_noise_ratio(mni.astype(np.float32), other.astype(np.float32), data_range=2.0), abs=TOL)


def test_volumes_are_scored_slice_wise_and_volumetrically(mni):
    other = degrade(mni, "noise")
    scores = image_scores(grey_batch(other), grey_batch(mni), DATA_RANGE_NORMALISED)
    expected = np.mean([sk_ssim(mni[d], other[d]) for d in range(mni.shape[0])])
    assert scores["ssim"] == pytest.approx(expected, abs=TOL)
    assert scores["psnr"] == pytest.approx(np.mean([peak_signal_noise_ratio(
        mni[d].astype(np.float32), other[d].astype(np.float32), data_range=2.0) for d in range(mni.shape[0])]), abs=TOL)
    assert scores["ssim_3d"] == pytest.approx(sk_ssim(mni, other), abs=TOL)
    # Slice-wise and volumetric SSIM are different numbers; the names say which is which.
    assert abs(scores["ssim"] - scores["ssim_3d"]) > 1e-3
    # A slab thinner than the SSIM window still has slice-wise scores, and no volumetric SSIM.
    thin = image_scores(grey_batch(other[:ssim_window() - 1]), grey_batch(mni[:ssim_window() - 1]), 2.0)
    assert "ssim_3d" not in thin and np.isfinite(thin["ssim"])


def test_ssim_identical_is_one_and_refuses_images_smaller_than_window(camera):
    x = grey_batch(camera)
    assert ssim(x, x, 2.0).item() == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(psnr(x, x, 2.0).item())
    with pytest.raises(ValueError, match="smaller than the 11-voxel"):
        ssim(x[..., :8, :8], x[..., :8, :8], 2.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[..., :100], 2.0)


# ----------------------------------------------------------------------------------------------------------
# Masked metrics.

def test_masked_metrics_equal_numpy_on_the_mask(mni, mni_labels):
    other = degrade(mni, "noise")
    brain = mni_labels > 0
    x, y = grey_batch(mni), grey_batch(other)
    mask = torch.tensor(brain)[None, None]
    diff = mni - other
    for region, m in (("brain", brain), ("background", ~brain)):
        torch_mask = mask if region == "brain" else ~mask
        assert mse(x, y, torch_mask).item() == pytest.approx(np.mean(diff[m] ** 2), rel=1e-5)
        assert mae(x, y, torch_mask).item() == pytest.approx(np.mean(np.abs(diff[m])), rel=1e-5)
        expected_psnr = 10 * np.log10(4.0 / np.mean(diff[m] ** 2))
        assert psnr(x, y, 2.0, torch_mask).item() == pytest.approx(expected_psnr, abs=TOL)
        # SSIM: scikit-image's full map, restricted to mask voxels inside the valid region.
        _, full_map = structural_similarity(mni, other, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=2.0, full=True)
        pad = 5
        valid = (slice(pad, -pad),) * 3
        expected_ssim = full_map[valid][m[valid]].mean()
        assert ssim(x, y, 2.0, mask=torch_mask).item() == pytest.approx(expected_ssim, abs=TOL)
    # The brain and background really differ, so the mask is not ignored.
    assert mse(x, y, mask).item() != pytest.approx(mse(x, y, ~mask).item(), rel=1e-2)


def test_masked_metrics_multichannel_and_empty_mask():
    tile = to_unit_range(data.immunohistochemistry()[:128, :128])
    other = degrade(tile, "noise")
    region = np.zeros(tile.shape[:2], dtype=bool)
    region[20:90, 30:100] = True
    x, y = rgb_batch(tile), rgb_batch(other)
    mask = torch.tensor(region)[None, None]
    assert mae(x, y, mask).item() == pytest.approx(np.abs(tile - other)[region].mean(), rel=1e-5)
    # A mask with no voxels (or none inside SSIM's valid region) gives NaN, not a made-up number.
    border_only = torch.zeros_like(mask)
    border_only[..., :3, :] = True
    assert math.isnan(ssim(x, y, 2.0, mask=border_only).item())
    assert math.isnan(mse(x, y, torch.zeros_like(mask)).item())
    with pytest.raises(ValueError, match="does not fit"):
        mse(x, y, mask[..., :64])


# ----------------------------------------------------------------------------------------------------------
# Dice.

def test_dice_per_label_matches_numpy(mni_labels):
    ref = mni_labels[40:60]  # 20 slabs of slices as a batch of 2D label maps
    pred = np.roll(ref, 2, axis=-1)
    pred[:, :10, :] = 0
    ours = dice_per_label(torch.tensor(pred), torch.tensor(ref), num_labels=4)
    assert ours.shape == (20, 3)
    for b in range(ref.shape[0]):
        for label in (1, 2):
            p, r = pred[b] == label, ref[b] == label
            expected = 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())
            assert ours[b, label - 1].item() == pytest.approx(expected, rel=1e-12)
    # Label 3 appears in neither map: undefined, not 0 or 1.
    assert torch.isnan(ours[:, 2]).all()
    same = dice_per_label(torch.tensor(ref)[:, None], torch.tensor(ref)[:, None], num_labels=3)
    assert torch.equal(same, torch.ones_like(same))


def test_dice_refuses_float_maps_and_out_of_range_labels(mni_labels):
    labels = torch.tensor(mni_labels[40:42])
    with pytest.raises(TypeError, match="integer label maps"):
        dice_per_label(labels.float(), labels, num_labels=3)
    with pytest.raises(ValueError, match="num_labels=2"):
        dice_per_label(labels, labels, num_labels=2)


# ----------------------------------------------------------------------------------------------------------
# data_range check.

def test_check_data_range_refuses_wrong_ranges(camera):
    x = torch.tensor(camera)
    check_data_range(2.0, x)
    # Generated samples overshoot [-1, 1] a little: still the right data_range.
    check_data_range(2.0, x, (x * 1.1).clamp(-1.15, 1.2))
    # An image that is nearly all background keeps its scale through max |value|.
    check_data_range(2.0, torch.full((8, 8), -1.0))
    with pytest.raises(ConfigError, match=r"data_range=2000 .*inflated .*2 for \[-1, 1\]"):
        check_data_range(2000.0, x)
    hounsfield = torch.tensor(camera / 2 * 3000 + 500)  # spans [-1000, 2000] HU
    with pytest.raises(ConfigError, match="deflated"):
        check_data_range(2.0, hounsfield)
    check_data_range(3000.0, hounsfield)
    with pytest.raises(ConfigError, match="eval.data_range=0 must be positive"):
        check_data_range(0.0, x, name="eval.data_range")


# ----------------------------------------------------------------------------------------------------------
# MS-SSIM.

def test_ms_ssim_identity_noise_order_and_small_images(camera):
    x = grey_batch(camera)
    assert ms_ssim(x, x, 2.0).item() == pytest.approx(1.0, abs=1e-6)
    scores = [ms_ssim(x, grey_batch(camera + np.random.default_rng(0).normal(0, s, camera.shape)), 2.0).item()
              for s in (0.05, 0.2, 0.5)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
    # 64 x 64 fits only 3 scales; weights are renormalised so identity still scores 1.
    small = x[..., 200:264, 200:264]
    assert ms_ssim(small, small, 2.0).item() == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim(small, small + 0.1 * torch.randn_like(small), 2.0).item() < 0.99
    with pytest.raises(ValueError, match="MS-SSIM needs at least 11"):
        ms_ssim(x[..., :10, :10], x[..., :10, :10], 2.0)


def test_pairwise_ms_ssim_measures_diversity(camera):
    base = torch.tensor(camera[::2, ::2], dtype=torch.float32)[None, None]
    collapsed = base.repeat(4, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    varied = (collapsed + 0.3 * torch.randn(collapsed.shape, generator=generator)).clamp(-1, 1)
    assert pairwise_ms_ssim(collapsed).item() == pytest.approx(1.0, abs=1e-6)
    assert pairwise_ms_ssim(varied, max_pairs_per_batch=4).item() < 0.9
    with pytest.raises(ValueError, match="at least 2 samples"):
        pairwise_ms_ssim(base)


# ----------------------------------------------------------------------------------------------------------
# FID, KID and the feature network.

def closed_form_fd_diagonal(mu1, var1, mu2, var2) -> float:
    """FD of Gaussians with diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(var1) - sqrt(var2))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    dim = 64
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    var1, var2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = closed_form_fd_diagonal(mu1, var1, mu2, var2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # The FD is invariant to a common rotation, which makes both covariances full (non-commuting with the
    # axes), so the matrix square root is really exercised.
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotated = frechet_distance(rotation @ mu1, rotation @ np.diag(var1) @ rotation.T,
                               rotation @ mu2, rotation @ np.diag(var2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def camera_patch_features(camera: np.ndarray, offset: int) -> torch.Tensor:
    """(N, 64) features: flattened 8 x 8 patches of the camera image, a real non-Gaussian distribution."""
    patches = camera[offset:offset + 256, offset:offset + 256].reshape(32, 8, 32, 8).transpose(0, 2, 1, 3)
    return torch.tensor(patches.reshape(-1, 64))


def test_fid_and_kid_on_feature_sets(camera):
    feats = camera_patch_features(camera, 0)
    other = camera_patch_features(camera, 200)
    shifted = feats + 0.5
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    fid_shift = fid_from_features(feats, shifted)
    # A pure mean shift moves FD by exactly |shift|^2 = 64 * 0.25.
    assert fid_shift == pytest.approx(16.0, rel=1e-8)
    assert fid_from_features(feats, other) > 0.1

    mean_same, std_same = kid(feats, feats, subsets=20, subset_size=200)
    mean_shift, _ = kid(feats, shifted, subsets=20, subset_size=200)
    assert abs(mean_same) < 0.05 * mean_shift
    assert std_same >= 0.0
    assert mean_shift > 0.1
    assert kid(feats, other, subsets=5, subset_size=100) == kid(feats, other, subsets=5, subset_size=100)


class TinyFeatureNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(images)), 1)  # (B, 8, 1, 1)


def save_feature_net(path) -> TinyFeatureNet:
    """A seeded TinyFeatureNet written as TorchScript, the format FeatureExtractor loads."""
    torch.manual_seed(0)
    net = TinyFeatureNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))
    return net


def test_feature_extractor_loads_local_torchscript_and_refuses_garbage(tmp_path, camera):
    path = tmp_path / "features.pt"
    net = save_feature_net(path)
    extractor = FeatureExtractor(path, channels=3)
    images = grey_batch(camera[:64, :64], camera[100:164, 100:164])
    features = extractor(images)
    assert features.shape == (2, 8)
    torch.testing.assert_close(features, net(images.expand(-1, 3, -1, -1)).flatten(1))

    garbage = tmp_path / "inception.pt"
    garbage.write_bytes(b"not a network")
    with pytest.raises(ConfigError, match="inception.pt"):
        FeatureExtractor(garbage)
    with pytest.raises(ConfigError, match="not found: .*missing.pt"):
        FeatureExtractor(tmp_path / "missing.pt")


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID as the reference implementations compute it: scipy's sqrtm of the covariance product."""
    from scipy.linalg import sqrtm

    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = sqrtm(sigma_a @ sigma_b).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sigma_a + sigma_b - 2 * cross))


def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / F + 1)^3, written out as sums over distinct pairs."""
    dim, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2 * k_xy.sum() / (m * n))


def test_fid_and_kid_of_a_local_network_match_numpy(tmp_path, camera):
    save_feature_net(tmp_path / "features.pt")
    extractor = FeatureExtractor(tmp_path / "features.pt", channels=3)

    def features(image: np.ndarray) -> np.ndarray:  # of 42 crops of 32 x 32 pixels
        crops = [image[r:r + 32, c:c + 32] for r in range(0, 448, 64) for c in range(0, 384, 64)]
        return extractor(grey_batch(*crops)).double().numpy()

    real, fake = features(camera), features(to_unit_range(data.moon()))
    assert real.shape == fake.shape == (42, 8)
    fid = fid_from_features(real, fake)
    assert fid > 1e-3 and fid == pytest.approx(numpy_fid(real, fake), rel=1e-6)
    # KID over the whole sets is one MMD^2 (it does not depend on the order of the items).
    assert kid(real, fake, subsets=1, subset_size=1000) == pytest.approx((numpy_mmd2(real, fake), 0.0), rel=1e-9)
    # Over subsets: the same seeded draws, then their mean and (sample) standard deviation.
    generator = torch.Generator().manual_seed(3)
    values = [numpy_mmd2(real[torch.randperm(42, generator=generator)[:20].numpy()],
                         fake[torch.randperm(42, generator=generator)[:20].numpy()]) for _ in range(5)]
    assert kid(real, fake, subsets=5, subset_size=20, seed=3) == pytest.approx(
        (np.mean(values), np.std(values, ddof=1)), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_run_on_the_tensors_device(camera, mni_labels):
    x = grey_batch(camera, camera[::-1].copy())
    y = grey_batch(degrade(camera, "noise"), degrade(camera[::-1].copy(), "blur"))
    mask = x > 0
    for metric in (lambda a, b, m: ssim(a, b, 2.0, mask=m), lambda a, b, m: psnr(a, b, 2.0, m),
                   lambda a, b, m: mae(a, b, m), lambda a, b, m: ms_ssim(a, b, 2.0)):
        on_gpu = metric(x.cuda(), y.cuda(), mask.cuda())
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), metric(x, y, mask), atol=1e-5, rtol=1e-5)
    labels = torch.tensor(mni_labels[40:44])
    assert dice_per_label(labels.cuda(), labels.cuda(), 3).device.type == "cuda"
