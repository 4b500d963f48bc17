"""The ComfyUI boundary: the only module of the pack that imports ``comfy`` or ``folder_paths``.

Inside ComfyUI every call goes to ComfyUI's own machinery (``ModelPatcher``, ``load_models_gpu``,
``folder_paths``, ``ProgressBar``, the interrupt flag). Without ComfyUI (tests, the headless command) a
small built-in manager offers the same surface:

- ``wrap(module, kind) -> ModelHandle``; ``handle.clone()``, ``handle.add_patches(...)``;
- ``load(handles, memory_required)`` / ``release(handles)`` / ``using(handles, memory_required)``;
- ``compute_device()``, ``offload_device()``, ``intermediate_device()``, ``operations()``;
- ``progress(total).update(i, preview_image)``, ``check_interrupt()``;
- ``model_files(folders)`` / ``model_path(folders, name)``.

Set ``SCW_NO_COMFY=1`` to use the built-in manager even when ``comfy`` is importable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .cascade.errors import CascadeError, CheckpointError, SamplingInterrupted, ShapeError
from .cascade.tiling import available_memory
from .host_builtin import BuiltinManager, BuiltinPatcher, PatchValue

log = logging.getLogger(__name__)


def _import_comfy() -> SimpleNamespace | None:
    if os.environ.get("SCW_NO_COMFY") == "1":
        return None
    try:
        import comfy.model_management
        import comfy.model_patcher
        import comfy.ops
        import comfy.patcher_extension
        import comfy.utils
        import comfy.weight_adapter.base
        import folder_paths
    except ImportError:
        return None
    return SimpleNamespace(mm=comfy.model_management, patcher=comfy.model_patcher, ops=comfy.ops,
                           callbacks=comfy.patcher_extension.CallbacksMP,
                           utils=comfy.utils, adapter_base=comfy.weight_adapter.base.WeightAdapterBase,
                           folder_paths=folder_paths)


_COMFY = _import_comfy()
# Key under which the pack registers its ModelPatcher callbacks, so they never collide with other packs.
PATCH_OWNER = "scw"

# Folder aliases of ComfyUI (folder_paths.map_legacy plus the two-folder defaults).
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "unet": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
    "vae": ("vae",),
    "checkpoints": ("checkpoints",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "loras": ("loras",),
    "clip_vision": ("clip_vision",),
}
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
# Kinds that ComfyUI places like its VAE / text encoders rather than like its diffusion models.
_VAE_KINDS = {"stage_a", "effnet", "previewer"}
_TEXT_KINDS = {"text_encoder", "clip_vision"}


def in_comfyui() -> bool:
    """True when ComfyUI's modules are importable and used."""
    return _COMFY is not None


# ----------------------------------------------------------------------------- devices and layers


