"""The k-diffusion-style samplers and the schedulers: convergence to the exact solution on Gaussian data (whose
x0 predictor is closed-form), for every sampler on every scheduler, and the adapter's sigma/logSNR algebra.

Data x0 ~ N(MU, S^2) elementwise. At logSNR L (a^2 = sigmoid(L), b^2 = 1 - a^2) the exact x0 predictor is
E[x0 | x_t] = MU + a S^2 / (a^2 S^2 + b^2) * (x_t - a MU). In k-diffusion's variables (x_k = x_t / a, sigma = b/a)
the probability-flow ODE then has the closed-form solution
x_k(sigma) = MU + (x_k(sigma_0) - MU) * sqrt((S^2 + sigma^2) / (S^2 + sigma_0^2)), which the deterministic samplers
must approach as steps grow; the stochastic ones must produce samples of mean MU and std S.
"""

import math

import pytest
import torch

from comfyui_stablecascade.samplers import schedule
from comfyui_stablecascade.samplers.noise import make_noise_sampler, prepare_noise
from comfyui_stablecascade.samplers.sampling import DISCARD_PENULTIMATE, SAMPLERS, sampler_schedule

MU, S = 0.3, 0.5
STOCHASTIC = {"ddpm", "lcm", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2m_sde", "dpmpp_sde"}
DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC)
FIRST_ORDER = {"ddim", "euler", "ddpm", "euler_ancestral", "dpmpp_sde"}  # dpmpp_sde: iid noise, no Brownian tree
SCHEDULERS = list(schedule.SCHEDULERS)


def _posterior_x0(x, logsnr):
    """E[x0 | x_t] for Gaussian data (float64), and a, b."""
    a2 = torch.sigmoid(logsnr[0].double())
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return MU + a * S**2 / (a2 * S**2 + b**2) * (x.double() - a * MU), a, b


def gaussian_eps_model(x, logsnr):
    """The exact eps of Gaussian data N(MU, S^2) at logSNR: the x0 predictor every sampler but lcm assumes."""
    x0, a, b = _posterior_x0(x, logsnr)
    return ((x.double() - a * x0) / b).float()


def consistency_eps_model(x, logsnr):
    """The eps whose x0 is the probability-flow ODE's exact end point from (x_t, logSNR): the consistency function
    of Gaussian data, the model LCM sampling is made for (it is exact with it at any number of steps)."""
    a2 = torch.sigmoid(logsnr[0].double())
    a, b = a2.sqrt(), (1 - a2).sqrt()
    sigma = b / a
    x0 = MU + (x.double() / a - MU) * S / torch.sqrt(S**2 + sigma**2)
    return ((x.double() - a * x0) / b).float()


def exact_ode_end(x, logsnrs):
    """The probability-flow ODE's exact state at logsnrs[-1] from x at logsnrs[0], as GDF's x_t."""
    l0, l_end = logsnrs[0].double(), logsnrs[-1].double()
    sigma0, sigma_end = torch.exp(-l0 / 2), torch.exp(-l_end / 2)
    x_k = x.double() * torch.sqrt(1 + sigma0**2)
    end = MU + (x_k - MU) * torch.sqrt((S**2 + sigma_end**2) / (S**2 + sigma0**2))
    return end / torch.sqrt(1 + sigma_end**2)


def _deterministic_error(name, scheduler, steps, shift):
    """max |output - exact ODE solution| over 1024 samples."""
    logsnrs = sampler_schedule(name, scheduler, steps, shift)
    x = prepare_noise(torch.zeros(1, 1, 32, 32), seed=11)
    out, x0 = SAMPLERS[name](gaussian_eps_model, x, logsnrs, disable=True)
    exact = exact_ode_end(x, logsnrs)
    if logsnrs[-1] == math.inf:  # ending at sigma 0 the output x0 is the final state itself
        assert torch.equal(out, x0)
    return (out.double() - exact).abs().max().item()


def _sample_stats_error(name, scheduler, steps, shift, model=gaussian_eps_model):
    """|mean - MU| + |std - S| of the output x0 over 16384 samples (standard error about 0.005)."""
    logsnrs = sampler_schedule(name, scheduler, steps, shift)
    x = prepare_noise(torch.zeros(4, 1, 64, 64), seed=5)
    _, x0 = SAMPLERS[name](model, x, logsnrs, noise_sampler=make_noise_sampler(x, 6), disable=True)
    return abs(x0.double().mean().item() - MU) + abs(x0.double().std().item() - S)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name, scheduler):
    shift = 2.0 if scheduler == "official" else 1.0
    few, many = (_deterministic_error(name, scheduler, steps, shift) for steps in (5, 100))
    # Measured at 100 steps: first order 2.3e-2..4.1e-2, the others 4e-5..5.6e-3 (dpmpp_2m on the official shift-2
    # schedule 1.3e-2: its first steps are tiny next to the second). Schedules into sigma 0 end with a jump from
    # their lowest level, which limits karras/exponential/normal to ~3e-4 whatever the steps.
    assert many < few / 10, (few, many)
    assert many < (0.06 if name in FIRST_ORDER else 0.02), (few, many)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_at_their_order_on_the_official_schedule(name):
    """On GDF's schedule (no final jump) the error falls as steps^-order: 20 -> 100 steps, first order gives
    5x (measured 0.97 as an exponent), the second/third-order ones at least 5^1.5 (measured 1.79..2.49)."""
    e20, e100 = (_deterministic_error(name, "official", steps, 2.0) for steps in (20, 100))
    order = math.log(e20 / e100) / math.log(5)
    assert order > (0.9 if name in FIRST_ORDER else 1.5), (e20, e100, order)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", sorted(STOCHASTIC - {"lcm"}))
