"""Seeded random weights of a Stage C / Stage B network built tensor by tensor in one format, in memory.

``bench_quant.py --source generate`` uses this for the big networks: the fp32 Stage C big file would be 14.4 GB,
and writing it next to the bf16 copy and holding a reference output does not fit a 24 GB machine. Instead each
worker draws the same values from the seed, one tensor at a time, converts each tensor to its format at once
and drops the fp32 draw, so a worker never holds more than its format's weights plus one tensor in fp32.

The values are those of ``cascade.random_init.randomize_`` on the fp32 network (one generator seeded with
``seed``, ``named_parameters`` order, the same rule per tensor), i.e. the fp32 files ``bench_quant.prepare``
writes. The formats are what the pack's loader gives from the files ``prepare`` writes: bf16 is the cast of the
fp32 values; fp8 and GGUF start from the bf16 values (the release is bf16), with the writers' choice of type per
tensor (``policy.should_quantize``, ``convert._pick_type``) and the same quantizers (``fp8.quantize``,
``gguf.quants.quantize`` for Q8_0, ``ggml.quantize_k`` for Q4_K/Q5_K). The fp8 scale is rounded to float32 as
the file stores it. The state dict is then loaded by ``cascade.loading.load`` like any in-memory state dict.
``tests/cascade/test_bench_quant_smoke.py`` checks on tiny networks that the outputs equal the files' bit for
bit, so this copy of the writers' per-tensor steps cannot drift from them unnoticed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchlib import cascade_module

GGUF = ("Q8_0", "Q4_K")


def draw(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """The fp32 values ``randomize_`` gives parameter ``name`` (the generator advanced as it does)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) > 1:
        return noise.div_(max(1, math.prod(shape[1:])) ** 0.5)
    return noise.mul_(0.02).add_(float(name.endswith("weight")))


def _fp8(key: str, t: torch.Tensor, fmt: str) -> torch.Tensor:
    fp8 = cascade_module("quant.fp8")
    policy = cascade_module("quant.policy")
    if not policy.should_quantize(key, tuple(t.shape)):
        return t
    q = fp8.quantize(t, fmt)
    scale = None if q.scale is None else float(torch.tensor(q.scale, dtype=torch.float32))  # as the file stores it
    return fp8.wrap(q.raw(), scale, t.dtype)


def _gguf(key: str, t: torch.Tensor, qtype: str) -> torch.Tensor:
    import gguf

    convert = cascade_module("quant.convert")
    ggml = cascade_module("quant.ggml")
    gguf_file = cascade_module("quant.gguf_file")
    policy = cascade_module("quant.policy")
    QTensor = cascade_module("quant").QTensor
    target = convert._pick_type(key, t, qtype, policy.THRESHOLD)
    if target not in ggml.BLOCK:
        if target != "BF16":
            raise RuntimeError(f"{key}: the writer would store {target}; this bench handles a bf16 source only")
        return t  # kept tensors stay in the source's bf16, as the GGUF reader gives them
    shape = t.shape
    x = t.reshape(-1, ggml.BLOCK[target]) if shape[-1] % ggml.BLOCK[target] else t
    if target in ("Q4_K", "Q5_K"):
        raw = ggml.quantize_k(x, target)
    else:
        raw = torch.from_numpy(gguf.quants.quantize(x.to(torch.float32).contiguous().numpy(),
                                                    gguf.GGMLQuantizationType[target]))
    return QTensor.wrap(raw, target, shape, torch.bfloat16, None, gguf_file._expand)


def state_dict(model_meta: torch.nn.Module, fmt: str, seed: int) -> dict[str, Any]:
    """``fmt``'s state dict of the seeded weights, for the network ``model_meta`` (built on the meta device)."""
    if list(model_meta.named_buffers()):
        raise RuntimeError("the network has buffers; randomize_ leaves them to the constructor, which this "
                           "bench does not reproduce")
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, Any] = {}
    for name, p in model_meta.named_parameters():
        w = draw(name, p.shape, gen)
        if fmt == "fp32":
            out[name] = w
            continue
        b = w.to(torch.bfloat16)
        del w
        if fmt == "bf16":
            out[name] = b
        elif fmt.startswith("fp8"):
            out[name] = _fp8(name, b, fmt)
        elif fmt in GGUF:
            out[name] = _gguf(name, b, fmt)
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return out
