"""Quantized weights side by side (issue 12, item 5): weight memory, forward peak memory, time per forward and
output error against fp32 of Stage C and Stage B in fp32, bf16, fp8 e4m3fn, GGUF Q8_0 and GGUF Q4_K, on CPU.

Run (heavy: each lite worker holds up to ~5 GB, the fp32 Stage C big worker ~14 GB; ~10 minutes on 2 cores for
the lite networks; the big ones with one round of one forward at the release sizes about 20 minutes on an idle
machine, 85+ under heavy load):
    flock /tmp/scw-heavy.lock .venv/bin/python bench/bench_quant.py [--nets c,b,C,B] [--rounds 2] [--repeats 2]
    .venv/bin/python bench/bench_quant.py --big-memory-only     # exact weight bytes of the big networks only

Weights: seeded random weights at the release's shapes (``cascade.random_init.randomize_``), written once to
``--workdir`` (kept between runs; reused when present) as the files a user would have: an fp32 safetensors
file (the reference; bf16 is what ``loading.load(kind, file, dtype=torch.bfloat16)`` gives from it), an fp8
e4m3fn safetensors file and GGUF Q8_0 / Q4_K files written by ``cascade.quant.convert`` from the bf16 values (the
release is bf16, so the quantized files start from bf16 as ``scripts/convert_weights.py`` would). Every format is
loaded with ``cascade.loading.load`` exactly as the loader nodes do.

Activation dtype (``--act``). ``fp32`` (the default, the issue's comparison): every format computes in
float32, and bf16 is "bf16 layerwise", bf16 weights in ``cascade.quant.OPS`` layers that cast each layer's weight
to fp32 in ``forward`` (the pack's rule on a CPU without native bf16); ratios are against that row. ``weights``:
the dtype of the network's first parameter, as ``pipeline/stages.py`` picks it. For bf16
this is bf16 weights in plain torch layers with bf16 activations (no per-layer cast: the weights already are in
the activation dtype). For fp8 and GGUF the kept tensors (embedding, head, mappers, norms, biases) are bf16, so
the activations are bf16 too and each quantized layer expands its weight to bf16 in ``forward``
(``cascade.quant.ops``, the manual-cast pattern), one layer at a time.

Measured per (network, format), each in a fresh worker process (``--rounds`` rounds, the format order reversed
every other round so a drift in the machine's speed hits all alike): the exact bytes of parameters and buffers
as stored (``cascade.quant.weight_bytes``); the growth of the process RSS high-water mark during the forwards
above the RSS once weights and inputs are resident (``/proc/self/clear_refs``; the GGUF blocks are memory
mapped, so their pages are touched before the reset); the first and the best forward time, and its CPU seconds (all threads: the work done, which shared-machine load
inflates far less than the wall clock); the time to expand
every quantized weight once (what dequantization adds to one forward); and, against the fp32 output of the same
weights and inputs, the max abs error, the max abs error over max |fp32| and the relative L2 error.

Weight source (``--source``). ``files`` (above): the files are written once and loaded from disk. ``generate``
(``bench/quant_gen.py``; the default for the big networks, Stage C 3.6B and Stage B 1.5B): no files; each worker
draws the same seeded values tensor by tensor, converts each tensor to its format at once (bf16 -> fp8 / GGUF
blocks with the writers' own steps) and loads the state dict with ``cascade.loading.load``. The fp32 Stage C big
file alone would be 14.4 GB, and writing it next to the bf16 copy does not fit a 24 GB machine; generated, a
worker holds its format's weights plus one tensor in fp32 (the fp32 worker 13.8 GiB at its peak). The smoke test
checks on tiny networks that both sources give the same outputs bit for bit. Before each worker the runner waits
(up to ``--mem-wait`` s) until ``MemAvailable`` covers the worker's predicted weight bytes plus 2 GiB, and skips
the format with a note otherwise. Each worker's result is saved in ``--workdir``; ``--resume`` continues a
stopped run. Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--spin-wait``: on an oversubscribed machine
a spinning OpenMP thread burns the core its partner needs (not compared in a controlled run).

``--big-memory-only`` prints the big networks' exact weight bytes from shapes alone (the writers' type choice,
``convert._pick_type``); every measured row also checks that prediction against the measured bytes.
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
from benchlib import (cascade_module, mem_available_bytes, release_free_memory, run_worker,  # noqa: E402
                      status_kib)

FORMATS = ("fp32", "bf16", "fp8_e4m3fn", "Q8_0", "Q4_K")
GGUF = ("Q8_0", "Q4_K")
SEED = 0
# kind, title, config factory name; "tiny" entries are for the smoke test.
NETS = {
    "c": ("stage_c", "Stage C lite", "lite"),
    "b": ("stage_b", "Stage B lite", "lite"),
    "C": ("stage_c", "Stage C big", "big"),
    "B": ("stage_b", "Stage B big", "big"),
    "c_tiny": ("stage_c", "Stage C tiny", "tiny"),
    "b_tiny": ("stage_b", "Stage B tiny", "tiny"),
}


def config(net: str) -> Any:
    kind, _, size = NETS[net]
    mod = cascade_module(kind)
    return getattr(mod.StageCConfig if kind == "stage_c" else mod.StageBConfig, size)()


def network_class(kind: str) -> Any:
    mod = cascade_module(kind)
    return mod.StageC if kind == "stage_c" else mod.StageB


def inputs(net: str, stage_b_size: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 inputs. Stage C: the release's CFG batch of 2 at 16x24x24 (a 1024x1024 image); Stage B: batch
    1 at 4 x ``stage_b_size``^2 with the effnet latent at the release's 24/256 of that size."""
    kind, _, size = NETS[net]
    g = torch.Generator().manual_seed(1)
    cfg = config(net)
    if kind == "stage_c":
        hw = 24 if size != "tiny" else 8
        return dict(x=torch.randn(2, 16, hw, hw, generator=g), r=torch.tensor([0.5, 0.7]),
                    clip_text=torch.randn(2, 77, cfg.c_clip_text, generator=g),
                    clip_text_pooled=torch.randn(2, 1, cfg.c_clip_text_pooled, generator=g),
                    clip_img=torch.randn(2, 1, cfg.c_clip_img, generator=g))
    s = stage_b_size if size != "tiny" else 32
    e = max(4, s * 24 // 256)
    return dict(x=torch.randn(1, 4, s, s, generator=g), r=torch.tensor([0.5]),
                effnet=torch.randn(1, cfg.c_effnet, e, e, generator=g), clip=torch.randn(1, 1, cfg.c_clip, generator=g))


def paths(workdir: str, net: str) -> dict[str, str]:
    base = os.path.join(workdir, f"{net}_seed{SEED}")
    return {"fp32": base + "_fp32.safetensors", "bf16": base + "_bf16.safetensors",
            "fp8_e4m3fn": base + "_fp8_e4m3fn.safetensors", "Q8_0": base + "_Q8_0.gguf",
            "Q4_K": base + "_Q4_K.gguf"}


def _source_format(formats: list[str]) -> str:
    # The fp32 file is the reference and the source of bf16; without an fp32 row (the big networks) a bf16 file.
    return "fp32" if "fp32" in formats else "bf16"


def prepare(workdir: str, net: str, formats: list[str]) -> None:
    """Write the seeded random weights of ``net`` in every file ``formats`` need (skipping existing files)."""
    from safetensors.torch import save_file

    convert = cascade_module("quant.convert")
    random_init = cascade_module("random_init")
    kind = NETS[net][0]
    p = paths(workdir, net)
    src = _source_format(formats)
    need = [f for f in formats if f in ("fp8_e4m3fn", *GGUF)] + [src]
    if all(os.path.exists(p[f]) for f in need):
        return
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        net_module = network_class(kind)(config(net), dtype=torch.float32 if src == "fp32" else torch.bfloat16)
    random_init.randomize_(net_module, seed=SEED)
    if not os.path.exists(p[src]):
        save_file({k: v.contiguous() for k, v in net_module.state_dict().items()}, p[src] + ".tmp")
        os.replace(p[src] + ".tmp", p[src])
    # The quantized files start from the bf16 values, as a conversion of the bf16 release would.
    sd = {k: v.to(torch.bfloat16) for k, v in net_module.state_dict().items()}
    del net_module
    gc.collect()
    for fmt in formats:
        if fmt == "fp8_e4m3fn" and not os.path.exists(p[fmt]):
            convert.write_fp8(p[fmt] + ".tmp", sd, kind, fmt)
            os.replace(p[fmt] + ".tmp", p[fmt])
        elif fmt in GGUF and not os.path.exists(p[fmt]):
            convert.write_gguf(p[fmt] + ".tmp", sd, kind, fmt, dense_dtype=torch.bfloat16)
            os.replace(p[fmt] + ".tmp", p[fmt])
    print(f"prepared {NETS[net][1]} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def load_format(workdir: str, net: str, fmt: str, formats: list[str], layerwise: bool = False,
                source: str = "files") -> torch.nn.Module:
    """The network as the pack's loader gives it for ``fmt``, from the files or (``source="generate"``) from
    the seeded values converted in memory (``quant_gen``).

    ``layerwise``: bf16 weights in ``cascade.quant.OPS`` layers, which cast each layer's weight to the activation
    dtype in ``forward`` (the issue's "bf16 (layerwise upcast)"); otherwise bf16 is plain torch layers.
    """
    loading = cascade_module("loading")
    kind, p = NETS[net][0], paths(workdir, net)
    ops = cascade_module("quant").OPS if layerwise and fmt == "bf16" else None
    if source == "generate":
        from quant_gen import state_dict

        sd = state_dict(network_class(kind)(config(net), dtype=torch.float32, device="meta"), fmt, SEED)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(fmt)
        model = loading.load(kind, sd, dtype=dtype, operations=ops)
        del sd
        return model
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        return loading.load(kind, p[_source_format(formats)], dtype=dtype, operations=ops)
    return loading.load(kind, p[fmt])


def _touch(model: torch.nn.Module) -> None:
    """Fault in every page of memory-mapped weights, so the forward's RSS growth excludes the file's pages."""
    QTensor = cascade_module("quant").QTensor
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, QTensor):
            raw = t.raw().reshape(-1).view(torch.uint8)
            raw[::4096].sum()


