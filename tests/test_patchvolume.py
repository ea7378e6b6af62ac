"""PatchVolume: checkpoints in the public 3D-MedDiffusion Lightning layout load (and only their autoencoder
weights are kept), encode / quantize / decode shapes and nearest-code snapping, parameter counts, and the
loader refusing pickles that would run code, or keys that do not fit.

Checked once against the original (ShanghaiTech-IMPACT/3D-MedDiffusion @ d1beb8f, AutoEncoder/model/
PatchVolume.py + codebook.py, run outside the project with its real einops/einops_exts and Lightning stubbed):
the same random weights (loaded into both; identical state-dict key names, order and shapes), one
(1, 1, 64, 64, 64) volume, CPU float32. Max abs difference, original vs models/patchvolume.py:
  8x: encode 5.5e-6 (latents up to 1.05), decode 1.4e-5 (outputs up to 2.3), code indices identical;
  4x: encode 5.0e-6 (latents up to 1.26), decode 8.3e-6 (outputs up to 1.8), code indices identical.
"""
from __future__ import annotations

import os
import pathlib
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from models.patchvolume import PatchVolume, load_patchvolume
from utils.config import ConfigError

# What shared/PATCHVOLUME.md gives (and the original reproduces): state-dict keys, trainable parameters; the
# state dict also holds the codebook's three buffers (n_codes * (2 * embedding_dim + 1) = 139,264 values).
PUBLIC = {8: dict(keys=209, parameters=34_818_921, state_values=34_958_185, latent=8),
          4: dict(keys=169, parameters=8_485_641, state_values=8_624_905, latent=16)}
TINY = dict(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=32, norm_groups=4)
JUNK = {"volume_discriminator.model0.0.weight": (32, 1, 4, 4, 4), "volume_discriminator.model1.1.running_mean": (64,),
        "image_discriminator.model0.0.weight": (32, 1, 4, 4),
        "perceptual_loss.perceptual_model.net.slice1.0.weight": (64, 3, 3, 3)}


def random_state(config: dict, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A PatchVolume(**config) state with every tensor random (default init, noise on norms and biases, a
    spread-out codebook), and the model's full config."""
    torch.manual_seed(seed)
    model = PatchVolume(**config)
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.ndim == 1 and not key.startswith("codebook."):
            tensor.add_(0.1 * torch.randn_like(tensor))
    state["codebook.embeddings"] = torch.randn_like(state["codebook.embeddings"]) * 0.5
    state["codebook.N"] = torch.rand_like(state["codebook.N"])
    return state, dict(model.config)


def hyper_parameters(config: dict) -> dict:
    """What Lightning's save_hyperparameters() stored for patchvolumeAE(cfg): {"cfg": DictConfig}."""
    model = dict(seed=1234, embedding_dim=config["embedding_dim"], n_codes=config["n_codes"],
                 n_hiddens=config["n_hiddens"], lr=3e-4, downsample=[config["downsample"]] * 3, disc_channels=32,
                 disc_layers=3, disc_loss_type="hinge", norm_type="group", num_groups=config["norm_groups"],
                 resume_from_checkpoint=None, stage=1)
    dataset = dict(root_dir="3DMedDiffusion/config/PatchVolume_data.json", image_channels=1, imgtype="CT",
                   patch_size=64)
    return {"cfg": OmegaConf.create({"model": model, "dataset": dataset})}


def write_checkpoint(path: pathlib.Path, state: dict, config: dict, **extra) -> pathlib.Path:
    """A Lightning 2.5 .ckpt as the public files are laid out, with discriminator / perceptual-loss weights."""
    junk = {key: torch.randn(shape) for key, shape in JUNK.items()}
    checkpoint = {"epoch": 3, "global_step": 120000, "pytorch-lightning_version": "2.5.0.post0",
                  "state_dict": {**state, **junk}, "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {
                      "total": {"ready": 4, "completed": 3}}}},
                  "callbacks": {"ModelCheckpoint{'monitor': 'val/recon_loss', 'mode': 'min'}": {
                      "best_model_score": torch.tensor(0.0123), "dirpath": "/results/checkpoints"}},
                  "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                                        "param_groups": [{"lr": 3e-4, "betas": (0.5, 0.9), "params": [0]}]}],
                  "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hyper_parameters(config),
                  **extra}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module", params=[8, 4], ids=["8x", "4x"])
