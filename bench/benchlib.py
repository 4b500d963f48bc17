"""What the benchmark scripts share: importing the pack's pure-torch modules, loading a sibling script,
reading the kernel's memory counters.

The scripts run as ``python bench/<script>.py``, so this folder is on ``sys.path`` and ``import benchlib``
works; a file another process imports by path (the tests load ``parity_stage_a.py``) imports it lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PACKAGE = "comfyui_stablecascade"


def cascade_module(name: str) -> Any:
    """``comfyui_stablecascade.cascade.<name>`` without running the pack's root ``__init__`` (the node layer).

    An empty package module stands in for the pack unless the real one is already imported (the tests').
    """
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [ROOT]
        sys.modules[PACKAGE] = module
    return importlib.import_module(f"{PACKAGE}.cascade.{name}")


def pack_module(name: str) -> Any:
    """``comfyui_stablecascade.<name>`` with the whole pack loaded as ComfyUI loads a custom-node folder (its
    root ``__init__`` runs, under the package name, without the repo root on sys.path)."""
    if PACKAGE not in sys.modules or not hasattr(sys.modules[PACKAGE], "NODE_CLASS_MAPPINGS"):
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")


def file_module(name: str, path: str) -> Any:
    """The Python file at ``path`` (e.g. another bench script) imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_worker(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a benchmark worker process (in ``env``, default this one's) and return the JSON of its ``RESULT `` line."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {what} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` counter in KiB, e.g. ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    """Hand memory that is freed but still held by the C allocator back to the kernel (glibc ``malloc_trim``).

    Freed blocks the allocator keeps count in the RSS; a later allocation reuses them without raising the RSS
    high-water mark, which would hide that allocation from a memory measurement. No-op without glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int:
    """The kernel's estimate of memory available to a new process (``MemAvailable`` in ``/proc/meminfo``)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")
