"""GDF samplers, CFG wrapper and seeded noise: exactness on a known x0, parity with diffusers' DDPMWuerstchenScheduler,
CFG rescale by hand, the single-call cfg == 1 path, seed reproducibility, callbacks and t_start."""

import importlib.util
import math
import os

import pytest
import torch

from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.samplers import schedule
from comfyui_stablecascade.samplers.guidance import CFGDenoiser, batch_cond_uncond, rescale_cfg
from comfyui_stablecascade.samplers.noise import make_noise_sampler, prepare_noise
from comfyui_stablecascade.samplers.sampling import SAMPLERS, add_noise, sample_ddim, sample_ddpm

SHAPE = (2, 4, 6, 6)
# Samplers that call the model (and, if stochastic, draw noise) twice a step on a schedule that does not end at
# sigma 0; every other sampler makes one call (and at most one draw) a step.
TWO_CALLS_A_STEP = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde"}
TWO_DRAWS_A_STEP = {"dpmpp_sde"}


def _tables():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_schedule.py")
    spec = importlib.util.spec_from_file_location("scw_test_schedule_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_eps_model(x0_true):
    """An eps model that is exact for x0_true: eps = (x - a*x0)/b at the given logSNR."""

    def model(x, logsnr):
        a, b = schedule.alpha_sigma(logsnr[0])
        return (x - a * x0_true) / b

    return model


def smooth_eps_model(x, logsnr):
    """A non-trivial eps model of (x, logSNR) only, so both samplers in a parity test see identical predictions."""
    level = torch.sigmoid(logsnr).view(-1, 1, 1, 1)
    return 0.9 * torch.tanh(x) * (1 - level) + 0.3 * x * level + 0.05


class RecordingNoise:
    """Per-step noise from a seeded CPU generator, drawn as diffusers' randn_tensor draws it, and kept."""

    def __init__(self, shape, seed):
        self.shape, self.drawn = shape, []
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def __call__(self, logsnr, logsnr_next):
        self.drawn.append(torch.randn(self.shape, generator=self.generator, dtype=torch.float32))
        return self.drawn[-1]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_exact_model_recovers_x0(name):
    x0_true = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    logsnrs = schedule.logsnr_schedule(20, shift=2.0)
    x = prepare_noise(x0_true, seed=7)
    denoised = []
    x_out, x0 = SAMPLERS[name](
        exact_eps_model(x0_true), x, logsnrs, extra_args={"seed": 3}, callback=lambda d: denoised.append(d["denoised"])
    )
    # x0 = (x - b*eps)/a: half a float32 ulp of |x| < 4 (2.4e-7) amplified by 1/a = 100 at t=1 allows 2.4e-5
    # (measured 1e-6).
    for step, pred in enumerate(denoised):
        torch.testing.assert_close(pred, x0_true, atol=5e-5, rtol=0, msg=f"step {step}")
    torch.testing.assert_close(x0, x0_true, atol=1e-5, rtol=0)
    if name == "ddim":  # deterministic: the final state keeps the eps of the first step
        a0, b0 = schedule.alpha_sigma(logsnrs[0])
        a_end, b_end = schedule.alpha_sigma(logsnrs[-1])
        eps0 = (x - a0 * x0_true) / b0
        torch.testing.assert_close(x_out, a_end * x0_true + b_end * eps0, atol=1e-5, rtol=0)


def test_ddpm_matches_diffusers_wuerstchen_scheduler():
    """GDF DDPM with shift 1 == diffusers' DDPM posterior step for steps 0..n-2, given the same eps and noise.

    Where they must differ: (1) the last step: diffusers drops the noise when prev_t == 0, GDF adds sigma*z
    with sigma = sqrt(b'^2/b^2)*sqrt(1-a^2/a'^2) > 0 (b' = 0.01 at t=0), so x_final differs by exactly
    sigma_last*z_last; (2) the network input at step 0: diffusers feeds t = 1.0, GDF feeds r = 0.99358 (the
    schedule tables pin r). The eps model here is a function of (x, logSNR), so (2) does not enter.
    """
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the parity reference, requirements-dev.txt) "
                                    "is not installed")
    DDPMWuerstchenScheduler = diffusers.DDPMWuerstchenScheduler

    steps, seed = 10, 123
    x_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    states, noise = [], RecordingNoise(SHAPE, seed)
    x_gdf, _ = sample_ddpm(
        smooth_eps_model,
        x_init,
        schedule.logsnr_schedule(steps),
        callback=lambda d: states.append(d["x"]),
        noise_sampler=noise,
    )

    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    x, ref_states = x_init.clone(), []
    for t in scheduler.timesteps[:-1]:
        ref_states.append(x)
        t_batch = t.expand(x.shape[0])
        alpha_cumprod = scheduler._alpha_cumprod(t_batch, x.device)
        eps = smooth_eps_model(x, torch.log(alpha_cumprod / (1 - alpha_cumprod)))
        x = scheduler.step(eps, t_batch, x, generator=generator, return_dict=False)[0]

    assert len(states) == len(ref_states) == steps
    for i in range(steps):
        torch.testing.assert_close(states[i], ref_states[i], atol=2e-5, rtol=1e-5, msg=f"state before step {i}")
    logsnrs = schedule.logsnr_schedule(steps)
    a, b = schedule.alpha_sigma(logsnrs[-2])
    a_next, b_next = schedule.alpha_sigma(logsnrs[-1])
    sigma_last = (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt()
    assert sigma_last.item() > 1e-3  # the last-step difference is real, not within tolerance
    torch.testing.assert_close(x_gdf - sigma_last * noise.drawn[-1], x, atol=2e-5, rtol=1e-5)


def test_ddim_eta_one_is_ddpm_and_eta_zero_needs_no_noise():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    logsnrs = schedule.logsnr_schedule(6, shift=2.0)
    ddpm = sample_ddpm(smooth_eps_model, x, logsnrs, extra_args={"seed": 11})
    ddim1 = sample_ddim(smooth_eps_model, x, logsnrs, extra_args={"seed": 11}, eta=1.0)
    assert torch.equal(ddpm[0], ddim1[0]) and torch.equal(ddpm[1], ddim1[1])
    ddim0 = sample_ddim(smooth_eps_model, x, logsnrs)  # deterministic, no seed needed
    assert torch.equal(ddim0[0], sample_ddim(smooth_eps_model, x, logsnrs)[0])
    assert not torch.allclose(ddim0[0], ddpm[0])


def noise_draws(name: str, steps: int = 4) -> int:
    """How many times the sampler asks its noise source during ``steps`` steps (0: it draws no fresh noise)."""
    calls = []

    def noise_sampler(logsnr, logsnr_next):
        calls.append(1)
        return torch.zeros(SHAPE)

    SAMPLERS[name](smooth_eps_model, torch.ones(SHAPE), schedule.logsnr_schedule(steps), noise_sampler=noise_sampler)
    return len(calls)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_never_draw_from_the_global_rng(name):
    """A sampler that draws fresh noise every step refuses to run without a seed (ddpm, lcm, the ancestral and SDE
    samplers); one that draws none runs without one, deterministically, and leaves the global RNG alone."""
    sampler, logsnrs = SAMPLERS[name], schedule.logsnr_schedule(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    draws = noise_draws(name, steps=4)
    state = torch.random.get_rng_state()
    if draws:
        assert draws == (2 if name in TWO_DRAWS_A_STEP else 1) * (len(logsnrs) - 1)  # fresh noise every step
        with pytest.raises(CascadeError, match="seed"):
            sampler(smooth_eps_model, x, logsnrs)
    else:
        first = sampler(smooth_eps_model, x, logsnrs)
        assert all(torch.equal(a, b) for a, b in zip(first, sampler(smooth_eps_model, x, logsnrs)))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_result_different_seed_different(name):
    sampler = SAMPLERS[name]
    x = prepare_noise(torch.zeros(SHAPE), seed=42)
    logsnrs = schedule.logsnr_schedule(5, shift=2.0)
    first = sampler(smooth_eps_model, x, logsnrs, extra_args={"seed": 42})
    again = sampler(smooth_eps_model, x, logsnrs, extra_args={"seed": 42})
    other = sampler(smooth_eps_model, x, logsnrs, extra_args={"seed": 43})
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if noise_draws(name):  # the seed feeds the per-step noise
        assert not torch.allclose(first[0], other[0])
    else:  # no noise drawn: the seed changes nothing
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step_with_documented_keys(name):
    reports = []
    logsnrs = schedule.logsnr_schedule(7, shift=2.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    SAMPLERS[name](smooth_eps_model, x, logsnrs, extra_args={"seed": 1}, callback=reports.append)
    assert [r["i"] for r in reports] == list(range(7))
    assert all(set(r) == {"x", "i", "logsnr", "logsnr_next", "denoised", "eps"} for r in reports)
    assert torch.equal(reports[0]["x"], x)
    assert [r["logsnr"].item() for r in reports] == logsnrs[:-1].tolist()
    assert reports[-1]["logsnr_next"].item() == logsnrs[-1].item()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_t_start_image_to_image(name):
    tables = _tables()
    table = next(t for t in tables.parse_tables() if "image-to-image" in t["title"])
    steps, shift, t_start = int(table["steps"]), float(table["shift"]), float(table["t_start"])
    logsnrs = schedule.logsnr_schedule(steps, shift, t_start)
    assert len(logsnrs) == steps + 1
    assert tables.close_at_printed_precision(logsnrs[0].item(), table["rows"][0]["logsnr"])

    seen = []

    def model(x, logsnr):
        seen.append(logsnr)
        return smooth_eps_model(x, logsnr)

    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    noise = prepare_noise(x0, seed=9)
    x_init = add_noise(x0, noise, logsnrs[0])
    a, b = float(table["rows"][0]["a"]), float(table["rows"][0]["b"])
    # a and b are printed to 5 decimals: half a unit (5e-6) times |x0| and |noise| (< 4 each) is up to 4e-5.
    torch.testing.assert_close(x_init, a * x0 + b * noise, atol=1e-4, rtol=0)
    SAMPLERS[name](model, x_init, logsnrs, extra_args={"seed": 9})
    assert len(seen) == (2 if name in TWO_CALLS_A_STEP else 1) * steps and seen[0].shape == (SHAPE[0],)
    assert torch.equal(seen[0], logsnrs[0].expand(SHAPE[0]))


# ---- CFG ------------------------------------------------------------------------------------------------------


class CountingNetwork:
    """network_fn(x, r, emb, cnet=None) -> eps; records the batch size of every call."""

    def __init__(self):
        self.batches, self.rs = [], []

    def __call__(self, x, r, emb, cnet=None):
        self.batches.append(x.shape[0])
        self.rs.append(r)
        out = x * emb.view(-1, 1, 1, 1) + r.view(-1, 1, 1, 1)
        if cnet is not None:
            out = out + cnet[0]
        return out


def test_cfg_rescale_against_hand_computation():
    cond = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 40.0]])
    uncond = torch.tensor([[0.5, 1.0, 1.0], [4.0, 8.0, 30.0]])
    cfg, rho = 4.0, 0.7
    guided = torch.lerp(uncond, cond, cfg)
    result = rescale_cfg(cond, guided, rho)

    def std(values):  # unbiased, over every element of the whole batch
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    c, u = cond.flatten().tolist(), uncond.flatten().tolist()
    p = [ui + cfg * (ci - ui) for ci, ui in zip(c, u)]
    scale = std(c) / (std(p) + 1e-9)
    expected = [rho * pi * scale + (1 - rho) * pi for pi in p]
    # float32 against Python floats: a few float32 ulps of values up to |47| (measured 3.8e-6).
    torch.testing.assert_close(result.flatten(), torch.tensor(expected), atol=1e-5, rtol=1e-6)
    # Per-sample std would give another answer: the official std is global.
    per_sample = torch.stack([rescale_cfg(cond[i], guided[i], rho) for i in range(2)])
    assert not torch.allclose(per_sample, result, atol=1e-2)
    assert torch.equal(rescale_cfg(cond, guided, 0.0), guided)


