"""Hostile configs and data files: each script stops with exit code 2 and one `error:` line naming the key or the
file, never a traceback. Config problems are refused before anything is read or written."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data.demo import build_ihc_demo
from tests.runs import REPO, run_script, tiny_args
from utils.config import resolve, save

PIXEL = "configs/demo.yaml"
DDPM = "diffusion.strategy=ddpm diffusion.timestep_sampling=uniform"
LATENT = "data.kind=latent_cache latent.cache_dir={tmp}/cache latent.autoencoder={tmp}/vae"

# case -> (script, preset, overrides, what the error line must name). Without the checks each would start a run
# on the demo data: the run directory is written before any data is read.
CONFIG_CASES = {
    "negative-lr": ("train_diffusion.py", PIXEL, "training.lr=-1", "training.lr=-1.0 must be > 0"),
    "ddpm-logit-normal": ("train_diffusion.py", PIXEL, "diffusion.strategy=ddpm",
                          "diffusion.timestep_sampling=uniform"),
    "cosine-eps": ("train_diffusion.py", PIXEL, f"{DDPM} diffusion.beta_schedule=cosine",
                   "diffusion.objective=v or x0"),
    "guidance-untrained-null": ("train_diffusion.py", PIXEL, "diffusion.guidance_scale=3", "task.cond_drop_prob"),
    "flipped-latents": ("train_diffusion.py", PIXEL, f"{LATENT} data.flip_prob=0.5", "data.flip_prob=0"),
    "ddpm-steps-beyond-training": ("train_diffusion.py", PIXEL, f"{DDPM} eval.sampling_steps=2000",
                                   "eval.sampling_steps=2000 must be <= diffusion.num_train_timesteps"),
    "unknown-tracker": ("train_diffusion.py", PIXEL, "logging.trackers=[csv,mlflow]", "logging.trackers"),
    "unknown-precision": ("train_diffusion.py", PIXEL, "training.mixed_precision=fp32", "training.mixed_precision"),
    "misspelt-resume": ("train_diffusion.py", PIXEL, "training.resume=lastest", "did you mean 'latest'"),
    "unknown-log-level": ("train_diffusion.py", PIXEL, "run.log_level=LOUD", "run.log_level"),
    "unknown-normalisation": ("train_diffusion.py", PIXEL, "data.normalization=zscore", "data.normalization"),
    "no-training-fraction": ("train_diffusion.py", PIXEL, "data.val_fraction=0.6 data.test_fraction=0.5",
                             "data.test_fraction"),
    "zero-norm-groups": ("train_diffusion.py", PIXEL, "model.norm_num_groups=0", "model.norm_num_groups"),
    "three-percentiles": ("train_diffusion.py", PIXEL, "data.mri_percentiles=[1,50,99]", "data.mri_percentiles"),
    "unknown-vae-loss": ("train_vae.py", "configs/demo_vae.yaml", "vae.reconstruction_loss=l3",
                         "vae.reconstruction_loss"),
    "zero-shard-size": ("encode_latents.py", "configs/demo_ldm.yaml",
                        "latent.cache_dir={tmp}/cache latent.autoencoder={tmp}/vae latent.shard_size=0",
                        "latent.shard_size"),
}


def _rewrite(path, change) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj)), image.affine), path)


# case -> (how the demo subject folder is damaged, what the error line must name)
NIFTI_CASES = {
    "not-a-nifti": (lambda s: (s / "t1.nii.gz").write_text("not a NIfTI file\n" * 50), "t1.nii.gz"),
    "truncated-nifti": (lambda s: (s / "t1.nii.gz").write_bytes((s / "t1.nii.gz").read_bytes()[:60_000]),
                        "t1.nii.gz"),
    "mask-shape-differs": (lambda s: _rewrite(s / "seg.nii.gz", lambda a: a[:, :, :-1]), "seg.nii.gz"),
    "mask-label-beyond-classes": (lambda s: _rewrite(s / "seg.nii.gz", lambda a: a + 3), "seg.nii.gz"),
    "nan-voxels": (lambda s: _rewrite(s / "t1.nii.gz", lambda a: np.where(a > a.mean(), np.nan, a)), "t1.nii.gz"),
}
# case -> (how the tile folder is damaged, what the error line must name)
TILE_CASES = {
    "mask-shape-differs": (lambda r: Image.open(r / "ihc_q1_mask.png").crop((0, 0, 100, 100)).save(
        r / "ihc_q1_mask.png"), "ihc_q1_mask.png"),
}


def _config_case(case, tmp, demo_root, ihc_root):
    script, preset, overrides, _ = CONFIG_CASES[case]
    return run_script(script, tiny_args(tmp / "run", demo_root, *overrides.format(tmp=tmp).split(), config=preset))


def _nifti_case(case, tmp, demo_root, ihc_root):
    shutil.copytree(demo_root, tmp / "data")
    NIFTI_CASES[case][0](tmp / "data" / "mni152")
    return run_script("train_diffusion.py", tiny_args(tmp / "run", tmp / "data", "data.demo=''"))


def _tile_case(case, tmp, demo_root, ihc_root):
    shutil.copytree(ihc_root, tmp / "data")
    TILE_CASES[case][0](tmp / "data")
    return run_script("train_vae.py", tiny_args(tmp / "run", tmp / "data", "data.demo=''",
                                                config="configs/demo_pathology_vae.yaml"))


RUNNERS = {"test_bad_config_is_refused_before_anything_is_read": _config_case,
           "test_bad_nifti_file_is_named": _nifti_case, "test_bad_tile_file_is_named": _tile_case}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, demo_root):
    """The selected cases, run concurrently (each mostly imports, then stops): (test, case) -> (result, folder)."""
    selected = [(item.originalname, item.callspec.params["case"]) for item in request.session.items
                if item.module is request.module and item.originalname in RUNNERS]
    ihc_root = None
    if any(test == "test_bad_tile_file_is_named" for test, _ in selected):
        ihc_root = tmp_path_factory.mktemp("tiles") / "ihc"
        build_ihc_demo(ihc_root)

    folders = {key: tmp_path_factory.mktemp(key[1]) for key in selected}

    def run(key):
        return RUNNERS[key[0]](key[1], folders[key], demo_root, ihc_root), folders[key]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(selected, pool.map(run, selected)))


def assert_one_error_line(result, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_refused_before_anything_is_read(outcomes, case):
    result, tmp = outcomes["test_bad_config_is_refused_before_anything_is_read", case]
    assert_one_error_line(result, CONFIG_CASES[case][3])
    assert not (tmp / "run").exists() and not (tmp / "cache").exists()


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_bad_nifti_file_is_named(outcomes, case):
    result, tmp = outcomes["test_bad_nifti_file_is_named", case]
    assert_one_error_line(result, NIFTI_CASES[case][1])
    assert not (tmp / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", TILE_CASES)
def test_bad_tile_file_is_named(outcomes, case):
    result, tmp = outcomes["test_bad_tile_file_is_named", case]
    assert_one_error_line(result, TILE_CASES[case][1])
    assert not (tmp / "run" / "checkpoints").exists()


def test_evaluate_refuses_a_bad_override_before_reading_the_run(tmp_path, demo_root):
    run = tmp_path / "run"
    run.mkdir()
    # A run directory with only its config: reading anything else would fail with another message.
    save(resolve(REPO / PIXEL, [f"data.root={demo_root}"]), run / "config.yaml")
    result = run_script("evaluate.py", ["--run", str(run), "eval.split=train"])
    assert_one_error_line(result, "eval.split")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
