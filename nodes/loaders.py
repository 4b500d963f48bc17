"""Loader nodes: one per released module, plus ComfyUI's packaged checkpoints.

Files are listed from ComfyUI's model folders through ``host`` (the folders and the loader titles come from
``nodes/kinds.py``); the file's kind is checked by its keys (``cascade.loading``), never by its name. Every list
ends with the tiny random demo network; a file that is not installed fails validation (``VALIDATE_INPUTS``) with a
message saying what it is, which folder it belongs in and where the release lives.
"""

from __future__ import annotations

from typing import Any

from .. import host
from ..cascade import loading
from .common import DEMO_CHOICE, FP8_WEIGHTS, WEIGHT_DTYPES, Absent, category, dtype_input, file_choices, mappings
from .kinds import NODE_KINDS, check_file, demo_network, demo_result, explained, load_network

CATEGORY = category("loaders")


class _ModuleLoader:
    """One safetensors file -> one wrapped network. Subclasses set KIND, NODE_ID, DESCRIPTION and FILE_TIP."""

    KIND = ""
    FILE_TIP = ""
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def __init_subclass__(cls) -> None:
        entry = NODE_KINDS[cls.KIND]
        cls.TITLE, cls.FOLDERS = entry.title, entry.folders
        cls.RETURN_TYPES, cls.RETURN_NAMES = (entry.socket,), (cls.KIND,)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "file_name": (file_choices(cls.FOLDERS), {"tooltip": cls.FILE_TIP}),
            "weight_dtype": dtype_input(),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None = None) -> bool | str:
        return check_file(cls.KIND, file_name)

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple[Any] | dict:
        outputs = (load_network(self.KIND, file_name, weight_dtype),)
        return demo_result(self.KIND, outputs) if file_name == DEMO_CHOICE else outputs


class StageCLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_StageCLoader", "stage_c"
    DESCRIPTION = ("Loads the Stage C prior (3.6B or 1B lite; original, diffusers or ComfyUI layout; bf16/fp32, fp8 "
                   "or GGUF weights) from models/diffusion_models or models/unet.")
    FILE_TIP = ("A Stage C file, e.g. stage_c_bf16.safetensors or stage_c_lite_bf16.safetensors, or an fp8/GGUF file "
                "written by scripts/convert_weights.py.")


class StageBLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_StageBLoader", "stage_b"
    DESCRIPTION = ("Loads the Stage B decoder (1.5B or 700M lite; original, diffusers or ComfyUI layout; bf16/fp32, "
                   "fp8 or GGUF weights) from models/diffusion_models or models/unet.")
    FILE_TIP = ("A Stage B file, e.g. stage_b_bf16.safetensors or stage_b_lite_bf16.safetensors, or an fp8/GGUF file "
                "written by scripts/convert_weights.py.")


class StageALoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_StageALoader", "stage_a"
    DESCRIPTION = "Loads Stage A, the VQGAN that turns Stage B latents into pixels, from models/vae."
    FILE_TIP = "stage_a.safetensors (20M parameters)."


class EffNetLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_EffNetLoader", "effnet"
    DESCRIPTION = ("Loads the EfficientNetV2-S encoder that maps images into Stage C latents (image-to-image, "
                   "reconstruction) from models/vae.")
    FILE_TIP = "effnet_encoder.safetensors."


class PreviewerLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_PreviewerLoader", "previewer"
    DESCRIPTION = "Loads the Previewer that turns Stage C latents into 8x RGB previews, from models/vae."
    FILE_TIP = "previewer.safetensors."


class TextEncoderLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_TextEncoderLoader", "text_encoder"
    DESCRIPTION = ("Loads the CLIP ViT-bigG/14 text encoder shared by Stage C and Stage B (transformers, open_clip "
                   "or ComfyUI layout) from models/text_encoders or models/clip.")
    FILE_TIP = "The bigG text encoder, e.g. text_encoder/model.safetensors of stabilityai/stable-cascade, renamed."


class ClipVisionLoader(_ModuleLoader):
    NODE_ID, KIND = "SCW_ClipVisionLoader", "clip_vision"
    DESCRIPTION = ("Loads the CLIP ViT-L/14 vision model (openai/clip-vit-large-patch14, transformers layout) used "
                   "for image variations, from models/clip_vision.")
    FILE_TIP = "The ViT-L/14 image encoder, e.g. image_encoder/model.safetensors of stabilityai/stable-cascade-prior."


# Output order of the packaged loader (socket names are the kinds).
PACKAGED_OUTPUTS = ("stage_c", "text_encoder", "effnet", "previewer", "clip_vision", "stage_b", "stage_a")


class PackagedCheckpointLoader:
    NODE_ID, TITLE = "SCW_PackagedCheckpointLoader", NODE_KINDS["packaged"].title
    DESCRIPTION = ("Loads one of ComfyUI's packaged checkpoints from models/checkpoints and returns every module it "
                   "holds: stable_cascade_stage_c.safetensors gives stage_c, text_encoder, effnet, previewer and "
                   "clip_vision; stable_cascade_stage_b.safetensors gives stage_b and stage_a. Using an output the "
                   "file does not hold fails with a message naming the file.")
    FOLDERS = NODE_KINDS["packaged"].folders
    RETURN_TYPES = tuple(NODE_KINDS[k].socket for k in PACKAGED_OUTPUTS)
    RETURN_NAMES = PACKAGED_OUTPUTS
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        tip = "stable_cascade_stage_c.safetensors or stable_cascade_stage_b.safetensors (ComfyUI's packaged files)."
        return {"required": {"file_name": (file_choices(cls.FOLDERS), {"tooltip": tip}),
                             "weight_dtype": dtype_input()}}

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None = None) -> bool | str:
        return check_file("packaged", file_name)

    def load(self, file_name: str, weight_dtype: str = "default") -> tuple | dict:
        dtype = WEIGHT_DTYPES[weight_dtype]
        if file_name == DEMO_CHOICE:
            demos = tuple(host.wrap(demo_network(kind, dtype), kind) for kind in PACKAGED_OUTPUTS)
            return demo_result("packaged", demos)
        quantize = weight_dtype if weight_dtype in FP8_WEIGHTS else None
        with explained():
            # The U-Nets are built with the dequantizing layers when fp8 is asked for (loading swaps them in).
            found = loading.load_packaged(host.model_path(self.FOLDERS, file_name), dtype=dtype,
                                          operations=host.operations(), quantize=quantize)
        holds = ", ".join(sorted(found)) or "nothing usable"
        return tuple(host.wrap(found[kind], kind) if kind in found else Absent(kind, file_name, holds)
                     for kind in PACKAGED_OUTPUTS)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    StageCLoader, StageBLoader, StageALoader, EffNetLoader, PreviewerLoader, TextEncoderLoader, ClipVisionLoader,
    PackagedCheckpointLoader,
)
