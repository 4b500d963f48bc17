"""The ComfyUI backend of ``host``: the only module of the pack that imports ``comfy`` or ``folder_paths``.

Every call goes to ComfyUI's own machinery: ``ModelPatcher`` and its keyed callbacks, ``load_models_gpu``,
the device functions of ``model_management``, ``comfy.ops`` layers, ``folder_paths``, ``ProgressBar`` and
the interrupt flag. ``load()`` returns None when ComfyUI is not importable (or ``SCW_NO_COMFY=1``), and
``host`` then uses the built-in backend.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..cascade.errors import CheckpointError
from . import core_interop as interop
from .builtin import PatchValue
from .folders import WEIGHT_EXTENSIONS, missing_file_message, refused_in

log = logging.getLogger(__name__)

# Key under which the pack registers its ModelPatcher callbacks, so they never collide with other packs.
PATCH_OWNER = "scw"
_LAYERS = ("Linear", "Conv2d", "ConvTranspose2d", "LayerNorm", "GroupNorm", "BatchNorm2d", "Embedding")


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


class ComfyBackend:
    """The host surface on ComfyUI's modules (``comfy`` is the namespace of the imported modules)."""

    in_comfyui = True

    def __init__(self, comfy: SimpleNamespace) -> None:
        self.c = comfy
        self._adapter: type | None = None
        self._core_modules: SimpleNamespace | None = None

    # ---- devices and layers
    def compute_device(self) -> torch.device:
        return self.c.mm.get_torch_device()

    def offload_device(self) -> torch.device:
        return self.c.mm.unet_offload_device()

    def intermediate_device(self) -> torch.device:
        return self.c.mm.intermediate_device()

    def soft_empty_cache(self) -> None:
        self.c.mm.soft_empty_cache()

    def operations(self, manual_cast: bool) -> Any:
        # disable_weight_init layers can stream weights in low-VRAM mode; manual_cast ones also compute in the
        # activation dtype when the weights are stored in another. BatchNorm2d is not in comfy.ops.
        source = self.c.ops.manual_cast if manual_cast else self.c.ops.disable_weight_init
        return SimpleNamespace(**{n: getattr(source, n, getattr(nn, n)) for n in _LAYERS})

    def free_memory(self, device: torch.device) -> int:
        return int(self.c.mm.get_free_memory(device))

    # ---- patchers and memory
    def make_patcher(self, module: nn.Module, placement: str) -> Any:
        mm = self.c.mm
        if placement == "vae":
            load, offload = mm.vae_device(), mm.vae_offload_device()
        elif placement == "text":
            load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
        else:
            load, offload = mm.get_torch_device(), mm.unet_offload_device()
        patcher = interop.patcher_class(self.c)(module, load_device=load, offload_device=offload)
        patcher.add_callback_with_key(self.c.callbacks.ON_LOAD, PATCH_OWNER, _patch_unreachable_weights)
        return patcher

    def _adapter_class(self) -> type:
        """A ComfyUI weight adapter that adds ``strength * delta`` (a tensor, or a function of the weight)."""
        if self._adapter is None:
            class ScwDelta(self.c.adapter_base):
                name = "scw_delta"

                def __init__(self, value: PatchValue, owner: str) -> None:
                    self.value, self.scw_owner = value, owner
                    self.loaded_keys, self.weights = set(), [value] if isinstance(value, torch.Tensor) else []

                def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                                     intermediate_dtype=torch.float32, original_weight=None):
                    delta = self.value(weight) if callable(self.value) else self.value
                    delta = delta.to(weight.device, weight.dtype)
                    return weight.add_(function(strength * delta) if function is not None else strength * delta)

            self._adapter = ScwDelta
        return self._adapter

    def add_patches(self, patcher: Any, patches: dict[str, PatchValue], strength: float, key: str) -> list[str]:
        adapter = self._adapter_class()
        return list(patcher.add_patches({k: adapter(v, key) for k, v in patches.items()}, strength_patch=strength))

    def remove_patches(self, patcher: Any, key: str) -> None:
        # ModelPatcher has no removal by owner; its patch lists are rebuilt without this owner's entries and
        # patches_uuid renewed, so ComfyUI re-patches the next time the clone loads.
        for weight_key in list(patcher.patches):
            kept = [p for p in patcher.patches[weight_key] if getattr(p[1], "scw_owner", None) != key]
            if kept:
                patcher.patches[weight_key] = kept
            else:
                del patcher.patches[weight_key]
        patcher.patches_uuid = uuid.uuid4()

    def patch_owners(self, patcher: Any) -> list[str]:
        owners = [getattr(p[1], "scw_owner", "") for ps in patcher.patches.values() for p in ps]
        return list(dict.fromkeys(owners))

    def load(self, patchers: Sequence[Any], memory_required: int) -> None:
        self.c.mm.load_models_gpu(list(patchers), memory_required=int(memory_required))

    def release(self, patchers: Sequence[Any]) -> None:
        # ComfyUI keeps a patched clone loaded by design and restores the base weights itself when another
        # clone is loaded: nothing to undo here.
        return None

    def unload_all(self) -> None:
        self.c.mm.unload_all_models()

    def forget(self, patchers: Sequence[Any]) -> None:
        return None  # ComfyUI's execution cache and memory manager decide

    def copy_network(self, module: nn.Module) -> nn.Module:
        return copy.deepcopy(module)  # ModelPatcher keeps its backups on the patcher, not on the network

    def loaded_modules(self) -> list[nn.Module]:
        return [m.model.model for m in self.c.mm.current_loaded_models if m.model is not None]

    # ---- core's MODEL, CLIP and VAE, both ways (host/core_interop.py does the work with these modules)
    def _core(self) -> SimpleNamespace:
        if self._core_modules is None:
            # Imported on first use: ComfyUI has them loaded by then, and a pack import never depends on them.
            import comfy.ldm.cascade.stage_a
            import comfy.model_base
            import comfy.sdxl_clip
            import comfy.supported_models

            self._core_modules = SimpleNamespace(
                model_base=comfy.model_base, supported_models=comfy.supported_models, sdxl_clip=comfy.sdxl_clip,
                StageA=comfy.ldm.cascade.stage_a.StageA)
        return self._core_modules

    def to_core_model(self, handle: Any) -> Any:
        return interop.to_core_model(self.c, self._core(), handle, _patch_unreachable_weights, PATCH_OWNER)

    def from_core_model(self, model: Any, stage: str) -> Any:
        return interop.from_core_model(self._core(), model, stage, self)

    def from_core_clip(self, clip: Any) -> Any:
        return interop.from_core_clip(self._core(), clip, self)

    def from_core_vae(self, vae: Any) -> Any:
        return interop.from_core_vae(self._core(), vae, self)

    # ---- progress and interruption
    def progress_bar(self, total: int) -> Any:
        bar = self.c.utils.ProgressBar(total)
        size = int(getattr(self.c.args, "preview_size", 512))

        class _Bar:
            def update(self, value: int, preview: Any) -> None:
                bar.update_absolute(value, total, ("JPEG", preview, size) if preview is not None else None)

        return _Bar()

    def request_interrupt(self, value: bool) -> None:
        self.c.mm.interrupt_current_processing(value)

    def check_interrupt(self) -> None:
        self.c.mm.throw_exception_if_processing_interrupted()

    # ---- model folders
    def model_files(self, folder_names: Sequence[str]) -> list[str]:
        names: dict[str, None] = {}
        for folder in folder_names:
            try:
                listed = self.c.folder_paths.get_filename_list(folder)
            except KeyError:
                continue
            names.update(dict.fromkeys(n for n in listed if n.lower().endswith(WEIGHT_EXTENSIONS)))
        return list(names)

    def model_path(self, folder_names: Sequence[str], name: str) -> str:
        for folder in folder_names:
            try:
                path = self.c.folder_paths.get_full_path(folder, name)
            except KeyError:
                path = None
            if path:
                return path
        where = " or ".join(f"models/{f}/" for f in folder_names)
        raise CheckpointError(missing_file_message(name, where, self.model_files(folder_names),
                                                   self.refused_files(folder_names)))

    def refused_files(self, folder_names: Sequence[str]) -> list[tuple[str, str]]:
        """As the built-in backend's, over every folder ComfyUI registers for these names (extra_model_paths
        included)."""
        dirs: dict[str, None] = {}
        for folder in folder_names:
            try:
                dirs.update(dict.fromkeys(self.c.folder_paths.get_folder_paths(folder)))
            except KeyError:
                continue
        return refused_in(list(dirs))

    def save_folder(self, folder_name: str) -> str:
        return self.c.folder_paths.get_folder_paths(folder_name)[0]

    def input_directory(self) -> str:
        return self.c.folder_paths.get_input_directory()

    def output_directory(self) -> str:
        return self.c.folder_paths.get_output_directory()

    def progress_text(self, text: str, node_id: str | None) -> None:
        try:
            from server import PromptServer  # ComfyUI's server module (absent when comfy is used as a library)

            if node_id is not None and PromptServer.instance is not None:
                PromptServer.instance.send_progress_text(text, node_id)
                return
        except (ImportError, AttributeError):
            pass
        log.info("ComfyUI-StableCascade: %s", text)


