"""The first hour of a user: missing model files explain themselves, the demo network is an explicit choice and
says so in the run's outputs, warnings reach the browser, and every node is found under "Stable Cascade".

(The same in a real ComfyUI server: tests/nodes/test_comfyui_first_run.py; in the real frontend:
scripts/browser_check.py.)
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import types

import pytest
import tiny_checkpoints as tc

from comfyui_stablecascade import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from comfyui_stablecascade.host import comfyui as comfy_backend
from comfyui_stablecascade.nodes import kinds as node_kinds
from comfyui_stablecascade.nodes.common import DEMO_CHOICE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every node that reads a model file: (node id, kind of its file); the kinds' folders come from nodes/kinds.py.
FILE_LOADERS = {"SCW_StageCLoader": "stage_c", "SCW_StageBLoader": "stage_b", "SCW_StageALoader": "stage_a",
                "SCW_EffNetLoader": "effnet", "SCW_PreviewerLoader": "previewer",
                "SCW_TextEncoderLoader": "text_encoder", "SCW_ClipVisionLoader": "clip_vision",
                "SCW_ControlNetLoader": "controlnet", "SCW_PackagedCheckpointLoader": "packaged",
                "SCW_LoraLoader": "lora", "SCW_LoraLoaderModelOnly": "lora"}


@pytest.fixture
def models(tmp_models):
    (tmp_models / "clip_vision").mkdir()
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def test_every_file_input_belongs_to_a_validating_loader():
    with_files = {i for i, c in NODE_CLASS_MAPPINGS.items()
                  if "file_name" in c.INPUT_TYPES().get("required", {}) and getattr(c, "FOLDERS", None)}
    assert with_files == set(FILE_LOADERS)
    for node_id in FILE_LOADERS:
        assert callable(getattr(NODE_CLASS_MAPPINGS[node_id], "VALIDATE_INPUTS", None)), node_id


@pytest.mark.parametrize("node_id", sorted(FILE_LOADERS))
def test_a_missing_file_says_what_it_is_and_where_it_goes(models, node_id):
    cls, kind = NODE_CLASS_MAPPINGS[node_id], FILE_LOADERS[node_id]
    folder = node_kinds.NODE_KINDS[kind].folders[0]
    message = cls.VALIDATE_INPUTS(file_name="wanted.safetensors")
    assert isinstance(message, str)
    assert message.startswith(f"{NODE_DISPLAY_NAME_MAPPINGS[node_id].split(' (model only)')[0]}: 'wanted.safetensors'")
    assert f"it belongs in models/{folder}/" in message and repr(DEMO_CHOICE) in message
    assert "huggingface.co/stabilityai" in message or kind == "lora"
    assert not re.search(r"\bSCW_[A-Z]", message), message  # display names, never node ids
    # The demo is always offered last; a linked (None) or demo value passes.
    assert cls.INPUT_TYPES()["required"]["file_name"][0][-1] == DEMO_CHOICE
    assert cls.VALIDATE_INPUTS(file_name=DEMO_CHOICE) is True and cls.VALIDATE_INPUTS(file_name=None) is True


def test_installed_files_pass_and_missing_ones_each_name_their_own_folder(models):
    tc.save(models / "vae" / "stage_a.safetensors", tc.tiny_sd("stage_a"))
    (models / "vae" / "old_effnet.ckpt").write_bytes(b"x")
    loaders = NODE_CLASS_MAPPINGS
    assert loaders["SCW_StageALoader"].VALIDATE_INPUTS(file_name="stage_a.safetensors") is True
    effnet = loaders["SCW_EffNetLoader"].VALIDATE_INPUTS(file_name="effnet_encoder.safetensors")
    stage_c = loaders["SCW_StageCLoader"].VALIDATE_INPUTS(file_name="stage_c_bf16.safetensors")
    assert "models/vae/" in effnet and "effnet_encoder.safetensors (81 MB)" in effnet
    assert "a file that is there (stage_a.safetensors)" in effnet  # what the folder holds instead
    assert "old_effnet.ckpt (a PyTorch pickle" in effnet  # and why a pickle there is not offered
    assert "models/diffusion_models/ or models/unet/" in stage_c and "stage_c_lite_bf16.safetensors (2.1 GB" in stage_c
    choices = loaders["SCW_StageALoader"].INPUT_TYPES()["required"]["file_name"][0]
    assert choices == ["stage_a.safetensors", DEMO_CHOICE]


def test_the_demo_choice_says_so_in_the_outputs(models):
    result = NODE_CLASS_MAPPINGS["SCW_StageALoader"]().load(DEMO_CHOICE)
    (text,) = result["ui"]["text"]
    assert text.startswith("Stable Cascade Load Stage A: the tiny random demo network runs, so the images are noise")
    assert "stage_a.safetensors into models/vae/" in text
    assert result["result"][0].kind == "stage_a"
    tc.save(models / "vae" / "stage_a.safetensors", tc.tiny_sd("stage_a"))
    assert isinstance(NODE_CLASS_MAPPINGS["SCW_StageALoader"]().load("stage_a.safetensors"), tuple)  # a real file


def test_every_node_is_found_under_stable_cascade():
    for node_id, name in NODE_DISPLAY_NAME_MAPPINGS.items():
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert name.startswith("Stable Cascade ") and "stable cascade" in name.lower(), name
        assert cls.CATEGORY.split("/")[0] == "Stable Cascade", (node_id, cls.CATEGORY)
        assert cls.NAME == name


def _user_strings(path: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals of a module that users may read: everything but docstrings, comments
    and the node-id / socket-type declarations."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant):
            docs.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append((node.lineno, node.value))
    return out


def test_messages_and_descriptions_name_nodes_by_display_name():
    """Tooltips, descriptions, errors and warnings of the layers a user's messages come from never cite a node id
    (the ids only mark the node-id declarations themselves), and every 'Stable Cascade ...' they quote is a node."""
    ids = set(NODE_CLASS_MAPPINGS)
    names = set(NODE_DISPLAY_NAME_MAPPINGS.values())
    bad, unknown = [], []
    for layer in ("nodes", "pipeline", "model_patches"):
        for name in sorted(os.listdir(os.path.join(ROOT, layer))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(ROOT, layer, name)
            for line, text in _user_strings(path):
                if text in ids:
                    continue  # NODE_ID = "SCW_..." and the node-id tables
                bad += [f"{layer}/{name}:{line}: {m}" for m in re.findall(r"\bSCW_[A-Za-z]+[a-z][A-Za-z]*", text)
                        if m in ids]
                unknown += [f"{layer}/{name}:{line}: {q}" for q in re.findall(r"'(Stable Cascade [^']+)'", text)
                            if q not in names]
    assert not bad, bad
    assert not unknown, unknown


class _FakeServer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, object]] = []
        self.last_node_id, self.client_id = "7", "browser-1"

    def send_sync(self, event: str, data: dict, sid: object = None) -> None:
        self.sent.append((event, data, sid))


def _server_module(instance: object) -> types.SimpleNamespace:
    """A stand-in for ComfyUI's ``server`` module with ``PromptServer.instance``."""
    return types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))


