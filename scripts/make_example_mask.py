"""Draw the inpainting example (workflows/inputs/scw_example_mask.png): the example image with a painted mask.

    python scripts/make_example_mask.py [--out PATH]

The RGB is scripts/make_example_image.py's image; the alpha channel is 0 where the inpainting workflow
regenerates (ComfyUI's LoadImage gives MASK = 1 - alpha, exactly what its mask editor saves): an ellipse
around the blue egg in the meadow, so the prompt can put something else there. Deterministic.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "workflows", "inputs", "scw_example_mask.png")
MASKED = (0.78, 0.60, 0.99, 0.97)  # the region to regenerate, as fractions of width / height


def make_image() -> Image.Image:
    spec = importlib.util.spec_from_file_location("make_example_image", os.path.join(HERE, "make_example_image.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rgb = module.make_image()
    w, h = rgb.size
    alpha = Image.new("L", rgb.size, 255)
    ImageDraw.Draw(alpha).ellipse([MASKED[0] * w, MASKED[1] * h, MASKED[2] * w, MASKED[3] * h], fill=0)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    make_image().save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
