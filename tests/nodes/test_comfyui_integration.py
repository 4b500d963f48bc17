"""The pack inside a real ComfyUI: a server started in a subprocess, and ComfyUI's model manager in-process.

Opt-in: needs a ComfyUI checkout named by ``COMFYUI_PATH`` and a Python that has ComfyUI's dependencies (the
project's .venv lacks them), e.g.::

    COMFYUI_PATH=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest tests/nodes/test_comfyui_integration.py -q

docs/COMFYUI_INTEGRATION.md says how to build that checkout and venv on a CPU machine. Without them every test
is skipped with the reason. Everything runs on the CPU (``--cpu``) and talks to 127.0.0.1 only; model files
are the loaders' tiny random networks saved in the released layouts, so images are noise.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import comfyui_harness as h
import pytest
import torch
from comfyui_harness import TEST_SIZE, TEST_STEPS, TINY_FILES, Layout, Server

pytestmark = pytest.mark.comfyui
PACK = sys.modules["comfyui_stablecascade"]  # registered by conftest.py, the way ComfyUI loads a folder


@pytest.fixture(scope="session")
def comfy_root() -> str:
    root = h.comfy_root_or_skip()
    failed = h.import_problems(root)
    if failed:
        what = "; ".join(f"{k} ({v})" for k, v in failed.items())
        pytest.skip(f"ComfyUI's dependencies do not import with {sys.executable}: {what} - build ComfyUI's venv "
                    "as docs/COMFYUI_INTEGRATION.md says and run this file with its python")
    return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, comfy_root: str) -> Layout:
    return h.make_layout(str(tmp_path_factory.mktemp("comfy_integration")))


@pytest.fixture(scope="module")
def server(layout: Layout, comfy_root: str) -> Iterator[Server]:
    with h.start_server(layout, comfy_root) as srv:
        yield srv


# ----------------------------------------------------------------------------- server tests


def test_pack_imports_from_the_yaml_custom_nodes_folder(server: Server, layout: Layout) -> None:
    log = server.log()
    failed = [ln for ln in log.splitlines() if h.FOLDER in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)]
    assert not failed, "ComfyUI could not import the pack:\n" + log[-8000:]
    loaded = [ln for ln in log.splitlines() if "seconds:" in ln and ln.rstrip().endswith(layout.pack_path)]
    assert loaded, f"the pack at {layout.pack_path} is not in ComfyUI's custom node import list:\n{log[-4000:]}"
    assert "An error occurred while retrieving information" not in log, log[-8000:]


def test_object_info_lists_every_pack_node(server: Server) -> None:
    ours = {k: v for k, v in server.object_info.items() if v.get("python_module") == h.PYTHON_MODULE}
    assert set(ours) == set(PACK.NODE_CLASS_MAPPINGS), (
        f"missing on the server: {sorted(set(PACK.NODE_CLASS_MAPPINGS) - set(ours))}; "
        f"unexpected: {sorted(set(ours) - set(PACK.NODE_CLASS_MAPPINGS))}")
    for node_id, info in ours.items():
        assert node_id.startswith("SCW_"), node_id
        assert info["display_name"].startswith("Stable Cascade "), (node_id, info["display_name"])
        assert info["category"].startswith("Stable Cascade/"), (node_id, info["category"])
        assert len(info["output"]) == len(info["output_name"]), node_id


def test_loaders_list_the_files_of_the_yaml_model_folders(server: Server) -> None:
    expected = {"SCW_StageCLoader": "diffusion_models", "SCW_StageBLoader": "diffusion_models",
                "SCW_StageALoader": "vae", "SCW_TextEncoderLoader": "text_encoders"}
    for node_id, folder in expected.items():
        options = server.object_info[node_id]["input"]["required"]["file_name"][0]
        wanted = sorted(TINY_FILES[folder])
        assert all(name in options for name in wanted), f"{node_id} lists {options}, expected {wanted} in it"


def test_text_to_image_workflow_runs_in_comfyui(server: Server) -> None:
    prompt = h.small_prompt(server.object_info)
    run = h.run_ok(server, prompt)
    img = h.saved_image(server, prompt, run)
    assert img.size == (TEST_SIZE, TEST_SIZE)
    assert json.loads(img.info["prompt"])[h.node_id(prompt, "SaveImage")]["class_type"] == "SaveImage"
    low, high = img.convert("L").getextrema()
    assert low < high, "the decoded image is one flat colour"

    # Each sampler reported its steps through ComfyUI's progress bar (the UI's progress and interrupt path).
    for class_type, steps in TEST_STEPS.items():
        node = h.node_id(prompt, class_type)
        done = [p for p in run.of_type("progress") if p.get("node") == node]
        assert done and done[-1]["value"] == done[-1]["max"] == steps, (class_type, done)

    # The networks went through ComfyUI's loader, and none was dropped while still marked loaded.
    log = server.log()
    for network in ("StageC", "StageB", "StageA"):
        assert f"Requested to load {network}" in log, f"{network} never went through load_models_gpu:\n{log[-4000:]}"
    assert "memory leak" not in log, log[-6000:]


def test_text_encoder_nodes_run_with_a_broken_torchaudio(server: Server) -> None:
    """The server runs with a fake torchaudio whose import raises OSError (a wheel that no longer matches torch):
    transformers' CLIP modelling cannot be imported there, and the pack's text-encoder loader and SCW_TextEncode
    must still run (the pack's CLIP towers are pure torch; transformers gives only the tokenizer)."""
    log = server.log()
    # The simulation is active: ComfyUI's own audio nodes failed on the fake library.
    assert h.BROKEN_TORCHAUDIO_MESSAGE in log, f"the fake torchaudio was not imported by the server:\n{log[-4000:]}"
    prompt = h.small_prompt(server.object_info)
    encoders = [k for k, v in prompt.items() if v["class_type"] == "SCW_TextEncode"]
    assert encoders, "text_to_image.json has no SCW_TextEncode"
    for i, node in enumerate(encoders):
        prompt[node]["inputs"]["text"] = f"a fox in the snow, broken torchaudio run {i}"  # not from the cache
    run = h.run_ok(server, prompt)
    executed = {e.get("node") for e in run.of_type("executing")}
    assert set(encoders) <= executed, f"SCW_TextEncode nodes {encoders} did not run; executed {executed}"
    assert h.saved_image(server, prompt, run).size == (TEST_SIZE, TEST_SIZE)
    assert "Requested to load TextEncoder" in server.log(), "the text encoder never went through ComfyUI's loader"


SHIPPED = sorted(f for f in os.listdir(os.path.join(h.REPO, "workflows")) if f.endswith(".json"))


@pytest.mark.parametrize("workflow", [f for f in SHIPPED if f != os.path.basename(h.WORKFLOW)])
def test_shipped_workflow_runs_in_comfyui(server: Server, workflow: str) -> None:
    """Every shipped workflow, converted against the server's node definitions, runs and writes its images."""
    prompt = h.small_prompt(server.object_info, os.path.join(h.REPO, "workflows", workflow))
    run = h.run_ok(server, prompt)
    history = h.get_json(f"{server.url}/history/{run.body['prompt_id']}")[run.body["prompt_id"]]
    images = h.output_images(server, run)
    outputs = [k for k, v in prompt.items() if server.object_info[v["class_type"]]["output_node"]]
    assert outputs and images, f"{workflow} wrote no image"
    for node in outputs:
        shown = history["outputs"].get(node, {})
        assert any(shown.values()), f"{workflow}: output node {node} ({prompt[node]['class_type']}) showed nothing"
        if prompt[node]["class_type"] in ("SaveImage", "PreviewImage"):
            assert images.get(node), f"{workflow}: {prompt[node]['class_type']} node {node} wrote no image"


def test_cached_models_run_again_after_comfyui_unloads_them(server: Server) -> None:
    """The UI's "unload models" (POST /free) between two prompts: the loaders' cached outputs are reused and
    ComfyUI must load their networks again."""
    prompt = h.small_prompt(server.object_info)
    h.set_seed(prompt, 1001)
    h.run_ok(server, prompt)
    status, raw = h.http("POST", f"{server.url}/free", {"unload_models": True})
    assert status == 200, raw
    time.sleep(3.0)  # the prompt worker applies the flag when it wakes, before it takes the next prompt
    before = server.log().count("Requested to load StageC")
    h.set_seed(prompt, 1002)
    run = h.run_ok(server, prompt)
    assert server.log().count("Requested to load StageC") > before, "Stage C was not loaded again"
    assert h.saved_image(server, prompt, run).size == (TEST_SIZE, TEST_SIZE)


def test_core_empty_latent_feeds_the_pack_samplers(server: Server) -> None:
    """Core's StableCascade_EmptyLatentImage latents (no "scw_stage" tag) work with the pack's samplers."""
    prompt = h.small_prompt(server.object_info)
    node = h.node_id(prompt, "SCW_EmptyLatent")
    prompt[node] = {"class_type": "StableCascade_EmptyLatentImage",
                    "inputs": {"width": TEST_SIZE, "height": TEST_SIZE, "compression": 42, "batch_size": 1}}
    h.set_seed(prompt, 7)
    run = h.run_ok(server, prompt)
    assert h.saved_image(server, prompt, run).size == (TEST_SIZE, TEST_SIZE)


def test_wrong_latent_is_reported_by_comfyui_with_the_packs_message(server: Server) -> None:
    prompt = h.small_prompt(server.object_info)
    latent_id = h.node_id(prompt, "SCW_EmptyLatent")
    prompt[h.node_id(prompt, "SCW_StageCSampler")]["inputs"]["latent"] = [latent_id, 1]  # the stage_b latent
    run = h.run_prompt(server, prompt)
    assert run.status == 200, run.body
    errors = run.of_type("execution_error")
    assert errors, f"expected an execution_error, got events {run.events[-5:]}"
    assert errors[0]["node_type"] == "SCW_StageCSampler", "the wrong node failed: " + h.error_report(run)
    assert errors[0]["exception_type"].endswith("StageMismatchError"), h.error_report(run)
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
    import comfy.model_management as mm  # imported on the CPU by the comfy_root fixture
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
               if getattr(v, "RELATIVE_PYTHON_MODULE", "") == h.PYTHON_MODULE}
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
    return h.small_prompt(info)


