"""Model handles and their keyed attachments (host/handles.py), with a tiny fake attachment: clones copy them,
``with_attachment`` makes a clone, wrappers compose in attachment order, networks and memory sum over them, and
the Stage C runner loads and wraps whatever rides on the handle without knowing what it is."""

import pytest
import torch
from torch import nn

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.kinds import DEMO_TEXT_WIDTH, demo_network
from comfyui_stablecascade.pipeline import STAGE_C, sample_stage_c


class _Fake:
    """An attachment: extra networks, extra activation memory, and a wrapper ``fn(x) * scale + offset``."""

    def __init__(self, handles=(), memory=0, scale=1.0, offset=0.0):
        self._handles, self._memory, self.scale, self.offset = list(handles), memory, scale, offset
        self.contexts = []

    def handles(self):
        return list(self._handles)

    def memory(self):
        return self._memory

    def wrap(self, network_fn, context):
        self.contexts.append(context)

        def wrapped(x, r, **cond):
            return network_fn(x, r, **cond) * self.scale + self.offset

        return wrapped


def _handle(kind="stage_c"):
    return host.wrap(nn.Linear(2, 2), kind)


def _identity(x, r, **cond):
    return x


def test_with_attachment_returns_a_clone_and_leaves_the_original_unchanged():
    base = _handle()
    fake = _Fake()
    one = base.with_attachment("fake", fake)
    assert one is not base and one.module is base.module and one.kind == base.kind
    assert base.attachments == {} and one.attachments == {"fake": fake}
    other = _Fake()
    two = one.with_attachment("fake", other)  # the same key: replaced on the new clone only
    assert one.attachments["fake"] is fake and two.attachments["fake"] is other
    gone = two.with_attachment("fake", None)
    assert gone.attachments == {} and two.attachments == {"fake": other}
    assert base.with_attachment("absent", None).attachments == {}  # removing a key it lacks is no error


def test_clone_copies_attachments_and_patches_independently():
    one = _handle().with_attachment("a", _Fake())
    one.add_patches({"bias": torch.ones(2)}, key="lora")
    twin = one.clone()
    assert twin.attachments == one.attachments and twin.attachments is not one.attachments
    assert twin.patch_keys() == one.patch_keys() == ["lora"]
    twin.attachments["b"] = _Fake()  # a change on the clone's dict stays there
    twin.remove_patches("lora")
    assert list(one.attachments) == ["a"] and one.patch_keys() == ["lora"]
    assert type(twin) is type(one) is host.ModelHandle


def test_wrap_network_composes_wrappers_first_attached_innermost():
    double, plus_one = _Fake(scale=2.0), _Fake(offset=1.0)
    handle = _handle().with_attachment("double", double).with_attachment("plus_one", plus_one)
    x, r = torch.full((1, 2), 3.0), torch.zeros(1)
    context = {"latent_shape": (1, 2)}
    wrapped = handle.wrap_network(_identity, context)
    assert torch.equal(wrapped(x, r), x * 2 + 1)
    swapped = _handle().with_attachment("plus_one", plus_one).with_attachment("double", double)
    assert torch.equal(swapped.wrap_network(_identity, context)(x, r), (x + 1) * 2)
    # Each wrapper sees the run's context plus the handle it rides on; the caller's dict is not changed.
    assert double.contexts[0] == {"latent_shape": (1, 2), "handle": handle}
    assert plus_one.contexts[-1]["handle"] is swapped and context == {"latent_shape": (1, 2)}
    assert _handle().wrap_network(_identity, context) is _identity  # nothing attached: the call itself


def test_attachment_handles_and_memory_sum_over_attachments():
    nets = [_handle("controlnet") for _ in range(3)]
    handle = (_handle().with_attachment("a", _Fake(nets[:2], memory=100))
              .with_attachment("b", _Fake(nets[2:], memory=23)).with_attachment("c", _Fake()))
    assert handle.attachment_handles() == nets
    assert handle.attachment_memory() == 123
    assert _handle().attachment_handles() == [] and _handle().attachment_memory() == 0


@pytest.fixture(scope="module")
def stage_c():
    return host.wrap(demo_network("stage_c"), "stage_c")


def _cond(seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, DEMO_TEXT_WIDTH, generator=gen),
             {"pooled_output": torch.randn(1, DEMO_TEXT_WIDTH, generator=gen)}]]


def test_the_stage_c_runner_loads_and_wraps_what_rides_on_the_handle(stage_c, monkeypatch):
    extra = _handle("controlnet")
    fake = _Fake([extra], memory=12345, offset=0.5)
    attached = stage_c.with_attachment("fake", fake)
    loads = []
    real_load = host.load

    def spy(handles, memory_required=0):
        real_load(handles, memory_required)
        loads.append(([h.module for h in handles], memory_required, list(host.loaded_handles())))

    monkeypatch.setattr(host, "load", spy)
    settings = STAGE_C.replace(steps=2, cfg=1.0)
    latent = torch.zeros(1, 16, 3, 3)
    plain = sample_stage_c(stage_c, _cond(1), None, latent, settings, seed=3)
    out = sample_stage_c(attached, _cond(1), None, latent, settings, seed=3)
    (plain_modules, plain_memory, _), (modules, memory, resident) = loads
    assert plain_modules == [stage_c.module] and modules == [stage_c.module, extra.module]
    assert extra.module in resident and memory == plain_memory + 12345
    (context,) = fake.contexts
    assert context["handle"] is attached and context["latent_shape"] == (1, 16, 3, 3)
    assert context["r_at"](0.0) > context["r_at"](0.5) > context["r_at"](1.0)  # noise condition falls along the run
    assert not torch.equal(out, plain)  # the wrapper's offset changed every prediction
