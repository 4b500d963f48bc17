"""Load the pack the way ComfyUI does: as a package (its root __init__ uses relative imports).

Tests import it as ``comfyui_stablecascade``; the repo root itself is never put on sys.path, so the
pack's ``nodes`` folder cannot shadow (or be shadowed by) a top-level ``nodes`` module.
"""

import importlib.util
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PACKAGE = "comfyui_stablecascade"
# The shared helpers (tiny_checkpoints, comfyui_harness) live here; the tests sit in subfolders by layer.
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def _load_pack() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_load_pack()
# Tests are small; two threads match CI's 2 cores and keep timings of parallel runs sane.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_models(tmp_path):
    """A ComfyUI-style models folder, empty."""
    for sub in ("diffusion_models", "unet", "vae", "text_encoders", "clip", "checkpoints", "controlnet", "loras"):
        (tmp_path / sub).mkdir()
    return tmp_path
