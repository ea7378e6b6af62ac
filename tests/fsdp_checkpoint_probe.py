"""Run under `python -m torch.distributed.run --nproc_per_node 2`: the demo denoiser sharded with FSDP2 on gloo
(CPU), wrapped by the classes configs/accelerate/fsdp.yaml names, trained one step, then saved and restored with
utils/checkpoint.py; then exported (best-<metric>/, final/) with the EMA weights swapped in, and a sharded
autoencoder exported too, through the export functions the training scripts call. Rank 0 writes the unsharded
weights each export must hold to expected-*.safetensors for the test to compare with. Each rank writes
result-rank<r>.json; an assertion failure exits non-zero. With `3d`, the same for a UNet3D denoiser of (8, 12, 16)
volumes wrapped by the 3D block classes (no autoencoder).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_checkpoint_probe.py <out_dir> [3d]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusion import build_strategy  # noqa: E402
from diffusion.task import Field, Task  # noqa: E402
from models.autoencoder import TrainableAutoencoder, build_autoencoder, export_autoencoder  # noqa: E402
from models.unet2d import build_denoiser  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.config import DiffusionConfig, ModelConfig, TaskConfig, TrainingConfig, VAEConfig  # noqa: E402
from utils.ema import EMA  # noqa: E402
from utils.export import export_final, export_weights  # noqa: E402
from utils.training import build_lr_scheduler, build_optimizer  # noqa: E402

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
SHAPE_2D, SHAPE_3D = (16, 16), (8, 12, 16)


def shard(model, wrap_classes, reshard_after_forward: bool):
    """FSDP2 as Accelerate applies it: each module of the wrap classes, then the root."""
    wrapped = [m for m in model.modules() if type(m).__name__ in wrap_classes]
    for module in wrapped:
        fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model, len(wrapped)


def sharded_model(task, wrap_classes, fsdp_config):
    torch.manual_seed(0)  # the same initial weights on every rank, as Accelerate broadcasts them
    model = build_denoiser(ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True],
                                       attention_head_dim=16), task)
    return shard(model, wrap_classes, fsdp_config["fsdp_reshard_after_forward"])


def assert_same(a: dict, b: dict, rank: int) -> None:
    if rank == 0:
        assert a and a.keys() == b.keys(), "state dicts differ in keys or are empty on rank 0"
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"restored state differs: {different[:3]}"


def train_step(model, optimizer, lr_scheduler, ema, step, shape):
    generator = torch.Generator().manual_seed(100 * step + dist.get_rank())
    x = torch.randn(2, 1, *shape, generator=generator)
    cond = {"spatial": torch.randn(2, 3, *shape, generator=generator), "vector": torch.rand(2, 4, generator=generator)}
    model(x, torch.full((2,), 500.0), cond).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    lr_scheduler.step()
    ema.update(model, step)


def main(out: Path, volumes: bool):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fsdp_config = yaml.safe_load((REPO / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    wrap_classes = fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    shape = SHAPE_3D if volumes else SHAPE_2D
    if volumes:
        from fsdp_unet3d_probe import wrap_classes_3d
        wrap_classes = wrap_classes_3d()
    fields = {"t1": Field("t1", "image", 1), "seg": Field("seg", "mask", 3),
              "class_dist": Field("class_dist", "vector", 3)}
    task = Task(TaskConfig(targets=["t1"], spatial_conditions=["seg"], vector_condition="class_dist"), fields,
                shape)
    training = TrainingConfig(lr=1e-3, lr_warmup_steps=1, max_steps=10)
    accelerator = SimpleNamespace(is_main_process=rank == 0, wait_for_everyone=dist.barrier)

    model, num_wrapped = sharded_model(task, wrap_classes, fsdp_config)
    assert num_wrapped > 0, f"no module of the classes {wrap_classes} in the UNet"
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    optimizer, lr_scheduler = build_optimizer(model.parameters(), training), None
    lr_scheduler = build_lr_scheduler(optimizer, training)
    ema = EMA(model, 0.9)
    train_step(model, optimizer, lr_scheduler, ema, 1, shape)
    folder = save_checkpoint(accelerator, out / "checkpoints", 1, model, optimizer, lr_scheduler, ema,
                             {"step": 1}, keep_last=2)

    # Restore into a freshly sharded model: weights, optimizer state and EMA equal the saved ones.
    model2, _ = sharded_model(task, wrap_classes, fsdp_config)
    optimizer2 = build_optimizer(model2.parameters(), training)
    lr_scheduler2 = build_lr_scheduler(optimizer2, training)
    ema2 = EMA(model2, 0.9)
    assert load_checkpoint(folder, model2, optimizer2, lr_scheduler2, ema2)["step"] == 1
    # Full state dicts with cpu_offload are gathered on rank 0 only (the other ranks get empty ones).
    weights, weights2 = get_model_state_dict(model, options=FULL), get_model_state_dict(model2, options=FULL)
    assert_same(weights, weights2, rank)
    moments = get_optimizer_state_dict(model, optimizer, options=FULL).get("state", {})
    moments2 = get_optimizer_state_dict(model2, optimizer2, options=FULL).get("state", {})
    assert_same({k: v["exp_avg_sq"] for k, v in moments.items()},
                {k: v["exp_avg_sq"] for k, v in moments2.items()}, rank)
    assert_same(ema.full_state_dict(model), ema2.full_state_dict(model2), rank)

    # One more step on each: a resumed sharded run continues exactly.
    train_step(model, optimizer, lr_scheduler, ema, 2, shape)
    train_step(model2, optimizer2, lr_scheduler2, ema2, 2, shape)
    assert_same(get_model_state_dict(model, options=FULL), get_model_state_dict(model2, options=FULL), rank)

    # The file holds full tensors under plain names: an unsharded model loads it directly.
    if rank == 0:
        plain = build_denoiser(ModelConfig(block_out_channels=[16, 32], attention_levels=[False, True],
                                           attention_head_dim=16), task)
        plain.load_state_dict(load_file(folder / "model.safetensors"))
    dist.barrier()

    # Exports as validation and the end of training make them: every rank calls, EMA weights swapped in.
    with torch.no_grad():  # a validation forward first, as before a best-<metric> export
        model(torch.zeros(2, 1, *shape), torch.full((2,), 10.0),
              {"spatial": torch.zeros(2, 3, *shape), "vector": torch.ones(2, 4) / 4})
    torch.manual_seed(1)
    frozen_vae = build_autoencoder(VAEConfig(block_out_channels=[8, 16], norm_num_groups=4), 1, (16, 16))
    with ema.swapped(model):
        export_weights(out / "checkpoints" / "best-val_loss", model, {"metric": "val/loss", "value": 0.5, "step": 2})
        export_final(out / "final", model, build_strategy(DiffusionConfig()), {"targets": ["t1"]}, vae=frozen_vae)
    expected = {"denoiser": ema.full_state_dict(model), "frozen_vae": get_model_state_dict(frozen_vae, options=FULL)}
    if volumes:
        finish(out, rank, expected, num_wrapped)
        return

    # A sharded autoencoder, trained one step, exported as train_vae.py does (best-<metric>/ and final/ alike).
    torch.manual_seed(2)
    autoencoder, vae_wrapped = shard(TrainableAutoencoder(build_autoencoder(
        VAEConfig(block_out_channels=[8, 16], norm_num_groups=4), 1, (16, 16))), wrap_classes,
        fsdp_config["fsdp_reshard_after_forward"])
    assert vae_wrapped > 0 and all(type(p).__name__ == "DTensor" for p in autoencoder.parameters())
    vae_optimizer = build_optimizer(autoencoder.parameters(), training)
    vae_ema = EMA(autoencoder, 0.9)
    reconstruction, regulariser = autoencoder(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(rank)))
    (reconstruction.square().mean() + regulariser.mean()).backward()
    vae_optimizer.step()
    vae_ema.update(autoencoder, 1)
    with vae_ema.swapped(autoencoder):
        export_autoencoder(out / "vae", autoencoder.vae, {"kind": "kl"}, {"metric": "val/psnr", "value": 1.0})
    expected["autoencoder"] = vae_ema.full_state_dict(autoencoder)
    finish(out, rank, expected, num_wrapped)


def finish(out: Path, rank: int, expected: dict, num_wrapped: int) -> None:
    """Rank 0 writes the weights each export must hold; every rank reports success."""
    if rank == 0:
        for name, state in expected.items():
            save_file({k: v.contiguous() for k, v in state.items()}, out / f"expected-{name}.safetensors")
    dist.barrier()
    (out / f"result-rank{rank}.json").write_text(json.dumps({"ok": True, "wrapped_modules": num_wrapped}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), volumes=sys.argv[2:] == ["3d"])
