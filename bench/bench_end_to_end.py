"""End-to-end text-to-image: the pack's nodes vs diffusers' Stable Cascade pipelines, same weights and steps.

Run (heavy: ~10 GB of RAM per side, ~10 GB of files under --workdir, a few minutes a side on 2 cores):
    flock /tmp/scw-heavy.lock .venv/bin/python bench/bench_end_to_end.py [--width 512 --height 512]
        [--c-steps 4 --c-cfg 4 --b-steps 2 --b-cfg 1.1] [--repeats 1] [--sides pack,diffusers]

Weights: seeded random Stage C lite, Stage B lite, Stage A and the CLIP ViT-bigG text encoder at their real
sizes, written once to ``--workdir`` (reused while the marker's parameters match): the original layouts in a
ComfyUI-style ``models/`` folder for the pack, diffusers/transformers layouts (split q/k/v, PaellaVQModel,
CLIPTextModelWithProjection) for diffusers. Files are stored in ``--file-dtype`` (bf16, as released; Stage A
fp32) and both sides compute in fp32.

Each side runs in a fresh subprocess after its files were read once (warm page cache for both):
- pack: an API-format prompt of the shipped text-to-image graph (loaders, two SCW_TextEncode, SCW_EmptyLatent,
  SCW_StageCSampler, SCW_StageBSampler, SCW_StageADecode, SaveImage) checked by ``standalone.executor.validate`` and run in
  ``executor.execution_order`` with the built-in host manager, each node's outputs handed back
  (``host.forget``) after their last consumer ran, as ``executor.execute`` does;
- diffusers: StableCascadePriorPipeline + StableCascadeDecoderPipeline built from the components in code;
  the prompt is encoded once (``encode_prompt``) and the embeddings are passed to both pipelines, as the pack
  encodes once for both stages. ``--diffusers-load meta`` (default) loads each U-Net / VQGAN as diffusers'
  ``from_pretrained`` does with accelerate installed (meta model, whole file read, cast per tensor, assign);
  ``from_pretrained`` calls it as it runs here without accelerate (random init, then copy).

Guidance, same network evaluations on both sides: Stage C cfg > 1 -> batch 2 on both. Stage B: the pack at
``--b-cfg`` != 1 runs two branches; diffusers' decoder guides only when guidance_scale > 1, so it gets
``--b-cfg`` too (default 1.1: both guided). ``--b-cfg 1`` runs both unguided.

Memory: a thread samples VmRSS / RssAnon / RssFile every 20 ms and keeps each phase's peak; the process peak
is ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from benchlib import ROOT, file_module, pack_module

PHASES = ("load", "text", "stage_c", "stage_b", "stage_a", "save")
PROMPT = "cinematic photo of a red fox sitting in fresh snow at golden hour, shallow depth of field"
FILES = {  # name -> path under workdir
    "pack_c": "models/diffusion_models/stage_c_lite_bf16.safetensors",
    "pack_b": "models/diffusion_models/stage_b_lite_bf16.safetensors",
    "pack_a": "models/vae/stage_a.safetensors",
    "pack_te": "models/text_encoders/text_encoder_bigg.safetensors",
    "diff_c": "diffusers/prior/diffusion_pytorch_model.safetensors",
    "diff_b": "diffusers/decoder/diffusion_pytorch_model.safetensors",
    "diff_a": "diffusers/vqgan/diffusion_pytorch_model.safetensors",
    "diff_te": "diffusers/text_encoder/model.safetensors",
}


def _pack(name: str) -> Any:
    """``comfyui_stablecascade.<name>``, the package loaded as ComfyUI loads a custom-node folder."""
    return pack_module(name)


# ----------------------------------------------------------------------------- weights, written once


def _random_unet_sd(net: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """bench/diffusers_ref.py's scaling (activations O(1) through a deep random U-Net), cast tensor by tensor."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in net.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith((".gamma", ".beta")):
            v = torch.randn(shape, generator=gen) * 0.5
        elif key.endswith("bias"):
            v = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else 1
            if key.endswith("depthwise.weight"):
                fan_in = shape[-1] * shape[-2]
            v = torch.randn(shape, generator=gen) / fan_in**0.5
        sd[key] = v.to(dtype)
    return sd


