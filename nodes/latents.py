"""Latent nodes: the empty Stage C / Stage B latent pair."""

from __future__ import annotations

import logging
import math

import torch

from .common import category, mappings, stage_latent

log = logging.getLogger(__name__)

CATEGORY = category("latent")
PIXEL_MULTIPLE = 8  # Stage B's latent (H/4) must be even for its PixelUnshuffle(2)
MAX_RESOLUTION = 16384
DEFAULT_COMPRESSION = 42.67


def snap_size(value: int, name: str) -> int:
    """value rounded to the nearest multiple of 8 (at least 8), logging when it changes."""
    snapped = max(PIXEL_MULTIPLE, int(math.floor(value / PIXEL_MULTIPLE + 0.5)) * PIXEL_MULTIPLE)
    if snapped != value:
        log.warning("ComfyUI-StableCascade: %s %d is not a multiple of %d; using %d (Stage B needs an even latent).",
                    name, value, PIXEL_MULTIPLE, snapped)
    return snapped


def latent_sizes(width: int, height: int, compression: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h_c, w_c), (h_b, w_b)) for an image of width x height, as the official calculate_latent_sizes:
    Stage C ceil(side / compression), Stage B ceil(side / 4)."""
    stage_c = (math.ceil(height / compression), math.ceil(width / compression))
    stage_b = (math.ceil(height / 4), math.ceil(width / 4))
    return stage_c, stage_b


class EmptyLatent:
    NODE_ID, TITLE = "SCW_EmptyLatent", "Empty Cascade Latent"
    DESCRIPTION = ("Empty latents for an image of width x height: stage_c (B x 16 x ceil(H/c) x ceil(W/c)) for the "
                   "Stage C sampler and stage_b (B x 4 x H/4 x W/4) for the Stage B sampler. Sizes need not be powers "
                   "of two; a width or height that is not a multiple of 8 is rounded to the nearest one (logged).")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 256, "max": MAX_RESOLUTION, "step": PIXEL_MULTIPLE,
                              "tooltip": "Output image width in pixels (multiple of 8)."}),
            "height": ("INT", {"default": 1024, "min": 256, "max": MAX_RESOLUTION, "step": PIXEL_MULTIPLE,
                               "tooltip": "Output image height in pixels (multiple of 8)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1,
                                   "tooltip": "Number of images generated together."}),
            "compression": ("FLOAT", {"default": DEFAULT_COMPRESSION, "min": 16.0, "max": 64.0, "step": 0.01,
                                      "tooltip": "Pixels per Stage C latent cell. 42.67 is the official value "
                                                 "(1024 px -> 24); 28-32 gives Stage C more room for detail, "
                                                 "Stage B was trained on 32-64."}),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1,
                 compression: float = DEFAULT_COMPRESSION) -> tuple[dict, dict]:
        width, height = snap_size(width, "width"), snap_size(height, "height")
        (h_c, w_c), (h_b, w_b) = latent_sizes(width, height, compression)
        stage_c = torch.zeros(batch_size, 16, h_c, w_c)
        stage_b = torch.zeros(batch_size, 4, h_b, w_b)
        return stage_latent(stage_c, "c"), stage_latent(stage_b, "b")


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EmptyLatent)
