"""Image-to-image start point: an encoded latent noised to the level where sampling begins (SPEC §11).

``denoise`` is the official ``t_start`` (0.8 in the notebook): the sampler walks ``int(steps * denoise)``
steps over ``linspace(t_start, 0, n + 1)``, so 20 steps at 0.8 run 16 steps on the same 0.05 grid as a full
20-step run (the notebook's ``timesteps = int(20 * 0.8)``).

Two ways to noise the latent before the first step:

- ``official``: what the notebook does, ``gdf.diffuse(latent, t=t_start)``, which uses the schedule with
  shift 1 (at t 0.8: logSNR -2.265, a 0.307), while the Stage C sampler then starts at t_start with shift 2
  (logSNR -3.652, a 0.159). The latent is under-noised for the step the model is told it is at, so more of
  the input survives than the sampler assumes. Reproduces the notebook's images.
- ``consistent``: noised with the sampler's own shift at t_start, so the first step sees exactly the noise
  level it is told (at 0.8 with shift 2: a 0.159). Keeps less of the input at the same denoise; equal to
  ``official`` when the sampler's shift is 1 (Stage B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cascade.errors import CascadeError
from .noise import prepare_noise
from .sampling import add_noise
from .schedule import logsnr

NOISING_MODES = ("official", "consistent")
OFFICIAL_NOISE_SHIFT = 1.0  # gdf.diffuse's default shift, used by the notebook's image-to-image cell


def steps_to_run(steps: int, denoise: float) -> int:
    """The number of sampler steps for a partial run: int(steps * denoise) (official int(20 * 0.8) = 16)."""
    return int(steps * denoise)


def noise_shift(noising: str, sampler_shift: float) -> float:
    """The schedule shift used to noise the start latent: 1 for ``official``, the sampler's for ``consistent``."""
    if noising == "official":
        return OFFICIAL_NOISE_SHIFT
    if noising == "consistent":
        return float(sampler_shift)
    raise CascadeError(f"image-to-image noising {noising!r} is unknown; expected one of {list(NOISING_MODES)} "
                       "- pick 'official' (the notebook's) or 'consistent'")


def start_logsnr(t_start: float, noising: str, sampler_shift: float) -> torch.Tensor:
    """logSNR the start latent is noised to (a float32 0-dim tensor)."""
    return logsnr(float(t_start), noise_shift(noising, sampler_shift))


def check_denoise(denoise: float, steps: int) -> None:
    """CascadeError unless 0 < denoise <= 1 and at least one step runs."""
    if not 0.0 < denoise <= 1.0 or steps_to_run(steps, denoise) < 1:
        raise CascadeError(
            f"image-to-image: denoise {denoise} with {steps} steps runs {max(0, steps_to_run(steps, denoise))} "
            f"steps; expected 0 < denoise <= 1 and steps x denoise >= 1 - raise denoise to at least "
            f"{1 / max(1, steps):.3g} or use more steps"
        )


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, t_start: float, noising: str = "official",
                 sampler_shift: float = 2.0) -> torch.Tensor:
    """``a * latent + b * noise`` at t_start with the shift ``noising`` selects (see the module docstring)."""
    if noise.shape != latent.shape:
        raise CascadeError(f"image-to-image: noise of shape {tuple(noise.shape)} for a latent of shape "
                           f"{tuple(latent.shape)} - draw the noise like the latent (samplers.noise.prepare_noise)")
    return add_noise(latent, noise, start_logsnr(t_start, noising, sampler_shift)).to(latent.dtype)


def prepare_start(latent: torch.Tensor, seed: int, denoise: float, noising: str = "official",
                  sampler_shift: float = 2.0, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """The sampler's initial x for image-to-image: ``latent`` noised to t_start = denoise with the seed's
    initial noise (drawn as ComfyUI draws it). denoise 1 still noises (at t 1, a is 0.01), as the notebook
    would with noise_level 1."""
    noise = prepare_noise(latent, seed, batch_index)
    return noise_latent(latent, noise, denoise, noising, sampler_shift)
