"""Activation-memory estimates of the Stage C / Stage B U-Nets, given to the host as ``memory_required``.

Derived from layer widths (not measured): the host offloads other networks until this much is free.
"""

from __future__ import annotations

from typing import Any

import torch


def _elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _unet_activation_elements(c_hidden, nhead, tokens0: int, kv_tokens: int) -> int:
    """Peak live activation elements of one sample through a Stage B/C U-Net.

    Per level: the block input, its norm, the 4x-wide channel MLP and q/k/v (about 16 x tokens x width),
    plus attention scores (heads x tokens x (tokens + kv)) where the level attends; the skips of every
    level stay alive on the way up.
    """
    peak, skips = 0, 0
    for level, (c, heads) in enumerate(zip(c_hidden, nhead)):
        tokens = max(1, tokens0 // (4**level))
        level_peak = 16 * tokens * c + 3 * kv_tokens * c
        if heads:
            level_peak += heads * tokens * (tokens + kv_tokens)
        peak = max(peak, level_peak)
        skips += 2 * tokens * c
    return peak + skips


def estimate_stage_c_memory(config: Any, shape: tuple[int, ...], dtype: torch.dtype, guided: bool,
                            text_tokens: int = 77, image_tokens: int = 1) -> int:
    """Activation bytes of one Stage C call on a (B, 16, h, w) latent; ``guided`` doubles the batch (CFG).

    An upper-bound style estimate from layer widths (not a measurement), used as ``memory_required``.
    """
    bsz, _, h, w = (int(s) for s in shape)
    kv = text_tokens + config.c_clip_seq * (1 + image_tokens)
    tokens = (h // config.patch_size) * (w // config.patch_size)
    per_sample = _unet_activation_elements(config.c_hidden, config.nhead, tokens, kv) + kv * config.c_cond
    return per_sample * bsz * (2 if guided else 1) * _elt(dtype)


def estimate_stage_b_memory(config: Any, shape: tuple[int, ...], dtype: torch.dtype, guided: bool) -> int:
    """Activation bytes of one Stage B call on a (B, 4, h, w) latent; ``guided`` doubles the batch (CFG)."""
    bsz, _, h, w = (int(s) for s in shape)
    tokens = (h // config.patch_size) * (w // config.patch_size)
    per_sample = _unet_activation_elements(config.c_hidden, config.nhead, tokens, config.c_clip_seq)
    return per_sample * bsz * (2 if guided else 1) * _elt(dtype)
