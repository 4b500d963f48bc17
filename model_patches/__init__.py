"""Keyed patches (LoRA, ControlNet) applied to clones of loaded networks, never to the base model."""
