"""What trains and what comes out: loss falls, the official and community files load back through the pack's
LoRA loader with the trainer's own weights, the base network stays bit-identical, the official init and targets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from train_helpers import tiny_cache, tiny_stage_c

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.lora_format import COMMUNITY, OFFICIAL, parse_lora, read_lora_file
from comfyui_stablecascade.model_patches import lora as L
from comfyui_stablecascade.train.errors import TrainingInputError
from comfyui_stablecascade.train.forward import StageCForward, weight_source
from comfyui_stablecascade.train.lora import StageCLora, target_keys
from comfyui_stablecascade.train.loop import TrainSettings, train
from comfyui_stablecascade.train.objective import diffusion_loss

CPU = torch.device("cpu")


def _bits(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def _fixed_eval(net, lora, cache):
    """The objective at fixed t / noise over every cached sample (no training randomness)."""
    g = torch.Generator().manual_seed(123)
    x0 = torch.stack([s.latent for s in cache.samples])
    t = torch.linspace(0.2, 0.8, x0.shape[0])
    noise = torch.randn(x0.shape, generator=g)
    ct = torch.stack([s.clip_text for s in cache.samples])
    cp = torch.stack([s.clip_pooled for s in cache.samples])
    ci = torch.zeros(x0.shape[0], 1, 768)
    fwd = StageCForward(net, grad_checkpointing=False)
    w = weight_source(dict(net.named_parameters()), CPU, torch.float32, lora.deltas() if lora else None)
    with torch.no_grad():
        loss, _, _ = diffusion_loss(lambda x, r: fwd(w, x, r, ct, cp, ci, torch.float32), x0, noise, t)
    return float(loss)


def _lora_from(result, net, rank=4) -> StageCLora:
    lora = StageCLora(net, rank=rank)
    lora.load_official({k: v for k, v in result.lora.items() if k.startswith("weights.")}, "result")
    return lora


@pytest.fixture(scope="module")
def trained():
    """One short run on two samples the tiny network can memorise; shared by the read-back tests."""
    host.unload_all()
    torch.set_num_threads(1)
    net = tiny_stage_c()
    handle = host.wrap(net, "stage_c")
    cache = tiny_cache(2)
    before = _bits(net)
    settings = TrainSettings(steps=30, batch_size=2, lr=3e-2, warmup=0, caption_dropout=0.0, seed=1)
    result = train(handle, None, cache, settings)
    return net, handle, cache, before, result


def test_loss_falls_and_the_base_stays_bit_identical(trained):
    net, handle, cache, before, result = trained
    assert result.steps == 30 and len(result.losses) == 30 and not result.interrupted and result.stopped_reason is None
    start, end = _fixed_eval(net, None, cache), _fixed_eval(net, _lora_from(result, net), cache)
    assert end < 0.7 * start, (start, end)
    assert _same_bits(_bits(net), before), "training changed the loaded network"
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert not handle.patcher.is_patched()


def test_official_file_reloads_through_the_lora_loader_with_the_trainers_weights(trained, tmp_path):
    net, handle, cache, before, result = trained
    path = tmp_path / "trained.safetensors"
    save_file(result.lora, str(path))
    lf = read_lora_file(str(path))
    assert lf.layout == OFFICIAL and len(lf.unet) == len(L.official_target_keys(net))
    lora = _lora_from(result, net)
    merged = lora.merged(net)  # from the base weights, before anything is loaded
    patched, _ = L.apply_lora(handle, None, lf)
    host.load([patched])
    loaded = _bits(net)
    assert merged.keys() == set(L.official_target_keys(net))
    for k, v in loaded.items():
        assert torch.equal(v, merged.get(k, before[k])), k
    # The trainer's forward with its LoRA deltas == the same forward on the loader-patched weights, bit for bit.
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g)
    ct, cp, ci = torch.randn(2, 77, 32, generator=g), torch.randn(2, 1, 32, generator=g), torch.zeros(2, 1, 768)
    fwd = StageCForward(net, grad_checkpointing=False)
    with torch.no_grad():
        via_loader = fwd(weight_source(dict(net.named_parameters()), CPU, torch.float32), x, r, ct, cp, ci,
                         torch.float32)
        inference = net(x, r, ct, cp, ci)
    host.load([handle])  # the base again: patches off
    assert _same_bits(_bits(net), before)
    with torch.no_grad():
        own = fwd(weight_source(dict(net.named_parameters()), CPU, torch.float32, lora.deltas()), x, r, ct, cp, ci,
                  torch.float32)
        base_out = net(x, r, ct, cp, ci)
    assert torch.equal(own, via_loader)
    torch.testing.assert_close(inference, own, rtol=1e-5, atol=1e-5)  # the inference forward, other kernels
    assert (inference - base_out).abs().max() > 1e-3, "the LoRA should change the output"


def test_community_file_loads_through_the_community_path_with_the_same_weights(trained, tmp_path):
    net, handle, cache, before, result = trained
    assert result.community is not None
    assert all(k.startswith("lora_prior_unet_") for k in result.community)
    assert any("attention_attn_to_q.lora_up.weight" in k for k in result.community)
    path = tmp_path / "community.safetensors"
    save_file(result.community, str(path))
    lf = read_lora_file(str(path))
    assert lf.layout == COMMUNITY
    merged = _lora_from(result, net).merged(net)
    patched, _ = L.apply_lora(handle, None, lf)
    host.load([patched])
    loaded = _bits(net)
    host.load([handle])
    for k, v in loaded.items():
        if k in merged:  # q/k/v land on row blocks: same math, summed per block
            torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, before[k]), k


def test_official_init_targets_and_order():
    net = tiny_stage_c()
    lora = StageCLora(net, rank=2, seed=3)
    assert lora.keys == L.official_target_keys(net)
    assert all(k.endswith(("attn.out_proj.weight", "attn.in_proj_weight")) for k in lora.keys)
    assert lora.keys[0].endswith("out_proj.weight") and lora.keys[1].endswith("in_proj_weight")
    for pair in lora.pairs:
        assert torch.equal(pair.lora_down, torch.zeros_like(pair.lora_down))  # zero down: starts at the base
        assert pair.lora_up.std() > 0.5 and pair.lora_up.shape[1] == 2
        assert pair.scale == 0.5  # alpha 1 / rank 2
    ff = target_keys(net, include_ff=True)
    assert ff[: len(lora.keys)] == lora.keys and any(k.endswith("channelwise.0.weight") for k in ff)


def test_include_ff_trains_the_feed_forward_linears_community_only():
    net = tiny_stage_c()
    handle = host.wrap(net, "stage_c")
    result = train(handle, None, tiny_cache(2), TrainSettings(steps=2, warmup=0, include_ff=True, lr=1e-2))
    assert result.lora is None
    ff = [k for k in result.community if "channelwise_0" in k or "channelwise_4" in k]
    assert ff and any(result.community[k].abs().sum() > 0 for k in ff if "lora_down" in k)
    lf = parse_lora(result.community, "ff")
    patches = L.stage_c_patches(lf, net)  # every pair has a place in the network
    assert any(k.endswith("channelwise.0.weight") for k in patches)


def test_rank_larger_than_a_layer_is_refused_naming_it():
    net = tiny_stage_c()
    with pytest.raises(TrainingInputError, match=r"rank=64 is larger than the layer \S+ \(32, 32\) allows \(32"):
        StageCLora(net, rank=64)
    with pytest.raises(TrainingInputError, match="rank=64"):
        train(host.wrap(net, "stage_c"), None, tiny_cache(1), TrainSettings(steps=1, rank=64))
