"""Reading Stable Cascade LoRA files: the official layout and the community (kohya / OneTrainer / ComfyUI) one.

Only keys and shapes are looked at here; where each low-rank pair goes in a network is decided by
``model_patches.lora``. Two layouts are recognised:

- **official** (``train/train_c_lora.py`` of the release, SPEC §13): ``weights.{i}.lora_down`` (rank x in),
  ``weights.{i}.lora_up`` (out x rank), scale ``1 / rank``, plus the learned-token rows
  ``embeddings.indices`` (int64 ids) and ``embeddings.embeddings`` (n x 1280 additive deltas);
- **community**: ``<prefix><module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` with a
  kohya-style prefix (``lora_prior_unet_``, ``lora_prior_te_``, ...) or a dotted one, and the peft names
  ``lora_A`` / ``lora_B``; scale ``alpha / rank`` (1 without alpha), as ComfyUI computes it.

Anything else (a ControlNet, a full Stage C...) raises a CheckpointError naming the node that loads it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from . import keymaps, loading
from .errors import CheckpointError, WrongModelError

log = logging.getLogger(__name__)

OFFICIAL, COMMUNITY = "official", "community"
CLIP_VOCAB_SIZE = 49408  # the bigG vocabulary the official trainer appends its new tokens to

_OFFICIAL_KEY = re.compile(r"^(?P<prefix>.*?)weights\.(?P<i>\d+)\.lora_(?P<part>up|down)$")
# (up suffix, down suffix) of the low-rank pair names in use.
_PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
)
# Adapter kinds this pack does not compute, by a key marker: the message names them.
_UNSUPPORTED = {
    ".hada_w1_a": "a LyCORIS LoHa",
    ".lokr_w1": "a LyCORIS LoKr",
    ".lora_mid.weight": "a LoCon with Tucker 'lora_mid' weights",
    ".dora_scale": "a DoRA",
    ".oft_blocks": "an OFT / BOFT adapter",
    ".w_norm": "a norm-weight patch",
}
_IGNORED_PREFIXES = ("bundle_emb.",)  # OneTrainer's bundled embeddings: not weights of the networks


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update ``delta = scale * (up @ down)``, reshaped to the target weight.

    Parameters:
        source (`str`): the key stem in the file, for messages.
        up (`torch.Tensor`): (out, rank) or (out, rank, 1, 1).
        down (`torch.Tensor`): (rank, in) or (rank, in, kh, kw).
        alpha (`float`, *optional*): the file's alpha; the scale is ``alpha / rank``, or 1 without one.
    """

    source: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down[0].numel())


@dataclass
class LoraFile:
    """A LoRA file's contents, grouped.

    ``unet`` holds, for the official layout, ``"weights.{i}"`` -> pair in file order; for the community
    layout, the module name as written (prefix stripped) -> pair. ``unet_names_dotted`` says whether
    those names use dots (``down_blocks.0.2...``) or kohya's underscores. ``text`` likewise for
    text-encoder modules (community only). ``token_ids`` / ``token_deltas`` are the official learned rows.
    """

    name: str
    layout: str
    unet: dict[str, LoraPair] = field(default_factory=dict)
    unet_names_dotted: bool = False
    text: dict[str, LoraPair] = field(default_factory=dict)
    text_names_dotted: bool = False
    token_ids: torch.Tensor | None = None
    token_deltas: torch.Tensor | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def new_token_ids(self) -> list[int]:
        """Token ids the file trains that are not in the CLIP vocabulary (they need typed token names)."""
        if self.token_ids is None:
            return []
        return sorted({int(i) for i in self.token_ids.tolist() if int(i) >= CLIP_VOCAB_SIZE})


def read_lora_file(path: str) -> LoraFile:
    """Read a ``.safetensors`` LoRA and group its tensors; see :func:`parse_lora`.

    The header is checked first, so a large file of another kind (a ControlNet, a Stage C) is named
    without being read.
    """
    name = os.path.basename(path)
    header = loading.read_header(path)  # safetensors only; pickles and damaged files raise here
    if not is_lora_state_dict(header):
        raise not_a_lora(header, name)
    sd = loading.read_safetensors(path)
    loading.check_finite(path, sd)  # a NaN LoRA would turn every image it touches black
    return parse_lora(sd, name)


