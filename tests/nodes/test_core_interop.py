"""Core's MODEL, CLIP and VAE both ways (nodes/interop.py, host/core_interop.py), inside a real ComfyUI, in-process.

Opt-in like test_comfyui_integration.py: COMFYUI_PATH and ComfyUI's Python, else every test is skipped with the
reason. Everything runs on the CPU in float32 on tiny random networks (tests/comfyui_harness.py writes them).

Where the math is the same the graphs must agree: core's KSampler with "euler" / "simple" and the pack's sampler
with "euler" / "simple", cfg rescale 0, the same seed (both draw the initial noise as ComfyUI does), are one
computation (tests/samplers/test_k_samplers_core.py holds the samplers and schedules to each other); the
remaining differences are float32 rounding in two implementations of k-diffusion's variables (x/a vs
x*sqrt(1+sigma^2)) and, core -> pack, two implementations of the networks. Tolerances are stated where used.

Core builds CLIP-G from a fixed bigG config and detects only the released Stage C/B sizes; two documented core
seams make it build the tiny ones instead: load_clip's ``model_options={"model_config": ...}`` and
a wrapped ``comfy.model_detection.detect_unet_config`` that adds the tiny file's sizes to core's answer. Core's
Stage A has one fixed size, so the VAE test writes a release-sized random Stage A.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import comfyui_harness as h
import pytest
import torch
from comfyui_harness import Layout

pytestmark = pytest.mark.comfyui

STEPS, SEED, CFG, SIZE = 4, 11, 4.0, 256
STAGE_C_FILE, STAGE_B_FILE = "stage_c_bf16.safetensors", "stage_b_bf16.safetensors"
TEXT_FILE = "stable_cascade_text_encoder.safetensors"


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str, scaled: bool = False) -> None:
    """assert_close; ``scaled``: atol is relative to the largest |value| of ``b`` (float32 rounding in a computation
    scales with the magnitudes inside it, and a random network's x0 predictions reach ~100 here)."""
    atol = atol * float(b.abs().max()) if scaled else atol
    diff = float((a - b).abs().max())
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what} (max |diff| {diff:.3g}): {m}")


@pytest.fixture(scope="module")
def comfy_root() -> str:
    root = h.comfy_root_or_skip()
    failed = h.import_problems(root)
    if failed:
        pytest.skip(f"ComfyUI's dependencies do not import with {sys.executable}: {failed} - build ComfyUI's venv "
                    "as docs/COMFYUI_INTEGRATION.md says and run this file with its python")
    return root


def _layout(base: str) -> Layout:
    """The pack as a custom-node folder and the harness's tiny model files (no server, so no yaml or inputs)."""
    nodes_dir = os.path.join(base, "custom_nodes")
    os.makedirs(nodes_dir)
    os.symlink(h.REPO, os.path.join(nodes_dir, h.FOLDER), target_is_directory=True)
    models = {f: os.path.join(base, "models", f) for f in (*h.TINY_FILES, "loras", "controlnet")}
    for path in models.values():
        os.makedirs(path)
    h._write_tiny_models(models)
    return Layout(base, nodes_dir, models, yaml_path="")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, comfy_root: str) -> Iterator[SimpleNamespace]:
    """ComfyUI in this process (CPU) with the pack loaded by ComfyUI's own loader; core's node classes."""
    import comfy.model_management as mm
    import comfy_extras.nodes_custom_sampler as custom
    import comfy_extras.nodes_model_advanced as advanced
    import comfy_extras.nodes_stable_cascade as cascade_nodes
    import folder_paths

    import nodes as comfy_nodes

    layout = _layout(str(tmp_path_factory.mktemp("core_interop")))
    for folder, path in layout.models.items():
        folder_paths.add_model_folder_path(folder, path)
    assert asyncio.run(comfy_nodes.load_custom_node(layout.pack_path)), "ComfyUI's loader could not import the pack"
    pack = sys.modules[layout.pack_path.replace(".", "_x_")]
    assert pack.host.in_comfyui()
    ours = {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "") == h.PYTHON_MODULE}

    def node(name: str, **kwargs: Any) -> tuple:
        cls = ours.get(name) or comfy_nodes.NODE_CLASS_MAPPINGS.get(name)
        for module in (custom, advanced):
            cls = cls or getattr(module, name, None)
        if cls is None:  # a V3 node of comfy_extras
            out = getattr(cascade_nodes, name).execute(**kwargs)
            return tuple(out.args)
        return getattr(cls(), cls.FUNCTION)(**kwargs)

    # One thread: these networks are tiny, and two OpenMP threads on a busy 2-core machine run each forward ~40x
    # slower (measured 2.3 s vs 0.06 s for the tiny Stage C) than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield SimpleNamespace(mm=mm, pack=pack, node=node, layout=layout)
    finally:
        torch.set_num_threads(threads)
        mm.unload_all_models()


