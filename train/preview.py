"""Preview images during training: a short guided sample of the first caption with the weights as trained so far,
decoded by the Previewer (what the official trainer's periodic samples show, in fewer steps)."""

from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..samplers import schedule
from ..samplers.guidance import CFGDenoiser
from ..samplers.noise import make_noise_sampler
from ..samplers.sampling import sample_ddpm
from .cache import TrainingCache

PREVIEW_CFG, PREVIEW_SHIFT = 4.0, 2.0  # the official Stage C settings (SPEC §10.5)


def _text(module: Any, cache: TrainingCache, text_encoder: Any, caption: str, index: int | None):
    if module.tokens is not None:
        clip_text, pooled = module.tokens.encode([caption])
        return clip_text, pooled.reshape(1, 1, -1)
    if cache.has_text:
        if index is None:
            return cache.empty_text[0][None], cache.empty_text[1][None]
        s = cache.samples[index]
        return s.clip_text[None], s.clip_pooled[None]
    clip_text, pooled = host.module_of(text_encoder).encode([caption])
    return clip_text, pooled.reshape(1, 1, -1)


@torch.no_grad()
def preview_image(module: Any, cache: TrainingCache, previewer: Any, settings: Any, text_encoder: Any) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: ``settings.preview_steps`` DDPM steps, cfg 4, shift 2, seed ``settings.seed``."""
    first = cache.samples[0]
    device = module.device
    cond_text, cond_pooled = _text(module, cache, text_encoder, first.caption, 0)
    unc_text, unc_pooled = _text(module, cache, text_encoder, "", None)
    width = first.clip_image.shape[-1] if first.clip_image is not None else 768
    zeros = torch.zeros(1, 1, width, device=device)
    cond = {"clip_text": cond_text.to(device), "clip_text_pooled": cond_pooled.to(device), "clip_img": zeros}
    uncond = {"clip_text": unc_text.to(device), "clip_text_pooled": unc_pooled.to(device), "clip_img": zeros}

    def network_fn(x, r, clip_text, clip_text_pooled, clip_img):
        return module.predict(x, r, clip_text, clip_text_pooled, clip_img).float()

    gen = torch.Generator().manual_seed(int(settings.seed))
    x = torch.randn((1,) + tuple(first.latent.shape), generator=gen).to(device)
    logsnrs = schedule.logsnr_schedule(int(settings.preview_steps), PREVIEW_SHIFT).to(device)
    model = CFGDenoiser(network_fn, cond, uncond, cfg=PREVIEW_CFG)
    _, x0 = sample_ddpm(model, x, logsnrs, disable=True, noise_sampler=make_noise_sampler(x, int(settings.seed)))
    net = host.module_of(previewer)
    weight = next(net.parameters())
    image = net(x0.to(weight.device, weight.dtype)).float()
    return image.clamp(0, 1).nan_to_num(0.0).cpu()