def _random_text_sd(keys: dict[str, torch.Tensor], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CLIP text tower weights: unit-gain LayerNorms, 0.02 embeddings, 1/sqrt(fan_in) linears."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in keys.items():
        shape = tuple(t.shape)
        if "norm" in key and key.endswith("weight"):
            v = 1.0 + torch.randn(shape, generator=gen) * 0.1
        elif key.endswith("bias"):
            v = torch.randn(shape, generator=gen) * 0.02
        elif "embedding" in key:
            v = torch.randn(shape, generator=gen) * 0.02
        else:
            v = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        sd[key] = v.to(dtype)
    return sd


def prepare(workdir: Path, file_dtype: torch.dtype, seed: int) -> None:
    """Write every file once; a marker holding the parameters makes later runs reuse them."""
    marker = workdir / "weights.json"
    want = {"file_dtype": str(file_dtype), "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        print(f"reusing the weights in {workdir}")
        return
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
    from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    ref = file_module("scw_diffusers_ref", os.path.join(ROOT, "bench", "diffusers_ref.py"))
    pa = file_module("scw_parity_stage_a", os.path.join(ROOT, "bench", "parity_stage_a.py"))
    stage_c, stage_b, stage_a, text = (_pack(f"cascade.{m}") for m in ("stage_c", "stage_b", "stage_a", "text"))

    def save(name: str, sd: dict[str, torch.Tensor]) -> None:
        path = workdir / FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        print(f"  wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)

    t0 = time.perf_counter()
    for tag, mod, cfg, sub in (("c", stage_c, stage_c.StageCConfig.lite(), "prior"),
                               ("b", stage_b, stage_b.StageBConfig.lite(), "decoder")):
        cls = mod.StageC if tag == "c" else mod.StageB
        sd = _random_unet_sd(cls(cfg, device="meta"), seed + ord(tag), file_dtype)
        save(f"pack_{tag}", sd)
        save(f"diff_{tag}", ref.to_diffusers_keys(sd))
        del sd
        with torch.device("meta"):
            StableCascadeUNet(**ref.diffusers_config(cfg)).save_config(str(workdir / "diffusers" / sub))
    cfg_a = stage_a.StageAConfig()
    sd = pa.random_state_dict(stage_a.StageA(cfg_a, device="meta"), seed=seed)
    save("pack_a", sd)
    save("diff_a", pa.to_diffusers_keys(sd))
    with torch.device("meta"):
        PaellaVQModel(levels=cfg_a.levels, bottleneck_blocks=cfg_a.bottleneck_blocks, embed_dim=cfg_a.c_hidden,
                      latent_channels=cfg_a.c_latent, num_vq_embeddings=cfg_a.codebook_size,
                      scale_factor=stage_a.SCALE_FACTOR).save_config(str(workdir / "diffusers" / "vqgan"))
    del sd
    te_cfg = text.TextEncoderConfig.bigg().to_transformers()
    with torch.device("meta"):
        skeleton = CLIPTextModelWithProjection(te_cfg)
    save("diff_te", _random_text_sd(skeleton.state_dict(), seed + 7, file_dtype))
    te_cfg.save_pretrained(str(workdir / "diffusers" / "text_encoder"))
    # The pack reads the same transformers-layout file (the release's text_encoder/model.safetensors).
    link = workdir / FILES["pack_te"]
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(workdir / FILES["diff_te"])
    marker.write_text(json.dumps(want))
    print(f"weights written in {time.perf_counter() - t0:.0f} s")


# ----------------------------------------------------------------------------- measurement


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


class Recorder:
    """Phase wall times (summed over visits) and per-phase peaks of VmRSS / RssAnon, sampled by a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.phase = interval, "start"
        self.times: dict[str, float] = {}
        self.peaks: dict[str, dict[str, int]] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        s = _status_kb()
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            for k, v in s.items():
                peak[k] = max(peak.get(k, 0), v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sample()
        with self._lock:
            outer, self.phase = self.phase, phase
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
            self._sample()
            with self._lock:
                self.phase = outer

    def mark(self, name: str) -> None:
        self.marks[name] = _status_kb()

    def result(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"times": self.times, "peaks_kb": self.peaks, "marks_kb": self.marks,
                "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _image_stats(img: torch.Tensor) -> dict[str, float]:
    img = img.double()
    return {"mean": float(img.mean()), "std": float(img.std()), "finite": bool(torch.isfinite(img).all()),
            "shape": list(img.shape)}


# ----------------------------------------------------------------------------- the two sides


def run_pack(args: argparse.Namespace, rec: Recorder) -> dict:
    os.environ["SCW_NO_COMFY"] = "1"
    headless = _pack("standalone.executor")
    host = _pack("host")
    host.set_models_dir(str(Path(args.workdir) / "models"))
    name = lambda k: FILES[k].split("/", 2)[2]  # noqa: E731  (path inside its models/ subfolder)
    sampler = {"sampler": "ddpm", "denoise": 1.0, "seed": args.seed}
    prompt = {
        "1": {"class_type": "SCW_StageCLoader", "inputs": {"file_name": name("pack_c"), "weight_dtype": "fp32"}},
        "2": {"class_type": "SCW_TextEncoderLoader", "inputs": {"file_name": name("pack_te"), "weight_dtype": "fp32"}},
        "3": {"class_type": "SCW_StageBLoader", "inputs": {"file_name": name("pack_b"), "weight_dtype": "fp32"}},
        "4": {"class_type": "SCW_StageALoader", "inputs": {"file_name": name("pack_a"), "weight_dtype": "fp32"}},
        "5": {"class_type": "SCW_TextEncode", "inputs": {"text_encoder": ["2", 0], "text": PROMPT}},
        "6": {"class_type": "SCW_TextEncode", "inputs": {"text_encoder": ["2", 0], "text": ""}},
        "7": {"class_type": "SCW_EmptyLatent", "inputs": {"width": args.width, "height": args.height,
                                                          "batch_size": 1, "compression": 42.67}},
        "8": {"class_type": "SCW_StageCSampler", "inputs": {
            "stage_c": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "latent": ["7", 0],
            "steps": args.c_steps, "cfg": args.c_cfg, "shift": 2.0, "rescale": 0.7, **sampler}},
        "9": {"class_type": "SCW_StageBSampler", "inputs": {
            "stage_b": ["3", 0], "positive": ["5", 0], "negative": ["6", 0], "stage_c": ["8", 0],
            "latent": ["7", 1], "steps": args.b_steps, "cfg": args.b_cfg, "shift": 1.0, "rescale": 0.0, **sampler}},
        "10": {"class_type": "SCW_StageADecode", "inputs": {"stage_a": ["4", 0], "latent": ["9", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "scw_e2e_pack"}},
    }
    phase_of = {"SCW_TextEncode": "text", "SCW_StageCSampler": "stage_c", "SCW_StageBSampler": "stage_b",
                "SCW_StageADecode": "stage_a", "SaveImage": "save", "SCW_EmptyLatent": "text"}
    classes = headless.node_classes()
    order = headless.execution_order(prompt, classes)
    headless.validate({i: prompt[i] for i in order}, classes)
    staged = args.worker == "pack_staged"
    if staged:
        # A fixed hand-written order with everything unloaded after each stage: a reference point for what the
        # headless executor now does on its own.
        order = ["2", "5", "6", "7", "1", "8", "3", "9", "4", "10", "11"]
    last_use = {src[0]: node_id for node_id in order for src in prompt[node_id]["inputs"].values()
                if isinstance(src, list)}
    output = _pack("standalone.core_standins").OutputPlan(out=str(Path(args.out_dir) / f"{args.worker}.png"))
    results: dict[str, tuple] = {}
    per_node, held, image = [], {}, None
    weights = {"1": "stage_c", "2": "text_encoder", "3": "stage_b", "4": "stage_a"}
    for node_id in order:
        entry = prompt[node_id]
        cls = classes[entry["class_type"]]
        kwargs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in entry["inputs"].items()}
        kwargs.update(headless._hidden_inputs(cls, node_id, prompt, None))
        if entry["class_type"] == "SaveImage":
            kwargs["output"] = output
        phase = phase_of.get(entry["class_type"], "load")
        t0 = time.perf_counter()
        with rec(phase):
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            results[node_id] = tuple(out.get("result", ()) if isinstance(out, dict) else out)
            if node_id in weights:
                held[weights[node_id]] = sum(t.numel() * t.element_size()
                                             for t in host.module_of(results[node_id][0]).state_dict().values())
            if node_id == "10":
                image = _image_stats(results["10"][0])
            del kwargs, out
            done = [src for src, last in last_use.items() if last == node_id]
            if staged:
                if any(src in weights for src in done):
                    host.unload_all()
                for src in done:
                    results.pop(src, None)
                gc.collect()
            else:
                # What headless.execute does: a node's outputs go after their last consumer ran.
                for src in done:
                    host.forget(results.pop(src, ()))
        per_node.append((node_id, entry["class_type"], round(time.perf_counter() - t0, 2),
                         _status_kb()["VmRSS"] // 1024))
    rec.mark("end")
    return {"image": image, "order": per_node, "weights_bytes": held,
            "resident_at_end": [type(m).__name__ for m in host.loaded_handles()]}


def _load_diffusers_model(cls: Any, folder: Path, mode: str) -> torch.nn.Module:
    if mode == "from_pretrained":
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    from diffusers.models.model_loading_utils import load_state_dict

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(folder)))
    sd = load_state_dict(str(folder / "diffusion_pytorch_model.safetensors"))  # diffusers' own reader
    cast = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    del sd, cast
    return model.eval()


def run_diffusers(args: argparse.Namespace, rec: Recorder) -> dict:
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
    from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast

    d = Path(args.workdir) / "diffusers"
    with rec("load"):
        tokenizer = CLIPTokenizerFast.from_pretrained(os.path.join(ROOT, "cascade", "tokenizer"), local_files_only=True)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(str(d / "text_encoder"), dtype=torch.float32).eval()
        prior = _load_diffusers_model(StableCascadeUNet, d / "prior", args.diffusers_load)
        decoder = _load_diffusers_model(StableCascadeUNet, d / "decoder", args.diffusers_load)
        vqgan = _load_diffusers_model(PaellaVQModel, d / "vqgan", args.diffusers_load)
        prior_pipe = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                                                scheduler=DDPMWuerstchenScheduler(), resolution_multiple=42.67,
                                                feature_extractor=None, image_encoder=None)
        decoder_pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=text_encoder,
                                                    scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan,
                                                    latent_dim_scale=10.67)
        for p in (prior_pipe, decoder_pipe):
            p.set_progress_bar_config(disable=True)
    rec.mark("after_load")
    with rec("text"), torch.no_grad():
        embeds = prior_pipe.encode_prompt(device=torch.device("cpu"), batch_size=1, num_images_per_prompt=1,
                                          do_classifier_free_guidance=args.c_cfg > 1, prompt=PROMPT,
                                          negative_prompt="")
    names = ("prompt_embeds", "prompt_embeds_pooled", "negative_prompt_embeds", "negative_prompt_embeds_pooled")
    embeds = dict(zip(names, embeds))
    with rec("stage_c"):
        prior_out = prior_pipe(height=args.height, width=args.width, num_inference_steps=args.c_steps,
                               guidance_scale=args.c_cfg, generator=torch.Generator().manual_seed(args.seed),
                               output_type="pt", **embeds)
    decoder_embeds = dict(embeds)
    if args.b_cfg <= 1:
        decoder_embeds["negative_prompt_embeds"] = decoder_embeds["negative_prompt_embeds_pooled"] = None
    # Stage B ends where the pipeline hands its latent to the VQGAN: time the decode as its own phase.
    original_decode = vqgan.decode

    def timed_decode(*a: Any, **k: Any) -> Any:
        with rec("stage_a"):
            return original_decode(*a, **k)

    vqgan.decode = timed_decode
    with rec("stage_b"):
        images = decoder_pipe(image_embeddings=prior_out.image_embeddings, num_inference_steps=args.b_steps,
                              guidance_scale=args.b_cfg, generator=torch.Generator().manual_seed(args.seed),
                              output_type="pt", **decoder_embeds).images
    # stage_b's clock ran through the nested stage_a phase: take that share out.
    rec.times["stage_b"] -= rec.times.get("stage_a", 0.0)
    with rec("save"):
        from PIL import Image

        arr = images[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(Path(args.out_dir) / "diffusers.png")
    rec.mark("end")
    held = {k: sum(t.numel() * t.element_size() for t in m.state_dict().values())
            for k, m in (("stage_c", prior), ("text_encoder", text_encoder), ("stage_b", decoder), ("stage_a", vqgan))}
    return {"image": _image_stats(images), "weights_bytes": held}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # Imports before the clock on both sides (inside ComfyUI, transformers is imported long before a run).
    if args.worker == "diffusers":
        import diffusers.pipelines.stable_cascade  # noqa: F401
    else:
        _pack("nodes")
    from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast  # noqa: F401

    rec = Recorder()
    t0 = time.perf_counter()
    info = (run_diffusers if args.worker == "diffusers" else run_pack)(args, rec)
    total = time.perf_counter() - t0
    out = {**rec.result(), **info, "total": total}
    Path(args.json_out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- orchestration


def _warm(paths: list[Path]) -> None:
    """Read files once so each side loads from the page cache (the same condition for both)."""
    for p in paths:
        with open(p.resolve(), "rb") as f:
            while f.read(1 << 24):
                pass


def spawn(side: str, args: argparse.Namespace) -> dict:
    keys = [k for k in FILES if k.startswith("diff_" if side == "diffusers" else "pack_")]
    _warm([Path(args.workdir) / FILES[k] for k in keys])
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--json-out", out]
    for k in ("workdir", "width", "height", "c_steps", "c_cfg", "b_steps", "b_cfg", "seed", "threads",
              "diffusers_load", "out_dir"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["process_wall"] = time.perf_counter() - t0
    return res


def _mib(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def table(best: dict[str, dict]) -> str:
    """Markdown table, one column per side, then each other side's ratio to diffusers."""
    sides = [s for s in ("pack", "pack_staged", "diffusers") if s in best]
    others = [s for s in sides if s != "diffusers"]
    head = " | ".join(sides + [f"{s} / diffusers" for s in others if "diffusers" in best])
    rows = [f"| measure | {head} |", "|---" + "|---:" * (len(sides) + len(others) * ("diffusers" in best)) + "|"]

    def row(label: str, get: Any, fmt: Any) -> None:
        vals = {s: get(best[s]) for s in sides}
        cells = [fmt(vals[s]) for s in sides]
        if "diffusers" in best:
            cells += [f"{vals[s] / vals['diffusers']:.2f}" if vals["diffusers"] else "-" for s in others]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    secs = lambda v: f"{v:.1f}"  # noqa: E731
    for ph in PHASES:
        row(f"time: {ph} (s)", lambda r, ph=ph: r["times"].get(ph, 0.0), secs)
    row("time: total in worker (s)", lambda r: r["total"], secs)
    row("time: process incl. imports (s)", lambda r: r["process_wall"], secs)
    row("**peak RSS, process (ru_maxrss, MiB)**", lambda r: r["ru_maxrss_kb"], _mib)
    for key in ("VmRSS", "RssAnon"):
        for ph in PHASES[:-1]:
            row(f"peak {key} during {ph} (MiB)", lambda r, ph=ph, key=key: r["peaks_kb"].get(ph, {}).get(key, 0),
                _mib)
    row("VmRSS at end (MiB)", lambda r: r["marks_kb"]["end"]["VmRSS"], _mib)
    row("weights loaded, fp32 (MiB)", lambda r: sum(r["weights_bytes"].values()) / 1024, _mib)
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--c-steps", type=int, default=4)
    p.add_argument("--c-cfg", type=float, default=4.0)
    p.add_argument("--b-steps", type=int, default=2)
    p.add_argument("--b-cfg", type=float, default=1.1, help="pack cfg and diffusers guidance_scale of Stage B")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating which side goes first")
    p.add_argument("--sides", default="pack,diffusers,pack_staged",
                   help="pack_staged: the pack's nodes with each network loaded just before and dropped after its stage")
    p.add_argument("--diffusers-load", choices=("meta", "from_pretrained"), default="meta")
    p.add_argument("--file-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--workdir", default="/tmp/scw_e2e_bench")
    p.add_argument("--out-dir", default=None, help="where the two PNGs go (default: <workdir>/out)")
    p.add_argument("--worker", choices=("pack", "pack_staged", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out_dir = args.out_dir or str(Path(args.workdir) / "out")
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {platform.processor() or platform.machine()}")
    print(f"parameters: {args.width}x{args.height}, batch 1, fp32 compute, files {args.file_dtype}; Stage C lite "
          f"{args.c_steps} steps cfg {args.c_cfg}; Stage B lite {args.b_steps} steps cfg {args.b_cfg} (diffusers "
          f"guidance_scale {args.b_cfg}); seed {args.seed}; diffusers load: {args.diffusers_load}")
    prepare(Path(args.workdir), torch.bfloat16 if args.file_dtype == "bf16" else torch.float32, args.seed)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            res = spawn(side, args)
            runs[side].append(res)
            print(f"{side} run {i + 1}: total {res['total']:.1f} s, peak {_mib(res['ru_maxrss_kb'])} MiB, image "
                  f"{res['image']}", flush=True)
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    best = {s: min(r, key=lambda x: x["total"]) for s, r in runs.items()}
    print(f"\nBest of {args.repeats} run(s) per side (by total time):\n")
    print(table(best))
    for side in best:
        if side.startswith("pack"):
            print(f"\n{side} node order (node, class, s, VmRSS MiB after):", best[side]["order"])
            print(f"{side} networks resident in the built-in manager at the end:", best[side]["resident_at_end"])
    summary = Path(args.workdir) / "results.json"
    summary.write_text(json.dumps({"args": vars(args), "load_start": load0, "load_end": load1, "runs": runs},
                                  indent=1))
    print(f"raw results: {summary}")


if __name__ == "__main__":
    main()
