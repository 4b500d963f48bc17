"""Stage C LoRA: both file layouts, learned tokens, stacking, bad input; patched numbers vs hand/official math.

The official mechanism (``modules/lora.py`` + ``train_c_lora.py``, SPEC §13) is replayed here with torch's
``parametrize`` on the same random weights: LoRA modules registered on every module whose name contains
``.attn`` and collected with ``model.modules()``, which fixes the file order; W' = W + up @ down / rank.
ComfyUI core applies a community LoRA to its split ``to_q/to_k/to_v`` weights as W + strength * alpha/rank *
up @ down; the tests do that on the split weights and concatenate.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from comfyui_harness import import_comfy_or_skip

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import loading
from comfyui_stablecascade.cascade.errors import CascadeError, CheckpointError, ShapeError
from comfyui_stablecascade.cascade.lora_format import CLIP_VOCAB_SIZE, parse_lora, read_lora_file
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.cascade.text import TextEncoder, TextEncoderConfig
from comfyui_stablecascade.model_patches import lora as L
from comfyui_stablecascade.nodes.common import DEMO_CHOICE
from comfyui_stablecascade.nodes.lora import LoraLoader, LoraLoaderModelOnly
from comfyui_stablecascade.pipeline import STAGE_C, sample_stage_c

WIDTH_TEXT = 64


def _tiny_config(width: int = 64) -> StageCConfig:
    return dataclasses.replace(StageCConfig.tiny(), c_hidden=(width, width), c_cond=width,
                               c_clip_text=WIDTH_TEXT, c_clip_text_pooled=WIDTH_TEXT)


def _random_stage_c(width: int = 64, seed: int = 0) -> StageC:
    # 1-D parameters: 0.02 * noise, no +1 for norm weights (the draw these tests were written with).
    return randomize_(StageC(_tiny_config(width)), seed, unit_norm_weights=False).eval()


@pytest.fixture
def stage_c():
    return host.wrap(_random_stage_c(), "stage_c")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig.tiny(hidden_size=WIDTH_TEXT, projection_dim=WIDTH_TEXT))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _weights_as_loaded(handle) -> dict[str, torch.Tensor]:
    """The weights the network computes with once the host has loaded ``handle`` (patches applied)."""
    host.load([handle])
    return _snapshot(handle.module)


def _assert_same(a: dict, b: dict, skip: set = frozenset()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


# ---- the official trainer's mechanism, replayed ---------------------------------------------------------


class _OfficialLoRA(nn.Module):
    """SPEC §13 math: W + (lora_up @ lora_down) * alpha / rank, alpha = 1."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.randn(rank, weight.shape[1], generator=gen))
        self.lora_up = nn.Parameter(torch.randn(weight.shape[0], rank, generator=gen))
        self.scale = 1.0 / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.lora_up @ self.lora_down) * self.scale


def _official_reference(model: nn.Module, rank: int = 4, seed: int = 1) -> tuple[nn.Module, dict]:
    """Parametrize a copy as the trainer does; return it and the file it would save (weights.{i}.*)."""
    ref = _random_stage_c()
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    for name, module in ref.named_modules():  # registering while walking, as the trainer does
        if ".attn" not in name or parametrize.is_parametrized(module):
            continue
        own = dict(module.named_parameters(recurse=False))
        for pname in ("weight", "in_proj_weight"):
            if pname in own:
                parametrize.register_parametrization(module, pname, _OfficialLoRA(own[pname], rank, gen))
                break
    loras = [m for m in ref.modules() if isinstance(m, _OfficialLoRA)]
    sd = {}
    for i, m in enumerate(loras):
        sd[f"weights.{i}.lora_down"] = m.lora_down.detach().clone()
        sd[f"weights.{i}.lora_up"] = m.lora_up.detach().clone()
    return ref, sd


def _save(tmp_path, name: str, sd: dict) -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_official_order_is_the_trainers_for_the_released_depths():
    with torch.device("meta"):
        big = StageC(StageCConfig.big())
    keys = L.official_target_keys(big)
    assert len(keys) == 128  # SPEC §13: 64 attention blocks, 2 targets each
    assert all(k.endswith("out_proj.weight") for k in keys[0::2])
    assert all(k.endswith("in_proj_weight") for k in keys[1::2])
    blocks = [k.split(".attention")[0] for k in keys[0::2]]
    assert all(b.startswith("down_blocks.0.") for b in blocks[0:8])
    assert all(b.startswith("down_blocks.1.") for b in blocks[8:32])
    assert all(b.startswith("up_blocks.0.") for b in blocks[32:56])
    assert all(b.startswith("up_blocks.1.") for b in blocks[56:64])
    assert blocks[:2] == ["down_blocks.0.2", "down_blocks.0.5"]
    with torch.device("meta"):
        assert len(L.official_target_keys(StageC(StageCConfig.lite()))) == 64


