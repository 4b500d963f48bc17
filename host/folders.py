"""What a ComfyUI-style model folder holds, for both host backends: the weights files the pack reads, the files it
refuses (pickles, unknown extensions) and why, and the "not found" message that lists them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# Folder aliases of ComfyUI (folder_paths.map_legacy plus the two-folder defaults).
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"), "unet": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"), "clip": ("text_encoders", "clip"),
    "vae": ("vae",), "checkpoints": ("checkpoints",), "controlnet": ("controlnet", "t2i_adapter"),
    "loras": ("loras",), "clip_vision": ("clip_vision",),
}

WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf")  # GGUF: quantized Stage C / Stage B (docs/QUANTIZED.md)
# Files a model folder may hold that the pack will not read, and why; listed when a requested file is missing so
# a user with only the .ckpt of a model learns why it is not offered.
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".pt2")
_PICKLE_REASON = ("a PyTorch pickle: the pack never unpickles (opening one can run code) - convert it to "
                  ".safetensors or download the .safetensors release")
_OTHER_REASONS: dict[str, str] = {}
# Not weights: ComfyUI's put_*_here placeholders, notes, configs and images beside the weights are not listed.
_NOT_WEIGHTS = (".txt", ".md", ".json", ".yaml", ".yml", ".html", ".png", ".jpg", ".jpeg", ".webp", ".py",
                ".lock", ".metadata", ".gitkeep", ".gitignore")


def refusal_reason(name: str) -> str | None:
    """Why a file of a model folder is not offered (None: it is a weights file the pack reads, or not a
    weights file at all)."""
    low = os.path.basename(name).lower()
    if low.endswith(WEIGHT_EXTENSIONS) or low.startswith((".", "put_")) or low.endswith(_NOT_WEIGHTS):
        return None
    if low.endswith(PICKLE_EXTENSIONS):
        return _PICKLE_REASON
    ext = os.path.splitext(low)[1]
    return _OTHER_REASONS.get(ext, f"an unknown extension ({ext or 'none'}): the pack reads .safetensors / .sft / .gguf only")


def refused_in(dirs: Sequence[str]) -> list[tuple[str, str]]:
    """(relative name, reason) of the files under ``dirs`` that the pack will not read, sorted by name."""
    found: dict[str, str] = {}
    for base in dirs:
        for dirpath, _, files in os.walk(base, followlinks=True):
            for f in files:
                reason = refusal_reason(f)
                if reason is not None:
                    found.setdefault(os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/"), reason)
    return sorted(found.items())


def describe_refused(refused: Sequence[tuple[str, str]], limit: int = 8) -> str:
    """A sentence listing refused files with their reasons ('' when there are none)."""
    if not refused:
        return ""
    items = [f"{name} ({reason})" for name, reason in refused[:limit]]
    more = f" and {len(refused) - limit} more" if len(refused) > limit else ""
    return f"; the folder holds files the pack does not read: {'; '.join(items)}{more}"


def missing_file_message(name: str, where: str, available: Sequence[str], refused: Sequence[tuple[str, str]]) -> str:
    """The message of a model file that is not there (both backends word it the same way)."""
    offer = list(available[:5]) or "the files in that folder (it has no .safetensors / .sft file)"
    return (f"model file {name!r} was not found in {where} - put the file there or pick one of {offer}"
            f"{describe_refused(refused)}")
