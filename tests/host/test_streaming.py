"""The built-in manager streams Stage C / Stage B block by block when the network does not fit its budget (as
ComfyUI's low-VRAM mode does): same outputs bit for bit, about one block resident at a time, patches exact."""

import pytest
import torch

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.common import ResBlock
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_b import StageB, StageBConfig
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.host import builtin, streaming
from comfyui_stablecascade.standalone import cli

builtin_only = pytest.mark.skipif(host.in_comfyui(), reason="covers the built-in manager; ComfyUI is importable here")


@pytest.fixture(autouse=True)
def _clean_host():
    host.unload_all()
    host.set_memory_budget(None)
    yield
    host.unload_all()
    host.set_memory_budget(None)


def _stage_c() -> StageC:
    return randomize_(StageC(StageCConfig.tiny()), seed=5)


def _c_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.full((1,), 0.4), torch.randn(1, 77, 1280, generator=g),
            torch.randn(1, 1, 1280, generator=g), torch.zeros(1, 1, 768))


def _bits(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _largest_block(model) -> int:
    return max(sum(t.nelement() * t.element_size() for t in u.state_dict().values())
               for u in streaming.streaming_units(model))


@builtin_only
def test_streamed_forward_equals_full_load_bit_for_bit_with_one_block_resident():
    handle = host.wrap(_stage_c(), "stage_c")
    host.load([handle])
    assert streaming.streamer_of(handle.module) is None
    full = handle.module(*_c_inputs())
    host.unload_all()
    size = handle.model_size()
    host.set_memory_budget(size // 2)  # the whole network does not fit
    host.load([handle])
    streamer = streaming.streamer_of(handle.module)
    assert streamer is not None
    streamed = handle.module(*_c_inputs())
    assert torch.equal(streamed, full)
    # Every unit came in (blocks, mappers, embedding and clf), one at a time: the most ever resident is one unit.
    assert streamer.loads >= len(streamer.units) > 10
    # (In this tiny variant the 1280-wide text mapper is the largest unit, ~30% of the network.)
    assert streamer.peak_resident == _largest_block(handle.module) < size // 3
    assert streamer.resident == {}
    assert any(isinstance(u, ResBlock) for u in streamer.units)
    # The manager counts one unit for a streamed network, not all of it.
    assert builtin.BuiltinManager.resident_size(handle.patcher) == streamer.max_unit_bytes()
    host.unload_all()
    assert streaming.streamer_of(handle.module) is None


@pytest.mark.parametrize("net", [StageC(StageCConfig.big(), device="meta"), StageB(StageBConfig.big(), device="meta")],
                         ids=["stage_c_big", "stage_b_big"])
def test_released_sizes_stream_in_units_of_about_one_percent(net):
    total = sum(t.nelement() * t.element_size() for t in net.state_dict().values())
    # One unit at a time is what a streamed forward keeps on the compute device: a ResBlock of width 2048 (Stage C,
    # 134 MB in fp32 of 14.4 GB) or of width 1280 (Stage B); every parameter belongs to exactly one unit.
    assert _largest_block(net) < total // 50
    assert sum(sum(t.nelement() for t in u.state_dict().values()) for u in streaming.streaming_units(net)) == \
        sum(t.nelement() for t in net.state_dict().values())


@builtin_only
def test_streaming_stage_b_and_a_failed_forward_leaves_nothing_resident():
    net = randomize_(StageB(StageBConfig.tiny()), seed=2)
    handle = host.wrap(net, "stage_b")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 16, 16, generator=g), torch.full((1,), 0.5), torch.randn(1, 16, 4, 4, generator=g),
            torch.randn(1, 1, 1280, generator=g))
    host.load([handle])
    full = handle.module(*args)
    host.unload_all()
    host.set_memory_budget(handle.model_size() // 3)
    host.load([handle])
    streamer = streaming.streamer_of(handle.module)
    assert torch.equal(handle.module(*args), full)
    assert streamer.peak_resident == _largest_block(handle.module)
    # A forward that fails inside a block leaves that block "resident"; the next forward drops it first.
    with pytest.raises(RuntimeError):
        handle.module(args[0], args[1], args[2], torch.randn(1, 1, 7))
    assert torch.equal(handle.module(*args), full)
    assert streamer.resident == {}


@builtin_only
def test_patches_apply_exactly_while_streaming_and_come_off_bit_exact():
    base = host.wrap(_stage_c(), "stage_c")
    original = _bits(base.module)
    g = torch.Generator().manual_seed(9)
    keys = ["down_blocks.0.0.channelwise.0.weight", "down_blocks.0.2.attention.attn.in_proj_weight",
            "clf.1.weight"]
    deltas = {k: 0.05 * torch.randn(original[k].shape, generator=g) for k in keys}
    lora = base.clone()
    lora.add_patches(deltas, strength=0.7, key="lora")
    host.load([lora])  # fully loaded reference with the patch
    patched_full = lora.module(*_c_inputs())
    patched_weights = _bits(lora.module)
    host.load([base])
    plain_full = base.module(*_c_inputs())
    host.unload_all()
    host.set_memory_budget(base.model_size() // 2)
    host.load([lora])
    assert streaming.streamer_of(lora.module) is not None
    assert torch.equal(lora.module(*_c_inputs()), patched_full)
    assert all(torch.equal(lora.module.state_dict()[k], patched_weights[k]) for k in keys)
    assert not torch.equal(patched_full, plain_full)
    host.load([base])  # the same network, still streamed: the clone's patches come off bit for bit
    assert streaming.streamer_of(base.module) is not None
    assert torch.equal(base.module(*_c_inputs()), plain_full)
    now = _bits(base.module)
    assert all(torch.equal(now[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)


@builtin_only
def test_networks_without_blocks_are_never_streamed():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    handle = host.wrap(net, "stage_a")
    host.set_memory_budget(1024)
    host.load([handle])  # loads whole (with the over-budget warning), as before
    assert streaming.streamer_of(handle.module) is None


# The standalone runner's --vram option sets this budget (kept here beside the manager it configures).
@builtin_only
def test_cli_vram_sets_the_budget_and_refuses_nonsense(tmp_path):
    missing = str(tmp_path / "missing.json")
    assert cli.main([missing, "--vram", "6G"]) == cli.EXIT_BAD_INPUT  # the workflow is missing; the budget is set
    assert host.memory_budget() == 6 * 1024 ** 3
    host.set_memory_budget(None)
    for bad in ("lots", "0"):
        assert cli.main([missing, "--vram", bad]) == cli.EXIT_BAD_INPUT
        assert host.memory_budget() != 0
