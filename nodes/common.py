"""Naming, socket checks and shared widget specs of the pack's nodes (no node classes here)."""

from __future__ import annotations

from typing import Any

import torch

from ..cascade.errors import CascadeError, StageMismatchError

PREFIX = "SCW_"
ROOT_CATEGORY = "stable_cascade_wurst"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
STAGE_CHANNELS = {"c": 16, "b": 4}
STAGE_NAMES = {"c": "Stage C", "b": "Stage B"}


def category(family: str) -> str:
    return f"{ROOT_CATEGORY}/{family}"


def display_name(title: str) -> str:
    return f"{title} (SCW)"


def mappings(*classes: type) -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS of one family; each class carries NODE_ID and TITLE."""
    return ({c.NODE_ID: c for c in classes}, {c.NODE_ID: display_name(c.TITLE) for c in classes})


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
            f"{node}: input {socket!r} needs {what}, but {value.source!r} does not contain one (it holds "
            f"{value.holds}) - {fix}"
        )
    if value is None:
        raise CascadeError(f"{node}: input {socket!r} needs {what} and got nothing - {fix}")
    return value


def latent_samples(latent: Any, stage: str, socket: str, node: str) -> torch.Tensor:
    """The samples of a LATENT checked to belong to ``stage`` ("c" or "b") by tag and channel count."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise CascadeError(f"{node}: input {socket!r} expects a LATENT dict with 'samples', got "
                           f"{type(latent).__name__} - connect a LATENT output (e.g. SCW_EmptyLatent)")
    samples = latent["samples"]
    other = "b" if stage == "c" else "c"
    tagged_other = latent.get("scw_stage") == other
    if tagged_other or samples.ndim != 4 or samples.shape[1] != STAGE_CHANNELS[stage]:
        found = STAGE_NAMES[other] + " latent" if tagged_other else "a latent"
        raise StageMismatchError(
            f"{node}: input {socket!r} got {found} of shape {tuple(samples.shape)}; {STAGE_NAMES[stage]} expects "
            f"B x {STAGE_CHANNELS[stage]} x h x w - connect the stage_{stage} output of SCW_EmptyLatent "
            f"(or of the {STAGE_NAMES[stage]} sampler)"
        )
    return samples


def stage_latent(samples: torch.Tensor, stage: str, source: dict | None = None) -> dict:
    """A LATENT dict tagged with its stage; keeps the source's batch_index so batches stay addressable."""
    out = {"samples": samples, "scw_stage": stage}
    if source is not None and "batch_index" in source:
        out["batch_index"] = source["batch_index"]
    return out


def images_from_bchw(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W network output -> ComfyUI IMAGE (B x H x W x 3, float32, CPU, clamped to [0, 1])."""
    return x.float().clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu()


def seed_input(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "step": 1, "control_after_generate": True,
                    "tooltip": tooltip})
