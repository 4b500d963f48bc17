"""Stage A (VQGAN): release key layout, config inference, parity with diffusers' PaellaVQModel, the
official (x0.43) and raw latent conventions, quantisation, and the lean inference path."""

import dataclasses
import importlib.util
import json

import pytest
import tiny_checkpoints as tc
import torch
from torch import nn

from comfyui_stablecascade.cascade import stage_a
from comfyui_stablecascade.cascade.errors import CheckpointError, ShapeError
from comfyui_stablecascade.cascade.stage_a import SCALE_FACTOR, StageA, StageAConfig

# A copy of the spec's keys_shapes.json (every key and shape of every released module) ships with the tests.
KEYS_SHAPES = tc.DATA / "keys_shapes.json"
# fp32 parity: the same math summed in another order; measured <= 1.3e-5 (encode: the 1/0.43 latent scaling
# amplifies the encoder's rounding), <= 3e-6 elsewhere.
TOL = 5e-5


def _load_bench():
    path = tc.ROOT / "bench" / "parity_stage_a.py"
    spec = importlib.util.spec_from_file_location("scw_parity_stage_a", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

# Reduced width with the release's structure (2 levels, a bottleneck of several blocks).
CFG = StageAConfig(levels=2, bottleneck_blocks=3, c_hidden=64, c_latent=4, codebook_size=128)


def _build(cfg=CFG, seed=0, dtype=None):
    sd = bench.random_state_dict(StageA(cfg, device="meta"), seed)
    net = StageA(cfg, device="meta")
    net.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        net = net.to(dtype)
    return net.eval(), sd


def _image(b=2, h=40, w=56, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _latent(b=2, h=10, w=14, seed=2):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_release_keys_and_shapes():
    want = json.loads(KEYS_SHAPES.read_text())["StageA"]
    net = StageA(StageAConfig(), device="meta")
    have = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert have == want
    assert StageAConfig.from_state_dict(net.state_dict()) == StageAConfig()


@pytest.mark.parametrize("cfg", [StageAConfig.tiny(), CFG, dataclasses.replace(CFG, levels=3, bottleneck_blocks=2)])
def test_config_from_state_dict_round_trip(cfg):
    assert StageAConfig.from_state_dict(StageA(cfg, device="meta").state_dict()) == cfg


def test_config_errors_name_the_problem():
    sd = StageA(StageAConfig.tiny(), device="meta").state_dict()
    diffusers_sd = bench.to_diffusers_keys(sd)
    with pytest.raises(CheckpointError, match="vquantizer.embedding.weight"):
        StageAConfig.from_state_dict(diffusers_sd)
    broken = dict(sd)
    del broken["up_blocks.2.channelwise.0.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        StageAConfig.from_state_dict(broken)
    with pytest.raises(CheckpointError, match="stage_a"):
        StageAConfig.from_state_dict({"clf.1.weight": torch.zeros(1)})


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, levels=3, bottleneck_blocks=2)])
def test_parity_with_diffusers(cfg):
    pytest.importorskip("diffusers", reason="diffusers (the parity reference, requirements-dev.txt) is not installed")
    ours, sd = _build(cfg)
    ref = bench.build_diffusers(cfg, sd)
    div = 2 ** (cfg.levels)
    img = _image(h=10 * div, w=14 * div)
    lat = _latent(h=10, w=14)
    with torch.no_grad():
        z_ref = ref.encode(img, return_dict=False)[0]
        assert z_ref.std() > 0.3  # the random weights keep the latent far from zero
        assert (ours.encode_raw(img) - z_ref).abs().max() <= TOL
        assert (ours.encode(img) - z_ref / SCALE_FACTOR).abs().max() <= TOL
        x_ref = ref.decode(lat * SCALE_FACTOR, return_dict=False)[0]
        assert x_ref.std() > 0.3
        assert (ours.decode(lat) - x_ref).abs().max() <= TOL
        assert (ours.decode_raw(lat) - ref.decode(lat, return_dict=False)[0]).abs().max() <= TOL
        q_ref = ref.vquantizer(z_ref)[0]
        assert (ours.encode(img, quantize=True) - q_ref / SCALE_FACTOR).abs().max() <= TOL


def test_parity_across_bands_and_chunks(monkeypatch):
    """Several depthwise bands (halo rows between them) and several MLP chunks give the same image."""
    pytest.importorskip("diffusers", reason="diffusers (the parity reference, requirements-dev.txt) is not installed")
    monkeypatch.setattr(stage_a, "_BAND_ELEMS", 64 * 3 * 20)  # 3-row bands at c=64, w=20
    monkeypatch.setattr(stage_a, "_MLP_HIDDEN_ELEMS", 1)  # 1024-row chunks
    ours, sd = _build()
    ref = bench.build_diffusers(CFG, sd)
    lat = _latent(b=1, h=61, w=20)  # 1220 rows at the bottleneck: two chunks, a short last band
    with torch.no_grad():
        assert (ours.decode(lat) - ref.decode(lat * SCALE_FACTOR, return_dict=False)[0]).abs().max() <= TOL