def _register_gguf(folder_paths: Any) -> None:
    """Let ComfyUI list .gguf files in the diffusion-model folders (quantized Stage C / B), as ComfyUI-GGUF does
    for its own loaders: the extension is added to those folders' entries in ComfyUI's folder registry."""
    registry = getattr(folder_paths, "folder_names_and_paths", {})
    for name in ("diffusion_models", "unet"):
        if name in registry:
            paths, extensions = registry[name]
            registry[name] = (paths, set(extensions) | {".gguf"})
            getattr(folder_paths, "filename_list_cache", {}).pop(name, None)


NOTICE_EVENT = "scw.notice"  # what web/scw_results.js listens for


class BrowserNotices(logging.Handler):
    """Sends the pack's warnings (a demo network in use, a size rounded to a multiple of 8, a prompt over 77 tokens,
    ...) to the browser as a ``scw.notice`` event naming the node that was running; the pack's web extension shows
    each as a toast and on that node. The server log keeps them too (this handler only adds a destination)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from server import PromptServer  # ComfyUI's server module (absent when comfy is used as a library)

            server = getattr(PromptServer, "instance", None)
            if server is None:
                return
            text = record.getMessage().removeprefix("ComfyUI-StableCascade: ")
            server.send_sync(NOTICE_EVENT, {"text": text, "level": record.levelname.lower(),
                                            "node": server.last_node_id}, server.client_id)
        except Exception:  # a notice never breaks a run (the log line is written anyway)
            return


def _send_warnings_to_browser() -> None:
    """Attach one ``BrowserNotices`` to the pack's root logger (ComfyUI names the package after its folder)."""
    pack = logging.getLogger(__name__.rsplit(".", 2)[0])
    if not any(isinstance(h, BrowserNotices) for h in pack.handlers):
        pack.addHandler(BrowserNotices())


