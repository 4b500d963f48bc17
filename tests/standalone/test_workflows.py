"""Every shipped workflow (workflows/*.json): node types exist, links join matching types, widget values fit
the nodes' schemas, and the workflow runs headlessly on the tiny demo networks, writing a PNG that embeds
it. Plus the runner's parsing rules (seed control values, Reroute, bypass, API format, CLI)."""

import copy
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_stablecascade import NODE_CLASS_MAPPINGS, host
from comfyui_stablecascade.pipeline import STAGE_C
from comfyui_stablecascade.standalone import cli
from comfyui_stablecascade.standalone import executor as headless

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/standalone/ -> repo
WORKFLOW_DIR = os.path.join(ROOT, "workflows")
WORKFLOWS = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
# Core nodes the shipped workflows may use; the runner has a stand-in for each.
KNOWN_CORE = set(headless.CORE_NODES)
FRONTEND_ONLY = set(headless.FRONTEND_ONLY)  # Notes: drawn by the frontend, never run
# Sizes small enough for the end-to-end run on 2 CPU cores; the wiring, not the pixels, is under test.
FAST_SIZE = 256
FAST_STEPS = 2


def _load(name):
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def _classes():
    return headless.node_classes(os.path.join(WORKFLOW_DIR, "inputs"))


@pytest.fixture
def empty_models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def test_there_are_workflows():
    assert "text_to_image.json" in WORKFLOWS


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_format(name):
    wf = _load(name)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, key
    assert wf["version"] == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= wf["last_node_id"]
    assert max(link[0] for link in wf["links"]) <= wf["last_link_id"]
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            assert key in node, (node["id"], key)
        assert node["properties"]["Node name for S&R"] == node["type"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_node_types_exist(name):
    for node in _load(name)["nodes"]:
        assert node["type"] in NODE_CLASS_MAPPINGS or node["type"] in KNOWN_CORE | FRONTEND_ONLY, node["type"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_links_connect_matching_types(name):
    wf = _load(name)
    classes = _classes()
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == link_type, (link_id, out, inp)
        assert link_id in (out["links"] or []) and inp["link"] == link_id
        src_cls, dst_cls = classes[nodes[src]["type"]], classes[nodes[dst]["type"]]
        assert src_cls.RETURN_TYPES[src_slot] == link_type
        assert headless.input_specs(dst_cls)[inp["name"]][0] == link_type
    for node in (n for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY):
        cls = classes[node["type"]]
        assert [o["type"] for o in node.get("outputs", [])] == list(cls.RETURN_TYPES)
        specs = headless.input_specs(cls)
        required = cls.INPUT_TYPES().get("required", {})
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        for input_name, spec in specs.items():
            if not headless.is_widget(spec) and input_name in required:
                assert sockets.get(input_name, {}).get("link") is not None, (node["id"], input_name)


def _widget_ok(spec, value, file_name_combo):
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        return file_name_combo or value in kind
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool) and options["min"] <= value <= options["max"]
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and options["min"] <= value <= options["max"]
    if kind == "STRING":
        return isinstance(value, str)
    return kind == "BOOLEAN" and isinstance(value, bool)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_widget_values_match_inputs(name):
    classes = _classes()
    for node in (n for n in _load(name)["nodes"] if n["type"] not in FRONTEND_ONLY):
        cls = classes[node["type"]]
        specs = headless.input_specs(cls)
        slots = headless.widget_slots(cls)
        values = node["widgets_values"]
        assert len(values) == len(slots), (node["type"], values, slots)
        for slot, value in zip(slots, values):
            if slot == headless.CONTROL_WIDGET:
                assert value in ("fixed", "increment", "decrement", "randomize")
                continue
            if slot == headless.UPLOAD_WIDGET:
                assert value == "image"
                continue
            file_name_combo = (slot == "file_name" and hasattr(cls, "FOLDERS")) or headless.has_upload_widget(
                specs[slot])
            assert _widget_ok(specs[slot], value, file_name_combo), (node["type"], slot, value)


def _fast(wf):
    """The workflow with every width/height widget at FAST_SIZE and every steps widget at FAST_STEPS (the
    only changes), so each file runs in seconds on 2 cores."""
    wf = copy.deepcopy(wf)
    classes = _classes()
    for node in wf["nodes"]:
        slots = headless.widget_slots(classes[node["type"]]) if node["type"] in classes else []
        for index, slot in enumerate(slots):
            if slot in ("width", "height"):
                node["widgets_values"][index] = FAST_SIZE
            elif slot.endswith("steps"):
                node["widgets_values"][index] = FAST_STEPS
    return wf


@pytest.mark.parametrize("name", WORKFLOWS)
def test_runs_end_to_end_on_demo_networks(name, empty_models, tmp_path, caplog):
    wf = _fast(_load(name))
    out = tmp_path / "out.png"
    with caplog.at_level("WARNING"):
        paths = headless.run_workflow(wf, out=str(out), seed=7, input_dir=os.path.join(WORKFLOW_DIR, "inputs"))
    assert paths and paths[0] == str(out)
    assert "image is NOISE" in caplog.text
    for path in paths:
        image = Image.open(path)
        assert image.mode == "RGB"
        embedded = json.loads(image.text["workflow"])
        prompt = json.loads(image.text["prompt"])
        assert [n["type"] for n in embedded["nodes"]] == [n["type"] for n in wf["nodes"]]
        assert embedded["links"] == wf["links"]
        assert {e["class_type"] for e in prompt.values()} == {n["type"] for n in wf["nodes"]} - FRONTEND_ONLY
    seeds = [e["inputs"]["seed"] for e in prompt.values() if "seed" in e["inputs"]]
    assert seeds and set(seeds) == {7}
    classes = _classes()
    for node in (n for n in embedded["nodes"] if n["type"] not in FRONTEND_ONLY):  # carries the seed that ran
        for slot, value in zip(headless.widget_slots(classes[node["type"]]), node["widgets_values"]):
            assert slot != "seed" or value == 7


def test_text_to_image_size_determinism_and_png_round_trip(empty_models, tmp_path):
    wf = _fast(_load("text_to_image.json"))
    first = headless.run_workflow(wf, out=str(tmp_path / "a.png"))
    a = Image.open(first[0])
    assert a.size == (FAST_SIZE, FAST_SIZE)
    # The workflow embedded in the PNG runs again to the same image (what dragging it back into ComfyUI does).
    second = headless.run_workflow(json.loads(a.text["workflow"]), out=str(tmp_path / "b.png"))
    assert Image.open(second[0]).tobytes() == a.tobytes()
    third = headless.run_workflow(wf, out=str(tmp_path / "c.png"), seed=123)
    assert Image.open(third[0]).tobytes() != a.tobytes()


# ---- the runner's parsing rules ------------------------------------------------------------------------


def test_seed_widgets_carry_a_control_value():
    slots = headless.widget_slots(NODE_CLASS_MAPPINGS["SCW_StageCSampler"])
    assert slots[:2] == ["seed", headless.CONTROL_WIDGET]
    assert slots[2:] == ["steps", "cfg", "shift", "sampler", "rescale", "denoise", "scheduler"]
    image_to_image = headless.widget_slots(NODE_CLASS_MAPPINGS["SCW_StageCImageToImage"])
    assert image_to_image[-2:] == ["noising", "scheduler"]  # the new widget comes after every older one


def test_api_prompt_maps_widgets_and_links():
    wf = _load("text_to_image.json")
    prompt = headless.to_api_prompt(wf, _classes())
    sampler = next(e for e in prompt.values() if e["class_type"] == "SCW_StageCSampler")
    # text_to_image.json ships the official Stage C settings.
    assert sampler["inputs"]["steps"] == STAGE_C.steps and sampler["inputs"]["cfg"] == STAGE_C.cfg
    assert headless.CONTROL_WIDGET not in sampler["inputs"]
    src, slot = sampler["inputs"]["latent"]
    assert prompt[src]["class_type"] == "SCW_EmptyLatent" and slot == 0
    src, slot = sampler["inputs"]["previewer"]
    assert prompt[src]["class_type"] == "SCW_PreviewerLoader" and slot == 0
    # An optional input left unconnected is left out of the API prompt, as ComfyUI's frontend does.
    other = headless.to_api_prompt(_load("lora.json"), _classes())
    lora_sampler = next(e for e in other.values() if e["class_type"] == "SCW_StageCSampler")
    assert "previewer" not in lora_sampler["inputs"]


def test_reroute_and_bypass_are_followed():
    wf = _load("text_to_image.json")
    classes = _classes()
    base = headless.to_api_prompt(wf, classes)
    # Put a Reroute on the link into Stage A decode's latent input.
    rerouted = copy.deepcopy(wf)
    decode = next(n for n in rerouted["nodes"] if n["type"] == "SCW_StageADecode")
    old = next(i for i in decode["inputs"] if i["name"] == "latent")
    link = next(lk for lk in rerouted["links"] if lk[0] == old["link"])
    new_id = rerouted["last_link_id"] + 1
    rerouted["nodes"].append({"id": 99, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*",
                              "link": link[0]}], "outputs": [{"name": "", "type": "LATENT", "links": [new_id]}]})
    rerouted["links"].append([new_id, 99, 0, link[3], link[4], "LATENT"])
    link[3], link[4] = 99, 0
    old["link"] = new_id
    assert headless.to_api_prompt(rerouted, classes) == base
    # Bypassing the Stage B sampler feeds its LATENT input (stage_c) straight to the decoder.
    bypassed = copy.deepcopy(wf)
    sampler_b = next(n for n in bypassed["nodes"] if n["type"] == "SCW_StageBSampler")
    sampler_b["mode"] = headless.MODE_BYPASS
    prompt = headless.to_api_prompt(bypassed, classes)
    decode_entry = next(e for e in prompt.values() if e["class_type"] == "SCW_StageADecode")
    assert prompt[decode_entry["inputs"]["latent"][0]]["class_type"] == "SCW_StageCSampler"