@pytest.fixture(scope="module")
def prompts(env: SimpleNamespace) -> SimpleNamespace:
    (te,) = env.node("SCW_TextEncoderLoader", file_name=TEXT_FILE, weight_dtype="fp32")
    (pos,) = env.node("SCW_TextEncode", text_encoder=te, text="a fox in the snow")
    (neg,) = env.node("SCW_TextEncode", text_encoder=te, text="")
    c_latent, b_latent = env.node("StableCascade_EmptyLatentImage", width=SIZE, height=SIZE, compression=42,
                                  batch_size=1)
    return SimpleNamespace(te=te, pos=pos, neg=neg, c=c_latent, b=b_latent)


def _pack_c(env: SimpleNamespace, stage_c: Any, p: SimpleNamespace, sampler: str = "euler", scheduler: str = "simple",
            shift: float = 2.0) -> torch.Tensor:
    (out,) = env.node("SCW_StageCSampler", stage_c=stage_c, positive=p.pos, negative=p.neg, latent=p.c, seed=SEED,
                      steps=STEPS, cfg=CFG, shift=shift, sampler=sampler, rescale=0.0, denoise=1.0,
                      scheduler=scheduler)
    return out["samples"]


def _ksampler(env: SimpleNamespace, model: Any, positive: list, negative: list, latent: dict,
              cfg: float = CFG) -> torch.Tensor:
    (out,) = env.node("KSampler", model=model, seed=SEED, steps=STEPS, cfg=cfg, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    return out["samples"]


# The same computation in two implementations (float32): rtol 1e-4 and atol 1e-5 of the largest |value|. Measured
# (4 steps, one CPU thread): Stage C graphs 4.7e-4..6.4e-4 on latents up to ~580 (1.1e-6 of it), Stage B 1.2e-3 on
# ~270 (4.6e-6), text encoder 1.2e-5 on ~20, Stage A 0. A different shift or a LoRA moves the result by far more
# than the tolerance (asserted alongside, so agreement is not a property of any output).
SAME_MATH = {"rtol": 1e-4, "atol": 1e-5, "scaled": True}


# ----------------------------------------------------------------------------- pack -> core MODEL


@pytest.fixture(scope="module")
def stage_c(env: SimpleNamespace) -> Any:
    return env.node("SCW_StageCLoader", file_name=STAGE_C_FILE, weight_dtype="fp32")[0]


@pytest.fixture(scope="module")
def baseline(env: SimpleNamespace, stage_c: Any, prompts: SimpleNamespace) -> torch.Tensor:
    """The all-pack graph: the pack's sampler, euler / simple, shift 2 (core's Stage C shift), cfg rescale 0."""
    return _pack_c(env, stage_c, prompts)


def test_core_ksampler_on_the_packs_stage_c_gives_the_packs_latent(env: SimpleNamespace, stage_c, prompts,
                                                                  baseline) -> None:
    (model,) = env.node("SCW_StageCToModel", stage_c=stage_c)
    assert type(model).__name__ == "ScwModelPatcher" and model.model.diffusion_model is stage_c.module
    core = _ksampler(env, model, prompts.pos, prompts.neg, prompts.c)
    assert core.shape == prompts.c["samples"].shape and core.std() > 0.1
    _close(core, baseline, what="KSampler on the pack's Stage C vs the pack's sampler", **SAME_MATH)


def test_sampler_custom_advanced_and_model_sampling_patch_on_the_packs_stage_c(env: SimpleNamespace, stage_c, prompts,
                                                                              baseline) -> None:
    """Core's model-patching node (ModelSamplingStableCascade, shift 3) and SamplerCustomAdvanced on the MODEL give
    the pack's sampler at shift 3."""
    (model,) = env.node("SCW_StageCToModel", stage_c=stage_c)
    (shifted,) = env.node("ModelSamplingStableCascade", model=model, shift=3.0)
    (sigmas,) = env.node("BasicScheduler", model=shifted, scheduler="simple", steps=STEPS, denoise=1.0)
    (sampler,) = env.node("KSamplerSelect", sampler_name="euler")
    (guider,) = env.node("CFGGuider", model=shifted, positive=prompts.pos, negative=prompts.neg, cfg=CFG)
    (noise,) = env.node("RandomNoise", noise_seed=SEED)
    out, _ = env.node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=prompts.c)
    pack = _pack_c(env, stage_c, prompts, shift=3.0)
    _close(out["samples"], pack, what="SamplerCustomAdvanced at shift 3 vs the pack's sampler", **SAME_MATH)
    assert (baseline - pack).abs().max() > 0.05, "shift 3 and shift 2 agree: the comparison would prove nothing"


