"""LATENT values: the one check that a latent belongs to a stage, stage tags, and latent sizes.

A Stage C LATENT is ``{"samples": B x 16 x h x w}`` (EffNet space), a Stage B one ``{"samples": B x 4 x h x w}``
in core's SC_B storage (docs/DESIGN.md). The pack tags the dicts it makes with ``"scw_stage"``, which names a
mismatch; core's latents carry no tag and are checked by their channels.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..cascade.errors import CascadeError, ShapeError, StageMismatchError

log = logging.getLogger(__name__)

STAGE_CHANNELS = {"c": 16, "b": 4}
PIXEL_MULTIPLE = 8  # Stage B's latent (H/4) must be even for its PixelUnshuffle(2)
MAX_RESOLUTION = 16384
DEFAULT_COMPRESSION = 42.67
# Pixels per Stage C cell that Stage B accepts (trained on 32-64; the official 42.67; EmptyLatent allows 16-64).
COMPRESSION_RANGE = (12.0, 80.0)


def latent_samples(latent: Any, stage: str, what: str) -> torch.Tensor:
    """The tensor of a LATENT dict (or a bare tensor), checked once: 4-D, the stage's channels, not tagged
    as the other stage, and finite. ``what`` names the input in messages."""
    tagged = None
    if isinstance(latent, dict):
        tagged = latent.get("scw_stage")
        latent = latent.get("samples")
    if not isinstance(latent, torch.Tensor):
        raise CascadeError(f"{what}: expected a LATENT (a tensor or a dict with 'samples'), got "
                           f"{type(latent).__name__} - connect a LATENT output such as SCW_EmptyLatent's")
    want = STAGE_CHANNELS[stage]
    other = "b" if stage == "c" else "c"
    if tagged == other or latent.ndim != 4 or latent.shape[1] != want:
        found = {16: "a Stage C latent (16 channels)", 4: "a Stage B latent (4 channels)"}.get(
            latent.shape[1] if latent.ndim == 4 else -1, "a tensor")
        if tagged == other:
            found = f"a Stage {other.upper()} latent"
        raise StageMismatchError(
            f"{what}: got {found} of shape {tuple(latent.shape)}; Stage {stage.upper()} needs B x {want} x h x w - "
            f"connect the stage_{stage} output of SCW_EmptyLatent (or of the Stage {stage.upper()} sampler)")
    if not torch.isfinite(latent).all():
        bad = int((~torch.isfinite(latent)).sum())
        raise CascadeError(f"{what}: the latent holds {bad} NaN/inf values (shape {tuple(latent.shape)}) - the "
                           "node that made it failed numerically (fp16 overflow?); use bf16 or fp32 weights")
    return latent


def batch_index(latent: Any) -> list[int] | None:
    """The ``batch_index`` a LATENT dict carries (core's batch nodes set it), else None."""
    return latent.get("batch_index") if isinstance(latent, dict) else None


def stage_latent(samples: torch.Tensor, stage: str, source: Any = None) -> dict:
    """A LATENT dict tagged with its stage; keeps the source's batch_index so batches stay addressable."""
    out = {"samples": samples, "scw_stage": stage}
    if isinstance(source, dict) and "batch_index" in source:
        out["batch_index"] = source["batch_index"]
    return out


def snap_size(value: int, name: str) -> int:
    """value rounded to the nearest multiple of 8 (at least 8), logging when it changes."""
    snapped = max(PIXEL_MULTIPLE, int(math.floor(value / PIXEL_MULTIPLE + 0.5)) * PIXEL_MULTIPLE)
    if snapped != value:
        log.warning("ComfyUI-StableCascade: %s %d is not a multiple of %d; using %d (Stage B needs an even latent).",
                    name, value, PIXEL_MULTIPLE, snapped)
    return snapped


def latent_sizes(width: int, height: int, compression: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h_c, w_c), (h_b, w_b)) for an image of width x height, as the official calculate_latent_sizes:
    Stage C ceil(side / compression), Stage B ceil(side / 4)."""
    stage_c = (math.ceil(height / compression), math.ceil(width / compression))
    stage_b = (math.ceil(height / 4), math.ceil(width / 4))
    return stage_c, stage_b


def empty_latents(width: int, height: int, batch_size: int = 1,
                  compression: float = DEFAULT_COMPRESSION) -> tuple[dict, dict]:
    """Empty Stage C and Stage B LATENTs for an image of width x height (sides snapped to multiples of 8)."""
    width, height = snap_size(width, "width"), snap_size(height, "height")
    (h_c, w_c), (h_b, w_b) = latent_sizes(width, height, compression)
    return (stage_latent(torch.zeros(batch_size, 16, h_c, w_c), "c"),
            stage_latent(torch.zeros(batch_size, 4, h_b, w_b), "b"))


def check_pair(stage_c: torch.Tensor, stage_b: torch.Tensor) -> None:
    """Raise when a Stage C latent and a Stage B latent cannot belong to the same image."""
    (bc, _, hc, wc), (bb, _, hb, wb) = stage_c.shape, stage_b.shape
    comp_h, comp_w = 4 * hb / hc, 4 * wb / wc
    lo, hi = COMPRESSION_RANGE
    if bc not in (1, bb):
        raise ShapeError(f"the Stage C latent has batch {bc} and the Stage B latent batch {bb}; make them equal")
    if not (lo <= comp_h <= hi and lo <= comp_w <= hi) or max(comp_h, comp_w) > 1.35 * min(comp_h, comp_w):
        raise ShapeError(
            f"the Stage C latent {hc}x{wc} and the Stage B latent {hb}x{wb} do not belong to one image "
            f"({comp_h:.1f} x {comp_w:.1f} pixels per Stage C cell; expected {lo:g}-{hi:g}, the same both ways) - "
            "take both from one SCW_EmptyLatent (same width, height)")
