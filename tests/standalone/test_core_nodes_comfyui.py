"""The core stand-ins against ComfyUI itself (run with ComfyUI's Python and COMFYUI_PATH set, e.g.
``COMFYUI_PATH=~/comfyui-ref/ComfyUI ~/comfyui-ref/venv/bin/python -m pytest tests/standalone/test_core_nodes*.py``;
skipped with the reason otherwise): every stand-in has core's inputs and widgets and gives core's values on the same
inputs, and the workflow of test_core_nodes.py, run headlessly through the checkout (``--comfyui``: core's own nodes
and executor, the pack on ComfyUI's backend), writes the same images as the stand-in run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfyui_harness import comfy_root_or_skip, import_comfy_or_skip, import_problems
from PIL import Image
from test_core_nodes import INPUTS, PREFIXES, ROOT, check_mixed_outputs, mixed_workflow, read_outputs

from comfyui_stablecascade import host
from comfyui_stablecascade.standalone import executor as headless

# utils.extra_config first, as ComfyUI's main.py: importing nodes puts comfy/ (with its utils.py) first on the path.
CORE_MODULES = ("utils.extra_config", "nodes", "comfy_extras.nodes_mask", "comfy_extras.nodes_canny",
                "comfy_extras.nodes_latent")
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def core() -> dict[str, type]:
    """Core node type -> core's class, for the types the runner stands in for."""
    mods = import_comfy_or_skip("comparing the core stand-ins with core's nodes", *CORE_MODULES)
    found = {}
    for name in headless.CORE_NODES:
        for module in ("nodes", "comfy_extras.nodes_mask", "comfy_extras.nodes_canny", "comfy_extras.nodes_latent"):
            if hasattr(mods[module], name):
                found[name] = getattr(mods[module], name)
                break
    assert set(found) == set(headless.CORE_NODES), set(headless.CORE_NODES) - set(found)
    return found


def run_core(cls: type, **kwargs) -> tuple:
    if hasattr(cls, "define_schema"):  # a V3 node: a classmethod ``execute`` returning a NodeOutput
        return tuple(cls.execute(**kwargs).result)
    return tuple(getattr(cls(), cls.FUNCTION)(**kwargs))


def run_standin(name: str, **kwargs) -> tuple:
    cls = headless.node_classes(INPUTS)[name]
    return tuple(getattr(cls(), cls.FUNCTION)(**kwargs))


def _spec(spec) -> tuple:
    kind = spec[0] if isinstance(spec, (list, tuple)) else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
    return (kind if not isinstance(kind, (list, tuple)) else list(kind),
            {k: options[k] for k in ("default", "min", "max", "step", "image_upload") if k in options})


@pytest.mark.parametrize("name", sorted(headless.CORE_NODES))
def test_each_stand_in_has_cores_inputs_widgets_and_outputs(name, core):
    ours, theirs = headless.node_classes(INPUTS)[name], core[name]
    assert headless.widget_slots(ours) == headless.widget_slots(theirs)
    mine, core_types = ours.INPUT_TYPES(), theirs.INPUT_TYPES()
    for section in ("required", "optional"):
        a, b = mine.get(section, {}), core_types.get(section, {})
        assert list(a) == list(b), section
        for key in a:
            if key != "image":  # LoadImage's file list is the input folder's, not core's
                assert _spec(a[key]) == _spec(b[key]), (section, key)
    assert tuple(ours.RETURN_TYPES) == tuple(theirs.RETURN_TYPES)
    assert bool(getattr(ours, "OUTPUT_NODE", False)) == bool(getattr(theirs, "OUTPUT_NODE", False))


