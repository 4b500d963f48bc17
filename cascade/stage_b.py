"""Stage B, the latent decoder of Stable Cascade (SPEC §5), with the original state-dict keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_keys
from .common import (LN_EPS, LayerNorm2d, layer_norm_2d, resize_like, resolve_ops, timestep_embedding,
                     to_channels_last)
from .errors import CheckpointError, ShapeError
from .unet import UNetCore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageBConfig:
    """Hyper-parameters of Stage B; defaults are the big release ("3B" in code, 1.5B in the README).

    ``blocks[1]`` and ``block_repeat[1]`` are in up-path order (deepest level first), as in the original.
    ``nhead`` is 0 for levels without attention (the lite release lists an unused 9 for level 1).
    """

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (0, 0, 20, 20)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 6, 28, 6), (6, 28, 6, 2))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 1, 1), (3, 3, 2, 2))
    level_config: tuple[str, ...] = ("CT", "CT", "CTA", "CTA")
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca",)

    @classmethod
    def big(cls) -> StageBConfig:
        """The big release (``stage_b.safetensors``)."""
        return cls()

    @classmethod
    def lite(cls) -> StageBConfig:
        """The 700M release (``stage_b_lite.safetensors``)."""
        return cls(c_hidden=(320, 576, 1152, 1152), nhead=(0, 0, 18, 18), blocks=((2, 4, 14, 4), (4, 14, 4, 2)),
                   block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)))

    @classmethod
    def tiny(cls) -> StageBConfig:
        """A small variant with the release's key layout and level structure, for tests and demo runs."""
        return cls(c_cond=64, c_hidden=(32, 64, 64, 64), nhead=(0, 0, 1, 1), blocks=((1, 1, 1, 1), (1, 1, 1, 1)),
                   block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> StageBConfig:
        """Infer the config from original-layout keys and shapes (released sizes or any smaller variant)."""
        what = "Stage B state dict"
        if "clip_txt_mapper.weight" in sd:
            raise CheckpointError(
                f"{what}: this is a Stage C (prior) state dict (found clip_txt_mapper.weight "
                f"{tuple(sd['clip_txt_mapper.weight'].shape)}, no effnet_mapper); load it as Stage C, and pick a "
                "stage_b*.safetensors file for Stage B."
            )
        required = ["effnet_mapper.0.weight", "pixels_mapper.0.weight", "clip_mapper.weight", "embedding.1.weight",
                    "clf.1.weight"]
        unet_keys.require(sd, required, what)
        levels = unet_keys.infer_levels(sd, what)
        clip_rows, c_clip = unet_keys.shape_of(sd, "clip_mapper.weight", what, rank=2)
        c_cond = levels.c_cond if levels.c_cond is not None else clip_rows // 4
        if clip_rows % c_cond:
            raise CheckpointError(
                f"{what}: clip_mapper.weight has {clip_rows} rows, not a multiple of the attention width "
                f"c_cond={c_cond}; the file is damaged or not a Stage B."
            )
        patch = cls.patch_size
        # patch_size cannot be told apart from c_in (both set embedding's input width): the release uses 2.
        c_in_p = unet_keys.shape_of(sd, "embedding.1.weight", what, rank=4)[1]
        c_out_p = unet_keys.shape_of(sd, "clf.1.weight", what, rank=4)[0]
        if c_in_p % (patch * patch) or c_out_p % (patch * patch):
            raise CheckpointError(
                f"{what}: embedding.1.weight takes {c_in_p} channels and clf.1.weight gives {c_out_p}; with the "
                f"release's patch size {patch} both must be multiples of {patch * patch}."
            )
        config = cls(
            **levels.config_fields(),
            c_in=c_in_p // (patch * patch),
            c_out=c_out_p // (patch * patch),
            c_cond=c_cond,
            c_clip=c_clip,
            c_clip_seq=clip_rows // c_cond,
            c_effnet=unet_keys.shape_of(sd, "effnet_mapper.0.weight", what, rank=4)[1],
            c_pixels=unet_keys.shape_of(sd, "pixels_mapper.0.weight", what, rank=4)[1],
            dropout=tuple(0.1 if "A" in lc else 0.0 for lc in levels.level_config),
        )
        for c, lc in zip(config.c_hidden, config.level_config):
            if "A" in lc and c % unet_keys.HEAD_DIM:
                log.warning("ComfyUI-StableCascade: Stage B width %d is not a multiple of 64; assuming 1 head.", c)
        unet_keys.check_against(StageB, config, sd, what)
        return config


def _mapper(c_in: int, c: int, dtype: Any, device: Any, ops: Any) -> nn.Sequential:
    """Conv1x1(c_in -> 4c) -> GELU -> Conv1x1(4c -> c) -> LN2d (keys ``0`` and ``2``)."""
    return nn.Sequential(
        ops.Conv2d(c_in, c * 4, kernel_size=1, dtype=dtype, device=device),
        nn.GELU(),
        ops.Conv2d(c * 4, c, kernel_size=1, dtype=dtype, device=device),
        LayerNorm2d(),
    )


def _run_mapper(mapper: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = mapper[0](to_channels_last(x))
    h = torch.ops.aten.gelu_(h)
    return layer_norm_2d(mapper[2](h))


class StageB(UNetCore):
    """Stage B U-Net: predicts the noise of a (B, 4, H/4, W/4) Stage A latent given the Stage C latent.

    Parameters:
        config (`StageBConfig`): hyper-parameters (``StageBConfig.big()``, ``.lite()``, ``.from_state_dict(sd)``).
        dtype (`torch.dtype`, *optional*): parameter dtype.
        device (`torch.device` or `str`, *optional*): parameter device; ``"meta"`` builds without memory so a
            loader can ``load_state_dict(sd, assign=True)``.
        operations (namespace, *optional*): provides ``Linear``, ``Conv2d``, ``ConvTranspose2d``
            (default ``torch.nn``).
    """

    def __init__(self, config: StageBConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = None) -> None:
        super().__init__()
        ops = resolve_ops(operations)
        self.config = cfg = config
        c0 = cfg.c_hidden[0]
        self.effnet_mapper = _mapper(cfg.c_effnet, c0, dtype, device, ops)
        self.pixels_mapper = _mapper(cfg.c_pixels, c0, dtype, device, ops)
        self.clip_mapper = ops.Linear(cfg.c_clip, cfg.c_cond * cfg.c_clip_seq, dtype=dtype, device=device)
        self.embedding = self._make_embedding(cfg, dtype, device, ops)

        def downscaler(i: int) -> nn.Module:
            c_prev, c = cfg.c_hidden[i - 1], cfg.c_hidden[i]
            conv = ops.Conv2d(c_prev, c, kernel_size=2, stride=2, dtype=dtype, device=device)
            return nn.Sequential(LayerNorm2d(), conv)

        def upscaler(i: int) -> nn.Module:
            conv = ops.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2, stride=2, dtype=dtype,
                                       device=device)
            return nn.Sequential(LayerNorm2d(), conv)

        self._build_levels(cfg, downscaler, upscaler, dtype, device, ops)
        self.clf = self._make_clf(cfg, dtype, device, ops)
        # Inference network: start in eval mode (dropout off, in-place fast paths on); .train() still works.
        self.eval()

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor,
                pixels: torch.Tensor | None = None, sca: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise.

        Parameters:
            x (`torch.Tensor`): noisy latent (B, 4, h, w), official scale (Stage A encoder / 0.43); h, w even.
            r (`torch.Tensor`): noise level (B,) in [0, 1].
            effnet (`torch.Tensor`): Stage C latent (B or 1, 16, h_c, w_c); resized to the embedded size.
            clip (`torch.Tensor`): pooled text (B, 1, 1280) or (B, 1280).
            pixels (`torch.Tensor`, *optional*): low-resolution RGB hint (B, 3, h_p, w_p); zeros (8x8) by default.
            sca (`torch.Tensor`, *optional*): extra condition of the release, 0 when not given.

        Returns:
            `torch.Tensor`: predicted noise, shape and dtype of ``x``.
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.c_in or x.shape[-1] % cfg.patch_size or x.shape[-2] % cfg.patch_size:
            raise ShapeError(
                f"Stage B expects a latent (B, {cfg.c_in}, h, w) with even h and w, got {tuple(x.shape)}; a "
                "16-channel latent is a Stage C latent (connect it to the effnet input), and odd sizes come from "
                "widths/heights that are not multiples of 8."
            )
        if effnet.dim() != 4 or effnet.shape[1] != cfg.c_effnet or effnet.shape[0] not in (1, x.shape[0]):
            raise ShapeError(
                f"Stage B effnet conditioning must be (B or 1, {cfg.c_effnet}, h_c, w_c) with B={x.shape[0]}, got "
                f"{tuple(effnet.shape)}; connect the Stage C latent (16 channels) with the same batch size."
            )
        dtype = x.dtype
        if pixels is None:
            pixels = x.new_zeros(x.shape[0], cfg.c_pixels, 8, 8)
        extra = {"sca": sca}
        embs = [timestep_embedding(r, cfg.c_r)]
        for name in cfg.t_conds:
            cond = extra.get(name)
            embs.append(timestep_embedding(torch.zeros_like(r) if cond is None else cond, cfg.c_r))
        r_embed = torch.cat(embs, dim=1).to(dtype)
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        kv = self.clip_mapper(clip.to(dtype)).view(clip.shape[0], clip.shape[1] * cfg.c_clip_seq, -1)
        kv = F.layer_norm(kv, (kv.shape[-1],), eps=LN_EPS)

        h = self.embedding[0](x)
        h = layer_norm_2d(self.embedding[1](to_channels_last(h)))
        size = h.shape[-2:]
        # The original casts effnet to float32 before resizing (autocast leftover); here it follows x's dtype.
        h = h.add_(_run_mapper(self.effnet_mapper, resize_like(effnet.to(dtype), size)))
        h = h.add_(resize_like(_run_mapper(self.pixels_mapper, pixels.to(dtype)), size))
        res_scale = self._residual_scale(dtype)
        if res_scale is None:
            h = self._run_unet(h, r_embed, kv)
            h = self.clf[1](layer_norm_2d(h))
        else:
            # fp16 mode (docs/FP16.md): the stream runs at res_scale; clf's LayerNorm (eps * s^2) undoes it.
            h = self._run_unet(h.mul_(res_scale), r_embed, kv, res_scale=res_scale)
            h = self.clf[1](layer_norm_2d(h, LN_EPS * res_scale * res_scale))
        return self.clf[2](h).contiguous()
