"""How a stage is sampled: one value instead of a dozen loose parameters, the one copy of the official
defaults (the final notebooks': Stage C 20 steps, cfg 4, shift 2, rescale 0.7; Stage B 10 steps, cfg 1.1,
shift 1, rescale 0.7 - GDF.sample's default cfg_rho, which no notebook overrides; image-to-image 16 steps from
t_start 0.8 with the notebook's noising), and the one table of the values a sampler accepts.

``SETTING_RANGES`` is what the sampler nodes declare (``nodes.common.schedule_inputs``) and what
``SamplingSettings.check()`` enforces, so the nodes, the Python API and the headless runner refuse the same
values with the same range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..cascade.errors import CascadeError
from ..samplers.img2img import noise_shift
from ..samplers.sampling import SAMPLERS
from ..samplers.schedule import DEFAULT_SCHEDULER, SCHEDULERS

# field -> (min, max), inclusive. steps is an integer; the others are floats.
SETTING_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, 200),
    "cfg": (0.0, 30.0),
    "shift": (0.1, 10.0),
    "rescale": (0.0, 1.0),
    "denoise": (0.01, 1.0),
}
INTEGER_SETTINGS = ("steps",)


def check_number(value: Any, name: str, low: float, high: float, integer: bool = False, where: str = "",
                 fix: str = "") -> float:
    """``value`` as a number if it is a finite (integer when ``integer``) number in ``low..high``; else a
    CascadeError naming ``where``, the field, the value and the range."""
    prefix = f"{where}: " if where else ""
    kind = "an integer" if integer else "a number"
    ending = f" - {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_scalar_tensor(value):
        raise CascadeError(f"{prefix}{name}={value!r} is not {kind}; expected {kind} in {low:g}..{high:g}{ending}")
    number = float(value)
    if not math.isfinite(number):
        raise CascadeError(f"{prefix}{name}={number} is not a finite number; expected {kind} in "
                           f"{low:g}..{high:g}{ending}")
    if integer and number != int(number):
        raise CascadeError(f"{prefix}{name}={value!r} is not an integer; expected an integer in "
                           f"{low:g}..{high:g}{ending}")
    if not low <= number <= high:
        raise CascadeError(f"{prefix}{name}={value!r} is outside {low:g}..{high:g}{ending}")
    return number


def _is_scalar_tensor(value: Any) -> bool:
    # A 0-d tensor (or numpy scalar) from an upstream computation is a number too.
    return hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes))


@dataclass(frozen=True)
class SamplingSettings:
    """Schedule and guidance of one sampling run.

    ``denoise`` is t_start (1: from pure noise); ``noising`` how an input latent is noised to it when
    ``denoise < 1`` (``samplers.img2img``: "official" or "consistent"); ``scheduler`` which logSNRs the steps
    walk through (``samplers.schedule.SCHEDULERS``; "official" is GDF's). Last so that positional calls keep working.
    """

    steps: int = 20
    cfg: float = 4.0
    shift: float = 2.0
    sampler: str = "ddpm"
    rescale: float = 0.7
    denoise: float = 1.0
    noising: str = "consistent"
    scheduler: str = DEFAULT_SCHEDULER

    def check(self, where: str = "") -> SamplingSettings:
        """Raise a clear error for a value outside ``SETTING_RANGES`` (NaN and inf included) or a sampler or
        scheduler that does not exist; returns itself. ``where`` (e.g. "Stage C") starts the message."""
        prefix = f"{where}: " if where else ""
        if self.sampler not in SAMPLERS:
            raise CascadeError(f"{prefix}sampler {self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise CascadeError(f"{prefix}scheduler {self.scheduler!r} is unknown; choose one of {list(SCHEDULERS)} "
                               f"({DEFAULT_SCHEDULER!r} is the official GDF schedule)")
        for name, (low, high) in SETTING_RANGES.items():
            check_number(getattr(self, name), name, low, high, integer=name in INTEGER_SETTINGS, where=where,
                         fix="the sampler nodes allow the same range")
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
# rescale 0.7: train/train_b.py's sampling_configs set cfg, sampler, shift and timesteps only, so GDF.sample's
# default cfg_rho=0.7 applies to Stage B as to Stage C (SPEC 10.3).
STAGE_B = SamplingSettings(steps=10, cfg=1.1, shift=1.0, rescale=0.7)
# The notebook's image-to-image: int(20 * 0.8) = 16 steps from t_start 0.8, noised with shift 1.
IMAGE_TO_IMAGE = STAGE_C.replace(steps=16, denoise=0.8, noising="official")
