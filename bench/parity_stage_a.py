"""Stage A parity with diffusers' PaellaVQModel at the release size, and decode timing/peak memory.

Run (heavy: ~1-2 GB, minutes): ``flock /tmp/scw-heavy.lock .venv/bin/python bench/parity_stage_a.py``
Options: ``--skip-timing``, ``--latent 256`` (decode latent side), ``--repeats 2``.

The helpers at the top (random weights, key mapping, diffusers model) are also used by
tests/cascade/test_stage_a.py, which loads this file by path. diffusers is a test/benchmark dependency only.

Facts the mapping relies on (diffusers 0.35 ``modeling_paella_vq_model.py``): the module tree and key
names equal the original's except the codebook (``vquantizer.embedding.weight`` there,
``vquantizer.codebook.weight`` here); ``PaellaVQModel.encode``/``decode`` never apply ``scale_factor``
(the Wuerstchen pipeline multiplies by it before ``decode``), so they match ``encode_raw``/``decode_raw``.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch


def load_pack() -> Any:
    """The pack's ``cascade.stage_a`` module (see ``benchlib.cascade_module``)."""
    # Imported here, not at the top: the tests load this file by path, without bench/ on sys.path.
    from benchlib import cascade_module

    return cascade_module("stage_a")


def random_state_dict(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for ``net``'s keys with non-zero gammas (the release's init is zero, which would hide
    both residual branches) and scales that keep activations O(1) through the bottleneck."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in net.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = torch.randn(shape, generator=gen) * 0.1
        elif key.endswith("gammas"):
            sd[key] = torch.randn(shape, generator=gen) * 0.5
        elif key.endswith("codebook.weight"):
            sd[key] = torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # BatchNorm weight
            sd[key] = 1.0 + torch.randn(shape, generator=gen) * 0.1
        else:
            # A stride-2 4x4 transposed conv sums over in_channels x 4 taps per output pixel.
            fan_in = shape[0] * 4 if _is_convt(key, net) else t[0].numel()
            sd[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return sd


def _is_convt(key: str, net: torch.nn.Module) -> bool:
    mod = net.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(mod, torch.nn.ConvTranspose2d)


def to_diffusers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in sd.items()}


def build_diffusers(cfg: Any, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A PaellaVQModel with the same weights, in eval mode."""
    from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    with torch.device("meta"):
        net = PaellaVQModel(
            levels=cfg.levels, bottleneck_blocks=cfg.bottleneck_blocks, embed_dim=cfg.c_hidden,
            latent_channels=cfg.c_latent, num_vq_embeddings=cfg.codebook_size, scale_factor=0.43,
        )
    net.load_state_dict(to_diffusers_keys(sd), strict=True, assign=True)
    return net.eval()


def build_pack(stage_a: Any, cfg: Any, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = stage_a.StageA(cfg, device="meta")
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _decode_worker(impl: str, side: int, repeats: int, threads: int) -> None:
    """One implementation in a fresh process: best decode time and peak RSS growth above the
    pre-decode RSS (weights and latent already resident), so neither run inherits the other's heap."""
    torch.set_num_threads(threads)
    stage_a = load_pack()
    cfg = stage_a.StageAConfig()
    sd = random_state_dict(stage_a.StageA(cfg, device="meta"), seed=0)
    net = build_pack(stage_a, cfg, sd) if impl == "pack" else build_diffusers(cfg, sd)
    del sd
    lat = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    if impl == "pack":
        run = lambda: net.decode(lat)  # noqa: E731
    else:
        run = lambda: net.decode(lat * 0.43, return_dict=False)[0]  # noqa: E731
    gc.collect()
    base = _rss_bytes()
    times, img = [], None
    with torch.inference_mode():
        for _ in range(repeats):
            img = None
            t0 = time.perf_counter()
            img = run()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # A checksum lets the parent see that both processes computed the same image.
    print(f"RESULT {min(times):.3f} {(peak - base) / 2**20:.1f} {img.double().sum().item():.6e}")


def _spawn(impl: str, args: argparse.Namespace) -> tuple[float, float, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--latent", str(args.latent),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    t, mem, checksum = (float(v) for v in line.split()[1:])
    return t, mem, checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--latent", type=int, default=256, help="decode latent side (256 -> 1024^2 image)")
    parser.add_argument("--repeats", type=int, default=2, help="decodes per process (best time is kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("pack", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _decode_worker(args.worker, args.latent, args.repeats, args.threads)
        return
    torch.set_num_threads(args.threads)
    stage_a = load_pack()
    cfg = stage_a.StageAConfig()
    sd = random_state_dict(stage_a.StageA(cfg, device="meta"), seed=0)
    ours, ref = build_pack(stage_a, cfg, sd), build_diffusers(cfg, sd)
    print(f"Stage A release size: {sum(v.numel() for v in sd.values()):,} tensor elements")

    gen = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 256, 256, generator=gen)
    with torch.inference_mode():
        z_ours, z_ref = ours.encode_raw(img), ref.encode(img, return_dict=False)[0]
        enc = (z_ours - z_ref).abs().max().item()
        enc_off = (ours.encode(img) - z_ref / 0.43).abs().max().item()
        lat = torch.randn(1, 4, 64, 64, generator=gen)
        d_ours, d_ref = ours.decode(lat), ref.decode(lat * 0.43, return_dict=False)[0]
        dec = (d_ours - d_ref).abs().max().item()
        q_ours = ours.encode(img, quantize=True)
        q_ref = ref.vquantizer(z_ref)[0] / 0.43
        qd = (q_ours - q_ref).abs().max().item()
    print(f"parity fp32 (release size, 256^2 image / 64^2 latent): encode_raw max|d| {enc:.2e}, "
          f"encode (/0.43) {enc_off:.2e}, decode (x0.43) {dec:.2e}, quantized encode {qd:.2e} "
          f"(latent std {z_ref.std().item():.3f}, image std {d_ref.std().item():.3f})")
    if args.skip_timing:
        return

    side = args.latent
    t_ref, m_ref, sum_ref = _spawn("diffusers", args)
    print(f"diffusers PaellaVQModel.decode {side}^2 -> {4 * side}^2: {t_ref:.2f} s, peak +{m_ref:.0f} MiB")
    t_ours, m_ours, sum_ours = _spawn("pack", args)
    print(f"pack StageA.decode              {side}^2 -> {4 * side}^2: {t_ours:.2f} s, peak +{m_ours:.0f} MiB")
    print(f"speed-up x{t_ref / t_ours:.2f}, peak memory x{m_ours / max(m_ref, 1e-9):.2f}; "
          f"output sums {sum_ref:.6e} / {sum_ours:.6e}")


if __name__ == "__main__":
    main()
