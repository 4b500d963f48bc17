"""Valid safetensors with wrong contents: each is a named CheckpointError that names the file and the tensor
(dtypes, ranks, shapes, keys the config inference reads, NaN / inf), or a stated conversion (mixed float
dtypes), never a raw torch / Python error or a network that fails later in its forward.
"""

from __future__ import annotations

import logging

import pytest
import tiny_checkpoints as tc
import torch

from comfyui_stablecascade.cascade import loading, lora_format
from comfyui_stablecascade.cascade.errors import CascadeError, CheckpointError

LOAD = {"stage_c": loading.load_stage_c, "stage_b": loading.load_stage_b, "stage_a": loading.load_stage_a,
        "effnet": loading.load_effnet, "previewer": loading.load_previewer, "controlnet": loading.load_controlnet}


def forward(kind: str, model: torch.nn.Module) -> list[torch.Tensor]:
    """The network's outputs on a tiny seeded input (what a sampler or decode would call)."""
    c = model.config
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        if kind == "stage_c":
            out = model(r(1, c.c_in, 4, 4), torch.tensor([0.5]), r(1, 2, c.c_clip_text), r(1, 1, c.c_clip_text_pooled),
                        r(1, 1, c.c_clip_img))
        elif kind == "stage_b":
            out = model(r(1, c.c_in, 16, 16), torch.tensor([0.5]), r(1, c.c_effnet, 4, 4), r(1, 1, c.c_clip))
        elif kind == "stage_a":
            out = model(r(1, 3, 16, 16))
        elif kind == "effnet":
            out = model(r(1, 3, 32, 32))
        elif kind == "previewer":
            out = model(r(1, c.c_in, 4, 4))
        else:
            out = model(r(1, c.c_in, 32, 32))
    return [o for o in (out if isinstance(out, (list, tuple)) else [out]) if o is not None]


def raises_naming(kind: str, path, *names: str, cls: type = CheckpointError) -> str:
    with pytest.raises(cls) as info:
        LOAD[kind](path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for n in names:
        assert n in msg, (n, msg)
    return msg


# ---- dtypes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, key, dtype", [
    ("stage_c", "clf.1.weight", torch.int32),  # was: RuntimeError "Only Tensors of floating point ... gradients"
    ("stage_b", "embedding.1.bias", torch.int64),
    ("stage_c", "down_blocks.0.0.channelwise.0.weight", torch.bool),
    ("previewer", "blocks.0.weight", torch.int16),
])
def test_integer_weight_is_refused_naming_file_and_tensor(tmp_path, kind, key, dtype):
    sd = tc.tiny_sd(kind)
    sd[key] = sd[key].to(dtype)
    path = tc.save(tmp_path / f"{kind}.safetensors", sd)
    msg = raises_naming(kind, path, key, str(dtype).replace("torch.", ""))
    assert "floating" in msg


def test_integer_batchnorm_buffer_is_refused(tmp_path):
    """An integer running_mean used to load silently (and give a wrong EffNet)."""
    sd = tc.tiny_sd("effnet")
    key = "backbone.0.1.running_mean"
    sd[key] = sd[key].round().to(torch.int64)
    raises_naming("effnet", tc.save(tmp_path / "effnet.safetensors", sd), key, "int64")


def test_integer_tensor_in_a_packaged_text_tower_is_refused(tmp_path):
    text = tc.tiny_sd("text_encoder")
    key = "text_model.final_layer_norm.weight"
    text[key] = text[key].to(torch.int32)
    path = tc.save(tmp_path / "packaged.safetensors", tc.packaged_c(tc.tiny_sd("stage_c"), text, None, None, None))
    with pytest.raises(CheckpointError) as info:
        loading.load_text_encoder(path)
    assert str(path) in str(info.value) and "text_encoder.clip_g.transformer." + key in str(info.value)


def test_the_networks_own_integer_buffers_stay_accepted(tmp_path):
    """num_batches_tracked is int64 in every BatchNorm; a converter that cast it to fp16 is accepted too, and
    the buffer keeps the network's dtype. position_ids of a CLIP vision tower stay int64."""
    sd = tc.tiny_sd("effnet")
    ints = [k for k in sd if k.endswith("num_batches_tracked")]
    assert ints and all(sd[k].dtype == torch.int64 for k in ints)
    assert loading.load_effnet(tc.save(tmp_path / "e.safetensors", sd)).state_dict()[ints[0]].dtype == torch.int64
    sd[ints[0]] = sd[ints[0]].half()
    net = loading.load_effnet(tc.save(tmp_path / "e16.safetensors", sd))
    assert net.state_dict()[ints[0]].dtype == torch.int64
    vision = tc.comfyui_vision(tc.tiny_sd("clip_vision"))
    assert vision["clip_l_vision.vision_model.embeddings.position_ids"].dtype == torch.int64
    loading.load_clip_vision(tc.save(tmp_path / "v.safetensors", vision))


