"""ControlNet nodes: load a Stage C ControlNet, prepare its control input, apply it to a Stage C clone.

The released ControlNets (canny, inpainting/outpainting, super-resolution) each read their own input:
SCW_CannyControl, SCW_InpaintControl (with SCW_OutpaintPad for outpainting) and
SCW_SuperResolutionControl make it as the official filters do (``cascade.control_filters``);
SCW_ApplyControlNet attaches it to a clone of the Stage C model with a strength and a start/end range
(``model_patches.controlnet``), so any Stage C sampler uses it. See docs/CONTROLNET.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from .. import host
from ..cascade import control_filters as filters
from ..cascade import image_ops
from ..cascade.errors import CascadeError
from ..model_patches import controlnet as controlnets
from ..pipeline import controls
from ..pipeline.images import input_pixels
from .common import DEMO_CHOICE, WEIGHT_DTYPES, category, dtype_input, file_choices, mappings, require
from .kinds import FIX, NODE_KINDS, load_network

log = logging.getLogger(__name__)

CATEGORY = category("controlnet")
CONTROL_TYPE = "SCW_CONTROL_INPUT"
FOLDERS = NODE_KINDS["controlnet"].folders
_IMAGE_TIP = "The input image (e.g. from core's LoadImage)."


@dataclasses.dataclass(frozen=True)
class _DemoChoice:
    """The loader's demo choice: the network is built when the Stage C and the control input are known."""

    dtype: torch.dtype | None


def _resolve(controlnet: Any, stage_c: Any, hint: controlnets.ControlHint) -> controlnets.ControlNetModel:
    """The loaded ControlNet, or (demo choice) a tiny random one fitting ``hint`` and ``stage_c``."""
    if isinstance(controlnet, controlnets.ControlNetModel):
        return controlnet
    if isinstance(controlnet, _DemoChoice):
        return controls.demo_controlnet(hint.images.shape[1], host.module_of(stage_c).config, controlnet.dtype,
                                        DEMO_CHOICE)
    raise CascadeError(f"SCW_ApplyControlNet: input 'controlnet' got {type(controlnet).__name__} - connect "
                       "SCW_ControlNetLoader")


def _pixels(image: torch.Tensor, node: str) -> torch.Tensor:
    return image_ops.image_to_bchw(image, f"{node}: input 'image'")


def _int(default: int, low: int, high: int, tip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tip})


# ---- nodes -------------------------------------------------------------------------------------------------


class ControlNetLoader:
    NODE_ID, TITLE = "SCW_ControlNetLoader", "Load ControlNet"
    DESCRIPTION = ("Loads a Stable Cascade ControlNet (canny, inpainting or super_resolution from "
                   "stabilityai/stable-cascade, controlnet/) from models/controlnet. The kind is read from the "
                   "file's keys. They fit only the 3.6B Stage C.")
    RETURN_TYPES, RETURN_NAMES = ("SCW_CONTROLNET",), ("controlnet",)
    FUNCTION, CATEGORY, FOLDERS = "load", category("loaders"), FOLDERS

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        tip = "canny.safetensors, inpainting.safetensors or super_resolution.safetensors (bf16 variants too)."
        return {"required": {"file_name": (file_choices(FOLDERS), {"tooltip": tip}), "weight_dtype": dtype_input()}}

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple[Any]:
        if file_name == DEMO_CHOICE:
            return (_DemoChoice(WEIGHT_DTYPES[weight_dtype]),)
        return (controlnets.ControlNetModel(load_network("controlnet", file_name, weight_dtype), file_name),)


