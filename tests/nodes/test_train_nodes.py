"""The training nodes end to end on the tiny demo networks (nodes/train.py, docs/TRAINING.md).

Dataset -> cache -> train -> save, then the saved file read back through the pack's LoRA loader must give the
trainer's own patched outputs; an interrupt keeps the partial LoRA and its state resumes to the uninterrupted
result; bad inputs stop with messages that name the value and the fix. The shipped dataset
(workflows/inputs/train_dataset, made by scripts/make_train_dataset.py) is copied to a tmp input folder so its
cache never lands in the repo. Steps are kept to a handful: the wiring is under test, not the learning.
"""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.nodes import train as T
from comfyui_stablecascade.nodes.kinds import demo_network
from comfyui_stablecascade.nodes.lora import LoraLoader, LoraLoaderModelOnly
from comfyui_stablecascade.pipeline.conditioning import encode_prompt
from comfyui_stablecascade.train import TrainingInputError
from comfyui_stablecascade.train.forward import StageCForward, weight_source
from comfyui_stablecascade.train.lora import StageCLora
from comfyui_stablecascade.train.tokens import LearnedTokens, parse_train_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET = os.path.join(ROOT, "workflows", "inputs", "train_dataset")
TOKENS = "[wurst]=^sausage</w>"
PROMPT = "a photo of [wurst] on the moon"


def widgets(**over):
    """The trainer's widget values: the node's defaults, a few steps, a fixed seed."""
    values = {name: spec[1]["default"] for name, spec in T.TrainLora.INPUT_TYPES()["required"].items()
              if spec[0] not in ("SCW_STAGE_C", "SCW_TEXT_ENCODER", "SCW_TRAIN_CACHE")}
    values.update(steps=3, warmup=1, learning_rate=1e-3, seed=5, preview_every=0)
    values.update(over)
    return values


@pytest.fixture(scope="module")
def nets():
    return {kind: host.wrap(demo_network(kind), kind) for kind in ("stage_c", "text_encoder", "effnet", "previewer")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_nodes")
    shutil.copytree(DATASET, base / "input" / "train_dataset")
    (base / "models" / "loras").mkdir(parents=True)
    host.set_io_dirs(str(base / "input"), str(base / "output"))
    host.set_models_dir(str(base / "models"))
    yield base
    host.set_io_dirs(None, None)
    host.set_models_dir(None)


@pytest.fixture(scope="module")
def dataset(folders):
    return T.TrainDataset().scan("train_dataset", "a photo of [wurst]", 256)[0]


@pytest.fixture(scope="module")
def cache(dataset, nets):
    return T.TrainCache().encode(dataset, nets["effnet"])[0]


@pytest.fixture(scope="module")
def cache_with_text(dataset, nets):
    return T.TrainCache().encode(dataset, nets["effnet"], nets["text_encoder"])[0]


@pytest.fixture(scope="module")
def official(nets, cache):
    """A 3-step LoRA with the learned token [wurst] (the trainer's outputs), and the base weights before it ran."""
    base = {k: v.clone() for k, v in nets["stage_c"].module.state_dict().items()}
    return T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(tokens=TOKENS)), base


# ---- pure helpers --------------------------------------------------------------------------------------------


def _dark_rows(img: np.ndarray) -> dict[int, float]:
    """column -> mean row of the running-mean line's pixels (the dark blue of loss_curve)."""
    mask = (np.abs(img - np.array([20, 60, 160]) / 255.0).max(axis=-1) < 0.08)
    mask[img.shape[0] - 28:] = False  # the legend below the plot is written in the same colour
    return {x: float(np.nonzero(mask[:, x])[0].mean()) for x in range(img.shape[1]) if mask[:, x].any()}


