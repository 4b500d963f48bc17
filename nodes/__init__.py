"""ComfyUI nodes of the pack, one family per file. Every module of this folder that defines
NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS is merged here (in file-name order), so a new family
file needs no edit of this one. Node ids are stable: a retired node keeps its id (style guide, C2)."""

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _family = importlib.import_module(f".{_info.name}", __name__)
    if not hasattr(_family, "NODE_CLASS_MAPPINGS"):
        continue
    _clash = set(NODE_CLASS_MAPPINGS) & set(_family.NODE_CLASS_MAPPINGS)
    if _clash:
        raise RuntimeError(f"ComfyUI-StableCascade: node ids defined twice: {sorted(_clash)} "
                           f"(in nodes/{_info.name}.py)")
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_family, "NODE_DISPLAY_NAME_MAPPINGS", {}))
