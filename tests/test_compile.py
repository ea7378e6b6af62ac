"""training.compile and gradient checkpointing of the 2D networks: the plain model's loss and gradients on the same
batch, state dicts that load into the plain model, and exact resume of a compiled run."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import train_diffusion
from diffusion import build_strategy
from diffusion.task import Field, Task
from models.autoencoder import TrainableAutoencoder, build_autoencoder
from models.unet2d import build_denoiser, load_denoiser
from tests.runs import tiny_args
from utils.config import DiffusionConfig, ModelConfig, TaskConfig, TrainingConfig, VAEConfig
from utils.training import compile_if_asked

TINY_UNET = {"block_out_channels": [16, 32], "attention_levels": [False, True], "attention_head_dim": 16}
# Generating kernels (inductor) for a network takes minutes on 2 CPU cores: one level keeps it to about a minute.
ONE_LEVEL_UNET = {"block_out_channels": [16], "attention_levels": [True], "attention_head_dim": 16}


def loss_and_grads(net, loss_of):
    loss = loss_of(net)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same_training_signal(plain, variant, loss_of, rtol):
    loss, grads = loss_and_grads(plain, loss_of)
    variant_loss, variant_grads = loss_and_grads(variant, loss_of)
    torch.testing.assert_close(variant_loss, loss, rtol=rtol, atol=1e-7)
    assert variant_grads.keys() == grads.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        torch.testing.assert_close(variant_grads[name], grads[name], rtol=rtol * 10, atol=1e-6, msg=name)
    # Saved keys carry no wrapper prefix: the variant's weights load into the plain model as they are.
    assert list(variant.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(variant.state_dict())


# Tolerances: checkpointing recomputes the same float32 ops (1e-6); inductor fuses and reorders them (1e-5).
@pytest.mark.parametrize("variant, rtol", [("compile", 1e-5), ("gradient_checkpointing", 1e-6)])
def test_2d_denoiser_gives_the_plain_loss_and_gradients(variant, rtol):
    task = Task(TaskConfig(targets=["t1"], spatial_conditions=["seg"]),
                {"t1": Field("t1", "image", 1), "seg": Field("seg", "mask", 3)}, (16, 16))
    nets = []
    for options in ({}, {"gradient_checkpointing": variant == "gradient_checkpointing"}):
        torch.manual_seed(0)
        nets.append(build_denoiser(ModelConfig(**(ONE_LEVEL_UNET if variant == "compile" else TINY_UNET), **options),
                                   task))
    plain, other = nets
    compile_if_asked(other, TrainingConfig(compile=variant == "compile"))
    assert other.unet.is_gradient_checkpointing == (variant == "gradient_checkpointing")
    strategy = build_strategy(DiffusionConfig())
    generator = torch.Generator().manual_seed(1)
    batch = {"t1": torch.rand(3, 1, 16, 16, generator=generator) * 2 - 1,
             "seg": torch.randint(0, 3, (3, 1, 16, 16), generator=generator), "item_id": ["a", "b", "c"]}
    noise, t = torch.randn(3, 1, 16, 16, generator=generator), torch.tensor([0.05, 0.5, 0.95])

    def loss_of(net):
        return strategy.loss_terms(net, task.targets_of(batch), task.condition_of(batch), noise, t)[0].mean()

    assert_same_training_signal(plain, other, loss_of, rtol)


def test_compiled_autoencoder_gives_the_plain_loss_and_gradients():
    """Traced by aot_eager, which draws the posterior sample from torch's RNG as eager code does (inductor's
    generated kernels draw their own random numbers)."""
    cfg = VAEConfig(kind="kl", block_out_channels=[8, 16], latent_channels=3, norm_num_groups=4)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(TrainableAutoencoder(build_autoencoder(cfg, 1, (16, 16))))
    plain, compiled = nets
    compile_if_asked(compiled, TrainingConfig(compile=True, compile_backend="aot_eager"))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss_of(net):
        torch.manual_seed(2)  # the same posterior sample in both
        reconstruction, kl = net(x)
        return (reconstruction - x).abs().mean() + 1e-6 * kl.mean()

    assert_same_training_signal(plain, compiled, loss_of, 1e-5)


def test_compiled_run_resumes_exactly_and_exports_a_plain_model(tmp_path, demo_root):
    # aot_eager traces the model as inductor does, without generating kernels: seconds instead of minutes on CPU.
    compiled = ("training.compile=true", "training.compile_backend=aot_eager")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    counters["stats"].clear()
    train_diffusion.main(tiny_args(straight, demo_root, *compiled))
    assert counters["stats"]["unique_graphs"] > 0  # the denoiser really ran compiled
    train_diffusion.main(tiny_args(resumed, demo_root, *compiled, "training.stop_after=4"))
    assert not (resumed / "final").exists()
    train_diffusion.main(tiny_args(resumed, demo_root, *compiled))
    for name in ("model", "ema"):
        a = load_file(straight / "checkpoints" / "checkpoint-8" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "checkpoint-8" / f"{name}.safetensors")
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    net = load_denoiser(resumed / "final")  # the plain diffusers UNet
    assert not hasattr(net, "_compiled_call_impl") or net._compiled_call_impl is None
