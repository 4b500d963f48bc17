"""The pack's layering, read from the source with ``ast`` (nothing is imported for the static checks):

samplers (pure math) <- pipeline (the only layer that loads networks) <- nodes (one family per file, sharing only
nodes/common.py and nodes/kinds.py) <- standalone; host/comfyui.py is the only module that touches ComfyUI, and
only the host facade knows which backend runs. The last test imports the pack as ComfyUI does and checks that the
standalone runner stays out of it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/pipeline/ -> the repo
PACKAGE = "comfyui_stablecascade"
COMFY_MODULES = ("comfy", "folder_paths")
NODE_SHARED = ("common", "kinds")  # the node files every family may import
LOADING_CALLS = ("load", "using", "release")


@dataclass(frozen=True)
class Source:
    rel: str  # path from the repo root, '/' separated
    module: tuple[str, ...]  # module path inside the pack: ("nodes", "sampling"); () for the root __init__
    tree: ast.Module

    @property
    def package(self) -> tuple[str, ...]:
        return self.module if self.rel.endswith("__init__.py") else self.module[:-1]

    @property
    def layer(self) -> str:
        return self.module[0] if self.module else ""


def _sources() -> list[Source]:
    """Every Python file of the pack: the root's (__init__.py, the headless.py launcher) and each subpackage's
    (a folder with __init__.py)."""
    found = [(name, () if name == "__init__.py" else (name[:-3],))
             for name in sorted(os.listdir(ROOT)) if name.endswith(".py")]
    for sub in sorted(os.listdir(ROOT)):
        folder = os.path.join(ROOT, sub)
        if sub == "tests" or not os.path.isfile(os.path.join(folder, "__init__.py")):
            continue
        for dirpath, _, files in os.walk(folder):
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/")
                    parts = tuple(rel[:-3].split("/"))
                    found.append((rel, parts[:-1] if parts[-1] == "__init__" else parts))
    out = []
    for rel, module in found:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            out.append(Source(rel, module, ast.parse(f.read(), filename=rel)))
    return out


SOURCES = _sources()


def _imports(src: Source) -> list[tuple[tuple[str, ...], bool, int]]:
    """(target, internal, line) of every import: internal targets are module paths inside the pack (a
    ``from X import name`` also yields X.name, which may be a module); external ones are dotted names split."""
    out = []
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = tuple(alias.name.split("."))
                internal = parts[0] == PACKAGE
                out.append((parts[1:] if internal else parts, internal, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = src.package[:len(src.package) - (node.level - 1)]
                internal = True
            else:
                base, internal = (), False
            parts = base + tuple((node.module or "").split(".")) if node.module else base
            if not node.level and parts and parts[0] == PACKAGE:
                parts, internal = parts[1:], True
            out.append((parts, internal, node.lineno))
            out += [(parts + (alias.name,), internal, node.lineno) for alias in node.names]
    return out


def _internal_layers(src: Source) -> set[tuple[str, int]]:
    return {(target[0], line) for target, internal, line in _imports(src) if internal and target}


def _external_tops(src: Source) -> set[tuple[str, int]]:
    return {(target[0], line) for target, internal, line in _imports(src) if not internal and target}


def _where(src: Source, line: int) -> str:
    return f"{src.rel}:{line}"


def _in(layer: str) -> list[Source]:
    files = [s for s in SOURCES if s.layer == layer]
    assert files, f"no source files found in {layer}/ - the layout these checks read has changed"
    return files


# ---- the checks -------------------------------------------------------------------------------------------


def test_the_pack_sources_are_found():
    layers = {s.layer for s in SOURCES}
    assert {"cascade", "host", "model_patches", "nodes", "pipeline", "samplers", "standalone", "train"} <= layers
    assert {"__init__.py", "headless.py", "host/comfyui.py"} <= {s.rel for s in SOURCES}


def test_nodes_never_load_networks_themselves():
    """Loading is the pipeline's job (host.using with a memory estimate); a node only translates sockets."""
    bad = []
    for src in _in("nodes"):
        for node in ast.walk(src.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOADING_CALLS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "host"):
                bad.append(f"{_where(src, node.lineno)} calls host.{node.func.attr}(")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "host":
                bad += [f"{_where(src, node.lineno)} imports host.{a.name}" for a in node.names
                        if a.name in LOADING_CALLS]
    assert not bad, bad