def test_guided_call_is_one_batched_call_with_lerp_and_rescale():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    cond = {"emb": torch.tensor([1.0, 2.0]), "cnet": [torch.ones(SHAPE), None]}
    uncond = {"emb": torch.tensor([0.5, -1.0]), "cnet": [torch.zeros(SHAPE), None]}
    net = CountingNetwork()
    logsnr = torch.tensor(-1.41092)
    eps = CFGDenoiser(net, cond, uncond, cfg=4.0, rescale=0.7)(x, logsnr.expand(2))
    assert net.batches == [4]
    r = schedule.noise_cond_r(logsnr)
    torch.testing.assert_close(net.rs[0], r.expand(4))
    e_cond = x * cond["emb"].view(-1, 1, 1, 1) + r + 1.0
    e_uncond = x * uncond["emb"].view(-1, 1, 1, 1) + r
    guided = e_uncond + 4.0 * (e_cond - e_uncond)
    expected = 0.7 * guided * e_cond.std() / (guided.std() + 1e-9) + 0.3 * guided
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_cfg_one_makes_one_call_and_equals_full_cfg():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    cond, uncond = {"emb": torch.tensor([1.5, -0.5])}, {"emb": torch.tensor([0.2, 0.3])}
    logsnr = torch.tensor([0.3, 0.3])
    net = CountingNetwork()
    eps = CFGDenoiser(net, cond, uncond, cfg=1.0, rescale=0.7)(x, logsnr)
    assert net.batches == [SHAPE[0]]
    # The path the official code takes at cfg 1: doubled batch, lerp with weight 1, rescale 0.7.
    r = schedule.noise_cond_r(logsnr)
    both = net(torch.cat([x, x]), r.repeat(2), **batch_cond_uncond(cond, uncond))
    e_cond, e_uncond = both.chunk(2)
    full = rescale_cfg(e_cond, torch.lerp(e_uncond, e_cond, 1.0), 0.7)
    torch.testing.assert_close(eps, full, atol=1e-6, rtol=0)
    net_no_uncond = CountingNetwork()
    CFGDenoiser(net_no_uncond, cond, None, cfg=4.0, rescale=0.7)(x, logsnr)
    assert net_no_uncond.batches == [SHAPE[0]]


