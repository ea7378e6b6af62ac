"""Strategies, weighting, samplers and guidance: analytic oracles, diffusers parity and tiny training runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, UNet2DModel)
from skimage.data import camera
from torch import nn

from diffusion import DDPM, STRATEGIES, RectifiedFlow, append_dims, build_strategy, guided
from utils.config import ConfigError, DiffusionConfig

OBJECTIVES = ("eps", "x0", "v")
SCHEDULES = ("linear", "scaled_linear", "cosine")


def reference_alphas_cumprod(schedule: str, steps: int = 1000) -> torch.Tensor:
    """alpha-bar from the papers' formulas (Ho et al. 2020; Nichol & Dhariwal 2021 for cosine), in float64."""
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, steps, dtype=torch.float64) ** 2
    else:
        f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def ddpm_coefficients(strategy: DDPM, t: torch.Tensor, ndim: int):
    """alpha_t, sigma_t (float64, broadcastable) for network times t (float timestep indices)."""
    alphas_cumprod = strategy.alphas_cumprod[t.long().cpu()]  # float32 like diffusers, so DDIM cancels exactly
    alpha, sigma = alphas_cumprod.sqrt().double(), (1 - alphas_cumprod).sqrt().double()
    return append_dims(alpha, ndim), append_dims(sigma, ndim)


def objective_from_x0(objective: str, x_t, x0_pred, alpha, sigma):
    """The objective's target implied by a clean-data prediction at (x_t, t)."""
    eps = (x_t - alpha * x0_pred) / sigma
    return {"eps": eps, "x0": x0_pred, "v": alpha * eps - sigma * x0_pred}[objective]


def ddpm_oracle(strategy: DDPM, mean: torch.Tensor, std: float = 0.0):
    """Exact net for data ~ N(mean, std^2) elementwise (std = 0: a point mass); cond may override `mean`."""
    def net(x_t, t, cond):
        mu = mean if cond is None else cond
        alpha, sigma = ddpm_coefficients(strategy, t, x_t.ndim)
        x_t64 = x_t.double()
        x0_pred = mu + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (x_t64 - alpha * mu)  # E[x0 | x_t]
        return objective_from_x0(strategy.objective, x_t64, x0_pred, alpha, sigma).to(x_t.dtype)
    return net


def rflow_oracle(strategy: RectifiedFlow, x0: torch.Tensor):
    """Exact velocity (x_t - x0) / t of the straight path into the point mass at x0."""
    def net(x_t, t, cond):
        return (x_t - x0) / append_dims(t / strategy.num_train_timesteps, x_t.ndim)
    return net


class TinyNet(nn.Module):
    """Three convolutions with the network time as an extra input channel; 2D or 3D."""

    def __init__(self, channels: int = 1, width: int = 32, spatial_dims: int = 2, time_scale: float = 1000.0):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.time_scale = time_scale
        self.body = nn.Sequential(conv(channels + 1, width, 3, padding=1), nn.SiLU(),
                                  conv(width, width, 3, padding=1), nn.SiLU(), conv(width, channels, 3, padding=1))

    def forward(self, x, t, cond):
        t_map = append_dims(t / self.time_scale, x.ndim).expand(x.shape[0], 1, *x.shape[2:])
        return self.body(torch.cat([x, t_map], dim=1))


class Recorder:
    """A net that records its inputs and returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return torch.zeros_like(x_t)


def camera_patches(count: int = 32, size: int = 16) -> torch.Tensor:
    """A fixed small real dataset: `count` patches (N, 1, size, size) of scikit-image's camera, in [-1, 1]."""
    image = torch.from_numpy(camera().astype(np.float32) / 127.5 - 1)[None, None]
    image = nn.functional.avg_pool2d(image, 4)[0, 0]  # (128, 128)
    rng = np.random.default_rng(0)
    corners = rng.integers(0, image.shape[0] - size, size=(count, 2))
    return torch.stack([image[r:r + size, c:c + size] for r, c in corners])[:, None]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test sees the same draws, whatever ran before it


