"""Decode nodes: Stage B latent -> image with Stage A, Stage C latent -> preview image with the Previewer."""

from __future__ import annotations

from typing import Any

import torch

from ..pipeline import images
from .common import category, mappings, require
from .kinds import FIX

CATEGORY = category("decode")


class StageADecode:
    NODE_ID, TITLE = "SCW_StageADecode", "Stage A Decode"
    DESCRIPTION = ("Decodes a Stage B latent into the final image with Stage A (4x upscale, clamped to [0, 1]). "
                   "Large images are decoded in overlapping tiles when they would not fit in free memory.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_a": ("SCW_STAGE_A", {"tooltip": "The Stage A model ('Stable Cascade Load Stage A')."}),
            "latent": ("LATENT", {"tooltip": "The Stage B result (output of 'Stable Cascade Stage B Sampler')."}),
        }}

    def decode(self, stage_a: Any, latent: dict) -> tuple[torch.Tensor]:
        model = require(stage_a, "stage_a", self.NODE_ID, "a Stage A model", FIX["stage_a"])
        return (images.to_image(images.decode_stage_a(model, latent)),)


class PreviewerDecode:
    NODE_ID, TITLE = "SCW_PreviewerDecode", "Previewer Decode"
    DESCRIPTION = ("A quick low-resolution look at a Stage C latent (8x its size, e.g. 192x192 for 1024x1024) with "
                   "the Previewer, without running Stage B and Stage A.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "previewer": ("SCW_PREVIEWER", {"tooltip": "The Previewer ('Stable Cascade Load Previewer')."}),
            "latent": ("LATENT", {"tooltip": "A Stage C latent (output of 'Stable Cascade Stage C Sampler')."}),
        }}

    def decode(self, previewer: Any, latent: dict) -> tuple[torch.Tensor]:
        model = require(previewer, "previewer", self.NODE_ID, "a Previewer", FIX["previewer"])
        return (images.to_image(images.decode_previewer(model, latent)),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(StageADecode, PreviewerDecode)
