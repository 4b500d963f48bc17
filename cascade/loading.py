"""Reading Stable Cascade weights in every layout people have, and building the networks from them.

Files are safetensors (``files.py``: headers, shards, folders; a pickle is refused, never opened) or GGUF
(``quant/``). What a file holds is told from its
keys and shapes (``keymaps.detect``), its keys are converted to the original release's layout, the
config is inferred from them (``<Config>.from_state_dict``), and the network is built on the meta
device and given the file's tensors (``load_state_dict(assign=True)``): one copy in memory, in the
file's dtype unless ``dtype=`` asks for another (converted tensor by tensor while reading). Only the
keys of the requested component are read from a packaged file. Layout facts: docs/LAYOUTS.md.

Contents are validated while building, and every problem is a ``CheckpointError`` naming the file and
the tensor:

- dtypes, from the header before any tensor is read: an integer or bool tensor where the network has a
  floating-point parameter or buffer is refused (only the network's own integer buffers, BatchNorm's
  ``num_batches_tracked`` and CLIP's ``position_ids``, may be integer). A network whose floating tensors
  mix dtypes (one fp16/bf16/f64 tensor in an fp32 file, a common result of hand-merged files) is
  *converted*, not refused: every floating tensor is read in the dtype that holds most of the network's
  values, with a warning naming the converted tensors; with ``dtype=`` everything is cast to it anyway.
- ranks, shapes and keys the config inference reads (``unet_keys.shape_of``), then every tensor's shape
  against the inferred network;
- values: a NaN or infinite value in a floating tensor is refused, naming the first tensors and how many
  values (or, when the file's values are finite, that the conversion to ``dtype=`` overflowed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn

from . import files, keymaps, unet_keys
from .files import is_gguf, read_header, read_safetensors  # noqa: F401  (public API of loading)
from .kinds import KINDS, PACKAGED_EXAMPLES, describe
from .errors import CascadeError, CheckpointError, UnknownLayoutError, WrongModelError
from .keymaps import Detected

log = logging.getLogger(__name__)

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# The integer buffers the towers (transformers CLIP) legitimately hold; the pack's own networks say theirs.
_TOWER_INTEGER_KEYS = frozenset({"position_ids"})
_OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


# ---- opened sources ----------------------------------------------------------------------------


@dataclass
class _Opened:
    """A file (or shards) or an in-memory dict: header for detection, and reading of chosen keys."""

    name: str
    header: dict[str, torch.Tensor]
    where: dict[str, Path] = field(default_factory=dict)
    sd: Mapping[str, torch.Tensor] | None = None
    # Quantized weights (a GGUF, an fp8 file, QTensors in a dict): they keep their storage, whatever ``dtype``.
    quantized: bool = False
    scales: dict[str, str] = field(default_factory=dict)  # fp8 weight key -> its scale's key

    def read(self, keys: list[str], dtype: torch.dtype | None, device: Any) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` (floating ones in ``dtype``), refused if any holds a NaN or inf."""
        if self.sd is not None:
            out = {k: files.cast_floating(self.sd[k], dtype, device) for k in keys}
            check_finite(self.name, out, lambda k: self.sd[k])
            _check_finite_quantized(self.name, out)
            return out
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
            if k in self.scales:
                by_file[self.where[k]].append(self.scales[k])
        out = {}
        for f, ks in by_file.items():
            part = read_safetensors(f, ks, None if self.quantized else dtype, device)
            # Checked file by file, so the message names the shard that holds the bad tensor.
            check_finite(str(f), part, lambda k, f=f: read_safetensors(f, [k])[k])
            out.update(part)
        if self.quantized:
            out = _wrap_fp8(self.name, out, self.scales, dtype, device)
        return out


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A shape-and-dtype-only copy; a quantized tensor shows its logical shape and the dtype it expands to."""
    from .quant.ops import QTensor

    dtype = t.logical_dtype if isinstance(t, QTensor) else t.dtype
    return torch.empty(t.shape, dtype=dtype, device="meta")


def _wrap_fp8(name: str, tensors: dict[str, torch.Tensor], scales: Mapping[str, str], dtype: torch.dtype | None,
              device: Any) -> dict[str, torch.Tensor]:
    """float8 tensors (with their scales) as QTensors; the other floating ones cast to ``dtype``."""
    from .quant import fp8

    # What a plain expansion gives: the precision of the tensors kept dense (bf16 in the pack's own files).
    dense = [t.dtype for t in tensors.values() if t.is_floating_point() and t.dtype.itemsize > 1]
    default = dtype or (max(set(dense), key=dense.count) if dense else torch.bfloat16)
    out: dict[str, torch.Tensor] = {}
    scale_keys = set(scales.values())
    for k, t in tensors.items():
        if k in scale_keys:
            continue
        if t.is_floating_point() and t.dtype.itemsize == 1:
            scale = None
            if k in scales:
                s = tensors[scales[k]]
                if s.numel() != 1 or not s.is_floating_point() or not bool(torch.isfinite(s).all()) or float(s) <= 0:
                    raise CheckpointError(
                        f"{name}: {scales[k]} (the scale of fp8 tensor {k}) is {s.flatten()[:4].tolist()} of shape "
                        f"{tuple(s.shape)}; expected one finite positive float32 value. The file is damaged; download "
                        "it again or convert it again (scripts/convert_weights.py)."
                    )
                scale = float(s)
            out[k] = fp8.wrap(t, scale, default)
        else:
            out[k] = files.cast_floating(t, dtype, device)
    return out


def _check_finite_quantized(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """NaN / inf in quantized tensors (their block scales), one expansion at a time."""
    from .quant.ops import QTensor

    bad = [k for k, t in tensors.items() if isinstance(t, QTensor) and not bool(torch.isfinite(_finite_sum(
        t.dense(torch.float32))))]
    bad = [k for k in bad if _count_nonfinite(tensors[k].dense(torch.float32))]
    if bad:
        raise CheckpointError(
            f"{name}: {len(bad)} quantized tensor(s) expand to NaN or infinite values, e.g. {bad[:4]} (a damaged "
            "block scale). Expected finite weights; the file is damaged - download or convert it again."
        )


def _split_scales(header: dict[str, torch.Tensor]) -> dict[str, str]:
    """The fp8 weights' scale keys (removed from ``header``), by weight key."""
    from .quant import fp8

    scales = {}
    for k, t in list(header.items()):
        if t.is_floating_point() and t.dtype.itemsize == 1 and fp8.scale_key(k) in header:
            scales[k] = fp8.scale_key(k)
    for s in scales.values():
        header.pop(s)
    return scales


