"""ControlNet networks: release key layouts of the four variants, config inference (mode, c_in, widths,
proj_blocks), the padding-0 stem, output lists, eval-mode BatchNorm, dtypes, and feeding a tiny Stage C."""

import dataclasses
import json

import pytest
import tiny_checkpoints as tc
import torch
import torch.nn.functional as F

from comfyui_stablecascade.cascade import stage_c
from comfyui_stablecascade.cascade.controlnet import RELEASE_PROJ_BLOCKS, ControlNet, ControlNetConfig
from comfyui_stablecascade.cascade.errors import CheckpointError, ShapeError

# A copy of the spec's keys_shapes.json (every key and shape of every released module) ships with the tests.
KEYS_SHAPES = tc.DATA / "keys_shapes.json"
RELEASES = {
    "ControlNet canny (effnet, c_in=1)": (ControlNetConfig.canny(), 54_255_776),
    "ControlNet inpaint (effnet, c_in=4)": (ControlNetConfig.inpainting(), 54_256_424),
    "ControlNet SR (large, c_in=16)": (ControlNetConfig.super_resolution(), 203_491_584),
    "ControlNet identity (simple, c_in=512)": (ControlNetConfig.identity(), None),
}


def _build(cfg, dtype=None, seed=0):
    net = ControlNet(cfg, device="meta")
    sd = tc.bn_random_state_dict(net, seed)
    net.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        net = net.to(dtype)
    return net.eval(), sd


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_keys_shapes_and_inference(name):
    cfg, params = RELEASES[name]
    want = json.loads(KEYS_SHAPES.read_text())[name]
    net = ControlNet(cfg, device="meta")
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == want
    if params is not None:
        assert sum(p.numel() for p in net.parameters()) == params
    assert ControlNetConfig.from_state_dict(net.state_dict()) == cfg


def test_config_from_state_dict_details():
    sd = ControlNet(ControlNetConfig.tiny(), device="meta").state_dict()
    cfg = ControlNetConfig.from_state_dict(sd)
    assert (cfg.bottleneck_mode, cfg.c_in, cfg.c_proj, cfg.proj_blocks) == ("effnet", 1, 64, RELEASE_PROJ_BLOCKS)
    assert ControlNetConfig.from_state_dict(sd, proj_blocks=range(8)).proj_blocks == tuple(range(8))
    with pytest.raises(CheckpointError, match="8 projections"):
        ControlNetConfig.from_state_dict(sd, proj_blocks=(0, 1))
    three = {k: v for k, v in sd.items() if not k.startswith("projections.") or int(k.split(".")[1]) < 3}
    assert ControlNetConfig.from_state_dict(three).proj_blocks == (0, 1, 2)
    with pytest.raises(CheckpointError, match="ControlNet file"):
        ControlNetConfig.from_state_dict({"blocks.0.weight": torch.zeros(1)})
    broken = dict(sd)
    broken["projections.3.2.weight"] = torch.empty(32, 64, 1, 1, device="meta")
    with pytest.raises(CheckpointError, match="projections.3.2.weight"):
        ControlNetConfig.from_state_dict(broken)


@pytest.mark.parametrize("mode", ["effnet", "large", "simple"])
def test_tiny_round_trip(mode):
    cfg = ControlNetConfig.tiny(c_proj=48, bottleneck_mode=mode)
    assert ControlNetConfig.from_state_dict(ControlNet(cfg, device="meta").state_dict()) == cfg


def test_effnet_stem_is_padding_free_for_non_rgb_inputs():
    canny, _ = _build(ControlNetConfig.tiny(c_in=1))
    rgb, _ = _build(ControlNetConfig.tiny(c_in=3))
    assert canny.backbone[0][0].padding == (0, 0) and rgb.backbone[0][0].padding == (1, 1)
    x = torch.rand(1, 1, 100, 70)
    with torch.no_grad():
        assert canny.backbone[0](x).shape[-2:] == (49, 34)
        assert rgb.backbone[0](x.expand(1, 3, 100, 70)).shape[-2:] == (50, 35)