def test_official_file_matches_the_official_parametrization(stage_c, tmp_path):
    ref, sd = _official_reference(stage_c.module)
    assert len(sd) == 2 * len(L.official_target_keys(stage_c.module))
    lora = read_lora_file(_save(tmp_path, "official.safetensors", sd))
    assert lora.layout == "official"
    patched, _ = L.apply_lora(stage_c, None, lora, strength_model=1.0)
    got = _weights_as_loaded(patched)
    with torch.no_grad():
        want = {k: v.detach() for k, v in ref.state_dict().items() if "parametrizations" not in k}
        for name, module in ref.named_modules():  # parametrized weights as the model sees them
            for pname in ("weight", "in_proj_weight"):
                if parametrize.is_parametrized(module, pname):
                    want[f"{name}.{pname}"] = getattr(module, pname).detach()
    assert want.keys() == got.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # And the network output, on the same random weights and inputs.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 4, 4, generator=gen)
    r = torch.tensor([0.3])
    clip = torch.randn(1, 77, WIDTH_TEXT, generator=gen)
    pooled = torch.randn(1, 1, WIDTH_TEXT, generator=gen)
    img = torch.zeros(1, 1, 768)
    with torch.no_grad():
        # The weights above agree to fp32 rounding (1e-6); a whole U-Net forward amplifies that about tenfold.
        torch.testing.assert_close(patched.module(x, r, clip, pooled, img), ref(x, r, clip, pooled, img),
                                   rtol=1e-4, atol=1e-5)


def test_patch_values_pickle(stage_c):
    patches = L.stage_c_patches(parse_lora(L.demo_lora(stage_c.module), "x"), stage_c.module)
    again = pickle.loads(pickle.dumps(patches))
    assert again.keys() == patches.keys()
    for key, value in patches.items():
        assert torch.equal(again[key](torch.zeros(1)), value(torch.zeros(1)))


def test_official_strength_is_w_plus_s_up_down_over_rank(stage_c, tmp_path):
    base = _snapshot(stage_c.module)
    _, sd = _official_reference(stage_c.module)
    lora = read_lora_file(_save(tmp_path, "official.safetensors", sd))
    s = 0.7
    patched, _ = L.apply_lora(stage_c, None, lora, strength_model=s)
    got = _weights_as_loaded(patched)
    keys = L.official_target_keys(stage_c.module)
    for i, key in enumerate(keys):
        up, down = sd[f"weights.{i}.lora_up"], sd[f"weights.{i}.lora_down"]
        torch.testing.assert_close(got[key], base[key] + s * (up @ down) / up.shape[1], rtol=1e-5, atol=1e-6)
    _assert_same(got, base, skip=set(keys))


