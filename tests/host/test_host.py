"""host outside ComfyUI: the built-in memory manager, patches, interruption, progress and model folders."""

import os

import pytest
import torch
from torch import nn

from comfyui_stablecascade import host
from comfyui_stablecascade.host import builtin, folders
from comfyui_stablecascade.cascade.errors import CascadeError, CheckpointError, SamplingInterrupted, ShapeError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/host/ -> the repo
# Every test but the last covers the built-in backend; inside ComfyUI the facade forwards to ComfyUI's manager.
builtin_only = pytest.mark.skipif(host.in_comfyui(), reason="covers the built-in manager; ComfyUI is importable here")


@pytest.fixture(autouse=True)
def _clean_host():
    host.unload_all()
    host.set_memory_budget(None)
    host.request_interrupt(False)
    yield
    host.unload_all()
    host.set_memory_budget(None)
    host.request_interrupt(False)
    host.set_progress_hook(None)
    host.set_models_dir(None)


def _net(width: int, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4)).to(dtype)


def _bits(module: nn.Module) -> dict:
    """Every tensor of the state dict, cloned, for bit-exact comparisons."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@builtin_only
def test_outside_comfyui_devices_and_operations():
    assert not host.in_comfyui()
    assert host.offload_device() == torch.device("cpu")
    assert host.intermediate_device() == torch.device("cpu")
    assert host.operations() is nn
    assert host.free_memory(torch.device("cpu")) > 0


@builtin_only
def test_load_offloads_least_recently_used_within_budget():
    a, b, c = (host.wrap(_net(64, seed=i), "stage_c") for i in range(3))
    size = a.model_size()
    assert size == builtin.module_size(a.module) == sum(p.numel() * 4 for p in a.module.parameters())
    host.set_memory_budget(2 * size + size // 2)
    host.load([a])
    host.load([b])
    assert host.loaded_handles() == [a.module, b.module]
    host.load([c])  # a is the least recently used: it leaves
    assert host.loaded_handles() == [b.module, c.module]
    host.load([b])  # touching b makes c the oldest
    host.load([a])
    assert host.loaded_handles() == [b.module, a.module]
    # The activation memory counts too: room for a alone.
    host.load([a], memory_required=size + size // 4)
    assert host.loaded_handles() == [a.module]


@builtin_only
def test_budget_from_environment(monkeypatch):
    monkeypatch.setenv("SCW_MEMORY_BUDGET", "1.5K")
    assert host.memory_budget() == 1536
    host.set_memory_budget(4096)  # the override wins over the environment
    assert host.memory_budget() == 4096
    host.set_memory_budget(None)
    monkeypatch.setenv("SCW_MEMORY_BUDGET", "lots")
    with pytest.raises(CascadeError, match="SCW_MEMORY_BUDGET"):
        host.memory_budget()


@builtin_only
def test_patch_and_unpatch_are_bit_exact_in_bf16():
    base = host.wrap(_net(32, torch.bfloat16), "stage_c")
    original = _bits(base.module)
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) * 0.01
    lora = base.clone()
    assert lora.add_patches({"0.weight": delta}, strength=0.5, key="lora_a") == ["0.weight"]
    host.load([lora])
    expected = (original["0.weight"].float() + 0.5 * delta).to(torch.bfloat16)
    assert torch.equal(lora.module[0].weight, expected)
    assert not torch.equal(lora.module[0].weight, original["0.weight"])
    host.load([base])  # the same network: the clone's patch comes off exactly
    assert _same_bits(_bits(base.module), original)


@builtin_only
def test_clone_isolation_and_switching_between_clones():
    base = host.wrap(_net(16), "stage_b")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    host.load([base])
    ref = base.module(x)
    one, two = base.clone(), base.clone()
    one.add_patches({"2.bias": torch.ones(4)}, key="one")
    two.add_patches({"2.bias": -torch.ones(4)}, key="two")
    assert base.patch_keys() == [] and one.patch_keys() == ["one"] and two.patch_keys() == ["two"]
    host.load([one])
    assert torch.allclose(one.module(x), ref + 1)
    host.load([two])
    assert torch.allclose(two.module(x), ref - 1)
    host.load([base])
    assert torch.equal(base.module(x), ref)


@builtin_only
def test_function_patches_and_removal_by_key():
    base = host.wrap(_net(8), "stage_c")
    w0 = base.module[0].weight.detach().clone()
    up, down = torch.randn(8, 2), torch.randn(2, 8)
    clone = base.clone()
    clone.add_patches({"0.weight": lambda w: up @ down}, strength=2.0, key="low_rank")
    clone.add_patches({"0.weight": torch.full((8, 8), 0.25)}, key="flat")
    host.load([clone])
    assert torch.allclose(clone.module[0].weight, w0 + 2 * up @ down + 0.25, atol=1e-6)
    clone.remove_patches("low_rank")
    assert clone.patch_keys() == ["flat"]
    host.load([clone])  # a new patch version: rewritten from the saved weights, not on top of the old patch
    assert torch.allclose(clone.module[0].weight, w0 + 0.25, atol=1e-6)


@builtin_only
def test_patch_errors_name_the_key_or_shape():
    handle = host.wrap(_net(8), "stage_b")
    with pytest.raises(CascadeError, match="not weights of this network"):
        handle.add_patches({"down_blocks.0.weight": torch.zeros(1)})
    with pytest.raises(ShapeError, match=r"\(3, 3\)"):
        handle.add_patches({"0.weight": torch.zeros(3, 3)})


@builtin_only
def test_failing_patch_restores_every_weight():
    base = host.wrap(_net(8), "stage_c")
    original = _bits(base.module)
    clone = base.clone()

    def broken(weight):
        raise RuntimeError("bad patch")

    clone.add_patches({"0.weight": torch.ones(8, 8), "2.weight": broken})
    with pytest.raises(RuntimeError, match="bad patch"):
        host.load([clone])
    assert _same_bits(_bits(base.module), original)
    assert not clone.patcher.is_patched()


@builtin_only
def test_interrupt_raises_once_and_leaves_the_model_unpatched():
    base = host.wrap(_net(8), "stage_c")
    original = _bits(base.module)
    clone = base.clone()
    clone.add_patches({"0.bias": torch.ones(8)}, key="lora")
    with pytest.raises(SamplingInterrupted):
        with host.using([clone], memory_required=0):
            assert clone.patcher.is_patched()
            host.request_interrupt()
            host.check_interrupt()
    assert not clone.patcher.is_patched()
    assert _same_bits(_bits(base.module), original)
    host.check_interrupt()  # the flag was consumed


@builtin_only
def test_interrupt_from_a_flag_file(tmp_path, monkeypatch):
    flag = tmp_path / "stop"
    monkeypatch.setenv("SCW_INTERRUPT", str(flag))
    host.check_interrupt()
    flag.write_text("")
    with pytest.raises(SamplingInterrupted):
        host.check_interrupt()


@builtin_only
def test_progress_reports_values_and_preview_images():
    seen = []
    host.set_progress_hook(lambda value, total, image: seen.append((value, total, image)))
    bar = host.progress(3)
    bar.update(1)
    bar.update(5, preview_image=torch.rand(2, 3, 8, 12))
    assert [(v, t) for v, t, _ in seen] == [(1, 3), (3, 3)]
    assert seen[0][2] is None and seen[1][2].size == (12, 8)
    img = host.preview_image(torch.ones(1, 3, 2, 2))
    assert img.getpixel((0, 0)) == (255, 255, 255)


@builtin_only
def test_model_files_and_paths(tmp_path):
    for sub in ("diffusion_models", "unet", "text_encoders/bigG", "vae"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "diffusion_models" / "stage_c.safetensors").write_bytes(b"x")
    (tmp_path / "unet" / "stage_b.sft").write_bytes(b"x")
    (tmp_path / "unet" / "old.ckpt").write_bytes(b"x")  # pickles are never offered
    (tmp_path / "text_encoders" / "bigG" / "model.safetensors").write_bytes(b"x")
    host.set_models_dir(str(tmp_path))
    assert host.model_files(["diffusion_models"]) == ["stage_b.sft", "stage_c.safetensors"]
    assert host.model_files("unet") == ["stage_b.sft", "stage_c.safetensors"]
    assert host.model_files(["clip"]) == ["bigG/model.safetensors"]
    assert host.model_files(["vae"]) == []
    assert host.model_path(["diffusion_models"], "stage_b.sft") == str(tmp_path / "unet" / "stage_b.sft")
    assert host.model_path("text_encoders", "bigG/model.safetensors").endswith(
        os.path.join("text_encoders", "bigG", "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"stage_a\.safetensors.*vae"):
        host.model_path(["vae"], "stage_a.safetensors")
    with pytest.raises(CheckpointError, match="relative"):
        host.model_path(["vae"], "../secret.safetensors")


def _folder_with_refused_files(root):
    base = root / "diffusion_models"
    (base / "sub").mkdir(parents=True)
    (base / "stage_c.ckpt").write_bytes(b"x")
    (base / "sub" / "stage_b.pt").write_bytes(b"x")
    (base / "stage_c_q4.gguf").write_bytes(b"x")
    (base / "stage_c.onnx").write_bytes(b"x")
    # Not weights: ComfyUI's placeholder and notes are never listed as refused.
    (base / "put_diffusion_model_files_here").write_bytes(b"")
    (base / "README.txt").write_bytes(b"x")
    return base


REFUSED = [("stage_c.ckpt", "PyTorch pickle"), ("stage_c.onnx", "unknown extension (.onnx)"),
           ("sub/stage_b.pt", "PyTorch pickle")]


def _assert_lists_refused(message: str) -> None:
    for name, why in REFUSED:
        assert f"{name} (" in message and why in message, (name, message)
    assert "never unpickles" in message and "convert it to .safetensors" in message
    assert "put_diffusion_model_files_here" not in message and "README.txt" not in message


@builtin_only
def test_missing_file_message_lists_the_files_the_pack_refuses_and_why(tmp_path):
    _folder_with_refused_files(tmp_path)
    host.set_models_dir(str(tmp_path))
    assert host.model_files(["diffusion_models"]) == ["stage_c_q4.gguf"]  # GGUF is read (Stage C / B)
    assert [name for name, _ in host.refused_files(["unet"])] == [
        name for name, _ in REFUSED]
    with pytest.raises(CheckpointError, match=r"'stage_c\.safetensors' was not found") as err:
        host.model_path(["diffusion_models", "unet"], "stage_c.safetensors")
    _assert_lists_refused(str(err.value))
    # A folder with nothing refused keeps the short message.
    with pytest.raises(CheckpointError) as err:
        host.model_path(["vae"], "stage_a.safetensors")
    assert "does not read" not in str(err.value)


def test_comfyui_backend_lists_refused_files_the_same_way(tmp_path):
    """host.comfyui's model_path mirrors the built-in one; folder_paths is faked (no ComfyUI needed)."""
    from types import SimpleNamespace

    from comfyui_stablecascade.host import comfyui

    base = _folder_with_refused_files(tmp_path)

    class FolderPaths:
        @staticmethod
        def get_filename_list(folder):
            if folder != "diffusion_models":
                raise KeyError(folder)
            return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

        @staticmethod
        def get_full_path(folder, name):
            return None

        @staticmethod
        def get_folder_paths(folder):
            if folder != "diffusion_models":
                raise KeyError(folder)
            return [str(base)]

    backend = comfyui.ComfyBackend(SimpleNamespace(folder_paths=FolderPaths))
    assert backend.model_files(["diffusion_models", "unet"]) == ["stage_c_q4.gguf"]
    assert backend.refused_files(["diffusion_models", "unet"]) == folders.refused_in([str(base)])
    with pytest.raises(CheckpointError, match=r"'stage_c\.safetensors' was not found in models/diffusion_models/") \
            as err:
        backend.model_path(["diffusion_models", "unet"], "stage_c.safetensors")
    _assert_lists_refused(str(err.value))


