"""LoRA for Stage C as keyed weight patches on clones, and learned tokens on a text-encoder twin.

Where each low-rank pair goes:

- official files: the i-th pair targets the i-th weight the official trainer wrapped, found by walking
  the network as the trainer's ``apply_lora(model, filters=[".attn"])`` + ``model.modules()`` did (SPEC §13):
  a module's own weight comes after its children, so inside each attention block ``out_proj.weight``
  (even i) precedes ``in_proj_weight`` (odd i). Any depth or width works; shapes are checked.
- community files: module names in ComfyUI's Stage C layout (``attention.attn.to_q/to_k/to_v``,
  ``out_proj``), diffusers' (``attention.to_q``, ``to_out.0``), OMI's (``attention.attn.in_proj.0/1/2``) or
  the original one, with dots or kohya underscores; q/k/v land on row blocks of the packed
  ``in_proj_weight``.

Every pair becomes part of a :class:`LowRankDelta` keyed by the network's state-dict key; the caller adds
them to a *clone* of the model handle, so the loaded base network never changes. The text encoder is
changed the same way: its handle is cloned, text LoRA weights become patches on the clone, and learned
tokens (a longer embedding and its tokenizer) live on ``TextEncoder.clone()``, a view sharing every other
layer, that the clone carries (``ModelHandle.with_network``). So the host's memory manager (ComfyUI's
included) sees one text encoder and counts its weights once, whatever LoRAs are stacked on it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cascade.errors import CascadeError, CheckpointError, ShapeError
from ..cascade.lora_format import CLIP_VOCAB_SIZE, OFFICIAL, LoraFile, LoraPair
from ..cascade.text import EMBEDDING_KEY

log = logging.getLogger(__name__)

OFFICIAL_FILTERS = (".attn",)
_QKV = ("q", "k", "v")
_WIDTH_NAMES = {2048: "3.6B Stage C", 1536: "1B lite Stage C"}
_FIX_WIDTH = ("connect the Stage C the LoRA was trained for (stage_c_bf16 for 3.6B LoRAs, stage_c_lite_bf16 for "
              "lite ones) or pick a LoRA trained for this Stage C")
_TOKEN_NAME = re.compile(r"^(\[[^\s\[\]]+\]|<[^\s<>]+>)$")


class LowRankDelta:
    """A patch value: called with the (float32) weight, returns ``sum(scale * up @ down)`` shaped like it.

    ``parts`` are ``(row_start, row_count, up, down, scale)``; ``row_start`` None covers the whole weight,
    otherwise the product fills rows ``[row_start, row_start + row_count)`` (a q, k or v block of a packed
    ``in_proj_weight``). Holds tensors only, so it pickles.
    """

    def __init__(self, shape: tuple[int, ...], parts: list[tuple[int | None, int, torch.Tensor, torch.Tensor, float]]):
        self.shape = tuple(int(s) for s in shape)
        self.parts = tuple(parts)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.delta(weight.device)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The full float32 delta on ``device``."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=device)
        for start, count, up, down, scale in self.parts:
            prod = up.to(device, torch.float32).flatten(1) @ down.to(device, torch.float32).flatten(1)
            rows = out if start is None else out[start:start + count]
            rows.add_(prod.view(rows.shape), alpha=scale)
        return out

    def __repr__(self) -> str:
        return f"LowRankDelta(shape={self.shape}, parts={len(self.parts)})"


@dataclass(frozen=True)
class Target:
    """Where a community module name lands: a state-dict key and optionally a block of its rows."""

    key: str
    row_start: int | None = None
    row_count: int = 0


@dataclass
class TextPlan:
    """What a LoRA does to the text encoder: new tokens (typed names), embedding deltas, weight patches."""

    tokens: list[tuple[str, str | None]] = field(default_factory=list)
    delta_ids: list[int] = field(default_factory=list)  # file ids; new ones are remapped when tokens are added
    deltas: torch.Tensor | None = None
    patches: dict[str, LowRankDelta] = field(default_factory=dict)

    @property
    def changes_encoder(self) -> bool:
        return bool(self.tokens or self.delta_ids or self.patches)


# ---- learned-token names ------------------------------------------------------------------------------


def parse_tokens(text: str) -> list[tuple[str, str | None]]:
    """Parse the node's tokens field: one ``[name]=init_regex`` (or ``[name]``) a line, in training order.

    Blank lines and lines starting with ``#`` are skipped. The regex picks the rows whose mean starts the
    new embedding (e.g. ``^dog</w>``); without one the row starts at zeros, as in the trainer.
    """
    out: list[tuple[str, str | None]] = []
    for n, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, regex = line.partition("=")
        name, regex = name.strip(), regex.strip() or None
        if not _TOKEN_NAME.match(name):
            raise CascadeError(
                f"tokens line {n} {line!r}: {name!r} is not a learned-token name; the official trainer adds only "
                "names written in brackets, e.g. '[fernando]=^dog</w>' (entries such as '^snail' fine-tune "
                "existing tokens and need no line here)"
            )
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise CascadeError(f"tokens line {n}: init regex {regex!r} is not a valid regex ({exc}); write "
                                   "e.g. '[fernando]=^dog</w>'") from exc
        if name in (t for t, _ in out):
            raise CascadeError(f"tokens line {n}: {name!r} is listed twice; list each learned token once")
        out.append((name, regex))
    return out


# ---- where pairs go -----------------------------------------------------------------------------------


def official_target_keys(model: nn.Module, filters: tuple[str, ...] = OFFICIAL_FILTERS) -> list[str]:
    """State-dict keys of the weights the official trainer wraps, in the order its file lists them.

    The trainer registers a parametrization (a new child module) on every module whose name contains a
    filter and then collects LoRA modules with ``model.modules()``: so a module's own weight is listed
    after everything below it. Replaying that walk here gives the order for any depth.
    """
    keys: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        if not any(f in name for f in filters):
            return
        own = dict(module.named_parameters(recurse=False))
        if "weight" in own:
            keys.append(f"{name}.weight")
        elif "in_proj_weight" in own:
            keys.append(f"{name}.in_proj_weight")

    visit(model, "")
    return keys


def community_targets(shapes: dict[str, tuple[int, ...]]) -> dict[str, Target]:
    """Every module name a community LoRA may use for a Stage C with these state-dict shapes.

    Each name is present with dots and with kohya's underscores.
    """
    names: dict[str, Target] = {}
    for key, shape in shapes.items():
        if key.endswith(".weight"):
            names[key[: -len(".weight")]] = Target(key)
        if key.endswith("attention.attn.in_proj_weight"):
            attn = key[: -len("in_proj_weight")]  # "...attention.attn."
            block = attn[: -len("attn.")]  # "...attention."
            c = shape[1]
            for j, letter in enumerate(_QKV):
                t = Target(key, j * c, c)
                names[f"{attn}to_{letter}"] = t  # ComfyUI / kohya / OneTrainer checkpoint names
                names[f"{block}to_{letter}"] = t  # diffusers
                names[f"{attn}in_proj.{j}"] = t  # OMI
            names[f"{block}to_out.0"] = Target(f"{attn}out_proj.weight")
    names.update({n.replace(".", "_"): t for n, t in list(names.items())})
    return names


def describe_width(c: int) -> str:
    return f"{c} channels wide ({_WIDTH_NAMES[c]})" if c in _WIDTH_NAMES else f"{c} channels wide"


def _width_error(lora: LoraFile, file_width: int, model_width: int) -> ShapeError:
    return ShapeError(f"LoRA {lora.name!r} was trained for a Stage C {describe_width(file_width)}, but the connected "
                      f"Stage C is {describe_width(model_width)} - {_FIX_WIDTH}.")


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fit(lora: LoraFile, pair: LoraPair, key: str, shape: tuple[int, ...], rows: int) -> None:
    in_features = int(torch.Size(shape[1:]).numel())
    if pair.out_features == rows and pair.in_features == in_features:
        return
    if "attention.attn." in key:
        # Attention weights are (k*c, c): the LoRA's input width is the Stage C width it was trained for.
        if pair.in_features != in_features:
            raise _width_error(lora, pair.in_features, in_features)
    raise ShapeError(f"LoRA {lora.name!r}: {pair.source} makes a ({pair.out_features}, {pair.in_features}) update "
                     f"for {key}, which is {shape} ({rows} rows) - the LoRA was made for another network; "
                     f"{_FIX_WIDTH}.")


def stage_c_patches(lora: LoraFile, model: nn.Module) -> dict[str, LowRankDelta]:
    """Check every pair against ``model`` and return the patches, keyed by state-dict key (nothing applied)."""
    shapes = _state_shapes(model)
    placed: dict[str, list[tuple[int | None, int, LoraPair]]] = {}
    if lora.layout == OFFICIAL:
        for pair, key in _official_placement(lora, model, shapes):
            _check_fit(lora, pair, key, shapes[key], shapes[key][0])
            placed.setdefault(key, []).append((None, shapes[key][0], pair))
    else:
        for pair, target in _community_placement(lora, shapes):
            rows = target.row_count if target.row_start is not None else shapes[target.key][0]
            _check_fit(lora, pair, target.key, shapes[target.key], rows)
            if any(s == target.row_start for s, _, _ in placed.get(target.key, [])):
                raise CheckpointError(f"LoRA {lora.name!r}: two entries (one is {pair.source}) update the same "
                                      f"weight {target.key}; the file mixes naming schemes - re-export it.")
            placed.setdefault(target.key, []).append((target.row_start, rows, pair))
    return {key: LowRankDelta(shapes[key], [(s, n, p.up, p.down, p.scale) for s, n, p in parts])
            for key, parts in placed.items()}


def _official_placement(lora: LoraFile, model: nn.Module, shapes: dict) -> list[tuple[LoraPair, str]]:
    keys = official_target_keys(model)
    pairs = list(lora.unet.values())
    if not keys:
        raise CascadeError(f"LoRA {lora.name!r}: the connected network has no attention weights to patch; connect a "
                           "Stage C model ('Stable Cascade Load Stage C').")
    if len(pairs) != len(keys):
        model_width, file_width = shapes[keys[0]][1], pairs[0].in_features if pairs else 0
        if pairs and file_width != model_width:
            raise _width_error(lora, file_width, model_width)
        raise ShapeError(
            f"LoRA {lora.name!r} has {len(pairs)} low-rank pairs ({len(pairs) // 2} attention blocks), but the "
            f"connected Stage C has {len(keys) // 2} attention blocks ({len(keys)} targets) - {_FIX_WIDTH}."
        )
    return list(zip(pairs, keys))


def _community_placement(lora: LoraFile, shapes: dict) -> list[tuple[LoraPair, Target]]:
    table = community_targets(shapes)
    found, unknown = [], []
    for name, pair in lora.unet.items():
        target = table.get(name)
        if target is None:
            unknown.append(name)
        else:
            found.append((pair, target))
    if unknown:
        raise CheckpointError(_unknown_modules_message(lora, unknown))
    return found


def _unknown_modules_message(lora: LoraFile, unknown: list[str]) -> str:
    joined = " ".join(unknown)
    if any(m in joined for m in ("effnet_mapper", "pixels_mapper", "clip_mapper")):
        why = "it is a Stage B LoRA; this loader patches Stage C (the prior) only"
    elif any(m in joined for m in ("input_blocks", "output_blocks", "attentions", "transformer_blocks")):
        why = "it was made for another model family (Stable Diffusion / SDXL / a transformer)"
    else:
        why = "it was made for another network"
    return (f"LoRA {lora.name!r} updates {len(unknown)} modules that this Stage C does not have, e.g. "
            f"{unknown[:3]}: {why} - pick a Stable Cascade Stage C LoRA.")


# ---- text encoder ---------------------------------------------------------------------------------------


def plan_text(lora: LoraFile, encoder: Any, tokens: list[tuple[str, str | None]]) -> TextPlan:
    """Check the LoRA's text-encoder part and the typed tokens against ``encoder`` (a TextEncoder)."""
    plan = TextPlan()
    new_ids = lora.new_token_ids
    if tokens and not new_ids:
        raise CascadeError(f"LoRA {lora.name!r} has no learned tokens, but the tokens field lists "
                           f"{[t for t, _ in tokens]} - clear the tokens field.")
    if new_ids and len(tokens) != len(new_ids):
        raise CascadeError(
            f"LoRA {lora.name!r} trains {len(new_ids)} new token(s) (ids {new_ids}); the tokens field lists "
            f"{len(tokens)} - write one line per token in training order, e.g. '[fernando]=^dog</w>' (the names "
            "and init regexes of the training config's train_tokens; the file does not store them)."
        )
    if lora.token_ids is not None and lora.token_ids.numel():
        width = encoder.text_model.embeddings.token_embedding.weight.shape[1]
        if lora.token_deltas.shape[1] != width:
            raise ShapeError(f"LoRA {lora.name!r}: token embeddings are {lora.token_deltas.shape[1]} wide, the "
                             f"connected text encoder is {width} wide - connect the CLIP ViT-bigG text encoder "
                             "(1280 wide) the LoRA was trained with.")
        plan.delta_ids, plan.deltas = [int(i) for i in lora.token_ids.tolist()], lora.token_deltas
    _check_token_names(lora, encoder, tokens)
    plan.tokens = list(tokens)
    plan.patches = _text_patches(lora, encoder)
    return plan


