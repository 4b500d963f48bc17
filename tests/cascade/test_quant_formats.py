"""cascade/quant: the GGML block formats against the gguf package, the fp8 scale, and the QTensor seam."""

import numpy as np
import pytest
import torch
from torch import nn

from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.cascade.quant import OPS, QTensor, fp8, ggml, policy, weight_bytes

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements.txt) reads and writes GGUF files")


def _random_blocks(qtype: str, n: int = 96, seed: int = 0) -> np.ndarray:
    """Random bytes in every position, with the fp16 block scales set to finite values (random bits can be NaN)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, ggml.TYPE_SIZE[qtype]), dtype=np.uint8)
    scale_pos = {"Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q4_1": (0, 2), "Q5_1": (0, 2)}.get(qtype, (0,))
    for pos in scale_pos:
        d = (rng.standard_normal(n) * 0.01).astype(np.float16)
        blocks[:, pos:pos + 2] = d.view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("qtype", ggml.QUANTIZED_TYPES)
def test_dequantize_matches_gguf_reference(qtype):
    blocks = _random_blocks(qtype)
    ref = gguf.quants.dequantize(blocks.copy(), gguf.GGMLQuantizationType[qtype]).reshape(blocks.shape[0], -1)
    mine = ggml.dequantize_blocks(torch.from_numpy(blocks), qtype).numpy()
    # Same float32 operations in the same order: identical values.
    np.testing.assert_array_equal(mine, ref)
    assert np.abs(ref).max() > 0


@pytest.mark.parametrize("qtype,max_rel", [("Q4_K", 0.095), ("Q5_K", 0.045)])
def test_k_quantizer_writes_blocks_gguf_reads(qtype, max_rel):
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    blocks = ggml.quantize_k(x, qtype)
    ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    mine = ggml.dequantize(blocks, qtype, x.shape, torch.float32)
    np.testing.assert_array_equal(mine.numpy(), ref)
    # Measured relative L2 errors on N(0, 0.02^2): Q4_K 0.080, Q5_K 0.038 (4 and 5 bits per value).
    assert float((mine - x).norm() / x.norm()) < max_rel


def test_e4m3fn_scale_keeps_small_weights_accurate():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.002
    plain = (w.to(torch.float8_e4m3fn).float() - w).norm() / w.norm()
    scaled = fp8.quantize(w, "fp8_e4m3fn")
    err = (scaled.dense(torch.float32) - w).norm() / w.norm()
    # Unscaled, std-0.002 weights fall into e4m3fn's subnormals (measured 0.28 vs 0.026 scaled).
    assert scaled.scale is not None and err < 0.035 < 0.2 < plain
    e5 = fp8.quantize(w, "fp8_e5m2")
    assert e5.scale is None and (e5.dense(torch.float32) - w).norm() / w.norm() < 0.06


def _fp8_linear() -> nn.Module:
    lin = OPS.Linear(64, 32)
    q = fp8.quantize(lin.weight.detach(), "fp8_e4m3fn")
    lin.weight = nn.Parameter(q, requires_grad=False)
    return lin.requires_grad_(False)


def test_qtensor_stays_quantized_through_module_moves_and_state_dict():
    lin = _fp8_linear()
    lin.to("cpu")
    lin.to(torch.bfloat16)  # converts the dense bias only: the quantized weight is not a float tensor
    assert isinstance(lin.weight, QTensor) and lin.weight.raw().dtype == torch.float8_e4m3fn
    assert lin.bias.dtype == torch.bfloat16 and lin.weight.shape == (32, 64)
    sd = lin.state_dict()
    assert isinstance(sd["weight"], QTensor) and sd["weight"].scale == lin.weight.scale
    assert weight_bytes(lin) == 32 * 64 * 1 + 32 * 2
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = x.float() @ lin.weight.dense(torch.float32).t() + lin.bias.float()
    torch.testing.assert_close(lin(x).float(), expected, rtol=0.02, atol=0.02)
    # Code that is not quantization-aware sees the values: .to(dtype) expands, arithmetic expands.
    assert lin.weight.to(dtype=torch.float32).dtype == torch.float32
    torch.testing.assert_close(lin.weight * 2, lin.weight.dense() * 2)


def test_qtensor_refuses_in_place_changes():
    lin = _fp8_linear()
    with pytest.raises(CascadeError, match="in place"):
        lin.weight.add_(1.0)


def test_policy_keeps_small_and_sensitive_tensors():
    assert policy.should_quantize("down_blocks.0.0.channelwise.0.weight", (256, 64))
    assert policy.should_quantize("down_blocks.0.1.attention.attn.in_proj_weight", (192, 64))
    for key, shape in [("clf.1.weight", (64, 64, 1, 1)), ("embedding.1.weight", (64, 64, 1, 1)),
                       ("down_blocks.0.0.channelwise.0.bias", (256,)), ("clip_txt_mapper.weight", (2048, 1280)),
                       ("down_blocks.0.0.channelwise.2.gamma", (1, 1, 1, 256)), ("a.weight", (16, 16)),
                       ("down_blocks.0.2.mapper.weight", (128, 64))]:
        assert not policy.should_quantize(key, shape), key


def test_fp8_on_a_torch_without_float8_names_the_version(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(CascadeError, match=r"torch >= 2\.1"):
        fp8.torch_dtype("fp8_e4m3fn")
