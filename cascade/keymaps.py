"""What a Stable Cascade weights file holds, told from its keys and shapes, and the renames back to
the original release's keys.

Every function here reads only key names and ``.shape``, so it works on meta tensors built from a
safetensors header as well as on loaded tensors. Layout facts and their sources: docs/LAYOUTS.md.

Components are found by an *anchor* key that only that module has (``clf.1.weight`` for the U-Nets,
``vquantizer.*`` for Stage A, ...) plus a few confirming keys, under any prefix: ComfyUI's packaged
files put Stage C under ``model.diffusion_model.``, the EffNet under ``vae.encoder.``, the Previewer
under ``vae.previewer.``, Stage A under ``vae.``, CLIP-G under ``text_encoder.clip_g.transformer.``
and CLIP-L vision under ``clip_l_vision.``; other tools add their own prefixes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, MutableMapping

import torch

from .errors import CheckpointError
from .kinds import COMPONENT_KINDS, KINDS, TOWER_KINDS, UNET_KINDS, describe

log = logging.getLogger(__name__)

LAYOUTS = {
    "original": "the Stability AI release (stage_c*.safetensors, stage_b*, stage_a, effnet_encoder, previewer, "
                "controlnet/*): attention as one packed in_proj_weight",
    "comfyui": "ComfyUI's packaged checkpoints and saved models (model.diffusion_model., vae., text_encoder., "
               "clip_l_vision. prefixes; attention split into to_q/to_k/to_v + out_proj)",
    "diffusers": "diffusers StableCascadeUNet / PaellaVQModel (prior/, decoder/, vqgan/ folders, sharded or not; "
                 "attention to_q/to_k/to_v + to_out.0, Stage B clip_txt_pooled_mapper)",
    "transformers": "transformers CLIP text / vision models (text_model.*, vision_model.*)",
    "open_clip": "open_clip text towers (transformer.resblocks.*, token_embedding)",
}
COMFY_ROOTS = ("model.diffusion_model.", "diffusion_model.", "vae.", "first_stage_model.", "text_encoder.",
               "text_encoders.", "cond_stage_model.", "clip_l_vision.", "clip_vision.", "encoder.", "previewer.")

_LORA_MARKERS = ("lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.")
_FOREIGN_HINTS = (
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x/SDXL U-Net or checkpoint"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux model"),
    ("joint_blocks.0.context_block.attn.qkv.weight", "a Stable Diffusion 3 model"),
    ("decoder.conv_in.weight", "an SD-family VAE (AutoencoderKL)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder"),
)


@dataclass(frozen=True)
class Detected:
    """What a state dict (or one component of it) is.

    ``kind``: stage_c, stage_b, stage_a, effnet, previewer, controlnet, text_encoder, clip_vision, lora,
    packaged_c, packaged_b, stage_c_coder (ComfyUI's EffNet + Previewer pair) or packaged (other mixes).
    ``layout``: a key of ``LAYOUTS`` (or cascade_lora / lora). ``prefix``: the key prefix of the component
    (``""`` for a plain file). ``variant``: big / lite / canny ... or a size note. ``parts``: the components
    of a packaged file.
    """

    kind: str
    layout: str
    prefix: str = ""
    variant: str = ""
    parts: tuple[Detected, ...] = ()

    def part(self, kind: str) -> Detected | None:
        """The component of ``kind`` (this one for a single-component file), or None."""
        if self.kind == kind:
            return self
        return next((p for p in self.parts if p.kind == kind), None)

    def describe(self) -> str:
        """'a Stage B (lite, diffusers layout)' or 'a packaged ... holding: ...'."""
        if self.parts:
            inner = ", ".join(f"{describe(p.kind)} under {p.prefix!r}" for p in self.parts)
            return f"{describe(self.kind)} ({self.layout} layout) holding {inner}"
        extra = ", ".join(x for x in (self.variant, f"{self.layout} layout") if x)
        where = f" under prefix {self.prefix!r}" if self.prefix else ""
        return f"{describe(self.kind)} ({extra}){where}"

    @property
    def read_root(self) -> str:
        """The prefix of every key this component needs; text towers keep ComfyUI's legacy projection one
        level up (``text_encoder.clip_g.text_projection`` next to ``...clip_g.transformer.``)."""
        if self.kind in TOWER_KINDS and self.prefix:
            return self.prefix.split(".", 1)[0] + "."
        return self.prefix


def _prefixes(keys: Iterable[str], anchor: str) -> list[str]:
    out = []
    for k in keys:
        if k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == "."):
            out.append(k[: len(k) - len(anchor)])
    return out


def find_components(sd: Mapping[str, Any]) -> list[Detected]:
    """Every known component in ``sd``, outermost prefix first, one per (kind, prefix)."""
    found: dict[tuple[str, str], Detected] = {}
    for kind, sig in ((k.name, sig) for k in KINDS.values() for sig in k.signatures):
        for p in _prefixes(sd, sig.anchor):
            if all(p + n in sd for n in sig.needs) and (not sig.any_of or any(p + a in sd for a in sig.any_of)):
                if kind == "effnet" and p + "projections.0.0.weight" in sd:
                    continue  # a ControlNet's EffNet backbone
                found.setdefault((kind, p), Detected(kind, _layout(kind, sd, p), p, _variant(kind, sd, p)))
    parts = _drop_nested(list(found.values()))
    return sorted(parts, key=lambda d: (COMPONENT_KINDS.index(d.kind), d.prefix))


def _drop_nested(parts: list[Detected]) -> list[Detected]:
    """Keep one text tower per file root (text.py picks the widest) and drop parts inside a U-Net."""
    out: list[Detected] = []
    roots = {(d.kind, d.read_root) for d in parts if d.kind in TOWER_KINDS}
    for d in sorted(parts, key=lambda d: len(d.prefix)):
        if d.kind in TOWER_KINDS:
            if (d.kind, d.read_root) not in roots:
                continue
            roots.discard((d.kind, d.read_root))
        inside = any(u.kind in UNET_KINDS and d.prefix.startswith(u.prefix) and d.prefix != u.prefix and
                     d.prefix[len(u.prefix):].split(".", 1)[0] in KINDS[u.kind].roots for u in out)
        if not inside:
            out.append(d)
    return out


def _layout(kind: str, sd: Mapping[str, Any], p: str) -> str:
    comfy = p.startswith(COMFY_ROOTS)
    if kind in UNET_KINDS:
        keys = [k for k in sd if k.startswith(p)]
        if any(k.endswith(".attention.to_q.weight") for k in keys) or (
                kind == "stage_b" and p + "clip_txt_pooled_mapper.weight" in sd):
            return "diffusers"
        if comfy or any(k.endswith(".attention.attn.to_q.weight") for k in keys):
            return "comfyui"
        return "original"
    if kind == "stage_a" and p + "vquantizer.embedding.weight" in sd:
        return "diffusers"
    if kind == "text_encoder" and p + "token_embedding.weight" in sd:
        return "open_clip"
    if comfy:
        return "comfyui"
    return "transformers" if kind in TOWER_KINDS else "original"


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape) if key in sd else ()


def _dim(sd: Mapping[str, Any], key: str, i: int) -> int | None:
    """Dimension ``i`` of ``sd[key]``, or None when the key is missing or has too few dimensions (detection
    only names a variant; the config inference reports damaged shapes with the key)."""
    shape = _shape(sd, key)
    return shape[i] if -len(shape) <= i < len(shape) else None


def _variant(kind: str, sd: Mapping[str, Any], p: str) -> str:
    if kind == "stage_c":
        c = _dim(sd, p + "clip_txt_mapper.weight", 0)
        return {2048: "big 3.6B", 1536: "lite 1B"}.get(c, f"custom, c_cond={c if c is not None else '?'}")
    if kind == "stage_b":
        w = _dim(sd, p + "down_blocks.1.0.channelwise.0.weight", -1)
        return {640: "big 1.5B", 576: "lite 700M"}.get(w, f"custom, width {w if w is not None else '?'}")
    if kind == "controlnet":
        if p + "backbone.0.weight" in sd:
            return f"large backbone, c_in={_dim(sd, p + 'backbone.0.weight', 1)}"
        c_in = _dim(sd, p + "backbone.0.0.weight", 1)
        return {1: "canny", 4: "inpainting"}.get(c_in, f"effnet backbone, c_in={c_in}")
    if kind == "text_encoder":
        w = _dim(sd, p + "text_model.final_layer_norm.weight", 0) or _dim(sd, p + "token_embedding.weight", 1)
        return {1280: "CLIP ViT-bigG", 768: "CLIP ViT-L", 1024: "CLIP ViT-H"}.get(w, f"width {w}")
    if kind == "clip_vision":
        w = _dim(sd, p + "vision_model.post_layernorm.weight", 0)
        return {1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}.get(w, f"width {w}")
    return ""


def detect(sd: Mapping[str, Any]) -> Detected:
    """Tell what ``sd`` holds from keys and shapes only; ``kind == "unknown"`` when nothing matches."""
    parts = find_components(sd)
    if not parts:
        lora = _lora_layout(sd)
        return Detected("lora", lora) if lora else Detected("unknown", "unknown")
    if len(parts) == 1:
        return parts[0]
    kinds = {p.kind for p in parts}
    kind = ("packaged_c" if "stage_c" in kinds else "packaged_b" if "stage_b" in kinds
            else "stage_c_coder" if kinds == {"effnet", "previewer"} else "packaged")
    comfy = all(p.prefix.startswith(COMFY_ROOTS) for p in parts)
    return Detected(kind, "comfyui" if comfy else "packaged", "", "", tuple(parts))


def _lora_layout(sd: Mapping[str, Any]) -> str:
    if "embeddings.embeddings" in sd or "weights.0.lora_down" in sd:
        return "cascade_lora"
    return "lora" if any(m in k for k in sd for m in _LORA_MARKERS) else ""


def foreign_hint(sd: Mapping[str, Any]) -> str:
    """A guess at what a file of no known layout is, for error messages ('' when none)."""
    for suffix, what in _FOREIGN_HINTS:
        if any(k.endswith(suffix) for k in sd):
            return what
    return ""


def sub_dict(sd: MutableMapping[str, Any], det: Detected, pop: bool = False) -> dict[str, Any]:
    """The keys of one component; U-Nets and image modules lose their prefix, text/vision towers keep it
    (their converters in text.py / clip_vision.py find it)."""
    root = det.read_root
    strip = det.prefix if det.kind not in TOWER_KINDS else ""
    keys = [k for k in sd if k.startswith(root)]
    return {k[len(strip):]: (sd.pop(k) if pop else sd[k]) for k in keys}


_QKV = re.compile(r"^(.*\.attention\.)(?:attn\.)?to_([qkv])\.(weight|bias)$")
_TO_OUT = re.compile(r"^(.*\.attention\.)to_out\.0\.(weight|bias)$")


def _cat_rows(ts: list[Any], names: list[str]) -> Any:
    shapes = [tuple(t.shape) for t in ts]
    if any(len(sh) != len(shapes[0]) or sh[1:] != shapes[0][1:] or not sh for sh in shapes):
        raise CheckpointError(
            f"attention projections {names} have shapes {shapes}; expected q, k and v of one shape (c,) or "
            "(c, c) to stack into in_proj. The file is damaged; download it again."
        )
    if ts[0].is_meta:  # header pass: only the shape matters, and torch.cat on meta costs seconds the first time
        return torch.empty((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), dtype=ts[0].dtype, device="meta")
    return torch.cat(ts, dim=0)


def unet_to_original(sd: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI (attn.to_q/k/v) and diffusers (to_q/k/v, to_out.0, clip_txt_pooled_mapper for Stage B)
    keys -> original keys, in place. q, k and v are concatenated one block at a time, so the extra
    memory is one block's projection, never a second copy of the network."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for k in list(sd):
        m = _TO_OUT.match(k)
        if m:
            sd[f"{m[1]}attn.out_proj.{m[2]}"] = sd.pop(k)
            continue
        m = _QKV.match(k)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = k
    for (base, what), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"attention {base!r} has only {sorted(parts)} of to_q/to_k/to_v {what}s; the file is incomplete "
                "or damaged - re-download it."
            )
        name = "in_proj_weight" if what == "weight" else "in_proj_bias"
        names = [parts[c] for c in "qkv"]
        sd[f"{base}attn.{name}"] = _cat_rows([sd.pop(n) for n in names], names)
    if "clip_txt_pooled_mapper.weight" in sd and "effnet_mapper.0.weight" in sd and "clip_txt_mapper.weight" not in sd:
        for what in ("weight", "bias"):
            if f"clip_txt_pooled_mapper.{what}" in sd:
                sd[f"clip_mapper.{what}"] = sd.pop(f"clip_txt_pooled_mapper.{what}")
    return sd


def to_original(kind: str, sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Prefix-free component keys -> the original release's keys, in place.

    Returns the dict and the keys dropped as unexpected (outside the network's top-level modules).
    """
    if kind in UNET_KINDS:
        unet_to_original(sd)
    elif kind == "stage_a" and "vquantizer.embedding.weight" in sd:
        sd["vquantizer.codebook.weight"] = sd.pop("vquantizer.embedding.weight")
    for k in KINDS[kind].constant_keys:
        sd.pop(k, None)
    roots = KINDS[kind].roots
    dropped = [k for k in sd if roots is not None and k.split(".", 1)[0] not in roots]
    for k in dropped:
        del sd[k]
    return sd, dropped
