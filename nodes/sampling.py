"""Sampler nodes: Stage C, Stage B, and a one-node cascade running both.

Defaults are the official notebooks' (``pipeline.settings``: Stage C 20 steps, cfg 4, shift 2, rescale 0.7;
Stage B 10 steps, cfg 1.1, shift 1, rescale 0.7). The work is done by ``pipeline.stages``; these nodes only
translate the sockets.
"""

from __future__ import annotations

from typing import Any

from ..pipeline import STAGE_B, STAGE_C, SamplingSettings, sample_stage_b, sample_stage_c
from ..pipeline.conditioning import merge_entries
from ..pipeline.latents import stage_latent
from .common import category, conditioning_input, mappings, require, schedule_inputs, scheduler_input
from .kinds import FIX

CATEGORY = category("sampling")


class StageCSampler:
    NODE_ID, TITLE = "SCW_StageCSampler", "Stage C Sampler"
    DESCRIPTION = ("Samples the Stage C prior: text -> a 16-channel latent at 1/42.67 of the image size (the "
                   "stage_c latent of 'Stable Cascade Empty Latent'). Returns the last predicted clean latent, as the "
                   "official "
                   "code does. Connect a previewer for live previews.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "stage_c": ("SCW_STAGE_C", {"tooltip": "The Stage C model."}),
                "positive": conditioning_input("The"),
                "negative": conditioning_input("The negative (usually empty)"),
                "latent": ("LATENT", {"tooltip": "The stage_c output of 'Stable Cascade Empty Latent' (or an encoded "
                                                 "image)."}),
                **schedule_inputs(STAGE_C, "Stage C"),
            },
            "optional": {"previewer": ("SCW_PREVIEWER", {"tooltip": "Optional: shows live previews while sampling."}),
                         **scheduler_input(STAGE_C)},
        }

    def sample(self, stage_c: Any, positive: list, negative: list, latent: dict, seed: int, steps: int, cfg: float,
               shift: float, sampler: str, rescale: float, denoise: float, previewer: Any = None,
               scheduler: str = STAGE_C.scheduler) -> tuple[dict]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        settings = SamplingSettings(steps, cfg, shift, sampler, rescale, denoise, scheduler=scheduler)
        out = sample_stage_c(model, merge_entries(positive), merge_entries(negative), latent, settings, seed,
                             previewer=previewer)
        return (stage_latent(out, "c", latent),)


class StageBSampler:
    NODE_ID, TITLE = "SCW_StageBSampler", "Stage B Sampler"
    DESCRIPTION = ("Samples the Stage B decoder: a Stage C latent -> a 4-channel Stage A latent at 1/4 of the image "
                   "size (the stage_b latent of 'Stable Cascade Empty Latent'), ready for 'Stable Cascade Stage A "
                   "Decode' or core's VAEDecode "
                   "with a Stage A VAE.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_b": ("SCW_STAGE_B", {"tooltip": "The Stage B model."}),
            "positive": conditioning_input("The"),
            "negative": conditioning_input("The negative (usually empty)"),
            "stage_c": ("LATENT", {"tooltip": "The Stage C result (output of 'Stable Cascade Stage C Sampler')."}),
            "latent": ("LATENT", {"tooltip": "The stage_b output of 'Stable Cascade Empty Latent'."}),
            **schedule_inputs(STAGE_B, "Stage B"),
        }, "optional": scheduler_input(STAGE_B)}

    def sample(self, stage_b: Any, positive: list, negative: list, stage_c: dict, latent: dict, seed: int,
               steps: int, cfg: float, shift: float, sampler: str, rescale: float, denoise: float,
               scheduler: str = STAGE_B.scheduler) -> tuple[dict]:
        model = require(stage_b, "stage_b", self.NODE_ID, "a Stage B model", FIX["stage_b"])
        settings = SamplingSettings(steps, cfg, shift, sampler, rescale, denoise, scheduler=scheduler)
        out = sample_stage_b(model, merge_entries(positive), merge_entries(negative), stage_c, latent, settings, seed)
        return (stage_latent(out, "b", latent),)


class CascadeSampler:
    NODE_ID, TITLE = "SCW_CascadeSampler", "Sampler (C then B)"
    DESCRIPTION = ("Runs Stage C then Stage B in one node with the official shift and rescale (C: shift 2, rescale "
                   "0.7; B: shift 1, rescale 0.7). Use the two sampler nodes for full control.")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        c, b = schedule_inputs(STAGE_C, "Stage C"), schedule_inputs(STAGE_B, "Stage B")
        return {"required": {
            "stage_c_model": ("SCW_STAGE_C", {"tooltip": "The Stage C model."}),
            "stage_b_model": ("SCW_STAGE_B", {"tooltip": "The Stage B model."}),
            "positive": conditioning_input("The"),
            "negative": conditioning_input("The negative (usually empty)"),
            "stage_c_latent": ("LATENT", {"tooltip": "The stage_c output of 'Stable Cascade Empty Latent'."}),
            "stage_b_latent": ("LATENT", {"tooltip": "The stage_b output of 'Stable Cascade Empty Latent'."}),
            "seed": c["seed"], "sampler": c["sampler"],
            "c_steps": c["steps"], "c_cfg": c["cfg"], "b_steps": b["steps"], "b_cfg": b["cfg"],
        }, "optional": scheduler_input(STAGE_C)}

    def sample(self, stage_c_model: Any, stage_b_model: Any, positive: list, negative: list, stage_c_latent: dict,
               stage_b_latent: dict, seed: int, sampler: str, c_steps: int, c_cfg: float, b_steps: int,
               b_cfg: float, scheduler: str = STAGE_C.scheduler) -> tuple[dict, dict]:
        common = {"positive": positive, "negative": negative, "seed": seed, "sampler": sampler, "denoise": 1.0,
                  "scheduler": scheduler}
        (prior,) = StageCSampler().sample(stage_c_model, latent=stage_c_latent, steps=c_steps, cfg=c_cfg,
                                          shift=STAGE_C.shift, rescale=STAGE_C.rescale, **common)
        (decoded,) = StageBSampler().sample(stage_b_model, stage_c=prior, latent=stage_b_latent, steps=b_steps,
                                            cfg=b_cfg, shift=STAGE_B.shift, rescale=STAGE_B.rescale, **common)
        return prior, decoded


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(StageCSampler, StageBSampler, CascadeSampler)