def _cases() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 96, 80, 3, generator=g)
    mask = (torch.rand(1, 96, 80, generator=g) > 0.97).float() * torch.rand(1, 96, 80, generator=g)
    small = torch.rand(1, 20, 15, generator=g)
    source = torch.rand(1, 40, 30, 3, generator=g)
    # Canny: a smooth random picture with a bright block, large enough for kornia's accumulate-in-order blur.
    photo = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 24, generator=g), size=(384, 384),
                                            mode="bicubic").clamp(0, 1)
    photo[:, :, 120:190, 100:200] = 0.9
    photo = photo.movedim(1, -1).contiguous()
    cases = [("ImageScale", dict(image=image, upscale_method=m, width=120, height=50, crop=c))
             for m in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos") for c in ("disabled", "center")]
    cases += [("ImageScale", dict(image=image, upscale_method="bicubic", width=0, height=50, crop="disabled")),
              ("ImageScaleBy", dict(image=image, upscale_method="lanczos", scale_by=1.37)),
              ("ImageScaleBy", dict(image=image, upscale_method="area", scale_by=0.4)),
              ("ImageInvert", dict(image=image)),
              ("EmptyImage", dict(width=33, height=17, batch_size=2, color=0x12AB7F)),
              ("InvertMask", dict(mask=mask)),
              ("SolidMask", dict(value=0.3, width=20, height=10)),
              ("ThresholdMask", dict(mask=mask, value=0.2)),
              ("MaskToImage", dict(mask=mask)),
              ("ImageToMask", dict(image=image, channel="blue"))]
    cases += [("GrowMask", dict(mask=mask, expand=e, tapered_corners=t)) for e in (3, -2, 0) for t in (True, False)]
    cases += [("MaskComposite", dict(destination=mask, source=small, x=70, y=85, operation=op))
              for op in ("multiply", "add", "subtract", "and", "or", "xor")]
    cases += [("ImageCompositeMasked", dict(destination=image, source=source, x=x, y=y, resize_source=r, mask=m))
              for x, y, r, m in ((10, 7, False, small), (70, 90, False, small), (0, 0, True, None),
                                 (5, 5, False, None))]
    cases += [("Canny", dict(image=photo, low_threshold=lo, high_threshold=hi))
              for lo, hi in ((0.3, 0.7), (0.1, 0.2), (0.4, 0.8))]
    cases += [("Canny", dict(image=image, low_threshold=0.3, high_threshold=0.7))]  # small: kornia convolves
    return cases


CASES = _cases()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_each_stand_in_equals_core_on_the_same_inputs(index, core):
    name, kwargs = CASES[index]
    theirs, ours = run_core(core[name], **kwargs), run_standin(name, **kwargs)
    assert len(theirs) == len(ours) == 1
    assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype
    assert torch.equal(ours[0], theirs[0]), (ours[0] - theirs[0]).abs().max()
    if name == "Canny" and kwargs["image"].shape[1] > 100:
        assert theirs[0].any()  # the comparison is about edges, not two empty images


def test_latent_batch_nodes_equal_core(core):
    g = torch.Generator().manual_seed(1)
    a = {"samples": torch.rand(2, 16, 12, 12, generator=g)}
    b = {"samples": torch.rand(1, 16, 10, 14, generator=g), "batch_index": [5]}
    theirs, ours = run_core(core["LatentBatch"], samples1=a, samples2=b)[0], run_standin("LatentBatch", samples1=a,
                                                                                         samples2=b)[0]
    assert torch.equal(ours["samples"], theirs["samples"]) and ours["batch_index"] == theirs["batch_index"]
    c = {"samples": torch.rand(2, 4, 8, 8, generator=g), "batch_index": [3, 4],
         "noise_mask": torch.rand(2, 1, 8, 8, generator=g)}
    theirs, ours = run_core(core["RepeatLatentBatch"], samples=c, amount=3)[0], run_standin("RepeatLatentBatch",
                                                                                            samples=c, amount=3)[0]
    assert torch.equal(ours["samples"], theirs["samples"]) and torch.equal(ours["noise_mask"], theirs["noise_mask"])
    assert ours["batch_index"] == theirs["batch_index"]


def test_load_image_and_load_image_mask_equal_core(core, tmp_path):
    import folder_paths

    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(INPUTS)
    try:
        name = sorted(f for f in os.listdir(INPUTS) if f.endswith(".png"))[0]
        for ours, theirs in zip(run_standin("LoadImage", image=name), run_core(core["LoadImage"], image=name)):
            assert torch.equal(ours, theirs)
        for channel in ("alpha", "red"):
            ours = run_standin("LoadImageMask", image=name, channel=channel)[0]
            assert torch.equal(ours, run_core(core["LoadImageMask"], image=name, channel=channel)[0])
    finally:
        folder_paths.set_input_directory(previous)


def test_the_mixed_workflow_runs_through_comfyui_with_the_same_images(tmp_path, tmp_models):
    root = comfy_root_or_skip()
    missing = import_problems(root)
    if missing:
        pytest.skip(f"ComfyUI's dependencies do not import with {sys.executable}: {missing}")

    wf = mixed_workflow()
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(wf))
    through_comfy = tmp_path / "comfy"
    outs = [through_comfy / "mixed.png"] + [through_comfy / f"mixed_{i:05}.png" for i in (1, 2, 3)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    env.pop("SCW_NO_COMFY", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "headless.py"), str(path), "--comfyui", root,
                           "--models", str(tmp_models), "--out", str(outs[0]), "--input-dir", INPUTS,
                           "--seed", "7"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"running on the ComfyUI at {os.path.abspath(root)}" in proc.stderr, proc.stderr[-3000:]
    # --out: the images in the order of their SaveImage node ids (the order of PREFIXES), nothing else written.
    assert sorted(os.listdir(through_comfy)) == sorted(p.name for p in outs) and not (tmp_path / "output").exists()
    comfy_images = {prefix: np.asarray(Image.open(p).convert("RGB")) for prefix, p in zip(PREFIXES, outs)}
    check_mixed_outputs(comfy_images)

    standins = tmp_path / "standins"
    host.set_models_dir(str(tmp_models))
    try:
        headless.run_workflow(wf, output_dir=str(standins), seed=7, input_dir=INPUTS)
    finally:
        host.set_models_dir(None)
    for prefix, image in read_outputs(str(standins)).items():
        assert (image == comfy_images[prefix]).all(), prefix
    assert set(comfy_images) == set(PREFIXES)