def test_cfg_batching_of_lists_dicts_and_none():
    c, u = torch.ones(1, 2), torch.zeros(1, 2)
    batched = batch_cond_uncond(
        {"t": c, "cnet": [c, None, c], "extra": {"k": c, "only_cond": c}, "none": None, "flag": True},
        {"t": u, "cnet": [u, None, None], "extra": {"k": u}, "none": None, "flag": True},
    )
    assert torch.equal(batched["t"], torch.cat([c, u]))
    assert torch.equal(batched["cnet"][0], torch.cat([c, u])) and batched["cnet"][1:] == [None, None]
    assert torch.equal(batched["extra"]["k"], torch.cat([c, u]))
    assert torch.equal(batched["extra"]["only_cond"], torch.cat([c, torch.zeros_like(c)]))
    assert batched["none"] is None and batched["flag"] is True
    with pytest.raises(CascadeError, match="lack"):
        batch_cond_uncond({"t": c, "pooled": c}, {"t": u})


def test_cfg_denoiser_drives_a_sampler():
    net = CountingNetwork()
    denoiser = CFGDenoiser(net, {"emb": torch.tensor([0.9, 0.8])}, {"emb": torch.tensor([0.1, 0.1])}, 4.0, 0.7)
    x = prepare_noise(torch.zeros(SHAPE), seed=0)
    _, x0 = sample_ddpm(denoiser, x, schedule.logsnr_schedule(5, shift=2.0), extra_args={"seed": 0})
    assert net.batches == [4] * 5 and torch.isfinite(x0).all()


