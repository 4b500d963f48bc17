"""One LoRA training step of Stage C lite: the pack's trainer against a plain diffusers + PEFT loop (issue 9, item 7).

Run (heavy: each worker holds ~4-5 GB; about 10-15 minutes on 2 cores):
    flock /tmp/scw-heavy.lock nice -n 10 .venv/bin/python bench/bench_train.py [--rounds 2] [--steps 3]
Profile one side (the steps after the warm-up, top 30 ops by self CPU time with their input shapes):
    .venv/bin/python bench/bench_train.py --worker pack --ckpt 1 --steps 2 --profile 30

What is compared. Both sides train a rank-4 LoRA on the same seeded random Stage C lite weights at the release's
shapes (``cascade.random_init.randomize_``, written once to ``--workdir`` as a safetensors file), batch 1 at
16x24x24 (a 768x768 image, the official Stage C training size), on the official targets: every attention's input
and output projection (SPEC §13). One step is the official objective (t = clamp(1 - U + 0.001, 0.001, 1), x_t =
a x0 + b eps, epsilon MSE over C,H,W with the P2 weight), backward, gradient clipping at 1.0 and an AdamW update.

- ``pack``: ``train.loop.train`` on a ``host.wrap``-ed Stage C loaded by ``cascade.loading.load`` as the loader
  node does (the file's dtype), with a one-sample ``TrainingCache`` holding the latent and the text embeddings,
  caption dropout and CLIP-image use at 0 (so both sides run the same forward). The step time is the time between
  two ``on_step`` callbacks, so the trainer's own setup (LoRA modules, optimizer) is not in it.
- ``pack_bf16``: the same with the weights stored as bf16 (the release's dtype): the pack keeps them bf16 in memory
  and upcasts each layer to fp32 as it runs (the CPU has no fast bf16 compute).
- ``diffusers``: diffusers' ``StableCascadeUNet`` holding the same weights (keys converted as in SPEC §17.2,
  ``bench/diffusers_ref.py``), in fp32, with a PEFT ``LoraConfig(r=4, lora_alpha=1)`` (``inject_adapter_in_model``)
  on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attention block (the same layers: diffusers splits the
  packed in_proj into three Linears, so PEFT adds three rank-4 pairs where the official LoRA has one on the packed
  3c x c matrix), the same step written as a plain loop; gradient checkpointing by ``enable_gradient_checkpointing()``.

Each (implementation, checkpointing) measurement runs in a fresh worker process, ``--rounds`` rounds with the order
reversed every other round, so a drift of the machine's speed hits both alike. Per worker: ``--steps`` steps, the
first a warm-up; the best later step is the step time, wall-clock and process CPU time (the CPU time is what a
loaded machine disturbs least: other sessions' jobs stretch the wall clock, not the work done). Memory: the growth
of the process's RSS high-water mark over all steps above the RSS once weights and inputs are resident
(``/proc/self/clear_refs``), and the peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported by path (the smoke test)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import cascade_module, file_module, pack_module, run_worker, status_kib  # noqa: E402

IMPLS = ("diffusers", "pack", "pack_bf16")
SEED = 0
RANK = 4
SIZES = {"lite": 24, "tiny": 8}  # latent side: 24 = a 768x768 image (the official Stage C training size)


def samplers_schedule() -> Any:
    """The pack's ``samplers.schedule`` (pure math) under the same stub package as ``cascade_module``."""
    import importlib

    cascade_module("stage_c")  # makes the package module if the pack is not imported
    return importlib.import_module("comfyui_stablecascade.samplers.schedule")


def config(size: str) -> Any:
    return getattr(cascade_module("stage_c").StageCConfig, size)()


def weights_path(workdir: str, size: str, dtype: str) -> str:
    return os.path.join(workdir, f"stage_c_{size}_seed{SEED}_{dtype}.safetensors")


