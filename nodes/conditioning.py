"""Conditioning nodes: prompt -> CONDITIONING in ComfyUI core's format (``pipeline.conditioning``).

The output is ``[[clip_text (B x 77 x 1280), {"pooled_output": B x 1280}]]``, exactly what core's CLIPTextEncode
gives with a stable_cascade CLIP, so core's conditioning nodes (Combine, Concat, SetArea...) accept it and the
pack's samplers accept core's. How the samplers read a list of several entries is in docs/NODES.md.
"""

from __future__ import annotations

from typing import Any

from ..pipeline.conditioning import text_conditioning
from .common import category, mappings, require
from .kinds import FIX

CATEGORY = category("conditioning")


class TextEncode:
    NODE_ID, TITLE = "SCW_TextEncode", "Text Encode"
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
            "text_encoder": ("SCW_TEXT_ENCODER", {"tooltip": "From 'Stable Cascade Load Text Encoder' or the "
                                                             "text_encoder output "
                                                             "of 'Stable Cascade Load Packaged Checkpoint' (Stage C "
                                                             "file)."}),
            "text": ("STRING", {"default": "", "multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. CLIP reads the first 77 tokens; longer prompts are cut "
                                           "(logged)."}),
        }}

    def encode(self, text_encoder: Any, text: str) -> tuple[list]:
        encoder = require(text_encoder, "text_encoder", self.NODE_ID, "a text encoder", FIX["text_encoder"])
        return (text_conditioning(encoder, text),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(TextEncode)
