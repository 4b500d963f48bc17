"""cascade.kinds is the single declaration of the model kinds: every network kind builds from its entry, its
demo network is seeded and leaves the global RNG alone, detection finds each kind from the table, a new kind is
one more entry; cascade/ imports nothing of the layers above it; random_init.randomize_ is the one randomiser."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
import tiny_checkpoints as tc
import torch
from torch import nn

from comfyui_stablecascade.cascade import keymaps, kinds, loading
from comfyui_stablecascade.cascade.errors import CascadeError, WrongModelError
from comfyui_stablecascade.cascade.random_init import randomize_

CASCADE = tc.ROOT / "cascade"
NETWORK_KINDS = sorted(kinds.COMPONENT_KINDS)
DEMO_KINDS = sorted(name for name, k in kinds.KINDS.items() if k.demo is not None)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# One forward call per demo kind, with inputs of the demo's own sizes. A new demo kind fails
# test_every_demo_kind_has_a_forward_here until it gets a line here.
W = kinds.DEMO_TEXT_WIDTH
DEMO_FORWARD = {
    "stage_c": lambda m: m(torch.randn(1, 16, 4, 4, generator=_seeded(1)), torch.tensor([0.5]),
                           torch.randn(1, 77, W, generator=_seeded(2)), torch.randn(1, 1, W, generator=_seeded(3)),
                           torch.randn(1, 1, m.config.c_clip_img, generator=_seeded(4))),
    "stage_b": lambda m: m(torch.randn(1, 4, 16, 16, generator=_seeded(1)), torch.tensor([0.5]),
                           torch.randn(1, 16, 4, 4, generator=_seeded(2)), torch.randn(1, 1, W, generator=_seeded(3))),
    "stage_a": lambda m: m.decode(torch.randn(1, 4, 4, 4, generator=_seeded(1))),
    "effnet": lambda m: m.encode_image(torch.rand(1, 3, 64, 64, generator=_seeded(1))),
    "previewer": lambda m: m(torch.randn(1, 16, 4, 4, generator=_seeded(1))),
    "text_encoder": lambda m: m.encode(["a photo of a cat"]),
    "clip_vision": lambda m: m.encode(torch.rand(1, 64, 64, 3, generator=_seeded(1))),
}


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


# ---- the registry builds every kind ------------------------------------------------------------------


def test_registry_tables_are_derived_from_the_entries():
    assert list(kinds.KINDS) == [k.name for k in kinds._ALL]
    assert all(name == k.name for name, k in kinds.KINDS.items())
    assert kinds.COMPONENT_KINDS == tuple(k.name for k in kinds._ALL if k.network is not None)
    assert set(kinds.UNET_KINDS) == {k.name for k in kinds._ALL if k.unet} == {"stage_c", "stage_b"}
    assert set(kinds.TOWER_KINDS) == {k.name for k in kinds._ALL if k.tower} == {"text_encoder", "clip_vision"}
    for k in kinds._ALL:
        assert k.description and k.examples and k.label, k.name
        assert k.placement in ("diffusion", "vae", "text"), k.name
        assert kinds.describe(k.name) == k.description
        if k.network is not None:
            assert k.signatures and k.release, k.name  # detectable, and a file to install instead of the demo


@pytest.mark.parametrize("name", NETWORK_KINDS)
def test_every_network_kind_builds_its_tiny_config(name):
    cls, cfg_cls = kinds.get(name).classes()
    assert isinstance(cls, type) and issubclass(cls, nn.Module)
    assert tc.classes(name) == (cls, cfg_cls)  # the test helpers read the same table
    net = cls(cfg_cls.tiny())  # some constructors leave weights uninitialised: they are always loaded
    assert net.state_dict()
    assert cfg_cls.from_state_dict(net.state_dict()) == cfg_cls.tiny()  # loading infers the config back


def test_a_kind_without_a_network_says_so():
    with pytest.raises(CascadeError, match="'lora'"):
        kinds.get("lora").classes()
    with pytest.raises(CascadeError, match="no demo network of kind 'controlnet'.*'stage_c'"):
        kinds.get("controlnet").build_demo()


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(CascadeError) as e:
        kinds.get("nope")
    assert "'nope'" in str(e.value)
    for name in kinds.KINDS:
        assert repr(name) in str(e.value)


# ---- demo networks -----------------------------------------------------------------------------------


def test_every_demo_kind_has_a_forward_here():
    assert sorted(DEMO_FORWARD) == DEMO_KINDS


@pytest.mark.parametrize("name", DEMO_KINDS)
def test_demo_network_is_seeded_eval_and_finite(name):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    demo = kinds.demo_network(name)
    assert torch.equal(torch.random.get_rng_state(), state)  # constructors' draws are forked off
    cls, _ = kinds.get(name).classes()
    assert isinstance(demo, cls)
    assert not demo.training and not any(m.training for m in demo.modules())
    assert not any(p.requires_grad for p in demo.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in demo.parameters())
    # Seeded: another global RNG state gives the same weights; no parameter is left at a constant init.
    torch.manual_seed(99)
    again = kinds.demo_network(name)
    assert demo.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in demo.state_dict().items())
    assert all(p.numel() < 2 or p.std() > 0 for p in demo.parameters())
    with torch.no_grad():
        outputs = _outputs(DEMO_FORWARD[name](demo))
    assert outputs and all(torch.isfinite(o).all() and o.abs().max() > 0 for o in outputs)


def test_demo_networks_differ_between_kinds_and_take_a_dtype():
    a, b = kinds.demo_network("effnet"), kinds.demo_network("previewer")
    assert not torch.equal(next(a.parameters()).flatten()[:8], next(b.parameters()).flatten()[:8])
    half = kinds.demo_network("previewer", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(torch.equal(p.float(), q.to(torch.bfloat16).float()) for p, q in zip(half.parameters(), b.parameters()))


def test_demo_networks_fit_together():
    """The demo text encoder feeds the demo Stage C and Stage B (one width, DEMO_TEXT_WIDTH)."""
    text = kinds.demo_network("text_encoder")
    clip_text, pooled = text.encode(["a cat"])
    c, b = kinds.demo_network("stage_c").config, kinds.demo_network("stage_b").config
    assert clip_text.shape[-1] == pooled.shape[-1] == c.c_clip_text == c.c_clip_text_pooled == b.c_clip
    assert kinds.demo_network("effnet").config.c_latent == c.c_in == b.c_effnet


# ---- detection reads the table -----------------------------------------------------------------------


@pytest.mark.parametrize("name", NETWORK_KINDS)
def test_detection_finds_each_kind_of_tiny_file(name):
    det = keymaps.detect(tc.tiny_sd(name))
    assert det.kind == name and det.prefix == "" and not det.parts


def _register(monkeypatch, kind: kinds.Kind) -> None:
    """What one more entry in ``kinds._ALL`` gives at import: the table and the tuples derived from it, in every
    module of the pack that holds them."""
    entries = (*kinds._ALL, kind)
    new = {
        "_ALL": entries,
        "KINDS": {k.name: k for k in entries},
        "COMPONENT_KINDS": tuple(k.name for k in entries if k.network is not None),
        "UNET_KINDS": tuple(k.name for k in entries if k.unet),
        "TOWER_KINDS": tuple(k.name for k in entries if k.tower),
    }
    old = {name: getattr(kinds, name) for name in new}
    holders = [m for n, m in list(sys.modules.items()) if n.startswith("comfyui_stablecascade.") and m is not None]
    for module in holders:
        for name, value in new.items():
            if getattr(module, name, None) is old[name]:
                monkeypatch.setattr(module, name, value)


def test_a_new_kind_is_one_entry(monkeypatch, tmp_path):
    """A throwaway kind (the Previewer network, its convs stored under ``head.`` instead of ``blocks.``) is found
    by detection, described in messages and built, from its entry alone."""
    previewer = kinds.get("previewer")
    new = dataclasses.replace(
        previewer, name="previewer_head", description="a head-layout Previewer", examples="previewer_head.safetensors",
        signatures=(kinds.Signature("head.0.weight", ("head.24.weight",)),), roots=frozenset({"head"}),
        label="Head Previewer",
    )
    sd = {k.replace("blocks.", "head.", 1): v for k, v in tc.tiny_sd("previewer").items()}
    assert keymaps.detect(sd).kind == "unknown"  # before: no kind knows these keys
    _register(monkeypatch, new)
    det = keymaps.detect(sd)
    assert (det.kind, det.layout, det.prefix) == ("previewer_head", "original", "")
    assert "a head-layout Previewer" in det.describe()
    assert kinds.get("previewer_head").classes() == previewer.classes()
    assert keymaps.detect(tc.with_prefix(sd, "vae.")).prefix == "vae."
    # In a file with other components it is one part among them, in table order.
    mixed = keymaps.detect({**tc.tiny_sd("effnet"), **tc.with_prefix(sd, "x.")})
    assert [p.kind for p in mixed.parts] == ["effnet", "previewer_head"]
    # Loaders name it when it is given to another kind's loader.
    path = tc.save(tmp_path / "head.safetensors", sd)
    with pytest.raises(WrongModelError, match="a head-layout Previewer") as e:
        loading.load_stage_c(path)
    assert e.value.found == "previewer_head"


# ---- cascade/ knows no layer above it ----------------------------------------------------------------

ABOVE = {"host", "nodes", "pipeline", "samplers", "model_patches", "standalone", "comfy", "headless"}
PACK_NAMES = {"comfyui_stablecascade"}


def _imported_modules(path: Path, root: Path = CASCADE) -> list[tuple[int, str]]:
    """(line, dotted name from the pack root) of every import in ``path``, a file of the folder ``root`` (cascade/)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ["cascade", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                up = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else None
                base = ".".join(["<above the pack>"] if up is None else [*up, *([node.module] if node.module else [])])
            names = [f"{base}.{a.name}" if base else a.name for a in node.names] if node.module is None else [base]
            out += [(node.lineno, n) for n in names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            name = str(node.args[0].value)
            out.append((node.lineno, f"cascade{name}" if name.startswith(".") else name))
    return out


def _offends(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in PACK_NAMES:
        parts = parts[1:]
    return bool(parts) and (parts[0] in ABOVE or parts[0] == "<above the pack>")


def test_cascade_imports_nothing_from_the_layers_above():
    files = sorted(CASCADE.rglob("*.py"))
    assert len(files) > 10 and CASCADE / "kinds.py" in files
    offenders = [f"{f.relative_to(tc.ROOT)}:{line}: {name}" for f in files for line, name in _imported_modules(f)
                 if _offends(name)]
    assert not offenders, "cascade/ must not import the layers above it:\n" + "\n".join(offenders)


def test_the_import_check_sees_relative_and_absolute_imports(tmp_path):
    fake = tmp_path / "cascade" / "_probe.py"
    fake.parent.mkdir()
    fake.write_text("from .. import host\nfrom ..nodes.kinds import x\nimport comfy.model_management\n"
                    "from . import kinds\nfrom .errors import CascadeError\nimportlib.import_module('pipeline')\n")
    names = [n for _, n in _imported_modules(fake, fake.parent)]
    assert [n for n in names if _offends(n)] == ["host", "nodes.kinds", "comfy.model_management", "pipeline"]
    assert not any(_offends(n) for n in ("cascade.kinds", "torch.nn", "comfyui_stablecascade.cascade.errors"))
    assert all(_offends(n) for n in ("comfyui_stablecascade.samplers", "model_patches.lora", "standalone"))


# ---- random_init.randomize_ ----------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(400, 300)
        self.gamma = nn.Parameter(torch.zeros(16))


def _by_hand(net: nn.Module, seed: int, vector_std: float, unit_norm_weights: bool) -> dict[str, torch.Tensor]:
    """The documented rule: one generator, named_parameters order, N(0, 1/fan-in) matrices, 1-D
    vector_std * N(0, 1) plus 1 for norm scales (names ending "weight") when unit_norm_weights."""
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, p in net.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim > 1:
            out[name] = noise / p[0].numel() ** 0.5
        else:
            out[name] = float(unit_norm_weights and name.endswith("weight")) + vector_std * noise
    return out


@pytest.mark.parametrize("vector_std, unit_norm_weights", [(0.02, True), (0.5, False)])
def test_randomize_draws_in_named_parameter_order_from_its_seed(vector_std, unit_norm_weights):
    net = _Net()
    assert randomize_(net, 7, vector_std=vector_std, unit_norm_weights=unit_norm_weights) is net
    want = _by_hand(_Net(), 7, vector_std, unit_norm_weights)
    assert all(torch.equal(p, want[name]) for name, p in net.named_parameters())
    torch.manual_seed(5)  # another global state: the same weights
    other = randomize_(_Net(), 7, vector_std=vector_std, unit_norm_weights=unit_norm_weights)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), other.parameters()))
    assert not torch.equal(randomize_(_Net(), 8).proj.weight, randomize_(_Net(), 7).proj.weight)