def dequant_seconds(model: torch.nn.Module, dtype: torch.dtype) -> float:
    """Time to expand every quantized weight once to ``dtype``: what dequantization adds to one forward."""
    QTensor = cascade_module("quant").QTensor
    qs = [t for t in model.parameters() if isinstance(t, QTensor)]
    t0 = time.perf_counter()
    for t in qs:
        t.dense(dtype)
    return time.perf_counter() - t0


def measure(workdir: str, net: str, fmt: str, formats: list[str], repeats: int, stage_b_size: int,
            threads: int | None = None, save_output: bool = True, act_mode: str = "weights",
            source: str = "files") -> dict[str, Any]:
    """Load ``fmt``, run ``repeats`` forwards; weight bytes, memory marks, times, dequantization time.

    ``act_mode``: "fp32" computes every format in float32 (bf16 then in the quant OPS layers, layer by layer);
    "weights" takes the activation dtype from the first parameter, as ``pipeline/stages.py`` does.
    """
    if threads:
        torch.set_num_threads(threads)
    quant = cascade_module("quant")
    t0 = time.perf_counter()
    model = load_format(workdir, net, fmt, formats, layerwise=act_mode == "fp32", source=source)
    load_s = time.perf_counter() - t0
    act = next(model.parameters()).dtype  # the activation dtype, as pipeline/stages.py picks it
    if not act.is_floating_point or act.itemsize == 1:
        raise RuntimeError(f"{fmt}: first parameter is {act}; expected a dense kept tensor")
    if act_mode == "fp32":
        act = torch.float32
    inp = {k: v if k == "r" else v.to(act) for k, v in inputs(net, stage_b_size).items()}
    n_quant = sum(isinstance(t, quant.QTensor) for t in model.parameters())
    weight_bytes = quant.weight_bytes(model)
    _touch(model)
    release_free_memory()  # the loader's (or generator's) freed temporaries must not be reused unmeasured
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base_kib = status_kib("VmRSS")
    times, cpu = [], []
    with torch.inference_mode():
        for i in range(repeats):
            t1, c1 = time.perf_counter(), time.process_time()
            out = model(**inp)
            times.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)  # CPU seconds of all threads: the work, whatever the load
            if i < repeats - 1:
                del out  # only the last output is kept (for the error columns)
    hwm_kib = status_kib("VmHWM")
    out = out.float()
    if save_output:
        torch.save(out, os.path.join(workdir, f"out_{net}_{fmt}.pt"))
    with torch.inference_mode():
        deq = dequant_seconds(model, act) if n_quant else 0.0
    return dict(fmt=fmt, times=times, cpu_s=cpu, base_kib=base_kib, hwm_kib=hwm_kib, weight_bytes=weight_bytes,
                n_quantized=n_quant, act_dtype=str(act).replace("torch.", ""),
                layerwise=fmt == "bf16" and act_mode == "fp32", load_s=load_s, dequant_s=deq,
                finite=bool(torch.isfinite(out).all()), source=source)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs error, max abs error / max |ref| and relative L2 error of ``out`` against ``ref``."""
    d = (out.double() - ref.double())
    return dict(max_abs=float(d.abs().max()), max_rel=float(d.abs().max() / ref.double().abs().max()),
                rel_l2=float(d.norm() / ref.double().norm()))


def predicted_weight_bytes(net: str, fmt: str) -> int:
    """Exact bytes of ``net``'s parameters and buffers in ``fmt``, from shapes alone (no weights built).

    Uses the writers' own choice of type per tensor (``convert._pick_type``: the policy and the K-format
    fallbacks) on a bf16 source, as ``prepare`` writes the files; fp8 keeps the unquantized tensors bf16.
    """
    convert = cascade_module("quant.convert")
    ggml = cascade_module("quant.ggml")
    policy = cascade_module("quant.policy")
    kind = NETS[net][0]
    model = network_class(kind)(config(net), dtype=torch.bfloat16, device="meta")
    total = 0
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        n = t.numel()
        if not t.is_floating_point():
            total += n * t.element_size()
        elif fmt == "fp32":
            total += n * 4
        elif fmt == "bf16":
            total += n * 2
        elif fmt.startswith("fp8"):
            total += n * (1 if policy.should_quantize(key, tuple(t.shape)) else 2)
        else:
            target = convert._pick_type(key, t, fmt, policy.THRESHOLD)
            if target in ggml.BLOCK:
                total += n // ggml.BLOCK[target] * ggml.TYPE_SIZE[target]
            else:
                total += n * {"F32": 4, "F16": 2, "BF16": 2}[target]
    return total


def spawn(net: str, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", fmt, "--nets", net, "--formats", args.formats,
           "--workdir", args.workdir, "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--stage-b-size", str(args.stage_b_size), "--act", args.act, "--source", source_of(net, args)]
    return run_worker(cmd, f"{net}/{fmt}")


def result_path(args: argparse.Namespace, net: str, fmt: str, k: int) -> str:
    """Where a worker's result is kept: a run stopped part-way continues with ``--resume``."""
    return os.path.join(args.workdir, f"res_{net}_{fmt}_round{k + 1}_{args.act}_b{args.stage_b_size}.json")


