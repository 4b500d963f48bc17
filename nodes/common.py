"""Naming, socket checks and shared widget specs of the pack's nodes (no node classes here)."""

from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..cascade.errors import CascadeError
from ..pipeline.settings import SETTING_RANGES, SamplingSettings
from ..samplers.sampling import SAMPLERS
from ..samplers.schedule import SCHEDULERS

# What users search for: every category is "Stable Cascade/<family>" and every display name starts with
# "Stable Cascade ", so the node library and the search box find all nodes under "cascade". Ids (SCW_*) never change.
ROOT_CATEGORY = "Stable Cascade"
NAME_PREFIX = "Stable Cascade "
SEED_MAX = 0xFFFFFFFFFFFFFFFF
# Always the last choice of a loader's file list, so trying a workflow with no weights is an explicit pick.
DEMO_CHOICE = "(tiny random demo)"
# fp16: for GPUs without bf16; Stage C/B then run their fp16 mode (a scaled residual stream, docs/FP16.md).
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# fp8 choices are a storage format, not a compute dtype: the large matrices are stored as float8 and expanded
# to the activation dtype layer by layer (cascade/quant). Loaders act on the name (nodes/kinds.load_network);
# None: the tensors kept dense keep the file's dtype.
FP8_WEIGHTS = ("fp8_e4m3fn", "fp8_e5m2")
WEIGHT_DTYPES.update(dict.fromkeys(FP8_WEIGHTS))
_DTYPE_TIP = ("Weight dtype: 'default' keeps the file's dtype; 'bf16' halves memory (the release was trained in "
              "bf16); 'fp32' for GPUs without bf16; 'fp8_e4m3fn'/'fp8_e5m2' store the large matrices as fp8 "
              "(about half the bf16 memory), computed in bf16/fp32 layer by layer; GGUF and fp8 files load as "
              "stored. 'fp16' for GPUs without bf16: Stage C/B run a scaled residual stream that stays finite in fp16 "
              "(docs/FP16.md).")


def category(family: str) -> str:
    return f"{ROOT_CATEGORY}/{family}"


def display_name(title: str) -> str:
    """What the node menu, the search box and every message call a node ('Stable Cascade Load Stage C')."""
    return f"{NAME_PREFIX}{title}"


# node id -> display name of every node of the pack (filled by ``mappings`` as the families are imported), so
# messages name nodes as users see them.
DISPLAY_NAMES: dict[str, str] = {}


def mappings(*classes: type) -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS of one family; each class carries NODE_ID and TITLE."""
    names = {c.NODE_ID: display_name(c.TITLE) for c in classes}
    DISPLAY_NAMES.update(names)
    for c in classes:
        c.NAME = names[c.NODE_ID]  # what the node's own messages call it
    return {c.NODE_ID: c for c in classes}, names


def name_of(node_id: str) -> str:
    """The display name of a node id ('SCW_StageCSampler' -> 'Stable Cascade Stage C Sampler'); other text as is."""
    return DISPLAY_NAMES.get(node_id, node_id)


class Absent:
    """Stands for a model a packaged checkpoint does not hold, so the node that needs it can say which file."""

    def __init__(self, kind: str, source: str, holds: str) -> None:
        self.kind, self.source, self.holds = kind, source, holds

    def __repr__(self) -> str:
        return f"Absent({self.kind!r} from {self.source!r})"


def require(value: Any, socket: str, node: str, what: str, fix: str) -> Any:
    """The model connected to socket, or a CascadeError naming where it should have come from."""
    if isinstance(value, Absent):
        raise CascadeError(
            f"{name_of(node)}: input {socket!r} needs {what}, but {value.source!r} does not contain one (it holds "
            f"{value.holds}) - {fix}"
        )
    if value is None:
        raise CascadeError(f"{name_of(node)}: input {socket!r} needs {what} and got nothing - {fix}")
    return value


def file_choices(folders: tuple[str, ...]) -> list[str]:
    """The weights files of these model folders, then the demo choice (the only one when they hold none)."""
    return [*host.model_files(folders), DEMO_CHOICE]


def dtype_input() -> tuple:
    return (list(WEIGHT_DTYPES), {"default": "default", "tooltip": _DTYPE_TIP})


def seed_input(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "step": 1, "control_after_generate": True,
                    "tooltip": tooltip})


def schedule_inputs(defaults: SamplingSettings, stage: str) -> dict:
    """seed, steps, cfg, shift, sampler, rescale, denoise widgets with a stage's defaults; the ranges are
    ``pipeline.settings.SETTING_RANGES``, the ones ``SamplingSettings.check()`` enforces."""
    r = {name: {"min": low, "max": high} for name, (low, high) in SETTING_RANGES.items()}
    return {
        "seed": seed_input(f"Noise seed of {stage}; the same seed gives the same image on any device."),
        "steps": ("INT", {"default": defaults.steps, **r["steps"], "step": 1,
                          "tooltip": f"Sampling steps of {stage}."}),
        "cfg": ("FLOAT", {"default": defaults.cfg, **r["cfg"], "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale; 1 skips the negative branch (faster)."}),
        "shift": ("FLOAT", {"default": defaults.shift, **r["shift"], "step": 0.05,
                            "tooltip": "Noise schedule shift (logSNR - 2 ln shift); the official value is 2 for "
                                       "Stage C and 1 for Stage B."}),
        "sampler": (list(SAMPLERS), {"default": defaults.sampler, "tooltip": (
            "Sampler; ddpm is the official one (its output is the last predicted x0); the others are core's "
            "k-diffusion samplers of the same names.")}),
        "rescale": ("FLOAT", {"default": defaults.rescale, **r["rescale"], "step": 0.01,
                              "tooltip": "CFG rescale (official 0.7 for both stages, GDF's cfg_rho): pulls the "
                                         "guided prediction's std back toward the conditional one."}),
        "denoise": ("FLOAT", {"default": defaults.denoise, **r["denoise"], "step": 0.01,
                              "tooltip": "1 samples from pure noise; lower starts from the input latent noised to "
                                         "this level (image-to-image); all steps run from there."}),
    }


def scheduler_input(defaults: SamplingSettings) -> dict:
    """The scheduler widget, for a sampler node's *optional* inputs: it is the newest widget, so it comes after
    all others (UI workflows saved before it keep their widget positions) and an API prompt without it still
    validates, in ComfyUI and in the standalone runner, and runs with the default."""
    return {"scheduler": (list(SCHEDULERS), {"default": defaults.scheduler, "tooltip": (
        "Noise levels the steps walk through: official is GDF's cosine schedule (linear in t); the others are "
        "core's schedulers on the same schedule, ending at sigma 0.")})}


def conditioning_input(what: str) -> tuple:
    return ("CONDITIONING", {"tooltip": f"{what} prompt, from 'Stable Cascade Text Encode' or core's CLIPTextEncode "
                                        "with a stable_cascade CLIP."})
