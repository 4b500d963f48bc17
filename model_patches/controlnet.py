"""ControlNets for Stage C (SPEC §12.3) as keyed controls carried by clones of the Stage C handle.

``apply_controlnet(stage_c, controlnet, hint, strength, start, end)`` checks everything first, then
returns a *clone* of the Stage C handle that carries one more :class:`Control` (key
``"scw_controlnet:<file>#<n>"``); the input handle, its network and its other clones never change, and
clones made later (a LoRA applied after the ControlNet) keep the controls. The controls ride on the handle as
one keyed attachment (:class:`ControlSet`, key ``"scw_controlnet"``), so the Stage C runner loads the
ControlNets with the Stage C and wraps its network call by asking the handle, never this module:

- each ControlNet runs once per sampling run on its control input; every non-None output is multiplied
  by the strength (the official ``cnet_multiplier``);
- at a step whose schedule position ``1 - t`` lies in ``[start, end]`` (ComfyUI's start/end percent),
  the list goes to Stage C as ``cnet``: one element per ResBlock call, resized bilinearly
  (align_corners=True) and added before the block; outside the range Stage C runs without it;
- the same list goes to the conditional and the unconditional half of a CFG batch (the final notebooks).

Several controls on one handle are summed element-wise (each resized to the latent first when their
sizes differ; every released Stage C keeps one spatial size in all blocks, so this is exact).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..cascade.errors import CascadeError, ShapeError, StageMismatchError

log = logging.getLogger(__name__)

KEY_PREFIX = "scw_controlnet:"
# What each released ControlNet reads, by input channels: (kind, description, node that makes it).
HINTS = {
    1: ("canny", "a canny edge map (1 channel)", "'Stable Cascade ControlNet Canny Edges'"),
    4: ("inpainting", "an inpainting input (RGB with the masked pixels white + the mask, 4 channels)",
        "'Stable Cascade ControlNet Inpaint Input'"),
    16: ("super_resolution", "a super-resolution input (the image's EffNet latent x2, 16 channels)",
         "'Stable Cascade ControlNet Super-Resolution Input'"),
}
_WIDTHS = {2048: "3.6B Stage C", 1536: "1B lite Stage C"}
# Half the smallest gap between two steps' r in any schedule a user can set; absorbs float32 rounding only.
_R_TOLERANCE = 1e-5


@dataclass(frozen=True, eq=False)
class ControlHint:
    """A prepared control input: ``images`` (B, C, H, W) float32 on the CPU; ``kind`` names the filter."""

    images: torch.Tensor
    kind: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise ShapeError(f"control input must be a (B, C, H, W) tensor, got {getattr(self.images, 'shape', None)}")


@dataclass(frozen=True, eq=False)
class ControlNetModel:
    """A loaded ControlNet: its host handle (or a bare module) and the file it came from."""

    handle: Any
    name: str

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.handle, "module", self.handle)

    def device(self) -> torch.device:
        """Where it computes: its patcher's load device (in ComfyUI's low-VRAM mode some weights stay offloaded)."""
        patcher = getattr(self.handle, "patcher", None)
        return torch.device(patcher.load_device) if patcher is not None else next(self.module.parameters()).device


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet applied to a Stage C: input, strength and active range (fractions of the schedule)."""

    key: str
    controlnet: ControlNetModel
    hint: ControlHint
    strength: float
    start: float
    end: float



# ---- the attachment on a Stage C handle ------------------------------------------------------------------

ATTACHMENT_KEY = "scw_controlnet"


@dataclass(frozen=True, eq=False)
class ControlSet:
    """The controls on one Stage C handle, riding on it as a keyed attachment (``host.ModelHandle``): clones
    copy it; the runner asks the handle for the networks to load, their memory and the wrapped network call."""

    controls: tuple[Control, ...]

    def handles(self) -> list[Any]:
        return [c.controlnet.handle for c in self.controls]

    def memory(self) -> int:
        return estimate_memory(self.controls)

    def wrap(self, network_fn: Callable[..., torch.Tensor], context: dict[str, Any]) -> Callable[..., torch.Tensor]:
        return controlled(network_fn, self.controls, context["handle"], context["r_at"], context["latent_shape"])


def controls_of(handle: Any) -> tuple[Control, ...]:
    """The controls a Stage C handle carries (none for a plain handle or a bare module)."""
    found = getattr(handle, "attachments", {}).get(ATTACHMENT_KEY)
    return found.controls if found is not None else ()


def control_keys(handle: Any) -> list[str]:
    return [c.key for c in controls_of(handle)]


def _with_controls(handle: Any, controls: tuple[Control, ...]) -> Any:
    """A clone of ``handle`` carrying exactly ``controls`` (none: the attachment is removed)."""
    return handle.with_attachment(ATTACHMENT_KEY, ControlSet(controls) if controls else None)


# ---- checks ------------------------------------------------------------------------------------


def _describe_width(c: int) -> str:
    return f"{c} channels wide ({_WIDTHS[c]})" if c in _WIDTHS else f"{c} channels wide"


