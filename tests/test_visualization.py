"""utils.visualization writes valid PNGs of the expected size and content, from real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from matplotlib import colormaps

from utils import visualization
from utils.visualization import (comparison_grid, denoising_strip, image_grid, metric_curves, overlay_contours,
                                 volume_figure)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG after checking the file really is one."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()  # decodes every pixel: catches truncated files that verify() lets through
        return image.size


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture
def figures(monkeypatch) -> list:
    """The matplotlib figures that the functions save, in order, to check what they draw."""
    drawn = []
    save = visualization._save

    def capture(figure, path):
        drawn.append(figure)
        return save(figure, path)

    monkeypatch.setattr(visualization, "_save", capture)
    return drawn


def pixel_at(pixels: np.ndarray, ax, shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    """The saved PNG's RGB at the centre of image pixel (row, col) of the image drawn in `ax`."""
    box = ax.get_window_extent()  # display pixels, origin bottom left; the PNG is saved at the figure's dpi
    x = box.x0 + (col + 0.5) / shape[1] * box.width
    y = box.y1 - (row + 0.5) / shape[0] * box.height
    return pixels[int(pixels.shape[0] - y), int(x)]


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """The Shepp-Logan phantom at 128 x 128 in [-1, 1]."""
    return resize(data.shepp_logan_phantom(), (128, 128), order=1) * 2 - 1


@pytest.fixture(scope="module")
def phantom_labels(phantom: np.ndarray) -> np.ndarray:
    """Integer labels of the phantom: 0 outside, 1 soft tissue, 2 the bright skull."""
    return (phantom > -0.9).astype(np.int64) + (phantom > 0.5)


def test_comparison_grid_columns_rows_and_error(tmp_path, phantom, phantom_labels):
    rng = np.random.default_rng(0)
    generated = np.clip(phantom + rng.normal(0, 0.1, phantom.shape), -1, 1)
    rows = [dict(reference=phantom, generated=generated, condition=phantom_labels),
            dict(condition=phantom_labels, generated=np.clip(phantom + 0.2, -1, 1), reference=phantom)]
    full = comparison_grid(rows, tmp_path / "samples" / "grid.png", titles=["item-0", "item-1"])
    assert full == tmp_path / "samples" / "grid.png"
    width, height = png_size(full)
    # 4 columns (condition, generated, reference, |error|) x 2 rows of 2.2-inch panels at 100 dpi.
    assert 850 <= width <= 1050 and 400 <= height <= 560

    # Without a reference there is no error column: one panel narrower and one row high.
    only_generated = comparison_grid([dict(condition=phantom_labels, generated=generated)], tmp_path / "g.png")
    width_g, height_g = png_size(only_generated)
    assert width_g < width - 300 and height_g < height - 150


def test_comparison_grid_error_panel_draws_the_absolute_difference(tmp_path, phantom, phantom_labels, figures):
    generated = phantom.copy()
    generated[40:80, 40:80] = np.clip(phantom[40:80, 40:80] - 0.3, -1, 1)  # darker in one block only
    shifted = np.clip(phantom + 0.2, -1, 1)
    rows = [dict(condition=phantom_labels, generated=generated, reference=phantom),
            dict(condition=phantom_labels, generated=shifted, reference=phantom)]
    pixels = png_pixels(comparison_grid(rows, tmp_path / "grid.png"))
    axes = np.array(figures[0].axes[:8]).reshape(2, 4)  # the colour bars' axes come after the panels
    assert [ax.get_title() for ax in axes[0]] == ["condition", "generated", "reference", "|error|"]
    errors = [np.abs(generated - phantom), np.abs(shifted - phantom)]
    largest = max(e.max() for e in errors)
    for ax, error in zip(axes[:, 3], errors):
        image = ax.get_images()[0]
        np.testing.assert_allclose(image.get_array(), error)
        assert image.get_clim() == pytest.approx((0, largest))  # one scale for all rows
    np.testing.assert_allclose(axes[0, 1].get_images()[0].get_array(), generated)

    # In the PNG, the error panel is magma(|error| / largest): bright in the wrong block, dark elsewhere.
    magma = colormaps["magma"]
    for row, col in [(60, 60), (50, 75), (10, 10), (100, 64)]:
        expected = np.round(np.array(magma(errors[0][row, col] / largest)[:3]) * 255)
        np.testing.assert_allclose(pixel_at(pixels, axes[0, 3], phantom.shape, row, col), expected, atol=3)
    inside = pixel_at(pixels, axes[0, 3], phantom.shape, 60, 60)
    outside = pixel_at(pixels, axes[0, 3], phantom.shape, 10, 10)
    assert inside.sum() > outside.sum() + 150
    grey = np.round((generated[60, 60] + 1) / 2 * 255)
    np.testing.assert_allclose(pixel_at(pixels, axes[0, 1], phantom.shape, 60, 60), [grey] * 3, atol=2)