def parse_lora(sd: Mapping[str, torch.Tensor], name: str = "LoRA") -> LoraFile:
    """Detect the layout of a LoRA state dict and group it into low-rank pairs (no network needed)."""
    if not sd:
        raise CheckpointError(f"LoRA file {name!r} holds no tensors; download it again.")
    if any(_OFFICIAL_KEY.match(k) for k in sd) or any(k.endswith("embeddings.indices") for k in sd):
        return _parse_official(sd, name)
    if any(k.endswith(up) or k.endswith(down) for k in sd for up, down in _PAIR_SUFFIXES):
        return _parse_community(sd, name)
    for marker, what in _UNSUPPORTED.items():
        if any(marker in k for k in sd):
            raise CheckpointError(_unsupported_message(name, what))
    raise not_a_lora(sd, name)


def is_lora_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys look like a LoRA of either layout (for other loaders' 'wrong file' messages)."""
    return (any(_OFFICIAL_KEY.match(k) for k in sd) or any(k.endswith("embeddings.indices") for k in sd)
            or any(k.endswith(up) or k.endswith(down) for k in sd for up, down in _PAIR_SUFFIXES)
            or any(marker in k for k in sd for marker in _UNSUPPORTED))


def not_a_lora(sd: Mapping[str, torch.Tensor], name: str) -> CheckpointError:
    """The error for a non-LoRA file: what it is, by its keys (``WrongModelError.found`` names its kind)."""
    det = keymaps.detect(sd)
    if det.kind in ("unknown", "lora"):
        hint = keymaps.foreign_hint(sd)
        sample = ", ".join(list(sd)[:4])
        return CheckpointError(
            f"LoRA file {name!r} is not a Stable Cascade LoRA{f' (it looks like {hint})' if hint else ''}: no "
            f"'weights.N.lora_up' (official) or '.lora_up.weight' (kohya/OneTrainer) keys, found e.g. {sample} "
            "- pick a Stage C LoRA.")
    return WrongModelError(f"LoRA file {name!r} is {det.describe()}, not a LoRA - load it with its own loader "
                           "instead of the LoRA loader.", found="packaged" if det.parts else det.kind)


def _unsupported_message(name: str, what: str) -> str:
    return (f"LoRA file {name!r} is {what}; this loader applies plain LoRA (lora_up/lora_down) only - use a plain "
            "LoRA, or load this file with ComfyUI core's LoraLoader on core's Stable Cascade model.")


def _parse_official(sd: Mapping[str, torch.Tensor], name: str) -> LoraFile:
    parts: dict[int, dict[str, torch.Tensor]] = {}
    out = LoraFile(name=name, layout=OFFICIAL)
    for key, tensor in sd.items():
        m = _OFFICIAL_KEY.match(key)
        if m:
            parts.setdefault(int(m["i"]), {})[m["part"]] = tensor
        elif key.endswith("embeddings.indices"):
            out.token_ids = tensor.to(torch.int64).flatten()
        elif key.endswith("embeddings.embeddings"):
            out.token_deltas = tensor
        else:
            out.ignored.append(key)
    if out.ignored:
        log.warning("ComfyUI-StableCascade: LoRA %r: %d keys of no known use ignored, e.g. %s",
                    name, len(out.ignored), out.ignored[:3])
    if sorted(parts) != list(range(len(parts))):
        missing = sorted(set(range(max(parts, default=-1) + 1)) - set(parts))
        raise CheckpointError(f"LoRA file {name!r} (official layout) lacks weights.{missing[0]}.*; the file is "
                              "incomplete - download it again.")
    for i in range(len(parts)):
        p = parts[i]
        if set(p) != {"up", "down"}:
            half = "lora_down" if "down" not in p else "lora_up"
            raise CheckpointError(f"LoRA file {name!r} (official layout) has no weights.{i}.{half}; the file is "
                                  "incomplete - download it again.")
        pair = LoraPair(f"weights.{i}", p["up"], p["down"], alpha=1.0)
        _check_pair(pair, name)
        out.unet[f"weights.{i}"] = pair
    _check_tokens(out)
    return out


def _check_tokens(f: LoraFile) -> None:
    if (f.token_ids is None) != (f.token_deltas is None):
        have = "embeddings.indices" if f.token_ids is not None else "embeddings.embeddings"
        raise CheckpointError(f"LoRA file {f.name!r} has {have} without its partner (embeddings.indices and "
                              "embeddings.embeddings come together); the file is damaged - download it again.")
    if f.token_ids is None:
        return
    if f.token_deltas.ndim != 2 or f.token_deltas.shape[0] != f.token_ids.numel():
        raise CheckpointError(f"LoRA file {f.name!r}: embeddings.embeddings has shape "
                              f"{tuple(f.token_deltas.shape)} for {f.token_ids.numel()} token ids; expected "
                              f"({f.token_ids.numel()}, width) - the file is damaged.")
    new = f.new_token_ids
    if new and new != list(range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + len(new))):
        raise CheckpointError(f"LoRA file {f.name!r} trains new token ids {new}; the official trainer numbers "
                              f"them {CLIP_VOCAB_SIZE}, {CLIP_VOCAB_SIZE + 1}, ... with no gap - the file is not "
                              "from the official trainer, or damaged.")


