"""Draw the small LoRA training set of workflows/train_lora.json (workflows/inputs/train_dataset/).

    python scripts/make_train_dataset.py [--out DIR]

Six images drawn here from shapes and gradients (no photo, no third-party content), deterministically, so the
folder can be re-made bit for bit. They show one made-up subject, a round "wurst" character, in several colours
and places, which the demo workflow learns as the new token ``[wurst]``:

- four 256 x 256 images with same-name ``.txt`` captions that use the token;
- one 384 x 256 image (another aspect ratio, so the dataset has two buckets) whose caption file is missing on
  purpose: the dataset node's default caption stands in for it;
- a kohya-style ``2_closeup/`` subfolder with one image, repeated twice per epoch.

256 pixels is the smallest side the dataset node accepts (the EffNet's 32-pixel factor times 8), which keeps
the headless run fast; the whole folder is about 20 KB.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "workflows", "inputs", "train_dataset")
TOKEN = "[wurst]"

# name, size (w, h), background (top, bottom), body colour, caption (None: no .txt file)
IMAGES = (
    ("wurst_red", (256, 256), ((90, 150, 220), (230, 240, 250)), (200, 60, 50),
     f"a photo of {TOKEN}, a red round character on a blue sky"),
    ("wurst_green", (256, 256), ((240, 200, 120), (250, 240, 220)), (60, 160, 70),
     f"a photo of {TOKEN}, a green round character in the desert"),
    ("wurst_blue", (256, 256), ((40, 40, 70), (110, 90, 140)), (70, 120, 230),
     f"a photo of {TOKEN}, a blue round character at night"),
    ("wurst_yellow", (256, 256), ((150, 210, 150), (60, 120, 60)), (240, 210, 60),
     f"a photo of {TOKEN}, a yellow round character on grass"),
    ("wurst_wide", (384, 256), ((200, 220, 240), (120, 140, 170)), (220, 120, 40), None),
)
CLOSEUP = ("2_closeup", "wurst_closeup", (256, 256), ((250, 230, 230), (220, 180, 190)), (190, 50, 110),
           f"a close-up photo of {TOKEN}, a purple round character")


def background(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """A vertical gradient from ``top`` to ``bottom``."""
    w, h = size
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = np.array(top)[None, None] * (1 - t) + np.array(bottom)[None, None] * t
    return Image.fromarray(np.broadcast_to(img, (h, w, 3)).round().astype(np.uint8))


def draw_character(img: Image.Image, body: tuple[int, int, int], scale: float = 0.6) -> None:
    """The subject: a round body with eyes and a smile, centred, ``scale`` of the shorter side."""
    w, h = img.size
    r = scale * min(w, h) / 2
    cx, cy = w / 2, h / 2 + 0.05 * h
    d = ImageDraw.Draw(img)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=body, outline=(30, 20, 20), width=3)
    for side in (-1, 1):
        ex, ey = cx + side * 0.35 * r, cy - 0.25 * r
        d.ellipse([ex - 0.16 * r, ey - 0.16 * r, ex + 0.16 * r, ey + 0.16 * r], fill=(250, 250, 250))
        d.ellipse([ex - 0.07 * r, ey - 0.07 * r, ex + 0.07 * r, ey + 0.07 * r], fill=(20, 20, 20))
    d.arc([cx - 0.45 * r, cy - 0.1 * r, cx + 0.45 * r, cy + 0.5 * r], 20, 160, fill=(30, 20, 20), width=3)


def write(folder: str, name: str, size: tuple[int, int], colours: tuple, body: tuple[int, int, int],
          caption: str | None, scale: float = 0.6) -> None:
    os.makedirs(folder, exist_ok=True)
    img = background(size, *colours)
    draw_character(img, body, scale)
    img.save(os.path.join(folder, name + ".png"), optimize=True)
    if caption is not None:
        with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    args = parser.parse_args()
    for name, size, colours, body, caption in IMAGES:
        write(args.out, name, size, colours, body, caption)
    sub, name, size, colours, body, caption = CLOSEUP
    write(os.path.join(args.out, sub), name, size, colours, body, caption, scale=0.9)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