def test_latent_conventions_round_trip():
    net, _ = _build()
    img, lat = _image(), _latent()
    with torch.no_grad():
        raw = net.encode_raw(img)
        assert raw.shape == (2, 4, 10, 14)
        torch.testing.assert_close(net.encode(img), raw / SCALE_FACTOR, rtol=0, atol=1e-6)
        torch.testing.assert_close(net.decode(lat), net.decode_raw(lat * SCALE_FACTOR), rtol=0, atol=1e-6)
        # core's SC_B storage (raw) and the official Stage B latent decode to the same image
        torch.testing.assert_close(net.decode(net.encode(img)), net.decode_raw(raw), rtol=0, atol=1e-5)
        assert net.decode(lat).shape == (2, 3, 40, 56)


def test_quantize_returns_nearest_codebook_entries():
    net, _ = _build()
    with torch.no_grad():
        raw = net.encode_raw(_image())
        q, idx = net.quantize_raw(raw)
        cb = net.vquantizer.codebook.weight
        flat = raw.permute(0, 2, 3, 1).reshape(-1, 4)
        brute = ((flat[:, None, :] - cb[None]) ** 2).sum(-1).argmin(1)
        assert torch.equal(idx.reshape(-1), brute)
        assert torch.equal(q.permute(0, 2, 3, 1).reshape(-1, 4), cb[brute])
        assert idx.unique().numel() > 5
        torch.testing.assert_close(net.encode(_image(), quantize=True), q / SCALE_FACTOR)


def test_lean_path_matches_module_path_and_respects_inplace():
    net, _ = _build()
    blk = net.up_blocks[1]
    x = torch.randn(2, 64, 9, 11)
    keep = x.clone()
    with torch.no_grad():
        fast = blk(x)  # inplace=False: the input must survive
    assert torch.equal(x, keep)
    with torch.enable_grad():
        slow = blk(x.requires_grad_())  # autograd takes the module path
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-5)
    y = x.detach().clone(memory_format=torch.channels_last)
    with torch.no_grad():
        out = blk(y, inplace=True)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, fast, rtol=0, atol=1e-6)


def test_host_operations_are_called_as_modules():
    calls = []

    class CountingLinear(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    ops = type("Ops", (), {"Linear": CountingLinear, "Conv2d": nn.Conv2d, "ConvTranspose2d": nn.ConvTranspose2d,
                           "BatchNorm2d": nn.BatchNorm2d})
    sd = bench.random_state_dict(StageA(CFG, device="meta"))
    hosted = StageA(CFG, operations=ops).eval()
    hosted.load_state_dict(sd)
    plain, _ = _build()
    lat = _latent()
    with torch.no_grad():
        torch.testing.assert_close(hosted.decode(lat), plain.decode(lat), rtol=0, atol=1e-5)
    assert calls


def test_bf16_weights_and_input_give_bf16_output():
    net, _ = _build(dtype=torch.bfloat16)
    lat = _latent(b=1, h=6, w=8)
    with torch.no_grad():
        img = net.decode(lat.to(torch.bfloat16))
        z = net.encode(_image(b=1, h=24, w=32).to(torch.bfloat16))
    assert img.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    assert torch.isfinite(img.float()).all()
    ref32, _ = _build()
    with torch.no_grad():
        diff = (img.float() - ref32.decode(lat)).abs().mean()
    # bf16 rounding only, not a different computation: measured 0.005 on a mean |image| of 0.64 (4x margin).
    assert diff < 0.02


def test_bad_inputs_raise_shape_errors():
    net, _ = _build(StageAConfig.tiny())
    with pytest.raises(ShapeError, match="multiples of 4"):
        net.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ShapeError, match=r"\(B, 4, H, W\)"):
        net.decode(torch.rand(1, 16, 8, 8))


def test_batch_norm_uses_running_stats():
    net, _ = _build()
    assert not net.training and not net.down_blocks[-1][1].training
    img = _image()
    with torch.no_grad():
        one = net.encode_raw(img[:1])
        both = net.encode_raw(img)
    torch.testing.assert_close(one, both[:1], rtol=0, atol=1e-5)


def test_eval_mode_decodes_without_autograd_graph():
    net, _ = _build(StageAConfig.tiny())
    assert next(net.parameters()).requires_grad  # loaded parameters still ask for grads
    out = net.decode(_latent(b=1, h=4, w=4))  # no torch.no_grad() around the call
    assert not out.requires_grad
    net.train()
    assert net.decode(_latent(b=1, h=4, w=4)).requires_grad
