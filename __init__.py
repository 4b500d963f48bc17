"""ComfyUI-StableCascade: a complete Stable Cascade runtime as ComfyUI custom nodes."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The browser side (web/*.js): shows node reports (PSNR/SSIM, demo-network notices) and the pack's warnings.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
