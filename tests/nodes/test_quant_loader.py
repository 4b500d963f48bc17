"""The Stage C / Stage B loader nodes with fp8 and GGUF weights (files generated here, tiny networks)."""

import pytest
import torch
from safetensors.torch import save_file

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import kinds
from comfyui_stablecascade.cascade.errors import CheckpointError
from comfyui_stablecascade.cascade.quant import OPS, QTensor, convert
from comfyui_stablecascade.nodes import common, loaders

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements.txt) reads and writes GGUF files")


@pytest.fixture
def models(tmp_models):
    host.set_models_dir(str(tmp_models))
    yield tmp_models
    host.set_models_dir(None)


def _quantized(handle):
    net = host.module_of(handle)
    return [p for p in net.parameters() if isinstance(p, QTensor)], net


def test_fp8_weight_dtypes_are_offered():
    choices = loaders.StageCLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert "fp8_e4m3fn" in choices and "fp8_e5m2" in choices
    assert set(common.FP8_WEIGHTS) <= set(common.WEIGHT_DTYPES)


def test_stage_c_loader_reads_a_gguf_and_uses_the_dequantizing_layers(models):
    sd = kinds.demo_network("stage_c").state_dict()
    convert.write_gguf(models / "diffusion_models" / "c_q4k.gguf", sd, "stage_c", "Q4_K")
    (handle,) = loaders.StageCLoader().load("c_q4k.gguf", "default")
    quantized, net = _quantized(handle)
    assert quantized and all(p.qtype == "Q4_K" for p in quantized)
    assert type(net.clip_txt_mapper) is OPS.Linear


def test_stage_b_loader_makes_fp8_from_a_dense_file(models):
    sd = {k: v.to(torch.bfloat16) for k, v in kinds.demo_network("stage_b").state_dict().items()}
    save_file(sd, str(models / "unet" / "b.safetensors"))
    (handle,) = loaders.StageBLoader().load("b.safetensors", "fp8_e4m3fn")
    quantized, _ = _quantized(handle)
    assert quantized and all(p.raw().dtype == torch.float8_e4m3fn and p.scale is not None for p in quantized)


def test_demo_network_in_fp8(models):
    (handle,) = loaders.StageCLoader().load(common.DEMO_CHOICE, "fp8_e5m2")["result"]
    quantized, _ = _quantized(handle)
    assert quantized and all(p.raw().dtype == torch.float8_e5m2 for p in quantized)


def test_loader_refuses_a_flux_gguf_naming_it(models):
    path = models / "diffusion_models" / "flux.gguf"
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", torch.randn(64, 64).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="Flux"):
        loaders.StageCLoader().load("flux.gguf", "default")
