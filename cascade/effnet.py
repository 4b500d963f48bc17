"""The EfficientNet encoder that defines Stage C's latent space (SPEC §7), with the original keys.

``backbone`` is EfficientNetV2-S's ``features`` (stem, six stages of Fused-MBConv / MBConv blocks, a
1x1 head to 1280 channels; output stride 32), written here in plain torch with the same module tree as
torchvision's, so the original ``backbone.<stage>.<block>.block.<layer>.*`` keys load unchanged.
``mapper`` is a 1x1 conv to 16 channels and an affine-free BatchNorm, which makes the latent about
unit-variance per channel. Everything runs in eval mode (BatchNorm running statistics).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_keys
from .common import resolve_ops
from .errors import CheckpointError, ShapeError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # every BatchNorm of EfficientNetV2's features; the mapper's uses torch's default 1e-5

# EfficientNetV2-S stages 1..6: (block kind, expand ratio, stride, output channels, blocks).
# Strides are not visible in a state dict; every released EfficientNet uses this pattern.
V2_S_STAGES: tuple[tuple[str, int, int, int, int], ...] = (
    ("fused", 1, 1, 24, 2),
    ("fused", 4, 2, 48, 4),
    ("fused", 4, 2, 64, 4),
    ("mb", 4, 2, 128, 6),
    ("mb", 6, 1, 160, 9),
    ("mb", 6, 2, 256, 15),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (never below 90% of ``v``), as EfficientNet does."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class EffNetConfig:
    """Hyper-parameters of the encoder; defaults are the release (``effnet_encoder.safetensors``)."""

    c_stem: int = 24
    stages: tuple[tuple[str, int, int, int, int], ...] = V2_S_STAGES
    c_head: int = 1280
    c_latent: int = 16

    @classmethod
    def tiny(cls) -> EffNetConfig:
        """A small variant with the release's key pattern (same stage kinds and strides, stride 32)."""
        stages = (("fused", 1, 1, 8, 1), ("fused", 4, 2, 16, 2), ("fused", 4, 2, 16, 1),
                  ("mb", 4, 2, 24, 1), ("mb", 6, 1, 32, 2), ("mb", 6, 2, 32, 2))
        return cls(c_stem=8, stages=stages, c_head=64, c_latent=16)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], prefix: str = "backbone.") -> EffNetConfig:
        """Infer widths, expand ratios and depths from original-layout keys (strides: the V2-S pattern).

        ``prefix`` is where the features live (``backbone.`` in both the encoder and effnet ControlNets).
        Without ``mapper.0.weight`` (a ControlNet), ``c_latent`` keeps its default.
        """
        return features_config(cls, sd, prefix, "EfficientNet state dict")


