"""Core's numbers mean core's things (issue 11, item 3) and the inpainting paste-back (item 4).

compression 42 gives core's latent sizes, 42.67 the official ceil rule; canny thresholds are in core's units (the
release's 100 / 200 are 0.392 / 0.784 and give the release's edges bit for bit, and values saved before, in OpenCV
integers, still validate and give the same edges); the ControlNet range has core's names, and the old ones still
work; CLIP vision encode has core's crop choice; Stage C encode defaults to the image's own size. The comparison
with core's own nodes is tests/nodes/test_core_settings_comfy.py.
"""

import dataclasses

import pytest
import torch

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import control_filters as filters
from comfyui_stablecascade.cascade import image_ops
from comfyui_stablecascade.cascade.clip_vision import ClipVision, ClipVisionConfig, clip_preprocess
from comfyui_stablecascade.cascade.controlnet import ControlNet, ControlNetConfig
from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.model_patches import controlnet as cn
from comfyui_stablecascade.nodes import controlnet as cn_nodes
from comfyui_stablecascade.nodes import image as image_nodes
from comfyui_stablecascade.nodes import inpaint, latents
from comfyui_stablecascade.pipeline import controls


def _image(seed=0, h=96, w=128):
    """A smooth random picture with edges (B, H, W, 3): blocks of colour, upsampled."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 16, w // 16, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="nearest").permute(0, 2, 3, 1).contiguous()


# ---- compression --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,compression,c_hw", [
    (1024, 1024, 42, (24, 24)),      # core: 1024 // 42 (ceil would give 25)
    (1024, 768, 42, (18, 24)),       # core: 768 // 42, 1024 // 42
    (1024, 1024, 42.67, (24, 24)),   # official: ceil(1024 / 42.67)
    (1024, 768, 42.67, (18, 24)),
    (1536, 1536, 42, (36, 36)),      # 36.57: core floors
    (1536, 1536, 42.5, (37, 37)),    # a fraction: the official ceil
    (1000, 1000, 32, (31, 31)),      # 31.25
])
def test_compression_whole_numbers_as_core_fractions_as_official(width, height, compression, c_hw):
    stage_c, stage_b = latents.EmptyLatent().generate(width, height, 1, compression)
    assert tuple(stage_c["samples"].shape[-2:]) == c_hw
    assert tuple(stage_b["samples"].shape[-2:]) == (height // 4, width // 4)


def test_stage_c_encode_defaults_to_the_image_size_and_uses_the_same_rule():
    spec = image_nodes.StageCEncode.INPUT_TYPES()["required"]
    assert spec["width"][1]["default"] == 0 and spec["height"][1]["default"] == 0  # 0: the image's size, as core
    # Core's StableCascade_StageC_VAEEncode: (side // compression) * 32 pixels into the EffNet.
    assert image_ops.effnet_input_size(1024, 768, 42) == ((1024 // 42) * 32, (768 // 42) * 32)
    assert image_ops.effnet_input_size(1024, 1024, 42.67) == (768, 768)


# ---- canny ----------------------------------------------------------------------------------------------------


def test_default_thresholds_are_the_release_filter_bit_for_bit():
    image = _image(1, 160, 200)
    spec = cn_nodes.CannyControl.INPUT_TYPES()
    low, high = (spec["required"][n][1]["default"] for n in ("low_threshold", "high_threshold"))
    assert (low, high) == (0.392, 0.784) and spec["optional"]["method"][1]["default"] == "official"
    assert filters.opencv_threshold(low) == filters.CANNY_LOW and filters.opencv_threshold(high) == filters.CANNY_HIGH
    control, _ = cn_nodes.CannyControl().prepare(image, low, high, 224)
    official = filters.canny_filter(image.permute(0, 3, 1, 2), filters.CANNY_LOW, filters.CANNY_HIGH, 224)
    assert torch.equal(control.images, official) and official.amax() > 0
    # A workflow saved before core's units holds the OpenCV integers: same validation result, same edges.
    assert cn_nodes.CannyControl.VALIDATE_INPUTS(100, 200) is True
    legacy, _ = cn_nodes.CannyControl().prepare(image, 100, 200, 224, "core")  # legacy values: always official
    assert torch.equal(legacy.images, official)


def test_threshold_validation_names_the_value_and_the_range():
    check = cn_nodes.CannyControl.VALIDATE_INPUTS
    assert check(0.3, 0.7) is True and check(0.01, 0.99) is True and check(1020, 1020) is True
    assert "outside 0.01..0.99" in check(1.5, 0.7) and "0.392 / 0.784" in check(1.5, 0.7)
    assert "outside 0.01..0.99" in check(0.3, 1021)
    assert "mix OpenCV integers" in check(100, 0.7)
    assert "swap them" in check(0.8, 0.3)
    with pytest.raises(CascadeError, match="mix an OpenCV integer"):
        controls.canny_thresholds(100, 0.7, "official")
    with pytest.raises(CascadeError, match="outside 0.01..0.99"):  # a linked value, which the server does not check
        cn_nodes.CannyControl().prepare(_image(), 1.5, 2.0, 0)


def test_core_method_finds_one_pixel_wide_edges():
    # A vertical black/white step: core's Canny (blur, L2, NMS) keeps one column; nothing else is an edge.
    x = torch.zeros(1, 40, 48, 3)
    x[:, :, 24:] = 1.0
    control, edges = cn_nodes.CannyControl().prepare(x, 0.3, 0.7, 0, "core")
    e = control.images[0, 0]
    assert edges.shape == (1, 40, 48, 3)
    columns = torch.nonzero(e.sum(0)).flatten().tolist()
    assert len(columns) == 1 and columns[0] in (23, 24) and e[:, columns[0]].all()
    # Above the step's gradient (a unit step, blurred, is about 2.6 in core's units) nothing is left.
    assert filters.canny_core(x.permute(0, 3, 1, 2), 2.7, 2.8).sum() == 0


# ---- ControlNet range: core's names, old names still run ---------------------------------------------------------


@pytest.fixture(scope="module")
def stage_c_and_controlnet():
    cfg = dataclasses.replace(StageCConfig.tiny(), c_clip_text=32, c_clip_text_pooled=32, c_clip_img=16)
    stage_c = host.wrap(randomize_(StageC(cfg), 0).eval(), "stage_c")
    net_cfg = dataclasses.replace(ControlNetConfig.tiny(c_proj=64, bottleneck_mode="effnet", c_in=1),
                                  proj_blocks=(0, 2))
    net = cn.ControlNetModel(host.wrap(randomize_(ControlNet(net_cfg), 1).eval(), "controlnet"), "canny.safetensors")
    return stage_c, net


def test_range_inputs_have_core_names_and_old_names_still_apply(stage_c_and_controlnet):
    stage_c, net = stage_c_and_controlnet
    spec = cn_nodes.ApplyControlNet.INPUT_TYPES()
    assert list(spec["optional"]) == ["start_percent", "end_percent"]
    assert spec["required"]["strength"][1]["min"] == 0.0 and spec["required"]["strength"][1]["max"] == 10.0
    assert set(spec["hidden"]) == {"start", "end"}
    hint = cn.ControlHint(torch.rand(1, 1, 64, 64), "canny")
    node = cn_nodes.ApplyControlNet()
    (new,) = node.apply(stage_c, net, hint, 0.5, start_percent=0.2, end_percent=0.7)
    (old,) = node.apply(stage_c, net, hint, 0.5, start=0.2, end=0.7)  # an API prompt saved with the old names
    (default,) = node.apply(stage_c, net, hint, 0.5)
    ranges = [(c.start, c.end, c.strength) for h in (new, old, default) for c in cn.controls_of(h)]
    assert ranges == [(0.2, 0.7, 0.5), (0.2, 0.7, 0.5), (0.0, 1.0, 0.5)]
    check = cn_nodes.ApplyControlNet.VALIDATE_INPUTS
    assert check(start_percent=0.2, end_percent=0.7) is True and check(start=0.2, end=0.7) is True
    assert "start_percent <= end_percent" in check(start=0.9, end=0.1)
    assert "outside 0..1" in check(start_percent=1.5)


# ---- CLIP vision crop -------------------------------------------------------------------------------------------


def test_clip_vision_crop_choice_as_core():
    spec = image_nodes.ClipVisionEncode.INPUT_TYPES()["optional"]["crop"]
    assert spec[0] == ["center", "none"] and spec[1]["default"] == "center"
    wide = torch.rand(1, 64, 128, 3, generator=torch.Generator().manual_seed(3))
    centre, squeezed = clip_preprocess(wide, 32), clip_preprocess(wide, 32, crop=False)
    assert centre.shape == squeezed.shape == (1, 3, 32, 32) and not torch.allclose(centre, squeezed)
    # "none" sees the whole image: its left quarter is in the squeezed input, not in the center crop.
    only_left = wide.clone()
    only_left[:, :, 32:] = 0.5
    assert not torch.allclose(clip_preprocess(only_left, 32, crop=False), clip_preprocess(wide * 0 + 0.5, 32, False))
    assert torch.allclose(clip_preprocess(only_left, 32)[..., 16:], clip_preprocess(wide * 0 + 0.5, 32)[..., 16:])
    torch.manual_seed(0)
    vision = host.wrap(ClipVision(ClipVisionConfig.tiny()), "clip_vision")
    prompt = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 32)}]]
    (a,) = image_nodes.ClipVisionEncode().encode(prompt, vision, wide, 1.0)
    (b,) = image_nodes.ClipVisionEncode().encode(prompt, vision, wide, 1.0, "none")
    key = next(k for k in a[0][1] if k != "pooled_output")
    assert not torch.allclose(a[0][1][key], b[0][1][key])


# ---- inpainting paste-back ----------------------------------------------------------------------------------------


def test_paste_back_keeps_the_original_outside_the_grown_mask():
    original = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(4))
    generated = torch.rand(1, 128, 160, 3, generator=torch.Generator().manual_seed(5))  # Stage B's 2x output
    mask = torch.zeros(1, 64, 80)
    mask[:, 20:40, 30:50] = 1.0
    image, blend = inpaint.InpaintPasteBack().paste(original, generated, mask, 4, 6)
    assert image.shape == generated.shape and blend.shape == (1, 128, 160)
    inside = blend[0, 40:80, 60:100]
    assert torch.equal(inside, torch.ones_like(inside))  # the generated region is kept whole
    torch.testing.assert_close(image[0, 40:80, 60:100], generated[0, 40:80, 60:100], rtol=0, atol=1e-6)
    # Far from the mask (more than grow + feather pixels): exactly the original, resized to the output.
    resized = image_ops.paste_back(original.permute(0, 3, 1, 2), generated.permute(0, 3, 1, 2), mask[:, None] * 0,
                                   4, 6)[0].permute(0, 2, 3, 1)
    assert torch.equal(blend[0, :20], torch.zeros(20, 160)) and torch.equal(image[0, :20], resized[0, :20])
    # The seam: the mask grown by 4, its edge blurred over 6, fading monotonically to 0 beyond grow + feather.
    row = blend[0, 60, 100:120]
    assert row[0] > 0.5 and 0 < row[8] < row[0] and bool((row[1:] <= row[:-1]).all()) and not row[11:].any()
    assert torch.equal(inpaint.InpaintPasteBack().paste(original, generated, mask, 0, 0)[1][0],
                       (torch.nn.functional.interpolate(mask[:, None], size=(128, 160), mode="bilinear")[0, 0] > 0.5)
                       .float())