def _check_token_names(lora: LoraFile, encoder: Any, tokens: list[tuple[str, str | None]]) -> None:
    vocab = encoder.tokenizer.get_vocab()
    added = encoder.added_tokens
    for name, _ in tokens:
        if name in added:
            raise CascadeError(
                f"learned token {name!r} of LoRA {lora.name!r} collides with the token {name!r} (id {added[name]}) "
                "that a LoRA earlier in the chain already added - rename it in one of the tokens fields (the name is "
                "only what you type in prompts), or do not stack the same LoRA twice."
            )
        if name in vocab:
            raise CascadeError(f"learned token {name!r} of LoRA {lora.name!r} collides with the existing CLIP token "
                               f"id {vocab[name]} - write learned tokens in brackets, e.g. '[fernando]'.")


def _text_patches(lora: LoraFile, encoder: Any) -> dict[str, LowRankDelta]:
    if not lora.text:
        return {}
    shapes = _state_shapes(encoder)
    table = {k[: -len(".weight")]: k for k in shapes if k.endswith(".weight")}
    table.update({n.replace(".", "_"): k for n, k in list(table.items())})
    out: dict[str, LowRankDelta] = {}
    unknown = [n for n in lora.text if n not in table]
    if unknown:
        raise CheckpointError(f"LoRA {lora.name!r} updates {len(unknown)} text-encoder modules that the connected "
                              f"text encoder lacks, e.g. {unknown[:3]} - it was made for another text encoder; "
                              "connect CLIP ViT-bigG or use 'Stable Cascade Load Stage C LoRA (model only)' to apply "
                              "the Stage C part only.")
    for name, pair in lora.text.items():
        key = table[name]
        shape = shapes[key]
        if pair.out_features != shape[0] or pair.in_features != int(torch.Size(shape[1:]).numel()):
            raise ShapeError(f"LoRA {lora.name!r}: {pair.source} makes a ({pair.out_features}, {pair.in_features}) "
                             f"update for text-encoder weight {key} of shape {shape} - the LoRA was made for "
                             "another text encoder; connect CLIP ViT-bigG.")
        out[key] = LowRankDelta(shape, [(None, shape[0], pair.up, pair.down, pair.scale)])
    return out


