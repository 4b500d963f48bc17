"""Old saved workflows, brought to the current inputs before the runner checks them (as the nodes do inside ComfyUI).

Inputs whose meaning changed keep old values working (docs/CORE_INTEROP.md, "Saved workflows"): ComfyUI hands the
old values to the nodes, which accept them (``VALIDATE_INPUTS`` owns the range, hidden legacy names). The runner
checks ranges before any node runs, so it rewrites them here into today's names and units, with the same result.
"""

from __future__ import annotations

import logging

from ..cascade.control_filters import OPENCV_PER_UNIT
from ..pipeline.controls import THRESHOLD_RANGE, is_legacy_threshold

log = logging.getLogger("comfyui_stablecascade.standalone")

# node type -> {old input name: current name}: API prompts store inputs by name.
RENAMED = {"SCW_ApplyControlNet": {"start": "start_percent", "end": "end_percent"}}
CANNY = "SCW_CannyControl"


def migrate_prompt(prompt: dict[str, dict]) -> list[str]:
    """Rewrite, in place, an API prompt's inputs saved by older versions of the pack: renamed inputs get their
    current names, canny thresholds in OpenCV integers become core's units (official edges, the same pixels).
    Returns one line per change (also logged)."""
    changes = []
    for node_id, entry in prompt.items():
        inputs, kind = entry.get("inputs", {}), entry.get("class_type")
        for old, new in RENAMED.get(kind, {}).items():
            if old in inputs and new not in inputs:
                inputs[new] = inputs.pop(old)
                changes.append(f"node {node_id} ({kind}): input {old!r} is now {new!r}")
        names = ("low_threshold", "high_threshold")
        values = [inputs.get(n) for n in names]
        if kind == CANNY and all(is_legacy_threshold(v) for v in values):
            converted = [v / OPENCV_PER_UNIT for v in values]
            if all(THRESHOLD_RANGE[0] <= v <= THRESHOLD_RANGE[1] for v in converted):
                inputs.update(dict(zip(names, converted)), method="official")
                changes.append(f"node {node_id} ({kind}): OpenCV thresholds {values[0]} / {values[1]} are "
                               f"{converted[0]:.4f} / {converted[1]:.4f} in core's units (method official)")
    for line in changes:
        log.info("ComfyUI-StableCascade: a workflow saved by an older version: %s", line)
    return changes
