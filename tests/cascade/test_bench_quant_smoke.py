"""bench/bench_quant.py's helpers on tiny networks: the files it writes load in every format, the weight bytes it
predicts from shapes (its big-network figures) equal the bytes measured on the loaded networks, and the quantized
outputs it compares stay close to fp32; the weights it generates in memory for the big networks (``--source
generate``) give the same outputs as its files. Seconds on CPU; the real run is the benchmark itself."""

import importlib.util

import pytest
import torch

import tiny_checkpoints as tc

pytest.importorskip("gguf", reason="the gguf package (requirements.txt) writes the GGUF files the benchmark loads")


def _load_bench():
    spec = importlib.util.spec_from_file_location("scw_bench_quant", tc.ROOT / "bench" / "bench_quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
# Relative L2 error bounds of the output against fp32 for the tiny networks; the measured values (bf16 ~0.011,
# fp8 ~0.045, Q8_0 ~0.017, Q4_K ~0.13) with about 2x headroom, ordered as the formats' precision.
REL_L2 = {"bf16": 0.025, "fp8_e4m3fn": 0.1, "Q8_0": 0.04, "Q4_K": 0.3}


@pytest.mark.parametrize("net", ["c_tiny", "b_tiny"])
def test_bench_quant_helpers_on_tiny_networks(tmp_path, net):
    formats = list(bench.FORMATS)
    bench.prepare(str(tmp_path), net, formats)
    rows = {f: bench.measure(str(tmp_path), net, f, formats, repeats=1, stage_b_size=32, save_output=True)
            for f in formats}
    ref = torch.load(tmp_path / f"out_{net}_fp32.pt")
    for fmt, r in rows.items():
        assert r["weight_bytes"] == bench.predicted_weight_bytes(net, fmt), fmt
        assert r["finite"], fmt
        assert r["act_dtype"] == ("float32" if fmt == "fp32" else "bfloat16"), fmt
        assert (r["n_quantized"] > 0) == (fmt not in ("fp32", "bf16")), fmt
    assert rows["fp32"]["weight_bytes"] == 2 * rows["bf16"]["weight_bytes"]
    assert rows["Q4_K"]["weight_bytes"] < rows["fp8_e4m3fn"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    for fmt, bound in REL_L2.items():
        e = bench.errors(torch.load(tmp_path / f"out_{net}_{fmt}.pt"), ref)
        assert 0 < e["rel_l2"] < bound, (fmt, e)
        assert e["max_rel"] >= e["rel_l2"] / 10, (fmt, e)  # a max error is not far below the mean error
    # ``--source generate`` (the big networks: no files) draws and converts tensor by tensor in memory; it must
    # give the networks the files give, so its outputs equal theirs bit for bit in every format (they differ
    # between formats, so equality is not trivial).
    gen = tmp_path / "gen"
    gen.mkdir()
    for fmt in formats:
        g = bench.measure(str(gen), net, fmt, formats, repeats=1, stage_b_size=32, source="generate")
        assert (g["weight_bytes"], g["n_quantized"], g["source"]) == (
            rows[fmt]["weight_bytes"], rows[fmt]["n_quantized"], "generate"), fmt
        out = torch.load(gen / f"out_{net}_{fmt}.pt")
        assert torch.equal(out, torch.load(tmp_path / f"out_{net}_{fmt}.pt")), fmt
    assert not torch.equal(torch.load(gen / f"out_{net}_fp32.pt"), torch.load(gen / f"out_{net}_bf16.pt"))
    lines = bench.table(net, {f: dict(r, growth_kib=r["hwm_kib"] - r["base_kib"]) for f, r in rows.items()}, {})
    assert len(lines) == len(formats) and all(ln.count("|") == bench.HEADER.splitlines()[0].count("|")
                                              for ln in lines)

