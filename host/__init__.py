"""The host: everything the pack asks of the program it runs in, behind one facade.

Two backends offer the same surface: ``host.comfyui`` (ComfyUI's memory manager, ``ModelPatcher``, model
folders, progress bar and interrupt flag; the only code that imports comfy) and ``host.builtin`` (a small
manager with a memory budget, for tests and the standalone runner). The backend is chosen once, at import;
callers never ask which one runs. Set ``SCW_NO_COMFY=1`` to use the built-in one even inside ComfyUI.

- networks: ``wrap(module, kind) -> ModelHandle`` (clones, weight patches, keyed attachments);
  ``using(handles, memory_required)`` loads them for a block and takes patches back off on any error;
  ``load`` / ``release`` / ``unload_all`` / ``forget``;
- training: ``trainable_copy(handle)`` (an independent network the optimizer may update) and
  ``frozen(handle)`` (the loaded network for a frozen base: autograd flows through it, nothing updates it);
- devices and layers: ``compute_device()``, ``offload_device()``, ``intermediate_device()``,
  ``operations(manual_cast)``, ``free_memory(device)``;
- ``progress(total).update(i, preview_image)``, ``check_interrupt()`` / ``request_interrupt()``;
- ``model_files(folders)`` / ``model_path(folders, name)`` / ``save_folder(folder)``; ``input_directory()`` /
  ``output_directory()``; ``progress_text(text, node_id)``;
- inside ComfyUI: ``to_core_model(handle)`` and ``from_core_model`` / ``from_core_clip`` / ``from_core_vae``
  (core's MODEL, CLIP and VAE both ways, host/core_interop.py; outside they raise a CascadeError saying so);
- the standalone runner's --comfyui: ``comfyui_runtime_modules()`` (ComfyUI's nodes, execution, folder_paths...).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..cascade.errors import CascadeError
from ..cascade.kinds import KINDS
from . import builtin, comfyui
from .handles import ModelHandle

log = logging.getLogger(__name__)

_BUILTIN = builtin.load()
BACKEND: Any = comfyui.load() or _BUILTIN


def in_comfyui() -> bool:
    """True when ComfyUI's modules are importable and used."""
    return bool(BACKEND.in_comfyui)


# ----------------------------------------------------------------------------- devices and layers


def compute_device() -> torch.device:
    """Where networks run: ComfyUI's torch device; outside, ``SCW_DEVICE`` or CUDA when present, else CPU."""
    return BACKEND.compute_device()


def offload_device() -> torch.device:
    """Where idle networks wait: ComfyUI's ``unet_offload_device()``; outside, the CPU."""
    return BACKEND.offload_device()


def intermediate_device() -> torch.device:
    """Where outputs between nodes (latents, conditioning, images) live: the CPU unless ComfyUI says otherwise."""
    return BACKEND.intermediate_device()


def soft_empty_cache() -> None:
    """Return cached accelerator memory to the driver (ComfyUI's ``soft_empty_cache``)."""
    BACKEND.soft_empty_cache()


def operations(manual_cast: bool = False) -> Any:
    """The layer namespace networks are built with (``Linear``, ``Conv2d``, ``ConvTranspose2d``, ...).

    Inside ComfyUI: ``comfy.ops.disable_weight_init`` (its layers can stream weights in low-VRAM mode), or
    ``comfy.ops.manual_cast`` when the weights are stored in another dtype than the one they compute in (the
    seam a quantized-weight format plugs into). Outside: ``torch.nn``.
    """
    return BACKEND.operations(bool(manual_cast))


def free_memory(device: torch.device | None = None) -> int:
    """Bytes free on ``device`` (default: the compute device), as the memory manager sees it."""
    return BACKEND.free_memory(torch.device(device) if device is not None else compute_device())


# ----------------------------------------------------------------------------- model handles


def wrap(module: nn.Module, kind: str) -> ModelHandle:
    """Put a loaded network under the host's memory manager for inference; ``kind`` (a ``cascade.kinds``
    name) picks its devices. The network is switched to eval mode with gradients off: inference never
    trains it, and training goes through ``trainable_copy`` / ``frozen``."""
    placement = KINDS[kind].placement if kind in KINDS else "diffusion"
    module.eval().requires_grad_(False)
    return ModelHandle(BACKEND.make_patcher(module, placement), kind, BACKEND)


def module_of(handle: ModelHandle | nn.Module) -> nn.Module:
    """The network of a handle (a bare module is returned as it is)."""
    return handle.module if isinstance(handle, ModelHandle) else handle


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
    BACKEND.load(_patchers(handles), int(memory_required))