def test_stochastic_samplers_sample_the_data_distribution(name, scheduler):
    # Measured at 100 steps: first order (ancestral steps with the posterior mean) 0.020..0.035, the second-order
    # ones 0.002..0.008; the standard error of the statistic is about 0.005.
    few, many = _sample_stats_error(name, scheduler, 3, 1.0), _sample_stats_error(name, scheduler, 100, 1.0)
    assert many < few / 4, (few, many)
    assert many < (0.05 if name in FIRST_ORDER else 0.015), (few, many)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lcm_is_exact_with_a_consistency_model_at_any_steps(scheduler):
    """With the exact x0 of the *posterior mean* LCM's re-noising shrinks the spread at every step (it is made for
    consistency models); with the consistency function it samples the data distribution at 1, 4 or 30 steps."""
    for steps in (1, 4, 30):
        assert _sample_stats_error("lcm", scheduler, steps, 1.0, consistency_eps_model) < 0.015, steps


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_converges_on_the_official_stage_c_schedule(name):
    """The default schedule (shift 2, ending at a finite logSNR) with the output the runners use (x0)."""
    if name == "lcm":
        assert _sample_stats_error(name, "official", 20, 2.0, consistency_eps_model) < 0.015
    elif name in STOCHASTIC:
        assert _sample_stats_error(name, "official", 100, 2.0) < (0.05 if name in FIRST_ORDER else 0.015)
    else:
        assert _deterministic_error(name, "official", 100, 2.0) < (0.06 if name in FIRST_ORDER else 0.02)


def test_ddim_is_euler_in_k_diffusion_variables():
    """DDIM on x_t is exactly Euler on x_k = x_t / a (the adapter's algebra), up to float32 rounding."""
    logsnrs = schedule.logsnr_schedule(12, shift=2.0)
    x = prepare_noise(torch.zeros(1, 2, 8, 8), seed=3)
    ddim, _ = SAMPLERS["ddim"](gaussian_eps_model, x, logsnrs)
    euler, _ = SAMPLERS["euler"](gaussian_eps_model, x, logsnrs)
    torch.testing.assert_close(euler, ddim, atol=2e-5, rtol=0)


def test_sigma_and_logsnr_are_inverse_and_sigma_is_b_over_a():
    logsnrs = torch.tensor([-9.2, -3.0, 0.0, 2.5, 9.2])
    a2 = torch.sigmoid(logsnrs.double())  # b/a in float64: float32's 1 - a^2 cancels at high logSNR
    torch.testing.assert_close(schedule.sigma_of(logsnrs).double(), ((1 - a2) / a2).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.logsnr_of(schedule.sigma_of(logsnrs)), logsnrs, rtol=0, atol=1e-5)
    assert schedule.sigma_of(torch.tensor(math.inf)).item() == 0.0


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("t_start", [1.0, 0.6])
def test_schedulers_start_at_t_start_and_fall(scheduler, t_start):
    logsnrs = schedule.SCHEDULERS[scheduler](20, 2.0, t_start)
    assert logsnrs.dtype == torch.float32 and logsnrs.ndim == 1
    # Noise never rises; at shift 2 the noisiest times share the clamped logSNR -9.21 (the samplers skip repeats).
    assert (logsnrs[1:] >= logsnrs[:-1]).all() and (logsnrs[2:] > logsnrs[1:-1]).all(), logsnrs
    if scheduler == "beta":
        assert 2 <= len(logsnrs) <= 21  # repeated table entries are dropped, as core does
    else:
        assert len(logsnrs) == 21
    if scheduler == "official":
        assert logsnrs[-1].item() == schedule.logsnr(0.0, 2.0).item()
    else:
        assert logsnrs[-1].item() == math.inf
    if scheduler not in ("sgm_uniform", "normal"):  # those start at the time of t_start's level at shift 1
        torch.testing.assert_close(logsnrs[0], schedule.logsnr(t_start, 2.0), atol=1e-4, rtol=0)


def test_official_scheduler_is_the_gdf_schedule_bit_for_bit():
    for sampler in SAMPLERS:
        assert torch.equal(sampler_schedule(sampler, "official", 20, 2.0, 0.8), schedule.logsnr_schedule(20, 2.0, 0.8))


def test_discard_penultimate_as_core_for_dpm_2_and_uni_pc():
    for sampler in DISCARD_PENULTIMATE:
        longer = schedule.SCHEDULERS["karras"](11, 1.0, 1.0)
        assert torch.equal(sampler_schedule(sampler, "karras", 10), torch.cat([longer[:-2], longer[-1:]]))
    assert torch.equal(sampler_schedule("euler", "karras", 10), schedule.SCHEDULERS["karras"](10, 1.0, 1.0))


def test_unknown_scheduler_is_named():
    from comfyui_stablecascade.cascade.errors import CascadeError

    with pytest.raises(CascadeError, match="scheduler 'nope' is unknown.*karras"):
        sampler_schedule("euler", "nope", 10)
