"""Stage runners: one call samples Stage C or Stage B from core-format CONDITIONING and a latent.

Each runner checks its inputs, loads the network through ``host`` with an activation-memory estimate,
builds the GDF schedule (``t_start = denoise``), draws the initial noise from the seed as ComfyUI does,
runs the chosen sampler under classifier-free guidance, reports progress (with Previewer images for
Stage C), checks for interruption every step, and returns the last predicted x0 (the official output).

CONDITIONING is core's format ``[[cond (B, T, C), {"pooled_output": (B, C), ...}]]``; extra keys are
ignored except the image embedding of Stage C (see ``clip_image_embeds``) and, for Stage B, core's
``"stable_cascade_prior"`` when no Stage C latent is passed. Stage B latents are in core's ``SC_B``
storage (official x 0.43): they are divided by 0.43 going in and multiplied coming out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .. import host
from ..cascade.errors import CascadeError, ShapeError, StageMismatchError
from ..cascade.stage_a import SCALE_FACTOR
from ..model_patches import controlnet as controlnets
from . import img2img, schedule
from .guidance import CFGDenoiser
from .noise import make_noise_sampler, prepare_noise
from .sampling import SAMPLERS, add_noise

log = logging.getLogger(__name__)

CLIP_IMG_KEY = "scw_clip_img"
C_DEFAULTS = {"steps": 20, "cfg": 4.0, "shift": 2.0, "sampler": "ddpm", "rescale": 0.7}
B_DEFAULTS = {"steps": 10, "cfg": 1.1, "shift": 1.0, "sampler": "ddpm", "rescale": 0.0}
# Pixels per Stage C cell that Stage B accepts (trained on 32-64; the official 42.67; EmptyLatent allows 16-64).
_COMPRESSION_RANGE = (12.0, 80.0)


# ----------------------------------------------------------------------------- memory estimates


def _elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _unet_activation_elements(c_hidden, nhead, tokens0: int, kv_tokens: int) -> int:
    """Peak live activation elements of one sample through a Stage B/C U-Net.

    Per level: the block input, its norm, the 4x-wide channel MLP and q/k/v (about 16 x tokens x width),
    plus attention scores (heads x tokens x (tokens + kv)) where the level attends; the skips of every
    level stay alive on the way up.
    """
    peak, skips = 0, 0
    for level, (c, heads) in enumerate(zip(c_hidden, nhead)):
        tokens = max(1, tokens0 // (4**level))
        level_peak = 16 * tokens * c + 3 * kv_tokens * c
        if heads:
            level_peak += heads * tokens * (tokens + kv_tokens)
        peak = max(peak, level_peak)
        skips += 2 * tokens * c
    return peak + skips


def estimate_stage_c_memory(config: Any, shape: tuple[int, ...], dtype: torch.dtype, guided: bool,
                            text_tokens: int = 77, image_tokens: int = 1) -> int:
    """Activation bytes of one Stage C call on a (B, 16, h, w) latent; ``guided`` doubles the batch (CFG).

    An upper-bound style estimate from layer widths (not a measurement), used as ``memory_required``.
    """
    bsz, _, h, w = (int(s) for s in shape)
    kv = text_tokens + config.c_clip_seq * (1 + image_tokens)
    tokens = (h // config.patch_size) * (w // config.patch_size)
    per_sample = _unet_activation_elements(config.c_hidden, config.nhead, tokens, kv) + kv * config.c_cond
    return per_sample * bsz * (2 if guided else 1) * _elt(dtype)


def estimate_stage_b_memory(config: Any, shape: tuple[int, ...], dtype: torch.dtype, guided: bool) -> int:
    """Activation bytes of one Stage B call on a (B, 4, h, w) latent; ``guided`` doubles the batch (CFG)."""
    bsz, _, h, w = (int(s) for s in shape)
    tokens = (h // config.patch_size) * (w // config.patch_size)
    per_sample = _unet_activation_elements(config.c_hidden, config.nhead, tokens, config.c_clip_seq)
    return per_sample * bsz * (2 if guided else 1) * _elt(dtype)


# ----------------------------------------------------------------------------- input checks


def _samples(latent: Any, stage: str, what: str) -> torch.Tensor:
    """The tensor of a LATENT dict or a tensor, checked to be a 4-D, finite latent of ``stage``."""
    tagged = None
    if isinstance(latent, dict):
        tagged = latent.get("scw_stage")
        latent = latent.get("samples")
    if not isinstance(latent, torch.Tensor):
        raise CascadeError(f"{what}: expected a LATENT (a tensor or a dict with 'samples'), got "
                           f"{type(latent).__name__} - connect a LATENT output such as SCW_EmptyLatent's")
    want = 16 if stage == "c" else 4
    other = "b" if stage == "c" else "c"
    if tagged == other or latent.ndim != 4 or latent.shape[1] != want:
        found = {16: "a Stage C latent (16 channels)", 4: "a Stage B latent (4 channels)"}.get(
            latent.shape[1] if latent.ndim == 4 else -1, "a tensor")
        raise StageMismatchError(
            f"{what}: got {found} of shape {tuple(latent.shape)}; Stage {stage.upper()} needs B x {want} x h x w - "
            f"connect the stage_{stage} output of SCW_EmptyLatent (or of the Stage {stage.upper()} sampler)")
    if not torch.isfinite(latent).all():
        bad = int((~torch.isfinite(latent)).sum())
        raise CascadeError(f"{what}: the latent holds {bad} NaN/inf values (shape {tuple(latent.shape)}) - the "
                           "node that made it failed numerically (fp16 overflow?); use bf16 or fp32 weights")
    return latent


def _network(handle: Any, stage: str) -> torch.nn.Module:
    kind = getattr(handle, "kind", None)
    module = host.module_of(handle)
    config = getattr(module, "config", None)
    want_in = 16 if stage == "c" else 4
    if (kind is not None and kind != f"stage_{stage}") or getattr(config, "c_in", want_in) != want_in:
        raise StageMismatchError(
            f"the Stage {stage.upper()} sampler got a {kind or type(module).__name__} network "
            f"(c_in={getattr(config, 'c_in', '?')}); connect a Stage {stage.upper()} model "
            f"(SCW_Stage{stage.upper()}Loader)")
    return module


def _entry(conditioning: Any, what: str) -> tuple[torch.Tensor, dict]:
    """The one [cond, extras] entry of a CONDITIONING list."""
    if (not isinstance(conditioning, (list, tuple)) or not conditioning
            or not isinstance(conditioning[0], (list, tuple)) or len(conditioning[0]) < 2):
        raise CascadeError(f"{what}: expected CONDITIONING [[cond, {{'pooled_output': ...}}]], got "
                           f"{type(conditioning).__name__} - connect SCW_TextEncode or core's CLIPTextEncode")
    if len(conditioning) > 1:
        raise CascadeError(f"{what}: CONDITIONING has {len(conditioning)} entries; the SCW samplers read one - "
                           "merge them with ConditioningConcat or ConditioningAverage first")
    cond, extras = conditioning[0][0], conditioning[0][1]
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or not isinstance(extras, dict):
        raise CascadeError(f"{what}: the conditioning tensor must be (B, tokens, width), got "
                           f"{getattr(cond, 'shape', type(cond).__name__)}")
    return cond, extras


def _pooled(extras: dict, cond: torch.Tensor, what: str) -> torch.Tensor:
    pooled = extras.get("pooled_output")
    if not isinstance(pooled, torch.Tensor):
        raise CascadeError(f"{what}: CONDITIONING has no 'pooled_output' - encode the prompt with SCW_TextEncode "
                           "or core's CLIPTextEncode with a stable_cascade CLIP (which give pooled outputs)")
    pooled = pooled.unsqueeze(1) if pooled.ndim == 2 else pooled
    if pooled.ndim != 3 or pooled.shape[0] != cond.shape[0]:
        raise ShapeError(f"{what}: pooled_output has shape {tuple(pooled.shape)}; expected ({cond.shape[0]}, "
                         f"{pooled.shape[-1]}) to match the conditioning {tuple(cond.shape)}")
    return pooled


def _has_image(extras: dict) -> bool:
    return extras.get(CLIP_IMG_KEY) is not None or bool(extras.get("unclip_conditioning"))


def clip_image_embeds(extras: dict, batch: int, width: int) -> torch.Tensor:
    """Stage C's image embedding (B, N, 768): the pack's ``"scw_clip_img"`` entry, else core's
    ``"unclip_conditioning"`` (image_embeds x strength per entry, concatenated as tokens), else zeros."""
    value = extras.get(CLIP_IMG_KEY)
    if value is None and extras.get("unclip_conditioning"):
        value = torch.cat([u["clip_vision_output"].image_embeds.unsqueeze(1) * float(u.get("strength", 1.0))
                           for u in extras["unclip_conditioning"]], dim=1)
    if value is None:
        return torch.zeros(batch, 1, width)
    value = value.unsqueeze(1) if value.ndim == 2 else value
    if value.ndim != 3 or value.shape[-1] != width:
        raise ShapeError(f"Stage C image embedding has shape {tuple(value.shape)}; expected (B, N, {width}) from "
                         "CLIP ViT-L/14 (SCW_ClipVisionEncode)")
    return value


def _to_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ShapeError(f"{what} has batch {t.shape[0]} but the latent has batch {batch}; give one conditioning for "
                     "all images (batch 1) or one per image")


def _match_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat token sequences to a common length (as core does for prompts of different lengths)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)


def _check_width(t: torch.Tensor, want: int, what: str) -> None:
    if t.shape[-1] != want:
        raise ShapeError(f"{what} has width {t.shape[-1]} but the network expects {want} - use the text encoder "
                         "that belongs to this model (CLIP ViT-bigG, 1280 wide)")


def _check_schedule(steps: int, denoise: float, sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise CascadeError(f"sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    if int(steps) < 1 or not 0.0 < float(denoise) <= 1.0:
        raise CascadeError(f"steps={steps}, denoise={denoise}: need steps >= 1 and 0 < denoise <= 1")


def check_pair(stage_c: torch.Tensor, stage_b: torch.Tensor) -> None:
    """Raise when a Stage C latent and a Stage B latent cannot belong to the same image."""
    (bc, _, hc, wc), (bb, _, hb, wb) = stage_c.shape, stage_b.shape
    comp_h, comp_w = 4 * hb / hc, 4 * wb / wc
    lo, hi = _COMPRESSION_RANGE
    if bc not in (1, bb):
        raise ShapeError(f"the Stage C latent has batch {bc} and the Stage B latent batch {bb}; make them equal")
    if not (lo <= comp_h <= hi and lo <= comp_w <= hi) or max(comp_h, comp_w) > 1.35 * min(comp_h, comp_w):
        raise ShapeError(
            f"the Stage C latent {hc}x{wc} and the Stage B latent {hb}x{wb} do not belong to one image "
            f"({comp_h:.1f} x {comp_w:.1f} pixels per Stage C cell; expected {lo:g}-{hi:g}, the same both ways) - "
            "take both from one SCW_EmptyLatent (same width, height)")


# ----------------------------------------------------------------------------- shared sampling core


def initial_state(x0: torch.Tensor, noise: torch.Tensor, logsnrs: torch.Tensor, denoise: float,
                  variant: str = "consistent") -> torch.Tensor:
    """The sampler's starting x: pure noise at denoise 1, else the input diffused to t_start.

    ``"consistent"`` diffuses to the sampler's own first logSNR (same shift). ``"official"`` is the
    notebooks' image-to-image recipe, which diffuses with shift 1 at t_start (under-noising for shift 2).
    """
    if denoise >= 1.0:
        return noise
    if variant == "consistent":
        return add_noise(x0, noise, logsnrs[0])
    # The official rule (and the error for an unknown mode) lives in img2img, shared with its nodes.
    return img2img.noise_latent(x0, noise, float(denoise), variant)


def _device(handle: Any, module: torch.nn.Module) -> torch.device:
    """Where the network computes: its patcher's load device (in low-VRAM mode some weights stay offloaded)."""
    patcher = getattr(handle, "patcher", None)
    return torch.device(patcher.load_device) if patcher is not None else next(module.parameters()).device


