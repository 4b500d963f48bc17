"""The built-in backend of ``host``, used when ComfyUI is absent (tests, the standalone runner).

It offers what ComfyUI offers inside ComfyUI, small: a patcher (ComfyUI's ModelPatcher idea), a memory
manager with a budget, devices, the free-memory query, model folders, progress and interruption.

When a network does not fit the budget the manager streams it instead (as ComfyUI's low-VRAM mode does): the
weights stay on the offload device with the patches written into them there, and each streaming unit (a U-Net
block, or any other module with its own weights) has its weights copied to the compute device just before its
forward and dropped right after it, so about one block's weights are on the compute device at a time.

A patcher holds a network (shared with its clones) and a list of weight patches. ``patch()`` keeps an
exact copy of every weight it changes and writes ``weight + sum(strength * delta)``; ``unpatch()`` puts the
copies back bit for bit. Which patcher's patches are currently written into a shared network is recorded
on the network itself, so loading one clone first takes another clone's patches off.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ..cascade.errors import CascadeError, CheckpointError, SamplingInterrupted
from .folders import FOLDER_ALIASES, WEIGHT_EXTENSIONS, missing_file_message, refused_in
from .streaming import has_blocks, largest_unit_bytes, start_streaming, stop_streaming, streamer_of

log = logging.getLogger(__name__)

# A patch is a delta tensor shaped like the weight, or a function of the (float32) weight returning one.
PatchValue = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
_STATE_ATTR = "_scw_patch_state"


def module_size(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (as ComfyUI's ``model_management.module_size``)."""
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def parse_bytes(text: str, what: str) -> int:
    """'8G', '512M', '1.5GB', '123456' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise CascadeError(f"{what}={text!r} is not a size; expected e.g. 8G, 512M or a number of bytes")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


@dataclass
class _SharedState:
    """Lives on the network: exact copies of patched weights, and whose patches are written in."""

    backup: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: tuple[int, str] | None = None  # (id of patcher, its patch version)


def _state(module: nn.Module) -> _SharedState:
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _SharedState()
        module.__dict__[_STATE_ATTR] = state
    return state


@dataclass(frozen=True)
class _Patch:
    strength: float
    value: PatchValue
    owner: str


class BuiltinPatcher:
    """A network plus weight patches; clones share the network and copy the patch list."""

    def __init__(self, model: nn.Module, load_device: torch.device, offload_device: torch.device,
                 size: int = 0) -> None:
        self.model = model
        self.load_device, self.offload_device = torch.device(load_device), torch.device(offload_device)
        self.size = size
        self.patches: dict[str, list[_Patch]] = {}
        self.version = uuid.uuid4().hex

    def model_size(self) -> int:
        if self.size <= 0:
            self.size = module_size(self.model)
        return self.size

    def clone(self) -> BuiltinPatcher:
        n = BuiltinPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        return n

    def add_patches(self, patches: dict[str, PatchValue], strength: float = 1.0, owner: str = "") -> list[str]:
        for key, value in patches.items():
            self.patches.setdefault(key, []).append(_Patch(float(strength), value, owner))
        self.version = uuid.uuid4().hex
        return list(patches)

    def remove_patches(self, owner: str) -> None:
        for key in list(self.patches):
            kept = [p for p in self.patches[key] if p.owner != owner]
            if kept:
                self.patches[key] = kept
            else:
                del self.patches[key]
        self.version = uuid.uuid4().hex

    def patch_owners(self) -> list[str]:
        return list(dict.fromkeys(p.owner for ps in self.patches.values() for p in ps))

    def is_patched(self) -> bool:
        """True when this patcher's current patches are the ones written into the network."""
        return _state(self.model).applied == (id(self), self.version)

    def patch(self, device: torch.device | None = None, stream: bool = False) -> nn.Module:
        """Move the network to ``device`` (default: the load device) with exactly this patcher's patches.

        ``stream``: keep the weights on the offload device (patched there) and bring each streaming unit to
        ``device`` only for its forward.
        """
        target = torch.device(device) if device is not None else self.load_device
        if not self.is_patched():
            self.unpatch()
        current = streamer_of(self.model)
        if current is not None and not (stream and current.device == target):
            stop_streaming(self.model)
        self.model.to(self.offload_device if stream else target)
        if stream:
            start_streaming(self.model, target)
        if self.is_patched():
            return self.model
        state = _state(self.model)
        params = dict(self.model.named_parameters())
        params.update(self.model.named_buffers())
        try:
            with torch.no_grad():
                for key, plist in self.patches.items():
                    weight = params[key]
                    state.backup[key] = weight.detach().to(self.offload_device, copy=True)
                    merged = weight.detach().to(torch.float32, copy=True)
                    for p in plist:
                        delta = p.value(merged) if callable(p.value) else p.value
                        merged += p.strength * delta.to(merged.device, torch.float32)
                    weight.copy_(merged.to(weight.dtype))
        except BaseException:
            self.unpatch()
            raise
        state.applied = (id(self), self.version)
        return self.model

    def unpatch(self) -> None:
        """Write back the exact weights saved before patching (whoever patched them)."""
        state = _state(self.model)
        if state.backup:
            params = dict(self.model.named_parameters())
            params.update(self.model.named_buffers())
            with torch.no_grad():
                for key, saved in state.backup.items():
                    params[key].copy_(saved)
            state.backup.clear()
        state.applied = None


