"""Shared workflows that mix the pack's nodes with ComfyUI core utility nodes, run headlessly with the core stand-ins
(no ComfyUI): the inpainting paste-back chain (InvertMask -> GrowMask -> ImageCompositeMasked), ImageScale, Canny,
SolidMask/MaskComposite and RepeatLatentBatch around the pack's text-to-image graph; each stand-in's own semantics on
small inputs; and the message for a node type the runner lacks. tests/standalone/test_core_nodes_comfyui.py runs the
same workflow through a real ComfyUI checkout and compares every stand-in with core's node."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_stablecascade import host
from comfyui_stablecascade.standalone import cli
from comfyui_stablecascade.standalone import executor as headless
from comfyui_stablecascade.standalone import standins_image, standins_mask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = os.path.join(ROOT, "workflows", "inputs")
SIZE = 256
# The region the generated image is pasted into, and how far GrowMask widens it.
RECT_X, RECT_Y, RECT_W, RECT_H, GROW = 80, 100, 64, 96, 6
PREFIXES = ("generated", "original", "composite", "edges")


def mixed_workflow() -> dict:
    """workflows/text_to_image.json at 256 px with few steps, plus core nodes: the Stage C latent through
    RepeatLatentBatch; LoadImage -> ImageScale as the original; a rectangle mask made with SolidMask, MaskComposite
    and InvertMask, widened by GrowMask; the generated image pasted into the original through it
    (ImageCompositeMasked), and Canny of the result. Four SaveImage nodes, one per prefix in PREFIXES."""
    with open(os.path.join(ROOT, "workflows", "text_to_image.json"), encoding="utf-8") as f:
        wf = json.load(f)
    classes = headless.node_classes(INPUTS)
    by_id = {n["id"]: n for n in wf["nodes"]}

    def only(node_type: str) -> dict:
        found = [n for n in wf["nodes"] if n["type"] == node_type]
        assert len(found) == 1, f"text_to_image.json should hold one {node_type}"
        return found[0]

    def set_widget(node: dict, name: str, value) -> None:
        node["widgets_values"][headless.widget_slots(classes[node["type"]]).index(name)] = value

    latent, decode = only("SCW_EmptyLatent"), only("SCW_StageADecode")
    set_widget(latent, "width", SIZE)
    set_widget(latent, "height", SIZE)
    set_widget(only("SCW_StageCSampler"), "steps", 2)
    set_widget(only("SCW_StageBSampler"), "steps", 2)
    set_widget(only("SaveImage"), "filename_prefix", PREFIXES[0])
    links = wf["links"]
    ids = {"next_link": max(link[0] for link in links) + 1, "next_node": max(by_id) + 1}

    def link(src: int, slot: int, dst: int, name: str, kind: str) -> None:
        links.append([ids["next_link"], src, slot, dst, 0, kind])
        node = by_id[dst]
        for socket in node["inputs"]:
            if socket["name"] == name:
                socket["link"] = ids["next_link"]
                break
        else:
            node["inputs"].append({"name": name, "type": kind, "link": ids["next_link"]})
        ids["next_link"] += 1

    def add(kind: str, widgets: list, *inputs: tuple[str, str]) -> int:
        node_id = ids["next_node"]
        ids["next_node"] += 1
        node = {"id": node_id, "type": kind, "pos": [0, 0], "mode": 0, "widgets_values": widgets,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs], "outputs": []}
        wf["nodes"].append(node)
        by_id[node_id] = node
        return node_id

    # The Stage C latent through RepeatLatentBatch (amount 1): the EmptyLatent -> sampler link is re-routed.
    sampler_c = only("SCW_StageCSampler")
    socket = next(i for i in sampler_c["inputs"] if i["name"] == "latent")
    origin = next(lk for lk in links if lk[0] == socket["link"])
    links.remove(origin)
    repeat = add("RepeatLatentBatch", [1], ("samples", "LATENT"))
    link(origin[1], origin[2], repeat, "samples", "LATENT")
    link(repeat, 0, sampler_c["id"], "latent", "LATENT")
    load = add("LoadImage", ["scw_example.png", "image"])
    scale = add("ImageScale", ["bilinear", SIZE, SIZE, "center"], ("image", "IMAGE"))
    link(load, 0, scale, "image", "IMAGE")
    full, rect = add("SolidMask", [1.0, SIZE, SIZE]), add("SolidMask", [1.0, RECT_W, RECT_H])
    cut = add("MaskComposite", [RECT_X, RECT_Y, "subtract"], ("destination", "MASK"), ("source", "MASK"))
    link(full, 0, cut, "destination", "MASK")
    link(rect, 0, cut, "source", "MASK")
    invert = add("InvertMask", [], ("mask", "MASK"))
    link(cut, 0, invert, "mask", "MASK")
    grow = add("GrowMask", [GROW, True], ("mask", "MASK"))
    link(invert, 0, grow, "mask", "MASK")
    paste = add("ImageCompositeMasked", [0, 0, False], ("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK"))
    link(scale, 0, paste, "destination", "IMAGE")
    link(decode["id"], 0, paste, "source", "IMAGE")
    link(grow, 0, paste, "mask", "MASK")
    canny = add("Canny", [0.3, 0.7], ("image", "IMAGE"))
    link(paste, 0, canny, "image", "IMAGE")
    for prefix, src in zip(PREFIXES[1:], (scale, paste, canny)):
        link(src, 0, add("SaveImage", [prefix], ("images", "IMAGE")), "images", "IMAGE")
    wf["last_node_id"], wf["last_link_id"] = ids["next_node"] - 1, ids["next_link"] - 1
    return wf


def read_outputs(folder: str) -> dict[str, np.ndarray]:
    """prefix -> the one H x W x 3 uint8 image SaveImage wrote with it."""
    out = {}
    for prefix in PREFIXES:
        names = sorted(f for f in os.listdir(folder) if f.startswith(prefix + "_"))
        assert len(names) == 1, (prefix, sorted(os.listdir(folder)))
        out[prefix] = np.asarray(Image.open(os.path.join(folder, names[0])).convert("RGB"))
    return out


def check_mixed_outputs(images: dict[str, np.ndarray]) -> None:
    """What the core nodes did, read from the saved images: the paste-back keeps the original outside the grown
    rectangle and the generated image inside it, and Canny finds the pasted rectangle's border."""
    generated, original, composite, edges = (images[p].astype(np.int16) for p in PREFIXES)
    assert generated.shape == original.shape == composite.shape == edges.shape == (SIZE, SIZE, 3)
    inside = np.zeros((SIZE, SIZE), bool)
    inside[RECT_Y:RECT_Y + RECT_H, RECT_X:RECT_X + RECT_W] = True
    grown = np.zeros_like(inside)
    grown[RECT_Y - GROW:RECT_Y + RECT_H + GROW, RECT_X - GROW:RECT_X + RECT_W + GROW] = True
    assert np.array_equal(composite[~grown], original[~grown])
    assert np.array_equal(composite[inside], generated[inside])
    assert not np.array_equal(composite[inside], original[inside])  # the paste really happened
    assert set(np.unique(edges)) <= {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    # The generated patch is noise on the demo networks: far more edges in it than in the photo around it.
    assert edges[grown].mean() > 2 * edges[~grown].mean() > 0


@pytest.fixture
def empty_models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def test_a_workflow_mixing_the_pack_and_core_utility_nodes_runs_on_the_stand_ins(empty_models, tmp_path):
    wf = mixed_workflow()
    paths = headless.run_workflow(copy.deepcopy(wf), output_dir=str(tmp_path), seed=7, input_dir=INPUTS)
    assert len(paths) == 4
    check_mixed_outputs(read_outputs(str(tmp_path)))
    prompt = json.loads(Image.open(paths[-1]).text["prompt"])
    assert {"GrowMask", "ImageCompositeMasked", "Canny", "RepeatLatentBatch"} <= {e["class_type"] for e in
                                                                                 prompt.values()}


# ---- each stand-in on inputs small enough to check by hand ---------------------------------------------------------


def test_grow_mask_grows_a_pixel_into_a_cross_or_a_square_and_shrinks_it_back():
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    cross = standins_mask.GrowMask().expand_mask(mask, 1, True)[0][0]
    assert cross.sum() == 5 and cross[2:5, 3].all() and cross[3, 2:5].all() and cross[2, 2] == 0
    square = standins_mask.GrowMask().expand_mask(mask, 2, False)[0][0]
    assert square[1:6, 1:6].all() and square.sum() == 25
    assert torch.equal(standins_mask.GrowMask().expand_mask(square[None], -2, False)[0][0], mask[0])


def test_invert_mask_and_mask_composite():
    dest = torch.full((1, 4, 6), 0.25)
    src = torch.ones(1, 2, 3)
    out = standins_mask.MaskComposite().combine(dest, src, 4, 3, "add")[0]
    assert out.shape == (1, 4, 6)
    assert torch.equal(out[0, 3, 4:], torch.tensor([1.0, 1.0])) and out[0, :3].eq(0.25).all()  # cut at the border
    assert torch.allclose(standins_mask.InvertMask().invert(out)[0][0, 3, 4:], torch.zeros(2))
    a, b = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 1.0]]])
    xor = standins_mask.MaskComposite().combine(a, b, 0, 0, "xor")
    assert torch.equal(xor[0], torch.tensor([[[1.0, 0.0]]]))


