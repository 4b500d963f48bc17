"""A user's first Run in a real ComfyUI server (opt-in, as tests/nodes/test_comfyui_integration.py: COMFYUI_PATH
and ComfyUI's python): only the loaders whose files are missing fail validation, each with the pack's own message
(ComfyUI's list check is the pack's VALIDATE_INPUTS); picking the demo choice runs, and the run says so in the
loader's outputs and in ``scw.notice`` events the web extension shows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import comfyui_harness as h
import pytest
from comfyui_harness import Layout, Server

pytestmark = pytest.mark.comfyui
DEMO = "(tiny random demo)"
MISSING = {"SCW_StageBLoader": ("stage_b_bf16.safetensors", "diffusion_models"),
           "SCW_PreviewerLoader": ("previewer.safetensors", "vae")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = h.comfy_root_or_skip()
    failed = h.import_problems(root)
    if failed:
        pytest.skip(f"ComfyUI's dependencies do not import with {sys.executable}: {sorted(failed)}")
    layout: Layout = h.make_layout(str(tmp_path_factory.mktemp("comfy_first_run")))
    for name, folder in MISSING.values():  # some files installed, some not
        os.remove(os.path.join(layout.models[folder], name))
    with h.start_server(layout, root) as srv:
        yield srv


def test_only_the_missing_files_fail_each_named_with_its_folder(server: Server) -> None:
    prompt = h.small_prompt(server.object_info)
    run = h.run_prompt(server, prompt)
    assert run.status == 400, run.body
    errors = run.body["node_errors"]
    failing = {prompt[i]["class_type"] for i in errors}
    assert failing == set(MISSING), errors
    for node_id, entry in errors.items():
        name, folder = MISSING[entry["class_type"]]
        (error,) = entry["errors"]
        assert error["type"] == "custom_validation_failed"
        assert f"'{name}' is not installed; it belongs in models/{folder}/" in error["details"], error
        assert "Stable Cascade Load" in error["details"] and DEMO in error["details"]
    # The lists the browser gets hold what is installed, then the demo entry.
    choices = server.object_info["SCW_StageBLoader"]["input"]["required"]["file_name"][0]
    assert choices == ["stage_c_bf16.safetensors", DEMO], choices


def test_the_demo_choice_runs_and_says_so(server: Server) -> None:
    prompt = h.small_prompt(server.object_info)
    for node_id in MISSING:
        prompt[h.node_id(prompt, node_id)]["inputs"]["file_name"] = DEMO
    run = h.run_ok(server, prompt)
    stage_b = h.node_id(prompt, "SCW_StageBLoader")
    said = [e for e in run.of_type("executed") if e["node"] == stage_b]
    assert said and "tiny random demo network" in said[0]["output"]["text"][0], run.events
    notices = run.of_type("scw.notice")
    assert any("TINY RANDOM Stage B" in n["text"] and n["node"] == stage_b for n in notices), notices
    history = h.get_json(f"{server.url}/history/{run.body['prompt_id']}")
    outputs = history[run.body["prompt_id"]]["outputs"]
    assert "tiny random demo network" in outputs[stage_b]["text"][0]
