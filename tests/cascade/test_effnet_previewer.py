"""EfficientNet encoder and Previewer: release key layouts, config inference, output sizes, eval-mode
BatchNorm, dtype handling, and the EfficientNetV2 block semantics written out with functional ops."""

import json

import pytest
import tiny_checkpoints as tc
import torch
import torch.nn.functional as F

from comfyui_stablecascade.cascade.effnet import (
    EfficientNetEncoder,
    EffNetConfig,
    normalize_imagenet,
)
from comfyui_stablecascade.cascade.errors import CheckpointError, ShapeError
from comfyui_stablecascade.cascade.previewer import Previewer, PreviewerConfig

# A copy of the spec's keys_shapes.json (every key and shape of every released module) ships with the tests.
KEYS_SHAPES = tc.DATA / "keys_shapes.json"


def _fan_in(key, t):
    # Previewer's 2x2 stride-2 transposed convs give each output pixel one tap per input channel.
    convt = key.startswith("blocks.") and key.split(".")[1] in ("6", "12", "18")
    return t.shape[0] if convt else t[0].numel()


def _build(cls, cfg, dtype=None, seed=0):
    net = cls(cfg, device="meta")
    sd = tc.bn_random_state_dict(net, seed, _fan_in)
    net.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        net = net.to(dtype)
    return net.eval(), sd


@pytest.mark.parametrize("name,cls,cfg_cls", [("EffNet", EfficientNetEncoder, EffNetConfig),
                                              ("Previewer", Previewer, PreviewerConfig)])
def test_release_keys_and_shapes(name, cls, cfg_cls):
    want = json.loads(KEYS_SHAPES.read_text())[name]
    net = cls(cfg_cls(), device="meta")
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == want
    assert cfg_cls.from_state_dict(net.state_dict()) == cfg_cls()


def test_release_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(EfficientNetEncoder(device="meta")) == 20_197_968  # SPEC §2 [measured]
    assert count(Previewer(device="meta")) == 3_979_651


@pytest.mark.parametrize("cls,cfg_cls", [(EfficientNetEncoder, EffNetConfig), (Previewer, PreviewerConfig)])
def test_tiny_config_round_trip_and_errors(cls, cfg_cls):
    sd = cls(cfg_cls.tiny(), device="meta").state_dict()
    assert cfg_cls.from_state_dict(sd) == cfg_cls.tiny()
    with pytest.raises(CheckpointError, match="missing"):
        cfg_cls.from_state_dict({"in_block.1.weight": torch.zeros(1)})


def test_previewer_rejects_inconsistent_shapes():
    sd = dict(Previewer(PreviewerConfig.tiny(), device="meta").state_dict())
    sd["blocks.9.weight"] = torch.empty(8, 8, 3, 3, device="meta")
    with pytest.raises(CheckpointError, match="blocks.9.weight"):
        PreviewerConfig.from_state_dict(sd)


def test_effnet_output_size_and_stride():
    net, _ = _build(EfficientNetEncoder, EffNetConfig.tiny())
    with torch.no_grad():
        assert net(torch.randn(1, 3, 768, 768)).shape == (1, 16, 24, 24)
        assert net(torch.randn(2, 3, 96, 160)).shape == (2, 16, 3, 5)
        assert net(torch.randn(1, 3, 100, 70)).shape == (1, 16, 4, 3)  # padded convs round up


def test_release_effnet_runs_small_image():
    net, _ = _build(EfficientNetEncoder, EffNetConfig())
    with torch.no_grad():
        out = net.encode_image(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, 16, 2, 3) and torch.isfinite(out).all()


