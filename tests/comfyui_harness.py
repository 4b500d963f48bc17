"""Harness of tests/nodes/test_comfyui_integration.py: a ComfyUI checkout's deps, a tmp layout (the pack as a custom
node folder plus tiny model files, both brought in by an extra_model_paths.yaml), a ComfyUI server in a
subprocess on 127.0.0.1, the frontend's UI -> API workflow conversion, and prompt runs followed over /ws.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    "clip_vision": {"stable_cascade_image_encoder.safetensors": "clip_vision"},
}
# LoRA file names of workflows/lora.json -> learned tokens the file carries (official layout, for the demo Stage C).
TINY_LORAS = {"fernando_lora.safetensors": 1, "style_lora.safetensors": 0, "scw_wurst.safetensors": 1}
# ControlNet file names of workflows/controlnet_*.json -> input channels (canny 1, inpainting 4, super-resolution 16).
TINY_CONTROLNETS = {"canny.safetensors": 1, "inpainting.safetensors": 4, "super_resolution.safetensors": 16}
WORKFLOW_INPUTS = os.path.join(REPO, "workflows", "inputs")  # images the shipped workflows' LoadImage nodes read


# ----------------------------------------------------------------------------- ComfyUI checkout and its deps


def comfy_root_or_skip() -> str:
    root = os.environ.get("COMFYUI_PATH", "")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout and run with ComfyUI's Python "
                    "(see docs/COMFYUI_INTEGRATION.md)")
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "main.py")) or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no main.py and comfy/ there)")
    return root


def import_comfy_or_skip(purpose: str, *modules: str) -> dict[str, Any]:
    """ComfyUI's ``modules`` imported in this process (CPU) for a comparison with core, by name; the test skips,
    saying why, when COMFYUI_PATH names no checkout or ComfyUI does not import with this Python."""
    root = os.environ.get("COMFYUI_PATH", "")
    if not root or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip(f"COMFYUI_PATH does not name a ComfyUI checkout: {purpose} needs one (run with ComfyUI's "
                    "Python, see docs/COMFYUI_INTEGRATION.md)")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from comfy.cli_args import args

        args.cpu = True
        return {name: importlib.import_module(name) for name in modules}
    except ImportError as exc:
        pytest.skip(f"ComfyUI does not import with {sys.executable} ({exc}); run with ComfyUI's Python")


# ComfyUI's third-party imports, then its own modules (which fail when a dep is missing). A broken wheel (e.g. a
# CUDA-only torchvision next to a CPU torch) raises on import; its message goes into the skip reason.
_DEPS = ("torch", "torchvision", "numpy", "PIL", "safetensors", "transformers", "aiohttp", "yaml", "einops",
         "torchsde", "scipy", "tqdm", "psutil", "av", "sqlalchemy", "alembic", "comfyui_frontend_package")


def import_problems(root: str) -> dict[str, str]:
    import importlib

    failed = {}
    for name in _DEPS:
        try:
            importlib.import_module(name)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if failed:
        return failed
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    # Nothing parses sys.argv without main.py (comfy.options.args_parsing is off): set --cpu before the first
    # device query, which would otherwise ask CUDA. The server gets --cpu on its command line.
    args.cpu = True
    for name in ("comfy.model_management", "comfy.model_patcher", "comfy.sd", "folder_paths"):
        try:
            importlib.import_module(name)
        except Exception as e:
            return {f"ComfyUI's {name}": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return {}


# ----------------------------------------------------------------------------- a tmp layout: nodes, models, yaml


@dataclass
class Layout:
    base: str
    nodes_dir: str  # holds the symlink FOLDER -> this repo
    models: dict[str, str]  # ComfyUI folder name -> tmp folder with the tiny files
    yaml_path: str
    broken_site: str = ""  # a folder with a fake torchaudio whose import raises (see write_broken_torchaudio)

    @property
    def pack_path(self) -> str:
        return os.path.join(self.nodes_dir, FOLDER)


def _write_tiny_models(models: Mapping[str, str]) -> None:
    """The loaders' demo networks (tiny, random, sized to fit together) saved as released-layout files."""
    from safetensors.torch import save_file

    from comfyui_stablecascade.cascade.kinds import demo_network
    from comfyui_stablecascade.model_patches.lora import demo_lora
    from comfyui_stablecascade.pipeline.controls import demo_controlnet

    for folder, files in TINY_FILES.items():
        for name, kind in files.items():
            sd = {k: v.detach().contiguous() for k, v in demo_network(kind).state_dict().items()}
            save_file(sd, os.path.join(models[folder], name))
    stage_c, text = demo_network("stage_c"), demo_network("text_encoder")
    width = text.text_model.embeddings.token_embedding.weight.shape[1]
    for seed, (name, n_tokens) in enumerate(TINY_LORAS.items()):
        save_file(demo_lora(stage_c, n_tokens, width, seed=seed), os.path.join(models["loras"], name))
    for name, c_in in TINY_CONTROLNETS.items():
        sd = demo_controlnet(c_in, stage_c.config, None, name).module.state_dict()
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, os.path.join(models["controlnet"], name))