def compute_device() -> torch.device:
    """Where networks run: ComfyUI's torch device; outside, ``SCW_DEVICE`` or CUDA when present, else CPU."""
    if _COMFY is not None:
        return _COMFY.mm.get_torch_device()
    name = os.environ.get("SCW_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


device = compute_device


def offload_device() -> torch.device:
    """Where idle networks wait: ComfyUI's ``unet_offload_device()``; outside, the CPU."""
    if _COMFY is not None:
        return _COMFY.mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where outputs between nodes (latents, conditioning, images) live: the CPU unless ComfyUI says otherwise."""
    if _COMFY is not None:
        return _COMFY.mm.intermediate_device()
    return torch.device("cpu")


def soft_empty_cache() -> None:
    """Return cached accelerator memory to the driver (ComfyUI's ``soft_empty_cache``)."""
    if _COMFY is not None:
        _COMFY.mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def operations(manual_cast: bool = False) -> Any:
    """The layer namespace networks are built with (``Linear``, ``Conv2d``, ``ConvTranspose2d``, ...).

    Inside ComfyUI: ``comfy.ops.disable_weight_init`` (its layers can stream weights in low-VRAM mode),
    or ``comfy.ops.manual_cast`` when the weight dtype differs from the compute dtype; layers ComfyUI
    does not provide (``BatchNorm2d``) come from ``torch.nn``. Outside: ``torch.nn``.
    """
    if _COMFY is None:
        return nn
    source = _COMFY.ops.manual_cast if manual_cast else _COMFY.ops.disable_weight_init
    names = ("Linear", "Conv2d", "ConvTranspose2d", "LayerNorm", "GroupNorm", "BatchNorm2d", "Embedding")
    return SimpleNamespace(**{n: getattr(source, n, getattr(nn, n)) for n in names})


# ----------------------------------------------------------------------------- model handles


class ModelHandle:
    """A network plus its patcher: ComfyUI's ``ModelPatcher`` inside ComfyUI, a ``BuiltinPatcher`` outside.

    Clones share the network's weights and carry their own patch list, so patching a clone (a LoRA) never
    changes what the original computes.
    """

    def __init__(self, patcher: Any, kind: str) -> None:
        self.patcher = patcher
        self.kind = kind

    @property
    def module(self) -> nn.Module:
        return self.patcher.model

    def clone(self) -> ModelHandle:
        return ModelHandle(self.patcher.clone(), self.kind)

    def model_size(self) -> int:
        return int(self.patcher.model_size())

    def add_patches(self, patches: dict[str, PatchValue], strength: float = 1.0, key: str = "") -> list[str]:
        """Add weight patches: ``{state_dict_key: delta tensor | fn(weight_fp32) -> delta}``, scaled by strength.

        ``key`` names the owner (e.g. ``"scw_lora:file.safetensors"``) so ``remove_patches(key)`` can take them
        off again. Returns the patched keys; keys the network lacks raise ``CascadeError``.
        """
        _check_patch_keys(self.module, patches, self.kind)
        if _COMFY is None:
            return self.patcher.add_patches(patches, strength, key)
        wrapped = {k: _comfy_adapter()(v, key) for k, v in patches.items()}
        return list(self.patcher.add_patches(wrapped, strength_patch=strength))

    def remove_patches(self, key: str) -> None:
        """Drop every patch added with owner ``key``."""
        if _COMFY is None:
            self.patcher.remove_patches(key)
            return
        for weight_key in list(self.patcher.patches):
            kept = [p for p in self.patcher.patches[weight_key] if getattr(p[1], "scw_owner", None) != key]
            if kept:
                self.patcher.patches[weight_key] = kept
            else:
                del self.patcher.patches[weight_key]
        self.patcher.patches_uuid = uuid.uuid4()

    def patch_keys(self) -> list[str]:
        """The owners of this handle's patches, in the order they were added."""
        if _COMFY is None:
            return self.patcher.patch_owners()
        owners = [getattr(p[1], "scw_owner", "") for ps in self.patcher.patches.values() for p in ps]
        return list(dict.fromkeys(owners))

    def __repr__(self) -> str:
        return f"ModelHandle({self.kind!r}, {type(self.module).__name__}, {self.model_size() / 2**20:.1f} MiB)"


def _check_patch_keys(module: nn.Module, patches: dict[str, Any], kind: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in patches if k not in shapes]
    if missing:
        raise CascadeError(
            f"{kind}: patch keys {missing[:3]} (of {len(missing)}) are not weights of this network (it has e.g. "
            f"{sorted(shapes)[:3]}); the patch was made for another network - pick a LoRA/patch for {kind}"
        )
    for k, value in patches.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) != shapes[k]:
            raise ShapeError(f"{kind}: patch for {k!r} has shape {tuple(value.shape)}, the weight has {shapes[k]}"
                             " - the patch was made for another network size")


_ADAPTER_CLASS: type | None = None


def _comfy_adapter() -> type:
    """A ComfyUI weight adapter that adds ``strength * delta`` (a tensor, or a function of the weight)."""
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is None:
        base = _COMFY.adapter_base

        class ScwDelta(base):
            name = "scw_delta"

            def __init__(self, value: PatchValue, owner: str) -> None:
                self.value, self.scw_owner = value, owner
                self.loaded_keys, self.weights = set(), [value] if isinstance(value, torch.Tensor) else []

            def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                                 intermediate_dtype=torch.float32, original_weight=None):
                delta = self.value(weight) if callable(self.value) else self.value
                delta = delta.to(weight.device, weight.dtype)
                return weight.add_(function(strength * delta) if function is not None else strength * delta)

        _ADAPTER_CLASS = ScwDelta
    return _ADAPTER_CLASS


