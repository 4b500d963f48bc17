"""The LoRA that trains: one low-rank pair per target weight of Stage C, and its two file layouts.

Targets are the official ones (every attention ``in_proj_weight`` and ``out_proj.weight``, in the order
``model_patches.lora.official_target_keys`` gives: the order the official file lists them), optionally followed
by the feed-forward linears of every ResBlock (``channelwise.0`` / ``channelwise.4``). Official init (SPEC §13):
``lora_down`` (rank x in) zeros, ``lora_up`` (out x rank) N(0, 1), so training starts at the base network;
``delta = (up @ down) * alpha / rank``, kept in float32.

State dicts:
- official: ``weights.{i}.lora_down`` / ``weights.{i}.lora_up`` for the official targets (the loader's scale is
  1 / rank, so ``alpha`` is folded into ``lora_up``: exact for alpha 1, the official value), plus the learned
  token rows (``train.tokens``);
- community (what ComfyUI core's LoRA loader reads for Stable Cascade, kohya names): ``lora_prior_unet_<key
  with underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the packed ``in_proj_weight`` split
  into ``attention_attn_to_q`` / ``to_k`` / ``to_v`` as ComfyUI splits it (``lora_up`` row blocks, one shared
  ``lora_down``). Feed-forward pairs exist only here: the official layout has no place for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model_patches.lora import describe_width, official_target_keys
from .errors import TrainingInputError

FF_SUFFIXES = (".channelwise.0.weight", ".channelwise.4.weight")
COMMUNITY_PREFIX = "lora_prior_unet_"
_QKV = ("to_q", "to_k", "to_v")


def target_keys(net: nn.Module, include_ff: bool = False) -> list[str]:
    """State-dict keys the LoRA trains: the official ones in file order, then (optionally) the FF linears."""
    keys = official_target_keys(net)
    if not keys:
        raise TrainingInputError(f"the network ({type(net).__name__}) has no attention weights to train a LoRA on; "
                                 "connect a Stage C model.")
    if include_ff:
        keys += [k for k, _ in net.named_parameters() if k.endswith(FF_SUFFIXES)]
    return keys


class LoraPair(nn.Module):
    """``delta = (up @ down) * scale`` for one weight of shape ``shape`` (out x in...)."""

    def __init__(self, shape: tuple[int, ...], rank: int, scale: float, generator: torch.Generator,
                 device: torch.device | None = None) -> None:
        super().__init__()
        out_f, in_f = int(shape[0]), int(torch.Size(shape[1:]).numel())
        self.shape, self.scale = tuple(int(s) for s in shape), float(scale)
        self.lora_down = nn.Parameter(torch.zeros(rank, in_f, dtype=torch.float32, device=device))
        up = torch.randn(out_f, rank, generator=generator, dtype=torch.float32)
        self.lora_up = nn.Parameter(up.to(device))

    def delta(self) -> torch.Tensor:
        return (self.lora_up @ self.lora_down) * self.scale


class StageCLora(nn.Module):
    """The trainable pairs of one Stage C; ``deltas()`` feeds ``forward.weight_source``."""

    def __init__(self, net: nn.Module, rank: int = 4, alpha: float = 1.0, include_ff: bool = False,
                 seed: int = 0, device: torch.device | None = None) -> None:
        super().__init__()
        self.keys = target_keys(net, include_ff)
        self.n_official = len(official_target_keys(net))
        self.rank, self.alpha, self.include_ff = int(rank), float(alpha), bool(include_ff)
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        check_rank(self.rank, {k: shapes[k] for k in self.keys})
        if not (alpha == alpha) or alpha <= 0 or alpha == float("inf"):
            raise TrainingInputError(f"LoRA alpha={alpha!r}; expected a positive number (official 1: scale 1/rank).")
        gen = torch.Generator().manual_seed(int(seed))
        self.pairs = nn.ModuleList(LoraPair(shapes[k], self.rank, self.alpha / self.rank, gen, device)
                                   for k in self.keys)
        self.width = int(shapes[self.keys[0]][1])

    def merged(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The patched target weights ``W + delta`` (float32 merge, back to W's dtype), as a host's patch writes them."""
        params = dict(net.named_parameters())
        with torch.no_grad():
            return {k: (params[k].detach().float() + pair.delta().to(params[k].device).view(params[k].shape))
                    .to(params[k].dtype) for k, pair in zip(self.keys, self.pairs)}

    def deltas(self) -> dict[str, LoraPair]:
        """Target key -> its pair (``lora_up``, ``lora_down``, ``scale``), what ``forward.weight_source`` takes."""
        return dict(zip(self.keys, self.pairs))

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """``weights.{i}.lora_down/up`` of the official targets (float32 copies); alpha folded into lora_up."""
        if self.include_ff:
            raise TrainingInputError("a LoRA with feed-forward pairs (include_ff) has no official-layout file (its "
                                     "loader maps pairs onto the attention weights only); save the community layout.")
        out = {}
        for i, pair in enumerate(self.pairs[: self.n_official]):
            up = pair.lora_up.detach().float().cpu()
            out[f"weights.{i}.lora_down"] = pair.lora_down.detach().float().cpu().clone()
            out[f"weights.{i}.lora_up"] = (up * self.alpha if self.alpha != 1.0 else up).clone()
        return out

    def community_state_dict(self) -> dict[str, torch.Tensor]:
        """ComfyUI core's Stable Cascade names (see module docstring), float32."""
        out: dict[str, torch.Tensor] = {}
        alpha = torch.tensor(self.alpha, dtype=torch.float32)
        for key, pair in zip(self.keys, self.pairs):
            down = pair.lora_down.detach().float().cpu()
            up = pair.lora_up.detach().float().cpu()
            if len(pair.shape) > 2:  # a conv weight: kohya stores (rank, in, kh, kw) / (out, rank, 1, 1)
                down = down.view(self.rank, *pair.shape[1:])
                up = up.view(*up.shape, 1, 1)
            if key.endswith(".in_proj_weight"):
                stem = key[: -len("in_proj_weight")]
                for name, block in zip(_QKV, up.chunk(3, dim=0)):
                    _put(out, f"{stem}{name}", block.clone(), down.clone(), alpha)
            else:
                _put(out, key[: -len(".weight")], up.clone(), down.clone(), alpha)
        return out

    def load_official(self, sd: dict[str, torch.Tensor], what: str) -> None:
        """Start from an official-layout LoRA's pairs (resume from a LoRA file); shapes checked first."""
        pairs = [(sd.get(f"weights.{i}.lora_down"), sd.get(f"weights.{i}.lora_up")) for i in range(self.n_official)]
        check_resume_shapes(what, [(tuple(d.shape), tuple(u.shape)) if d is not None and u is not None else None
                                   for d, u in pairs], self, sd_pairs=sum(1 for k in sd if k.endswith(".lora_down")))
        with torch.no_grad():
            for pair, (down, up) in zip(self.pairs, pairs):
                pair.lora_down.copy_(down.float())
                pair.lora_up.copy_(up.float() / self.alpha)