def build_text_twin(encoder: Any, plan: TextPlan, strength: float) -> Any:
    """A ``TextEncoder.clone()`` with the plan's tokens and embedding deltas; ``encoder`` itself is never written.

    Text LoRA weights are not in it: ``apply_lora`` adds them as patches to the handle's clone. A LoRA pair on
    the token embedding itself (a table that grows with learned tokens) is added to the clone's own embedding.
    """
    twin = encoder.clone()
    remap: dict[int, int] = {}
    for j, (name, regex) in enumerate(plan.tokens):
        remap[CLIP_VOCAB_SIZE + j] = twin.add_token(name, regex)
    if plan.deltas is not None:
        ids = [remap.get(i, i) for i in plan.delta_ids]
        twin.add_embedding_delta(ids, plan.deltas.to(torch.float32), strength=strength)
    embedding = plan.patches.get(EMBEDDING_KEY)
    if embedding is not None:
        old = twin.text_model.embeddings.token_embedding.weight
        rows = embedding.shape[0]  # the table the LoRA was checked against; learned-token rows come after it
        if embedding.shape[1:] != tuple(old.shape[1:]) or rows > old.shape[0]:
            raise ShapeError(f"text LoRA update for {EMBEDDING_KEY} is {embedding.shape}, the embedding is "
                             f"{tuple(old.shape)}; the LoRA was made for another text encoder.")
        new = old.detach().to(torch.float32, copy=True)
        new[:rows] += strength * embedding.delta(old.device)
        twin._set_embedding(new.to(old.dtype))  # a new table on the clone; the shared one is never written
    return twin