@pytest.mark.parametrize("odd", [torch.float16, torch.bfloat16, torch.float64])
def test_one_tensor_of_another_float_dtype_is_converted_with_a_warning(tmp_path, caplog, odd):
    """Used to load silently and fail in the forward ("Input type (c10::Half) and bias type (float)")."""
    sd = tc.tiny_sd("stage_c")
    key = "embedding.1.weight"
    sd[key] = sd[key].to(odd)
    path = tc.save(tmp_path / "c.safetensors", sd)
    with caplog.at_level(logging.WARNING):
        net = loading.load_stage_c(path)
    assert {p.dtype for p in net.state_dict().values()} == {torch.float32}
    warning = next(r.getMessage() for r in caplog.records if "mixes floating dtypes" in r.getMessage())
    assert str(path) in warning and key in warning and "float32" in warning
    assert all(torch.isfinite(o).all() for o in forward("stage_c", net))


def test_mixed_dtypes_with_dtype_argument_cast_everything(tmp_path, caplog):
    sd = tc.tiny_sd("stage_b")
    sd["clf.1.weight"] = sd["clf.1.weight"].half()
    path = tc.save(tmp_path / "b.safetensors", sd)
    with caplog.at_level(logging.WARNING):
        net = loading.load_stage_b(path, dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert not [r for r in caplog.records if "mixes floating dtypes" in r.getMessage()]


# ---- ranks, shapes and keys the inference reads -------------------------------------------------------


INFERENCE_KEYS = [  # (kind, key, rank): every shape a config inference reads
    ("stage_c", "clip_txt_mapper.weight", 2), ("stage_c", "clip_txt_pooled_mapper.weight", 2),
    ("stage_c", "clip_img_mapper.weight", 2), ("stage_c", "embedding.1.weight", 4),
    ("stage_c", "down_blocks.0.0.depthwise.weight", 4), ("stage_c", "down_blocks.0.1.mapper.weight", 2),
    ("stage_c", "down_blocks.0.2.kv_mapper.1.weight", 2),
    ("stage_b", "clip_mapper.weight", 2), ("stage_b", "effnet_mapper.0.weight", 4),
    ("stage_b", "pixels_mapper.0.weight", 4),
    ("stage_a", "up_blocks.0.0.weight", 4), ("stage_a", "vquantizer.codebook.weight", 2),
    ("effnet", "backbone.0.0.weight", 4), ("effnet", "backbone.1.0.block.0.0.weight", 4),
    ("effnet", "mapper.0.weight", 4),
    ("previewer", "blocks.0.weight", 4), ("previewer", "blocks.24.weight", 4),
    ("controlnet", "projections.0.2.weight", 4), ("controlnet", "backbone.0.0.weight", 4),
]


@pytest.mark.parametrize("kind, key, rank", INFERENCE_KEYS)
def test_flattened_inference_tensor_names_key_and_expected_rank(tmp_path, kind, key, rank):
    """A flattened clip_txt_mapper.weight used to end in "ValueError: not enough values to unpack"."""
    sd = tc.tiny_sd(kind)
    sd[key] = sd[key].flatten()
    path = tc.save(tmp_path / f"{kind}.safetensors", sd)
    raises_naming(kind, path, key, f"expected rank {rank}")


@pytest.mark.parametrize("kind, key, named", [
    ("stage_c", "down_blocks.0.2.kv_mapper.1.weight", None),  # was: KeyError in unet_keys.infer_levels
    ("stage_c", "down_blocks.0.1.mapper.weight", "down_blocks.0.1"),  # the block, and the keys it should have
    ("stage_b", "pixels_mapper.0.weight", None), ("stage_a", "up_blocks.0.0.weight", None),
    ("effnet", "backbone.1.0.block.0.0.weight", None), ("previewer", "blocks.12.weight", None),
    ("controlnet", "projections.0.2.weight", None),
])
def test_renamed_inference_key_is_named(tmp_path, kind, key, named):
    sd = tc.tiny_sd(kind)
    sd[key.replace("weight", "weight_renamed")] = sd.pop(key)
    raises_naming(kind, tc.save(tmp_path / f"{kind}.safetensors", sd), named or key)


def test_zero_size_dimension_is_named(tmp_path):
    sd = tc.tiny_sd("stage_c")
    sd["clip_txt_mapper.weight"] = torch.empty(0, 1280)
    raises_naming("stage_c", tc.save(tmp_path / "c.safetensors", sd), "clip_txt_mapper.weight", "zero-size")


def test_inconsistent_split_attention_shapes_are_named(tmp_path):
    sd = tc.comfyui_unet(tc.tiny_sd("stage_c"))
    key = "down_blocks.0.2.attention.attn.to_k.weight"
    sd[key] = sd[key][:, :32].contiguous()
    raises_naming("stage_c", tc.save(tmp_path / "c.safetensors", sd), key)


def test_inferred_config_that_cannot_be_built_is_named(tmp_path):
    """A width no head count divides (a hand-edited shape) fails in the layer constructors: named, not raw."""
    sd = tc.tiny_sd("stage_c")
    sd["down_blocks.0.0.depthwise.weight"] = torch.zeros(129, 1, 3, 3)  # level width 129 -> 2 heads of 64.5
    raises_naming("stage_c", tc.save(tmp_path / "c.safetensors", sd), "cannot be built", "129")


def test_state_dict_values_that_are_not_tensors_are_named():
    sd = tc.tiny_sd("previewer")
    sd["blocks.0.bias"] = [0.0] * 32
    with pytest.raises(CheckpointError, match=r"blocks\.0\.bias"):
        loading.load_previewer(sd)


def test_an_unforeseen_failure_is_still_a_named_error(tmp_path, monkeypatch):
    """The last net: whatever a damaged file makes the inference raise reaches the caller as a CheckpointError
    naming the file (the headless runner and the nodes catch CascadeError)."""
    path = tc.save(tmp_path / "a.safetensors", tc.tiny_sd("stage_a"))
    cfg_cls = tc.classes("stage_a")[1]

    def broken(sd):
        return {}["something"]

    monkeypatch.setattr(cfg_cls, "from_state_dict", staticmethod(broken))
    raises_naming("stage_a", path, "KeyError", "something")


# ---- values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_with_count(tmp_path, value):
    sd = tc.tiny_sd("stage_c")
    key = "down_blocks.0.0.channelwise.0.weight"
    sd[key].view(-1)[:3] = value
    msg = raises_naming("stage_c", tc.save(tmp_path / "c.safetensors", sd), key, f"3 of {sd[key].numel()}")
    assert "non-finite" in msg


def test_non_finite_weight_in_a_shard_names_the_shard(tmp_path):
    sd = tc.diffusers_unet(tc.tiny_sd("stage_b"))
    key = "clf.1.weight"
    sd[key].view(-1)[0] = float("nan")
    index = tc.save_sharded(tmp_path / "decoder", sd)
    shard = next(f for f in sorted(index.parent.glob("*.safetensors")) if key in loading.read_header(f))
    with pytest.raises(CheckpointError) as info:
        loading.load_stage_b(index.parent)
    assert str(shard) in str(info.value) and key in str(info.value)


def test_non_finite_values_from_a_conversion_are_told_apart(tmp_path):
    """Finite fp32 values beyond fp16's range become inf when dtype=float16 asks for a conversion."""
    sd = tc.tiny_sd("previewer")
    sd["blocks.3.weight"].view(-1)[:2] = 1e6
    path = tc.save(tmp_path / "p.safetensors", sd)
    loading.load_previewer(path)  # as stored: finite, loads
    with pytest.raises(CheckpointError, match=r"blocks\.3\.weight: 2 of \d+ values overflow .*float16"):
        loading.load_previewer(path, dtype=torch.float16)


def test_non_finite_in_a_state_dict_and_a_tower(tmp_path):
    sd = tc.tiny_sd("stage_a")
    sd["out_block.0.weight"].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"state dict: .*out_block\.0\.weight: 1 of"):
        loading.load_stage_a(sd)
    vision = tc.tiny_sd("clip_vision")
    vision["visual_projection.weight"][0, 0] = float("inf")
    path = tc.save(tmp_path / "v.safetensors", vision)
    with pytest.raises(CheckpointError) as info:
        loading.load_clip_vision(path)
    assert str(path) in str(info.value) and "visual_projection.weight" in str(info.value)


def test_negative_batchnorm_variance_is_refused(tmp_path):
    sd = tc.tiny_sd("effnet")
    key = "backbone.0.1.running_var"
    sd[key][0] = -1.0
    raises_naming("effnet", tc.save(tmp_path / "e.safetensors", sd), key, "negative")


def test_non_finite_lora_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    down, up = torch.randn(4, 64), torch.randn(64, 4)
    up[0, 0] = float("nan")
    save_file({"lora_unet_down_blocks_0_2_attention_attn_out_proj.lora_down.weight": down,
               "lora_unet_down_blocks_0_2_attention_attn_out_proj.lora_up.weight": up}, str(path))
    with pytest.raises(CascadeError, match=r"lora_up\.weight: 1 of 256 values"):
        lora_format.read_lora_file(str(path))