def release(handles: Sequence[ModelHandle | None]) -> None:
    """After an error or an interrupt: take the patches off again (the built-in manager; ComfyUI restores
    base weights itself when another clone loads)."""
    BACKEND.release(_patchers(handles))


@contextlib.contextmanager
def using(handles: Sequence[ModelHandle | None], memory_required: int = 0) -> Iterator[None]:
    """``load`` the handles for the block; on any exception (interrupts included) ``release`` them."""
    load(handles, memory_required)
    try:
        yield
    except BaseException:
        release(handles)
        raise


def unload_all() -> None:
    """Move every network to its offload device with its base weights restored."""
    BACKEND.unload_all()


def forget(values: Iterable[Any]) -> None:
    """The caller drops these node outputs, so their networks may leave the compute device (the built-in
    manager evicts them; inside ComfyUI its execution cache decides)."""
    BACKEND.forget([v.patcher for v in values if isinstance(v, ModelHandle)])


def loaded_handles() -> list[nn.Module]:
    """The networks the backend holds on the compute device, least recently used first."""
    return BACKEND.loaded_modules()


def set_memory_budget(nbytes: int | None) -> None:
    """Built-in manager: override the budget (bytes; None restores ``SCW_MEMORY_BUDGET`` / detection)."""
    _BUILTIN.manager.budget_override = None if nbytes is None else int(nbytes)


def memory_budget() -> int:
    """Built-in manager: the budget it loads networks within (bytes)."""
    return _BUILTIN.manager.budget()


# ----------------------------------------------------------------------------- core's MODEL, CLIP and VAE


def _core_interop(what: str) -> Callable[..., Any]:
    found = getattr(BACKEND, what, None)
    if found is None:
        raise CascadeError(f"{what}: ComfyUI core's MODEL, CLIP and VAE exist only inside ComfyUI, and this run has "
                           "no ComfyUI - run the workflow in ComfyUI, or use the pack's loaders instead of core's")
    return found


def to_core_model(handle: ModelHandle) -> Any:
    """The handle's Stage C / B as a core MODEL (a ComfyUI ModelPatcher) for KSampler and core's model nodes: the
    pack's network and patches under core's model_sampling (host/core_interop.py). Inside ComfyUI only."""
    return _core_interop("to_core_model")(handle)


def from_core_model(model: Any, stage: str) -> ModelHandle:
    """A core MODEL holding Stable Cascade Stage ``stage`` ("c" / "b") as a handle the pack's samplers take."""
    return _core_interop("from_core_model")(model, stage)


def from_core_clip(clip: Any) -> ModelHandle:
    """A core CLIP of type stable_cascade as a text-encoder handle (core's tokenizer and encoder compute)."""
    return _core_interop("from_core_clip")(clip)


def from_core_vae(vae: Any) -> ModelHandle:
    """A core VAE holding Stage A as a Stage A handle (core's network decodes and encodes)."""
    return _core_interop("from_core_vae")(vae)


# ----------------------------------------------------------------------------- training


def trainable_copy(handle: ModelHandle, dtype: torch.dtype | None = None) -> nn.Module:
    """An independent copy of the handle's network, with its patches merged, for a full fine-tune.

    The copy is on the compute device, in train mode, every parameter requiring grad (in ``dtype`` when
    given): an optimizer may update it freely. The handle's network is left exactly as it was.
    """
    with using([handle]):
        module = BACKEND.copy_network(handle.module)
    release([handle])
    if dtype is not None:
        module = module.to(dtype)
    return module.to(compute_device()).train().requires_grad_(True)


@contextlib.contextmanager
def frozen(handle: ModelHandle, memory_required: int = 0) -> Iterator[nn.Module]:
    """The handle's network loaded (patches applied) as the frozen base of a training step.

    Autograd flows through it to whatever is trained around it (adapters, inputs); its parameters never
    require grad, so no optimizer sees them. After the block the built-in manager takes the patches off again
    (the weights are bit-identical to before); inside ComfyUI the patched clone stays loaded and ComfyUI
    restores the base weights from its backups when another clone loads, as for inference.
    """
    module = handle.module
    flags = [p.requires_grad for p in module.parameters()]
    with using([handle], memory_required):
        module.requires_grad_(False)
        try:
            yield module
        finally:
            for p, flag in zip(module.parameters(), flags):
                p.requires_grad_(flag)
    release([handle])


# ----------------------------------------------------------------------------- progress, previews, interrupts


def set_progress_hook(hook: Callable[[int, int, Any], None] | None) -> None:
    """Built-in backend: ``hook(value, total, preview_image_or_None)`` is called on every update."""
    _BUILTIN.progress_hook = hook


