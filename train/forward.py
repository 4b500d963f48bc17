"""Stage C's forward for training, written against the network's weights as functions of their keys.

The inference forward (``cascade/stage_c.py``) writes into its own activations (in-place residual adds, fused
GELU/GRN, reused buffers) and runs in the weights' dtype; autograd needs none of that and the trainer needs
three things the inference path does not do:

- per-block upcast: ``weights(key)`` returns a weight on the compute device in the training dtype, made from the
  base weight in its file dtype (bf16 files stay bf16 in memory) plus the LoRA delta when the key is a target;
  the copy lives only while its block runs (and again while its block is recomputed);
- gradient checkpointing: every ``CHECKPOINT_BLOCKS`` consecutive blocks run as one ``torch.utils.checkpoint``
  segment, so only segment inputs stay alive between forward and backward;
- nothing in place, so gradients flow to the LoRA factors (or, for a full fine-tune, to every weight); a LoRA
  target's layer runs as ``_LoraLinear``: the merged weight forward (exactly what the loaded LoRA file computes),
  a low-rank backward (no full-size weight gradient).

The math is the release's (SPEC §3, §4): the same as ``StageC.forward`` in eval mode (dropout off), which
tests/train/test_train_forward.py checks on random weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cascade.common import GRN_EPS, LN_EPS, AttnBlock, ResBlock, TimestepBlock, timestep_embedding
from .errors import TrainingInputError

def merge(weight: torch.Tensor, pair: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``W + scale * up @ down`` merged in float32 (as a host's patch merges it), then cast to ``dtype``."""
    # One weight-sized buffer, not three: in place, the same bits as ``W + (up @ down) * scale`` (IEEE addition is
    # commutative), which the saved file's loader computes; a bf16 W is upcast inside the add (exact), not copied.
    delta = (pair.lora_up @ pair.lora_down).mul_(pair.scale).view(weight.shape)
    return delta.add_(weight.to(device=device)).to(dtype)


