"""Run under `python -m torch.distributed.run --nproc_per_node 2`: a 3D denoiser (UNet3DModel, gradient
checkpointing on) sharded with FSDP2 on gloo (CPU), each module of the 3D block classes configs/accelerate/fsdp.yaml
tells a 3D run to wrap, trained one step; rank 0 then loads the gathered full state dict into an unsharded model and
checks that it gives the sharded model's output. Each rank writes result-rank<r>.json; a failure exits non-zero.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_unet3d_probe.py <out_dir>
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusion.task import Field, Task  # noqa: E402
from models.unet2d import build_denoiser  # noqa: E402
from models.unet3d import UNet3DModel  # noqa: E402
from utils.config import ModelConfig, TaskConfig  # noqa: E402

SHAPE = (8, 12, 16)


def wrap_classes_3d() -> list[str]:
    """The class list configs/accelerate/fsdp.yaml gives for 3D runs (passed on the accelerate command line)."""
    text = (REPO / "configs" / "accelerate" / "fsdp.yaml").read_text()
    return re.search(r"--fsdp_transformer_layer_cls_to_wrap (\S+)", text).group(1).split(",")


def build(task: Task, checkpointing: bool):
    torch.manual_seed(0)  # the same initial weights on every rank, as Accelerate broadcasts them
    return build_denoiser(ModelConfig(block_out_channels=[8, 16], attention_levels=[False, True],
                                      attention_head_dim=8, norm_num_groups=4,
                                      gradient_checkpointing=checkpointing), task)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *SHAPE, generator=generator)
    cond = {"spatial": torch.randn(2, 1, *SHAPE, generator=generator), "vector": torch.rand(2, 4, generator=generator)}
    return x, torch.tensor([10.0, 700.0]), cond


def main(out: Path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fields = {"hd": Field("hd", "image", 1), "ld": Field("ld", "image", 1),
              "class_dist": Field("class_dist", "vector", 3)}
    task = Task(TaskConfig(targets=["hd"], spatial_conditions=["ld"], vector_condition="class_dist"), fields, SHAPE)

    # FSDP2 as Accelerate applies it: each module of the wrap classes, then the root.
    model = build(task, checkpointing=True)
    assert isinstance(model.unet, UNet3DModel)
    wrap = wrap_classes_3d()
    wrapped = [m for m in model.modules() if type(m).__name__ in wrap]
    assert {type(m).__name__ for m in wrapped} == set(wrap), f"{wrap} not all in the UNet3D"
    for module in wrapped:
        fully_shard(module)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())

    # One training step, a different batch per rank.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, cond = batch(rank)
    loss = model(x, t, cond).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    # The gathered full state dict loads strictly into an unsharded model that computes the same output.
    x, t, cond = batch(100)
    with torch.no_grad():
        sharded_out = model(x, t, cond)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    difference = -1.0
    if rank == 0:
        plain = build(task, checkpointing=False)
        plain.load_state_dict(state)
        with torch.no_grad():
            difference = (plain(x, t, cond) - sharded_out).abs().max().item()
        assert difference < 1e-5, f"unsharded output differs by {difference}"
    dist.barrier()
    (out / f"result-rank{rank}.json").write_text(json.dumps({
        "ok": True, "wrapped_modules": len(wrapped), "loss": loss.item(), "max_difference": difference}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
