"""The text and vision encoders work when an optional dependency of transformers is broken.

A torchaudio that does not match torch raises ``OSError: Could not load this library: ..._torchaudio.abi3.so``
on import. transformers imports it whenever it is installed, from its CLIP *modelling* import
(``modeling_clip`` -> ``modeling_layers`` -> ``processing_utils`` -> ``audio_utils``); the pack's towers are
pure torch and only the tokenizer comes from transformers, so the pack must keep working. Each case runs in a
subprocess with a fake broken ``torchaudio`` first on ``sys.path``; the subprocess first checks that the
simulation really breaks transformers' CLIP modelling import, then loads the pack as tests/conftest.py does,
loads tiny text-encoder and CLIP-vision files and encodes, comparing with outputs computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_checkpoints as tc
import torch
from comfyui_stablecascade.cascade import loading

# (file name, source) of the fake package; both raise what a mismatched torchaudio wheel raises.
BROKEN_TORCHAUDIO = {
    "on_import": {"__init__.py": 'raise OSError("Could not load this library: /fake/site-packages/torchaudio/lib/'
                                 '_torchaudio.abi3.so")\n'},
    "in_a_submodule": {"__init__.py": "from . import _extension  # noqa: F401\n",
                       "_extension.py": 'raise OSError("Could not load this library: /fake/site-packages/torchaudio/'
                                        'lib/libtorchaudio.so: undefined symbol: _ZN3c10...")\n'},
}

CHILD = textwrap.dedent("""
    import importlib.util, os, sys
    import torch

    fake, root, work = sys.argv[1], sys.argv[2], sys.argv[3]
    assert sys.path[0] != fake
    sys.path.insert(0, fake)

    # The simulation is real: torchaudio raises OSError and transformers' CLIP modelling import fails.
    try:
        import torchaudio  # noqa: F401
    except OSError:
        pass
    else:
        raise SystemExit("the fake torchaudio imported")
    try:
        from transformers import CLIPTextModelWithProjection  # noqa: F401
    except Exception as exc:
        print("transformers CLIP modelling import fails:", type(exc).__name__, exc)
    else:
        raise SystemExit("transformers' CLIP modelling imported despite the broken torchaudio: no simulation")

    spec = importlib.util.spec_from_file_location("comfyui_stablecascade", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_stablecascade"] = pack
    spec.loader.exec_module(pack)
    from comfyui_stablecascade.cascade import loading

    text = loading.load_text_encoder(os.path.join(work, "text.safetensors"))
    vision = loading.load_clip_vision(os.path.join(work, "vision.safetensors"))
    ref = torch.load(os.path.join(work, "ref.pt"))
    clip_text, pooled = text.encode(ref["prompts"])
    embeds = vision.encode(ref["images"])
    assert torch.equal(clip_text, ref["clip_text"]), (clip_text - ref["clip_text"]).abs().max()
    assert torch.equal(pooled, ref["pooled"]), (pooled - ref["pooled"]).abs().max()
    assert torch.equal(embeds, ref["embeds"]), (embeds - ref["embeds"]).abs().max()

    # The pack's nodes too (built-in host): the loader node and SCW_TextEncode.
    mappings = pack.NODE_CLASS_MAPPINGS
    (handle,) = mappings["SCW_TextEncoderLoader"]().load("text.safetensors", "default")
    ((cond, extra),) = mappings["SCW_TextEncode"]().encode(handle, ref["prompts"][0])[0]
    one_text, one_pooled = text.encode(ref["prompts"][:1])  # one prompt: the batch of one the node encodes
    assert torch.equal(cond, one_text) and torch.equal(extra["pooled_output"], one_pooled)
    print("OK", tuple(clip_text.shape), tuple(embeds.shape))
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny files (ComfyUI's text-encoder layout, transformers' vision keys) and the outputs they give here."""
    d = tmp_path_factory.mktemp("optional_deps")
    (d / "text_encoders").mkdir()
    text_sd, vision_sd = tc.tiny_sd("text_encoder", seed=3), tc.tiny_sd("clip_vision", seed=4)
    tc.save(d / "text.safetensors", tc.comfyui_text(text_sd))
    tc.save(d / "text_encoders" / "text.safetensors", tc.comfyui_text(text_sd))
    tc.save(d / "vision.safetensors", vision_sd)
    prompts = ["a photo of a cat", ""]
    images = torch.rand(2, 240, 200, 3, generator=torch.Generator().manual_seed(0))
    clip_text, pooled = loading.load_text_encoder(d / "text.safetensors").encode(prompts)
    embeds = loading.load_clip_vision(d / "vision.safetensors").encode(images)
    torch.save({"prompts": prompts, "images": images, "clip_text": clip_text, "pooled": pooled, "embeds": embeds},
               d / "ref.pt")
    return d


@pytest.mark.parametrize("how", sorted(BROKEN_TORCHAUDIO))
def test_encoders_work_with_a_broken_torchaudio(tmp_path: Path, work: Path, how: str) -> None:
    fake = tmp_path / "fake_site"
    (fake / "torchaudio").mkdir(parents=True)
    for name, source in BROKEN_TORCHAUDIO[how].items():
        (fake / "torchaudio" / name).write_text(source)
    env = {**os.environ, "SCW_NO_COMFY": "1", "SCW_MODELS_DIR": str(work), "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(fake), str(tc.ROOT), str(work)], env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "transformers CLIP modelling import fails: OSError" in out, out[-3000:]
    assert "OK (2, 77, " in out, out[-3000:]