# --- configuration --------------------------------------------------------------------------------------------

def test_registry_and_build():
    assert STRATEGIES == {"ddpm": DDPM, "rflow": RectifiedFlow}
    ddpm = build_strategy(DiffusionConfig(objective="v", beta_schedule="cosine", num_train_timesteps=500))
    assert isinstance(ddpm, DDPM) and ddpm.objective == "v" and ddpm.num_train_timesteps == 500
    flow = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler", timestep_sampling="logit_normal",
                                          logit_mean=0.3, logit_std=0.7))
    assert isinstance(flow, RectifiedFlow) and (flow.logit_mean, flow.logit_std) == (0.3, 0.7)


@pytest.mark.parametrize("overrides, key", [
    ({"strategy": "edm"}, "diffusion.strategy"),
    ({"objective": "foo"}, "diffusion.objective"),
    ({"beta_schedule": "quadratic"}, "diffusion.beta_schedule"),
    ({"loss_weighting": "snr"}, "diffusion.loss_weighting"),
    ({"sampler": "euler"}, "diffusion.sampler"),
    ({"strategy": "rflow", "sampler": "ddim"}, "diffusion.sampler"),  # ddim is ddpm's sampler
    ({"strategy": "rflow", "sampler": "euler", "loss_weighting": "min_snr"}, "diffusion.loss_weighting"),
    ({"strategy": "rflow", "sampler": "euler", "timestep_sampling": "beta"}, "diffusion.timestep_sampling"),
    ({"strategy": "rflow", "sampler": "euler", "timestep_sampling": "logit_normal", "logit_std": 0.0},
     "diffusion.logit_std"),
    ({"timestep_sampling": "logit_normal"}, "diffusion.timestep_sampling"),
    ({"num_train_timesteps": 1}, "diffusion.num_train_timesteps"),
    ({"beta_schedule": "cosine"}, "diffusion.objective=v or x0"),  # eps on the cosine schedule
    ({"loss_weighting": "min_snr", "min_snr_gamma": 0.0}, "diffusion.min_snr_gamma"),
    ({"loss_weighting": "p2", "p2_k": 0.0}, "diffusion.p2_k"),
    ({"loss_weighting": "p2", "p2_gamma": -1.0}, "diffusion.p2_gamma"),
])
def test_bad_config_names_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_strategy(DiffusionConfig(**overrides))


# --- helpers --------------------------------------------------------------------------------------------------

def test_append_dims_2d_and_3d():
    t = torch.arange(3.0)
    assert append_dims(t, 4).shape == (3, 1, 1, 1)
    assert append_dims(t, 5).shape == (3, 1, 1, 1, 1)
    assert torch.equal((append_dims(t, 5) * torch.ones(3, 2, 4, 5, 6))[:, 1, 3, 4, 5], t)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 3), 1)


def test_guidance():
    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2)
    calls = []

    def net(x, t, cond):
        calls.append(cond)
        return x + (3.0 if cond == "c" else 1.0)

    assert torch.equal(guided(net, x, t, "c", 1.0, None), net(x, t, "c"))
    assert calls == ["c", "c"]  # guided made exactly one call at scale 1
    torch.testing.assert_close(guided(net, x, t, "c", 2.5, "null"), x + 1 + 2.5 * 2)
    torch.testing.assert_close(guided(net, x, t, "c", 0.0, "null"), x + 1)  # scale 0 = unconditional
    with pytest.raises(ValueError, match="null_cond"):
        guided(net, x, t, "c", 2.0, None)