def _open_gguf(path: Path, kind: str | None) -> _Opened:
    from .quant import gguf_file

    contents = gguf_file.read_gguf(path, f"{describe(kind)}: pick {files.examples_of(kind)}" if kind in KINDS
                                   else "a Stable Cascade GGUF (scripts/convert_weights.py writes them)")
    header = {k: _meta(v) for k, v in contents.tensors.items()}
    return _Opened(str(path), header, sd=contents.tensors, quantized=True)


def _open(src: Source, kind: str | None, dtype: torch.dtype | None) -> _Opened:
    if not isinstance(src, Mapping) and is_gguf(src):
        return _open_gguf(Path(src), kind)
    if isinstance(src, Mapping):
        wrong = [(k, type(v).__name__) for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if wrong:
            raise CheckpointError(f"state dict: {len(wrong)} values are not tensors, e.g. (key, type) {wrong[:3]}; "
                                  "expected a str -> torch.Tensor mapping (safetensors.torch.load_file gives one).")
        # Detection and config inference run on shape-only copies, so converting them costs no memory.
        from .quant.ops import QTensor

        header = {k: _meta(v) for k, v in src.items()}
        return _Opened("state dict", header, sd=src, quantized=any(isinstance(v, QTensor) for v in src.values()))
    path = Path(src)
    paths = files.resolve(path, kind, dtype)
    header: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in paths:
        h = read_header(f)
        header.update(h)
        where.update(dict.fromkeys(h, f))
    if not header:
        raise CheckpointError(f"{path}: the file holds no tensors. Download it again.")
    if any(t.is_floating_point() and t.dtype.itemsize == 1 for t in header.values()):
        return _Opened(str(path), header, where, quantized=True, scales=_split_scales(header))
    return _Opened(str(path), header, where)


def detect(src: Source) -> Detected:
    """What a state dict, file or folder holds, from keys and shapes only (a file's header only)."""
    return keymaps.detect(_open(src, None, None).header)


def _found(det: Detected) -> str:
    """The kind a wrong file holds, as WrongModelError.found ("packaged" for a multi-model file)."""
    return "packaged" if det.parts else det.kind


def _how_to_load(det: Detected) -> str:
    if det.kind == "lora":
        return "A LoRA is not a network: load the Stage C first, then apply the LoRA to it"
    if det.parts:
        return "Load the networks it holds with cascade.loading.load_packaged"
    return f"Load it with cascade.loading.load({det.kind!r}, ...)"


def _unknown(opened: _Opened, expected: str) -> UnknownLayoutError:
    hint = keymaps.foreign_hint(opened.header)
    known = "; ".join(f"{k}: {v}" for k, v in keymaps.LAYOUTS.items())
    return UnknownLayoutError(
        f"{opened.name}: matches no known Stable Cascade layout{f' (it looks like {hint})' if hint else ''}; "
        f"{len(opened.header)} keys, e.g. {sorted(opened.header)[:4]}. Known layouts: {known}. Expected {expected}."
    )


def _find(opened: _Opened, kind: str) -> tuple[Detected, Detected]:
    """(the file's detection, its component of ``kind``) or a clear error naming what the file is."""
    det = keymaps.detect(opened.header)
    part = det.part(kind)
    if part is not None:
        return det, part
    if det.kind == "unknown":
        raise _unknown(opened, f"{describe(kind)}: pick {files.examples_of(kind)}")
    raise WrongModelError(
        f"{opened.name} is {det.describe()}, not {describe(kind)}. {_how_to_load(det)}. "
        f"For {describe(kind)} pick {files.examples_of(kind)}.", found=_found(det)
    )


def _component_keys(det: Detected, part: Detected, header: Mapping[str, Any]) -> list[str]:
    """Keys under the part's root, minus those of other parts nested deeper (a text encoder next to a
    U-Net stored without prefix)."""
    others = [p.read_root for p in det.parts if p is not part and len(p.read_root) > len(part.read_root)]
    root = part.read_root
    return [k for k in header if k.startswith(root) and not any(k.startswith(o) for o in others)]


# ---- validation --------------------------------------------------------------------------------


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _read_dtype(opened: _Opened, keys: list[str], integer_ok: frozenset[str], dtype: torch.dtype | None,
                what: str) -> torch.dtype | None:
    """The dtype to read the floating tensors of ``keys`` in (None: as they are), from the header only.

    An integer or bool tensor whose name is not one of the network's integer buffers (``integer_ok``, last
    key component) is refused. Mixed floating dtypes are converted to the dominant one (most values).
    """
    header = opened.header
    bad = [(k, str(header[k].dtype).replace("torch.", "")) for k in keys
           if not header[k].is_floating_point() and _leaf(k) not in integer_ok]
    if bad:
        raise CheckpointError(
            f"{opened.name}: {len(bad)} tensor(s) of {what} hold integer/bool values where the network has "
            f"floating-point weights, e.g. (tensor, file dtype) {bad[:4]}; expected float32, float16 or bfloat16. "
            "The file is damaged or was written by a converter that changed dtypes; download it again."
        )
    if dtype is not None or opened.quantized:
        return dtype  # quantized files mix storage types by design; dense tensors keep theirs
    census: dict[torch.dtype, int] = {}
    for k in keys:
        t = header[k]
        if t.is_floating_point() and _leaf(k) not in integer_ok:
            census[t.dtype] = census.get(t.dtype, 0) + t.numel()
    if len(census) <= 1:
        return None
    dominant = max(census, key=lambda d: census[d])
    odd = [f"{k} ({str(header[k].dtype).replace('torch.', '')})" for k in keys
           if header[k].is_floating_point() and header[k].dtype != dominant and _leaf(k) not in integer_ok]
    log.warning("ComfyUI-StableCascade: %s: %s mixes floating dtypes; %d tensor(s) converted to %s (the dtype of "
                "most of its values) so the network runs in one dtype: %s%s", opened.name, what, len(odd),
                str(dominant).replace("torch.", ""), ", ".join(odd[:8]), ", ..." if len(odd) > 8 else "")
    return dominant


def _count_nonfinite(t: torch.Tensor) -> int:
    return int(t.numel() - torch.isfinite(t).sum().item())


def _finite_sum(t: torch.Tensor) -> torch.Tensor:
    """A scalar that is finite if every value of ``t`` is (a NaN or inf makes the sum NaN or inf).

    A sum reads the tensor once without a bool copy: about 6x faster than ``isfinite(t).all()`` on bf16 on a
    CPU. It can overflow on finite values (bf16 / fp32 near 3e38), so a non-finite sum is only a reason to
    look closer (``_count_nonfinite``), never an error by itself.
    """
    try:
        return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8): upcast first
        return t.float().sum().double()


