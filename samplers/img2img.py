"""Image-to-image start point: an encoded latent noised to the level where sampling begins (SPEC §11).

``denoise`` is the official ``t_start`` (0.8 in the notebook). The notebook then runs ``int(20 * 0.8)``
= 16 steps over ``linspace(0.8, 0, 17)``, the same 0.05 grid as a full 20-step run. The SCW samplers run
all their ``steps`` from t_start, so the notebook's run is steps 16, denoise 0.8 (``steps_to_run(20, 0.8)``).

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
    """The steps the notebook runs when it starts at denoise: int(steps * denoise) (int(20 * 0.8) = 16)."""
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