def test_image_composite_masked_pastes_through_the_mask_and_drops_a_source_alpha():
    dest = torch.zeros(1, 4, 4, 3)
    src = torch.ones(1, 2, 2, 4)  # RGBA: the alpha channel is dropped, as core drops it
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    out = standins_image.ImageCompositeMasked().composite(dest, src, 1, 2, False, mask)[0]
    assert out.shape == (1, 4, 4, 3)
    expected = torch.zeros(4, 4)
    expected[2, 1], expected[3, 1], expected[3, 2] = 1, 1, 1
    assert torch.equal(out[0, ..., 0], expected) and torch.equal(dest, torch.zeros(1, 4, 4, 3))


def test_image_scale_keeps_the_aspect_ratio_for_a_zero_side_and_crops_the_centre():
    image = torch.rand(2, 30, 60, 3)
    assert standins_image.ImageScale().upscale(image, "bilinear", 0, 15, "disabled")[0].shape == (2, 15, 30, 3)
    square = standins_image.ImageScale().upscale(image, "nearest-exact", 30, 30, "center")[0]
    assert torch.equal(square, image[:, :, 15:45])  # the centre 30 x 30, no resampling at scale 1
    assert standins_image.ImageScaleBy().upscale(image, "lanczos", 0.5)[0].shape == (2, 15, 30, 3)


