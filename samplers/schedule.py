"""GDF noise schedule of Stable Cascade (SPEC §10.1): cosine logSNR, shift, VP scaler, noise condition.

Everything is float32, as in the official code: the clamp range [1e-4, 0.9999] is applied in float32,
so the end points are logSNR -9.21024 and +9.21007 (float64 would give a symmetric +-9.21024).
"""

import math
from functools import lru_cache

import torch

# Kept as float32 tensors (not Python floats) so that (s + t) / (1 + s) rounds exactly like the official code.
_S = torch.tensor(0.008, dtype=torch.float32)
_MIN_VAR = torch.cos(_S / (1 + _S) * torch.pi * 0.5) ** 2
_VAR_CLAMP = (0.0001, 0.9999)


def _as_float32(t: torch.Tensor | float) -> torch.Tensor:
    """Return t as a float32 tensor (Python numbers become 0-dim CPU tensors)."""
    if isinstance(t, torch.Tensor):
        return t.to(torch.float32)
    return torch.tensor(t, dtype=torch.float32)


def cosine_logsnr(t: torch.Tensor | float) -> torch.Tensor:
    """Unshifted cosine-schedule logSNR(t) with s = 0.008 and the variance clamped to [1e-4, 0.9999]."""
    t = _as_float32(t).clamp(0, 1)
    s, min_var = _S.to(t.device), _MIN_VAR.to(t.device)
    var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
    var = var.clamp(*_VAR_CLAMP)
    return (var / (1 - var)).log()


@lru_cache(maxsize=1)
def logsnr_limits() -> tuple[float, float]:
    """The (min, max) logSNR stored by the official schedule at construction: logSNR(1) and logSNR(0), shift 1."""
    low, high = cosine_logsnr(torch.tensor([1.0, 0.0])).tolist()
    return low, high


def logsnr(t: torch.Tensor | float, shift: float = 1.0) -> torch.Tensor:
    """Shifted logSNR(t) = logSNR(t) - 2 ln(shift), clamped to the shift-1 limits (SPEC §10.1)."""
    value = cosine_logsnr(t)
    if shift != 1:
        value = value + 2 * math.log(1 / shift)
    return value.clamp(*logsnr_limits())


def noise_cond_r(logsnr: torch.Tensor | float) -> torch.Tensor:
    """CosineTNoiseCond: the r the networks receive, the unshifted time whose cosine variance matches logSNR."""
    logsnr = _as_float32(logsnr)
    s, min_var = _S.to(logsnr.device), _MIN_VAR.to(logsnr.device)
    var = logsnr.sigmoid().clamp(0, 1)
    return ((var * min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s


def alpha_sigma(logsnr: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """VPScaler: a = sqrt(sigmoid(logSNR)), b = sqrt(1 - sigmoid(logSNR)), so that x_t = a*x0 + b*eps."""
    a_squared = _as_float32(logsnr).sigmoid()
    return a_squared.sqrt(), (1 - a_squared).sqrt()


def timesteps(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """The steps+1 times linspace(t_start, t_end, steps+1) of GDF.sample, float32."""
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float32)


def logsnr_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """The steps+1 logSNRs a sampler walks through: logsnr(timesteps(steps, t_start, t_end), shift)."""
    return logsnr(timesteps(steps, t_start, t_end), shift)