def preview_image(images: torch.Tensor) -> Any:
    """The first image of a (B, 3, H, W) batch in [0, 1] as a PIL image (what ComfyUI's previews carry)."""
    from PIL import Image

    img = images[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


_as_pil = preview_image  # Progress.update's parameter shadows the function's name


class Progress:
    """Step progress of one node (inside ComfyUI a ``comfy.utils.ProgressBar``; previews go to the UI)."""

    def __init__(self, total: int) -> None:
        self.total, self.current, self.last_preview = int(total), 0, None
        self._bar = BACKEND.progress_bar(self.total)

    def update(self, value: int, preview_image: Any = None) -> None:
        """Set progress to ``value`` of ``total``; ``preview_image`` is a PIL image or a (B, 3, H, W) tensor."""
        if isinstance(preview_image, torch.Tensor):
            preview_image = _as_pil(preview_image)
        self.current = min(int(value), self.total)
        self.last_preview = preview_image
        self._bar.update(self.current, preview_image)


def progress(total: int) -> Progress:
    return Progress(total)


def request_interrupt(value: bool = True) -> None:
    """Ask running samplers to stop at their next step (ComfyUI: its global interrupt flag)."""
    BACKEND.request_interrupt(bool(value))


def check_interrupt() -> None:
    """Raise if the user asked to stop: ComfyUI's ``InterruptProcessingException`` inside ComfyUI,
    ``SamplingInterrupted`` outside (flag set by ``request_interrupt()`` or a ``SCW_INTERRUPT`` file)."""
    BACKEND.check_interrupt()


# ----------------------------------------------------------------------------- model folders


def set_models_dir(path: str | None) -> None:
    """Built-in backend: the ComfyUI-style ``models`` folder (else ``SCW_MODELS_DIR``)."""
    _BUILTIN.models_dir = None if path is None else os.path.abspath(path)


def _as_list(folder_names: str | Sequence[str]) -> list[str]:
    return [folder_names] if isinstance(folder_names, str) else list(folder_names)


def model_files(folder_names: str | Sequence[str]) -> list[str]:
    """Weight files (.safetensors/.sft) of the model folders, as relative names with '/' separators."""
    return BACKEND.model_files(_as_list(folder_names))


def refused_files(folder_names: str | Sequence[str]) -> list[tuple[str, str]]:
    """(relative name, why) of the files in the model folders that the pack will not read (pickles, GGUF,
    unknown extensions), so a "not found" can say what is there instead."""
    return BACKEND.refused_files(_as_list(folder_names))


def model_path(folder_names: str | Sequence[str], name: str) -> str:
    """The full path of ``name`` in the first of the model folders that holds it; a clear error otherwise."""
    return BACKEND.model_path(_as_list(folder_names), name)


def save_folder(folder_name: str) -> str:
    """Where a new file of a model folder is written (e.g. a trained LoRA in ``loras``): ComfyUI's first path of
    that folder; outside, that folder of the models folder (``./models`` when none is set)."""
    return BACKEND.save_folder(folder_name)


# ----------------------------------------------------------------------------- input and output folders


def set_io_dirs(input_dir: str | None = None, output_dir: str | None = None) -> None:
    """Built-in backend: ComfyUI-style input and output folders (else ``SCW_INPUT_DIR`` / ``SCW_OUTPUT_DIR``,
    else ./input and ./output); the standalone runner sets them from its options."""
    _BUILTIN.input_dir, _BUILTIN.output_dir = input_dir, output_dir


def input_directory() -> str:
    """ComfyUI's input folder (user images, training sets), absolute."""
    return BACKEND.input_directory()


def output_directory() -> str:
    """ComfyUI's output folder, absolute."""
    return BACKEND.output_directory()


def progress_text(text: str, node_id: str | None = None) -> None:
    """A line of status text under a running node (ComfyUI's progress text; outside, a log line)."""
    BACKEND.progress_text(text, node_id)


# ----------------------------------------------------------------------------- the standalone runner's --comfyui


def comfyui_runtime_modules() -> Any:
    """ComfyUI's own modules (``nodes``, ``execution``, ``folder_paths``, ``server``, ...) for the standalone
    runner's --comfyui mode, which runs core and custom nodes through them (standalone/comfy_runtime.py); a
    CascadeError naming why when this process does not run on ComfyUI's backend."""
    if not BACKEND.in_comfyui:
        why = comfyui.UNAVAILABLE or "ComfyUI was not on the Python path when the pack was imported"
        raise CascadeError(f"ComfyUI is not in use: {why}")
    return comfyui.runtime_modules()