def test_core_ksampler_on_the_packs_stage_b_gives_the_packs_latent(env: SimpleNamespace, prompts) -> None:
    """Stage B in core's storage convention: core's StableCascade_StageB_Conditioning carries the Stage C latent;
    core's SC_B latent format and the pack's /0.43 are the same scaling."""
    (stage_b,) = env.node("SCW_StageBLoader", file_name=STAGE_B_FILE, weight_dtype="fp32")
    prior = {"samples": torch.randn(prompts.c["samples"].shape, generator=torch.Generator().manual_seed(3))}
    (positive,) = env.node("StableCascade_StageB_Conditioning", conditioning=prompts.pos, stage_c=prior)
    (model,) = env.node("SCW_StageBToModel", stage_b=stage_b)
    core = _ksampler(env, model, positive, prompts.neg, prompts.b, cfg=1.5)
    (pack,) = env.node("SCW_StageBSampler", stage_b=stage_b, positive=positive, negative=prompts.neg, stage_c=prior,
                       latent=prompts.b, seed=SEED, steps=STEPS, cfg=1.5, shift=1.0, sampler="euler", rescale=0.0,
                       denoise=1.0, scheduler="simple")
    assert core.std() > 0.05
    _close(core, pack["samples"], what="KSampler on the pack's Stage B vs the pack's sampler", **SAME_MATH)


def test_the_packs_lora_goes_along_and_comfyui_never_mixes_the_two_patchers(env: SimpleNamespace, stage_c, prompts,
                                                                           baseline) -> None:
    """A LoRA'd handle's MODEL samples what the pack samples with the LoRA; and after the pack's LoRA'd clone ran,
    the plain MODEL of the same network gives its plain result again (ComfyUI's loader keeps per-layer 'patched'
    flags on the shared layers: without the pack's eviction the LoRA would stay in the weights)."""
    (plain_model,) = env.node("SCW_StageCToModel", stage_c=stage_c)
    plain = _ksampler(env, plain_model, prompts.pos, prompts.neg, prompts.c)
    (lora_c,) = env.node("SCW_LoraLoaderModelOnly", stage_c=stage_c, file_name="style_lora.safetensors",
                         strength_model=1.0)
    (lora_model,) = env.node("SCW_StageCToModel", stage_c=lora_c)
    assert set(lora_model.patches) == {"diffusion_model." + k for k in lora_c.patcher.patches}
    core_lora = _ksampler(env, lora_model, prompts.pos, prompts.neg, prompts.c)
    with_lora = _pack_c(env, lora_c, prompts)  # now the pack's own patcher holds the network, LoRA applied
    _close(core_lora, with_lora, what="KSampler on the LoRA'd Stage C vs the pack's sampler with the LoRA",
           **SAME_MATH)
    assert (with_lora - baseline).abs().max() > 0.05, "the LoRA changed nothing: the test would prove nothing"
    again = _ksampler(env, plain_model, prompts.pos, prompts.neg, prompts.c)
    assert torch.equal(again, plain), f"the plain MODEL computed with the LoRA left in: {(again - plain).abs().max()}"


def test_the_packs_controlnet_is_refused_by_name(env: SimpleNamespace, stage_c) -> None:
    controlled = stage_c.with_attachment("scw_controlnet", SimpleNamespace(handles=lambda: [], memory=lambda: 0))
    with pytest.raises(env.pack.cascade.errors.CascadeError, match="ControlNet"):
        env.node("SCW_StageCToModel", stage_c=controlled)


# ----------------------------------------------------------------------------- core MODEL / CLIP / VAE -> pack


