"""One forward of Stage C lite, Stage B lite and the Stage A decode: the pack vs diffusers, fp32 on CPU.

Run (heavy: each worker holds up to ~4.5 GB; ~10 minutes on 2 cores):
    flock /tmp/scw-heavy.lock .venv/bin/python bench/bench_forward.py [--models c,b,a] [--repeats 2] [--rounds 1]

Sizes: Stage C lite batch 2 at 24x24 with 77 text tokens; Stage B lite batch 1 at 4x256x256 (effnet 24x24);
Stage A decode batch 1 of a 4x256x256 latent to 3x1024x1024.

Every (implementation, model) pair runs in a fresh subprocess that builds the same seeded random weights
(identical in both processes), so neither inherits the other's heap. Peak memory: the worker resets the
kernel's RSS high-water mark (``/proc/self/clear_refs``) once the weights and inputs are resident, runs the
forwards, then reads ``VmHWM``; the report gives the weights' size, the growth above the pre-forward RSS
(activations, scratch, allocator slack) and the whole process peak. Time: the first forward and the best
of ``--repeats``. FLOPs are counted once per model on the meta device (``FlopCounterMode``; the pack and
diffusers run the same matmuls) and set against a plain fp32 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from benchlib import BENCH, ROOT, cascade_module, file_module, run_worker, status_kib

MODELS = {
    "c": "Stage C lite fwd (2x16x24x24)",
    "b": "Stage B lite fwd (1x4x256x256)",
    "a": "Stage A decode (1x4x256x256)",
}


def stage_a_available() -> str | None:
    """None when the Stage A row can run, else the reason it is skipped."""
    if not os.path.exists(os.path.join(ROOT, "cascade", "stage_a.py")):
        return "cascade/stage_a.py does not exist"
    if not os.path.exists(os.path.join(BENCH, "parity_stage_a.py")):
        return "bench/parity_stage_a.py (Stage A random weights and diffusers mapping) does not exist"
    try:
        cascade_module("stage_a").StageA
    except Exception as exc:  # the row is optional: report why instead of failing the whole run
        return f"cascade/stage_a.py does not import: {exc!r}"
    return None


def build(impl: str, model: str, device: str = "cpu") -> tuple[Callable[[], torch.Tensor], int]:
    """A zero-argument forward for (impl, model) and the weights' size in bytes.

    ``device="meta"`` builds shapes only (for FLOP counting).
    """
    g = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) if device != "meta" else torch.empty(*shape, device="meta")

    if model == "a":
        pa = file_module("scw_parity_stage_a", os.path.join(BENCH, "parity_stage_a.py"))
        stage_a = cascade_module("stage_a")
        cfg = stage_a.StageAConfig()
        if device == "meta":
            sd = {k: torch.empty_like(v) for k, v in stage_a.StageA(cfg, device="meta").state_dict().items()}
        else:
            sd = pa.random_state_dict(stage_a.StageA(cfg, device="meta"), seed=0)
        net = pa.build_pack(stage_a, cfg, sd) if impl == "pack" else pa.build_diffusers(cfg, sd)
        lat = randn(1, 4, 256, 256)
        if impl == "pack":
            return (lambda: net.decode(lat)), _nbytes(sd)
        return (lambda: net.decode(lat * stage_a.SCALE_FACTOR, return_dict=False)[0]), _nbytes(sd)

    ref = file_module("scw_diffusers_ref", os.path.join(BENCH, "diffusers_ref.py"))
    mod = cascade_module("stage_c" if model == "c" else "stage_b")
    cls, cfg = (mod.StageC, mod.StageCConfig.lite()) if model == "c" else (mod.StageB, mod.StageBConfig.lite())
    skeleton = cls(cfg, device="meta")
    if device == "meta":
        sd = {k: torch.empty_like(v) for k, v in skeleton.state_dict().items()}
    else:
        sd = ref.random_state_dict(skeleton, seed=0)
    if impl == "pack":
        net = cls(cfg, device="meta")
        net.load_state_dict(sd, strict=True, assign=True)
    else:
        net = ref.build_diffusers_unet(cfg, sd)
    if model == "c":
        x, r = randn(2, 16, 24, 24), torch.tensor([0.5, 0.7], device=device)
        txt, pooled, img = randn(2, 77, 1280), randn(2, 1, 1280), randn(2, 1, 768)
        if impl == "pack":
            return (lambda: net(x, r, txt, pooled, img)), _nbytes(sd)
        return (lambda: net(x, r, pooled, clip_text=txt, clip_img=img).sample), _nbytes(sd)
    x, r = randn(1, 4, 256, 256), torch.tensor([0.5], device=device)
    eff, clip = randn(1, 16, 24, 24), randn(1, 1, 1280)
    if impl == "pack":
        return (lambda: net(x, r, eff, clip)), _nbytes(sd)
    return (lambda: net(x, r, clip, effnet=eff).sample), _nbytes(sd)


def _nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def worker(impl: str, model: str, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    run, weight_bytes = build(impl, model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base_kib = status_kib("VmRSS")
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
            checksum = out.double().abs().mean().item()
            del out
    hwm_kib = status_kib("VmHWM")
    print("RESULT " + json.dumps(dict(times=times, base_kib=base_kib, hwm_kib=hwm_kib, weight_bytes=weight_bytes,
                                      checksum=checksum)))


def count_flops(model: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # Counted on the diffusers build: the FLOP counter does not see in-place matmuls (addmm_, baddbmm_)
    # that the pack uses to accumulate into the residual; both run the same products.
    run, _ = build("diffusers", model, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run()
    return counter.get_total_flops()


def matmul_flops_per_s(threads: int, n: int = 2048, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spawn(impl: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model", model,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    return run_worker(cmd, f"{impl}/{model}")


def _pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: every forward's time (first round first), the highest memory marks."""
    return dict(results[0], times=[t for r in results for t in r["times"]],
                hwm_kib=max(r["hwm_kib"] for r in results),
                growth_kib=max(r["hwm_kib"] - r["base_kib"] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="c,b,a")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh worker pairs per model, alternating which runs first; prints the median ratio")
    parser.add_argument("--worker", choices=["pack", "diffusers"])
    parser.add_argument("--model", choices=list(MODELS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.repeats, args.threads)
        return

    print(f"# bench_forward  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"threads {args.threads}  cpu {platform.processor() or platform.machine()} x{os.cpu_count()}  "
          f"loadavg(1m) at start {os.getloadavg()[0]:.2f}")
    mm = matmul_flops_per_s(args.threads)
    print(f"plain fp32 matmul 2048^3: {mm / 1e9:.1f} GFLOP/s")
    header = (f"{'model':32} {'impl':9} {'first s':>8} {'best s':>7} {'x faster':>8} {'weights MB':>10} "
              f"{'fwd growth MB':>13} {'peak RSS MB':>11} {'GFLOP/s':>8} {'% matmul':>8}")
    print(header)
    for model in args.models.split(","):
        if model == "a" and (reason := stage_a_available()):
            print(f"{MODELS[model]:32} skipped: {reason}")
            continue
        flops = count_flops(model)
        rounds = []
        for k in range(args.rounds):
            # Alternate which implementation runs first so a drift in the machine's speed hits both alike.
            order = ("diffusers", "pack") if k % 2 == 0 else ("pack", "diffusers")
            rounds.append({impl: spawn(impl, model, args) for impl in order})
        res = {impl: _pool([rd[impl] for rd in rounds]) for impl in ("diffusers", "pack")}
        for impl in ("diffusers", "pack"):
            r = res[impl]
            best = min(r["times"])
            speed = min(res["diffusers"]["times"]) / best
            growth = r["growth_kib"] / 1024
            print(f"{MODELS[model]:32} {impl:9} {r['times'][0]:8.2f} {best:7.2f} {speed:8.2f} "
                  f"{r['weight_bytes'] / 2**20:10.0f} {growth:13.0f} {r['hwm_kib'] / 1024:11.0f} "
                  f"{flops / best / 1e9:8.1f} {100 * flops / best / mm:7.0f}%")
        rel = abs(res["pack"]["checksum"] - res["diffusers"]["checksum"]) / max(res["diffusers"]["checksum"], 1e-12)
        print(f"{'':32} {flops / 1e12:.3f} TFLOP per forward; output mean|.| pack vs diffusers rel. diff {rel:.1e}")
        if len(rounds) > 1:
            ratios = sorted(min(rd["diffusers"]["times"]) / min(rd["pack"]["times"]) for rd in rounds)
            print(f"{'':32} x faster per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f}")
    print(f"loadavg(1m) at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
