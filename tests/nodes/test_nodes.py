"""The nodes: declared schemas (C1-C4), latent sizes, conditioning format, loaders, edge validation and errors.

Networks are the loaders' tiny random demo networks or tiny random ones saved as safetensors here; nothing
below checks image quality, only what each node promises about its sockets.
"""

import dataclasses
import inspect
import logging
import os

import pytest
import torch
import tiny_checkpoints as tc
from safetensors.torch import save_file

from comfyui_stablecascade import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from comfyui_stablecascade.cascade.errors import CascadeError, StageMismatchError
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.nodes import common, conditioning, decode, image, latents, loaders, sampling
from comfyui_stablecascade.nodes.common import DEMO_CHOICE
from comfyui_stablecascade.nodes.kinds import demo_network
from comfyui_stablecascade.pipeline import STAGE_B, STAGE_C
from comfyui_stablecascade.pipeline.conditioning import merge_entries
from comfyui_stablecascade.pipeline.latents import DEFAULT_COMPRESSION, EMPTY_LATENT_RANGES, latent_samples
from comfyui_stablecascade.pipeline.settings import SETTING_RANGES
from comfyui_stablecascade.samplers.sampling import SAMPLERS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/nodes/ -> the repo
NUMERIC = ("INT", "FLOAT")
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture
def models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def _all_inputs(cls):
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


# ---- schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_schema_conventions(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("SCW_") and not node_id.startswith("StableCascade_")
    assert cls.NODE_ID == node_id
    # Findable: searching "cascade" or "stable cascade" in the node library finds every node of the pack.
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Stable Cascade ")
    assert "Cascade Cascade" not in NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert "(SCW)" not in NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].isascii()
    assert cls.CATEGORY.startswith("Stable Cascade/") and cls.CATEGORY.count("/") == 1
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    # An output node (e.g. the LoRA save node) may return nothing, as core's SaveImage; every other node returns.
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) >= (0 if getattr(cls, "OUTPUT_NODE", False) else 1)
    core = ("MODEL",) if cls.CATEGORY.endswith("core interop") else ()  # nodes/interop.py hands core a MODEL
    core += ("INT",) if cls.CATEGORY.endswith("/training") else ()  # the trainer's step count
    for t in cls.RETURN_TYPES:
        assert t in ("LATENT", "CONDITIONING", "IMAGE", "MASK", *core) or t.startswith("SCW_"), t
    assert callable(getattr(cls, cls.FUNCTION))
    assert "__init__" not in vars(cls), "nodes keep no state on instances"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_input_declares_tooltip_and_ranges(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    inputs = _all_inputs(cls)
    assert inputs
    for name, spec in inputs.items():
        kind, options = spec[0], spec[1]
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if kind in NUMERIC:
            for key in ("default", "min", "max", "step"):
                assert key in options, f"{node_id}.{name} lacks {key}"
            assert options["min"] <= options["default"] <= options["max"]
        elif isinstance(kind, list):
            assert kind and options.get("default", kind[0]) in kind
        elif kind not in WIDGETS:
            # MODEL, CLIP and VAE: only the core-interop nodes (nodes/interop.py), which convert them.
            core = ("MODEL", "CLIP", "VAE") if cls.CATEGORY.endswith("core interop") else ()
            assert kind in ("LATENT", "CONDITIONING", "IMAGE", "MASK", *core) or kind.startswith("SCW_"), kind


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_functions_only_translate(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    lines = inspect.getsource(getattr(cls, cls.FUNCTION)).splitlines()
    assert len(lines) <= 25, f"{node_id}.{cls.FUNCTION} is {len(lines)} lines (C3: at most 25)"


SCHEDULE = ("steps", "cfg", "shift", "sampler", "rescale", "denoise")


def test_sampler_defaults_are_the_notebooks():
    """The widgets show the pipeline's settings (pipeline.STAGE_C / STAGE_B, the notebooks' values)."""
    c = _all_inputs(sampling.StageCSampler)
    b = _all_inputs(sampling.StageBSampler)
    assert {k: c[k][1]["default"] for k in SCHEDULE} == {k: getattr(STAGE_C, k) for k in SCHEDULE}
    assert {k: b[k][1]["default"] for k in SCHEDULE} == {k: getattr(STAGE_B, k) for k in SCHEDULE}
    assert c["sampler"][0] == b["sampler"][0] == list(SAMPLERS)
    cascade = _all_inputs(sampling.CascadeSampler)
    assert [cascade[k][1]["default"] for k in ("c_steps", "c_cfg", "b_steps", "b_cfg")] == [
        STAGE_C.steps, STAGE_C.cfg, STAGE_B.steps, STAGE_B.cfg]


def test_loader_folders_and_dtype_option():
    assert loaders.StageCLoader.FOLDERS == loaders.StageBLoader.FOLDERS == ("diffusion_models", "unet")
    assert loaders.StageALoader.FOLDERS == loaders.EffNetLoader.FOLDERS == loaders.PreviewerLoader.FOLDERS == ("vae",)
    assert loaders.TextEncoderLoader.FOLDERS == ("text_encoders", "clip")
    assert loaders.PackagedCheckpointLoader.FOLDERS == ("checkpoints",)
    assert _all_inputs(loaders.StageCLoader)["weight_dtype"][0] == list(common.WEIGHT_DTYPES)
    assert set(common.WEIGHT_DTYPES) == {"default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"}


# ---- latents ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,compression,c_hw,b_hw", [
    (1024, 1024, 42.67, (24, 24), (256, 256)),
    (1024, 680, 42.67, (16, 24), (170, 256)),
    (1024, 1024, 32.0, (32, 32), (256, 256)),
    (1536, 1024, 42.67, (24, 36), (256, 384)),
])
def test_empty_latent_sizes(width, height, compression, c_hw, b_hw):
    stage_c, stage_b = latents.EmptyLatent().generate(width, height, 2, compression)
    assert stage_c["samples"].shape == (2, 16, *c_hw) and stage_c["scw_stage"] == "c"
    assert stage_b["samples"].shape == (2, 4, *b_hw) and stage_b["scw_stage"] == "b"
    assert not stage_c["samples"].any() and not stage_b["samples"].any()


