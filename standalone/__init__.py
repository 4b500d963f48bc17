"""The standalone runner: ComfyUI workflows run with the pack's nodes and no ComfyUI (tests, the command line).

``executor`` converts, checks and runs a workflow; ``core_standins`` holds stand-ins for the few core nodes
every shared workflow uses (SaveImage, PreviewImage, LoadImage); ``cli`` is the command line. Nothing here is
imported inside ComfyUI: the pack's root ``__init__`` imports only ``nodes``.
"""
