"""The seam of quantized weights: a tensor that stays quantized in memory, and layers that dequantize it.

``QTensor`` is a ``torch.Tensor`` subclass whose storage is the quantized data (fp8 values, or GGML blocks as
uint8) and which carries what is needed to expand it: the format (``qtype``), the logical shape, the dtype a
plain expansion gives, and an optional per-tensor scale (fp8). It survives ``module.to(device)``,
``state_dict()``, ``detach``/``clone`` and ``nn.Parameter`` (the quantized bytes move, nothing is expanded);
``module.to(dtype)`` leaves it alone, because ``is_floating_point()`` is False for it (its storage is not a
float tensor of the logical values). Any other use of it as numbers (``.to(dtype=...)``, ``F.linear``, ``*``)
sees the dequantized values, so code that is not quantization-aware (the packed attention's
``in_proj_weight.to(dtype=x.dtype)``) still computes correctly. In-place changes are refused: they would be
lost on a temporary expansion.

``OPS`` is the ``operations`` namespace every network constructor takes: ``torch.nn`` layers whose
``forward`` expands the weight to the activation's dtype and device for that one layer (the manual-cast
pattern; dense weights kept in higher precision are cast the same way), so peak memory holds one expanded
layer at a time. The same layers are used inside ComfyUI (ComfyUI-GGUF does the same with its own GGMLOps),
because core's manual-cast layers cannot expand GGML blocks.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CascadeError

# Functions that only look at the stored data: answered on the raw storage, never expanding it.
_RAW = {torch.Tensor.numel, torch.Tensor.nelement, torch.Tensor.element_size, torch.Tensor.data_ptr,
        torch.Tensor.untyped_storage, torch.Tensor.storage_offset, torch.Tensor.stride, torch.Tensor.is_contiguous,
        torch.Tensor.get_device, torch.Tensor.is_pinned, torch.Tensor.is_shared, torch.Tensor.is_complex,
        torch.Tensor._typed_storage, torch.Tensor.storage, torch.Tensor.__hash__}
# Functions that move or alias the stored data: the result is the same quantized tensor, elsewhere.
_KEEP = {torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.requires_grad_, torch.Tensor.share_memory_,
         torch.Tensor.pin_memory, torch.Tensor.cpu, torch.Tensor.contiguous, torch.Tensor.__deepcopy__}
_TO = {torch.Tensor.to, torch.Tensor.cuda}


class QTensor(torch.Tensor):
    """Quantized storage of a weight; see the module docstring. Build with ``QTensor.wrap``."""

    qtype: str
    logical_shape: torch.Size
    logical_dtype: torch.dtype
    scale: float | None
    expand: Callable[..., torch.Tensor]

    @classmethod
    def wrap(cls, raw: torch.Tensor, qtype: str, shape: Any, dtype: torch.dtype, scale: float | None,
             expand: Callable[..., torch.Tensor]) -> QTensor:
        """``raw``'s storage as a QTensor; ``expand(raw, qtype, shape, dtype, scale) -> dense tensor``."""
        with torch._C.DisableTorchFunctionSubclass():
            t = raw.detach().as_subclass(cls)
        t._set_meta(qtype, torch.Size(shape), dtype, scale, expand)
        return t

    def _set_meta(self, qtype: str, shape: torch.Size, dtype: torch.dtype, scale: float | None,
                  expand: Callable[..., torch.Tensor]) -> None:
        self.qtype, self.logical_shape, self.logical_dtype, self.scale, self.expand = qtype, shape, dtype, scale, expand

    def _copy_meta(self, other: QTensor) -> QTensor:
        self._set_meta(other.qtype, other.logical_shape, other.logical_dtype, other.scale, other.expand)
        return self

    @property
    def shape(self) -> torch.Size:  # the logical shape: load_state_dict and shape checks compare this
        return self.logical_shape

    def size(self, dim: int | None = None) -> Any:  # type: ignore[override]
        return self.logical_shape if dim is None else self.logical_shape[dim]

    def dim(self) -> int:  # type: ignore[override]
        return len(self.logical_shape)

    def raw(self) -> torch.Tensor:
        """The stored data as a plain tensor (no copy)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    def dense(self, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        """The dequantized weight, a plain tensor of the logical shape, in ``dtype`` on ``device``."""
        raw = self.raw()
        if device is not None and raw.device != torch.device(device):
            raw = raw.to(device, non_blocking=True)
        return self.expand(raw, self.qtype, self.logical_shape, dtype or self.logical_dtype, self.scale)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return (f"QTensor({self.qtype}, shape={tuple(self.logical_shape)}, device={self.raw().device}, "
                f"{self.raw().nbytes} bytes{f', scale={self.scale:.3g}' if self.scale is not None else ''})")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        src = next((a for a in args if isinstance(a, QTensor)), None)
        if func in (torch.Tensor.is_floating_point, torch.is_floating_point):
            return False
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "__delete__"):
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return _rewrap(out, src) if prop == "data" and name == "__get__" else out
        if func in _RAW:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _TO and src is args[0]:
            return _to(src, func, args[1:], kwargs)
        if func in _KEEP and src is args[0]:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return _rewrap(out, src)
        if name.endswith("_") and not name.endswith("__") or name == "__setitem__":
            raise CascadeError(
                f"{func.__name__} would change a quantized {src.qtype if src is not None else ''} weight in place; "
                "quantized weights are read-only (a change would be lost on a temporary expansion). Load the "
                "file in bf16/fp32 (or convert it back with scripts/convert_weights.py) to modify its weights."
            )
        args = tuple(a.dense() if isinstance(a, QTensor) else a for a in args)
        kwargs = {k: v.dense() if isinstance(v, QTensor) else v for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _rewrap(out: Any, src: QTensor | None) -> Any:
    if src is None or not isinstance(out, torch.Tensor) or isinstance(out, QTensor) and hasattr(out, "qtype"):
        return out
    with torch._C.DisableTorchFunctionSubclass():
        q = out.as_subclass(QTensor)
    return q._copy_meta(src)


def _to(src: QTensor, func: Any, args: tuple, kwargs: dict) -> Any:
    """``.to``: a floating dtype other than the storage's expands; a device (or the storage dtype) moves."""
    if func is torch.Tensor.cuda:
        device, dtype = torch.device("cuda" if not args else args[0]), None
        non_blocking = kwargs.get("non_blocking", False)
    else:
        if args and isinstance(args[0], torch.Tensor):
            device, dtype, non_blocking = args[0].device, args[0].dtype, kwargs.get("non_blocking", False)
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    raw = src.raw()
    if dtype is not None and dtype != raw.dtype:
        return src.dense(dtype, device)
    moved = raw.to(device=device, non_blocking=non_blocking) if device is not None else raw
    return _rewrap(moved, src)