def test_empty_latent_rounds_to_multiple_of_8_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        _, stage_b = latents.EmptyLatent().generate(1021, 1024, 1, DEFAULT_COMPRESSION)
    assert stage_b["samples"].shape[-1] == 1024 // 4
    assert "width 1021 is not a multiple of 8; using 1024" in caplog.text
    with caplog.at_level(logging.WARNING):
        _, stage_b = latents.EmptyLatent().generate(1024, 1019, 1, DEFAULT_COMPRESSION)
    assert stage_b["samples"].shape[-2] == 1016 // 4


# ---- conditioning -----------------------------------------------------------------------------------


def test_text_encode_gives_core_conditioning_format():
    encoder = host.wrap(demo_network("text_encoder"), "text_encoder")
    (cond,) = conditioning.TextEncode().encode(encoder, "a red fox in the snow")
    assert isinstance(cond, list) and len(cond) == 1
    clip_text, extra = cond[0]
    width = encoder.module.config.hidden_size
    assert clip_text.shape == (1, 77, width) and clip_text.dtype == torch.float32
    assert set(extra) == {"pooled_output"}
    assert extra["pooled_output"].shape == (1, encoder.module.config.projection_dim)
    (again,) = conditioning.TextEncode().encode(encoder, "a red fox in the snow")
    torch.testing.assert_close(again[0][0], clip_text, rtol=0, atol=0)
    (other,) = conditioning.TextEncode().encode(encoder, "")
    assert not torch.equal(other[0][0], clip_text)


def test_missing_text_encoder_is_a_clear_error():
    absent = common.Absent("text_encoder", "stable_cascade_stage_b.safetensors", "stage_a, stage_b")
    with pytest.raises(CascadeError, match=r"needs a text encoder, but 'stable_cascade_stage_b.safetensors' does "
                                           r"not contain one \(it holds stage_a, stage_b\) - connect 'Stable Cascade "
                                           r"Load Text Encoder'"):
        conditioning.TextEncode().encode(absent, "a fox")
    with pytest.raises(CascadeError, match="Stable Cascade Text Encode: input 'text_encoder' needs a text encoder "
                                           "and got "
                                           "nothing - connect"):
        conditioning.TextEncode().encode(None, "a fox")


def test_combined_conditioning_is_merged_for_the_samplers():
    a = [[torch.randn(1, 77, 8), {"pooled_output": torch.ones(1, 8)}]]
    b = [[torch.randn(1, 77, 8), {"pooled_output": 3 * torch.ones(1, 8)}]]
    assert merge_entries(a) is a
    (merged,) = merge_entries(a + b)  # what core's ConditioningCombine gives
    assert torch.equal(merged[0], torch.cat([a[0][0], b[0][0]], dim=1))
    assert torch.equal(merged[1]["pooled_output"], 2 * torch.ones(1, 8))


def _demo_cond(text, encoder):
    return conditioning.TextEncode().encode(encoder, text)[0]


