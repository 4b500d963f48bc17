"""The same numbers give the same things as core's nodes, in-process (opt-in: COMFYUI_PATH and ComfyUI's Python).

- ``SCW_EmptyLatent`` with compression 42 has the shape of core's ``StableCascade_EmptyLatentImage``;
- ``SCW_CannyControl`` with method core, resize 0 and 0.3 / 0.7 gives exactly the edges of core's ``Canny``;
- ComfyUI's own prompt validation accepts prompts saved before core's names and units (ApplyControlNet's
  ``start`` / ``end``, canny thresholds 100 / 200) and refuses values outside both.
- ``SCW_InpaintPasteBack`` with feather 0 is core's InvertMask -> GrowMask -> ImageCompositeMasked, pixel for pixel.

Run: COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m pytest -q \
    tests/nodes/test_core_settings_comfy.py
"""

import asyncio
import importlib

import pytest
import torch

from comfyui_harness import import_comfy_or_skip

from comfyui_stablecascade import NODE_CLASS_MAPPINGS
from comfyui_stablecascade.nodes.common import DEMO_CHOICE
from comfyui_stablecascade.nodes import controlnet as cn_nodes
from comfyui_stablecascade.nodes import latents


@pytest.fixture(scope="module")
def core():
    return import_comfy_or_skip("the comparison with core's Stable Cascade and Canny nodes", "nodes", "execution",
                                "comfy_extras.nodes_canny", "comfy_extras.nodes_stable_cascade")


def _picture(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.nn.functional.interpolate(torch.rand(1, 3, h // 12, w // 12, generator=g), size=(h, w))
    return (0.8 * blocks + 0.2 * torch.rand(1, 3, h, w, generator=g)).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("width,height", [(1024, 1024), (1024, 768), (1536, 640)])
def test_compression_42_is_cores_latent_size(core, width, height):
    node = core["comfy_extras.nodes_stable_cascade"].StableCascade_EmptyLatentImage
    c_core, b_core = node.execute(width, height, 42, 1).result
    c_ours, b_ours = latents.EmptyLatent().generate(width, height, 1, 42)
    assert c_ours["samples"].shape == c_core["samples"].shape
    assert b_ours["samples"].shape == b_core["samples"].shape


@pytest.mark.parametrize("low,high", [(0.3, 0.7), (0.4, 0.8), (0.1, 0.5)])
@pytest.mark.parametrize("seed,h,w", [(0, 96, 128), (1, 120, 72)])
def test_core_method_gives_cores_canny_edges(core, low, high, seed, h, w):
    image = _picture(seed, h, w)
    (expected,) = core["comfy_extras.nodes_canny"].Canny.execute(image, low, high).result
    _, edges = cn_nodes.CannyControl().prepare(image, low, high, 0, "core")
    assert expected.shape == edges.shape and expected.sum() > 0
    assert torch.equal(edges, expected.to(edges.dtype))


def _validate(core, prompt, node_id):
    core["nodes"].NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    return asyncio.run(core["execution"].validate_inputs("test", prompt, node_id, {}))


def _control_prompt(canny: dict, apply: dict) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SCW_CannyControl", "inputs": {"image": ["1", 0], "resize": 224, **canny}},
        "3": {"class_type": "SCW_StageCLoader", "inputs": {"file_name": DEMO_CHOICE, "weight_dtype": "default"}},
        "4": {"class_type": "SCW_ControlNetLoader", "inputs": {"file_name": DEMO_CHOICE, "weight_dtype": "default"}},
        "5": {"class_type": "SCW_ApplyControlNet", "inputs": {"stage_c": ["3", 0], "controlnet": ["4", 0],
                                                             "control": ["2", 0], "strength": 1.0, **apply}},
    }


def test_comfyui_validates_prompts_saved_with_the_old_names_and_units(core):
    old = _control_prompt({"low_threshold": 100, "high_threshold": 200}, {"start": 0.0, "end": 1.0})
    ok, errors, _ = _validate(core, old, "5")
    assert ok and not errors, errors
    new = _control_prompt({"low_threshold": 0.3, "high_threshold": 0.7, "method": "core"},
                          {"start_percent": 0.1, "end_percent": 0.9})
    ok, errors, _ = _validate(core, new, "5")
    assert ok and not errors, errors
    # The node owns the threshold range (so the old integers pass), and still refuses what fits neither.
    bad = _control_prompt({"low_threshold": 1.5, "high_threshold": 0.7}, {"start": 0.9, "end": 0.1})
    ok, errors, _ = _validate(core, bad, "2")
    assert not ok and any("outside 0.01..0.99" in e.get("details", "") for e in errors), errors
    ok, errors, _ = _validate(core, bad, "5")
    assert not ok and any("start_percent" in str(e) for e in errors), errors


def test_paste_back_is_cores_invert_grow_composite_chain(core):
    """With feather 0, SCW_InpaintPasteBack is core's InvertMask -> GrowMask (shrinking the inverted mask by `grow`,
    square steps) -> ImageCompositeMasked (the original over the generated image) at the same size."""
    from comfyui_stablecascade.nodes import inpaint

    masks = importlib.import_module("comfy_extras.nodes_mask")
    g = torch.Generator().manual_seed(7)
    original, generated = torch.rand(1, 48, 64, 3, generator=g), torch.rand(1, 48, 64, 3, generator=g)
    mask = torch.zeros(1, 48, 64)
    mask[:, 10:30, 20:44] = 1.0
    mask[:, 35:40, 5:9] = 1.0
    (inverted,) = masks.InvertMask().invert(mask)
    (kept,) = masks.GrowMask().expand_mask(inverted, -3, False)
    (expected,) = masks.ImageCompositeMasked().composite(generated, original, 0, 0, False, kept)
    image, _ = inpaint.InpaintPasteBack().paste(original, generated, mask, 3, 0)
    assert torch.equal(image, expected.clamp(0, 1))
