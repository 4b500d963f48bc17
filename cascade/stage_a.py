"""Stage A, the VQGAN that maps Stage B latents to pixels (SPEC §6), with the original state-dict keys.

Two conventions for the latent (see DESIGN.md "LATENT convention"):

- official: ``encode(x)`` returns ``down(x) / 0.43`` (the Stage B latent) and ``decode(z)`` runs
  ``up(z * 0.43)``;
- raw (ComfyUI core's ``SC_B`` storage): ``encode_raw`` / ``decode_raw`` skip the 0.43.

Inference runs a lean path: activations stay ``channels_last``, so the (B, H, W, C) views that the
LayerNorms and the channel MLP read are free; the block gammas are folded into the layer weights; the
depthwise conv runs in bands of rows and the MLP in chunks of rows, both adding into the block input in
place. A block then needs its input plus a few MB, instead of several full-size temporaries (the
4c-wide MLP activation at 512x512 alone is 800 MB in float32).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_keys
from .common import nchw, nhwc, resolve_ops, to_channels_last
from .errors import CheckpointError, ShapeError

log = logging.getLogger(__name__)

SCALE_FACTOR = 0.43
LN_EPS = 1e-6
# Working-set targets of the chunked paths, in elements (4M = 16 MB in fp32). A depthwise band
# recomputes the LayerNorm of its two halo rows, so bands are kept tall (~40 rows at 384 x 256);
# MLP chunks need >= ~1024 rows for full-speed GEMMs on CPU (a few hundred rows run at half
# speed): ~2700 rows at c=384, which cuts the 4c-wide activation 25x at a 256^2 latent.
_BAND_ELEMS = 1 << 22
_MLP_HIDDEN_ELEMS = 1 << 22


@dataclass(frozen=True)
class StageAConfig:
    """Hyper-parameters of Stage A; defaults are the release (``stage_a.safetensors``, 18.4M params)."""

    levels: int = 2
    bottleneck_blocks: int = 12
    c_hidden: int = 384
    c_latent: int = 4
    codebook_size: int = 8192

    @property
    def c_levels(self) -> list[int]:
        """Channels per level, shallowest first (192, 384 for the release)."""
        return [self.c_hidden // (2**i) for i in reversed(range(self.levels))]

    @classmethod
    def tiny(cls) -> StageAConfig:
        """A small variant with the release's key layout, for tests and weightless demo runs."""
        return cls(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> StageAConfig:
        """Infer the config from original-layout keys and shapes (the release or any smaller variant)."""
        what = "Stage A state dict"
        required = ["in_block.1.weight", "up_blocks.0.0.weight", "vquantizer.codebook.weight", "out_block.0.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            hint = ""
            if "vquantizer.embedding.weight" in sd:
                hint = " It looks like diffusers' PaellaVQModel layout (vquantizer.embedding.weight);"
                hint += " rename that key to vquantizer.codebook.weight."
            elif any(k.startswith("vae.") for k in sd):
                hint = " Keys start with 'vae.' (a packaged checkpoint); strip that prefix first."
            sample = ", ".join(sorted(sd)[:5]) or "no keys at all"
            raise CheckpointError(
                f"{what}: key {missing[0]!r} is missing (found e.g. {sample}); expected the original "
                f"stage_a.safetensors layout.{hint} Pick the Stage A file (stage_a.safetensors) for this loader."
            )
        down_res = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"down_blocks\.(\d+)\.gammas", k)))
        up_res = [k for k in sd if re.fullmatch(r"up_blocks\.(\d+)\.gammas", k)]
        levels = len(down_res)
        if levels < 1:
            raise CheckpointError(f"{what}: no down_blocks.*.gammas keys; the file is not a Stage A (VQGAN).")
        c_hidden = unet_keys.shape_of(sd, "up_blocks.0.0.weight", what, rank=4)[0]
        codebook_size, c_latent = unet_keys.shape_of(sd, "vquantizer.codebook.weight", what, rank=2)
        config = cls(
            levels=levels,
            bottleneck_blocks=len(up_res) - (levels - 1),
            c_hidden=c_hidden,
            c_latent=c_latent,
            codebook_size=codebook_size,
        )
        _check_keys(config, sd, what)
        return config


