"""example_workflows/ (what ComfyUI's Templates browser lists for the pack) cannot drift from workflows/.

Each shipped workflow has a template: a byte copy under a name that says what it does and cannot collide with
core's templates, with a .jpg thumbnail beside it (scripts/make_workflows.py writes both); nothing else is there.
The shipped workflows have a Note saying what to do and where the files go.
"""

import importlib.util
import os

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
TEMPLATES_DIR = os.path.join(ROOT, "example_workflows")


def _script():
    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(ROOT, "scripts", "make_workflows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
SHIPPED = sorted(f for f in os.listdir(WORKFLOWS) if f.endswith(".json"))


def test_every_workflow_has_a_template_and_every_template_a_workflow():
    assert set(SHIPPED) <= set(SCRIPT.TEMPLATES), "add the new workflow to TEMPLATES in scripts/make_workflows.py"
    expected = {SCRIPT.TEMPLATES[f] + ".json" for f in SHIPPED}
    assert {f for f in os.listdir(TEMPLATES_DIR) if f.endswith(".json")} == expected
    assert {f for f in os.listdir(TEMPLATES_DIR) if not f.endswith(".json")} == {
        os.path.splitext(f)[0] + ".jpg" for f in expected}


@pytest.mark.parametrize("name", SHIPPED)
def test_template_is_a_byte_copy_with_a_thumbnail(name):
    template = SCRIPT.TEMPLATES[name]
    # ComfyUI's own templates are short names (text_to_image, lora...): the prefix keeps the pack's apart.
    assert template.startswith("stable_cascade_") and template.replace("_", "").isalnum()
    with open(os.path.join(WORKFLOWS, name), "rb") as a, open(os.path.join(TEMPLATES_DIR, template + ".json"),
                                                              "rb") as b:
        assert a.read() == b.read(), f"run python scripts/make_workflows.py: {template}.json differs from {name}"
    thumb = Image.open(os.path.join(TEMPLATES_DIR, template + ".jpg"))
    assert thumb.format == "JPEG" and thumb.size == SCRIPT.THUMB_SIZE


@pytest.mark.parametrize("name", [n for n in SHIPPED if n in SCRIPT.SPECS])
def test_note_says_what_to_do_and_where_the_files_go(name):
    import json

    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        wf = json.load(f)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    text = notes[0]
    assert "Run" in text and "`diffusion_models/`" in text and "(tiny random demo)" in text
    if any(n["type"] == "LoadImage" for n in wf["nodes"]):
        assert "input/" in text
    if name == "controlnet_inpaint.json":
        assert "Paint the mask" in text and "MaskEditor" in text