def test_comparison_grid_rgb_and_bad_titles(tmp_path):
    tile = data.immunohistochemistry()[:128, :128] / 127.5 - 1
    path = comparison_grid([dict(generated=tile, reference=np.clip(tile * 0.9, -1, 1))], tmp_path / "rgb.png")
    width, height = png_size(path)
    assert 600 <= width <= 800 and 200 <= height <= 300
    with pytest.raises(ValueError, match="1 titles for 2 rows"):
        comparison_grid([dict(generated=tile)] * 2, tmp_path / "x.png", titles=["a"])


def test_overlay_contours_marks_each_label_boundary_in_its_colour(phantom, phantom_labels):
    overlay = overlay_contours(phantom, phantom_labels)
    assert overlay.shape == (*phantom.shape, 3) and overlay.dtype == np.uint8
    boundary = find_boundaries(phantom_labels, mode="inner") & (phantom_labels > 0)
    colour = overlay[boundary]
    # Contour pixels are coloured, every other pixel stays grey (R = G = B) at the image's intensity.
    assert np.all(colour.max(axis=1) != colour.min(axis=1))
    rest = overlay[~boundary]
    assert np.all(rest[:, 0] == rest[:, 1]) and np.all(rest[:, 1] == rest[:, 2])
    expected_grey = np.round((phantom[~boundary] + 1) / 2 * 255)
    np.testing.assert_array_equal(rest[:, 0], expected_grey)
    # The two labels get different colours.
    colours = {label: tuple(overlay[boundary & (phantom_labels == label)][0]) for label in (1, 2)}
    assert colours[1] != colours[2]
    with pytest.raises(ValueError, match="mask shape"):
        overlay_contours(phantom, phantom_labels[:64])


def test_denoising_strip_wraps_long_sequences(tmp_path, phantom):
    rng = np.random.default_rng(0)
    times = list(np.linspace(1.0, 0.0, 10))
    preds = [np.clip((1 - t) * phantom + t * rng.normal(size=phantom.shape), -1, 1) for t in times]
    width, height = png_size(denoising_strip(preds, times, tmp_path / "strip.png", num_panels=10))
    # All 10 steps asked for: 8 panels per row, two rows.
    assert 1300 <= width <= 1550 and 350 <= height <= 450
    width_short, height_short = png_size(denoising_strip(preds[:4], times[:4], tmp_path / "short.png"))
    assert width_short < width / 1.8 and height_short < height / 1.5
    with pytest.raises(ValueError, match="one time per prediction"):
        denoising_strip(preds, times[:3], tmp_path / "bad.png")


def test_metric_curves_from_long_format_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    lines = ["step,name,value"]
    for step in range(0, 500, 10):
        lines += [f"{step},train/loss,{1.0 / (step + 1) ** 0.7}", f"{step},train/lr,{1e-4 * min(1, step / 50)}"]
    for step in range(0, 500, 100):
        lines += [f"{step},val/ssim,{0.5 + step / 2000}", f"{step},val/psnr,{20 + step / 100}", f"{step},val/fid,nan"]
    csv_path.write_text("\n".join(lines) + "\n")
    width, height = png_size(metric_curves(csv_path, tmp_path / "curves.png"))
    # Four finite series (the all-NaN one is dropped), two training and two validation ones: each group one row of
    # two 4 x 2.9-inch panels under its name.
    assert 750 <= width <= 850 and 620 <= height <= 760

    empty = tmp_path / "empty.csv"
    empty.write_text("step,name,value\n")
    assert png_size(metric_curves(empty, tmp_path / "empty.png"))[0] > 100
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match="wrong.csv lacks columns"):
        metric_curves(wrong, tmp_path / "wrong.png")