def _check_pair(pair: LoraPair, name: str) -> None:
    up, down = pair.up, pair.down
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or up[0].numel() != up.shape[1]:
        raise CheckpointError(f"LoRA file {name!r}: {pair.source} has lora_up {tuple(up.shape)} and lora_down "
                              f"{tuple(down.shape)}, which do not multiply (expected (out, rank) @ (rank, in)); "
                              "the file is damaged.")


def _split_pair_key(key: str) -> tuple[str, str] | None:
    for up, down in _PAIR_SUFFIXES:
        if key.endswith(up):
            return key[: -len(up)], "up"
        if key.endswith(down):
            return key[: -len(down)], "down"
    return None


# Community prefixes: (prefix, component, dotted names).
_COMMUNITY_PREFIXES = (
    ("lora_prior_unet_", "unet", False),
    ("lora_unet_", "unet", False),
    ("lora_prior_te_", "text", False),
    ("lora_te_", "text", False),
    ("lora_prior_unet.", "unet", True),
    ("model.diffusion_model.", "unet", True),
    ("diffusion_model.", "unet", True),
    ("unet.", "unet", True),
    ("prior.", "unet", True),
    ("lora_prior_te.", "text", True),
    ("text_encoder.", "text", True),
)
_TEXT_LIKE = ("text_model.", "text_projection")


def _component(stem: str) -> tuple[str, str, bool]:
    """(component, module name without prefix, dotted) of a community key stem."""
    for prefix, comp, dotted in _COMMUNITY_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix):], dotted
    # Bare module names (ComfyUI's generic format) are U-Net names unless they are CLIP's.
    return ("text" if stem.startswith(_TEXT_LIKE) else "unet"), stem, True


def _parse_community(sd: Mapping[str, torch.Tensor], name: str) -> LoraFile:
    for marker, what in _UNSUPPORTED.items():
        if any(marker in k for k in sd):
            raise CheckpointError(_unsupported_message(name, what))
    out = LoraFile(name=name, layout=COMMUNITY)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        split = _split_pair_key(key)
        if split is not None:
            halves.setdefault(split[0], {})[split[1]] = tensor
        elif key.endswith(".alpha") or key.startswith(_IGNORED_PREFIXES):
            continue
        else:
            out.ignored.append(key)
    if any(k.startswith(_IGNORED_PREFIXES) for k in sd):
        log.warning("ComfyUI-StableCascade: LoRA %r carries OneTrainer bundled embeddings (bundle_emb.*); they are "
                    "not applied - only the LoRA weights are.", name)
    if out.ignored:
        log.warning("ComfyUI-StableCascade: LoRA %r: %d keys of no known use ignored, e.g. %s",
                    name, len(out.ignored), out.ignored[:3])
    dotted_seen: dict[str, set[bool]] = {"unet": set(), "text": set()}
    for stem, p in halves.items():
        if set(p) != {"up", "down"}:
            half = "down" if "down" not in p else "up"
            raise CheckpointError(f"LoRA file {name!r}: {stem} has no lora_{half} weight; the file is incomplete - "
                                  "download it again.")
        alpha_t = sd.get(f"{stem}.alpha")
        alpha = float(alpha_t.float().flatten()[0]) if alpha_t is not None else None
        pair = LoraPair(stem, p["up"], p["down"], alpha)
        _check_pair(pair, name)
        comp, module, dotted = _component(stem)
        dotted_seen[comp].add(dotted)
        (out.unet if comp == "unet" else out.text)[module] = pair
    for comp, seen in dotted_seen.items():
        if len(seen) > 1:
            raise CheckpointError(f"LoRA file {name!r} mixes kohya-style (underscore) and dotted module names for "
                                  f"the {'Stage C' if comp == 'unet' else 'text encoder'} part; the file is not one "
                                  "LoRA - re-export it from its trainer.")
    out.unet_names_dotted = dotted_seen["unet"] == {True}
    out.text_names_dotted = dotted_seen["text"] == {True}
    return out
