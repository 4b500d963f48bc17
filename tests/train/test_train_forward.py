"""The training forward: the inference forward's math, per-block upcast of bf16 weights, checkpointing."""

from __future__ import annotations

import torch

from train_helpers import tiny_stage_c

from comfyui_stablecascade.train.forward import StageCForward, weight_source
from comfyui_stablecascade.train.lora import StageCLora

CPU = torch.device("cpu")


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 4, 6, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
            torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 768, generator=g))


def test_training_forward_equals_the_inference_forward():
    net = tiny_stage_c()
    x, r, ct, cp, ci = _inputs()
    with torch.no_grad():
        want = net(x, r, ct, cp, ci)
        got = StageCForward(net)(weight_source(dict(net.named_parameters()), CPU, torch.float32), x, r, ct, cp, ci,
                                 torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_weights_stay_bf16_and_compute_in_fp32_per_block():
    net16 = tiny_stage_c(dtype=torch.bfloat16)
    net32 = tiny_stage_c(dtype=torch.bfloat16).float()  # the same bf16-rounded values, stored in fp32
    x, r, ct, cp, ci = _inputs(1)
    fwd = StageCForward(net16)
    got = fwd(weight_source(dict(net16.named_parameters()), CPU, torch.float32), x, r, ct, cp, ci, torch.float32)
    want = StageCForward(net32)(weight_source(dict(net32.named_parameters()), CPU, torch.float32), x, r, ct, cp, ci,
                                torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert {p.dtype for p in net16.parameters()} == {torch.bfloat16}


def test_checkpointing_gives_the_same_gradients():
    net = tiny_stage_c().requires_grad_(False)  # a frozen base, as host.frozen hands it out
    x, r, ct, cp, ci = _inputs(2)
    grads = []
    for ckpt in (True, False):
        lora = StageCLora(net, rank=2, seed=0)
        with torch.no_grad():
            for p in lora.pairs:
                p.lora_down.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
        w = weight_source(dict(net.named_parameters()), CPU, torch.float32, lora.deltas())
        StageCForward(net, grad_checkpointing=ckpt)(w, x, r, ct, cp, ci, torch.float32).square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())


def test_the_low_rank_backward_equals_autograd_through_the_merged_weight():
    from comfyui_stablecascade.train.forward import merge

    net = tiny_stage_c().requires_grad_(False)
    lora = StageCLora(net, rank=3, seed=1)
    with torch.no_grad():
        for p in lora.pairs:
            p.lora_down.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    key = lora.keys[1]  # an in_proj_weight: row slices for q and k|v
    assert key.endswith("in_proj_weight")
    pair, weight = lora.pairs[1], dict(net.named_parameters())[key]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, weight.shape[1], generator=g, requires_grad=True)
    c = weight.shape[1]
    w = weight_source(dict(net.named_parameters()), CPU, torch.float32, lora.deltas())
    q, kv = w.split_linear(key, None, [(x, (0, c)), (x, (c, 3 * c))])
    out = q.square().sum() + kv.sum()
    out.backward()
    fast = [t.grad.clone() for t in (x, pair.lora_up, pair.lora_down)]
    for t in (x, pair.lora_up, pair.lora_down):
        t.grad = None
    merged = merge(weight, pair, CPU, torch.float32)
    ref = (x @ merged[:c].t()).square().sum() + (x @ merged[c:].t()).sum()
    ref.backward()
    for a, b in zip(fast, (x.grad, pair.lora_up.grad, pair.lora_down.grad)):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