@pytest.fixture()
def tiny_detection(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Core detects only the released Stage C/B sizes; this adds the tiny file's sizes to core's answer (the pack's
    config inference on the same keys: core's StageC/StageB take the same hyper-parameter names)."""
    import comfy.model_detection as md

    keymaps, stage_c, stage_b = (importlib.import_module(f"{env.pack.__name__}.cascade.{m}")
                                 for m in ("keymaps", "stage_c", "stage_b"))
    detect = md.detect_unet_config

    def with_tiny_sizes(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        stage = config.get("stable_cascade_stage") if isinstance(config, dict) else None
        if stage is None or "c_hidden" in config or config.get("c_cond"):
            return config
        sd = {k[len(key_prefix):]: v for k, v in state_dict.items() if k.startswith(key_prefix)}
        sd, _ = keymaps.to_original(f"stage_{stage}", sd)
        found = (stage_c.StageCConfig if stage == "c" else stage_b.StageBConfig).from_state_dict(sd)
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(found).items()}
        if stage == "c":
            fields["switch_level"] = [fields["switch_level"]]  # core's Stage C takes a list
        else:
            fields.pop("switch_level", None)  # core's Stage B has no such parameter
        return {**config, **fields}

    monkeypatch.setattr(md, "detect_unet_config", with_tiny_sizes)


def test_pack_sampler_on_a_core_loaded_stage_c(env: SimpleNamespace, prompts, baseline, tiny_detection) -> None:
    """UNETLoader's Stage C (core's network) in the pack's sampler = the all-pack graph on the same file and = the
    all-core graph (core's KSampler on the core MODEL), euler / simple."""
    (core_model,) = env.node("UNETLoader", unet_name=STAGE_C_FILE, weight_dtype="default")
    assert type(core_model.model).__name__ == "StableCascade_C"
    assert type(core_model.model.diffusion_model).__module__.startswith("comfy.ldm.cascade")
    (from_core,) = env.node("SCW_StageCFromModel", model=core_model)
    ours = _pack_c(env, from_core, prompts)
    # Two implementations of one network (core's split q/k/v attention vs the pack's packed one).
    _close(ours, baseline, what="pack sampler: core's Stage C vs the pack's", **SAME_MATH)
    all_core = _ksampler(env, core_model, prompts.pos, prompts.neg, prompts.c)
    _close(ours, all_core, what="pack sampler on core's MODEL vs KSampler", **SAME_MATH)


def test_pack_sampler_on_a_core_loaded_stage_b(env: SimpleNamespace, prompts, tiny_detection) -> None:
    (core_model,) = env.node("UNETLoader", unet_name=STAGE_B_FILE, weight_dtype="default")
    (from_core,) = env.node("SCW_StageBFromModel", model=core_model)
    (pack_b,) = env.node("SCW_StageBLoader", file_name=STAGE_B_FILE, weight_dtype="fp32")
    prior = {"samples": torch.randn(prompts.c["samples"].shape, generator=torch.Generator().manual_seed(4))}
    kw = dict(positive=prompts.pos, negative=prompts.neg, stage_c=prior, latent=prompts.b, seed=SEED, steps=4,
              cfg=1.1, shift=1.0, sampler="ddpm", rescale=0.7, denoise=1.0)
    (a,) = env.node("SCW_StageBSampler", stage_b=from_core, **kw)
    (b,) = env.node("SCW_StageBSampler", stage_b=pack_b, **kw)
    assert a["samples"].std() > 0.01
    _close(a["samples"], b["samples"], what="core's Stage B vs the pack's in the pack's sampler", **SAME_MATH)


def test_controlnet_additions_mean_the_same_in_both_directions(env: SimpleNamespace, stage_c, tiny_detection) -> None:
    """Core's ControlNets hand its Stage C a ``control["input"]`` list that it pops from the end; the pack's network
    reads ``cnet`` in ResBlock order. Core's network with a control dict = the pack's MODEL with the same dict, and
    the pack's view of core's network with a cnet list = the pack's network with that list."""
    (core_model,) = env.node("UNETLoader", unet_name=STAGE_C_FILE, weight_dtype="default")
    (pack_model,) = env.node("SCW_StageCToModel", stage_c=stage_c)
    (view,) = env.node("SCW_StageCFromModel", model=core_model)
    env.pack.host.load([view])
    g = torch.Generator().manual_seed(9)
    cfg = stage_c.module.config
    conds = {"clip_text": torch.randn(1, 77, cfg.c_clip_text, generator=g),
             "clip_text_pooled": torch.randn(1, 1, cfg.c_clip_text_pooled, generator=g),
             "clip_img": torch.randn(1, 1, cfg.c_clip_img, generator=g)}
    calls = sum(b * r for b, r in zip(cfg.blocks[0] + cfg.blocks[1], cfg.block_repeat[0] + cfg.block_repeat[1]))
    cnet = [torch.randn(1, cfg.c_hidden[0], 3, 3, generator=g) if i % 2 == 0 else None for i in range(calls)]
    x, sigma = torch.randn(1, 16, 6, 6, generator=g), torch.tensor([1.5])

    def apply(model: Any, control: Any) -> torch.Tensor:
        env.mm.load_models_gpu([model])
        return model.model.apply_model(x, sigma, control=control, **conds)

    core_out = apply(core_model, {"input": cnet[::-1]})
    pack_out = apply(pack_model, {"input": cnet[::-1]})
    assert (apply(pack_model, None) - pack_out).abs().max() > 0.05, "the control additions changed nothing"
    _close(pack_out, core_out, what="a core control dict: the pack's MODEL vs core's", **SAME_MATH)
    r = torch.tensor([0.4])
    env.pack.host.load([view])
    through_view = view.module(x, r, cnet=list(cnet), **conds)
    _close(through_view, stage_c.module(x, r, cnet=list(cnet), **conds),
           what="a cnet list: core's network through the view vs the pack's network", **SAME_MATH)


def test_a_stage_b_model_is_refused_as_stage_c(env: SimpleNamespace, tiny_detection) -> None:
    (core_model,) = env.node("UNETLoader", unet_name=STAGE_B_FILE, weight_dtype="default")
    with pytest.raises(env.pack.cascade.errors.StageMismatchError, match="got a Stable Cascade Stage B"):
        env.node("SCW_StageCFromModel", model=core_model)


def test_core_clip_in_the_packs_text_encode_equals_the_packs_encoder(env: SimpleNamespace) -> None:
    """core's CLIP (CLIPLoader's function, type stable_cascade) in the pack's text encode = the pack's encoder on
    the same file. Core tells CLIP-G by a 31st layer, so the file has 31 narrow layers; its sizes go to core through
    load_clip's model_options["model_config"] (core merges it into the CLIP-G config it builds). Core keeps text
    encoders in fp16 by default (model_management.text_encoder_dtype, also on the CPU); float32, as core's
    --fp32-text-enc gives, makes it the same math as the pack's float32 encoder (fp16 differs by ~1e-3)."""
    import comfy.sd
    from safetensors.torch import save_file

    text, random_init = (importlib.import_module(f"{env.pack.__name__}.cascade.{m}") for m in ("text", "random_init"))
    cfg = dataclasses.replace(text.TextEncoderConfig.tiny(), num_layers=31)
    encoder = random_init.randomize_(text.TextEncoder(cfg), seed=7)
    name = "clip_g_31_layers.safetensors"
    path = os.path.join(env.layout.models["text_encoders"], name)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, path)
    sizes = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "projection_dim": cfg.projection_dim}
    clip = comfy.sd.load_clip([path], clip_type=comfy.sd.CLIPType.STABLE_CASCADE,
                              model_options={"model_config": sizes, "dtype": torch.float32})
    (from_core,) = env.node("SCW_TextEncoderFromClip", clip=clip)
    (pack_te,) = env.node("SCW_TextEncoderLoader", file_name=name, weight_dtype="fp32")
    for prompt in ("a fox in the snow", ""):
        (ours,) = env.node("SCW_TextEncode", text_encoder=pack_te, text=prompt)
        (theirs,) = env.node("SCW_TextEncode", text_encoder=from_core, text=prompt)
        assert theirs[0][0].shape == ours[0][0].shape == (1, 77, cfg.hidden_size)
        assert ours[0][0].std() > 0.1
        _close(theirs[0][0], ours[0][0], what=f"clip_text of {prompt!r}", **SAME_MATH)
        _close(theirs[0][1]["pooled_output"], ours[0][1]["pooled_output"].reshape(1, -1),
               what=f"pooled_output of {prompt!r}", **SAME_MATH)
    with pytest.raises(env.pack.cascade.errors.CascadeError, match="type stable_cascade"):
        env.node("SCW_TextEncoderFromClip", clip=SimpleNamespace(cond_stage_model=torch.nn.Linear(1, 1)))