def _run(dev, network_fn, cond, uncond, x0_in, *, seed, steps, cfg, shift, sampler, rescale, denoise,
         batch_index, callback_extra, noising) -> tuple[torch.Tensor, torch.Tensor]:
    logsnrs = schedule.logsnr_schedule(int(steps), shift=float(shift), t_start=float(denoise)).to(dev)
    noise = prepare_noise(x0_in.float(), seed, batch_index).to(dev)
    x = initial_state(x0_in.float().to(dev), noise, logsnrs, float(denoise), noising)
    model = CFGDenoiser(network_fn, cond, uncond, cfg=cfg, rescale=rescale)
    pbar = host.progress(int(steps))

    def callback(info: dict) -> None:
        host.check_interrupt()
        preview = callback_extra(info["denoised"]) if callback_extra is not None else None
        pbar.update(info["i"] + 1, preview)

    host.check_interrupt()
    return SAMPLERS[sampler](model, x, logsnrs, callback=callback, disable=True,
                             noise_sampler=make_noise_sampler(x, seed))


def _net_fn(module: torch.nn.Module):
    """Network call in the weights' dtype; the sampler keeps its state in float32."""
    dtype = next(module.parameters()).dtype

    def network_fn(x: torch.Tensor, r: torch.Tensor, **cond: Any) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(dtype), r, **cond).float()

    return network_fn