def check_finite(name: str, tensors: Mapping[str, torch.Tensor], raw: Any = None) -> None:
    """Refuse NaN / inf in floating tensors, naming the first ones. ``raw(key)`` gives the tensor as stored,
    to tell a damaged file from a conversion (``dtype=``) that overflowed (default: ``tensors[key]``).

    One sum a tensor and one device sync in all. Measured on Stage C lite (1.03 B parameters, bf16, 654
    tensors, 1.9 GiB) on 2 CPU threads: 0.36 s on tensors in memory, against 1.8 s for ``isfinite(t).all()``.
    That is far more than 5% of a load from the page cache (0.14-0.2 s: safetensors maps the file lazily and
    nothing is read yet), because the check is where the pages are first touched; copying every tensor once
    (the least a move to a GPU costs) took 1.2 s on the same machine, so the check costs about what the
    first use of the weights costs anyway, once per load.
    """
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return
    sums = torch.stack([_finite_sum(t) for _, t in floats])
    flags = torch.isfinite(sums)
    if bool(flags.all()):
        return
    suspects = [(k, t) for (k, t), ok in zip(floats, flags.tolist()) if not ok]
    bad = [(k, t) for k, t in suspects if _count_nonfinite(t)]
    if not bad:
        return  # sums that overflowed on finite values
    details = []
    for k, t in bad[:4]:
        n = _count_nonfinite(t)
        stored = raw(k) if raw is not None else t
        if stored.dtype != t.dtype and stored.is_floating_point() and bool(torch.isfinite(stored).all()):
            details.append(f"{k}: {n} of {t.numel()} values overflow when its finite "
                           f"{str(stored.dtype).replace('torch.', '')} values are converted to "
                           f"{str(t.dtype).replace('torch.', '')} (use dtype=torch.bfloat16 or torch.float32)")
        else:
            details.append(f"{k}: {n} of {t.numel()} values are NaN or infinite")
    more = f" (and {len(bad) - 4} more tensors)" if len(bad) > 4 else ""
    raise CheckpointError(
        f"{name}: {len(bad)} tensor(s) hold non-finite values: {'; '.join(details)}{more}. Expected finite weights; "
        "a network with these gives NaN or black outputs. The file is damaged (an interrupted save or a bad "
        "conversion); download it again."
    )


