"""UNet3DModel: anisotropic volumes, diffusers-format round trip, gradient checkpointing, attention placement,
vector conditions, shape errors, the 2D/3D choice of build_denoiser and FSDP2 sharding on gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DModel

from diffusion.task import Field, Task
from models.unet2d import build_denoiser, load_denoiser
from models.unet3d import AttentionBlock3D, ResnetBlock3D, UNet3DModel, build_unet3d, check_unet3d_shape
from tests.runs import REPO
from utils.config import ConfigError, ModelConfig, TaskConfig
from utils.export import export_weights

SHAPE = (8, 12, 16)  # (D, H, W), anisotropic


def tiny(**overrides) -> ModelConfig:
    settings = dict(block_out_channels=[8, 16], attention_levels=[False, True], attention_head_dim=8,
                    norm_num_groups=4)
    return ModelConfig(**{**settings, **overrides})


def volume_task(shape=SHAPE, vector: bool = True) -> Task:
    fields = {"hd": Field("hd", "image", 1), "ld": Field("ld", "image", 1),
              "class_dist": Field("class_dist", "vector", 3)}
    cfg = TaskConfig(targets=["hd"], spatial_conditions=["ld"], vector_condition="class_dist" if vector else "")
    return Task(cfg, fields, shape)


@pytest.mark.parametrize("widths, shape", [([8, 16], (8, 12, 16)), ([8, 8, 16], (4, 8, 12)), ([8, 16], (2, 6, 4))])
def test_forward_keeps_anisotropic_shapes(widths, shape):
    torch.manual_seed(0)
    unet = build_unet3d(tiny(block_out_channels=widths, attention_levels=[False] * (len(widths) - 1) + [True]),
                        3, 2, shape)
    x = torch.randn(2, 3, *shape)
    out = unet(x, torch.tensor([1.0, 900.0])).sample
    assert out.shape == (2, 2, *shape)
    assert torch.isfinite(out).all()
    # A scalar timestep means the same for every sample as a (B,) one.
    assert torch.equal(unet(x, 5).sample, unet(x, torch.tensor([5, 5])).sample)


def test_save_and_load_pretrained_reproduce_the_forward_pass(tmp_path):
    torch.manual_seed(0)
    unet = build_unet3d(tiny(dropout=0.1, layers_per_block=2), 2, 1, SHAPE, vector_condition=True).eval()
    x, t, labels = torch.randn(2, 2, *SHAPE), torch.tensor([3.0, 400.0]), torch.randn(2, 32)
    unet.save_pretrained(tmp_path / "final" / "unet")
    loaded = UNet3DModel.from_pretrained(tmp_path / "final", subfolder="unet").eval()
    assert loaded.config.attention_levels == [False, True] and loaded.config.layers_per_block == 2
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=labels).sample, unet(x, t, class_labels=labels).sample)


def test_load_denoiser_reads_a_3d_export(tmp_path):
    torch.manual_seed(0)
    task = volume_task()
    denoiser = build_denoiser(tiny(), task).eval()
    export_weights(tmp_path / "best-val_loss", denoiser, {"metric": "val/loss", "value": 1.0, "step": 1})
    assert json.loads((tmp_path / "best-val_loss" / "unet" / "config.json").read_text())["_class_name"] == "UNet3DModel"
    loaded = load_denoiser(tmp_path / "best-val_loss").eval()
    assert isinstance(loaded.unet, UNet3DModel)
    x, t = torch.randn(2, 1, *SHAPE), torch.tensor([10.0, 500.0])
    cond = {"spatial": torch.randn(2, 1, *SHAPE), "vector": torch.softmax(torch.randn(2, 4), dim=1)}
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), denoiser(x, t, cond))


def loss_and_grads(unet: UNet3DModel, calls: list) -> tuple[torch.Tensor, dict]:
    hook = unet.mid_resnet_1.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # the same dropout masks in both runs
    x = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(2))
    loss = unet(x, torch.tensor([20.0, 600.0]), class_labels=torch.ones(2, 32)).sample.square().mean()
    loss.backward()
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


@pytest.mark.parametrize("enable", ["config", "diffusers"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(enable):
    torch.manual_seed(0)
    plain = build_unet3d(tiny(dropout=0.2), 2, 1, SHAPE, vector_condition=True)
    if enable == "config":
        torch.manual_seed(0)
        checkpointed = build_unet3d(tiny(dropout=0.2, gradient_checkpointing=True), 2, 1, SHAPE,
                                    vector_condition=True)
    else:
        checkpointed = UNet3DModel.from_config(plain.config)
        checkpointed.load_state_dict(plain.state_dict())
        checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    plain_calls, checkpointed_calls = [], []
    loss, grads = loss_and_grads(plain, plain_calls)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, checkpointed_calls)
    # The block really was recomputed in the backward pass.
    assert (len(plain_calls), len(checkpointed_calls)) == (1, 2)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("levels, expected_tokens", [
    ([False, True], [4 * 6 * 8] * 4),  # down 1 + middle 1 + up 2, all at the coarse level
    ([True, False], [8 * 12 * 16] * 3 + [4 * 6 * 8]),  # down 1 + up 2 at full size, middle at the coarse level
    ([False, False], [4 * 6 * 8]),  # the middle block only
])
def test_attention_only_at_the_configured_levels(monkeypatch, levels, expected_tokens):
    tokens = []

    def counting_attention(q, k, v, *args, **kwargs):
        tokens.append(q.shape[-2])
        return original(q, k, v, *args, **kwargs)

    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_attention)
    unet = build_unet3d(tiny(attention_levels=levels), 1, 1, SHAPE)
    assert sum(isinstance(m, AttentionBlock3D) for m in unet.modules()) == len(expected_tokens)
    with torch.no_grad():
        unet(torch.randn(1, 1, *SHAPE), 10)
    assert sorted(tokens) == sorted(expected_tokens)


def test_vector_condition_changes_the_output_and_the_null_condition_works():
    torch.manual_seed(0)
    task = volume_task()
    denoiser = build_denoiser(tiny(), task).eval()
    assert denoiser.vector_embedding.shape == (4, denoiser.unet.time_embedding.linear_2.out_features)
    x, t, spatial = torch.randn(2, 1, *SHAPE), torch.tensor([50.0, 50.0]), torch.randn(2, 1, *SHAPE)
    one_hot = torch.eye(4)[[0, 1]]
    cond = {"spatial": spatial, "vector": one_hot}
    null = task.null_condition(cond)
    with torch.no_grad():
        labelled, unconditional = denoiser(x, t, cond), denoiser(x, t, null)
        other = denoiser(x, t, {**cond, "vector": torch.eye(4)[[2, 2]]})
        # The null condition is the embedding of the last entry, with no spatial condition.
        by_hand = denoiser.unet(torch.cat([x, torch.zeros_like(spatial)], dim=1), t,
                                class_labels=denoiser.vector_embedding[-1].expand(2, -1)).sample
    assert (labelled - other).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
    assert (labelled - unconditional).abs().max() > 1e-4
    torch.testing.assert_close(unconditional, by_hand)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser.unet(torch.cat([x, spatial], dim=1), t)


@pytest.mark.parametrize("shape", [(8, 12, 18), (6, 12, 16), (8, 12)])
def test_a_shape_the_levels_cannot_halve_names_the_shape_and_the_key(shape):
    cfg = tiny(block_out_channels=[8, 16, 16], attention_levels=[False, False, True])  # halves twice: sides % 4
    with pytest.raises(ConfigError) as error:
        check_unet3d_shape(cfg, shape)
    assert str(tuple(shape)) in str(error.value)
    if len(shape) == 3:
        assert "model.block_out_channels" in str(error.value)
        with pytest.raises(ConfigError, match=r"\(8, 12, 18\)|\(6, 12, 16\)"):
            build_denoiser(cfg, volume_task(shape))
    check_unet3d_shape(cfg, (8, 12, 16))


def test_build_denoiser_chooses_the_unet_from_the_task_dimensionality():
    assert isinstance(build_denoiser(tiny(), volume_task()).unet, UNet3DModel)
    task_2d = Task(TaskConfig(targets=["hd"]), {"hd": Field("hd", "image", 1)}, (16, 16))
    unet_2d = build_denoiser(tiny(), task_2d).unet
    assert type(unet_2d) is UNet2DModel and unet_2d.config.sample_size == 16
    task_1d = Task(TaskConfig(targets=["hd"]), {"hd": Field("hd", "image", 1)}, (16,))
    with pytest.raises(ConfigError, match=r"\(16,\)"):
        build_denoiser(tiny(), task_1d)


def test_fsdp_wrap_lists_name_blocks_the_models_have():
    """Accelerate stops on a listed class the model lacks: the file's list fits 2D, the 3D list its UNet3D."""
    text = (REPO / "configs" / "accelerate" / "fsdp.yaml").read_text()
    listed_2d = yaml.safe_load(text)["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    task_2d = Task(TaskConfig(targets=["hd"]), {"hd": Field("hd", "image", 1)}, (16, 16))
    names_2d = {type(m).__name__ for m in build_denoiser(tiny(), task_2d).modules()}
    assert set(listed_2d) <= names_2d
    sys.path.insert(0, str(REPO / "tests"))
    from fsdp_unet3d_probe import wrap_classes_3d
    names_3d = {type(m).__name__ for m in build_denoiser(tiny(), volume_task()).modules()}
    assert set(wrap_classes_3d()) == {ResnetBlock3D.__name__, AttentionBlock3D.__name__} <= names_3d


def test_fsdp2_shards_trains_and_gathers_a_unet3d(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29737",
               str(REPO / "tests" / "fsdp_unet3d_probe.py"), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["ok"] and r["wrapped_modules"] == 12 for r in reports)  # 7 resnet + 5 attention blocks
    assert reports[0]["loss"] != reports[1]["loss"]  # each rank trained on its own batch
    assert 0 <= reports[0]["max_difference"] < 1e-5
