"""Pure-torch Stable Cascade (Wuerstchen v3) networks and loaders.

Nothing in this package imports ComfyUI; hosts plug in through the ``operations``,
``dtype`` and ``device`` arguments every constructor takes.
"""
