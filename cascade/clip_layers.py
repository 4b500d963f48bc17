"""The CLIP transformer in plain torch, shared by the text encoder (``text.py``) and the vision model
(``clip_vision.py``), and the state-dict helpers both towers load with.

Module names, creation order and computations follow transformers' modeling_clip (sdpa attention, its
default), so state dicts load unchanged and outputs match it to float rounding (bit for bit on CPU); they are
written here because transformers' CLIP modelling import can fail through its audio stack (see ``text.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CascadeError, CheckpointError

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")


def clip_activation(name: str) -> Any:
    """CLIP's MLP activations: ``gelu`` (exact erf form, the bigG text tower) and ``quick_gelu`` (OpenAI ViT-L)."""
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return _quick_gelu
    raise CascadeError(f"CLIP activation {name!r} is not supported; expected 'gelu' or 'quick_gelu'.")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers' ``CLIPAttention`` keys)."""

    def __init__(self, width: int, heads: int, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if width % heads:
            raise CascadeError(f"CLIP width {width} is not divisible by {heads} heads; expected 64 channels a head.")
        self.heads, self.head_dim = heads, width // heads
        # Creation order k, v, q, out as in transformers: state_dict() lists keys in that order.
        self.k_proj = nn.Linear(width, width, device=device, dtype=dtype)
        self.v_proj = nn.Linear(width, width, device=device, dtype=dtype)
        self.q_proj = nn.Linear(width, width, device=device, dtype=dtype)
        self.out_proj = nn.Linear(width, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, n, _ = x.shape
        shape = (b, n, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.act = clip_activation(act)
        self.fc1 = nn.Linear(width, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block (``self_attn``, ``layer_norm1``, ``mlp``, ``layer_norm2``)."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.self_attn = ClipAttention(width, heads, device=device, dtype=dtype)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps, device=device, dtype=dtype)
        self.mlp = ClipMLP(width, hidden, act, device=device, dtype=dtype)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, n_layers: int, width: int, heads: int, hidden: int, act: str, eps: float,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(width, heads, hidden, act, eps, device=device, dtype=dtype)
                                    for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, causal)
        return x



def count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    """Number of numbered blocks under ``prefix`` (``prefix{i}.``)."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"state dict: blocks under {prefix!r} are {sorted(found)}; expected 0..n-1.")
    return len(found)


def find_prefixes(sd: Mapping[str, Any], anchor: str) -> list[str]:
    """Every ``p`` with ``p + anchor`` a key, i.e. where a tower in a known layout starts."""
    return sorted(k[: -len(anchor)] for k in sd if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == "."))


def pick_widest(sd: Mapping[str, Any], prefixes: list[str], width_key: str, what: str) -> str:
    """Among several towers (e.g. CLIP-L and CLIP-G in one file) take the widest: Cascade uses bigG / ViT-L."""
    if len(prefixes) > 1:
        chosen = max(prefixes, key=lambda p: int(sd[p + width_key].shape[-1]) if p + width_key in sd else -1)
        log.info("ComfyUI-StableCascade: %s: %d towers at %s; using the widest, %r.", what, len(prefixes),
                 prefixes, chosen)
        return chosen
    return prefixes[0]


def log_unused(sd: Mapping[str, Any], prefix: str, used: set[str], what: str) -> None:
    unused = [k for k in sd if k.startswith(prefix) and k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused:
        log.warning("ComfyUI-StableCascade: %s: %d unexpected keys under %r ignored, e.g. %s", what, len(unused),
                    prefix, unused[:5])


def materialize_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Recreate non-persistent buffers left on the meta device (CLIP's ``position_ids``)."""
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(f"buffer {mod_name}.{name} was not loaded (still on the meta device).")
            mod.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(1, -1), persistent=False)


def assign_checked(module: nn.Module, converted: Mapping[str, torch.Tensor], what: str) -> None:
    """Assign ``converted`` (the module's own key layout): missing or misshapen parameters raise
    CheckpointError naming them; extra keys are logged."""
    expected = module.state_dict()
    converted = dict(converted)
    device = next(iter(converted.values())).device if converted else torch.device("cpu")
    for k, v in expected.items():
        if k.endswith("position_ids") and k not in converted:
            # Persistent in some transformers versions, absent from most files: it is just 0..n-1.
            converted[k] = torch.arange(v.shape[-1], device=device).expand(v.shape).to(v.dtype)
    missing = [k for k in expected if k not in converted]
    if missing:
        raise CheckpointError(
            f"{what}: {len(missing)} of {len(expected)} parameters missing from the file, e.g. {missing[:5]}; "
            "the file is incomplete or is a different model - pick a complete checkpoint."
        )
    wrong = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(converted[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensors have other shapes than the config, e.g. "
                              f"(key, file, expected) {wrong[:3]}; build the config with from_state_dict(sd).")
    extra = [k for k in converted if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        log.warning("ComfyUI-StableCascade: %s: %d unexpected keys ignored, e.g. %s", what, len(extra), extra[:5])
    module.load_state_dict({k: converted[k] for k in expected}, strict=True, assign=True)
    materialize_buffers(module, device)
