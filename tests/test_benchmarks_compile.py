"""benchmarks/compile_speed.py and benchmarks/checkpointing_memory.py on the MNI152 demo at tiny sizes: every
variant trains for real; the compiled ones go through aot_eager, which traces as inductor does without generating
kernels (seconds instead of minutes on a CPU)."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import checkpointing_memory, compile_speed
from tests.runs import REPO

# One-level networks on 32 x 32 slices, two per batch: tracing and the steps take seconds on 2 CPU cores.
TINY = ["data.image_size=32", "model.block_out_channels=[8]", "model.attention_levels=[true]",
        "model.attention_head_dim=8", "model.norm_num_groups=4", "vae.block_out_channels=[8]", "vae.norm_num_groups=4"]
SHORT = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--batch-size", "2"]


def positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_compile_speed_checks_each_variants_loss_then_times_it(demo_root, tmp_path, capsys):
    # The autoencoder: the cheaper network to trace, and the one with a random draw inside the compiled model (its
    # posterior sample). tests/test_compile.py compiles the denoiser; the next test runs it through this script.
    out = tmp_path / "compile.json"
    compile_speed.main([*SHORT, "--which", "autoencoder", "--backend", "aot_eager", "--json", str(out),
                        f"data.root={demo_root}", *TINY])
    results = json.loads(out.read_text())
    assert results["backend"] == "aot_eager" and results["loss_rtol"] <= 1e-4
    assert list(results["networks"]) == ["autoencoder"]
    for name, network in results["networks"].items():
        assert network["batch_size"] == 2 and network["input"] == [1, 32, 32]
        variants = network["variants"]
        assert list(variants) == ["plain", "compile", "channels-last", "compile + channels-last"]
        for variant, r in variants.items():
            assert r["loss_checked"] and math.isfinite(r["loss"]), (name, variant)
            assert r["loss_rel_diff"] <= results["loss_rtol"], (name, variant)
            assert positive(r["speedup"]) and positive(r["samples_s"]) and positive(r["step_s"]), (name, variant)
            assert (r["graphs"] > 0) == variant.startswith("compile"), (name, variant)  # compiled ones ran compiled
        assert variants["plain"]["speedup"] == 1.0 and variants["plain"]["loss_rel_diff"] == 0.0
    assert "| autoencoder | 2 | compile + channels-last |" in capsys.readouterr().out


def test_compile_speed_stops_on_a_variant_whose_loss_differs(demo_root, monkeypatch):
    # Channels-last batches whose images moved by 1%: the check must catch it before anything is timed.
    channels_last = compile_speed.channels_last

    def shifted(batch):
        return {k: v + 0.01 if k == "t1" else v for k, v in channels_last(batch).items()}

    monkeypatch.setattr(compile_speed, "channels_last", shifted)
    monkeypatch.setattr(compile_speed, "VARIANTS", {"plain": (False, False), "channels-last": (False, True)})
    with pytest.raises(AssertionError, match=r"demo\.yaml, channels-last: first-batch loss"):
        compile_speed.main([*SHORT, "--which", "denoiser", f"data.root={demo_root}", *TINY])


def test_checkpointing_saves_activation_memory_of_both_2d_networks(demo_root, tmp_path, capsys):
    out = tmp_path / "memory.json"
    checkpointing_memory.main([*SHORT, "--unet-configs", str(REPO / "configs" / "demo.yaml"),
                               "--vae-configs", str(REPO / "configs" / "demo_vae.yaml"), "--json", str(out),
                               f"data.root={demo_root}", *TINY])
    results = json.loads(out.read_text())
    assert {n: r["network"] for n, r in results["networks"].items()} == {"demo": "UNet2DModel",
                                                                         "demo_vae": "AutoencoderKL"}
    for name, r in results["networks"].items():
        assert 0 < r["checkpointed"]["saved_mib"] < r["plain"]["saved_mib"], name
        assert r["saved_ratio"] == pytest.approx(r["checkpointed"]["saved_mib"] / r["plain"]["saved_mib"])
        assert positive(r["time_ratio"]) and positive(r["plain"]["step_s"]), name
        # The peak is measured on Linux (glibc, /proc); too small to show at this size, so only its sign is known.
        assert r["plain"]["peak_mib"] is None or r["plain"]["peak_mib"] >= 0, name
    assert "| demo_vae | AutoencoderKL | 2 x (1, 32, 32) |" in capsys.readouterr().out