# ---- applying to handles ----------------------------------------------------------------------------------


def apply_lora(stage_c: Any, text_encoder: Any, lora: LoraFile, strength_model: float = 1.0,
               strength_text: float = 1.0, tokens: list[tuple[str, str | None]] | None = None) -> tuple[Any, Any]:
    """Return ``(stage_c', text_encoder')``: a patched clone of the Stage C handle and, when the LoRA changes
    the text encoder, a clone of its handle (text weights as patches, learned tokens on a view sharing the
    other layers); inputs that the LoRA leaves alone come back as they are.

    ``stage_c`` / ``text_encoder`` are host handles (``.module``, ``.clone()``, ``.add_patches()``);
    ``text_encoder`` may be None (model only: the text part is skipped with a warning). Everything is
    checked before anything is cloned, so an error leaves no patch anywhere.
    """
    tokens = list(tokens or [])
    patches = stage_c_patches(lora, stage_c.module)
    plan = TextPlan()
    if text_encoder is None:
        if lora.token_ids is not None or lora.text or tokens:
            log.warning("ComfyUI-StableCascade: LoRA %r also changes the text encoder (learned tokens or text "
                        "weights); this node applies the Stage C part only - use 'Stable Cascade Load Stage C LoRA' "
                        "for both.", lora.name)
    else:
        plan = plan_text(lora, text_encoder.module, tokens)
    new_te = text_encoder
    if plan.changes_encoder:
        weights = {k: v for k, v in plan.patches.items() if k != EMBEDDING_KEY}
        if plan.tokens or plan.deltas is not None or EMBEDDING_KEY in plan.patches:
            # A view sharing every layer but the token embedding, carried by a clone of the handle: the memory
            # manager sees the one encoder (see the module docstring).
            new_te = text_encoder.with_network(build_text_twin(text_encoder.module, plan, strength_text))
        else:
            new_te = text_encoder.clone()
        if weights and strength_text != 0:
            new_te.add_patches(weights, strength_text, key=f"scw_lora:{lora.name}")
    new_c = stage_c
    if patches and strength_model != 0:
        new_c = stage_c.clone()
        new_c.add_patches(patches, strength_model, key=f"scw_lora:{lora.name}")
    log.info("ComfyUI-StableCascade: LoRA %r (%s layout): %d Stage C weights at strength %g, %d learned tokens, "
             "%d text weights.", lora.name, lora.layout, len(patches), strength_model, len(plan.tokens),
             len(plan.patches))
    return new_c, new_te


def demo_lora(model: nn.Module, n_tokens: int = 0, text_width: int = 1280, rank: int = 4,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """A random official-layout LoRA state dict for ``model`` (tests and weightless demo runs)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _state_shapes(model)
    sd: dict[str, torch.Tensor] = {}
    for i, key in enumerate(official_target_keys(model)):
        out_f, in_f = shapes[key][0], shapes[key][1]
        sd[f"weights.{i}.lora_down"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        sd[f"weights.{i}.lora_up"] = torch.randn(out_f, rank, generator=gen)
    if n_tokens:
        sd["embeddings.indices"] = torch.arange(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + n_tokens, dtype=torch.int64)
        sd["embeddings.embeddings"] = 0.1 * torch.randn(n_tokens, text_width, generator=gen)
    return sd
