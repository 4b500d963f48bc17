"""The host's training API: ``trainable_copy`` (an independent network for a full fine-tune) and ``frozen`` (the
loaded network as the frozen base of an adapter), on the built-in backend with tiny networks."""

import pytest
import torch
from torch import nn

from comfyui_stablecascade import host

# The checks read the built-in patcher (is_patched); inside ComfyUI the facade forwards to ComfyUI's manager.
pytestmark = pytest.mark.skipif(host.in_comfyui(), reason="covers the built-in manager; ComfyUI is importable here")


@pytest.fixture(autouse=True)
def _clean_host():
    host.unload_all()
    yield
    host.unload_all()


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))


def _bits(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def _patched_handle() -> tuple[host.ModelHandle, host.ModelHandle, torch.Tensor]:
    """(base handle, a clone with a LoRA-like patch on 0.weight, the patch)."""
    base = host.wrap(_net(), "stage_c")
    delta = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    lora = base.clone()
    lora.add_patches({"0.weight": delta}, key="lora")
    return base, lora, delta


def _x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(2))


# ---- trainable_copy -----------------------------------------------------------------------------------


def test_trainable_copy_is_an_independent_train_mode_network_with_the_patches_merged():
    base, lora, delta = _patched_handle()
    before = _bits(base.module)
    model = host.trainable_copy(lora)
    assert model is not base.module and type(model) is type(base.module)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.device == host.compute_device() for p in model.parameters())
    base_ptrs = {t.data_ptr() for t in base.module.state_dict().values()}
    assert not base_ptrs & {t.data_ptr() for t in model.state_dict().values()}, "the copy shares a tensor"
    # Patches merged exactly as a load writes them: fp32 weight + strength * delta.
    assert torch.equal(model[0].weight.detach().cpu(), before["0.weight"] + delta)
    assert all(torch.equal(v.cpu(), before[k]) for k, v in _bits(model).items() if k != "0.weight")
    # The handle: not patched any more, network bit-identical, still eval mode without grads.
    assert not lora.patcher.is_patched()
    assert _same_bits(_bits(base.module), before)
    assert not base.module.training and not any(p.requires_grad for p in base.module.parameters())


def test_an_optimizer_step_on_the_copy_leaves_the_handle_bit_identical():
    base, lora, _ = _patched_handle()
    before = _bits(base.module)
    model = host.trainable_copy(lora)
    start = _bits(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_x().to(host.compute_device())).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(v, start[k]) for k, v in _bits(model).items()), "every parameter should move"
    assert _same_bits(_bits(base.module), before)
    assert all(p.grad is None for p in base.module.parameters())
    # Loading the handles again computes with their own weights, not the trained ones.
    host.load([lora])
    assert torch.equal(base.module[2].weight, before["2.weight"])
    host.load([base])
    assert _same_bits(_bits(base.module), before)


def test_the_trained_copy_can_be_wrapped_and_loaded_with_its_own_weights():
    _, lora, _ = _patched_handle()
    model = host.trainable_copy(lora)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a "training" change of the weight that carried the patch
    trained = _bits(model)
    tuned = host.wrap(model, "stage_c")
    host.load([tuned])
    assert _same_bits(_bits(tuned.module), trained), "loading the wrapped copy must not restore pre-patch weights"


def test_trainable_copy_in_another_dtype():
    base = host.wrap(_net(), "stage_c")
    model = host.trainable_copy(base, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.dtype for p in base.module.parameters()} == {torch.float32}
    assert torch.equal(model[0].weight.detach().cpu(), base.module[0].weight.double())


# ---- frozen -----------------------------------------------------------------------------------------


class _Adapter(nn.Module):
    """A LoRA-like trainable delta on the output of the frozen network's first layer (a forward hook)."""

    def __init__(self, width: int, rank: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.down = nn.Parameter(torch.randn(rank, width, generator=gen) * 0.1)
        self.up = nn.Parameter(torch.randn(width, rank, generator=gen) * 0.1)

    def hook(self, module, args, out):
        return out + args[0] @ self.down.T @ self.up.T


def test_frozen_lets_gradients_through_to_an_adapter_and_updates_nothing_of_the_base():
    base, lora, delta = _patched_handle()
    before = _bits(base.module)
    adapter = _Adapter(8)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    x = _x().requires_grad_(True)
    with host.frozen(lora) as module:
        assert module is base.module and lora.patcher.is_patched()
        assert torch.equal(module[0].weight, before["0.weight"] + delta)  # the patches apply inside the block
        assert not any(p.requires_grad for p in module.parameters())
        hook = module[0].register_forward_hook(adapter.hook)
        try:
            loss = module(x.to(host.compute_device())).square().mean()
            loss.backward()
            optimizer.step()
        finally:
            hook.remove()
    assert adapter.down.grad is not None and adapter.down.grad.abs().sum() > 0
    assert adapter.up.grad is not None and adapter.up.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # autograd flows through the frozen network
    assert all(p.grad is None for p in base.module.parameters()), "a base parameter got a gradient"
    assert not lora.patcher.is_patched()
    assert _same_bits(_bits(base.module), before)


def test_frozen_takes_the_patches_off_when_the_block_raises():
    base, lora, _ = _patched_handle()
    before = _bits(base.module)
    with pytest.raises(RuntimeError, match="step failed"):
        with host.frozen(lora) as module:
            assert lora.patcher.is_patched()
            module(_x().to(host.compute_device()))
            raise RuntimeError("step failed")
    assert not lora.patcher.is_patched()
    assert _same_bits(_bits(base.module), before)
    assert all(p.grad is None for p in base.module.parameters())


def test_frozen_restores_requires_grad_flags():
    base = host.wrap(_net(), "stage_c")
    base.module[2].bias.requires_grad_(True)  # e.g. a caller that trains one bias outside the block
    with host.frozen(base) as module:
        assert not module[2].bias.requires_grad
    assert base.module[2].bias.requires_grad and not base.module[0].weight.requires_grad
