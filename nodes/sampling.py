"""Sampler nodes: Stage C, Stage B, and a one-node cascade running both.

Defaults are the official notebooks' (Stage C: 20 steps, cfg 4, shift 2, rescale 0.7; Stage B: 10 steps,
cfg 1.1, shift 1, rescale 0). The work is done by ``samplers.cascade``; these nodes only check the sockets.
"""

from __future__ import annotations

from typing import Any

from ..samplers import cascade
from ..samplers.sampling import SAMPLERS
from .conditioning import merge_entries
from .common import category, latent_samples, mappings, require, seed_input, stage_latent

CATEGORY = category("sampling")
C_DEFAULTS = {"steps": 20, "cfg": 4.0, "shift": 2.0, "rescale": 0.7}
B_DEFAULTS = {"steps": 10, "cfg": 1.1, "shift": 1.0, "rescale": 0.0}
_C_FIX = "connect SCW_StageCLoader (or the stage_c output of SCW_PackagedCheckpointLoader with the Stage C file)"
_B_FIX = "connect SCW_StageBLoader (or the stage_b output of SCW_PackagedCheckpointLoader with the Stage B file)"


def schedule_inputs(defaults: dict, stage: str) -> dict:
    """seed, steps, cfg, shift, sampler, rescale, denoise widgets with a stage's defaults."""
    return {
        "seed": seed_input(f"Noise seed of {stage}; the same seed gives the same image on any device."),
        "steps": ("INT", {"default": defaults["steps"], "min": 1, "max": 200, "step": 1,
                          "tooltip": f"Sampling steps of {stage}."}),
        "cfg": ("FLOAT", {"default": defaults["cfg"], "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale; 1 skips the negative branch (faster)."}),
        "shift": ("FLOAT", {"default": defaults["shift"], "min": 0.1, "max": 10.0, "step": 0.05,
                            "tooltip": "Noise schedule shift (logSNR - 2 ln shift); the official value is 2 for "
                                       "Stage C and 1 for Stage B."}),
        "sampler": (list(SAMPLERS), {"default": "ddpm", "tooltip": "Sampler; ddpm is the official one."}),
        "rescale": ("FLOAT", {"default": defaults["rescale"], "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "CFG rescale (official 0.7 for Stage C, 0 for Stage B): pulls the guided "
                                         "prediction's std back toward the conditional one."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                              "tooltip": "1 samples from pure noise; lower starts from the input latent noised to "
                                         "this level (image-to-image); all steps run from there."}),
    }


def _conditioning_input(what: str) -> tuple:
    return ("CONDITIONING", {"tooltip": f"{what} prompt, from SCW_TextEncode or core's CLIPTextEncode with a "
                                        "stable_cascade CLIP."})


class StageCSampler:
    NODE_ID, TITLE = "SCW_StageCSampler", "Stage C Sampler"
    DESCRIPTION = ("Samples the Stage C prior: text -> a 16-channel latent at 1/42.67 of the image size (the "
                   "stage_c latent of SCW_EmptyLatent). Returns the last predicted clean latent, as the official "
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
                "positive": _conditioning_input("The"),
                "negative": _conditioning_input("The negative (usually empty)"),
                "latent": ("LATENT", {"tooltip": "The stage_c output of SCW_EmptyLatent (or an encoded image)."}),
                **schedule_inputs(C_DEFAULTS, "Stage C"),
            },
            "optional": {"previewer": ("SCW_PREVIEWER", {"tooltip": "Optional: shows live previews while sampling."})},
        }

    def sample(self, stage_c: Any, positive: list, negative: list, latent: dict, seed: int, steps: int, cfg: float,
               shift: float, sampler: str, rescale: float, denoise: float, previewer: Any = None) -> tuple[dict]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", _C_FIX)
        samples = latent_samples(latent, "c", "latent", self.NODE_ID)
        out = cascade.sample_stage_c(model, merge_entries(positive), merge_entries(negative), samples, seed=seed,
                                     steps=steps, cfg=cfg, shift=shift, sampler=sampler, rescale=rescale,
                                     denoise=denoise, previewer=previewer, batch_index=latent.get("batch_index"))
        return (stage_latent(out, "c", latent),)