def test_samplers_run_on_core_combined_conditioning_and_cascade_node_matches_the_pair():
    encoder = host.wrap(demo_network("text_encoder"), "text_encoder")
    stage_c = host.wrap(demo_network("stage_c"), "stage_c")
    stage_b = host.wrap(demo_network("stage_b"), "stage_b")
    positive, negative = _demo_cond("a fox", encoder), _demo_cond("", encoder)
    c_latent, b_latent = latents.EmptyLatent().generate(256, 256, 1, DEFAULT_COMPRESSION)
    combined = positive + _demo_cond("snow", encoder)
    (out_c,) = sampling.StageCSampler().sample(stage_c, combined, negative, c_latent, 1, 2, 4.0, 2.0, "ddpm", 0.7, 1.0)
    assert out_c["samples"].shape == (1, 16, 6, 6) and out_c["scw_stage"] == "c"
    assert torch.isfinite(out_c["samples"]).all()
    (pc,) = sampling.StageCSampler().sample(stage_c, positive, negative, c_latent, 5, 2, 4.0, 2.0, "ddpm", 0.7, 1.0)
    # The cascade node samples Stage B with the official shift and rescale (STAGE_B's).
    (pb,) = sampling.StageBSampler().sample(stage_b, positive, negative, pc, b_latent, 5, 2, 1.1, STAGE_B.shift,
                                            "ddpm", STAGE_B.rescale, 1.0)
    both = sampling.CascadeSampler().sample(stage_c, stage_b, positive, negative, c_latent, b_latent, 5, "ddpm",
                                            2, 4.0, 2, 1.1)
    assert torch.equal(both[0]["samples"], pc["samples"]) and torch.equal(both[1]["samples"], pb["samples"])
    assert pb["samples"].shape == (1, 4, 64, 64) and pb["scw_stage"] == "b"


def test_stage_c_sampler_previews_with_a_previewer():
    encoder = host.wrap(demo_network("text_encoder"), "text_encoder")
    cond = _demo_cond("a fox", encoder)
    c_latent, _ = latents.EmptyLatent().generate(256, 256, 1, DEFAULT_COMPRESSION)
    seen = []
    host.set_progress_hook(lambda value, total, preview: seen.append((value, total, preview)))
    try:
        sampling.StageCSampler().sample(host.wrap(demo_network("stage_c"), "stage_c"), cond, cond, c_latent, 0, 2,
                                        4.0, 2.0, "ddpm", 0.7, 1.0, previewer=host.wrap(demo_network("previewer"),
                                                                                          "previewer"))
    finally:
        host.set_progress_hook(None)
    assert [(v, t) for v, t, _ in seen] == [(1, 2), (2, 2)]
    assert all(p is not None and p.size == (48, 48) for _, _, p in seen)


# ---- validation and bad inputs ------------------------------------------------------------------------


def test_denoise_range_matches_the_sampler():
    """The runner needs 0 < denoise <= 1 and runs `steps` steps from there (ComfyUI's meaning), so the only
    rule is the declared range: no cross-field rule, no VALIDATE_INPUTS on the samplers."""
    for cls in (sampling.StageCSampler, sampling.StageBSampler):
        spec = _all_inputs(cls)["denoise"][1]
        assert 0 < spec["min"] <= 0.01 and spec["max"] == 1.0
        assert not hasattr(cls, "VALIDATE_INPUTS")


def test_stage_b_latent_into_stage_c_sampler_is_named():
    _, stage_b = latents.EmptyLatent().generate(1024, 1024, 1, DEFAULT_COMPRESSION)
    cond = [[torch.zeros(1, 77, 64), {"pooled_output": torch.zeros(1, 64)}]]
    model = host.wrap(demo_network("stage_c"), "stage_c")
    with pytest.raises(StageMismatchError, match=r"Stage B latent of shape \(1, 4, 256, 256\).*connect the stage_c "
                                                 "output of 'Stable Cascade Empty Latent'"):
        sampling.StageCSampler().sample(model, cond, cond, stage_b, 0, 2, 4.0, 2.0, "ddpm", 0.7, 1.0)


def test_untagged_latent_checked_by_channels():
    core_latent = {"samples": torch.zeros(1, 4, 24, 24)}  # core's latents carry no scw_stage tag
    with pytest.raises(StageMismatchError, match=r"SCW_StageCSampler latent: got a Stage B latent \(4 channels\).*"
                                                 "Stage C needs B x 16 x h x w"):
        latent_samples(core_latent, "c", "SCW_StageCSampler latent")
    assert latent_samples({"samples": torch.zeros(1, 16, 24, 24)}, "c", "x").shape[1] == 16


