"""Loader nodes: one per released module, plus ComfyUI's packaged checkpoints.

Files are listed from ComfyUI's model folders through ``host``; the file's kind is checked by its keys
(``cascade.loading``), never by its name. An empty folder lists the tiny random demo network instead.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..cascade import loading
from .common import Absent, category, mappings
from .demo import DEMO_CHOICE, demo_network

CATEGORY = category("loaders")
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_TIP = ("Weight dtype: 'default' keeps the file's dtype; 'bf16' halves memory (the release was trained in "
              "bf16); 'fp32' for GPUs without bf16. fp16 is not offered: Stage C overflows in fp16.")


def file_choices(folders: tuple[str, ...]) -> list[str]:
    """The weights files of these model folders, or just the demo choice when they hold none."""
    return list(host.model_files(folders)) or [DEMO_CHOICE]


def _dtype_input() -> tuple:
    return (list(WEIGHT_DTYPES), {"default": "default", "tooltip": _DTYPE_TIP})


class _ModuleLoader:
    """One safetensors file -> one wrapped network. Subclasses set the class constants only."""

    FOLDERS: tuple[str, ...] = ()
    KIND = ""
    LOAD: Any = None
    TAKES_OPERATIONS = True  # the pure-torch networks; the transformers towers build their own layers
    FILE_TIP = ""
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "file_name": (file_choices(cls.FOLDERS), {"tooltip": cls.FILE_TIP}),
            "weight_dtype": _dtype_input(),
        }}

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple[Any]:
        dtype = WEIGHT_DTYPES[weight_dtype]
        if file_name == DEMO_CHOICE:
            return (host.wrap(demo_network(self.KIND, dtype), self.KIND),)
        extra = {"operations": host.operations()} if self.TAKES_OPERATIONS else {}
        module = type(self).LOAD(host.model_path(self.FOLDERS, file_name), dtype=dtype, **extra)
        return (host.wrap(module, self.KIND),)


class StageCLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_StageCLoader", "Load Stage C"
    DESCRIPTION = ("Loads the Stage C prior (3.6B or 1B lite; original, diffusers or ComfyUI layout) from "
                   "models/diffusion_models or models/unet.")
    FOLDERS, KIND, LOAD = ("diffusion_models", "unet"), "stage_c", staticmethod(loading.load_stage_c)
    FILE_TIP = "A Stage C file, e.g. stage_c_bf16.safetensors or stage_c_lite_bf16.safetensors."
    RETURN_TYPES, RETURN_NAMES = ("SCW_STAGE_C",), ("stage_c",)


class StageBLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_StageBLoader", "Load Stage B"
    DESCRIPTION = ("Loads the Stage B decoder (1.5B or 700M lite; original, diffusers or ComfyUI layout) from "
                   "models/diffusion_models or models/unet.")
    FOLDERS, KIND, LOAD = ("diffusion_models", "unet"), "stage_b", staticmethod(loading.load_stage_b)
    FILE_TIP = "A Stage B file, e.g. stage_b_bf16.safetensors or stage_b_lite_bf16.safetensors."
    RETURN_TYPES, RETURN_NAMES = ("SCW_STAGE_B",), ("stage_b",)


class StageALoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_StageALoader", "Load Stage A"
    DESCRIPTION = "Loads Stage A, the VQGAN that turns Stage B latents into pixels, from models/vae."
    FOLDERS, KIND, LOAD = ("vae",), "stage_a", staticmethod(loading.load_stage_a)
    FILE_TIP = "stage_a.safetensors (20M parameters)."
    RETURN_TYPES, RETURN_NAMES = ("SCW_STAGE_A",), ("stage_a",)


class EffNetLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_EffNetLoader", "Load EffNet Encoder"
    DESCRIPTION = ("Loads the EfficientNetV2-S encoder that maps images into Stage C latents (image-to-image, "
                   "reconstruction) from models/vae.")
    FOLDERS, KIND, LOAD = ("vae",), "effnet", staticmethod(loading.load_effnet)
    FILE_TIP = "effnet_encoder.safetensors."
    RETURN_TYPES, RETURN_NAMES = ("SCW_EFFNET",), ("effnet",)


class PreviewerLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_PreviewerLoader", "Load Previewer"
    DESCRIPTION = "Loads the Previewer that turns Stage C latents into 8x RGB previews, from models/vae."
    FOLDERS, KIND, LOAD = ("vae",), "previewer", staticmethod(loading.load_previewer)
    FILE_TIP = "previewer.safetensors."
    RETURN_TYPES, RETURN_NAMES = ("SCW_PREVIEWER",), ("previewer",)


class TextEncoderLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_TextEncoderLoader", "Load Text Encoder"
    DESCRIPTION = ("Loads the CLIP ViT-bigG/14 text encoder shared by Stage C and Stage B (transformers, open_clip "
                   "or ComfyUI layout) from models/text_encoders or models/clip.")
    FOLDERS, KIND, LOAD = ("text_encoders", "clip"), "text_encoder", staticmethod(loading.load_text_encoder)
    FILE_TIP = "The bigG text encoder, e.g. text_encoder/model.safetensors of stabilityai/stable-cascade, renamed."
    TAKES_OPERATIONS = False
    RETURN_TYPES, RETURN_NAMES = ("SCW_TEXT_ENCODER",), ("text_encoder",)


class ClipVisionLoader(_ModuleLoader):
    NODE_ID, TITLE = "SCW_ClipVisionLoader", "Load CLIP Vision"
    DESCRIPTION = ("Loads the CLIP ViT-L/14 vision model (openai/clip-vit-large-patch14, transformers layout) used "
                   "for image variations, from models/clip_vision.")
    FOLDERS, KIND, LOAD = ("clip_vision",), "clip_vision", staticmethod(loading.load_clip_vision)
    FILE_TIP = "The ViT-L/14 image encoder, e.g. image_encoder/model.safetensors of stabilityai/stable-cascade-prior."
    TAKES_OPERATIONS = False
    RETURN_TYPES, RETURN_NAMES = ("SCW_CLIP_VISION",), ("clip_vision",)


# Output order of the packaged loader: kind, socket type, socket name.
PACKAGED_OUTPUTS = (
    ("stage_c", "SCW_STAGE_C", "stage_c"),
    ("text_encoder", "SCW_TEXT_ENCODER", "text_encoder"),
    ("effnet", "SCW_EFFNET", "effnet"),
    ("previewer", "SCW_PREVIEWER", "previewer"),
    ("clip_vision", "SCW_CLIP_VISION", "clip_vision"),
    ("stage_b", "SCW_STAGE_B", "stage_b"),
    ("stage_a", "SCW_STAGE_A", "stage_a"),
)


class PackagedCheckpointLoader:
    NODE_ID, TITLE = "SCW_PackagedCheckpointLoader", "Load Packaged Checkpoint"
    DESCRIPTION = ("Loads one of ComfyUI's packaged checkpoints from models/checkpoints and returns every module it "
                   "holds: stable_cascade_stage_c.safetensors gives stage_c, text_encoder, effnet, previewer and "
                   "clip_vision; stable_cascade_stage_b.safetensors gives stage_b and stage_a. Using an output the "
                   "file does not hold fails with a message naming the file.")
    FOLDERS = ("checkpoints",)
    RETURN_TYPES = tuple(t for _, t, _ in PACKAGED_OUTPUTS)
    RETURN_NAMES = tuple(n for _, _, n in PACKAGED_OUTPUTS)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        tip = "stable_cascade_stage_c.safetensors or stable_cascade_stage_b.safetensors (ComfyUI's packaged files)."
        return {"required": {"file_name": (file_choices(cls.FOLDERS), {"tooltip": tip}),
                             "weight_dtype": _dtype_input()}}

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple:
        dtype = WEIGHT_DTYPES[weight_dtype]
        if file_name == DEMO_CHOICE:
            return tuple(host.wrap(demo_network(kind, dtype), kind) for kind, _, _ in PACKAGED_OUTPUTS)
        found = loading.load_packaged(host.model_path(self.FOLDERS, file_name), dtype=dtype,
                                      operations=host.operations())
        holds = ", ".join(sorted(found)) or "nothing usable"
        return tuple(host.wrap(found[kind], kind) if kind in found else Absent(kind, file_name, holds)
                     for kind, _, _ in PACKAGED_OUTPUTS)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    StageCLoader, StageBLoader, StageALoader, EffNetLoader, PreviewerLoader, TextEncoderLoader, ClipVisionLoader,
    PackagedCheckpointLoader,
)
