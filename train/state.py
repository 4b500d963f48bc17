"""A training state on disk: every tensor in one safetensors file, everything else as JSON in its metadata.

No pickle anywhere: the optimizer's per-parameter tensors are stored as ``optim.{i}.{name}``, its
hyper-parameters as JSON. A state holds: the trained tensors (``lora.{i}.lora_down`` / ``lora_up``,
``tokens.delta``, ``full.<key>`` for a full fine-tune), the AdamW state, the adaptive-loss buckets, the step,
the loss history and the settings. Randomness is derived from (seed, step), so the step is the RNG state: a
resumed run draws exactly what the uninterrupted one draws.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .errors import TrainingInputError

STATE_FORMAT = "scw-train-state-1"
_META_KEY = "scw_train_state"


def pack(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"meta": dict(meta, format=STATE_FORMAT), "tensors": dict(tensors)}


def is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and obj["meta"].get("format") == STATE_FORMAT


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able rest) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if sum(len(g["params"]) for g in groups) != n_params:
        raise TrainingInputError(f"the resume state's optimizer holds {sum(len(g['params']) for g in groups)} "
                                 f"tensors, this run trains {n_params} - resume with the settings it was saved with.")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write a safetensors file beside ``path`` and rename it into place, so a failed write never leaves half a file
    under the real name (a LoRA, a state, a cache); returns the path."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_state(path: str, state: dict[str, Any]) -> str:
    """Write a state (``TrainResult.state``) to ``path`` (a .safetensors file); returns the path."""
    if not is_state(state):
        raise TrainingInputError("save_state got something that is not a training state; pass TrainResult.state.")
    return save_atomic(state["tensors"], path, {_META_KEY: json.dumps(state["meta"])})


def load_state(path: str) -> dict[str, Any]:
    """Read a state written by ``save_state``; a LoRA file or anything else is refused by name."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise TrainingInputError(f"training state {path!r} does not exist; pick a state file saved by a training "
                                 "run (or leave resume empty to start a new run).")
    try:
        with safe_open(path, framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta is not None else None
    except Exception as exc:
        raise TrainingInputError(f"training state {path!r} is not a readable safetensors file ({exc}); pick a "
                                 "state saved by a training run.") from None
    if meta is None:
        raise TrainingInputError(f"{path!r} is a safetensors file but not a training state (no {_META_KEY!r} "
                                 "metadata) - a LoRA file cannot resume the optimizer; pick the state file a run "
                                 "saved, or start a new run.")
    state = {"meta": json.loads(meta), "tensors": tensors}
    if not is_state(state):
        raise TrainingInputError(f"training state {path!r} has format {state['meta'].get('format')!r}, expected "
                                 f"{STATE_FORMAT!r}; it was saved by another version - start a new run.")
    return state
