"""benchmarks/latent_vs_pixel_3d.py on the pseudo-CT demo at tiny sizes: it builds the presets' tasks, models and
batches with the project's code and times real training steps."""
from __future__ import annotations

import math

from benchmarks import latent_vs_pixel_3d

# 6 mm voxels, slabs of 8 x 32 x 32 -> latents of 4 x 4 x 16 x 16 (the demo autoencoder halves each side once);
# a 2-level UNet in both spaces.
TINY = ["data.spacing=[6,6,6]", "data.volume_shape=[8,32,32]", "data.val_fraction=0.2", "data.slab_gap=1",
        "model.block_out_channels=[8,16]", "model.attention_levels=[false,true]", "model.attention_head_dim=8",
        "model.norm_num_groups=4"]


def test_latent_vs_pixel_times_each_space_at_its_shapes(ct_demo_root, capsys):
    results = latent_vs_pixel_3d.main(["--steps", "1", "--warmup", "1", "--repeats", "1", "--batch-size", "2",
                                       f"data.root={ct_demo_root}", *TINY])
    pixel, latent, same_model = results.values()
    assert pixel["input"] == (2, 8, 32, 32)  # ct target + ld condition
    assert latent["input"] == same_model["input"] == (8, 4, 16, 16)  # ct_latent + ld_latent, 4 channels each
    assert all(r["batch"] == 2 and math.isfinite(r["step_s"]) and r["step_s"] > 0 for r in results.values())
    # The same widths on an input with 8x fewer voxels keep far fewer activations for the backward pass.
    assert same_model["saved_mib"] < pixel["saved_mib"] / 4
    assert "latent over pixel, at the presets" in capsys.readouterr().out