# ---- noise ----------------------------------------------------------------------------------------------------


def comfy_reference_noise(latent, seed, batch_index=None):
    """ComfyUI's prepare_noise, restated: global-RNG seed, float32 CPU draws, one (1, ...) draw per index 0..max."""
    with torch.random.fork_rng(devices=[]):
        generator = torch.manual_seed(seed)
        if batch_index is None:
            return torch.randn(latent.size(), dtype=torch.float32, generator=generator, device="cpu").to(latent.dtype)
        draws = [torch.randn([1, *latent.shape[1:]], generator=generator) for _ in range(max(batch_index) + 1)]
        return torch.cat([draws[i] for i in batch_index]).to(latent.dtype)


@pytest.mark.parametrize("seed", [0, 42, 2**63 + 5, 0xFFFFFFFFFFFFFFFF])
def test_initial_noise_matches_comfyui(seed):
    latent = torch.zeros(3, 16, 5, 7)
    state = torch.random.get_rng_state()
    noise = prepare_noise(latent, seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise, comfy_reference_noise(latent, seed))


def test_initial_noise_batch_index_and_dtypes():
    latent = torch.zeros(3, 4, 8, 8)
    picked = prepare_noise(latent, 5, batch_index=[4, 1, 4])
    assert torch.equal(picked, comfy_reference_noise(latent, 5, [4, 1, 4]))
    assert torch.equal(picked[0], picked[2])
    assert torch.equal(prepare_noise(latent[:1], 5, batch_index=[0]), prepare_noise(latent[:1], 5))
    bf16 = prepare_noise(latent.to(torch.bfloat16), 5)
    assert bf16.dtype == torch.bfloat16
    fp32 = prepare_noise(latent, 5)
    assert torch.equal(bf16.float(), fp32.to(torch.bfloat16).float())
    assert (bf16.float() - fp32).abs().max().item() <= fp32.abs().max().item() * 2**-8


