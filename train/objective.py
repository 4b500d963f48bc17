"""The official Stage C objective (SPEC §14 with GDF §10): eps prediction, shift 1, P2 or adaptive loss weight.

t = clamp(1 - U + 0.001, 0.001, 1); logSNR from the cosine schedule (shift 1, clamped as GDF clamps it);
x_t = a x0 + b eps with a = sqrt(sigmoid(logSNR)), b = sqrt(1 - sigmoid(logSNR)); the network sees
r = CosineTNoiseCond(logSNR); the per-sample loss is the MSE over C, H, W between prediction and eps, and the
batch loss their mean weighted by P2 (1 / (1 + SNR)) or the adaptive weight (1 / EMA of the loss in the sample's
logSNR bucket: 300 buckets over [-10, 10], EMA 0.99, weights clamped to [1e-7, 1e7]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..samplers import schedule
from .errors import TrainingInputError

WEIGHTINGS = ("p2", "adaptive")


def sample_t(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """GDF's training times: clamp(1 - U + 0.001, 0.001, 1), U uniform in [0, 1), float32 (CPU generator)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float32)
    return (1 - u).add(0.001).clamp(0.001, 1.0)


def p2_weight(logsnr: torch.Tensor) -> torch.Tensor:
    """GDF's P2LossWeight with k = 1, gamma = 1, s = 1: 1 / (1 + exp(logSNR)) = 1 / (1 + SNR)."""
    return (1 + logsnr.to(torch.float32).exp()).reciprocal()


class AdaptiveLossWeight:
    """GDF's AdaptiveLossWeight: a running loss per logSNR bucket; a sample's weight is 1 / its bucket's loss.

    ``buckets - 1`` edges spaced evenly over ``logsnr_range`` split logSNR into ``buckets`` bins (index by
    ``searchsorted`` on the edges); every bin starts at loss 1. ``update`` moves each sample's bin toward its
    loss with EMA ``beta``, one sample after another in batch order (GDF writes a whole batch at once, where
    samples of one bin overwrite each other; sequential updates give one defined result, the same on any
    number of processes).
    """

    def __init__(self, buckets: int = 300, logsnr_range: tuple[float, float] = (-10.0, 10.0),
                 weight_range: tuple[float, float] = (1e-7, 1e7), beta: float = 0.99) -> None:
        self.edges = torch.linspace(float(logsnr_range[0]), float(logsnr_range[1]), buckets - 1)
        self.losses = torch.ones(buckets, dtype=torch.float32)
        self.weight_range = (float(weight_range[0]), float(weight_range[1]))
        self.beta = float(beta)

    def bucket(self, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.edges, logsnr.detach().to(torch.float32).cpu())

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        w = (1 / self.losses[self.bucket(logsnr)]).clamp(*self.weight_range)
        return w.to(logsnr.device)

    def update(self, logsnr: torch.Tensor, loss: torch.Tensor) -> None:
        for i, value in zip(self.bucket(logsnr).tolist(), loss.detach().to(torch.float32).cpu().tolist()):
            self.losses[i] = self.losses[i] * self.beta + value * (1 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone(), "edges": self.edges.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        losses = torch.as_tensor(state["losses"], dtype=torch.float32)
        if losses.shape != self.losses.shape:
            raise TrainingInputError(f"adaptive loss weight state has {losses.numel()} buckets, this run "
                                     f"{self.losses.numel()}; resume with the state saved by the same settings.")
        self.losses = losses.clone()


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise TrainingInputError(f"weighting={weighting!r}; expected one of {WEIGHTINGS} (official default 'p2').")
    return weighting


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, logSNR, r) for clean latents ``x0`` (B, ...) at times ``t`` (B,), shift 1 as in every script."""
    logsnr = schedule.logsnr(t.to(torch.float32), shift=1.0).to(x0.device)
    a, b = schedule.alpha_sigma(logsnr)
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = a.view(view) * x0.to(torch.float32) + b.view(view) * noise.to(x0.device, torch.float32)
    return x_t, logsnr, schedule.noise_cond_r(logsnr)


def loss_weights(logsnr: torch.Tensor, weighting: str, adaptive: AdaptiveLossWeight | None) -> torch.Tensor:
    if check_weighting(weighting) == "p2":
        return p2_weight(logsnr)
    if adaptive is None:
        raise TrainingInputError("weighting='adaptive' needs its AdaptiveLossWeight state.")
    return adaptive.weight(logsnr)


def diffusion_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor, weighting: str = "p2",
                   adaptive: AdaptiveLossWeight | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted mean loss, per-sample MSE (B,), logSNR (B,)); ``predict(x_t, r) -> eps`` is the network call.

    The adaptive buckets are not updated here (the caller does it once per batch, after every process has its
    samples' losses; see ``AdaptiveLossWeight.update``).
    """
    x_t, logsnr, r = noised(x0, noise, t)
    pred = predict(x_t, r)
    per_sample = (pred.to(torch.float32) - noise.to(pred.device, torch.float32)).square().mean(
        dim=tuple(range(1, pred.dim())))
    weights = loss_weights(logsnr, weighting, adaptive).to(per_sample.device)
    return (per_sample * weights).mean(), per_sample, logsnr