def test_metric_curves_plot_each_series_in_step_order(tmp_path, figures):
    rng = np.random.default_rng(0)
    steps = rng.permutation(np.arange(0, 300, 10)).tolist()  # rows out of order, as after a resume
    loss = {s: 10.0 ** (-s / 100) for s in steps}  # three decades: log axis
    lr = {s: 1e-4 * (1 + s / 300) for s in steps}
    ssim = {0: 0.2, 100: 0.45, 200: 0.7}
    lines = ["step,name,value"] + [f"{s},train/loss,{loss[s]!r}" for s in loss]
    lines += [f"{s},train/lr,{lr[s]!r}" for s in lr]
    lines += [f"{s},val/ssim,{v}" for s, v in ssim.items()] + ["100,val/ssim,nan", "100,val/fid,inf"]
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    metric_curves(csv_path, tmp_path / "curves.png")
    panels = figures[0].axes
    assert [ax.get_title() for ax in panels] == ["train/loss", "train/lr", "val/ssim"]  # non-finite dropped
    for ax, series in zip(panels, (loss, lr, ssim)):
        (line,) = ax.get_lines()
        np.testing.assert_allclose(line.get_xydata(), sorted(series.items()))
    assert [ax.get_yscale() for ax in panels] == ["log", "linear", "linear"]

    # Other values draw other curves, pixel for pixel.
    before = png_pixels(tmp_path / "curves.png")
    csv_path.write_text("\n".join(lines).replace("val/ssim,0.45", "val/ssim,0.65") + "\n")
    after = png_pixels(metric_curves(csv_path, tmp_path / "curves.png"))
    ssim_box = figures[1].axes[2].get_window_extent()
    changed = np.argwhere((before != after).any(axis=-1))
    assert len(changed) > 20
    ys, xs = before.shape[0] - changed[:, 0], changed[:, 1]  # display coordinates
    assert np.all((xs >= ssim_box.x0 - 5) & (xs <= ssim_box.x1 + 5) & (ys >= ssim_box.y0 - 5) & (ys <= ssim_box.y1 + 5))


def test_image_grid_is_pixel_exact(tmp_path, phantom, phantom_labels):
    images = [phantom, -phantom, phantom_labels, phantom]
    path = image_grid(images, tmp_path / "grid.png", ncols=3)
    assert png_size(path) == (3 * 130 + 2, 2 * 130 + 2)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(pixels[2:130, 2:130, 0], np.round((phantom + 1) / 2 * 255))
    assert np.all(pixels[:2] == 255)  # white separators
    zoomed = image_grid(images[:2], tmp_path / "zoom.png", ncols=2, zoom=2)
    assert png_size(zoomed) == (2 * 258 + 2, 258 + 2)
    with pytest.raises(ValueError, match="differ in size"):
        image_grid([phantom, phantom[:64]], tmp_path / "bad.png", ncols=2)


@pytest.fixture(scope="module")
def volumes() -> dict[str, np.ndarray]:
    """An anisotropic (10, 14, 18) blob in [-1, 1] off the centre, a noisy copy and its integer labels."""
    z, y, x = np.mgrid[:10, :14, :18]
    reference = np.exp(-((z - 6) ** 2 / 8 + (y - 5) ** 2 / 20 + (x - 11) ** 2 / 30)) * 2 - 1
    generated = np.clip(reference + np.random.default_rng(0).normal(0, 0.1, reference.shape), -1, 1)
    return dict(condition=(reference > 0).astype(np.int64) + (reference > 0.6), generated=generated,
                reference=reference)


def test_volume_panels_cut_with_d_upwards_and_pick_inner_slices():
    volume = np.arange(10 * 14 * 18, dtype=np.float64).reshape(10, 14, 18)
    orthogonal = visualization._volume_panels(volume[None], "orthogonal")  # (1, D, H, W) is squeezed
    assert [title for title, _, _ in orthogonal] == ["axial", "coronal", "sagittal"]
    np.testing.assert_array_equal(orthogonal[0][1], volume[5])
    np.testing.assert_array_equal(orthogonal[1][1], volume[:, 7, :][::-1])
    np.testing.assert_array_equal(orthogonal[2][1], volume[:, :, 9][::-1])
    assert [axes for _, _, axes in orthogonal] == [(1, 2), (0, 2), (0, 1)]

    montage = visualization._volume_panels(volume, "montage", num_slices=4)
    # linspace(0.9, 8.1, 4) = 0.9, 3.3, 5.7, 8.1: the inner 80% of D, rounded.
    assert [title for title, _, _ in montage] == ["slice 1", "slice 3", "slice 6", "slice 8"]
    for (_, panel, axes), index in zip(montage, (1, 3, 6, 8)):
        np.testing.assert_array_equal(panel, volume[index])
        assert axes == (1, 2)
    # More slices than D has: each slice once.
    assert len(visualization._volume_panels(volume[:3], "montage", num_slices=6)) == 3

    mip = visualization._volume_panels(volume, "mip", plane_names=("transverse", "frontal", "lateral"))
    assert [title for title, _, _ in mip] == ["MIP along D (transverse)", "MIP along H (frontal)",
                                              "MIP along W (lateral)"]
    for axis, (_, panel, _) in enumerate(mip):
        np.testing.assert_array_equal(panel, volume.max(axis) if axis == 0 else volume.max(axis)[::-1])