def test_loss_curve_is_an_image_whose_mean_line_falls_with_the_loss():
    image = T.loss_curve(list(np.linspace(2.0, 0.1, 40)))
    assert image.shape == (1, 256, 512, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    rows = _dark_rows(image[0].numpy())
    assert len(rows) > 100
    first, last = min(rows), max(rows)
    assert rows[first] < rows[last] - 100  # a falling loss is drawn from high (small row) to low
    rising = _dark_rows(T.loss_curve(list(np.linspace(0.1, 2.0, 40)))[0].numpy())
    assert rising[min(rising)] > rising[max(rising)] + 100
    # Non-finite losses (a NaN stop) still give an image, with a message instead of a curve.
    blank = T.loss_curve([float("nan")])
    assert blank.shape == (1, 256, 512, 3) and not _dark_rows(blank[0].numpy())


# ---- dataset and cache ---------------------------------------------------------------------------------------


def test_dataset_node_reads_an_input_subfolder_with_repeats_default_captions_and_buckets(dataset, folders):
    assert dataset.folder == str(folders / "input" / "train_dataset")
    by_name = {os.path.basename(s.path): s for s in dataset.samples}
    assert len(by_name) == 6 and len(dataset) == 7  # the kohya 2_closeup image counts twice
    assert by_name["wurst_closeup.png"].repeats == 2
    assert by_name["wurst_wide.png"].caption == "a photo of [wurst]"  # no .txt: the default caption
    assert by_name["wurst_red.png"].caption.startswith("a photo of [wurst], a red")
    assert {s.bucket for s in dataset.samples} == {(256, 256), (224, 320)}
    # An absolute path reads the same folder.
    again = T.TrainDataset().scan(str(folders / "input" / "train_dataset"), "a photo of [wurst]", 256)[0]
    assert [s.path for s in again.samples] == [s.path for s in dataset.samples]
    # ComfyUI reruns the node (IS_CHANGED differs) when a caption is edited, not only when a widget changes.
    before = T.TrainDataset.IS_CHANGED("train_dataset")
    assert T.TrainDataset.IS_CHANGED("train_dataset") == before
    caption = folders / "input" / "train_dataset" / "wurst_red.txt"
    text = caption.read_text(encoding="utf-8")
    caption.write_text(text + " edited", encoding="utf-8")
    try:
        assert T.TrainDataset.IS_CHANGED("train_dataset") != before
    finally:
        caption.write_text(text, encoding="utf-8")


def test_cache_holds_one_latent_per_image_and_text_only_when_an_encoder_is_connected(cache, cache_with_text):
    assert len(cache.samples) == 6 and sorted(cache.repeats) == [1, 1, 1, 1, 1, 2]
    assert {tuple(s.latent.shape) for s in cache.samples} == {(16, 8, 8), (16, 7, 10)}
    assert not cache.has_text and cache_with_text.has_text


# ---- train -> save -> load ------------------------------------------------------------------------------------


def _trainer_prediction(nets, result, settings, x, r):
    """The trainer's own patched output: its forward with the saved pairs and token rows loaded back."""
    net = nets["stage_c"].module
    lora = StageCLora(net, settings.rank, settings.alpha)
    lora.load_official(result.lora, "test")
    tokens = LearnedTokens(nets["text_encoder"].module, parse_train_tokens(settings.tokens))
    tokens.load_official(result.lora, "test")
    with torch.no_grad():
        clip_text, pooled = tokens.encode([PROMPT])
        w = weight_source(dict(net.named_parameters()), torch.device("cpu"), torch.float32, lora.deltas())
        img = torch.zeros(1, 1, net.config.c_clip_img)
        return StageCForward(net, grad_checkpointing=False)(w, x, r, clip_text, pooled, img, torch.float32)


def test_trained_official_lora_reloads_through_the_lora_loader_with_the_trainers_outputs(nets, official, folders):
    (lora, curve, steps), base = official
    assert steps == 3 and len(lora.result.losses) == 3 and curve.shape == (1, 256, 512, 3)
    assert all(torch.equal(v, base[k]) for k, v in nets["stage_c"].module.state_dict().items())  # base untouched
    out = T.SaveLora().save(lora, "scw_wurst", "official", True)
    path = folders / "models" / "loras" / "scw_wurst.safetensors"
    assert out["ui"]["text"][0] == str(path) and os.path.isfile(folders / "output" / "scw_training" /
                                                                 "scw_wurst.state.safetensors")
    saved = load_file(str(path))
    assert "embeddings.indices" in saved and saved["embeddings.indices"].tolist() == [49408]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["scw_tokens"] == TOKENS and meta["scw_steps"] == "3" and meta["scw_interrupted"] == "false"
    stage_c, encoder = LoraLoader().apply(nets["stage_c"], nets["text_encoder"], "scw_wurst.safetensors", 1.0, 1.0,
                                          meta["scw_tokens"])
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    want = _trainer_prediction(nets, lora.result, lora.settings, x, r)  # on the base weights, before any load
    clip_text, pooled = encode_prompt(encoder, PROMPT)
    with host.using([stage_c]), torch.no_grad():
        loaded = stage_c.module(x, r, clip_text, pooled, torch.zeros(1, 1, stage_c.module.config.c_clip_img))
    torch.testing.assert_close(loaded, want, rtol=1e-5, atol=1e-5)
    # The LoRA and the token both matter: without them the output differs.
    with host.using([nets["stage_c"]]), torch.no_grad():
        plain = nets["stage_c"].module(x, r, *encode_prompt(nets["text_encoder"], PROMPT),
                                       torch.zeros(1, 1, stage_c.module.config.c_clip_img))
    assert (plain - want).abs().max() > 1e-3


def test_community_layout_loads_in_the_pack_with_the_trainers_weights(nets, cache_with_text, folders):
    lora, _, _ = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache_with_text, **widgets())
    assert lora.result.community is not None and lora.result.loader_tokens == ""
    T.SaveLora().save(lora, "training/scw_plain", "community", False)
    path = folders / "models" / "loras" / "training" / "scw_plain.safetensors"
    assert all(k.startswith("lora_prior_unet_") for k in load_file(str(path)))
    (stage_c,) = LoraLoaderModelOnly().apply(nets["stage_c"], "training/scw_plain.safetensors", 1.0)
    net = nets["stage_c"].module
    pairs = StageCLora(net, lora.settings.rank, lora.settings.alpha)
    pairs.load_official(lora.result.lora, "test")
    want = pairs.merged(net)
    with host.using([stage_c]):
        got = {k: v.detach().clone() for k, v in stage_c.module.state_dict().items() if k in want}
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6, msg=key)


