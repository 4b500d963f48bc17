"""bench/bench_train.py's two sides on a tiny Stage C: both train the same LoRA placement on the same weights, the
pack's steps are unchanged by checkpointing, and the report has one well-formed row per measurement. Seconds on
CPU; the real run (Stage C lite) is the benchmark itself (docs/RESULTS_train.md)."""

import importlib.util
import math

import pytest
import torch

import tiny_checkpoints as tc

pytest.importorskip("peft", reason="PEFT (requirements-dev.txt) builds the diffusers LoRA loop the bench compares")
pytest.importorskip("diffusers", reason="diffusers (requirements-dev.txt) holds the StableCascadeUNet reference")


def _load_bench():
    spec = importlib.util.spec_from_file_location("scw_bench_train", tc.ROOT / "bench" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_bench_train_sides_on_a_tiny_stage_c(tmp_path):
    bench.prepare(str(tmp_path), "tiny")
    rows = {}
    for ckpt in (False, True):
        rows[("diffusers", ckpt)] = dict(bench.diffusers_steps(str(tmp_path), "tiny", 2, ckpt), impl="diffusers",
                                         ckpt=ckpt)
        for impl, dtype in (("pack", "fp32"), ("pack_bf16", "bf16")):
            rows[(impl, ckpt)] = dict(bench.pack_steps(str(tmp_path), "tiny", 2, ckpt, dtype), impl=impl, ckpt=ckpt)
    for key, r in rows.items():
        assert len(r["times"]) == len(r["cpu"]) == len(r["losses"]) == 2, key
        assert all(t > 0 for t in r["times"]) and all(math.isfinite(v) for v in r["losses"]), key
        # The kernel folds each thread's RSS changes in batches, so on a tiny network the high-water mark can read a
        # few pages under the RSS taken at its reset; at real sizes the growth is hundreds of MiB.
        assert r["base_kib"] > 0 and r["hwm_kib"] - r["base_kib"] > -4096, key
    # The same layers: diffusers splits each packed in_proj into q, k, v, so PEFT has two pairs more per attention
    # than the official layout (in_proj, out_proj), and the same rank on each.
    pack, diff = rows[("pack", False)], rows[("diffusers", False)]
    assert diff["lora_pairs"] == 2 * pack["lora_pairs"] > 0
    width = bench.config("tiny").c_hidden[0]
    n_attn = pack["lora_pairs"] // 2
    assert pack["trainable"] == n_attn * bench.RANK * (3 * width + width + 2 * width)
    assert diff["trainable"] == n_attn * bench.RANK * 4 * 2 * width
    # Checkpointing only recomputes the forward: the first loss is the same forward bit for bit, the second follows
    # gradients that agree to rounding (tests/train/test_train_forward.py).
    for impl in ("pack", "pack_bf16"):
        on, off = rows[(impl, True)]["losses"], rows[(impl, False)]["losses"]
        assert on[0] == off[0] and math.isclose(on[1], off[1], rel_tol=1e-5), (impl, on, off)
    assert rows[("diffusers", True)]["losses"][0] != rows[("pack", True)]["losses"][0]  # each draws t its own way
    pooled = {k: bench.pool([r]) for k, r in rows.items()}
    lines = bench.report(pooled)
    assert len(lines) == 2 + len(rows)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert all(" 1.00 " in ln for ln in lines[2:] if ln.startswith("| diffusers"))


def test_bench_train_report_has_no_ratio_for_a_reference_that_did_not_grow():
    # On a tiny network the RSS high-water mark can stay where it was reset: the report says "-" rather than divide.
    row = dict(lora_pairs=2, trainable=8, best_s=2.0, best_cpu_s=1.0, growth_mib=0.0, peak_mib=10.0,
               best_per_round=[2.0])
    lines = bench.report({("diffusers", True): row, ("pack", True): dict(row, best_s=1.0, growth_mib=3.0)})
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[5] == "0.50" and cells[9] == "-", cells


def test_bench_train_profile_mode_prints_the_steps_after_the_warm_up(tmp_path, capsys):
    import argparse

    bench.prepare(str(tmp_path), "tiny")
    args = argparse.Namespace(threads=1, worker="pack", ckpt=1, workdir=str(tmp_path), size="tiny", steps=2,
                              profile=5)
    threads = torch.get_num_threads()
    try:
        r = bench.worker(args)
    finally:
        bench.PROFILER = None
        torch.set_num_threads(threads)  # the worker sets its own; the rest of the suite keeps the session's
    err = capsys.readouterr().err
    assert len(r["times"]) == 2 and "Self CPU" in err and "Input Shapes" in err
    assert "aten::" in err  # the ops of the profiled step, not an empty table
