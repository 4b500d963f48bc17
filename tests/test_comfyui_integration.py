"""The pack inside a real ComfyUI: a server started in a subprocess, and ComfyUI's model manager in-process.

Opt-in: needs a ComfyUI checkout named by ``COMFYUI_PATH`` and a Python that has ComfyUI's dependencies (the
project's .venv lacks them), e.g.::

    COMFYUI_PATH=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest tests/test_comfyui_integration.py -q

docs/COMFYUI_INTEGRATION.md says how to build that checkout and venv on a CPU machine. Without them every test
is skipped with the reason. Everything runs on the CPU (``--cpu``) and talks to 127.0.0.1 only; model files
are the loaders' tiny random networks saved in the released layouts, so images are noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.comfyui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = sys.modules["comfyui_stablecascade"]  # registered by conftest.py, the way ComfyUI loads a folder
FOLDER = "ComfyUI-StableCascade"  # the pack's folder name under custom_nodes
PYTHON_MODULE = f"custom_nodes.{FOLDER}"
WORKFLOW = os.path.join(REPO, "workflows", "text_to_image.json")
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0
# The test image is small so a CPU run stays short; the graph is the shipped one otherwise.
TEST_SIZE = 256
TEST_STEPS = {"SCW_StageCSampler": 3, "SCW_StageBSampler": 2}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")

# Model folder -> {file name used by workflows/text_to_image.json: demo network kind}.
TINY_FILES = {
    "diffusion_models": {"stage_c_bf16.safetensors": "stage_c", "stage_b_bf16.safetensors": "stage_b"},
    "vae": {"stage_a.safetensors": "stage_a", "previewer.safetensors": "previewer",
            "effnet_encoder.safetensors": "effnet"},
    "text_encoders": {"stable_cascade_text_encoder.safetensors": "text_encoder"},
}


# ----------------------------------------------------------------------------- ComfyUI checkout and its deps


def _comfy_root() -> str:
    root = os.environ.get("COMFYUI_PATH", "")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout and run with ComfyUI's Python "
                    "(see docs/COMFYUI_INTEGRATION.md)")
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "main.py")) or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no main.py and comfy/ there)")
    return root


# Imported one by one in a child process, so a broken wheel (e.g. a CUDA-only torchvision next to a CPU torch)
# names itself instead of crashing this process. ComfyUI's own modules come last: they fail when a dep is missing.
_DEPS_PROBE = r"""
import importlib, json, sys
root = sys.argv[1]
sys.path.insert(0, root)
failed = {}
for name in ("torch", "torchvision", "numpy", "PIL", "safetensors", "transformers", "aiohttp", "yaml", "einops",
             "torchsde", "scipy", "tqdm", "psutil", "av", "sqlalchemy", "alembic", "comfyui_frontend_package"):
    try:
        importlib.import_module(name)
    except BaseException as e:
        failed[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
if not failed:
    try:
        from comfy.cli_args import args
        args.cpu = True
        # main.py's order: ComfyUI's nodes.py puts comfy/ first on sys.path, so `utils` must be imported before.
        for name in ("comfy.model_management", "comfy.model_patcher", "comfy.sd", "folder_paths", "utils.extra_config",
                     "server", "nodes"):
            importlib.import_module(name)
    except BaseException as e:
        failed["ComfyUI (" + name + ")"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
print("SCW_PROBE" + json.dumps(failed))
"""


@pytest.fixture(scope="session")
def comfy_root() -> str:
    root = _comfy_root()
    try:
        done = subprocess.run([sys.executable, "-c", _DEPS_PROBE, root], capture_output=True, text=True,
                              timeout=300, cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail(f"importing ComfyUI's dependencies with {sys.executable} took more than 300 s")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SCW_PROBE")), None)
    if line is None:
        pytest.fail(f"the dependency probe crashed (exit {done.returncode}): {done.stderr[-2000:]}")
    failed = json.loads(line[len("SCW_PROBE"):])
    if failed:
        what = "; ".join(f"{k} ({v})" for k, v in failed.items())
        pytest.skip(f"ComfyUI's dependencies do not import with {sys.executable}: {what} - build ComfyUI's venv "
                    "as docs/COMFYUI_INTEGRATION.md says and run this file with its python")
    return root


# ----------------------------------------------------------------------------- a tmp layout: nodes, models, yaml


@dataclass
class Layout:
    base: str
    nodes_dir: str  # holds the symlink FOLDER -> this repo
    models: dict[str, str]  # ComfyUI folder name -> tmp folder with the tiny files
    yaml_path: str

    @property
    def pack_path(self) -> str:
        return os.path.join(self.nodes_dir, FOLDER)


def _write_tiny_models(models: Mapping[str, str]) -> None:
    """The loaders' demo networks (tiny, random, sized to fit together) saved as released-layout files."""
    from safetensors.torch import save_file

    from comfyui_stablecascade.nodes.demo import demo_network

    for folder, files in TINY_FILES.items():
        for name, kind in files.items():
            sd = {k: v.detach().contiguous() for k, v in demo_network(kind).state_dict().items()}
            save_file(sd, os.path.join(models[folder], name))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, comfy_root: str) -> Layout:
    base = str(tmp_path_factory.mktemp("comfy_integration"))
    nodes_dir = os.path.join(base, "extra_custom_nodes")
    os.makedirs(nodes_dir)
    os.symlink(REPO, os.path.join(nodes_dir, FOLDER), target_is_directory=True)
    models = {folder: os.path.join(base, "extra_models", folder) for folder in TINY_FILES}
    for path in models.values():
        os.makedirs(path)
    _write_tiny_models(models)
    yaml_path = os.path.join(base, "extra_model_paths.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        # Only the yaml brings the pack and the models in; nothing is written into the checkout.
        f.write(f"scw_integration:\n    base_path: {base}\n    custom_nodes: extra_custom_nodes\n")
        for folder in models:
            f.write(f"    {folder}: extra_models/{folder}\n")
    return Layout(base, nodes_dir, models, yaml_path)


# ----------------------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    log_path: str
    process: subprocess.Popen
    object_info: dict = field(default_factory=dict)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: Any = None, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _get_json(url: str) -> Any:
    status, raw = _http("GET", url)
    assert status == 200, f"GET {url} -> {status}: {raw[:2000]!r}"
    return json.loads(raw)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(layout: Layout, comfy_root: str) -> Iterator[Server]:
    port = _free_port()
    log_path = os.path.join(layout.base, "comfyui.log")
    for sub in ("output", "input", "temp", "user"):
        os.makedirs(os.path.join(layout.base, sub), exist_ok=True)
    cmd = [sys.executable, "main.py", "--cpu", "--listen", LOOPBACK, "--port", str(port),
           "--extra-model-paths-config", layout.yaml_path, "--disable-auto-launch",
           "--output-directory", os.path.join(layout.base, "output"),
           "--input-directory", os.path.join(layout.base, "input"),
           "--temp-directory", os.path.join(layout.base, "temp"),
           "--user-directory", os.path.join(layout.base, "user"),
           "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    env.pop("SCW_NO_COMFY", None)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(cmd, cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
    srv = Server(f"http://{LOOPBACK}:{port}", log_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting; log tail:\n{srv.log()[-6000:]}")
            with contextlib.suppress(OSError):
                if _http("GET", f"{srv.url}/system_stats", timeout=5)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s; log tail:\n{srv.log()[-6000:]}")
            time.sleep(1.0)
        srv.object_info = _get_json(f"{srv.url}/object_info")
        yield srv
    finally:
        _stop(process)


# ----------------------------------------------------------------------------- UI workflow -> API prompt


def _input_order(info: Mapping) -> list[tuple[str, Any]]:
    """(name, spec) of a node's inputs in the order the frontend lays out widgets."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def _is_widget(spec: Any) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput", False)


def _has_control_widget(name: str, spec: Any) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: Mapping, object_info: Mapping) -> dict[str, dict]:
    """The frontend's UI -> API conversion for plain graphs: links become ``[source_id, slot]``, widget values
    map to widget inputs in order (a seed's control_after_generate value is skipped). Fails loudly on a node
    type the server lacks or on widget values that do not match the server's node definition."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} ({node['type']}) is muted/bypassed; not supported here"
        assert node["type"] in object_info, f"the server has no node type {node['type']!r} (node {node['id']})"
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                src = links[slot["link"]]
                inputs[slot["name"]] = [str(src[1]), src[2]]
        values = list(node.get("widgets_values") or [])
        for name, spec in _input_order(info):
            if not _is_widget(spec):
                continue
            assert values, f"node {node['id']} ({node['type']}): no widget value left for input {name!r}"
            value = values.pop(0)
            inputs.setdefault(name, value)  # a widget turned into a linked socket keeps its stale value
            if _has_control_widget(name, spec):
                assert values and values[0] in ("fixed", "increment", "decrement", "randomize"), \
                    f"node {node['id']}: {name!r} should be followed by its control_after_generate value"
                values.pop(0)
        assert not values, f"node {node['id']} ({node['type']}): widget values {values} match no input of the server"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _test_prompt(object_info: Mapping) -> dict[str, dict]:
    with open(WORKFLOW, encoding="utf-8") as f:
        prompt = ui_to_api(json.load(f), object_info)
    for node in prompt.values():
        if node["class_type"] == "SCW_EmptyLatent":
            node["inputs"].update(width=TEST_SIZE, height=TEST_SIZE, batch_size=1)
        if node["class_type"] in TEST_STEPS:
            node["inputs"]["steps"] = TEST_STEPS[node["class_type"]]
    return prompt


def _node_id(prompt: Mapping[str, dict], class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} in the prompt, found {ids}"
    return ids[0]


# ----------------------------------------------------------------------------- running a prompt over /ws


@dataclass
class Run:
    status: int
    body: dict
    events: list[dict] = field(default_factory=list)
    previews: int = 0

    def of_type(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == kind]


async def _submit_and_follow(url: str, prompt: dict, timeout: float) -> Run:
    import aiohttp

    client_id = uuid.uuid4().hex
    limit = aiohttp.ClientTimeout(total=timeout + 30)
    async with aiohttp.ClientSession(timeout=limit) as session:
        async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
            # The socket is open before the prompt is queued, so no message of the run is missed.
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                run = Run(r.status, await r.json())
            if run.status != 200:
                return run
            prompt_id = run.body["prompt_id"]
            deadline = time.monotonic() + timeout
            while True:
                msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
                if msg.type == aiohttp.WSMsgType.BINARY:
                    run.previews += 1
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"/ws closed before the prompt finished: {msg.type}")
                event = json.loads(msg.data)
                run.events.append(event)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] in ("execution_error", "execution_interrupted"):
                    return run
                if event["type"] == "executing" and data.get("node") is None:
                    return run


def run_prompt(server: Server, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> Run:
    try:
        return asyncio.run(_submit_and_follow(server.url, prompt, timeout))
    except TimeoutError:
        pytest.fail(f"the prompt did not finish within {timeout:.0f} s; server log tail:\n{server.log()[-6000:]}")


def _error_report(run: Run, server: Server) -> str:
    errors = run.of_type("execution_error")
    if not errors:
        return f"no execution_error; last events {run.events[-5:]}"
    e = errors[0]
    return (f"node {e.get('node_id')} ({e.get('node_type')}) raised {e.get('exception_type')}: "
            f"{e.get('exception_message')}\n{''.join(e.get('traceback') or [])}")


# ----------------------------------------------------------------------------- server tests


def test_pack_imports_from_the_yaml_custom_nodes_folder(server: Server, layout: Layout) -> None:
    log = server.log()
    failed = [ln for ln in log.splitlines() if FOLDER in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)]
    assert not failed, "ComfyUI could not import the pack:\n" + log[-8000:]
    loaded = [ln for ln in log.splitlines() if "seconds:" in ln and ln.rstrip().endswith(layout.pack_path)]
    assert loaded, f"the pack at {layout.pack_path} is not in ComfyUI's custom node import list:\n{log[-4000:]}"
    assert "An error occurred while retrieving information" not in log, log[-8000:]


def test_object_info_lists_every_pack_node(server: Server) -> None:
    ours = {k: v for k, v in server.object_info.items() if v.get("python_module") == PYTHON_MODULE}
    assert set(ours) == set(PACK.NODE_CLASS_MAPPINGS), (
        f"missing on the server: {sorted(set(PACK.NODE_CLASS_MAPPINGS) - set(ours))}; "
        f"unexpected: {sorted(set(ours) - set(PACK.NODE_CLASS_MAPPINGS))}")
    for node_id, info in ours.items():
        assert node_id.startswith("SCW_"), node_id
        assert info["display_name"].endswith(" (SCW)"), (node_id, info["display_name"])
        assert info["category"].startswith("stable_cascade_wurst/"), (node_id, info["category"])
        assert len(info["output"]) == len(info["output_name"]), node_id


def test_loaders_list_the_files_of_the_yaml_model_folders(server: Server) -> None:
    expected = {"SCW_StageCLoader": "diffusion_models", "SCW_StageBLoader": "diffusion_models",
                "SCW_StageALoader": "vae", "SCW_TextEncoderLoader": "text_encoders"}
    for node_id, folder in expected.items():
        options = server.object_info[node_id]["input"]["required"]["file_name"][0]
        wanted = sorted(TINY_FILES[folder])
        assert all(name in options for name in wanted), f"{node_id} lists {options}, expected {wanted} in it"


def test_text_to_image_workflow_runs_in_comfyui(server: Server) -> None:
    prompt = _test_prompt(server.object_info)
    run = run_prompt(server, prompt)
    assert run.status == 200, f"/prompt rejected the workflow: {json.dumps(run.body, indent=1)[:4000]}"
    assert not run.of_type("execution_error"), _error_report(run, server)
    assert run.of_type("execution_success"), f"no execution_success; events: {run.events[-5:]}"

    history = _get_json(f"{server.url}/history/{run.body['prompt_id']}")[run.body["prompt_id"]]
    assert history["status"]["status_str"] == "success", history["status"]
    save_id = _node_id(prompt, "SaveImage")
    images = history["outputs"][save_id]["images"]
    assert len(images) == 1 and images[0]["type"] == "output", images
    query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
    status, png = _http("GET", f"{server.url}/view?{query}")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", (status, png[:16])

    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (TEST_SIZE, TEST_SIZE)
        assert json.loads(img.info["prompt"])[save_id]["class_type"] == "SaveImage"
        assert len(set(img.convert("L").getdata())) > 1, "the decoded image is one flat colour"

    # Each sampler reported its steps through ComfyUI's progress bar (the UI's progress and interrupt path).
    for class_type, steps in TEST_STEPS.items():
        node = _node_id(prompt, class_type)
        done = [p for p in run.of_type("progress") if p.get("node") == node]
        assert done and done[-1]["value"] == done[-1]["max"] == steps, (class_type, done)


def test_wrong_latent_is_reported_by_comfyui_with_the_packs_message(server: Server) -> None:
    prompt = _test_prompt(server.object_info)
    latent_id = _node_id(prompt, "SCW_EmptyLatent")
    prompt[_node_id(prompt, "SCW_StageCSampler")]["inputs"]["latent"] = [latent_id, 1]  # the stage_b latent
    run = run_prompt(server, prompt)
    assert run.status == 200, run.body
    errors = run.of_type("execution_error")
    assert errors, f"expected an execution_error, got events {run.events[-5:]}"
    assert errors[0]["node_type"] == "SCW_StageCSampler", errors[0]
    assert errors[0]["exception_type"].endswith("StageMismatchError"), _error_report(run, server)
    assert "Stage B latent" in errors[0]["exception_message"], errors[0]["exception_message"]


# ----------------------------------------------------------------------------- in-process: ComfyUI's manager


@dataclass
class InProcess:
    mm: Any  # comfy.model_management
    patcher_class: type
    pack: Any  # the pack as ComfyUI imported it (its own module tree, host bound to comfy)
    classes: dict[str, type]


@pytest.fixture(scope="module")
def inproc(comfy_root: str, layout: Layout) -> Iterator[InProcess]:
    """ComfyUI imported into this process on the CPU, the pack loaded by ComfyUI's own custom-node loader."""
    if comfy_root not in sys.path:
        sys.path.insert(0, comfy_root)
    from comfy.cli_args import args

    # Without main.py nothing parses sys.argv (comfy.options.args_parsing is off): set --cpu before the first
    # device query, which would otherwise ask CUDA.
    args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths
    import nodes as comfy_nodes

    assert mm.get_torch_device().type == "cpu"
    for folder, path in layout.models.items():
        folder_paths.add_model_folder_path(folder, path)
    assert asyncio.run(comfy_nodes.load_custom_node(layout.pack_path)), "ComfyUI's loader could not import the pack"
    pack = sys.modules[layout.pack_path.replace(".", "_x_")]
    assert pack is not PACK
    classes = {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items()
               if getattr(v, "RELATIVE_PYTHON_MODULE", "") == PYTHON_MODULE}
    assert set(classes) == set(PACK.NODE_CLASS_MAPPINGS)
    yield InProcess(mm, comfy.model_patcher.ModelPatcher, pack, classes)
    mm.unload_all_models()
    mm.interrupt_current_processing(False)


def _run_nodes(env: InProcess, prompt: Mapping[str, dict], stop_before: tuple[str, ...] = ("SaveImage",)) -> dict:
    """Runs the pack's nodes of an API prompt by calling their functions in dependency order."""
    outputs: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in outputs:
            node = prompt[node_id]
            cls = env.classes[node["class_type"]]
            kwargs = {k: (run(v[0])[v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
            outputs[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return outputs[node_id]

    for node_id, node in prompt.items():
        if node["class_type"] not in stop_before:
            run(node_id)
    return outputs


def _local_prompt(env: InProcess) -> dict[str, dict]:
    info = {k: {"input": c.INPUT_TYPES(), "input_order": {s: list(v) for s, v in c.INPUT_TYPES().items()}}
            for k, c in env.classes.items()}
    info["SaveImage"] = {"input": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {})}}}
    return _test_prompt(info)


def _pack_modules_loaded(env: InProcess) -> list[Any]:
    return [p.model for p in env.mm.loaded_models() if type(p.model).__module__.startswith(env.pack.__name__)]


def test_comfyui_loads_and_unloads_the_pack_models(inproc: InProcess) -> None:
    env = inproc
    env.mm.unload_all_models()
    prompt = _local_prompt(env)
    outputs = _run_nodes(env, prompt)
    image = outputs[_node_id(prompt, "SCW_StageADecode")][0]
    assert image.shape == (1, TEST_SIZE, TEST_SIZE, 3) and image.device.type == "cpu"

    handles = {prompt[k]["class_type"]: v[0] for k, v in outputs.items() if prompt[k]["class_type"].endswith("Loader")}
    for node_id, handle in handles.items():
        assert isinstance(handle.patcher, env.patcher_class), f"{node_id} did not give a ComfyUI ModelPatcher"
    # Every network that ran is in ComfyUI's list of loaded models, under its own patcher.
    loaded = _pack_modules_loaded(env)
    for node_id in ("SCW_StageCLoader", "SCW_StageBLoader", "SCW_StageALoader"):
        assert any(m is handles[node_id].module for m in loaded), (
            f"{node_id}'s network is not in comfy.model_management.loaded_models(): "
            f"{[type(p.model).__name__ for p in env.mm.loaded_models()]}")

    env.mm.unload_all_models()
    assert _pack_modules_loaded(env) == []
    for handle in handles.values():
        assert handle.module.model_loaded_weight_memory == 0, "ComfyUI left a pack network marked as loaded"


def test_comfyui_applies_and_removes_the_packs_weight_patches(inproc: InProcess) -> None:
    env, host = inproc, inproc.pack.host
    assert host.in_comfyui()
    (handle,) = env.classes["SCW_StageALoader"]().load("stage_a.safetensors", "default")
    key, base = next((k, v.clone()) for k, v in handle.module.state_dict().items() if v.ndim == 4)
    delta = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    patched = handle.clone()
    assert patched.add_patches({key: delta}, strength=0.5, key="test") == [key]

    host.load([patched])
    assert torch.allclose(handle.module.state_dict()[key], base + 0.5 * delta, atol=1e-6)
    host.load([handle])  # the unpatched handle of the same network: ComfyUI restores the base weights
    assert torch.equal(handle.module.state_dict()[key], base)
    host.load([patched])
    env.mm.unload_all_models()
    assert torch.equal(handle.module.state_dict()[key], base)
    assert _pack_modules_loaded(env) == []


def test_interrupt_flag_of_comfyui_stops_the_sampler(inproc: InProcess) -> None:
    env = inproc
    prompt = _local_prompt(env)
    outputs = _run_nodes(env, {k: v for k, v in prompt.items()
                               if v["class_type"] not in ("SCW_StageCSampler", "SCW_StageBSampler",
                                                          "SCW_StageADecode", "SaveImage")})
    node = prompt[_node_id(prompt, "SCW_StageCSampler")]
    kwargs = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
    cls = env.classes["SCW_StageCSampler"]
    env.mm.interrupt_current_processing(True)
    try:
        with pytest.raises(env.mm.InterruptProcessingException):
            getattr(cls(), cls.FUNCTION)(**kwargs)
    finally:
        env.mm.interrupt_current_processing(False)
    # The flag was consumed by the sampler's check, as ComfyUI's own samplers do.
    assert not env.mm.processing_interrupted()
    (again,) = getattr(cls(), cls.FUNCTION)(**kwargs)
    assert again["samples"].shape == kwargs["latent"]["samples"].shape


def test_progress_goes_through_comfyuis_progress_bar(inproc: InProcess) -> None:
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    env = inproc
    calls: list[tuple] = []

    def hook(value: int, total: int, preview: Any, node_id: Any = None, **_: Any) -> None:
        calls.append((value, total, preview))

    prompt = _local_prompt(env)
    previewer = env.classes["SCW_PreviewerLoader"]().load("previewer.safetensors", "default")[0]
    # ComfyUI's default is --preview-method none; a user who wants previews picks one (auto here).
    method, args.preview_method = args.preview_method, LatentPreviewMethod.Auto
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        outputs = _run_nodes(env, {k: v for k, v in prompt.items() if v["class_type"] in
                                   ("SCW_StageCLoader", "SCW_TextEncoderLoader", "SCW_TextEncode",
                                    "SCW_EmptyLatent")})
        node = prompt[_node_id(prompt, "SCW_StageCSampler")]
        kwargs = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        cls = env.classes["SCW_StageCSampler"]
        getattr(cls(), cls.FUNCTION)(**kwargs, previewer=previewer)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        args.preview_method = method
    steps = TEST_STEPS["SCW_StageCSampler"]
    assert [c[:2] for c in calls][-1] == (steps, steps), calls
    previews = [c[2] for c in calls if c[2] is not None]
    assert previews, "a connected previewer sent no preview through the progress bar"
    fmt, img, max_size = previews[-1]
    assert fmt in ("JPEG", "PNG") and hasattr(img, "size") and (max_size is None or max_size > 0)