def test_effnet_output_list():
    cfg = ControlNetConfig.tiny(c_proj=40, c_in=4)
    net, sd = _build(cfg)
    x = torch.rand(2, 4, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
    assert len(out) == 64
    assert [i for i, o in enumerate(out) if o is not None] == list(RELEASE_PROJ_BLOCKS)
    assert all(o.shape == (2, 40, 4, 3) for o in out if o is not None)
    # each projection is Conv1x1 -> LeakyReLU(0.2) -> Conv1x1 on the shared backbone output
    with torch.no_grad():
        h = net.backbone(x)
        want = F.conv2d(F.leaky_relu(F.conv2d(h, sd["projections.5.0.weight"]), 0.2), sd["projections.5.2.weight"])
    torch.testing.assert_close(out[55], want)
    assert not torch.allclose(out[0], out[4])


def test_large_backbone_matches_functional_reference():
    cfg = ControlNetConfig.tiny(c_proj=24, bottleneck_mode="large")
    net, sd = _build(cfg)
    x = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = net(x)
        h = F.conv2d(F.leaky_relu(F.conv2d(x, sd["backbone.0.weight"], sd["backbone.0.bias"]), 0.2),
                     sd["backbone.2.weight"], sd["backbone.2.bias"])
        for b in range(3, 3 + cfg.large_blocks):
            p = f"backbone.{b}.blocks."
            t = h
            for ln, conv in ((0, 2), (3, 5)):
                affine = sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"]
                t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), *affine, 1e-5)
                t = F.conv2d(F.gelu(t.permute(0, 3, 1, 2)), sd[f"{p}{conv}.weight"], sd[f"{p}{conv}.bias"], padding=1)
            h = h + t
        h = F.conv2d(h, sd[f"backbone.{3 + cfg.large_blocks}.weight"], sd[f"backbone.{3 + cfg.large_blocks}.bias"])
        want = F.conv2d(F.leaky_relu(F.conv2d(h, sd["projections.0.0.weight"]), 0.2), sd["projections.0.2.weight"])
    assert out[0].shape == (2, 24, 6, 5)
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-5)


def test_simple_backbone_keeps_size():
    net, _ = _build(dataclasses.replace(ControlNetConfig.tiny(c_proj=16, bottleneck_mode="simple"),
                                        proj_blocks=(1, 2)))
    with torch.no_grad():
        out = net(torch.randn(1, 8, 5, 7))
    assert out[0] is None and out[1].shape == (1, 16, 5, 7) and len(out) == 3


def test_bad_input_channels():
    net, _ = _build(ControlNetConfig.tiny(c_in=1))
    with pytest.raises(ShapeError, match="c_in=1"):
        net(torch.rand(1, 3, 64, 64))


def test_batchnorm_eval_and_bf16():
    net, _ = _build(ControlNetConfig.tiny(c_in=1))
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.rand(2, 1, 64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0][:1], net(x[:1])[0], rtol=1e-4, atol=1e-5)
    net16, _ = _build(ControlNetConfig.tiny(c_in=1), dtype=torch.bfloat16)
    with torch.no_grad():
        out16 = net16(x[:1].to(torch.bfloat16))[4]  # CPU bf16 convs take a slow path: keep it small
        out32 = net(x[:1])[4]
    assert out16.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: measured 0.7% relative error; 4x margin.
    assert (out16.float() - out32).norm() / out32.norm() < 0.03


def test_feeds_a_tiny_stage_c():
    c_cfg = stage_c.StageCConfig.tiny()
    unet = stage_c.StageC(c_cfg).eval()
    cnet_cfg = dataclasses.replace(ControlNetConfig.tiny(c_proj=c_cfg.c_hidden[0]), proj_blocks=tuple(range(8)))
    cnet, _ = _build(cnet_cfg)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    args = (torch.tensor([0.5]), torch.randn(1, 77, 1280, generator=gen), torch.randn(1, 1, 1280, generator=gen),
            torch.zeros(1, 1, 768))
    with torch.no_grad():
        ctrl = cnet(torch.rand(1, 1, 256, 256, generator=gen))
        plain = unet(x, *args)
        guided = unet(x, *args, cnet=ctrl)
    assert guided.shape == plain.shape
    assert not torch.allclose(guided, plain)
