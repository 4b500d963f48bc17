"""Run a ComfyUI workflow with the pack's nodes, no ComfyUI needed: ``python headless.py WORKFLOW.json --help``.

The pack's modules use relative imports (ComfyUI loads the folder as a package under its own name), so this
file loads the folder the same way, as the package ``comfyui_stablecascade``, and hands over to
``standalone.cli``. Everything else lives in ``standalone/``.
"""

import importlib.util
import os
import sys

PACKAGE = "comfyui_stablecascade"


def _pack() -> object:
    if PACKAGE not in sys.modules:
        root = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        sys.modules[PACKAGE] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


if __name__ == "__main__":
    _pack()
    from comfyui_stablecascade.standalone.cli import main

    sys.exit(main())