# ---- interrupt and resume -------------------------------------------------------------------------------------


def test_interrupt_keeps_the_partial_lora_and_its_state_resumes_to_the_uninterrupted_result(nets, cache, folders):
    full, _, _ = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(steps=4, tokens=TOKENS))

    def stop_after_two(value, total, preview):
        if value == 2:
            host.request_interrupt()

    host.set_progress_hook(stop_after_two)
    try:
        part, curve, steps = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache,
                                                 **widgets(steps=4, tokens=TOKENS))
    finally:
        host.set_progress_hook(None)
        host.request_interrupt(False)
    assert part.result.interrupted and steps == 2 and len(part.result.losses) == 2
    T.SaveLora().save(part, "scw_partial", "official", True)
    with safe_open(str(folders / "models" / "loras" / "scw_partial.safetensors"), framework="pt") as f:
        assert f.metadata()["scw_interrupted"] == "true" and f.metadata()["scw_steps"] == "2"
    resumed, _, steps = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache,
                                            **widgets(steps=4, tokens=TOKENS, resume_state="scw_partial"))
    assert steps == 4 and not resumed.result.interrupted
    assert resumed.result.losses[-2:] == full.result.losses[-2:]
    assert resumed.result.lora.keys() == full.result.lora.keys()
    for key, value in full.result.lora.items():
        assert torch.equal(resumed.result.lora[key], value), key


def test_trainer_node_trains_under_comfyuis_inference_mode(folders):
    """ComfyUI runs every node inside torch.inference_mode(): the loaders' weights and the cache's latents are then
    inference tensors, which autograd may not save; the trainer node must still train (with a learned token)."""
    with torch.inference_mode():
        nets = {kind: host.wrap(demo_network(kind), kind) for kind in ("stage_c", "text_encoder", "effnet")}
        dataset = T.TrainDataset().scan("train_dataset", "a photo of [wurst]", 256)[0]
        cache = T.TrainCache().encode(dataset, nets["effnet"])[0]
        lora, _, steps = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache,
                                             **widgets(steps=2, tokens=TOKENS))
    assert steps == 2 and all(np.isfinite(lora.result.losses))
    downs = [v for k, v in lora.result.lora.items() if k.endswith("lora_down")]
    assert downs and any(bool(v.abs().sum() > 0) for v in downs)  # the zero-initialised factors moved


def test_save_every_writes_snapshots_that_resume_to_the_uninterrupted_result(nets, cache, folders):
    full, _, _ = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(steps=4, tokens=TOKENS))
    T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache,
                        **widgets(steps=4, tokens=TOKENS, save_every=2, save_prefix="snaps/wurst"))
    loras = folders / "models" / "loras" / "snaps"
    assert sorted(os.listdir(loras)) == ["wurst_step000002.safetensors"]  # the last step is the save node's
    with safe_open(str(loras / "wurst_step000002.safetensors"), framework="pt") as f:
        assert f.metadata()["scw_steps"] == "2" and f.metadata()["scw_tokens"] == TOKENS
    resumed, _, steps = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache,
                                            **widgets(steps=4, tokens=TOKENS, resume_state="snaps/wurst_step000002"))
    assert steps == 4
    for key, value in full.result.lora.items():
        assert torch.equal(resumed.result.lora[key], value), key


def test_full_finetune_node_saves_a_stage_c_the_loader_reads_back(nets, cache_with_text, folders):
    from comfyui_stablecascade.nodes.loaders import StageCLoader

    base = {k: v.clone() for k, v in nets["stage_c"].module.state_dict().items()}
    lora, _, steps = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache_with_text,
                                         **widgets(steps=2, full_finetune=True))
    assert steps == 2 and lora.result.lora is None and lora.result.full_state_dict is not None
    assert all(torch.equal(v, base[k]) for k, v in nets["stage_c"].module.state_dict().items())  # base untouched
    out = T.SaveLora().save(lora, "scw_full", "official", False)  # layout does not apply to a whole model
    path = folders / "models" / "diffusion_models" / "scw_full.safetensors"
    assert out["ui"]["text"] == [str(path)]
    (loaded,) = StageCLoader().load("scw_full.safetensors")
    with host.using([loaded]):
        got = {k: v.detach().clone() for k, v in loaded.module.state_dict().items()}
    want = {k: v.to(lora.base_dtype) for k, v in lora.result.full_state_dict.items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], base[k]) for k in want)  # it is the trained model, not the base