class BuiltinManager:
    """Which networks are on the compute device, within a memory budget; least recently used leave first.

    The budget is ``budget_override`` (``host.set_memory_budget``), else ``SCW_MEMORY_BUDGET`` (e.g. "8G"), else 90% of the GPU or 80% of
    the RAM. When the compute device is the CPU, offloading only takes patches off: the weights stay in RAM.
    """

    def __init__(self, compute_device: Callable[[], torch.device]) -> None:
        self.compute_device = compute_device
        self.resident: list[BuiltinPatcher] = []  # least recently used first
        self.budget_override: int | None = None
        self.lock = threading.RLock()

    def budget(self) -> int:
        if self.budget_override is not None:
            return self.budget_override
        env = os.environ.get("SCW_MEMORY_BUDGET")
        if env:
            return parse_bytes(env, "SCW_MEMORY_BUDGET")
        dev = self.compute_device()
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev).total_memory * 0.9)
        try:
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)
        except (ValueError, OSError, AttributeError):
            return 1 << 62

    def used(self) -> int:
        return sum(self.resident_size(p) for p in self.resident)

    @staticmethod
    def resident_size(patcher: BuiltinPatcher) -> int:
        """Compute-device bytes of a resident network: all of it, or one streaming unit when streamed."""
        streamer = streamer_of(patcher.model)
        return streamer.max_unit_bytes() if streamer is not None else patcher.model_size()

    def evict(self, patcher: BuiltinPatcher) -> None:
        patcher.unpatch()
        stop_streaming(patcher.model)
        patcher.model.to(patcher.offload_device)
        self.resident = [p for p in self.resident if p.model is not patcher.model]
        log.debug("ComfyUI-StableCascade: offloaded %s", type(patcher.model).__name__)

    def load(self, patchers: Sequence[BuiltinPatcher], memory_required: int) -> None:
        with self.lock:
            wanted = {id(p.model) for p in patchers}
            resident_ids = {id(p.model) for p in self.resident}
            incoming = {id(p.model): p.model_size() for p in patchers if id(p.model) not in resident_ids}
            need = sum(incoming.values()) + int(memory_required)
            budget = self.budget()
            for victim in [p for p in self.resident if id(p.model) not in wanted]:
                if self.used() + need <= budget:
                    break
                self.evict(victim)
            # Still too big: stream the largest streamable incoming networks (each then needs about one block).
            streamed: set[int] = set()
            for p in sorted(patchers, key=lambda q: -incoming.get(id(q.model), 0)):
                if self.used() + need <= budget:
                    break
                if id(p.model) in incoming and id(p.model) not in streamed and self.streamable(p):
                    streamed.add(id(p.model))
                    need -= incoming[id(p.model)] - largest_unit_bytes(p.model)
            if self.used() + need > budget:
                log.warning("ComfyUI-StableCascade: %.0f MiB needed (weights + activations) with %.0f MiB resident "
                            "exceeds the memory budget of %.0f MiB; loading anyway (set SCW_MEMORY_BUDGET to change)",
                            need / 2**20, self.used() / 2**20, budget / 2**20)
            for p in patchers:
                self.resident = [q for q in self.resident if q.model is not p.model]
                stream = id(p.model) in streamed or (id(p.model) not in incoming and streamer_of(p.model) is not None)
                if stream:
                    log.info("ComfyUI-StableCascade: %s (%.0f MiB) does not fit the budget of %.0f MiB; streaming "
                             "it block by block from %s", type(p.model).__name__, p.model_size() / 2**20,
                             budget / 2**20, p.offload_device)
                p.patch(p.load_device, stream=stream)
                self.resident.append(p)

    @staticmethod
    def streamable(patcher: BuiltinPatcher) -> bool:
        """Networks made of U-Net blocks (Stage C, Stage B) are streamed; others always load whole."""
        return has_blocks(patcher.model)

    def release(self, patchers: Sequence[BuiltinPatcher]) -> None:
        with self.lock:
            for p in patchers:
                p.unpatch()

    def unload_all(self) -> None:
        with self.lock:
            for p in list(self.resident):
                self.evict(p)