def test_bad_widget_values_are_rejected_before_running(empty_models):
    wf = _load("text_to_image.json")
    sampler = next(n for n in wf["nodes"] if n["type"] == "SCW_StageCSampler")
    sampler["widgets_values"][7] = 0.0  # denoise
    with pytest.raises(headless.WorkflowError, match="input 'denoise': 0.0 is below the minimum 0.01"):
        headless.run_workflow(wf)
    sampler["widgets_values"][7] = 1.0
    sampler["widgets_values"][5] = "euler_a"
    with pytest.raises(headless.WorkflowError, match="'euler_a' is not one of"):
        headless.run_workflow(wf)
    sampler["widgets_values"][5] = "ddpm"
    sampler["widgets_values"][8] = "cosine"
    with pytest.raises(headless.WorkflowError, match="input 'scheduler': 'cosine' is not one of"):
        headless.run_workflow(wf)
    sampler["widgets_values"][8] = "official"
    sampler["widgets_values"] += [1, 2]
    with pytest.raises(headless.WorkflowError, match="11 widget values .* for 9 widgets"):
        headless.run_workflow(wf)


SCHEDULE_NODES = ("SCW_StageCSampler", "SCW_StageBSampler", "SCW_StageCImageToImage")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_saved_before_the_scheduler_widget_still_load(name):
    """A workflow saved before the scheduler widget (one value fewer, at the end) runs with the default
    scheduler, as the frontend loads it; the shipped files carry the value, as a current frontend saves them."""
    wf = _load(name)
    nodes = [n for n in wf["nodes"] if n["type"] in SCHEDULE_NODES]
    if not nodes:
        pytest.skip(f"{name} has no sampler node (the training workflow), so no scheduler widget")
    assert all(n["widgets_values"][-1] == "official" for n in nodes)
    old = copy.deepcopy(wf)
    for node in old["nodes"]:
        if node["type"] in SCHEDULE_NODES:
            node["widgets_values"].pop()
    assert headless.to_api_prompt(old, _classes()) == headless.to_api_prompt(wf, _classes())