def test_randomize_defaults_are_the_documented_rule():
    assert all(torch.equal(p, _by_hand(_Net(), 3, 0.02, True)[n]) for n, p in randomize_(_Net(), 3).named_parameters())


def test_randomize_leaves_the_global_rng_alone():
    net = _Net()
    state = torch.random.get_rng_state()
    randomize_(net, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_randomize_scales_by_fan_in_and_keeps_norms_near_one():
    net = randomize_(_Net(), seed=0)
    # fan-in = elements of one output row: 400 for the Linear, 8 * 3 * 3 for the conv.
    assert net.proj.weight.std().item() == pytest.approx(400 ** -0.5, rel=0.02)
    assert net.conv.weight.std().item() == pytest.approx(72 ** -0.5, rel=0.1)
    x = torch.randn(64, 400, generator=_seeded(1))
    assert net.proj(x).std().item() == pytest.approx(1.0, rel=0.05)  # O(1) activations
    # 1-D: norm scales ("...weight") at 1 + 0.02 N(0, 1), biases and gates at 0.02 N(0, 1).
    for p in (net.norm.weight, net.conv.bias, net.norm.bias, net.proj.bias, net.gamma):
        centre = 1.0 if p is net.norm.weight else 0.0
        assert (p - centre).abs().max().item() < 0.1 and (p - centre).abs().max().item() > 0
    wide = randomize_(_Net(), seed=0, vector_std=0.5, unit_norm_weights=False)
    assert (wide.norm.weight.abs().max() > 0.5) and wide.norm.weight.abs().max() < 3  # 0.5 N(0, 1), no +1
    assert torch.equal(wide.proj.weight, net.proj.weight)  # matrices do not depend on the 1-D rule