class CannyControl:
    NODE_ID, TITLE = "SCW_CannyControl", "ControlNet Canny Edges"
    DESCRIPTION = ("The canny ControlNet's input, as the official CannyFilter makes it: the image resized to "
                   "224x224, canny edges (OpenCV's algorithm, thresholds 100/200), resized back. Also returns the "
                   "edges as an image to look at.")
    RETURN_TYPES, RETURN_NAMES = (CONTROL_TYPE, "IMAGE"), ("control", "edges")
    FUNCTION, CATEGORY = "prepare", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "low_threshold": _int(filters.CANNY_LOW, 0, 1020, "Gradient (abs(dx) + abs(dy) of a 3x3 Sobel, 0-1020) "
                                  "above which a pixel may continue an edge; official 100."),
            "high_threshold": _int(filters.CANNY_HIGH, 0, 1020, "Gradient above which a pixel starts an edge; "
                                   "official 200."),
            "resize": _int(filters.CANNY_RESIZE, 0, 4096, "Square size the edges are found at (official 224: the "
                           "ControlNet was trained so); 0 keeps the image size (finer edges)."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, low_threshold: int | None = None, high_threshold: int | None = None) -> bool | str:
        if low_threshold is not None and high_threshold is not None and low_threshold > high_threshold:
            return f"low_threshold {low_threshold} is above high_threshold {high_threshold} - swap them"
        return True

    def prepare(self, image: torch.Tensor, low_threshold: int, high_threshold: int, resize: int) -> tuple[Any, Any]:
        edges = filters.canny_filter(_pixels(image, self.NODE_ID), low_threshold, high_threshold, resize or None)
        preview = edges.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
        return controlnets.ControlHint(edges, "canny"), preview


class OutpaintPad:
    NODE_ID, TITLE = "SCW_OutpaintPad", "Outpaint Padding"
    DESCRIPTION = ("Outpainting: pastes the image onto a larger canvas (new border white) and masks the border, "
                   "for SCW_InpaintControl. A connected mask (e.g. painted in LoadImage) is kept inside, so "
                   "inpainting and outpainting combine. Give the Stage C latent the new aspect ratio.")
    RETURN_TYPES, RETURN_NAMES = ("IMAGE", "MASK"), ("image", "mask")
    FUNCTION, CATEGORY = "pad", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        side = {n: _int(0, 0, 4096, f"Pixels added on the {n}.", 8) for n in ("left", "top", "right", "bottom")}
        return {"required": {"image": ("IMAGE", {"tooltip": _IMAGE_TIP}), **side},
                "optional": {"mask": ("MASK", {"tooltip": "Optional region to inpaint inside the image (1 = "
                                                          "generate); an empty mask means none."})}}

    def pad(self, image: torch.Tensor, left: int, top: int, right: int, bottom: int,
            mask: torch.Tensor | None = None) -> tuple[Any, Any]:
        x = _pixels(image, self.NODE_ID)
        inner = filters.fit_mask(mask, x.shape[0], *x.shape[-2:], what=f"{self.NODE_ID}: input 'mask'")
        padded, new_mask = filters.outpaint_pad(x, left, top, right, bottom, inner)
        return image_ops.bchw_to_image(padded), new_mask[:, 0]


