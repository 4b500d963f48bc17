"""Latent nodes: the empty Stage C / Stage B latent pair."""

from __future__ import annotations

from ..pipeline.latents import DEFAULT_COMPRESSION, EMPTY_LATENT_RANGES, PIXEL_MULTIPLE, empty_latents
from .common import category, mappings

CATEGORY = category("latent")


class EmptyLatent:
    NODE_ID, TITLE = "SCW_EmptyLatent", "Empty Latent"
    DESCRIPTION = ("Empty latents for an image of width x height: stage_c (B x 16 x H/c x W/c, rounded as the compression says) "
                   "for the Stage C sampler and stage_b (B x 4 x H/4 x W/4) for the Stage B sampler. Sizes need not be powers "
                   "of two; a width or height that is not a multiple of 8 is rounded to the nearest one (logged).")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        # The ranges are pipeline.latents.EMPTY_LATENT_RANGES, which empty_latents() enforces.
        r = {name: {"min": low, "max": high} for name, (low, high) in EMPTY_LATENT_RANGES.items()}
        return {"required": {
            "width": ("INT", {"default": 1024, **r["width"], "step": PIXEL_MULTIPLE,
                              "tooltip": "Output image width in pixels (multiple of 8)."}),
            "height": ("INT", {"default": 1024, **r["height"], "step": PIXEL_MULTIPLE,
                               "tooltip": "Output image height in pixels (multiple of 8)."}),
            "batch_size": ("INT", {"default": 1, **r["batch_size"], "step": 1,
                                   "tooltip": "Number of images generated together."}),
            "compression": ("FLOAT", {"default": DEFAULT_COMPRESSION, **r["compression"], "step": 0.01,
                                      "tooltip": "Pixels per Stage C latent cell. A whole number rounds down as "
                                                 "core's StableCascade_EmptyLatentImage (42: 1024 px -> 24, 768 -> "
                                                 "18); a fraction rounds up as the official code (42.67: 1024 -> "
                                                 "24). 28-32 gives Stage C more room for detail; Stage B was "
                                                 "trained on 32-64."}),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1,
                 compression: float = DEFAULT_COMPRESSION) -> tuple[dict, dict]:
        return empty_latents(width, height, batch_size, compression)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EmptyLatent)
