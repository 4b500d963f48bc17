"""Reading a Stage C / Stage B U-Net's hyper-parameters back from its original-layout keys and shapes.

Shared by ``StageCConfig.from_state_dict`` and ``StageBConfig.from_state_dict``. Everything here looks
at key names and shapes only, so it works on meta tensors and on any smaller variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from .errors import CheckpointError, UnknownLayoutError

HEAD_DIM = 64
_BLOCK_KEY = re.compile(r"^(down|up)_blocks\.(\d+)\.(\d+)\.(.+)$")
_REPEAT_KEY = re.compile(r"^(down|up)_repeat_mappers\.(\d+)\.(\d+)\.weight$")
_COND_ORDER = ("sca", "crp")
_FOREIGN_MARKERS = {
    "model.diffusion_model.": "ComfyUI's packaged layout",
    "diffusion_model.": "ComfyUI's packaged layout",
    ".to_q.weight": "the diffusers layout",
    ".to_out.0.weight": "the diffusers layout",
}


@dataclass(frozen=True)
class LevelLayout:
    """What the block keys say about the U-Net levels."""

    c_hidden: tuple[int, ...]
    level_config: tuple[str, ...]
    blocks: tuple[tuple[int, ...], tuple[int, ...]]
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]]
    nhead: tuple[int, ...]
    kernel_size: int
    c_r: int
    t_conds: tuple[str, ...]
    c_cond: int | None

    def config_fields(self) -> dict[str, Any]:
        """The fields Stage C's and Stage B's configs take as they are (``c_cond`` each derives its own way)."""
        return {name: getattr(self, name) for name in ("c_hidden", "level_config", "blocks", "block_repeat", "nhead",
                                                       "kernel_size", "c_r", "t_conds")}


_RANK_MEANING = {1: "a vector (bias, norm or gain)", 2: "a Linear weight (out, in)",
                 4: "a Conv2d weight (out, in, kh, kw)"}


def shape_of(sd: Mapping[str, Any], key: str, what: str = "the state dict",
             rank: int | None = None) -> tuple[int, ...]:
    """The shape of ``sd[key]``, checked: a missing key, a rank other than ``rank`` (when given) or a zero-size
    dimension is a CheckpointError naming the key, so config inference never unpacks or indexes a damaged
    shape (a flattened ``clip_txt_mapper.weight`` used to end in a raw "not enough values to unpack")."""
    if key not in sd:
        require(sd, [key], what)
    shape = tuple(int(s) for s in sd[key].shape)
    if rank is not None and len(shape) != rank:
        raise CheckpointError(
            f"{what}: tensor {key!r} has shape {shape} (rank {len(shape)}); expected rank {rank} "
            f"({_RANK_MEANING.get(rank, f'{rank} dimensions')}). The file is damaged or was rewritten with "
            "reshaped tensors; download it again."
        )
    if 0 in shape:
        raise CheckpointError(
            f"{what}: tensor {key!r} has shape {shape}, with a zero-size dimension; a network layer cannot "
            "be empty. The file is damaged; download it again."
        )
    return shape


def require(sd: Mapping[str, Any], keys: list[str], what: str) -> None:
    """Raise a CheckpointError naming the first missing key and what the file looks like instead."""
    missing = [k for k in keys if k not in sd]
    if not missing:
        return
    for marker, layout in _FOREIGN_MARKERS.items():
        hit = next((k for k in sd if marker in k or k.startswith(marker)), None)
        if hit is not None:
            raise UnknownLayoutError(
                f"{what}: key {missing[0]!r} is missing and the state dict is in {layout} (found {hit!r}); "
                "convert it to the original layout first (cascade.loading reads every layout)."
            )
    sample = ", ".join(sorted(sd)[:6]) or "no keys at all"
    raise CheckpointError(
        f"{what}: key {missing[0]!r} is missing (expected the original release layout); found {len(sd)} keys "
        f"starting {sample}. Check that the file is the right model."
    )


def _letter(suffixes: set[str], where: str, what: str) -> str:
    if "depthwise.weight" in suffixes:
        return "C"
    if "attention.attn.in_proj_weight" in suffixes:
        return "A"
    if "mapper.weight" in suffixes:
        return "T"
    raise CheckpointError(
        f"{what}: block {where} has keys {sorted(suffixes)[:4]}, which match no supported block "
        "(ResBlock 'depthwise', AttnBlock 'attention.attn', TimestepBlock 'mapper'); the file is not a "
        "Stable Cascade U-Net of the original release."
    )


def _period(letters: str) -> str:
    n = len(letters)
    for p in range(1, n + 1):
        if n % p == 0 and letters[:p] * (n // p) == letters:
            return letters[:p]
    return letters


def _block_modules(sd: Mapping[str, Any], what: str) -> dict[tuple[str, int, int], set[str]]:
    """(side, level, index) of every block -> the key suffixes under it."""
    modules: dict[tuple[str, int, int], set[str]] = {}
    for key in sd:
        m = _BLOCK_KEY.match(key)
        if m:
            modules.setdefault((m[1], int(m[2]), int(m[3])), set()).add(m[4])
    if not modules:
        require(sd, ["down_blocks.0.0.depthwise.weight"], what)
    return modules


def _level_letters(modules: dict[tuple[str, int, int], set[str]], n_levels: int,
                   what: str) -> dict[tuple[str, int], str]:
    """(side, level) -> its blocks as letters in order (C ResBlock, A AttnBlock, T TimestepBlock)."""
    letters: dict[tuple[str, int], str] = {}
    for side in ("down", "up"):
        for level in range(n_levels):
            idx = sorted(i for s, lv, i in modules if s == side and lv == level)
            if idx != list(range(len(idx))):
                raise CheckpointError(f"{what}: {side}_blocks.{level} has gaps in its module indices {idx[:8]}...")
            letters[side, level] = "".join(
                _letter(modules[side, level, i], f"{side}_blocks.{level}.{i}", what) for i in idx
            )
    return letters


def _level_patterns(sd: Mapping[str, Any], letters: dict[tuple[str, int], str], n_levels: int,
                    what: str) -> tuple[list[str], list[int], list[int], list[int]]:
    """(level_config, c_hidden, blocks down, blocks up): each level's repeating pattern, width and depths.
    Up level u mirrors down level n_levels - 1 - u."""
    level_config, c_hidden, down_n = [], [], []
    for i in range(n_levels):
        down, up = letters["down", i], letters["up", n_levels - 1 - i]
        pattern = _period(down or up)
        if not pattern or (down and len(down) % len(pattern)) or (up and up != pattern * (len(up) // len(pattern))):
            raise CheckpointError(
                f"{what}: level {i} runs blocks {down!r} going down and {up!r} coming up; both must repeat one "
                "pattern such as 'CTA'."
            )
        level_config.append(pattern)
        down_n.append(len(down) // len(pattern))
        side, at = ("down", i) if down else ("up", n_levels - 1 - i)
        c_hidden.append(_level_width(sd, side, at, pattern[0], what))
    up_n = [len(letters["up", u]) // len(level_config[n_levels - 1 - u]) for u in range(n_levels)]
    return level_config, c_hidden, down_n, up_n


def _repeats(sd: Mapping[str, Any], n_levels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Block repeats per level: one more than the repeat mappers a level has (1 without any)."""
    repeats = {("down", i): 1 for i in range(n_levels)} | {("up", u): 1 for u in range(n_levels)}
    for key in sd:
        m = _REPEAT_KEY.match(key)
        if m:
            repeats[m[1], int(m[2])] = max(repeats[m[1], int(m[2])], int(m[3]) + 2)
    return (tuple(repeats["down", i] for i in range(n_levels)), tuple(repeats["up", u] for u in range(n_levels)))


