"""``train(...)``: the training loop (SPEC §14): AdamW, linear warmup, gradient clipping, accumulation, seeds,
resume, a NaN stop, interrupts between steps, previews, and DistributedDataParallel under ``torchrun``.

Randomness: the epoch order comes from a generator seeded by (seed, epoch); each micro-batch's t, noise,
caption dropout and image-embedding choice from a generator seeded by (seed, micro-batch index), drawn for the
whole batch. So a resumed run (which replays the index lists up to its step) draws exactly what the uninterrupted
run draws, and every process of a distributed run draws the same and takes its own slice of the batch.

Distributed: when ``torch.distributed`` is initialised, the trainable tensors are wrapped in
``DistributedDataParallel``; each rank computes ``sum of its samples' weighted losses * world / batch``, so the
averaged gradient is exactly the gradient of the whole batch's mean; per-sample losses are summed over the
ranks for the log and the adaptive buckets. Rank 0 alone previews and calls ``on_save``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from .. import host
from ..pipeline.memory import estimate_stage_c_memory
from ..samplers import schedule
from . import state as state_io
from .cache import TrainingCache
from .distributed import init_from_env
from .errors import TrainingInputError, TrainingOutOfMemory
from .forward import StageCForward, weight_source
from .lora import StageCLora, check_resume_shapes
from .objective import AdaptiveLossWeight, diffusion_loss, loss_weights, sample_t
from .preview import preview_image
from .settings import RESUME_FIXED, TrainSettings, training_dtype
from .tokens import LearnedTokens, parse_train_tokens

log = logging.getLogger(__name__)

__all__ = ["TrainSettings", "TrainResult", "train", "save_state", "load_state"]

load_state = state_io.load_state


def save_state(path: str, result: TrainResult | dict) -> str | None:
    """Write a run's resume state (a ``TrainResult`` or its ``.state``) to ``path``; rank 0 only under DDP
    (other ranks return None). No pickle: safetensors + JSON metadata (``train.state``)."""
    if _dist()[0] != 0:
        return None
    return state_io.save_state(path, result.state if isinstance(result, TrainResult) else result)
_MASK = (1 << 63) - 1


@dataclass
class TrainResult:
    """What a run made. ``lora``: official layout (float32; None with include_ff or a full fine-tune);
    ``community``: ComfyUI core's layout (None when tokens are learned or for a full fine-tune); ``state``: all a
    resume needs (``save_state``); ``full_state_dict``: a full fine-tune's float32 weights."""

    lora: dict[str, torch.Tensor] | None
    community: dict[str, torch.Tensor] | None
    losses: list[float]
    steps: int
    state: dict[str, Any]
    interrupted: bool = False
    stopped_reason: str | None = None
    full_state_dict: dict[str, torch.Tensor] | None = None
    loader_tokens: str = ""
    previews: list[torch.Tensor] = field(default_factory=list)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby seeds/steps give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK


def _micro_batches(cache: TrainingCache, batch_size: int, seed: int) -> Iterator[list[int]]:
    epoch = 0
    while True:
        yield from cache.batches(batch_size, torch.Generator().manual_seed(_mix(seed, 1, epoch)))
        epoch += 1


def _dist() -> tuple[int, int]:
    return init_from_env()


