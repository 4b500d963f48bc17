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
