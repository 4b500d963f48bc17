"""ComfyUI nodes of the pack; each family file exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
