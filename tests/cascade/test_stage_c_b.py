"""Stage C / Stage B networks: release key layouts, config inference, parity with diffusers, ControlNet
injection, dtype handling. Small random networks in the original key layout; diffusers is the reference."""

import dataclasses
import importlib.util
import json
from types import SimpleNamespace

import pytest
import tiny_checkpoints as tc
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from comfyui_stablecascade.cascade import common
from comfyui_stablecascade.cascade.errors import CheckpointError, ShapeError, UnknownLayoutError
from comfyui_stablecascade.cascade.stage_b import StageB, StageBConfig
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig

# A copy of the spec's keys_shapes.json (every key and shape of every released module) ships with the tests.
KEYS_SHAPES = tc.DATA / "keys_shapes.json"
# fp32 parity: the same math summed in another order; measured <= 4.2e-6 on outputs up to |4.5|.
TOL = 2e-5


def _load_ref():
    spec = importlib.util.spec_from_file_location("scw_diffusers_ref", tc.ROOT / "bench" / "diffusers_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_ref()

# Reduced sizes with the real level structure: C two CTA levels; B CT,CT,CTA,CTA with up-repeats > 1
# (and one down-repeat, a path the wiring supports although no release uses it).
C_CFG = dataclasses.replace(StageCConfig.tiny(), c_hidden=(128, 128), nhead=(2, 2), c_cond=96, blocks=((1, 2), (2, 1)))
B_CFG = dataclasses.replace(
    StageBConfig.tiny(), c_hidden=(64, 64, 128, 128), nhead=(0, 0, 2, 2), c_cond=96,
    blocks=((1, 2, 2, 1), (1, 2, 2, 1)), block_repeat=((1, 2, 1, 1), (3, 2, 2, 2)),
)


def _build(cls, cfg, seed=0, dtype=None):
    """A network and its random original-layout state dict, loaded through a safetensors round trip."""
    sd = ref.random_state_dict(cls(cfg, device="meta"), seed)
    net = cls(cfg, device="meta")
    net.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        net = net.to(dtype)
    return net.eval(), sd


def _saved(tmp_path, sd, name):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return load_file(str(path))


def _c_inputs(batch=2, h=18, w=27, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, h, w, generator=g),
        r=torch.tensor([0.31, 0.87, 0.05, 0.6][:batch]),
        clip_text=torch.randn(batch, 77, 1280, generator=g),
        clip_text_pooled=torch.randn(batch, 1, 1280, generator=g),
        clip_img=torch.randn(batch, 1, 768, generator=g),
    )


def _b_inputs(batch=2, h=40, w=56, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 4, h, w, generator=g),
        r=torch.tensor([0.42, 0.93, 0.1][:batch]),
        effnet=torch.randn(batch, 16, 5, 7, generator=g),
        clip=torch.randn(batch, 1, 1280, generator=g),
    )


# ---------------------------------------------------------------- key layouts and config inference

RELEASES = [
    ("StageC big (3.6B)", StageC, StageCConfig.big),
    ("StageC lite (1B)", StageC, StageCConfig.lite),
    ("StageB big (3B/1.5B)", StageB, StageBConfig.big),
    ("StageB lite (700M)", StageB, StageBConfig.lite),
]


@pytest.mark.parametrize("name,cls,make", RELEASES, ids=[r[0] for r in RELEASES])
def test_release_keys_and_config_inference(name, cls, make):
    with open(KEYS_SHAPES) as f:
        want = json.load(f)[name]
    net = cls(make(), device="meta")
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert all(p.is_meta for p in net.parameters())
    sd = {k: torch.empty(shape, device="meta") for k, shape in want.items()}
    assert type(make()).from_state_dict(sd) == make()


@pytest.mark.parametrize("cls,cfg", [(StageC, StageCConfig.tiny()), (StageC, C_CFG), (StageB, StageBConfig.tiny()),
                                     (StageB, B_CFG)], ids=["c-tiny", "c-test", "b-tiny", "b-test"])
def test_config_round_trip_small(cls, cfg, tmp_path):
    _, sd = _build(cls, cfg)
    sd = _saved(tmp_path, sd, "net.safetensors")
    inferred = type(cfg).from_state_dict(sd)
    # dropout is not in the keys; it is inactive at inference and inferred from the release convention.
    assert dataclasses.replace(inferred, dropout=cfg.dropout) == cfg


def test_stage_b_state_dict_rejected_by_stage_c():
    _, sd_b = _build(StageB, StageBConfig.tiny())
    with pytest.raises(CheckpointError, match=r"Stage B.*effnet_mapper\.0\.weight"):
        StageCConfig.from_state_dict(sd_b)
    _, sd_c = _build(StageC, StageCConfig.tiny())
    with pytest.raises(CheckpointError, match=r"Stage C.*clip_txt_mapper\.weight"):
        StageBConfig.from_state_dict(sd_c)