# --- ddpm: forward process and loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_schedule_and_forward_marginals(schedule):
    strategy = DDPM(beta_schedule=schedule)
    reference = reference_alphas_cumprod(schedule)
    torch.testing.assert_close(strategy.alphas_cumprod.double(), reference, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(DDIMScheduler.from_config(strategy.sampling_scheduler().config).alphas_cumprod,
                               strategy.alphas_cumprod)

    # x0 is a point mass at 0.7: (x_t - alpha_t x0) / sigma_t must be standard normal, per sample.
    torch.manual_seed(0)
    recorder = Recorder()
    _, times = strategy.loss_terms(recorder, torch.full((512, 2, 8, 8), 0.7), None)
    x_t, t, _ = recorder.calls[0]
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and 0 <= t.min() and t.max() < 1000
    torch.testing.assert_close(times, t / 999)
    alpha_bar = append_dims(reference[t.long()], 4).float()
    z = (x_t - alpha_bar.sqrt() * 0.7) / (1 - alpha_bar).sqrt()
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02
    assert z.flatten(1).mean(1).std() < 2.5 / 128 ** 0.5  # no per-sample bias (128 values per sample)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", ("none", "min_snr", "p2"))
def test_ddpm_oracle_gives_zero_loss(objective, weighting):
    strategy = build_strategy(DiffusionConfig(objective=objective, loss_weighting=weighting))
    torch.manual_seed(1)
    x0 = torch.rand(64, 2, 8, 8) * 2 - 1
    oracle = ddpm_oracle(strategy, mean=None)  # cond carries each sample's x0
    terms, times = strategy.loss_terms(oracle, x0, x0)
    assert terms.shape == x0.shape and times.shape == (64,)
    assert terms.abs().max() < 1e-6
    assert strategy.loss(lambda x, t, c: torch.zeros_like(x), x0, None).mean() > 1e-2  # and a bad net does not


def test_ddpm_x0_loss_with_zero_net_is_weighted_x0_square():
    strategy = build_strategy(DiffusionConfig(objective="x0", loss_weighting="min_snr", min_snr_gamma=5.0))
    x0 = torch.randn(256, 1, 4, 4)
    terms, times = strategy.loss_terms(lambda x, t, c: torch.zeros_like(x), x0, None)
    alpha_bar = reference_alphas_cumprod("linear")[(times * 999).round().long()]
    weight = (alpha_bar / (1 - alpha_bar)).clamp(max=5.0).float()  # Hang et al.: min(SNR, gamma) on x0
    torch.testing.assert_close(terms, append_dims(weight, 4) * x0 ** 2, rtol=1e-4, atol=1e-6)
    torch.manual_seed(3)
    per_sample = strategy.loss(lambda x, t, c: torch.zeros_like(x), x0, None)
    torch.manual_seed(3)
    torch.testing.assert_close(per_sample, strategy.loss_terms(lambda x, t, c: torch.zeros_like(x), x0, None)[0]
                               .mean(dim=(1, 2, 3)))


def test_loss_weight_formulas():
    snr = (lambda a: a / (1 - a))(reference_alphas_cumprod("linear")).float()
    weights = {o: build_strategy(DiffusionConfig(objective=o, loss_weighting="min_snr")).weights for o in OBJECTIVES}
    gamma_snr = snr.clamp(max=5.0)
    torch.testing.assert_close(weights["eps"], gamma_snr / snr, rtol=1e-3, atol=0)
    torch.testing.assert_close(weights["x0"], gamma_snr, rtol=1e-3, atol=0)
    torch.testing.assert_close(weights["v"], gamma_snr / (snr + 1), rtol=1e-3, atol=0)
    assert weights["eps"].max() <= 1 + 1e-6 and weights["eps"][-1] == pytest.approx(1.0)
    assert weights["eps"][0] < 1e-3  # low-noise steps (SNR ~ 1e4) are down-weighted

    p2 = build_strategy(DiffusionConfig(loss_weighting="p2", p2_k=1.0, p2_gamma=0.5)).weights
    torch.testing.assert_close(p2, 1 / (1 + snr) ** 0.5, rtol=1e-3, atol=0)
    assert torch.all(p2[1:] >= p2[:-1])  # Choi et al.: emphasise noisier (lower-SNR) steps
    assert torch.equal(build_strategy(DiffusionConfig(objective="v")).weights, torch.ones(1000))


@pytest.mark.parametrize("weighting", ("min_snr", "p2"))
def test_weighted_loss_is_the_same_for_every_objective(weighting):
    """Same x0 error, same t and noise: the weighted loss must not depend on what the net parameterises."""
    x0 = torch.randn(128, 1, 4, 4)
    error = 0.1 * torch.randn_like(x0)
    losses = []
    for objective in OBJECTIVES:
        strategy = build_strategy(DiffusionConfig(objective=objective, loss_weighting=weighting, p2_gamma=0.7))

        def net(x_t, t, cond):
            alpha, sigma = ddpm_coefficients(strategy, t, x_t.ndim)
            return objective_from_x0(objective, x_t.double(), (x0 + error).double(), alpha, sigma).float()

        torch.manual_seed(4)
        losses.append(strategy.loss(net, x0, None))
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(losses[2], losses[0], rtol=2e-3, atol=1e-7)


# --- ddpm: sampling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_recovers_point_mass(objective, schedule):
    # The class itself: an exact oracle recovers x0 even where build_strategy refuses cosine + eps for real nets.
    strategy = DDPM(beta_schedule=schedule, objective=objective)
    x0 = torch.rand(1, 2, 6, 6, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for steps in (1, 8, 50):  # divisors of 1000: see the note on trailing spacing in the report
        sample = strategy.sample(ddpm_oracle(strategy, x0), noise, None, steps)
        torch.testing.assert_close(sample, x0.expand_as(sample), rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_follows_the_flow_of_gaussian_data(objective):
    """For data N(mu, s^2) the probability-flow ODE from step 999 is affine; DDIM converges to it at first order."""
    strategy = build_strategy(DiffusionConfig(objective=objective))
    mean, std = 0.5, 0.3
    oracle = ddpm_oracle(strategy, torch.tensor(mean, dtype=torch.float64), std)
    noise = torch.randn(4096, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a_bar = strategy.alphas_cumprod.double()[-1]
    exact = mean + std * (noise - a_bar.sqrt() * mean) / (a_bar * std ** 2 + 1 - a_bar).sqrt()
    coarse, fine = (strategy.sample(oracle, noise, None, steps) for steps in (125, 250))
    coarse_error, fine_error = (coarse - exact).abs().mean(), (fine - exact).abs().mean()
    assert fine_error < 0.006 and 1.8 < coarse_error / fine_error < 2.2
    assert abs(fine.mean() - exact.mean()) < 0.002 and abs(fine.std() - exact.std()) < 0.01


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_equals_diffusers_loop_from_exported_scheduler(objective, tmp_path):
    strategy = DDPM(beta_schedule="cosine", objective=objective)  # the class: build_strategy refuses cosine + eps
    strategy.export_scheduler(tmp_path)
    scheduler = DDIMScheduler.from_pretrained(tmp_path)
    config = scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.prediction_type, config.clip_sample) == \
        (1000, "squaredcos_cap_v2", {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[objective], False)
    torch.manual_seed(5)
    net = TinyNet()
    noise = torch.randn(2, 1, 8, 8)
    steps = 12
    states = []
    ours = strategy.sample(net, noise, None, steps, callback=lambda i, t, x, x0: states.append((i, t, x, x0)))

    scheduler.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = scheduler.step(net(x, t.float().expand(2), None), t, x)
            assert states[i][0] == i and states[i][1] == pytest.approx(t.item() / 999)
            torch.testing.assert_close(states[i][2], x, rtol=0, atol=0)
            torch.testing.assert_close(states[i][3], out.pred_original_sample, rtol=0, atol=0)
            x = out.prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=0)
    assert len(states) == steps and states[0][1] == 1.0


def test_sample_matches_diffusers_ddim_pipeline_on_the_export(tmp_path):
    """The exported scheduler makes DDIMPipeline reproduce `sample` (the `final/` contract)."""
    strategy = build_strategy(DiffusionConfig(objective="v", beta_schedule="cosine"))
    strategy.export_scheduler(tmp_path)
    torch.manual_seed(13)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(tmp_path))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                      output_type="pt").images
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ours = strategy.sample(lambda x, t, cond: unet(x, t).sample, noise, None, 10)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-6)


