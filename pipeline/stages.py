"""Stage runners: one call samples Stage C or Stage B from core-format CONDITIONING and a LATENT.

Each runner checks its inputs once, loads the network (and whatever rides on its handle, e.g. ControlNets)
through ``host.using`` with an activation-memory estimate, builds the GDF schedule (``t_start = denoise``),
draws the initial noise from the seed as ComfyUI does, runs the chosen sampler of ``samplers`` on the chosen
scheduler's logSNRs (``official``: GDF's, the default) under
classifier-free guidance, reports progress (with Previewer images for Stage C), checks for interruption
every step, and returns the last predicted x0 (the official output). Stage B latents are in core's ``SC_B``
storage (official x 0.43): they are divided by 0.43 going in and multiplied coming out.

Settings are checked against ``settings.SETTING_RANGES`` (the nodes' ranges; NaN refused), conditioning must be
finite, and the first step whose prediction holds NaN/inf stops the run with an error naming the stage, the
step, the weights' dtype and the fix for that dtype (fp16: bf16/fp32; otherwise the weights file itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import host
from ..cascade.errors import CascadeError, StageMismatchError
from ..cascade.stage_a import SCALE_FACTOR
from ..samplers import img2img, schedule
from ..samplers.guidance import CFGDenoiser
from ..samplers.noise import make_noise_sampler, prepare_noise
from ..samplers.sampling import SAMPLERS, add_noise, sampler_schedule
from . import conditioning as cond_io
from .latents import batch_index as batch_index_of
from .latents import check_pair, dtype_name, finite_output, latent_samples, nonfinite_fix
from .memory import estimate_stage_b_memory, estimate_stage_c_memory
from .settings import STAGE_B, STAGE_C, SamplingSettings

log = logging.getLogger(__name__)


def _network(handle: Any, stage: str) -> torch.nn.Module:
    kind = getattr(handle, "kind", None)
    module = host.module_of(handle)
    config = getattr(module, "config", None)
    want_in = 16 if stage == "c" else 4
    if (kind is not None and kind != f"stage_{stage}") or getattr(config, "c_in", want_in) != want_in:
        raise StageMismatchError(
            f"the Stage {stage.upper()} sampler got a {kind or type(module).__name__} network "
            f"(c_in={getattr(config, 'c_in', '?')}); connect a Stage {stage.upper()} model "
            f"('Stable Cascade Load Stage {stage.upper()}')")
    return module


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


def _run(dev: torch.device, network_fn: Callable[..., torch.Tensor], cond: dict, uncond: dict | None,
         x0_in: torch.Tensor, settings: SamplingSettings, seed: int, batch_index: list[int] | None,
         preview: Callable[[torch.Tensor], torch.Tensor] | None, stage: str,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s = settings
    logsnrs = sampler_schedule(s.sampler, s.scheduler, int(s.steps), float(s.shift), float(s.denoise)).to(dev)
    noise = prepare_noise(x0_in.float(), seed, batch_index).to(dev)
    x = initial_state(x0_in.float().to(dev), noise, logsnrs, float(s.denoise), s.noising)
    model = CFGDenoiser(network_fn, cond, uncond, cfg=s.cfg, rescale=s.rescale)
    pbar = host.progress(int(s.steps))

    def callback(info: dict) -> None:
        host.check_interrupt()
        # Stop at the first step whose prediction is not finite: every later step would only carry the NaN on,
        # and the step number tells a NaN from the first call (weights) from a late overflow (fp16).
        if not torch.isfinite(info["denoised"]).all():
            _nonfinite_step(stage, info["i"], int(s.steps), dtype)
        pbar.update(info["i"] + 1, preview(info["denoised"]) if preview is not None else None)

    host.check_interrupt()
    x, x0 = SAMPLERS[s.sampler](model, x, logsnrs, callback=callback, disable=True,
                                noise_sampler=make_noise_sampler(x, seed))
    what = f"the Stage {stage} sampler's output"
    return finite_output(x, what, dtype), finite_output(x0, what, dtype)


def _nonfinite_step(stage: str, i: int, steps: int, dtype: torch.dtype) -> None:
    raise CascadeError(
        f"the Stage {stage} sampler: the network's prediction at step {i + 1} of {steps} holds NaN/inf values "
        f"(Stage {stage} weights {dtype_name(dtype)}; its inputs were finite) - {nonfinite_fix(dtype)}")


def _check_finite_inputs(branches: dict[str, dict | None], stage: str) -> None:
    """Conditioning with NaN/inf would come out as a NaN latent blamed on the weights; name it instead."""
    for branch, tensors in branches.items():
        for key, value in (tensors or {}).items():
            if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise CascadeError(
                    f"the Stage {stage} sampler: the {branch} {key} ({tuple(value.shape)}) holds {bad} NaN/inf "
                    "values - the node that made it (a text or image encoder, or a conditioning node) failed "
                    "numerically; its weights file may hold NaN values: download it again or check it")


def _net_fn(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """Network call in the weights' dtype; the sampler keeps its state in float32."""
    dtype = next(module.parameters()).dtype

    def network_fn(x: torch.Tensor, r: torch.Tensor, **cond: Any) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(dtype), r, **cond).float()

    return network_fn