class StageBSampler:
    NODE_ID, TITLE = "SCW_StageBSampler", "Stage B Sampler"
    DESCRIPTION = ("Samples the Stage B decoder: a Stage C latent -> a 4-channel Stage A latent at 1/4 of the image "
                   "size (the stage_b latent of SCW_EmptyLatent), ready for SCW_StageADecode or core's VAEDecode "
                   "with a Stage A VAE.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_b": ("SCW_STAGE_B", {"tooltip": "The Stage B model."}),
            "positive": _conditioning_input("The"),
            "negative": _conditioning_input("The negative (usually empty)"),
            "stage_c": ("LATENT", {"tooltip": "The Stage C result (output of SCW_StageCSampler)."}),
            "latent": ("LATENT", {"tooltip": "The stage_b output of SCW_EmptyLatent."}),
            **schedule_inputs(B_DEFAULTS, "Stage B"),
        }}

    def sample(self, stage_b: Any, positive: list, negative: list, stage_c: dict, latent: dict, seed: int,
               steps: int, cfg: float, shift: float, sampler: str, rescale: float, denoise: float) -> tuple[dict]:
        model = require(stage_b, "stage_b", self.NODE_ID, "a Stage B model", _B_FIX)
        prior = latent_samples(stage_c, "c", "stage_c", self.NODE_ID)
        samples = latent_samples(latent, "b", "latent", self.NODE_ID)
        out = cascade.sample_stage_b(model, merge_entries(positive), merge_entries(negative), prior, samples,
                                     seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler, rescale=rescale,
                                     denoise=denoise, batch_index=latent.get("batch_index"))
        return (stage_latent(out, "b", latent),)


class CascadeSampler:
    NODE_ID, TITLE = "SCW_CascadeSampler", "Cascade Sampler (C then B)"
    DESCRIPTION = ("Runs Stage C then Stage B in one node with the official shift and rescale (C: shift 2, rescale "
                   "0.7; B: shift 1, rescale 0). Use the two sampler nodes for full control.")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        c, b = schedule_inputs(C_DEFAULTS, "Stage C"), schedule_inputs(B_DEFAULTS, "Stage B")
        return {"required": {
            "stage_c_model": ("SCW_STAGE_C", {"tooltip": "The Stage C model."}),
            "stage_b_model": ("SCW_STAGE_B", {"tooltip": "The Stage B model."}),
            "positive": _conditioning_input("The"),
            "negative": _conditioning_input("The negative (usually empty)"),
            "stage_c_latent": ("LATENT", {"tooltip": "The stage_c output of SCW_EmptyLatent."}),
            "stage_b_latent": ("LATENT", {"tooltip": "The stage_b output of SCW_EmptyLatent."}),
            "seed": c["seed"], "sampler": c["sampler"],
            "c_steps": c["steps"], "c_cfg": c["cfg"], "b_steps": b["steps"], "b_cfg": b["cfg"],
        }}

    def sample(self, stage_c_model: Any, stage_b_model: Any, positive: list, negative: list, stage_c_latent: dict,
               stage_b_latent: dict, seed: int, sampler: str, c_steps: int, c_cfg: float, b_steps: int,
               b_cfg: float) -> tuple[dict, dict]:
        common = {"positive": positive, "negative": negative, "seed": seed, "sampler": sampler, "denoise": 1.0}
        (prior,) = StageCSampler().sample(stage_c_model, latent=stage_c_latent, steps=c_steps, cfg=c_cfg,
                                          shift=C_DEFAULTS["shift"], rescale=C_DEFAULTS["rescale"], **common)
        (decoded,) = StageBSampler().sample(stage_b_model, stage_c=prior, latent=stage_b_latent, steps=b_steps,
                                            cfg=b_cfg, shift=B_DEFAULTS["shift"], rescale=B_DEFAULTS["rescale"],
                                            **common)
        return prior, decoded


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(StageCSampler, StageBSampler, CascadeSampler)
