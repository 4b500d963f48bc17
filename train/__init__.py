"""Training Stage C (issue 9): LoRA on the official targets with learned tokens, or a full fine-tune, with the
official objective (SPEC §14, §10). Pure Python API beside ``pipeline/``; the nodes in ``nodes/train.py`` call it.

- ``data``: a folder of images + captions -> ``Dataset`` (multi-aspect buckets, kohya repeat folders);
- ``cache``: every image encoded once with the EffNet (and captions with the text encoder) -> ``TrainingCache``;
- ``objective``: t sampling, P2 / adaptive loss weights, the eps-MSE loss;
- ``lora`` / ``tokens``: what trains, and its official / community state dicts;
- ``forward``: Stage C's forward for training (per-block upcast, gradient checkpointing, LoRA deltas);
- ``settings``: ``TrainSettings`` (official defaults) and the one table of allowed values;
- ``loop``: ``train(...)`` (AdamW, warmup, clipping, accumulation, resume, NaN stop, interrupt, DDP);
- ``state``: the resume state on disk (safetensors + JSON, no pickle); ``preview``: periodic preview images;
- ``distributed``: torchrun's process group from its environment, and which process writes files.
"""

from .errors import TrainingInputError, TrainingOutOfMemory

__all__ = ["TrainingInputError", "TrainingOutOfMemory"]
