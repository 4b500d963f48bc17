"""Stage A decoding in tiles, so a large batch or a large image decodes within a memory budget.

Every layer of the Stage A decoder is local: 1x1 convs, per-pixel LayerNorms and MLPs, 3x3 depthwise
convs and 4x4 stride-2 transposed convs. An output pixel therefore reads only latent pixels within
``receptive_radius(config)`` of it. Each tile is decoded with that much latent context on every side and
only its core is kept, so a tiled decode equals the untiled one up to float rounding (no blending seams).
"""

from __future__ import annotations

import logging
import math

import torch

from .errors import ShapeError

log = logging.getLogger(__name__)

DEFAULT_TILE = 64  # latent pixels of kept core per tile side (256 output pixels with the release)
_MIN_TILE = 8
# Fixed working memory of Stage A's chunked paths (bands of the depthwise conv, chunks of the MLP).
_CHUNK_BYTES = 16 * 2**20


def receptive_radius(config) -> int:
    """Latent pixels of context an output pixel depends on, on each side (15 for the release).

    The bottleneck ResBlocks run at the latent resolution and each reads one neighbour (3x3 depthwise);
    each upsampling level adds one latent pixel for its transposed conv (+-1 input pixel) and at most one
    more for the ResBlocks and convs at finer resolutions (half a latent pixel or less each).
    """
    return int(config.bottleneck_blocks) + 2 * int(config.levels) - 1


def estimate_decode_memory(config, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    """Peak activation bytes of ``StageA.decode`` for a latent of ``shape`` (B, c, h, w) in ``dtype``.

    The largest live set is a transposed conv's input plus its output (384 + 4 * 192 channels per latent
    pixel for the release), or the last conv's input plus the image; the chunked paths add a few MB.
    """
    bsz, _, height, width = (int(s) for s in shape)
    pixels = height * width
    elt = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    c_levels = config.c_levels
    peak = c_levels[-1]  # the bottleneck activation, per latent pixel
    area = 1
    for i in range(config.levels - 1, 0, -1):
        peak = max(peak, c_levels[i] * area + c_levels[i - 1] * area * 4)
        area *= 4
    out_area = area * 4  # the final PixelShuffle(2)
    peak = max(peak, c_levels[0] * area + 3 * out_area * 2)
    return int(bsz * pixels * peak * elt * 1.25) + _CHUNK_BYTES


def _spans(size: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(context start, context end, core start, core end) along one axis."""
    out = []
    for core0 in range(0, size, tile):
        core1 = min(size, core0 + tile)
        out.append((max(0, core0 - margin), min(size, core1 + margin), core0, core1))
    return out


@torch.no_grad()
def decode_tiled(stage_a, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int | None = None,
                 batch_chunk: int | None = None, raw: bool = False) -> torch.Tensor:
    """Decode ``z`` (B, c, h, w) tile by tile; the result matches ``stage_a.decode(z)`` (or ``decode_raw``).

    ``tile`` is the kept core size in latent pixels; ``overlap`` the latent context decoded around each core
    (default: the receptive radius, which makes tiles exact; less saves time but shows seams).
    ``batch_chunk`` samples are decoded together (default: all).
    """
    if z.ndim != 4:
        raise ShapeError(f"Stage A tiled decode: latent has shape {tuple(z.shape)}; expected (B, c, h, w)")
    if tile < 1:
        raise ShapeError(f"Stage A tiled decode: tile={tile}; expected at least 1 latent pixel")
    radius = receptive_radius(stage_a.config)
    margin = radius if overlap is None else int(overlap)
    if margin < radius:
        log.warning("ComfyUI-StableCascade: Stage A tile overlap %d is below the receptive radius %d; "
                    "tile borders will differ from an untiled decode", margin, radius)
    decode = stage_a.decode_raw if raw else stage_a.decode
    bsz, _, height, width = z.shape
    chunk = bsz if batch_chunk is None else max(1, int(batch_chunk))
    rows, cols = _spans(height, tile, margin), _spans(width, tile, margin)
    out = None
    for b0 in range(0, bsz, chunk):
        zb = z[b0:b0 + chunk]
        for y0, y1, cy0, cy1 in rows:
            for x0, x1, cx0, cx1 in cols:
                piece = decode(zb[:, :, y0:y1, x0:x1])
                scale = piece.shape[-1] // (x1 - x0)
                if out is None:
                    out = piece.new_empty(bsz, piece.shape[1], height * scale, width * scale)
                out[b0:b0 + chunk, :, cy0 * scale:cy1 * scale, cx0 * scale:cx1 * scale] = piece[
                    :, :, (cy0 - y0) * scale:(cy1 - y0) * scale, (cx0 - x0) * scale:(cx1 - x0) * scale]
                del piece
    return out


def plan_decode(config, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
                memory_budget: int) -> tuple[int | None, int | None]:
    """(tile, batch_chunk) for decoding within ``memory_budget`` bytes; (None, None) means untiled.

    Whole samples are preferred (exact, fastest); spatial tiles only when one sample does not fit. The
    image itself (kept whole) is counted against the budget too.
    """
    bsz, c, height, width = (int(s) for s in shape)
    if estimate_decode_memory(config, shape, dtype) <= memory_budget:
        return None, None
    elt = torch.finfo(dtype).bits // 8
    scale = 2 ** int(config.levels)
    image = bsz * 3 * height * scale * width * scale * elt
    left = memory_budget - image
    per_sample = estimate_decode_memory(config, (1, c, height, width), dtype)
    if per_sample <= left:
        fit = int((left - _CHUNK_BYTES) // max(1, per_sample - _CHUNK_BYTES))
        return None, max(1, min(bsz, fit))
    margin = receptive_radius(config)
    tile = max(height, width)
    while tile > _MIN_TILE:
        side_h, side_w = min(height, tile + 2 * margin), min(width, tile + 2 * margin)
        if estimate_decode_memory(config, (1, c, side_h, side_w), dtype) <= left:
            break
        tile = max(_MIN_TILE, tile // 2)
    if tile == _MIN_TILE:
        need = estimate_decode_memory(config, (1, c, _MIN_TILE + 2 * margin, _MIN_TILE + 2 * margin), dtype)
        if need > left:
            log.warning("ComfyUI-StableCascade: even %d-pixel Stage A tiles need about %.0f MiB beyond the image, "
                        "more than the %.0f MiB budget leaves; decoding with them anyway",
                        _MIN_TILE, need / 2**20, left / 2**20)
    return tile, 1


@torch.no_grad()
def decode_auto(stage_a, z: torch.Tensor, memory_budget: int, raw: bool = False) -> torch.Tensor:
    """Decode ``z`` whole when its estimated peak fits ``memory_budget`` (bytes), else by samples or tiles.

    The budget is the host's figure (``host.free_memory``): this package does not ask devices what is free.
    """
    tile, chunk = plan_decode(stage_a.config, z.shape, stage_a.dtype, int(memory_budget))
    if tile is None and chunk is None:
        return stage_a.decode_raw(z) if raw else stage_a.decode(z)
    log.info("ComfyUI-StableCascade: Stage A decode of %s in %s (budget %.0f MiB)", tuple(z.shape),
             f"{math.ceil(z.shape[-2] / tile) * math.ceil(z.shape[-1] / tile)} tiles of {tile}" if tile
             else f"batches of {chunk}", memory_budget / 2**20)
    return decode_tiled(stage_a, z, tile=tile or max(z.shape[-2:]), batch_chunk=chunk, raw=raw)
