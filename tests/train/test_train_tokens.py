"""Learned tokens in the official format: the trained row changes the conditioning only from the token on, the
pack's LoRA loader rebuilds exactly the trainer's encoder, existing tokens fine-tune, collisions are refused."""

from __future__ import annotations

import pytest
import torch

from train_helpers import tiny_cache, tiny_stage_c, tiny_text_encoder

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.lora_format import CLIP_VOCAB_SIZE, parse_lora
from comfyui_stablecascade.model_patches import lora as L
from comfyui_stablecascade.train.errors import TrainingInputError
from comfyui_stablecascade.train.loop import TrainSettings, train
from comfyui_stablecascade.train.tokens import LearnedTokens, loader_tokens_field, parse_train_tokens

TOKENS = "[zorb]=^dog</w>\n^snail</w>"


@pytest.fixture(scope="module")
def trained():
    host.unload_all()
    torch.set_num_threads(1)
    encoder = tiny_text_encoder()
    te = host.wrap(encoder, "text_encoder")
    sc = host.wrap(tiny_stage_c(), "stage_c")
    emb_before = encoder.text_model.embeddings.token_embedding.weight.clone()
    cache = tiny_cache(2, text=False, captions=["a photo of [zorb]", "a snail and [zorb]"])
    result = train(sc, te, cache, TrainSettings(steps=4, batch_size=2, lr=1e-1, warmup=0, caption_dropout=0.0,
                                                tokens=TOKENS))
    return encoder, te, sc, emb_before, result


def test_the_file_holds_the_official_token_rows(trained):
    encoder, te, sc, emb_before, result = trained
    ids = result.lora["embeddings.indices"]
    snail = encoder.tokenizer.get_vocab()["snail</w>"]
    assert ids.dtype == torch.int64 and ids.tolist() == [CLIP_VOCAB_SIZE, snail]
    rows = result.lora["embeddings.embeddings"]
    assert rows.shape == (2, 32) and bool((rows.abs().sum(1) > 0).all())
    assert result.loader_tokens == "[zorb]=^dog</w>" and result.community is None
    # The loaded encoder is untouched: same table object values, no added token.
    assert torch.equal(encoder.text_model.embeddings.token_embedding.weight, emb_before)
    assert "[zorb]" not in encoder.tokenizer.get_vocab() and not encoder.added_tokens


def test_loader_rebuilds_the_trainers_encoder_and_the_token_changes_only_its_positions(trained):
    encoder, te, sc, emb_before, result = trained
    lf = parse_lora(result.lora, "trained")
    _, new_te = L.apply_lora(sc, te, lf, tokens=L.parse_tokens(result.loader_tokens))
    twin = new_te.module
    # The trainer's own encoder (same token entries, trained rows) encodes the same bits.
    tokens = LearnedTokens(encoder, parse_train_tokens(TOKENS))
    with torch.no_grad():
        tokens.delta.copy_(result.lora["embeddings.embeddings"])
        own = tokens.encode(["a photo of [zorb] in the rain"])
    loaded = twin.encode(["a photo of [zorb] in the rain"])
    assert torch.equal(own[0], loaded[0]) and torch.equal(own[1], loaded[1])
    # A prompt without either trained token encodes exactly as the base encoder does.
    plain = "a photo of a cat"
    base, via = encoder.encode([plain]), twin.encode([plain])
    assert torch.equal(base[0], via[0]) and torch.equal(base[1], via[1])
    # With the token: positions before it are unchanged against the untrained token (zero delta), the rest move.
    untrained, _ = encoder.clone_with_tokens([("[zorb]", "^dog</w>")])
    ids, _ = twin.tokenize(["a photo of [zorb] in the rain"])
    pos = ids[0].tolist().index(twin.added_tokens["[zorb]"])
    h0, h1 = untrained.encode(["a photo of [zorb] in the rain"])[0], loaded[0]
    assert torch.equal(h0[0, :pos], h1[0, :pos])
    assert (h0[0, pos] - h1[0, pos]).abs().max() > 1e-4


def test_a_token_that_collides_with_an_existing_one_is_refused():
    encoder = tiny_text_encoder()
    with pytest.raises(TrainingInputError, match=r"'<\|endoftext\|>' collides with the existing token .*id 49407"):
        LearnedTokens(encoder, parse_train_tokens("<|endoftext|>=^dog</w>"))
    with pytest.raises(TrainingInputError, match="matches no token"):
        LearnedTokens(encoder, parse_train_tokens("^qqqzzzxxx$"))


@pytest.mark.parametrize("text, match", [("[a b]=x", "not a new-token name"), ("[x]=(", "not a valid regex"),
                                         ("[x]\n[x]=^a", "listed twice")])
def test_bad_token_lines_are_named(text, match):
    with pytest.raises(TrainingInputError, match=match):
        parse_train_tokens(text)


def test_loader_tokens_field_keeps_only_new_tokens():
    assert loader_tokens_field("# c\n[a]=^dog</w>\n^snail\n<b>") == "[a]=^dog</w>\n<b>"
