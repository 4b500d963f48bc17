"""GGML block formats in torch: dequantization of every format the reader accepts, and quantizers for writing.

Blocks run along the flattened tensor (row-major), ``BLOCK[qtype]`` values per block of ``TYPE_SIZE[qtype]``
bytes; layouts are ggml's (``ggml-common.h``; the ``gguf`` package's ``quants.py`` implements the same in
numpy, and the tests hold these functions to it). Dequantization computes in float32 (as ggml does) and
casts once to the requested dtype, so any device torch runs on can expand a layer on the fly.

Writing: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 use ``gguf.quants.quantize`` (the reference implementation); Q5_K and
Q4_K, which that package cannot quantize, use ``quantize_k`` here: per 32-value sub-block an affine
(scale, min) pair from the sub-block's range, both quantized to 6 bits against the super-block's fp16 ``d`` and
``dmin``, then values rounded against the quantized pair (a simpler search than llama.cpp's, same format).
"""

from __future__ import annotations

import torch

QK_K = 256
BLOCK = {"Q8_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
TYPE_SIZE = {"Q8_0": 34, "Q5_0": 22, "Q5_1": 24, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
QUANTIZED_TYPES = tuple(BLOCK)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 read as little-endian fp16."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32): low nibbles are values 0..15, high nibbles 16..31 (Q4_0/Q5_0 layout)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j is value j's fifth bit."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) packed 6-bit scales and mins of Q4_K/Q5_K -> two (n, 8) float32 tensors."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): in each 64-value group, 32 bytes hold sub-block 2g (low) and 2g+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], device=qs.device, dtype=torch.uint8).view(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 8, 32)


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n_blocks, TYPE_SIZE) uint8 -> (n_blocks, BLOCK) float32."""
    # The arithmetic runs in place on the one float32 tensor of the values (the same products and sums, in the
    # same order, as the out-of-place expressions): a whole-tensor float32 temporary per operation would double
    # or triple the peak of expanding a layer.
    n = blocks.shape[0]
    if qtype == "Q8_0":
        return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32).mul_(_f16(blocks[:, :2]))
    if qtype == "Q4_0":
        return _nibbles(blocks[:, 2:]).to(torch.float32).sub_(8).mul_(_f16(blocks[:, :2]))
    if qtype == "Q4_1":
        return _nibbles(blocks[:, 4:]).to(torch.float32).mul_(_f16(blocks[:, :2])).add_(_f16(blocks[:, 2:4]))
    if qtype == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_qh_bits(blocks[:, 2:6]) << 4)
        return q.to(torch.float32).sub_(16).mul_(_f16(blocks[:, :2]))
    if qtype == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | (_qh_bits(blocks[:, 4:8]) << 4)
        return q.to(torch.float32).mul_(_f16(blocks[:, :2])).add_(_f16(blocks[:, 2:4]))
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        if qtype == "Q4_K":
            q = _k_low(blocks[:, 16:])
        else:
            shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
            high = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
            q = _k_low(blocks[:, 48:]) | (high << 4)
        return q.to(torch.float32).mul_((d * sc).unsqueeze(-1)).sub_((dmin * mn).unsqueeze(-1)).reshape(n, QK_K)
    if qtype == "Q6_K":
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = _f16(blocks[:, 208:210])
        low = ql.reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], device=blocks.device, dtype=torch.uint8).view(1, 1, 2, 1)
        low = (low & 0x0F).reshape(-1, 8, 32)
        high = qh.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=blocks.device,
                                                        dtype=torch.uint8).view(1, 1, 4, 1)
        high = (high & 0x03).reshape(-1, 8, 32)
        q = (low | (high << 4)).to(torch.float32).sub_(32)
        return q.reshape(n, 16, 16).mul_((d * scales).unsqueeze(-1)).reshape(n, QK_K)
    raise KeyError(qtype)


def dequantize(raw: torch.Tensor, qtype: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Raw GGML bytes (any shape, ``numel * BLOCK / TYPE_SIZE`` values) -> a ``shape`` tensor in ``dtype``."""
    blocks = raw.reshape(-1, TYPE_SIZE[qtype])
    return dequantize_blocks(blocks, qtype).to(dtype).reshape(shape)


# ---- quantizers for the K formats (the gguf package has none) -------------------------------------------------


def _to_f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2)


def _pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Two (n, 8) uint8 6-bit tensors -> (n, 12) bytes, the inverse of ``_scale_min_k4``."""
    lo = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=-1)


def quantize_k(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """float tensor (numel divisible by 256) -> (n_blocks, TYPE_SIZE) uint8 blocks of Q4_K or Q5_K."""
    levels = 15 if qtype == "Q4_K" else 31
    x = values.detach().to(torch.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    lo = x.amin(dim=-1).clamp(max=0.0)  # ggml keeps mins <= 0 so zero is representable
    scale = (x.amax(dim=-1) - lo) / levels
    mins = -lo
    d = scale.amax(dim=-1) / 63
    dmin = mins.amax(dim=-1) / 63
    # The super-block factors are stored in fp16; quantize the 6-bit codes against the stored values.
    d16, dmin16 = d.to(torch.float16).to(torch.float32), dmin.to(torch.float16).to(torch.float32)
    sc = torch.where(d16[:, None] > 0, torch.round(scale / d16[:, None].clamp(min=1e-30)), 0).clamp(0, 63)
    mn = torch.where(dmin16[:, None] > 0, torch.round(mins / dmin16[:, None].clamp(min=1e-30)), 0).clamp(0, 63)
    step = (d16[:, None] * sc).unsqueeze(-1)
    offset = (dmin16[:, None] * mn).unsqueeze(-1)
    q = torch.where(step > 0, torch.round((x + offset) / step.clamp(min=1e-30)), 0).clamp(0, levels).to(torch.uint8)
    sc8, mn8 = sc.to(torch.uint8), mn.to(torch.uint8)
    low = q & 0x0F
    groups = low.reshape(n, 4, 2, 32)
    qs = (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(n, 128)
    parts = [_to_f16_bytes(d16), _to_f16_bytes(dmin16), _pack_scales(sc8, mn8)]
    if qtype == "Q5_K":
        high = (q >> 4) & 1  # (n, 8, 32): bit b of byte j is sub-block b's value j
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        parts.append((high << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8))
    parts.append(qs)
    return torch.cat(parts, dim=-1)