def _pack_modules_loaded(env: InProcess) -> list[Any]:
    return [p.model for p in env.mm.loaded_models() if type(p.model).__module__.startswith(env.pack.__name__)]


def test_comfyui_loads_and_unloads_the_pack_models(inproc: InProcess) -> None:
    env = inproc
    env.mm.unload_all_models()
    prompt = _local_prompt(env)
    outputs = _run_nodes(env, prompt)
    image = outputs[h.node_id(prompt, "SCW_StageADecode")][0]
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
    node = prompt[h.node_id(prompt, "SCW_StageCSampler")]
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
    # ComfyUI's default is --preview-method none; a user who wants previews picks one (auto here).
    method, args.preview_method = args.preview_method, LatentPreviewMethod.Auto
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        outputs = _run_nodes(env, {k: v for k, v in prompt.items() if v["class_type"] in
                                   ("SCW_StageCLoader", "SCW_TextEncoderLoader", "SCW_TextEncode",
                                    "SCW_EmptyLatent", "SCW_PreviewerLoader")})
        node = prompt[h.node_id(prompt, "SCW_StageCSampler")]
        kwargs = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        cls = env.classes["SCW_StageCSampler"]
        assert "previewer" in kwargs, "text_to_image.json connects the Previewer for live previews"
        getattr(cls(), cls.FUNCTION)(**kwargs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        args.preview_method = method
    steps = TEST_STEPS["SCW_StageCSampler"]
    assert [c[:2] for c in calls][-1] == (steps, steps), calls
    previews = [c[2] for c in calls if c[2] is not None]
    assert previews, "a connected previewer sent no preview through the progress bar"
    fmt, img, max_size = previews[-1]
    assert fmt in ("JPEG", "PNG") and hasattr(img, "size") and (max_size is None or max_size > 0)


def _stage_c_inputs(config: Any) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(1, config.c_in, 8, 8, generator=gen), "r": torch.tensor([0.6]),
            "clip_text": torch.randn(1, 77, config.c_clip_text, generator=gen),
            "clip_text_pooled": torch.randn(1, 1, config.c_clip_text_pooled, generator=gen),
            "clip_img": torch.randn(1, 1, config.c_clip_img, generator=gen)}


