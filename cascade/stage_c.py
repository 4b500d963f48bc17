"""Stage C, the text-conditional prior of Stable Cascade (SPEC §4), with the original state-dict keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_keys
from .common import LN_EPS, LayerNorm2d, layer_norm_2d, resolve_ops, timestep_embedding, to_channels_last
from .errors import CheckpointError, ShapeError
from .unet import UNetCore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCConfig:
    """Hyper-parameters of Stage C; defaults are the 3.6B release.

    ``blocks[1]`` and ``block_repeat[1]`` are in up-path order (deepest level first), as in the original.
    ``nhead`` is 0 for levels without attention.
    """

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: tuple[int, ...] = (2048, 2048)
    nhead: tuple[int, ...] = (32, 32)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((8, 24), (24, 8))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1), (1, 1))
    level_config: tuple[str, ...] = ("CTA", "CTA")
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca", "crp")
    switch_level: bool = False

    @classmethod
    def big(cls) -> StageCConfig:
        """The 3.6B release (``stage_c.safetensors``)."""
        return cls()

    @classmethod
    def lite(cls) -> StageCConfig:
        """The 1B release (``stage_c_lite.safetensors``)."""
        return cls(c_cond=1536, c_hidden=(1536, 1536), nhead=(24, 24), blocks=((4, 12), (12, 4)))

    @classmethod
    def tiny(cls) -> StageCConfig:
        """A few-MB variant with the release's key layout, for tests and weightless demo runs."""
        return cls(c_cond=64, c_hidden=(64, 64), nhead=(1, 1), blocks=((1, 2), (2, 1)))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> StageCConfig:
        """Infer the config from original-layout keys and shapes (released sizes or any smaller variant)."""
        what = "Stage C state dict"
        found_b = [k for k in ("effnet_mapper.0.weight", "clip_mapper.weight", "pixels_mapper.0.weight") if k in sd]
        if found_b and "clip_txt_mapper.weight" not in sd:
            raise CheckpointError(
                f"{what}: this is a Stage B (decoder) state dict (found {', '.join(found_b)}; no "
                "clip_txt_mapper.weight); load it as Stage B, and pick a stage_c*.safetensors file for Stage C."
            )
        required = ["clip_txt_mapper.weight", "clip_txt_pooled_mapper.weight", "clip_img_mapper.weight",
                    "embedding.1.weight", "clf.1.weight"]
        unet_keys.require(sd, required, what)
        levels = unet_keys.infer_levels(sd, what)
        c_cond, c_clip_text = unet_keys.shape_of(sd, "clip_txt_mapper.weight", what, rank=2)
        pooled_out, c_pooled = unet_keys.shape_of(sd, "clip_txt_pooled_mapper.weight", what, rank=2)
        c_img = unet_keys.shape_of(sd, "clip_img_mapper.weight", what, rank=2)[1]
        if pooled_out % c_cond:
            raise CheckpointError(
                f"{what}: clip_txt_pooled_mapper.weight has {pooled_out} rows, not a multiple of c_cond={c_cond} "
                "(from clip_txt_mapper.weight); the file is damaged or not a Stage C."
            )
        # patch_size cannot be told apart from c_in (both set embedding's input width): the release uses 1.
        c_in = unet_keys.shape_of(sd, "embedding.1.weight", what, rank=4)[1]
        c_out = unet_keys.shape_of(sd, "clf.1.weight", what, rank=4)[0]
        config = cls(
            **levels.config_fields(),
            c_in=c_in,
            c_out=c_out,
            c_cond=c_cond,
            c_clip_text=c_clip_text,
            c_clip_text_pooled=c_pooled,
            c_clip_img=c_img,
            c_clip_seq=pooled_out // c_cond,
            dropout=(0.1,) * len(levels.c_hidden),
        )
        for c in config.c_hidden:
            if c % unet_keys.HEAD_DIM:
                log.warning("ComfyUI-StableCascade: Stage C width %d is not a multiple of 64; assuming 1 head.", c)
        unet_keys.check_against(StageC, config, sd, what)
        return config


