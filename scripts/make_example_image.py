"""Draw the example input image of the image workflows (workflows/inputs/scw_example.png).

    python scripts/make_example_image.py [--out PATH] [--width 512] [--height 384]

Everything is drawn here from shapes and gradients (no photo, no third-party content), deterministically,
so the file can be re-made bit for bit. 512 x 384 keeps the headless runs fast and exercises a non-square
size; both sides are multiples of 32, so Stage A, Stage B and the official 3/4 reconstruction rule all
accept it unchanged.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "workflows", "inputs", "scw_example.png")


def background(width: int, height: int) -> np.ndarray:
    """A sky-to-ground vertical gradient with a soft horizontal sweep, H x W x 3 uint8."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    sky_top, sky_low = np.array([40, 90, 170]), np.array([250, 200, 150])
    ground_top, ground_low = np.array([70, 130, 60]), np.array([30, 70, 35])
    horizon = 0.62
    sky = sky_top + (sky_low - sky_top) * (y / horizon)
    ground = ground_top + (ground_low - ground_top) * ((y - horizon) / (1 - horizon))
    img = np.where(y < horizon, sky, ground) + 18.0 * np.sin(2 * np.pi * x)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_shapes(img: Image.Image) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)
    d.ellipse([0.68 * w, 0.08 * h, 0.86 * w, 0.32 * h], fill=(255, 226, 120), outline=(255, 170, 60), width=4)
    d.polygon([(0.05 * w, 0.62 * h), (0.25 * w, 0.22 * h), (0.45 * w, 0.62 * h)], fill=(110, 100, 120))
    d.polygon([(0.18 * w, 0.35 * h), (0.25 * w, 0.22 * h), (0.32 * w, 0.35 * h)], fill=(240, 240, 250))
    d.rectangle([0.55 * w, 0.45 * h, 0.75 * w, 0.75 * h], fill=(180, 60, 50), outline=(60, 20, 20), width=3)
    d.polygon([(0.52 * w, 0.45 * h), (0.65 * w, 0.33 * h), (0.78 * w, 0.45 * h)], fill=(90, 50, 40))
    d.rectangle([0.62 * w, 0.60 * h, 0.68 * w, 0.75 * h], fill=(70, 45, 30))
    for i in range(6):  # a fence of thin posts: fine detail for the reconstruction metrics
        x0 = 0.08 * w + i * 0.05 * w
        d.rectangle([x0, 0.70 * h, x0 + 0.012 * w, 0.86 * h], fill=(235, 225, 205))
    d.line([(0.07 * w, 0.74 * h), (0.36 * w, 0.74 * h)], fill=(235, 225, 205), width=3)
    d.ellipse([0.82 * w, 0.66 * h, 0.96 * w, 0.92 * h], fill=(40, 120, 200), outline=(250, 250, 250), width=2)


def make_image(width: int = 512, height: int = 384) -> Image.Image:
    img = Image.fromarray(background(width, height), "RGB")
    draw_shapes(img)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    make_image(args.width, args.height).save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
