"""Training nodes: a Stage C LoRA (with learned tokens) trained in the graph, the official recipe (docs/TRAINING.md).

Dataset (a folder of images + captions) -> Cache (every image encoded once with the EffNet, captions with the text
encoder when no token is learned) -> Train (LoRA on the official targets; loss curve, previews, progress with the
loss, interrupt keeps the partial LoRA, resume from a saved state) -> Save (to ComfyUI's loras/: the official
layout with its token embeddings for the pack's LoRA loader, or the community layout core's LoraLoader reads).
The work is done by ``train/``; these nodes only translate the sockets.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import host
from ..train import TrainingInputError
from ..train import cache as train_cache
from ..train import data as train_data
from ..train import distributed as train_distributed
from ..train import loop as train_loop
from ..train import state as train_state
from ..train.settings import DTYPES, TRAIN_SETTING_RANGES
from .common import category, mappings, require
from .kinds import FIX

log = logging.getLogger(__name__)

CATEGORY = category("training")
STATE_FOLDER = "scw_training"  # under ComfyUI's output/: training states for resuming (never listed as LoRAs)
STATE_SUFFIX = ".state.safetensors"
FORMATS = ("official", "community")
_DEFAULTS = train_loop.TrainSettings()


@dataclass
class TrainedLora:
    """What flows on an SCW_LORA socket: the trainer's result and the settings it ran with."""

    result: Any  # train.loop.TrainResult
    settings: Any  # train.loop.TrainSettings
    base_dtype: torch.dtype = torch.bfloat16  # a full fine-tune is written back in the loaded Stage C's dtype


# ---- helpers (paths, widgets, the loss curve) -----------------------------------------------------------------


def dataset_folder(folder: str) -> str:
    """An absolute path as given; a relative one inside ComfyUI's input/ folder."""
    folder = os.path.expanduser(str(folder).strip())
    if not folder:
        raise TrainingInputError("dataset folder is empty; give a subfolder of ComfyUI's input/ (e.g. "
                                 "'train_dataset') or an absolute path to a folder of images with .txt captions.")
    return folder if os.path.isabs(folder) else os.path.join(host.input_directory(), folder)


def folder_signature(folder: str) -> str:
    """Names, sizes and modification times of everything under ``folder`` (hidden entries, the cache, skipped)."""
    import hashlib

    h = hashlib.sha256(folder.encode())
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _safe_name(name: str, what: str) -> str:
    name = str(name).strip().replace("\\", "/")
    for suffix in (STATE_SUFFIX, ".safetensors"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TrainingInputError(f"{what} {name!r} is not a plain file name; give a name such as 'my_lora' (a "
                                 "subfolder like 'training/my_lora' is fine, '..' and absolute paths are not).")
    return name


def lora_path(file_name: str) -> str:
    """Where the save node writes ``file_name``: ComfyUI's loras/ folder (the models folder's outside)."""
    return os.path.join(host.save_folder("loras"), _safe_name(file_name, "LoRA file name") + ".safetensors")


def state_path(name: str) -> str:
    """A training-state file: an absolute path as given, else ``<output>/scw_training/<name>.state.safetensors``."""
    name = os.path.expanduser(str(name).strip())
    if os.path.isabs(name):
        return name
    return os.path.join(host.output_directory(), STATE_FOLDER, _safe_name(name, "training state name") + STATE_SUFFIX)


def _int(default: int, low: int, high: int, tip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tip})


def _setting(name: str, tip: str, step: float = 1, **extra: Any) -> tuple:
    """A widget of a TrainSettings field: its default, and the range ``TrainSettings.check()`` enforces."""
    default = getattr(_DEFAULTS, name)
    low, high = TRAIN_SETTING_RANGES[name]
    kind = "INT" if isinstance(default, int) else "FLOAT"
    options = {"default": default, "min": low, "max": high, "step": step, "tooltip": tip, **extra}
    if kind == "FLOAT":
        options["round"] = False
    return (kind, options)


