"""Reading GGUF files of Stage C and Stage B: the ``gguf`` package parses, torch dequantizes (``ggml.py``).

Tensor names are the original release's keys (docs/QUANTIZED.md); quantized tensors become ``QTensor`` views of
the memory-mapped blocks (nothing is expanded at load), F16/BF16/F32 tensors plain tensors. What the file is
comes from its keys and shapes as for safetensors (``keymaps.detect``); ``general.architecture`` is only used to
name a file of another model (Flux, SDXL, an LLM) and to refuse it before its tensors are looked at.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from . import ggml
from .ops import QTensor

log = logging.getLogger(__name__)

ARCH = "stable_cascade"
KEY_KIND = f"{ARCH}.kind"
KEY_DTYPE = f"{ARCH}.dense_dtype"
KEY_VERSION = f"{ARCH}.format_version"
ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's key: the tensor's shape when stored flattened
FORMAT_VERSION = 1
DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = (*DENSE, *ggml.QUANTIZED_TYPES)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a foreign architecture string is, for the refusal message.
_FOREIGN = {"flux": "a Flux diffusion model", "sdxl": "an SDXL U-Net", "sd1": "a Stable Diffusion 1.x U-Net",
            "sd3": "a Stable Diffusion 3 model", "aura": "an AuraFlow model", "hidream": "a HiDream model",
            "wan": "a Wan video model", "ltxv": "an LTX-Video model", "hyvid": "a HunyuanVideo model",
            "lumina2": "a Lumina 2 model", "qwen_image": "a Qwen-Image model", "cosmos": "a Cosmos model",
            "t5": "a T5 text encoder", "t5encoder": "a T5 text encoder", "llama": "a Llama language model",
            "clip": "a CLIP model"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf "
                              "(it is in requirements.txt)") from None
    return gguf


@dataclass
class GGUFContents:
    """A parsed GGUF file: tensors by name (quantized ones as QTensors), and its metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    arch: str | None
    kind: str | None
    qtypes: dict[str, int] = field(default_factory=dict)


def _field(reader: Any, name: str) -> Any:
    f = reader.get_field(name)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a malformed value: treat as absent, the keys decide
        return None


def _unknown_type(err: Exception) -> str:
    """The type number when GGUFReader failed on a tensor type it does not know ('' for other damage)."""
    msg = str(err)
    if "GGMLQuantizationType" not in msg:
        return ""
    m = re.search(r"(\d+)\)? is not", msg)
    return m.group(1) if m else msg.split(" is not")[0]


def read_gguf(path: str | Path, expected: str) -> GGUFContents:
    """Parse ``path`` (a GGUF file) or raise a CheckpointError naming what is wrong and the fix."""
    gguf = _gguf()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on damage; none of them is specific
        unknown = _unknown_type(e)
        if unknown:
            raise CheckpointError(
                f"{path}: a tensor has quantization type {unknown}, which is not a GGML type known to the installed "
                f"gguf package (version {_version()}); the file is damaged or from a newer format. This pack reads "
                f"{', '.join(SUPPORTED)}; re-convert the model with scripts/convert_weights.py."
            ) from None
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}). It is truncated (an unfinished download) "
            f"or damaged; download it again. Expected {expected}."
        ) from None
    arch = _field(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        what = _FOREIGN.get(str(arch), f"a model of architecture {arch!r}")
        raise CheckpointError(
            f"{path}: this GGUF file holds {what} (general.architecture = {arch!r}), not a Stable Cascade network "
            f"(general.architecture = {ARCH!r}). Load it with a node pack for that model (e.g. ComfyUI-GGUF); "
            f"here pick {expected}."
        )
    size = path.stat().st_size
    dense_name = _field(reader, KEY_DTYPE)
    dense_dtype = _DTYPE_NAMES.get(str(dense_name), torch.bfloat16)
    tensors: dict[str, torch.Tensor] = {}
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        qname = getattr(t.tensor_type, "name", str(t.tensor_type))
        if qname not in SUPPORTED:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} is stored as {qname}, a GGML type this pack cannot dequantize; it reads "
                f"{', '.join(SUPPORTED)}. Re-convert the model to one of these (scripts/convert_weights.py)."
            )
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} needs bytes {t.data_offset}..{t.data_offset + t.n_bytes} but the file has "
                f"{size}; it is truncated (an unfinished download). Download it again."
            )
        shape = torch.Size(int(v) for v in reversed(t.shape.tolist()))
        orig = _field(reader, ORIG_SHAPE + t.name)
        if orig is not None:
            orig = torch.Size(int(v) for v in orig)
            if orig.numel() != shape.numel():
                raise CheckpointError(f"{path}: {ORIG_SHAPE}{t.name} = {tuple(orig)} does not hold the tensor's "
                                      f"{shape.numel()} values; the file is damaged. Download it again.")
            shape = orig
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(np.asarray(t.data))
        if qname in DENSE:
            if qname == "BF16":
                raw = raw.contiguous().view(torch.bfloat16)
            tensors[t.name] = raw.reshape(shape).clone()  # small tensors; a private copy, not the read-only map
        else:
            if shape.numel() % ggml.BLOCK[qname]:
                raise CheckpointError(f"{path}: tensor {t.name!r} ({qname}) has {shape.numel()} values, not a "
                                      f"multiple of the {ggml.BLOCK[qname]}-value block; the file is damaged.")
            tensors[t.name] = QTensor.wrap(raw, qname, shape, dense_dtype, None, _expand)
        qtypes[qname] = qtypes.get(qname, 0) + 1
    if not tensors:
        raise CheckpointError(f"{path}: the GGUF file holds no tensors; download it again. Expected {expected}.")
    log.info("ComfyUI-StableCascade: %s: GGUF tensor types %s", path.name,
             ", ".join(f"{k} ({v})" for k, v in sorted(qtypes.items())))
    kind = _field(reader, KEY_KIND)
    return GGUFContents(path, tensors, arch, str(kind) if kind is not None else None, qtypes)


def _expand(raw: torch.Tensor, qtype: str, shape: torch.Size, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    return ggml.dequantize(raw, qtype, shape, dtype)