def wrap(module: nn.Module, kind: str) -> ModelHandle:
    """Put a network under the host's memory manager; ``kind`` ("stage_c", "stage_a", ...) picks its devices."""
    module.eval().requires_grad_(False)
    if _COMFY is None:
        return ModelHandle(BuiltinPatcher(module, compute_device(), offload_device()), kind)
    mm = _COMFY.mm
    if kind in _VAE_KINDS:
        load, offload = mm.vae_device(), mm.vae_offload_device()
    elif kind in _TEXT_KINDS:
        load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
    else:
        load, offload = mm.get_torch_device(), mm.unet_offload_device()
    patcher = _COMFY.patcher.ModelPatcher(module, load_device=load, offload_device=offload)
    patcher.add_callback_with_key(_COMFY.callbacks.ON_LOAD, PATCH_OWNER, _patch_unreachable_weights)
    return ModelHandle(patcher, kind)


def _unreachable_parameters(module: nn.Module) -> set[str]:
    """Parameters ComfyUI's loader never patches: those of a module that also has parameterised children
    (e.g. the packed ``attn.in_proj_weight`` beside ``attn.out_proj``, Stage A's ``gammas``)."""
    found = set()
    for name, mod in module.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own and len(own) != sum(1 for _ in mod.parameters()):
            found.update(f"{name}.{n}" if name else n for n in own)
    return found


