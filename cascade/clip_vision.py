"""OpenAI CLIP ViT-L/14 image encoder for Stage C image variations (SPEC §9).

The CLIP vision tower with its projection in plain torch, module for module and key for key as
transformers' ``CLIPVisionModelWithProjection`` (whose modelling import can fail through a broken
torchaudio; see cascade/text.py), config written here; the preprocessing is the
official torchvision pipeline redone in torch: resize the shorter side to 224 (bicubic, antialiased),
center-crop 224, normalise with CLIP's mean and std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ShapeError, UnknownLayoutError
from .clip_layers import ClipEncoder, assign_checked, count_layers, find_prefixes, log_unused, pick_widest

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """Hyper-parameters of the CLIP vision tower; defaults are openai/clip-vit-large-patch14."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def vit_l14(cls) -> ClipVisionConfig:
        """openai/clip-vit-large-patch14, the image encoder of the official image-variation recipe."""
        return cls()

    @classmethod
    def tiny(cls) -> ClipVisionConfig:
        """Two layers, one head, 224 input and 768 output (Stage C's ``c_clip_img``), same key layout."""
        return cls(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> ClipVisionConfig:
        """Infer sizes from transformers-layout keys; 64 channels a head as in every CLIP ViT."""
        patch = sd.get("vision_model.embeddings.patch_embedding.weight")
        pos = sd.get("vision_model.embeddings.position_embedding.weight")
        proj = sd.get("visual_projection.weight")
        if patch is None or pos is None or proj is None:
            raise CheckpointError(
                f"clip vision state dict: patch/position embedding or visual_projection missing ({len(sd)} keys); "
                "expected CLIPVisionModelWithProjection weights (openai/clip-vit-large-patch14)."
            )
        hidden, p = int(patch.shape[0]), int(patch.shape[-1])
        grid = round((int(pos.shape[0]) - 1) ** 0.5)
        fc1 = sd.get("vision_model.encoder.layers.0.mlp.fc1.weight")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * hidden,
            num_layers=count_layers(sd, "vision_model.encoder.layers."),
            num_heads=max(1, hidden // 64),
            image_size=grid * p,
            patch_size=p,
            projection_dim=int(proj.shape[0]),
        )

    def to_transformers(self) -> Any:
        """The same sizes as a transformers ``CLIPVisionConfig`` (parity tests only)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, image_size=self.image_size,
            patch_size=self.patch_size, projection_dim=self.projection_dim, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )


def clip_preprocess(images: torch.Tensor, size: int = 224, crop: bool = True) -> torch.Tensor:
    """(B, H, W, 3) images in [0, 1] (ComfyUI IMAGE) -> (B, 3, size, size) normalised, float32.

    Same steps as the official ``Resize(224, BICUBIC)`` + ``CenterCrop(224)`` + ``Normalize``:
    the shorter side becomes ``size`` and the longer ``int(size * long / short)``; torch's antialiased
    bicubic (a = -0.5 like PIL, no clamping); the crop offset is ``int(round((H - size) / 2))`` as in
    torchvision. Computed in float32 whatever the input dtype (CPUs lack bf16 interpolation).
    ``crop=False`` (core's CLIPVisionEncode crop "none") squeezes the whole image to size x size instead.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ShapeError(f"images of shape {tuple(images.shape)}; expected (B, H, W, 3), ComfyUI's IMAGE layout.")
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    if not crop:
        new_hw = (size, size)
    if new_hw != (h, w):
        x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    top = int(round((new_hw[0] - size) / 2.0))
    left = int(round((new_hw[1] - size) / 2.0))
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipVisionEmbeddings(nn.Module):
    """Patch embedding (a stride-p conv, no bias), a learned class token and learned positions."""

    def __init__(self, config: ClipVisionConfig, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        w, p = config.hidden_size, config.patch_size
        # Creation order as in transformers, so state_dict() lists the keys in the same order.
        self.class_embedding = nn.Parameter(torch.zeros(w, device=device, dtype=dtype))
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False, device=device, dtype=dtype)
        positions = (config.image_size // p) ** 2 + 1
        self.position_embedding = nn.Embedding(positions, w, device=device, dtype=dtype)
        self.register_buffer("position_ids", torch.arange(positions, device=device).expand(1, -1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


class ClipVisionTransformer(nn.Module):
    """CLIP's ViT: ``forward(pixels) -> pooled`` (the class token after ``post_layernorm``)."""

    def __init__(self, config: ClipVisionConfig, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        w, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = ClipVisionEmbeddings(config, device=device, dtype=dtype)
        self.pre_layrnorm = nn.LayerNorm(w, eps=eps, device=device, dtype=dtype)  # sic: transformers' key name
        self.encoder = ClipEncoder(config.num_layers, w, config.num_heads, config.intermediate_size,
                                   config.hidden_act, eps, device=device, dtype=dtype)
        self.post_layernorm = nn.LayerNorm(w, eps=eps, device=device, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(hidden[:, 0, :])


class ClipVision(nn.Module):
    """CLIP vision tower + projection; ``encode`` gives Stage C's ``clip_img`` rows.

    Parameters:
        config (`ClipVisionConfig`): sizes; ``ClipVisionConfig.vit_l14()`` for the release.
        dtype (`torch.dtype`, *optional*): parameter dtype.
        device (`torch.device` or `str`, *optional*): where parameters are created (``"meta"`` for loaders).
        operations: accepted for the common constructor signature and ignored (plain ``torch.nn`` layers).

    State-dict keys are transformers' (``vision_model.*``, ``visual_projection.weight``).
    """

    def __init__(self, config: ClipVisionConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = None) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device if device is not None else "cpu", "dtype": dtype}
        self.vision_model = ClipVisionTransformer(config, **factory)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False, **factory)
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @device.setter
    def device(self, value: torch.device) -> None:
        # ComfyUI's ModelPatcher assigns ``model.device`` after moving weights; the weights are the
        # source of truth here, so the assignment is accepted and ignored.
        pass

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> ``image_embeds`` (B, projection_dim), e.g. (B, 768); ``crop``: center
        crop to a square (official) or squeeze the whole image (``clip_preprocess``)."""
        pixels = clip_preprocess(images.to(self.device), self.config.image_size, crop)
        return self.encode_pixels(pixels)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Already preprocessed (B, 3, 224, 224) pixels -> (B, projection_dim)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ShapeError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected (B, 3, {size}, {size}) - "
                             "preprocess with clip_preprocess (or call encode with ComfyUI IMAGE tensors).")
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.visual_projection(self.vision_model(pixels))

    @staticmethod
    def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers keys under any prefix (``clip_l_vision.`` in ComfyUI's packaged Stage C,
        ``image_encoder.``, none) -> transformers keys."""
        what = "clip vision state dict"
        prefixes = find_prefixes(sd, "vision_model.post_layernorm.weight")
        if not prefixes:
            raise UnknownLayoutError(
                f"{what}: no CLIP vision tower among {len(sd)} keys (e.g. {sorted(sd)[:3]}); known layout: "
                "transformers '[prefix]vision_model.post_layernorm.weight' + 'visual_projection.weight' "
                "(openai/clip-vit-large-patch14, ComfyUI clip_vision files, packaged Stage C 'clip_l_vision.')."
            )
        p = pick_widest(sd, prefixes, "vision_model.post_layernorm.weight", what)
        out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p + "vision_model.")}
        if p + "visual_projection.weight" in sd:
            out["visual_projection.weight"] = sd[p + "visual_projection.weight"]
        log_unused(sd, p, {p + k for k in out}, what)
        return out

    def load_state_dict_any(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load from any supported prefix; missing parameters raise CheckpointError, extras are logged."""
        assign_checked(self, self.convert_state_dict(sd), what="clip vision")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> ClipVision:
        """Build on the meta device from the keys' shapes, then load; keeps the file's dtype unless asked."""
        converted = cls.convert_state_dict(sd)
        model = cls(ClipVisionConfig.from_state_dict(converted), device="meta")
        converted = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                     for k, v in converted.items()}
        assign_checked(model, converted, what="clip vision")
        return model