def test_low_vram_mode_computes_what_a_full_load_computes(inproc: InProcess) -> None:
    """ComfyUI's low-VRAM mode (a GPU smaller than the model) leaves weights on the offload device and runs
    comfy.ops layers with their weights cast and patched per call; the pack's networks must give the same
    result, LoRA-style patches included (here on a Linear and on an attention in_proj, as LoRAs patch)."""
    import comfy.ops

    env, host = inproc, inproc.pack.host
    env.mm.unload_all_models()
    (handle,) = env.classes["SCW_StageCLoader"]().load("stage_c_bf16.safetensors", "fp32")
    module = handle.module
    cast = [n for n, m in module.named_modules() if isinstance(m, comfy.ops.CastWeightBiasOp)]
    assert cast, "Stage C is not built from ComfyUI's ops: ComfyUI cannot stream its weights in low-VRAM mode"
    sd = module.state_dict()
    linear = next(f"{n}.weight" for n in cast if sd[f"{n}.weight"].ndim == 2)
    in_proj = next(k for k in sd if k.endswith("in_proj_weight"))
    gen = torch.Generator().manual_seed(2)
    patched = handle.clone()
    patched.add_patches({k: 0.2 * torch.randn(sd[k].shape, generator=gen) for k in (linear, in_proj)}, key="t")
    inputs = _stage_c_inputs(module.config)

    with torch.no_grad():
        host.load([patched])
        full = module(**inputs)
        env.mm.unload_all_models()
        base = module(**inputs)
        patcher, device = patched.patcher, env.mm.get_torch_device()
        patcher.patch_model(device_to=device, lowvram_model_memory=1)  # every comfy.ops layer streamed
        try:
            assert module.model_lowvram
            low = module(**inputs)
        finally:
            patcher.unpatch_model(patcher.offload_device)
    assert not torch.allclose(full, base), "the patches changed nothing; the test would prove nothing"
    assert torch.allclose(low, full, rtol=1e-4, atol=1e-5), (
        f"low-VRAM result differs from the full load by {(low - full).abs().max():.3g} (patches differ by "
        f"{(full - base).abs().max():.3g}); keys outside comfy.ops layers are neither patched nor moved in "
        "low-VRAM mode")