# What a torchaudio wheel that does not match torch raises on import (common after a torch upgrade).
BROKEN_TORCHAUDIO_MESSAGE = "Could not load this library: /scw-fake/site-packages/torchaudio/lib/_torchaudio.abi3.so"


def write_broken_torchaudio(folder: str) -> str:
    """A ``torchaudio`` package under ``folder`` whose import raises OSError like a mismatched wheel; put
    ``folder`` first on a Python's path and transformers' CLIP modelling import fails through it."""
    os.makedirs(os.path.join(folder, "torchaudio"))
    with open(os.path.join(folder, "torchaudio", "__init__.py"), "w", encoding="utf-8") as f:
        f.write(f"raise OSError({BROKEN_TORCHAUDIO_MESSAGE!r})\n")
    return folder


def make_layout(base: str) -> Layout:
    """Under ``base``: extra_custom_nodes/ComfyUI-StableCascade -> this repo, extra_models/<folder>/ with the tiny
    files, and the yaml that adds both to ComfyUI; nothing is written into the checkout."""
    nodes_dir = os.path.join(base, "extra_custom_nodes")
    os.makedirs(nodes_dir)
    os.symlink(REPO, os.path.join(nodes_dir, FOLDER), target_is_directory=True)
    models = {folder: os.path.join(base, "extra_models", folder) for folder in (*TINY_FILES, "loras", "controlnet")}
    for path in models.values():
        os.makedirs(path)
    _write_tiny_models(models)
    os.makedirs(os.path.join(base, "input"))
    for name in os.listdir(WORKFLOW_INPUTS):
        src = os.path.join(WORKFLOW_INPUTS, name)
        if os.path.isdir(src):  # e.g. a training-set folder
            shutil.copytree(src, os.path.join(base, "input", name))
        else:
            shutil.copy(src, os.path.join(base, "input", name))
    yaml_path = os.path.join(base, "extra_model_paths.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        # is_default: these folders come first, so what a node saves (train_lora.json's LoRA) lands here too.
        f.write(f"scw_integration:\n    base_path: {base}\n    is_default: true\n"
                "    custom_nodes: extra_custom_nodes\n")
        for folder in models:
            f.write(f"    {folder}: extra_models/{folder}\n")
    return Layout(base, nodes_dir, models, yaml_path, write_broken_torchaudio(os.path.join(base, "broken_site")))


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


# No proxy from the environment: every request goes straight to the server on the loopback address.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: Any = None, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> Any:
    status, raw = http("GET", url)
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


@contextlib.contextmanager
def start_server(layout: Layout, comfy_root: str, broken_torchaudio: bool = True) -> Iterator[Server]:
    """``main.py --cpu`` on a free loopback port with the layout's yaml; always stopped on exit.

    With ``broken_torchaudio`` the layout's fake torchaudio (its import raises OSError) comes first on the
    server's path, as in a ComfyUI whose torchaudio no longer matches its torch: core keeps working (it
    guards its torchaudio imports), and so must the pack."""
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
    if broken_torchaudio:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (layout.broken_site, os.environ.get("PYTHONPATH")) if p)
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
                if http("GET", f"{srv.url}/system_stats", timeout=5)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s; log tail:\n{srv.log()[-6000:]}")
            time.sleep(1.0)
        srv.object_info = get_json(f"{srv.url}/object_info")
        yield srv
    finally:
        _stop(process)


