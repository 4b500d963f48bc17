"""Parity with ComfyUI core's own samplers and schedulers (opt-in: COMFYUI_PATH and ComfyUI's Python).

Each of the pack's samplers runs on the same model, the same noise levels and the same per-step noise as core's
function of the same name (core's ddim is its euler); core gets the model as an EPS denoiser in k-diffusion's
variables, D(x_k, sigma) = x_k - sigma * eps(x_k / sqrt(1 + sigma^2), -2 ln sigma), exactly as core's EPS model
sampling wraps a network, and starts from x_k = x / a (core's noise scaling at full denoise). The schedulers are
compared with core's on its StableCascadeSampling.

Run: COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m pytest -q tests/samplers/test_k_samplers_core.py
"""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from comfyui_harness import import_comfy_or_skip

from comfyui_stablecascade.samplers import schedule
from comfyui_stablecascade.samplers.noise import make_noise_sampler, prepare_noise
from comfyui_stablecascade.samplers.sampling import SAMPLERS, sampler_schedule

# The pack's sampler -> core's function name (core's "ddim" is its euler; uni_pc lives in extra_samplers).
CORE_NAME = {name: name for name in SAMPLERS}
CORE_NAME["ddim"] = "euler"
SCHEDULES = [("official", 2.0), ("simple", 1.0), ("karras", 2.0), ("beta", 1.0), ("exponential", 1.0)]


@pytest.fixture(scope="module")
def core():
    m = import_comfy_or_skip("the parity test with ComfyUI core's samplers", "comfy.k_diffusion.sampling",
                             "comfy.model_sampling", "comfy.samplers", "comfy.extra_samplers.uni_pc")
    return SimpleNamespace(k=m["comfy.k_diffusion.sampling"], uni_pc=m["comfy.extra_samplers.uni_pc"],
                           samplers=m["comfy.samplers"], model_sampling=m["comfy.model_sampling"])


def smooth_eps_model(x, logsnr):
    """A non-linear eps model of (x_t, logSNR), so that any difference in where the model is asked shows."""
    level = torch.sigmoid(logsnr).view(-1, 1, 1, 1)
    return 0.9 * torch.tanh(x) * (1 - level) + 0.3 * x * level + 0.05


class CoreDenoiser:
    """The eps model as core's EPS model sampling presents a network to its samplers."""

    def __init__(self, eps_model, model_sampling):
        self.eps_model = eps_model
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling),
                                           model_patcher=SimpleNamespace(get_model_object=lambda _: model_sampling))

    def __call__(self, x, sigma, **extra):
        s = sigma.view(-1, 1, 1, 1)
        return x - s * self.eps_model(x / torch.sqrt(1 + s**2), -2 * torch.log(sigma))


def _eps_sampling(core):
    """Core's model sampling of Stable Cascade: its schedule with the EPS parametrisation, as model_base builds it."""

    class ModelSampling(core.model_sampling.StableCascadeSampling, core.model_sampling.EPS):
        pass

    return ModelSampling()


def _core_fn(core, name):
    if name == "uni_pc":
        return core.uni_pc.sample_unipc
    if name == "uni_pc_bh2":
        return core.uni_pc.sample_unipc_bh2
    return getattr(core.k, f"sample_{CORE_NAME[name]}")


@pytest.mark.parametrize("scheduler,shift", SCHEDULES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_matches_comfyui_core(core, name, scheduler, shift):
    logsnrs = sampler_schedule(name, scheduler, 12, shift)
    sigmas = schedule.sigma_of(logsnrs)
    x = prepare_noise(torch.zeros(2, 4, 8, 8), seed=21)
    out, _ = SAMPLERS[name](smooth_eps_model, x, logsnrs, noise_sampler=make_noise_sampler(x, 4), disable=True)
    x_k = x * torch.sqrt(1 + sigmas[0] ** 2)
    ms = _eps_sampling(core)
    fn = _core_fn(core, name)
    kwargs = {"noise_sampler": make_noise_sampler(x, 4)} if "noise_sampler" in inspect.signature(fn).parameters else {}
    theirs = fn(CoreDenoiser(smooth_eps_model, ms), x_k, sigmas.clone(), extra_args={}, disable=True, **kwargs)
    ours = out / schedule.alpha_sigma(logsnrs[-1])[0]  # back to k-diffusion's x at the last level
    assert torch.isfinite(ours).all()
    # The float32 paths differ in rounding only (x/a vs x*sqrt(1+sigma^2), logSNR/2 vs -ln sigma). Measured on
    # outputs of magnitude ~150: largest difference 2.2e-3 (uni_pc, its 3x3 solves), 6.6e-4 (dpm_2_ancestral),
    # at most 4.6e-4 for the others; i.e. at most ~1.5e-5 of the values.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["simple", "karras", "exponential", "sgm_uniform", "beta", "normal"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_schedulers_match_comfyui_core_at_shift_1(core, scheduler, steps):
    ms = core.model_sampling.StableCascadeSampling()
    theirs = core.samplers.calculate_sigmas(ms, scheduler, steps)
    ours = schedule.sigma_of(schedule.SCHEDULERS[scheduler](steps, 1.0, 1.0))
    assert ours.shape == theirs.shape
    assert ours[-1].item() == theirs[-1].item() == 0.0
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-6, atol=0)  # measured: at most 2.7e-7


def test_schedulers_at_shift_2_differ_from_core_only_at_the_low_end(core):
    """The official schedule clamps the variance before shifting (SPEC 10.1), core's after, so at shift 2 the
    lowest noise level is sigma 0.0200 in the pack and 0.0100 in core; the high end agrees."""
    ms = core.model_sampling.StableCascadeSampling()
    ms.set_parameters(shift=2.0)
    assert math.isclose(float(ms.sigma_min), 0.0100, rel_tol=1e-3)
    assert math.isclose(schedule.sigma_of(schedule.logsnr(0.0, 2.0)).item(), 0.0200, rel_tol=1e-3)
    ours = schedule.sigma_of(schedule.SCHEDULERS["simple"](20, 2.0, 1.0))
    theirs = core.samplers.calculate_sigmas(ms, "simple", 20)
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-6, atol=0)  # t >= 1/20: above both clamps