def source_of(net: str, args: argparse.Namespace) -> str:
    """``--source``; ``auto``: generated in memory for the big networks, files otherwise."""
    if args.source != "auto":
        return args.source
    return "generate" if NETS[net][2] == "big" else "files"


def wait_for_memory(need: int, wait_s: float) -> bool:
    """True once ``MemAvailable`` >= ``need`` bytes (polled every 10 s for up to ``wait_s`` s)."""
    t0 = time.monotonic()
    while mem_available_bytes() < need:
        if time.monotonic() - t0 > wait_s:
            return False
        time.sleep(10)
    return True


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: all forward times (first round first), the largest memory growth."""
    return dict(results[0], times=[t for r in results for t in r["times"]],
                cpu_s=[t for r in results for t in r.get("cpu_s", [])],
                hwm_kib=max(r["hwm_kib"] for r in results),
                growth_kib=max(r["hwm_kib"] - r["base_kib"] for r in results),
                dequant_s=min(r["dequant_s"] for r in results),
                best_per_round=[min(r["times"]) for r in results])


def title_of(net: str, stage_b_size: int) -> str:
    """The network's name, with the latent side for Stage B (its size is a choice of the run)."""
    return NETS[net][1] + (f" {stage_b_size}²" if NETS[net][0] == "stage_b" and NETS[net][2] != "tiny" else "")


