"""Tiny networks and caches for the training tests (also imported by the DDP test's worker processes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "comfyui_stablecascade" not in sys.modules:  # worker processes of the DDP test load the pack themselves
    _root = os.path.dirname(_TESTS)
    _spec = importlib.util.spec_from_file_location("comfyui_stablecascade", os.path.join(_root, "__init__.py"),
                                                   submodule_search_locations=[_root])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["comfyui_stablecascade"] = _mod
    _spec.loader.exec_module(_mod)

from comfyui_stablecascade.cascade.random_init import randomize_  # noqa: E402
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig  # noqa: E402
from comfyui_stablecascade.cascade.text import TextEncoder, TextEncoderConfig  # noqa: E402
from comfyui_stablecascade.train.cache import CachedSample, TrainingCache  # noqa: E402

WIDTH_TEXT = 32


def tiny_config(width: int = 32) -> StageCConfig:
    return dataclasses.replace(StageCConfig.tiny(), c_hidden=(width, width), c_cond=width, c_clip_text=WIDTH_TEXT,
                               c_clip_text_pooled=WIDTH_TEXT, nhead=(1, 1))


def tiny_stage_c(width: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> StageC:
    return randomize_(StageC(tiny_config(width)), seed, unit_norm_weights=False).to(dtype).eval()


def tiny_text_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(TextEncoderConfig.tiny(hidden_size=WIDTH_TEXT, projection_dim=WIDTH_TEXT))


def tiny_cache(n: int = 4, size: tuple[int, int] = (4, 4), seed: int = 0, text: bool = True,
               captions: list[str] | None = None, repeats: list[int] | None = None) -> TrainingCache:
    """Random 'EffNet latents' with random caption embeddings (no encoders needed)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = CachedSample(latent=torch.randn(16, *size, generator=g), caption=(captions or [f"image {i}"] * n)[i])
        if text:
            s.clip_text = torch.randn(77, WIDTH_TEXT, generator=g)
            s.clip_pooled = torch.randn(1, WIDTH_TEXT, generator=g)
        samples.append(s)
    empty = (torch.randn(77, WIDTH_TEXT, generator=g), torch.randn(1, WIDTH_TEXT, generator=g)) if text else None
    return TrainingCache(samples, repeats or [1] * n, empty)


# The official lr (1e-4): Adam's first steps move each weight by about lr * sign(grad), so a gradient within float
# rounding of zero can differ by ~lr between a sum split over ranks and one sum; 1e-4 keeps that inside 1e-5.
DDP_SETTINGS = dict(steps=3, batch_size=4, grad_accum=2, lr=1e-4, warmup=1, seed=3, caption_dropout=0.3,
                    weighting="adaptive")


def ddp_worker(rank: int, world: int, port: int, out_file: str) -> None:
    """One rank of the DDP test: the same tiny run as the single-process reference, half the batch each.

    The environment is what torchrun sets; the trainer joins the process group from it (train.distributed)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from comfyui_stablecascade import host
    from comfyui_stablecascade.train.loop import TrainSettings, train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        result = train(host.wrap(tiny_stage_c(), "stage_c"), None, tiny_cache(5), TrainSettings(**DDP_SETTINGS))
        if rank == 0:
            world_seen = torch.tensor(dist.get_world_size() if dist.is_initialized() else 1)
            save_file(dict(result.lora, **{"adaptive.losses": result.state["tensors"]["adaptive.losses"],
                                           "world": world_seen}), out_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
