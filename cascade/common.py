"""Building blocks shared by Stage C and Stage B (SPEC §3), and the U-Net they both run.

Activations travel in ``torch.channels_last`` memory format: ``x.permute(0, 2, 3, 1)`` is then a free,
contiguous (B, H, W, C) view, so LayerNorm, the channel MLP and GRN run on contiguous memory without
the copies that a plain NCHW layout costs at every block. The modules keep the original release's
attribute names, so their state-dict keys are the original keys.

Blocks write into tensors they created; ``TimestepBlock`` and ``AttnBlock`` also update their input in
place when the caller says it owns it (``inplace=True``, which the U-Net passes because every block
output is a fresh tensor that nothing else holds).
"""

from __future__ import annotations

import math
from types import ModuleType, SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
GRN_EPS = 1e-6
CHANNELS_LAST = torch.channels_last
# fp16 mode (docs/FP16.md): with fp16 activations the U-Net carries its residual stream multiplied by this power of
# two. Every read of the stream goes through a LayerNorm (eps scaled by s**2, so it is exactly scale-invariant) or
# through a linear map whose result is rescaled inside the GEMM (``alpha``), so the outputs are unchanged in exact
# arithmetic while the stream has 2**8 more headroom below fp16's 65504. 2**-8 was chosen from measurements.
FP16_STREAM_SCALE = 2.0 ** -8


def stream_scale(dtype: torch.dtype, setting: float | None) -> float | None:
    """The residual-stream scale a forward in ``dtype`` uses: ``setting`` for fp16, None (today's path) otherwise.

    ``setting`` is a network's ``fp16_stream_scale``: None turns the fp16 mode off (plain fp16).
    """
    if dtype != torch.float16 or setting is None:
        return None
    return float(setting)


def ln_eps(scale: float | None) -> float:
    """LayerNorm eps for a stream carried at ``scale``: LN(s*x, eps*s^2) == LN(x, eps) exactly."""
    return LN_EPS if scale is None else LN_EPS * scale * scale


def resolve_ops(operations: ModuleType | SimpleNamespace | None) -> Any:
    """The namespace layers are built from; ``torch.nn`` unless a host passes its own."""
    return nn if operations is None else operations


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) view; contiguous when ``x`` is channels_last."""
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view; a contiguous input gives a channels_last result."""
    return x.permute(0, 3, 1, 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST)


def layer_norm_2d(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Channel LayerNorm (no affine, eps 1e-6) of a (B, C, H, W) tensor; the result is channels_last."""
    h = nhwc(x)
    return nchw(F.layer_norm(h, (h.shape[-1],), eps=eps))


def resize_like(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=True) to ``size``, in ``x``'s own dtype, kept channels_last.

    The original casts to float32 here (it ran under autocast); CPU and CUDA interpolate bf16/fp16
    directly, so no cast is needed and the result stays in the activation dtype.
    """
    out = F.interpolate(to_channels_last(x), size=tuple(size), mode="bilinear", align_corners=True)
    return to_channels_last(out)


def timestep_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise level ``r`` (B,) -> (B, c_r), sin half first (SPEC §3).

    Computed in float32 like the original (its frequency table is float32); the network casts the
    result toward its activation dtype.
    """
    r = r.to(torch.float32) * max_positions
    half = c_r // 2
    step = -math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=r.device, dtype=torch.float32) * step)
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class LayerNorm2d(nn.Module):
    """Channel LayerNorm without parameters (every LayerNorm2d in C and B is affine-free)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x)