def table(net: str, rows: dict[str, dict[str, Any]], errs: dict[str, dict[str, float]],
          title: str | None = None) -> list[str]:
    """Markdown rows of one network; ratios against the bf16 row."""
    title = title or NETS[net][1]
    bf16 = rows.get("bf16")
    out = []
    for fmt, r in rows.items():
        best = min(r["times"])
        mem_ratio = f"{r['weight_bytes'] / bf16['weight_bytes']:.3f}" if bf16 else "-"
        t_ratio = f"{best / min(bf16['times']):.2f}" if bf16 else "-"
        cpu = min(r["cpu_s"]) if r.get("cpu_s") else float("nan")
        c_ratio = f"{cpu / min(bf16['cpu_s']):.2f}" if bf16 and bf16.get("cpu_s") else "-"
        e = errs.get(fmt)
        err = (f"{e['max_abs']:.3g} | {e['max_rel']:.2e} | {e['rel_l2']:.2e}" if e else "- | - | -")
        name = "bf16 layerwise" if r.get("layerwise") else fmt
        out.append(f"| {title} | {name} | {r['act_dtype']} | {r['weight_bytes'] / 2**20:.0f} | {mem_ratio} | "
                   f"{r.get('growth_kib', r['hwm_kib'] - r['base_kib']) / 1024:.0f} | {r['hwm_kib'] / 1024:.0f} | "
                   f"{r['times'][0]:.2f} | {best:.2f} | {t_ratio} | {cpu:.1f} | {c_ratio} | {r['dequant_s']:.2f} | {err} |")
    return out