@pytest.mark.parametrize("loader, file_name", [("SCW_StageCLoader", "stage_c_bf16.safetensors"),
                                                ("SCW_StageBLoader", "stage_b_bf16.safetensors"),
                                                ("SCW_StageALoader", "stage_a.safetensors")])
def test_comfyui_applies_a_patch_on_every_weight(inproc: InProcess, loader: str, file_name: str) -> None:
    """LoRAs may patch any weight (the official format patches attention in_proj too); ComfyUI's loader must
    apply each of them, and unloading must restore each."""
    env, host = inproc, inproc.pack.host
    env.mm.unload_all_models()
    (handle,) = env.classes[loader]().load(file_name, "fp32")
    before = {k: v.detach().clone() for k, v in handle.module.named_parameters()}
    patched = handle.clone()
    patched.add_patches({k: torch.full_like(v, 0.5) for k, v in before.items()}, key="every-weight")
    host.load([patched])
    after = {k: v.detach().clone() for k, v in handle.module.named_parameters()}
    env.mm.unload_all_models()
    restored = dict(handle.module.named_parameters())
    missed = [k for k in before if torch.equal(after[k], before[k])]
    assert not missed, (
        f"ComfyUI left {len(missed)} of {len(before)} patched weights unchanged, e.g. {missed[:4]}: "
        "ModelPatcher.load() patches only parameters of modules that have no child modules with parameters")
    assert all(torch.equal(restored[k].detach(), before[k]) for k in before), "unloading did not restore weights"