def test_volume_mip_shows_a_bright_voxel_where_it_is(tmp_path, figures):
    volume = np.random.default_rng(1).uniform(-1, 0, (10, 14, 18))
    volume[7, 3, 12] = 1.0  # superior (high D), near the top (low H), right of centre (high W)
    mips = [panel for _, panel, _ in visualization._volume_panels(volume, "mip")]
    peaks = [np.unravel_index(np.argmax(panel), panel.shape) for panel in mips]
    assert peaks == [(3, 12), (10 - 1 - 7, 12), (10 - 1 - 7, 3)]  # D drawn upwards: index 7 is row 2

    pixels = png_pixels(volume_figure(dict(generated=volume), tmp_path / "mip.png", "mip"))
    drawn = figures[0].axes
    assert len(drawn) == 3  # one row, no error row without a reference
    for ax, mip in zip(drawn, mips):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), mip)
    for ax, mip, (row, col) in zip(drawn, mips, peaks):
        assert pixel_at(pixels, ax, mip.shape, row, col).min() >= 250  # white in the PNG
        assert pixel_at(pixels, ax, mip.shape, (row + 5) % mip.shape[0], col).max() <= 130


def test_volume_figure_rows_error_and_aspect(tmp_path, volumes, figures):
    path = volume_figure(volumes, tmp_path / "volumes" / "ortho.png", "orthogonal", title="item-3",
                         spacing=(3.0, 1.0, 1.0))
    assert path == tmp_path / "volumes" / "ortho.png"
    width, height = png_size(path)
    # 3 columns x 4 rows (condition, generated, reference, |error|) of 2.2-inch panels, plus a colour bar.
    assert 650 <= width <= 850 and 850 <= height <= 1050
    assert png_pixels(path).std() > 30
    figure = figures[0]
    axes = np.array(figure.axes[:12]).reshape(4, 3)  # the colour bar's axes come last
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["condition", "generated", "reference", "|error|"]
    assert [ax.get_title() for ax in axes[0]] == ["axial", "coronal", "sagittal"]
    assert figure.get_suptitle() == "item-3"
    assert figure.axes[-1].get_ylabel() == "|error| (normalised units)"
    # Slices are 3 mm thick: the coronal plane (D x W = 10 x 18 voxels) is 30 mm high and 18 mm wide.
    assert [ax.get_aspect() for ax in axes[1]] == [1.0, 3.0, 3.0]
    box = axes[1, 1].get_window_extent()
    assert box.height / box.width == pytest.approx(30 / 18, rel=0.05)
    errors = [np.abs(g - r) for (_, g, _), (_, r, _) in zip(
        visualization._volume_panels(volumes["generated"], "orthogonal"),
        visualization._volume_panels(volumes["reference"], "orthogonal"))]
    for ax, error in zip(axes[3], errors):
        image = ax.get_images()[0]
        np.testing.assert_allclose(image.get_array(), error)
        assert image.get_clim() == pytest.approx((0, max(e.max() for e in errors)))  # one scale for the row
        assert image.get_cmap().name == "magma"

    # The MIP error row is the difference of the projections, and says so.
    volume_figure(volumes, tmp_path / "mip.png", "mip")
    mip_error = figures[1].axes[9].get_images()[0].get_array()
    assert figures[1].axes[9].get_ylabel() == "|error| of MIPs"
    np.testing.assert_allclose(mip_error, np.abs(volumes["generated"].max(0) - volumes["reference"].max(0)))

    # A montage is wider; no error row when the generated volume is a mask.
    montage = volume_figure(volumes, tmp_path / "montage.png", "montage", num_slices=6)
    assert png_size(montage)[0] > 1.6 * width
    masks = dict(generated=volumes["condition"], reference=volumes["reference"])
    width_m, height_m = png_size(volume_figure(masks, tmp_path / "masks.png", "orthogonal"))
    assert height_m < height / 1.8
    assert [ax.get_ylabel() for ax in figures[3].axes[::3]] == ["generated", "reference"]


def test_volume_figure_rejects_bad_input(tmp_path, volumes):
    with pytest.raises(ValueError, match="unknown view 'coronal'"):
        volume_figure(volumes, tmp_path / "x.png", "coronal")
    with pytest.raises(ValueError, match="differ in shape"):
        volume_figure(dict(generated=volumes["generated"], reference=volumes["reference"][:8]), tmp_path / "x.png",
                      "mip")
    with pytest.raises(ValueError, match=r"expected a volume .* got shape \(14, 18\)"):
        volume_figure(dict(generated=volumes["generated"][0]), tmp_path / "x.png", "montage")
    with pytest.raises(ValueError, match="got shape \\(2, 10, 14, 18\\)"):
        volume_figure(dict(generated=np.stack([volumes["generated"]] * 2)), tmp_path / "x.png", "montage")
    with pytest.raises(ValueError, match="at least one volume"):
        volume_figure({}, tmp_path / "x.png", "mip")
    assert not (tmp_path / "x.png").exists()
