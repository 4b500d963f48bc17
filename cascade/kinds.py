"""The registry of model kinds: every kind of network the pack reads is declared here, once.

A ``Kind`` holds what the pure-torch layer needs to know about one kind of file: how it is recognised
(``signatures``: an anchor key plus confirming keys under one prefix, shapes read by ``keymaps``), which
class and config build it (``network``, imported lazily), which top-level modules it owns, its diffusers
folder names, where a host places it (diffusion model, VAE-like or text encoder), and the tiny seeded
network offered when no weights are installed (``demo``). Detection (``keymaps``), loading (``loading``),
demo networks, hosts and tests all read this table; the node layer adds titles and ComfyUI folders in its
own table (``nodes/kinds.py``). Adding a kind (e.g. a quantized Stage C) is one entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CascadeError

# Text width of the demo networks: the tiny text encoder feeds the tiny Stage C and Stage B.
DEMO_TEXT_WIDTH = 64


@dataclass(frozen=True)
class Signature:
    """Keys that mark a component: ``anchor`` and every ``needs`` key (and one of ``any_of``) under one prefix."""

    anchor: str
    needs: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kind:
    """One kind of network: detection, construction, placement and its demo builder."""

    name: str
    description: str  # "a Stage C (prior) U-Net": used in every message about this kind
    examples: str  # the released files of this kind, for "pick ..." hints
    signatures: tuple[Signature, ...] = ()
    network: tuple[str, str, str] | None = None  # (module of cascade/, class, config class)
    tower: bool = False  # a transformers tower, built by ``cls.from_state_dict`` with its own layers
    roots: frozenset[str] | None = None  # top-level modules it owns; other keys are dropped (logged)
    constant_keys: tuple[str, ...] = ()  # keys other tools add that carry nothing
    diffusers_folders: tuple[str, ...] = ()
    unet: bool = False
    placement: str = "diffusion"  # "diffusion", "vae" or "text": which devices a host gives it
    release: str = ""  # what to install instead of the demo network
    label: str = ""  # short name for people ("Stage C", "EfficientNet encoder")
    role: str = ""  # what it does in a workflow ("turns the prompt into ..."), for "what is this file" messages
    files: str = ""  # the released files with their sizes (params x bytes: SPEC.md, tests/data/keys_shapes.json)
    download: str = ""  # where the release lives (a Hugging Face repository)
    demo: Callable[[Any], nn.Module] | None = None  # demo(classes) -> a tiny untrained network

    @property
    def takes_operations(self) -> bool:
        """Built from the pack's own layers (``operations`` namespace); towers build transformers layers."""
        return not self.tower

    def classes(self) -> tuple[type, type]:
        """(network class, config class), imported on first use."""
        if self.network is None:
            raise CascadeError(f"{self.description} is not a network this pack builds (kind {self.name!r})")
        module, cls, cfg = self.network
        mod = importlib.import_module(f".{module}", __package__)
        return getattr(mod, cls), getattr(mod, cfg)

    def build_demo(self) -> nn.Module:
        """The tiny demo network (fresh constructor init; ``random_init.randomize_`` gives it seeded weights)."""
        if self.demo is None:
            raise CascadeError(f"there is no demo network of kind {self.name!r}; kinds with one: "
                               f"{[k.name for k in KINDS.values() if k.demo is not None]}")
        return self.demo(self.classes())


def _plain(classes: tuple[type, type]) -> nn.Module:
    cls, cfg = classes
    return cls(cfg.tiny())


def _demo_stage_c(classes: tuple[type, type]) -> nn.Module:
    cls, cfg = classes
    return cls(dataclasses.replace(cfg.tiny(), c_clip_text=DEMO_TEXT_WIDTH, c_clip_text_pooled=DEMO_TEXT_WIDTH))


def _demo_stage_b(classes: tuple[type, type]) -> nn.Module:
    cls, cfg = classes
    return cls(dataclasses.replace(cfg.tiny(), c_clip=DEMO_TEXT_WIDTH))


def _demo_text(classes: tuple[type, type]) -> nn.Module:
    cls, cfg = classes
    return cls(cfg.tiny(hidden_size=DEMO_TEXT_WIDTH, projection_dim=DEMO_TEXT_WIDTH))


