"""Model handles: a network, its backend's patcher, its weight patches and its keyed attachments.

A handle is what the pack's MODEL-like sockets carry. Clones share the network's weights and copy the
patch list and the attachments, so patching or attaching to a clone (a LoRA, a ControlNet) never changes
what the original computes. Attachments ride on the handle under a key, the way ComfyUI's ``ModelPatcher``
keeps keyed wrappers and callbacks: the pipeline asks the handle for them (``attachment_handles``,
``attachment_memory``, ``wrap_network``) and never knows which patch module made them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..cascade.errors import CascadeError, ShapeError
from .builtin import PatchValue

NetworkFn = Callable[..., torch.Tensor]


class Attachment(Protocol):
    """What rides on a handle under a key (e.g. ``model_patches.controlnet.ControlSet``).

    ``handles()``: networks to load together with the handle's own; ``memory()``: activation bytes they
    add; ``wrap(network_fn, context)``: the network call with the attachment's effect, where ``context``
    describes the sampling run (schedule position -> noise condition, latent shape, the handle itself).
    """

    def handles(self) -> list[ModelHandle]: ...

    def memory(self) -> int: ...

    def wrap(self, network_fn: NetworkFn, context: dict[str, Any]) -> NetworkFn: ...


class ModelHandle:
    """A network under a host backend (ComfyUI's ``ModelPatcher`` inside ComfyUI, a built-in patcher outside)."""

    def __init__(self, patcher: Any, kind: str, backend: Any) -> None:
        self.patcher = patcher
        self.kind = kind
        self.backend = backend
        self.attachments: dict[str, Attachment] = {}
        self._network: nn.Module | None = None  # see with_network

    @property
    def module(self) -> nn.Module:
        """The network callers compute with: the patcher's, or the view given to ``with_network``."""
        return self._network if self._network is not None else self.patcher.model

    def clone(self) -> ModelHandle:
        twin = ModelHandle(self.patcher.clone(), self.kind, self.backend)
        twin.attachments = dict(self.attachments)
        twin._network = self._network
        return twin

    def with_network(self, network: nn.Module) -> ModelHandle:
        """A clone whose ``module`` is ``network``, a view that computes with this handle's network's own layers
        (e.g. ``TextEncoder.clone()`` with learned tokens): the patcher stays a clone of this one, so the host's
        memory manager sees one network, counts its weights once, loads it (with the clone's patches) whenever
        the view is used, and never holds the view's copy of the shared weights beside the original's.

        Every state-dict key of the patcher's network must be in ``network`` with the same shape, except keys
        ``network`` replaces with its own tensors (listed in ``own_keys``): patches go to the patcher's network.
        """
        base = dict(self.patcher.model.state_dict(keep_vars=True))
        view = dict(network.state_dict(keep_vars=True))
        missing = [k for k in base if k not in view]
        if missing:
            raise CascadeError(f"{self.kind}: the view lacks {len(missing)} weights of the network it should share, "
                               f"e.g. {missing[:3]}; build it with the network's clone() method")
        own = [k for k, t in base.items() if view[k] is not t]
        unexpected = [k for k in own if k not in getattr(network, "own_keys", lambda: ())()]
        if unexpected:
            raise CascadeError(f"{self.kind}: the view holds other tensors than the network for {unexpected[:3]}; "
                               "it must share every weight it does not replace on purpose (own_keys)")
        twin = self.clone()
        twin._network = network
        return twin

    def model_size(self) -> int:
        return int(self.patcher.model_size())

    # ---- weight patches
    def add_patches(self, patches: dict[str, PatchValue], strength: float = 1.0, key: str = "") -> list[str]:
        """Add weight patches: ``{state_dict_key: delta tensor | fn(weight_fp32) -> delta}``, scaled by strength.

        ``key`` names the owner (e.g. ``"scw_lora:file.safetensors"``) so ``remove_patches(key)`` can take them
        off again. Returns the patched keys; keys the network lacks raise ``CascadeError``.
        """
        _check_patch_keys(self.module, patches, self.kind)
        return self.backend.add_patches(self.patcher, patches, strength, key)

    def remove_patches(self, key: str) -> None:
        """Drop every patch added with owner ``key``."""
        self.backend.remove_patches(self.patcher, key)

    def patch_keys(self) -> list[str]:
        """The owners of this handle's patches, in the order they were added."""
        return self.backend.patch_owners(self.patcher)

    # ---- attachments
    def with_attachment(self, key: str, attachment: Attachment | None) -> ModelHandle:
        """A clone carrying ``attachment`` under ``key`` (None removes it); this handle is not changed."""
        twin = self.clone()
        if attachment is None:
            twin.attachments.pop(key, None)
        else:
            twin.attachments[key] = attachment
        return twin

    def attachment_handles(self) -> list[ModelHandle]:
        return [h for a in self.attachments.values() for h in a.handles()]

    def attachment_memory(self) -> int:
        return sum(int(a.memory()) for a in self.attachments.values())

    def wrap_network(self, network_fn: NetworkFn, context: dict[str, Any]) -> NetworkFn:
        """The network call with every attachment's wrapper, first attached innermost."""
        for attachment in self.attachments.values():
            network_fn = attachment.wrap(network_fn, {**context, "handle": self})
        return network_fn

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
