"""Convert Stable Cascade Stage C / Stage B weights to GGUF or fp8 safetensors (docs/QUANTIZED.md).

    python scripts/convert_weights.py stage_c_bf16.safetensors stage_c_Q4_K.gguf --type Q4_K
    python scripts/convert_weights.py stage_b_lite_bf16.safetensors stage_b_lite_fp8.safetensors --type fp8_e4m3fn

The input is anything the pack's loaders read (original, ComfyUI, diffusers layouts, shards, folders, a packaged
checkpoint with --kind, even another GGUF or fp8 file); the output holds original-layout keys. The pack is
loaded the way headless.py loads it (as the package ``comfyui_stablecascade``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

PACKAGE = "comfyui_stablecascade"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pack() -> None:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules[PACKAGE] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    _pack()
    from comfyui_stablecascade.cascade import loading
    from comfyui_stablecascade.cascade.errors import CascadeError
    from comfyui_stablecascade.cascade.quant import convert, fp8, policy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="weights file, shard index or folder of a Stage C or Stage B")
    p.add_argument("output", help="the .gguf or .safetensors file to write")
    p.add_argument("--type", required=True, choices=[*convert.GGUF_TYPES, *fp8.FORMATS],
                   help="GGUF type of the large matrices (Q8_0 ... F16) or an fp8 format")
    p.add_argument("--kind", choices=("stage_c", "stage_b"), help="which network (default: detected from the keys)")
    p.add_argument("--threshold", type=int, default=policy.THRESHOLD,
                   help=f"tensors with at most this many values stay dense (default {policy.THRESHOLD})")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    log = logging.getLogger("convert_weights")
    try:
        kind = args.kind or loading.detect(args.source).kind
        if kind not in ("stage_c", "stage_b"):
            raise CascadeError(f"{args.source} holds {kind}; this converter writes Stage C and Stage B (pass --kind "
                               "for a packaged checkpoint)")
        model = loading.load(kind, args.source)
        sd = model.state_dict()
        if args.type in fp8.FORMATS:
            convert.write_fp8(args.output, sd, kind, args.type, args.threshold)
        else:
            dense = next((t.dtype for k, t in sd.items() if t.is_floating_point() and t.dim() >= 2), None)
            import torch

            convert.write_gguf(args.output, sd, kind, args.type, args.threshold, dense or torch.bfloat16)
    except CascadeError as e:
        log.error("convert_weights: %s", e)
        return 2
    log.info("wrote %s (%.1f MB)", args.output, os.path.getsize(args.output) / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
