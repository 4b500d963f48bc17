"""The objective against SPEC §14 / §10 formulas, computed here independently (float64, plain Python)."""

from __future__ import annotations

import bisect
import math

import pytest
import torch

from comfyui_stablecascade.train.errors import TrainingInputError
from comfyui_stablecascade.train.objective import (AdaptiveLossWeight, diffusion_loss, noised, p2_weight, sample_t)


def _logsnr(t: float, s: float = 0.008) -> float:
    """SPEC §10.1: var = clamp(cos((s+t)/(1+s) pi/2)^2 / cos(s/(1+s) pi/2)^2, 1e-4, 0.9999); ln(var/(1-var))."""
    min_var = math.cos(s / (1 + s) * math.pi / 2) ** 2
    var = min(max(math.cos((s + t) / (1 + s) * math.pi / 2) ** 2 / min_var, 1e-4), 0.9999)
    return math.log(var / (1 - var))


def test_t_is_clamp_one_minus_u_plus_0_001():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(4))
    t = sample_t(1000, torch.Generator().manual_seed(4))
    want = [min(max(1 - float(x) + 0.001, 0.001), 1.0) for x in u]
    assert torch.allclose(t.double(), torch.tensor(want, dtype=torch.float64), atol=1e-7)
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0 and float(t.max()) == 1.0  # U < 0.001 clamps to 1


def test_p2_weight_is_one_over_one_plus_snr():
    ts = [0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    _, logsnr, _ = noised(torch.zeros(len(ts), 1), torch.zeros(len(ts), 1), torch.tensor(ts))
    for lam, t in zip(logsnr.tolist(), ts):
        assert lam == pytest.approx(_logsnr(t), abs=2e-4)
    want = [1 / (1 + math.exp(_logsnr(t))) for t in ts]
    assert p2_weight(logsnr).tolist() == pytest.approx(want, rel=2e-4)


def test_noising_is_the_vp_scaler_and_the_model_sees_r_equal_t():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.5, 0.8])
    x_t, logsnr, r = noised(x0, eps, t)
    a = torch.sigmoid(logsnr.double()).sqrt().view(-1, 1, 1, 1)
    b = (1 - torch.sigmoid(logsnr.double())).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), a * x0.double() + b * eps.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r, t, rtol=0, atol=1e-4)  # shift 1: CosineTNoiseCond inverts the schedule


def test_adaptive_weight_matches_an_independent_bucket_ema():
    edges = [-10 + 20 * i / 298 for i in range(299)]  # 300 buckets over [-10, 10]: 299 edges
    losses = [1.0] * 300
    w = AdaptiveLossWeight()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        lam = torch.rand(8, generator=g) * 24 - 12  # some beyond [-10, 10]: the outer buckets
        loss = torch.rand(8, generator=g) * 3
        got = w.weight(lam)
        idx = [bisect.bisect_left(edges, float(x)) for x in lam]
        want = [min(max(1 / losses[i], 1e-7), 1e7) for i in idx]
        assert got.tolist() == pytest.approx(want, rel=1e-5)
        w.update(lam, loss)
        for i, value in zip(idx, loss.tolist()):
            losses[i] = losses[i] * 0.99 + value * 0.01
    assert w.losses.tolist() == pytest.approx(losses, rel=1e-5)
    assert sum(1 for x in losses if x != 1.0) > 5
    restored = AdaptiveLossWeight()
    restored.load_state_dict(w.state_dict())
    assert torch.equal(restored.losses, w.losses)
    with pytest.raises(TrainingInputError, match="300"):
        AdaptiveLossWeight(buckets=10).load_state_dict(w.state_dict())


def test_diffusion_loss_is_the_weighted_mean_of_per_sample_eps_mse():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    pred = torch.randn(4, 3, 2, 2, generator=g)
    loss, per_sample, logsnr = diffusion_loss(lambda x_t, r: pred, x0, eps, t)
    mse = [float(((pred[i] - eps[i]) ** 2).mean()) for i in range(4)]
    assert per_sample.tolist() == pytest.approx(mse, rel=1e-6)
    want = sum(m / (1 + math.exp(_logsnr(float(ti)))) for m, ti in zip(mse, t)) / 4
    assert float(loss) == pytest.approx(want, rel=2e-4)
