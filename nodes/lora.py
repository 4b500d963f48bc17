"""LoRA nodes: Stage C LoRAs (official and community layouts) with learned tokens, stackable.

The work is done by ``model_patches.lora``: the Stage C output is a patched clone of the input (the loaded
model is never changed), the text-encoder output a twin holding the learned tokens. See docs/LORA.md.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import host
from ..cascade.errors import CascadeError
from ..cascade.lora_format import LoraFile, parse_lora, read_lora_file
from ..model_patches import lora as lora_patches
from .common import DEMO_CHOICE, category, file_choices, mappings, require
from .kinds import FIX, NODE_KINDS, check_file, demo_result, explained

log = logging.getLogger(__name__)

CATEGORY = category("lora")
FOLDERS = NODE_KINDS["lora"].folders
_TOKENS_TIP = ("Learned tokens of an official LoRA, one a line in training order: [name]=init_regex, e.g. "
               "[fernando]=^dog</w> (the train_tokens of its training config; the file stores only their ids). "
               "Use the names in prompts. Leave empty for LoRAs without learned tokens.")


def _strength(what: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                      "tooltip": f"How strongly the LoRA changes {what}: 1 as trained, 0 off, negative inverts."})


def _lora_input() -> tuple:
    return (file_choices(FOLDERS), {"tooltip": "A Stable Cascade Stage C LoRA from models/loras: the official "
                                               "trainer's file or a kohya/OneTrainer/ComfyUI one (lora_prior_unet_)."})


def read_lora(name: str, stage_c: Any, n_tokens: int, text_width: int) -> LoraFile:
    """The LoRA file ``name``; the demo choice makes a random one fitting the connected Stage C."""
    if name == DEMO_CHOICE:
        log.warning("ComfyUI-StableCascade: using a TINY RANDOM LoRA (the demo choice); put a Stage C LoRA "
                    "into models/loras/ and pick it in the LoRA loader.")
        return parse_lora(lora_patches.demo_lora(host.module_of(stage_c), n_tokens, text_width), "demo LoRA")
    with explained():
        return read_lora_file(host.model_path(FOLDERS, name))


def _check_tokens_field(tokens: str | None) -> bool | str:
    try:
        lora_patches.parse_tokens(tokens or "")
    except CascadeError as exc:
        return str(exc)
    return True


class LoraLoader:
    NODE_ID, TITLE = "SCW_LoraLoader", "Load Stage C LoRA"
    DESCRIPTION = ("Applies a Stage C LoRA to a clone of the Stage C model (the loaded model stays unchanged, so "
                   "other workflows can share it) and adds its learned tokens, such as [fernando], to a copy of the "
                   "text encoder. Chain several to stack LoRAs. Reads the official layout (rank-4 attention LoRA + "
                   "token embeddings) and the kohya/OneTrainer/ComfyUI layout.")
    RETURN_TYPES = ("SCW_STAGE_C", "SCW_TEXT_ENCODER")
    RETURN_NAMES = ("stage_c", "text_encoder")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    FOLDERS = FOLDERS

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_c": ("SCW_STAGE_C", {"tooltip": "The Stage C model (or the output of another LoRA loader)."}),
            "text_encoder": ("SCW_TEXT_ENCODER", {"tooltip": "The text encoder (or the output of another LoRA "
                                                             "loader); connect its output to the text encode nodes."}),
            "file_name": _lora_input(),
            "strength_model": _strength("Stage C"),
            "strength_text": _strength("the text encoder (learned-token embeddings and text weights)"),
            "tokens": ("STRING", {"default": "", "multiline": True, "tooltip": _TOKENS_TIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None = None, tokens: str | None = None) -> bool | str:
        found = check_file("lora", file_name)
        return _check_tokens_field(tokens) if found is True else found

    def apply(self, stage_c: Any, text_encoder: Any, file_name: str, strength_model: float, strength_text: float,
              tokens: str = "") -> tuple[Any, Any] | dict:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        encoder = require(text_encoder, "text_encoder", self.NODE_ID, "a text encoder", FIX["text_encoder"])
        typed = lora_patches.parse_tokens(tokens)
        width = host.module_of(encoder).text_model.embeddings.token_embedding.weight.shape[1]
        lora = read_lora(file_name, model, len(typed), width)
        outputs = lora_patches.apply_lora(model, encoder, lora, strength_model, strength_text, typed)
        return demo_result("lora", outputs) if file_name == DEMO_CHOICE else outputs


class LoraLoaderModelOnly:
    NODE_ID, TITLE = "SCW_LoraLoaderModelOnly", "Load Stage C LoRA (model only)"
    DESCRIPTION = ("Applies only the Stage C part of a LoRA to a clone of the Stage C model; learned tokens and "
                   "text-encoder weights are skipped (logged). Use 'Stable Cascade Load Stage C LoRA' for LoRAs with "
                   "learned tokens.")
    RETURN_TYPES = ("SCW_STAGE_C",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    FOLDERS = FOLDERS

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_c": ("SCW_STAGE_C", {"tooltip": "The Stage C model (or the output of another LoRA loader)."}),
            "file_name": _lora_input(),
            "strength_model": _strength("Stage C"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, file_name: str | None = None) -> bool | str:
        return check_file("lora", file_name)

    def apply(self, stage_c: Any, file_name: str, strength_model: float) -> tuple[Any] | dict:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        lora = read_lora(file_name, model, 0, 1280)
        outputs = (lora_patches.apply_lora(model, None, lora, strength_model)[0],)
        return demo_result("lora", outputs) if file_name == DEMO_CHOICE else outputs


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(LoraLoader, LoraLoaderModelOnly)