def test_mixed_precision_keeps_loss_and_sampling_in_float32():
    torch.manual_seed(14)
    net = TinyNet()
    x0 = camera_patches(8)
    for strategy in (build_strategy(DiffusionConfig(objective="v", loss_weighting="min_snr")),
                     build_strategy(DiffusionConfig(strategy="rflow", sampler="euler"))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net(x0, torch.zeros(8), None).dtype == torch.bfloat16
            terms, times = strategy.loss_terms(net, x0, None)
            sample = strategy.sample(net, torch.randn(2, 1, 16, 16), None, 4)
        assert terms.dtype == times.dtype == sample.dtype == torch.float32
        assert torch.isfinite(terms).all() and torch.isfinite(sample).all()


def test_sampling_is_deterministic_and_counts_calls():
    torch.manual_seed(6)
    net = TinyNet()
    noise = torch.randn(2, 1, 8, 8)
    for strategy in (build_strategy(DiffusionConfig()),
                     build_strategy(DiffusionConfig(strategy="rflow", sampler="euler"))):
        first = strategy.sample(net, noise, None, 5)
        torch.manual_seed(123)  # the global RNG must not matter
        assert torch.equal(strategy.sample(net, noise, None, 5), first)
        calls = []

        def counting(x, t, cond):
            calls.append(cond)
            return net(x, t, None) * (1.5 if cond == "c" else 1.0)

        assert torch.equal(strategy.sample(counting, noise, "c", 5, guidance_scale=1.0),
                           strategy.sample(lambda x, t, c: net(x, t, None) * 1.5, noise, None, 5))
        assert calls == ["c"] * 5
        calls.clear()
        guided_sample = strategy.sample(counting, noise, "c", 5, guidance_scale=3.0, null_cond="null")
        assert len(calls) == 10 and not torch.allclose(guided_sample, first)
        with pytest.raises(ValueError, match="null_cond"):
            strategy.sample(counting, noise, "c", 5, guidance_scale=3.0)
        with pytest.raises(ValueError, match="steps"):
            strategy.sample(net, noise, None, 0)


# --- rflow ----------------------------------------------------------------------------------------------------

def test_rflow_forward_path_and_network_time():
    strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler", num_train_timesteps=1000))
    torch.manual_seed(7)
    recorder = Recorder()
    x0 = torch.full((512, 1, 8, 8), -0.4)
    terms, times = strategy.loss_terms(recorder, x0, "cond")
    x_t, t_net, cond = recorder.calls[0]
    assert cond == "cond"
    torch.testing.assert_close(t_net, times * 1000)
    keep = times > 0.05
    tb = append_dims(times, 4)
    z = ((x_t - (1 - tb) * x0) / tb)[keep]
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02
    velocity = (x_t - (1 - tb) * x0) / tb - x0  # eps - x0, with eps recovered from x_t
    torch.testing.assert_close(terms[keep], velocity[keep] ** 2)  # the zero net's loss is |v|^2


def test_rflow_oracle_gives_zero_loss():
    strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler", timestep_sampling="logit_normal"))
    torch.manual_seed(8)
    x0 = torch.rand(64, 2, 8, 8) * 2 - 1

    def net(x_t, t, cond):
        return (x_t.double() - cond) / append_dims(t.double() / 1000, 4)

    assert strategy.loss(net, x0, x0.double()).max() < 1e-8
    assert strategy.loss(lambda x, t, c: torch.zeros_like(x), x0, None).min() > 0.3


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1.0, 0.5), (-0.5, 2.0)])
def test_rflow_logit_normal_times(mean, std):
    strategy = RectifiedFlow(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std)
    torch.manual_seed(9)
    t = strategy.sample_times(20000, torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1
    assert t.median() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)
    logits = torch.log(t / (1 - t))
    assert logits.std() == pytest.approx(std, rel=0.03)
    uniform = RectifiedFlow().sample_times(20000, torch.device("cpu"))
    assert 0 <= uniform.min() and uniform.max() < 1 and uniform.mean() == pytest.approx(0.5, abs=0.01)


