"""Stand-ins for ComfyUI core's mask and latent-batch nodes (headless runner only, never imported inside ComfyUI):
InvertMask, GrowMask, SolidMask, MaskComposite, ThresholdMask, MaskToImage, ImageToMask, LatentBatch and
RepeatLatentBatch.

Same node ids, inputs, widget order, ranges and outputs as core's, and the same values (compared with core's nodes
in tests/standalone/test_core_nodes_comfyui.py). MASK is B x H x W (an H x W mask is one of a batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cascade.errors import ShapeError
from .standins_image import MAX_RESOLUTION, upscale


def _masks(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


class InvertMask:
    """Stand-in for core's InvertMask: 1 - mask."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK",)}}

    def invert(self, mask: torch.Tensor) -> tuple:
        return (1.0 - mask,)


# Neighbours of one grow/shrink step: the 4-neighbourhood ("tapered corners") or the full 3 x 3 square.
_CROSS = ((0, 1), (1, 0), (1, 1), (1, 2), (2, 1))
_SQUARE = tuple((dy, dx) for dy in range(3) for dx in range(3))


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """Each step is a grey dilation (expand > 0) or erosion (< 0) over the cross or the 3 x 3 square, as core's
    GrowMask (scipy.ndimage with its default 'reflect' border: for a 3 x 3 window the outside repeats the edge)."""
    out = _masks(mask)
    offsets = _CROSS if tapered_corners else _SQUARE
    pick = torch.amax if expand > 0 else torch.amin
    height, width = out.shape[-2:]
    for _ in range(abs(expand)):
        padded = F.pad(out[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        out = pick(torch.stack([padded[:, dy:dy + height, dx:dx + width] for dy, dx in offsets]), dim=0)
    return out


class GrowMask:
    """Stand-in for core's GrowMask: grow (expand > 0) or shrink (< 0) the mask by ``expand`` pixels."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK",),
                             "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION,
                                                "step": 1}),
                             "tapered_corners": ("BOOLEAN", {"default": True})}}

    def expand_mask(self, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple:
        return (grow(mask, expand, tapered_corners),)


class SolidMask:
    """Stand-in for core's SolidMask: one 1 x height x width mask of ``value``."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "width": ("INT", size), "height": ("INT", dict(size))}}

    def solid(self, value: float, width: int, height: int) -> tuple:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


_MASK_OPS = {
    "multiply": torch.mul, "add": torch.add, "subtract": torch.sub,
    "and": lambda a, b: (a.round().bool() & b.round().bool()).float(),
    "or": lambda a, b: (a.round().bool() | b.round().bool()).float(),
    "xor": lambda a, b: (a.round().bool() ^ b.round().bool()).float(),
}


class MaskComposite:
    """Stand-in for core's MaskComposite: ``source`` combined into the destination at (x, y), clamped to 0..1."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        pos = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"destination": ("MASK",), "source": ("MASK",), "x": ("INT", pos),
                             "y": ("INT", dict(pos)), "operation": (list(_MASK_OPS),)}}

    def combine(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str) -> tuple:
        out = _masks(destination).clone()
        source = _masks(source)
        bottom, right = min(y + source.shape[-2], out.shape[-2]), min(x + source.shape[-1], out.shape[-1])
        part = source[:, :bottom - y, :right - x]
        out[:, y:bottom, x:right] = _MASK_OPS[operation](out[:, y:bottom, x:right], part)
        return (out.clamp(0.0, 1.0),)


class ThresholdMask:
    """Stand-in for core's ThresholdMask: 1 where the mask is above ``value``, else 0."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK",),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def image_to_mask(self, mask: torch.Tensor, value: float) -> tuple:
        return ((mask > value).float(),)


class MaskToImage:
    """Stand-in for core's MaskToImage: the mask as a grey 3-channel IMAGE."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK",)}}

    def mask_to_image(self, mask: torch.Tensor) -> tuple:
        return (_masks(mask)[..., None].expand(-1, -1, -1, 3),)


class ImageToMask:
    """Stand-in for core's ImageToMask: one channel of the image as a MASK."""

    CHANNELS = ["red", "green", "blue", "alpha"]
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "channel": (cls.CHANNELS,)}}

    def image_to_mask(self, image: torch.Tensor, channel: str) -> tuple:
        index = self.CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ShapeError(f"ImageToMask: channel {channel!r} of an image with {image.shape[-1]} channels; pick "
                             f"one of {self.CHANNELS[:image.shape[-1]]}")
        return (image[..., index],)


class LatentBatch:
    """Stand-in for core's LatentBatch: samples2 after samples1 (resized bilinearly, centre-cropped, to samples1's
    size when they differ), with the batch indices of both."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "batch"
    CATEGORY = "latent/batch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    def batch(self, samples1: dict, samples2: dict) -> tuple:
        s1, s2 = samples1["samples"], samples2["samples"]
        if s2.shape[1:] != s1.shape[1:]:
            if s2.shape[1] != s1.shape[1] or s2.ndim != 4:
                raise ShapeError(f"LatentBatch: latents of shapes {tuple(s1.shape)} and {tuple(s2.shape)} cannot be "
                                 "batched; give latents of the same stage and channels")
            s2 = upscale(s2, s1.shape[-1], s1.shape[-2], "bilinear", "center")
        out = dict(samples1)
        out["samples"] = torch.cat((s1, s2), dim=0)
        out["batch_index"] = (samples1.get("batch_index", list(range(s1.shape[0])))
                              + samples2.get("batch_index", list(range(s2.shape[0]))))
        return (out,)


class RepeatLatentBatch:
    """Stand-in for core's RepeatLatentBatch: the batch repeated ``amount`` times (noise masks and batch indices
    too)."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "repeat"
    CATEGORY = "latent/batch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "amount": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def repeat(self, samples: dict, amount: int) -> tuple:
        out = dict(samples)
        latent = samples["samples"]
        out["samples"] = latent.repeat(amount, *([1] * (latent.ndim - 1)))
        masks = samples.get("noise_mask")
        if masks is not None and masks.shape[0] > 1:
            out["noise_mask"] = masks.repeat(amount, *([1] * (masks.ndim - 1)))
        if "batch_index" in out:
            index = out["batch_index"]
            offset = max(index) - min(index) + 1
            out["batch_index"] = index + [i + step * offset for step in range(1, amount) for i in index]
        return (out,)


STANDINS = {cls.__name__: cls for cls in (InvertMask, GrowMask, SolidMask, MaskComposite, ThresholdMask, MaskToImage,
                                          ImageToMask, LatentBatch, RepeatLatentBatch)}