def _patch_unreachable_weights(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    # ON_LOAD callback: without it, LoRA patches on packed q/k/v weights would be silently dropped.
    # Keys already in patcher.backup were patched by this load; unpatch_model restores every backed-up key.
    for key in _unreachable_parameters(patcher.model) & set(patcher.patches):
        if key not in patcher.backup:
            patcher.patch_weight_to_device(key, device_to=device_to)


def module_of(handle: ModelHandle | nn.Module) -> nn.Module:
    """The network of a handle (a bare module is returned as it is)."""
    return handle.module if isinstance(handle, ModelHandle) else handle


# ----------------------------------------------------------------------------- built-in memory manager


_MANAGER = BuiltinManager(lambda: compute_device())


def set_memory_budget(nbytes: int | None) -> None:
    """Built-in manager only: override the budget (bytes; None restores ``SCW_MEMORY_BUDGET`` / detection)."""
    _MANAGER.budget_override = None if nbytes is None else int(nbytes)


def free_memory(device: torch.device | None = None) -> int:
    """Bytes free on ``device`` (default: the compute device), as the memory manager sees it."""
    dev = torch.device(device) if device is not None else compute_device()
    if _COMFY is not None:
        return int(_COMFY.mm.get_free_memory(dev))
    return available_memory(dev)


def loaded_handles() -> list[nn.Module]:
    """Built-in manager only: the networks on the compute device, least recently used first."""
    return [p.model for p in _MANAGER.resident]


def unload_all() -> None:
    """Move every network to its offload device with its base weights restored."""
    if _COMFY is not None:
        _COMFY.mm.unload_all_models()
    else:
        _MANAGER.unload_all()


def forget(values: Iterable[Any]) -> None:
    """Built-in manager: the caller drops these node outputs, so their networks leave the resident set and
    can be freed. Inside ComfyUI its own execution cache and memory manager decide; nothing to do."""
    if _COMFY is None:
        for value in values:
            if isinstance(value, ModelHandle):
                _MANAGER.evict(value.patcher)


def _patchers(handles: Iterable[ModelHandle | None]) -> list[Any]:
    out = []
    for h in handles:
        if h is None:
            continue
        if not isinstance(h, ModelHandle):
            raise CascadeError(f"host.load expects handles from host.wrap(), got {type(h).__name__}"
                               " - wrap the network with host.wrap(module, kind) when it is loaded")
        out.append(h.patcher)
    return out


def load(handles: Sequence[ModelHandle | None], memory_required: int = 0) -> None:
    """Make the networks ready on their compute device with their patches applied.

    ``memory_required`` is the activation memory (bytes) the next computation needs on top of the weights;
    other networks are offloaded (or, in ComfyUI, partially loaded) to make room for it.
    """
    patchers = _patchers(handles)
    if _COMFY is not None:
        _COMFY.mm.load_models_gpu(patchers, memory_required=int(memory_required))
    else:
        _MANAGER.load(patchers, int(memory_required))


def release(handles: Sequence[ModelHandle | None]) -> None:
    """After an error or an interrupt: take the patches off again (built-in manager).

    ComfyUI keeps a patched clone loaded by design and restores the base weights itself when another
    clone is loaded, so inside ComfyUI this does nothing.
    """
    if _COMFY is None:
        _MANAGER.release(_patchers(handles))


@contextlib.contextmanager
def using(handles: Sequence[ModelHandle | None], memory_required: int = 0) -> Iterator[None]:
    """``load`` the handles for the block; on any exception (interrupts included) ``release`` them."""
    load(handles, memory_required)
    try:
        yield
    except BaseException:
        release(handles)
        raise


# ----------------------------------------------------------------------------- progress, previews, interrupts


_PROGRESS_HOOK: Callable[[int, int, Any], None] | None = None


def set_progress_hook(hook: Callable[[int, int, Any], None] | None) -> None:
    """Built-in manager only: ``hook(value, total, preview_image_or_None)`` is called on every update."""
    global _PROGRESS_HOOK
    _PROGRESS_HOOK = hook


def preview_image(images: torch.Tensor) -> Any:
    """The first image of a (B, 3, H, W) batch in [0, 1] as a PIL image (what ComfyUI's previews carry)."""
    from PIL import Image

    img = images[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


preview = preview_image


class Progress:
    """Step progress of one node; inside ComfyUI a ``comfy.utils.ProgressBar`` (previews go to the UI)."""

    def __init__(self, total: int) -> None:
        self.total, self.current, self.last_preview = int(total), 0, None
        self._bar = _COMFY.utils.ProgressBar(self.total) if _COMFY is not None else None

    def update(self, value: int, preview_image: Any = None) -> None:
        """Set progress to ``value`` of ``total``; ``preview_image`` is a PIL image or a (B, 3, H, W) tensor."""
        if isinstance(preview_image, torch.Tensor):
            preview_image = preview(preview_image)
        self.current = min(int(value), self.total)
        self.last_preview = preview_image
        if self._bar is not None:
            payload = None
            if preview_image is not None:
                payload = ("JPEG", preview_image, int(getattr(_comfy_args(), "preview_size", 512)))
            self._bar.update_absolute(self.current, self.total, payload)
        elif _PROGRESS_HOOK is not None:
            _PROGRESS_HOOK(self.current, self.total, preview_image)


def _comfy_args() -> Any:
    from comfy.cli_args import args

    return args


def progress(total: int) -> Progress:
    return Progress(total)


_INTERRUPT = threading.Event()


def request_interrupt(value: bool = True) -> None:
    """Ask running samplers to stop at their next step (ComfyUI: its global interrupt flag)."""
    if _COMFY is not None:
        _COMFY.mm.interrupt_current_processing(value)
    elif value:
        _INTERRUPT.set()
    else:
        _INTERRUPT.clear()


def check_interrupt() -> None:
    """Raise if the user asked to stop: ComfyUI's ``InterruptProcessingException`` inside ComfyUI,
    ``SamplingInterrupted`` outside (flag set by ``request_interrupt()`` or a ``SCW_INTERRUPT`` file)."""
    if _COMFY is not None:
        _COMFY.mm.throw_exception_if_processing_interrupted()
        return
    flag_file = os.environ.get("SCW_INTERRUPT")
    if _INTERRUPT.is_set() or (flag_file and os.path.exists(flag_file)):
        _INTERRUPT.clear()
        raise SamplingInterrupted("sampling was interrupted by the user; nothing is left patched")


# ----------------------------------------------------------------------------- model folders


_MODELS_DIR: str | None = None


def set_models_dir(path: str | None) -> None:
    """Built-in manager only: the ComfyUI-style ``models`` folder (else ``SCW_MODELS_DIR``)."""
    global _MODELS_DIR
    _MODELS_DIR = None if path is None else os.path.abspath(path)


def _models_dir() -> str | None:
    return _MODELS_DIR or os.environ.get("SCW_MODELS_DIR") or None


def _as_list(folder_names: str | Sequence[str]) -> list[str]:
    return [folder_names] if isinstance(folder_names, str) else list(folder_names)


def _builtin_dirs(folder_names: Sequence[str]) -> list[str]:
    root = _models_dir()
    if root is None:
        return []
    subs = dict.fromkeys(s for f in folder_names for s in FOLDER_ALIASES.get(f, (f,)))
    return [os.path.join(root, s) for s in subs]


def model_files(folder_names: str | Sequence[str]) -> list[str]:
    """Weight files (.safetensors/.sft) of the model folders, as relative names with '/' separators."""
    names: dict[str, None] = {}
    if _COMFY is not None:
        for folder in _as_list(folder_names):
            try:
                listed = _COMFY.folder_paths.get_filename_list(folder)
            except KeyError:
                continue
            names.update(dict.fromkeys(n for n in listed if n.lower().endswith(WEIGHT_EXTENSIONS)))
        return list(names)
    for base in _builtin_dirs(_as_list(folder_names)):
        for dirpath, _, files in os.walk(base, followlinks=True):
            for f in sorted(files):
                if f.lower().endswith(WEIGHT_EXTENSIONS):
                    names[os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/")] = None
    return sorted(names)


def model_path(folder_names: str | Sequence[str], name: str) -> str:
    """The full path of ``name`` in the first of the model folders that holds it; a clear error otherwise."""
    folders = _as_list(folder_names)
    if _COMFY is not None:
        for folder in folders:
            try:
                path = _COMFY.folder_paths.get_full_path(folder, name)
            except KeyError:
                path = None
            if path:
                return path
        where = " or ".join(f"models/{f}/" for f in folders)
    else:
        rel = os.path.normpath(name.replace("/", os.sep))
        if os.path.isabs(rel) or rel.startswith(".."):
            raise CheckpointError(f"model file name {name!r} must be relative to the models folder")
        for base in _builtin_dirs(folders):
            path = os.path.join(base, rel)
            if os.path.isfile(path):
                return path
        if _models_dir() is None:
            raise CheckpointError(
                f"no models folder is set, so {name!r} (a file for {'/'.join(folders)}) cannot be found - set the "
                "SCW_MODELS_DIR environment variable (or host.set_models_dir) to a ComfyUI-style models folder"
            )
        where = " or ".join(_builtin_dirs(folders))
    raise CheckpointError(f"model file {name!r} was not found in {where} - put the file there or pick one of "
                          f"{model_files(folders)[:5] or 'the files in that folder (it is empty)'}")
