"""Stable Cascade ControlNets (SPEC §12.1-12.2): a backbone plus one projection per injected Stage C block.

``forward(x)`` returns a list of length ``max(proj_blocks) + 1``: the projection outputs at the indices in
``proj_blocks``, ``None`` elsewhere. Stage C adds element ``i`` (resized) before its ``i``-th ResBlock
call. ``proj_blocks`` is not stored in the weights; every released file uses (0, 4, 8, 12, 51, 55, 59, 63).

Backbones (``bottleneck_mode``):
- ``effnet``: EfficientNetV2-S features (see effnet.py); for ``c_in != 3`` the stem conv is a padding-0
  conv over ``c_in`` channels, as in the release (canny c_in=1, inpainting c_in=4). Stride 32.
- ``large``: 1x1 convs c_in -> 16384 -> 1024, 8 residual LayerNorm/GELU/3x3-conv blocks, 1x1 to 1280
  (super-resolution, c_in=16 EffNet latents). Stride 1.
- ``simple``: 3x3 convs c_in -> 4 c_in -> c_in (the unreleased identity ControlNet). Stride 1.
The input is the filter output as it is (not ImageNet-normalised).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from . import unet_keys
from .common import resolve_ops
from .effnet import EffNetConfig, features_config, build_features
from .errors import CheckpointError, ShapeError

log = logging.getLogger(__name__)

RELEASE_PROJ_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)
MODES = ("effnet", "large", "simple")


@dataclass(frozen=True)
class ControlNetConfig:
    """Defaults: an RGB effnet ControlNet for the 3.6B Stage C; see the named variants below."""

    c_in: int = 3
    c_proj: int = 2048
    proj_blocks: tuple[int, ...] = RELEASE_PROJ_BLOCKS
    bottleneck_mode: str = "effnet"
    effnet: EffNetConfig = field(default_factory=EffNetConfig)
    c_large_hidden: int = 16384
    c_large: int = 1024
    large_blocks: int = 8
    c_large_out: int = 1280

    @property
    def c_embed(self) -> int:
        """Channels the projections read."""
        if self.bottleneck_mode == "effnet":
            return self.effnet.c_head
        if self.bottleneck_mode == "large":
            return self.c_large_out
        return self.c_in

    @property
    def stride(self) -> int:
        """Input pixels per output pixel (effnet: 32; the others keep the input size)."""
        return 32 if self.bottleneck_mode == "effnet" else 1

    @classmethod
    def canny(cls) -> ControlNetConfig:
        return cls(c_in=1)

    @classmethod
    def inpainting(cls) -> ControlNetConfig:
        return cls(c_in=4)

    @classmethod
    def super_resolution(cls) -> ControlNetConfig:
        return cls(c_in=16, bottleneck_mode="large")

    @classmethod
    def identity(cls) -> ControlNetConfig:
        """Unreleased (its config has no checkpoint); face-ID maps of 512 channels, every block injected."""
        return cls(c_in=512, bottleneck_mode="simple", proj_blocks=tuple(range(64)))

    @classmethod
    def tiny(cls, c_proj: int = 64, bottleneck_mode: str = "effnet", c_in: int | None = None) -> ControlNetConfig:
        """A small variant with the release key pattern; ``c_proj`` = the width of the tiny Stage C it feeds.

        With ``StageCConfig.tiny()`` (6 ResBlock calls) only the entries at 0 and 4 of the release
        ``proj_blocks`` land; pass ``dataclasses.replace(cfg, proj_blocks=...)`` to inject elsewhere.
        """
        if c_in is None:
            c_in = {"effnet": 1, "large": 16, "simple": 8}.get(bottleneck_mode, 1)
        # Only the chosen mode's fields shrink, so the config equals what from_state_dict reads back.
        if bottleneck_mode == "effnet":
            return cls(c_in=c_in, c_proj=c_proj, effnet=EffNetConfig.tiny())
        if bottleneck_mode == "large":
            return cls(c_in=c_in, c_proj=c_proj, bottleneck_mode="large", c_large_hidden=64, c_large=32,
                       large_blocks=2, c_large_out=48)
        return cls(c_in=c_in, c_proj=c_proj, bottleneck_mode=bottleneck_mode)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], proj_blocks: tuple[int, ...] | None = None) -> ControlNetConfig:
        """Infer mode, c_in, widths and c_proj from original-layout keys.

        ``proj_blocks`` is not in the file: 8 projections get the release list, any other count n gets
        0..n-1 (the identity config's pattern), unless the caller gives the list.
        """
        what = "ControlNet state dict"
        n_proj = len({m.group(1) for k in sd if (m := re.match(r"projections\.(\d+)\.0\.weight$", k))})
        if n_proj == 0 or "projections.0.2.weight" not in sd:
            sample = ", ".join(sorted(sd)[:5]) or "no keys at all"
            raise CheckpointError(
                f"{what}: no projections.*.0.weight / projections.0.2.weight keys (found e.g. {sample}); "
                "expected a Stable Cascade ControlNet (canny, inpainting, super_resolution .safetensors). "
                "Pick a ControlNet file for this loader."
            )
        c_proj = unet_keys.shape_of(sd, "projections.0.2.weight", what, rank=4)[0]
        if proj_blocks is None:
            proj_blocks = RELEASE_PROJ_BLOCKS if n_proj == len(RELEASE_PROJ_BLOCKS) else tuple(range(n_proj))
        proj_blocks = tuple(int(i) for i in proj_blocks)
        if len(proj_blocks) != n_proj:
            raise CheckpointError(
                f"{what}: the file has {n_proj} projections but proj_blocks={proj_blocks} lists {len(proj_blocks)}; "
                "give one Stage C block index per projection."
            )
        if "backbone.0.0.weight" in sd:
            c_in = unet_keys.shape_of(sd, "backbone.0.0.weight", what, rank=4)[1]
            cfg = cls(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode="effnet",
                      effnet=features_config(EffNetConfig, sd, "backbone.", what))
        elif "backbone.3.blocks.0.weight" in sd:
            n_blocks = len({m.group(1) for k in sd if (m := re.match(r"backbone\.(\d+)\.blocks\.0\.weight$", k))})
            out_key = f"backbone.{3 + n_blocks}.weight"
            if out_key not in sd or "backbone.2.weight" not in sd:
                raise CheckpointError(
                    f"{what}: 'large' backbone without {out_key} or backbone.2.weight; the file is damaged."
                )
            c_large_hidden, c_in = unet_keys.shape_of(sd, "backbone.0.weight", what, rank=4)[:2]
            cfg = cls(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks,
                      bottleneck_mode="large", c_large_hidden=c_large_hidden,
                      c_large=unet_keys.shape_of(sd, "backbone.2.weight", what, rank=4)[0], large_blocks=n_blocks,
                      c_large_out=unet_keys.shape_of(sd, out_key, what, rank=4)[0])
        elif "backbone.0.weight" in sd and "backbone.2.weight" in sd:
            cfg = cls(c_in=unet_keys.shape_of(sd, "backbone.0.weight", what, rank=4)[1], c_proj=c_proj,
                      proj_blocks=proj_blocks, bottleneck_mode="simple")
        else:
            raise CheckpointError(
                f"{what}: the backbone keys fit none of the modes {MODES} (no backbone.0.0.weight, "
                "backbone.3.blocks.0.weight or backbone.0.weight); the file is damaged or not a Stable Cascade "
                "ControlNet."
            )
        _check_keys(cfg, sd, what)
        return cfg


def _check_keys(cfg: ControlNetConfig, sd: Mapping[str, Any], what: str) -> None:
    want = {k: tuple(v.shape) for k, v in unet_keys.build_meta(ControlNet, cfg, what).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if bad:
        raise CheckpointError(
            f"{what}: keys/shapes fit no {cfg.bottleneck_mode} ControlNet with c_in={cfg.c_in} ("
            + ", ".join(f"{k}: file {have.get(k)} vs {want.get(k)}" for k in bad[:3])
            + f"; {len(bad)} differences). The file is damaged or a variant this loader does not know."
        )


def _channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNetResBlock(nn.Module):
    """x + [LN -> GELU -> Conv3x3 -> LN -> GELU -> Conv3x3]; keys ``blocks.{0,2,3,5}.*``.

    The LayerNorms (affine, eps 1e-5) normalise over channels; they sit in ``blocks`` as plain
    LayerNorm layers (the original subclassed LayerNorm, so its keys have no extra level).
    """

    def __init__(self, c: int, ops: Any, kw: dict) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ops.LayerNorm(c, eps=1e-5, **kw), nn.GELU(), ops.Conv2d(c, c, 3, padding=1, **kw),
            ops.LayerNorm(c, eps=1e-5, **kw), nn.GELU(), ops.Conv2d(c, c, 3, padding=1, **kw),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln1, act1, conv1, ln2, act2, conv2 = self.blocks
        h = conv1(act1(_channel_norm(ln1, x)))
        h = conv2(act2(_channel_norm(ln2, h)))
        return h.add_(x)


class ControlNet(nn.Module):
    """Control image/features -> per-block additions for Stage C."""

    def __init__(self, config: ControlNetConfig | None = None, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        cfg = config or ControlNetConfig()
        if cfg.bottleneck_mode not in MODES:
            raise ValueError(f"ControlNet bottleneck_mode {cfg.bottleneck_mode!r} is unknown; expected one of {MODES}")
        if not cfg.proj_blocks or min(cfg.proj_blocks) < 0:
            raise ValueError(f"ControlNet proj_blocks {cfg.proj_blocks} must be a non-empty list of indices >= 0")
        ops = resolve_ops(operations)
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.proj_blocks = list(cfg.proj_blocks)
        if cfg.bottleneck_mode == "effnet":
            # The release replaced the RGB stem with a padding-0 conv whenever c_in != 3.
            self.backbone = build_features(cfg.effnet, cfg.c_in, 1 if cfg.c_in == 3 else 0, dtype, device, ops)
        elif cfg.bottleneck_mode == "large":
            self.backbone = nn.Sequential(
                ops.Conv2d(cfg.c_in, cfg.c_large_hidden, 1, **kw),
                nn.LeakyReLU(0.2, inplace=True),
                ops.Conv2d(cfg.c_large_hidden, cfg.c_large, 1, **kw),
                *[CNetResBlock(cfg.c_large, ops, kw) for _ in range(cfg.large_blocks)],
                ops.Conv2d(cfg.c_large, cfg.c_large_out, 1, **kw),
            )
        else:
            self.backbone = nn.Sequential(
                ops.Conv2d(cfg.c_in, cfg.c_in * 4, 3, padding=1, **kw),
                nn.LeakyReLU(0.2, inplace=True),
                ops.Conv2d(cfg.c_in * 4, cfg.c_in, 3, padding=1, **kw),
            )
        c = cfg.c_embed
        self.projections = nn.ModuleList(
            nn.Sequential(
                ops.Conv2d(c, c, 1, bias=False, **kw),
                nn.LeakyReLU(0.2, inplace=True),
                ops.Conv2d(c, cfg.c_proj, 1, bias=False, **kw),
            )
            for _ in cfg.proj_blocks
        )
        self.eval()  # the effnet backbone's BatchNorms use running statistics

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projections[0].parameters()).dtype

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """(B, c_in, H, W) filter output -> list with (B, c_proj, H/stride, W/stride) at ``proj_blocks``."""
        if x.ndim != 4 or x.shape[1] != self.config.c_in:
            raise ShapeError(
                f"ControlNet ({self.config.bottleneck_mode}, c_in={self.config.c_in}): input has shape "
                f"{tuple(x.shape)}; expected (B, {self.config.c_in}, H, W). Use the filter this ControlNet was "
                "trained with (canny: 1 channel, inpainting: RGB + mask, super-resolution: 16-channel EffNet latent)."
            )
        h = self.backbone(x.to(self.dtype))
        out: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for idx, proj in zip(self.proj_blocks, self.projections):
            out[idx] = proj(h)
        return out

