"""Stage A decode at release size, batch 4, 1024x1024 (latent 4x4x256x256): untiled vs tiled.

Each mode runs in its own subprocess so peak memory is measured cleanly: after building the network
and the latent, the process resets its peak-RSS counter (Linux ``/proc/self/clear_refs``), decodes,
and reports the peak RSS above the pre-decode level. Outputs are compared for the max abs difference.

Run it under the heavy-job lock:
    flock /tmp/scw-heavy.lock .venv/bin/python bench/bench_tiled_decode.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import cascade_module, status_kib


def worker(mode: str, out_path: str, batch: int, size: int, tile: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(2)
    stage_a_mod, tiling = cascade_module("stage_a"), cascade_module("tiling")
    model = stage_a_mod.StageA(stage_a_mod.StageAConfig())
    # Non-zero gammas, so every block really mixes neighbours (zero gammas would make tiling trivial).
    cascade_module("random_init").randomize_(model, 0, vector_std=0.1, unit_norm_weights=False)
    model.eval().requires_grad_(False)
    z = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(1))
    estimate = tiling.estimate_decode_memory(model.config, z.shape, torch.float32)
    with torch.no_grad():  # warm-up on a small latent: kernels and allocator pools, not measured
        model.decode(z[:1, :, :32, :32])
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "untiled":
            image = model.decode(z)
        elif mode == "tiled":
            image = tiling.decode_tiled(model, z, tile=tile, batch_chunk=1)
        else:  # auto: a budget of a quarter of the untiled estimate
            image = tiling.decode_auto(model, z, memory_budget=estimate // 4)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    np.save(out_path, image.numpy())
    return {"mode": mode, "seconds": seconds, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "increase_mib": (peak - before) / 1024, "estimate_mib": estimate / 2**20,
            "image_mib": image.numel() * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["untiled", "tiled", "auto"])
    parser.add_argument("--out")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="latent side (256 = 1024 px)")
    parser.add_argument("--tile", type=int, default=64, help="tile core in latent pixels")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, args.batch, args.size, args.tile)))
        return
    import numpy as np

    results, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("untiled", "tiled", "auto"):
            out = os.path.join(tmp, f"{mode}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--out", out, "--batch",
                   str(args.batch), "--size", str(args.size), "--tile", str(args.tile)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            images[mode] = np.load(out)
    ref = images["untiled"]
    for r in results:
        r["max_abs_diff"] = float(np.abs(images[r["mode"]] - ref).max())
    base = results[0]["increase_mib"]
    print(f"Stage A decode, latent {args.batch}x4x{args.size}x{args.size} -> "
          f"{args.batch}x3x{4 * args.size}x{4 * args.size}, float32, 2 threads, tile {args.tile}")
    print("| mode | time s | RSS before MiB | peak RSS MiB | peak increase MiB | vs untiled | estimate MiB "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['increase_mib']:.0f} | {r['increase_mib'] / base:.3f} | {r['estimate_mib']:.0f} | "
              f"{r['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()