def resblock_calls(stage_c_config: Any) -> int:
    """ResBlock calls of one Stage C forward: the length of the ``cnet`` list it can use (64 for 3.6B)."""
    down, up = stage_c_config.blocks
    rep_down, rep_up = stage_c_config.block_repeat
    return sum(b * r for b, r in zip(down, rep_down)) + sum(b * r for b, r in zip(up, rep_up))


def check_fit(stage_c: Any, controlnet: ControlNetModel, hint: ControlHint, warn: bool = True) -> None:
    """Raise a clear error unless ``controlnet`` can run on ``hint`` and feed the Stage C network ``stage_c``."""
    name = controlnet.name
    cfg = getattr(getattr(stage_c, "module", stage_c), "config", None)
    kind = getattr(stage_c, "kind", "stage_c")
    if kind != "stage_c" or not hasattr(cfg, "c_hidden") or getattr(cfg, "c_in", None) != 16:
        raise StageMismatchError(f"ControlNet {name!r} goes on Stage C, but the model input is {kind} - connect "
                                 "the output of 'Stable Cascade Load Stage C' (ControlNets feed only the Stage C "
                                 "prior)")
    net_cfg = getattr(controlnet.module, "config", None)
    if not hasattr(net_cfg, "c_proj"):
        raise CascadeError(f"{name!r} is not a Stable Cascade ControlNet ({type(controlnet.module).__name__}) - "
                           "load one with 'Stable Cascade Load ControlNet'")
    widths = sorted(set(cfg.c_hidden))
    if widths != [net_cfg.c_proj]:
        raise ShapeError(
            f"ControlNet {name!r} makes additions {_describe_width(net_cfg.c_proj)} but the connected Stage C is "
            f"{' / '.join(_describe_width(c) for c in widths)}: the released ControlNets fit only the 3.6B Stage C "
            "- load stage_c_bf16.safetensors (or stage_c.safetensors) instead of the lite one")
    images = hint.images
    if images.shape[1] != net_cfg.c_in:
        got = HINTS.get(images.shape[1], (None, f"a {images.shape[1]}-channel input", None))[1]
        want = HINTS.get(net_cfg.c_in, (None, f"a {net_cfg.c_in}-channel input", "the matching node"))
        raise ShapeError(f"ControlNet {name!r} reads {want[1]}, but the control input is {got} - make it with "
                         f"{want[2]} (or load the ControlNet that fits this input)")
    if net_cfg.bottleneck_mode == "effnet" and min(images.shape[-2:]) < 32:
        raise ShapeError(f"ControlNet {name!r}: the control image is {images.shape[-1]}x{images.shape[-2]} pixels; "
                         "its EfficientNet needs at least 32x32 - use a larger image")
    calls = resblock_calls(cfg)
    lost = [i for i in net_cfg.proj_blocks if i >= calls]
    if lost and warn:
        log.warning("ComfyUI-StableCascade: ControlNet %r injects at blocks %s, but this Stage C has only %d ResBlock "
                    "calls; those outputs are unused.", name, lost, calls)


def check_range(strength: float, start: float, end: float) -> None:
    if not math.isfinite(float(strength)):
        raise CascadeError(f"ControlNet strength {strength} is not a number; use e.g. 1.0 (the notebooks' value)")
    if not 0.0 <= float(start) <= float(end) <= 1.0:
        raise CascadeError(f"ControlNet start {start} / end {end}: need 0 <= start <= end <= 1 (fractions of the "
                           "sampling schedule; 0 and 1 apply it at every step)")


# ---- applying ------------------------------------------------------------------------------------


def apply_controlnet(stage_c: Any, controlnet: ControlNetModel, hint: ControlHint, strength: float = 1.0,
                     start: float = 0.0, end: float = 1.0) -> Any:
    """A clone of the Stage C handle carrying one more control; ``stage_c`` itself is never changed.

    Every check runs before the clone is made, so a bad input leaves nothing applied anywhere.
    """
    check_range(strength, start, end)
    check_fit(stage_c, controlnet, hint)
    existing = controls_of(stage_c)
    control = Control(f"{KEY_PREFIX}{controlnet.name}#{len(existing) + 1}", controlnet, hint, float(strength),
                      float(start), float(end))
    return _with_controls(stage_c, existing + (control,))


def remove_control(stage_c: Any, key: str) -> Any:
    """A clone of the handle without the control ``key`` (the input keeps it)."""
    kept = tuple(c for c in controls_of(stage_c) if c.key != key)
    if len(kept) == len(controls_of(stage_c)):
        raise CascadeError(f"no control {key!r} on this Stage C; it has {control_keys(stage_c)}")
    return _with_controls(stage_c, kept)