def test_warnings_go_to_the_browser_with_the_running_node(monkeypatch):
    fake = _FakeServer()
    monkeypatch.setitem(sys.modules, "server", _server_module(fake))
    handler = comfy_backend.BrowserNotices()
    logger = logging.getLogger("comfyui_stablecascade.pipeline.latents")
    logger.addHandler(handler)
    try:
        logger.warning("ComfyUI-StableCascade: width %d is not a multiple of 8; using %d", 1001, 1000)
        logger.info("ComfyUI-StableCascade: an info line stays in the log only")
    finally:
        logger.removeHandler(handler)
    assert fake.sent == [(comfy_backend.NOTICE_EVENT, {"text": "width 1001 is not a multiple of 8; using 1000",
                                                       "level": "warning", "node": "7"}, "browser-1")]
    # Outside a ComfyUI server (no server module, or no instance yet) a notice is dropped, never an error.
    monkeypatch.setitem(sys.modules, "server", _server_module(None))
    handler.emit(logging.LogRecord("x", logging.WARNING, __file__, 1, "text", None, None))


def test_the_web_extension_ships_with_the_pack():
    pack = sys.modules["comfyui_stablecascade"]
    web = os.path.join(ROOT, pack.WEB_DIRECTORY)
    with open(os.path.join(web, "scw_results.js"), encoding="utf-8") as f:
        source = f.read()
    assert comfy_backend.NOTICE_EVENT in source and "onExecuted" in source and "registerExtension" in source
    assert "serialize: false" in source  # the report box never enters saved workflows or prompts
    assert not re.search(r"\beval\s*\(|new Function", source)
