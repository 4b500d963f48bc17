"""The standalone command line:

    python headless.py WORKFLOW.json [--models DIR] [--out PNG] [--seed N] [--vram 6G] [--comfyui PATH] [-v]

(``headless.py`` at the repo root loads the pack as a package and calls ``main``; with ``--comfyui PATH`` or env
COMFYUI_PATH it first puts that ComfyUI checkout on the path, so the pack runs on ComfyUI's backend and every core
and custom node of the checkout runs through ComfyUI's own executor, ``comfy_runtime``; without one, the core
stand-ins of ``core_standins`` run.)

Exit codes; every failure is one error line (or a list of problems) on stderr, never a traceback - ``-v``
adds the traceback at debug level:

- 0: the workflow ran (a warning says so when it saved no image, or ran tiny random demo networks).
- 2: the workflow cannot run as given, and the message says what to change: the file is missing, empty,
  truncated or malformed (every structural problem listed with the file name, node id and field), a widget
  value is out of range or not finite, a model file is missing or refused (pickles are never unpickled), or a
  node refused its input (the pack's own checks: wrong latent, NaN values, wrong weights file...), named by
  node id and title.
- 1: something the pack did not expect failed (an exception that is not one of its checks: a bug, out of
  memory, a broken install), named by node id and title; run again with ``-v`` for the traceback.
- 130: sampling was interrupted (Ctrl-C, or the ``SCW_INTERRUPT`` flag file).

Under ``torchrun`` every rank runs the whole workflow (the trainer joins the ranks' process group); rank 0 alone
writes the images: the other ranks' go to a temporary folder that is removed when they finish (the pack's own save
nodes write on rank 0 only anyway).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

from .. import host
from ..cascade.errors import CascadeError
from ..host.builtin import parse_bytes
from .executor import NodeError, WorkflowError, run_workflow

log = logging.getLogger("comfyui_stablecascade.standalone")

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None, comfyui: str | None = None) -> int:
    """The command line; ``comfyui`` is the default of ``--comfyui`` (headless.py passes env COMFYUI_PATH)."""
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow with ComfyUI-StableCascade, no ComfyUI.")
    parser.add_argument("workflow", help="workflow JSON (ComfyUI UI format or API prompt)")
    parser.add_argument("--models", help="ComfyUI-style models folder (default: env SCW_MODELS_DIR; with none, the "
                                         "loaders run tiny random demo networks)")
    parser.add_argument("--out", help="PNG path for the image (a batch adds _00001, _00002... after the first)")
    parser.add_argument("--output-dir", default="output", help="folder for images when --out is not given")
    parser.add_argument("--input-dir", help="images for LoadImage (default: the 'inputs' folder beside the "
                                            "workflow, else ./input)")
    parser.add_argument("--seed", type=int, help="override every seed widget of the workflow")
    parser.add_argument("--vram", help="memory budget of the compute device, e.g. 6G or 7.5G (default: env "
                                       "SCW_MEMORY_BUDGET, else 90%% of the GPU); Stage C/B that do not fit are "
                                       "streamed block by block from the CPU")
    parser.add_argument("--comfyui", default=comfyui, metavar="PATH",
                        help="a ComfyUI checkout (default: env COMFYUI_PATH): run every core and custom node it has "
                             "through ComfyUI itself, with its memory manager; run with ComfyUI's Python. Without it, "
                             "stand-ins run the core nodes used with Stable Cascade (docs/CORE_INTEROP.md)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (with tracebacks)")
    args = parser.parse_args(argv)
    level, fmt = logging.DEBUG if args.verbose else logging.INFO, "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt, datefmt="%H:%M:%S")
    if args.comfyui:  # ComfyUI's import-time warnings (logging.warning) set up the root logger before basicConfig
        logging.getLogger().setLevel(level)
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    if args.vram is not None:
        try:
            budget = parse_bytes(args.vram, "--vram")
        except CascadeError as exc:
            log.error("ComfyUI-StableCascade: %s", exc)
            return EXIT_BAD_INPUT
        if budget <= 0:
            log.error("ComfyUI-StableCascade: --vram %s is not a positive size; give e.g. --vram 6G", args.vram)
            return EXIT_BAD_INPUT
        host.set_memory_budget(budget)
        if args.comfyui:
            log.warning("ComfyUI-StableCascade: --vram sets the built-in memory manager's budget; with --comfyui, "
                        "ComfyUI's manager decides (it loads what does not fit partially)")
    if args.models and not os.path.isdir(args.models):
        log.error("ComfyUI-StableCascade: --models %s is not a folder; give ComfyUI's models folder (the one holding "
                  "diffusion_models/, vae/, text_encoders/...)", args.models)
        return EXIT_BAD_INPUT
    if not args.models and not os.environ.get("SCW_MODELS_DIR"):
        log.warning("ComfyUI-StableCascade: no models folder given (--models DIR or env SCW_MODELS_DIR), so every "
                    "loader runs its tiny random demo network.")
    worker_dir = _worker_output_dir()
    if worker_dir is not None:
        args.out = os.path.join(worker_dir, os.path.basename(args.out)) if args.out else None
        args.output_dir = worker_dir
    try:
        paths = run_workflow(args.workflow, out=args.out, output_dir=args.output_dir, seed=args.seed,
                             models=args.models, input_dir=args.input_dir, comfyui=args.comfyui)
    except (WorkflowError, CascadeError) as exc:
        log.error("ComfyUI-StableCascade: %s", exc)
        log.debug("ComfyUI-StableCascade: traceback", exc_info=True)
        return EXIT_BAD_INPUT
    except NodeError as exc:
        log.error("ComfyUI-StableCascade: %s", exc)
        # The executor logged the node's traceback at debug level already.
        if exc.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_BAD_INPUT if exc.bad_input else EXIT_UNEXPECTED
    except KeyboardInterrupt:
        log.error("ComfyUI-StableCascade: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the runner itself failed: still one line, the traceback only with -v
        log.error("ComfyUI-StableCascade: the runner failed with an unexpected %s: %s - run again with -v for the "
                  "traceback (and report it)", type(exc).__name__, exc)
        log.debug("ComfyUI-StableCascade: traceback", exc_info=True)
        return EXIT_UNEXPECTED
    finally:
        if worker_dir is not None:
            shutil.rmtree(worker_dir, ignore_errors=True)
    if not paths and worker_dir is None:  # a worker rank's images were temporary
        log.warning("ComfyUI-StableCascade: the workflow ran but saved no image")
    return EXIT_OK


def _worker_output_dir() -> str | None:
    """A temporary output folder on a torchrun rank other than 0 (None everywhere else): core SaveImage / PreviewImage
    would otherwise write every image once per rank."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or rank == 0:
        return None
    log.info("ComfyUI-StableCascade: torchrun rank %d of %d: rank 0 writes the images.", rank, world)
    return tempfile.mkdtemp(prefix=f"scw_rank{rank}_")