# ---- building ----------------------------------------------------------------------------------


def _with_name(e: CascadeError, name: str) -> CascadeError:
    out = WrongModelError(f"{name}: {e}", e.found) if isinstance(e, WrongModelError) else type(e)(f"{name}: {e}")
    out.__cause__ = e
    return out


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], name: str, kind: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(
            f"{name}: {len(missing)} of {len(expected)} tensors of {describe(kind)} are missing, e.g. {missing[:4]}; "
            "the file is incomplete or damaged. Download it again."
        )
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{name}: {len(wrong)} tensors have shapes the inferred network does not take, "
                              f"e.g. (key, file, network) {wrong[:3]}; the file is damaged. Download it again.")
    extra = [k for k in sd if k not in expected]
    if extra:
        log.warning("ComfyUI-StableCascade: %s: %d unexpected keys ignored, e.g. %s", name, len(extra), extra[:5])
    negative = [k for k in expected if k.endswith("running_var") and bool((sd[k] < 0).any())]
    if negative:
        raise CheckpointError(f"{name}: BatchNorm variances {negative[:4]} hold negative values; a variance is "
                              ">= 0 (a negative one gives NaN outputs). The file is damaged; download it again.")
    for k, v in expected.items():
        # The network's own integer buffers (BatchNorm's step count) keep their dtype, whatever the file
        # used (a converter that cast everything to fp16 also casts these; their value is never read).
        if not v.is_floating_point() and sd[k].dtype != v.dtype:
            sd[k] = sd[k].to(v.dtype)
    model.load_state_dict({k: sd.pop(k) for k in expected}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{name}: {left[:4]} were not loaded (still on the meta device); the network "
                              "has state that its files do not hold - report this as a bug.")