def test_api_prompts_made_before_the_scheduler_input_still_validate_and_run(empty_models, tmp_path):
    """The scheduler is an optional input: an API prompt without it (one scripted before it existed) passes the
    checks (ComfyUI's server checks required inputs the same way) and samples with the default schedule."""
    prompt = headless.to_api_prompt(_load("text_to_image.json"), _classes())
    for entry in prompt.values():
        if entry["class_type"] in SCHEDULE_NODES:
            assert entry["inputs"].pop("scheduler") == "official"
    order = headless.execution_order(prompt, _classes())
    headless.validate({i: prompt[i] for i in order}, _classes())
    paths = headless.run_workflow(prompt, out=str(tmp_path / "old_api.png"))
    assert paths and os.path.exists(paths[0])


def test_missing_widget_values_without_a_default_are_still_refused():
    wf = _load("text_to_image.json")
    loader = next(n for n in wf["nodes"] if n["type"] == "SCW_StageCLoader")
    loader["widgets_values"] = []  # file_name has no default
    with pytest.raises(headless.WorkflowError, match="0 widget values .* for 2 widgets"):
        headless.to_api_prompt(wf, _classes())


class _Checked:
    """A node with a cross-field rule, to check that the runner calls VALIDATE_INPUTS as ComfyUI does."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"low": ("INT", {"default": 1, "min": 0, "max": 10}),
                             "high": ("INT", {"default": 2, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, low, high):
        return True if low < high else f"low {low} must be below high {high} - swap them"

    def run(self, low, high):
        return (high - low,)


def test_validate_inputs_is_called_with_widget_values():
    classes = {"Checked": _Checked}
    headless.validate({"1": {"class_type": "Checked", "inputs": {"low": 1, "high": 5}}}, classes)
    with pytest.raises(headless.WorkflowError, match="node 1 \\(Checked\\): low 5 must be below high 1 - swap"):
        headless.validate({"1": {"class_type": "Checked", "inputs": {"low": 5, "high": 1}}}, classes)
    # A linked value is unknown before execution: ComfyUI leaves it out, and so does the runner.
    seen = []

    class Recording(_Checked):
        @classmethod
        def VALIDATE_INPUTS(cls, low=None, high=None):
            seen.append((low, high))
            return True

    headless.validate({"1": {"class_type": "Recording", "inputs": {"low": 1, "high": ["2", 0]}},
                       "2": {"class_type": "Recording", "inputs": {"low": 0, "high": 3}}}, {"Recording": Recording})
    assert seen == [(1, None), (0, 3)]


def test_unknown_node_type_is_named():
    wf = _load("text_to_image.json")
    wf["nodes"][0]["type"] = "StableCascade_Mystery"
    with pytest.raises(headless.WorkflowError, match="unknown node type 'StableCascade_Mystery'"):
        headless.to_api_prompt(wf, _classes())


def test_cli_reports_a_bad_workflow_without_traceback(tmp_path, caplog):
    wf = _load("text_to_image.json")
    wf["nodes"][0]["type"] = "StableCascade_Mystery"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(wf))
    assert cli.main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown node type 'StableCascade_Mystery'" in caplog.text
    assert not (tmp_path / "x.png").exists()


def test_cli_runs_as_a_script(empty_models, tmp_path):
    """`python headless.py` loads the pack as a package itself (no repo root on sys.path)."""
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(_fast(_load("text_to_image.json"))))
    out = tmp_path / "cli.png"
    env = {**os.environ, "SCW_NO_COMFY": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "headless.py"), str(path), "--models",
                             str(empty_models), "--out", str(out), "--seed", "3"],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and result.stdout == ""
    assert "TINY RANDOM Stage C" in result.stderr and "models/diffusion_models/" in result.stderr
    assert json.loads(Image.open(out).text["prompt"])


def test_networks_are_loaded_when_needed_and_released_after_their_last_use(empty_models, tmp_path, monkeypatch):
    wf = _fast(_load("text_to_image.json"))
    prompt = headless.to_api_prompt(wf, _classes())
    order = [prompt[n]["class_type"] for n in headless.execution_order(prompt, _classes())]
    # Each loader runs just before its stage, so earlier stages never hold its network.
    assert order.index("SCW_StageALoader") > order.index("SCW_StageBSampler")
    assert order.index("SCW_StageBLoader") > order.index("SCW_StageCSampler")
    assert order.index("SCW_StageBLoader") == order.index("SCW_StageBSampler") - 1

    host.unload_all()  # networks other tests left resident in the process-wide manager
    resident_at_start: dict[str, list[str]] = {}
    real_load = host.load

    def spy(handles, memory_required=0):
        real_load(handles, memory_required)
        names = [type(m).__name__ for m in host.loaded_handles()]
        resident_at_start.setdefault(type(host.module_of(handles[0])).__name__, names)

    monkeypatch.setattr(host, "load", spy)
    headless.run_workflow(wf, out=str(tmp_path / "x.png"))
    # When Stage A decodes, Stage C and the text encoder (their last consumers ran) are gone.
    assert resident_at_start["StageA"] == ["StageA"], resident_at_start
    assert "StageC" not in resident_at_start["StageB"] and "TextEncoder" not in resident_at_start["StageB"]
    assert host.loaded_handles() == []