def prepare(workdir: str, size: str) -> None:
    """Write the seeded random weights once as fp32 and as bf16 (the fp32 file holds the bf16 values upcast, so
    every row trains the very same network)."""
    from safetensors.torch import save_file

    paths = {d: weights_path(workdir, size, d) for d in ("fp32", "bf16")}
    if all(os.path.exists(p) for p in paths.values()):
        return
    os.makedirs(workdir, exist_ok=True)
    net = cascade_module("stage_c").StageC(config(size), dtype=torch.float32)
    cascade_module("random_init").randomize_(net, seed=SEED)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    del net
    gc.collect()
    save_file(sd, paths["bf16"] + ".tmp")
    os.replace(paths["bf16"] + ".tmp", paths["bf16"])
    save_file({k: v.float() for k, v in sd.items()}, paths["fp32"] + ".tmp")
    os.replace(paths["fp32"] + ".tmp", paths["fp32"])


def inputs(cfg: Any, size: str) -> dict[str, torch.Tensor]:
    """The one training sample: a Stage C latent and its text embeddings (seeded)."""
    g = torch.Generator().manual_seed(1)
    hw = SIZES[size]
    return dict(latent=torch.randn(16, hw, hw, generator=g), clip_text=torch.randn(77, cfg.c_clip_text, generator=g),
                clip_pooled=torch.randn(1, cfg.c_clip_text_pooled, generator=g))


# ``--profile``: a torch.profiler run from the end of the warm-up step to the end of the worker (its table goes to
# stderr); the timing rows of a profiled run are not comparable.
PROFILER: Any = None


def _step_done() -> None:
    if PROFILER is not None and not getattr(PROFILER, "scw_started", False):
        PROFILER.scw_started = True
        PROFILER.start()


def _reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return status_kib("VmRSS")


# ---- the diffusers + PEFT side ------------------------------------------------------------------------------