def test_step_noise_sampler_seeded_and_dtype_independent():
    x = torch.zeros(SHAPE)
    level = torch.tensor(0.0)
    first = [make_noise_sampler(x, 3)(level, level) for _ in range(1)][0]
    sampler_a, sampler_b = make_noise_sampler(x, 3), make_noise_sampler(x.to(torch.bfloat16), 3)
    draws_a = [sampler_a(level, level) for _ in range(3)]
    draws_b = [sampler_b(level, level) for _ in range(3)]
    assert torch.equal(draws_a[0], first) and not torch.equal(draws_a[0], draws_a[1])
    for a, b in zip(draws_a, draws_b):
        assert b.dtype == torch.bfloat16 and torch.equal(b.float(), a.to(torch.bfloat16).float())
    # The per-step stream is not the initial noise of the same seed.
    assert not torch.allclose(draws_a[0], prepare_noise(x, 3), atol=0.5)
    assert not torch.equal(make_noise_sampler(x, 4)(level, level), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare against the CPU")
def test_noise_and_ddpm_do_not_depend_on_device():
    latent = torch.zeros(SHAPE)
    noise_cpu = prepare_noise(latent, 77)
    level = torch.tensor(0.0)
    on_gpu = make_noise_sampler(latent.cuda(), 77)(level, level)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), make_noise_sampler(latent, 77)(level, level))
    logsnrs = schedule.logsnr_schedule(10, shift=2.0)
    out_cpu = sample_ddpm(smooth_eps_model, noise_cpu, logsnrs, extra_args={"seed": 77})[1]
    out_gpu = sample_ddpm(smooth_eps_model, noise_cpu.cuda(), logsnrs, extra_args={"seed": 77})[1]
    # CUDA's tanh/sigmoid/sqrt differ from the CPU's by float32 ulps, compounded over 10 steps.
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
