"""Image nodes: the three image use cases of the original release (docs/IMAGE_PATHS.md).

- image variation: ``SCW_ClipVisionEncode`` adds CLIP ViT-L image embeddings to a CONDITIONING (Stage C's
  ``clip_img``; N images give 4 N tokens), with a strength, chainable for a strength per image;
- image-to-image: ``SCW_StageCEncode`` (EffNet latent of an image resized to 32 pixels per Stage C cell,
  i.e. 3/4 of the output size) and ``SCW_StageCImageToImage`` (a Stage C sampler that starts from it, with
  the official or the consistent noising);
- reconstruction: ``SCW_ReconstructionEncode`` (the official 3/4 nearest downscale), ``SCW_StageAEncode``
  (Stage A on its own) and ``SCW_ImageCompare`` (PSNR and SSIM, and a difference image).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..cascade import image_ops
from ..cascade.errors import ShapeError
from ..pipeline import IMAGE_TO_IMAGE, SamplingSettings, sample_stage_c
from ..pipeline import images as image_io
from ..pipeline.conditioning import attach_image_embeds, merge_entries
from ..pipeline.latents import DEFAULT_COMPRESSION, MAX_RESOLUTION, latent_sizes, snap_size, stage_latent
from ..samplers.img2img import NOISING_MODES
from .common import category, mappings, require, schedule_inputs, scheduler_input
from .kinds import FIX

log = logging.getLogger(__name__)

CATEGORY = category("image")
MIN_OUTPUT = 256  # the empty latent node's minimum width and height
_IMAGE_TIP = "The input image (e.g. from core's LoadImage)."
CROP_CHOICES = {"center": True, "none": False}  # core's CLIPVisionEncode choices -> clip_preprocess(crop=)


# ---- nodes --------------------------------------------------------------------------------------------


class ClipVisionEncode:
    NODE_ID, TITLE = "SCW_ClipVisionEncode", "CLIP Vision Encode (image variation)"
    DESCRIPTION = ("Image variation: encodes the image(s) with CLIP ViT-L/14 and adds the 768-d image embeddings to "
                   "the conditioning as Stage C's image prompt (each image gives 4 tokens). Works with an empty "
                   "prompt (the official variation recipe) and with a text prompt. Chain several nodes for a "
                   "strength per image. Leave the negative without images: the sampler gives it zeros.")
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The positive prompt ('Stable Cascade Text Encode'); an "
                                                         "empty prompt gives the official image variation."}),
            "clip_vision": ("SCW_CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision model ('Stable Cascade Load CLIP "
                                                           "Vision')."}),
            "image": ("IMAGE", {"tooltip": "The image(s) to vary; a batch of N images gives N image prompts."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplies these images' embeddings: 1 as trained, 0 keeps only the "
                                              "mapper's bias tokens."}),
        }, "optional": {
            # Optional (the newest widget, last): workflows and API prompts saved before it keep working.
            "crop": (list(CROP_CHOICES), {"default": "center", "tooltip": (
                "As core's CLIPVisionEncode: center crops the image to a square first (official); none squeezes "
                "the whole image to 224x224.")}),
        }}

    def encode(self, conditioning: list, clip_vision: Any, image: torch.Tensor, strength: float,
               crop: str = "center") -> tuple[list]:
        model = require(clip_vision, "clip_vision", self.NODE_ID, "a CLIP vision model", FIX["clip_vision"])
        image_ops.image_to_bchw(image, f"{self.NAME}: input 'image'")
        embeds = image_io.encode_clip_images(model, image[..., :3], CROP_CHOICES[crop])
        return (attach_image_embeds(conditioning, embeds, strength),)


class StageCEncode:
    NODE_ID, TITLE = "SCW_StageCEncode", "Stage C Encode (EffNet, image-to-image)"
    DESCRIPTION = ("Encodes an image into a Stage C latent for image-to-image: the image is scaled to cover 32 "
                   "pixels per Stage C cell of the output (3/4 of it at the official compression: 768x768 -> 24x24 "
                   "for 1024x1024), center-cropped, and run through the EfficientNet encoder. Also returns the "
                   "matching empty Stage B latent. Width/height 0 (the default) keep the image's own size, as "
                   "core's StableCascade_StageC_VAEEncode encodes.")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}  # 0: the image's size, as core
        return {"required": {
            "effnet": ("SCW_EFFNET", {"tooltip": "The EfficientNet encoder ('Stable Cascade Load EffNet Encoder')."}),
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "width": ("INT", {**size, "tooltip": "Output image width (0: the image's width, rounded to 8)."}),
            "height": ("INT", {**size, "tooltip": "Output image height (0: the image's height, rounded to 8)."}),
            "compression": ("FLOAT", {"default": DEFAULT_COMPRESSION, "min": 16.0, "max": 64.0, "step": 0.01,
                                      "tooltip": "Pixels per Stage C cell, as in 'Stable Cascade Empty Latent': 42 "
                                                 "rounds down as core (1024 -> 24 cells), 42.67 up as the "
                                                 "official code (1024 -> 24)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None) -> bool | str:
        for name, value in (("width", width), ("height", height)):
            if value is not None and 0 < value < MIN_OUTPUT:
                return (f"{name} {value} is too small for Stage C - use 0 (the image's own {name}) or at least "
                        f"{MIN_OUTPUT}, as 'Stable Cascade Empty Latent' allows")
        return True

    def encode(self, effnet: Any, image: torch.Tensor, width: int, height: int,
               compression: float = DEFAULT_COMPRESSION) -> tuple[dict, dict]:
        model = require(effnet, "effnet", self.NODE_ID, "an EffNet encoder", FIX["effnet"])
        x = image_io.input_pixels(image, self.NAME)
        height = snap_size(height or x.shape[-2], "height")
        width = snap_size(width or x.shape[-1], "width")
        _, (h_b, w_b) = latent_sizes(width, height, compression)
        pixels = image_ops.resize_cover(x, *image_ops.effnet_input_size(height, width, compression))
        stage_c = image_io.effnet_encode(model, pixels)
        stage_b = torch.zeros(x.shape[0], 4, h_b, w_b)
        return stage_latent(stage_c, "c"), stage_latent(stage_b, "b")


class ReconstructionEncode:
    NODE_ID, TITLE = "SCW_ReconstructionEncode", "Reconstruction Encode (EffNet, official 3/4)"
    DESCRIPTION = ("The official reconstruction input: the image downscaled by 3/4 to multiples of 32 with nearest "
                   "neighbour (1024 -> 768) and encoded by the EfficientNet (-> 24x24 Stage C cells), plus an empty "
                   "Stage B latent of the image's own size. Decode with 'Stable Cascade Stage B Sampler' + "
                   "'Stable Cascade Stage A Decode' to see what the 42x compression keeps.")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "effnet": ("SCW_EFFNET", {"tooltip": "The EfficientNet encoder ('Stable Cascade Load EffNet Encoder')."}),
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP + " Sides of at least 43 pixels; multiples of 8 keep the "
                                                        "output the same size."}),
        }}

    def encode(self, effnet: Any, image: torch.Tensor) -> tuple[dict, dict]:
        model = require(effnet, "effnet", self.NODE_ID, "an EffNet encoder", FIX["effnet"])
        x = image_io.input_pixels(image, self.NAME)
        stage_c = image_io.effnet_encode(model, image_ops.downscale_for_reconstruction(x))
        height, width = snap_size(x.shape[-2], "height"), snap_size(x.shape[-1], "width")
        stage_b = torch.zeros(x.shape[0], 4, height // 4, width // 4)
        return stage_latent(stage_c, "c"), stage_latent(stage_b, "b")


class StageAEncode:
    NODE_ID, TITLE = "SCW_StageAEncode", "Stage A Encode"
    DESCRIPTION = ("Encodes an image with Stage A alone (4x down, 4 channels, no quantisation) into a Stage B "
                   "latent; 'Stable Cascade Stage A Decode' turns it back, showing Stage A's own loss. Sides must be "
                   "multiples of "
                   "4 (8 for Stage B sampling).")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_a": ("SCW_STAGE_A", {"tooltip": "The Stage A model ('Stable Cascade Load Stage A')."}),
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
        }}

    def encode(self, stage_a: Any, image: torch.Tensor) -> tuple[dict]:
        model = require(stage_a, "stage_a", self.NODE_ID, "a Stage A model", FIX["stage_a"])
        x = image_ops.image_to_bchw(image, f"{self.NAME}: input 'image'")
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ShapeError(f"{self.NAME}: the image is {x.shape[-1]}x{x.shape[-2]} pixels; Stage A needs "
                             "width and height multiples of 4 - crop or scale it first (core's ImageCrop or "
                             "ImageScale, e.g. to the nearest multiple of 8)")
        return (stage_latent(image_io.stage_a_encode(model, x), "b"),)


class StageCImageToImage:
    NODE_ID, TITLE = "SCW_StageCImageToImage", "Stage C Image-to-Image Sampler"
    DESCRIPTION = ("Stage C sampler that starts from an encoded image ('Stable Cascade Stage C Encode (EffNet, "
                   "image-to-image)') noised to 'denoise' and "
                   "runs all 'steps' from there. Defaults are the notebook's: 16 steps from t 0.8, noising "
                   "'official' (the notebook noises with shift 1 while sampling with shift 2, so more of the image "
                   "survives); 'consistent' noises with the sampler's own shift.")
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = schedule_inputs(IMAGE_TO_IMAGE, "Stage C")
        inputs["denoise"] = ("FLOAT", {**inputs["denoise"][1], "default": IMAGE_TO_IMAGE.denoise,
                                       "tooltip": "Where sampling starts (the official t_start 0.8): lower keeps "
                                                  "more of the image."})
        return {
            "required": {
                "stage_c": ("SCW_STAGE_C", {"tooltip": "The Stage C model."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt ('Stable Cascade Text Encode')."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (usually empty)."}),
                "latent": ("LATENT", {"tooltip": "The stage_c output of 'Stable Cascade Stage C Encode (EffNet, "
                                                 "image-to-image)'."}),
                **inputs,
                "noising": (list(NOISING_MODES), {"default": IMAGE_TO_IMAGE.noising, "tooltip": (
                    "official: the notebook's recipe (noised with shift 1, a = 0.307 at 0.8); consistent: noised "
                    "with the sampler's shift (a = 0.159 at 0.8 with shift 2), replaces more of the image.")}),
            },
            "optional": {"previewer": ("SCW_PREVIEWER", {"tooltip": "Optional: shows live previews while sampling."}),
                         **scheduler_input(IMAGE_TO_IMAGE)},
        }

    def sample(self, stage_c: Any, positive: list, negative: list, latent: dict, seed: int, steps: int, cfg: float,
               shift: float, sampler: str, rescale: float, denoise: float, noising: str = "official",
               previewer: Any = None, scheduler: str = IMAGE_TO_IMAGE.scheduler) -> tuple[dict]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        settings = SamplingSettings(steps, cfg, shift, sampler, rescale, denoise, noising, scheduler)
        out = sample_stage_c(model, merge_entries(positive), merge_entries(negative), latent, settings, seed,
                             previewer=previewer)
        return (stage_latent(out, "c", latent),)


class ImageCompare:
    NODE_ID, TITLE = "SCW_ImageCompare", "Image Compare (PSNR, SSIM)"
    DESCRIPTION = ("Reports PSNR (dB; inf for identical images) and SSIM (Wang et al. 2004: 11x11 Gaussian window, "
                   "sigma 1.5) between a reference and an image of the same size, e.g. an input and its "
                   "reconstruction, and outputs their difference amplified by 'gain'.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("difference",)
    FUNCTION = "compare"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "The original image (batch 1 is compared with every image)."}),
            "image": ("IMAGE", {"tooltip": "The image to measure, same width and height as the reference."}),
            "gain": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 100.0, "step": 0.5,
                               "tooltip": "Multiplies the absolute difference in the output image."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def compare(self, reference: torch.Tensor, image: torch.Tensor, gain: float = 4.0,
                unique_id: str | None = None) -> dict:
        psnr, ssim, overall = image_io.comparison(reference, image)
        report = image_io.comparison_report(psnr, ssim, overall)
        log.info("ComfyUI-StableCascade: image comparison (node %s)\n%s", unique_id or "?", report)
        diff = ((image[..., :3].float() - reference[..., :3].float()).abs() * gain).clamp(0.0, 1.0)
        return {"ui": {"text": [report]}, "result": (diff,)}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    ClipVisionEncode, StageCEncode, StageCImageToImage, ReconstructionEncode, StageAEncode, ImageCompare,
)
