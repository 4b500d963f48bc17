"""diffusers' StableCascadeUNet as the reference for Stage C / Stage B (tests and benchmarks only).

The pack never imports diffusers; tests and bench scripts load this file by path. It maps a pack config to
the diffusers config (SPEC §17.1) and original keys to diffusers keys (SPEC §17.2).
"""

from __future__ import annotations

from typing import Any

import torch

_LETTERS = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}


def diffusers_config(cfg: Any) -> dict[str, Any]:
    """StableCascadeUNet kwargs equivalent to a StageCConfig or StageBConfig."""
    is_c = hasattr(cfg, "c_clip_text")
    out = dict(
        in_channels=cfg.c_in,
        out_channels=cfg.c_out,
        timestep_ratio_embedding_dim=cfg.c_r,
        patch_size=cfg.patch_size,
        conditioning_dim=cfg.c_cond,
        block_out_channels=tuple(cfg.c_hidden),
        num_attention_heads=tuple(cfg.nhead),
        down_num_layers_per_block=tuple(cfg.blocks[0]),
        up_num_layers_per_block=tuple(cfg.blocks[1]),
        down_blocks_repeat_mappers=tuple(cfg.block_repeat[0]),
        up_blocks_repeat_mappers=tuple(cfg.block_repeat[1]),
        block_types_per_layer=tuple(tuple(_LETTERS[x] for x in lc) for lc in cfg.level_config),
        clip_seq=cfg.c_clip_seq,
        kernel_size=cfg.kernel_size,
        dropout=tuple(cfg.dropout),
        self_attn=cfg.self_attn,
        timestep_conditioning_type=tuple(cfg.t_conds),
    )
    if is_c:
        out.update(clip_text_in_channels=cfg.c_clip_text, clip_text_pooled_in_channels=cfg.c_clip_text_pooled,
                   clip_image_in_channels=cfg.c_clip_img, switch_level=(cfg.switch_level,))
    else:
        out.update(clip_text_pooled_in_channels=cfg.c_clip, effnet_in_channels=cfg.c_effnet,
                   pixel_mapper_in_channels=cfg.c_pixels, switch_level=None)
    return out


def to_diffusers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys (split packed in_proj, rename out_proj and Stage B's clip_mapper)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            base = key[: -len("attn.in_proj_weight")] if key.endswith("weight") else key[: -len("attn.in_proj_bias")]
            suffix = "weight" if key.endswith("weight") else "bias"
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{suffix}"] = part
        elif ".attn.out_proj." in key:
            out[key.replace(".attn.out_proj.", ".to_out.0.")] = value
        elif key.startswith("clip_mapper."):
            out[key.replace("clip_mapper.", "clip_txt_pooled_mapper.")] = value
        else:
            out[key] = value
    return out


def build_diffusers_unet(cfg: Any, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A StableCascadeUNet holding ``sd`` (original layout), in eval mode."""
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    with torch.device("meta"):
        net = StableCascadeUNet(**diffusers_config(cfg))
    missing, unexpected = net.load_state_dict(to_diffusers_keys(sd), strict=True, assign=True)
    assert not missing and not unexpected
    return net.eval()


def random_state_dict(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for ``net``'s keys, scaled so activations stay O(1) through a deep random network."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in net.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith((".gamma", ".beta")):
            sd[key] = torch.randn(shape, generator=gen) * 0.5
        elif key.endswith("bias"):
            sd[key] = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else 1
            if key.endswith("depthwise.weight"):
                fan_in = shape[-1] * shape[-2]
            sd[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return sd
