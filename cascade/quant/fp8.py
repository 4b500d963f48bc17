"""fp8 weights: float8 storage (e4m3fn or e5m2) expanded to the activation dtype layer by layer.

e4m3fn carries a per-tensor scale (``amax / 448``): measured on 1024x1024 random weights, the relative L2 error
of std-0.02 normal weights is 3.3% without and 2.6% with the scale, 28% vs 2.6% at std 0.002 (unscaled, small
weights fall into e4m3fn's subnormals), and values above 448 would not be representable at all. e5m2 has the
exponent range of fp16, so a scale changes nothing (5.3% either way) and its files are written without one,
readable by any tool as plain fp8. File layout (docs/QUANTIZED.md): the weight ``K`` as float8 and, when scaled,
``K`` with its trailing ``weight`` replaced by ``scale_weight`` as a float32 scalar (ComfyUI's scaled-fp8 key).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CascadeError
from .ops import QTensor

FORMATS = ("fp8_e4m3fn", "fp8_e5m2")
SCALED = {"fp8_e4m3fn": True, "fp8_e5m2": False}
_TORCH_NAMES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
SCALE_SUFFIX = "scale_weight"


def torch_dtype(fmt: str) -> torch.dtype:
    """The torch float8 dtype of ``fmt``; a clear error on a torch without it (float8 arrived in 2.1)."""
    if fmt not in _TORCH_NAMES:
        raise CascadeError(f"unknown fp8 format {fmt!r}; expected one of {list(FORMATS)}")
    dtype = getattr(torch, _TORCH_NAMES[fmt], None)
    if dtype is None:
        raise CascadeError(
            f"{fmt} weights need torch >= 2.1 (torch.{_TORCH_NAMES[fmt]}); this is torch {torch.__version__}. "
            "Upgrade torch (pip install -U torch) or pick the bf16 or fp32 weight dtype."
        )
    return dtype


def format_of(dtype: torch.dtype) -> str | None:
    """'fp8_e4m3fn' / 'fp8_e5m2' for a torch float8 dtype, else None."""
    return next((f for f, n in _TORCH_NAMES.items() if getattr(torch, n, None) == dtype), None)


def scale_key(key: str) -> str:
    """``a.weight`` -> ``a.scale_weight``; ``a.in_proj_weight`` -> ``a.in_proj_scale_weight``."""
    return key[: -len("weight")] + SCALE_SUFFIX if key.endswith("weight") else key + "." + SCALE_SUFFIX


def _expand(raw: torch.Tensor, qtype: str, shape: torch.Size, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    # float8 -> bf16/fp16/fp32 is exact; the scale is then one rounding in the activation dtype.
    w = raw.to(dtype)
    return w.mul_(scale) if scale is not None else w


def wrap(raw: torch.Tensor, scale: float | None, dense_dtype: torch.dtype) -> QTensor:
    """A float8 tensor (and its scale) as a QTensor that expands to ``dense_dtype`` by default."""
    return QTensor.wrap(raw, format_of(raw.dtype) or str(raw.dtype), raw.shape, dense_dtype, scale, _expand)


def quantize(t: torch.Tensor, fmt: str) -> QTensor:
    """A dense tensor as an fp8 QTensor (scaled for e4m3fn); expands to ``t``'s dtype by default."""
    dtype = torch_dtype(fmt)
    x = t.detach()
    scale = None
    if SCALED[fmt]:
        amax = float(x.abs().amax()) if x.numel() else 0.0
        scale = amax / torch.finfo(dtype).max if amax > 0 else 1.0
        raw = (x.to(torch.float32) / scale).to(dtype)
    else:
        raw = x.to(dtype)
    return wrap(raw, scale, t.dtype)


def to_file_tensors(key: str, t: Any) -> dict[str, torch.Tensor]:
    """What a safetensors file stores for ``key``: the float8 tensor and, when scaled, its scale."""
    if isinstance(t, QTensor) and t.qtype in FORMATS:
        out = {key: t.raw().contiguous()}
        if t.scale is not None:
            out[scale_key(key)] = torch.tensor(t.scale, dtype=torch.float32)
        return out
    return {key: t}