def test_bad_state_dicts_fail_clearly():
    _, sd = _build(StageC, StageCConfig.tiny())
    diffusers_sd = ref.to_diffusers_keys(sd)
    diffusers_sd.pop("clip_txt_mapper.weight")
    with pytest.raises(UnknownLayoutError, match="diffusers layout"):
        StageCConfig.from_state_dict(diffusers_sd)
    broken = dict(sd)
    broken["up_blocks.1.0.channelwise.0.weight"] = torch.empty(256, 64)  # skip block without its skip width
    with pytest.raises(CheckpointError, match=r"up_blocks\.1\.0\.channelwise\.0\.weight"):
        StageCConfig.from_state_dict(broken)
    with pytest.raises(CheckpointError, match="missing"):
        StageCConfig.from_state_dict({"foo.weight": torch.empty(1)})


# ---------------------------------------------------------------- parity with diffusers


def test_stage_c_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers (the parity reference, requirements-dev.txt) is not installed")
    net, sd = _build(StageC, C_CFG, seed=3)
    sd = _saved(tmp_path, sd, "c.safetensors")
    ours = StageC(StageCConfig.from_state_dict(sd), device="meta")
    ours.load_state_dict(sd, assign=True)
    theirs = ref.build_diffusers_unet(C_CFG, sd)
    inp = _c_inputs()
    with torch.no_grad():
        out = ours(**inp)
        expected = theirs(inp["x"], inp["r"], inp["clip_text_pooled"], clip_text=inp["clip_text"],
                          clip_img=inp["clip_img"]).sample
        pooled_2d = ours(**{**inp, "clip_text_pooled": inp["clip_text_pooled"][:, 0]})
    assert out.shape == inp["x"].shape and out.dtype == torch.float32
    assert expected.abs().max() > 0.1  # a real signal, not two zero outputs
    assert (out - expected).abs().max().item() <= TOL
    assert torch.equal(pooled_2d, out)


def test_stage_b_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers (the parity reference, requirements-dev.txt) is not installed")
    net, sd = _build(StageB, B_CFG, seed=4)
    sd = _saved(tmp_path, sd, "b.safetensors")
    ours = StageB(StageBConfig.from_state_dict(sd), device="meta")
    ours.load_state_dict(sd, assign=True)
    theirs = ref.build_diffusers_unet(B_CFG, sd)
    inp = _b_inputs()
    with torch.no_grad():
        out = ours(**inp)
        expected = theirs(inp["x"], inp["r"], inp["clip"], effnet=inp["effnet"]).sample
    assert out.shape == inp["x"].shape
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max().item() <= TOL


# ---------------------------------------------------------------- ControlNet injection


def _record_resblock_inputs(net):
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].clone()))
               for m in net.modules() if isinstance(m, common.ResBlock)]
    return calls, handles


def test_cnet_injection_points():
    net, _ = _build(StageC, C_CFG, seed=5)
    inp = _c_inputs(h=12, w=16)
    n_res = sum(isinstance(m, common.ResBlock) for m in net.modules())  # one call each: no repeats in C_CFG
    with torch.no_grad():
        base = net(**inp)
        assert torch.equal(net(**inp, cnet=[None] * n_res), base)
        assert torch.equal(net(**inp, cnet=[]), base)

        calls_base, handles = _record_resblock_inputs(net)
        net(**inp)
        target = 2
        extra = torch.randn(2, C_CFG.c_hidden[0], 6, 8)  # half size: resized bilinearly, align_corners=True
        cnet = [None] * target + [extra]  # shorter than the block count: the rest get nothing
        calls_base_copy = list(calls_base)
        calls_base.clear()
        out = net(**inp, cnet=cnet)
        for h in handles:
            h.remove()
    assert len(calls_base) == len(calls_base_copy) == n_res
    for i in range(target):
        assert torch.equal(calls_base[i], calls_base_copy[i])
    resized = torch.nn.functional.interpolate(extra, size=(12, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(calls_base[target], calls_base_copy[target] + resized, rtol=0, atol=1e-5)
    assert not torch.allclose(out, base)


# ---------------------------------------------------------------- dtype, shapes, construction


@pytest.mark.parametrize("cls,cfg,inputs", [(StageC, StageCConfig.tiny(), _c_inputs(h=6, w=8)),
                                            (StageB, StageBConfig.tiny(), _b_inputs(h=16, w=24))], ids=["c", "b"])
def test_bf16_stays_bf16(cls, cfg, inputs):
    net32, _ = _build(cls, cfg, seed=6)
    net16, _ = _build(cls, cfg, seed=6, dtype=torch.bfloat16)
    dtypes = set()
    for m in net16.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, common.ResBlock, common.AttnBlock)):
            m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    inp16 = {k: v.to(torch.bfloat16) if k != "r" else v for k, v in inputs.items()}
    with torch.no_grad():
        out16 = net16(**inp16)
        out32 = net32(**inputs)
    assert out16.dtype == torch.bfloat16 and dtypes == {torch.bfloat16}
    # Same network in a coarser dtype: close to fp32, not bit-equal. bf16 keeps 8 significant bits; through the
    # tiny U-Nets the relative error measures 1.0% (C) and 0.8% (B): a 3x margin for other CPU kernels.
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 0.03


