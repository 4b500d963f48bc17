"""A seeded, bounded fuzz over tiny weights files of every network kind (issue 13, item 8).

Header mutations (bytes of the JSON header, its length field, dtype strings, shapes, data offsets, key
names, a truncated body) and content mutations (a tensor's dtype, NaN / inf, rank, shape, renamed and
dropped keys) of the tiny Stage C / B / A / EffNet / Previewer / ControlNet files. Every outcome must be
one of the pack's named errors (a CascadeError) or a successful load whose forward on a tiny input runs
and is finite; anything else (a raw torch / Python error, a NaN output) fails the test with its case.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Callable

import pytest
import tiny_checkpoints as tc
import torch
from safetensors.torch import save, save_file
from test_loading_bad_files import LOAD, forward

from comfyui_stablecascade.cascade.errors import CascadeError

SEED = 1312
KINDS = ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "controlnet")
# Cases per kind: the U-Nets cost most per load, so they get fewer (the whole test stays a few seconds).
CASES = {"stage_c": 14, "stage_b": 14, "stage_a": 30, "effnet": 30, "previewer": 36, "controlnet": 30}
_DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U32", "I16", "U8", "I8", "BOOL", "F8_E4M3", "X32", ""]
_DTYPES = [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float16, torch.bfloat16,
           torch.float64]


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# ---- header mutations: on the file's bytes --------------------------------------------------------------


def _flip_json_byte(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = struct.unpack("<Q", data[:8])[0]
    pos = rng.randrange(8, 8 + n)
    out = bytearray(data)
    out[pos] = rng.randrange(256)
    return bytes(out), f"header byte {pos} -> {out[pos]}"


def _length_field(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = struct.unpack("<Q", data[:8])[0]
    new = rng.choice([0, 1, 7, n - 1, n + 1, len(data), 2 ** 63, rng.randrange(2 ** 64)])
    return struct.pack("<Q", new) + data[8:], f"header length {n} -> {new}"


def _dtype_string(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = _split(data)
    key = rng.choice(_tensor_keys(header))
    header[key]["dtype"] = rng.choice(_DTYPE_NAMES)
    return _join(header, body), f"{key} dtype -> {header[key]['dtype']!r}"


def _shape_field(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = _split(data)
    key = rng.choice(_tensor_keys(header))
    shape = list(header[key]["shape"])
    how = rng.choice(["grow", "shrink", "zero", "drop", "append", "scalar", "negative", "huge", "swap"])
    if how == "grow" and shape:
        shape[rng.randrange(len(shape))] += 1
    elif how == "shrink" and shape:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] - 1)
    elif how == "zero" and shape:
        shape[rng.randrange(len(shape))] = 0
    elif how == "drop" and shape:
        shape.pop()
    elif how == "append":
        shape.append(1)
    elif how == "scalar":
        shape = []
    elif how == "negative" and shape:
        shape[0] = -1
    elif how == "huge":
        shape = [2 ** 40] + shape[1:]
    elif how == "swap" and len(shape) > 1:
        shape[0], shape[1] = shape[1], shape[0]
    header[key]["shape"] = shape
    return _join(header, body), f"{key} shape ({how}) -> {shape}"


def _offsets(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = _split(data)
    key = rng.choice(_tensor_keys(header))
    start, end = header[key]["data_offsets"]
    new = rng.choice([[start + 4, end], [start, end - 4], [end, start], [start, len(body) + 8],
                      [start + 2, end + 2], [0, end - start]])
    header[key]["data_offsets"] = new
    return _join(header, body), f"{key} offsets {[start, end]} -> {new}"


def _rename_in_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = _split(data)
    key = rng.choice(_tensor_keys(header))
    i = rng.randrange(len(key))
    new = key[:i] + rng.choice("x._0") + key[i + 1:]
    header[new] = header.pop(key)
    return _join(header, body), f"key {key} -> {new}"


def _truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


HEADER_MUTATIONS: list[Callable] = [_flip_json_byte, _flip_json_byte, _length_field, _dtype_string, _shape_field,
                                    _offsets, _rename_in_header, _truncate]


# ---- content mutations: on the state dict, saved as a valid file ----------------------------------------


def _content(sd: dict[str, torch.Tensor], rng: random.Random) -> str:
    key = rng.choice(sorted(sd))
    t = sd[key]
    how = rng.choice(["dtype", "dtype", "nan", "inf", "rank", "slice", "rename", "drop"])
    if how == "dtype":
        dtype = rng.choice(_DTYPES)
        sd[key] = t.to(dtype)
        return f"{key} -> {dtype}"
    if how in ("nan", "inf") and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = float("nan") if how == "nan" else -float("inf")
        sd[key] = t
        return f"{key}: one {how}"
    if how == "rank":
        sd[key] = rng.choice([t.flatten(), t.unsqueeze(0), t.reshape(-1, 1), t.flatten()[:1].reshape(())]).clone()
        return f"{key} rank {t.dim()} -> {sd[key].dim()}"
    if how == "slice" and t.dim() and t.shape[0] > 1:
        sd[key] = t[:-1].clone()
        return f"{key} shape {tuple(t.shape)} -> {tuple(sd[key].shape)}"
    if how == "rename":
        i = rng.randrange(len(key))
        sd[key[:i] + rng.choice("x._0") + key[i + 1:]] = sd.pop(key)
        return f"renamed {key}"
    del sd[key]
    return f"dropped {key}"


# ---- the fuzz ----------------------------------------------------------------------------------------------


def _outcome(kind: str, path: Path) -> str:
    try:
        model = LOAD[kind](path)
    except CascadeError:
        return "error"
    outs = forward(kind, model)
    assert outs and all(torch.isfinite(o).all() for o in outs), "loaded, but the forward is not finite"
    return "loaded"


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_files_give_a_named_error_or_a_working_network(tmp_path, kind):
    rng = random.Random(f"{SEED}-{kind}")
    sd = tc.tiny_sd(kind, seed=3)
    data = save({k: v.contiguous() for k, v in sd.items()})
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(data)
    assert _outcome(kind, path) == "loaded"  # the unmutated file is a working network
    seen = {"error": 0, "loaded": 0}
    for i in range(CASES[kind]):
        if i % 2 == 0:
            mutated, what = rng.choice(HEADER_MUTATIONS)(data, rng)
            path.write_bytes(mutated)
        else:
            changed = dict(sd)
            what = _content(changed, rng)
            save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
        try:
            seen[_outcome(kind, path)] += 1
        except Exception as e:  # noqa: BLE001 - report which mutation escaped, with the error
            pytest.fail(f"{kind} case {i} ({what}): {type(e).__name__}: {e}")
    # The unmutated file loads (above) and mutations are refused, so neither "refuse everything" nor "accept
    # everything" passes.
    assert seen["error"], seen
