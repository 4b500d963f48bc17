"""Stand-ins for ComfyUI core's image nodes used around Stable Cascade (headless runner only, never imported inside
ComfyUI): ImageScale, ImageScaleBy, ImageInvert, EmptyImage, ImageCompositeMasked and Canny.

Each has core's node id, inputs, widget order, ranges and outputs, and computes what core computes, in plain torch
(tests/standalone/test_core_nodes_comfyui.py compares each with core's own node on the same inputs). IMAGE is
B x H x W x C in [0, 1]; MASK is B x H x W (or H x W).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..cascade import control_filters
from ..cascade.errors import CascadeError, ShapeError

MAX_RESOLUTION = 16384  # core's nodes.MAX_RESOLUTION, the limit of every size widget
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def _image(image: torch.Tensor, node: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ShapeError(f"{node}: the image is {shape}; expected an IMAGE batch B x H x W x C")
    return image


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    # As core: through 8-bit PIL images (values truncated to uint8, not rounded) and PIL's Lanczos filter.
    out = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """B x C x H x W resized to height x width the way core's ``common_upscale`` does: an optional centre crop to
    the target's aspect ratio first, then torch's interpolation (align_corners off) or Lanczos through PIL."""
    if crop == "center":
        old_h, old_w = samples.shape[-2:]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples[..., y:old_h - y, x:old_w - x]
    if method == "lanczos":
        return _lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


class ImageScale:
    """Stand-in for core's ImageScale (a width or height of 0 keeps the aspect ratio; both 0: unchanged)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,), "width": ("INT", size),
                             "height": ("INT", dict(size)), "crop": (CROP_METHODS,)}}

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str) -> tuple:
        samples = _image(image, "ImageScale").movedim(-1, 1)
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(samples.shape[3] * height / samples.shape[2]))
        elif height == 0:
            height = max(1, round(samples.shape[2] * width / samples.shape[3]))
        return (upscale(samples, width, height, upscale_method, crop).movedim(1, -1),)


class ImageScaleBy:
    """Stand-in for core's ImageScaleBy (sizes rounded to the nearest pixel, no crop)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
                             "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

    def upscale(self, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple:
        samples = _image(image, "ImageScaleBy").movedim(-1, 1)
        width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
        return (upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1),)


class ImageInvert:
    """Stand-in for core's ImageInvert: 1 - image."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image: torch.Tensor) -> tuple:
        return (1.0 - image,)


class EmptyImage:
    """Stand-in for core's EmptyImage: a batch of one colour (0xRRGGBB)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"width": ("INT", size), "height": ("INT", dict(size)),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                             "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1,
                                               "display": "color"})}}

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0) -> tuple:
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        return (torch.tensor(rgb, dtype=torch.float32).expand(batch_size, height, width, 3).contiguous(),)


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              resize_source: bool) -> torch.Tensor:
    """``source`` pasted into a copy of ``destination`` (both B x C x H x W) at pixel (x, y), blended by ``mask``
    (1 = source) resized bilinearly to the source; batches are repeated (or cut) to the destination's, as core's
    ImageCompositeMasked does. Whatever falls outside the destination is dropped."""
    out = destination.clone()
    source = source.to(out.device)
    if resize_source:
        source = F.interpolate(source, size=out.shape[-2:], mode="bilinear")
    source = _to_batch(source, out.shape[0])
    x = max(-source.shape[-1], min(x, out.shape[-1]))
    y = max(-source.shape[-2], min(y, out.shape[-2]))
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = mask.to(out.device).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        mask = _to_batch(F.interpolate(mask, size=source.shape[-2:], mode="bilinear"), source.shape[0])
    visible_w, visible_h = out.shape[-1] - x + min(0, x), out.shape[-2] - y + min(0, y)
    mask = mask[:, :, :visible_h, :visible_w]
    region = out[..., y:y + source.shape[-2], x:x + source.shape[-1]]
    out[..., y:y + source.shape[-2], x:x + source.shape[-1]] = \
        mask * source[..., :visible_h, :visible_w] + (1 - mask) * region
    return out


def _to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeated (or cut) along dim 0 to ``batch`` entries."""
    if tensor.shape[0] < batch:
        tensor = tensor.repeat(math.ceil(batch / tensor.shape[0]), *([1] * (tensor.ndim - 1)))
    return tensor[:batch]


class ImageCompositeMasked:
    """Stand-in for core's ImageCompositeMasked: the source pasted onto the destination at (x, y) through the
    optional mask; a source alpha channel that the destination lacks is dropped."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        pos = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"destination": ("IMAGE",), "source": ("IMAGE",), "x": ("INT", pos),
                             "y": ("INT", dict(pos)), "resize_source": ("BOOLEAN", {"default": False})},
                "optional": {"mask": ("MASK",)}}

    def composite(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, resize_source: bool,
                  mask: torch.Tensor | None = None) -> tuple:
        _image(destination, "ImageCompositeMasked"), _image(source, "ImageCompositeMasked")
        if source.shape[-1] > destination.shape[-1]:
            source = source[..., :destination.shape[-1]]
        elif source.shape[-1] < destination.shape[-1]:
            raise ShapeError(f"ImageCompositeMasked: the source has {source.shape[-1]} channels and the destination "
                             f"{destination.shape[-1]}; give a destination without alpha (core cannot mix them "
                             "either)")
        out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, resize_source)
        return (out.movedim(1, -1),)


# ---- Canny -------------------------------------------------------------------------------------------------


class Canny:
    """Stand-in for core's Canny (image/preprocessors): grey, 5 x 5 Gaussian (sigma 1), unnormalised Sobel magnitude,
    non-maximum suppression, strict thresholds in core's units (0.01..0.99 on that magnitude of a [0, 1] image) and
    hysteresis; the edges come back as a 3-channel IMAGE of 0 and 1."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect_edge"
    CATEGORY = "image/preprocessors"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",),
                             "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
                             "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01})}}

    def detect_edge(self, image: torch.Tensor, low_threshold: float, high_threshold: float) -> tuple:
        pixels = _image(image, "Canny").movedim(-1, 1)
        if pixels.shape[1] != 3:
            raise ShapeError(f"Canny: the image has {pixels.shape[1]} channels; expected an RGB IMAGE (3)")
        if low_threshold > high_threshold:  # kornia refuses it too, inside core's node
            raise CascadeError(f"Canny: low_threshold {low_threshold} is above high_threshold {high_threshold}; "
                               "give low <= high")
        # The pack's own implementation of core's algorithm (kornia's canny with core's arguments), which its
        # SCW_CannyControl uses too; equal to core's node bit for bit (tests/standalone/test_core_nodes_comfyui.py).
        edges = control_filters.canny_core(pixels, low_threshold, high_threshold).to(image.dtype)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)


STANDINS = {cls.__name__: cls for cls in (ImageScale, ImageScaleBy, ImageInvert, EmptyImage, ImageCompositeMasked,
                                          Canny)}
