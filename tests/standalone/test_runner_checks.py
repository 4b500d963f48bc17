"""The headless runner on damaged input: malformed workflow files, non-finite widget values, model folders that
hold only files the pack refuses, and nodes that fail while running. Every case is one named error (file, node
id, field) with a documented exit code, never a traceback."""

import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from comfyui_stablecascade import NODE_CLASS_MAPPINGS, host
from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.standalone import cli
from comfyui_stablecascade.standalone import executor as headless

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOW_DIR = os.path.join(ROOT, "workflows")
FAST = {"width": 256, "height": 256}


def _load(name="text_to_image.json"):
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def _fast(wf):
    """Smallest sizes and 1 step, so a run takes a second or two."""
    classes = headless.node_classes()
    for node in (n for n in wf["nodes"] if n["type"] in classes):  # Notes have no widgets to shrink
        for index, slot in enumerate(headless.widget_slots(classes[node["type"]])):
            if slot in FAST:
                node["widgets_values"][index] = FAST[slot]
            elif slot == "steps":
                node["widgets_values"][index] = 1
    return wf


def _node(wf, node_type):
    return next(n for n in wf["nodes"] if n["type"] == node_type)


@pytest.fixture
def empty_models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def _no_traceback_logged(caplog):
    return all(r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)


def _with_link(wf, link):
    wf["links"].append(link)
    return wf


def _missing(key):
    wf = _load()
    del wf["nodes"][2][key]
    return wf