def _community_file(model: nn.Module, gen: torch.Generator, rank: int = 2, alpha: float = 1.0,
                    dotted: bool = False) -> tuple[dict, dict]:
    """A kohya/ComfyUI-style file (lora_prior_unet_ + ComfyUI module names); returns it and the pairs by name."""
    names = []
    for key in model.state_dict():
        if key.endswith("attention.attn.in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            names += [f"{stem}to_q", f"{stem}to_k", f"{stem}to_v", f"{stem}out_proj"]
    names += ["down_blocks.0.0.channelwise.0", "up_blocks.1.0.channelwise.4", "down_blocks.1.2.kv_mapper.1",
              "down_blocks.0.1.mapper_sca", "down_blocks.0.0.depthwise", "embedding.1", "clip_txt_mapper"]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd, pairs = {}, {}
    for name in names:
        if name.endswith(("to_q", "to_k", "to_v")):
            c = shapes[name.rsplit(".", 1)[0] + ".in_proj_weight"][1]
            out_f, in_shape = c, (c,)
        else:
            out_f, in_shape = shapes[f"{name}.weight"][0], tuple(shapes[f"{name}.weight"][1:])
        up = torch.randn(out_f, rank, *([1, 1] if len(in_shape) == 3 else []), generator=gen)
        down = torch.randn(rank, *in_shape, generator=gen)
        if dotted:
            stem = "lora_prior_unet." + name.replace("attention.attn.to_", "attention.to_").replace(
                "attention.attn.out_proj", "attention.to_out.0")
            sd[f"{stem}.lora_B.weight"], sd[f"{stem}.lora_A.weight"] = up, down
        else:
            stem = "lora_prior_unet_" + name.replace(".", "_")
            sd[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_down.weight"] = up, down
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        pairs[name] = (up, down)
    return sd, pairs


def _comfy_reference(base: dict, pairs: dict, strength: float, alpha: float) -> dict:
    """ComfyUI core's result: split in_proj into to_q/to_k/to_v, add strength*alpha/rank*up@down, concatenate."""
    split = {}
    for key, w in base.items():
        if key.endswith("in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), w.chunk(3, dim=0)):
                split[f"{stem}{name}"] = part.clone()
        elif key.endswith(".weight"):
            split[key[: -len(".weight")]] = w.clone()
    for name, (up, down) in pairs.items():
        w = split[name]
        split[name] = w + strength * (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).view(w.shape)
    out = dict(base)
    for key in base:
        if key.endswith("in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            out[key] = torch.cat([split[f"{stem}{n}"] for n in ("to_q", "to_k", "to_v")])
        elif key.endswith(".weight"):
            out[key] = split[key[: -len(".weight")]]
    return out


@pytest.mark.parametrize("dotted", [False, True], ids=["kohya", "diffusers-dotted"])
def test_community_file_matches_comfyui_math(stage_c, tmp_path, dotted):
    base = _snapshot(stage_c.module)
    sd, pairs = _community_file(stage_c.module, torch.Generator().manual_seed(5), rank=2, alpha=1.5, dotted=dotted)
    lora = read_lora_file(_save(tmp_path, "community.safetensors", sd))
    assert lora.layout == "community"
    s = 0.8
    patched, _ = L.apply_lora(stage_c, None, lora, strength_model=s)
    got = _weights_as_loaded(patched)
    want = _comfy_reference(base, pairs, s, 1.5)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(got["down_blocks.0.0.depthwise.weight"], base["down_blocks.0.0.depthwise.weight"])


def test_base_model_unchanged_after_applying_and_sampling(stage_c):
    base_weights = _snapshot(stage_c.module)
    cond = [[torch.randn(1, 77, WIDTH_TEXT), {"pooled_output": torch.randn(1, WIDTH_TEXT)}]]
    latent = torch.zeros(1, 16, 4, 4)
    settings = STAGE_C.replace(steps=2, cfg=1.0)
    before = sample_stage_c(stage_c, cond, None, latent, settings, seed=1)
    _, sd = _official_reference(stage_c.module)
    patched, _ = L.apply_lora(stage_c, None, parse_lora(sd, "x"), strength_model=1.0)
    with_lora = sample_stage_c(patched, cond, None, latent, settings, seed=1)
    assert not torch.allclose(with_lora, before)
    assert stage_c.patch_keys() == []
    again = sample_stage_c(stage_c, cond, None, latent, settings, seed=1)
    assert torch.equal(again, before)
    _assert_same(_weights_as_loaded(stage_c), base_weights)
    host.unload_all()
    _assert_same(_snapshot(stage_c.module), base_weights)


def _token_lora(n_new: int, extra_ids: list[int], gen: torch.Generator) -> dict:
    ids = list(range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + n_new)) + extra_ids
    return {"embeddings.indices": torch.tensor(ids, dtype=torch.int64),
            "embeddings.embeddings": torch.randn(len(ids), WIDTH_TEXT, generator=gen)}


def test_learned_tokens_on_a_twin(stage_c, encoder):
    enc_handle = host.wrap(encoder, "text_encoder")
    enc_before = _snapshot(encoder)
    dog = encoder.tokenizer.convert_tokens_to_ids("dog</w>")
    sd = {**L.demo_lora(stage_c.module), **_token_lora(1, [dog], torch.Generator().manual_seed(2))}
    lora = parse_lora(sd, "fernando.safetensors")
    s = 0.5
    new_c, new_te = L.apply_lora(stage_c, enc_handle, lora, 1.0, s, L.parse_tokens("[fernando]=^dog</w>"))
    twin = new_te.module
    assert twin is not encoder and twin.added_tokens == {"[fernando]": CLIP_VOCAB_SIZE}
    ids, _ = twin.tokenize(["a photo of [fernando]"])
    assert CLIP_VOCAB_SIZE in ids[0].tolist()
    emb = twin.text_model.embeddings.token_embedding.weight
    base_emb = encoder.text_model.embeddings.token_embedding.weight
    vocab = encoder.tokenizer.get_vocab()
    init = base_emb[[i for t, i in vocab.items() if t.startswith("dog</w>")]].mean(0)
    deltas = sd["embeddings.embeddings"]
    torch.testing.assert_close(emb[CLIP_VOCAB_SIZE], init + s * deltas[0])
    torch.testing.assert_close(emb[dog], base_emb[dog] + s * deltas[1])
    assert torch.equal(emb[:dog], base_emb[:dog])
    prompt = ["a dog [fernando] in a space suit"]
    assert not torch.allclose(twin.encode(prompt)[0], encoder.encode(prompt)[0])
    # The base encoder: same weights, same vocabulary, same output as before.
    _assert_same(_snapshot(encoder), enc_before)
    assert "[fernando]" not in encoder.tokenizer.get_vocab() and encoder.added_tokens == {}
    assert base_emb.shape[0] == CLIP_VOCAB_SIZE


def test_token_collisions_and_count_errors_leave_nothing_changed(stage_c, encoder):
    enc_handle = host.wrap(encoder, "text_encoder")
    sd = {**L.demo_lora(stage_c.module), **_token_lora(1, [], torch.Generator().manual_seed(2))}
    lora = parse_lora(sd, "fernando.safetensors")
    with pytest.raises(CascadeError, match="collides with the existing CLIP token"):
        L.apply_lora(stage_c, enc_handle, lora, 1.0, 1.0, L.parse_tokens("<|endoftext|>"))
    c1, te1 = L.apply_lora(stage_c, enc_handle, lora, 1.0, 1.0, L.parse_tokens("[fernando]"))
    with pytest.raises(CascadeError, match="earlier in the chain"):
        L.apply_lora(c1, te1, lora, 1.0, 1.0, L.parse_tokens("[fernando]"))
    with pytest.raises(CascadeError, match="trains 1 new token"):
        L.apply_lora(stage_c, enc_handle, lora, 1.0, 1.0, [])
    with pytest.raises(CascadeError, match="not a learned-token name"):
        L.parse_tokens("^snail")
    assert stage_c.patch_keys() == [] and c1.patch_keys() == ["scw_lora:fernando.safetensors"]
    assert encoder.added_tokens == {} and te1.module.added_tokens == {"[fernando]": CLIP_VOCAB_SIZE}


def test_stacking_sums_patches_and_remaps_tokens(stage_c, encoder, tmp_path):
    base = _snapshot(stage_c.module)
    enc_handle = host.wrap(encoder, "text_encoder")
    gen = torch.Generator().manual_seed(7)
    sd_a = {**L.demo_lora(stage_c.module, seed=1), **_token_lora(1, [], gen)}
    sd_b, pairs_b = _community_file(stage_c.module, gen, rank=2, alpha=2.0)
    sd_c = {**L.demo_lora(stage_c.module, seed=2), **_token_lora(1, [], gen)}
    lora_a, lora_b, lora_c = parse_lora(sd_a, "a"), parse_lora(sd_b, "b"), parse_lora(sd_c, "c")
    c1, t1 = L.apply_lora(stage_c, enc_handle, lora_a, 0.5, 1.0, L.parse_tokens("[fernando]=^dog</w>"))
    c2, t2 = L.apply_lora(c1, t1, lora_b, 1.5, 1.0, [])
    c3, t3 = L.apply_lora(c2, t2, lora_c, -1.0, 0.25, L.parse_tokens("[other]"))
    assert t2 is t1  # a LoRA without text part passes the encoder through
    assert c3.patch_keys() == ["scw_lora:a", "scw_lora:b", "scw_lora:c"]
    got = _weights_as_loaded(c3)
    want = _comfy_reference(base, pairs_b, 1.5, 2.0)
    for i, key in enumerate(L.official_target_keys(stage_c.module)):
        for sd, s in ((sd_a, 0.5), (sd_c, -1.0)):
            want[key] = want[key] + s * (sd[f"weights.{i}.lora_up"] @ sd[f"weights.{i}.lora_down"]) / 4
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    # The second LoRA's token was trained as id 49408 too: it lands on the next free id.
    assert t3.module.added_tokens == {"[fernando]": CLIP_VOCAB_SIZE, "[other]": CLIP_VOCAB_SIZE + 1}
    emb = t3.module.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(emb[CLIP_VOCAB_SIZE + 1], 0.25 * sd_c["embeddings.embeddings"][0])
    torch.testing.assert_close(emb[CLIP_VOCAB_SIZE], t1.module.text_model.embeddings.token_embedding.weight[-1])
    # Each link of the chain still computes with its own patches; the base with none.
    _assert_same(_weights_as_loaded(stage_c), base)
    assert not torch.equal(_weights_as_loaded(c1)["embedding.1.weight"], got["embedding.1.weight"])


def test_wrong_width_names_the_fix(stage_c, tmp_path):
    wide = _random_stage_c(width=128)
    for sd in (L.demo_lora(wide), _community_file(wide, torch.Generator().manual_seed(0))[0]):
        lora = parse_lora(sd, "wide.safetensors")
        with pytest.raises(ShapeError, match=r"128 channels wide.*64 channels wide.*connect the Stage C"):
            L.apply_lora(stage_c, None, lora)
    assert stage_c.patch_keys() == []
    assert L.describe_width(2048) == "2048 channels wide (3.6B Stage C)"


def _controlnet_like() -> dict:
    return {"backbone.0.0.weight": torch.zeros(4, 3, 3, 3), "projections.0.0.weight": torch.zeros(8, 4, 1, 1),
            "projections.0.2.weight": torch.zeros(8, 8, 1, 1)}


def test_wrong_file_kinds_name_the_right_loader(stage_c, encoder, tmp_models):
    host.set_models_dir(str(tmp_models))
    try:
        save_file(_controlnet_like(), str(tmp_models / "loras" / "canny.safetensors"))
        save_file({k: v.contiguous() for k, v in stage_c.module.state_dict().items()},
                  str(tmp_models / "loras" / "stage_c.safetensors"))
        enc_handle = host.wrap(encoder, "text_encoder")
        with pytest.raises(CheckpointError, match=r"ControlNet.*'Stable Cascade Load ControlNet' node"):
            LoraLoader().apply(stage_c, enc_handle, "canny.safetensors", 1.0, 1.0, "")
        with pytest.raises(CheckpointError, match=r"Stage C \(prior\).*'Stable Cascade Load Stage C' node"):
            LoraLoaderModelOnly().apply(stage_c, "stage_c.safetensors", 1.0)
        # The reverse: a LoRA given to the ControlNet loader.
        lora_path = _save(tmp_models / "loras", "fernando.safetensors", L.demo_lora(stage_c.module))
        with pytest.raises(CascadeError, match="LoRA"):
            loading.load_controlnet(lora_path)
    finally:
        host.set_models_dir(None)
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(CheckpointError, match="another model family"):
        L.apply_lora(stage_c, None, parse_lora(sdxl, "sdxl"))
    with pytest.raises(CheckpointError, match="LoHa"):
        parse_lora({"lora_prior_unet_x.hada_w1_a": torch.zeros(2, 2)}, "loha")
    assert stage_c.patch_keys() == []


def test_error_midway_leaves_nothing_patched(stage_c, encoder):
    base = _snapshot(stage_c.module)
    enc_handle = host.wrap(encoder, "text_encoder")
    sd = {**L.demo_lora(stage_c.module), **_token_lora(1, [], torch.Generator().manual_seed(2))}
    sd["weights.5.lora_up"] = torch.zeros(7, 4)  # a damaged pair in the middle of the file
    with pytest.raises(ShapeError, match="weights.5"):
        L.apply_lora(stage_c, enc_handle, parse_lora(sd, "bad"), 1.0, 1.0, L.parse_tokens("[fernando]"))
    sd = {**L.demo_lora(stage_c.module), "embeddings.indices": torch.tensor([CLIP_VOCAB_SIZE]),
          "embeddings.embeddings": torch.zeros(1, 1280)}  # token rows for a wider text encoder
    with pytest.raises(ShapeError, match="1280 wide"):
        L.apply_lora(stage_c, enc_handle, parse_lora(sd, "bad"), 1.0, 1.0, L.parse_tokens("[fernando]"))
    assert stage_c.patch_keys() == [] and enc_handle.patch_keys() == []
    assert encoder.added_tokens == {}
    _assert_same(_weights_as_loaded(stage_c), base)


def test_text_encoder_lora_keys_patch_a_twin(stage_c, encoder):
    enc_handle = host.wrap(encoder, "text_encoder")
    before = _snapshot(encoder)
    gen = torch.Generator().manual_seed(4)
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    up, down = torch.randn(WIDTH_TEXT, 2, generator=gen), torch.randn(2, WIDTH_TEXT, generator=gen)
    sd = {"lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
          "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
          "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)}
    _, te = L.apply_lora(stage_c, enc_handle, parse_lora(sd, "te"), 1.0, 0.6, [])
    # A patch on a clone of the encoder's handle (one network for the memory manager), applied when it loads.
    assert te.patcher is not enc_handle.patcher and te.module is encoder
    assert te.patch_keys() == ["scw_lora:te"] and enc_handle.patch_keys() == []
    prompt = ["a photo of a cat"]
    with host.using([enc_handle]):
        plain = encoder.encode(prompt)[0]
    with host.using([te]):
        torch.testing.assert_close(te.module.state_dict()[key], before[key] + 0.6 * (up @ down) / 2)
        patched = te.module.encode(prompt)[0]
    assert not torch.allclose(patched, plain)
    host.load([enc_handle])  # the base handle: the built-in manager takes the clone's patches off
    _assert_same(_snapshot(encoder), before)
    torch.testing.assert_close(encoder.encode(prompt)[0], plain, atol=0, rtol=0)


def _resident_bytes() -> int:
    return sum(p.model_size() for p in host._BUILTIN.manager.resident)


def test_learned_token_encoder_is_counted_once(stage_c, encoder):
    """A LoRA with learned tokens gives a text encoder that shares every layer but its token embedding with the
    base one; the memory manager holds one network for both, so the shared weights are counted once."""
    host.unload_all()
    enc_handle = host.wrap(encoder, "text_encoder")
    sd = {**L.demo_lora(stage_c.module), **_token_lora(1, [], torch.Generator().manual_seed(2))}
    _, te = L.apply_lora(stage_c, enc_handle, parse_lora(sd, "f"), 1.0, 1.0, L.parse_tokens("[fernando]"))
    twin, base_sd = te.module, encoder.state_dict(keep_vars=True)
    assert twin is not encoder and "[fernando]" in twin.added_tokens
    # Every tensor but the token embedding is the base encoder's own object, not a copy.
    shared = [k for k, v in twin.state_dict(keep_vars=True).items() if v is base_sd[k]]
    assert set(base_sd) - set(shared) == {"text_model.embeddings.token_embedding.weight"}
    # The twin's handle is a clone of the base's patcher: same network, same size (the base's bytes, once).
    assert te.patcher.model is encoder and te.model_size() == enc_handle.model_size() == host.builtin.module_size(
        encoder)
    with host.using([enc_handle]):
        encoder.encode(["a cat"])
    once = _resident_bytes()
    with host.using([te]):
        te.module.encode(["a [fernando] cat"])
    assert _resident_bytes() == once, "the learned-token encoder was counted beside the base one"
    assert sum(p.model is encoder for p in host._BUILTIN.manager.resident) == 1
    # Only the twin's own embedding table is extra memory, outside the manager's count.
    extra = twin.text_model.embeddings.token_embedding.weight
    assert extra.shape[0] == CLIP_VOCAB_SIZE + 1 and extra is not base_sd["text_model.embeddings.token_embedding.weight"]


def test_twin_computes_with_the_base_encoders_live_layers(encoder):
    """The twin's layers are the base's objects: what a host does to them (move, cast, patch in place) the twin
    computes with. Cast here, the one change a CPU test can make: both then agree on a prompt without the token."""
    twin, _ = encoder.clone_with_tokens([("[fernando]", None)])
    ids, mask = encoder.tokenize(["a photo of a cat"])
    tm = encoder.text_model
    layers = (tm.embeddings.position_embedding, tm.encoder, tm.final_layer_norm, encoder.text_projection)
    try:
        for layer in layers:  # everything but the token table, which the twin holds on its own
            layer.to(torch.float64)
        assert twin.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float64
        assert twin.text_projection.weight.dtype == torch.float64
        base_text, base_pooled = encoder.encode_tokens(ids, mask)
        twin_text, twin_pooled = twin.encode_tokens(ids, mask)
    finally:
        for layer in layers:
            layer.to(torch.float32)
    assert base_text.dtype == twin_text.dtype == torch.float64
    torch.testing.assert_close(twin_text, base_text, atol=0, rtol=0)
    torch.testing.assert_close(twin_pooled, base_pooled, atol=0, rtol=0)


def test_nodes_demo_choice_and_token_validation(stage_c, encoder):
    assert LoraLoader.VALIDATE_INPUTS(tokens="[fernando]=^dog</w>\n# comment\n") is True
    assert "not a learned-token name" in LoraLoader.VALIDATE_INPUTS(tokens="fernando")
    enc_handle = host.wrap(encoder, "text_encoder")
    c, te = LoraLoader().apply(stage_c, enc_handle, DEMO_CHOICE, 1.0, 1.0, "[fernando]=^dog</w>")["result"]
    assert c.patch_keys() == ["scw_lora:demo LoRA"] and "[fernando]" in te.module.added_tokens
    (c_only,) = LoraLoaderModelOnly().apply(stage_c, DEMO_CHOICE, 0.5)["result"]
    assert c_only.patch_keys() == ["scw_lora:demo LoRA"] and stage_c.patch_keys() == []


# ---- ComfyUI core's own LoRA loader on the same weights (opt-in: COMFYUI_PATH and ComfyUI's Python) -------


@pytest.fixture(scope="module")
def comfy_core():
    import_comfy_or_skip("the parity test with ComfyUI core's LoRA loader", "comfy.lora", "comfy.model_base",
                         "comfy.model_patcher", "comfy.sd", "comfy.supported_models")
    return sys.modules["comfy"]  # the package, with those submodules imported


def _comfy_stage_c(comfy, model: StageC):
    """ComfyUI core's own Stage C (split to_q/to_k/to_v) holding ``model``'s weights, under a ModelPatcher."""
    cfg = model.config
    unet_config = {
        "stable_cascade_stage": "c", "c_in": cfg.c_in, "c_out": cfg.c_out, "c_r": cfg.c_r, "c_cond": cfg.c_cond,
        "c_hidden": list(cfg.c_hidden), "nhead": list(cfg.nhead), "blocks": [list(b) for b in cfg.blocks],
        "block_repeat": [list(b) for b in cfg.block_repeat], "level_config": list(cfg.level_config),
        "c_clip_text": cfg.c_clip_text, "c_clip_text_pooled": cfg.c_clip_text_pooled, "c_clip_img": cfg.c_clip_img,
        "c_clip_seq": cfg.c_clip_seq, "kernel_size": cfg.kernel_size, "dropout": list(cfg.dropout),
        "self_attn": cfg.self_attn, "t_conds": list(cfg.t_conds), "switch_level": [False],
    }
    config = comfy.supported_models.Stable_Cascade_C(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.StableCascade_C(config, device="cpu")
    base.diffusion_model.load_state_dict(config.process_unet_state_dict(_snapshot(model)), strict=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.mark.comfyui
def test_community_lora_matches_comfyui_core_loader(stage_c, comfy_core):
    comfy = comfy_core
    base = _snapshot(stage_c.module)
    sd, _ = _community_file(stage_c.module, torch.Generator().manual_seed(9), rank=2, alpha=1.5)
    s = 0.8
    core_patcher, _ = comfy.sd.load_lora_for_models(_comfy_stage_c(comfy, stage_c.module), None, sd, s, 0)
    core_patcher.patch_model()
    try:
        core = {k[len("diffusion_model."):]: v.detach().clone() for k, v in core_patcher.model.state_dict().items()
                if k.startswith("diffusion_model.")}
    finally:
        core_patcher.unpatch_model()
    patched, _ = L.apply_lora(stage_c, None, parse_lora(sd, "community"), strength_model=s)
    ours = _weights_as_loaded(patched)
    changed = 0
    for key, value in ours.items():
        if key.endswith("in_proj_weight") or key.endswith("in_proj_bias"):
            stem, suffix = key.rsplit("in_proj_", 1)
            want = torch.cat([core[f"{stem}to_{n}.{suffix}"] for n in "qkv"])
        else:
            want = core[key]
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(value, base[key])
    assert changed >= len(L.official_target_keys(stage_c.module)) + 7
