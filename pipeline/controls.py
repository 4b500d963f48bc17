"""ControlNet inputs and the demo ControlNet: the domain side of the ControlNet nodes.

Control inputs are made by ``cascade.control_filters`` as the official filters make them; the control itself
rides on a Stage C handle (``model_patches.controlnet``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from .. import host
from ..cascade import control_filters as filters
from ..cascade.controlnet import RELEASE_PROJ_BLOCKS, ControlNet, ControlNetConfig
from ..cascade.errors import CascadeError
from ..cascade.kinds import KINDS
from ..model_patches import controlnet as controlnets
from .images import effnet_encode
from .latents import snap_size, stage_latent

log = logging.getLogger(__name__)

SR_OUTPUT_PER_CELL = 32 * 4 / 3  # notebook: output side = Stage C latent side x 32 x 4/3 (48 -> 2048)


def demo_controlnet(c_in: int, stage_c_config: Any, dtype: torch.dtype | None, name: str) -> Any:
    """A tiny seeded random ControlNet for an empty controlnet folder, shaped for the control input and the
    connected Stage C (its output is noise, like the other demo networks)."""
    mode = "large" if c_in == 16 else "effnet"
    calls = controlnets.resblock_calls(stage_c_config)
    blocks = tuple(i for i in RELEASE_PROJ_BLOCKS if i < calls) or (0,)
    cfg = ControlNetConfig.tiny(c_proj=stage_c_config.c_hidden[0], bottleneck_mode=mode, c_in=c_in)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c_in)
        module = ControlNet(dataclasses.replace(cfg, proj_blocks=blocks))
    if dtype is not None:
        module = module.to(dtype)
    log.warning("ComfyUI-StableCascade: using a TINY RANDOM ControlNet: put %s into the controlnet models folder "
                "and pick it in the ControlNet loader.", KINDS["controlnet"].release)
    return controlnets.ControlNetModel(host.wrap(module.eval(), "controlnet"), name)


def super_resolution_hint(effnet: Any, x: torch.Tensor) -> torch.Tensor:
    """The super-resolution ControlNet's input: the image's EffNet latent upsampled x2 (on the CPU)."""
    return filters.super_resolution_hint(lambda px: effnet_encode(effnet, px), x).cpu()


def sr_latents(hint: torch.Tensor) -> tuple[dict, dict]:
    """Empty Stage C / Stage B latents for a super-resolution control input (B, 16, h, w): Stage C at h x w,
    Stage B for the notebook's output size h x 32 x 4/3 (a 768 px input: 48 x 48 and 512 x 512)."""
    b, _, h, w = hint.shape
    height = snap_size(round(h * SR_OUTPUT_PER_CELL), "super-resolution height")
    width = snap_size(round(w * SR_OUTPUT_PER_CELL), "super-resolution width")
    stage_b = torch.zeros(b, 4, math.ceil(height / 4), math.ceil(width / 4))
    return stage_latent(torch.zeros(b, 16, h, w), "c"), stage_latent(stage_b, "b")


# ---- canny thresholds: core's units, and the integer OpenCV values saved before them ----------------------------

THRESHOLD_RANGE = (0.01, 0.99)  # core's Canny node's range, in its units (filters.OPENCV_PER_UNIT)
LEGACY_THRESHOLD_MAX = 1020  # workflows saved before core's units held OpenCV integers 0..1020


def is_legacy_threshold(value: Any) -> bool:
    """A threshold saved in OpenCV's integer units (the pack's widgets before core's units): a whole number in
    0..1020. None of those lies in core's range 0.01..0.99, so the two can never be confused."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
            and 0 <= value <= LEGACY_THRESHOLD_MAX)


def threshold_problem(name: str, value: Any) -> str | None:
    """Why a threshold is refused (a message naming it, the range and the fix), or None."""
    low, high = THRESHOLD_RANGE
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (low <= value <= high or is_legacy_threshold(value)):
        return None
    return (f"{name} {value!r} is outside {low}..{high} (core's Canny units: the Sobel gradient of the image in "
            f"[0, 1]; the release's 100 / 200 are {100 / filters.OPENCV_PER_UNIT:.3f} / "
            f"{200 / filters.OPENCV_PER_UNIT:.3f}) - enter a value in that range")


def canny_thresholds(low: float, high: float, method: str) -> tuple[str, float, float]:
    """(method, low, high) as ``filters.canny_filter`` takes them. Core's units are converted to OpenCV's for the
    official method; legacy OpenCV integers (both thresholds, from a workflow saved before) run the official method
    on them unchanged, so such a workflow gives the image it gave before."""
    legacy = [is_legacy_threshold(v) for v in (low, high)]
    if all(legacy):
        if method != "official":
            log.info("ComfyUI-StableCascade: canny thresholds %s / %s are OpenCV integers from a workflow saved "
                     "before core's units; running the official (OpenCV) edges they were saved with", low, high)
        return "official", int(low), int(high)
    if any(legacy):
        raise CascadeError(f"canny thresholds {low} / {high} mix an OpenCV integer (a workflow saved before core's "
                           "units) with core's units - enter both in core's units (0.01..0.99)")
    if method == "official":
        return method, filters.opencv_threshold(low), filters.opencv_threshold(high)
    return method, float(low), float(high)
