"""Tiny random networks offered by the loaders when a model folder is empty, so a workflow runs end to end
on a machine with no weights (tests, the headless command on a fresh checkout). Their output is noise.

All of them are sized to fit together (text width 64 feeds Stage C and Stage B); mixing one with a real model
fails with a shape error, which is intended. Weights are seeded, so two demo runs give the same image.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..cascade.clip_vision import ClipVision, ClipVisionConfig
from ..cascade.effnet import EffNetConfig, EfficientNetEncoder
from ..cascade.previewer import Previewer, PreviewerConfig
from ..cascade.stage_a import StageA, StageAConfig
from ..cascade.stage_b import StageB, StageBConfig
from ..cascade.stage_c import StageC, StageCConfig
from ..cascade.text import TextEncoder, TextEncoderConfig

log = logging.getLogger(__name__)

DEMO_CHOICE = "(tiny random demo)"
_TEXT_WIDTH = 64

# What a user must install instead, by kind: (description, file names, ComfyUI models folder).
WHERE = {
    "stage_c": ("Stage C", "stage_c_bf16.safetensors (or stage_c / stage_c_lite*)", "diffusion_models"),
    "stage_b": ("Stage B", "stage_b_bf16.safetensors (or stage_b / stage_b_lite*)", "diffusion_models"),
    "stage_a": ("Stage A", "stage_a.safetensors", "vae"),
    "effnet": ("EfficientNet encoder", "effnet_encoder.safetensors", "vae"),
    "previewer": ("Previewer", "previewer.safetensors", "vae"),
    "text_encoder": ("CLIP ViT-bigG text encoder", "text_encoder/model.safetensors of stabilityai/stable-cascade",
                     "text_encoders"),
    "clip_vision": ("CLIP ViT-L/14 vision model",
                    "image_encoder/model.safetensors of stabilityai/stable-cascade-prior", "clip_vision"),
}


def _build(kind: str) -> nn.Module:
    if kind == "text_encoder":
        return TextEncoder(TextEncoderConfig.tiny(hidden_size=_TEXT_WIDTH, projection_dim=_TEXT_WIDTH))
    if kind == "stage_c":
        cfg = dataclasses.replace(StageCConfig.tiny(), c_clip_text=_TEXT_WIDTH, c_clip_text_pooled=_TEXT_WIDTH)
        return StageC(cfg)
    if kind == "stage_b":
        return StageB(dataclasses.replace(StageBConfig.tiny(), c_clip=_TEXT_WIDTH))
    if kind == "stage_a":
        return StageA(StageAConfig.tiny())
    if kind == "effnet":
        return EfficientNetEncoder(EffNetConfig.tiny())
    if kind == "previewer":
        return Previewer(PreviewerConfig.tiny())
    if kind == "clip_vision":
        return ClipVision(ClipVisionConfig.tiny())
    raise KeyError(f"no demo network of kind {kind!r}; known: {sorted(WHERE)}")


@torch.no_grad()
def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter drawn from a seeded generator: matrices and kernels scaled by fan-in so activations stay
    O(1); 1-D ones near 1 (norm scales, named "weight") or near 0 (biases, gates). Some constructors leave
    parameters uninitialised, so nothing of the default init is kept."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim > 1:
            p.copy_(noise / max(1, p[0].numel()) ** 0.5)
        else:
            p.copy_(float(name.endswith("weight")) + 0.02 * noise)


def demo_network(kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The tiny random network of ``kind`` (see WHERE), in eval mode; logs where the real weights go."""
    seed = sorted(WHERE).index(kind)
    with torch.random.fork_rng(devices=[]):  # default inits draw from the global RNG; leave it as it was
        module = _build(kind)
    _randomize(module, seed)
    if dtype is not None:
        module = module.to(dtype)
    what, files, folder = WHERE[kind]
    log.warning(
        "ComfyUI-StableCascade: using a TINY RANDOM %s: images will be noise until real weights are installed. "
        "Put %s into models/%s/ and pick it in the loader.", what, files, folder,
    )
    return module.eval().requires_grad_(False)