class Workspace:
    """Scratch buffers reused by consecutive blocks of one forward pass, one buffer per tag.

    On CPU every fresh tensor above glibc's mmap threshold (32 MB at most) is mapped and page-faulted
    anew, which costs as much as the matmul that fills it; reusing the MLP's 4c-wide buffer avoids that.
    A tag keeps only its latest shape, so at most one buffer per tag is alive.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(tag)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            self._buffers.pop(tag, None)
            buf = self._buffers[tag] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


def _is_plain_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module`` computes exactly ``F.linear`` with weights usable as they are.

    Host operations (ComfyUI's cast/offload layers) override ``forward``; they are always called as modules.
    """
    return (
        type(module).forward is nn.Linear.forward
        and module.weight.dtype == x.dtype
        and module.weight.device == x.device
    )


def linear_into(module: nn.Module, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``module(x)`` for 2-D ``x``, written into ``out`` when the module is a plain Linear."""
    if out is None or not _is_plain_linear(module, x):
        return module(x)
    if module.bias is None:
        return torch.mm(x, module.weight.t(), out=out)
    return torch.addmm(module.bias, x, module.weight.t(), out=out)


def _is_plain_conv(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module`` computes exactly ``F.conv2d`` (zero padding) with weights usable as they are."""
    return (
        type(module).forward is nn.Conv2d.forward
        and module.padding_mode == "zeros"
        and module.weight.dtype == x.dtype
        and module.weight.device == x.device
    )


def conv_on_stream(module: nn.Module, x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``module(x)`` for a conv reading the residual stream carried at ``scale``: the bias is scaled too.

    conv(s*x) = s*W*x + b, and the stream needs s*(W*x + b): a plain Conv2d gets ``b * s`` as its bias
    (c values, exact for a power of two). A host's conv layer is called as it is and ``(s - 1) * b`` is added.
    """
    if scale is None or module.bias is None:
        return module(x)
    if _is_plain_conv(module, x):
        return F.conv2d(x, module.weight, module.bias * scale, module.stride, module.padding, module.dilation,
                        module.groups)
    out = module(x)
    return out.add_(module.bias.to(device=out.device, dtype=out.dtype), alpha=scale - 1.0)


def gelu_sum_of_squares_(x: torch.Tensor, chunk_elems: int = 1 << 20, fp32_squares: bool = False) -> torch.Tensor:
    """GELU ``x`` (B, N, C) in place and return the per-(B, C) sum over tokens of the result squared.

    Works in ~4 MB slices so the squares are summed while the slice is still in cache: a strided
    reduction over the token axis (``vector_norm(dim=1)``) runs at a few GB/s on CPU, and
    ``(x * x).sum(1)`` needs a full-size temporary.

    ``fp32_squares`` (the fp16 mode): square each slice in float32. In fp16 a value above 256 squares to inf,
    the first overflow of a plain fp16 forward; this statistic is the documented exception to "casts only
    toward the activation dtype" (a float32 copy of one 4 MB slice at a time; the result is float32 anyway).
    """
    bsz, n, c = x.shape
    rows = max(1, chunk_elems // c)
    # The statistic accumulates in float32 (as torch's own reductions do) so bf16 runs keep its precision.
    acc = x.new_zeros(bsz, c, dtype=torch.float32)
    for b in range(bsz):
        for s in range(0, n, rows):
            part = torch.ops.aten.gelu_(x[b, s : s + rows])
            if fp32_squares:
                part = part.to(torch.float32)
                acc[b] += part.mul_(part).sum(0)
            else:
                acc[b] += (part * part).sum(0, dtype=torch.float32)
    return acc


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: ``x + gamma * (x * N) + beta``, N = ||x||_HW / mean_C."""

    def __init__(self, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        # Zero gamma/beta make a fresh GRN the identity (ConvNeXt-V2's init); loads overwrite them.
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim, dtype=dtype, device=device))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim, dtype=dtype, device=device))

    def factors(self, sum_sq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale (B, C), beta (C,)) with GRN(x) = x * scale + beta, from the per-(B, C) sum of x**2 over H, W.

        gamma*(x*N) + beta + x == x*(1 + gamma*N) + beta, so the full-size tensor is touched once (or,
        folded into the next Linear's weights, not at all).
        """
        norm = sum_sq.sqrt()
        scale = norm / (norm.mean(dim=-1, keepdim=True) + GRN_EPS)
        # Device too: in ComfyUI's low-VRAM mode parameters outside its layer types stay offloaded.
        gamma = self.gamma.view(1, -1).to(device=scale.device, dtype=scale.dtype)
        scale = torch.addcmul(torch.ones_like(scale), gamma, scale)
        return scale.to(dtype), self.beta.to(device=scale.device, dtype=dtype).view(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> GRN(x)."""
        bsz, c = x.shape[0], x.shape[-1]
        sum_sq = torch.linalg.vector_norm(x, ord=2, dim=(1, 2)).square()
        scale, beta = self.factors(sum_sq, x.dtype)
        return torch.addcmul(beta, x, scale.view(bsz, 1, 1, c))


class ResBlock(nn.Module):
    """Depthwise conv -> LN -> [cat skip] -> Linear(4c) -> GELU -> GRN -> Linear(c), plus the input.

    Parameters:
        c (`int`): channels.
        c_skip (`int`): channels of the skip tensor concatenated before the MLP (0: none).
        kernel_size (`int`): depthwise kernel.
        dropout (`float`): kept for the key layout (``channelwise.3``); inactive at inference.
    """

    def __init__(
        self,
        c: int,
        c_skip: int = 0,
        kernel_size: int = 3,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations: Any = None,
    ) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.depthwise = ops.Conv2d(
            c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c, dtype=dtype, device=device
        )
        self.channelwise = nn.Sequential(
            ops.Linear(c + c_skip, c * 4, dtype=dtype, device=device),
            nn.GELU(),
            GlobalResponseNorm(c * 4, dtype=dtype, device=device),
            nn.Dropout(dropout),
            ops.Linear(c * 4, c, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None, ws: Workspace | None = None,
                inplace: bool = False, res_scale: float | None = None) -> torch.Tensor:
        """x (B, c, H, W), x_skip (B, c_skip, H, W) or None. ``inplace``: the result may overwrite ``x``.

        ``res_scale`` (fp16 mode): ``x`` and ``x_skip`` are the residual stream times this factor; the result is
        too. None: today's path.
        """
        lin1, _, grn, drop, lin2 = self.channelwise
        if self.training:
            h = nhwc(self.depthwise(x))
            h = F.layer_norm(h, (h.shape[-1],), eps=LN_EPS)
            if x_skip is not None:
                h = torch.cat([h, nhwc(x_skip)], dim=-1)
            return nchw(lin2(drop(grn(F.gelu(lin1(h))))) + nhwc(x))
        x = to_channels_last(x)
        bsz, c, height, width = x.shape
        tokens = height * width
        h = nhwc(self.depthwise(x) if res_scale is None else conv_on_stream(self.depthwise, x, res_scale))
        h = F.layer_norm(h, (c,), eps=ln_eps(res_scale))
        hidden = ws.get("hidden", (bsz * tokens, lin1.out_features), h) if ws is not None else None
        if x_skip is not None and res_scale is not None and _is_plain_linear(lin1, h):
            # fp16 mode: the skip is the stream at res_scale and enters lin1 unnormalised; its columns run as a
            # second GEMM that undoes the scale in its accumulator (alpha), so no fp16 copy of skip / s is made.
            skip = nhwc(to_channels_last(x_skip)).reshape(bsz * tokens, -1)
            w = lin1.weight
            if lin1.bias is None:
                first = torch.mm(h.reshape(bsz * tokens, c), w[:, :c].t(), out=hidden)
            else:
                first = torch.addmm(lin1.bias, h.reshape(bsz * tokens, c), w[:, :c].t(), out=hidden)
            h = first.addmm_(skip, w[:, c:].t(), alpha=1.0 / res_scale).view(bsz, tokens, -1)
        else:
            if x_skip is not None:
                skip = nhwc(to_channels_last(x_skip))
                if res_scale is not None:  # a host's Linear: undo the stream scale on the skip itself
                    skip = skip * (1.0 / res_scale)
                cat_out = ws.get("cat", (bsz, height, width, c + skip.shape[-1]), h) if ws is not None else None
                h = torch.cat([h, skip], dim=-1, out=cat_out) if cat_out is not None else torch.cat([h, skip], dim=-1)
            h = linear_into(lin1, h.reshape(bsz * tokens, -1), hidden).view(bsz, tokens, -1)
        # GELU in place; the 4c-wide tensor is the largest activation of the network.
        scale, beta = grn.factors(gelu_sum_of_squares_(h, fp32_squares=res_scale is not None), h.dtype)
        # The update joins the stream multiplied by the stream's scale, inside each GEMM's accumulator (alpha).
        alpha = 1.0 if res_scale is None else res_scale
        out = x if inplace else x.clone(memory_format=CHANNELS_LAST)
        res = nhwc(out).view(bsz, tokens, c)
        if _is_plain_linear(lin2, h) and tokens >= c:
            # Many tokens per channel: scale lin2's input columns (c x 4c per sample) instead of the
            # activation (tokens x 4c), and accumulate straight into the residual.
            # One 2-D GEMM per sample: CPU bmm may thread over the batch only, leaving a core idle at B=1.
            for b in range(bsz):
                res[b].addmm_(h[b], (lin2.weight * scale[b]).t(), alpha=alpha)
            bias = torch.addmv(lin2.bias, lin2.weight, beta) if lin2.bias is not None else lin2.weight @ beta
            res.add_(bias, alpha=alpha)
        elif _is_plain_linear(lin2, h):
            torch.addcmul(beta, h, scale.unsqueeze(1), out=h)
            res.view(-1, c).addmm_(h.view(-1, h.shape[-1]), lin2.weight.t(), alpha=alpha)
            if lin2.bias is not None:
                res.add_(lin2.bias, alpha=alpha)
        else:
            torch.addcmul(beta, h, scale.unsqueeze(1), out=h)
            res.add_(lin2(h), alpha=alpha)
        return out


class TimestepBlock(nn.Module):
    """``x * (1 + a) + b`` with (a, b) summed over ``mapper`` and one ``mapper_<cond>`` per extra condition."""

    def __init__(
        self,
        c: int,
        c_r: int,
        conds: Sequence[str] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations: Any = None,
    ) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.conds = tuple(conds)
        self.mapper = ops.Linear(c_r, c * 2, dtype=dtype, device=device)
        for name in self.conds:
            setattr(self, f"mapper_{name}", ops.Linear(c_r, c * 2, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, t: torch.Tensor, inplace: bool = False,
                res_scale: float | None = None) -> torch.Tensor:
        """``res_scale`` (fp16 mode): ``x`` is the stream times this factor, so the shift ``b`` is scaled too."""
        chunks = t.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(chunks[0])
        for name, chunk in zip(self.conds, chunks[1:]):
            ab = ab + getattr(self, f"mapper_{name}")(chunk)
        a, b = ab[:, None, None, :].chunk(2, dim=-1)
        if res_scale is not None:
            b = b * res_scale
        h = nhwc(to_channels_last(x))
        if inplace:
            return nchw(torch.addcmul(b, h, a + 1, out=h))
        return nchw(torch.addcmul(b, h, a + 1))


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention holding ``nn.MultiheadAttention``'s packed parameters (same keys).

    ``in_proj_weight`` stacks q|k|v (3c, c). Queries are projected with the q rows and keys/values
    with the k|v rows in one matmul; the product runs in ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        c: int,
        nhead: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations: Any = None,
    ) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        if nhead < 1 or c % nhead != 0:
            raise ValueError(f"attention width {c} is not divisible into nhead={nhead} heads")
        self.nhead = nhead
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c, dtype=dtype, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * c, dtype=dtype, device=device))
        self.out_proj = ops.Linear(c, c, dtype=dtype, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s init, so a network that is built but not loaded is finite (meta: no-op)."""
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.in_proj_bias)

    def attend(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        """q_in (B, L, c), kv_in (B, S, c) -> attention output (B, L, c) before ``out_proj``."""
        c = q_in.shape[-1]
        # Toward the activation's dtype/device only (hosts may keep weights elsewhere or in bf16).
        w = self.in_proj_weight.to(device=q_in.device, dtype=q_in.dtype)
        b = self.in_proj_bias.to(device=q_in.device, dtype=q_in.dtype)
        q = F.linear(q_in, w[:c], b[:c])
        kv = F.linear(kv_in, w[c:], b[c:])
        bsz, n_q, n_kv, d = q_in.shape[0], q_in.shape[1], kv_in.shape[1], c // self.nhead
        q = q.view(bsz, n_q, self.nhead, d).transpose(1, 2)
        kv = kv.view(bsz, n_kv, 2, self.nhead, d)
        o = F.scaled_dot_product_attention(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2))
        del q, kv
        # SDPA returns (B, heads, L, d) laid out as (B, L, heads, d): this reshape is a view.
        return o.transpose(1, 2).reshape(bsz, n_q, c)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        """q_in (B, L, c), kv_in (B, S, c) -> (B, L, c)."""
        return self.out_proj(self.attend(q_in, kv_in))


class _AttentionHolder(nn.Module):
    """Gives the attention parameters the original key path ``attention.attn.*``."""

    def __init__(self, attn: PackedMultiheadAttention) -> None:
        super().__init__()
        self.attn = attn


class AttnBlock(nn.Module):
    """Pre-norm attention from the image tokens to (image tokens ++ conditioning tokens), plus the input.

    Parameters:
        c (`int`): channels of the image tokens.
        c_cond (`int`): width of the conditioning tokens (mapped to ``c`` by ``kv_mapper``).
        nhead (`int`): heads (64 channels each in every released model).
        self_attn (`bool`): prepend the normed image tokens to the keys/values.
    """

    def __init__(
        self,
        c: int,
        c_cond: int,
        nhead: int,
        self_attn: bool = True,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations: Any = None,
    ) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.self_attn = self_attn
        self.attention = _AttentionHolder(PackedMultiheadAttention(c, nhead, dtype, device, operations))
        self.kv_mapper = nn.Sequential(nn.SiLU(), ops.Linear(c_cond, c, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, inplace: bool = False,
                res_scale: float | None = None) -> torch.Tensor:
        """x (B, c, H, W), kv (B, S, c_cond). ``inplace``: the result may overwrite ``x``.

        ``res_scale`` (fp16 mode): ``x`` is the stream times this factor; the result is too.
        """
        x = to_channels_last(x)
        bsz, c, height, width = x.shape
        kv = self.kv_mapper(kv)
        q_in = F.layer_norm(nhwc(x), (c,), eps=ln_eps(res_scale)).view(bsz, height * width, c)
        if self.self_attn:
            kv = torch.cat([q_in, kv], dim=1)
        attn = self.attention.attn
        o = attn.attend(q_in, kv).view(-1, c)
        del q_in, kv
        out = x if inplace else x.clone(memory_format=CHANNELS_LAST)
        res = nhwc(out).view(-1, c)
        alpha = 1.0 if res_scale is None else res_scale
        if _is_plain_linear(attn.out_proj, o):
            # The output projection accumulates straight into the residual stream.
            res.addmm_(o, attn.out_proj.weight.t(), alpha=alpha)
            if attn.out_proj.bias is not None:
                res.add_(attn.out_proj.bias, alpha=alpha)
        else:
            res.add_(attn.out_proj(o), alpha=alpha)
        return out