@pytest.fixture(scope="module")
def release_stage_a(env: SimpleNamespace) -> str:
    """A random Stage A of the release's size (core's VAE builds only that one) in the vae folder; its name."""
    from safetensors.torch import save_file

    stage_a, random_init = (importlib.import_module(f"{env.pack.__name__}.cascade.{m}")
                            for m in ("stage_a", "random_init"))
    net = random_init.randomize_(stage_a.StageA(stage_a.StageAConfig()), seed=5)
    name = "stage_a_release_size.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(env.layout.models["vae"], name))
    return name


def test_core_vae_in_the_packs_decode_equals_the_packs_stage_a(env: SimpleNamespace, release_stage_a: str) -> None:
    (vae,) = env.node("VAELoader", vae_name=release_stage_a)
    (from_core,) = env.node("SCW_StageAFromVae", vae=vae)
    (pack_a,) = env.node("SCW_StageALoader", file_name=release_stage_a, weight_dtype="fp32")
    latent = {"samples": torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(6))}
    (theirs,) = env.node("SCW_StageADecode", stage_a=from_core, latent=latent)
    (ours,) = env.node("SCW_StageADecode", stage_a=pack_a, latent=latent)
    assert ours.shape == (1, 48, 64, 3) and ours.std() > 0.01
    # One network design in two implementations; measured: identical.
    _close(theirs, ours, rtol=1e-4, atol=1e-4, what="Stage A decode with core's network vs the pack's")
    (core_image,) = env.node("VAEDecode", vae=vae, samples=latent)
    _close(theirs, core_image.clamp(0, 1), rtol=1e-4, atol=1e-4, what="vs core's VAEDecode")
    with pytest.raises(env.pack.cascade.errors.CascadeError, match="Stage A"):
        env.node("SCW_StageAFromVae", vae=SimpleNamespace(first_stage_model=torch.nn.Linear(1, 1)))