UNAVAILABLE: str | None = None  # why load() gave no backend, for the standalone runner's --comfyui message


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def load() -> ComfyBackend | None:
    """The ComfyUI backend, or None when ComfyUI's modules cannot be imported (or ``SCW_NO_COMFY=1``)."""
    global UNAVAILABLE
    if os.environ.get("SCW_NO_COMFY") == "1":
        UNAVAILABLE = "SCW_NO_COMFY=1 is set"
        return None
    try:
        from comfy.cli_args import args

        if "comfy.model_management" not in sys.modules and not _has_accelerator():
            # The pack imports ComfyUI itself (the standalone runner's --comfyui): no main.py parsed --cpu, and
            # ComfyUI's device setup would ask a CUDA that is not there.
            args.cpu = True
        import comfy.model_management
        import comfy.model_patcher
        import comfy.ops
        import comfy.patcher_extension
        import comfy.utils
        import comfy.weight_adapter.base
        import folder_paths
    except ImportError as exc:
        UNAVAILABLE = f"ComfyUI's modules do not import with {sys.executable} ({type(exc).__name__}: {exc})"
        return None
    _register_gguf(folder_paths)
    _send_warnings_to_browser()
    return ComfyBackend(SimpleNamespace(
        mm=comfy.model_management, patcher=comfy.model_patcher, ops=comfy.ops,
        callbacks=comfy.patcher_extension.CallbacksMP, utils=comfy.utils,
        adapter_base=comfy.weight_adapter.base.WeightAdapterBase, folder_paths=folder_paths, args=args))


def runtime_modules() -> SimpleNamespace:
    """ComfyUI's own top-level modules for the standalone runner's --comfyui mode (standalone/comfy_runtime.py
    drives them), imported in main.py's order: utils.extra_config before nodes, whose import puts comfy/ first on
    sys.path (where comfy/utils.py would shadow the utils package). ``server`` is None when it does not import."""
    import utils.extra_config  # noqa: I001 - first, before nodes (see above)
    import execution
    import folder_paths
    import hook_breaker_ac10a0
    import nodes

    try:
        import server
    except ImportError:
        server = None
    return SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, server=server,
                           extra_config=utils.extra_config, hook_breaker=hook_breaker_ac10a0)