class _Trainables(nn.Module):
    """Everything that trains (LoRA pairs, token rows, or the full copy) and the loss of one local batch.

    The frozen base is kept out of the registry, so DistributedDataParallel only sees (and broadcasts) what trains.
    """

    def __init__(self, lora: StageCLora | None, tokens: LearnedTokens | None, full: nn.Module | None,
                 base: nn.Module, forward: StageCForward, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora, self.tokens, self.full = lora, tokens, full
        self.__dict__["base"] = base
        self.forward_fn, self.device, self.dtype = forward, device, dtype

    def weights(self) -> Callable[[str], torch.Tensor]:
        net = self.full if self.full is not None else self.base
        deltas = self.lora.deltas() if self.lora is not None else None
        return weight_source(dict(net.named_parameters()), self.device, self.dtype, deltas)

    def predict(self, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, pooled: torch.Tensor,
                clip_img: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.weights(), x, r, clip_text, pooled, clip_img, self.dtype)

    def forward(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, clip_text: torch.Tensor | None,
                pooled: torch.Tensor | None, clip_img: torch.Tensor, captions: list[str], weighting: str,
                adaptive: AdaptiveLossWeight | None, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        if x0.shape[0] == 0:  # more ranks than samples in this batch: a zero gradient that still syncs
            return sum(p.sum() for p in self.parameters()) * 0.0, x0.new_zeros(0)
        if self.tokens is not None:
            clip_text, pooled = self.tokens.encode(captions)
        clip_text, pooled = clip_text.to(self.device), pooled.to(self.device)
        loss, per_sample, _ = diffusion_loss(
            lambda x_t, r: self.predict(x_t, r, clip_text, pooled, clip_img.to(self.device)),
            x0.to(self.device), noise.to(self.device), t, weighting, adaptive)
        return loss * (x0.shape[0] * factor), per_sample


def _stage_c_module(stage_c: Any) -> nn.Module:
    if stage_c is None:
        raise TrainingInputError("training needs a Stage C model; connect the Stage C loader.")
    net = host.module_of(stage_c)
    config = getattr(net, "config", None)
    if getattr(config, "c_in", None) != 16 or not hasattr(config, "c_clip_text"):
        raise TrainingInputError(f"training got a {type(net).__name__} where a Stage C model belongs; connect the "
                                 "Stage C loader (the prior is what LoRAs and learned tokens train).")
    return net


def _check_cache(cache: TrainingCache, net: nn.Module, tokens: bool, text_encoder: Any) -> None:
    if not isinstance(cache, TrainingCache):
        raise TrainingInputError(f"training got {type(cache).__name__} as its dataset; connect the training cache "
                                 "node's output.")
    width = net.config.c_clip_text
    for i, s in enumerate(cache.samples):
        if s.latent.dim() != 3 or s.latent.shape[0] != net.config.c_in:
            raise TrainingInputError(f"training cache sample {i} has a latent of shape {tuple(s.latent.shape)}; "
                                     f"expected ({net.config.c_in}, h, w) EffNet latents - cache the dataset again.")
        if not tokens and s.clip_text is not None and s.clip_text.shape[-1] != width:
            raise TrainingInputError(f"training cache sample {i} holds text embeddings {s.clip_text.shape[-1]} wide; "
                                     f"this Stage C reads {width} - cache with the text encoder of this Stage C.")
    if not tokens and not cache.has_text and text_encoder is None:
        raise TrainingInputError("the training cache holds no caption embeddings and no text encoder is connected; "
                                 "connect the text encoder (to the cache node or the trainer).")


def _resume_settings(meta: dict[str, Any], settings: TrainSettings) -> None:
    saved = TrainSettings.from_dict(meta.get("settings", {}))
    diff = [f"{k} (saved {getattr(saved, k)!r}, now {getattr(settings, k)!r})" for k in RESUME_FIXED
            if getattr(saved, k) != getattr(settings, k)]
    if diff:
        raise TrainingInputError(f"the resume state was trained with other settings: {', '.join(diff)} - set them as "
                                 "saved to continue that run, or start a new run.")


class _Stop(Exception):
    pass


def train(stage_c: Any, text_encoder: Any, cache: TrainingCache, settings: TrainSettings, *,
          clip_vision: Any = None, previewer: Any = None, resume: dict | None = None,
          on_step: Callable[[int, float, torch.Tensor | None], None] | None = None,
          on_save: Callable[[TrainResult], None] | None = None) -> TrainResult:
    """Train a Stage C LoRA (with learned tokens) or a full fine-tune; see the module docstring.

    ``stage_c`` / ``text_encoder`` / ``previewer`` are host handles (``text_encoder`` may be None when the cache
    holds caption embeddings and no tokens are learned). ``resume``: a state from ``load_state`` (continues that
    run exactly) or an official-layout LoRA state dict (starts from its pairs). ``on_step(step, loss, preview)``
    after every optimizer step (1-based). The loaded networks are never modified.

    Autograd is switched on here, so a caller inside ``torch.inference_mode`` (ComfyUI runs every node so) trains
    too; networks and caches made in inference mode are read through normal copies (``forward``, ``tokens``).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(stage_c, text_encoder, cache, settings, clip_vision, previewer, resume, on_step, on_save)


def _train(stage_c: Any, text_encoder: Any, cache: TrainingCache, settings: TrainSettings, clip_vision: Any,
           previewer: Any, resume: dict | None, on_step: Callable | None, on_save: Callable | None) -> TrainResult:
    del clip_vision  # image embeddings come from the cache (CachedSample.clip_image)
    settings = settings.check()
    entries = parse_train_tokens(settings.tokens)
    net = _stage_c_module(stage_c)
    _check_cache(cache, net, bool(entries), text_encoder)
    if entries and text_encoder is None:
        raise TrainingInputError("learning tokens needs the text encoder; connect it to the trainer.")
    rank_id, world = _dist()
    device = host.compute_device()
    dtype = training_dtype(settings.dtype, device)
    shape = (settings.batch_size, 16) + tuple(cache.samples[0].latent.shape[1:])
    # A training step's live memory over the inference estimate of one call, measured on Stage C lite at 24x24 with
    # the live-tensor bench (docs/RESULTS_train.md): 349 MiB / 99 with checkpointing, 2039 / 99 without.
    memory = estimate_stage_c_memory(net.config, shape, dtype, False) * (4 if settings.grad_checkpointing else 21)
    # The text encoder runs only for learned tokens or captions the cache lacks (a preview reads it too then).
    needs_text = bool(entries) or not cache.has_text
    te_handles = [text_encoder] if needs_text and isinstance(text_encoder, host.ModelHandle) else []
    prev_handles = [previewer] if isinstance(previewer, host.ModelHandle) and rank_id == 0 else []
    if settings.full_finetune:
        full = host.trainable_copy(stage_c, torch.float32)
        with host.using(te_handles + prev_handles, memory):
            return _run(full, full, text_encoder, cache, settings, entries, device, dtype, previewer, resume,
                        on_step, on_save, rank_id, world)
    with host.frozen(stage_c, memory) as base:
        host.load([stage_c] + te_handles + prev_handles, memory)  # all together, so none evicts another
        return _run(base, None, text_encoder, cache, settings, entries, device, dtype, previewer, resume,
                    on_step, on_save, rank_id, world)


def _run(base: nn.Module, full: nn.Module | None, text_encoder: Any, cache: TrainingCache, settings: TrainSettings,
         entries: list, device: torch.device, dtype: torch.dtype, previewer: Any, resume: dict | None,
         on_step: Callable | None, on_save: Callable | None, rank_id: int, world: int) -> TrainResult:
    s = settings
    lora = None if full is not None else StageCLora(base, s.rank, s.alpha, s.include_ff, s.seed, device)
    tokens = LearnedTokens(host.module_of(text_encoder), entries, device) if entries else None
    forward = StageCForward(base, s.grad_checkpointing)
    module = _Trainables(lora, tokens, full, base, forward, device, dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    adaptive = AdaptiveLossWeight() if s.weighting == "adaptive" else None
    start, losses = 0, []
    if resume is not None:
        start, losses = _load_resume(resume, s, module, optimizer, adaptive)
    runner: nn.Module = module
    if world > 1:
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    stream = islice(_micro_batches(cache, s.batch_size, s.seed), start * s.grad_accum, None)
    text_fallback = _TextFallback(text_encoder) if tokens is None and not cache.has_text else None
    # A caller with its own on_step reports progress itself (the trainer node does, with the loss): one bar only.
    pbar = host.progress(s.steps) if on_step is None else None
    if pbar is not None:
        pbar.update(start)
    result_extra = {"interrupted": False, "stopped_reason": None, "previews": []}
    step = start
    try:
        for step in range(start, s.steps):
            try:
                host.check_interrupt()
                stop = False
            except Exception:  # the host's interrupt (ComfyUI's or the built-in one): stop between steps
                stop = True
            if world > 1:  # every rank stops at the same step, or the others would wait for it forever
                stop = bool(_all_reduce(torch.tensor([float(stop)]), "max")[0])
            if stop:
                log.info("ComfyUI-StableCascade: training interrupted after %d of %d steps.", step, s.steps)
                result_extra["interrupted"] = True
                break
            for group in optimizer.param_groups:
                group["lr"] = s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup > 0 else s.lr
            try:
                loss = _step(runner, module, optimizer, params, stream, cache, s, step, adaptive, text_fallback,
                             rank_id, world)
            except _Stop as stop:
                result_extra["stopped_reason"] = str(stop)
                log.warning("ComfyUI-StableCascade: %s", stop)
                break
            losses.append(loss)
            done = step + 1
            preview = None
            if rank_id == 0 and previewer is not None and s.preview_every and done % s.preview_every == 0:
                preview = preview_image(module, cache, previewer, s, text_encoder)
                result_extra["previews"].append(preview)
            if pbar is not None:
                pbar.update(done, preview)
            if on_step is not None:
                on_step(done, loss, preview)
            if rank_id == 0 and on_save is not None and s.save_every and done % s.save_every == 0 and done < s.steps:
                on_save(_result(module, adaptive, optimizer, s, losses, done, **result_extra))
    except torch.OutOfMemoryError as exc:
        raise _oom(s, cache, step, exc) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise _oom(s, cache, step, exc) from None
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
    # losses holds one value per completed step, a resumed run's earlier ones included.
    return _result(module, adaptive, optimizer, s, losses, len(losses), **result_extra)


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """all_reduce of a small CPU tensor on any backend (NCCL only reduces CUDA tensors); returns it on the CPU."""
    dist = torch.distributed
    work = t.cuda() if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return work.cpu()


class _TextFallback:
    """Captions encoded on the fly (no grad) when the cache has no text: one encode per distinct caption."""

    def __init__(self, handle: Any) -> None:
        self.module, self.memo = host.module_of(handle), {}

    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if caption not in self.memo:
            clip_text, pooled = self.module.encode([caption])
            self.memo[caption] = (clip_text[0].float().cpu(), pooled.float().reshape(1, -1).cpu())
        return self.memo[caption]


def _batch_inputs(cache: TrainingCache, idx: list[int], s: TrainSettings, micro: int,
                  text_fallback: _TextFallback | None) -> dict[str, Any]:
    """The whole batch's tensors and draws (identical on every rank)."""
    gen = torch.Generator().manual_seed(_mix(s.seed, 2, micro))
    n = len(idx)
    x0 = torch.stack([cache.samples[i].latent for i in idx]).float()
    t = sample_t(n, gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    dropped = (torch.rand(n, generator=gen) < s.caption_dropout).tolist()
    use_img = (torch.rand(n, generator=gen) < s.clip_image_prob).tolist()
    captions = ["" if d else cache.samples[i].caption for i, d in zip(idx, dropped)]
    clip_text = pooled = None
    if text_fallback is not None:
        pairs = [text_fallback(c) for c in captions]
        clip_text, pooled = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    elif cache.has_text:
        empty_text, empty_pooled = cache.empty_text
        clip_text = torch.stack([empty_text if d else cache.samples[i].clip_text for i, d in zip(idx, dropped)])
        pooled = torch.stack([empty_pooled if d else cache.samples[i].clip_pooled for i, d in zip(idx, dropped)])
    img_width = 768
    rows = []
    for i, u in zip(idx, use_img):
        emb = cache.samples[i].clip_image
        rows.append(emb.reshape(1, -1).float() if (u and emb is not None) else None)
    if any(r is not None for r in rows):
        img_width = next(r for r in rows if r is not None).shape[-1]
    clip_img = torch.stack([r if r is not None else torch.zeros(1, img_width) for r in rows])
    return {"x0": x0, "t": t, "noise": noise, "captions": captions, "clip_text": clip_text, "pooled": pooled,
            "clip_img": clip_img}


def _local(batch: dict[str, Any], rank_id: int, world: int) -> dict[str, Any]:
    n = batch["x0"].shape[0]
    part = torch.tensor_split(torch.arange(n), world)[rank_id].tolist()
    out = {}
    for k, v in batch.items():
        if v is None:
            out[k] = None
        elif isinstance(v, list):
            out[k] = [v[i] for i in part]
        else:
            out[k] = v[part] if part else v[:0]
    out["slice"] = part
    return out


def _step(runner: nn.Module, module: _Trainables, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
          stream: Iterator[list[int]], cache: TrainingCache, s: TrainSettings, step: int,
          adaptive: AdaptiveLossWeight | None, text_fallback: _TextFallback | None, rank_id: int,
          world: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's weighted loss (all samples)."""
    total, seen = 0.0, []
    for k in range(s.grad_accum):
        micro = step * s.grad_accum + k
        idx = next(stream)
        batch = _batch_inputs(cache, idx, s, micro, text_fallback)
        local = _local(batch, rank_id, world)
        n = len(idx)
        loss, per_sample = runner(local["x0"], local["noise"], local["t"], local["clip_text"], local["pooled"],
                                  local["clip_img"], local["captions"], s.weighting, adaptive, world / n)
        (loss / s.grad_accum).backward()
        everyone = torch.zeros(n, dtype=torch.float32)
        everyone[local["slice"]] = per_sample.detach().float().cpu()
        if world > 1:
            everyone = _all_reduce(everyone, "sum")
        logsnr = schedule.logsnr(batch["t"])
        weighted = float((everyone * loss_weights(logsnr, s.weighting, adaptive)).mean())
        if not math.isfinite(weighted):
            optimizer.zero_grad(set_to_none=True)
            raise _Stop(f"training stopped at step {step + 1} of {s.steps}: the loss is {weighted} (NaN/inf) - the "
                        f"LoRA of step {step} is kept. Lower lr (now {s.lr:g}), keep grad_clip on, or train in fp32; a "
                        "NaN from the first step means a latent or caption embedding in the cache is not finite.")
        total += weighted / s.grad_accum
        seen.append((logsnr, everyone))
    norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip) if s.grad_clip > 0 else torch.zeros(())
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise _Stop(f"training stopped at step {step + 1} of {s.steps}: the gradient is NaN/inf - the LoRA of step "
                    f"{step} is kept. Lower lr (now {s.lr:g}) or train in fp32.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if adaptive is not None:
        for logsnr, per_sample in seen:
            adaptive.update(logsnr, per_sample)
    return total


def _oom(s: TrainSettings, cache: TrainingCache, step: int, exc: BaseException) -> TrainingOutOfMemory:
    h, w = cache.samples[0].latent.shape[1:]
    hints = [f"batch_size (now {s.batch_size}; raise grad_accum, now {s.grad_accum}, to keep the effective batch)",
             f"the dataset area (latents now {h}x{w})"]
    if not s.grad_checkpointing:
        hints.insert(0, "turn grad_checkpointing on")
    if s.full_finetune:
        hints.append("train a LoRA instead of full_finetune")
    elif s.rank > 4:
        hints.append(f"rank (now {s.rank})")
    return TrainingOutOfMemory(f"training ran out of memory at step {step + 1} ({str(exc).splitlines()[0][:120]}) - "
                               f"lower {', '.join(hints)}; or close other programs using the GPU.")


def _load_resume(resume: dict, s: TrainSettings, module: _Trainables, optimizer: torch.optim.Optimizer,
                 adaptive: AdaptiveLossWeight | None) -> tuple[int, list[float]]:
    if not state_io.is_state(resume):
        if module.lora is None or not any(k.endswith(".lora_down") for k in resume):
            raise TrainingInputError("resume expects a training state (load_state) or an official-layout LoRA "
                                     "state dict; got neither - pick the state file a run saved.")
        module.lora.load_official(resume, "the LoRA to resume from")
        if module.tokens is not None and "embeddings.indices" in resume:
            module.tokens.load_official(resume, "the LoRA to resume from")
        return 0, []
    meta, tensors = resume["meta"], resume["tensors"]
    _resume_settings(meta, s)
    if module.lora is not None:
        n = sum(1 for k in tensors if k.startswith("lora.") and k.endswith(".lora_down"))
        pairs = [(tuple(tensors[f"lora.{i}.lora_down"].shape), tuple(tensors[f"lora.{i}.lora_up"].shape))
                 if f"lora.{i}.lora_down" in tensors else None for i in range(len(module.lora.pairs))]
        check_resume_shapes("the resume state", pairs, module.lora, sd_pairs=n)
        with torch.no_grad():
            for i, pair in enumerate(module.lora.pairs):
                pair.lora_down.copy_(tensors[f"lora.{i}.lora_down"])
                pair.lora_up.copy_(tensors[f"lora.{i}.lora_up"])
    if module.tokens is not None:
        module.tokens.load_official({"embeddings.indices": tensors.get("tokens.ids"),
                                     "embeddings.embeddings": tensors.get("tokens.delta")}, "the resume state")
    if module.full is not None:
        sd = {k[len("full."):]: v for k, v in tensors.items() if k.startswith("full.")}
        own = module.full.state_dict()
        if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in sd):
            raise TrainingInputError("the resume state's full fine-tune weights do not fit the connected Stage C; "
                                     "resume with the Stage C it was trained on.")
        module.full.load_state_dict(sd)
    state_io.load_optimizer(optimizer, tensors, meta["optimizer"])
    if adaptive is not None and "adaptive.losses" in tensors:
        adaptive.load_state_dict({"losses": tensors["adaptive.losses"]})
    return int(meta["step"]), [float(x) for x in meta.get("losses", [])]


def _result(module: _Trainables, adaptive: AdaptiveLossWeight | None, optimizer: torch.optim.Optimizer,
            s: TrainSettings, losses: list[float], steps: int, interrupted: bool, stopped_reason: str | None,
            previews: list) -> TrainResult:
    from .tokens import loader_tokens_field

    tensors: dict[str, torch.Tensor] = {}
    lora = community = full_sd = None
    if module.lora is not None:
        for i, pair in enumerate(module.lora.pairs):
            tensors[f"lora.{i}.lora_down"] = pair.lora_down.detach().cpu().clone()
            tensors[f"lora.{i}.lora_up"] = pair.lora_up.detach().cpu().clone()
        if not module.lora.include_ff:
            lora = module.lora.official_state_dict()
        if module.tokens is None:
            community = module.lora.community_state_dict()
    if module.tokens is not None:
        tok = module.tokens.official_state_dict()
        tensors["tokens.ids"], tensors["tokens.delta"] = tok["embeddings.indices"], tok["embeddings.embeddings"]
        if lora is not None:
            lora.update(tok)
    if module.full is not None:
        full_sd = {k: v.detach().float().cpu().clone() for k, v in module.full.state_dict().items()}
        tensors.update({f"full.{k}": v for k, v in full_sd.items()})
    opt_tensors, opt_meta = state_io.optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    if adaptive is not None:
        tensors["adaptive.losses"] = adaptive.losses.clone()
    meta = {"step": steps, "losses": list(losses), "settings": s.as_dict(), "optimizer": opt_meta}
    return TrainResult(lora, community, list(losses), steps, state_io.pack(meta, tensors), interrupted,
                       stopped_reason, full_sd, loader_tokens_field(s.tokens), previews)