def _put(out: dict[str, torch.Tensor], module: str, up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor) -> None:
    stem = COMMUNITY_PREFIX + module.replace(".", "_")
    out[f"{stem}.lora_up.weight"] = up.contiguous()
    out[f"{stem}.lora_down.weight"] = down.contiguous()
    out[f"{stem}.alpha"] = alpha.clone()


def check_rank(rank: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """A rank above a target's smaller side is no low-rank update (and wastes memory): refuse it, naming the layer."""
    if not isinstance(rank, int) or rank < 1:
        raise TrainingInputError(f"LoRA rank={rank!r}; expected a whole number >= 1 (official 4).")
    key, shape = min(shapes.items(), key=lambda kv: min(kv[1][0], torch.Size(kv[1][1:]).numel()))
    limit = min(shape[0], int(torch.Size(shape[1:]).numel()))
    if rank > limit:
        raise TrainingInputError(
            f"LoRA rank={rank} is larger than the layer {key} {tuple(shape)} allows ({limit}: the smaller of its "
            f"output and input sizes) - pick a rank of at most {limit} (official 4).")


def check_resume_shapes(what: str, pairs: list[tuple[tuple[int, ...], tuple[int, ...]] | None], lora: StageCLora,
                        sd_pairs: int | None = None) -> None:
    """Refuse a resume LoRA made for another Stage C (width, depth) or another rank, naming both sides."""
    first = next((p for p in pairs if p is not None), None)
    if first is not None and first[0][1] != lora.width:
        raise TrainingInputError(
            f"{what} was trained on a Stage C {describe_width(first[0][1])}, but the connected Stage C is "
            f"{describe_width(lora.width)} - resume with the Stage C it was trained on, or start a new run.")
    count = sd_pairs if sd_pairs is not None else len(pairs)
    if any(p is None for p in pairs) or count != len(pairs):
        raise TrainingInputError(
            f"{what} has {count} LoRA pairs, this Stage C has {len(pairs)} targets ({len(pairs) // 2} attention "
            "blocks) - it was trained on another Stage C; resume with that one, or start a new run.")
    for i, ((down, up), pair) in enumerate(zip(pairs, lora.pairs)):
        if down != tuple(pair.lora_down.shape) or up != tuple(pair.lora_up.shape):
            raise TrainingInputError(
                f"{what}: pair {i} ({lora.keys[i]}) is lora_down {down} / lora_up {up}, this run needs "
                f"{tuple(pair.lora_down.shape)} / {tuple(pair.lora_up.shape)} (rank {lora.rank}) - set the rank the "
                "LoRA was trained with, or start a new run.")
