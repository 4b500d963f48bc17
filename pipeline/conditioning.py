"""CONDITIONING in ComfyUI core's format: encoding prompts, reading entries, image embeddings.

``[[clip_text (B, T, C), {"pooled_output": (B, C), ...}]]``. Extra keys the pack reads: ``"scw_clip_img"``
(B, N, 768 CLIP ViT-L image embeds for Stage C) and core's ``"unclip_conditioning"``; for Stage B, core's
``"stable_cascade_prior"`` when no Stage C latent is connected.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .. import host
from ..cascade.errors import CascadeError, ShapeError
from .latents import finite_output

log = logging.getLogger(__name__)

CLIP_IMG_KEY = "scw_clip_img"


def encode_prompt(text_encoder: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_text 1 x 77 x C, pooled 1 x C) of one prompt, computed on the host's device, returned on its
    intermediate device (the CPU outside ComfyUI) as ComfyUI keeps conditioning."""
    with host.using([text_encoder]):
        module = host.module_of(text_encoder)
        clip_text, pooled = module.encode([text])
    if not (torch.isfinite(clip_text).all() and torch.isfinite(pooled).all()):
        weight = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
        dtype = weight.dtype if weight is not None else None
        finite_output(clip_text, f"the text encoder's token embeddings of {text[:40]!r}", dtype)
        finite_output(pooled, f"the text encoder's pooled embedding of {text[:40]!r}", dtype)
    out = host.intermediate_device()
    return clip_text.to(out), pooled.to(out)


def text_conditioning(text_encoder: Any, text: str) -> list:
    """The CONDITIONING of one prompt, as core's CLIPTextEncode makes it with a stable_cascade CLIP."""
    clip_text, pooled = encode_prompt(text_encoder, text)
    return [[clip_text, {"pooled_output": pooled}]]


def merge_entries(conditioning: Any) -> Any:
    """A CONDITIONING with several entries (core's ConditioningCombine) as the one entry the samplers read:
    token sequences concatenated in order, as core's ConditioningConcat does, and pooled_output averaged
    (Stage B reads only that). Other keys come from the first entry. One entry passes through unchanged."""
    if not isinstance(conditioning, list) or len(conditioning) < 2:
        return conditioning
    conds = [entry[0] for entry in conditioning]
    batch = max(c.shape[0] for c in conds)
    cond = torch.cat([c.expand(batch, -1, -1) if c.shape[0] == 1 else c for c in conds], dim=1)
    extras = dict(conditioning[0][1])
    pooled = [entry[1].get("pooled_output") for entry in conditioning]
    if all(isinstance(p, torch.Tensor) for p in pooled):
        extras["pooled_output"] = torch.stack([p.expand(batch, -1) if p.shape[0] == 1 else p for p in pooled]).mean(0)
    log.info("ComfyUI-StableCascade: merged %d conditioning entries (tokens concatenated, pooled averaged)",
             len(conditioning))
    return [[cond, extras]]


def entry(conditioning: Any, what: str) -> tuple[torch.Tensor, dict]:
    """The one [cond, extras] entry of a CONDITIONING list."""
    if (not isinstance(conditioning, (list, tuple)) or not conditioning
            or not isinstance(conditioning[0], (list, tuple)) or len(conditioning[0]) < 2):
        raise CascadeError(f"{what}: expected CONDITIONING [[cond, {{'pooled_output': ...}}]], got "
                           f"{type(conditioning).__name__} - connect 'Stable Cascade Text Encode' or core's "
                           "CLIPTextEncode")
    if len(conditioning) > 1:
        raise CascadeError(f"{what}: CONDITIONING has {len(conditioning)} entries; the SCW samplers read one - "
                           "merge them with ConditioningConcat or ConditioningAverage first")
    cond, extras = conditioning[0][0], conditioning[0][1]
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or not isinstance(extras, dict):
        raise CascadeError(f"{what}: the conditioning tensor must be (B, tokens, width), got "
                           f"{getattr(cond, 'shape', type(cond).__name__)}")
    return cond, extras