def public(request, tmp_path_factory):
    """(factor, checkpoint path, the autoencoder state written into it) for a full-size public model."""
    factor = request.param
    state, config = random_state(dict(downsample=factor), seed=factor)
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / f"PatchVolume_{factor}x_s2.ckpt", state, config)
    return factor, path, state


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    state, config = random_state(TINY, seed=0)
    return write_checkpoint(tmp_path / "tiny.ckpt", state, config), state


def brute_force_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for each voxel of z (B, C, d, h, w), by explicit distances."""
    vectors = z.movedim(1, -1).reshape(-1, z.shape[1]).double()
    return torch.cdist(vectors, codebook.double()).argmin(dim=1).view(z.shape[0], *z.shape[2:])


def test_public_checkpoint_loads_encodes_and_decodes(public):
    factor, path, state = public
    expected = PUBLIC[factor]
    model = load_patchvolume(path)
    loaded = model.state_dict()
    assert list(loaded) == list(state) and len(loaded) == expected["keys"]  # the junk keys were dropped
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert (model.config.downsample, model.config.n_hiddens, model.config.norm_groups) == (factor, 48, 24)
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert sum(t.numel() for t in loaded.values()) == expected["state_values"]

    torch.manual_seed(1)
    x = torch.rand(1, 1, 64, 64, 64) * 2 - 1
    seen = []  # the encoder's input and output during encode: the composition checked without a second pass
    hook = model.encoder.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    with torch.no_grad():
        z = model.encode(x)
        hook.remove()
        assert z.shape == (1, 8) + (expected["latent"],) * 3
        assert len(seen) == 1 and seen[0][0] is x
        assert torch.equal(z, model.pre_vq_conv(seen[0][1]))  # encode = pre_vq_conv(encoder(x)), not quantised
        codes, indices = model.quantize(z)
        assert torch.equal(indices, brute_force_nearest(z, state["codebook.embeddings"]))
        assert torch.equal(codes, state["codebook.embeddings"][indices].movedim(-1, 1))
        assert indices.unique().numel() > 1  # the codes differ: a wrong snap could not pass by chance
        volume = model.decode(z)
    assert volume.shape == (1, 1, 64, 64, 64) and volume.isfinite().all()


def test_decode_snaps_to_the_nearest_code(tiny_checkpoint):
    path, state = tiny_checkpoint
    model = load_patchvolume(path)
    assert model.config.norm_groups == 4  # read from the pickled omegaconf hyper-parameters (num_groups)
    torch.manual_seed(2)
    z = torch.randn(2, 4, 3, 4, 5)
    codebook = state["codebook.embeddings"]
    with torch.no_grad():
        snapped = codebook[brute_force_nearest(z, codebook)].movedim(-1, 1)  # (B, C, d, h, w)
        volume = model.decode(z)
        assert volume.shape == (2, 1, 12, 16, 20)
        torch.testing.assert_close(volume, model.decoder(model.post_vq_conv(snapped)))
        assert not torch.allclose(volume, model.decoder(model.post_vq_conv(z)))  # snapping changed the result
        assert model(torch.rand(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)  # forward: the quantised reconstruction


class RunsCode:
    """A pickled object that runs code when unpickled: creates `marker` through the given reduction."""

    def __init__(self, marker: pathlib.Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "eval":
            return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("how, named", [("os.system", "posix.system"), ("eval", "builtins.eval"),
                                        ("Path.touch", "builtins.getattr")])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tiny_checkpoint, tmp_path, how, named):
    _, state = tiny_checkpoint
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker, how), protocol=2))  # the payload is live under plain pickle
    assert marker.exists()
    marker.unlink()

    path = write_checkpoint(tmp_path / "hostile.ckpt", state, TINY, callbacks={"Timer": RunsCode(marker, how)})
    with pytest.raises(ConfigError) as error:
        load_patchvolume(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and named in message
    assert not marker.exists()


def test_the_weights_only_unpickler_refuses_what_the_scan_would_miss(tiny_checkpoint, tmp_path, monkeypatch):
    _, state = tiny_checkpoint
    marker = tmp_path / "pwned"
    path = write_checkpoint(tmp_path / "hostile.ckpt", state, TINY, callbacks={"Timer": RunsCode(marker, "eval")})
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: [])  # no static scan
    with pytest.raises(ConfigError) as error:
        load_patchvolume(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "GLOBAL eval" in message
    assert not marker.exists()


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("decoder.final_block.2.bias"), "lacks decoder.final_block.2.bias"),
    (lambda s: s.update({"decoder.conv_first.weight": torch.zeros(16, 4, 3, 3, 2)}),
     "decoder.conv_first.weight has shape (16, 4, 3, 3, 2)"),
    (lambda s: s.update({"encoder.mid_block.attn.extra": torch.zeros(1)}), "unexpected state_dict key "
                                                                           "encoder.mid_block.attn.extra"),
    (lambda s: s.update({"codebook.embeddings": torch.zeros(99, 4), "codebook.N": torch.zeros(99)}),
     "n_codes=32 but the state_dict shapes give 99"),
])
def test_keys_that_do_not_fit_are_named(tiny_checkpoint, tmp_path, change, named):
    _, state = tiny_checkpoint
    state = dict(state)
    change(state)
    path = write_checkpoint(tmp_path / "bad.ckpt", state, TINY)
    with pytest.raises(ConfigError) as error:
        load_patchvolume(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and named in message


def test_hyper_parameters_that_expand_exponentially_are_refused(tiny_checkpoint, tmp_path):
    _, state = tiny_checkpoint
    nested = ["leaf"]
    for _ in range(40):  # 41 small lists in the file, 2**40 values once expanded
        nested = [nested, nested]
    path = write_checkpoint(tmp_path / "bomb.ckpt", state, TINY, hyper_parameters={"cfg": nested})
    with pytest.raises(ConfigError, match="hyper_parameters hold over 100000 values"):
        load_patchvolume(path)


def test_constructor_errors_say_what_to_fix():
    with pytest.raises(ConfigError, match="downsample=6 must be a power of two"):
        PatchVolume(downsample=6)
    with pytest.raises(ConfigError, match="n_hiddens=10 must be a multiple of norm_groups=4"):
        PatchVolume(n_hiddens=10, norm_groups=4)
    with pytest.raises(ConfigError, match="does not exist"):
        load_patchvolume("/nonexistent/PatchVolume_8x.ckpt")


def test_the_frozen_autoencoder_reads_a_patchvolume_checkpoint(tiny_checkpoint, tmp_path):
    from models.autoencoder import FrozenAutoencoder

    path, _ = tiny_checkpoint
    frozen = FrozenAutoencoder.load(path)
    assert (frozen.kind, frozen.spatial_dims, frozen.in_channels, frozen.latent_channels,
            frozen.downsample_factor) == ("patchvolume", 3, 1, 4, 4)
    x = torch.rand(1, 1, 16, 24, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = frozen.encode(x)
    assert z.shape == (1, 4, 4, 6, 8)
    torch.testing.assert_close(z, frozen.model.encode(x))  # continuous, as PatchVolume's own caches hold
    torch.testing.assert_close(frozen.decode(z), frozen.model.decode(z))  # snapped to the nearest codes
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        frozen.encode(x[:, :, 0])
    # The same weights give the same identity (the latent cache's encoder check); other weights another.
    assert FrozenAutoencoder.load(path).identity == frozen.identity
    model = load_patchvolume(path)
    with torch.no_grad():
        model.post_vq_conv.bias.add_(1.0)
    assert FrozenAutoencoder(model).identity != frozen.identity
    # Tiles: overlapping 16-voxel tiles, blended, cover a volume larger than one tile.
    tiled = FrozenAutoencoder.load(path, tile_size=16, tile_overlap=8)
    assert tiled.encode(x).shape == z.shape and tiled.decode(z).shape == x.shape
    one_tile = x[..., :16, :16, :16]  # a volume that is one tile: the same as without tiling
    torch.testing.assert_close(tiled.encode(one_tile), frozen.encode(one_tile))
