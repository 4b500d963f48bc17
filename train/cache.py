"""The training cache: every image encoded once with the EffNet (the Stage C target) and, when no token is being
learned, every caption once with the text encoder, so a training step never runs an encoder.

The cache is a safetensors file in ``<dataset>/.scw_cache/`` (or ``cache_dir``) named by a hash of everything
its values depend on: each image's path, modification time and size, its caption and bucket, the area, and the
identity of the encoders (class, config, shapes, a checksum of some weights, the handle's patch keys). When none
of that changed, the file is read back instead of encoding again. Writes go to a temporary name and are renamed,
so parallel ranks or an interrupted run never leave a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import host
from ..pipeline.conditioning import encode_prompt
from ..pipeline.images import effnet_encode, encode_clip_images
from .data import Dataset, load_pixels
from .errors import TrainingInputError
from .state import save_atomic

log = logging.getLogger(__name__)

CACHE_FOLDER = ".scw_cache"
_FORMAT = "scw-train-cache-1"


@dataclass
class CachedSample:
    """One encoded image. ``latent`` (16, h/32, w/32) float32; the rest float32 or None when not encoded."""

    latent: torch.Tensor
    caption: str
    clip_text: torch.Tensor | None = None  # (77, 1280)
    clip_pooled: torch.Tensor | None = None  # (1, 1280)
    clip_image: torch.Tensor | None = None  # (1, 768)


@dataclass
class TrainingCache:
    """Encoded samples, each counted ``repeats[i]`` times per epoch. ``empty_text`` is the encoding of the empty
    caption (clip_text (77, C), pooled (1, C)), used for caption dropout when captions are cached."""

    samples: list[CachedSample]
    repeats: list[int] = field(default_factory=list)
    empty_text: tuple[torch.Tensor, torch.Tensor] | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.repeats:
            self.repeats = [1] * len(self.samples)
        if len(self.repeats) != len(self.samples):
            raise TrainingInputError(f"training cache: {len(self.repeats)} repeat counts for {len(self.samples)} "
                                     "samples; give one per sample.")
        if not self.samples:
            raise TrainingInputError("training cache holds no samples; cache a dataset with at least one image.")

    def __len__(self) -> int:
        return sum(self.repeats)

    @property
    def has_text(self) -> bool:
        return all(s.clip_text is not None for s in self.samples) and self.empty_text is not None

    @property
    def has_images(self) -> bool:
        return all(s.clip_image is not None for s in self.samples)

    def indices(self) -> list[int]:
        """Sample indices with repeats expanded, in sample order."""
        return [i for i, n in enumerate(self.repeats) for _ in range(n)]

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        """One epoch of index lists; every list holds samples of one latent shape (one bucket).

        Each bucket's indices are shuffled with ``generator``, cut into lists of ``batch_size`` (the last one of a
        bucket may be shorter), and the lists are shuffled too, so buckets interleave.
        """
        if batch_size < 1:
            raise TrainingInputError(f"batch_size={batch_size}; expected 1 or more.")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in self.indices():
            by_shape.setdefault(tuple(self.samples[i].latent.shape), []).append(i)
        chunks: list[list[int]] = []
        for shape in sorted(by_shape):
            group = by_shape[shape]
            perm = torch.randperm(len(group), generator=generator).tolist()
            group = [group[j] for j in perm]
            chunks += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
        for j in torch.randperm(len(chunks), generator=generator).tolist():
            yield chunks[j]


# ---- identity and key ---------------------------------------------------------------------------------------


def encoder_identity(handle: Any) -> str:
    """A short fingerprint of a network handle: class, config, shapes, a weight checksum, patch keys."""
    if handle is None:
        return "none"
    module = host.module_of(handle)
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(repr(getattr(module, "config", "")).encode())
    sd = module.state_dict()
    for name in list(sd)[:2] + list(sd)[-2:]:
        t = sd[name]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.is_floating_point() and t.device.type != "meta":
            try:
                h.update(repr(float(t.detach().flatten()[:4096].double().sum())).encode())
            except (RuntimeError, TypeError, NotImplementedError):  # a packed quantized tensor: shapes suffice
                pass
    patch_keys = getattr(handle, "patch_keys", None)
    if callable(patch_keys):
        h.update(repr(sorted(patch_keys())).encode())
    return h.hexdigest()[:16]


def cache_key(dataset: Dataset, effnet: Any, text_encoder: Any, clip_vision: Any) -> str:
    h = hashlib.sha256(_FORMAT.encode())
    h.update(repr(dataset.area).encode())
    for s in dataset.samples:
        st = os.stat(s.path)
        h.update(json.dumps([s.path, st.st_mtime_ns, st.st_size, s.caption, s.bucket, s.repeats]).encode())
    for handle in (effnet, text_encoder, clip_vision):
        h.update(encoder_identity(handle).encode())
    return h.hexdigest()[:24]


# ---- build / read / write ---------------------------------------------------------------------------------------


def build_cache(dataset: Dataset, effnet: Any, text_encoder: Any = None, clip_vision: Any = None,
                cache_dir: str | None = None, progress: Callable[[int, int], None] | None = None) -> TrainingCache:
    """Encode ``dataset`` (or read the cache file made from the same inputs). ``progress(done, total)``."""
    if effnet is None:
        raise TrainingInputError("the training cache needs the EffNet encoder (it makes the Stage C latents the "
                                 "network learns); connect the EffNet loader.")
    key = cache_key(dataset, effnet, text_encoder, clip_vision)
    folder = cache_dir or os.path.join(dataset.folder, CACHE_FOLDER)
    path = os.path.join(folder, f"{key}.safetensors")
    if os.path.isfile(path):
        try:
            cache = read_cache(path)
            log.info("ComfyUI-StableCascade: training cache %s reused (%d images).", path, len(cache.samples))
            return cache
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ComfyUI-StableCascade: training cache %s unreadable (%s); encoding again.", path, exc)
    samples: list[CachedSample] = []
    texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one encode per distinct caption
    total = len(dataset.samples)
    for n, s in enumerate(dataset.samples):
        host.check_interrupt()
        pixels = load_pixels(s)
        latent = effnet_encode(effnet, pixels[None])[0].float().cpu()
        item = CachedSample(latent=latent, caption=s.caption)
        if text_encoder is not None:
            if s.caption not in texts:
                clip_text, pooled = encode_prompt(text_encoder, s.caption)
                texts[s.caption] = (clip_text[0].float().cpu(), pooled.float().reshape(1, -1).cpu())
            item.clip_text, item.clip_pooled = texts[s.caption]
        if clip_vision is not None:
            item.clip_image = encode_clip_images(clip_vision, pixels.permute(1, 2, 0)[None]).float().reshape(1, -1)
        samples.append(item)
        if progress is not None:
            progress(n + 1, total)
    empty = None
    if text_encoder is not None:
        clip_text, pooled = encode_prompt(text_encoder, "")
        empty = (clip_text[0].float().cpu(), pooled.float().reshape(1, -1).cpu())
    cache = TrainingCache(samples, [s.repeats for s in dataset.samples], empty, key)
    try:
        write_cache(path, cache)
    except OSError as exc:
        log.warning("ComfyUI-StableCascade: training cache not saved to %s (%s); it is used from memory.", path, exc)
    return cache


def write_cache(path: str, cache: TrainingCache) -> None:
    tensors: dict[str, torch.Tensor] = {}
    # Copies: samples with the same caption share their text tensors, which safetensors refuses to write twice.
    for i, s in enumerate(cache.samples):
        tensors[f"latent.{i}"] = s.latent.clone().contiguous()
        for name in ("clip_text", "clip_pooled", "clip_image"):
            value = getattr(s, name)
            if value is not None:
                tensors[f"{name}.{i}"] = value.clone().contiguous()
    if cache.empty_text is not None:
        tensors["empty.clip_text"], tensors["empty.clip_pooled"] = (t.clone().contiguous() for t in cache.empty_text)
    meta = {"format": _FORMAT, "captions": json.dumps([s.caption for s in cache.samples]),
            "repeats": json.dumps(cache.repeats), "key": cache.key}
    save_atomic(tensors, path, meta)


def read_cache(path: str) -> TrainingCache:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise TrainingInputError(f"{path!r} is not a training cache of this version; delete it to rebuild.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    captions, repeats = json.loads(meta["captions"]), json.loads(meta["repeats"])
    samples = [CachedSample(tensors[f"latent.{i}"], c, tensors.get(f"clip_text.{i}"), tensors.get(f"clip_pooled.{i}"),
                            tensors.get(f"clip_image.{i}")) for i, c in enumerate(captions)]
    empty = None
    if "empty.clip_text" in tensors:
        empty = (tensors["empty.clip_text"], tensors["empty.clip_pooled"])
    return TrainingCache(samples, repeats, empty, meta.get("key", ""))