def test_shape_errors_name_the_problem():
    c, _ = _build(StageC, StageCConfig.tiny())
    b, _ = _build(StageB, StageBConfig.tiny())
    inp_c = _c_inputs(h=6, w=8)
    with pytest.raises(ShapeError, match="Stage B latent"):
        c(**{**inp_c, "x": torch.randn(2, 4, 6, 8)})
    inp_b = _b_inputs(h=16, w=24)
    with pytest.raises(ShapeError, match="even"):
        b(**{**inp_b, "x": torch.randn(2, 4, 15, 24)})
    with pytest.raises(ShapeError, match="effnet"):
        b(**{**inp_b, "effnet": torch.randn(3, 16, 4, 4)})


def test_operations_namespace_is_used():
    class CountingLinear(nn.Linear):
        pass

    class CountingConv(nn.Conv2d):
        pass

    ops = SimpleNamespace(Linear=CountingLinear, Conv2d=CountingConv, ConvTranspose2d=nn.ConvTranspose2d)
    for cls, cfg in [(StageC, StageCConfig.tiny()), (StageB, StageBConfig.tiny())]:
        net = cls(cfg, device="meta", operations=ops)
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        convs = [m for m in net.modules() if type(m) in (nn.Conv2d, CountingConv)]
        assert linears and all(isinstance(m, CountingLinear) for m in linears)
        assert convs and all(isinstance(m, CountingConv) for m in convs)


def test_host_operations_path_matches():
    """Layers whose forward a host overrides (ComfyUI's cast/offload ops) are called as modules; the result
    must equal the fast path that reads plain Linear weights directly."""

    class HostLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    ops = SimpleNamespace(Linear=HostLinear, Conv2d=nn.Conv2d, ConvTranspose2d=nn.ConvTranspose2d)
    for cls, cfg, inp in [(StageC, C_CFG, _c_inputs(h=6, w=9)), (StageB, B_CFG, _b_inputs(h=24, w=40))]:
        plain, sd = _build(cls, cfg, seed=7)
        host = cls(cfg, device="meta", operations=ops)
        host.load_state_dict(sd, assign=True)
        with torch.no_grad():
            torch.testing.assert_close(host(**inp), plain(**inp), rtol=0, atol=1e-5)


def test_blocks_leave_their_input_alone_unless_told():
    """The U-Net lets blocks overwrite tensors it owns (inplace=True); a direct call must not."""
    torch.manual_seed(8)
    blocks = [
        (common.ResBlock(64, 64), lambda b, x: b(x, torch.randn(2, 64, 5, 7))),
        (common.ResBlock(64), lambda b, x: b(x)),
        (common.TimestepBlock(64, 64, ("sca",)), lambda b, x: b(x, torch.randn(2, 128))),
        (common.AttnBlock(64, 32, 1), lambda b, x: b(x, torch.randn(2, 3, 32))),
    ]
    for block, call in blocks:
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.1)
        block.eval()
        x = torch.randn(2, 64, 5, 7)
        before = x.clone()
        with torch.no_grad():
            out = call(block, x)
        assert torch.equal(x, before) and not torch.equal(out, before)


@pytest.mark.parametrize("cls,cfg,inputs", [(StageC, StageCConfig.tiny(), _c_inputs(h=6, w=8)),
                                            (StageB, StageBConfig.tiny(), _b_inputs(h=16, w=24))], ids=["c", "b"])
def test_fresh_network_is_initialised(cls, cfg, inputs):
    """A network built but not loaded (the start of training, or a host's probe) has no uninitialised memory."""
    torch.manual_seed(9)
    net = cls(cfg)
    for name, p in net.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith(("gamma", "beta", "in_proj_bias")):
            assert not p.any(), f"{name} should start at zero"
    with torch.no_grad():
        assert torch.isfinite(net(**inputs)).all()
    grn = common.GlobalResponseNorm(8)
    x = torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(grn(x), x, rtol=0, atol=0)
