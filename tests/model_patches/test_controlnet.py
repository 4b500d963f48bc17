"""ControlNets for Stage C: the control filters (canny, inpaint, outpaint, super-resolution), the injection into
Stage C compared with the official recipe computed by hand, the start/end range, the keyed clone contract, bad
input, and the nodes. Tiny networks, fp32."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import control_filters as filters
from comfyui_stablecascade.cascade.common import ResBlock
from comfyui_stablecascade.cascade.controlnet import ControlNet, ControlNetConfig
from comfyui_stablecascade.cascade.effnet import normalize_imagenet
from comfyui_stablecascade.cascade.errors import CascadeError, CheckpointError, ShapeError, StageMismatchError
from comfyui_stablecascade.cascade.kinds import demo_network
from comfyui_stablecascade.cascade.lora_format import parse_lora
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.model_patches import controlnet as cn
from comfyui_stablecascade.model_patches import lora as lora_patches
from comfyui_stablecascade.nodes import controlnet as nodes
from comfyui_stablecascade.nodes.common import DEMO_CHOICE
from comfyui_stablecascade.nodes.lora import LoraLoaderModelOnly
from comfyui_stablecascade.pipeline import STAGE_C, controls, stages
from comfyui_stablecascade.pipeline.latents import check_pair
from comfyui_stablecascade.samplers import schedule

TEXT = 32  # text width of the test Stage C, small for speed
BLOCKS = (0, 2, 3, 5)  # tiny Stage C ResBlock calls: down 0 | 1 2, up 3 4 | 5; hits both levels and both paths


# ---- fixtures -------------------------------------------------------------------------------------------


def _stage_c(seed=0):
    cfg = dataclasses.replace(StageCConfig.tiny(), c_clip_text=TEXT, c_clip_text_pooled=TEXT, c_clip_img=16)
    return randomize_(StageC(cfg), seed).eval()


def _controlnet(c_in=1, mode="effnet", seed=1, blocks=BLOCKS):
    cfg = dataclasses.replace(ControlNetConfig.tiny(c_proj=64, bottleneck_mode=mode, c_in=c_in), proj_blocks=blocks)
    return randomize_(ControlNet(cfg), seed).eval()


def _cond(batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"clip_text": torch.randn(batch, 8, TEXT, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, TEXT, generator=g), "clip_img": torch.zeros(batch, 1, 16)}


def _conditioning(seed):
    c = _cond(1, seed)
    return [[c["clip_text"], {"pooled_output": c["clip_text_pooled"][:, 0]}]]


def _model(net, name="canny.safetensors"):
    return cn.ControlNetModel(host.wrap(net, "controlnet"), name)


class _OfficialInjection:
    """The official recipe by hand: the i-th ResBlock call gets x + bilinear(cnet[i], align_corners=True) before it
    runs; ``active(call_index)`` says whether the whole Stage C call (a sampling step) uses the list."""

    def __init__(self, stage_c, cnet, active=lambda step: True):
        self.cnet, self.active, self.block, self.step = cnet, active, 0, -1
        self.hooks = [stage_c.register_forward_pre_hook(self._new_call)]
        self.hooks += [m.register_forward_pre_hook(self._add) for m in stage_c.modules() if isinstance(m, ResBlock)]

    def _new_call(self, module, args):
        self.step, self.block = self.step + 1, 0

    def _add(self, module, args):
        i, self.block = self.block, self.block + 1
        if not self.active(self.step) or i >= len(self.cnet) or self.cnet[i] is None:
            return None
        x = args[0]
        extra = F.interpolate(self.cnet[i], size=x.shape[-2:], mode="bilinear", align_corners=True)
        return (x + extra,) + tuple(args[1:])

    def remove(self):
        for h in self.hooks:
            h.remove()


# ---- canny ------------------------------------------------------------------------------------------------


def _step_image(h, w, col, low_value, high_value):
    img = np.full((h, w), low_value, np.uint8)
    img[:, col:] = high_value
    return img


def test_canny_hand_cases():
    assert not filters.canny_uint8(np.full((6, 8), 77, np.uint8)).any()
    # Vertical step 0 | 255 between columns 3 and 4: |dx| = 4 * 255 = 1020 on both columns; OpenCV's
    # non-maximum rule (m > left, m >= right) keeps the left one only.
    edges = filters.canny_uint8(_step_image(6, 8, 4, 0, 255))
    expected = np.zeros((6, 8), np.uint8)
    expected[:, 3] = 255
    np.testing.assert_array_equal(edges, expected)
    # The same along the other axis (m > above, m >= below): the last dark row.
    np.testing.assert_array_equal(filters.canny_uint8(_step_image(6, 8, 4, 0, 255).T.copy()), expected.T)
    # Thresholds are strict on |dx| + |dy| = 4 * step: a step of 50 (200) starts no edge, 51 (204) does.
    assert not filters.canny_uint8(_step_image(6, 8, 4, 10, 60)).any()
    assert (filters.canny_uint8(_step_image(6, 8, 4, 10, 61))[:, 3] == 255).all()


def test_canny_hysteresis_and_channels():
    # Top half: step 60 (gradient 240, strong); bottom half: step 30 (120, weak but above 100): the weak part is
    # an edge only while it is connected to the strong part.
    img = _step_image(10, 8, 4, 0, 60)
    img[5:, 4:] = 30
    # Worked out by hand: rows 0-3 keep column 3 (240, strong); at rows 4-5 the 60 -> 30 change adds |dy| and the
    # maxima move to column 4 ((4,4): 300, diagonal; (5,4): 240, diagonal), and along row 4 to the right ((4,5..7):
    # 120, vertical, weak but connected); rows 6-9 are back on column 3 (120, weak, connected through (5,4)).
    expected = np.zeros((10, 8), np.uint8)
    expected[[0, 1, 2, 3, 6, 7, 8, 9], 3] = 255
    expected[4, 4:] = expected[5, 4] = 255
    np.testing.assert_array_equal(filters.canny_uint8(img), expected)
    assert not filters.canny_uint8(_step_image(10, 8, 4, 0, 30)).any()
    # A step of 25 (gradient 100, not above the low threshold) never joins an edge.
    img[5:, 4:] = 25
    assert filters.canny_uint8(img)[6:].sum() == 0 and (filters.canny_uint8(img)[:4, 3] == 255).all()
    # Colour: per pixel the channel with the largest gradient decides (here the blue step of 60 is strong).
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, 4:, 0], rgb[:, 4:, 2] = 30, 60
    np.testing.assert_array_equal(filters.canny_uint8(rgb), filters.canny_uint8(_step_image(6, 8, 4, 0, 60)))
    # Thresholds given the wrong way round are swapped, as OpenCV does.
    np.testing.assert_array_equal(filters.canny_uint8(img, 200, 100), filters.canny_uint8(img, 100, 200))


def test_canny_matches_opencv():
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed (optional test dependency)")
    rng = np.random.default_rng(0)
    for shape in ((40, 56), (33, 47, 3), (64, 64, 3)):
        noise = rng.integers(0, 256, size=shape).astype(np.float32)
        smooth = F.avg_pool2d(torch.from_numpy(noise).reshape(1, 1, shape[0], -1), 3, 1, 1).reshape(shape).numpy()
        for img in (noise.astype(np.uint8), smooth.astype(np.uint8)):
            for low, high in ((100, 200), (20, 60), (50, 51)):
                np.testing.assert_array_equal(filters.canny_uint8(img, low, high), cv2.Canny(img, low, high))


def test_canny_filter_is_the_official_pipeline():
    torch.manual_seed(0)
    images = F.interpolate(torch.rand(2, 3, 12, 16), size=(60, 80), mode="bilinear")
    out = filters.canny_filter(images)
    assert out.shape == (2, 1, 60, 80) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
    small = F.interpolate(images, size=(224, 224), mode="bilinear")
    pixels = small.mul(255).permute(0, 2, 3, 1).numpy().astype(np.uint8)  # the release truncates
    edges = torch.stack([torch.from_numpy(filters.canny_uint8(p)) for p in pixels])[:, None].float() / 255
    torch.testing.assert_close(out, F.interpolate(edges, size=(60, 80), mode="bilinear"), rtol=0, atol=0)
    assert edges.sum() > 0
    # resize None: edges at the image's own size, 0 or 1.
    full = filters.canny_filter(images, resize=None)
    assert set(full.unique().tolist()) <= {0.0, 1.0}


# ---- inpaint / outpaint / super-resolution ----------------------------------------------------------------------


def test_inpaint_filter_and_masks():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 10)
    mask = torch.zeros(8, 10)
    mask[2:5, 3:7] = 0.9  # soft values above 0.5 count as masked (the release used boolean masks)
    mask[0, 0] = 0.4
    m = filters.fit_mask(mask, 2, 8, 10)
    assert m.shape == (2, 1, 8, 10) and m.sum() == 2 * 12
    out = filters.inpaint_filter(x, m)
    assert out.shape == (2, 4, 8, 10)
    assert (out[:, :3, 2:5, 3:7] == 1).all() and torch.equal(out[:, 3:], m)
    keep = m.expand(-1, 3, -1, -1) == 0
    assert torch.equal(out[:, :3][keep], x[keep])
    # An empty mask of any size (core's LoadImage gives 64x64 zeros without alpha) means nothing masked.
    assert not filters.fit_mask(torch.zeros(1, 64, 64), 2, 8, 10).any()
    with pytest.raises(ShapeError, match=r"mask is 64x64 but the image is 10x8.*mask editor"):
        filters.fit_mask(torch.ones(1, 64, 64), 2, 8, 10)
    with pytest.raises(ShapeError, match="batch 3"):
        filters.fit_mask(torch.ones(3, 8, 10), 2, 8, 10)


def test_outpaint_pad():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 6, 5)
    inner = torch.zeros(1, 1, 6, 5)
    inner[..., 1, 1] = 1
    padded, mask = filters.outpaint_pad(x, 2, 1, 3, 0, inner)
    assert padded.shape == (1, 3, 7, 10) and mask.shape == (1, 1, 7, 10)
    assert torch.equal(padded[:, :, 1:, 2:7], x) and (padded[:, :, 0] == 1).all() and (padded[..., :2] == 1).all()
    assert mask[..., 1:, 2:7].sum() == 1 and mask[..., 2, 3] == 1  # the inner mask moved with the image
    assert mask.sum() == 7 * 10 - 6 * 5 + 1
    with pytest.raises(ShapeError, match="must not be negative"):
        filters.outpaint_pad(x, -1, 0, 0, 0)


def test_super_resolution_inputs():
    torch.manual_seed(0)
    effnet = demo_network("effnet")  # tiny, with seeded random weights

    def encode(px):
        with torch.no_grad():
            return effnet(normalize_imagenet(px))

    x = torch.rand(1, 3, 128, 192)
    official = filters.sr_effnet_filter(encode, x)
    manual = F.interpolate(encode(F.interpolate(x, scale_factor=0.5, mode="nearest")), scale_factor=2, mode="nearest")
    assert torch.equal(official, manual) and official.shape == (1, 16, 4, 6) and official.std() > 1e-4
    hint = filters.super_resolution_hint(encode, x)
    assert hint.shape == (1, 16, 8, 12) and torch.equal(hint[..., ::2, ::2], encode(x))
    assert torch.equal(hint[..., 1::2, 1::2], encode(x))
    # The node's latents: a 768 px image -> Stage C 48 x 48, Stage B 512 x 512 (a 2048 px output).
    control, stage_c, stage_b = nodes.SuperResolutionControl().prepare(host.wrap(effnet, "effnet"),
                                                                       torch.rand(1, 768, 768, 3))
    assert control.images.shape == (1, 16, 48, 48) and control.kind == "super_resolution"
    assert stage_c["samples"].shape == (1, 16, 48, 48) and stage_b["samples"].shape == (1, 4, 512, 512)
    check_pair(stage_c["samples"], stage_b["samples"])


# ---- injection numbers ---------------------------------------------------------------------------------------


def _net_fn(module):
    def fn(x, r, **cond):
        with torch.no_grad():
            return module(x, r, **cond)
    return fn


@pytest.mark.parametrize("mode", ["effnet", "large"])
def test_injection_matches_the_official_recipe(mode):
    stage_c = _stage_c()
    c_in = 1 if mode == "effnet" else 16
    net = _controlnet(c_in, mode)
    torch.manual_seed(5)
    hint = torch.rand(1, c_in, 64, 96) if mode == "effnet" else torch.randn(1, c_in, 5, 7)
    handle = host.wrap(stage_c, "stage_c")
    controlled = cn.apply_controlnet(handle, _model(net), cn.ControlHint(hint, "x"), strength=0.7)
    x, r = torch.randn(2, 16, 5, 7), torch.full((2,), 0.6)
    cond = _cond(2)
    fn = cn.controlled(_net_fn(stage_c), cn.controls_of(controlled), controlled, lambda p: 1.0 - p, x.shape)
    ours = fn(x, r, **cond)
    with torch.no_grad():
        cnet = [None if t is None else t * 0.7 for t in net(hint)]
        ref = _OfficialInjection(stage_c, cnet)
        expected = stage_c(x, r, **cond)
        ref.remove()
        plain = stage_c(x, r, **cond)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the control really changes the prediction
    assert sum(t is not None for t in cnet) == len(BLOCKS)


def test_two_controls_add_up():
    stage_c = _stage_c()
    a, b = _controlnet(1, seed=1), _controlnet(4, seed=2, blocks=(1, 3))
    torch.manual_seed(0)
    ha, hb = torch.rand(1, 1, 64, 64), torch.rand(1, 4, 96, 64)  # different output sizes: 2x2 and 3x2
    handle = cn.apply_controlnet(host.wrap(stage_c, "stage_c"), _model(a), cn.ControlHint(ha, "canny"))
    handle = cn.apply_controlnet(handle, _model(b, "inpainting.safetensors"), cn.ControlHint(hb, "inpainting"), 2.0)
    assert cn.control_keys(handle) == ["scw_controlnet:canny.safetensors#1", "scw_controlnet:inpainting.safetensors#2"]
    x, r, cond = torch.randn(1, 16, 6, 6), torch.full((1,), 0.5), _cond(1)
    ours = cn.controlled(_net_fn(stage_c), cn.controls_of(handle), handle, lambda p: 1 - p, x.shape)(x, r, **cond)
    with torch.no_grad():
        hooks = [_OfficialInjection(stage_c, a(ha)), _OfficialInjection(stage_c, [None if t is None else 2 * t
                                                                                 for t in b(hb)])]
        expected = stage_c(x, r, **cond)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,end,active_steps", [(0.25, 1.0, {1, 2, 3}), (0.0, 0.5, {0, 1, 2})])
def test_sampling_applies_the_control_inside_the_range_only(start, end, active_steps):
    """4 steps from t=1: positions 0, .25, .5, .75; cfg 4 (batched cond + uncond with the same list), shift 2."""
    stage_c = _stage_c()
    net = _controlnet()
    hint = torch.rand(1, 1, 64, 64)
    base = host.wrap(stage_c, "stage_c")
    controlled = nodes.ApplyControlNet().apply(base, _model(net), cn.ControlHint(hint, "canny"), 1.0, start, end)[0]
    args = dict(positive=_conditioning(1), negative=_conditioning(2), latent=torch.zeros(1, 16, 4, 6),
                settings=STAGE_C.replace(steps=4, cfg=4.0, shift=2.0), seed=11)
    ours = stages.sample_stage_c(controlled, **args)
    with torch.no_grad():
        ref = _OfficialInjection(stage_c, net(hint), active=lambda step: step in active_steps)
        expected = stages.sample_stage_c(base, **args)
        ref.remove()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (stages.sample_stage_c(base, **args) - ours).abs().max() > 1e-3


def test_range_gating_by_noise_level():
    """Steps at positions 0, .25, .5, .75 (4 steps, shift 2): a range between two steps selects none of them."""
    net = _controlnet()
    handle = cn.apply_controlnet(host.wrap(_stage_c(), "stage_c"), _model(net),
                                 cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"), 1.0, 0.3, 0.4)
    r_at = lambda p: stages.r_at(p, 2.0)  # noqa: E731
    fn = cn.controlled(lambda x, r, **c: c.get("cnet"), cn.controls_of(handle), handle, r_at, (1, 16, 4, 4))
    x = torch.zeros(2, 16, 4, 4)
    rs = schedule.noise_cond_r(schedule.logsnr_schedule(4, shift=2.0))[:-1]
    assert [fn(x, r.expand(2)) is None for r in rs] == [True] * 4
    inside = fn(x, torch.full((2,), r_at(0.35)))
    assert [t is not None for t in inside] == [i in BLOCKS for i in range(max(BLOCKS) + 1)]
    assert inside[0].shape[0] == 2 and torch.equal(inside[0][0], inside[0][1])  # same list for cond and uncond


def test_schedule_positions_of_the_range():
    r_at = lambda p: stages.r_at(p, 2.0)  # noqa: E731
    rs = schedule.noise_cond_r(schedule.logsnr_schedule(20, shift=2.0))
    assert r_at(0.0) == pytest.approx(float(rs[0]), abs=1e-6)  # 0.99358, the first step
    assert r_at(0.5) == pytest.approx(float(rs[10]), abs=1e-6)  # 0.70564 (SPEC §10.4)
    assert r_at(0.95) == pytest.approx(0.10627, abs=1e-4)


# ---- contract: keyed clones, nothing changed, errors --------------------------------------------------------------


def test_apply_is_a_keyed_clone_and_the_base_is_unchanged():
    stage_c = _stage_c()
    base = host.wrap(stage_c, "stage_c")
    before = {k: v.clone() for k, v in stage_c.state_dict().items()}
    hint = cn.ControlHint(torch.rand(1, 1, 64, 64), "canny")
    one = cn.apply_controlnet(base, _model(_controlnet()), hint)
    assert type(base) is host.ModelHandle and cn.controls_of(base) == ()
    assert isinstance(one, host.ModelHandle) and one.module is stage_c and one.kind == "stage_c"
    # Later clones (e.g. a LoRA applied after the ControlNet) keep the controls; removing makes another clone.
    lora = parse_lora(lora_patches.demo_lora(stage_c), "demo")
    patched, _ = lora_patches.apply_lora(one, None, lora, 1.0)
    assert cn.control_keys(patched) == cn.control_keys(one) == ["scw_controlnet:canny.safetensors#1"]
    assert patched.patch_keys() and not one.patch_keys()
    gone = cn.remove_control(patched, "scw_controlnet:canny.safetensors#1")
    assert cn.controls_of(gone) == () and cn.control_keys(patched)
    stages.sample_stage_c(one, _conditioning(1), _conditioning(2), torch.zeros(1, 16, 4, 4), STAGE_C.replace(steps=2),
                          seed=1)
    assert all(torch.equal(before[k], v) for k, v in stage_c.state_dict().items())
    with pytest.raises(CascadeError, match="no control 'nope'"):
        cn.remove_control(one, "nope")


def test_controls_ride_on_the_handle_as_an_attachment():
    """The controls are one keyed attachment (ControlSet) of a clone: no __class__ rewrite, the input handle
    carries none, later clones (a LoRA) keep it, and the runner gets networks, memory and wrapper from it."""
    stage_c = _stage_c()
    base = host.wrap(stage_c, "stage_c")
    one = cn.apply_controlnet(base, _model(_controlnet()), cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"))
    assert one is not base and type(one) is type(base) is host.ModelHandle
    assert base.attachments == {} and base.attachment_handles() == [] and base.attachment_memory() == 0
    assert list(one.attachments) == [cn.ATTACHMENT_KEY]
    attached = one.attachments[cn.ATTACHMENT_KEY]
    assert isinstance(attached, cn.ControlSet) and attached.controls == cn.controls_of(one)
    assert one.attachment_handles() == [attached.controls[0].controlnet.handle]
    assert one.attachment_memory() == cn.estimate_memory(attached.controls) > 0
    # A LoRA clone made after the ControlNet keeps the very same attachment.
    lora = parse_lora(lora_patches.demo_lora(stage_c), "demo")
    patched, _ = lora_patches.apply_lora(one, None, lora, 1.0)
    assert type(patched) is host.ModelHandle and patched.attachments[cn.ATTACHMENT_KEY] is attached
    # A second control makes a new ControlSet on a new clone; the first clone's is untouched.
    two = cn.apply_controlnet(one, _model(_controlnet(seed=2)), cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"))
    assert len(two.attachments[cn.ATTACHMENT_KEY].controls) == 2 and one.attachments[cn.ATTACHMENT_KEY] is attached
    # The runner's view: the plain handle leaves the network call alone, the controlled one wraps it.
    context = {"r_at": lambda p: stages.r_at(p, 2.0), "latent_shape": (1, 16, 4, 4)}
    network_fn = _net_fn(stage_c)
    assert base.wrap_network(network_fn, context) is network_fn
    assert isinstance(one.wrap_network(network_fn, context), cn.ControlledNetwork)


def test_lite_stage_c_is_refused_with_the_fix():
    lite = host.wrap(StageC(StageCConfig.lite(), device="meta"), "stage_c")
    canny = cn.ControlNetModel(ControlNet(ControlNetConfig.canny(), device="meta"), "canny.safetensors")
    hint = cn.ControlHint(torch.rand(1, 1, 64, 64), "canny")
    with pytest.raises(ShapeError, match=r"2048 channels wide \(3.6B Stage C\).*1536 channels wide \(1B lite Stage C"
                                         r"\).*load stage_c_bf16.safetensors"):
        cn.apply_controlnet(lite, canny, hint)
    assert cn.controls_of(lite) == ()


def test_bad_inputs_name_the_fix():
    base = host.wrap(_stage_c(), "stage_c")
    inpaint = _model(_controlnet(4), "inpainting.safetensors")
    with pytest.raises(ShapeError, match=r"reads an inpainting input.*canny edge map.*'Stable Cascade ControlNet "
                                         r"Inpaint Input'"):
        cn.apply_controlnet(base, inpaint, cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"))
    with pytest.raises(ShapeError, match="at least 32x32"):
        cn.apply_controlnet(base, _model(_controlnet()), cn.ControlHint(torch.rand(1, 1, 16, 64), "canny"))
    with pytest.raises(CascadeError, match="start 0.8 / end 0.2"):
        cn.apply_controlnet(base, _model(_controlnet()), cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"), 1, .8, .2)
    stage_b = host.wrap(_stage_c(), "stage_b")
    with pytest.raises(StageMismatchError, match="goes on Stage C"):
        cn.apply_controlnet(stage_b, _model(_controlnet()), cn.ControlHint(torch.rand(1, 1, 64, 64), "canny"))
    two = cn.apply_controlnet(base, _model(_controlnet()), cn.ControlHint(torch.rand(2, 1, 64, 64), "canny"))
    with pytest.raises(ShapeError, match="batch 2 but the latent has batch 3"):
        stages.sample_stage_c(two, _conditioning(1), _conditioning(2), torch.zeros(3, 16, 4, 4),
                              STAGE_C.replace(steps=1), seed=0)
    assert cn.controls_of(base) == () and not base.patch_keys()
    assert "make start_percent <= end_percent" in nodes.ApplyControlNet.VALIDATE_INPUTS(start=0.9, end=0.1)
    assert "swap them" in nodes.CannyControl.VALIDATE_INPUTS(low_threshold=210, high_threshold=200)


def test_wrong_files_in_the_controlnet_and_lora_loaders(tmp_models):
    stage_c = _stage_c()
    save_file({k: v.contiguous() for k, v in lora_patches.demo_lora(stage_c).items()},
              str(tmp_models / "controlnet" / "a_lora.safetensors"))
    save_file({k: v.contiguous() for k, v in _controlnet().state_dict().items()},
              str(tmp_models / "loras" / "canny.safetensors"))
    release_blocks = _controlnet(blocks=(0, 4, 8, 12, 51, 55, 59, 63))
    save_file({k: v.contiguous() for k, v in release_blocks.state_dict().items()},
              str(tmp_models / "controlnet" / "canny.safetensors"))
    host.set_models_dir(str(tmp_models))
    try:
        with pytest.raises(CheckpointError, match="Load Stage C LoRA"):
            nodes.ControlNetLoader().load("a_lora.safetensors")
        base = host.wrap(stage_c, "stage_c")
        with pytest.raises(CheckpointError, match=r"ControlNet.*'Stable Cascade Load ControlNet' node"):
            LoraLoaderModelOnly().apply(base, "canny.safetensors", 1.0)
        assert not base.patch_keys() and cn.controls_of(base) == ()
        (loaded,) = nodes.ControlNetLoader().load("canny.safetensors")
        assert loaded.name == "canny.safetensors" and loaded.module.config.c_in == 1
        assert loaded.module.config.proj_blocks == (0, 4, 8, 12, 51, 55, 59, 63)  # the release list, from 8 keys
    finally:
        host.set_models_dir(None)


# ---- nodes ---------------------------------------------------------------------------------------------------


def test_nodes_make_inputs_and_the_demo_controlnet_fits():
    torch.manual_seed(0)
    image = torch.rand(1, 96, 128, 3)
    control, edges = nodes.CannyControl().prepare(image, 100, 200, 224)
    assert control.images.shape == (1, 1, 96, 128) and edges.shape == (1, 96, 128, 3)
    padded, mask = nodes.OutpaintPad().pad(image, 16, 0, 16, 8, torch.zeros(1, 64, 64))
    assert padded.shape == (1, 104, 160, 3) and mask.shape == (1, 104, 160) and mask[0, :96, 16:144].sum() == 0
    inpaint, masked = nodes.InpaintControl().prepare(padded, mask)
    assert inpaint.images.shape == (1, 4, 104, 160) and (masked[0, :, :16] == 1).all()
    base = host.wrap(_stage_c(), "stage_c")
    (demo,) = nodes.ControlNetLoader().load(DEMO_CHOICE)["result"]
    for hint in (control, inpaint):
        (out,) = nodes.ApplyControlNet().apply(base, demo, hint, 1.0, 0.0, 1.0)
        net = cn.controls_of(out)[0].controlnet.module
        assert net.config.c_in == hint.images.shape[1] and net.config.c_proj == 64
        assert max(net.config.proj_blocks) < cn.resblock_calls(base.module.config)
    with pytest.raises(CascadeError, match="connect 'Stable Cascade ControlNet Canny Edges'"):
        nodes.ApplyControlNet().apply(base, demo, torch.rand(1, 1, 64, 64), 1.0, 0.0, 1.0)
    assert math.isclose(controls.SR_OUTPUT_PER_CELL * 48, 2048)


def test_release_controlnets_fit_the_big_stage_c(caplog):
    """The 3.6B Stage C makes 64 ResBlock calls, so all eight released projections land (the lite one: 32)."""
    assert cn.resblock_calls(StageCConfig.big()) == 64 and cn.resblock_calls(StageCConfig.lite()) == 32
    big = host.wrap(StageC(StageCConfig.big(), device="meta"), "stage_c")
    for cfg, hint in ((ControlNetConfig.canny(), torch.rand(1, 1, 64, 64)),
                      (ControlNetConfig.inpainting(), torch.rand(1, 4, 64, 64)),
                      (ControlNetConfig.super_resolution(), torch.rand(1, 16, 4, 4))):
        model = cn.ControlNetModel(ControlNet(cfg, device="meta"), "release")
        with caplog.at_level("WARNING"):
            cn.check_fit(big, model, cn.ControlHint(hint, "x"))
    assert "unused" not in caplog.text
