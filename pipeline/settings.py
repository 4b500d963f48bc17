"""How a stage is sampled: one value instead of a dozen loose parameters, and the one copy of the official
defaults (the final notebooks': Stage C 20 steps, cfg 4, shift 2, rescale 0.7; Stage B 10 steps, cfg 1.1,
shift 1, rescale 0; image-to-image 16 steps from t_start 0.8 with the notebook's noising)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cascade.errors import CascadeError
from ..samplers.img2img import noise_shift
from ..samplers.sampling import SAMPLERS


@dataclass(frozen=True)
class SamplingSettings:
    """Schedule and guidance of one sampling run.

    ``denoise`` is t_start (1: from pure noise); ``noising`` how an input latent is noised to it when
    ``denoise < 1`` (``samplers.img2img``: "official" or "consistent").
    """

    steps: int = 20
    cfg: float = 4.0
    shift: float = 2.0
    sampler: str = "ddpm"
    rescale: float = 0.7
    denoise: float = 1.0
    noising: str = "consistent"

    def check(self) -> SamplingSettings:
        """Raise a clear error for a value no sampler can use; returns itself."""
        if self.sampler not in SAMPLERS:
            raise CascadeError(f"sampler {self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        if int(self.steps) < 1 or not 0.0 < float(self.denoise) <= 1.0:
            raise CascadeError(f"steps={self.steps}, denoise={self.denoise}: need steps >= 1 and 0 < denoise <= 1")
        if float(self.denoise) < 1.0:
            noise_shift(self.noising, self.shift)  # names the valid modes for an unknown one
        return self

    def replace(self, **changes: object) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs (cfg 1 skips it)."""
        return float(self.cfg) != 1.0


STAGE_C = SamplingSettings()
STAGE_B = SamplingSettings(steps=10, cfg=1.1, shift=1.0, rescale=0.0)
# The notebook's image-to-image: int(20 * 0.8) = 16 steps from t_start 0.8, noised with shift 1.
IMAGE_TO_IMAGE = STAGE_C.replace(steps=16, denoise=0.8, noising="official")
