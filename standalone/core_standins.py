"""Stand-ins for the ComfyUI core nodes shared Stable Cascade workflows use, for the headless runner without a
ComfyUI checkout: SaveImage, PreviewImage, LoadImage and LoadImageMask here, the image nodes (ImageScale, Canny,
ImageCompositeMasked...) in ``standins_image``, the mask and latent-batch nodes in ``standins_mask``. Same inputs
and widgets as core's, so a workflow runs unchanged; with ``--comfyui PATH`` the runner uses core's own nodes instead.

They are deliberately NOT in NODE_CLASS_MAPPINGS (core registers the real ones inside ComfyUI); the runner
(headless.py) adds them. Writing goes where the runner's OutputPlan says, not to a global output folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from . import standins_image, standins_mask

log = logging.getLogger(__name__)


@dataclass
class OutputPlan:
    """Where images go: with ``out``, the first image is written there and later ones get _00001, _00002...
    after its stem; without, ComfyUI-style ``<prefix>_00001_.png`` names in ``directory``."""

    directory: str = "output"
    out: str | None = None
    written: list[str] = field(default_factory=list)

    def next_path(self, prefix: str) -> str:
        if self.out:
            stem, ext = os.path.splitext(self.out)
            path = self.out if not self.written else f"{stem}_{len(self.written):05}{ext or '.png'}"
        else:
            counter = 1
            while os.path.exists(path := os.path.join(self.directory, f"{prefix}_{counter:05}_.png")):
                counter += 1
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.written.append(path)
        return path


def save_png(image: Any, path: str, prompt: Mapping | None, extra_pnginfo: Mapping | None) -> None:
    """One H x W x 3 image in [0, 1] as PNG, with "prompt" and each extra_pnginfo key (ComfyUI: "workflow")
    as JSON tEXt chunks, the way ComfyUI's SaveImage embeds them."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    pixels = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, pnginfo=info, compress_level=4)


class SaveImage:
    """Stand-in for core's SaveImage (same inputs and widget), writing where the runner says."""

    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "File name prefix."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: Any, filename_prefix: str = "ComfyUI", prompt: Mapping | None = None,
                    extra_pnginfo: Mapping | None = None, output: OutputPlan | None = None) -> dict:
        output = output or OutputPlan()
        paths = [output.next_path(filename_prefix) for _ in range(images.shape[0])]
        for image, path in zip(images, paths):
            save_png(image, path, prompt, extra_pnginfo)
            log.info("ComfyUI-StableCascade: wrote %s", path)
        return {"ui": {"images": paths}}


class PreviewImage(SaveImage):
    """Stand-in for core's PreviewImage: headless there is no canvas, so previews are saved too."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: Any, prompt: Mapping | None = None, extra_pnginfo: Mapping | None = None,
                    output: OutputPlan | None = None) -> dict:
        return super().save_images(images, "preview", prompt, extra_pnginfo, output)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_class(input_dir: str) -> type:
    """A stand-in for core's LoadImage that lists and reads ``input_dir`` (ComfyUI's input folder)."""

    class LoadImage:
        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"
        CATEGORY = "image"
        INPUT_DIR = input_dir

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            files = sorted(f for f in os.listdir(cls.INPUT_DIR) if f.lower().endswith(IMAGE_EXTENSIONS)) \
                if os.path.isdir(cls.INPUT_DIR) else []
            return {"required": {"image": (files, {"image_upload": True, "tooltip": "An image of the input folder."})}}

        def load_image(self, image: str) -> tuple[Any, Any]:
            return read_image(os.path.join(self.INPUT_DIR, image))

    return LoadImage


def _open(path: str) -> Image.Image:
    with Image.open(path) as raw:
        img = ImageOps.exif_transpose(raw)
        img.load()
    return img.point(lambda v: v * (1 / 255)) if img.mode == "I" else img  # 16-bit PNGs, as core reads them


def read_image(path: str) -> tuple[Any, Any]:
    """(IMAGE 1 x H x W x 3 in [0, 1], MASK 1 x H x W) as core's LoadImage gives them (mask = 1 - alpha; a
    palette image's transparency counts as alpha; no alpha: a 64 x 64 zero mask)."""
    img = _open(path)
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
    if "A" in img.getbands():
        alpha = img.getchannel("A")
    elif img.mode == "P" and "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
    else:
        return rgb, torch.zeros(1, 64, 64)
    return rgb, 1.0 - torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None]


def read_mask(path: str, channel: str) -> Any:
    """MASK 1 x H x W of one channel, as core's LoadImageMask (alpha inverted: 1 - alpha)."""
    img = _open(path)
    rgba = img if img.getbands() == ("R", "G", "B", "A") else img.convert("RGBA")
    band = channel[0].upper()
    mask = torch.from_numpy(np.asarray(rgba.getchannel(band), dtype=np.float32) / 255.0)
    return (1.0 - mask if band == "A" else mask)[None]


def load_image_mask_class(input_dir: str) -> type:
    """A stand-in for core's LoadImageMask reading ``input_dir``."""
    base = load_image_class(input_dir)

    class LoadImageMask:
        RETURN_TYPES = ("MASK",)
        FUNCTION = "load_image"
        CATEGORY = "mask"
        INPUT_DIR = input_dir

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            image = base.INPUT_TYPES()["required"]["image"]
            return {"required": {"image": image, "channel": (["alpha", "red", "green", "blue"],)}}

        def load_image(self, image: str, channel: str) -> tuple[Any]:
            return (read_mask(os.path.join(self.INPUT_DIR, image), channel),)

    return LoadImageMask


def core_standins(input_dir: str = "input") -> dict[str, type]:
    """Core node type -> stand-in class; LoadImage and LoadImageMask read ``input_dir``."""
    return {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "LoadImage": load_image_class(input_dir),
            "LoadImageMask": load_image_mask_class(input_dir), **standins_image.STANDINS, **standins_mask.STANDINS}
