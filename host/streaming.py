"""Layer-by-layer weight streaming for the built-in manager (headless), as ComfyUI's low-VRAM mode does inside
ComfyUI: when a network does not fit the memory budget it stays on the offload device, and forward hooks move one
streaming unit at a time (a ResBlock, TimestepBlock or AttnBlock, or any other module with its own weights) to
the compute device for its forward and drop it afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_STREAM_ATTR = "_scw_stream_state"


def _is_block(module: nn.Module) -> bool:
    """A U-Net block streamed as one unit (parameters it reads outside a child's forward included)."""
    from ..cascade.common import AttnBlock, ResBlock, TimestepBlock

    return isinstance(module, (ResBlock, AttnBlock, TimestepBlock))


def streaming_units(model: nn.Module) -> list[nn.Module]:
    """The modules a streamed network moves one at a time: every U-Net block, and every other module that
    holds parameters or buffers of its own (outside a block). Each is called as a module by the networks."""
    units: list[nn.Module] = []

    def walk(mod: nn.Module) -> None:
        if _is_block(mod) or any(True for _ in mod.parameters(recurse=False)) or any(
                True for _ in mod.buffers(recurse=False)):
            units.append(mod)
            return
        for child in mod.children():
            walk(child)

    walk(model)
    return units


def _tensors_of(unit: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    out = []
    for mod in unit.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out.append((mod, name, t))
    return out


class _Streamer:
    """Forward hooks that bring one unit's weights to the compute device for its forward, and its own accounting.

    The offload copies are the parameters' own tensors (patches are written into them before streaming starts),
    so a unit's forward sees exactly the patched weights and dropping them needs no copy back.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.units = streaming_units(model)
        self.offloaded = {id(u): [(m, n, t.data) for m, n, t in _tensors_of(u)] for u in self.units}
        self.unit_bytes = {id(u): sum(t.nelement() * t.element_size() for _, _, t in self.offloaded[id(u)])
                           for u in self.units}
        self.resident: dict[int, int] = {}  # id(unit) -> bytes now on the compute device
        self.peak_resident = 0
        self.loads = 0
        self.handles = [model.register_forward_pre_hook(self._start)]
        for u in self.units:
            self.handles.append(u.register_forward_pre_hook(self._bring))
            self.handles.append(u.register_forward_hook(self._drop))

    def max_unit_bytes(self) -> int:
        return max(self.unit_bytes.values(), default=0)

    def _start(self, module: nn.Module, args: Any) -> None:
        # A forward that raised left its unit on the device (no post-hook ran): drop it before the next one.
        for uid in list(self.resident):
            self._restore(uid)

    def _bring(self, unit: nn.Module, args: Any) -> None:
        for mod, name, t in self.offloaded[id(unit)]:
            getattr(mod, name).data = t.to(self.device, non_blocking=True)
        self.resident[id(unit)] = self.unit_bytes[id(unit)]
        self.peak_resident = max(self.peak_resident, sum(self.resident.values()))
        self.loads += 1

    def _restore(self, uid: int) -> None:
        for mod, name, t in self.offloaded[uid]:
            getattr(mod, name).data = t
        self.resident.pop(uid, None)

    def _drop(self, unit: nn.Module, args: Any, output: Any) -> None:
        self._restore(id(unit))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for uid in list(self.offloaded):
            self._restore(uid)


def streamer_of(model: nn.Module) -> _Streamer | None:
    """The streaming hooks on ``model`` (None: it is loaded whole or offloaded)."""
    return model.__dict__.get(_STREAM_ATTR)


def stop_streaming(model: nn.Module) -> None:
    streamer = model.__dict__.pop(_STREAM_ATTR, None)
    if streamer is not None:
        streamer.remove()


def start_streaming(model: nn.Module, device: torch.device) -> None:
    """Hook ``model`` so each streaming unit runs on ``device`` while its weights wait on their current device."""
    if streamer_of(model) is None:
        model.__dict__[_STREAM_ATTR] = _Streamer(model, device)


def largest_unit_bytes(model: nn.Module) -> int:
    """Bytes of the largest streaming unit: what a streamed network holds on the compute device at a time."""
    return max((sum(t.nelement() * t.element_size() for _, _, t in _tensors_of(u)) for u in streaming_units(model)),
               default=0)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` is made of U-Net blocks (Stage C, Stage B): only those are streamed."""
    return any(_is_block(m) for m in model.modules())
