"""The pipeline: what the nodes ask for, between the node layer and the host.

Stage runners (``stages``), sampling settings with the one copy of the official defaults (``settings``),
LATENT checks and sizes (``latents``), CONDITIONING (``conditioning``), image encode/decode (``images``) and
ControlNet inputs (``controls``). Every network use goes through ``host.using``; ``samplers`` below stays
pure math; nothing here imports comfy or the node layer.
"""

from .settings import IMAGE_TO_IMAGE, STAGE_B, STAGE_C, SamplingSettings
from .stages import sample_stage_b, sample_stage_c

__all__ = ["IMAGE_TO_IMAGE", "STAGE_B", "STAGE_C", "SamplingSettings", "sample_stage_b", "sample_stage_c"]