# ----------------------------------------------------------------------------- the backend


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA driver's count, else the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class _ProgressHook:
    """The built-in progress bar: forwards every update to ``BuiltinBackend.progress_hook`` when one is set."""

    def __init__(self, backend: BuiltinBackend, total: int) -> None:
        self.backend, self.total = backend, total

    def update(self, value: int, preview: Any) -> None:
        if self.backend.progress_hook is not None:
            self.backend.progress_hook(value, self.total, preview)


class BuiltinBackend:
    """The host surface without ComfyUI; ``host`` forwards every call to one backend object."""

    in_comfyui = False

    def __init__(self) -> None:
        self.manager = BuiltinManager(self.compute_device)
        self.models_dir: str | None = None
        self.input_dir: str | None = None  # ComfyUI's input/ (the standalone runner sets it)
        self.output_dir: str | None = None  # ComfyUI's output/ (the standalone runner sets it)
        self.progress_hook: Callable[[int, int, Any], None] | None = None
        self.interrupt = threading.Event()

    # ---- devices and layers
    def compute_device(self) -> torch.device:
        name = os.environ.get("SCW_DEVICE")
        if name:
            return torch.device(name)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def offload_device(self) -> torch.device:
        return torch.device("cpu")

    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")

    def soft_empty_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def operations(self, manual_cast: bool) -> Any:
        return nn

    def free_memory(self, device: torch.device) -> int:
        return available_memory(device)

    # ---- patchers and memory
    def make_patcher(self, module: nn.Module, placement: str) -> BuiltinPatcher:
        return BuiltinPatcher(module, self.compute_device(), self.offload_device())

    def add_patches(self, patcher: BuiltinPatcher, patches: dict[str, PatchValue], strength: float,
                    key: str) -> list[str]:
        return patcher.add_patches(patches, strength, key)

    def remove_patches(self, patcher: BuiltinPatcher, key: str) -> None:
        patcher.remove_patches(key)

    def patch_owners(self, patcher: BuiltinPatcher) -> list[str]:
        return patcher.patch_owners()

    def load(self, patchers: Sequence[BuiltinPatcher], memory_required: int) -> None:
        self.manager.load(patchers, memory_required)

    def release(self, patchers: Sequence[BuiltinPatcher]) -> None:
        self.manager.release(patchers)

    def unload_all(self) -> None:
        self.manager.unload_all()

    def forget(self, patchers: Sequence[BuiltinPatcher]) -> None:
        for patcher in patchers:
            self.manager.evict(patcher)

    def loaded_modules(self) -> list[nn.Module]:
        return [p.model for p in self.manager.resident]

    def copy_network(self, module: nn.Module) -> nn.Module:
        """An independent copy of a (possibly patched) network; the patch record with its backups of the base
        weights stays with the original, or loading the copy would write the stale base back over it."""
        twin = copy.deepcopy(module)
        twin.__dict__.pop(_STATE_ATTR, None)
        return twin

    # ---- progress and interruption
    def progress_bar(self, total: int) -> _ProgressHook:
        return _ProgressHook(self, total)

    def request_interrupt(self, value: bool) -> None:
        if value:
            self.interrupt.set()
        else:
            self.interrupt.clear()

    def check_interrupt(self) -> None:
        flag_file = os.environ.get("SCW_INTERRUPT")
        if self.interrupt.is_set() or (flag_file and os.path.exists(flag_file)):
            self.interrupt.clear()
            raise SamplingInterrupted("sampling was interrupted by the user; nothing is left patched")

    # ---- model folders
    def _root(self) -> str | None:
        return self.models_dir or os.environ.get("SCW_MODELS_DIR") or None

    def _dirs(self, folder_names: Sequence[str]) -> list[str]:
        root = self._root()
        if root is None:
            return []
        subs = dict.fromkeys(s for f in folder_names for s in FOLDER_ALIASES.get(f, (f,)))
        return [os.path.join(root, s) for s in subs]

    def model_files(self, folder_names: Sequence[str]) -> list[str]:
        names: dict[str, None] = {}
        for base in self._dirs(folder_names):
            for dirpath, _, files in os.walk(base, followlinks=True):
                for f in sorted(files):
                    if f.lower().endswith(WEIGHT_EXTENSIONS):
                        names[os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/")] = None
        return sorted(names)

    def model_path(self, folder_names: Sequence[str], name: str) -> str:
        rel = os.path.normpath(name.replace("/", os.sep))
        if os.path.isabs(rel) or rel.startswith(".."):
            raise CheckpointError(f"model file name {name!r} must be relative to the models folder")
        for base in self._dirs(folder_names):
            path = os.path.join(base, rel)
            if os.path.isfile(path):
                return path
        if self._root() is None:
            raise CheckpointError(
                f"no models folder is set, so {name!r} (a file for {'/'.join(folder_names)}) cannot be found - set "
                "the SCW_MODELS_DIR environment variable (or host.set_models_dir) to a ComfyUI-style models folder"
            )
        where = " or ".join(self._dirs(folder_names))
        raise CheckpointError(missing_file_message(name, where, self.model_files(folder_names),
                                                   self.refused_files(folder_names)))

    def refused_files(self, folder_names: Sequence[str]) -> list[tuple[str, str]]:
        """(name, why) of the files in the model folders that the pack will not read (pickles, other formats)."""
        return refused_in(self._dirs(folder_names))

    def save_folder(self, folder_name: str) -> str:
        # Without a models folder, ./models (ComfyUI's layout) so a headless training run still has somewhere to go.
        sub = FOLDER_ALIASES.get(folder_name, (folder_name,))[0]
        return os.path.abspath(os.path.join(self._root() or "models", sub))

    def input_directory(self) -> str:
        return os.path.abspath(self.input_dir or os.environ.get("SCW_INPUT_DIR") or "input")

    def output_directory(self) -> str:
        return os.path.abspath(self.output_dir or os.environ.get("SCW_OUTPUT_DIR") or "output")

    def progress_text(self, text: str, node_id: str | None) -> None:
        log.info("ComfyUI-StableCascade: %s", text)


def load() -> BuiltinBackend:
    """The built-in backend (always available)."""
    return BuiltinBackend()