def diffusers_steps(workdir: str, size: str, steps: int, ckpt: bool) -> dict[str, Any]:
    """A plain diffusers + PEFT LoRA loop; returns the per-step times and memory marks."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    schedule = samplers_schedule()
    ref = file_module("diffusers_ref", os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_ref.py"))
    cfg = config(size)
    # Copies, not the file's memory map: load_state_dict(assign=True) would otherwise keep mmap-backed weights,
    # whose pages enter the RSS only when the first step reads them and would count as step growth.
    sd = {k: v.clone() for k, v in load_file(weights_path(workdir, size, "fp32")).items()}
    unet = ref.build_diffusers_unet(cfg, sd)
    del sd
    unet.requires_grad_(False)
    # StableCascadeUNet has no PeftAdapterMixin (no add_adapter): PEFT's own injection, as a plain loop does it.
    unet = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=1, target_modules=["to_q", "to_k", "to_v",
                                                                                     "to_out.0"]), unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    unet.train()
    if ckpt:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    n_pairs = sum(1 for n, _ in unet.named_parameters() if n.endswith("lora_A.default.weight"))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sample = inputs(cfg, size)
    x0, clip_text, clip_pooled = sample["latent"][None], sample["clip_text"][None], sample["clip_pooled"][None]
    clip_img = torch.zeros(1, 1, cfg.c_clip_img)
    gen = torch.Generator().manual_seed(SEED)
    base_kib = _reset_peak()
    times, cpu, losses = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        t = (1 - torch.rand(1, generator=gen) + 0.001).clamp(0.001, 1.0)
        logsnr = schedule.logsnr(t)
        a, b = schedule.alpha_sigma(logsnr)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * noise
        pred = unet(x_t, schedule.noise_cond_r(logsnr), clip_text_pooled=clip_pooled, clip_text=clip_text,
                    clip_img=clip_img).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample / (1 + logsnr.exp())).mean()  # P2 weight 1 / (1 + SNR)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        _step_done()
        cpu.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
    return dict(times=times, cpu=cpu, base_kib=base_kib, hwm_kib=status_kib("VmHWM"), losses=losses,
                lora_pairs=n_pairs,
                trainable=sum(p.numel() for p in params))


# ---- the pack's side ----------------------------------------------------------------------------------------


def pack_steps(workdir: str, size: str, steps: int, ckpt: bool, dtype: str) -> dict[str, Any]:
    """``train.loop.train`` for ``steps`` steps; the step times are the gaps between its ``on_step`` calls."""
    host = pack_module("host")
    loading = pack_module("cascade.loading")
    cache_mod = pack_module("train.cache")
    loop = pack_module("train.loop")
    cfg = config(size)
    handle = host.wrap(loading.load("stage_c", weights_path(workdir, size, dtype)), "stage_c")
    sample = inputs(cfg, size)
    empty = (torch.zeros_like(sample["clip_text"]), torch.zeros_like(sample["clip_pooled"]))
    cache = cache_mod.TrainingCache([cache_mod.CachedSample(
        latent=sample["latent"], caption="", clip_text=sample["clip_text"], clip_pooled=sample["clip_pooled"],
        clip_image=None)], [1], empty)
    settings = loop.TrainSettings(steps=steps, batch_size=1, rank=RANK, alpha=1.0, lr=1e-4, warmup=0, seed=SEED,
                                  caption_dropout=0.0, clip_image_prob=0.0, grad_checkpointing=ckpt)
    marks: list[tuple[float, float]] = []
    losses: list[float] = []

    def on_step(step: int, loss: float, preview: Any) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        _step_done()
        losses.append(float(loss))

    base_kib = _reset_peak()
    start = (time.perf_counter(), time.process_time())
    result = loop.train(handle, None, cache, settings, on_step=on_step)
    stamps = [start, *marks]
    times = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return dict(times=times, cpu=cpu, base_kib=base_kib, hwm_kib=status_kib("VmHWM"), losses=losses,
                lora_pairs=sum(1 for k in result.lora if k.endswith("lora_down")),
                trainable=sum(v.numel() for k, v in result.lora.items() if k.startswith("weights.")))


# ---- orchestration ------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    impl, ckpt = args.worker, bool(args.ckpt)
    global PROFILER
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        PROFILER = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    if impl == "diffusers":
        r = diffusers_steps(args.workdir, args.size, args.steps, ckpt)
    else:
        r = pack_steps(args.workdir, args.size, args.steps, ckpt, "bf16" if impl == "pack_bf16" else "fp32")
    if PROFILER is not None and getattr(PROFILER, "scw_started", False):
        PROFILER.stop()
        table = PROFILER.key_averages(group_by_input_shape=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=32,
                          max_shapes_column_width=72), file=sys.stderr)
    return dict(r, impl=impl, ckpt=ckpt)


def spawn(impl: str, ckpt: bool, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--ckpt", str(int(ckpt)), "--size", args.size,
           "--steps", str(args.steps), "--threads", str(args.threads), "--workdir", args.workdir]
    env = None
    if args.mmap_threshold:
        # glibc then serves every allocation this large by mmap and returns it on free, so the RSS high-water mark
        # follows the live tensors (as a GPU allocator's peak does) instead of the heap's fragmentation.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(args.mmap_threshold))
    return run_worker(cmd, f"{impl} ckpt={ckpt}", env=env)


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: the best step after each worker's warm-up, the largest memory marks."""
    later = [t for r in results for t in (r["times"][1:] or r["times"])]
    later_cpu = [t for r in results for t in (r["cpu"][1:] or r["cpu"])]
    return dict(results[0], best_s=min(later), best_cpu_s=min(later_cpu),
                best_per_round=[min(r["times"][1:] or r["times"]) for r in results],
                first_s=[r["times"][0] for r in results],
                growth_mib=max(r["hwm_kib"] - r["base_kib"] for r in results) / 1024,
                peak_mib=max(r["hwm_kib"] for r in results) / 1024)


