"""Inpainting paste-back: the generated region composited onto the original image with a grown, feathered mask.

Stable Cascade regenerates the whole image; outside the mask the result is close to the original but not
the same (Stage B, Stage A's 4x compression). Core's answer is the chain InvertMask -> GrowMask ->
ImageCompositeMasked; this node is that in one step, at the generated image's size (docs/CORE_INTEROP.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..cascade import control_filters as filters
from ..cascade import image_ops
from .common import category, mappings

log = logging.getLogger(__name__)

CATEGORY = category("controlnet")


class InpaintPasteBack:
    NODE_ID, TITLE = "SCW_InpaintPasteBack", "Inpaint Paste Back"
    DESCRIPTION = ("After inpainting or outpainting: keeps the generated image inside the mask and puts the "
                   "original back everywhere else, so untouched pixels stay exactly as they were. The mask is grown "
                   "and its edge feathered so the seam is invisible. Output at the generated image's size (the "
                   "original and the mask are resized to it).")
    RETURN_TYPES, RETURN_NAMES = ("IMAGE", "MASK"), ("image", "blend_mask")
    FUNCTION, CATEGORY = "paste", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        px = {"min": 0, "max": 256, "step": 1}
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The image before generation: LoadImage's (inpainting) or 'Stable "
                                              "Cascade Outpaint Padding's image (outpainting)."}),
            "generated": ("IMAGE", {"tooltip": "The decoded result ('Stable Cascade Stage A Decode')."}),
            "mask": ("MASK", {"tooltip": "The region that was generated (1), the original's size: the same mask "
                                         "'Stable Cascade ControlNet Inpaint Input' got."}),
            "grow": ("INT", {**px, "default": 8, "tooltip": "Pixels (of the output) the mask is grown by, so the "
                                                            "seam falls on generated pixels."}),
            "feather": ("INT", {**px, "default": 16, "tooltip": "Pixels over which the grown mask's edge fades "
                                                                "into the original; 0: a hard edge."}),
        }}

    def paste(self, original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, grow: int,
              feather: int) -> tuple[Any, Any]:
        base = image_ops.image_to_bchw(original, f"{self.NAME}: input 'original'")
        new = image_ops.image_to_bchw(generated, f"{self.NAME}: input 'generated'")
        m = filters.fit_mask(mask, base.shape[0], *base.shape[-2:], what=f"{self.NAME}: input 'mask'")
        if not bool(m.any()):
            log.warning("ComfyUI-StableCascade: %s: the mask is empty, so the output is the original (resized)",
                        self.NAME)
        out, blend = image_ops.paste_back(base, new.to(base.device), m.to(base.device), int(grow), int(feather))
        return image_ops.bchw_to_image(out), blend[:, 0]


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(InpaintPasteBack)
