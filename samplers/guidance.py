"""Classifier-free guidance as GDF.sample applies it (SPEC §10.3 step 3-4), wrapped as an eps model.

The conditional and unconditional branches run as one batched network call; the guided prediction is
``torch.lerp(uncond, cond, cfg)`` followed by the official CFG rescale, whose std is taken over every element
of the whole batch (global, not per sample).
"""

from collections.abc import Callable
from typing import Any

import torch

from ..cascade.errors import CascadeError
from .schedule import noise_cond_r

NetworkFn = Callable[..., torch.Tensor]

# GDF.sample's default cfg_rho, which every official notebook keeps for Stage C and Stage B alike.
OFFICIAL_CFG_RESCALE = 0.7


def _zeros_like(value: Any) -> Any:
    """Zeros shaped like a tensor; other values stand for themselves."""
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else value


def _cat_value(key: str, cond: Any, uncond: Any) -> Any:
    """Batch one conditioning value with its unconditional twin: tensors cat, lists element-wise, dicts per key."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise CascadeError(
                f"CFG conditioning {key!r} is a tensor but its unconditional value is {type(uncond).__name__} "
                "- give the negative conditioning the same inputs as the positive one"
            )
        return torch.cat([cond, uncond.to(cond.device, cond.dtype)], dim=0)
    if isinstance(cond, (list, tuple)):
        uncond = [None] * len(cond) if uncond is None else uncond
        if len(uncond) != len(cond):
            raise CascadeError(
                f"CFG conditioning {key!r} has {len(cond)} entries but its unconditional value has {len(uncond)} "
                "- both must come from the same ControlNet"
            )
        # As in GDF: a pair of tensors is batched, anything else (a level the ControlNet skips) is None.
        return [
            torch.cat([c, u.to(c.device, c.dtype)], dim=0)
            if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)
            else None
            for c, u in zip(cond, uncond)
        ]
    if isinstance(cond, dict):
        uncond = uncond or {}
        # GDF fills a key the unconditional dict lacks with zeros.
        return {k: _cat_value(f"{key}.{k}", v, uncond[k] if k in uncond else _zeros_like(v)) for k, v in cond.items()}
    if cond != uncond:
        raise CascadeError(
            f"CFG conditioning {key!r} is {cond!r} but its unconditional value is {uncond!r} "
            "- non-tensor options must be equal in both branches"
        )
    return cond


def batch_cond_uncond(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    """The network kwargs of one CFG call on cat([x, x]): every conditioning value batched as (cond, uncond)."""
    missing = sorted(set(cond) - set(uncond))
    if missing:
        raise CascadeError(
            f"the unconditional inputs lack {missing} (they have {sorted(uncond)}) "
            "- build the negative conditioning with the same encoder as the positive one"
        )
    return {k: _cat_value(k, v, uncond[k]) for k, v in cond.items()}


def rescale_cfg(cond: torch.Tensor, guided: torch.Tensor, rescale: float) -> torch.Tensor:
    """GDF's CFG rescale: rho*guided*std(cond)/(std(guided)+1e-9) + (1-rho)*guided, std over the whole batch."""
    if rescale <= 0:
        return guided
    return rescale * (guided * cond.std() / (guided.std() + 1e-9)) + guided * (1 - rescale)


class CFGDenoiser:
    """An eps model ``(x, logsnr) -> eps`` built from a network call, with classifier-free guidance.

    Parameters:
        network_fn: ``network_fn(x, r, **cond) -> eps``; r is the (B,) float32 noise condition (CosineTNoiseCond).
        cond: keyword inputs of the conditional branch (tensors of batch B, lists of tensors or None, dicts).
        uncond: the same keys for the unconditional branch, or None to run the conditional branch only.
        cfg: guidance scale; exactly 1.0 (or uncond None) skips the unconditional branch (one call, batch B),
            which equals guidance with cfg 1 up to the rescale's 1e-9 term.
        rescale: the CFG rescale factor rho (0.7, the official default for both stages; 0 turns it off).
    """

    def __init__(
        self,
        network_fn: NetworkFn,
        cond: dict[str, Any],
        uncond: dict[str, Any] | None,
        cfg: float,
        rescale: float = OFFICIAL_CFG_RESCALE,
    ) -> None:
        self.network_fn = network_fn
        self.cond = dict(cond)
        self.cfg = float(cfg)
        self.rescale = float(rescale)
        self.guided = uncond is not None and self.cfg != 1.0
        # Batched once, as GDF.sample does before its loop.
        self.batched = batch_cond_uncond(self.cond, uncond) if self.guided else None

    def __call__(self, x: torch.Tensor, logsnr: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Predict eps at noise level logsnr ((B,) or 0-dim), guided when cfg != 1 and an uncond is given."""
        r = noise_cond_r(logsnr).to(x.device).expand(x.shape[0])
        if not self.guided:
            return self.network_fn(x, r, **self.cond, **extra)
        eps_cond, eps_uncond = self.network_fn(torch.cat([x, x]), r.repeat(2), **self.batched, **extra).chunk(2)
        guided = torch.lerp(eps_uncond, eps_cond, self.cfg)
        return rescale_cfg(eps_cond, guided, self.rescale)
