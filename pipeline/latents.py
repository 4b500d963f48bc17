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
from ..cascade.image_ops import stage_c_latent_size
from .settings import check_number

log = logging.getLogger(__name__)

STAGE_CHANNELS = {"c": 16, "b": 4}
PIXEL_MULTIPLE = 8  # Stage B's latent (H/4) must be even for its PixelUnshuffle(2)
MAX_RESOLUTION = 16384
DEFAULT_COMPRESSION = 42.67
# Pixels per Stage C cell that Stage B accepts (trained on 32-64; the official 42.67; EmptyLatent allows 16-64).
COMPRESSION_RANGE = (12.0, 80.0)
# What SCW_EmptyLatent declares and empty_latents() enforces (one table for the node and the Python API).
EMPTY_LATENT_RANGES: dict[str, tuple[float, float]] = {
    "width": (256, MAX_RESOLUTION), "height": (256, MAX_RESOLUTION), "batch_size": (1, 64),
    "compression": (16.0, 64.0),
}


def latent_samples(latent: Any, stage: str, what: str) -> torch.Tensor:
    """The tensor of a LATENT dict (or a bare tensor), checked once: 4-D, the stage's channels, not tagged
    as the other stage, and finite. ``what`` names the input in messages."""
    tagged = None
    if isinstance(latent, dict):
        tagged = latent.get("scw_stage")
        latent = latent.get("samples")
    if not isinstance(latent, torch.Tensor):
        raise CascadeError(f"{what}: expected a LATENT (a tensor or a dict with 'samples'), got "
                           f"{type(latent).__name__} - connect a LATENT output such as the outputs of 'Stable Cascade "
                           "Empty Latent'")
    want = STAGE_CHANNELS[stage]
    other = "b" if stage == "c" else "c"
    if tagged == other or latent.ndim != 4 or latent.shape[1] != want:
        found = {16: "a Stage C latent (16 channels)", 4: "a Stage B latent (4 channels)"}.get(
            latent.shape[1] if latent.ndim == 4 else -1, "a tensor")
        if tagged == other:
            found = f"a Stage {other.upper()} latent"
        raise StageMismatchError(
            f"{what}: got {found} of shape {tuple(latent.shape)}; Stage {stage.upper()} needs B x {want} x h x w - "
            f"connect the stage_{stage} output of 'Stable Cascade Empty Latent' (or of the Stage {stage.upper()} "
            "sampler)")
    if not torch.isfinite(latent).all():
        bad = int((~torch.isfinite(latent)).sum())
        raise CascadeError(f"{what}: the latent holds {bad} NaN/inf values of {latent.numel()} (shape "
                           f"{tuple(latent.shape)}), so no image can come of it - the node that made it (or the "
                           "tensor given here) is numerically broken; the error of that node, or a check of its "
                           "weights file, tells which")
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
    """value rounded to the nearest multiple of 8, logging when it changes; a value below 8 or above
    MAX_RESOLUTION (or not a finite number) is refused, never turned into 8."""
    check_number(value, name, PIXEL_MULTIPLE, MAX_RESOLUTION, integer=True,
                 fix=f"give a size in pixels, a multiple of {PIXEL_MULTIPLE}")
    snapped = int(math.floor(value / PIXEL_MULTIPLE + 0.5)) * PIXEL_MULTIPLE
    if snapped != value:
        log.warning("ComfyUI-StableCascade: %s %d is not a multiple of %d; using %d (Stage B needs an even latent).",
                    name, value, PIXEL_MULTIPLE, snapped)
    return snapped


def finite_output(x: torch.Tensor, what: str, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` if every value is finite; else a CascadeError naming ``what`` (e.g. "the Stage C sampler's
    output"), how many values are NaN/inf, the weights' dtype and the fix for that dtype."""
    if torch.isfinite(x).all():
        return x
    bad = int((~torch.isfinite(x)).sum())
    raise CascadeError(f"{what} holds {bad} NaN/inf values of {x.numel()} (weights {dtype_name(dtype)}) - "
                       f"{nonfinite_fix(dtype)}")


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", "") if dtype is not None else "of unknown dtype")


def nonfinite_fix(dtype: torch.dtype | None) -> str:
    """What to do about NaN/inf coming out of a network whose weights are ``dtype``."""
    if dtype == torch.float16:
        return ("fp16 overflowed (Stage C and Stage B run fp16 with a scaled residual stream, docs/FP16.md, but these "
                "values still left its range): load the model with weight_dtype bf16 or fp32 (or a bf16/fp32 file)")
    return ("the weights file may hold NaN/inf values (a broken download or conversion): download it again or "
            "check it (every tensor finite), and check what was applied to it (a LoRA at a very high strength)")


def latent_sizes(width: int, height: int, compression: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h_c, w_c), (h_b, w_b)) for an image of width x height: Stage C by ``image_ops.stage_c_latent_size``
    (a whole-number compression as core's ``side // c``, a fractional one as the official ``ceil(side / c)``),
    Stage B ceil(side / 4)."""
    stage_c = (stage_c_latent_size(height, compression), stage_c_latent_size(width, compression))
    stage_b = (math.ceil(height / 4), math.ceil(width / 4))
    return stage_c, stage_b


def empty_latents(width: int, height: int, batch_size: int = 1,
                  compression: float = DEFAULT_COMPRESSION) -> tuple[dict, dict]:
    """Empty Stage C and Stage B LATENTs for an image of width x height (sides snapped to multiples of 8);
    values outside ``EMPTY_LATENT_RANGES`` (SCW_EmptyLatent's ranges) are refused."""
    for name, value in (("width", width), ("height", height), ("batch_size", batch_size),
                        ("compression", compression)):
        low, high = EMPTY_LATENT_RANGES[name]
        check_number(value, name, low, high, integer=name != "compression", where="empty latent",
                     fix="'Stable Cascade Empty Latent' allows the same range")
    width, height = snap_size(width, "width"), snap_size(height, "height")
    (h_c, w_c), (h_b, w_b) = latent_sizes(width, height, compression)
    return (stage_latent(torch.zeros(int(batch_size), 16, h_c, w_c), "c"),
            stage_latent(torch.zeros(int(batch_size), 4, h_b, w_b), "b"))


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
            "take both from one 'Stable Cascade Empty Latent' (same width, height)")