class UpDownBlock2d(nn.Module):
    """1x1 conv plus an optional x2 / x0.5 bilinear resize (disabled in every release: switch_level False).

    Key layout ``blocks.0`` (down: conv first) / ``blocks.1`` (up: conv last) as in the original.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve_ops(operations)
        self.mode, self.enabled = mode, enabled
        mapping = ops.Conv2d(c_in, c_out, kernel_size=1, dtype=dtype, device=device)
        self.blocks = nn.ModuleList([nn.Identity(), mapping] if mode == "up" else [mapping, nn.Identity()])

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        factor = 2.0 if self.mode == "up" else 0.5
        return to_channels_last(F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original casts to float32 here (autocast leftover); the conv runs in the activation dtype.
        if self.mode == "up":
            return to_channels_last(self.blocks[1](self._resize(x)))
        return self._resize(to_channels_last(self.blocks[0](x)))


class StageC(UNetCore):
    """Stage C U-Net: predicts the noise of a (B, 16, H/42, W/42) EfficientNet-space latent.

    Parameters:
        config (`StageCConfig`): hyper-parameters (``StageCConfig.big()``, ``.lite()``, ``.from_state_dict(sd)``).
        dtype (`torch.dtype`, *optional*): parameter dtype.
        device (`torch.device` or `str`, *optional*): parameter device; ``"meta"`` builds without memory so a
            loader can ``load_state_dict(sd, assign=True)``.
        operations (namespace, *optional*): provides ``Linear`` and ``Conv2d`` (default ``torch.nn``).
    """

    def __init__(self, config: StageCConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = None) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.config = cfg = config
        self.clip_txt_mapper = ops.Linear(cfg.c_clip_text, cfg.c_cond, dtype=dtype, device=device)
        seq_width = cfg.c_cond * cfg.c_clip_seq
        self.clip_txt_pooled_mapper = ops.Linear(cfg.c_clip_text_pooled, seq_width, dtype=dtype, device=device)
        self.clip_img_mapper = ops.Linear(cfg.c_clip_img, seq_width, dtype=dtype, device=device)
        self.embedding = self._make_embedding(cfg, dtype, device, ops)

        def downscaler(i: int) -> nn.Module:
            block = UpDownBlock2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], "down", cfg.switch_level, dtype, device, ops)
            return nn.Sequential(LayerNorm2d(), block)

        def upscaler(i: int) -> nn.Module:
            block = UpDownBlock2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], "up", cfg.switch_level, dtype, device, ops)
            return nn.Sequential(LayerNorm2d(), block)

        self._build_levels(cfg, downscaler, upscaler, dtype, device, ops)
        self.clf = self._make_clf(cfg, dtype, device, ops)
        # Inference network: start in eval mode (dropout off, in-place fast paths on); .train() still works.
        self.eval()

    def _conditioning(self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        seq = self.config.c_clip_seq
        # A 2-D pooled (B, 1280) or image (B, 768) embedding is taken as one token (the original only
        # handles a 2-D image embedding and fails on a 2-D pooled one).
        if clip_text_pooled.dim() == 2:
            clip_text_pooled = clip_text_pooled.unsqueeze(1)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)
        bsz = clip_text.shape[0]
        if clip_text_pooled.shape[0] != bsz or clip_img.shape[0] != bsz:
            raise ShapeError(
                f"Stage C conditioning batch sizes differ: clip_text {tuple(clip_text.shape)}, clip_text_pooled "
                f"{tuple(clip_text_pooled.shape)}, clip_img {tuple(clip_img.shape)}; give all three the same batch."
            )
        txt = self.clip_txt_mapper(clip_text.to(dtype))
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled.to(dtype)).view(bsz, clip_text_pooled.shape[1] * seq, -1)
        img = self.clip_img_mapper(clip_img.to(dtype)).view(bsz, clip_img.shape[1] * seq, -1)
        clip = torch.cat([txt, pooled, img], dim=1)
        return F.layer_norm(clip, (clip.shape[-1],), eps=LN_EPS)

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor,
                clip_img: torch.Tensor, cnet: Sequence[torch.Tensor | None] | None = None,
                sca: torch.Tensor | None = None, crp: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise.

        Parameters:
            x (`torch.Tensor`): noisy latent (B, 16, h, w).
            r (`torch.Tensor`): noise level (B,) in [0, 1].
            clip_text (`torch.Tensor`): CLIP bigG last hidden states (B, 77, 1280).
            clip_text_pooled (`torch.Tensor`): projected pooled text (B, 1, 1280); (B, 1280) is accepted too.
            clip_img (`torch.Tensor`): CLIP ViT-L image embeds (B, N, 768) or (B, 768); zeros when unused.
            cnet (list, *optional*): ControlNet outputs, one entry per ResBlock call in execution order
                (``None`` entries and a short list skip blocks); each is resized to the block's input and added.
            sca, crp (`torch.Tensor`, *optional*): extra conditions of the release, 0 when not given.

        Returns:
            `torch.Tensor`: predicted noise, shape and dtype of ``x``.
        """
        if x.dim() != 4 or x.shape[1] != self.config.c_in:
            raise ShapeError(
                f"Stage C expects a latent (B, {self.config.c_in}, h, w), got {tuple(x.shape)}; a 4-channel latent "
                "is a Stage B latent: connect the Stage C latent instead."
            )
        dtype = x.dtype
        extra = {"sca": sca, "crp": crp}
        embs = [timestep_embedding(r, self.config.c_r)]
        for name in self.config.t_conds:
            cond = extra.get(name)
            embs.append(timestep_embedding(torch.zeros_like(r) if cond is None else cond, self.config.c_r))
        r_embed = torch.cat(embs, dim=1).to(dtype)
        clip = self._conditioning(clip_text, clip_text_pooled, clip_img, dtype)
        h = self.embedding[0](x)
        h = layer_norm_2d(self.embedding[1](to_channels_last(h)))
        res_scale = self._residual_scale(dtype)
        if res_scale is None:
            h = self._run_unet(h, r_embed, clip, cnet)
            h = self.clf[1](layer_norm_2d(h))
        else:
            # fp16 mode (docs/FP16.md): the stream runs at res_scale; clf's LayerNorm (eps * s^2) undoes it.
            h = self._run_unet(h.mul_(res_scale), r_embed, clip, cnet, res_scale=res_scale)
            h = self.clf[1](layer_norm_2d(h, LN_EPS * res_scale * res_scale))
        return self.clf[2](h).contiguous()
