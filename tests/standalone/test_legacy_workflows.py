"""Workflows saved before inputs took core's meaning still load and run headlessly with the same result.

The canny workflow as it was saved before (thresholds 100 / 200 in OpenCV integers, no method widget), and as an
API prompt with ApplyControlNet's old input names (start / end), give the same PNG pixels as the shipped one.
"""

import copy
import json
import os

import pytest
from PIL import Image

from comfyui_stablecascade import host
from comfyui_stablecascade.standalone import executor as headless
from comfyui_stablecascade.standalone.migrate import migrate_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
INPUTS = os.path.join(WORKFLOWS, "inputs")


@pytest.fixture
def empty_models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def _canny_workflow():
    with open(os.path.join(WORKFLOWS, "controlnet_canny.json"), encoding="utf-8") as f:
        wf = json.load(f)
    for node in wf["nodes"]:  # small and short: the wiring and the values are under test, not the pixels
        if node["type"] == "SCW_EmptyLatent":
            node["widgets_values"][:2] = [256, 256]
        if node["type"] in ("SCW_StageCSampler", "SCW_StageBSampler"):
            node["widgets_values"][2] = 1
    return wf


def _old_format(wf):
    """As saved before core's units: OpenCV thresholds, three canny widgets, no Note."""
    old = copy.deepcopy(wf)
    old["nodes"] = [n for n in old["nodes"] if n["type"] != "MarkdownNote"]
    canny = next(n for n in old["nodes"] if n["type"] == "SCW_CannyControl")
    assert canny["widgets_values"] == [0.392, 0.784, 224, "official"]  # what the shipped file holds today
    canny["widgets_values"] = [100, 200, 224]
    return old


def _pixels(path):
    return Image.open(path).convert("RGB").tobytes()


def test_old_ui_workflow_and_old_api_prompt_run_to_the_same_image(empty_models, tmp_path):
    wf = _canny_workflow()
    shipped = headless.run_workflow(wf, out=str(tmp_path / "new.png"), seed=3, input_dir=INPUTS)
    old_ui = headless.run_workflow(_old_format(wf), out=str(tmp_path / "old_ui.png"), seed=3, input_dir=INPUTS)
    prompt = headless.to_api_prompt(_old_format(wf), headless.node_classes(INPUTS))
    apply = next(e for e in prompt.values() if e["class_type"] == "SCW_ApplyControlNet")["inputs"]
    apply["start"], apply["end"] = apply.pop("start_percent"), apply.pop("end_percent")  # the old names
    canny = next(e for e in prompt.values() if e["class_type"] == "SCW_CannyControl")["inputs"]
    assert (canny["low_threshold"], canny["high_threshold"]) == (100, 200)
    del canny["method"]  # an old prompt has no method input
    old_api = headless.run_workflow(prompt, out=str(tmp_path / "old_api.png"), seed=3, input_dir=INPUTS)
    assert _pixels(shipped[0]) == _pixels(old_ui[0]) == _pixels(old_api[0])


def test_migrate_prompt_renames_and_converts_only_what_is_old():
    prompt = {
        "1": {"class_type": "SCW_ApplyControlNet", "inputs": {"strength": 1.0, "start": 0.2, "end": 0.8}},
        "2": {"class_type": "SCW_CannyControl", "inputs": {"low_threshold": 100, "high_threshold": 200, "resize": 0}},
        "3": {"class_type": "SCW_CannyControl", "inputs": {"low_threshold": 0.3, "high_threshold": 0.7}},
        "4": {"class_type": "SCW_ApplyControlNet", "inputs": {"start_percent": 0.1, "end_percent": 0.9}},
    }
    changes = migrate_prompt(prompt)
    assert prompt["1"]["inputs"] == {"strength": 1.0, "start_percent": 0.2, "end_percent": 0.8}
    assert prompt["2"]["inputs"] == {"low_threshold": 100 / 255, "high_threshold": 200 / 255, "resize": 0,
                                     "method": "official"}
    assert prompt["3"]["inputs"] == {"low_threshold": 0.3, "high_threshold": 0.7}
    assert prompt["4"]["inputs"] == {"start_percent": 0.1, "end_percent": 0.9}
    assert len(changes) == 3 and migrate_prompt(prompt) == []  # a second pass finds nothing old