def _quant_operations(operations: Any, opened: _Opened, quantize: str | None, kind: str) -> Any:
    """Quantized weights need layers that expand them (cascade/quant/ops.py), whatever the caller passed."""
    if not (opened.quantized or quantize) or getattr(operations, "dequantizes", False):
        return operations
    from .quant import OPS

    if operations is not None:
        log.info("ComfyUI-StableCascade: %s: %s has quantized weights; built with the pack's dequantizing layers "
                 "instead of the given operations.", opened.name, describe(kind))
    return OPS


def _build_network(opened: _Opened, det: Detected, part: Detected, dtype: torch.dtype | None, device: Any,
                   operations: Any, quantize: str | None = None) -> nn.Module:
    kind = part.kind
    operations = _quant_operations(operations, opened, quantize, kind)
    cls, cfg_cls = KINDS[kind].classes()
    keys = _component_keys(det, part, opened.header)
    # Infer (and validate) the config and dtypes from the header first: a wrong file fails before gigabytes
    # are read.
    try:
        meta, _ = keymaps.to_original(kind, keymaps.sub_dict({k: opened.header[k] for k in keys}, part))
        config = cfg_cls.from_state_dict(meta)
        model = unet_keys.build_meta(lambda c, device: cls(c, device=device, operations=operations), config,
                                     describe(kind))
    except CascadeError as e:
        raise _with_name(e, opened.name) from e
    integer_ok = frozenset(_leaf(k) for k, v in model.state_dict().items() if not v.is_floating_point())
    read_dtype = _read_dtype(opened, keys, integer_ok, dtype, describe(kind))
    sd, dropped = keymaps.to_original(kind, keymaps.sub_dict(opened.read(keys, read_dtype, device), part, pop=True))
    if dropped:
        log.warning("ComfyUI-StableCascade: %s: %d keys outside %s ignored, e.g. %s", opened.name, len(dropped),
                    describe(kind), dropped[:5])
    if quantize:
        from .quant import convert

        sd = convert.fp8_state_dict(sd, quantize)
    # Before assigning: quantized storage (uint8 blocks, float8) cannot be a parameter that requires grad.
    model.requires_grad_(False)
    _assign(model, sd, opened.name, kind)
    return model.eval().requires_grad_(False)


def _build_tower(opened: _Opened, det: Detected, part: Detected, dtype: torch.dtype | None,
                 device: Any) -> nn.Module:
    cls, _ = KINDS[part.kind].classes()
    keys = _component_keys(det, part, opened.header)
    read_dtype = _read_dtype(opened, keys, _TOWER_INTEGER_KEYS, dtype, describe(part.kind))
    sd = opened.read(keys, read_dtype, device)
    try:
        model = cls.from_state_dict(sd, dtype=dtype, device=device)
    except CascadeError as e:
        raise _with_name(e, opened.name) from e
    return model.eval().requires_grad_(False)


def _build(opened: _Opened, det: Detected, part: Detected, dtype: torch.dtype | None, device: Any,
           operations: Any, quantize: str | None = None) -> nn.Module:
    if KINDS[part.kind].tower and (opened.quantized or quantize):
        raise CheckpointError(
            f"{opened.name}: {part.describe()} with {'quantized weights' if opened.quantized else quantize} is not "
            "supported: fp8 and GGUF weights are for the pack's own networks (Stage C and Stage B above all); "
            "the CLIP towers load from bf16/fp16/fp32 safetensors."
        )
    try:
        if KINDS[part.kind].tower:
            model = _build_tower(opened, det, part, dtype, device)
        else:
            model = _build_network(opened, det, part, dtype, device, operations, quantize)
    except (CascadeError, _OOM):
        raise
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError, AssertionError, ArithmeticError) as e:
        # The checks above are meant to catch every damaged file with a precise message; this one keeps a
        # case they miss from surfacing as a bare traceback, and still names the file.
        log.debug("ComfyUI-StableCascade: building %s from %s failed", part.describe(), opened.name, exc_info=True)
        raise CheckpointError(
            f"{opened.name}: {part.describe()} cannot be built from this file ({type(e).__name__}: {e}). Expected "
            f"{describe(part.kind)} in one of the known layouts; the file is damaged (download it again) - if it "
            "loads in other tools, report this message as a bug."
        ) from e
    log.info("ComfyUI-StableCascade: loaded %s from %s.", part.describe(), opened.name)
    return model


