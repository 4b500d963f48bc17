"""Core-type nodes: the pack's Stage C / B as core's MODEL, and core's MODEL, CLIP and VAE as the pack's models.

To MODEL: core's KSampler, SamplerCustomAdvanced and model nodes (ModelSamplingStableCascade, ...) run the pack's
network with core's Stable Cascade schedule; the pack's LoRA patches go along. From MODEL / CLIP / VAE: a Stage C
or B loaded by CheckpointLoaderSimple / UNETLoader, a stable_cascade CLIP and a Stage A VAE feed the pack's
samplers, text encode and decode nodes; core's own networks and patches compute. ``host`` does both
(host/core_interop.py); outside ComfyUI there are no core types, and these nodes say so.
"""

from __future__ import annotations

from typing import Any

from .. import host
from .common import category, mappings, require
from .kinds import FIX

CATEGORY = category("core interop")
_TO_MODEL = ("Runs the pack's Stage {s} network under core's Stable Cascade model sampling (shift {shift}, as core's "
             "Stage {s}), so core's KSampler, SamplerCustomAdvanced and model-patching nodes take it. The pack's LoRA "
             "patches go along; the pack's ControlNets do not (use the pack's sampler for those).")
_FROM_MODEL = ("A Stage {s} MODEL loaded by core (CheckpointLoaderSimple with stable_cascade_stage_{l}.safetensors, "
               "or UNETLoader) for the pack's Stage {s} sampler. Core's network computes, with core's patches (LoRAs) "
               "on it; the pack's sampler, schedule and defaults drive it.")


class StageCToModel:
    NODE_ID, TITLE = "SCW_StageCToModel", "Stage C to MODEL"
    DESCRIPTION = _TO_MODEL.format(s="C", shift=2)
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    STAGE = "c"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        s = cls.STAGE.upper()
        return {"required": {f"stage_{cls.STAGE}": (f"SCW_STAGE_{s}", {"tooltip": f"The pack's Stage {s} model."})}}

    def convert(self, **inputs: Any) -> tuple[Any]:
        name = f"stage_{self.STAGE}"
        model = require(inputs.get(name), name, self.NODE_ID, f"a Stage {self.STAGE.upper()} model", FIX[name])
        return (host.to_core_model(model),)


class StageBToModel(StageCToModel):
    NODE_ID, TITLE = "SCW_StageBToModel", "Stage B to MODEL"
    DESCRIPTION = _TO_MODEL.format(s="B", shift=1)
    STAGE = "b"


class StageCFromModel:
    NODE_ID, TITLE = "SCW_StageCFromModel", "Stage C from MODEL"
    DESCRIPTION = _FROM_MODEL.format(s="C", l="c")
    RETURN_TYPES = ("SCW_STAGE_C",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    STAGE = "c"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": f"A Stable Cascade Stage {cls.STAGE.upper()} MODEL."})}}

    def convert(self, model: Any) -> tuple[Any]:
        return (host.from_core_model(model, self.STAGE),)


class StageBFromModel(StageCFromModel):
    NODE_ID, TITLE = "SCW_StageBFromModel", "Stage B from MODEL"
    DESCRIPTION = _FROM_MODEL.format(s="B", l="b")
    RETURN_TYPES = ("SCW_STAGE_B",)
    RETURN_NAMES = ("stage_b",)
    STAGE = "b"


class TextEncoderFromClip:
    NODE_ID, TITLE = "SCW_TextEncoderFromClip", "Text Encoder from CLIP"
    DESCRIPTION = ("A core CLIP of type stable_cascade (CLIPLoader, or CheckpointLoaderSimple with the Stage C file) "
                   "for the pack's text encode node: core's tokenizer and encoder compute, as in CLIPTextEncode.")
    RETURN_TYPES = ("SCW_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"clip": ("CLIP", {"tooltip": "A CLIP loaded with type stable_cascade."})}}

    def convert(self, clip: Any) -> tuple[Any]:
        return (host.from_core_clip(clip),)


class StageAFromVae:
    NODE_ID, TITLE = "SCW_StageAFromVae", "Stage A from VAE"
    DESCRIPTION = ("A core VAE holding Stage A (VAELoader with stage_a.safetensors, or CheckpointLoaderSimple with "
                   "the Stage B file) for the pack's Stage A decode and encode nodes; core's network computes.")
    RETURN_TYPES = ("SCW_STAGE_A",)
    RETURN_NAMES = ("stage_a",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae": ("VAE", {"tooltip": "A Stable Cascade Stage A VAE."})}}

    def convert(self, vae: Any) -> tuple[Any]:
        return (host.from_core_vae(vae),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(StageCToModel, StageBToModel, StageCFromModel,
                                                           StageBFromModel, TextEncoderFromClip, StageAFromVae)