def test_rflow_euler_reaches_point_mass_and_reports_steps():
    strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler"))
    x0 = torch.rand(1, 3, 5, 5) * 2 - 1
    noise = torch.randn(4, 3, 5, 5)
    for steps in (1, 4, 50):
        states = []
        sample = strategy.sample(rflow_oracle(strategy, x0), noise, None, steps,
                                 callback=lambda i, t, x, x0_pred: states.append((i, t, x0_pred)))
        torch.testing.assert_close(sample, x0.expand_as(sample), rtol=0, atol=1e-5)
        assert [s[0] for s in states] == list(range(steps))
        assert [s[1] for s in states] == pytest.approx([1 - i / steps for i in range(steps)])
        torch.testing.assert_close(states[-1][2], x0.expand_as(sample), rtol=0, atol=1e-5)


def test_rflow_export_loads_and_samples_with_same_time_scale(tmp_path):
    strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler", num_train_timesteps=500))
    strategy.export_scheduler(tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert scheduler.config.num_train_timesteps == 500 and scheduler.config.shift == 1.0
    # diffusers hands the net sigma * num_train_timesteps, as we do: the exact velocity must still land on x0.
    x0 = torch.rand(1, 1, 4, 4)
    oracle = rflow_oracle(strategy, x0)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.expand(2), None), t, x).prev_sample
    torch.testing.assert_close(x, x0.expand_as(x), rtol=0, atol=1e-5)