def test_stage_c_latent_into_stage_a_decode_is_named():
    stage_c, _ = latents.EmptyLatent().generate(1024, 1024, 1, DEFAULT_COMPRESSION)
    model = host.wrap(demo_network("stage_a"), "stage_a")
    with pytest.raises(StageMismatchError, match="Stage C latent .* connect the stage_b output"):
        decode.StageADecode().decode(model, stage_c)


# ---- loaders ----------------------------------------------------------------------------------------


def test_empty_folders_offer_the_demo_network(models):
    for cls in (loaders.StageCLoader, loaders.StageALoader, loaders.TextEncoderLoader,
                loaders.PackagedCheckpointLoader):
        assert _all_inputs(cls)["file_name"][0] == [DEMO_CHOICE]


def test_demo_networks_fit_together_and_warn(caplog):
    with caplog.at_level(logging.WARNING):
        result = loaders.StageCLoader().load(DEMO_CHOICE, "default")
    # The run's outputs say so: the loader's ui text (shown on the node by web/scw_results.js, kept in the history).
    (notice,) = result["ui"]["text"]
    assert "tiny random demo network" in notice and "models/diffusion_models/" in notice
    (handle,) = result["result"]
    assert handle.kind == "stage_c" and isinstance(handle.module, StageC)
    assert "TINY RANDOM Stage C" in caplog.text and "models/diffusion_models/" in caplog.text
    text = demo_network("text_encoder").config
    assert handle.module.config.c_clip_text == text.hidden_size
    assert handle.module.config.c_clip_text_pooled == text.projection_dim
    a = [p.clone() for p in demo_network("stage_c").parameters()]
    b = list(demo_network("stage_c").parameters())
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "demo weights are seeded"


def test_stage_c_loader_reads_a_file_and_applies_dtype(models):
    cfg = dataclasses.replace(StageCConfig.tiny(), c_clip_text=64, c_clip_text_pooled=64)
    torch.manual_seed(0)
    sd = {k: v.to(torch.bfloat16) for k, v in StageC(cfg).state_dict().items()}
    save_file(sd, str(models / "diffusion_models" / "tiny_c.safetensors"))
    choices = _all_inputs(loaders.StageCLoader)["file_name"][0]
    assert choices == ["tiny_c.safetensors", DEMO_CHOICE]  # the demo stays an explicit choice
    (handle,) = loaders.StageCLoader().load("tiny_c.safetensors", "default")
    assert next(handle.module.parameters()).dtype == torch.bfloat16
    (handle,) = loaders.StageCLoader().load("tiny_c.safetensors", "fp32")
    assert next(handle.module.parameters()).dtype == torch.float32
    assert handle.module.config == cfg
    with pytest.raises(CascadeError, match="missing.safetensors"):
        loaders.StageCLoader().load("missing.safetensors", "default")


def test_packaged_demo_fills_every_output():
    outputs = loaders.PackagedCheckpointLoader().load(DEMO_CHOICE, "default")["result"]
    assert [h.kind for h in outputs] == list(loaders.PACKAGED_OUTPUTS)
    assert loaders.PackagedCheckpointLoader.RETURN_TYPES == (
        "SCW_STAGE_C", "SCW_TEXT_ENCODER", "SCW_EFFNET", "SCW_PREVIEWER", "SCW_CLIP_VISION", "SCW_STAGE_B",
        "SCW_STAGE_A")


def test_packaged_stage_b_file_gives_b_and_a_and_names_what_it_lacks(models):
    sd = tc.packaged_b(tc.tiny_sd("stage_b"), tc.tiny_sd("stage_a"))
    tc.save(models / "checkpoints" / "stable_cascade_stage_b.safetensors", sd)
    outputs = dict(zip(loaders.PackagedCheckpointLoader.RETURN_NAMES,
                       loaders.PackagedCheckpointLoader().load("stable_cascade_stage_b.safetensors", "default")))
    assert outputs["stage_b"].kind == "stage_b" and outputs["stage_a"].kind == "stage_a"
    absent = [name for name, value in outputs.items() if isinstance(value, common.Absent)]
    assert absent == ["stage_c", "text_encoder", "effnet", "previewer", "clip_vision"]
    with pytest.raises(CascadeError, match=r"input 'text_encoder' needs a text encoder, but "
                                           r"'stable_cascade_stage_b.safetensors' does not contain one \(it holds "
                                           r"stage_a, stage_b\)"):
        conditioning.TextEncode().encode(outputs["text_encoder"], "a fox")


# ---- decode -----------------------------------------------------------------------------------------


