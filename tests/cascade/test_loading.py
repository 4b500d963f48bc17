"""cascade.loading / cascade.keymaps: every layout in, the original network out; clear errors otherwise.

Tiny random networks are written in each released layout (tests/tiny_checkpoints.py) and read back;
the released sizes are checked on meta tensors built from the spec's key/shape table. Messages that name
a loader node or a ComfyUI folder come from the node layer (nodes/kinds.py); cascade's own never do.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import tiny_checkpoints as tc
import torch

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import keymaps, loading
from comfyui_stablecascade.cascade.errors import CheckpointError, StageMismatchError, UnknownLayoutError
from comfyui_stablecascade.nodes import kinds as node_kinds
from comfyui_stablecascade.nodes import loaders

KEYS_SHAPES = json.loads((tc.DATA / "keys_shapes.json").read_text())
LOAD = {"stage_c": loading.load_stage_c, "stage_b": loading.load_stage_b, "stage_a": loading.load_stage_a,
        "effnet": loading.load_effnet, "previewer": loading.load_previewer, "controlnet": loading.load_controlnet}


def meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def assert_same_state(model: torch.nn.Module, ref: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    state = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert state[k].dtype == want.dtype, k
        assert torch.equal(state[k], want), k


# ---- released sizes, detected from shapes only ----------------------------------------------------

RELEASED = [
    ("StageC big (3.6B)", "stage_c", "big 3.6B", "big"), ("StageC lite (1B)", "stage_c", "lite 1B", "lite"),
    ("StageB big (3B/1.5B)", "stage_b", "big 1.5B", "big"), ("StageB lite (700M)", "stage_b", "lite 700M", "lite"),
]


@pytest.mark.parametrize("name, kind, variant, size", RELEASED)
@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_released_unets_are_detected_and_converted_in_every_layout(name, kind, variant, size, layout):
    original = meta(KEYS_SHAPES[name])
    sd = {"original": dict, "comfyui": tc.comfyui_unet, "diffusers": tc.diffusers_unet}[layout](original)
    if layout == "comfyui":
        sd = tc.with_prefix(sd, "model.diffusion_model.")
    det = keymaps.detect(sd)
    assert (det.kind, det.layout, det.variant) == (kind, layout, variant)
    converted, dropped = keymaps.to_original(kind, keymaps.sub_dict(sd, det))
    assert dropped == []
    assert {k: list(v.shape) for k, v in converted.items()} == KEYS_SHAPES[name]


@pytest.mark.parametrize("name, kind, variant, size", RELEASED)
def test_released_unet_configs_are_inferred(name, kind, variant, size):
    cfg_cls = tc.classes(kind)[1]
    assert cfg_cls.from_state_dict(meta(KEYS_SHAPES[name])) == getattr(cfg_cls, size)()


@pytest.mark.parametrize("name, kind, variant", [
    ("StageA", "stage_a", ""), ("EffNet", "effnet", ""), ("Previewer", "previewer", ""),
    ("ControlNet canny (effnet, c_in=1)", "controlnet", "canny"),
    ("ControlNet inpaint (effnet, c_in=4)", "controlnet", "inpainting"),
    ("ControlNet SR (large, c_in=16)", "controlnet", "large backbone, c_in=16"),
])
def test_released_modules_are_detected(name, kind, variant):
    det = keymaps.detect(meta(KEYS_SHAPES[name]))
    assert (det.kind, det.layout, det.prefix, det.variant) == (kind, "original", "", variant)


def test_comfyui_coder_pair_and_prefixed_stage_a_are_detected():
    sd = tc.with_prefix(meta(KEYS_SHAPES["EffNet"]), "encoder.")
    sd.update(tc.with_prefix(meta(KEYS_SHAPES["Previewer"]), "previewer."))
    det = keymaps.detect(sd)
    assert det.kind == "stage_c_coder"
    assert [(p.kind, p.prefix) for p in det.parts] == [("effnet", "encoder."), ("previewer", "previewer.")]
    det = keymaps.detect(tc.with_prefix(meta(KEYS_SHAPES["StageA"]), "first_stage_model."))
    assert (det.kind, det.layout, det.prefix) == ("stage_a", "comfyui", "first_stage_model.")


# ---- round trips: tiny networks in each layout and dtype --------------------------------------------

def _write(tmp_path: Path, kind: str, layout: str, sd: dict, dtype: torch.dtype | None) -> Path:
    if layout == "comfyui":
        sd = tc.with_prefix(tc.comfyui_unet(sd) if kind in ("stage_c", "stage_b") else sd,
                            "model.diffusion_model." if kind in ("stage_c", "stage_b") else "vae.")
    elif layout == "diffusers":
        sd = tc.diffusers_stage_a(sd) if kind == "stage_a" else tc.diffusers_unet(sd)
    return tc.save(tmp_path / f"{kind}_{layout}.safetensors", sd, dtype)


CASES = [(k, lay) for k in ("stage_c", "stage_b") for lay in ("original", "comfyui", "diffusers")]
CASES += [("stage_a", "original"), ("stage_a", "comfyui"), ("stage_a", "diffusers"), ("effnet", "original"),
          ("previewer", "original"), ("controlnet", "original")]


@pytest.mark.parametrize("kind, layout", CASES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_network_round_trip(tmp_path, kind, layout, dtype):
    sd = tc.tiny_sd(kind)
    path = _write(tmp_path, kind, layout, sd, dtype)
    det = loading.detect(path)
    assert (det.kind, det.layout) == (kind, layout)
    model = LOAD[kind](path)
    assert model.config == tc.tiny_config(kind)
    assert_same_state(model, sd, dtype)  # the file's dtype is kept (bf16 stays bf16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dtype_argument_converts(tmp_path):
    sd = tc.tiny_sd("stage_c")
    path = tc.save(tmp_path / "stage_c_bf16.safetensors", sd, torch.bfloat16)
    model = loading.load_stage_c(path, dtype=torch.float32)
    assert_same_state(model, tc.cast(tc.cast(sd, torch.bfloat16), torch.float32))
    model = loading.load_stage_a(tc.save(tmp_path / "a.safetensors", tc.tiny_sd("stage_a")), dtype=torch.bfloat16)
    assert model.down_blocks[-1][1].num_batches_tracked.dtype == torch.int64  # only floating tensors convert
    assert model.in_block[1].weight.dtype == torch.bfloat16


def test_state_dict_input_is_assigned_not_copied():
    sd = tc.tiny_sd("stage_c")
    model = loading.load_stage_c(sd)
    assert model.clf[1].weight.data_ptr() == sd["clf.1.weight"].data_ptr()


def test_text_encoder_and_clip_vision_round_trip(tmp_path):
    text, vision = tc.tiny_sd("text_encoder"), tc.tiny_sd("clip_vision")
    model = loading.load_text_encoder(tc.save(tmp_path / "text.safetensors", text, torch.bfloat16))
    assert_same_state(model, text, torch.bfloat16)
    model = loading.load_clip_vision(tc.save(tmp_path / "vision.safetensors", vision))
    assert_same_state(model, vision)
    tc.save_sharded(tmp_path / "pipe" / "text_encoder", text, shards=2, name="model")  # transformers naming
    tc.save(tmp_path / "pipe" / "image_encoder" / "model.safetensors", vision)
    assert_same_state(loading.load_text_encoder(tmp_path / "pipe"), text)
    assert_same_state(loading.load_clip_vision(tmp_path / "pipe"), vision)


# ---- packaged checkpoints ---------------------------------------------------------------------------

def test_packaged_stage_c_gives_every_component(tmp_path):
    parts = {k: tc.tiny_sd(k) for k in ("stage_c", "text_encoder", "effnet", "previewer", "clip_vision")}
    path = tc.save(tmp_path / "stable_cascade_stage_c.safetensors",
                   tc.packaged_c(parts["stage_c"], parts["text_encoder"], parts["effnet"], parts["previewer"],
                                 parts["clip_vision"]), torch.bfloat16)
    det = loading.detect(path)
    assert (det.kind, det.layout) == ("packaged_c", "comfyui")
    found = loading.load_packaged(path)
    assert set(found) == set(parts)
    for kind, sd in parts.items():
        assert_same_state(found[kind], sd, torch.bfloat16)


@pytest.mark.parametrize("split", [False, True], ids=["released", "saved-by-comfyui"])
def test_packaged_stage_b_gives_stage_b_and_stage_a(tmp_path, split):
    b, a = tc.tiny_sd("stage_b"), tc.tiny_sd("stage_a")
    path = tc.save(tmp_path / "stable_cascade_stage_b.safetensors", tc.packaged_b(b, a, split_attention=split))
    found = loading.load_packaged(path)
    assert set(found) == {"stage_b", "stage_a"}
    assert_same_state(found["stage_b"], b)
    assert_same_state(found["stage_a"], a)
    assert_same_state(loading.load_stage_a(path), a)


def test_component_loader_reads_only_its_keys(tmp_path, monkeypatch):
    sd = tc.packaged_c(tc.tiny_sd("stage_c"), tc.tiny_sd("text_encoder"), None, None, tc.tiny_sd("clip_vision"))
    path = tc.save(tmp_path / "packaged.safetensors", sd)
    asked: list[str] = []
    real = loading.read_safetensors

    def spy(p, keys=None, dtype=None, device="cpu"):
        asked.extend(keys)
        return real(p, keys, dtype, device)

    monkeypatch.setattr(loading, "read_safetensors", spy)
    loading.load_stage_c(path)
    assert asked and all(k.startswith("model.diffusion_model.") for k in asked)
    asked.clear()
    loading.load_text_encoder(path)
    assert asked and all(k.startswith("text_encoder.") for k in asked)


def test_a_plain_file_through_load_packaged_gives_one_entry(tmp_path):
    path = tc.save(tmp_path / "stage_b.safetensors", tc.tiny_sd("stage_b"))
    assert list(loading.load_packaged(path)) == ["stage_b"]


# ---- diffusers folders and shards -----------------------------------------------------------------

def test_sharded_diffusers_folder(tmp_path):
    sd = tc.tiny_sd("stage_c")
    index = tc.save_sharded(tmp_path / "pipe" / "prior", tc.diffusers_unet(sd), shards=3)
    for src in (tmp_path / "pipe" / "prior", tmp_path / "pipe", index,
                index.parent / "diffusion_pytorch_model-00002-of-00003.safetensors"):
        assert_same_state(loading.load_stage_c(src), sd)


def test_folder_with_two_variants_picks_by_dtype(tmp_path):
    sd = tc.tiny_sd("stage_b")
    folder = tmp_path / "decoder"
    tc.save(folder / "diffusion_pytorch_model.safetensors", tc.diffusers_unet(sd))
    tc.save(folder / "diffusion_pytorch_model.bf16.safetensors", tc.diffusers_unet(sd), torch.bfloat16)
    assert loading.load_stage_b(folder).clf[1].weight.dtype == torch.float32
    assert loading.load_stage_b(folder, dtype=torch.bfloat16).clf[1].weight.dtype == torch.bfloat16


def test_folder_of_unrelated_files_asks_for_one(tmp_path):
    tc.save(tmp_path / "stage_a.safetensors", tc.tiny_sd("stage_a"))
    tc.save(tmp_path / "stage_c_bf16.safetensors", tc.tiny_sd("stage_c"), torch.bfloat16)
    with pytest.raises(CheckpointError, match="several weight files.*pass the one file"):
        loading.load_stage_c(tmp_path)
    model = loading.load_stage_c(tmp_path / "stage_c_bf16.safetensors")
    assert_same_state(model, tc.tiny_sd("stage_c"), torch.bfloat16)


def test_missing_shard_is_named(tmp_path):
    index = tc.save_sharded(tmp_path / "prior", tc.diffusers_unet(tc.tiny_sd("stage_c")), shards=2)
    (index.parent / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.*download every shard"):
        loading.load_stage_c(index.parent)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test."""
    def boom(*a, **k):
        raise AssertionError("the loader tried to unpickle a file")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_are_refused_unread(tmp_path, suffix, no_unpickling):
    path = tmp_path / f"stage_c{suffix}"
    path.write_bytes(b"\x80\x04" + b"\x00" * 64)
    with pytest.raises(CheckpointError) as e:
        loading.load_stage_c(path)
    assert path.name in str(e.value) and "convert it to safetensors" in str(e.value)


