"""models/classifier.py: the auxiliary classifier, patch selection, guided prior map, focal weights, the label
denoiser trained a few steps with the DDPM strategy, pretrained backbones and config refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import ResNetModel

from diffusion.ddpm import DDPM
from models.classifier import (
    AuxiliaryClassifier, LabelDenoiser, LabelDiffusionClassifier, build_backbone, check_classifier_config, crop_patches,
    feature_map_side, focal_weights, guided_prior_map, resnet_config, select_patches)
from utils.config import ClassifierConfig, ConfigError

IMAGE_SIZE = 32
NUM_CLASSES = 3
# Small and fast: two stages give a 4 x 4 feature map (and saliency) at 32 px.
SMALL = ClassifierConfig(backbone_widths=[8, 16], backbone_depths=[1, 1], num_patches=3, patch_size=8,
                         prior_size=4, feature_dim=32)


def _images(channels: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _overlaps(a, b, size: int) -> bool:
    return abs(a[0] - b[0]) < size and abs(a[1] - b[1]) < size


# ----------------------------------------------------------------------------------------------------------
# Auxiliary classifier and patches.

@pytest.mark.parametrize("channels", [1, 3])
def test_auxiliary_classifier_shapes_and_determinism(channels):
    torch.manual_seed(0)
    aux = AuxiliaryClassifier(SMALL, channels, NUM_CLASSES, IMAGE_SIZE).eval()
    images = _images(channels)
    out = aux(images)
    side = feature_map_side(SMALL, IMAGE_SIZE)
    assert side == 4
    assert out["global_logits"].shape == out["local_logits"].shape == (4, NUM_CLASSES)
    assert out["saliency"].shape == (4, NUM_CLASSES, side, side)
    assert out["patch_corners"].shape == (4, SMALL.num_patches, 2)
    assert out["patch_attention"].sum(1).allclose(torch.ones(4))
    corners = out["patch_corners"]
    assert corners.min() >= 0 and corners.max() <= IMAGE_SIZE - SMALL.patch_size
    again = aux(images)
    for key in out:
        assert torch.equal(out[key], again[key]), key
    global_probs, local_probs = aux.priors(images)
    assert global_probs.sum(1).allclose(torch.ones(4)) and local_probs.sum(1).allclose(torch.ones(4))


def test_auxiliary_loss_trains_both_heads():
    torch.manual_seed(0)
    aux = AuxiliaryClassifier(SMALL, 1, NUM_CLASSES, IMAGE_SIZE)
    labels = torch.tensor([0, 1, 2, 1])
    loss, diagnostics = aux.loss(_images(1), labels)
    assert loss.shape == (4,)
    assert set(diagnostics) == {"aux/global_ce", "aux/local_ce", "aux/global_accuracy", "aux/local_accuracy"}
    assert torch.allclose(loss.mean(), diagnostics["aux/global_ce"] + diagnostics["aux/local_ce"])
    loss.mean().backward()
    missing = [name for name, p in aux.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_patch_selection_picks_most_salient_locations():
    saliency = torch.zeros(1, 2, 8, 8)  # 8 x 8 cells over a 64 px image: a cell is 8 px
    saliency[0, 0, 1, 5], saliency[0, 0, 6, 2], saliency[0, 0, 3, 3] = 3.0, 2.0, 1.0
    saliency[0, 1] = 7.0  # a constant class map carries no location
    corners = select_patches(saliency, (64, 64), patch_size=8, num_patches=3)
    assert corners.tolist() == [[[8, 40], [48, 16], [24, 24]]]  # the hot cells, strongest first

    # Two neighbouring hot cells: the second patch is taken beside the first, not overlapping it.
    saliency = torch.zeros(1, 1, 8, 8)
    saliency[0, 0, 1, 5], saliency[0, 0, 1, 6] = 3.0, 2.5
    corners = select_patches(saliency, (64, 64), patch_size=8, num_patches=3)[0].tolist()
    assert all(not _overlaps(a, b, 8) for i, a in enumerate(corners) for b in corners[i + 1:])
    assert all(abs(row - 8) <= 2 for row, _ in corners)  # all on the hot row

    # More patches than fit: the image is tiled first, then overlap is allowed.
    saliency = torch.zeros(1, 1, 4, 4)
    saliency[0, 0, 0, 0] = 1.0
    corners = select_patches(saliency, (16, 16), patch_size=8, num_patches=5)[0].tolist()
    assert sorted(map(tuple, corners[:4])) == [(0, 0), (0, 8), (8, 0), (8, 8)]
    assert corners[4] == [0, 0]


def test_crop_patches_reads_pixel_coordinates():
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    corners = torch.tensor([[[0, 0], [2, 5]], [[6, 8], [1, 1]]])
    patches = crop_patches(images, corners, 4)
    assert patches.shape == (2, 2, 3, 4, 4)
    assert torch.equal(patches[0, 1], images[0, :, 2:6, 5:9])
    assert torch.equal(patches[1, 0], images[1, :, 6:10, 8:12])


# ----------------------------------------------------------------------------------------------------------
# Prior map and focal weights.

def test_guided_prior_map_rule():
    global_probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    local_probs = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    size = 6
    prior = guided_prior_map(global_probs, local_probs, size)
    assert prior.shape == (2, 3, size, size)
    assert prior.sum(1).allclose(torch.ones(2, size, size)) and prior.min() >= 0
    for i in range(size):
        assert prior[:, :, i, i].allclose(global_probs)  # the diagonal is the global prior
    assert prior[:, :, 0, size - 1].allclose(local_probs) and prior[:, :, size - 1, 0].allclose(local_probs)
    # |i - j| = 1 of 5: one fifth of the way from global to local.
    assert prior[:, :, 2, 3].allclose(0.8 * global_probs + 0.2 * local_probs)
    assert prior[:, :, 4, 1].allclose(0.4 * global_probs + 0.6 * local_probs)
    assert torch.equal(guided_prior_map(global_probs, local_probs, 1)[..., 0, 0], global_probs)


def test_focal_weights_by_hand():
    prior = torch.tensor([0.2, 0.5, 0.3])[None, :, None, None].expand(2, 3, 4, 4)
    labels = torch.tensor([1, 0])
    assert focal_weights(prior, labels, alpha=10, gamma=1).tolist() == pytest.approx([6.0, 9.0])
    assert focal_weights(prior, labels, alpha=10, gamma=2).tolist() == pytest.approx([3.5, 7.4])
    assert focal_weights(prior, labels, alpha=0, gamma=1).tolist() == [1.0, 1.0]
    # Half the cells certain of class 0, half of class 1: p = 0.5 for either label.
    halves = torch.zeros(1, 2, 2, 2)
    halves[0, 0, 0], halves[0, 1, 1] = 1.0, 1.0
    assert focal_weights(halves, torch.tensor([1]), alpha=4, gamma=1).tolist() == pytest.approx([3.0])


# ----------------------------------------------------------------------------------------------------------
# Label denoiser.

def _label_problem(channels: int):
    """Four images whose brightness gives their class, their one-hot label maps and prior maps."""
    labels = torch.tensor([0, 1, 2, 0])
    images = _images(channels, seed=1) * 0.1 + labels[:, None, None, None].float() - 1
    probs = torch.full((4, NUM_CLASSES), 0.2).scatter(1, labels[:, None], 0.6)
    prior = guided_prior_map(probs, probs.roll(1, dims=1), SMALL.prior_size)
    x0 = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()[..., None, None].expand_as(prior)
    return images, labels, {"image": images, "prior": prior}, x0.contiguous()


@pytest.mark.parametrize("channels", [1, 3])
def test_label_denoiser_shapes(channels):
    torch.manual_seed(0)
    net = LabelDenoiser(SMALL, channels, NUM_CLASSES).eval()
    _, _, cond, x0 = _label_problem(channels)
    x_t = torch.randn_like(x0)
    out = net(x_t, torch.tensor([0.0, 10.0, 500.0, 999.0]), cond)
    assert out.shape == (4, NUM_CLASSES, SMALL.prior_size, SMALL.prior_size)
    # One timestep for the whole batch is the same as that timestep repeated.
    assert torch.equal(net(x_t, torch.tensor(7.0), cond), net(x_t, torch.full((4,), 7.0), cond))
    assert not torch.equal(net(x_t, torch.full((4,), 7.0), cond), net(x_t, torch.full((4,), 700.0), cond))
    with pytest.raises(ValueError, match="classifier.prior_size"):
        net(torch.randn(4, NUM_CLASSES, 5, 5), torch.zeros(4), cond)


def test_label_denoiser_learns_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    net = LabelDenoiser(SMALL, 1, NUM_CLASSES)
    strategy = DDPM(num_train_timesteps=1000)
    _, labels, cond, x0 = _label_problem(1)
    weights = focal_weights(cond["prior"], labels, SMALL.focal_alpha, SMALL.focal_gamma)
    fixed_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    fixed_t = torch.tensor([0.1, 0.4, 0.7, 0.95])

    def held_out_loss() -> float:
        with torch.no_grad():
            terms, _ = strategy.loss_terms(net, x0, cond, noise=fixed_noise, t=fixed_t)
        return float((terms.mean((1, 2, 3)) * weights).mean())

    before = held_out_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(40):
        terms, _ = strategy.loss_terms(net, x0, cond)
        loss = (terms.mean((1, 2, 3)) * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing
        optimizer.step()
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)


# ----------------------------------------------------------------------------------------------------------
# Pretrained backbones.

@pytest.mark.parametrize("saved_channels, image_channels", [(1, 1), (3, 3), (3, 1)])
def test_pretrained_backbone_loads_identical_weights(tmp_path, saved_channels, image_channels):
    torch.manual_seed(0)
    saved = ResNetModel(resnet_config(SMALL, saved_channels)).eval()
    saved.save_pretrained(tmp_path / "resnet")
    cfg = dataclasses.replace(SMALL, pretrained=str(tmp_path / "resnet"))
    backbone = build_backbone(cfg, image_channels).eval()
    images = _images(image_channels)
    expected = saved(images.expand(-1, saved_channels, -1, -1)).last_hidden_state
    assert torch.equal(backbone(images), expected)
    aux = AuxiliaryClassifier(cfg, image_channels, NUM_CLASSES, IMAGE_SIZE).eval()
    assert torch.equal(aux.local_backbone(images), expected)


def test_export_of_grey_images_on_rgb_weights_reloads_without_the_pretrained_folder(tmp_path):
    torch.manual_seed(0)
    ResNetModel(resnet_config(SMALL, 3)).save_pretrained(tmp_path / "resnet")
    cfg = dataclasses.replace(SMALL, pretrained=str(tmp_path / "resnet"))
    net = LabelDiffusionClassifier(cfg, 1, NUM_CLASSES, IMAGE_SIZE).eval()
    export = tmp_path / "final"
    export.mkdir()
    net.save_export(net.state_dict(), export)
    (tmp_path / "resnet" / "model.safetensors").unlink()  # the export must not need the folder
    loaded = LabelDiffusionClassifier.load_export(export).eval()
    images = _images(1)
    torch.testing.assert_close(loaded.auxiliary(images)["global_logits"], net.auxiliary(images)["global_logits"],
                               rtol=0, atol=0)


def test_pretrained_refusals(tmp_path):
    missing = dataclasses.replace(SMALL, pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"classifier\.pretrained=.*nowhere"):
        build_backbone(missing, 1)
    with pytest.raises(ConfigError, match=r"classifier\.pretrained=.*nowhere"):
        check_classifier_config(missing, IMAGE_SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="does not hold a transformers ResNetModel"):
        build_backbone(dataclasses.replace(SMALL, pretrained=str(tmp_path / "empty")), 1)
    ResNetModel(resnet_config(SMALL, 3)).save_pretrained(tmp_path / "resnet")
    wider = dataclasses.replace(SMALL, backbone_widths=[8, 32], pretrained=str(tmp_path / "resnet"))
    with pytest.raises(ConfigError, match=r"classifier\.backbone_widths=\[8, 32\].*widths \[8, 16\]"):
        build_backbone(wider, 3)
    with pytest.raises(ConfigError, match="takes 3 channels but the images have 2"):
        build_backbone(dataclasses.replace(SMALL, pretrained=str(tmp_path / "resnet")), 2)


# ----------------------------------------------------------------------------------------------------------
# Config refusals.

@pytest.mark.parametrize("changes, key", [
    (dict(backbone_widths=[]), "classifier.backbone_widths"),
    (dict(backbone_widths=[8, 0]), "classifier.backbone_widths"),
    (dict(backbone_depths=[1]), "classifier.backbone_depths"),
    (dict(backbone_depths=[1, 0]), "classifier.backbone_depths"),
    (dict(patch_size=IMAGE_SIZE + 1), "classifier.patch_size"),
    (dict(patch_size=0), "classifier.patch_size"),
    (dict(num_patches=0), "classifier.num_patches"),
    (dict(prior_size=0), "classifier.prior_size"),
    (dict(feature_dim=0), "classifier.feature_dim"),
    (dict(aux_steps=-1), "classifier.aux_steps"),
    (dict(aux_lr=0.0), "classifier.aux_lr"),
    (dict(focal_alpha=-1.0), "classifier.focal_alpha"),
    (dict(focal_gamma=-0.5), "classifier.focal_gamma"),
])
def test_config_refusals(changes, key):
    cfg = dataclasses.replace(SMALL, **changes)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_classifier_config(cfg, IMAGE_SIZE)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AuxiliaryClassifier(cfg, 1, NUM_CLASSES, IMAGE_SIZE)


def test_default_config_is_accepted():
    check_classifier_config(ClassifierConfig(), 64)
    check_classifier_config(dataclasses.replace(ClassifierConfig(), aux_steps=0, aux_lr=0.0), 64)
