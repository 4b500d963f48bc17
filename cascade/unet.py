"""The U-Net Stage C and Stage B both run (SPEC §3 "U-Net wiring"): levels of ResBlock / TimestepBlock /
AttnBlock from ``common``, down- and upscalers, repeat mappers, skips, and the fp16 residual-stream mode
(docs/FP16.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import (FP16_STREAM_SCALE, AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, Workspace, conv_on_stream,
                     layer_norm_2d, ln_eps, resize_like, stream_scale, to_channels_last)


class UNetCore(nn.Module):
    """Down/up wiring shared by Stage C and Stage B (SPEC §3 "U-Net wiring").

    Subclasses build ``down_blocks``, ``down_downscalers``, ``down_repeat_mappers``, ``up_blocks``,
    ``up_upscalers`` and ``up_repeat_mappers`` with :meth:`_build_levels`, then call :meth:`_run_unet`.

    ``fp16_stream_scale``: the fp16 mode (docs/FP16.md). With fp16 activations the residual stream is carried
    times this power of two (default ``FP16_STREAM_SCALE``); None runs plain fp16. bf16/fp32 never use it.
    """

    fp16_stream_scale: float | None = FP16_STREAM_SCALE

    def _residual_scale(self, dtype: torch.dtype) -> float | None:
        # Training runs the plain path (ResBlock's training branch has no scaled variant).
        return None if self.training else stream_scale(dtype, self.fp16_stream_scale)

    @staticmethod
    def _level_change(mod: nn.Module, x: torch.Tensor, res_scale: float | None) -> torch.Tensor:
        """A downscaler/upscaler (LN2d -> conv) on the stream; in fp16 mode its output joins the stream scale."""
        if res_scale is None:
            return mod(x)
        if isinstance(mod, nn.Identity):
            return x
        if isinstance(mod, nn.Sequential) and isinstance(mod[0], LayerNorm2d):
            h = layer_norm_2d(x, ln_eps(res_scale))
            for m in list(mod)[1:]:
                h = m(h)
            return h.mul_(res_scale)
        return mod(x * (1.0 / res_scale)) * res_scale

    @staticmethod
    def _make_embedding(cfg: Any, dtype: Any, device: Any, ops: Any) -> nn.Sequential:
        """PixelUnshuffle(patch) -> Conv1x1(c_in * p^2 -> c_hidden[0]) -> LN2d (keys ``embedding.1.*``)."""
        p = cfg.patch_size
        conv = ops.Conv2d(cfg.c_in * p * p, cfg.c_hidden[0], kernel_size=1, dtype=dtype, device=device)
        return nn.Sequential(nn.PixelUnshuffle(p), conv, LayerNorm2d())

    @staticmethod
    def _make_clf(cfg: Any, dtype: Any, device: Any, ops: Any) -> nn.Sequential:
        """LN2d -> Conv1x1(c_hidden[0] -> c_out * p^2) -> PixelShuffle(patch) (keys ``clf.1.*``)."""
        p = cfg.patch_size
        conv = ops.Conv2d(cfg.c_hidden[0], cfg.c_out * p * p, kernel_size=1, dtype=dtype, device=device)
        return nn.Sequential(LayerNorm2d(), conv, nn.PixelShuffle(p))

    def _build_levels(self, cfg: Any, make_downscaler: Any, make_upscaler: Any, dtype: Any, device: Any, ops: Any):
        hidden, levels = cfg.c_hidden, len(cfg.c_hidden)
        dropout = cfg.dropout if isinstance(cfg.dropout, (tuple, list)) else (cfg.dropout,) * levels

        def block(letter: str, i: int, c_skip: int = 0) -> nn.Module:
            c = hidden[i]
            if letter == "C":
                return ResBlock(c, c_skip, cfg.kernel_size, dropout[i], dtype, device, ops)
            if letter == "T":
                return TimestepBlock(c, cfg.c_r, cfg.t_conds, dtype, device, ops)
            if letter == "A":
                return AttnBlock(c, cfg.c_cond, cfg.nhead[i], cfg.self_attn, dropout[i], dtype, device, ops)
            raise ValueError(f"level_config letter {letter!r} is not supported (expected C, T or A)")

        self.down_blocks, self.down_downscalers = nn.ModuleList(), nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(levels):
            self.down_downscalers.append(make_downscaler(i) if i > 0 else nn.Identity())
            self.down_blocks.append(
                nn.ModuleList([block(letter, i) for _ in range(cfg.blocks[0][i]) for letter in cfg.level_config[i]])
            )
            repeat = cfg.block_repeat[0][i]
            self.down_repeat_mappers.append(self._repeat_mappers(hidden[i], repeat, dtype, device, ops))
        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for u, i in enumerate(reversed(range(levels))):
            self.up_upscalers.append(make_upscaler(i) if i > 0 else nn.Identity())
            mods = []
            for j in range(cfg.blocks[1][u]):
                for k, letter in enumerate(cfg.level_config[i]):
                    c_skip = hidden[i] if i < levels - 1 and j == 0 and k == 0 else 0
                    mods.append(block(letter, i, c_skip))
            self.up_blocks.append(nn.ModuleList(mods))
            self.up_repeat_mappers.append(self._repeat_mappers(hidden[i], cfg.block_repeat[1][u], dtype, device, ops))

    @staticmethod
    def _repeat_mappers(c: int, repeat: int, dtype: Any, device: Any, ops: Any) -> nn.ModuleList:
        return nn.ModuleList([ops.Conv2d(c, c, kernel_size=1, dtype=dtype, device=device) for _ in range(repeat - 1)])

    def _run_level(self, blocks: nn.ModuleList, x: torch.Tensor, r_embed, clip, cnet, ws, skip=None,
                   res_scale: float | None = None) -> torch.Tensor:
        # Keyword only when set, so the None path calls every block exactly as before the fp16 mode existed.
        kw = {} if res_scale is None else {"res_scale": res_scale}
        for k, blk in enumerate(blocks):
            if isinstance(blk, ResBlock):
                block_skip = skip if k == 0 else None
                if block_skip is not None and x.shape[-2:] != block_skip.shape[-2:]:
                    x = resize_like(x, block_skip.shape[-2:])
                if cnet is not None:
                    extra = next(cnet, None)
                    if extra is not None:
                        extra = resize_like(extra.to(x.dtype), x.shape[-2:])
                        x = x + (extra if res_scale is None else extra * res_scale)
                x = blk(x, block_skip, ws, inplace=True, **kw)
            elif isinstance(blk, TimestepBlock):
                x = blk(x, r_embed, inplace=True, **kw)
            elif isinstance(blk, AttnBlock):
                x = blk(x, clip, inplace=True, **kw)
            else:
                x = blk(x)
        return x

    def _run_unet(self, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor, cnet=None,
                  res_scale: float | None = None) -> torch.Tensor:
        """Down and up paths. ``res_scale``: ``x`` is the stream times this factor (fp16 mode), the result too."""
        cnet = iter(cnet) if cnet is not None else None
        ws = Workspace()
        level_outputs = []
        for blocks, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = self._level_change(downscaler, x, res_scale)
            for n in range(len(repmap) + 1):
                x = self._run_level(blocks, x, r_embed, clip, cnet, ws, res_scale=res_scale)
                if n < len(repmap):
                    x = to_channels_last(conv_on_stream(repmap[n], x, res_scale))
            level_outputs.insert(0, x)
        x = level_outputs[0]
        for u, (blocks, upscaler, repmap) in enumerate(zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            skip = level_outputs[u] if u > 0 else None
            for n in range(len(repmap) + 1):
                x = self._run_level(blocks, x, r_embed, clip, cnet, ws, skip, res_scale=res_scale)
                if n < len(repmap):
                    x = to_channels_last(conv_on_stream(repmap[n], x, res_scale))
            level_outputs[u] = None  # free the stored level output once its level is done
            del skip
            x = self._level_change(upscaler, x, res_scale)
        return x
