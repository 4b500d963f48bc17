"""Training settings (the official defaults, SPEC §14) and the one table of allowed values nodes read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .errors import TrainingInputError
from .objective import WEIGHTINGS

DTYPES = ("auto", "fp32", "bf16")
# name -> (min, max); the node widgets and TrainSettings.check() read the same table.
TRAIN_SETTING_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, 1_000_000), "batch_size": (1, 4096), "grad_accum": (1, 1024), "lr": (1e-8, 1.0),
    "warmup": (0, 1_000_000), "grad_clip": (0.0, 1e6), "seed": (0, 2**63 - 1), "rank": (1, 4096),
    "alpha": (1e-6, 4096.0), "caption_dropout": (0.0, 1.0), "clip_image_prob": (0.0, 1.0),
    "preview_every": (0, 1_000_000), "save_every": (0, 1_000_000), "preview_steps": (1, 100),
}
# Settings a resumed run must share with the saved one (they shape what trains or what is drawn).
RESUME_FIXED = ("batch_size", "grad_accum", "seed", "rank", "alpha", "include_ff", "tokens", "full_finetune",
                "weighting", "caption_dropout", "clip_image_prob")


@dataclass
class TrainSettings:
    """Defaults are the official LoRA recipe (lr 1e-4, AdamW, clip 1.0, rank 4, alpha 1, P2 weight, caption
    dropout 5 %, CLIP image embeddings on 10 % of samples); ``warmup`` is in optimizer steps (linear)."""

    steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    rank: int = 4
    alpha: float = 1.0
    include_ff: bool = False
    tokens: str = ""
    full_finetune: bool = False
    weighting: str = "p2"
    caption_dropout: float = 0.05
    clip_image_prob: float = 0.1
    grad_checkpointing: bool = True
    preview_every: int = 0
    save_every: int = 0
    dtype: str = "auto"
    preview_steps: int = 10

    def check(self) -> TrainSettings:
        """Refuse values outside ``TRAIN_SETTING_RANGES`` (NaN included) and impossible combinations."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in TRAIN_SETTING_RANGES:
                lo, hi = TRAIN_SETTING_RANGES[f.name]
                want_int = isinstance(f.default, int) and not isinstance(f.default, bool)
                bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    want_int and not float(value).is_integer())
                if bad_type or not math.isfinite(float(value)) or not lo <= value <= hi:
                    kind = "a whole number" if want_int else "a number"
                    raise TrainingInputError(f"training setting {f.name}={value!r}; expected {kind} from {lo} to {hi}"
                                             f" (default {f.default}).")
        if self.weighting not in WEIGHTINGS:
            raise TrainingInputError(f"training setting weighting={self.weighting!r}; expected one of {WEIGHTINGS}.")
        if self.dtype not in DTYPES:
            raise TrainingInputError(f"training setting dtype={self.dtype!r}; expected one of {DTYPES} ('auto': bf16 "
                                     "where the GPU has it, else fp32).")
        if self.include_ff and self.tokens.strip():
            raise TrainingInputError("include_ff with learned tokens: feed-forward pairs go only into the community "
                                     "layout, which has no learned tokens - clear tokens or switch include_ff off.")
        if self.full_finetune and self.include_ff:
            raise TrainingInputError("full_finetune trains every weight already; switch include_ff off.")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def training_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16), float32 otherwise ('auto')."""
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