def _first_blocks(modules: dict[tuple[str, int, int], set[str]], what: str) -> dict[str, str]:
    """Letter -> key prefix of the first block of that kind (its shapes give kernel, c_r, t_conds, c_cond)."""
    first: dict[str, str] = {}
    for k, v in sorted(modules.items()):
        first.setdefault(_letter(v, f"{k[0]}_blocks.{k[1]}.{k[2]}", what), f"{k[0]}_blocks.{k[1]}.{k[2]}.")
    if "C" not in first or "T" not in first:
        raise CheckpointError(
            f"{what}: the file has no ResBlock or no TimestepBlock; it is not a Stable Cascade U-Net."
        )
    return first


def infer_levels(sd: Mapping[str, Any], what: str) -> LevelLayout:
    """Infer widths, letters, depths, repeats, heads, kernel, c_r, t_conds and c_cond from block keys."""
    modules = _block_modules(sd, what)
    down_levels = [level for side, level, _ in modules if side == "down"]
    if not down_levels:
        require(sd, ["down_blocks.0.0.depthwise.weight"], what)
    n_levels = 1 + max(down_levels)
    letters = _level_letters(modules, n_levels, what)
    level_config, c_hidden, down_n, up_n = _level_patterns(sd, letters, n_levels, what)
    first = _first_blocks(modules, what)
    timestep_keys = {k[len(first["T"]):] for k in sd if k.startswith(first["T"])}
    names = {m[1] for s in timestep_keys if (m := re.fullmatch(r"mapper_(\w+)\.weight", s))}
    return LevelLayout(
        c_hidden=tuple(c_hidden),
        level_config=tuple(level_config),
        blocks=(tuple(down_n), tuple(up_n)),
        block_repeat=_repeats(sd, n_levels),
        nhead=tuple(max(1, c // HEAD_DIM) if "A" in cfg else 0 for c, cfg in zip(c_hidden, level_config)),
        kernel_size=shape_of(sd, first["C"] + "depthwise.weight", what, rank=4)[-1],
        c_r=shape_of(sd, first["T"] + "mapper.weight", what, rank=2)[1],
        t_conds=tuple(n for n in _COND_ORDER if n in names) + tuple(sorted(names - set(_COND_ORDER))),
        c_cond=shape_of(sd, first["A"] + "kv_mapper.1.weight", what, rank=2)[1] if "A" in first else None,
    )


def _level_width(sd: Mapping[str, Any], side: str, level: int, letter: str, what: str) -> int:
    base = f"{side}_blocks.{level}.0."
    if letter == "C":
        return shape_of(sd, base + "depthwise.weight", what, rank=4)[0]
    if letter == "T":
        return shape_of(sd, base + "mapper.weight", what, rank=2)[0] // 2
    return shape_of(sd, base + "attention.attn.out_proj.weight", what, rank=2)[0]


def build_meta(module_cls: Any, config: Any, what: str) -> nn.Module:
    """``module_cls(config)`` on the meta device; a config the layers refuse (widths a head count does not
    divide, ...) is a CheckpointError: such a config only comes from a damaged or hand-edited file."""
    try:
        return module_cls(config, device="meta")
    except (AssertionError, ArithmeticError, RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{what}: the sizes read from the file give {config}, which cannot be built ({type(e).__name__}: {e}). "
            "The file is damaged or a variant this loader does not know; download it again."
        ) from e


def check_against(module_cls: Any, config: Any, sd: Mapping[str, Any], what: str) -> None:
    """Build ``module_cls(config)`` on the meta device and insist its key -> shape map equals ``sd``'s."""
    model = build_meta(module_cls, config, what)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {have[k]} vs {want[k]}" for k in wrong[:3]))
        raise CheckpointError(
            f"{what}: the keys fit no consistent network (inferred {config}); " + "; ".join(parts)
            + ". The file is damaged or a variant this loader does not know."
        )
