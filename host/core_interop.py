"""Both directions between the pack's models and ComfyUI core's MODEL, CLIP and VAE (used by ``host.comfyui``).

Pack -> core: ``to_core_model`` puts the pack's Stage C / B network into a core ``BaseModel`` (``StableCascade_C`` /
``_B``: core's model_sampling, extra_conds and latent format; the pack's network is its ``diffusion_model``) under
a ``ModelPatcher`` carrying the handle's patches, so KSampler, SamplerCustomAdvanced and model-patching nodes take it.
Two patchers then hold one network (the handle's and the MODEL's); ``patcher_class`` makes every pack patcher first
unload any other patcher of the same network, so ComfyUI never has it patched twice or counted twice.

Core -> pack: the views below.

A core ``MODEL`` (Stage C / B loaded by CheckpointLoaderSimple or UNETLoader), ``CLIP`` (type stable_cascade) or
``VAE`` (Stage A) keeps its own network and ``ModelPatcher``; the handle ``host.comfyui`` makes for it holds that
patcher (so ComfyUI loads it, with whatever core patched onto it) and one of these views as its ``module``. A view
calls core's network with the pack's signatures (``StageC.forward``, ``TextEncoder.encode``, ``StageA.decode_raw``),
so the pipeline never knows where the network came from. No comfy import here: ``host.comfyui`` hands in its
modules (``c``: the backend's namespace; ``core``: model_base, supported_models, sdxl_clip, StageA).

The pack's own weight patches cannot go onto core's network (its keys are core's: split q/k/v, a ``diffusion_model.``
prefix), so ``state_dict()`` - what the pack's LoRA and patch code reads first - refuses with the fix instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..cascade import keymaps
from ..cascade.errors import CascadeError, StageMismatchError
from ..cascade.stage_a import SCALE_FACTOR, StageAConfig
from ..cascade.stage_b import StageBConfig
from ..cascade.stage_c import StageCConfig
from .handles import ModelHandle

# The networks' ``r`` is the noise condition; core passes it as the timestep (StableCascadeSampling.timestep).
_STAGE_C_CONDS = ("clip_text", "clip_text_pooled", "clip_img", "sca", "crp")
_STAGE_B_CONDS = ("effnet", "clip", "pixels", "sca")


def resblock_calls(config: Any) -> int:
    """ResBlock calls of one Stage C forward (the length of a full ``cnet`` list)."""
    down, up = config.blocks
    rep_down, rep_up = config.block_repeat
    return sum(b * r for b, r in zip(down, rep_down)) + sum(b * r for b, r in zip(up, rep_up))


def cnet_to_core(cnet: Sequence[torch.Tensor | None], config: Any) -> dict[str, list]:
    """The pack's ``cnet`` (one entry per ResBlock call, in execution order; a short list skips the rest) as
    core's ``control`` dict: core's Stage C pops ``control["input"]`` from the end, one entry per ResBlock call."""
    full = list(cnet)[: resblock_calls(config)]
    full += [None] * (resblock_calls(config) - len(full))
    return {"input": full[::-1]}


def cnet_from_core(control: dict | None) -> list[torch.Tensor | None] | None:
    """Core's ``control`` dict (``control["input"]`` popped from the end) as the pack's ``cnet`` list."""
    entries = (control or {}).get("input")
    return None if not entries else list(entries)[::-1]


class CoreView:
    """What every view shares: a dtype/device probe for ``next(module.parameters())`` and a refusal of patches."""

    source = "core"
    fix = ""

    def __init__(self, dtype: Callable[[], torch.dtype], device: Callable[[], torch.device]) -> None:
        self._dtype, self._device = dtype, device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype()

    def parameters(self) -> Iterator[torch.Tensor]:
        # The pipeline reads the compute dtype and device from the first parameter; core's stored weights may be
        # in another dtype than the one core computes in (fp8 with manual cast), so a probe stands for them.
        yield torch.empty(0, dtype=self._dtype(), device=self._device())

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        raise CascadeError(f"this model comes from ComfyUI core's {self.source}; the pack's LoRA and weight patches "
                           f"cannot be added to core's network - {self.fix}")

    def eval(self) -> CoreView:
        return self

    def requires_grad_(self, flag: bool = True) -> CoreView:
        return self


class CoreStageNetwork(CoreView):
    """Stage C or Stage B from a core MODEL, called as the pack's ``StageC`` / ``StageB``.

    ``network()`` gives the MODEL's ``diffusion_model`` at call time (after ComfyUI's object patches);
    ``pack_signature``: that network is the pack's own (a MODEL made by ``host.to_core_model``), which takes
    ``cnet`` instead of core's ``control`` dict.
    """

    source = "MODEL"

    def __init__(self, network: Callable[[], nn.Module], stage: str, config: Any, dtype: Callable[[], torch.dtype],
                 pack_signature: bool) -> None:
        super().__init__(dtype, lambda: _first_device(network()))
        self._network, self.stage, self.config, self._pack = network, stage, config, pack_signature
        self.fix = ("apply core's LoraLoaderModelOnly to the MODEL before 'Stable Cascade Stage "
                    f"{stage.upper()} from MODEL', or load the file with the pack's Stage {stage.upper()} loader")

    def __call__(self, x: torch.Tensor, r: torch.Tensor, *args: torch.Tensor, cnet: Any = None,
                 **conds: torch.Tensor | None) -> torch.Tensor:
        names = _STAGE_C_CONDS if self.stage == "c" else _STAGE_B_CONDS
        conds.update(zip(names, args))
        # core's networks default a missing extra condition to zeros only when the key is absent
        kwargs = {k: v for k, v in conds.items() if v is not None}
        net = self._network()
        if self._pack:
            return net(x, r, cnet=cnet, **kwargs) if self.stage == "c" else net(x, r, **kwargs)
        if self.stage == "c" and cnet is not None:
            kwargs["control"] = cnet_to_core(cnet, self.config)
        with torch.no_grad():
            return net(x, r, transformer_options={}, **kwargs)


class CoreTextEncoder(CoreView):
    """A core CLIP of type stable_cascade, as the pack's ``TextEncoder.encode``: core's own tokenizer and
    ``encode_from_tokens(..., return_pooled=True)``, exactly what core's CLIPTextEncode computes."""

    source = "CLIP"
    fix = ("apply core's LoraLoader to the CLIP before 'Stable Cascade Text Encoder from CLIP', or load the text "
           "encoder with the pack's loader (learned-token LoRAs need the pack's text encoder)")

    def __init__(self, clip: Any) -> None:
        super().__init__(lambda: torch.float32, lambda: torch.device("cpu"))
        self.clip = clip

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True) for p in prompts]
        tokens = max(c.shape[1] for c, _ in outs)
        if any(c.shape[1] != tokens for c, _ in outs):
            raise CascadeError(f"core's CLIP encoded these prompts to {[c.shape[1] for c, _ in outs]} tokens (it "
                               "adds 77 per chunk of a long prompt); encode them one at a time")
        return torch.cat([c for c, _ in outs]), torch.cat([p for _, p in outs])