def estimate_memory(controls: Sequence[Control]) -> int:
    """Rough activation bytes of running the ControlNets once (their outputs stay alive while sampling)."""
    total = 0
    for c in controls:
        cfg = c.controlnet.module.config
        elt = torch.finfo(next(c.controlnet.module.parameters()).dtype).bits // 8
        b, _, h, w = c.hint.images.shape
        stride = cfg.stride
        outputs = len(cfg.proj_blocks) * cfg.c_proj * math.ceil(h / stride) * math.ceil(w / stride)
        if cfg.bottleneck_mode == "large":
            work = h * w * (cfg.c_large_hidden + 3 * cfg.c_large)
        else:  # stride-2 stem and 4x expanded convolutions at half size dominate
            work = 32 * h * w
        total += b * (outputs + work) * elt
    return total


# ---- the network call during sampling ----------------------------------------------------------------


@dataclass
class _Prepared:
    control: Control
    r_high: float
    r_low: float
    outputs: list[torch.Tensor | None]


def _fit_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t.repeat(n // t.shape[0], 1, 1, 1)


class ControlledNetwork:
    """``network_fn(x, r, **cond)`` plus ``cnet=`` at the steps inside each control's range."""

    def __init__(self, network_fn: Callable[..., torch.Tensor], prepared: list[_Prepared]) -> None:
        self.network_fn = network_fn
        self.prepared = prepared
        self._cache: dict[tuple, list[torch.Tensor | None]] = {}

    def cnet_at(self, r: float, x: torch.Tensor) -> list[torch.Tensor | None] | None:
        """The cnet list for a call at noise condition ``r`` on ``x`` (batch and size), or None outside every range."""
        active = tuple(i for i, p in enumerate(self.prepared)
                       if p.r_low - _R_TOLERANCE <= r <= p.r_high + _R_TOLERANCE)
        if not active:
            return None
        key = (active, x.shape[0], tuple(x.shape[-2:]))
        if key not in self._cache:
            self._cache[key] = self._combine([self.prepared[i].outputs for i in active], x)
        return self._cache[key]

    @staticmethod
    def _combine(lists: list[list[torch.Tensor | None]], x: torch.Tensor) -> list[torch.Tensor | None]:
        n = x.shape[0]
        if len(lists) == 1:
            return [None if t is None else _fit_batch(t, n) for t in lists[0]]
        sizes = {tuple(t.shape[-2:]) for outs in lists for t in outs if t is not None}
        out: list[torch.Tensor | None] = [None] * max(len(outs) for outs in lists)
        for outs in lists:
            for i, t in enumerate(outs):
                if t is None:
                    continue
                if len(sizes) > 1:
                    t = F.interpolate(t, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)
                t = _fit_batch(t, n)
                out[i] = t if out[i] is None else out[i] + t.to(out[i].dtype)
        return out

    def __call__(self, x: torch.Tensor, r: torch.Tensor, **cond: Any) -> torch.Tensor:
        cnet = self.cnet_at(float(r.reshape(-1)[0]), x)
        if cnet is not None:
            cond = {**cond, "cnet": cnet}
        return self.network_fn(x, r, **cond)


def controlled(network_fn: Callable[..., torch.Tensor], controls: Sequence[Control], stage_c: Any,
               r_at: Callable[[float], float], latent_shape: Sequence[int]) -> Callable[..., torch.Tensor]:
    """Wrap the Stage C network call with the controls (unchanged when there are none).

    Runs every ControlNet now, on its own device and dtype. ``r_at(p)`` is the noise condition r of the
    schedule at position p (t = 1 - p, with the sampler's shift); ``latent_shape`` is (B, 16, h, w) of the
    latent: each control input must have batch B or 1, and should have the latent's aspect ratio.
    """
    if not controls:
        return network_fn
    batch, (h, w) = int(latent_shape[0]), (int(latent_shape[-2]), int(latent_shape[-1]))
    prepared = []
    for c in controls:
        check_fit(stage_c, c.controlnet, c.hint, warn=False)
        hint_h, hint_w = c.hint.images.shape[-2:]
        if abs(math.log((hint_w / hint_h) / (w / h))) > 0.05:
            log.warning("ComfyUI-StableCascade: ControlNet %r: the control image is %dx%d but the latent is %dx%d "
                        "(another aspect ratio); its guidance is stretched to fit - give the latent the image's "
                        "aspect ratio ('Stable Cascade Empty Latent' width/height)", c.controlnet.name, hint_w, hint_h,
                        w, h)
        if c.hint.images.shape[0] not in (1, batch):
            raise ShapeError(f"ControlNet {c.controlnet.name!r}: the control input has batch {c.hint.images.shape[0]} "
                             f"but the latent has batch {batch}; give one control image or one per latent")
        module = c.controlnet.module
        dtype = next(module.parameters()).dtype
        with torch.no_grad():
            outs = module(c.hint.images.to(c.controlnet.device(), dtype))
        outs = [None if t is None else t * c.strength for t in outs]
        prepared.append(_Prepared(c, r_at(c.start), r_at(c.end), outs))
        log.debug("ComfyUI-StableCascade: ControlNet %s active for r in [%.5f, %.5f]", c.key, prepared[-1].r_low,
                  prepared[-1].r_high)
    return ControlledNetwork(network_fn, prepared)