HEADER = ("| network | format | act. dtype | weights MiB | x bf16 | fwd growth MiB | peak RSS MiB | first s | "
          "best s | time x bf16 | CPU s (best fwd) | CPU x bf16 | dequant s/fwd | max abs err | max abs / max abs(fp32) | "
          "rel L2 err |\n" + "|---" * 16 + "|")


def big_memory_table() -> list[str]:
    lines = ["| network | params | fp32 GB | bf16 GB | fp8_e4m3fn GB | Q8_0 GB | Q4_K GB | fp8 x bf16 | Q8_0 x bf16 | "
             "Q4_K x bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for net in ("C", "B"):
        b = {f: predicted_weight_bytes(net, f) for f in FORMATS}
        params = b["fp32"] / 4
        lines.append(f"| {NETS[net][1]} | {params / 1e9:.2f} B | " + " | ".join(f"{b[f] / 1e9:.2f}" for f in FORMATS)
                     + " | " + " | ".join(f"{b[f] / b['bf16']:.3f}" for f in ("fp8_e4m3fn", "Q8_0", "Q4_K")) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="c,b", help=f"comma list of {list(NETS)} (c/b lite, C/B big)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=2, help="forwards per worker (best of all is reported)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh workers per format, order reversed each round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage-b-size", type=int, default=128, help="Stage B latent side (release 1024^2: 256)")
    parser.add_argument("--workdir", default="/tmp/scw_bench_quant")
    parser.add_argument("--act", choices=("fp32", "weights"), default="fp32",
                        help="fp32: every format computes in float32, bf16 as bf16 weights upcast layer by layer "
                             "(the issue's bf16 layerwise; the pack's rule on a CPU without native bf16); "
                             "weights: the first parameter's dtype (bf16 activations for bf16/fp8/GGUF)")
    parser.add_argument("--source", choices=("auto", "files", "generate"), default="auto",
                        help="files: written once to --workdir and loaded from disk; generate: drawn and converted "
                             "tensor by tensor in each worker (bench/quant_gen.py); auto: generate for the big "
                             "networks, files otherwise")
    parser.add_argument("--mem-wait", type=float, default=600,
                        help="seconds to wait for enough available memory before a worker, then skip it")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the results (and outputs) of workers an earlier, stopped run of the same "
                             "settings finished in --workdir")
    parser.add_argument("--spin-wait", action="store_true",
                        help="let OpenMP threads spin while waiting (its default); otherwise workers run with "
                             "OMP_WAIT_POLICY=PASSIVE, which on a shared, oversubscribed CPU keeps a waiting "
                             "thread from burning the core the other one needs")
    parser.add_argument("--big-memory-only", action="store_true")
    parser.add_argument("--worker", choices=FORMATS)
    parser.add_argument("--prepare", action="store_true")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if args.worker:
        r = measure(args.workdir, args.nets, args.worker, formats, args.repeats, args.stage_b_size, args.threads,
                    act_mode=args.act, source=args.source)
        print("RESULT " + json.dumps(r))
        return
    if args.prepare:
        prepare(args.workdir, args.nets, formats)
        return

    if not args.spin_wait:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the workers (torch reads it at start)
    print(f"# bench_quant  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"threads {args.threads}  cpu {platform.processor() or platform.machine()} x{os.cpu_count()}  "
          f"loadavg(1m) at start {os.getloadavg()[0]:.2f}  activations {args.act}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print("\nBig networks, exact weight bytes from shapes (decimal GB):\n")
    print("\n".join(big_memory_table()))
    if args.big_memory_only:
        return
    print(f"\nStage C: 2x16x24x24 (CFG batch, 1024^2); Stage B: 1x4x{args.stage_b_size}x{args.stage_b_size}; "
          f"{args.rounds} rounds x {args.repeats} forwards per format; weights from "
          + ", ".join(f"{n}: {source_of(n, args)}" for n in args.nets.split(",")) + "\n", flush=True)
    lines = [HEADER]
    checks = []
    for net in args.nets.split(","):
        t0 = time.perf_counter()
        if source_of(net, args) == "files":
            cmd = [sys.executable, os.path.abspath(__file__), "--prepare", "--nets", net, "--formats", args.formats,
                   "--workdir", args.workdir]
            subprocess.run(cmd, check=True)
        os.makedirs(args.workdir, exist_ok=True)
        for fmt in formats:  # no stale output of an earlier run may stand in for a skipped worker
            stale = [os.path.join(args.workdir, f"out_{net}_{fmt}.pt")] + [result_path(args, net, fmt, k)
                                                                         for k in range(args.rounds)]
            for f in stale if not args.resume else []:
                if os.path.exists(f):
                    os.remove(f)
        prep_s = time.perf_counter() - t0
        rounds = []
        for k in range(args.rounds):
            order = formats if k % 2 == 0 else formats[::-1]
            done = {}
            for fmt in order:
                saved = result_path(args, net, fmt, k)
                if args.resume and os.path.exists(saved):
                    with open(saved, encoding="utf-8") as f:
                        done[fmt] = json.load(f)
                    checks.append(f"{NETS[net][1]} {fmt} round {k + 1}: reused {saved} (--resume)")
                    continue
                need = predicted_weight_bytes(net, fmt) + 2 * 2**30
                if not wait_for_memory(need, args.mem_wait):
                    checks.append(f"{NETS[net][1]} {fmt} round {k + 1}: SKIPPED, MemAvailable "
                                  f"{mem_available_bytes() / 2**30:.1f} GiB < {need / 2**30:.1f} GiB needed")
                    print(checks[-1], file=sys.stderr, flush=True)
                    continue
                t1 = time.perf_counter()
                done[fmt] = spawn(net, fmt, args)
                with open(saved, "w", encoding="utf-8") as f:
                    json.dump(done[fmt], f)
                print(f"{time.strftime('%H:%M:%S', time.gmtime())} {net}/{fmt} round {k + 1}: "
                      f"{time.perf_counter() - t1:.0f}s, forwards {[round(t, 2) for t in done[fmt]['times']]} s, "
                      f"CPU {[round(t, 1) for t in done[fmt]['cpu_s']]} s, "
                      f"peak RSS {done[fmt]['hwm_kib'] / 2**20:.2f} GiB", file=sys.stderr, flush=True)
            rounds.append(done)
        rows = {fmt: pool([rd[fmt] for rd in rounds if fmt in rd]) for fmt in formats
                if any(fmt in rd for rd in rounds)}
        errs = {}
        # The reference is the fp32 output; without an fp32 row (not asked for, or skipped) the bf16 one, said so.
        ref_fmt = "fp32" if "fp32" in rows else "bf16" if "bf16" in rows else None
        if ref_fmt:
            if ref_fmt != "fp32":
                checks.append(f"{NETS[net][1]}: errors are against the {ref_fmt} output (no fp32 row)")
            ref = torch.load(os.path.join(args.workdir, f"out_{net}_{ref_fmt}.pt"))
            for fmt in rows:
                if fmt != ref_fmt:
                    errs[fmt] = errors(torch.load(os.path.join(args.workdir, f"out_{net}_{fmt}.pt")), ref)
        lines += table(net, rows, errs, title=title_of(net, args.stage_b_size))
        for fmt, r in rows.items():
            pred = predicted_weight_bytes(net, fmt)
            checks.append(f"{NETS[net][1]} {fmt}: measured {r['weight_bytes']} B, predicted {pred} B "
                          f"({'equal' if pred == r['weight_bytes'] else 'DIFFERENT'}); {r['n_quantized']} quantized "
                          f"tensors; load {r['load_s']:.1f}s; best per round "
                          f"{', '.join(f'{t:.2f}' for t in r['best_per_round'])}; finite {r['finite']}")
        checks.append(f"{NETS[net][1]}: files prepared/checked in {prep_s:.0f}s" if source_of(net, args) == "files"
                      else f"{NETS[net][1]}: weights generated in each worker (load s includes drawing/converting)")
        print("\n".join(lines[-len(rows):]), flush=True)
    print("\n" + "\n".join(lines))
    print("\n" + "\n".join(checks))
    print(f"loadavg(1m) at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
