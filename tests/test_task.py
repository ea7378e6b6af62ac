"""The task's condition encoding and the vector-condition embedding path, including classifier-free guidance."""
from __future__ import annotations

import pytest
import torch

from diffusion import build_strategy
from diffusion.generate import generate, item_noise
from diffusion.task import Field, Task
from models.unet2d import build_denoiser
from utils.config import ConfigError, DiffusionConfig, ModelConfig, TaskConfig

FIELDS = {"image": Field("image", "image", 3), "mask": Field("mask", "mask", 3),
          "class_dist": Field("class_dist", "vector", 3)}
TINY = ModelConfig(block_out_channels=[8, 16], attention_levels=[False, False], attention_head_dim=8,
                   norm_num_groups=4)


def batch_of(dists):
    dists = torch.tensor(dists, dtype=torch.float32)
    n = len(dists)
    return {"image": torch.rand(n, 3, 8, 8) * 2 - 1, "mask": torch.randint(0, 3, (n, 1, 8, 8)),
            "class_dist": dists, "item_id": [f"i{k}" for k in range(n)]}


def vector_task(**kwargs):
    return Task(TaskConfig(targets=["image"], vector_condition="class_dist", **kwargs), FIELDS, (8, 8))


def test_vector_condition_marks_unlabelled_items_null():
    task = vector_task()
    cond = task.condition_of(batch_of([[0.2, 0.8, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(cond["vector"], torch.tensor([[0.2, 0.8, 0.0, 0.0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]]))
    null = task.null_condition(cond)["vector"]
    assert torch.equal(null, torch.tensor([[0, 0, 0, 1.0]]).expand(3, -1))


def test_dropped_conditions_equal_the_null_condition():
    task = Task(TaskConfig(targets=["image"], spatial_conditions=["mask"], vector_condition="class_dist"),
                FIELDS, (8, 8))
    batch = batch_of([[0.5, 0.5, 0.0]] * 400)
    torch.manual_seed(0)
    cond = task.condition_of(batch, drop_prob=0.25)
    null = task.null_condition(cond)
    dropped = cond["vector"][:, -1] == 1
    assert 0.18 < dropped.float().mean() < 0.32
    assert torch.equal(cond["vector"][dropped], null["vector"][dropped])
    assert torch.equal(cond["spatial"][dropped], null["spatial"][dropped])  # the same samples lose both
    assert (cond["spatial"][~dropped].abs() == 1).all()


def test_embedding_is_the_weighted_sum_of_class_embeddings():
    task = vector_task()
    net = build_denoiser(TINY, task)
    table = net.vector_embedding.detach()
    captured = {}
    net.unet.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
    cond = task.condition_of(batch_of([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]))
    net(torch.zeros(2, 3, 8, 8), torch.tensor([10.0, 10.0]), cond)
    expected = torch.stack([0.25 * table[0] + 0.75 * table[1], table[3]])  # the null row for unlabelled
    assert torch.allclose(captured["class_labels"], expected)


def test_guidance_scale_one_is_the_conditional_model():
    task = vector_task()
    torch.manual_seed(0)
    net = build_denoiser(TINY, task).eval()
    strategy = build_strategy(DiffusionConfig(strategy="rflow"))
    batch = batch_of([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    noise = item_noise(task.sample_shape, [0, 1], 0, "cpu")
    conditional = strategy.sample(net, noise, task.condition_of(batch), steps=4)
    guided_one = generate(strategy, net, task, batch, [0, 1], seed=0, steps=4, device="cpu", guidance_scale=1.0)
    assert torch.equal(guided_one, conditional)
    guided_three = generate(strategy, net, task, batch, [0, 1], seed=0, steps=4, device="cpu", guidance_scale=3.0)
    unconditional = strategy.sample(net, noise, task.null_condition(task.condition_of(batch)), steps=4)
    assert not torch.allclose(guided_three, conditional) and not torch.allclose(guided_three, unconditional)


def test_task_rejects_unknown_names():
    with pytest.raises(ConfigError, match="task.vector_condition"):
        Task(TaskConfig(targets=["image"], vector_condition="label"), FIELDS, (8, 8))
    with pytest.raises(ConfigError, match="task.targets"):
        Task(TaskConfig(targets=["t1"]), FIELDS, (8, 8))
    with pytest.raises(ConfigError, match="task.cond_drop_prob"):
        vector_task(cond_drop_prob=1.0)


def test_roi_weight_and_loss_weights_give_the_hand_computed_per_sample_loss():
    # Sample 0: ROI = its top row (4 of 16 pixels), image loss 3 there and 1 elsewhere, mask loss 2 everywhere.
    # Sample 1: no ROI pixel, image loss 1, mask loss 2.
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 2
    elementwise = torch.cat([torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)], dim=1)  # image, mask
    elementwise[0, :3, 0] = 3.0
    batch = {"mask": labels, "item_id": ["a", "b"]}

    def reduce(roi_weight):
        task = Task(TaskConfig(targets=["image", "mask"], roi_mask="mask", roi_weight=roi_weight,
                               loss_weights={"mask": 0.5}), FIELDS, (4, 4))
        return task.reduce(elementwise, batch)

    # image (4 * 3 * 5 + 12 * 1) / 16 = 4.5, mask (4 * 2 * 5 + 12 * 2) / 16 = 4, total 4.5 + 0.5 * 4.
    weighted, diagnostics = reduce(5.0)
    assert torch.allclose(weighted, torch.tensor([4.5 + 0.5 * 4.0, 1.0 + 0.5 * 2.0]))
    # Unweighted: image (4 * 3 + 12) / 16 = 1.5, mask 2.
    plain, _ = reduce(1.0)
    assert torch.allclose(plain, torch.tensor([1.5 + 0.5 * 2.0, 1.0 + 0.5 * 2.0]))
    # Diagnostics stay unweighted: image loss 3 on the 4 ROI pixels, 1 on the 28 others.
    assert torch.isclose(diagnostics["loss_image_in_mask"], torch.tensor(3.0))
    assert torch.isclose(diagnostics["loss_image_out_mask"], torch.tensor(1.0))
    assert torch.isclose(diagnostics["loss_image"], torch.tensor((12 * 3 + 84 * 1) / 96))  # all 96 values
