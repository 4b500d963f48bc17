"""The GDF samplers of Stable Cascade (SPEC §10.2-10.3), one function each, with one k-diffusion-style signature.

``model(x, logsnr, **extra_args) -> eps`` receives logsnr as a (B,) float32 tensor. Each step predicts
``x0 = (x - b*eps) / a`` (no clamping) and moves to the next logSNR. Every sampler returns
``(x, x0)``: the final state and the x0 predicted at the last step, which is what the official code outputs
(on a schedule that ends at sigma 0, i.e. logSNR +inf, the k-diffusion samplers' final state is the clean latent
and is returned as both).

Per-step noise comes from ``noise_sampler(logsnr, logsnr_next)`` or, when that is None, from
``extra_args["seed"]`` (a seeded CPU generator, see ``noise.make_noise_sampler``); never from global RNG state.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm import trange

from ..cascade.errors import CascadeError
from .noise import NoiseSampler, make_noise_sampler
from .schedule import DEFAULT_SCHEDULER, SCHEDULERS, alpha_sigma

EpsModel = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
    """Diffuse x0 to the noise level logsnr: a*x0 + b*noise (GDF.diffuse with a given epsilon)."""
    a, b = alpha_sigma(logsnr)
    return a.to(x0.device) * x0 + b.to(x0.device) * noise.to(x0.device)


def _setup(x, logsnrs, extra_args, noise_sampler, needs_noise, sampler_name):
    """Split the seed off extra_args, move logsnrs to x's device and pick the per-step noise source."""
    extra_args = dict(extra_args or {})
    seed = extra_args.pop("seed", None)
    if needs_noise and noise_sampler is None:
        if seed is None:
            raise CascadeError(
                f"{sampler_name} draws fresh noise every step but got neither noise_sampler nor extra_args['seed'] "
                "- pass noise_sampler=make_noise_sampler(x, seed) or extra_args={'seed': seed}"
            )
        noise_sampler = make_noise_sampler(x, seed)
    logsnrs = torch.as_tensor(logsnrs, dtype=torch.float32).to(x.device)
    if logsnrs.ndim != 1 or logsnrs.numel() < 2:
        raise CascadeError(
            f"{sampler_name} expects a 1-D logsnrs of steps+1 values, got shape {tuple(logsnrs.shape)} "
            "- build it with schedule.logsnr_schedule(steps, shift, t_start)"
        )
    return extra_args, logsnrs, noise_sampler


def _predict(model, x, logsnr, extra_args):
    """One model call at noise level logsnr; returns (eps, x0) with x0 = (x - b*eps)/a."""
    eps = model(x, logsnr.expand(x.shape[0]), **extra_args)
    a, b = alpha_sigma(logsnr)
    return eps, (x - b * eps) / a


def _report(callback, x, i, logsnr, logsnr_next, x0, eps):
    """Send the k-diffusion-style step report: x is the state the model saw, denoised the predicted x0."""
    if callback is not None:
        callback({"x": x, "i": i, "logsnr": logsnr, "logsnr_next": logsnr_next, "denoised": x0, "eps": eps})


def _ddim_loop(model, x, logsnrs, extra_args, callback, disable, noise_sampler, eta, name):
    """The DDIM/DDPM loop of GDF (SPEC §10.2-10.3); returns (final x, last x0)."""
    extra_args, logsnrs, noise_sampler = _setup(x, logsnrs, extra_args, noise_sampler, eta > 0, name)
    x0 = x
    for i in trange(len(logsnrs) - 1, disable=disable):
        logsnr, logsnr_next = logsnrs[i], logsnrs[i + 1]
        eps, x0 = _predict(model, x, logsnr, extra_args)
        _report(callback, x, i, logsnr, logsnr_next, x0, eps)
        a, b = alpha_sigma(logsnr)
        a_next, b_next = alpha_sigma(logsnr_next)
        if eta > 0:
            sigma = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt()
            noise = noise_sampler(logsnr, logsnr_next)
            x = a_next * x0 + (b_next**2 - sigma**2).sqrt() * eps + sigma * noise
        else:
            x = a_next * x0 + b_next * eps
    return x, x0


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    x: torch.Tensor,
    logsnrs: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM (Song et al. 2020, arXiv:2010.02502) as GDF's DDIMSampler; eta=0 is deterministic, eta=1 is DDPM."""
    return _ddim_loop(model, x, logsnrs, extra_args, callback, disable, noise_sampler, eta, "sample_ddim")