def loss_curve(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss per step as a 1 x H x W x 3 IMAGE in [0, 1]: raw losses (light) and their running mean (dark),
    with the step range and the loss range written on the axes (PIL only)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 14, height - 28
    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    values = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        d.text((left + 8, top + 8), "no finite loss yet", fill=(160, 30, 30))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    low, high = float(values.min()), float(values.max())
    span = high - low or max(abs(high), 1e-8)
    mean = np.convolve(values, np.ones(min(len(values), 10)) / min(len(values), 10), mode="valid")

    def points(series: np.ndarray, offset: int) -> list[tuple[float, float]]:
        n = max(len(values) - 1, 1)
        return [(left + (i + offset) / n * (right - left), bottom - (v - low) / span * (bottom - top))
                for i, v in enumerate(series)]

    lines = ((values, 0, (150, 180, 230), 1), (mean, len(values) - len(mean), (20, 60, 160), 2))
    for series, offset, colour, w in lines:
        pts = points(series, offset)
        if len(pts) == 1:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        else:
            d.line(pts, fill=colour, width=w)
    d.text((4, top), f"{high:.4g}", fill=(40, 40, 40))
    d.text((4, bottom - 10), f"{low:.4g}", fill=(40, 40, 40))
    d.text((left, bottom + 6), "step 1", fill=(40, 40, 40))
    d.text((right - 70, bottom + 6), f"step {len(losses)}", fill=(40, 40, 40))
    d.text((left + 70, bottom + 6), f"loss: last {values[-1]:.4g}, dark: mean of {len(values) - len(mean) + 1}",
           fill=(20, 60, 160))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class _StepReport:
    """The trainer's per-step callback (``train`` leaves the bar to it): the progress bar, with the preview when
    there is one, and the current loss as a text line under the node."""

    def __init__(self, total: int, node_id: str | None) -> None:
        self.total, self.node_id, self.bar = total, node_id, host.progress(total)

    def __call__(self, step: int, loss: float, preview: torch.Tensor | None) -> None:
        self.bar.update(step, preview)
        host.progress_text(f"step {step}/{self.total}  loss {loss:.5f}", self.node_id)


# ---- nodes ----------------------------------------------------------------------------------------------------


class TrainDataset:
    NODE_ID, TITLE = "SCW_TrainDataset", "Training Dataset"
    DESCRIPTION = ("Reads a folder of training images (.png/.jpg/.webp/.bmp) with same-name .txt captions: a "
                   "subfolder of ComfyUI's input/ or any absolute path. Kohya-style 'N_name' subfolders repeat their "
                   "images N times; images without a caption get the default caption. Images go to multi-aspect "
                   "buckets of area^2 pixels (32-pixel sides; official 768). Unreadable or too small images are "
                   "skipped and named in the log.")
    RETURN_TYPES = ("SCW_DATASET",)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "scan"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "folder": ("STRING", {"default": "train_dataset", "tooltip": (
                "The dataset folder: a subfolder of ComfyUI's input/ (e.g. train_dataset) or an absolute path.")}),
            "default_caption": ("STRING", {"default": "a photo of [wurst]", "multiline": False, "tooltip": (
                "Caption of images without a .txt file; put the trigger token being learned in it (e.g. "
                "'a photo of [wurst]'). Empty: a kohya folder's name, else no caption.")}),
            "area": _int(768, 256, 2048, "Bucket size: images are resized to about area x area pixels (sides "
                                         "multiples of 32, aspect kept). Official: 768 (a 24x24 Stage C latent); "
                                         "smaller trains faster.", step=32),
        }}

    @classmethod
    def IS_CHANGED(cls, folder: str, default_caption: str = "", area: int = 768) -> str:
        """ComfyUI reruns the node when a file of the folder changed (added, removed, edited), not only a widget."""
        return folder_signature(dataset_folder(folder))

    def scan(self, folder: str, default_caption: str, area: int) -> tuple[Any]:
        dataset = train_data.scan_folder(dataset_folder(folder), default_caption, int(area))
        log.info("ComfyUI-StableCascade: dataset %s: %d images (%d with repeats), %d skipped, buckets %s",
                 dataset.folder, len(dataset.samples), len(dataset), len(dataset.skipped),
                 sorted({s.bucket for s in dataset.samples}))
        return (dataset,)


