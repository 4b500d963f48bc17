"""Where one forward spends its time: matmul-class kernels vs everything else, the pack vs diffusers.

Run (heavy: ~4.5 GB per worker; a few minutes per model on 2 cores):
    flock /tmp/scw-heavy.lock .venv/bin/python bench/bench_breakdown.py [--models b] [--repeats 2]

Every top-level aten op of one forward is timed under a ``TorchDispatchMode`` (CPU ops are synchronous,
so the wall time around an op is its cost) and put in one of four bins: GEMM (mm, addmm, bmm and their
in-place forms), convolution, attention (the fused SDPA kernel) and other (norms, activations, copies,
reshapes, allocation). Same seeded weights and inputs as ``bench_forward.py``, one fresh process per
(implementation, model), best forward of ``--repeats``.

Why: the GEMM + convolution + attention time is a floor for any implementation that runs the same products
with the same kernels. ``diffusers total / pack floor`` is the largest speed-up a rewrite can reach on this
machine without changing the arithmetic; the report prints it next to the speed-up the pack reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import bench_forward  # same builds, weights and inputs as the timing benchmark
import torch
from torch.utils._python_dispatch import TorchDispatchMode

BINS = ("gemm", "conv", "attention", "other")
# Under inference mode the mode sees ops before their composite decomposition (linear, conv2d, SDPA).
_GEMM = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "matmul", "addmv", "addmv_", "mv", "linear"}


def _bin(func: Any) -> str:
    name = func.__name__.split(".")[0]
    if name in _GEMM:
        return "gemm"
    if "conv" in name:
        return "conv"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "other"


class OpTimer(TorchDispatchMode):
    """Adds the wall time of every top-level aten op to its bin (nested calls run outside the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = _bin(func)
        self.seconds[key] += time.perf_counter() - t0
        self.calls[key] += 1
        return out


def worker(impl: str, model: str, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    run, _ = bench_forward.build(impl, model)
    best: dict[str, Any] | None = None
    with torch.inference_mode():
        run()  # warm-up: first-call allocations and kernel selection are not part of the steady state
        for _ in range(repeats):
            timer = OpTimer()
            t0 = time.perf_counter()
            with timer:
                run()
            total = time.perf_counter() - t0
            if best is None or total < best["total"]:
                best = dict(total=total, seconds=dict(timer.seconds), calls=dict(timer.calls))
        t0 = time.perf_counter()
        run()
        best["plain"] = time.perf_counter() - t0  # the same forward without the mode, for its overhead
    print("RESULT " + json.dumps(best))


def spawn(impl: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model", model,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}/{model} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["pack", "diffusers"])
    parser.add_argument("--model", choices=["c", "b", "a"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.repeats, args.threads)
        return
    names = bench_forward.MODELS
    print(f"# bench_breakdown  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"threads {args.threads}  loadavg(1m) at start {os.getloadavg()[0]:.2f}")
    print(f"{'model':32} {'impl':9} {'timed s':>7} {'plain s':>7} " + " ".join(f"{b + ' s':>11}" for b in BINS))
    for model in args.models.split(","):
        res = {impl: spawn(impl, model, args) for impl in ("diffusers", "pack")}
        for impl, r in res.items():
            cells = " ".join(f"{r['seconds'].get(b, 0.0):6.2f} ({r['calls'].get(b, 0):4d})" for b in BINS)
            print(f"{names[model]:32} {impl:9} {r['total']:7.2f} {r['plain']:7.2f} {cells}")
        floor = sum(res["pack"]["seconds"].get(b, 0.0) for b in BINS if b != "other")
        d_total, p_total = res["diffusers"]["total"], res["pack"]["total"]
        print(f"{'':32} pack floor (gemm+conv+attention) {floor:.2f} s; x faster reached {d_total / p_total:.2f}, "
              f"at the floor {d_total / floor:.2f}")
    print(f"loadavg(1m) at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