def _cast_cond(d: dict, dev: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(dev, dtype) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- Stage C


def _r_at(position: float, shift: float) -> float:
    """The noise condition r at schedule position ``position`` (t = 1 - position), for ControlNet ranges."""
    return float(schedule.noise_cond_r(schedule.logsnr(1.0 - float(position), shift=float(shift))))


def sample_stage_c(handle: Any, positive: list, negative: list | None, latent: Any, seed: int,
                   steps: int = 20, cfg: float = 4.0, shift: float = 2.0, sampler: str = "ddpm",
                   rescale: float = 0.7, denoise: float = 1.0, previewer: Any = None,
                   batch_index: list[int] | None = None, return_state: bool = False,
                   noising: str = "consistent") -> torch.Tensor:
    """Sample a Stage C latent (B, 16, h, w); the result is the last predicted x0 (or the final state).

    ``latent`` (tensor or LATENT dict) gives the shape and, with ``denoise < 1``, the image to start from.
    ``previewer`` (a handle or module) adds a preview image of the predicted x0 to every progress update.
    """
    module = _network(handle, "c")
    samples = _samples(latent, "c", "Stage C latent")
    _check_schedule(steps, denoise, sampler)
    cfgc = module.config
    bsz = samples.shape[0]
    guided = negative is not None and float(cfg) != 1.0
    if negative is None and float(cfg) != 1.0:
        raise CascadeError(f"Stage C cfg={cfg} needs a negative CONDITIONING (an empty prompt); or set cfg to 1")

    def branch(conditioning: list, what: str) -> dict:
        cond, extras = _entry(conditioning, what)
        _check_width(cond, cfgc.c_clip_text, what)
        pooled = _pooled(extras, cond, what)
        _check_width(pooled, cfgc.c_clip_text_pooled, f"{what} pooled_output")
        img = clip_image_embeds(extras, cond.shape[0], cfgc.c_clip_img)
        return {"clip_text": _to_batch(cond, bsz, what), "clip_text_pooled": _to_batch(pooled, bsz, what),
                "clip_img": _to_batch(img, bsz, f"{what} image embedding")}

    cond = branch(positive, "Stage C positive")
    uncond = branch(negative, "Stage C negative") if guided else None
    if uncond is not None:
        cond["clip_text"], uncond["clip_text"] = _match_tokens(cond["clip_text"], uncond["clip_text"])
        if not _has_image(_entry(negative, "Stage C negative")[1]):
            # Official variations: the unconditional branch sees zero image embeddings (as many as the positive).
            uncond["clip_img"] = torch.zeros_like(cond["clip_img"])
    dtype = next(module.parameters()).dtype
    memory = estimate_stage_c_memory(cfgc, tuple(samples.shape), dtype, guided,
                                     text_tokens=cond["clip_text"].shape[1], image_tokens=cond["clip_img"].shape[1])
    prev_module = host.module_of(previewer) if previewer is not None else None

    def preview(x0: torch.Tensor) -> torch.Tensor:
        dtype = next(prev_module.parameters()).dtype
        with torch.no_grad():
            return prev_module(x0[:1].to(_device(previewer, prev_module), dtype)).float()

    handles = [handle, previewer] if isinstance(previewer, host.ModelHandle) else [handle]
    # ControlNets applied to this Stage C handle (model_patches.controlnet) load and run with it.
    controls = controlnets.controls_of(handle)
    handles += controlnets.control_handles(controls)
    memory += controlnets.estimate_memory(controls)
    with host.using([h for h in handles if isinstance(h, host.ModelHandle)], memory):
        dev = _device(handle, module)
        cond = _cast_cond(cond, dev, dtype)
        uncond = _cast_cond(uncond, dev, dtype) if uncond is not None else None
        network_fn = controlnets.controlled(_net_fn(module), controls, handle, lambda p: _r_at(p, shift),
                                            samples.shape)
        x, x0 = _run(dev, network_fn, cond, uncond, samples, seed=seed, steps=steps, cfg=cfg, shift=shift,
                     sampler=sampler, rescale=rescale, denoise=denoise, batch_index=batch_index,
                     callback_extra=preview if prev_module is not None else None, noising=noising)
    return (x if return_state else x0).to(host.intermediate_device())


# ----------------------------------------------------------------------------- Stage B


def sample_stage_b(handle: Any, positive: list, negative: list | None, stage_c_latent: Any, latent: Any,
                   seed: int, steps: int = 10, cfg: float = 1.1, shift: float = 1.0, sampler: str = "ddpm",
                   rescale: float = 0.0, denoise: float = 1.0, batch_index: list[int] | None = None,
                   return_state: bool = False, noising: str = "consistent") -> torch.Tensor:
    """Sample a Stage B latent (B, 4, h, w) in core's SC_B storage (official latent x 0.43).

    ``stage_c_latent`` conditions it (None: core's ``"stable_cascade_prior"`` from ``positive``); the
    unconditional branch sees zeros for it and the negative prompt's pooled text, as in the official code.
    """
    module = _network(handle, "b")
    samples = _samples(latent, "b", "Stage B latent")
    _check_schedule(steps, denoise, sampler)
    cfgb = module.config
    bsz = samples.shape[0]
    cond_text, extras = _entry(positive, "Stage B positive")
    if stage_c_latent is None:
        stage_c_latent = extras.get("stable_cascade_prior")
        if stage_c_latent is None:
            raise CascadeError("Stage B needs the Stage C result: connect the stage_c input (or core's "
                               "StableCascade_StageB_Conditioning on the positive prompt)")
    effnet = _samples(stage_c_latent, "c", "Stage B stage_c (Stage C latent)")
    check_pair(effnet, samples)
    guided = negative is not None and float(cfg) != 1.0
    if negative is None and float(cfg) != 1.0:
        raise CascadeError(f"Stage B cfg={cfg} needs a negative CONDITIONING (an empty prompt); or set cfg to 1")
    pooled = _pooled(extras, cond_text, "Stage B positive")
    _check_width(pooled, cfgb.c_clip, "Stage B positive pooled_output")
    effnet = _to_batch(effnet, bsz, "Stage B stage_c latent")
    cond = {"effnet": effnet, "clip": _to_batch(pooled, bsz, "Stage B positive")}
    uncond = None
    if guided:
        neg_text, neg_extras = _entry(negative, "Stage B negative")
        neg_pooled = _pooled(neg_extras, neg_text, "Stage B negative")
        _check_width(neg_pooled, cfgb.c_clip, "Stage B negative pooled_output")
        uncond = {"effnet": torch.zeros_like(effnet), "clip": _to_batch(neg_pooled, bsz, "Stage B negative")}
    dtype = next(module.parameters()).dtype
    memory = estimate_stage_b_memory(cfgb, tuple(samples.shape), dtype, guided)
    with host.using([handle] if isinstance(handle, host.ModelHandle) else [], memory):
        dev = _device(handle, module)
        cond = _cast_cond(cond, dev, dtype)
        uncond = _cast_cond(uncond, dev, dtype) if uncond is not None else None
        x, x0 = _run(dev, _net_fn(module), cond, uncond, samples / SCALE_FACTOR, seed=seed, steps=steps, cfg=cfg,
                     shift=shift, sampler=sampler, rescale=rescale, denoise=denoise, batch_index=batch_index,
                     callback_extra=None, noising=noising)
    return ((x if return_state else x0) * SCALE_FACTOR).to(host.intermediate_device())