def test_canny_finds_a_step_edge_and_nothing_on_a_flat_image():
    image = torch.zeros(1, 32, 32, 3)
    image[:, :, 16:] = 1.0
    edges = standins_image.Canny().detect_edge(image, 0.3, 0.7)[0]
    assert edges.shape == (1, 32, 32, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    columns = edges[0, ..., 0].sum(0)
    assert columns[15] == 32 and columns.sum() == 32  # one line, on the dark side of the step (as OpenCV)
    assert standins_image.Canny().detect_edge(torch.full((1, 16, 16, 3), 0.5), 0.3, 0.7)[0].sum() == 0
    with pytest.raises(ValueError, match="low_threshold 0.8 is above high_threshold 0.3"):
        standins_image.Canny().detect_edge(image, 0.8, 0.3)


def test_latent_batch_and_repeat_latent_batch():
    a = {"samples": torch.zeros(1, 16, 4, 4), "scw_stage": "c"}
    b = {"samples": torch.ones(2, 16, 8, 8)}
    batch = standins_mask.LatentBatch().batch(a, b)[0]
    assert batch["samples"].shape == (3, 16, 4, 4) and batch["batch_index"] == [0, 0, 1]
    assert batch["scw_stage"] == "c" and torch.equal(batch["samples"][1:], torch.ones(2, 16, 4, 4))
    rep = standins_mask.RepeatLatentBatch().repeat({"samples": torch.arange(2.0).view(2, 1, 1, 1),
                                                     "batch_index": [4, 5]}, 3)[0]
    assert rep["samples"].flatten().tolist() == [0, 1, 0, 1, 0, 1] and rep["batch_index"] == [4, 5, 6, 7, 8, 9]


def test_empty_image_solid_mask_and_image_mask_conversions():
    image = standins_image.EmptyImage().generate(3, 2, 2, 0xFF8000)[0]
    assert image.shape == (2, 2, 3, 3) and torch.allclose(image[0, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    assert torch.equal(standins_image.ImageInvert().invert(image)[0][..., 0], torch.zeros(2, 2, 3))
    mask = standins_mask.SolidMask().solid(0.5, 3, 2)[0]
    assert mask.shape == (1, 2, 3) and mask.eq(0.5).all()
    as_image = standins_mask.MaskToImage().mask_to_image(mask)[0]
    assert as_image.shape == (1, 2, 3, 3)
    assert torch.equal(standins_mask.ImageToMask().image_to_mask(as_image, "green")[0], mask)


def test_load_image_mask_reads_one_channel_and_inverts_alpha(tmp_path):
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, 51
    Image.fromarray(pixels, "RGBA").save(tmp_path / "m.png")
    cls = headless.node_classes(str(tmp_path))["LoadImageMask"]
    assert cls.INPUT_TYPES()["required"]["image"][0] == ["m.png"]
    assert torch.equal(cls().load_image("m.png", "red")[0], torch.ones(1, 2, 3))
    assert torch.allclose(cls().load_image("m.png", "alpha")[0], torch.full((1, 2, 3), 0.8))


# ---- a node type the runner lacks --------------------------------------------------------------------------------


def test_an_unknown_node_names_the_comfyui_flag_without_comfyui(tmp_path, caplog):
    wf = mixed_workflow()
    grow = next(n for n in wf["nodes"] if n["type"] == "GrowMask")
    grow["type"] = "KSamplerAdvanced"
    with pytest.raises(headless.WorkflowError, match=f"node {grow['id']}: unknown node type 'KSamplerAdvanced'; "
                                                     "without ComfyUI .* run with --comfyui PATH"):
        headless.to_api_prompt(wf, headless.node_classes(INPUTS))
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    assert cli.main([str(path), "--output-dir", str(tmp_path)]) == 2
    assert "unknown node type 'KSamplerAdvanced'" in caplog.text and "--comfyui PATH" in caplog.text
    assert "Traceback" not in caplog.text


def test_an_unknown_node_names_the_custom_nodes_folder_with_comfyui():
    from comfyui_stablecascade.standalone.comfy_runtime import NodeClasses, unknown_node_error

    classes = NodeClasses(headless.node_classes(INPUTS))
    classes.comfyui_root = "/opt/ComfyUI"
    error = unknown_node_error("5", "FancyNode", classes)
    assert str(error).startswith("node 5: unknown node type 'FancyNode'; the ComfyUI at /opt/ComfyUI has no such node")
    assert os.path.join("/opt/ComfyUI", "custom_nodes") in str(error)


def test_comfyui_flag_errors_are_one_line_with_the_fix(tmp_path, caplog):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(mixed_workflow()))
    assert cli.main([str(path), "--comfyui", str(tmp_path)]) == 2  # not a checkout
    assert f"--comfyui {tmp_path}: not a ComfyUI checkout (no nodes.py and comfy/ there)" in caplog.text
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "nodes.py").write_text("")
    caplog.clear()
    # A checkout, but this process loaded the pack on its built-in backend (as every test process does).
    assert cli.main([str(path), "--comfyui", str(fake)]) == 2
    assert "ComfyUI is not in use" in caplog.text and "run headless.py with ComfyUI's own Python" in caplog.text
    assert "Traceback" not in caplog.text