# --- both: 3D and training ------------------------------------------------------------------------------------

def test_3d_inputs_use_the_same_code():
    x0 = torch.rand(1, 2, 4, 6, 5) * 2 - 1
    noise = torch.randn(3, 2, 4, 6, 5)
    ddpm = build_strategy(DiffusionConfig(objective="v", loss_weighting="min_snr"))
    terms, times = ddpm.loss_terms(ddpm_oracle(ddpm, None), x0.expand(3, -1, -1, -1, -1), x0)
    assert terms.shape == (3, 2, 4, 6, 5) and times.shape == (3,) and terms.abs().max() < 1e-6
    torch.testing.assert_close(ddpm.sample(ddpm_oracle(ddpm, x0.double()), noise.double(), None, 10),
                               x0.double().expand(3, -1, -1, -1, -1), rtol=0, atol=1e-6)
    flow = build_strategy(DiffusionConfig(strategy="rflow", sampler="euler"))
    net3d = TinyNet(channels=2, spatial_dims=3)
    assert flow.loss(net3d, x0, None).shape == (1,) and ddpm.loss(net3d, noise, None).shape == (3,)
    torch.testing.assert_close(flow.sample(rflow_oracle(flow, x0), noise, None, 6), x0.expand_as(noise),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [
    DiffusionConfig(objective="eps"),
    DiffusionConfig(objective="v", loss_weighting="min_snr", beta_schedule="cosine"),
    DiffusionConfig(strategy="rflow", sampler="euler", timestep_sampling="logit_normal"),
], ids=["ddpm-eps", "ddpm-v-minsnr", "rflow"])
def test_tiny_net_training_lowers_loss(config):
    strategy = build_strategy(config)
    data = camera_patches()
    torch.manual_seed(10)
    net = TinyNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        torch.manual_seed(11)  # the same times and noise before and after training
        with torch.no_grad():
            return strategy.loss(net, data.repeat(8, 1, 1, 1), None).mean().item()

    before = held_out_loss()
    torch.manual_seed(12)
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = strategy.loss(net, batch, None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert math.isfinite(after) and after < 0.6 * before, (before, after)


# ----------------------------------------------------------------------------------------------------------
# Fast samplers: DPM-Solver++ for ddpm, Heun for rflow.

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_dpm_solver_follows_the_flow_of_gaussian_data_in_few_steps(objective):
    """On the exact Gaussian oracle, DPM-Solver++ at 10 steps lands closer to the ODE's end than DDIM at 25."""
    mean, std = 0.5, 0.3
    ddim = build_strategy(DiffusionConfig(objective=objective))
    dpm = build_strategy(DiffusionConfig(objective=objective, sampler="dpm_solver"))
    assert (ddim.sampler, dpm.sampler) == ("ddim", "dpm_solver")
    oracle = ddpm_oracle(ddim, torch.tensor(mean, dtype=torch.float64), std)
    noise = torch.randn(4096, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a_bar = ddim.alphas_cumprod.double()[-1]
    exact = mean + std * (noise - a_bar.sqrt() * mean) / (a_bar * std ** 2 + 1 - a_bar).sqrt()

    def error(strategy, steps):
        return float((strategy.sample(oracle, noise, None, steps) - exact).abs().mean())

    assert error(dpm, 10) < error(ddim, 25)
    assert error(dpm, 50) < 0.01 and error(dpm, 20) < error(dpm, 10)


def test_dpm_solver_reports_x0_and_exports_its_scheduler(tmp_path):
    strategy = build_strategy(DiffusionConfig(sampler="dpm_solver"))
    x0 = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1
    states = []
    sample = strategy.sample(ddpm_oracle(strategy, x0), torch.randn(2, 1, 4, 4, dtype=torch.float64), None, 8,
                             callback=lambda i, t, x, x0_pred: states.append((i, x0_pred)))
    assert [i for i, _ in states] == list(range(8))
    # The oracle's x0 at every step (float32 tables: x0 = (x - sigma eps) / alpha magnifies rounding 1/alpha times).
    assert all(torch.allclose(p, x0.expand_as(p), atol=1e-4) for _, p in states)
    torch.testing.assert_close(sample, x0.expand_as(sample), rtol=0, atol=1e-5)
    strategy.export_scheduler(tmp_path)
    config = DPMSolverMultistepScheduler.from_pretrained(tmp_path).config
    assert (config.algorithm_type, config.solver_order, config.prediction_type) == ("dpmsolver++", 2, "epsilon")


def _gaussian_velocity(std: float):
    """The exact velocity of rectified flow for data N(0, std^2): E[eps - x0 | x_t] is linear in x_t."""
    def net(x_t, t, cond):
        t = append_dims(t.double() / 1000, x_t.ndim)
        return (t - (1 - t) * std ** 2) / ((1 - t) ** 2 * std ** 2 + t ** 2) * x_t
    return net


def test_heun_is_second_order_where_euler_is_first():
    std = 0.3  # the flow maps x_1 ~ N(0, 1) to std * x_1
    noise = torch.randn(512, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = {}
    for sampler in ("euler", "heun"):
        strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler=sampler))
        errors[sampler] = [float((strategy.sample(_gaussian_velocity(std), noise, None, steps) - std * noise)
                                 .abs().mean()) for steps in (8, 16)]
    assert errors["heun"][0] < errors["euler"][1]  # 8 Heun steps (15 net calls) beat 16 Euler steps (16 calls)
    assert 1.7 < errors["euler"][0] / errors["euler"][1] < 2.3  # first order: half the error at twice the steps
    assert errors["heun"][0] / errors["heun"][1] > 3.5  # second order: about a quarter


def test_heun_calls_the_net_twice_per_step_but_the_last_and_exports_its_scheduler(tmp_path):
    strategy = build_strategy(DiffusionConfig(strategy="rflow", sampler="heun"))
    recorder = Recorder()
    strategy.sample(recorder, torch.randn(1, 1, 4, 4), None, 5)
    assert len(recorder.calls) == 2 * 5 - 1
    strategy.export_scheduler(tmp_path)
    assert FlowMatchHeunDiscreteScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 1000