# ---- bad inputs -----------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(nets, cache, official, folders, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputError, match="holds no usable images.*add images"):
        T.TrainDataset().scan(str(tmp_path / "empty"), "", 256)
    with pytest.raises(TrainingInputError, match="missing_set.*does not exist"):
        T.TrainDataset().scan("missing_set", "", 256)
    with pytest.raises(TrainingInputError, match="dataset folder is empty"):
        T.TrainDataset().scan("  ", "", 256)
    with pytest.raises(TrainingInputError, match="resume_me.state.safetensors.*does not exist"):
        T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(resume_state="resume_me"))
    with pytest.raises(CascadeError, match="input 'stage_c' needs a Stage C model and got nothing"):
        T.TrainLora().train(None, nets["text_encoder"], cache, **widgets())
    lora = official[0][0]
    with pytest.raises(TrainingInputError, match="no community layout: learned tokens.*save it as 'official'"):
        T.SaveLora().save(lora, "scw_tokens", "community", False)
    for name in ("../escape", "/abs/path", "a//b", ""):
        with pytest.raises(TrainingInputError, match="is not a plain file name"):
            T.SaveLora().save(lora, name, "official", False)
    assert not os.path.exists(folders / "models" / "escape.safetensors")
    with pytest.raises(TrainingInputError, match="save_prefix '../snap' is not a plain file name"):
        T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(save_every=1,
                                                                                     save_prefix="../snap"))
    with pytest.raises(TrainingInputError, match="full_finetune trains every weight already; switch include_ff off"):
        T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache, **widgets(full_finetune=True,
                                                                                     include_ff=True))


# ---- ComfyUI core's own LoraLoader reads the community file (COMFYUI_PATH and ComfyUI's Python) ---------------


@pytest.mark.comfyui
def test_comfyui_core_loads_the_community_file(nets, cache_with_text, folders):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from comfyui_harness import import_comfy_or_skip

    import_comfy_or_skip("loading a trained community LoRA with ComfyUI core's loader", "comfy.lora",
                         "comfy.model_base", "comfy.model_patcher", "comfy.sd", "comfy.supported_models")
    comfy = sys.modules["comfy"]
    lora, _, _ = T.TrainLora().train(nets["stage_c"], nets["text_encoder"], cache_with_text, **widgets())
    T.SaveLora().save(lora, "scw_core", "community", False)
    net = nets["stage_c"].module
    cfg = net.config
    unet_config = {
        "stable_cascade_stage": "c", "c_in": cfg.c_in, "c_out": cfg.c_out, "c_r": cfg.c_r, "c_cond": cfg.c_cond,
        "c_hidden": list(cfg.c_hidden), "nhead": list(cfg.nhead), "blocks": [list(b) for b in cfg.blocks],
        "block_repeat": [list(b) for b in cfg.block_repeat], "level_config": list(cfg.level_config),
        "c_clip_text": cfg.c_clip_text, "c_clip_text_pooled": cfg.c_clip_text_pooled, "c_clip_img": cfg.c_clip_img,
        "c_clip_seq": cfg.c_clip_seq, "kernel_size": cfg.kernel_size, "dropout": list(cfg.dropout),
        "self_attn": cfg.self_attn, "t_conds": list(cfg.t_conds), "switch_level": [False]}
    config = comfy.supported_models.Stable_Cascade_C(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.StableCascade_C(config, device="cpu")
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model.diffusion_model.load_state_dict(config.process_unet_state_dict(sd), strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    file_sd = comfy.utils.load_torch_file(str(folders / "models" / "loras" / "scw_core.safetensors"))
    core, _ = comfy.sd.load_lora_for_models(patcher, None, file_sd, 1.0, 0)
    core.patch_model()
    try:
        got = {k[len("diffusion_model."):]: v.detach().clone() for k, v in core.model.state_dict().items()}
    finally:
        core.unpatch_model()
    pairs = StageCLora(net, lora.settings.rank, lora.settings.alpha)
    pairs.load_official(lora.result.lora, "test")
    for key, want in pairs.merged(net).items():
        if key.endswith("in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            have = torch.cat([got[f"{stem}to_{n}.weight"] for n in "qkv"])
        else:
            have = got[key]
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=key)
