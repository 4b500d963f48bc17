"""Peak memory of cascade.loading against the file size: the loader must hold one copy, not two.

Writes a mid-size random Stage C (default ~250M parameters) in the original, ComfyUI-packaged and
diffusers layouts, then loads each in a fresh process and reports the peak resident memory above the
post-import baseline, as a multiple of the tensor bytes loaded: total RSS (which counts the file's pages
that safetensors maps) and private (anonymous) memory, which is what a second copy would add to.

Result on the dev box (241M-param bf16 Stage C, 0.45 GiB): peak RSS +1.33x in every layout; private memory
+0.00x for original and packaged files (tensors stay backed by the mapped file), +0.21x for diffusers
(the concatenated q|k|v projections are new tensors).

Run (heavy: ~3 GB of RAM and disk under /tmp): ``flock /tmp/scw-heavy.lock .venv/bin/python bench/loading_memory.py``
Options: ``--width 1024 --depth 6`` (Stage C size), ``--keep`` (leave the files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import torch
from benchlib import ROOT, cascade_module, status_kib


class _AnonPeak:
    """Samples RssAnon (private memory; file pages mapped by safetensors are page cache, not copies)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            self._stop.wait(0.002)

    def __enter__(self) -> "_AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write(folder: str, width: int, depth: int) -> dict:
    from safetensors.torch import save_file

    stage_c = cascade_module("stage_c")
    StageC, StageCConfig = stage_c.StageC, stage_c.StageCConfig

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny_checkpoints as tc

    cfg = StageCConfig(c_cond=width, c_hidden=(width, width), nhead=(width // 64,) * 2,
                       blocks=((depth // 3, depth), (depth, depth // 3)))
    shapes = StageC(cfg, device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in shapes.items()}
    files = {
        "original": os.path.join(folder, "stage_c_bf16.safetensors"),
        "packaged": os.path.join(folder, "stable_cascade_stage_c.safetensors"),
        "diffusers": os.path.join(folder, "prior", "diffusion_pytorch_model.safetensors"),
    }
    os.makedirs(os.path.dirname(files["diffusers"]))
    save_file(sd, files["original"])
    save_file(tc.with_prefix(sd, "model.diffusion_model."), files["packaged"])
    save_file(tc.diffusers_unet(sd), files["diffusers"])
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    return {"files": files, "tensor_bytes": nbytes, "params": sum(v.numel() for v in sd.values())}


def measure(path: str) -> None:
    """Child process: print JSON with baseline and peak RSS around one load_stage_c call."""
    loading = cascade_module("loading")

    torch.set_num_threads(2)
    base, base_anon = status_kib("VmRSS"), status_kib("RssAnon")
    with _AnonPeak() as anon:
        model = loading.load_stage_c(path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base_kb": base, "peak_kb": peak, "anon_base_kb": base_anon, "anon_peak_kb": anon.peak,
                      "held_bytes": held}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    torch.set_num_threads(2)
    folder = tempfile.mkdtemp(prefix="scw_loading_mem_")
    try:
        info = write(folder, args.width, args.depth)
        gb = info["tensor_bytes"] / 2**30
        print(f"Stage C width {args.width}, {info['params'] / 1e6:.0f}M params, {gb:.2f} GiB of bf16 tensors")
        print("layout     peak RSS above baseline (x tensors)   peak private memory (x tensors)   held after load")
        for layout, path in info["files"].items():
            out = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rss = (r["peak_kb"] - r["base_kb"]) * 1024
            anon = (r["anon_peak_kb"] - r["anon_base_kb"]) * 1024
            t = info["tensor_bytes"]
            print(f"{layout:10s} {rss / 2**30:8.2f} GiB ({rss / t:.2f}x)          {anon / 2**30:8.2f} GiB "
                  f"({anon / t:.2f}x)             {r['held_bytes'] / 2**30:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