class InpaintControl:
    NODE_ID, TITLE = "SCW_InpaintControl", "ControlNet Inpaint Input"
    DESCRIPTION = ("The inpainting ControlNet's input, as the official InpaintFilter makes it: the image with the "
                   "masked pixels set to white, plus the mask (1 = region to generate). For outpainting, feed "
                   "SCW_OutpaintPad's outputs. Returns the masked image to look at.")
    RETURN_TYPES, RETURN_NAMES = (CONTROL_TYPE, "IMAGE"), ("control", "masked")
    FUNCTION, CATEGORY = "prepare", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "mask": ("MASK", {"tooltip": "The region to generate (1), the image's size: LoadImage's mask (painted "
                                         "in its mask editor) or SCW_OutpaintPad's."}),
        }}

    def prepare(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[Any, Any]:
        x = _pixels(image, self.NODE_ID)
        m = filters.fit_mask(mask, x.shape[0], *x.shape[-2:], what=f"{self.NODE_ID}: input 'mask'")
        if not bool(m.any()):
            log.warning("ComfyUI-StableCascade: %s: the mask is empty, so nothing is regenerated - paint the region "
                        "in LoadImage's mask editor or use SCW_OutpaintPad", self.NODE_ID)
        hint = filters.inpaint_filter(x, m)
        return controlnets.ControlHint(hint, "inpainting"), image_ops.bchw_to_image(hint[:, :3])


class SuperResolutionControl:
    NODE_ID, TITLE = "SCW_SuperResolutionControl", "ControlNet Super-Resolution Input"
    DESCRIPTION = ("The super-resolution ControlNet's input as the official notebook makes it: the image's EffNet "
                   "latent upsampled x2 (nearest). Also returns empty latents of that size: Stage C twice the "
                   "image's EffNet latent, Stage B for the 2x-larger output (768 px in -> 2048 px out). Sample "
                   "Stage C with cfg 1, as the notebook does.")
    RETURN_TYPES = (CONTROL_TYPE, "LATENT", "LATENT")
    RETURN_NAMES = ("control", "stage_c", "stage_b")
    FUNCTION, CATEGORY = "prepare", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"effnet": ("SCW_EFFNET", {"tooltip": "The EfficientNet encoder (SCW_EffNetLoader)."}),
                             "image": ("IMAGE", {"tooltip": "The image to upscale (e.g. 768 x 768)."})}}

    def prepare(self, effnet: Any, image: torch.Tensor) -> tuple[Any, dict, dict]:
        model = require(effnet, "effnet", self.NODE_ID, "an EffNet encoder", FIX["effnet"])
        hint = controls.super_resolution_hint(model, input_pixels(image, self.NODE_ID))
        stage_c, stage_b = controls.sr_latents(hint)
        return (controlnets.ControlHint(hint, "super_resolution"), stage_c, stage_b)


class ApplyControlNet:
    NODE_ID, TITLE = "SCW_ApplyControlNet", "Apply ControlNet (Stage C)"
    DESCRIPTION = ("Returns a clone of the Stage C model that runs the ControlNet on the control input and adds "
                   "its outputs to the official Stage C blocks, times strength, at the steps between start and end "
                   "(fractions of the schedule), in both the positive and the negative branch. The loaded model "
                   "is not changed. Chain several to stack ControlNets.")
    RETURN_TYPES, RETURN_NAMES = ("SCW_STAGE_C",), ("stage_c",)
    FUNCTION, CATEGORY = "apply", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {
            "stage_c": ("SCW_STAGE_C", {"tooltip": "The 3.6B Stage C model (the lite one does not fit)."}),
            "controlnet": ("SCW_CONTROLNET", {"tooltip": "From SCW_ControlNetLoader."}),
            "control": (CONTROL_TYPE, {"tooltip": "The input this ControlNet reads (SCW_CannyControl, "
                                                  "SCW_InpaintControl or SCW_SuperResolutionControl)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip":
                                   "Multiplies the ControlNet's additions: 1 as in the notebooks, 0 off."}),
            "start": ("FLOAT", {**frac, "default": 0.0, "tooltip": "Schedule fraction where it starts (0: first "
                                                                   "step)."}),
            "end": ("FLOAT", {**frac, "default": 1.0, "tooltip": "Schedule fraction where it stops (1: last step)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, start: float | None = None, end: float | None = None) -> bool | str:
        if start is not None and end is not None and start > end:
            return f"start {start} is after end {end} - the ControlNet would never run; make start <= end"
        return True

    def apply(self, stage_c: Any, controlnet: Any, control: Any, strength: float, start: float,
              end: float) -> tuple[Any]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        if not isinstance(control, controlnets.ControlHint):
            raise CascadeError(f"{self.NODE_ID}: input 'control' got {type(control).__name__} - connect "
                               "SCW_CannyControl, SCW_InpaintControl or SCW_SuperResolutionControl")
        net = _resolve(controlnet, model, control)
        return (controlnets.apply_controlnet(model, net, control, strength, start, end),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ControlNetLoader, CannyControl, OutpaintPad, InpaintControl, SuperResolutionControl, ApplyControlNet,
)
