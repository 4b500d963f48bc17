"""The standalone command line:

    python headless.py WORKFLOW.json [--models DIR] [--out PNG] [--seed N] [-v]

(``headless.py`` at the repo root only loads the pack as a package and calls ``main``.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..cascade.errors import CascadeError
from .executor import WorkflowError, run_workflow

log = logging.getLogger("comfyui_stablecascade.standalone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow with ComfyUI-StableCascade, no ComfyUI.")
    parser.add_argument("workflow", help="workflow JSON (ComfyUI UI format or API prompt)")
    parser.add_argument("--models", help="ComfyUI-style models folder (default: env SCW_MODELS_DIR; with none, the "
                                         "loaders run tiny random demo networks)")
    parser.add_argument("--out", help="PNG path for the image (a batch adds _00001, _00002... after the first)")
    parser.add_argument("--output-dir", default="output", help="folder for images when --out is not given")
    parser.add_argument("--input-dir", help="images for LoadImage (default: the 'inputs' folder beside the "
                                            "workflow, else ./input)")
    parser.add_argument("--seed", type=int, help="override every seed widget of the workflow")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.models and not os.path.isdir(args.models):
        log.error("ComfyUI-StableCascade: --models %s is not a folder; give ComfyUI's models folder (the one holding "
                  "diffusion_models/, vae/, text_encoders/...)", args.models)
        return 2
    if not args.models and not os.environ.get("SCW_MODELS_DIR"):
        log.warning("ComfyUI-StableCascade: no models folder given (--models DIR or env SCW_MODELS_DIR), so every "
                    "loader runs its tiny random demo network.")
    try:
        paths = run_workflow(args.workflow, out=args.out, output_dir=args.output_dir, seed=args.seed,
                             models=args.models, input_dir=args.input_dir)
    except (WorkflowError, CascadeError, FileNotFoundError, json.JSONDecodeError) as exc:
        log.error("ComfyUI-StableCascade: %s", exc)
        return 2
    if not paths:
        log.warning("ComfyUI-StableCascade: the workflow ran but saved no image")
    return 0