def test_pickle_renamed_safetensors_is_refused(tmp_path):
    path = tmp_path / "stage_c.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(CheckpointError, match="pickle.*convert it to safetensors"):
        loading.load_stage_c(path)


def test_truncated_and_garbage_files(tmp_path):
    path = tc.save(tmp_path / "stage_c.safetensors", tc.tiny_sd("stage_c"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"stage_c\.safetensors.*truncated.*Download it again"):
        loading.load_stage_c(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors.*not a readable safetensors"):
        loading.load_stage_c(junk)


def assert_knows_no_layer_above(message: str) -> None:
    """cascade's messages name kinds and files, never a node title or a ComfyUI model folder."""
    assert "Stable Cascade Load" not in message and "models/" not in message, message


@pytest.fixture
def models_dir(tmp_path):
    """A ComfyUI-style ``models`` folder for the loader nodes (built-in host), reset afterwards."""
    root = tmp_path / "models"
    for sub in ("diffusion_models", "unet", "vae"):
        (root / sub).mkdir(parents=True)
    host.set_models_dir(str(root))
    yield root
    host.set_models_dir(None)


def test_empty_and_missing_files(tmp_path, models_dir):
    empty = tmp_path / "stage_b.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"stage_b\.safetensors: the file is empty.*Download it again"):
        loading.load_stage_b(empty)
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: file not found\. Expected a Stage C") as e:
        loading.load_stage_c(tmp_path / "nope.safetensors")
    assert_knows_no_layer_above(str(e.value))
    with pytest.raises(CheckpointError, match=r"stage_a\.safetensors: file not found\. Expected a Stage A") as e:
        loading.load_stage_a(tmp_path / "stage_a.safetensors")
    assert_knows_no_layer_above(str(e.value))
    # The loader nodes name the ComfyUI folders they looked in.
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*not found in .*models/diffusion_models"):
        loaders.StageCLoader().load("nope.safetensors")
    with pytest.raises(CheckpointError, match=r"stage_a\.safetensors.*not found in .*models/vae"):
        loaders.StageALoader().load("stage_a.safetensors")
    no_tensors = tc.save(tmp_path / "none.safetensors", {})
    with pytest.raises(CheckpointError, match="holds no tensors"):
        loading.load_stage_c(no_tensors)


@pytest.mark.parametrize("given, loader, names", [
    ("stage_b", loading.load_stage_c, ["Stage B", "Stable Cascade Load Stage B", "stage_c"]),
    ("stage_c", loading.load_stage_b, ["Stage C", "Stable Cascade Load Stage C", "stage_b"]),
    ("text_encoder", loading.load_stage_c, ["text encoder", "Stable Cascade Load Text Encoder"]),
    ("stage_a", loading.load_text_encoder, ["Stage A", "Stable Cascade Load Stage A", "bigG"]),
])
def test_wrong_model_for_the_loader(tmp_path, given, loader, names):
    path = tc.save(tmp_path / f"{given}.safetensors", tc.tiny_sd(given))
    with pytest.raises(CheckpointError) as plain:
        loader(path)
    assert plain.value.found == given
    assert_knows_no_layer_above(str(plain.value))
    # The node layer adds the loader node to use; the error keeps its type and cascade's message.
    with pytest.raises(CheckpointError) as e, node_kinds.explained():
        loader(path)
    assert isinstance(e.value, StageMismatchError)
    assert str(e.value).startswith(str(plain.value))
    assert str(path) in str(e.value)
    for name in names:
        assert name in str(e.value)


def test_lora_given_to_a_network_loader(tmp_path):
    path = tc.save(tmp_path / "lora_fernando.safetensors", {"weights.0.lora_down": torch.zeros(4, 8),
                                                           "weights.0.lora_up": torch.zeros(8, 4)})
    with pytest.raises(StageMismatchError, match="LoRA is not a network") as plain:
        loading.load_stage_c(path)
    assert_knows_no_layer_above(str(plain.value))
    with pytest.raises(StageMismatchError, match="LoRA.*LoRA node"), node_kinds.explained():
        loading.load_stage_c(path)


def test_unknown_layout_lists_known_layouts(tmp_path):
    path = tc.save(tmp_path / "sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)})
    with pytest.raises(UnknownLayoutError) as e:
        loading.load_stage_c(path)
    msg = str(e.value)
    assert "sdxl.safetensors" in msg and "Stable Diffusion" in msg
    for layout in keymaps.LAYOUTS:
        assert layout in msg


@pytest.mark.parametrize("prefix", ["module.", "state_dict.model.", "model.diffusion_model."])
def test_any_prefix_is_found(tmp_path, prefix):
    sd = tc.tiny_sd("stage_b")
    path = tc.save(tmp_path / "b.safetensors", tc.with_prefix(sd, prefix))
    assert loading.detect(path).prefix == prefix
    assert_same_state(loading.load_stage_b(path), sd)


def test_load_packaged_on_an_unknown_file(tmp_path):
    path = tc.save(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(UnknownLayoutError, match=r"vae\.safetensors.*SD-family VAE.*stable_cascade_stage_c"):
        loading.load_packaged(path)


def test_gguf_is_refused(tmp_path):
    path = tmp_path / "stage_c.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"stage_c\.gguf.*GGUF.*safetensors"):
        loading.load_stage_c(path)


def test_missing_and_unexpected_keys(tmp_path, caplog):
    sd = tc.tiny_sd("stage_c")
    broken = {k: v for k, v in sd.items() if k != "up_blocks.0.0.channelwise.4.weight"}
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*up_blocks\.0\.0\.channelwise\.4\.weight"):
        loading.load_stage_c(tc.save(tmp_path / "broken.safetensors", broken))
    extra = dict(sd, **{"ema_decay": torch.zeros(1)})
    with caplog.at_level(logging.WARNING):
        model = loading.load_stage_c(tc.save(tmp_path / "extra.safetensors", extra))
    assert_same_state(model, sd)
    assert "ema_decay" in caplog.text


def test_incomplete_split_attention_is_reported(tmp_path):
    sd = tc.comfyui_unet(tc.tiny_sd("stage_c"))
    del sd["down_blocks.0.2.attention.attn.to_v.weight"]
    with pytest.raises(CheckpointError, match=r"down_blocks\.0\.2\.attention\..*to_q/to_k/to_v"):
        loading.load_stage_c(tc.save(tmp_path / "c.safetensors", sd))


def test_detect_reads_only_the_header(tmp_path, monkeypatch):
    path = tc.save(tmp_path / "packaged.safetensors", tc.packaged_b(tc.tiny_sd("stage_b"), tc.tiny_sd("stage_a")))
    monkeypatch.setattr(loading, "read_safetensors", lambda *a, **k: pytest.fail("tensors were read"))
    det = loading.detect(path)
    assert det.kind == "packaged_b" and [p.kind for p in det.parts] == ["stage_b", "stage_a"]