def _ratio(value: float, ref: float | None) -> str:
    # A tiny network's step can leave RSS where it was (growth 0): there is no ratio then, not a crash.
    return f"{value / ref:.2f}" if ref is not None and ref > 0 else "-"


def report(rows: dict[tuple[str, bool], dict[str, Any]]) -> list[str]:
    lines = ["| implementation | grad. checkpointing | LoRA pairs | trainable params | best step s | x diffusers "
             "(same ckpt) | best step CPU s | x diffusers | step growth MiB | x diffusers (same ckpt) | peak RSS MiB "
             "| best per round s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (impl, ckpt), r in rows.items():
        ref = rows.get(("diffusers", ckpt))
        t_ratio = _ratio(r["best_s"], ref and ref["best_s"])
        m_ratio = _ratio(r["growth_mib"], ref and ref["growth_mib"])
        c_ratio = _ratio(r["best_cpu_s"], ref and ref["best_cpu_s"])
        lines.append(f"| {impl} | {'on' if ckpt else 'off'} | {r['lora_pairs']} | {r['trainable']} | "
                     f"{r['best_s']:.2f} | {t_ratio} | {r['best_cpu_s']:.2f} | {c_ratio} | {r['growth_mib']:.0f} | "
                     f"{m_ratio} | "
                     f"{r['peak_mib']:.0f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['best_per_round'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--ckpt-modes", default="0,1", help="gradient checkpointing off (0) / on (1)")
    parser.add_argument("--all-combos", action="store_true", help="also pack_bf16 without checkpointing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps per worker; the first is a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", choices=tuple(SIZES), default="lite", help="tiny: the smoke test")
    parser.add_argument("--workdir", default="/tmp/scw_bench_train")
    parser.add_argument("--worker", choices=IMPLS)
    parser.add_argument("--ckpt", type=int, default=0)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="with --worker: profile the steps after the first, print the top ROWS ops by self CPU "
                             "time and input shapes to stderr (what found the LoRA merge's cost)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="bytes; e.g. 1048576: workers' RSS tracks live tensors (fixed glibc mmap threshold)")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    if args.prepare:
        prepare(args.workdir, args.size)
        return
    print(f"# bench_train  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  threads "
          f"{args.threads}  cpu {platform.processor() or platform.machine()} x{os.cpu_count()}  loadavg(1m) at start "
          f"{os.getloadavg()[0]:.2f}  Stage C {args.size}, batch 1 x 16x{SIZES[args.size]}x{SIZES[args.size]}, rank "
          f"{RANK}, {args.steps} steps a worker, {args.rounds} rounds", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--size", args.size, "--workdir",
                    args.workdir], check=True)
    print(f"weights prepared/checked in {time.perf_counter() - t0:.0f}s", flush=True)
    combos = [(impl, bool(int(c))) for c in args.ckpt_modes.split(",") for impl in args.impls.split(",")
              if args.all_combos or (impl, c) != ("pack_bf16", "0")]  # bf16 weights: the memory row, with ckpt
    rounds = []
    for k in range(args.rounds):
        order = combos if k % 2 == 0 else combos[::-1]
        done = {}
        for combo in order:
            done[combo] = spawn(*combo, args)
            r = done[combo]
            print(f"round {k + 1} {combo[0]} ckpt={combo[1]}: steps {', '.join(f'{t:.2f}' for t in r['times'])} s "
                  f"(CPU {', '.join(f'{t:.2f}' for t in r['cpu'])} s), "
                  f"growth {(r['hwm_kib'] - r['base_kib']) / 1024:.0f} MiB, losses "
                  f"{', '.join(f'{v:.4f}' for v in r['losses'])}", flush=True)
        rounds.append(done)
    rows = {combo: pool([rd[combo] for rd in rounds]) for combo in combos}
    print("\n" + "\n".join(report(rows)))
    print(f"\nloadavg(1m) at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