def dense_weight(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` expanded or cast to ``like``'s dtype and device (None stays None)."""
    if t is None:
        return None
    if isinstance(t, QTensor):
        return t.dense(like.dtype, like.device)
    return t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dense_weight(self.weight, x), dense_weight(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, dense_weight(self.weight, x), dense_weight(self.bias, x))


class ConvTranspose2d(nn.ConvTranspose2d):
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(x, dense_weight(self.weight, x), dense_weight(self.bias, x), self.stride,
                                  self.padding, pad, self.groups, self.dilation)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, dense_weight(self.weight, x), dense_weight(self.bias, x),
                            self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, dense_weight(self.weight, x), dense_weight(self.bias, x), self.eps)


class BatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return F.batch_norm(x, dense_weight(self.running_mean, x), dense_weight(self.running_var, x),
                            dense_weight(self.weight, x), dense_weight(self.bias, x), False, 0.0, self.eps)


class Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight.dense(device=ids.device) if isinstance(self.weight, QTensor) else self.weight
        return F.embedding(ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


# ``dequantizes``: loading.py uses these layers for every quantized file whatever ``operations`` it was given.
OPS = SimpleNamespace(Linear=Linear, Conv2d=Conv2d, ConvTranspose2d=ConvTranspose2d, LayerNorm=LayerNorm,
                      GroupNorm=GroupNorm, BatchNorm2d=BatchNorm2d, Embedding=Embedding, dequantizes=True)


def is_quantized(t: Any) -> bool:
    return isinstance(t, QTensor)


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take as stored (quantized ones at their quantized size)."""
    return sum(t.raw().nbytes if isinstance(t, QTensor) else t.nelement() * t.element_size()
               for t in [*module.parameters(), *module.buffers()])
