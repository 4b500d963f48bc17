"""The Previewer (SPEC §8): a small conv net from a Stage C latent to an 8x larger RGB preview.

Used for live previews while Stage C samples. Output is about [0, 1] and is not clamped here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import unet_keys
from .common import resolve_ops
from .errors import CheckpointError, ShapeError

# Layer index of every conv in ``blocks`` (each conv but the last is followed by GELU and BatchNorm).
_CONV_IDS = (0, 3, 6, 9, 12, 15, 18, 21, 24)
_CONVT_IDS = (6, 12, 18)


@dataclass(frozen=True)
class PreviewerConfig:
    """Defaults are the release (``previewer.safetensors``): 16 -> 512 -> 256 -> 128 -> 128 -> 3."""

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of the convs at ``_CONV_IDS``."""
        h = self.c_hidden
        return (h, h, h // 2, h // 2, h // 4, h // 4, h // 4, h // 4, self.c_out)

    @classmethod
    def tiny(cls) -> PreviewerConfig:
        return cls(c_in=16, c_hidden=32, c_out=3)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> PreviewerConfig:
        what = "Previewer state dict"
        needed = [f"blocks.{i}.weight" for i in _CONV_IDS]
        missing = [k for k in needed if k not in sd]
        if missing:
            sample = ", ".join(sorted(sd)[:5]) or "no keys at all"
            raise CheckpointError(
                f"{what}: key {missing[0]!r} is missing (found e.g. {sample}); expected the original "
                "previewer.safetensors layout (blocks.0 ... blocks.24). Pick the Previewer file for this loader."
            )
        c_hidden, c_in = unet_keys.shape_of(sd, "blocks.0.weight", what, rank=4)[:2]
        cfg = cls(c_in=c_in, c_hidden=c_hidden, c_out=unet_keys.shape_of(sd, "blocks.24.weight", what, rank=4)[0])
        want = {k: tuple(v.shape) for k, v in unet_keys.build_meta(Previewer, cfg, what).state_dict().items()}
        have = {k: tuple(v.shape) for k, v in sd.items() if re.match(r"blocks\.\d+\.", k)}
        if want != have:
            bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:3]
            raise CheckpointError(
                f"{what}: keys/shapes do not fit a Previewer with {cfg} (first differences: "
                + ", ".join(f"{k}: file {have.get(k)} vs {want.get(k)}" for k in bad)
                + "). The file is damaged or not a Previewer."
            )
        return cfg


class Previewer(nn.Module):
    """(B, 16, h, w) Stage C latent -> (B, 3, 8h, 8w) RGB, about [0, 1]."""

    def __init__(self, config: PreviewerConfig | None = None, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        cfg = config or PreviewerConfig()
        ops = resolve_ops(operations)
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        layers: list[nn.Module] = []
        c = cfg.c_in
        for idx, width in zip(_CONV_IDS, cfg.widths):
            if idx in _CONVT_IDS:
                layers.append(ops.ConvTranspose2d(c, width, kernel_size=2, stride=2, **kw))
            else:
                k = 1 if idx in (0, 24) else 3
                layers.append(ops.Conv2d(c, width, kernel_size=k, padding=k // 2, **kw))
            if idx != 24:
                layers += [nn.GELU(), ops.BatchNorm2d(width, **kw)]
            c = width
        self.blocks = nn.Sequential(*layers)
        self.eval()  # BatchNorm running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.c_in:
            raise ShapeError(
                f"Previewer: latent has shape {tuple(x.shape)}; expected a Stage C latent "
                f"(B, {self.config.c_in}, h, w). "
                "A Stage B latent (4 channels) has no preview model."
            )
        return self.blocks(x)
