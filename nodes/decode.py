"""Decode nodes: Stage B latent -> image with Stage A, Stage C latent -> preview image with the Previewer."""

from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..cascade import tiling
from .common import category, images_from_bchw, latent_samples, mappings, require

CATEGORY = category("decode")


def decode_stage_a(stage_a: Any, z: torch.Tensor) -> torch.Tensor:
    """Stage B latent (SC_B storage convention) -> B x 3 x H x W. The host is asked to make room for a whole
    decode (offloading other networks); if that still does not fit, the decode runs in tiles."""
    module = host.module_of(stage_a)
    host.load([stage_a], tiling.estimate_decode_memory(module.config, tuple(z.shape), module.dtype))
    weight = next(module.parameters())
    return tiling.decode_auto(module, z.to(weight.device, weight.dtype), host.free_memory(weight.device), raw=True)


def decode_previewer(previewer: Any, z: torch.Tensor) -> torch.Tensor:
    host.load([previewer])
    module = host.module_of(previewer)
    weight = next(module.parameters())
    with torch.no_grad():
        return module(z.to(weight.device, weight.dtype))


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
            "stage_a": ("SCW_STAGE_A", {"tooltip": "The Stage A model (SCW_StageALoader)."}),
            "latent": ("LATENT", {"tooltip": "The Stage B result (output of SCW_StageBSampler)."}),
        }}

    def decode(self, stage_a: Any, latent: dict) -> tuple[torch.Tensor]:
        model = require(stage_a, "stage_a", self.NODE_ID, "a Stage A model",
                        "connect SCW_StageALoader (or the stage_a output of SCW_PackagedCheckpointLoader with the "
                        "Stage B file)")
        z = latent_samples(latent, "b", "latent", self.NODE_ID)
        return (images_from_bchw(decode_stage_a(model, z)),)


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
            "previewer": ("SCW_PREVIEWER", {"tooltip": "The Previewer (SCW_PreviewerLoader)."}),
            "latent": ("LATENT", {"tooltip": "A Stage C latent (output of SCW_StageCSampler)."}),
        }}

    def decode(self, previewer: Any, latent: dict) -> tuple[torch.Tensor]:
        model = require(previewer, "previewer", self.NODE_ID, "a Previewer",
                        "connect SCW_PreviewerLoader (or the previewer output of SCW_PackagedCheckpointLoader with "
                        "the Stage C file)")
        z = latent_samples(latent, "c", "latent", self.NODE_ID)
        return (images_from_bchw(decode_previewer(model, z)),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(StageADecode, PreviewerDecode)
