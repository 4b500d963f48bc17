"""Seeded noise that does not depend on the device: initial noise as ComfyUI draws it, and per-step noise.

Both come from private CPU generators. A fresh ``torch.Generator("cpu").manual_seed(seed)`` yields the same
numbers as ComfyUI's ``torch.manual_seed(seed)`` without touching the global RNG state.
"""

from collections.abc import Callable, Sequence

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Per-step noise must not repeat the initial noise (same seed, same stream, same shape on the first step),
# so its generator is seeded with the seed mixed with a fixed odd 64-bit constant.
_STEP_NOISE_SALT = 0x9E3779B97F4A7C15
_SEED_MASK = 0xFFFFFFFFFFFFFFFF


def _cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with seed (taken modulo 2**64, the range ComfyUI's seed widget allows)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) & _SEED_MASK)


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise for latent, drawn like ComfyUI's comfy.sample.prepare_noise (CPU, float32, then latent dtype).

    With batch_index (the LATENT's "batch_index", e.g. from LatentFromBatch), sample k gets the noise that
    entry batch_index[k] of a full batch would get: one draw of shape (1, ...) per index 0..max, in order.
    """
    draw = {"dtype": torch.float32, "layout": latent.layout, "generator": _cpu_generator(seed), "device": "cpu"}
    if batch_index is None:
        return torch.randn(latent.size(), **draw).to(dtype=latent.dtype)
    wanted = set(int(i) for i in batch_index)
    single = [1, *latent.shape[1:]]
    draws = {}
    for index in range(max(wanted) + 1):
        noise = torch.randn(single, **draw)
        if index in wanted:
            draws[index] = noise
    return torch.cat([draws[int(i)] for i in batch_index], dim=0).to(dtype=latent.dtype)


def make_noise_sampler(x: torch.Tensor, seed: int) -> NoiseSampler:
    """Per-step noise shaped like x from a seeded CPU generator, moved to x's device and dtype."""
    generator = _cpu_generator(int(seed) ^ _STEP_NOISE_SALT)
    shape, device, dtype = x.shape, x.device, x.dtype

    def noise_sampler(logsnr: torch.Tensor, logsnr_next: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
        return noise.to(device=device, dtype=dtype)

    return noise_sampler
