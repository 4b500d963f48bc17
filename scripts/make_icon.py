#!/usr/bin/env python3
"""Draws docs/images/icon.png, the pack's icon for the Comfy Registry ([tool.comfy] Icon): three stages falling
into each other (C, B, A: a small latent growing into an image), on a dark blue square. 400 x 400, deterministic.

    python scripts/make_icon.py [OUT.png]
"""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw, ImageFont

SIZE = 400
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "Arial Bold.ttf", "LiberationSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def draw() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    for y in range(SIZE):  # vertical gradient, night blue to teal
        t = y / (SIZE - 1)
        row = (int(18 + 10 * t), int(28 + 70 * t), int(64 + 60 * t))
        for x in range(SIZE):
            px[x, y] = row
    d = ImageDraw.Draw(img)
    # Stage C (small latent), Stage B (larger), Stage A (the image): a cascade from top left to bottom right.
    stages = [((46, 44, 146, 144), (250, 204, 21), "C"), ((118, 118, 258, 258), (249, 115, 22), "B"),
              ((196, 196, 356, 356), (236, 72, 153), "A")]
    for (x0, y0, x1, y1), colour, letter in stages:
        d.rounded_rectangle((x0 + 6, y0 + 8, x1 + 6, y1 + 8), radius=18, fill=(8, 12, 30))  # shadow
        d.rounded_rectangle((x0, y0, x1, y1), radius=18, fill=colour, outline=(255, 255, 255), width=4)
        font = _font(int((y1 - y0) * 0.55))
        w = d.textlength(letter, font=font)
        d.text(((x0 + x1 - w) / 2, y0 + (y1 - y0) * 0.18), letter, font=font, fill=(20, 20, 40))
    return img


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "images", "icon.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    draw().save(out, optimize=True)
    print(f"wrote {out} ({SIZE}x{SIZE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