@torch.no_grad()
def sample_ddpm(
    model: EpsModel,
    x: torch.Tensor,
    logsnrs: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239) as GDF's DDPMSampler, i.e. DDIM with eta=1."""
    return _ddim_loop(model, x, logsnrs, extra_args, callback, disable, noise_sampler, 1.0, "sample_ddpm")


@torch.no_grad()
def sample_lcm(
    model: EpsModel,
    x: torch.Tensor,
    logsnrs: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM multistep sampling (Luo et al. 2023, arXiv:2310.04378) as GDF's LCMSampler: re-noise x0 with fresh noise."""
    extra_args, logsnrs, noise_sampler = _setup(x, logsnrs, extra_args, noise_sampler, True, "sample_lcm")
    x0 = x
    for i in trange(len(logsnrs) - 1, disable=disable):
        logsnr, logsnr_next = logsnrs[i], logsnrs[i + 1]
        eps, x0 = _predict(model, x, logsnr, extra_args)
        _report(callback, x, i, logsnr, logsnr_next, x0, eps)
        a_next, b_next = alpha_sigma(logsnr_next)
        x = a_next * x0 + b_next * noise_sampler(logsnr, logsnr_next)
    return x, x0


# ---- k-diffusion-style samplers through one adapter ------------------------------------------------------------
#
# k-diffusion works on x_k = x0 + sigma*eps with a denoiser D(x_k, sigma) -> x0; GDF on x_t = a*x0 + b*eps with
# a^2 + b^2 = 1 and logSNR = ln(a^2/b^2). Dividing x_t by a gives x0 + (b/a)*eps, so
#     sigma = b/a = exp(-logSNR/2),   x_k = x_t / a,   x_t = x_k * a = x_k / sqrt(1 + sigma^2),
#     D(x_k, sigma) = x_k - sigma * eps(x_t, logSNR) = (x_t - b*eps)/a,
# the same x0 GDF predicts. sigma 0 is logSNR +inf (a 1): a schedule ending there ends on the clean latent. The
# samplers keep GDF's interface (x_t and logSNRs in, (x_t, last x0) out) and step in k-diffusion's variables
# inside; intermediate levels (midpoints) are given as logSNRs, so the network always gets its own noise condition.


class _KDiffusion:
    """The one denoiser adapter between GDF's eps model on x_t and k-diffusion's D(x_k, sigma)."""

    def __init__(self, model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict,
                 callback: StepCallback | None) -> None:
        self.model, self.extra, self.callback, self.logsnrs = model, extra_args, callback, logsnrs
        self.sigmas = torch.exp(-logsnrs / 2)
        self.x_k = x / alpha_sigma(logsnrs[0])[0]
        # The first call sees the caller's x itself, not x/a*a (which differs in the last bit).
        self._start = (self.x_k, x)
        self.x0, self._seen = x, None

    def __call__(self, x_k: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """D(x_k, sigma(logsnr)) -> x0; remembers the call for the step report and the last-x0 output."""
        x_t = self._start[1] if x_k is self._start[0] else x_k * alpha_sigma(logsnr)[0]
        eps, self.x0 = _predict(self.model, x_t, logsnr, self.extra)
        self._seen = (x_t, logsnr, eps)
        return self.x0

    def report(self, i: int) -> None:
        """Report step i with the model call just made (its x_t, x0 and eps)."""
        x_t, _, eps = self._seen
        _report(self.callback, x_t, i, self.logsnrs[i], self.logsnrs[i + 1], self.x0, eps)

    def finish(self, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t at the last logSNR, the output x0): the x0 of the last model call (GDF's rule), except on a schedule
        that ends at sigma 0, where the final state is the clean latent (k-diffusion's and core's output)."""
        if self.logsnrs[-1] == math.inf:
            return x_k, x_k
        return x_k * alpha_sigma(self.logsnrs[-1])[0], self.x0


def _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, needs_noise, name):
    extra_args, logsnrs, noise_sampler = _setup(x, logsnrs, extra_args, noise_sampler, needs_noise, name)
    # A step between equal levels (the official schedule at shift > 1 clamps its noisiest times to one logSNR)
    # moves nothing but would divide by its zero length in the multistep formulas: keep the first of a run.
    repeated = torch.cat([torch.zeros(1, dtype=torch.bool, device=logsnrs.device), logsnrs[1:] == logsnrs[:-1]])
    if repeated.any():
        logsnrs = logsnrs[~repeated]
    den = _KDiffusion(model, x, logsnrs, extra_args, callback)
    return den, den.x_k, logsnrs, den.sigmas, noise_sampler


def _ancestral(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): deterministic step to sigma_down, then noise of std sigma_up (k-diffusion's split)."""
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - up**2).sqrt(), up


@torch.no_grad()
def sample_euler(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                 callback: StepCallback | None = None, disable: bool | None = None,
                 noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D)/sigma (Karras et al. 2022, Alg. 2 without churn)."""
    den, xk, L, s, _ = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, False, "sample_euler")
    for i in trange(len(L) - 1, disable=disable):
        d = (xk - den(xk, L[i])) / s[i]
        den.report(i)
        xk = xk + d * (s[i + 1] - s[i])
    return den.finish(xk)


@torch.no_grad()
def sample_euler_ancestral(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                           callback: StepCallback | None = None, disable: bool | None = None,
                           noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler to sigma_down, then fresh noise of std sigma_up (k-diffusion's euler_ancestral, eta 1)."""
    den, xk, L, s, noise = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, True,
                                    "sample_euler_ancestral")
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        down, up = _ancestral(s[i], s[i + 1])
        if down == 0:
            xk = x0
        else:
            xk = xk + (xk - x0) / s[i] * (down - s[i]) + noise(L[i], L[i + 1]) * up
    return den.finish(xk)


@torch.no_grad()
def sample_heun(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                callback: StepCallback | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun's second-order method (Karras et al. 2022, Alg. 1); the step to sigma 0 is Euler. Two calls a step."""
    den, xk, L, s, _ = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, False, "sample_heun")
    for i in trange(len(L) - 1, disable=disable):
        d = (xk - den(xk, L[i])) / s[i]
        den.report(i)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            xk = xk + d * dt
        else:
            x2 = xk + d * dt
            d2 = (x2 - den(x2, L[i + 1])) / s[i + 1]
            xk = xk + (d + d2) / 2 * dt
    return den.finish(xk)


def _dpm_2_step(den, xk, x0, L_i, L_to, s_i, s_to):
    """DPM-Solver-2 midpoint step from sigma s_i (where x0 was predicted) to s_to; the midpoint is halfway in log
    sigma, i.e. in logSNR."""
    d = (xk - x0) / s_i
    L_mid = (L_i + L_to) / 2
    s_mid = torch.exp(-L_mid / 2)
    x2 = xk + d * (s_mid - s_i)
    return xk + (x2 - den(x2, L_mid)) / s_mid * (s_to - s_i)


@torch.no_grad()
def sample_dpm_2(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                 callback: StepCallback | None = None, disable: bool | None = None,
                 noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's dpm_2 (DPM-Solver-2, Lu et al. 2022, arXiv:2206.00927, in sigma); Euler into sigma 0."""
    den, xk, L, s, _ = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, False, "sample_dpm_2")
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        if s[i + 1] == 0:
            xk = x0
        else:
            xk = _dpm_2_step(den, xk, x0, L[i], L[i + 1], s[i], s[i + 1])
    return den.finish(xk)


@torch.no_grad()
def sample_dpm_2_ancestral(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                           callback: StepCallback | None = None, disable: bool | None = None,
                           noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dpm_2 to sigma_down, then fresh noise of std sigma_up (k-diffusion's dpm_2_ancestral, eta 1)."""
    den, xk, L, s, noise = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, True,
                                    "sample_dpm_2_ancestral")
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        down, up = _ancestral(s[i], s[i + 1])
        if down == 0:
            xk = x0
        else:
            xk = _dpm_2_step(den, xk, x0, L[i], -2 * torch.log(down), s[i], down) + noise(L[i], L[i + 1]) * up
    return den.finish(xk)


@torch.no_grad()
def sample_dpmpp_2m(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                    callback: StepCallback | None = None, disable: bool | None = None,
                    noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): second-order multistep in half-logSNR, one call a step."""
    den, xk, L, s, _ = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, False, "sample_dpmpp_2m")
    old = None
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        h = (L[i + 1] - L[i]) / 2
        if old is not None and s[i + 1] != 0:
            r = (L[i] - L[i - 1]) / 2 / h
            x0_d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old
        else:
            x0_d = x0
        xk = s[i + 1] / s[i] * xk - torch.expm1(-h) * x0_d
        old = x0
    return den.finish(xk)


@torch.no_grad()
def sample_dpmpp_2m_sde(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                        callback: StepCallback | None = None, disable: bool | None = None,
                        noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) SDE, midpoint variant, eta 1 (k-diffusion's dpmpp_2m_sde) with the seeded per-step noise
    in place of core's Brownian tree."""
    den, xk, L, s, noise = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, True,
                                    "sample_dpmpp_2m_sde")
    old, h_last = None, None
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        h = (L[i + 1] - L[i]) / 2
        if s[i + 1] == 0:
            xk = x0
        else:
            keep = -torch.expm1(-2 * h)
            xk = s[i + 1] / s[i] * torch.exp(-h) * xk + keep * x0
            if old is not None:
                xk = xk + 0.5 * keep * (h / h_last) * (x0 - old)
            xk = xk + noise(L[i], L[i + 1]) * s[i + 1] * (-torch.expm1(-2 * h)).sqrt()
        old, h_last = x0, h
    return den.finish(xk)


@torch.no_grad()
def sample_dpmpp_sde(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                     callback: StepCallback | None = None, disable: bool | None = None,
                     noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++ (stochastic, second order, r 1/2, eta 1: k-diffusion's dpmpp_sde): an ancestral half step to the
    logSNR midpoint, then the full step with the midpoint's x0. Two calls and two noise draws a step."""
    den, xk, L, s, noise = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, True, "sample_dpmpp_sde")
    for i in trange(len(L) - 1, disable=disable):
        x0 = den(xk, L[i])
        den.report(i)
        if s[i + 1] == 0:
            xk = x0
            continue
        L_mid = (L[i] + L[i + 1]) / 2
        s_mid = torch.exp(-L_mid / 2)
        down, up = _ancestral(s[i], s_mid)
        x2 = down / s[i] * xk + (1 - down / s[i]) * x0 + noise(L[i], L_mid) * up
        x0_mid = den(x2, L_mid)
        down, up = _ancestral(s[i], s[i + 1])
        xk = down / s[i] * xk + (1 - down / s[i]) * x0_mid + noise(L[i], L[i + 1]) * up
    return den.finish(xk)


# UniPC into sigma 0 stops at this sigma instead (as core does: the half-logSNR of sigma 0 is infinite).
_UNIPC_LAST_SIGMA = 0.001


def _unipc_update(xk, x0s, lams, lam, s_prev, s_t, order, variant, evaluate):
    """One UniPC step (Zhao et al. 2023, arXiv:2302.04867; B(h) = h for bh1, e^h - 1 for bh2) of data prediction in
    k-diffusion's x from the half-logSNRs lams (x0s predicted there, newest last) to lam. ``evaluate`` (None on the
    last step) calls the model at the predicted x for the corrector; returns (x, that x0 or None)."""
    hh = -(lam - lams[-1])
    phi_1 = torch.expm1(hh)
    rks = [(lams[-k - 1] - lams[-1]) / -hh for k in range(1, order)] + [torch.ones_like(hh)]
    d1s = [(x0s[-k - 1] - x0s[-1]) / rks[k - 1] for k in range(1, order)]
    b_h = hh if variant == "bh1" else phi_1
    rows, rhs, h_phi, factorial = [], [], phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rows.append(torch.stack(rks) ** (k - 1))
        rhs.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(rhs)
    base = s_t / s_prev * xk - phi_1 * x0s[-1]
    x_pred = base
    if d1s:
        rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_pred = base - b_h * sum(r * d for r, d in zip(rhos_p, d1s))
    if evaluate is None:
        return x_pred, None
    x0_t = evaluate(x_pred)
    rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
    corr = sum((r * d for r, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(xk))
    return base - b_h * (corr + rhos_c[-1] * (x0_t - x0s[-1])), x0_t


def _unipc(model, x, logsnrs, extra_args, callback, disable, noise_sampler, variant):
    """UniPC multistep, order min(3, steps-1) with lower orders at the start and end, a corrector after every step
    but the last (the corrector's model call is the next step's x0), as core's uni_pc / uni_pc_bh2."""
    den, xk, L, s, _ = _k_start(model, x, logsnrs, extra_args, callback, noise_sampler, False, f"uni_pc {variant}")
    steps = len(L) - 1
    lam_all = L / 2
    if s[-1] == 0:
        s = s.clone()
        s[-1] = _UNIPC_LAST_SIGMA
        lam_all = lam_all.clone()
        lam_all[-1] = -math.log(_UNIPC_LAST_SIGMA)
    order = max(1, min(3, steps - 1))
    x0s, lams = [den(xk, L[0])], [lam_all[0]]
    den.report(0)
    for k in trange(1, steps + 1, disable=disable):
        last = k == steps
        evaluate = None if last else (lambda x_p, k=k: den(x_p, L[k]))
        xk, x0_k = _unipc_update(xk, x0s, lams, lam_all[k], s[k - 1], s[k], min(order, k, steps + 1 - k), variant,
                                 evaluate)
        if not last:
            den.report(k)
            x0s, lams = (x0s + [x0_k])[-order:], (lams + [lam_all[k]])[-order:]
    # Into sigma 0, the state at sigma 0.001 is read as the clean latent, as core does (finish returns it as is).
    return den.finish(xk)


@torch.no_grad()
def sample_uni_pc(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                  callback: StepCallback | None = None, disable: bool | None = None,
                  noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC with B(h) = h (bh1), core's "uni_pc"."""
    return _unipc(model, x, logsnrs, extra_args, callback, disable, noise_sampler, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(model: EpsModel, x: torch.Tensor, logsnrs: torch.Tensor, extra_args: dict | None = None,
                      callback: StepCallback | None = None, disable: bool | None = None,
                      noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC with B(h) = e^h - 1 (bh2), core's "uni_pc_bh2"."""
    return _unipc(model, x, logsnrs, extra_args, callback, disable, noise_sampler, "bh2")


# The widget lists them in this order: the official samplers first (ddpm, the default), then core's names.
SAMPLERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
# As core's KSampler: these get one step more from a scheduler that ends at sigma 0 and drop the penultimate level,
# so the final step is a whole step into sigma 0 (not a tiny one from sigma_min).
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def sampler_schedule(sampler: str, scheduler: str, steps: int, shift: float = 1.0,
                     t_start: float = 1.0) -> torch.Tensor:
    """The logSNRs a run of ``sampler`` walks through with ``scheduler`` (samplers.schedule.SCHEDULERS)."""
    if scheduler not in SCHEDULERS:
        raise CascadeError(f"scheduler {scheduler!r} is unknown; choose one of {list(SCHEDULERS)} "
                           f"({DEFAULT_SCHEDULER!r} is the official one)")
    build = SCHEDULERS[scheduler]
    if scheduler == DEFAULT_SCHEDULER or sampler not in DISCARD_PENULTIMATE:
        return build(int(steps), float(shift), float(t_start))
    logsnrs = build(int(steps) + 1, float(shift), float(t_start))
    return torch.cat([logsnrs[:-2], logsnrs[-1:]])