@builtin_only
def test_model_path_without_models_dir_names_the_setting(monkeypatch):
    monkeypatch.delenv("SCW_MODELS_DIR", raising=False)
    assert host.model_files(["vae"]) == []
    with pytest.raises(CheckpointError, match="SCW_MODELS_DIR"):
        host.model_path(["vae"], "stage_a.safetensors")


@builtin_only
def test_load_rejects_bare_modules():
    with pytest.raises(CascadeError, match="host.wrap"):
        host.load([nn.Linear(2, 2)])


_COMFY_SCRIPT = r'''
import os, sys, tempfile, types
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, os.environ["COMFYUI_PATH"])
try:
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm, comfy.utils, folder_paths
except Exception as e:  # a checkout without its dependencies (torchvision, psutil, einops...)
    print(f"cannot import ComfyUI: {type(e).__name__}: {e}")
    sys.exit(3)
import torch
from torch import nn
pack = types.ModuleType("comfyui_stablecascade")
pack.__path__ = [os.environ["SCW_ROOT"]]
sys.modules["comfyui_stablecascade"] = pack
from comfyui_stablecascade import host
assert host.in_comfyui()
ops = host.operations()
net = nn.Sequential(ops.Linear(8, 8), nn.GELU(), ops.Linear(8, 4))
with torch.no_grad():
    for p in net.parameters():
        p.copy_(torch.randn_like(p))
base = host.wrap(net, "stage_c")
import comfy.model_patcher
# ComfyUI's ModelPatcher (the pack's subclass only adds unloading other patchers of the same network, core_interop)
assert isinstance(base.patcher, comfy.model_patcher.ModelPatcher)
w0 = net[0].weight.detach().clone()
lora = base.clone()
lora.add_patches({"0.weight": torch.ones(8, 8)}, strength=0.5, key="a")
lora.add_patches({"0.weight": lambda w: torch.full_like(w, 2.0)}, key="b")
host.load([lora], memory_required=1 << 20)
assert torch.allclose(net[0].weight, w0 + 2.5)
host.load([base])
assert torch.equal(net[0].weight, w0)
lora.remove_patches("b")
assert lora.patch_keys() == ["a"]
seen = []
comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append((v, t, p)))
host.progress(2).update(1, torch.rand(1, 3, 8, 8))
assert seen[0][:2] == (1, 2) and seen[0][2][0] == "JPEG" and seen[0][2][1].size == (8, 8)
mm.interrupt_current_processing(True)
try:
    host.check_interrupt()
    raise AssertionError("no interrupt")
except mm.InterruptProcessingException:
    pass
d = tempfile.mkdtemp()
for name in ("a.safetensors", "b.ckpt"):
    open(os.path.join(d, name), "w").close()
folder_paths.add_model_folder_path("diffusion_models", d)
assert host.model_files(["diffusion_models", "unet"]) == ["a.safetensors"]
assert host.model_path(["unet"], "a.safetensors") == os.path.join(d, "a.safetensors")
try:
    host.model_path(["diffusion_models"], "missing.safetensors")
    raise AssertionError("no error for a missing file")
except ValueError as e:
    assert "b.ckpt (a PyTorch pickle" in str(e), str(e)
print("OK")
'''


@pytest.mark.comfyui
def test_comfyui_branch_against_a_checkout(tmp_path):
    """host's ComfyUI branch with a real ComfyUI (COMFYUI_PATH), in a subprocess so comfy stays out of this one."""
    import subprocess
    import sys

    checkout = os.environ.get("COMFYUI_PATH")
    if not checkout:
        pytest.skip("COMFYUI_PATH is not set (a ComfyUI checkout with its dependencies)")
    env = {**os.environ, "SCW_ROOT": ROOT}
    env.pop("SCW_NO_COMFY", None)
    script = tmp_path / "check.py"
    script.write_text(_COMFY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
