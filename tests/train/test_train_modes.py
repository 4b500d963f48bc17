"""The other ways to train: a full fine-tune (base untouched, resumable), previews through the Previewer, captions
encoded on the fly when the cache has none, and CLIP image embeddings from the cache."""

from __future__ import annotations

import torch

from train_helpers import tiny_cache, tiny_stage_c, tiny_text_encoder

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.previewer import Previewer, PreviewerConfig
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.train import loop
from comfyui_stablecascade.train.loop import TrainSettings, train


def _bits(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_full_finetune_trains_a_copy_and_resumes():
    net = tiny_stage_c()
    before = _bits(net)
    handle = host.wrap(net, "stage_c")
    cache = tiny_cache(2)
    s = TrainSettings(steps=3, batch_size=2, lr=1e-3, warmup=0, full_finetune=True, seed=2)
    whole = train(handle, None, cache, s)
    assert whole.lora is None and whole.community is None and whole.full_state_dict is not None
    changed = [k for k, v in whole.full_state_dict.items() if not torch.equal(v, before[k].float())]
    assert len(changed) > len(before) // 2
    assert all(torch.equal(v, before[k]) for k, v in _bits(net).items()), "the loaded network changed"
    part = train(handle, None, cache, TrainSettings(**{**s.as_dict(), "steps": 1}))
    rest = train(handle, None, cache, s, resume=part.state)
    for k, v in whole.full_state_dict.items():
        assert torch.equal(rest.full_state_dict[k], v), k


def test_previews_go_to_on_step_or_else_to_the_progress_bar():
    previewer = host.wrap(randomize_(Previewer(PreviewerConfig.tiny()), 0).eval(), "previewer")
    handle = host.wrap(tiny_stage_c(), "stage_c")
    updates, previews = [], []
    settings = TrainSettings(steps=2, warmup=0, preview_every=2, preview_steps=2)
    host.set_progress_hook(lambda value, total, image: updates.append((value, total, image is not None)))
    try:
        result = train(handle, None, tiny_cache(1), settings, previewer=previewer,
                       on_step=lambda step, loss, p: previews.append((step, p)))
        assert not updates, "a caller with on_step reports progress itself"
        again = train(handle, None, tiny_cache(1), settings, previewer=previewer)
    finally:
        host.set_progress_hook(None)
    assert [s for s, _ in previews] == [1, 2] and previews[0][1] is None
    image = previews[1][1]
    assert image.shape == (1, 3, 32, 32) and float(image.min()) >= 0 and float(image.max()) <= 1
    assert len(result.previews) == 1 and torch.equal(again.previews[0], image)  # seeded: the same preview
    assert updates == [(0, 2, False), (1, 2, False), (2, 2, True)]


def test_captions_are_encoded_on_the_fly_when_the_cache_has_none(monkeypatch):
    encoder = tiny_text_encoder()
    te = host.wrap(encoder, "text_encoder")
    handle = host.wrap(tiny_stage_c(), "stage_c")
    cache = tiny_cache(2, text=False, captions=["a cat", "a dog"])
    seen = []
    real = loop._TextFallback.__call__
    monkeypatch.setattr(loop._TextFallback, "__call__", lambda self, c: seen.append(c) or real(self, c))
    result = train(handle, te, cache, TrainSettings(steps=2, batch_size=2, warmup=0, caption_dropout=0.0))
    assert sorted(set(seen)) == ["a cat", "a dog"] and result.steps == 2


def test_clip_image_embeddings_of_the_cache_feed_some_samples():
    cache = tiny_cache(4)
    for i, s in enumerate(cache.samples):
        s.clip_image = torch.full((1, 768), float(i + 1))
    s = TrainSettings(clip_image_prob=0.5, seed=0, batch_size=4)
    used = []
    for micro in range(20):
        batch = loop._batch_inputs(cache, [0, 1, 2, 3], s, micro, None)
        used += [bool(row.abs().sum() > 0) for row in batch["clip_img"]]
        for j, row in enumerate(batch["clip_img"]):
            assert torch.equal(row, torch.zeros(1, 768)) or torch.equal(row, torch.full((1, 768), float(j + 1)))
    assert 20 < sum(used) < 60  # about half of 80
    none = loop._batch_inputs(cache, [0, 1], TrainSettings(clip_image_prob=0.0), 0, None)
    assert torch.equal(none["clip_img"], torch.zeros(2, 1, 768))


def test_a_bf16_base_stays_bf16_and_trains_fp32_lora_and_optimizer_state():
    from comfyui_stablecascade.train.settings import training_dtype

    assert training_dtype("auto", torch.device("cpu")) == torch.float32  # no native bf16 on this CPU path
    assert training_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    net = tiny_stage_c(dtype=torch.bfloat16)
    before = _bits(net)
    result = train(host.wrap(net, "stage_c"), None, tiny_cache(2), TrainSettings(steps=2, warmup=0, lr=1e-2))
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)) for k, v in _bits(net).items())
    assert {v.dtype for v in result.lora.values()} == {torch.float32}
    optim = [v for k, v in result.state["tensors"].items() if k.startswith("optim.") and v.dim() > 0]
    assert optim and {v.dtype for v in optim} == {torch.float32}
    assert any(v.abs().sum() > 0 for k, v in result.lora.items() if "lora_down" in k)


def test_training_works_when_called_inside_inference_mode():
    """ComfyUI builds networks and caches and runs nodes under torch.inference_mode: every tensor they made is an
    inference tensor. LoRA + learned token, and a full fine-tune, still train, and the base stays unchanged."""
    with torch.inference_mode():
        net = tiny_stage_c()
        handle = host.wrap(net, "stage_c")
        te = host.wrap(tiny_text_encoder(), "text_encoder")
        cache = tiny_cache(2, captions=["a [zorb]", "[zorb] again"])
        before = _bits(net)
        result = train(handle, te, cache, TrainSettings(steps=2, warmup=0, lr=1e-2, tokens="[zorb]=^dog</w>"))
        full = train(handle, None, cache, TrainSettings(steps=1, warmup=0, full_finetune=True))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(v.abs().sum() > 0 for k, v in result.lora.items() if k.endswith("lora_down"))
    assert result.lora["embeddings.embeddings"].abs().sum() > 0
    assert full.steps == 1 and any(not torch.equal(v, before[k]) for k, v in full.full_state_dict.items())
    assert all(torch.equal(v, before[k]) for k, v in _bits(net).items())
