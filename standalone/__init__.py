"""The standalone runner: ComfyUI workflows run with the pack's nodes and no ComfyUI (tests, the command line).

``executor`` converts, checks and runs a workflow; ``core_standins`` (with ``standins_image``, ``standins_mask``)
holds stand-ins for the core utility nodes shared Stable Cascade workflows use (SaveImage, LoadImage, ImageScale,
Canny, GrowMask, ImageCompositeMasked...); ``comfy_runtime`` runs every node of a ComfyUI checkout instead
(``--comfyui PATH``); ``cli`` is the command line. Nothing here is imported inside ComfyUI: the pack's root
``__init__`` imports only ``nodes``.
"""