def _cast_cond(d: dict | None, dev: torch.device, dtype: torch.dtype) -> dict | None:
    if d is None:
        return None
    return {k: v.to(dev, dtype) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _require_negative(negative: Any, settings: SamplingSettings, stage: str) -> None:
    if negative is None and settings.guided:
        raise CascadeError(f"Stage {stage} cfg={settings.cfg} needs a negative CONDITIONING (an empty prompt); "
                           "or set cfg to 1")


# ----------------------------------------------------------------------------- Stage C


def r_at(position: float, shift: float) -> float:
    """The noise condition r at schedule position ``position`` (t = 1 - position), for ControlNet ranges."""
    return float(schedule.noise_cond_r(schedule.logsnr(1.0 - float(position), shift=float(shift))))


def _stage_c_branches(config: Any, positive: list, negative: list | None, bsz: int,
                      guided: bool) -> tuple[dict, dict | None]:
    def branch(conditioning: list, what: str) -> dict:
        cond, extras = cond_io.entry(conditioning, what)
        cond_io.check_width(cond, config.c_clip_text, what)
        pooled = cond_io.pooled_of(extras, cond, what)
        cond_io.check_width(pooled, config.c_clip_text_pooled, f"{what} pooled_output")
        img = cond_io.clip_image_embeds(extras, cond.shape[0], config.c_clip_img)
        return {"clip_text": cond_io.to_batch(cond, bsz, what), "clip_text_pooled": cond_io.to_batch(pooled, bsz, what),
                "clip_img": cond_io.to_batch(img, bsz, f"{what} image embedding")}

    cond = branch(positive, "Stage C positive")
    uncond = branch(negative, "Stage C negative") if guided else None
    if uncond is not None:
        cond["clip_text"], uncond["clip_text"] = cond_io.match_tokens(cond["clip_text"], uncond["clip_text"])
        if not cond_io.has_image(cond_io.entry(negative, "Stage C negative")[1]):
            # Official variations: the unconditional branch sees zero image embeddings (as many as the positive).
            uncond["clip_img"] = torch.zeros_like(cond["clip_img"])
    return cond, uncond


def sample_stage_c(handle: Any, positive: list, negative: list | None, latent: Any,
                   settings: SamplingSettings = STAGE_C, seed: int = 0, previewer: Any = None,
                   batch_index: list[int] | None = None, return_state: bool = False) -> torch.Tensor:
    """Sample a Stage C latent (B, 16, h, w); the result is the last predicted x0 (or the final state).

    ``latent`` (a LATENT dict or a tensor) gives the shape and, with ``denoise < 1``, the image to start from;
    its ``batch_index`` is used unless one is given. ``previewer`` (a handle or module) adds a preview
    image of the predicted x0 to every progress update.
    """
    module = _network(handle, "c")
    samples = latent_samples(latent, "c", "Stage C latent")
    settings.check("the Stage C sampler")
    batch_index = batch_index if batch_index is not None else batch_index_of(latent)
    _require_negative(negative, settings, "C")
    config = module.config
    guided = negative is not None and settings.guided
    cond, uncond = _stage_c_branches(config, positive, negative, samples.shape[0], guided)
    _check_finite_inputs({"positive": cond, "negative": uncond}, "C")
    dtype = next(module.parameters()).dtype
    memory = estimate_stage_c_memory(config, tuple(samples.shape), dtype, guided,
                                     text_tokens=cond["clip_text"].shape[1], image_tokens=cond["clip_img"].shape[1])
    prev_module = host.module_of(previewer) if previewer is not None else None

    def preview(x0: torch.Tensor) -> torch.Tensor:
        prev_dtype = next(prev_module.parameters()).dtype
        with torch.no_grad():
            image = prev_module(x0[:1].to(_device(previewer, prev_module), prev_dtype)).float()
        # A finite latent whose preview is NaN: the Previewer is broken, and a black preview would hide it.
        return finite_output(image, "the Previewer's live preview (of a finite Stage C latent)", prev_dtype)

    handles = [handle, previewer] if isinstance(previewer, host.ModelHandle) else [handle]
    if isinstance(handle, host.ModelHandle):
        # Whatever rides on the handle (ControlNets) loads and runs with it.
        handles += handle.attachment_handles()
        memory += handle.attachment_memory()
    with host.using([h for h in handles if isinstance(h, host.ModelHandle)], memory):
        dev = _device(handle, module)
        network_fn = _net_fn(module)
        if isinstance(handle, host.ModelHandle):
            network_fn = handle.wrap_network(network_fn, {
                "r_at": lambda p: r_at(p, settings.shift), "latent_shape": tuple(samples.shape)})
        x, x0 = _run(dev, network_fn, _cast_cond(cond, dev, dtype), _cast_cond(uncond, dev, dtype), samples,
                     settings, seed, batch_index, preview if prev_module is not None else None, "C", dtype)
    return (x if return_state else x0).to(host.intermediate_device())


# ----------------------------------------------------------------------------- Stage B


def sample_stage_b(handle: Any, positive: list, negative: list | None, stage_c_latent: Any, latent: Any,
                   settings: SamplingSettings = STAGE_B, seed: int = 0, batch_index: list[int] | None = None,
                   return_state: bool = False) -> torch.Tensor:
    """Sample a Stage B latent (B, 4, h, w) in core's SC_B storage (official latent x 0.43).

    ``stage_c_latent`` conditions it (None: core's ``"stable_cascade_prior"`` from ``positive``); the
    unconditional branch sees zeros for it and the negative prompt's pooled text, as in the official code.
    """
    module = _network(handle, "b")
    samples = latent_samples(latent, "b", "Stage B latent")
    settings.check("the Stage B sampler")
    batch_index = batch_index if batch_index is not None else batch_index_of(latent)
    config = module.config
    bsz = samples.shape[0]
    cond_text, extras = cond_io.entry(positive, "Stage B positive")
    if stage_c_latent is None:
        stage_c_latent = extras.get("stable_cascade_prior")
        if stage_c_latent is None:
            raise CascadeError("Stage B needs the Stage C result: connect the stage_c input (or core's "
                               "StableCascade_StageB_Conditioning on the positive prompt)")
    effnet = latent_samples(stage_c_latent, "c", "Stage B stage_c (Stage C latent)")
    check_pair(effnet, samples)
    _require_negative(negative, settings, "B")
    guided = negative is not None and settings.guided
    pooled = cond_io.pooled_of(extras, cond_text, "Stage B positive")
    cond_io.check_width(pooled, config.c_clip, "Stage B positive pooled_output")
    effnet = cond_io.to_batch(effnet, bsz, "Stage B stage_c latent")
    cond = {"effnet": effnet, "clip": cond_io.to_batch(pooled, bsz, "Stage B positive")}
    uncond = None
    if guided:
        neg_text, neg_extras = cond_io.entry(negative, "Stage B negative")
        neg_pooled = cond_io.pooled_of(neg_extras, neg_text, "Stage B negative")
        cond_io.check_width(neg_pooled, config.c_clip, "Stage B negative pooled_output")
        uncond = {"effnet": torch.zeros_like(effnet), "clip": cond_io.to_batch(neg_pooled, bsz, "Stage B negative")}
    _check_finite_inputs({"positive": cond, "negative": uncond}, "B")
    dtype = next(module.parameters()).dtype
    memory = estimate_stage_b_memory(config, tuple(samples.shape), dtype, guided)
    with host.using([handle] if isinstance(handle, host.ModelHandle) else [], memory):
        dev = _device(handle, module)
        x, x0 = _run(dev, _net_fn(module), _cast_cond(cond, dev, dtype), _cast_cond(uncond, dev, dtype),
                     samples / SCALE_FACTOR, settings, seed, batch_index, None, "B", dtype)
    return ((x if return_state else x0) * SCALE_FACTOR).to(host.intermediate_device())
