"""Learned tokens in the official format (SPEC §13, ``train_tokens`` of the release's LoRA config).

The ``tokens`` setting has one entry a line, in training order:

- ``[name]=regex`` (or ``<name>=regex``, or ``[name]`` alone): a new token. It is added to a copy of the tokenizer
  (ids 49408, 49409, ...) with a new embedding row, the mean of the vocabulary rows whose token string matches the
  regex (``re.search``; zeros without a regex or a match), on a clone of the text encoder (``TextEncoder.clone``),
  so the loaded encoder never changes;
- a plain regex (e.g. ``^snail``): the existing vocabulary tokens it matches are fine-tuned.

What trains is one additive float32 delta per row (zero init), stored as the official ``embeddings.indices`` (ids,
in entry order; a regex's matches in id order) and ``embeddings.embeddings`` (n x width). The text encoder runs
with ``E[ids] += delta`` on every step, so gradients reach the deltas through the frozen encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..cascade.text import EMBEDDING_KEY
from .errors import TrainingInputError

_NEW = re.compile(r"^(\[[^\s\[\]=]+\]|<[^\s<>=]+>)$")


@dataclass(frozen=True)
class TokenEntry:
    """One line of the tokens setting: a new token (``name`` + init ``regex``) or a regex of existing tokens."""

    name: str | None
    regex: str | None

    @property
    def is_new(self) -> bool:
        return self.name is not None


def parse_train_tokens(text: str) -> list[TokenEntry]:
    """Parse the tokens setting (see module docstring); blank lines and ``#`` comments are skipped."""
    out: list[TokenEntry] = []
    for n, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, eq, tail = line.partition("=")
        head = head.strip()
        if line.startswith(("[", "<")):
            if not _NEW.match(head):
                raise TrainingInputError(
                    f"tokens line {n} {line!r}: {head!r} is not a new-token name; write it in brackets without "
                    "spaces, e.g. '[fernando]=^dog</w>' (a plain regex such as '^snail' fine-tunes existing tokens).")
            regex = tail.strip() or None
            if any(e.name == head for e in out):
                raise TrainingInputError(f"tokens line {n}: {head!r} is listed twice; list each new token once.")
            entry = TokenEntry(head, regex)
        else:
            entry, regex = TokenEntry(None, line), line
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise TrainingInputError(f"tokens line {n}: {regex!r} is not a valid regex ({exc}); e.g. "
                                         "'[fernando]=^dog</w>' or '^snail'.") from None
        out.append(entry)
    return out


def loader_tokens_field(text: str) -> str:
    """What to type into the LoRA loader's ``tokens`` field for a LoRA trained with this setting: the new-token
    lines in training order (rows of existing tokens are in the file with their ids and need no line)."""
    return "\n".join(f"{e.name}={e.regex}" if e.regex else e.name for e in parse_train_tokens(text) if e.is_new)


class LearnedTokens(nn.Module):
    """The trainable token rows and the text-encoder clone they act on.

    ``encoder`` is the loaded ``TextEncoder`` (never changed). The clone is kept out of the module's registry, so
    a DistributedDataParallel wrapper sees only ``delta``.
    """

    def __init__(self, encoder: Any, entries: list[TokenEntry], device: torch.device | None = None) -> None:
        super().__init__()
        if not entries:
            raise TrainingInputError("no tokens to learn: the tokens setting is empty.")
        vocab = encoder.tokenizer.get_vocab()
        for e in entries:
            if e.is_new and (e.name in vocab or e.name in encoder.added_tokens):
                have = vocab.get(e.name, encoder.added_tokens.get(e.name))
                raise TrainingInputError(
                    f"new token {e.name!r} collides with the existing token {e.name!r} (id {have}) of the connected "
                    "text encoder - pick another name, e.g. '[my_subject]' (the name is only what prompts use).")
        twin = encoder.clone()
        ids: list[int] = []
        for e in entries:
            if e.is_new:
                ids.append(twin.add_token(e.name, e.regex))
                continue
            pattern = re.compile(e.regex)
            found = sorted(i for tok, i in vocab.items() if pattern.search(tok) is not None)
            if not found:
                raise TrainingInputError(f"tokens regex {e.regex!r} matches no token of the CLIP vocabulary - check "
                                         "it (CLIP word tokens end in '</w>', e.g. '^snail</w>').")
            ids += [i for i in found if i not in ids]
        if len(set(ids)) != len(ids):
            raise TrainingInputError(f"the tokens setting selects token ids {ids} with repeats; list each once.")
        self.__dict__["twin"] = twin  # unregistered on purpose (see class docstring)
        # Inside ComfyUI the encoder's weights are inference tensors (loaded under torch.inference_mode), which
        # autograd may not save; the text tower then runs on normal copies of those (made once; none outside).
        self.__dict__["normal"] = {
            part: {n: p.clone() for n, p in getattr(twin, part).named_parameters() if torch.is_inference(p)}
            for part in ("text_model", "text_projection")}
        self.entries = list(entries)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.int64, device=device), persistent=False)
        width = twin.text_model.embeddings.token_embedding.weight.shape[1]
        self.delta = nn.Parameter(torch.zeros(len(ids), width, dtype=torch.float32, device=device))

    @property
    def new_token_names(self) -> list[str]:
        return [e.name for e in self.entries if e.is_new]

    def table(self) -> torch.Tensor:
        """The clone's embedding with the deltas added, as the LoRA loader builds it (``index_add`` in its dtype)."""
        base = self.twin.text_model.embeddings.token_embedding.weight
        return base.index_add(0, self.ids.to(base.device), self.delta.to(device=base.device, dtype=base.dtype))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_text (B, 77, C), pooled (B, P)) of ``captions`` with the current deltas; differentiable in them."""
        twin = self.twin
        ids, mask = twin.tokenize(captions)
        device = twin.device
        ids, mask = ids.to(device), mask.to(device)
        params = {**self.normal["text_model"], EMBEDDING_KEY[len("text_model."):]: self.table()}
        hidden, last = functional_call(twin.text_model, params, (ids, mask))
        pooled = last[torch.arange(last.shape[0], device=last.device), twin.pooled_positions(ids)]
        return hidden, functional_call(twin.text_projection, self.normal["text_projection"], (pooled,))

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        return {"embeddings.indices": self.ids.detach().cpu().clone(),
                "embeddings.embeddings": self.delta.detach().float().cpu().clone()}

    def load_official(self, sd: dict[str, torch.Tensor], what: str) -> None:
        ids, deltas = sd.get("embeddings.indices"), sd.get("embeddings.embeddings")
        if ids is None or deltas is None or ids.tolist() != self.ids.tolist() or deltas.shape != self.delta.shape:
            have = None if ids is None else ids.tolist()
            raise TrainingInputError(
                f"{what} learned token ids {have} (rows {None if deltas is None else tuple(deltas.shape)}), this run's "
                f"tokens setting gives ids {self.ids.tolist()} ({tuple(self.delta.shape)}) - resume with the tokens "
                "setting the run was started with.")
        with torch.no_grad():
            self.delta.copy_(deltas.float())