def test_lora_node_patches_are_applied_by_comfyui(inproc: InProcess) -> None:
    """SCW_LoraLoaderModelOnly inside ComfyUI: loading the patched clone changes every weight the official LoRA
    targets (attention in_proj and out_proj); loading the original again restores them."""
    env, host = inproc, inproc.pack.host
    env.mm.unload_all_models()
    (base,) = env.classes["SCW_StageCLoader"]().load("stage_c_bf16.safetensors", "default")
    targets = sys.modules[f"{env.pack.__name__}.model_patches.lora"].official_target_keys(base.module)
    assert any(k.endswith("in_proj_weight") for k in targets) and any(k.endswith("out_proj.weight") for k in targets)
    before = {k: v.detach().clone() for k, v in base.module.state_dict().items()}
    (patched,) = env.classes["SCW_LoraLoaderModelOnly"]().apply(base, "style_lora.safetensors", 0.8)
    host.load([patched])
    sd = base.module.state_dict()
    unchanged = [k for k in targets if torch.equal(sd[k], before[k])]
    host.load([base])
    restored = base.module.state_dict()
    env.mm.unload_all_models()
    assert not unchanged, f"the LoRA's patches on {len(unchanged)} of {len(targets)} targets were not applied: " \
                          f"{unchanged[:4]}"
    assert all(torch.equal(restored[k], before[k]) for k in targets)


def test_learned_token_text_encoder_is_one_model_for_comfyui(inproc: InProcess) -> None:
    """SCW_LoraLoader with a learned-token LoRA: the text encoder it returns is a clone of the loader's
    ModelPatcher (one network, one model_size()), so ComfyUI's loaded-models list holds the shared weights once;
    encoding with the twin and with the base swaps ComfyUI's one entry instead of adding a second."""
    env = inproc
    env.mm.unload_all_models()
    (stage_c,) = env.classes["SCW_StageCLoader"]().load("stage_c_bf16.safetensors", "default")
    (base,) = env.classes["SCW_TextEncoderLoader"]().load("stable_cascade_text_encoder.safetensors", "default")
    name = next(n for n, k in h.TINY_LORAS.items() if k == 1)
    _, twin = env.classes["SCW_LoraLoader"]().apply(stage_c, base, name, 1.0, 1.0, "[fernando]")
    assert isinstance(twin.patcher, env.patcher_class)
    assert twin.patcher.model is base.patcher.model and twin.patcher.is_clone(base.patcher)
    assert twin.patcher.model_size() == base.patcher.model_size() == env.mm.module_size(base.module)
    assert twin.module is not base.module and "[fernando]" in twin.module.added_tokens

    def text_encoders_loaded() -> list[Any]:
        return [m for m in env.mm.current_loaded_models if m.model is not None and m.model.model is base.module]

    encode = env.classes["SCW_TextEncode"]()
    plain = encode.encode(base, "a photo of [fernando]")[0][0][0]
    assert len(text_encoders_loaded()) == 1
    learned = encode.encode(twin, "a photo of [fernando]")[0][0][0]
    loaded = text_encoders_loaded()
    assert len(loaded) == 1 and loaded[0].model is twin.patcher, "ComfyUI holds the text encoder twice"
    assert not torch.allclose(plain, learned), "the learned token changed nothing"
    again = encode.encode(base, "a photo of [fernando]")[0][0][0]
    assert torch.equal(again, plain) and len(text_encoders_loaded()) == 1
    env.mm.unload_all_models()
