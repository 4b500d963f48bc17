"""Weights files on disk: safetensors headers and tensors, shard sets, diffusers folders, pickle refusal.

Files are safetensors only here (a pickle is refused, never opened; GGUF is read by ``cascade.quant``). A path
may name a file, one shard of a sharded checkpoint (all shards are found through the index or the names), a
``*.safetensors.index.json`` or a folder (diffusers layout: the kind's subfolder and the variant are chosen).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .kinds import KINDS, PACKAGED_EXAMPLES

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# float8 arrived in torch 2.1; on an older torch an fp8 file is refused by name (see read_header).
FP8_DTYPES = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
DTYPES.update({name: getattr(torch, t) for name, t in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
                if hasattr(torch, t)})
DTYPES.update({name: getattr(torch, t) for name, t in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
                if hasattr(torch, t)})
SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
VARIANTS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ---- files -------------------------------------------------------------------------------------


def _pickle_error(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {why}. Pickle files can run arbitrary code when opened, so this pack reads safetensors only "
        "and never unpickles. Download the .safetensors release of this model, or convert it to safetensors "
        "yourself in an environment you trust (torch.load(..., weights_only=True) then "
        "safetensors.torch.save_file)."
    )


def examples_of(kind: str | None) -> str:
    return KINDS[kind].examples if kind in KINDS else PACKAGED_EXAMPLES


def _check_file(path: Path, kind: str | None) -> None:
    if not path.exists():
        what = KINDS[kind].description if kind in KINDS else "a Stable Cascade weights file"
        raise CheckpointError(f"{path}: file not found. Expected {what} (e.g. {examples_of(kind)}); check the path.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path, f"'{path.suffix}' files are PyTorch pickles")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download did not finish. Download it again.")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # a safetensors header: 8-byte length, then JSON (the length's bytes can be anything)
        return
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise _pickle_error(path, "the file is a PyTorch pickle (zip/pickle bytes) despite its name")
    if head.startswith(b"GGUF"):
        return  # read by cascade/quant/gguf_file.py


def _open_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not importable under a stable name
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}). It is truncated (an unfinished download) or not a "
            "safetensors file at all. Download it again."
        ) from None


def read_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Key -> meta tensor of the file's shape and dtype, reading only the header."""
    path = Path(path)
    _check_file(path, None)
    with _open_safetensors(path) as f:
        out = {}
        for k in f.keys():
            s = f.get_slice(k)
            dtype = DTYPES.get(s.get_dtype())
            if dtype is None and s.get_dtype() in FP8_DTYPES:
                from .quant import fp8

                fp8.torch_dtype(FP8_DTYPES[s.get_dtype()])  # raises, naming the torch version needed
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {k!r} has dtype {s.get_dtype()!r}, which this pack cannot read (expected one "
                    f"of {sorted(DTYPES)}; weights are F32, F16 or BF16). The file is damaged or not a Stable "
                    "Cascade checkpoint."
                )
            out[k] = torch.empty(s.get_shape(), dtype=dtype, device="meta")
    return out


def cast_floating(t: torch.Tensor, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def read_safetensors(path: str | os.PathLike, keys: list[str] | None = None, dtype: torch.dtype | None = None,
                     device: Any = "cpu") -> dict[str, torch.Tensor]:
    """The file's tensors (all, or ``keys``), floating ones cast to ``dtype`` one by one while reading."""
    path = Path(path)
    _check_file(path, None)
    out: dict[str, torch.Tensor] = {}
    with _open_safetensors(path) as f:
        names = list(f.keys()) if keys is None else keys
        for k in names:
            out[k] = cast_floating(f.get_tensor(k), dtype, device)
    return out


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file starting with GGUF's magic (by content, not name)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _variant(p: Path) -> str:
    return next((v for v in ("bf16", "fp16", "fp32") if v in p.name.split(".")), "")


def _base_name(p: Path) -> str:
    """``diffusion_pytorch_model.bf16.safetensors`` and ``...safetensors.index.json`` -> one name."""
    return ".".join(x for x in p.name.split(".") if x not in (_variant(p), "index", "json"))


def _pick_variant(cands: list[Path], dtype: torch.dtype | None) -> Path:
    variant = _variant
    want = VARIANTS.get(dtype, "") if dtype is not None else ""
    for pref in (want, "", "bf16", "fp32", "fp16"):
        hits = [c for c in cands if variant(c) == pref]
        if hits:
            return sorted(hits, key=lambda c: (not c.name.endswith(".json"), c.name))[0]
    return cands[0]


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({e!r}); download it again.") from None
    files = [index.parent / n for n in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: shard(s) {missing} listed in the index are not in {index.parent}; "
                              "download every shard into the same folder.")
    return files


def _shard_files(path: Path) -> list[Path]:
    """All shards of a sharded checkpoint, from any one shard (through the index when there is one)."""
    m = SHARD.match(path.name)
    assert m is not None
    for index in sorted(path.parent.glob("*.index*.json")):
        files = _index_files(index)
        if path in files:
            return files
    n = int(m["n"])
    files = [path.parent / f"{m['stem']}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: shard {path.name} of a {n}-part checkpoint, but {missing} are missing from "
                              f"{path.parent}; download every shard (and the .index.json) into that folder.")
    return files


def _dir_files(d: Path, kind: str | None, dtype: torch.dtype | None) -> list[Path]:
    subs = [d / s for s in (KINDS[kind].diffusers_folders if kind in KINDS else ()) if (d / s).is_dir()]
    if len(subs) > 1:
        raise CheckpointError(f"{d}: holds {[s.name for s in subs]}; pass the one folder you want to load.")
    d = subs[0] if subs else d
    cands = sorted(d.glob("*.safetensors.index*.json")) + sorted(
        p for p in d.glob("*.safetensors") if not SHARD.match(p.name))
    if not cands:
        raise CheckpointError(f"{d}: no .safetensors file and no *.safetensors.index.json shard index in this "
                              f"folder. Expected {examples_of(kind)}.")
    if len({_base_name(c) for c in cands}) > 1:
        raise CheckpointError(f"{d}: holds several weight files ({[c.name for c in cands][:8]}); pass the one file "
                              f"you want to load (e.g. {examples_of(kind)}).")
    chosen = _pick_variant(cands, dtype)
    if len(cands) > 1:
        log.info("ComfyUI-StableCascade: %s holds %s; reading %s.", d, [c.name for c in cands], chosen.name)
    return _index_files(chosen) if chosen.name.endswith(".json") else [chosen]


def resolve(path: Path, kind: str | None, dtype: torch.dtype | None) -> list[Path]:
    if path.is_dir():
        return _dir_files(path, kind, dtype)
    if path.name.endswith(".json") and path.exists():
        return _index_files(path)
    _check_file(path, kind)
    return _shard_files(path) if SHARD.match(path.name) else [path]