class CoreStageA(CoreView):
    """A core VAE holding Stage A, as the pack's ``StageA``: core's network encodes and decodes; the latent is
    core's SC_B storage, which is the pack's raw latent (``encode_raw`` / ``decode_raw``)."""

    source = "VAE"
    fix = "load Stage A with the pack's Stage A loader to patch it"

    def __init__(self, network: nn.Module, config: Any, dtype: Callable[[], torch.dtype]) -> None:
        super().__init__(dtype, lambda: _first_device(network))
        self.network, self.config = network, config

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network.encode(x.to(self.dtype))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network.decode(z.to(self.dtype))

    def encode(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        if quantize:
            raise CascadeError("quantized encode is not offered for a core VAE; use the pack's Stage A loader")
        return self.encode_raw(x) / SCALE_FACTOR

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(z * SCALE_FACTOR)


def _first_device(network: nn.Module) -> torch.device:
    weight = next(network.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- pack -> core MODEL

UNET_PREFIX = "diffusion_model."  # where a core BaseModel keeps its network (and its weight keys)
_PATCHER_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[tuple[type, str], type] = {}


def network_of(model: Any) -> Any:
    """The network whose weights a patcher's model holds: a MODEL made here holds the pack's network."""
    return getattr(model, "scw_network", model)


def evict_sharers(mm: Any, patcher: Any) -> None:
    """Unload (weights restored, moved to the offload device) every loaded patcher that holds the same network as
    ``patcher`` under another model object: ComfyUI only swaps clones of one model, and would otherwise keep the
    other's patches in the weights (its ``comfy_patched_weights`` flags live on the shared layers)."""
    net = network_of(patcher.model)
    for loaded in list(mm.current_loaded_models):
        other = loaded.model
        if other is None or other.model is patcher.model or network_of(other.model) is not net:
            continue
        loaded.model_unload()
        mm.current_loaded_models.remove(loaded)


def patcher_class(c: Any) -> type:
    """ComfyUI's ModelPatcher, evicting the other patchers of its network before each load (clones keep the class)."""
    base = c.patcher.ModelPatcher
    if base not in _PATCHER_CLASSES:
        class ScwModelPatcher(base):
            def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
                evict_sharers(c.mm, self)
                return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)

        _PATCHER_CLASSES[base] = ScwModelPatcher
    return _PATCHER_CLASSES[base]


def cascade_model_class(core: Any, stage: str) -> type:
    """Core's StableCascade_C / _B with the pack's network as ``diffusion_model`` (core's own is never built)."""
    base = core.model_base.StableCascade_C if stage == "c" else core.model_base.StableCascade_B
    key = (base, stage)
    if key in _MODEL_CLASSES:
        return _MODEL_CLASSES[key]
    names = _STAGE_C_CONDS if stage == "c" else _STAGE_B_CONDS

    class ScwCascadeModel(base):
        scw_network = property(lambda self: self.diffusion_model)

        def __init__(self, model_config: Any, network: nn.Module, device: Any = None) -> None:
            # BaseModel's constructor, not StableCascade_C's: that one would build core's network.
            core.model_base.BaseModel.__init__(self, model_config, core.model_base.ModelType.STABLE_CASCADE,
                                               device=device)
            self.diffusion_model = network

        def get_dtype(self) -> torch.dtype:
            # The dtype the pack's sampler computes in (pipeline.stages: the network's first weight).
            return next(self.diffusion_model.parameters()).dtype

        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
            # BaseModel._apply_model with the pack's signature: eps = net(x_t, r, conds), r = core's timestep(sigma)
            # (the networks' noise condition); transformer_options patches have no place in the pack's network.
            sigma = t
            dtype = self.get_dtype()
            xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
            r = self.model_sampling.timestep(t).float()
            conds = {k: core.model_base.convert_tensor(v, dtype, xc.device) for k, v in kwargs.items() if k in names}
            if stage == "c":
                conds["cnet"] = cnet_from_core(control)
            eps = self.diffusion_model(xc, r, **conds).float()
            return self.model_sampling.calculate_denoised(sigma, eps, x)

    _MODEL_CLASSES[key] = ScwCascadeModel
    return ScwCascadeModel


def _stage_of(handle: Any, what: str) -> str:
    kind = getattr(handle, "kind", None)
    if kind not in ("stage_c", "stage_b"):
        raise StageMismatchError(f"{what}: got {kind or type(handle).__name__}; connect a Stage C or Stage B model "
                                 "from the pack's loaders")
    return kind[-1]


def to_core_model(c: Any, core: Any, handle: ModelHandle, on_load: Callable, owner: str) -> Any:
    """A core MODEL (ModelPatcher of a StableCascade_C/_B) computing with the handle's network and patches."""
    stage = _stage_of(handle, "the Stage C/B to MODEL conversion")
    if handle.attachments:
        raise CascadeError(
            f"this Stage {stage.upper()} carries {sorted(handle.attachments)} (the pack's ControlNet); core's "
            "samplers cannot run the pack's ControlNets - sample with the pack's Stage C sampler, or convert the "
            "Stage C before applying the ControlNet and use core's ControlNetApplyAdvanced with core's ControlNet")
    module = handle.module
    if isinstance(module, CoreStageNetwork):
        return handle.patcher.clone()  # it came from a core MODEL: hand that MODEL back
    config_class = core.supported_models.Stable_Cascade_C if stage == "c" else core.supported_models.Stable_Cascade_B
    model_config = config_class({"stable_cascade_stage": stage, "disable_unet_model_creation": True})
    model = cascade_model_class(core, stage)(model_config, module)
    patcher = patcher_class(c)(model, load_device=handle.patcher.load_device,
                               offload_device=handle.patcher.offload_device)
    # The handle's patches (the pack's LoRAs) under the MODEL's key names; ComfyUI applies them when it loads.
    patcher.patches = {UNET_PREFIX + k: list(v) for k, v in handle.patcher.patches.items()}
    patcher.patches_uuid = uuid.uuid4()
    patcher.add_callback_with_key(c.callbacks.ON_LOAD, owner, on_load)
    return patcher


# ----------------------------------------------------------------------------- core MODEL / CLIP / VAE -> pack


def _shapes(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict as meta tensors: config inference reads shapes only."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in network.state_dict().items()}


def from_core_model(core: Any, model: Any, stage: str, backend: Any) -> ModelHandle:
    """A pack handle for a core MODEL of Stable Cascade Stage ``stage``: ComfyUI loads the MODEL's own patcher (with
    core's patches), and the pack's sampler calls its network through a ``CoreStageNetwork``."""
    want = core.model_base.StableCascade_C if stage == "c" else core.model_base.StableCascade_B
    other = core.model_base.StableCascade_B if stage == "c" else core.model_base.StableCascade_C
    base = getattr(model, "model", None)
    if not isinstance(base, want):
        found = ("a Stable Cascade Stage " + ("B" if stage == "c" else "C") if isinstance(base, other)
                 else type(base).__name__ if base is not None else type(model).__name__)
        raise StageMismatchError(
            f"'Stable Cascade Stage {stage.upper()} from MODEL' needs a MODEL holding Stable Cascade Stage "
            f"{stage.upper()}, got {found} - load stable_cascade_stage_{stage}.safetensors (or a stage_{stage} "
            "file) with CheckpointLoaderSimple or UNETLoader")
    pack_network = isinstance(getattr(base, "scw_network", None), nn.Module)
    if pack_network:
        config = base.diffusion_model.config
    else:
        sd, _ = keymaps.to_original(f"stage_{stage}", _shapes(base.diffusion_model))
        config = (StageCConfig if stage == "c" else StageBConfig).from_state_dict(sd)
    patcher = model.clone()
    view = CoreStageNetwork(lambda: patcher.model.diffusion_model, stage, config,
                            lambda: base.manual_cast_dtype or base.get_dtype(), pack_network)
    handle = ModelHandle(patcher, f"stage_{stage}", backend)
    handle._network = view  # the view computes with the patcher's own network (see ModelHandle.with_network)
    return handle


def from_core_clip(core: Any, clip: Any, backend: Any) -> ModelHandle:
    """A pack text-encoder handle for a core CLIP of type stable_cascade (core's patcher, core's encode)."""
    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, core.sdxl_clip.StableCascadeClipModel):
        found = type(model).__name__ if model is not None else type(clip).__name__
        raise CascadeError(f"'Stable Cascade Text Encoder from CLIP' needs a CLIP of type stable_cascade, got "
                           f"{found} - load it with CLIPLoader type 'stable_cascade', or take the CLIP output of "
                           "CheckpointLoaderSimple with stable_cascade_stage_c.safetensors")
    handle = ModelHandle(clip.patcher, "text_encoder", backend)
    handle._network = CoreTextEncoder(clip)
    return handle


def from_core_vae(core: Any, vae: Any, backend: Any) -> ModelHandle:
    """A pack Stage A handle for a core VAE holding Stage A (core's patcher and network)."""
    network = getattr(vae, "first_stage_model", None)
    if not isinstance(network, core.StageA):
        found = type(network).__name__ if network is not None else type(vae).__name__
        raise CascadeError(f"'Stable Cascade Stage A from VAE' needs a VAE holding Stable Cascade Stage A, got "
                           f"{found} - load stage_a.safetensors with VAELoader, or take the VAE output of "
                           "CheckpointLoaderSimple with stable_cascade_stage_b.safetensors")
    config = StageAConfig.from_state_dict(_shapes(network))
    handle = ModelHandle(vae.patcher, "stage_a", backend)
    handle._network = CoreStageA(network, config, lambda: vae.vae_dtype)
    return handle