class _Layer:
    """What ``_LoraLinear`` needs besides tensors: the frozen base weight, its pair and the row slices.

    The base weight is a plain attribute, not a saved tensor: inside ComfyUI it is an inference tensor (loaded under
    torch.inference_mode), which save_for_backward refuses."""

    def __init__(self, weight: torch.Tensor, pair: Any, rows: list[tuple[int, int]], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.weight, self.pair, self.rows, self.device, self.dtype = weight, pair, rows, device, dtype


class _LoraLinear(torch.autograd.Function):
    """``F.linear(x_i, merged[rows_i], bias[rows_i])`` for inputs sharing one weight, with a low-rank backward.

    The forward uses the merged weight, so it computes exactly what the patched network computes once the LoRA
    file is loaded. The weight is merged once for all its row slices (an attention's q rows and k|v rows): merging
    the 3c x c in_proj twice per attention was a sixth of a Stage C lite step on a CPU (48 ms a merge inside the
    step, most of it page faults of the new weight-sized buffer).

    The backward never forms the full weight gradient (``g^T x``, as large as the weight and as costly as the
    forward GEMM): dL/dup = s g^T (x down^T), dL/ddown = s (g up)^T x, both rank-sized products (what an unmerged
    LoRA costs), and the input gradient runs through the base weight and the factors, so the backward makes no
    merged copy at all.
    """

    @staticmethod
    def forward(ctx, up, down, bias, layer, *xs):  # noqa: D401 - autograd signature
        w = merge(layer.weight, layer.pair, layer.device, layer.dtype)
        ctx.save_for_backward(up, down, *xs)
        ctx.layer = layer
        return tuple(F.linear(x, w[a:b], None if bias is None else bias[a:b]) for x, (a, b) in zip(xs, layer.rows))

    @staticmethod
    def backward(ctx, *gs):
        (up, down, *xs), layer = ctx.saved_tensors, ctx.layer
        s, split = layer.pair.scale, len(layer.rows) > 1 or layer.rows[0] != (0, up.shape[0])
        d_up = torch.zeros_like(up) if split else None
        d_down = torch.zeros_like(down)
        gb = torch.zeros(up.shape[0], dtype=gs[0].dtype, device=gs[0].device) if ctx.needs_input_grad[2] else None
        gxs = []
        for x, g, (start, stop), need in zip(xs, gs, layer.rows, ctx.needs_input_grad[4:]):
            g2 = g.reshape(-1, g.shape[-1]).to(torch.float32)
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            gu = g2 @ up[start:stop]
            gx = None
            if need:
                # Unmerged: g W + s (g up) down equals g times the merged rows up to rounding (only the forward has
                # to match the saved file bit for bit) and needs no weight-sized merge in the backward.
                gx = g @ layer.weight[start:stop].to(device=layer.device, dtype=layer.dtype)
                gx.view(-1, gx.shape[-1]).add_((gu @ down).to(gx.dtype), alpha=s)
            gxs.append(gx)
            part = (g2.t() @ (x2 @ down.t())) * s
            if d_up is None:
                d_up = part
            else:
                d_up[start:stop] += part
            d_down += (gu.t() @ x2) * s
            if gb is not None:
                gb[start:stop] += g2.sum(0).to(gb.dtype)
        return (d_up, d_down, gb, None, *gxs)


class Weights:
    """The weights a forward computes with, by state-dict key (see module docstring).

    ``w(key)``: ``params[key]`` on ``device`` in ``dtype`` (a LoRA target merged, differentiable in the factors);
    ``w.linear(key, x, bias_key)``: the layer itself, through ``_LoraLinear`` for a LoRA target;
    ``w.split_linear(key, bias_key, [(x, rows), ...])``: row slices of one weight applied to several inputs.
    """

    def __init__(self, params: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 pairs: dict[str, Any] | None = None) -> None:
        self.params, self.device, self.dtype, self.pairs = params, device, dtype, pairs or {}

    def __call__(self, key: str) -> torch.Tensor:
        pair = self.pairs.get(key)
        if pair is None:
            t = self.params[key].to(device=self.device, dtype=self.dtype)
            # Inside ComfyUI the loaded weights are inference tensors, which autograd may not save: a copy per use
            # (one layer at a time) is; everywhere else this is the weight itself.
            return t.clone() if torch.is_inference(t) else t
        return merge(self.params[key], pair, self.device, self.dtype)

    def linear(self, key: str, x: torch.Tensor, bias_key: str | None = None) -> torch.Tensor:
        return self.split_linear(key, bias_key, [(x, None)])[0]

    def split_linear(self, key: str, bias_key: str | None,
                     parts: list[tuple[torch.Tensor, tuple[int, int] | None]]) -> list[torch.Tensor]:
        """``F.linear(x, W[a:b], bias[a:b])`` for each ``(x, (a, b))`` (``None``: all rows), W merged once."""
        bias = self(bias_key) if bias_key is not None else None
        pair = self.pairs.get(key)
        if pair is None:
            w = self(key)
            return [F.linear(x, w, bias) if r is None else
                    F.linear(x, w[r[0]:r[1]], None if bias is None else bias[r[0]:r[1]]) for x, r in parts]
        weight = self.params[key]
        rows = [r if r is not None else (0, weight.shape[0]) for _, r in parts]
        layer = _Layer(weight, pair, rows, self.device, self.dtype)
        return list(_LoraLinear.apply(pair.lora_up, pair.lora_down, bias, layer, *(x for x, _ in parts)))


def weight_source(params: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                  pairs: dict[str, Any] | None = None) -> Weights:
    """The ``Weights`` of ``params`` with LoRA ``pairs`` (key -> object with ``lora_up``, ``lora_down``, ``scale``)."""
    return Weights(params, device, dtype, pairs)


def _ln_channels(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm2d (no affine) of an NCHW tensor."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=LN_EPS).permute(0, 3, 1, 2)


def _linear(w: Weights, prefix: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    return w.linear(f"{prefix}.weight", x, f"{prefix}.bias" if bias else None)


def _conv1x1(w: Weights, prefix: str, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    return F.conv2d(x, w(f"{prefix}.weight"), w(f"{prefix}.bias") if has_bias else None)


def res_block(w: Weights, p: str, blk: ResBlock, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    conv = blk.depthwise
    h = F.conv2d(x, w(f"{p}.depthwise.weight"), w(f"{p}.depthwise.bias") if conv.bias is not None else None,
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), eps=LN_EPS)
    if skip is not None:
        h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)
    lin1, lin2 = blk.channelwise[0], blk.channelwise[4]
    h = F.gelu(_linear(w, f"{p}.channelwise.0", h, lin1.bias is not None))
    norm = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
    scale = norm / (norm.mean(dim=-1, keepdim=True) + GRN_EPS)
    h = w(f"{p}.channelwise.2.gamma") * (h * scale) + w(f"{p}.channelwise.2.beta") + h
    h = _linear(w, f"{p}.channelwise.4", h, lin2.bias is not None)
    return x + h.permute(0, 3, 1, 2)


def timestep_block(w: Weights, p: str, blk: TimestepBlock, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
    chunks = r_embed.chunk(len(blk.conds) + 1, dim=1)
    ab = _linear(w, f"{p}.mapper", chunks[0])
    for name, chunk in zip(blk.conds, chunks[1:]):
        ab = ab + _linear(w, f"{p}.mapper_{name}", chunk)
    a, b = ab[:, :, None, None].chunk(2, dim=1)
    return x * (1 + a) + b


def attn_block(w: Weights, p: str, blk: AttnBlock, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    bsz, c, height, width = x.shape
    kv = _linear(w, f"{p}.kv_mapper.1", F.silu(clip))
    q_in = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=LN_EPS).reshape(bsz, height * width, c)
    if blk.self_attn:
        kv = torch.cat([q_in, kv], dim=1)
    attn = blk.attention.attn
    key, bias = f"{p}.attention.attn.in_proj_weight", f"{p}.attention.attn.in_proj_bias"
    q, kv = w.split_linear(key, bias, [(q_in, (0, c)), (kv, (c, 3 * c))])
    k, v = kv.chunk(2, dim=-1)
    heads, d = attn.nhead, c // attn.nhead
    q = q.view(bsz, -1, heads, d).transpose(1, 2)
    k = k.reshape(bsz, -1, heads, d).transpose(1, 2)
    v = v.reshape(bsz, -1, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, height * width, c)
    o = _linear(w, f"{p}.attention.attn.out_proj", o, attn.out_proj.bias is not None)
    return x + o.transpose(1, 2).reshape(bsz, c, height, width)


def _level_change(w: Weights, prefix: str, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Identity):
        return x
    block = mod[1]
    conv = block.blocks[0] if block.mode == "down" else block.blocks[1]
    j = 0 if block.mode == "down" else 1
    return _conv1x1(w, f"{prefix}.1.blocks.{j}", _ln_channels(x), conv.bias is not None)


# Blocks per checkpointed segment: one ResBlock-TimestepBlock-AttnBlock triple. Checkpointing keeps each segment's
# input (c x h x w; Stage C never downsamples, so 3.4 MiB a segment for lite at 24x24). One block per segment kept 96
# such inputs, 324 MiB of the 555 MiB of live tensors a lite step held (diffusers checkpoints that way); a triple keeps
# a third, recomputes the same amount, and measured 349 MiB in all, as six blocks did (docs/RESULTS_train.md).
CHECKPOINT_BLOCKS = 3


class StageCForward:
    """Runs a Stage C network's forward from ``weights`` (see module docstring); ``net`` gives only structure."""

    def __init__(self, net: nn.Module, grad_checkpointing: bool = True) -> None:
        cfg = net.config
        if getattr(cfg, "switch_level", False) or getattr(cfg, "patch_size", 1) != 1:
            raise TrainingInputError("this Stage C uses switch_level / patch_size > 1, which no release has; the "
                                     "trainer supports the released layouts (3.6B, lite and smaller variants).")
        self.net, self.config = net, cfg
        self.grad_checkpointing = bool(grad_checkpointing)

    def _block(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor | None, keep: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not keep:
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        return fn(*args)

    def _level(self, w: Weights, prefix: str, blocks: nn.ModuleList, x: torch.Tensor, r_embed: torch.Tensor,
               clip: torch.Tensor, skip: torch.Tensor | None, last: bool = False) -> torch.Tensor:
        for k, blk in enumerate(blocks):
            if not isinstance(blk, (ResBlock, TimestepBlock, AttnBlock)):
                raise TrainingInputError(f"Stage C block {prefix}.{k} is a {type(blk).__name__}; the trainer knows "
                                         "ResBlock, TimestepBlock and AttnBlock (the released level_config 'CTA').")

        def segment(start: int, stop: int) -> Callable[..., torch.Tensor]:
            def run(h: torch.Tensor, s: torch.Tensor | None, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                for k in range(start, stop):
                    blk, p = blocks[k], f"{prefix}.{k}"
                    if isinstance(blk, ResBlock):
                        h = res_block(w, p, blk, h, s if k == 0 else None)
                    elif isinstance(blk, TimestepBlock):
                        h = timestep_block(w, p, blk, h, t)
                    else:
                        h = attn_block(w, p, blk, h, c)
                return h
            return run

        for start in range(0, len(blocks), CHECKPOINT_BLOCKS):
            stop = min(start + CHECKPOINT_BLOCKS, len(blocks))
            # The network's last segment is not checkpointed: the backward would recompute it first thing, while
            # every segment input is still held, so keeping its activations costs no peak memory and saves a
            # segment's recompute.
            x = self._block(segment(start, stop), x, skip, r_embed, clip, keep=last and stop == len(blocks))
        return x

    def __call__(self, w: Weights, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor,
                 clip_text_pooled: torch.Tensor, clip_img: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """eps prediction (B, 16, h, w) in ``dtype`` from noisy latents ``x`` and noise level ``r`` (B,)."""
        net, cfg = self.net, self.config
        embs = [timestep_embedding(r, cfg.c_r)] + [timestep_embedding(torch.zeros_like(r), cfg.c_r)
                                                   for _ in cfg.t_conds]
        r_embed = torch.cat(embs, dim=1).to(dtype)
        bsz, seq = clip_text.shape[0], cfg.c_clip_seq
        pooled = clip_text_pooled if clip_text_pooled.dim() == 3 else clip_text_pooled.unsqueeze(1)
        img = clip_img if clip_img.dim() == 3 else clip_img.unsqueeze(1)
        txt = _linear(w, "clip_txt_mapper", clip_text.to(dtype))
        pooled = _linear(w, "clip_txt_pooled_mapper", pooled.to(dtype)).view(bsz, pooled.shape[1] * seq, -1)
        img = _linear(w, "clip_img_mapper", img.to(dtype)).view(bsz, img.shape[1] * seq, -1)
        clip = torch.cat([txt, pooled, img], dim=1)
        clip = F.layer_norm(clip, (clip.shape[-1],), eps=LN_EPS)
        h = _ln_channels(_conv1x1(w, "embedding.1", x.to(dtype), net.embedding[1].bias is not None))
        level_outputs = []
        for i, (blocks, down, repmap) in enumerate(zip(net.down_blocks, net.down_downscalers,
                                                       net.down_repeat_mappers)):
            h = _level_change(w, f"down_downscalers.{i}", down, h)
            for n in range(len(repmap) + 1):
                h = self._level(w, f"down_blocks.{i}", blocks, h, r_embed, clip, None)
                if n < len(repmap):
                    h = _conv1x1(w, f"down_repeat_mappers.{i}.{n}", h, repmap[n].bias is not None)
            level_outputs.insert(0, h)
        h = level_outputs[0]
        for u, (blocks, up, repmap) in enumerate(zip(net.up_blocks, net.up_upscalers, net.up_repeat_mappers)):
            skip = level_outputs[u] if u > 0 else None
            for n in range(len(repmap) + 1):
                h = self._level(w, f"up_blocks.{u}", blocks, h, r_embed, clip, skip,
                                last=u == len(net.up_blocks) - 1 and n == len(repmap))
                if n < len(repmap):
                    h = _conv1x1(w, f"up_repeat_mappers.{u}.{n}", h, repmap[n].bias is not None)
            h = _level_change(w, f"up_upscalers.{u}", up, h)
        return _conv1x1(w, "clf.1", _ln_channels(h), net.clf[1].bias is not None)
