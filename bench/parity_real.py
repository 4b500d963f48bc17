"""Stage C lite and Stage B lite at their real sizes: the pack vs diffusers' StableCascadeUNet, same weights.

Run (heavy: ~4.5 GB for Stage C lite, minutes on 2 cores):
    flock /tmp/scw-heavy.lock .venv/bin/python bench/parity_real.py [--stages c,b]

Random weights (seeded) in the original release layout are written to a temporary safetensors file and read
back; the pack infers its config from the keys (``from_state_dict``) and loads them, diffusers gets the
keys converted as its single-file converter does (SPEC §17.2). Prints the max abs difference in fp32.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Any

import torch
from benchlib import BENCH, cascade_module, file_module
from safetensors.torch import load_file, save_file


def stage_inputs(stage: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    if stage == "c":
        return dict(x=torch.randn(2, 16, 24, 24, generator=g), r=torch.tensor([0.43, 0.91]),
                    clip_text=torch.randn(2, 77, 1280, generator=g),
                    clip_text_pooled=torch.randn(2, 1, 1280, generator=g),
                    clip_img=torch.randn(2, 1, 768, generator=g))
    return dict(x=torch.randn(1, 4, 256, 256, generator=g), r=torch.tensor([0.67]),
                effnet=torch.randn(1, 16, 24, 24, generator=g), clip=torch.randn(1, 1, 1280, generator=g))


def run_diffusers(net: torch.nn.Module, stage: str, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    if stage == "c":
        return net(inp["x"], inp["r"], inp["clip_text_pooled"], clip_text=inp["clip_text"],
                   clip_img=inp["clip_img"]).sample
    return net(inp["x"], inp["r"], inp["clip"], effnet=inp["effnet"]).sample


def parity(stage: str, ref: Any, tmpdir: str) -> None:
    mod = cascade_module("stage_c" if stage == "c" else "stage_b")
    cls, cfg_cls = (mod.StageC, mod.StageCConfig) if stage == "c" else (mod.StageB, mod.StageBConfig)
    path = os.path.join(tmpdir, f"stage_{stage}_lite_random.safetensors")
    t0 = time.perf_counter()
    sd = ref.random_state_dict(cls(cfg_cls.lite(), device="meta"), seed=123)
    save_file(sd, path)
    del sd
    gc.collect()
    sd = load_file(path)
    cfg = cfg_cls.from_state_dict(sd)
    assert cfg == cfg_cls.lite(), cfg
    ours = cls(cfg, device="meta")
    ours.load_state_dict(sd, strict=True, assign=True)
    theirs = ref.build_diffusers_unet(cfg, sd)  # shares the tensors: one copy of the weights in memory
    n_params = sum(v.numel() for v in sd.values())
    print(f"stage {stage.upper()} lite: {n_params / 1e6:.1f}M params, prepared in {time.perf_counter() - t0:.1f}s",
          flush=True)
    inp = stage_inputs(stage)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = ours(**inp)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        expected = run_diffusers(theirs, stage, inp)
        t_theirs = time.perf_counter() - t0
    diff = (out - expected).abs().max().item()
    print(f"stage {stage.upper()} lite {tuple(inp['x'].shape)}: max|pack - diffusers| = {diff:.3e} "
          f"(max|diffusers| = {expected.abs().max().item():.3f}, "
          f"mean|diffusers| = {expected.abs().mean().item():.3f}); "
          f"forward {t_ours:.1f}s pack, {t_theirs:.1f}s diffusers", flush=True)
    os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="c,b", help="comma list of c, b")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = file_module("scw_diffusers_ref", os.path.join(BENCH, "diffusers_ref.py"))
    with tempfile.TemporaryDirectory(prefix="scw_parity_") as tmpdir:
        for stage in args.stages.split(","):
            parity(stage.strip(), ref, tmpdir)
            gc.collect()


if __name__ == "__main__":
    main()