def _functional_features(sd, cfg, x, prefix="backbone."):
    """EfficientNetV2 features read straight from the keys with torch.nn.functional (torchvision's
    semantics: BN eps 1e-3, 'same' padding, SiLU, SE = sigmoid(fc2(silu(fc1(mean)))) with squeeze
    width from the block input, residual only for stride 1 and equal widths)."""
    def cba(x, p, stride=1, groups=1, act=True):
        w = sd[p + "0.weight"]
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, groups=groups)
        x = F.batch_norm(x, sd[p + "1.running_mean"], sd[p + "1.running_var"], sd[p + "1.weight"],
                         sd[p + "1.bias"], False, 0.0, 1e-3)
        return F.silu(x) if act else x

    x = cba(x, prefix + "0.", stride=2)
    for s, (kind, _, stride, _, n) in enumerate(cfg.stages, start=1):
        for j in range(n):
            p = f"{prefix}{s}.{j}.block."
            st = stride if j == 0 else 1
            inp = x
            if kind == "fused":
                if p + "1.0.weight" in sd:
                    x = cba(cba(x, p + "0.", st), p + "1.", act=False)
                else:
                    x = cba(x, p + "0.", st)
            else:
                x = cba(x, p + "0.")
                x = cba(x, p + "1.", st, groups=x.shape[1])
                se = F.silu(F.conv2d(x.mean((2, 3), keepdim=True), sd[p + "2.fc1.weight"], sd[p + "2.fc1.bias"]))
                x = x * torch.sigmoid(F.conv2d(se, sd[p + "2.fc2.weight"], sd[p + "2.fc2.bias"]))
                x = cba(x, p + "3.", act=False)
            if st == 1 and inp.shape == x.shape:
                x = x + inp
    return cba(x, f"{prefix}{len(cfg.stages) + 1}.")


def test_effnet_matches_functional_reference():
    cfg = EffNetConfig.tiny()
    net, sd = _build(EfficientNetEncoder, cfg)
    img = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = _functional_features(sd, cfg, normalize_imagenet(img))
        mapped = F.conv2d(feats, sd["mapper.0.weight"])
        stats = sd["mapper.1.running_mean"], sd["mapper.1.running_var"]
        want = F.batch_norm(mapped, *stats, None, None, False, 0.0, 1e-5)
        got = net.encode_image(img)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same ops in the same order: measured 0


def test_normalize_imagenet_and_image_layout_errors():
    img = torch.rand(1, 3, 4, 4)
    out = normalize_imagenet(img)
    torch.testing.assert_close(out[0, 1], (img[0, 1] - 0.456) / 0.224)
    with pytest.raises(ShapeError, match="permute"):
        normalize_imagenet(torch.rand(1, 4, 4, 3))


def test_previewer_output_size_and_bad_input():
    net, _ = _build(Previewer, PreviewerConfig.tiny())
    with torch.no_grad():
        assert net(torch.randn(2, 16, 24, 24)).shape == (2, 3, 192, 192)
        assert net(torch.randn(1, 16, 18, 30)).shape == (1, 3, 144, 240)
    with pytest.raises(ShapeError, match="Stage B"):
        net(torch.randn(1, 4, 8, 8))


def test_release_previewer_runs():
    net, _ = _build(Previewer, PreviewerConfig())
    with torch.no_grad():
        assert net(torch.randn(1, 16, 6, 5)).shape == (1, 3, 48, 40)


@pytest.mark.parametrize("cls,cfg,shape", [(EfficientNetEncoder, EffNetConfig.tiny(), (3, 3, 64, 64)),
                                           (Previewer, PreviewerConfig.tiny(), (3, 16, 6, 6))])
def test_batchnorm_in_eval_mode(cls, cfg, shape):
    net, _ = _build(cls, cfg)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # running statistics: a sample's output does not depend on the rest of the batch
        torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,cfg,shape", [(EfficientNetEncoder, EffNetConfig.tiny(), (1, 3, 64, 32)),
                                           (Previewer, PreviewerConfig.tiny(), (1, 16, 4, 4))])
def test_bf16_weights_and_input_give_bf16_output(cls, cfg, shape):
    net16, _ = _build(cls, cfg, dtype=torch.bfloat16)
    net32, _ = _build(cls, cfg)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = net16(x.to(torch.bfloat16))
        ref = net32(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: measured 0.6% (EffNet) and 1.4% (Previewer) relative error; 3x margin.
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.04