def test_only_the_host_knows_which_backend_runs():
    """Outside host/, no module asks host.in_comfyui() (callers never branch on the backend)."""
    bad = []
    for src in SOURCES:
        if src.layer == "host":
            continue
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Attribute) and node.attr == "in_comfyui":
                bad.append(_where(src, node.lineno))
            if isinstance(node, ast.ImportFrom) and any(a.name == "in_comfyui" for a in node.names):
                bad.append(_where(src, node.lineno))
    assert not bad, f"in_comfyui used outside host/: {bad}"


def test_only_host_comfyui_imports_comfy():
    bad = [f"{_where(src, line)} imports {top}" for src in SOURCES if src.rel != "host/comfyui.py"
           for top, line in _external_tops(src) if top in COMFY_MODULES]
    assert not bad, bad
    comfy_backend = next(s for s in SOURCES if s.rel == "host/comfyui.py")
    assert {top for top, _ in _external_tops(comfy_backend)} >= set(COMFY_MODULES)


def test_samplers_are_pure_math():
    bad = [f"{_where(src, line)} imports {layer}" for src in _in("samplers") for layer, line in _internal_layers(src)
           if layer in ("host", "pipeline", "nodes", "model_patches", "standalone")]
    assert not bad, bad


def test_pipeline_does_not_import_the_node_layer_or_the_runner():
    bad = [f"{_where(src, line)} imports {layer}" for src in _in("pipeline") for layer, line in _internal_layers(src)
           if layer in ("nodes", "standalone", "train")]
    assert not bad, bad


def test_train_sits_beside_pipeline():
    """train/ may use cascade, samplers, model_patches, host and pipeline; only nodes (and above) import it."""
    bad = [f"{_where(src, line)} imports {layer}" for src in _in("train") for layer, line in _internal_layers(src)
           if layer in ("nodes", "standalone")]
    assert not bad, bad


@pytest.mark.parametrize("layer", ["cascade", "samplers", "host", "model_patches"])
def test_lower_layers_do_not_import_upper_ones(layer):
    upper = {"cascade": ("samplers", "host", "pipeline", "nodes", "model_patches", "standalone", "train"),
             "samplers": ("host", "pipeline", "nodes", "model_patches", "standalone", "train"),
             "host": ("pipeline", "nodes", "model_patches", "standalone", "samplers", "train"),
             "model_patches": ("pipeline", "nodes", "standalone", "train")}[layer]
    bad = [f"{_where(src, line)} imports {up}" for src in _in(layer) for up, line in _internal_layers(src)
           if up in upper]
    assert not bad, bad


def test_node_families_share_only_common_and_kinds():
    bad = []
    for src in _in("nodes"):
        if src.module == ("nodes",):
            continue  # the package __init__ merges the families (importlib, by file name)
        for target, internal, line in _imports(src):
            if internal and len(target) >= 2 and target[0] == "nodes" and target[1] not in NODE_SHARED:
                bad.append(f"{_where(src, line)} imports nodes.{target[1]}")
    assert not bad, sorted(set(bad))


_IMPORT_AS_COMFYUI = r"""
import importlib.util, os, sys
root, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert module.NODE_CLASS_MAPPINGS
print("\n".join(sorted(m for m in sys.modules if m == name or m.startswith(name + "."))))
"""


def test_loading_the_pack_leaves_the_standalone_runner_out():
    """What ComfyUI imports (the root __init__ -> nodes) must not pull in standalone/ or its core stand-ins."""
    env = {**os.environ, "SCW_NO_COMFY": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_AS_COMFYUI, ROOT, PACKAGE], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(proc.stdout.split())
    assert f"{PACKAGE}.nodes" in loaded and f"{PACKAGE}.host" in loaded  # the import really ran
    assert f"{PACKAGE}.standalone" not in loaded and f"{PACKAGE}.standalone.core_standins" not in loaded, (
        sorted(m for m in loaded if ".standalone" in m))