class TrainCache:
    NODE_ID, TITLE = "SCW_TrainCache", "Training Cache"
    DESCRIPTION = ("Encodes every dataset image once with the EffNet (the Stage C latents the LoRA learns) and, when "
                   "a text encoder is connected, every caption once, so no training step runs an encoder again. "
                   "Saved beside the dataset (.scw_cache/) and reused while images, captions and encoders are "
                   "unchanged. Leave text_encoder unconnected when the trainer learns a token.")
    RETURN_TYPES = ("SCW_TRAIN_CACHE",)
    RETURN_NAMES = ("cache",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "dataset": ("SCW_DATASET", {"tooltip": "The output of 'Stable Cascade Training Dataset'."}),
            "effnet": ("SCW_EFFNET", {"tooltip": "The EffNet encoder (effnet_encoder.safetensors)."}),
        }, "optional": {
            "text_encoder": ("SCW_TEXT_ENCODER", {"tooltip": (
                "Optional: caches the caption embeddings too (faster steps). Leave unconnected when learning a "
                "token: captions with a new token must be encoded by the trainer with the token's current row.")}),
            "clip_vision": ("SCW_CLIP_VISION", {"tooltip": (
                "Optional: caches CLIP image embeddings; the trainer then feeds them on 10% of the samples (the "
                "official recipe), zeros otherwise.")}),
        }}

    def encode(self, dataset: Any, effnet: Any, text_encoder: Any = None, clip_vision: Any = None) -> tuple[Any]:
        encoder = require(effnet, "effnet", self.NODE_ID, "the EffNet encoder", FIX["effnet"])
        images = require(dataset, "dataset", self.NODE_ID, "a dataset", "connect 'Stable Cascade Training Dataset'")
        bar = host.progress(len(images.samples))
        cache = train_cache.build_cache(images, encoder, text_encoder, clip_vision,
                                        progress=lambda done, total: bar.update(done))
        return (cache,)


def _settings_inputs() -> dict:
    s = _DEFAULTS
    return {
        "steps": _setting("steps", "Optimizer steps (each of batch_size x grad_accum samples)."),
        "learning_rate": ("FLOAT", {"default": s.lr, "min": TRAIN_SETTING_RANGES["lr"][0], "round": False,
                                    "max": TRAIN_SETTING_RANGES["lr"][1], "step": 1e-5,
                                    "tooltip": "AdamW learning rate (official 1e-4)."}),
        "batch_size": _setting("batch_size", "Samples per forward pass; a batch holds one bucket (one size)."),
        "grad_accum": _setting("grad_accum", "Batches whose gradients add up to one optimizer step."),
        "warmup": _setting("warmup", "Optimizer steps over which the learning rate rises linearly from 0."),
        "grad_clip": _setting("grad_clip", "Gradient norm clipping (official 1.0; 0: off).", 0.1),
        "seed": _setting("seed", "Seed of noise, timesteps, shuffling and dropout; the same seed repeats a run.",
                         control_after_generate=True),
        "rank": _setting("rank", "LoRA rank (official 4)."),
        "alpha": _setting("alpha", "LoRA alpha; the update is scaled by alpha / rank (official 1).", 0.5),
        "tokens": ("STRING", {"default": s.tokens, "multiline": True, "tooltip": (
            "Tokens to learn, one a line: [name]=regex adds a new token initialised to the mean of the vocabulary "
            "rows matching regex (e.g. [wurst]=^sausage</w>); a plain regex fine-tunes existing tokens. Empty: "
            "LoRA only.")}),
        "weighting": (["p2", "adaptive"], {"default": s.weighting, "tooltip": (
            "Loss weight: p2 = 1/(1+SNR) (official default); adaptive = 1/EMA of the loss in 300 logSNR buckets "
            "(saved with the training state).")}),
        "include_ff": ("BOOLEAN", {"default": s.include_ff, "tooltip": (
            "Also train the feed-forward linears (community layout only; not with tokens).")}),
        "caption_dropout": _setting("caption_dropout", "Share of samples trained with an empty caption "
                                                       "(official 0.05).", 0.01),
        "clip_image_prob": _setting("clip_image_prob", "Share of samples given their cached CLIP image embedding "
                                                       "(official 0.1; zeros otherwise).", 0.01),
        "grad_checkpointing": ("BOOLEAN", {"default": s.grad_checkpointing, "tooltip": (
            "Recompute block activations in the backward pass: much less memory, somewhat slower.")}),
        "dtype": (list(DTYPES), {"default": s.dtype, "tooltip": (
            "Compute dtype: auto = bf16 on GPUs that have it, else fp32 (CPUs); the LoRA and the optimizer "
            "stay fp32, the base stays in its file dtype.")}),
        "preview_every": _setting("preview_every", "Every N steps, show a preview (a short Stage C sample with the "
                                                   "LoRA so far through the previewer; 0: off)."),
        "resume_state": ("STRING", {"default": "", "tooltip": (
            "Empty: start fresh. Else a training state written by 'Stable Cascade Save Trained LoRA' (its name, from "
            "output/scw_training/, or an absolute path): training continues from its step, optimizer, loss weights "
            "and random state up to 'steps'.")}),
    }