# ----------------------------------------------------------------------------- UI workflow -> API prompt


def _input_order(info: Mapping) -> list[tuple[str, Any]]:
    """(name, spec) of a node's inputs in the order the frontend lays out widgets."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def _options(spec: Any) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec: Any) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput", False)


def _has_control_widget(name: str, spec: Any) -> bool:
    opts = _options(spec)
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
            elif _options(spec).get("image_upload"):
                values.pop(0)  # the frontend's upload button keeps a value of its own
        assert not values, f"node {node['id']} ({node['type']}): widget values {values} match no input of the server"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def small_prompt(object_info: Mapping, workflow: str = WORKFLOW) -> dict[str, dict]:
    """A shipped workflow as an API prompt, shrunk for the CPU: sizes TEST_SIZE, few steps, batch 1."""
    with open(workflow, encoding="utf-8") as f:
        prompt = ui_to_api(json.load(f), object_info)
    for node in prompt.values():
        inputs = node["inputs"]
        for name in ("width", "height"):
            if isinstance(inputs.get(name), int):
                inputs[name] = TEST_SIZE
        if isinstance(inputs.get("batch_size"), int):
            inputs["batch_size"] = 1
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = TEST_STEPS.get(node["class_type"], 2)
    return prompt


def node_id(prompt: Mapping[str, dict], class_type: str) -> str:
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


def error_report(run: Run) -> str:
    errors = run.of_type("execution_error")
    if not errors:
        return f"no execution_error; last events {run.events[-5:]}"
    e = errors[0]
    return (f"node {e.get('node_id')} ({e.get('node_type')}) raised {e.get('exception_type')}: "
            f"{e.get('exception_message')}\n{''.join(e.get('traceback') or [])}")


def run_ok(server: Server, prompt: dict) -> Run:
    run = run_prompt(server, prompt)
    assert run.status == 200, f"/prompt rejected the graph: {json.dumps(run.body, indent=1)[:4000]}"
    if run.of_type("execution_error"):
        pytest.fail("the graph failed inside ComfyUI: " + error_report(run))
    assert run.of_type("execution_success"), f"no execution_success; events: {run.events[-5:]}"
    return run


def output_images(server: Server, run: Run) -> dict[str, list[Any]]:
    """Node id -> the PIL images its output (SaveImage, PreviewImage) wrote, read back through /history and /view."""
    import io

    from PIL import Image

    history = get_json(f"{server.url}/history/{run.body['prompt_id']}")[run.body["prompt_id"]]
    assert history["status"]["status_str"] == "success", history["status"]
    out: dict[str, list[Any]] = {}
    for node, result in history["outputs"].items():
        for entry in result.get("images", []):
            query = urllib.parse.urlencode({k: entry[k] for k in ("filename", "subfolder", "type")})
            status, png = http("GET", f"{server.url}/view?{query}")
            assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", (node, status, png[:16])
            img = Image.open(io.BytesIO(png))
            img.load()
            out.setdefault(node, []).append(img)
    return out


def saved_image(server: Server, prompt: dict, run: Run) -> Any:
    """The one image the prompt's SaveImage wrote."""
    images = output_images(server, run).get(node_id(prompt, "SaveImage"), [])
    assert len(images) == 1, f"SaveImage wrote {len(images)} images"
    return images[0]


def set_seed(prompt: dict, seed: int) -> None:
    for node in prompt.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = seed
