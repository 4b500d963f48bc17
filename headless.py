"""Run a ComfyUI workflow with the pack's nodes, no ComfyUI needed: ``python headless.py WORKFLOW.json --help``.

The pack's modules use relative imports (ComfyUI loads the folder as a package under its own name), so this
file loads the folder the same way, as the package ``comfyui_stablecascade``, and hands over to
``standalone.cli``. Everything else lives in ``standalone/``.

With a ComfyUI checkout (``--comfyui PATH``, else env COMFYUI_PATH unless SCW_NO_COMFY=1) the checkout goes first on
the path before the pack loads, so the pack's host picks ComfyUI's backend as inside ComfyUI; the runner then checks
the path and runs ComfyUI's own nodes (standalone/comfy_runtime.py).
"""

import importlib.util
import os
import sys

PACKAGE = "comfyui_stablecascade"


def _comfyui_path(argv: list[str]) -> str | None:
    """The ComfyUI checkout named by --comfyui (read here, before argparse, as it must precede the pack's import)."""
    path = os.environ.get("COMFYUI_PATH") if os.environ.get("SCW_NO_COMFY") != "1" else None
    for i, arg in enumerate(argv):
        if arg == "--comfyui" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--comfyui="):
            path = arg.split("=", 1)[1]
    if path:
        root = os.path.abspath(os.path.expanduser(path))
        if os.path.isfile(os.path.join(root, "nodes.py")) and root not in sys.path:
            sys.path.insert(0, root)  # first: the pack's own nodes/ folder must not shadow ComfyUI's nodes.py
    return path or None


def _pack() -> object:
    if PACKAGE not in sys.modules:
        root = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        sys.modules[PACKAGE] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


if __name__ == "__main__":
    comfyui = _comfyui_path(sys.argv[1:])
    _pack()
    from comfyui_stablecascade.standalone.cli import main

    sys.exit(main(comfyui=comfyui))
