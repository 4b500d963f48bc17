"""The diffusers layout writers of tiny_checkpoints.py against diffusers itself (key names, shapes and
diffusers' own single-file converter), and the loader on state dicts made by diffusers' classes.

Separate from test_loading.py because importing diffusers takes several seconds.
"""

from __future__ import annotations

import pytest
import tiny_checkpoints as tc
import torch

from comfyui_stablecascade.cascade import loading

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test-only dependency) is not installed")

CTA = ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]
CT = CTA[:2]


def _unet_c(cfg):
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=cfg.c_in, out_channels=cfg.c_out, timestep_ratio_embedding_dim=cfg.c_r, patch_size=cfg.patch_size,
        conditioning_dim=cfg.c_cond, block_out_channels=list(cfg.c_hidden), num_attention_heads=list(cfg.nhead),
        down_num_layers_per_block=list(cfg.blocks[0]), up_num_layers_per_block=list(cfg.blocks[1]),
        down_blocks_repeat_mappers=list(cfg.block_repeat[0]), up_blocks_repeat_mappers=list(cfg.block_repeat[1]),
        block_types_per_layer=[CTA, CTA], clip_text_in_channels=cfg.c_clip_text,
        clip_text_pooled_in_channels=cfg.c_clip_text_pooled, clip_image_in_channels=cfg.c_clip_img,
        clip_seq=cfg.c_clip_seq, effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=cfg.kernel_size,
        dropout=list(cfg.dropout), self_attn=True, timestep_conditioning_type=list(cfg.t_conds), switch_level=[False],
    )


def _unet_b(cfg):
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=cfg.c_in, out_channels=cfg.c_out, timestep_ratio_embedding_dim=cfg.c_r, patch_size=cfg.patch_size,
        conditioning_dim=cfg.c_cond, block_out_channels=list(cfg.c_hidden), num_attention_heads=list(cfg.nhead),
        down_num_layers_per_block=list(cfg.blocks[0]), up_num_layers_per_block=list(cfg.blocks[1]),
        down_blocks_repeat_mappers=list(cfg.block_repeat[0]), up_blocks_repeat_mappers=list(cfg.block_repeat[1]),
        block_types_per_layer=[CT, CT, CTA, CTA], clip_text_in_channels=None,
        clip_text_pooled_in_channels=cfg.c_clip, clip_image_in_channels=None, clip_seq=cfg.c_clip_seq,
        effnet_in_channels=cfg.c_effnet, pixel_mapper_in_channels=cfg.c_pixels, kernel_size=cfg.kernel_size,
        dropout=list(cfg.dropout), self_attn=True, timestep_conditioning_type=list(cfg.t_conds), switch_level=None,
    )


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("kind, build", [("stage_c", _unet_c), ("stage_b", _unet_b)])
def test_diffusers_writer_matches_diffusers(kind, build):
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    sd = tc.tiny_sd(kind)
    ours = tc.diffusers_unet(sd)
    assert _shapes(ours) == _shapes(build(tc.tiny_config(kind)).state_dict())
    theirs = convert_stable_cascade_unet_single_file_to_diffusers(sd)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("kind, build, load", [("stage_c", _unet_c, loading.load_stage_c),
                                               ("stage_b", _unet_b, loading.load_stage_b)])
def test_loader_reads_a_diffusers_model_folder(tmp_path, kind, build, load):
    torch.manual_seed(0)
    net = build(tc.tiny_config(kind))
    net.save_pretrained(tmp_path / "unet", max_shard_size="300KB")  # several shards + index, as the hub repos
    assert len(list((tmp_path / "unet").glob("*.safetensors"))) > 1
    model = load(tmp_path / "unet")
    assert model.config == tc.tiny_config(kind)
    theirs = net.state_dict()
    q = [k for k in theirs if k.endswith("attention.to_q.weight")][0]
    base = q[: -len("to_q.weight")]
    packed = model.state_dict()[base + "attn.in_proj_weight"]
    assert torch.equal(packed, torch.cat([theirs[base + f"to_{c}.weight"] for c in "qkv"]))
    assert torch.equal(model.state_dict()[base + "attn.out_proj.weight"], theirs[base + "to_out.0.weight"])


def test_diffusers_stage_a_writer_matches_paella():
    from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    cfg = tc.tiny_config("stage_a")
    paella = PaellaVQModel(levels=cfg.levels, bottleneck_blocks=cfg.bottleneck_blocks, embed_dim=cfg.c_hidden,
                           latent_channels=cfg.c_latent, num_vq_embeddings=cfg.codebook_size)
    assert _shapes(tc.diffusers_stage_a(tc.tiny_sd("stage_a"))) == _shapes(paella.state_dict())
    model = loading.load_stage_a(paella.state_dict())
    assert model.config == cfg
    assert torch.equal(model.vquantizer.codebook.weight, paella.vquantizer.embedding.weight)