def pooled_of(extras: dict, cond: torch.Tensor, what: str) -> torch.Tensor:
    """The entry's pooled text vector as (B, 1, C)."""
    pooled = extras.get("pooled_output")
    if not isinstance(pooled, torch.Tensor):
        raise CascadeError(f"{what}: CONDITIONING has no 'pooled_output' - encode the prompt with 'Stable Cascade "
                           "Text Encode' "
                           "or core's CLIPTextEncode with a stable_cascade CLIP (which give pooled outputs)")
    pooled = pooled.unsqueeze(1) if pooled.ndim == 2 else pooled
    if pooled.ndim != 3 or pooled.shape[0] != cond.shape[0]:
        raise ShapeError(f"{what}: pooled_output has shape {tuple(pooled.shape)}; expected ({cond.shape[0]}, "
                         f"{pooled.shape[-1]}) to match the conditioning {tuple(cond.shape)}")
    return pooled


def has_image(extras: dict) -> bool:
    return extras.get(CLIP_IMG_KEY) is not None or bool(extras.get("unclip_conditioning"))


def clip_image_embeds(extras: dict, batch: int, width: int) -> torch.Tensor:
    """Stage C's image embedding (B, N, 768): the pack's ``"scw_clip_img"`` entry, else core's
    ``"unclip_conditioning"`` (image_embeds x strength per entry, concatenated as tokens), else zeros."""
    value = extras.get(CLIP_IMG_KEY)
    if value is None and extras.get("unclip_conditioning"):
        value = torch.cat([u["clip_vision_output"].image_embeds.unsqueeze(1) * float(u.get("strength", 1.0))
                           for u in extras["unclip_conditioning"]], dim=1)
    if value is None:
        return torch.zeros(batch, 1, width)
    value = value.unsqueeze(1) if value.ndim == 2 else value
    if value.ndim != 3 or value.shape[-1] != width:
        raise ShapeError(f"Stage C image embedding has shape {tuple(value.shape)}; expected (B, N, {width}) from "
                         "CLIP ViT-L/14 ('Stable Cascade CLIP Vision Encode (image variation)')")
    return value


def attach_image_embeds(conditioning: list, embeds: torch.Tensor, strength: float) -> list:
    """A copy of ``conditioning`` whose entries carry ``embeds`` (N, 768) x strength as N more image tokens
    (``"scw_clip_img"``, (B, N_total, 768)); the input conditioning is not changed."""
    if not isinstance(conditioning, list) or not conditioning:
        raise CascadeError("'Stable Cascade CLIP Vision Encode (image variation)': input 'conditioning' expects "
                           "CONDITIONING, got "
                           f"{type(conditioning).__name__} - connect 'Stable Cascade Text Encode' (an empty prompt is "
                           "fine)")
    tokens = (embeds * strength).unsqueeze(0)
    out = []
    for cond, extras in conditioning:
        extras = dict(extras)
        previous = extras.get(CLIP_IMG_KEY)
        if previous is not None:
            previous = previous.unsqueeze(1) if previous.ndim == 2 else previous
            tokens_b = tokens.to(previous).expand(previous.shape[0], -1, -1)
            extras[CLIP_IMG_KEY] = torch.cat([previous, tokens_b], dim=1)
        else:
            extras[CLIP_IMG_KEY] = tokens
        out.append([cond, extras])
    return out


def to_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ShapeError(f"{what} has batch {t.shape[0]} but the latent has batch {batch}; give one conditioning for "
                     "all images (batch 1) or one per image")


def match_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat token sequences to a common length (as core does for prompts of different lengths)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)


def check_width(t: torch.Tensor, want: int, what: str) -> None:
    if t.shape[-1] != want:
        raise ShapeError(f"{what} has width {t.shape[-1]} but the network expects {want} - use the text encoder "
                         "that belongs to this model (CLIP ViT-bigG, 1280 wide)")