def test_packaged_stage_b_from_checkpoint_loader_into_the_packs_sampler_and_decode(
        env: SimpleNamespace, prompts, tiny_detection, release_stage_a: str) -> None:
    """CheckpointLoaderSimple with a Stage B file in ComfyUI's packaged layout (Stage B under model.diffusion_model.,
    Stage A under vae.): its MODEL and VAE in the pack's Stage B sampler and Stage A decode = the pack's own loaders
    on the same weights."""
    import folder_paths
    import tiny_checkpoints as tc
    from safetensors.torch import load_file

    folder = os.path.join(env.layout.base, "models", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path("checkpoints", folder)
    sd_b = load_file(os.path.join(env.layout.models["diffusion_models"], STAGE_B_FILE))
    sd_a = load_file(os.path.join(env.layout.models["vae"], release_stage_a))
    name = "stable_cascade_stage_b_tiny.safetensors"
    tc.save(tc.Path(folder) / name, tc.packaged_b(sd_b, sd_a, split_attention=True))
    model, _, vae = env.node("CheckpointLoaderSimple", ckpt_name=name)
    (core_b,) = env.node("SCW_StageBFromModel", model=model)
    (core_a,) = env.node("SCW_StageAFromVae", vae=vae)
    (pack_b,) = env.node("SCW_StageBLoader", file_name=STAGE_B_FILE, weight_dtype="fp32")
    (pack_a,) = env.node("SCW_StageALoader", file_name=release_stage_a, weight_dtype="fp32")
    prior = {"samples": torch.randn(prompts.c["samples"].shape, generator=torch.Generator().manual_seed(8))}
    kw = dict(positive=prompts.pos, negative=prompts.neg, stage_c=prior, latent=prompts.b, seed=SEED, steps=3,
              cfg=1.1, shift=1.0, sampler="ddpm", rescale=0.7, denoise=1.0)
    images = []
    for stage_b, stage_a in ((core_b, core_a), (pack_b, pack_a)):
        (latent,) = env.node("SCW_StageBSampler", stage_b=stage_b, **kw)
        images.append((latent["samples"], env.node("SCW_StageADecode", stage_a=stage_a, latent=latent)[0]))
    (core_latent, core_image), (pack_latent, pack_image) = images
    _close(core_latent, pack_latent, what="Stage B from the packaged checkpoint vs the pack's loader", **SAME_MATH)
    assert pack_image.std() > 0.01
    _close(core_image, pack_image, rtol=1e-4, atol=1e-4, what="the decoded images")
