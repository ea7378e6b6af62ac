"""task.perceptual_weight: the feature distance of the predicted x0, added to each sample's diffusion loss and
logged as train/loss_perceptual; the x0 each strategy's prediction implies."""
from __future__ import annotations

import pytest
import torch

import train_diffusion
from diffusion import build_strategy
from diffusion.task import Field, Task
from models.losses import PerceptualLoss
from tests.runs import read_metrics, tiny_args
from utils.config import ConfigError, DiffusionConfig, TaskConfig

FIELDS = {"t1": Field("t1", "image", 1), "seg": Field("seg", "mask", 3)}


@pytest.mark.parametrize("strategy_name, objective", [("ddpm", "eps"), ("ddpm", "v"), ("ddpm", "x0"),
                                                       ("rflow", "eps")])
def test_the_x0_an_exact_prediction_implies_is_x0(strategy_name, objective):
    strategy = build_strategy(DiffusionConfig(strategy=strategy_name, objective=objective))
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 2, 8, 8, generator=generator) * 2 - 1, torch.randn(4, 2, 8, 8, generator=generator)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9])
    steps = (t * strategy.num_train_timesteps).long()
    alpha = strategy._tables["alpha"][steps].view(-1, 1, 1, 1) if strategy_name == "ddpm" else None
    sigma = strategy._tables["sigma"][steps].view(-1, 1, 1, 1) if strategy_name == "ddpm" else None
    exact = {"eps": lambda: noise, "x0": lambda: x0, "v": lambda: alpha * noise - sigma * x0}[objective]
    if strategy_name == "rflow":
        exact = lambda: noise - x0  # noqa: E731 (the velocity)
    terms, _, x0_hat = strategy.loss_terms(lambda x_t, time, cond: exact(), x0, None, noise, t, with_x0=True)
    assert terms.abs().max() < 1e-5  # the prediction was exact
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)
    # Without with_x0 the call is unchanged.
    assert len(strategy.loss_terms(lambda x_t, time, cond: exact(), x0, None, noise, t)) == 2


def test_perceptual_distance_covers_the_image_targets_only(perceptual_net):
    task = Task(TaskConfig(targets=["seg", "t1"], perceptual_weight=1.0), FIELDS, (16, 16))
    perceptual = PerceptualLoss(perceptual_net)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 4, 16, 16, generator=generator) * 2 - 1  # seg one-hot (3 channels), then t1
    x0_hat = x0 + 0.5 * torch.randn(2, 4, 16, 16, generator=generator)
    distance = task.perceptual_distance(perceptual, x0, x0_hat)
    expected = perceptual(x0[:, 3:], x0_hat[:, 3:].clamp(-1, 1))
    torch.testing.assert_close(distance, expected)
    assert (distance > 0).all()
    # Only the image channels count: changing the mask's predicted channels changes nothing.
    changed = x0_hat.clone()
    changed[:, :3] = 0
    torch.testing.assert_close(task.perceptual_distance(perceptual, x0, changed), distance)
    assert torch.equal(task.perceptual_distance(perceptual, x0, x0), torch.zeros(2))


def test_run_adds_the_weighted_perceptual_term_and_logs_it_apart(tmp_path, demo_root, perceptual_net):
    run = tmp_path / "run"
    train_diffusion.main(tiny_args(run, demo_root, "task.perceptual_weight=0.5",
                                   f"vae.perceptual_network={perceptual_net}", "training.max_steps=4",
                                   "training.log_every=2"))
    rows = {(step, name): float(value) for step, name, value in read_metrics(run) if not name.endswith("_items")}
    for step in (2, 4):
        perceptual, t1 = rows[(step, "train/loss_perceptual")], rows[(step, "train/loss_t1")]
        assert perceptual > 0
        # Equal batches: the mean loss is the mean image loss plus the weighted mean perceptual distance.
        assert rows[(step, "train/loss")] == pytest.approx(t1 + 0.5 * perceptual, rel=1e-5)
    assert (run / "final" / "unet").is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["task.perceptual_weight=0.5"], "needs vae.perceptual_network"),
    (["task.perceptual_weight=-1"], "task.perceptual_weight=-1.0 must be >= 0"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, demo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_diffusion.main(tiny_args(tmp_path / "run", demo_root, *overrides))
    assert not (tmp_path / "run").exists()


def test_a_task_without_image_targets_is_refused():
    with pytest.raises(ConfigError, match="task.perceptual_weight compares images"):
        Task(TaskConfig(targets=["seg"], perceptual_weight=1.0), FIELDS, (16, 16))
