"""CLIP tokenizer data, TextEncoder parity with transformers, pad/pooling rules, loading, learned tokens."""

import dataclasses
import html
import json
import logging
import os
import re
import unicodedata

import pytest
import torch
from comfyui_stablecascade.cascade import text as T
from comfyui_stablecascade.cascade.clip_layers import materialize_buffers
from comfyui_stablecascade.cascade.errors import CascadeError, CheckpointError, UnknownLayoutError

TOK_DIR = T.TOKENIZER_DIR


# ---- tokenizer data -------------------------------------------------------------------------------


def _byte_symbols():
    # GPT-2 / CLIP byte table, written independently of scripts/make_tokenizer_files.py.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    """OpenAI's SimpleTokenizer algorithm over merges.txt (ftfy is a no-op on the prompts used here)."""

    def __init__(self, merges_path):
        with open(merges_path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        assert lines[0].startswith("#version")
        merges = [tuple(line.split()) for line in lines[1:] if line]
        self.byte_encoder = _byte_symbols()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in self._split(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return [49406] + ids + [49407]

    @staticmethod
    def _split(text):
        # The original pattern is [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ (third-party `regex`); spelled with
        # unicodedata categories so the test needs only the standard library.
        out, i = [], 0
        while i < len(text):
            c = text[i]
            if c.isspace():
                i += 1
                continue
            m = re.match(r"'s|'t|'re|'ve|'m|'ll|'d", text[i:])
            if m:
                out.append(m.group(0))
                i += len(m.group(0))
                continue
            kind = unicodedata.category(c)[0]
            if kind == "N":
                out.append(c)
                i += 1
                continue
            j = i + 1
            if kind == "L":
                while j < len(text) and unicodedata.category(text[j])[0] == "L":
                    j += 1
            else:
                while j < len(text) and not text[j].isspace() and unicodedata.category(text[j])[0] not in "LN":
                    j += 1
            out.append(text[i:j])
            i = j
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return T.load_tokenizer()


@pytest.fixture(scope="module")
def reference_bpe():
    return ReferenceBPE(os.path.join(TOK_DIR, "merges.txt"))


def test_shipped_files_are_small_and_consistent(reference_bpe):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.getsize(os.path.join(TOK_DIR, name)) < 2 * 1024 * 1024
    with open(os.path.join(TOK_DIR, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    # vocab.json is exactly what SimpleTokenizer's construction rule gives from merges.txt.
    assert reference_bpe.encoder == vocab


def test_well_known_ids(tokenizer):
    # OpenAI CLIP ids quoted in public sources: the first is the common CLIP example, the second is
    # open_clip.tokenize("test tokenization") printed in huggingface/diffusers issue #2201.
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("test tokenization")["input_ids"] == [49406, 1628, 32634, 10847, 49407]


PROMPTS = [
    "a photo of a cat",
    "Cinematic photo of a dog wearing a space suit, 35mm, f/1.8, 4k!!",
    "An astronaut's helmet   reflecting\tthe EARTH; isn't it beautiful?",
    "crème brûlée on a café table, naïve art",
    "東京の夜景 and a neon sign (sic)",
    "emoji test 🐱🚀 -- ok?!",
    "x" * 300,
    "",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_original_algorithm(tokenizer, reference_bpe, prompt):
    assert tokenizer(prompt)["input_ids"] == reference_bpe.encode(prompt)


# ---- encoder --------------------------------------------------------------------------------------


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.fixture(scope="module")
def encoder():
    return _randomize(T.TextEncoder(T.TextEncoderConfig.tiny()), seed=1)


def _hf_twin(enc, eos_token_id=49407):
    from transformers import CLIPTextModelWithProjection

    cfg = enc.config.to_transformers()
    cfg.eos_token_id = eos_token_id
    hf = CLIPTextModelWithProjection(cfg).eval()
    hf.load_state_dict(enc.state_dict(), strict=True)
    return hf


def test_encode_matches_transformers(encoder):
    prompts = ["a photo of a cat", "", "an astronaut riding a horse on the moon, highly detailed"]
    clip_text, pooled = encoder.encode(prompts)
    assert clip_text.shape == (3, 77, 64) and pooled.shape == (3, 64)
    tok = encoder.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = _hf_twin(encoder)(**tok, output_hidden_states=True)
    # The pack's pure-torch tower runs the same kernels in the same order as transformers' (sdpa): bit for bit.
    torch.testing.assert_close(clip_text, ref.hidden_states[-1], atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref.text_embeds, atol=0, rtol=0)
    # hidden_states[-1] is the last layer before the final LayerNorm, not last_hidden_state.
    assert (clip_text - ref.last_hidden_state).abs().max() > 1e-2


def test_encode_matches_transformers_without_padding_and_in_bf16(encoder):
    # An all-ones mask (a 77-token prompt) and no mask take the kernel's causal path, as in transformers.
    ids, mask = encoder.tokenize(["word " * 100])
    assert bool(mask.all())
    hf = _hf_twin(encoder)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for m in (mask, None):
        clip_text, pooled = encoder.encode_tokens(ids, m)
        torch.testing.assert_close(clip_text, ref.hidden_states[-1], atol=0, rtol=0)
        torch.testing.assert_close(pooled, ref.text_embeds, atol=0, rtol=0)
    half = T.TextEncoder(encoder.config, dtype=torch.bfloat16)
    half.load_state_dict(encoder.state_dict())
    ids, mask = encoder.tokenize(["a photo of a cat", ""])
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    clip_text, pooled = half.encode_tokens(ids, mask)
    assert clip_text.dtype == torch.bfloat16
    torch.testing.assert_close(clip_text, ref.hidden_states[-1], atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref.text_embeds, atol=0, rtol=0)


def test_state_dict_keys_and_order_are_transformers(encoder):
    from transformers import CLIPTextModelWithProjection

    hf = CLIPTextModelWithProjection(encoder.config.to_transformers())
    ours, theirs = encoder.state_dict(), hf.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_pad_id_and_mask(encoder):
    ids, mask = encoder.tokenize(["", "a photo of a cat"])
    assert T.PAD_ID == 49407  # the official tokenizer's pad, also ComfyUI's Stable Cascade pad
    assert ids[0].tolist() == [49406] + [49407] * 76
    assert mask[0].tolist() == [1, 1] + [0] * 75
    assert ids[1, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[1, 7:] == 49407).all() and mask[1].sum() == 7
    long_ids, long_mask = encoder.tokenize(["word " * 100])
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == 49407 and long_mask.all()


def test_pad_id_changes_only_padding_positions(encoder):
    ids, mask = encoder.tokenize(["a photo of a cat"])
    bang = ids.clone()
    bang[mask == 0] = 0  # "!" padding, as open_clip / SDXL's tokenizer_2 would pad
    a, pa = encoder.encode_tokens(ids, mask)
    b, pb = encoder.encode_tokens(bang, mask)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)  # causal: real tokens unaffected
    torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)  # pooled at the first EOS
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # but Stage C reads the padding states too


def test_empty_prompt_is_a_real_encoding(encoder):
    clip_text, pooled = encoder.encode([""])
    ids = torch.tensor([[49406] + [49407] * 76])
    mask = torch.tensor([[1, 1] + [0] * 75])
    ref_text, ref_pooled = encoder.encode_tokens(ids, mask)
    torch.testing.assert_close(clip_text, ref_text, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)
    assert clip_text.abs().max() > 0 and pooled.abs().max() > 0


def test_batch_rows_equal_single_prompts(encoder):
    prompts = ["a cat", "a dog on a boat at sunset", ""]
    text, pooled = encoder.encode(prompts)
    for i, p in enumerate(prompts):
        t1, p1 = encoder.encode([p])
        # Batched and single matmuls round differently: measured 1.8e-7 on values up to ~1.
        torch.testing.assert_close(text[i : i + 1], t1, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(pooled[i : i + 1], p1, atol=2e-6, rtol=1e-6)


def test_bigg_config_matches_release():
    cfg = T.TextEncoderConfig.bigg().to_transformers()
    # laion/CLIP-ViT-bigG-14 text config as saved in stabilityai/stable-cascade text_encoder/config.json.
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (49408, 1280, 5120, 32)
    assert (cfg.num_attention_heads, cfg.max_position_embeddings, cfg.projection_dim) == (20, 77, 1280)
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.eos_token_id) == ("gelu", 1e-5, 49407)
    enc = T.TextEncoder(T.TextEncoderConfig.bigg(), device="meta")
    n = sum(v.numel() for v in enc.state_dict().values())
    # A released fp32 bigG text tower + projection (SDXL text_encoder_2/model.safetensors) is 2778702976
    # bytes: 4 bytes a parameter plus a JSON header of some tens of kB.
    assert 0 < 2778702976 - 4 * n < 100_000


# ---- pooling rule with added tokens ---------------------------------------------------------------


def test_pooling_rules_with_added_token(encoder):
    clone, (new_id,) = encoder.clone_with_tokens([("[fernando]", "^dog</w>")])
    ids, mask = clone.tokenize(["a dog [fernando] in space"])
    pos_new = int((ids[0] == new_id).nonzero()[0, 0])
    pos_eos = int((ids[0] == 49407).nonzero()[0, 0])
    assert clone.pooled_positions(ids).item() == pos_eos
    legacy = T.TextEncoder(dataclasses.replace(clone.config, pooling="argmax"), device="meta")
    legacy.load_state_dict(clone.state_dict(), assign=True)
    materialize_buffers(legacy, "cpu")
    assert legacy.pooled_positions(ids).item() == pos_new
    # Both rules agree with transformers for the matching config (eos_token_id 49407 vs legacy 2).
    for model, eos in ((clone, 49407), (legacy, 2)):
        _, pooled = model.encode_tokens(ids, mask)
        with torch.no_grad():
            ref = _hf_twin(model, eos_token_id=eos)(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(pooled, ref.text_embeds, atol=1e-6, rtol=0)


# ---- learned tokens -------------------------------------------------------------------------------


def test_add_token_on_clone_leaves_base_untouched(encoder):
    base_emb = encoder.text_model.embeddings.token_embedding.weight
    base_snapshot = base_emb.clone()
    before = encoder.encode(["a dog [fernando] wearing a space suit"])
    clone, ids = encoder.clone_with_tokens([("[fernando]", "^dog</w>"), ("<nothing>", "^no-token-matches-this$")])
    assert ids == [49408, 49409]
    vocab = encoder.tokenizer.get_vocab()
    dog_rows = [i for tok, i in vocab.items() if re.search("^dog</w>", tok)]
    assert dog_rows == [vocab["dog</w>"]]
    new_emb = clone.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(new_emb[49408], base_emb[dog_rows].mean(0), atol=0, rtol=0)
    assert (new_emb[49409] == 0).all() and new_emb.shape[0] == 49410
    assert clone.tokenize(["a [fernando]"])[0][0, :4].tolist() == [49406, 320, 49408, 49407]
    # Base: same vocabulary, same embedding tensor and values, same encodings.
    assert len(encoder.tokenizer) == 49408 and base_emb.shape[0] == 49408
    assert encoder.text_model.embeddings.token_embedding.weight is base_emb
    assert torch.equal(base_emb, base_snapshot)
    after = encoder.encode(["a dog [fernando] wearing a space suit"])
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # Everything else is shared, not copied.
    assert clone.text_projection.weight.data_ptr() == encoder.text_projection.weight.data_ptr()
    assert (clone.text_model.encoder.layers[0].mlp.fc1.weight.data_ptr()
            == encoder.text_model.encoder.layers[0].mlp.fc1.weight.data_ptr())


def test_add_token_errors(encoder):
    with pytest.raises(CascadeError, match="clone"):
        encoder.add_token("[fernando]", None)
    clone = encoder.clone()
    clone.add_token("[fernando]", None)
    with pytest.raises(CascadeError, match="already added"):
        clone.add_token("[fernando]", None)
    with pytest.raises(CascadeError, match="vocabulary"):
        clone.add_token("dog</w>", None)
    with pytest.raises(CascadeError):
        clone.add_token("  ", None)
    with pytest.raises(CascadeError, match="regex"):
        clone.add_token("[other]", "^dog(")
    assert "[other]" not in clone.tokenizer.get_vocab()
    base_ids, _ = encoder.tokenize(["[fernando]"])
    assert 49408 not in base_ids
    with pytest.raises(CascadeError, match="outside"):
        encoder.encode_tokens(torch.tensor([[49406, 49408, 49407]]))


def test_embedding_delta_with_strength(encoder):
    clone, (new_id,) = encoder.clone_with_tokens([("[fernando]", "^dog</w>")])
    snail = encoder.tokenizer.get_vocab()["snail</w>"]
    start = clone.text_model.embeddings.token_embedding.weight.clone()
    deltas = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    clone.add_embedding_delta([new_id, snail], deltas, strength=0.5)
    emb = clone.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(emb[new_id], start[new_id] + 0.5 * deltas[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[snail], start[snail] + 0.5 * deltas[1], atol=1e-6, rtol=0)
    untouched = torch.ones(emb.shape[0], dtype=torch.bool)
    untouched[[new_id, snail]] = False
    assert torch.equal(emb[untouched], start[untouched])
    # The base row of an existing vocab token is not changed through the shared storage.
    assert not torch.equal(encoder.text_model.embeddings.token_embedding.weight[snail], emb[snail])
    with pytest.raises(Exception, match="one row per id"):
        clone.add_embedding_delta([new_id], deltas)
    with pytest.raises(CascadeError, match="rows"):
        clone.add_embedding_delta([60000], deltas[:1])
    a = clone.encode(["a slow snail"])[0]
    b = encoder.encode(["a slow snail"])[0]
    assert (a - b).abs().max() > 1e-4


# ---- loading --------------------------------------------------------------------------------------


PREFIXES = ["", "transformer.", "clip_g.transformer.", "text_encoders.clip_g.transformer.",
            "text_encoder.clip_g.transformer."]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_load_any_prefix(encoder, prefix):
    sd = {prefix + k: v.clone() for k, v in encoder.state_dict().items()}
    sd["model.diffusion_model.clip_txt_mapper.weight"] = torch.zeros(3, 3)  # another component of a package
    loaded = T.TextEncoder.from_state_dict(sd)
    assert loaded.config == encoder.config
    for x, y in zip(loaded.encode(["a cat"]), encoder.encode(["a cat"])):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_load_comfy_legacy_projection_and_dtype(encoder):
    sd = {"clip_g.transformer." + k: v.clone() for k, v in encoder.state_dict().items()
          if k != "text_projection.weight"}
    sd["clip_g.text_projection"] = encoder.text_projection.weight.t().clone()
    sd = {k: v.half() for k, v in sd.items()}
    loaded = T.TextEncoder.from_state_dict(sd)
    assert loaded.text_projection.weight.dtype == torch.float16
    # fp16 rounding of the weights: half a unit of 11 significant bits is 2.4e-4 relative (measured 2.4e-4 abs).
    torch.testing.assert_close(loaded.text_projection.weight.float(), encoder.text_projection.weight,
                               atol=1e-3, rtol=1e-3)
    as_fp32 = T.TextEncoder.from_state_dict(sd, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())


def _to_openclip(sd, prefix):
    out = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].t().contiguous(),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(2):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for a, b in names.items():
                out[f"{dst}{a}.{kind}"] = sd[f"{src}{b}.{kind}"]
    return out


def test_load_open_clip_layout(encoder):
    sd = _to_openclip(encoder.state_dict(), "conditioner.embedders.1.model.")
    loaded = T.TextEncoder.from_state_dict(sd)
    for x, y in zip(loaded.encode(["a cat", ""]), encoder.encode(["a cat", ""])):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_load_reports_missing_unexpected_unknown(encoder, caplog):
    sd = dict(encoder.state_dict())
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="fc2.bias"):
        T.TextEncoder.from_state_dict(sd)
    sd = dict(encoder.state_dict())
    sd["text_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING):
        T.TextEncoder.from_state_dict(sd)
    assert "extra.weight" in caplog.text
    with pytest.raises(UnknownLayoutError, match="text_model.final_layer_norm"):
        T.TextEncoder.from_state_dict({"down_blocks.0.weight": torch.zeros(1)})
    target = T.TextEncoder(encoder.config, device="meta")
    sd = dict(encoder.state_dict())
    sd["text_projection.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="shapes"):
        target.load_state_dict_any(sd)


def test_transformers_classes_load_the_folder_offline(monkeypatch):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(TOK_DIR, local_files_only=True)
        assert tok.pad_token_id == 49407 and tok.model_max_length == 77 and len(tok) == 49408
        assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_files_are_the_derived_bytes():
    import hashlib

    # Output of scripts/make_tokenizer_files.py (see docs/TEXT_ENCODER.md); guards against edits and
    # line-ending conversion of the data files.
    pinned = {
        "vocab.json": "5047b556ce86ccaf6aa22b3ffccfc52d391ea4accdab9c2f2407da5b742d4363",
        "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    }
    for name, digest in pinned.items():
        with open(os.path.join(TOK_DIR, name), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, name


def test_bf16_weights_compute_in_bf16(encoder):
    sd = {k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()}
    low = T.TextEncoder.from_state_dict(sd)
    ref = T.TextEncoder.from_state_dict(sd, dtype=torch.float32)  # same rounded weights, fp32 compute
    (a, pa), (b, pb) = low.encode(["a cat on a mat"]), ref.encode(["a cat on a mat"])
    assert a.dtype == pa.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits; over two layers the result stays collinear with the fp32 one.
    for x, y in ((a, b), (pa, pb)):
        cos = torch.nn.functional.cosine_similarity(x.float().flatten(), y.flatten(), dim=0)
        assert cos > 0.999
