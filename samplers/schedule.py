"""GDF noise schedule of Stable Cascade (SPEC §10.1): cosine logSNR, shift, VP scaler, noise condition; and the
schedulers (``SCHEDULERS``) that pick the logSNRs a run steps through: GDF's own (the default) and core's rules.

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


# ---- schedulers: which steps+1 logSNRs a run walks through -------------------------------------------------------
#
# Each scheduler maps (steps, shift, t_start) to steps+1 float32 logSNRs, first one at t_start. "official" is GDF's
# linspace in t (ends at logSNR(0), a finite level; the default). The others follow ComfyUI core's rules on the same
# cosine schedule and end at sigma 0 (logSNR +inf): the last step lands on the clean latent. sigma is k-diffusion's
# noise level, sigma = b/a = exp(-logSNR/2).

# Core's StableCascadeSampling tabulates sigma at t = k/10000, k = 1..10000; simple and beta pick from that table.
TABLE_SIZE = 10000
_BETA_ALPHA = _BETA_BETA = 0.6  # core's beta_scheduler defaults (arXiv:2407.12173)
_KARRAS_RHO = 7.0


def sigma_of(logsnr: torch.Tensor) -> torch.Tensor:
    """k-diffusion's sigma = b/a = exp(-logSNR/2) (logSNR +inf gives 0)."""
    return torch.exp(-_as_float32(logsnr) / 2)


def logsnr_of(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of sigma_of: logSNR = -2 ln(sigma) (sigma 0 gives +inf)."""
    return -2 * torch.log(_as_float32(sigma))


def _to_zero(logsnrs: torch.Tensor) -> torch.Tensor:
    return torch.cat([logsnrs.to(torch.float32), torch.tensor([math.inf])])


def _sigma_range(shift: float, t_start: float) -> tuple[float, float]:
    """(sigma_min, sigma_max): the official schedule's noise levels at t 0 and t_start."""
    return float(sigma_of(logsnr(0.0, shift))), float(sigma_of(logsnr(float(t_start), shift)))


def simple_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Core's "simple": every (TABLE_SIZE/steps)-th entry of the table from the top, then sigma 0."""
    stride = TABLE_SIZE / steps
    t = torch.tensor([(TABLE_SIZE - int(i * stride)) / TABLE_SIZE for i in range(steps)], dtype=torch.float32)
    return _to_zero(logsnr(t * float(t_start), shift))


def karras_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Karras et al. 2022 (arXiv:2206.00364): sigma^(1/rho) linear between sigma_max and sigma_min, rho 7."""
    low, high = _sigma_range(shift, t_start)
    ramp = torch.linspace(0, 1, steps)
    inv = high ** (1 / _KARRAS_RHO) + ramp * (low ** (1 / _KARRAS_RHO) - high ** (1 / _KARRAS_RHO))
    return _to_zero(logsnr_of(inv**_KARRAS_RHO))


def exponential_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """log sigma linear between sigma_max and sigma_min (i.e. logSNR linear), then sigma 0."""
    low, high = _sigma_range(shift, t_start)
    return _to_zero(logsnr_of(torch.linspace(math.log(high), math.log(low), steps).exp()))


def _uniform_in_time(steps: int, shift: float, t_start: float, sgm: bool) -> torch.Tensor:
    # Core's normal/sgm_uniform: times uniform between the time of sigma_max and of sigma_min, read through the
    # noise condition (the unshifted inverse, as core's StableCascadeSampling.timestep does). The ends are taken
    # at shift 1, so each run starts at t_start on the pack's schedule; at shift 1 this is core's rule exactly.
    high, low = noise_cond_r(logsnr(float(t_start))), noise_cond_r(logsnr(0.0))
    # sgm_uniform leaves out the lowest time (steps+1 points, last dropped); normal keeps both ends.
    t = torch.linspace(float(high), float(low), steps + 1 if sgm else steps)
    t = t[:-1] if sgm else t
    return _to_zero(logsnr(t, shift))


def sgm_uniform_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Core's "sgm_uniform": steps times uniform in t from t_start, the last one a step above t 0, then sigma 0."""
    return _uniform_in_time(steps, shift, t_start, sgm=True)


def normal_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Core's "normal": steps times uniform in t from t_start down to t 0 (both ends), then sigma 0."""
    return _uniform_in_time(steps, shift, t_start, sgm=False)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz), symmetric for x > mean."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of _beta_cdf by bisection to 1e-13 (no SciPy at run time; core uses scipy.stats.beta.ppf)."""
    low, high = 0.0, 1.0
    while high - low > 1e-13:
        mid = (low + high) / 2
        low, high = (mid, high) if _beta_cdf(mid, a, b) < q else (low, mid)
    return (low + high) / 2


@lru_cache(maxsize=64)
def _beta_indices(steps: int) -> tuple[int, ...]:
    picked = []
    for i in range(steps):
        q = 1.0 - i / steps
        index = int(round(_beta_ppf(q, _BETA_ALPHA, _BETA_BETA) * (TABLE_SIZE - 1))) if q < 1 else TABLE_SIZE - 1
        if not picked or picked[-1] != index:  # core drops repeated table entries (fewer steps)
            picked.append(index)
    return tuple(picked)


def beta_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """Core's "beta" (Lee et al. 2024, arXiv:2407.12173; alpha = beta = 0.6): table entries at the Beta quantiles
    of uniform steps, repeats dropped (so it can return fewer than steps+1 values), then sigma 0."""
    t = torch.tensor([(index + 1) / TABLE_SIZE for index in _beta_indices(steps)], dtype=torch.float32)
    return _to_zero(logsnr(t * float(t_start), shift))


def official_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0) -> torch.Tensor:
    """GDF's schedule: logsnr_schedule(steps, shift, t_start), linspace in t down to t 0 (the default)."""
    return logsnr_schedule(steps, shift, t_start)


# name -> fn(steps, shift, t_start) -> logSNRs; the scheduler widget lists these in this order.
SCHEDULERS = {
    "official": official_schedule,
    "simple": simple_schedule,
    "karras": karras_schedule,
    "exponential": exponential_schedule,
    "sgm_uniform": sgm_uniform_schedule,
    "beta": beta_schedule,
    "normal": normal_schedule,
}
DEFAULT_SCHEDULER = "official"