def test_decoders_return_images_in_range():
    _, stage_b = latents.EmptyLatent().generate(256, 256, 2, DEFAULT_COMPRESSION)
    stage_b["samples"] = torch.randn(2, 4, 64, 64) * 3
    stage_a = host.wrap(demo_network("stage_a"), "stage_a")
    (image,) = decode.StageADecode().decode(stage_a, stage_b)
    assert image.shape == (2, 256, 256, 3) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    previewer = host.wrap(demo_network("previewer"), "previewer")
    (preview,) = decode.PreviewerDecode().decode(previewer, {"samples": torch.randn(1, 16, 6, 6)})
    assert preview.shape == (1, 48, 48, 3) and preview.min() >= 0 and preview.max() <= 1


def test_nodes_md_names_every_node_and_input():
    path = os.path.join(ROOT, "docs", "NODES.md")
    with open(path, encoding="utf-8") as f:
        sections = f.read().split("\n### ")
    by_id = {s.split("`")[1]: s for s in sections[1:]}
    assert set(by_id) == set(NODE_CLASS_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        for name in _all_inputs(cls):
            assert f"| `{name}`" in by_id[node_id], f"docs/NODES.md: {node_id} lacks input {name}"
        for name in cls.RETURN_NAMES:
            assert f"`{name}` (" in by_id[node_id], f"docs/NODES.md: {node_id} lacks output {name}"


# ---- one table of ranges, non-finite outputs --------------------------------------------------------------


@pytest.mark.parametrize("cls", [sampling.StageCSampler, sampling.StageBSampler, image.StageCImageToImage])
def test_sampler_widget_ranges_are_the_table_the_api_checks(cls):
    inputs = _all_inputs(cls)
    for name, (low, high) in SETTING_RANGES.items():
        assert (inputs[name][1]["min"], inputs[name][1]["max"]) == (low, high), (cls.NODE_ID, name)
    cascade = _all_inputs(sampling.CascadeSampler)
    for name in ("steps", "cfg"):
        for prefix in ("c_", "b_"):
            assert (cascade[prefix + name][1]["min"], cascade[prefix + name][1]["max"]) == SETTING_RANGES[name]


def test_empty_latent_declares_the_range_empty_latents_enforces():
    inputs = _all_inputs(latents.EmptyLatent)
    for name, (low, high) in EMPTY_LATENT_RANGES.items():
        assert (inputs[name][1]["min"], inputs[name][1]["max"]) == (low, high), name
    with pytest.raises(CascadeError, match=r"width=0 is outside 256\.\.16384"):
        latents.EmptyLatent().generate(0, 1024, 1, DEFAULT_COMPRESSION)


def test_sampler_node_refuses_nan_cfg():
    _, stage_b = latents.EmptyLatent().generate(256, 256, 1, DEFAULT_COMPRESSION)
    stage_c, _ = latents.EmptyLatent().generate(256, 256, 1, DEFAULT_COMPRESSION)
    cond = [[torch.zeros(1, 77, 64), {"pooled_output": torch.zeros(1, 64)}]]
    model = host.wrap(demo_network("stage_b"), "stage_b")
    with pytest.raises(CascadeError, match="the Stage B sampler: cfg=nan is not a finite number"):
        sampling.StageBSampler().sample(model, cond, cond, stage_c, stage_b, 0, 2, float("nan"), 1.0, "ddpm", 0.7,
                                        1.0)


def _broken(kind: str) -> object:
    """A demo network of ``kind`` whose weights are NaN (a damaged file that loaded)."""
    module = demo_network(kind)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    return host.wrap(module, kind)


def test_decoders_refuse_to_turn_nan_into_a_black_image():
    _, stage_b = latents.EmptyLatent().generate(256, 256, 1, DEFAULT_COMPRESSION)
    with pytest.raises(CascadeError, match=r"Stage A decode: the decoded image .* NaN/inf values .*\(weights fp32\)"
                                           r".*download it again"):
        decode.StageADecode().decode(_broken("stage_a"), stage_b)
    with pytest.raises(CascadeError, match=r"Previewer decode: the preview image .* NaN/inf .*\(weights fp32\)"):
        decode.PreviewerDecode().decode(_broken("previewer"), {"samples": torch.zeros(1, 16, 4, 4)})
    # A NaN latent is refused before any network runs, with a message that does not guess a cause.
    stage_b["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CascadeError, match="Stage A decode latent: the latent holds 1 NaN/inf") as err:
        decode.StageADecode().decode(host.wrap(demo_network("stage_a"), "stage_a"), stage_b)
    assert "fp16" not in str(err.value)
