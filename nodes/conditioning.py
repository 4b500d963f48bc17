"""Conditioning nodes: prompt -> CONDITIONING in ComfyUI core's format.

The output is ``[[clip_text (B x 77 x 1280), {"pooled_output": B x 1280}]]``, exactly what core's CLIPTextEncode
gives with a stable_cascade CLIP, so core's conditioning nodes (Combine, Concat, SetArea...) accept it and the
pack's samplers accept core's. How the samplers read a list of several entries is in docs/NODES.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import host
from .common import category, mappings, require

log = logging.getLogger(__name__)

CATEGORY = category("conditioning")


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


def encode_prompt(text_encoder: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_text 1 x 77 x C, pooled 1 x C) of one prompt, computed on the host's device, returned on its
    intermediate device (the CPU outside ComfyUI) as ComfyUI keeps conditioning."""
    host.load([text_encoder])
    clip_text, pooled = host.module_of(text_encoder).encode([text])
    out = host.intermediate_device()
    return clip_text.to(out), pooled.to(out)


class TextEncode:
    NODE_ID, TITLE = "SCW_TextEncode", "Cascade Text Encode"
    DESCRIPTION = ("Encodes a prompt with the CLIP ViT-bigG text encoder into CONDITIONING for both the Stage C and "
                   "the Stage B sampler (Stage B reads only the pooled vector). Use an empty prompt for the "
                   "negative, as the official pipeline does. Compatible with core's conditioning nodes.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": ("SCW_TEXT_ENCODER", {"tooltip": "From SCW_TextEncoderLoader or the text_encoder output "
                                                             "of SCW_PackagedCheckpointLoader (Stage C file)."}),
            "text": ("STRING", {"default": "", "multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. CLIP reads the first 77 tokens; longer prompts are cut "
                                           "(logged)."}),
        }}

    def encode(self, text_encoder: Any, text: str) -> tuple[list]:
        encoder = require(text_encoder, "text_encoder", self.NODE_ID, "a text encoder",
                          "connect SCW_TextEncoderLoader, or the text_encoder output of SCW_PackagedCheckpointLoader "
                          "loaded with stable_cascade_stage_c.safetensors")
        clip_text, pooled = encode_prompt(encoder, text)
        return ([[clip_text, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(TextEncode)