def _build_settings(kw: dict) -> Any:
    """TrainSettings from the widget values (the names the widgets share with TrainSettings are passed as is)."""
    names = set(train_loop.TrainSettings.__dataclass_fields__)
    values = {k: v for k, v in kw.items() if k in names}
    return train_loop.TrainSettings(lr=float(kw["learning_rate"]), **values)


class TrainLora:
    NODE_ID, TITLE = "SCW_TrainLora", "Train Stage C LoRA"
    DESCRIPTION = ("Trains a Stage C LoRA (every attention projection, the official targets) and optional learned "
                   "tokens with the official recipe: eps objective, P2 loss weight, AdamW, warmup, clipping. The "
                   "loaded Stage C is never changed. Shows the loss under the node and previews with a previewer; "
                   "Cancel stops between steps and keeps the partial LoRA (save it, resume later).")
    RETURN_TYPES = ("SCW_LORA", "IMAGE", "INT")
    RETURN_NAMES = ("lora", "loss_curve", "steps")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "stage_c": ("SCW_STAGE_C", {"tooltip": "The Stage C model to train a LoRA for (it stays unchanged)."}),
            "text_encoder": ("SCW_TEXT_ENCODER", {"tooltip": "The text encoder: encodes captions with learned tokens "
                                                             "(or uncached captions)."}),
            "cache": ("SCW_TRAIN_CACHE", {"tooltip": "The output of 'Stable Cascade Training Cache'."}),
            **_settings_inputs(),
        }, "optional": {
            "clip_vision": ("SCW_CLIP_VISION", {"tooltip": "Optional: the CLIP vision model (uncached image "
                                                           "embeddings)."}),
            "previewer": ("SCW_PREVIEWER", {"tooltip": "Optional: shows previews every preview_every steps."}),
            # Widgets added after the first release sit here, last, so saved workflows keep their values' order.
            "save_every": _setting("save_every", "Every N steps, save the LoRA so far to loras/<save_prefix>_step<N> "
                                                 "with its training state in output/scw_training/ (0: off)."),
            "save_prefix": ("STRING", {"default": "scw_lora", "tooltip": (
                "File name prefix of the save_every snapshots (a subfolder like training/my_lora is fine).")}),
            "full_finetune": ("BOOLEAN", {"default": _DEFAULTS.full_finetune, "tooltip": (
                "Train every weight of a copy of Stage C instead of a LoRA (small models; needs memory for a second "
                "float32 Stage C and its AdamW state). The save node writes it to diffusion_models/.")}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, stage_c: Any, text_encoder: Any, cache: Any, clip_vision: Any = None, previewer: Any = None,
              unique_id: str | None = None, **widgets: Any) -> tuple[Any, torch.Tensor, int]:
        model = require(stage_c, "stage_c", self.NODE_ID, "a Stage C model", FIX["stage_c"])
        encoder = require(text_encoder, "text_encoder", self.NODE_ID, "a text encoder", FIX["text_encoder"])
        settings = _build_settings(widgets)
        resume_name = widgets["resume_state"].strip()
        resume = train_loop.load_state(state_path(resume_name)) if resume_name else None
        base_dtype = next(host.module_of(model).parameters()).dtype
        prefix = widgets.get("save_prefix", "scw_lora")
        if settings.save_every:
            _safe_name(prefix, "save_prefix")  # a bad name fails now, not after the first save_every steps
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs every node under inference_mode
            result = train_loop.train(
                model, encoder, cache, settings, clip_vision=clip_vision, previewer=previewer, resume=resume,
                on_step=_StepReport(settings.steps, unique_id),
                on_save=lambda partial: write_snapshot(TrainedLora(partial, settings, base_dtype), prefix))
        if result.interrupted or result.stopped_reason:
            log.warning("ComfyUI-StableCascade: training stopped at step %d of %d (%s); the LoRA so far goes on to "
                        "the save node, and its training state resumes the run.", result.steps, settings.steps,
                        result.stopped_reason or "interrupted")
        return TrainedLora(result, settings, base_dtype), loss_curve(result.losses), int(result.steps)


def _metadata(lora: TrainedLora, layout: str) -> dict[str, str]:
    r, s = lora.result, lora.settings
    return {"format": "pt", "scw_layout": layout, "scw_steps": str(r.steps), "scw_rank": str(s.rank),
            "scw_alpha": str(s.alpha), "scw_tokens": r.loader_tokens,
            "scw_interrupted": str(bool(r.interrupted or r.stopped_reason)).lower(),
            "scw_settings": json.dumps({k: getattr(s, k) for k in s.__dataclass_fields__}, default=str)}


def stage_c_path(file_name: str) -> str:
    """Where a full fine-tune goes: ComfyUI's diffusion_models/ (unet/) folder, which the Stage C loader lists."""
    name = _safe_name(file_name, "Stage C file name")
    return os.path.join(host.save_folder("diffusion_models"), name + ".safetensors")


def write_lora(lora: TrainedLora, file_name: str, layout: str) -> str:
    """Write what was trained; returns the path. A LoRA goes to loras/ in ``layout``; a full fine-tune is a whole
    Stage C in the release's key layout and the loaded model's dtype, in diffusion_models/ (``layout`` unused)."""
    full = lora.result.full_state_dict
    if full is not None:
        tensors = {k: v.to(lora.base_dtype) if v.is_floating_point() else v for k, v in full.items()}
        return train_state.save_atomic(tensors, stage_c_path(file_name), dict(_metadata(lora, "full"), scw_tokens=""))
    tensors = lora.result.lora if layout == "official" else lora.result.community
    if tensors is None:
        other = "community" if layout == "official" else "official"
        why = ("learned tokens exist only in the official layout (core's LoraLoader cannot load them)"
               if layout == "community" else "feed-forward LoRAs (include_ff) exist only in the community layout")
        raise TrainingInputError(f"the trained LoRA has no {layout} layout: {why} - save it as {other!r}.")
    return train_state.save_atomic(tensors, lora_path(file_name), _metadata(lora, layout))


def write_snapshot(lora: TrainedLora, prefix: str) -> list[str]:
    """A periodic save during training (``save_every``): ``<prefix>_step<N>`` in the official layout (the community
    one for feed-forward LoRAs; a whole Stage C for a full fine-tune) and its training state, to resume from."""
    name = f"{_safe_name(prefix, 'save_prefix')}_step{lora.result.steps:06d}"
    layout = "official" if lora.result.lora is not None else "community"
    written = [write_lora(lora, name, layout), state_path(name)]
    train_loop.save_state(written[1], lora.result.state)
    log.info("ComfyUI-StableCascade: step %d saved: %s", lora.result.steps, " and ".join(written))
    return written


class SaveLora:
    NODE_ID, TITLE = "SCW_SaveLora", "Save Trained LoRA"
    DESCRIPTION = ("Writes the trained LoRA to ComfyUI's models/loras/ as <file_name>.safetensors (replacing a file "
                   "of that name): 'official' holds the learned tokens and is read by the pack's LoRA loader (type "
                   "the tokens line it logs into its tokens field); 'community' (lora_prior_unet_ keys) is read by "
                   "ComfyUI core's LoraLoader too. A full fine-tune is written as a whole Stage C to "
                   "diffusion_models/ instead. Also writes the training state to output/scw_training/ to resume.")
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora": ("SCW_LORA", {"tooltip": "The output of 'Stable Cascade Train Stage C LoRA'."}),
            "file_name": ("STRING", {"default": "scw_lora", "tooltip": (
                "File name in models/loras/ (without .safetensors; a subfolder like training/my_lora is fine).")}),
            "layout": (list(FORMATS), {"default": "official", "tooltip": (
                "official: the release's layout with learned tokens (the pack's LoRA loader); community: kohya "
                "lora_prior_unet_ keys, loaded by core's LoraLoader as well (no learned tokens).")}),
            "save_state": ("BOOLEAN", {"default": True, "tooltip": (
                "Also write the training state (optimizer, step, loss weights, random state) to "
                "output/scw_training/<file_name>.state.safetensors, for the trainer's resume_state.")}),
        }}

    def save(self, lora: Any, file_name: str, layout: str, save_state: bool) -> dict:
        trained = require(lora, "lora", self.NODE_ID, "a trained LoRA", "connect 'Stable Cascade Train Stage C LoRA'")
        if not train_distributed.is_main_process():  # under torchrun every rank holds the same LoRA; one writes
            return {"ui": {"text": []}, "result": ()}
        path = write_lora(trained, file_name, layout)
        written = [path]
        if save_state:
            written.append(state_path(file_name))
            os.makedirs(os.path.dirname(written[-1]), exist_ok=True)
            train_loop.save_state(written[-1], trained.result.state)
        field = trained.result.loader_tokens
        log.info("ComfyUI-StableCascade: wrote %s%s", " and ".join(written),
                 f"; type this into the LoRA loader's tokens field: {field!r}" if field else "")
        return {"ui": {"text": written}, "result": ()}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(TrainDataset, TrainCache, TrainLora, SaveLora)
