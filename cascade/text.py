"""CLIP ViT-bigG/14 text encoder (laion) that conditions Stage C and Stage B (SPEC §9).

The network is the CLIP text tower with its projection written here in plain torch, module for module
and key for key as transformers' ``CLIPTextModelWithProjection`` (tests check parity on the same weights).
transformers is used for the tokenizer only: its CLIP *modelling* import pulls in the audio stack
(``modeling_layers`` -> ``processing_utils`` -> ``audio_utils`` imports torchaudio whenever it is installed),
so a torchaudio that does not match torch (``OSError: Could not load this library: _torchaudio.abi3.so``)
would break every workflow at the text-encoder loader; the tokenizer classes import no audio code.
The tokenizer is OpenAI's CLIP BPE, shipped in ``cascade/tokenizer/``. Facts and decisions (pad token,
pooling rule, checkpoint prefixes, learned tokens) are in docs/TEXT_ENCODER.md.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .clip_layers import ClipEncoder, assign_checked, count_layers, find_prefixes, log_unused, pick_widest
from .errors import CascadeError, CheckpointError, ShapeError, UnknownLayoutError

log = logging.getLogger(__name__)

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
CONTEXT_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407
# The official stack (transformers AutoTokenizer of laion bigG, as saved in stabilityai/stable-cascade*)
# pads with <|endoftext|>; ComfyUI's Stable Cascade CLIP-G does the same (pad_with_end=True).
PAD_ID = EOS_ID
POOLING_RULES = ("first_eos", "argmax")
EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


@dataclass(frozen=True)
class TextEncoderConfig:
    """Hyper-parameters of the CLIP text tower; defaults are laion ViT-bigG-14.

    ``pooling`` picks the token whose final-LayerNormed state becomes the pooled vector:
    ``"first_eos"`` (first ``eos_token_id``; what transformers does for the released config, whose
    eos_token_id is 49407) or ``"argmax"`` (largest id; transformers' legacy rule for configs that
    carry eos_token_id == 2). The two differ only when the prompt holds added tokens (ids > 49407).
    """

    vocab_size: int = 49408
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 20
    max_positions: int = CONTEXT_LENGTH
    projection_dim: int = 1280
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    pooling: str = "first_eos"

    @classmethod
    def bigg(cls) -> TextEncoderConfig:
        """laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, the encoder of every Stable Cascade release."""
        return cls()

    @classmethod
    def tiny(cls, hidden_size: int = 64, projection_dim: int = 64) -> TextEncoderConfig:
        """Two layers, one head, same key layout and the real 49408-token vocabulary (tests, demo runs).

        Stage C's ``c_clip_text`` / ``c_clip_text_pooled`` must equal ``hidden_size`` / ``projection_dim``.
        """
        return cls(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=2,
                   num_heads=max(1, hidden_size // 64), projection_dim=projection_dim)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> TextEncoderConfig:
        """Infer sizes from transformers-layout keys (see ``TextEncoder.convert_state_dict``).

        Heads are not stored in a state dict; CLIP text towers use 64 channels a head.
        """
        emb = sd.get("text_model.embeddings.token_embedding.weight")
        pos = sd.get("text_model.embeddings.position_embedding.weight")
        proj = sd.get("text_projection.weight")
        if emb is None or pos is None or proj is None:
            raise CheckpointError(
                "text encoder state dict: token_embedding, position_embedding or text_projection is missing "
                f"({len(sd)} keys); expected a CLIP text tower with projection (laion ViT-bigG-14) - pick the "
                "bigG text encoder file (e.g. text_encoder/model.safetensors of stabilityai/stable-cascade)."
            )
        layers = count_layers(sd, "text_model.encoder.layers.")
        fc1 = sd.get("text_model.encoder.layers.0.mlp.fc1.weight")
        hidden = int(emb.shape[1])
        return cls(
            vocab_size=int(emb.shape[0]),
            hidden_size=hidden,
            intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * hidden,
            num_layers=layers,
            num_heads=max(1, hidden // 64),
            max_positions=int(pos.shape[0]),
            projection_dim=int(proj.shape[0]),
        )

    def to_transformers(self) -> Any:
        """The same sizes as a transformers ``CLIPTextConfig`` (parity tests and benchmarks only)."""
        from transformers import CLIPTextConfig

        if self.pooling not in POOLING_RULES:
            raise CascadeError(f"TextEncoderConfig.pooling={self.pooling!r}; expected one of {POOLING_RULES}.")
        return CLIPTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions, projection_dim=self.projection_dim,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID if self.pooling == "first_eos" else 2, pad_token_id=1,
        )


@functools.lru_cache(maxsize=1)
def _base_tokenizer() -> Any:
    from transformers import CLIPTokenizerFast

    # Never mutated: encoders that add tokens work on a deep copy (see TextEncoder.clone).
    # The fast tokenizer is what the official AutoTokenizer call returns (one class in transformers 5).
    return CLIPTokenizerFast.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def load_tokenizer() -> Any:
    """A private copy of the shipped CLIP tokenizer (pads with <|endoftext|> to 77 tokens)."""
    return copy.deepcopy(_base_tokenizer())


class TextEncoder(nn.Module):
    """CLIP text tower + projection; ``encode`` gives Stage C/B's ``clip_text`` and ``clip_text_pooled``.

    Parameters:
        config (`TextEncoderConfig`): sizes; ``TextEncoderConfig.bigg()`` for the release.
        dtype (`torch.dtype`, *optional*): parameter dtype (default: torch's default dtype).
        device (`torch.device` or `str`, *optional*): where parameters are created; ``"meta"`` builds an
            empty shell for ``load_state_dict_any`` (which then assigns the file's tensors).
        operations: accepted for the common constructor signature and ignored: the layers are plain
            ``torch.nn`` ones, so hosts cast the module as a whole.

    State-dict keys are transformers' (``text_model.*``, ``text_projection.weight``).
    """

    def __init__(self, config: TextEncoderConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = None) -> None:
        super().__init__()
        if config.pooling not in POOLING_RULES:
            raise CascadeError(f"TextEncoderConfig.pooling={config.pooling!r}; expected one of {POOLING_RULES}.")
        self.config = config
        factory = {"device": device if device is not None else "cpu", "dtype": dtype}
        self.text_model = ClipTextTransformer(config, **factory)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False, **factory)
        self.eval().requires_grad_(False)
        self.tokenizer = _base_tokenizer()
        self._added_tokens: dict[str, int] = {}
        self._is_clone = False

    # ---- encoding -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    @device.setter
    def device(self, value: torch.device) -> None:
        # ComfyUI's ModelPatcher assigns ``model.device`` after moving weights; the weights are the
        # source of truth here, so the assignment is accepted and ignored.
        pass

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, (B, 77) int64 each, as the official code tokenizes:
        ``padding="max_length"``, ``max_length=77``, ``truncation=True``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for p in prompts:
            n = len(self.tokenizer(p)["input_ids"])
            if n > CONTEXT_LENGTH:
                log.warning("ComfyUI-StableCascade: prompt is %d tokens, CLIP reads the first %d: %.60r...",
                            n, CONTEXT_LENGTH, p)
        tok = self.tokenizer(prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts; returns ``clip_text`` (B, 77, hidden) and ``clip_text_pooled`` (B, projection).

        ``clip_text`` is ``hidden_states[-1]``: the last layer's output, not final-LayerNormed, all 77
        positions (padding included). The unconditional input is ``encode([""])``, not zeros.
        """
        ids, mask = self.tokenize(prompts)
        return self.encode_tokens(ids, mask)

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tower on token ids (B, L); the attention mask is passed as the official code does."""
        if input_ids.ndim != 2:
            raise ShapeError(f"input_ids of shape {tuple(input_ids.shape)}; expected (B, L) token ids.")
        n_emb = self.text_model.embeddings.token_embedding.num_embeddings
        if int(input_ids.max()) >= n_emb or int(input_ids.min()) < 0:
            raise CascadeError(
                f"token id {int(input_ids.max())} is outside this encoder's {n_emb}-row embedding; added tokens "
                "need the encoder clone they were added to (TextEncoder.clone_with_tokens)."
            )
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        hidden, last = self.text_model(ids, mask)
        idx = self.pooled_positions(ids)
        pooled = last[torch.arange(last.shape[0], device=last.device), idx]
        return hidden, self.text_projection(pooled)

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token in each row, by ``config.pooling`` (see TextEncoderConfig)."""
        ids = input_ids.to(torch.int64)
        if self.config.pooling == "argmax":
            return ids.argmax(dim=-1)
        return (ids == EOS_ID).int().argmax(dim=-1)

    # ---- loading --------------------------------------------------------------------------------

    @staticmethod
    def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Any supported layout -> transformers keys; see ``text_to_transformers``."""
        return text_to_transformers(sd)

    def load_state_dict_any(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load transformers-layout keys with or without a ``transformer.``, ``clip_g.transformer.``,
        ``text_encoders.clip_g.transformer.`` or ``text_encoder.clip_g.transformer.`` prefix, or
        open_clip's layout. Missing parameters raise CheckpointError; unexpected keys are logged.
        Tensors are assigned (a meta-built module takes the file's tensors and dtype)."""
        converted = self.convert_state_dict(sd)
        assign_checked(self, converted, what="text encoder")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> TextEncoder:
        """Build on the meta device from the keys' shapes, then load; keeps the file's dtype unless asked."""
        converted = text_to_transformers(sd)
        model = cls(TextEncoderConfig.from_state_dict(converted), device="meta")
        converted = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                     for k, v in converted.items()}
        assign_checked(model, converted, what="text encoder")
        return model

    # ---- learned tokens (LoRA) ------------------------------------------------------------------

    @property
    def added_tokens(self) -> dict[str, int]:
        """Tokens added to this clone, text -> id."""
        return dict(self._added_tokens)

    def clone(self) -> TextEncoder:
        """A new encoder sharing every layer with this one (the same module objects), with its own tokenizer copy.

        Only the containers above the token embedding (this module, ``text_model``, ``text_model.embeddings``)
        are new objects; every layer below them is this encoder's own. So whatever a host does to this
        encoder's layers (moves them to its device, writes LoRA patches into them and takes them off again)
        the clone computes with, and a host that wraps the clone as a clone of this encoder's patcher
        (``ModelHandle.with_network``) holds the shared weights once. ``add_token`` / ``add_embedding_delta``
        on the clone always put a new embedding on the clone's own container, never write into the shared one,
        so nothing done to the clone reaches this encoder.
        """
        twin = _shallow_module_copy(self)
        twin.text_model = _shallow_module_copy(self.text_model)
        twin.text_model.embeddings = _shallow_module_copy(self.text_model.embeddings)
        twin.tokenizer = copy.deepcopy(self.tokenizer)
        twin._added_tokens = dict(self._added_tokens)
        twin._is_clone = True
        return twin

    def own_keys(self) -> tuple[str, ...]:
        """State-dict keys whose tensors a clone may hold on its own (its token embedding); every other
        weight of a clone is its original's (see ``clone``)."""
        return (EMBEDDING_KEY,) if self._is_clone else ()

    def clone_with_tokens(self, tokens: Sequence[tuple[str, str | None]]) -> tuple[TextEncoder, list[int]]:
        """Clone, then ``add_token`` each ``(text, init_regex)``; returns the clone and the new ids."""
        twin = self.clone()
        return twin, [twin.add_token(text, regex) for text, regex in tokens]

    def add_token(self, text: str, init_regex: str | None = None) -> int:
        """Add ``text`` as a token with a new embedding row and return its id (49408, 49409, ...).

        The row is the mean of the rows whose token string matches ``init_regex`` (``re.search`` over
        the vocabulary, e.g. ``"^dog</w>"``), zeros when nothing matches or no regex is given - the
        official LoRA trainer's rule. Only allowed on a clone, so a shared encoder never changes.
        """
        self._require_clone("add_token")
        if not isinstance(text, str) or not text.strip():
            raise CascadeError(f"learned token {text!r}: expected a non-empty string such as '[fernando]'.")
        vocab = self.tokenizer.get_vocab()
        if text in self._added_tokens or text in vocab:
            where = "was already added to this encoder" if text in self._added_tokens else "is in the CLIP vocabulary"
            raise CascadeError(
                f"learned token {text!r} {where} (id {vocab.get(text, self._added_tokens.get(text))}); pick a "
                "distinct name, e.g. one in brackets such as '[myname]'."
            )
        weight = self.text_model.embeddings.token_embedding.weight
        if len(vocab) != weight.shape[0]:
            raise CheckpointError(
                f"tokenizer has {len(vocab)} tokens but the embedding has {weight.shape[0]} rows; tokens can "
                "only be added to an encoder whose embedding matches the shipped 49408-token vocabulary."
            )
        row = self._init_row(vocab, init_regex, weight)
        self.tokenizer.add_tokens([text])
        new_id = self.tokenizer.convert_tokens_to_ids(text)
        if new_id != weight.shape[0]:
            raise CascadeError(f"learned token {text!r} got id {new_id}, expected {weight.shape[0]}.")
        self._set_embedding(torch.cat([weight, row[None]], dim=0))
        self._added_tokens[text] = new_id
        return new_id

    def add_embedding_delta(self, ids: Sequence[int] | torch.Tensor, deltas: torch.Tensor,
                            strength: float = 1.0) -> None:
        """``E[ids] += strength * deltas`` (the LoRA file's ``embeddings.embeddings`` rows); clone only."""
        self._require_clone("add_embedding_delta")
        weight = self.text_model.embeddings.token_embedding.weight
        idx = torch.as_tensor(ids, dtype=torch.int64).flatten()
        if deltas.ndim != 2 or deltas.shape != (idx.numel(), weight.shape[1]):
            raise ShapeError(
                f"embedding deltas of shape {tuple(deltas.shape)} for {idx.numel()} ids; expected "
                f"({idx.numel()}, {weight.shape[1]}) - one row per id, in the text encoder's width."
            )
        if idx.numel() and (int(idx.max()) >= weight.shape[0] or int(idx.min()) < 0):
            raise CascadeError(
                f"embedding delta for token id {int(idx.max())}, but the embedding has {weight.shape[0]} rows; "
                "add the learned tokens first (add_token / clone_with_tokens)."
            )
        new = weight.detach().clone()
        new.index_add_(0, idx.to(new.device), deltas.to(device=new.device, dtype=new.dtype), alpha=strength)
        self._set_embedding(new)

    def _require_clone(self, what: str) -> None:
        if not self._is_clone:
            raise CascadeError(
                f"TextEncoder.{what} on a shared encoder; call encoder.clone() (or clone_with_tokens) and "
                "change the clone, so other users of the encoder keep the original vocabulary."
            )

    def _init_row(self, vocab: Mapping[str, int], init_regex: str | None, weight: torch.Tensor) -> torch.Tensor:
        if init_regex is None:
            return torch.zeros_like(weight[0])
        try:
            pattern = re.compile(init_regex)
        except re.error as exc:
            raise CascadeError(f"init regex {init_regex!r} for a learned token is not a valid regex: {exc}.") from exc
        rows = sorted(i for tok, i in vocab.items() if pattern.search(tok) is not None)
        if not rows:
            log.warning("ComfyUI-StableCascade: no vocabulary token matches %r; the new row starts at zeros.",
                        init_regex)
            return torch.zeros_like(weight[0])
        return weight[torch.tensor(rows, device=weight.device)].mean(dim=0)

    def _set_embedding(self, weight: torch.Tensor) -> None:
        # Kept where the embedding it replaces lives; encode moves only looked-up rows if the host has moved
        # the shared layers elsewhere (see ClipTextEmbeddings.forward).
        # A fresh Embedding, never an in-place write: the old one may be shared with the base encoder.
        emb = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
        emb.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.text_model.embeddings.token_embedding = emb
        self.config = replace(self.config, vocab_size=int(weight.shape[0]))


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object whose children, parameters and buffers are ``module``'s own objects.

    The registries are copied, so assigning a child on the copy leaves ``module`` as it is. State a host keeps
    on a network's ``__dict__`` (the built-in patcher's ``_scw_patch_state``) is not carried over: it belongs
    to the network it was made for.
    """
    twin = module.__class__.__new__(module.__class__)
    state = {k: v for k, v in module.__dict__.items() if k != "_scw_patch_state"}
    for key, value in state.items():
        if isinstance(value, (dict, set)):  # _modules, _parameters, _buffers, hook registries, ...
            state[key] = copy.copy(value)
    twin.__dict__.update(state)
    return twin


class ClipTextEmbeddings(nn.Module):
    def __init__(self, vocab: int, width: int, positions: int, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(positions, width, device=device, dtype=dtype)
        self.register_buffer("position_ids", torch.arange(positions, device=device).expand(1, -1), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        if n > self.position_embedding.num_embeddings:
            raise ShapeError(f"{n} tokens; the text encoder has {self.position_embedding.num_embeddings} positions "
                             f"- tokenize with max_length={self.position_embedding.num_embeddings}.")
        positions = self.position_embedding(self.position_ids[:, :n])
        table = self.token_embedding.weight
        if table.device != positions.device:
            # A learned-token clone's own embedding stays on the offload device while the host moves the shared
            # layers: look the rows up there and move only them (an exact gather, no device copy of the table).
            return self.token_embedding(input_ids.to(table.device)).to(positions.device) + positions
        return self.token_embedding(input_ids) + positions


class ClipTextTransformer(nn.Module):
    """CLIP's causal text transformer: ``forward(ids, mask) -> (last layer output, final-LayerNormed)``."""

    def __init__(self, config: TextEncoderConfig, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embeddings = ClipTextEmbeddings(config.vocab_size, config.hidden_size, config.max_positions,
                                             device=device, dtype=dtype)
        self.encoder = ClipEncoder(config.num_layers, config.hidden_size, config.num_heads,
                                   config.intermediate_size, config.hidden_act, config.layer_norm_eps,
                                   device=device, dtype=dtype)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device,
                                             dtype=dtype)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # As transformers builds it for sdpa: causal AND the padding mask over keys. An all-ones (or no)
            # mask is dropped for the kernel's own causal path, again as transformers does.
            n = input_ids.shape[-1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = causal[None, None] & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        hidden = self.encoder(x, mask, causal=True)
        return hidden, self.final_layer_norm(hidden)


# ---- checkpoint keys (shared with clip_vision) -----------------------------------------------------

_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def text_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-tower keys in transformers' layout from any supported file layout.

    Accepted: transformers keys (``text_model.*``, ``text_projection.weight``) under any prefix
    (``transformer.``, ``clip_g.transformer.``, ``text_encoders.clip_g.transformer.``, ComfyUI's packaged
    Stable Cascade ``text_encoder.clip_g.transformer.``), with ComfyUI's legacy ``<p>text_projection``
    (stored transposed) next to ``<p>transformer.``; and open_clip's layout (``transformer.resblocks.*``).
    Keys outside the chosen tower (other models in a packaged file) are left alone.
    """
    what = "text encoder state dict"
    prefixes = find_prefixes(sd, "text_model.final_layer_norm.weight")
    if prefixes:
        p = pick_widest(sd, prefixes, "text_model.final_layer_norm.weight", what)
        out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p + "text_model.")}
        outer = p[: -len("transformer.")] if p.endswith("transformer.") else None
        if p + "text_projection.weight" in sd:
            out["text_projection.weight"] = sd[p + "text_projection.weight"]
        else:
            for legacy in (p + "text_projection", None if outer is None else outer + "text_projection"):
                if legacy is not None and legacy in sd:
                    # ComfyUI's and open_clip's projection is an (in, out) matrix used as x @ P.
                    out["text_projection.weight"] = sd[legacy].t().contiguous()
                    break
        log_unused(sd, p, {p + k for k in out} | {p + "text_projection"}, what)
        return out
    prefixes = [p for p in find_prefixes(sd, "transformer.resblocks.0.attn.in_proj_weight")
                if p + "token_embedding.weight" in sd]
    if prefixes:
        return _openclip_text(sd, pick_widest(sd, prefixes, "token_embedding.weight", what))
    raise UnknownLayoutError(
        f"{what}: no CLIP text tower found among {len(sd)} keys (e.g. {sorted(sd)[:3]}); known layouts: "
        "transformers '[prefix]text_model.final_layer_norm.weight' (+ text_projection.weight) and open_clip "
        "'[prefix]transformer.resblocks.0.attn.in_proj_weight' + 'token_embedding.weight'. Pick the bigG text "
        "encoder file or a packaged Stable Cascade checkpoint."
    )


def _openclip_text(sd: Mapping[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
    out = {
        "text_model.embeddings.token_embedding.weight": sd[p + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd[p + "positional_embedding"],
        "text_model.final_layer_norm.weight": sd[p + "ln_final.weight"],
        "text_model.final_layer_norm.bias": sd[p + "ln_final.bias"],
    }
    if p + "text_projection" in sd:
        out["text_projection.weight"] = sd[p + "text_projection"].t().contiguous()
    used = {p + k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                            "text_projection")}
    for i in range(count_layers(sd, p + "transformer.resblocks.")):
        src, dst = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, q in zip(("q_proj", "k_proj", "v_proj"), sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{kind}"] = q
            used.add(f"{src}attn.in_proj_{kind}")
            for a, b in _OPENCLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
                used.add(f"{src}{a}.{kind}")
    log_unused({k: v for k, v in sd.items() if not k.startswith(p + "visual.")}, p, used, "open_clip text tower")
    return out