def load(kind: str, src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
         operations: Any = None, quantize: str | None = None) -> nn.Module:
    """Build the ``kind`` network from a file, shard set, folder or state dict of any known layout.

    Wrong contents are a ``CheckpointError`` naming the file and tensor (integer dtypes, ranks and keys the
    inference reads, NaN / inf); mixed floating dtypes are converted to the dominant one with a warning (see
    the module docstring); ``dtype=`` casts every floating tensor.

    Quantized weights (docs/QUANTIZED.md): a GGUF file or an fp8 safetensors file loads as stored (``dtype=``
    then casts only the tensors kept dense), and ``quantize="fp8_e4m3fn"`` / ``"fp8_e5m2"`` stores the large
    matrices of a dense file as fp8 while loading. Either way the network is built with ``cascade.quant.OPS``,
    whose layers expand each weight to the activation dtype in ``forward``.
    """
    if quantize is not None:
        from .quant import fp8

        fp8.torch_dtype(quantize)  # an unknown format or a torch without float8: refused before reading
    opened = _open(src, kind, None if quantize else dtype)
    det, part = _find(opened, kind)
    return _build(opened, det, part, dtype, device, operations, quantize)


def weight_format(src: Source) -> str:
    """How a file stores its weights: 'gguf', 'fp8' (any float8 tensor) or 'dense', from its header only."""
    if not isinstance(src, Mapping) and is_gguf(src):
        return "gguf"
    opened = _open(src, None, None)
    return "fp8" if opened.quantized else "dense"


def load_stage_c(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None, quantize: str | None = None) -> nn.Module:
    """Stage C (3.6B, 1B lite or any smaller variant) from any layout; see ``load``."""
    return load("stage_c", src, dtype, device, operations, quantize)


def load_stage_b(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None, quantize: str | None = None) -> nn.Module:
    """Stage B (1.5B, 700M lite or smaller) from any layout; see ``load``."""
    return load("stage_b", src, dtype, device, operations, quantize)


def load_stage_a(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None) -> nn.Module:
    """Stage A (original, ComfyUI ``vae.`` or diffusers PaellaVQModel keys); see ``load``."""
    return load("stage_a", src, dtype, device, operations)


def load_effnet(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None) -> nn.Module:
    """The EfficientNet encoder (original, or ComfyUI's ``encoder.`` / ``vae.encoder.``); see ``load``."""
    return load("effnet", src, dtype, device, operations)


def load_previewer(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None) -> nn.Module:
    """The Previewer (original, or ComfyUI's ``previewer.`` / ``vae.previewer.``); see ``load``."""
    return load("previewer", src, dtype, device, operations)


def load_controlnet(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
        operations: Any = None) -> nn.Module:
    """A Stable Cascade ControlNet (canny, inpainting, super-resolution); see ``load``."""
    return load("controlnet", src, dtype, device, operations)


def load_text_encoder(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu") -> nn.Module:
    """The CLIP bigG text encoder (transformers, open_clip, ComfyUI or packaged layout); see ``load``."""
    return load("text_encoder", src, dtype, device)


def load_clip_vision(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu") -> nn.Module:
    """The CLIP ViT-L/14 vision model (transformers keys, any prefix); see ``load``."""
    return load("clip_vision", src, dtype, device)


def load_packaged(src: Source, dtype: torch.dtype | None = None, device: Any = "cpu",
                  operations: Any = None, quantize: str | None = None) -> dict[str, nn.Module]:
    """Every network a file holds, by kind (ComfyUI's stable_cascade_stage_c.safetensors gives stage_c,
    text_encoder, effnet, previewer and clip_vision; stable_cascade_stage_b.safetensors gives stage_b and
    stage_a). A single-module file gives a one-entry dict."""
    opened = _open(src, None, dtype)
    det = keymaps.detect(opened.header)
    if det.kind == "unknown":
        raise _unknown(opened, f"a Stable Cascade checkpoint: pick {PACKAGED_EXAMPLES}")
    if det.kind == "lora":
        raise WrongModelError(f"{opened.name} is {det.describe()}, not a checkpoint of networks. {_how_to_load(det)}.",
                              found="lora")
    out: dict[str, nn.Module] = {}
    for part in det.parts or (det,):
        if part.kind in out:
            log.warning("ComfyUI-StableCascade: %s holds a second %s under %r; ignored.", opened.name,
                        describe(part.kind), part.prefix)
            continue
        # fp8 at load applies to the U-Nets; the other parts of a packaged file load dense.
        q = quantize if KINDS[part.kind].unet else None
        out[part.kind] = _build(opened, det, part, dtype, device, operations, q)
    return out
