"""Writing quantized files: GGUF (``stable_cascade`` architecture) and fp8 safetensors, from original-layout
state dicts. ``scripts/convert_weights.py`` is the command line; docs/QUANTIZED.md the file format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import CascadeError
from . import fp8, ggml, gguf_file
from .ops import QTensor
from .policy import THRESHOLD, should_quantize

log = logging.getLogger(__name__)

GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "F16", "BF16", "F32")
# When a tensor's size is not a multiple of a K format's 256-value block: llama.cpp's fallbacks.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_GGUF_DENSE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.dense(torch.float32) if isinstance(t, QTensor) else t


def _pick_type(key: str, t: torch.Tensor, qtype: str, threshold: int) -> str:
    # Kept tensors keep the source's precision (a bf16 release stays bf16: exact, and no larger than it was).
    kept = _GGUF_DENSE.get(t.dtype, "F32")
    if qtype in ("F16", "BF16", "F32"):
        return qtype if t.dim() >= 2 else kept
    if not should_quantize(key, tuple(t.shape), threshold):
        return kept
    while qtype in ggml.BLOCK and t.numel() % ggml.BLOCK[qtype]:
        qtype = _FALLBACK.get(qtype, "keep")
    if qtype == "keep":
        return kept
    return qtype


def write_gguf(path: str | Path, sd: Mapping[str, torch.Tensor], kind: str, qtype: str,
               threshold: int = THRESHOLD, dense_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Write ``sd`` (original-layout keys of a ``kind`` network) as a GGUF; returns the count of each type.

    The large matrices become ``qtype``; other tensors keep their dtype (vectors F32), see ``policy``.
    ``dense_dtype`` is recorded as what a plain expansion gives (the source's precision).
    """
    import gguf

    if qtype not in GGUF_TYPES:
        raise CascadeError(f"unknown GGUF type {qtype!r}; expected one of {list(GGUF_TYPES)}")
    writer = gguf.GGUFWriter(str(path), gguf_file.ARCH)
    writer.add_string(gguf_file.KEY_KIND, kind)
    writer.add_string(gguf_file.KEY_DTYPE, _DTYPE_NAMES.get(dense_dtype, "bfloat16"))
    writer.add_uint32(gguf_file.KEY_VERSION, gguf_file.FORMAT_VERSION)
    writer.add_string("general.name", f"Stable Cascade {kind} {qtype}")
    counts: dict[str, int] = {}
    for key in sorted(sd):
        t = _dense(sd[key])
        if not t.is_floating_point():
            raise CascadeError(f"{key}: {t.dtype} tensors cannot be written to a Stable Cascade GGUF (weights are "
                               "floating point)")
        target = _pick_type(key, t, qtype, threshold)
        counts[target] = counts.get(target, 0) + 1
        gtype = gguf.GGMLQuantizationType[target]
        shape = tuple(t.shape)
        if target in ggml.BLOCK and (not shape or shape[-1] % ggml.BLOCK[target]):
            # Blocks run along the flattened tensor; stored as rows of one block, shape kept in metadata.
            writer.add_array(gguf_file.ORIG_SHAPE + key, [int(s) for s in shape])
            t = t.reshape(-1, ggml.BLOCK[target])
        if target in ("Q4_K", "Q5_K"):
            data = ggml.quantize_k(t, target).reshape(*t.shape[:-1], -1).numpy()
        elif target == "BF16":
            data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
            data = data.reshape(*t.shape[:-1], -1)
        else:
            data = gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), gtype)
        writer.add_tensor(key, data, raw_dtype=gtype if target not in ("F16", "F32") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("ComfyUI-StableCascade: wrote %s (%s)", path, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return counts


def fp8_state_dict(sd: Mapping[str, torch.Tensor], fmt: str, threshold: int = THRESHOLD,
                   ) -> dict[str, torch.Tensor]:
    """``sd`` with its large matrices quantized to ``fmt`` (QTensors), the rest as it was."""
    fp8.torch_dtype(fmt)
    out = {}
    for key, t in sd.items():
        if isinstance(t, QTensor) or not t.is_floating_point() or not should_quantize(key, tuple(t.shape), threshold):
            out[key] = t
        else:
            out[key] = fp8.quantize(t, fmt)
    return out


def write_fp8(path: str | Path, sd: Mapping[str, torch.Tensor], kind: str, fmt: str,
              threshold: int = THRESHOLD) -> int:
    """Write ``sd`` as an fp8 safetensors file; returns how many tensors were stored as fp8."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    n = 0
    for key, t in fp8_state_dict({k: _dense(v) for k, v in sd.items()}, fmt, threshold).items():
        n += isinstance(t, QTensor)
        tensors.update(fp8.to_file_tensors(key, t))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"stable_cascade.kind": kind, "stable_cascade.format": fmt})
    log.info("ComfyUI-StableCascade: wrote %s (%d tensors %s)", path, n, fmt)
    return n