def features_config(cls: type, sd: Mapping[str, Any], prefix: str, what: str) -> EffNetConfig:
    stem_key = f"{prefix}0.0.weight"
    if stem_key not in sd:
        sample = ", ".join(sorted(sd)[:5]) or "no keys at all"
        raise CheckpointError(
            f"{what}: key {stem_key!r} (the stem conv) is missing (found e.g. {sample}); expected the original "
            "effnet_encoder.safetensors layout. Pick the EfficientNet encoder file for this loader."
        )
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.(\d+)\.")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = pat.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    head = max(blocks) if blocks else 0
    if head < 2 or f"{prefix}{head}.0.weight" not in sd:
        raise CheckpointError(f"{what}: found no stage/head keys under {prefix!r}; the file is not an EfficientNet.")
    c_stem = unet_keys.shape_of(sd, stem_key, what, rank=4)[0]
    c_in = c_stem
    stages = []
    for s in range(1, head):
        n_blocks = len(blocks.get(s, ()))
        if n_blocks == 0:
            raise CheckpointError(f"{what}: stage {s} has no blocks ({prefix}{s}.0.* missing); the file is damaged.")
        first = f"{prefix}{s}.0.block."
        mb = f"{first}2.fc1.weight" in sd
        expanded = unet_keys.shape_of(sd, f"{first}0.0.weight", what, rank=4)[0]
        if mb or f"{first}1.0.weight" in sd:
            c_out = unet_keys.shape_of(sd, f"{first}{3 if mb else 1}.0.weight", what, rank=4)[0]
            expand = max(1, round(expanded / c_in))
        else:
            c_out, expand = expanded, 1
        stride = V2_S_STAGES[s - 1][2] if s - 1 < len(V2_S_STAGES) else 1
        stages.append(("mb" if mb else "fused", expand, stride, c_out, n_blocks))
        c_in = c_out
    c_head = unet_keys.shape_of(sd, f"{prefix}{head}.0.weight", what, rank=4)[0]
    c_latent = unet_keys.shape_of(sd, "mapper.0.weight", what, rank=4)[0] if "mapper.0.weight" in sd else cls.c_latent
    return cls(c_stem=c_stem, stages=tuple(stages), c_head=c_head, c_latent=c_latent)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int, act: bool, ops: Any, kw: dict,
             padding: int | None = None) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm(eps 1e-3) [-> SiLU]; keys ``0.weight``, ``1.*``."""
    pad = (k - 1) // 2 if padding is None else padding
    layers = [ops.Conv2d(c_in, c_out, k, stride=stride, padding=pad, groups=groups, bias=False, **kw),
              ops.BatchNorm2d(c_out, eps=BN_EPS, **kw)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(SiLU(fc1(mean_HW(x))))); keys ``fc1.*``, ``fc2.*`` (1x1 convs with bias)."""

    def __init__(self, c: int, c_squeeze: int, ops: Any, kw: dict) -> None:
        super().__init__()
        self.fc1 = ops.Conv2d(c, c_squeeze, 1, **kw)
        self.fc2 = ops.Conv2d(c_squeeze, c, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * s


class EffNetBlock(nn.Module):
    """One Fused-MBConv or MBConv block; ``block`` holds the layers, the residual needs stride 1, c_in == c_out."""

    def __init__(self, kind: str, c_in: int, c_out: int, expand: int, stride: int, ops: Any, kw: dict) -> None:
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        expanded = _make_divisible(c_in * expand)
        if kind == "fused":
            if expanded != c_in:
                layers = [_conv_bn(c_in, expanded, 3, stride, 1, True, ops, kw),
                          _conv_bn(expanded, c_out, 1, 1, 1, False, ops, kw)]
            else:
                layers = [_conv_bn(c_in, c_out, 3, stride, 1, True, ops, kw)]
        elif kind == "mb":
            layers = []
            if expanded != c_in:
                layers.append(_conv_bn(c_in, expanded, 1, 1, 1, True, ops, kw))
            layers += [_conv_bn(expanded, expanded, 3, stride, expanded, True, ops, kw),
                       SqueezeExcitation(expanded, max(1, c_in // 4), ops, kw),
                       _conv_bn(expanded, c_out, 1, 1, 1, False, ops, kw)]
        else:
            raise ValueError(f"EfficientNet block kind {kind!r} is not supported (expected 'fused' or 'mb')")
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        # Stochastic depth is the identity in eval mode, so the residual is a plain sum.
        return out.add_(x) if self.residual else out


def build_features(cfg: EffNetConfig, c_in: int = 3, stem_padding: int = 1, dtype=None, device=None,
                   operations=None) -> nn.Sequential:
    """EfficientNetV2 ``features``: stem, stages, head; indices match torchvision's keys.

    The effnet ControlNets replace the stem by a padding-0 conv over ``c_in`` channels.
    """
    ops = resolve_ops(operations)
    kw = dict(dtype=dtype, device=device)
    layers: list[nn.Module] = [_conv_bn(c_in, cfg.c_stem, 3, 2, 1, True, ops, kw, padding=stem_padding)]
    c = cfg.c_stem
    for kind, expand, stride, c_out, n_blocks in cfg.stages:
        stage = []
        for j in range(n_blocks):
            stage.append(EffNetBlock(kind, c if j == 0 else c_out, c_out, expand, stride if j == 0 else 1, ops, kw))
        layers.append(nn.Sequential(*stage))
        c = c_out
    layers.append(_conv_bn(c, cfg.c_head, 1, 1, 1, True, ops, kw))
    return nn.Sequential(*layers)


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, in the images' dtype."""
    _check_images(images, "normalize_imagenet")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (this looks like ComfyUI's B x H x W x 3 IMAGE; permute it to B x 3 x H x W)" if (
            images.ndim == 4 and images.shape[-1] == 3) else ""
        raise ShapeError(f"{what}: images have shape {tuple(images.shape)}; expected (B, 3, H, W){hint}.")


class EfficientNetEncoder(nn.Module):
    """Image -> Stage C latent (B, 16, H/32, W/32)."""

    def __init__(self, config: EffNetConfig | None = None, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        cfg = config or EffNetConfig()
        ops = resolve_ops(operations)
        self.config = cfg
        self.backbone = build_features(cfg, 3, 1, dtype, device, ops)
        self.mapper = nn.Sequential(
            ops.Conv2d(cfg.c_head, cfg.c_latent, 1, bias=False, dtype=dtype, device=device),
            ops.BatchNorm2d(cfg.c_latent, affine=False, dtype=dtype, device=device),
        )
        self.eval()  # BatchNorm running statistics, as the release is used

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone[0][0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W) -> (B, c_latent, ceil(H/32), ceil(W/32))."""
        _check_images(x, "EfficientNet encoder")
        return self.mapper(self.backbone(x))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> latent; normalises, then runs the encoder in its weights' dtype."""
        return self(normalize_imagenet(images.to(self.dtype)))