# Where the releases live (Hugging Face repositories of Stability AI).
_HF = "https://huggingface.co/stabilityai/stable-cascade"
_HFP = "https://huggingface.co/stabilityai/stable-cascade-prior"

_UNET_ROOTS = ("embedding", "down_blocks", "down_downscalers", "down_repeat_mappers", "up_blocks", "up_upscalers",
               "up_repeat_mappers", "clf")

# Order matters: detection reports components in this order, and an EffNet anchor inside a ControlNet is
# recognised as the ControlNet (keymaps checks for its projections).
_ALL = (
    Kind("stage_c", "a Stage C (prior) U-Net",
         "stage_c.safetensors / stage_c_bf16 / stage_c_lite(_bf16), or a diffusers prior/ folder",
         signatures=(Signature("clf.1.weight", ("embedding.1.weight", "clip_txt_mapper.weight")),),
         network=("stage_c", "StageC", "StageCConfig"),
         roots=frozenset({"clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", *_UNET_ROOTS}),
         diffusers_folders=("prior", "prior_lite"), unet=True, label="Stage C",
         release="stage_c_bf16.safetensors (or stage_c / stage_c_lite*)", demo=_demo_stage_c,
         role="turns the prompt into a 16-channel latent", download=_HF,
         files="stage_c_bf16.safetensors (7.2 GB) or stage_c_lite_bf16.safetensors (2.1 GB; fp32 files: twice that)"),
    Kind("stage_b", "a Stage B (decoder) U-Net",
         "stage_b.safetensors / stage_b_bf16 / stage_b_lite(_bf16), or a diffusers decoder/ folder",
         signatures=(Signature("clf.1.weight", ("embedding.1.weight", "effnet_mapper.0.weight")),),
         network=("stage_b", "StageB", "StageBConfig"),
         roots=frozenset({"effnet_mapper", "pixels_mapper", "clip_mapper", *_UNET_ROOTS}),
         diffusers_folders=("decoder", "decoder_lite"), unet=True, label="Stage B",
         release="stage_b_bf16.safetensors (or stage_b / stage_b_lite*)", demo=_demo_stage_b,
         role="turns the Stage C latent into a Stage A latent", download=_HF,
         files="stage_b_bf16.safetensors (3.1 GB) or stage_b_lite_bf16.safetensors (1.4 GB; fp32 files: twice that)"),
    Kind("stage_a", "a Stage A VQGAN", "stage_a.safetensors",
         signatures=(Signature("out_block.0.weight", ("in_block.1.weight",),
                               ("vquantizer.codebook.weight", "vquantizer.embedding.weight")),),
         network=("stage_a", "StageA", "StageAConfig"),
         roots=frozenset({"in_block", "down_blocks", "vquantizer", "up_blocks", "out_block"}),
         diffusers_folders=("vqgan",), placement="vae", label="Stage A", release="stage_a.safetensors", demo=_plain,
         role="turns Stage B latents into pixels", download=_HF, files="stage_a.safetensors (74 MB)"),
    Kind("effnet", "an EfficientNet encoder", "effnet_encoder.safetensors",
         signatures=(Signature("mapper.0.weight", ("backbone.0.0.weight",)),),
         network=("effnet", "EfficientNetEncoder", "EffNetConfig"), roots=frozenset({"backbone", "mapper"}),
         constant_keys=("mean", "std"), placement="vae", label="EfficientNet encoder",
         release="effnet_encoder.safetensors", demo=_plain,
         role="encodes images into Stage C latents (image-to-image, reconstruction)", download=_HF,
         files="effnet_encoder.safetensors (81 MB)"),
    Kind("previewer", "a Previewer", "previewer.safetensors",
         signatures=(Signature("blocks.0.weight", ("blocks.24.weight",)),),
         network=("previewer", "Previewer", "PreviewerConfig"), roots=frozenset({"blocks"}), placement="vae",
         label="Previewer", release="previewer.safetensors", demo=_plain,
         role="draws live previews of Stage C latents", download=_HF, files="previewer.safetensors (16 MB)"),
    Kind("controlnet", "a Stable Cascade ControlNet", "controlnet/canny.safetensors, inpainting or super_resolution",
         signatures=(Signature("projections.0.0.weight", (), ("backbone.0.0.weight", "backbone.0.weight")),),
         network=("controlnet", "ControlNet", "ControlNetConfig"), roots=frozenset({"backbone", "projections"}),
         label="ControlNet", release="canny.safetensors, inpainting.safetensors or super_resolution.safetensors "
                                   "(stabilityai/stable-cascade, controlnet/)",
         role="steers Stage C with an edge map, a masked image or a small image", download=f"{_HF} (controlnet/)",
         files="controlnet/canny.safetensors or inpainting.safetensors (54M parameters), super_resolution.safetensors "
               "(203M)"),
    Kind("text_encoder", "a CLIP text encoder",
         "the CLIP ViT-bigG text encoder (text_encoder/model.safetensors of stabilityai/stable-cascade)",
         signatures=(Signature("text_model.final_layer_norm.weight"),
                     Signature("token_embedding.weight", ("transformer.resblocks.0.attn.in_proj_weight",))),
         network=("text", "TextEncoder", "TextEncoderConfig"), tower=True, diffusers_folders=("text_encoder",),
         placement="text", label="CLIP ViT-bigG text encoder",
         release="text_encoder/model.safetensors of stabilityai/stable-cascade", demo=_demo_text,
         role="encodes the prompt for Stage C and Stage B", download=_HF,
         files="text_encoder/model.safetensors (about 1.4 GB; save it e.g. as "
               "stable_cascade_text_encoder.safetensors)"),
    Kind("clip_vision", "a CLIP vision model",
         "the CLIP ViT-L/14 vision model (e.g. image_encoder/model.safetensors)",
         signatures=(Signature("vision_model.post_layernorm.weight"),),
         network=("clip_vision", "ClipVision", "ClipVisionConfig"), tower=True, diffusers_folders=("image_encoder",),
         placement="text", label="CLIP ViT-L/14 vision model",
         release="image_encoder/model.safetensors of stabilityai/stable-cascade-prior", demo=_plain,
         role="encodes images for image variations", download=_HFP,
         files="image_encoder/model.safetensors (303M parameters; save it e.g. as "
               "stable_cascade_image_encoder.safetensors)"),
    Kind("lora", "a LoRA", "a Stage C LoRA (the official trainer's file or a kohya/OneTrainer one)", label="LoRA",
         role="adapts Stage C to a style or subject", release="a Stage C LoRA", files="a Stage C LoRA",
         download="a trainer or a model site (there is no official one)"),
)
KINDS: dict[str, Kind] = {k.name: k for k in _ALL}
# Networks a file can hold (everything but the LoRA), in detection order.
COMPONENT_KINDS = tuple(k.name for k in _ALL if k.network is not None)
UNET_KINDS = tuple(k.name for k in _ALL if k.unet)
TOWER_KINDS = tuple(k.name for k in _ALL if k.tower)
# What multi-component files are called (they are detected from their components, not declared).
PACKAGED_NAMES = {
    "packaged_c": "ComfyUI's packaged Stage C checkpoint", "packaged_b": "ComfyUI's packaged Stage B checkpoint",
    "stage_c_coder": "ComfyUI's EffNet + Previewer pair", "packaged": "a multi-model checkpoint",
}
PACKAGED_EXAMPLES = "stable_cascade_stage_c.safetensors or stable_cascade_stage_b.safetensors"
PACKAGED_DOWNLOAD = f"{_HF} (folder comfyui_checkpoints/)"


def get(name: str) -> Kind:
    """The kind called ``name``, or a clear error listing the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise CascadeError(f"unknown model kind {name!r}; known kinds: {list(KINDS)}") from None


def describe(name: str) -> str:
    """The description of a kind or a packaged file kind ('a Stage B (decoder) U-Net')."""
    if name in KINDS:
        return KINDS[name].description
    return PACKAGED_NAMES.get(name, name)


def demo_network(name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The tiny demo network of ``name`` with seeded random weights, in eval mode, on the CPU.

    The global RNG is left as it was (constructors draw from it), and the seed is fixed per kind, so two
    demo runs give the same image.
    """
    from .random_init import randomize_

    kind = get(name)
    with torch.random.fork_rng(devices=[]):
        module = kind.build_demo()
    randomize_(module, seed=sorted(k.name for k in KINDS.values() if k.demo is not None).index(name))
    if dtype is not None:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)
