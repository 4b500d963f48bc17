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
from .kinds import FIX, NODE_KINDS, check_file, demo_result, load_network

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
    raise CascadeError("'Stable Cascade Apply ControlNet (Stage C)': input 'controlnet' got "
                       f"{type(controlnet).__name__} - connect 'Stable Cascade Load ControlNet'")


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

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None = None) -> bool | str:
        return check_file("controlnet", file_name)

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple[Any] | dict:
        if file_name == DEMO_CHOICE:
            return demo_result("controlnet", (_DemoChoice(WEIGHT_DTYPES[weight_dtype]),))
        return (controlnets.ControlNetModel(load_network("controlnet", file_name, weight_dtype), file_name),)


class CannyControl:
    NODE_ID, TITLE = "SCW_CannyControl", "ControlNet Canny Edges"
    DESCRIPTION = ("The canny ControlNet's input: the image resized to 224x224, canny edges, resized back, as the "
                   "official CannyFilter makes it (method 'official': OpenCV's algorithm; the default thresholds "
                   "0.392/0.784 are its 100/200). Method 'core' finds the edges as core's Canny node (with resize 0 "
                   "and 0.3/0.7, core's edges of the same image). Thresholds are in core's units. Also returns the "
                   "edges as an image to look at.")
    RETURN_TYPES, RETURN_NAMES = (CONTROL_TYPE, "IMAGE"), ("control", "edges")
    FUNCTION, CATEGORY = "prepare", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        low, high = controls.THRESHOLD_RANGE
        unit = {"min": low, "max": high, "step": 0.001, "round": 0.001}
        per = filters.OPENCV_PER_UNIT
        return {"required": {
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "low_threshold": ("FLOAT", {**unit, "default": round(filters.CANNY_LOW / per, 3), "tooltip": (
                "Gradient above which a pixel may continue an edge, in core's Canny units (the Sobel gradient of "
                "the image in [0, 1]). 0.392 is the release's OpenCV 100 (x 255); core's Canny defaults to 0.4.")}),
            "high_threshold": ("FLOAT", {**unit, "default": round(filters.CANNY_HIGH / per, 3), "tooltip": (
                "Gradient above which a pixel starts an edge, in core's units; 0.784 is the release's 200.")}),
            "resize": _int(filters.CANNY_RESIZE, 0, 4096, "Square size the edges are found at (official 224: the "
                           "ControlNet was trained so); 0 keeps the image size (finer edges; core's Canny node "
                           "does not resize)."),
        }, "optional": {
            "method": (list(filters.CANNY_METHODS), {"default": "official", "tooltip": (
                "official: OpenCV's Canny as the release's CannyFilter (the ControlNet's training edges); core: "
                "core's Canny node (grey, 5x5 Gaussian blur, L2 gradient), so 0.3/0.7 with resize 0 give the "
                "edges core's Canny gives.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, low_threshold: float | None = None, high_threshold: float | None = None) -> bool | str:
        # Taking both thresholds here makes ComfyUI leave their range to this check, so workflows saved before
        # core's units (OpenCV integers such as 100 / 200) still validate and run as they did.
        for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
            problem = None if value is None else controls.threshold_problem(name, value)
            if problem:
                return problem
        if low_threshold is not None and high_threshold is not None:
            if controls.is_legacy_threshold(low_threshold) != controls.is_legacy_threshold(high_threshold):
                return (f"low_threshold {low_threshold} and high_threshold {high_threshold} mix OpenCV integers "
                        "(a workflow saved before core's units) with core's units - enter both in 0.01..0.99")
            if low_threshold > high_threshold:
                return f"low_threshold {low_threshold} is above high_threshold {high_threshold} - swap them"
        return True

    def prepare(self, image: torch.Tensor, low_threshold: float, high_threshold: float, resize: int,
                method: str = "official") -> tuple[Any, Any]:
        problem = self.VALIDATE_INPUTS(low_threshold, high_threshold)  # linked values skip the server's check
        if problem is not True:
            raise CascadeError(f"{self.NAME}: {problem}")
        method, low, high = controls.canny_thresholds(low_threshold, high_threshold, method)
        edges = filters.canny_filter(_pixels(image, self.NAME), low, high, resize or None, method)
        preview = edges.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
        return controlnets.ControlHint(edges, "canny"), preview


class OutpaintPad:
    NODE_ID, TITLE = "SCW_OutpaintPad", "Outpaint Padding"
    DESCRIPTION = ("Outpainting: pastes the image onto a larger canvas (new border white) and masks the border, "
                   "for 'Stable Cascade ControlNet Inpaint Input'. A connected mask (e.g. painted in LoadImage) is "
                   "kept inside, so inpainting and outpainting combine. Give the Stage C latent the new aspect ratio.")
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
        x = _pixels(image, self.NAME)
        inner = filters.fit_mask(mask, x.shape[0], *x.shape[-2:], what=f"{self.NAME}: input 'mask'")
        padded, new_mask = filters.outpaint_pad(x, left, top, right, bottom, inner)
        return image_ops.bchw_to_image(padded), new_mask[:, 0]


class InpaintControl:
    NODE_ID, TITLE = "SCW_InpaintControl", "ControlNet Inpaint Input"
    DESCRIPTION = ("The inpainting ControlNet's input, as the official InpaintFilter makes it: the image with the "
                   "masked pixels set to white, plus the mask (1 = region to generate). For outpainting, feed "
                   "the outputs of 'Stable Cascade Outpaint Padding'. Returns the masked image to look at.")
    RETURN_TYPES, RETURN_NAMES = (CONTROL_TYPE, "IMAGE"), ("control", "masked")
    FUNCTION, CATEGORY = "prepare", CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "mask": ("MASK", {"tooltip": "The region to generate (1), the image's size: LoadImage's mask (painted "
                                         "in its mask editor) or the mask of 'Stable Cascade Outpaint Padding'."}),
        }}

    def prepare(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[Any, Any]:
        x = _pixels(image, self.NAME)
        m = filters.fit_mask(mask, x.shape[0], *x.shape[-2:], what=f"{self.NAME}: input 'mask'")
        if not bool(m.any()):
            log.warning("ComfyUI-StableCascade: %s: the mask is empty, so nothing is regenerated - paint the region "
                        "in LoadImage's mask editor or use 'Stable Cascade Outpaint Padding'", self.NAME)
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
        return {"required": {"effnet": ("SCW_EFFNET", {"tooltip": "The EfficientNet encoder ('Stable Cascade Load "
                                                                  "EffNet Encoder')."}),
                             "image": ("IMAGE", {"tooltip": "The image to upscale (e.g. 768 x 768)."})}}

    def prepare(self, effnet: Any, image: torch.Tensor) -> tuple[Any, dict, dict]:
        model = require(effnet, "effnet", self.NODE_ID, "an EffNet encoder", FIX["effnet"])
        hint = controls.super_resolution_hint(model, input_pixels(image, self.NAME))
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
        frac = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {
            "stage_c": ("SCW_STAGE_C", {"tooltip": "The 3.6B Stage C model (the lite one does not fit)."}),
            "controlnet": ("SCW_CONTROLNET", {"tooltip": "From 'Stable Cascade Load ControlNet'."}),
            "control": (CONTROL_TYPE, {"tooltip": "The input this ControlNet reads ('Stable Cascade ControlNet Canny Edges', "
                                                  "'Stable Cascade ControlNet Inpaint Input' or 'Stable Cascade ControlNet Super-Resolution Input')."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                                   "Multiplies the ControlNet's additions: 1 as in the notebooks, 0 off (0..10, "
                                   "as core's ControlNetApplyAdvanced)."}),
        }, "optional": {
            # Optional with defaults, and named as core's: API prompts saved with the old names 'start' / 'end'
            # (the hidden inputs below) still validate and run with their values.
            "start_percent": ("FLOAT", {**frac, "default": 0.0, "tooltip": "Fraction of the schedule where it "
                                                                           "starts (0: first step), as core's."}),
            "end_percent": ("FLOAT", {**frac, "default": 1.0, "tooltip": "Fraction of the schedule where it stops "
                                                                         "(1: last step), as core's."}),
        }, "hidden": {"start": "FLOAT", "end": "FLOAT"}}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent: float | None = None, end_percent: float | None = None,
                        start: float | None = None, end: float | None = None) -> bool | str:
        begin, finish = _range(start_percent, end_percent, start, end)
        for name, value in (("start_percent", begin), ("end_percent", finish)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                return f"{name} {value!r} is outside 0..1 (a fraction of the schedule) - enter a value in 0..1"
        if begin > finish:
            return (f"start_percent {begin} is after end_percent {finish} - the ControlNet would never run; make "
                    "start_percent <= end_percent")
        return True

    def apply(self, stage_c: Any, controlnet: Any, control: Any, strength: float, start_percent: float | None = None,
              end_percent: float | None = None, start: float | None = None, end: float | None = None) -> tuple[Any]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        if not isinstance(control, controlnets.ControlHint):
            raise CascadeError(f"{self.NAME}: input 'control' got {type(control).__name__} - connect "
                               "'Stable Cascade ControlNet Canny Edges', 'Stable Cascade ControlNet Inpaint Input' or 'Stable Cascade ControlNet Super-Resolution Input'")
        net = _resolve(controlnet, model, control)
        begin, finish = _range(start_percent, end_percent, start, end)
        return (controlnets.apply_controlnet(model, net, control, strength, begin, finish),)


def _range(start_percent: float | None, end_percent: float | None, start: float | None,
           end: float | None) -> tuple[float, float]:
    """The schedule range: core's names, else the names API prompts were saved with before (start / end)."""
    begin = start_percent if start_percent is not None else start if start is not None else 0.0
    finish = end_percent if end_percent is not None else end if end is not None else 1.0
    return begin, finish


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ControlNetLoader, CannyControl, OutpaintPad, InpaintControl, SuperResolutionControl, ApplyControlNet,
)
