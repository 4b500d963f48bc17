"""The shipped training workflows run headlessly one after the other on the tiny demo networks:
workflows/train_lora.json trains and saves a LoRA with the learned token [wurst] (previews through the Previewer on
the way), then workflows/train_lora_use.json draws with that very file through the LoRA loader.

The structure checks and the demo-LoRA run of both files are in test_workflows.py (every shipped workflow); this
test checks what only the pair shows: the file the first writes is the one the second reads.
"""

import copy
import json
import logging
import os
import shutil

import pytest
from PIL import Image
from safetensors import safe_open

from comfyui_stablecascade import host
from comfyui_stablecascade.standalone import executor as headless

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")


def _load(name):
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        return json.load(f)


def _set(wf, node_type, **values):
    """Set widget values of the node of ``node_type`` by widget name (the runner's own slot order)."""
    node = next(n for n in wf["nodes"] if n["type"] == node_type)
    slots = headless.widget_slots(headless.node_classes()[node_type])
    for name, value in values.items():
        node["widgets_values"][slots.index(name)] = value
    return node


@pytest.fixture
def place(tmp_path):
    shutil.copytree(os.path.join(WORKFLOWS, "inputs"), tmp_path / "input")  # the dataset's cache stays out of the repo
    (tmp_path / "models" / "loras").mkdir(parents=True)
    yield tmp_path
    host.set_models_dir(None)
    host.set_io_dirs(None, None)
    host.set_progress_hook(None)


def test_train_then_use_the_trained_lora_headlessly(place, caplog):
    train = copy.deepcopy(_load("train_lora.json"))
    trainer = _set(train, "SCW_TrainLora", steps=2, preview_every=1)
    tokens = trainer["widgets_values"][headless.widget_slots(headless.node_classes()["SCW_TrainLora"]).index("tokens")]
    saver = next(n for n in train["nodes"] if n["type"] == "SCW_SaveLora")
    file_name = saver["widgets_values"][0]
    updates = []
    host.set_progress_hook(lambda value, total, preview: updates.append((value, total, preview)))
    with caplog.at_level(logging.INFO):
        paths = headless.run_workflow(train, out=str(place / "loss.png"), models=str(place / "models"),
                                      input_dir=str(place / "input"), output_dir=str(place / "output"))
    assert paths == [str(place / "loss.png")] and Image.open(paths[0]).size == (512, 256)
    lora = place / "models" / "loras" / f"{file_name}.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        assert f.metadata()["scw_tokens"] == tokens and f.metadata()["scw_steps"] == "2"
    assert (place / "output" / "scw_training" / f"{file_name}.state.safetensors").is_file()
    # The trainer's progress reached 2 of 2 with a preview image at each step (preview_every=1).
    steps = [(v, t, p) for v, t, p in updates if t == 2]
    assert [v for v, _, _ in steps][-2:] == [1, 2] and all(p is not None for _, _, p in steps[-2:])
    assert "step 2/2  loss" in caplog.text

    use = copy.deepcopy(_load("train_lora_use.json"))
    loader = _set(use, "SCW_LoraLoader")
    assert loader["widgets_values"][0] == f"{file_name}.safetensors" and loader["widgets_values"][3] == tokens
    _set(use, "SCW_EmptyLatent", width=256, height=256)
    _set(use, "SCW_StageCSampler", steps=2)
    _set(use, "SCW_StageBSampler", steps=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        paths = headless.run_workflow(use, out=str(place / "wurst.png"), models=str(place / "models"),
                                      input_dir=str(place / "input"), output_dir=str(place / "output"))
    assert paths == [str(place / "wurst.png")] and Image.open(paths[0]).mode == "RGB"
    assert "TINY RANDOM LoRA" not in caplog.text  # the trained file was read, not the demo LoRA