def _check_keys(config: StageAConfig, sd: Mapping[str, Any], what: str) -> None:
    want = {k: tuple(v.shape) for k, v in unet_keys.build_meta(StageA, config, what).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected or wrong:
        detail = "; ".join(
            p for p in (
                f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                ", ".join(f"{k}: file {have[k]} vs {want[k]}" for k in wrong[:3]),
            ) if p
        )
        raise CheckpointError(
            f"{what}: the keys fit no consistent Stage A (inferred {config}): {detail}. "
            "The file is damaged or not a Stage A."
        )


def _plain(module: nn.Module, base: type, x: torch.Tensor) -> bool:
    """True when ``module`` is an unmodified torch layer whose weights can be used as they are.

    Host layers (ComfyUI's cast/offload ops) override ``forward`` and are always called as modules.
    """
    return type(module).forward is base.forward and module.weight.dtype == x.dtype and module.weight.device == x.device


class StageAResBlock(nn.Module):
    """LN -> replicate-padded depthwise 3x3 -> residual; LN -> MLP(4c, GELU) -> residual; six gammas.

    Keys: ``gammas`` (6), ``depthwise.1.*`` (index 0 is the ReplicationPad2d), ``channelwise.{0,2}.*``.
    """

    def __init__(self, c: int, c_hidden: int, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.depthwise = nn.Sequential(
            nn.ReplicationPad2d(1), ops.Conv2d(c, c, kernel_size=3, groups=c, dtype=dtype, device=device)
        )
        self.channelwise = nn.Sequential(
            ops.Linear(c, c_hidden, dtype=dtype, device=device),
            nn.GELU(),
            ops.Linear(c_hidden, c, dtype=dtype, device=device),
        )
        self.gammas = nn.Parameter(torch.zeros(6, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace=True``: the caller owns ``x`` (nothing else reads it), so it is updated in place."""
        conv, (lin1, _, lin2) = self.depthwise[1], self.channelwise
        fast = (
            not (torch.is_grad_enabled() and (self.gammas.requires_grad or x.requires_grad))
            and _plain(conv, nn.Conv2d, x) and _plain(lin1, nn.Linear, x) and _plain(lin2, nn.Linear, x)
            and self.gammas.device == x.device
        )
        if not fast:
            return self._forward_modules(x)
        if not inplace:
            x = x.clone(memory_format=torch.channels_last)
        elif not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            g = self.gammas.to(device=x.device, dtype=x.dtype)
            self._depthwise_into(x, g)
            self._mlp_into(x, g)
        return x

    def _forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """Reference formulation through the module calls (training, autograd, host-provided layers)."""
        g = self.gammas.to(device=x.device, dtype=x.dtype)
        c = x.shape[1]
        t = nchw(F.layer_norm(nhwc(x), (c,), eps=LN_EPS)) * (1 + g[0]) + g[1]
        x = x + self.depthwise(t) * g[2]
        t = F.layer_norm(nhwc(x), (c,), eps=LN_EPS) * (1 + g[3]) + g[4]
        return x + nchw(self.channelwise(t)) * g[5]

    def _depthwise_into(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """x += g2 * DWConv(ReplicationPad(LN(x) * (1 + g0) + g1)), in bands of rows.

        A band reads one halo row on each side, so its result is added only after the next band has
        read that band's last row: every band then sees the block input, not partly updated rows.
        """
        conv = self.depthwise[1]
        bsz, c, height, width = x.shape
        ln_w = (1 + g[0]).expand(c).contiguous()
        ln_b = g[1].expand(c).contiguous()
        weight = conv.weight * g[2]
        bias = conv.bias * g[2] if conv.bias is not None else None
        band = max(1, min(height, _BAND_ELEMS // max(1, width * c * bsz)))
        pending: tuple[int, int, torch.Tensor] | None = None
        for y0 in range(0, height, band):
            y1 = min(height, y0 + band)
            a0, a1 = max(0, y0 - 1), min(height, y1 + 1)
            t = F.layer_norm(nhwc(x[:, :, a0:a1]), (c,), ln_w, ln_b, LN_EPS)
            t = F.pad(nchw(t), (1, 1, 1 if y0 == 0 else 0, 1 if y1 == height else 0), mode="replicate")
            out = F.conv2d(t, weight, bias, groups=c)
            del t
            if pending is not None:
                p0, p1, prev = pending
                x[:, :, p0:p1].add_(prev)
            pending = (y0, y1, out)
        if pending is not None:
            p0, p1, prev = pending
            x[:, :, p0:p1].add_(prev)

    def _mlp_into(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """x += g5 * MLP(LN(x) * (1 + g3) + g4), over chunks of rows (each row only reads itself)."""
        lin1, _, lin2 = self.channelwise
        c = x.shape[1]
        ln_w = (1 + g[3]).expand(c).contiguous()
        ln_b = g[4].expand(c).contiguous()
        w1t = lin1.weight.t()
        w2t = (lin2.weight * g[5]).t()
        b2 = lin2.bias * g[5] if lin2.bias is not None else None
        flat = nhwc(x).reshape(-1, c)  # a view: x is channels_last contiguous
        rows = max(1024, _MLP_HIDDEN_ELEMS // lin1.out_features // 256 * 256)
        for s in range(0, flat.shape[0], rows):
            part = flat[s : s + rows]
            t = F.layer_norm(part, (c,), ln_w, ln_b, LN_EPS)
            h = torch.addmm(lin1.bias, t, w1t) if lin1.bias is not None else t @ w1t
            del t
            torch.ops.aten.gelu_(h)
            out = torch.addmm(b2, h, w2t) if b2 is not None else h @ w2t
            del h
            part.add_(out)


class _Codebook(nn.Module):
    """Holds ``weight`` like ``nn.Embedding`` (same key) without its random init, which on the meta
    device goes through torch's slow Python reference ops."""

    def __init__(self, n: int, c: int, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, c, dtype=dtype, device=device))


class VectorQuantizer(nn.Module):
    """Nearest-codebook (L2) quantiser; holds the key ``codebook.weight`` (codebook_size x c_latent)."""

    def __init__(self, c_latent: int, codebook_size: int, dtype=None, device=None) -> None:
        super().__init__()
        self.codebook = _Codebook(codebook_size, c_latent, dtype, device)

    def forward(self, z: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, c, h, w) -> (codebook entries (B, c, h, w), indices (B, h, w)).

        Distances are taken in row chunks so the (pixels x codebook) matrix stays small.
        """
        bsz, c, height, width = z.shape
        cb = self.codebook.weight.to(device=z.device, dtype=z.dtype)
        cb_sq = (cb * cb).sum(1)
        flat = nhwc(z).reshape(-1, c)
        idx = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        for s in range(0, flat.shape[0], chunk_rows):
            part = flat[s : s + chunk_rows]
            # ||z||^2 is the same for every code of a row, so it does not change the argmin.
            dist = torch.addmm(cb_sq, part, cb.t(), alpha=-2.0)
            idx[s : s + chunk_rows] = dist.argmin(1)
        q = cb[idx].view(bsz, height, width, c).permute(0, 3, 1, 2).contiguous()
        return q, idx.view(bsz, height, width)


class StageA(nn.Module):
    """The Stage A VQGAN: 4x down/up-sampling between RGB in [0, 1] and a 4-channel latent."""

    def __init__(self, config: StageAConfig | None = None, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        cfg = config or StageAConfig()
        ops = resolve_ops(operations)
        self.config = cfg
        c_levels = cfg.c_levels
        kw = dict(dtype=dtype, device=device)
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), ops.Conv2d(3 * 4, c_levels[0], kernel_size=1, **kw))
        down: list[nn.Module] = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(ops.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1, **kw))
            down.append(StageAResBlock(c_levels[i], c_levels[i] * 4, operations=ops, **kw))
        down.append(nn.Sequential(
            ops.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False, **kw),
            ops.BatchNorm2d(cfg.c_latent, **kw),
        ))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.c_latent, cfg.codebook_size, **kw)
        up: list[nn.Module] = [nn.Sequential(ops.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1, **kw))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(StageAResBlock(c, c * 4, operations=ops, **kw))
            if i < cfg.levels - 1:
                c_next = c_levels[cfg.levels - 2 - i]
                up.append(ops.ConvTranspose2d(c, c_next, kernel_size=4, stride=2, padding=1, **kw))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(ops.Conv2d(c_levels[0], 3 * 4, kernel_size=1, **kw), nn.PixelShuffle(2))
        self.eval()  # BatchNorm uses its running statistics unless someone trains this module

    @property
    def dtype(self) -> torch.dtype:
        return self.in_block[1].weight.dtype

    def _grad_context(self) -> Any:
        """Eval mode is inference: no autograd graph (the lean path needs none, and a decode's graph
        would hold gigabytes); train mode keeps autograd for whoever trains this module."""
        return contextlib.nullcontext() if self.training else torch.no_grad()

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        # Every tensor handed to a block here was made by the previous layer, so blocks may update it.
        for blk in blocks:
            if isinstance(blk, StageAResBlock):
                x = blk(to_channels_last(x), inplace=True)
            else:
                x = blk(x)
        return x

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [0, 1], H and W multiples of 4 -> latent (B, c_latent, H/4, W/4), no 0.43."""
        _check_input(x, 3, 4, "Stage A encode: image")
        with self._grad_context():
            h = to_channels_last(self.in_block(x.to(self.dtype)))
            h = self._run(self.down_blocks, h)
            return h.contiguous()

    def quantize_raw(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw latent -> (nearest codebook entries, indices). Only Stage A training used this."""
        return self.vquantizer(z)

    def encode(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Official encode: ``down(x) / 0.43``, the Stage B latent.

        With ``quantize=True`` the latent is first replaced by its nearest codebook entries (the
        official code's first return value ``qe / 0.43``); only the tensor is returned, not the
        official tuple with the unquantised latent, indices and VQ loss.
        """
        z = self.encode_raw(x)
        if quantize:
            z = self.quantize_raw(z)[0]
        return z / SCALE_FACTOR

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, c_latent, h, w) -> image (B, 3, 4h, 4w), ~[0, 1], not clamped."""
        _check_input(z, self.config.c_latent, 1, "Stage A decode: latent")
        with self._grad_context():
            h = self._run(self.up_blocks, z.to(self.dtype))
            h = self.out_block(h)
            return h.contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Official decode: ``up(z * 0.43)`` for a Stage B latent ``z``."""
        return self.decode_raw(z * SCALE_FACTOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction without quantisation: ``decode(encode(x))``."""
        return self.decode(self.encode(x))


def _check_input(x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ShapeError(
            f"{what} has shape {tuple(x.shape)}; expected (B, {channels}, H, W)"
            + (f" with H and W multiples of {multiple}" if multiple > 1 else "")
            + ". Resize or crop the input to fit."
        )