# (file text, what the message must say)
MALFORMED = {
    "list": ("[1, 2, 3]", "the file holds a list, expected a JSON object"),
    "null": ("null", "the file holds null, expected a JSON object"),
    "empty": ("", "the file is empty"),
    "blank": ("  \n", "the file is empty"),
    "truncated": (json.dumps(_load())[:500], r"not valid JSON \(.*, line 1 column \d+\): a truncated"),
    "not a workflow": ('{"a": 1}', "neither a ComfyUI workflow"),
    "no type": (json.dumps(_missing("type")), r"node 3: 'type' is missing"),
    "no id": (json.dumps(_missing("id")), r"nodes\[2\] \(SCW_StageBLoader\): no 'id'"),
    "short link": (json.dumps(_with_link(_load(), [99, 1, 0, 8])), r"links\[\d+\] \(link 99\): 4 entries"),
    "widgets string": (json.dumps({**_load(), "nodes": [{**n, "widgets_values": "oops"} if n["id"] == 8 else n
                                                        for n in _load()["nodes"]]}),
                       r"node 8 \(SCW_StageCSampler\): 'widgets_values' is a string, expected a list"),
    "nodes object": ('{"nodes": {"1": {}}}', "'nodes' is an object, expected a list of nodes"),
    "node is a number": ('{"nodes": [3]}', r"nodes\[0\] is a number, expected a node object"),
    "api entry": ('{"1": {"class_type": "SaveImage", "inputs": []}, "2": 5}',
                  r"node '1' \(SaveImage\): 'inputs' is a list.*\n.*node '2' is a number"),
    "api link": ('{"1": {"class_type": "SaveImage", "inputs": {"images": ["2"]}}}',
                 r"node '1' \(SaveImage\) input 'images': \['2'\] is not a link"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_named_errors_with_exit_code_2(case, tmp_path, caplog):
    text, expected = MALFORMED[case]
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(headless.WorkflowError, match=expected) as err:
        headless.run_workflow(str(path))
    assert str(err.value).startswith(f"{path}: ")
    caplog.clear()
    assert cli.main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert str(path) in caplog.text and _no_traceback_logged(caplog)
    assert not (tmp_path / "x.png").exists()


def test_every_structural_problem_is_listed_at_once(tmp_path):
    wf = _load()
    del wf["nodes"][0]["type"]
    wf["nodes"][3]["widgets_values"] = 5
    wf["links"][1] = wf["links"][1][:3]
    with pytest.raises(headless.WorkflowError, match="3 problems in the workflow's structure") as err:
        headless.read_workflow(wf)
    message = str(err.value)
    assert "node 1: 'type' is missing" in message and "node 4 (SCW_StageALoader): 'widgets_values' is a number" \
        in message and "links[1]" in message


def test_a_missing_file_and_non_utf8_bytes_are_named(tmp_path):
    assert cli.main([str(tmp_path / "nope.json")]) == 2
    path = tmp_path / "image.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(headless.WorkflowError, match=f"{path}: not a text file"):
        headless.run_workflow(str(path))


def test_unknown_class_type_in_an_api_prompt_is_named():
    with pytest.raises(headless.WorkflowError, match="node 1: unknown node type 'Mystery'"):
        headless.run_workflow({"1": {"class_type": "Mystery", "inputs": {}}})


@pytest.mark.parametrize("slot,value,expected", [
    ("cfg", float("nan"), "input 'cfg': nan is not a finite number; expected 0.0..30.0"),
    ("cfg", float("inf"), "input 'cfg': inf is not a finite number"),
    ("steps", float("nan"), "input 'steps': nan is not a finite number"),
    ("steps", float("-inf"), "input 'steps': -inf is not a finite number"),
])
def test_non_finite_widget_values_are_refused_before_running(slot, value, expected, empty_models, tmp_path, caplog):
    wf = _load()
    sampler = _node(wf, "SCW_StageBSampler")
    sampler["widgets_values"][headless.widget_slots(NODE_CLASS_MAPPINGS["SCW_StageBSampler"]).index(slot)] = value
    with pytest.raises(headless.WorkflowError, match=f"node 9 \\(SCW_StageBSampler\\) {expected}"):
        headless.run_workflow(wf)
    # Through the command line: JSON's NaN literal, rc 2, no image (before, a black PNG with rc 0).
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(wf))
    assert "NaN" in path.read_text() or "Infinity" in path.read_text()
    assert cli.main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists() and _no_traceback_logged(caplog)


def test_a_pickle_in_the_folder_is_not_replaced_by_the_demo_network(empty_models, tmp_path, caplog):
    (empty_models / "diffusion_models" / "stage_c_bf16.ckpt").write_bytes(b"\x80\x02}q\x00.")
    wf = _fast(_load())
    with pytest.raises(headless.WorkflowError) as err:
        headless.run_workflow(wf, out=str(tmp_path / "x.png"))
    message = str(err.value)
    # The same text the browser shows for the loader (its VALIDATE_INPUTS): which file, which folder, what it is.
    # Every missing file of the workflow is named in one error (Stage C and Stage B share the folder with the pickle).
    assert message.startswith("2 model files are missing:\n- node 1 (SCW_StageCLoader) input 'file_name': "
                              "Stable Cascade Load Stage C: 'stage_c_bf16.safetensors' is not installed; it belongs in "
                              "models/diffusion_models/")
    assert "\n- node 3 (SCW_StageBLoader) input 'file_name': Stable Cascade Load Stage B: " in message
    assert "https://huggingface.co/stabilityai/stable-cascade" in message
    assert "stage_c_bf16.ckpt (a PyTorch pickle: the pack never unpickles" in message
    assert "convert it to .safetensors" in message and "the tiny demo network does not stand in" in message
    assert not (tmp_path / "x.png").exists()
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    assert cli.main([str(path), "--models", str(empty_models), "--out", str(tmp_path / "x.png")]) == 2
    assert "stage_c_bf16.ckpt" in caplog.text and _no_traceback_logged(caplog)


def test_naming_the_refused_file_itself_says_why(empty_models):
    (empty_models / "diffusion_models" / "stage_c.pth").write_bytes(b"x")
    wf = _fast(_load())
    _node(wf, "SCW_StageCLoader")["widgets_values"][0] = "stage_c.pth"
    with pytest.raises(headless.WorkflowError, match="'stage_c.pth' is in the models folder but is a PyTorch "
                                                     "pickle"):
        headless.run_workflow(wf)


def test_placeholder_files_still_run_the_demo_network(empty_models, tmp_path, caplog):
    """ComfyUI's models folders ship put_*_here placeholders; they are not weights and do not stop the demo."""
    (empty_models / "diffusion_models" / "put_diffusion_model_files_here").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        paths = headless.run_workflow(_fast(_load()), out=str(tmp_path / "x.png"))
    assert paths and "running the tiny random demo network instead" in caplog.text


def _raise(error):
    def sample(self, *args, **kwargs):
        raise error
    return sample


@pytest.mark.parametrize("error,code,expected", [
    (RuntimeError("cuDNN exploded"), 1, "failed with an unexpected RuntimeError: cuDNN exploded"),
    (KeyError("x"), 1, "failed with an unexpected KeyError"),
    (MemoryError("no room"), 1, "ran out of memory"),
    (CascadeError("the latent is wrong - fix it"), 2, "the latent is wrong - fix it"),
])
def test_a_node_that_raises_is_named_by_id_and_title(error, code, expected, empty_models, tmp_path, caplog,
                                                    monkeypatch):
    cls = NODE_CLASS_MAPPINGS["SCW_StageBSampler"]
    monkeypatch.setattr(cls, "sample", _raise(error))
    wf = _fast(_load())
    _node(wf, "SCW_StageBSampler")["title"] = "My decoder"
    with pytest.raises(headless.NodeError) as err:
        headless.run_workflow(wf, out=str(tmp_path / "x.png"))
    assert str(err.value).startswith("node 9 (SCW_StageBSampler, titled 'My decoder')")
    assert err.value.__cause__ is error and err.value.node_id == "9"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli.main([str(path), "--out", str(tmp_path / "x.png")]) == code
    assert expected in caplog.text and "node 9 (SCW_StageBSampler, titled 'My decoder')" in caplog.text
    assert _no_traceback_logged(caplog) and not (tmp_path / "x.png").exists()
    # -v: the traceback is there, at debug level only.
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        cli.main([str(path), "--out", str(tmp_path / "x.png"), "-v"])
    assert any(r.exc_info is not None and r.levelno == logging.DEBUG for r in caplog.records)


def test_the_command_prints_no_traceback_for_a_damaged_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"nodes": [{"id": 1}], "links": [[1, 2]]}')
    env = {**os.environ, "SCW_NO_COMFY": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "headless.py"), str(path)], capture_output=True,
                            text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and str(path) in result.stderr
    assert "node 1: 'type' is missing" in result.stderr and "links[0] (link 1): 2 entries" in result.stderr


def test_a_torchrun_worker_rank_saves_no_images(tmp_path, monkeypatch):
    """Under torchrun every rank runs the workflow; only rank 0's SaveImage writes (no process group is joined
    here: only the trainer joins one)."""
    path = tmp_path / "t2i.json"
    path.write_text(json.dumps(_fast(_load())), encoding="utf-8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    before = set(os.listdir(tempfile.gettempdir()))
    assert cli.main([str(path), "--out", str(tmp_path / "x.png")]) == 0
    assert cli.main([str(path), "--output-dir", str(tmp_path / "out1")]) == 0
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out1").exists()
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("scw_rank1_")]
    monkeypatch.setenv("RANK", "0")
    assert cli.main([str(path), "--output-dir", str(tmp_path / "out0")]) == 0
    assert list((tmp_path / "out0").glob("*.png"))
