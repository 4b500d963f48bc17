"""The loop: resume equals an uninterrupted run (optimizer, step, adaptive buckets, draws), interrupts return the
partial LoRA, a NaN loss stops naming the step and keeps the last good LoRA, and the bad inputs of this layer."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from safetensors import safe_open

from train_helpers import tiny_cache, tiny_stage_c

from comfyui_stablecascade import host
from comfyui_stablecascade.train import loop
from comfyui_stablecascade.train.errors import TrainingInputError, TrainingOutOfMemory
from comfyui_stablecascade.train.loop import TrainSettings, load_state, save_state, train


def _settings(**kw) -> TrainSettings:
    base = dict(steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup=3, seed=7, caption_dropout=0.3,
                weighting="adaptive")
    base.update(kw)
    return TrainSettings(**base)


def _assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_a_saved_state_equals_the_uninterrupted_run(tmp_path):
    handle = host.wrap(tiny_stage_c(), "stage_c")
    cache = tiny_cache(3, repeats=[1, 2, 1])
    whole = train(handle, None, cache, _settings())
    first = train(handle, None, cache, _settings(steps=3))
    path = save_state(str(tmp_path / "state.safetensors"), first.state)
    with safe_open(path, framework="pt") as f:  # safetensors + JSON metadata, nothing pickled
        assert "scw_train_state" in f.metadata() and any(k.startswith("optim.") for k in f.keys())
    rest = train(handle, None, cache, _settings(), resume=load_state(path))
    assert rest.steps == 6 and rest.losses == whole.losses
    _assert_same_lora(rest.lora, whole.lora)
    assert torch.equal(rest.state["tensors"]["adaptive.losses"], whole.state["tensors"]["adaptive.losses"])
    assert not torch.equal(whole.state["tensors"]["adaptive.losses"], torch.ones(300)), "buckets should move"
    # A changed setting that shapes the run is refused, naming it.
    with pytest.raises(TrainingInputError, match=r"seed \(saved 7, now 8\)"):
        train(handle, None, cache, _settings(seed=8), resume=load_state(path))


def test_interrupt_between_steps_returns_the_partial_lora_and_it_resumes():
    handle = host.wrap(tiny_stage_c(), "stage_c")
    cache = tiny_cache(2)
    seen = []

    def on_step(step, loss, preview):
        seen.append(step)
        if step == 2:
            host.request_interrupt()

    part = train(handle, None, cache, _settings(steps=5), on_step=on_step)
    assert part.interrupted and part.steps == 2 and seen == [1, 2] and part.stopped_reason is None
    two = train(handle, None, cache, _settings(steps=2))
    _assert_same_lora(part.lora, two.lora)
    rest = train(handle, None, cache, _settings(steps=5), resume=part.state)
    whole = train(handle, None, cache, _settings(steps=5))
    _assert_same_lora(rest.lora, whole.lora)
    assert not handle.patcher.is_patched()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_lora():
    handle = host.wrap(tiny_stage_c(), "stage_c")
    cache = tiny_cache(4)
    # The sample drawn last in the first epoch (batch 1, no accumulation) first appears at step 4: poison it.
    order = [idx[0] for idx in islice(loop._micro_batches(cache, 1, 7), 4)]
    bad_step = 4
    cache.samples[order[-1]].latent[0, 0, 0] = float("nan")
    s = _settings(steps=bad_step + 3, batch_size=1, grad_accum=1, weighting="p2")
    result = train(handle, None, cache, s)
    assert result.stopped_reason is not None and f"step {bad_step} of {bad_step + 3}" in result.stopped_reason
    assert "NaN" in result.stopped_reason and result.steps == bad_step - 1
    good = train(handle, None, tiny_cache(4), _settings(steps=bad_step - 1, batch_size=1, grad_accum=1,
                                                       weighting="p2"))
    _assert_same_lora(result.lora, good.lora)
    assert all(torch.isfinite(v).all() for v in result.lora.values())


def test_resume_with_a_lora_of_another_stage_c_width_is_refused():
    small = host.wrap(tiny_stage_c(width=32), "stage_c")
    wide = host.wrap(tiny_stage_c(width=64), "stage_c")
    cache = tiny_cache(1)
    state = train(small, None, cache, _settings(steps=1, grad_accum=1)).state
    with pytest.raises(TrainingInputError, match=r"Stage C 32 channels wide.*connected Stage C is 64 channels wide"):
        train(wide, None, cache, _settings(steps=2, grad_accum=1), resume=state)
    lora = train(small, None, cache, _settings(steps=1, grad_accum=1)).lora
    with pytest.raises(TrainingInputError, match="32 channels wide"):
        train(wide, None, cache, _settings(steps=2, grad_accum=1), resume=lora)


def test_out_of_memory_says_what_to_lower(monkeypatch):
    handle = host.wrap(tiny_stage_c(), "stage_c")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "diffusion_loss", oom)
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory at step 1 .*lower batch_size \(now 2; raise "
                                                  r"grad_accum.*the dataset area \(latents now 4x4\)"):
        train(handle, None, tiny_cache(2), _settings(steps=2))
    assert not handle.patcher.is_patched()


@pytest.mark.parametrize("change, match", [
    ({"lr": float("nan")}, "lr=nan"),
    ({"steps": 0}, "steps=0"),
    ({"weighting": "snr"}, "weighting='snr'"),
    ({"include_ff": True, "tokens": "[x]=^dog</w>"}, "include_ff with learned tokens"),
    ({"dtype": "fp16"}, "dtype='fp16'"),
])
def test_bad_settings_are_refused_by_name(change, match):
    with pytest.raises(TrainingInputError, match=match):
        train(host.wrap(tiny_stage_c(), "stage_c"), None, tiny_cache(1), _settings(**change))


def test_a_cache_without_text_needs_a_text_encoder_and_a_wrong_network_is_named():
    handle = host.wrap(tiny_stage_c(), "stage_c")
    with pytest.raises(TrainingInputError, match="no caption embeddings and no text encoder"):
        train(handle, None, tiny_cache(1, text=False), _settings(steps=1))
    with pytest.raises(TrainingInputError, match="where a Stage C model belongs"):
        train(host.wrap(torch.nn.Linear(2, 2), "stage_c"), None, tiny_cache(1), _settings(steps=1))


def test_load_state_refuses_a_lora_file_by_name(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"weights.0.lora_down": torch.zeros(1, 2)}, str(path))
    with pytest.raises(TrainingInputError, match="not a training state"):
        load_state(str(path))
