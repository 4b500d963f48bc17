"""A training dataset: a folder of images with same-name ``.txt`` captions, in multi-aspect buckets.

- Images: ``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp`` in the folder and in kohya-style ``N_name``
  subfolders (every image there counts N times). Other subfolders and hidden ones (the cache) are not read.
- Captions: ``<image stem>.txt`` beside the image, UTF-8 (a BOM is accepted). Without one, the caption is
  ``default_caption`` (e.g. ``"a photo of [fernando]"``), else the kohya folder's name part.
- Buckets: the official Bucketeer's ratios (1/1, 1/2, 1/3, 2/3, 3/4, 1/5, 2/5, 3/5, 4/5, 1/6, 5/6, 9/16 and the
  inverses, SPEC §14) at ``area**2`` pixels, sides multiples of ``factor`` (32, the EffNet's stride: 768 -> a
  24 x 24 Stage C latent). Each image goes to the bucket nearest its aspect and is resized to cover it, then
  center-cropped (deterministic, so the cache stays valid).
- Unreadable images and images with a side below ``min_side`` are skipped and named (``Dataset.skipped``); a
  caption that is not UTF-8 stops with the file's name, since training on a garbled caption is silently wrong.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import TrainingInputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_RATIOS = (1 / 1, 1 / 2, 1 / 3, 2 / 3, 3 / 4, 1 / 5, 2 / 5, 3 / 5, 4 / 5, 1 / 6, 5 / 6, 9 / 16)
_KOHYA = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Sample:
    """One image: its path, caption, how often it counts per epoch, and its bucket (height, width) in pixels."""

    path: str
    caption: str
    repeats: int
    bucket: tuple[int, int]


@dataclass
class Dataset:
    """What ``scan_folder`` found. ``skipped`` holds (path, why) of every file left out."""

    folder: str
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    area: int = 768
    trigger: str = ""

    def __len__(self) -> int:
        return sum(s.repeats for s in self.samples)


def buckets(area: int = 768, factor: int = 32) -> list[tuple[int, int]]:
    """The (height, width) buckets of ``area**2`` pixels, sides multiples of ``factor``, one per official ratio."""
    out = []
    for ratio in sorted(set(_RATIOS) | {1 / r for r in _RATIOS}):  # ratio = height / width
        h = max(factor, round(area * math.sqrt(ratio) / factor) * factor)
        w = max(factor, round(area / math.sqrt(ratio) / factor) * factor)
        if (h, w) not in out:
            out.append((h, w))
    return out


def bucket_for(height: int, width: int, area: int = 768, factor: int = 32) -> tuple[int, int]:
    """The bucket whose aspect is nearest (in log ratio) to an image of ``height`` x ``width``."""
    aspect = math.log(height / width)
    return min(buckets(area, factor), key=lambda hw: abs(math.log(hw[0] / hw[1]) - aspect))


def _check_sizes(area: int, factor: int, min_side: int) -> None:
    for name, value in (("area", area), ("factor", factor), ("min_side", min_side)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainingInputError(f"dataset {name}={value!r}; expected a positive whole number of pixels "
                                     "(official: area 768, factor 32).")
    if area < factor or area % factor:
        raise TrainingInputError(f"dataset area={area} is not a multiple of the bucket factor {factor}; pick e.g. "
                                 f"{max(factor, round(area / factor) * factor)} (official 768 -> 24x24 latents).")


def read_caption(path: str) -> str:
    """The caption file's text, stripped; a file that is not UTF-8 raises an error naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise TrainingInputError(
            f"caption file {path!r} is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
            "save it as UTF-8 (any editor's 'Save with encoding' does it) or delete it to use the default caption."
        ) from None
    except OSError as exc:
        raise TrainingInputError(f"caption file {path!r} cannot be read ({exc.strerror}); check its "
                                 "permissions or delete it to use the default caption.") from None


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of a readable image; raises OSError / ValueError for a damaged one."""
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # reads the whole file structure: a truncated PNG fails here, not during caching
    with Image.open(path) as img:
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
        return img.height, img.width


def _images_in(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
                and not f.startswith(".")]
    return out


def scan_folder(folder: str, default_caption: str = "", area: int = 768, factor: int = 32,
                min_side: int = 256) -> Dataset:
    """Read a dataset folder (see the module docstring). Raises ``TrainingInputError`` when nothing usable is in it."""
    _check_sizes(area, factor, min_side)
    folder = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isdir(folder):
        raise TrainingInputError(f"dataset folder {folder!r} does not exist; give a folder of images with .txt "
                                 "captions (e.g. a subfolder of ComfyUI's input/).")
    groups: list[tuple[str, int, str]] = []  # (path, repeats, kohya name)
    skipped: list[tuple[str, str]] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("."):
            continue
        if os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS):
            groups.append((path, 1, ""))
        elif os.path.isdir(path):
            m = _KOHYA.match(name)
            if m is None:
                log.info("ComfyUI-StableCascade: dataset subfolder %r is not a kohya 'N_name' folder; not read.", path)
                continue
            repeats = int(m.group(1))
            if repeats < 1:
                skipped.append((path, "repeat count 0 in the folder name (kohya 'N_name': N >= 1)"))
                continue
            groups += [(p, repeats, m.group(2).strip()) for p in _images_in(path)]
    samples: list[Sample] = []
    for path, repeats, kohya_name in groups:
        try:
            height, width = _image_size(path)
        except Exception as exc:  # PIL raises many types for damaged files; each is a skip, never fatal
            skipped.append((path, f"not a readable image ({type(exc).__name__}: {exc})"))
            continue
        if min(height, width) < min_side:
            skipped.append((path, f"{width}x{height} pixels, smaller than min_side={min_side} (the EffNet sees "
                                  f"{area}x{area}-pixel buckets; upscale it or lower min_side)"))
            continue
        stem = os.path.splitext(path)[0]
        caption_path = stem + ".txt"
        if os.path.isfile(caption_path):
            caption = read_caption(caption_path)
        else:
            caption = default_caption or kohya_name
        samples.append(Sample(path, caption, repeats, bucket_for(height, width, area, factor)))
    for path, why in skipped:
        log.warning("ComfyUI-StableCascade: dataset: skipped %s: %s", path, why)
    if not samples:
        found = f"; skipped: {'; '.join(f'{os.path.basename(p)} ({w})' for p, w in skipped[:5])}" if skipped else ""
        raise TrainingInputError(
            f"dataset folder {folder!r} holds no usable images ({', '.join(IMAGE_EXTENSIONS)} at least {min_side} "
            f"pixels a side, in the folder or in kohya 'N_name' subfolders){found} - add images, or point to the "
            "folder that holds them.")
    uncaptioned = sum(1 for s in samples if not s.caption)
    if uncaptioned:
        log.warning("ComfyUI-StableCascade: dataset: %d images have no caption (no .txt, no default caption); "
                    "they train unconditionally.", uncaptioned)
    return Dataset(folder, samples, skipped, area, default_caption)


def load_pixels(sample: Sample) -> torch.Tensor:
    """The sample's image as (3, H, W) float32 in [0, 1], resized to cover its bucket and center-cropped."""
    from PIL import Image, ImageOps

    bh, bw = sample.bucket
    try:
        with Image.open(sample.path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:
        raise TrainingInputError(f"image {sample.path!r} cannot be read any more ({type(exc).__name__}: {exc}); "
                                 "it changed since the folder was scanned - scan the dataset again.") from None
    scale = max(bh / img.height, bw / img.width)
    size = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(bh, bw, 3)
    return data.permute(2, 0, 1).to(torch.float32).div_(255.0)
