"""Tiny random checkpoints in every released layout, written to a tmp dir (no real weights exist here).

The layout writers below are written from the layout facts in docs/LAYOUTS.md, independently of the
loader's converters (cascade/keymaps.py), so a test that writes with these and reads with the loader
checks the two against each other; tests/cascade/test_loading_diffusers.py checks the diffusers writers
against diffusers' own classes and converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from comfyui_stablecascade.cascade.kinds import COMPONENT_KINDS, KINDS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the pack (repo root)
DATA = TESTS / "data"  # committed test data: keys_shapes.json (the spec's key table), schedule_tables.md
NETWORKS = COMPONENT_KINDS  # every kind the pack builds a network for, from the registry (cascade/kinds.py)


def classes(kind: str) -> tuple[Any, Any]:
    """(network class, config class) of ``kind``, as the registry declares them."""
    return KINDS[kind].classes()


def tiny_config(kind: str) -> Any:
    return classes(kind)[1].tiny()


def tiny_sd(kind: str, seed: int = 0, config: Any = None) -> dict[str, torch.Tensor]:
    """Original-layout state dict of the tiny ``kind`` network, every float tensor random (variances > 0)."""
    cls, cfg_cls = classes(kind)
    model = cls(config or cfg_cls.tiny())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            r = torch.randn(v.shape, generator=g, dtype=torch.float32)
            v = r.abs() + 0.5 if k.endswith("running_var") else r
        out[k] = v.clone().contiguous()
    return out


def bn_random_state_dict(net: torch.nn.Module, seed: int = 0,
                         fan_in: Any = None) -> dict[str, torch.Tensor]:
    """Random weights for ``net``'s keys, scaled so activations stay O(1) through a deep network, with BatchNorm
    statistics far from (0, 1) so that eval-mode BatchNorm is visible. ``fan_in(key, tensor)`` overrides the
    fan-in of a weight (default: the elements of one output row)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in net.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) * 2 + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = torch.randn(shape, generator=gen) * 0.2
        elif len(shape) == 1:
            sd[key] = 1 + torch.randn(shape, generator=gen) * 0.2
        else:
            n = fan_in(key, t) if fan_in is not None else t[0].numel()
            sd[key] = torch.randn(shape, generator=gen) * (2.0 / n) ** 0.5
    return sd


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def with_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ---- U-Net layouts ------------------------------------------------------------------------------


def comfyui_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Cascade U-Net keys: in_proj split into attn.to_q/to_k/to_v, out_proj kept
    (comfy/ldm/cascade/common.py OptimizedAttention; supported_models.Stable_Cascade_C.process_unet_state_dict)."""
    out = {}
    for k, v in sd.items():
        for what, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            if k.endswith("attn." + name):
                base = k[: -len(name)]
                for part, chunk in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                    out[f"{base}{part}.{what}"] = chunk.clone()
                break
        else:
            out[k] = v
    return out


def diffusers_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers StableCascadeUNet keys (convert_stable_cascade_unet_single_file_to_diffusers):
    attention.to_q/k/v, attention.to_out.0, and Stage B's clip_mapper renamed clip_txt_pooled_mapper."""
    is_b = "clip_mapper.weight" in sd
    out = {}
    for k, v in sd.items():
        if ".attention.attn.in_proj_" in k:
            base, what = k.split(".attn.in_proj_")
            for part, chunk in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[f"{base}.{part}.{what}"] = chunk.clone()
        elif ".attention.attn.out_proj." in k:
            out[k.replace(".attn.out_proj.", ".to_out.0.")] = v
        elif is_b and k.startswith("clip_mapper."):
            out[k.replace("clip_mapper.", "clip_txt_pooled_mapper.")] = v
        else:
            out[k] = v
    return out


def diffusers_stage_a(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers PaellaVQModel keys: the codebook is an nn.Embedding (vquantizer.embedding.weight)."""
    return {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in sd.items()}


# ---- text / vision ------------------------------------------------------------------------------


def comfyui_text(sd: dict[str, torch.Tensor], prefix: str = "text_encoder.clip_g.") -> dict[str, torch.Tensor]:
    """A transformers CLIP text state dict as ComfyUI's packaged Stage C stores it: the tower under
    ``<prefix>transformer.`` and the projection as ``<prefix>text_projection`` (in x out, i.e. transposed)."""
    out = {f"{prefix}transformer.{k}": v for k, v in sd.items() if k != "text_projection.weight"}
    out[f"{prefix}text_projection"] = sd["text_projection.weight"].t().contiguous()
    return out


def comfyui_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = with_prefix(sd, "clip_l_vision.")
    n = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault("clip_l_vision.vision_model.embeddings.position_ids", torch.arange(n).unsqueeze(0))
    return out


# ---- packaged files -----------------------------------------------------------------------------


def packaged_c(stage_c: dict, text: dict, effnet: dict | None, previewer: dict | None,
               vision: dict | None, split_attention: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI's stable_cascade_stage_c.safetensors: Stage C under model.diffusion_model. (the release's packed
    in_proj, which ComfyUI splits on load; ``split_attention`` writes what ComfyUI itself saves), CLIP-G under
    text_encoder.clip_g., EffNet / Previewer under vae.encoder. / vae.previewer., CLIP-L vision under
    clip_l_vision."""
    out = with_prefix(comfyui_unet(stage_c) if split_attention else stage_c, "model.diffusion_model.")
    out.update(comfyui_text(text))
    if effnet is not None:
        out.update(with_prefix(effnet, "vae.encoder."))
    if previewer is not None:
        out.update(with_prefix(previewer, "vae.previewer."))
    if vision is not None:
        out.update(comfyui_vision(vision))
    return out


def packaged_b(stage_b: dict, stage_a: dict, split_attention: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI's stable_cascade_stage_b.safetensors: Stage B under model.diffusion_model., Stage A under vae."""
    out = with_prefix(comfyui_unet(stage_b) if split_attention else stage_b, "model.diffusion_model.")
    out.update(with_prefix(stage_a, "vae."))
    return out


# ---- writing ------------------------------------------------------------------------------------


def save(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in cast(sd, dtype).items()}, str(path))
    return path


def save_sharded(folder: Path, sd: dict[str, torch.Tensor], shards: int = 2,
                 name: str = "diffusion_pytorch_model", variant: str = "") -> Path:
    """A diffusers/transformers-style sharded checkpoint: ``<name>[.variant]-0000i-of-0000n.safetensors``
    plus ``<name>.safetensors.index[.variant].json``. Returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    stem = f"{name}.{variant}" if variant else name
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = folder / (f"{name}.safetensors.index.{variant}.json" if variant else f"{name}.safetensors.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index
