"""Per-block CPU time of the pack's ResBlock / AttnBlock vs diffusers' at the lite models' real widths.

Run: ``.venv/bin/python bench/bench_blocks.py [--threads 1]`` (~1 GB, about a minute of CPU).

With one thread the timer is the thread's CPU time (``time.thread_time``), which other processes on a busy
machine barely disturb; wall-clock forwards on a shared 2-core machine do not compare well. The weighted
total multiplies each block by how often one forward runs it (Stage B lite at 256x256, Stage C lite at
24x24 batch 2); embedding, down/up-scalers, repeat mappers and timestep blocks are left out.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch
from benchlib import cascade_module

# name, batch, height, width, channels, c_cond, cond tokens, ResBlock calls, AttnBlock calls per forward
CASES = [
    ("Stage B lite level 0 (128x128)", 1, 128, 128, 320, 1280, 4, 6, 0),
    ("Stage B lite level 1 (64x64)", 1, 64, 64, 576, 1280, 4, 12, 0),
    ("Stage B lite level 2 (32x32)", 1, 32, 32, 1152, 1280, 4, 42, 42),
    ("Stage B lite level 3 (16x16)", 1, 16, 16, 1152, 1280, 4, 12, 12),
    ("Stage C lite (2x24x24)", 2, 24, 24, 1536, 1536, 85, 32, 32),
]


def _best_ms(fn: Callable[[], Any], clock: Callable[[], float], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best * 1e3


def _attn_keys_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if "in_proj" in key:
            suffix = "weight" if key.endswith("weight") else "bias"
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"attention.{name}.{suffix}"] = part
        else:
            out[key.replace("attention.attn.out_proj", "attention.to_out.0")] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    common = cascade_module("common")
    from diffusers.models.unets import unet_stable_cascade as D

    print(f"# bench_blocks  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  threads {args.threads}  "
          f"clock {'thread CPU time' if args.threads == 1 else 'wall'}  loadavg(1m) {os.getloadavg()[0]:.2f}")
    print(f"{'block':34} {'kind':5} {'pack ms':>8} {'diffusers ms':>12} {'x faster':>8} {'max diff':>9}")
    total: dict[str, dict[str, float]] = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, bsz, h, w, c, c_cond, n_cond, n_res, n_attn in CASES:
            x = torch.randn(bsz, c, h, w, generator=g)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            rows = []
            ours = common.ResBlock(c).eval()
            for p in ours.parameters():
                p.normal_(0, 0.02, generator=g)
            theirs = D.SDCascadeResBlock(c).eval()
            theirs.load_state_dict(ours.state_dict())
            ws = common.Workspace()
            rows.append(("res", n_res, lambda: ours(x_cl, None, ws), lambda: theirs(x)))
            if n_attn:
                ours_a = common.AttnBlock(c, c_cond, c // 64).eval()
                for p in ours_a.parameters():
                    p.normal_(0, 0.02, generator=g)
                theirs_a = D.SDCascadeAttnBlock(c, c_cond, c // 64).eval()
                theirs_a.load_state_dict(_attn_keys_to_diffusers(ours_a.state_dict()))
                kv = torch.randn(bsz, n_cond, c_cond, generator=g)
                rows.append(("attn", n_attn, lambda: ours_a(x_cl, kv), lambda: theirs_a(x, kv)))
            for kind, count, run_ours, run_theirs in rows:
                diff = (run_ours() - run_theirs()).abs().max().item()
                t_ours = _best_ms(run_ours, clock, args.repeats)
                t_theirs = _best_ms(run_theirs, clock, args.repeats)
                model = total.setdefault(name.split(" level")[0].split(" (")[0], {"pack": 0.0, "diffusers": 0.0})
                model["pack"] += t_ours * count
                model["diffusers"] += t_theirs * count
                print(f"{name:34} {kind:5} {t_ours:8.1f} {t_theirs:12.1f} {t_theirs / t_ours:8.2f} {diff:9.1e}",
                      flush=True)
    for model, t in total.items():
        print(f"{model}: ResBlocks + AttnBlocks of one forward: pack {t['pack'] / 1e3:.1f} s, diffusers "
              f"{t['diffusers'] / 1e3:.1f} s (x{t['diffusers'] / t['pack']:.2f} faster)")
    print(f"loadavg(1m) at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
