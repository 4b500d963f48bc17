"""The GDF samplers of Stable Cascade (SPEC §10.2-10.3), one function each, with one k-diffusion-style signature.

``model(x, logsnr, **extra_args) -> eps`` receives logsnr as a (B,) float32 tensor. Each step predicts
``x0 = (x - b*eps) / a`` (no clamping) and moves to the next logSNR. Every sampler returns
``(x, x0)``: the final state and the x0 predicted at the last step, which is what the official code outputs.

Per-step noise comes from ``noise_sampler(logsnr, logsnr_next)`` or, when that is None, from
``extra_args["seed"]`` (a seeded CPU generator, see ``noise.make_noise_sampler``); never from global RNG state.
"""

from collections.abc import Callable
from typing import Any

import torch
from tqdm import trange

from ..cascade.errors import CascadeError
from .noise import NoiseSampler, make_noise_sampler
from .schedule import alpha_sigma

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


SAMPLERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}
