"""Stage runners on tiny networks: shapes, seeds, CFG batching, the LATENT convention, previews, interruption,
and clear errors for inputs that cannot work."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.errors import CascadeError, SamplingInterrupted, ShapeError, StageMismatchError
from comfyui_stablecascade.cascade.previewer import Previewer, PreviewerConfig
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_b import StageB, StageBConfig
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.pipeline import STAGE_B, STAGE_C, SamplingSettings, stages
from comfyui_stablecascade.pipeline.conditioning import CLIP_IMG_KEY
from comfyui_stablecascade.pipeline.memory import estimate_stage_b_memory, estimate_stage_c_memory
from comfyui_stablecascade.samplers import schedule
from comfyui_stablecascade.samplers.noise import prepare_noise
from comfyui_stablecascade.samplers.sampling import SAMPLERS

W = 32  # text width of the tiny networks


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    # 1-D parameters: 0.02 * noise, no +1 for norm weights (these tests were written with that draw).
    return randomize_(module, seed, unit_norm_weights=False).eval().requires_grad_(False)


def _c(**changes) -> SamplingSettings:
    return STAGE_C.replace(**changes)


def _b(**changes) -> SamplingSettings:
    return STAGE_B.replace(**changes)


@pytest.fixture(scope="module")
def stage_c():
    cfg = dataclasses.replace(StageCConfig.tiny(), c_clip_text=W, c_clip_text_pooled=W)
    return host.wrap(_randomize(StageC(cfg), 0), "stage_c")


@pytest.fixture(scope="module")
def stage_b():
    return host.wrap(_randomize(StageB(dataclasses.replace(StageBConfig.tiny(), c_clip=W)), 1), "stage_b")


@pytest.fixture(autouse=True)
def _host_state():
    host.request_interrupt(False)
    yield
    host.set_progress_hook(None)
    host.request_interrupt(False)


def _cond(seed: int, batch: int = 1, tokens: int = 77, **extra) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, W, generator=gen), {"pooled_output": torch.randn(batch, W, generator=gen),
                                                             **extra}]]


POS, NEG = _cond(1), _cond(2)


class _ZeroEps(nn.Module):
    """Predicts eps = 0, so x0 = x / a: the output exposes how the runner scales and noises its input."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(c_in=c_in, c_clip_text=W, c_clip_text_pooled=W, c_clip_img=768, c_clip=W,
                                      c_clip_seq=4, c_cond=8, c_hidden=(8,), nhead=(0,), patch_size=1)

    def forward(self, x, r, **cond):
        return torch.zeros_like(x)


def test_defaults_are_the_official_settings():
    c = inspect.signature(stages.sample_stage_c).parameters
    b = inspect.signature(stages.sample_stage_b).parameters
    # The official values themselves are stated once, in tests/pipeline/test_settings.py (from the SPEC).
    assert c["settings"].default is STAGE_C and b["settings"].default is STAGE_B


def test_stage_c_then_b_shapes_and_seeds(stage_c, stage_b):
    latent_c = {"samples": torch.zeros(2, 16, 4, 4), "scw_stage": "c"}
    out = stages.sample_stage_c(stage_c, POS, NEG, latent_c, _c(steps=3), seed=5)
    again = stages.sample_stage_c(stage_c, POS, NEG, latent_c["samples"], _c(steps=3), seed=5)
    other = stages.sample_stage_c(stage_c, POS, NEG, latent_c, _c(steps=3), seed=6)
    assert out.shape == (2, 16, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, again) and not torch.allclose(out, other)
    assert not torch.allclose(out[0], out[1])  # each sample gets its own noise
    b = stages.sample_stage_b(stage_b, POS, NEG, out, torch.zeros(2, 4, 16, 16), _b(steps=2), seed=5)
    assert b.shape == (2, 4, 16, 16) and torch.isfinite(b).all()
    assert torch.equal(b, stages.sample_stage_b(stage_b, POS, NEG, out, torch.zeros(2, 4, 16, 16), _b(steps=2),
                                                seed=5))


def test_the_scheduler_reaches_the_sampler_and_the_default_is_gdfs(stage_c, monkeypatch):
    seen = {}
    real = SAMPLERS["euler"]

    def recording(model, x, logsnrs, **kwargs):
        seen["logsnrs"] = logsnrs.cpu()
        return real(model, x, logsnrs, **kwargs)

    monkeypatch.setitem(SAMPLERS, "euler", recording)
    latent = torch.zeros(1, 16, 3, 3)
    out = stages.sample_stage_c(stage_c, POS, NEG, latent, _c(steps=4, sampler="euler", scheduler="karras"), seed=1)
    assert torch.isfinite(out).all()
    assert torch.equal(seen["logsnrs"], schedule.SCHEDULERS["karras"](4, STAGE_C.shift, 1.0))
    stages.sample_stage_c(stage_c, POS, NEG, latent, _c(steps=4, sampler="euler"), seed=1)
    assert torch.equal(seen["logsnrs"], schedule.logsnr_schedule(4, STAGE_C.shift, 1.0))


def test_latent_dict_batch_index_picks_the_noise(stage_c):
    """A LATENT's batch_index (core's batch nodes) is used unless one is given."""
    latent = {"samples": torch.zeros(1, 16, 3, 3), "batch_index": [1]}
    picked = stages.sample_stage_c(stage_c, POS, NEG, latent, _c(steps=2), seed=4)
    same = stages.sample_stage_c(stage_c, POS, NEG, latent["samples"], _c(steps=2), seed=4, batch_index=[1])
    first = stages.sample_stage_c(stage_c, POS, NEG, latent, _c(steps=2), seed=4, batch_index=[0])
    assert torch.equal(picked, same) and not torch.allclose(picked, first)


def test_cfg_one_makes_one_call_per_step_without_the_negative(stage_c):
    batches = []
    hook = stage_c.module.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        stages.sample_stage_c(stage_c, POS, None, torch.zeros(2, 16, 3, 3), _c(steps=2, cfg=1.0), seed=0)
        assert batches == [2, 2]
        batches.clear()
        stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(2, 16, 3, 3), _c(steps=2, cfg=4.0), seed=0)
        assert batches == [4, 4]
    finally:
        hook.remove()


def test_negative_is_required_when_guided(stage_c):
    with pytest.raises(CascadeError, match="negative"):
        stages.sample_stage_c(stage_c, POS, None, torch.zeros(1, 16, 3, 3), _c(steps=1, cfg=4.0), seed=0)


def test_stage_b_latent_convention_and_img2img_noising():
    """Zero eps: x0 = x_start / a0. The output is (latent / 0.43 + b0/a0 * noise) * 0.43 for Stage B."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    effnet = torch.zeros(1, 16, 2, 2)
    out = stages.sample_stage_b(_ZeroEps(4), POS, None, effnet, latent,
                                _b(steps=4, cfg=1.0, shift=1.0, sampler="ddim", denoise=0.5), seed=9)
    a0, b0 = schedule.alpha_sigma(schedule.logsnr(0.5, shift=1.0))
    noise = prepare_noise(latent, 9)
    expected = (latent / 0.43 + (b0 / a0) * noise) * 0.43
    # float32 rounding of the x / a and x * 0.43 round trips through 4 ddim steps; values are O(1).
    assert torch.allclose(out, expected, atol=1e-4)
    # The same for Stage C, raw scale, with the sampler's own shift (consistent noising).
    latent_c = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(4))
    out_c = stages.sample_stage_c(_ZeroEps(16), POS, None, latent_c,
                                  _c(steps=4, cfg=1.0, shift=2.0, sampler="ddim", denoise=0.6), seed=9)
    a0, b0 = schedule.alpha_sigma(schedule.logsnr(0.6, shift=2.0))
    assert torch.allclose(out_c, latent_c + (b0 / a0) * prepare_noise(latent_c, 9), atol=1e-4)  # as above


def test_official_noising_hook_uses_shift_one():
    x0, noise = torch.ones(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    logsnrs = schedule.logsnr_schedule(16, shift=2.0, t_start=0.8)
    a_consistent = stages.initial_state(x0, noise, logsnrs, 0.8)[0, 0, 0, 0]
    a_official = stages.initial_state(x0, noise, logsnrs, 0.8, variant="official")[0, 0, 0, 0]
    assert a_consistent == pytest.approx(0.15905, abs=1e-4)  # SPEC §10.5: shift 2 at t=0.8, given to 4 places
    assert a_official == pytest.approx(0.307, abs=1e-3)  # shift 1 at t=0.8, given to 3 places
    assert torch.equal(stages.initial_state(x0, noise, logsnrs, 1.0), noise)


def test_conditioning_batch_one_is_broadcast_and_other_batches_rejected(stage_c):
    out = stages.sample_stage_c(stage_c, _cond(1, batch=3), _cond(2), torch.zeros(3, 16, 3, 3), _c(steps=1), seed=0)
    assert out.shape == (3, 16, 3, 3)
    with pytest.raises(ShapeError, match="batch 2"):
        stages.sample_stage_c(stage_c, _cond(1, batch=2), NEG, torch.zeros(3, 16, 3, 3), _c(steps=1), seed=0)


def test_prompts_of_different_lengths_and_image_embeddings(stage_c):
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(text=kwargs["clip_text"].shape, img=kwargs["clip_img"].clone())

    handle = stage_c.module.register_forward_hook(hook, with_kwargs=True)
    embeds = SimpleNamespace(image_embeds=torch.ones(1, 768))
    positive = _cond(1, tokens=154, unclip_conditioning=[{"clip_vision_output": embeds, "strength": 0.5}])
    try:
        stages.sample_stage_c(stage_c, positive, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    finally:
        handle.remove()
    assert seen["text"] == (2, 154, W)  # the 77-token negative repeated to 154, batched with the positive
    assert torch.equal(seen["img"][0], torch.full((1, 768), 0.5)) and not seen["img"][1].any()
    # The pack's own key: (B, 768) taken as one token.
    positive = _cond(1, **{CLIP_IMG_KEY: torch.ones(1, 768)})
    out = stages.sample_stage_c(stage_c, positive, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    assert torch.isfinite(out).all()


def test_previews_and_progress_for_stage_c(stage_c):
    updates = []
    host.set_progress_hook(lambda value, total, image: updates.append((value, total, image)))
    previewer = host.wrap(_randomize(Previewer(PreviewerConfig.tiny()), 2), "previewer")
    stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(2, 16, 3, 3), _c(steps=3), seed=0, previewer=previewer)
    assert [(v, t) for v, t, _ in updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(img is not None and img.size == (24, 24) for _, _, img in updates)
    updates.clear()
    stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=2), seed=0)
    assert [img for _, _, img in updates] == [None, None]


def test_interrupt_stops_sampling_and_takes_patches_off(stage_c):
    original = {k: v.clone() for k, v in stage_c.module.state_dict().items()}
    lora = stage_c.clone()
    lora.add_patches({"clf.1.bias": torch.ones(16)}, key="test_lora")
    steps_done = []

    def on_progress(value, total, image):
        steps_done.append(value)
        if value == 2:
            host.request_interrupt()

    host.set_progress_hook(on_progress)
    with pytest.raises(SamplingInterrupted):
        stages.sample_stage_c(lora, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=5), seed=0)
    assert steps_done == [1, 2]
    assert not lora.patcher.is_patched()
    assert all(torch.equal(v, original[k]) for k, v in stage_c.module.state_dict().items())


@pytest.mark.parametrize("latent,match", [
    (torch.zeros(1, 4, 24, 24), "Stage B latent"),
    ({"samples": torch.zeros(1, 16, 3, 3), "scw_stage": "b"}, "Stage C needs B x 16 x h x w"),
    (torch.zeros(16, 3, 3), "Stage C needs B x 16 x h x w"),
])
def test_stage_c_rejects_latents_of_another_stage(stage_c, latent, match):
    with pytest.raises(StageMismatchError, match=match):
        stages.sample_stage_c(stage_c, POS, NEG, latent, _c(steps=1), seed=0)


def test_wrong_network_nan_latent_and_bad_conditioning(stage_c, stage_b):
    with pytest.raises(StageMismatchError, match="stage_b"):
        stages.sample_stage_c(stage_b, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    nan = torch.zeros(1, 16, 3, 3)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(CascadeError, match="NaN"):
        stages.sample_stage_c(stage_c, POS, NEG, nan, _c(steps=1), seed=0)
    with pytest.raises(ShapeError, match="width 48"):
        stages.sample_stage_c(stage_c, [[torch.zeros(1, 77, 48), {"pooled_output": torch.zeros(1, 48)}]], NEG,
                              torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    with pytest.raises(CascadeError, match="pooled_output"):
        stages.sample_stage_c(stage_c, [[torch.zeros(1, 77, W), {}]], NEG, torch.zeros(1, 16, 3, 3), _c(steps=1),
                              seed=0)
    with pytest.raises(CascadeError, match="2 entries"):
        stages.sample_stage_c(stage_c, POS + NEG, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    with pytest.raises(CascadeError, match="sampler 'euler_a' is unknown"):
        stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1, sampler="euler_a"), seed=0)
    with pytest.raises(CascadeError, match="scheduler 'cosine' is unknown"):
        stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1, scheduler="cosine"), seed=0)


def test_stage_b_rejects_sizes_that_do_not_belong_together(stage_b):
    prior = torch.zeros(1, 16, 4, 4)
    with pytest.raises(ShapeError, match="do not belong to one image"):
        stages.sample_stage_b(stage_b, POS, NEG, prior, torch.zeros(1, 4, 64, 16), _b(steps=1), seed=0)
    with pytest.raises(ShapeError, match="do not belong to one image"):
        stages.sample_stage_b(stage_b, POS, NEG, prior, torch.zeros(1, 4, 4, 4), _b(steps=1), seed=0)
    with pytest.raises(ShapeError, match="batch 2"):
        stages.sample_stage_b(stage_b, POS, NEG, torch.zeros(2, 16, 4, 4), torch.zeros(3, 4, 16, 16), _b(steps=1),
                              seed=0)
    with pytest.raises(StageMismatchError, match="Stage C latent"):
        stages.sample_stage_b(stage_b, POS, NEG, prior, torch.zeros(1, 16, 16, 16), _b(steps=1), seed=0)


def test_stage_b_reads_cores_prior_from_the_conditioning(stage_b):
    prior = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    direct = stages.sample_stage_b(stage_b, POS, NEG, prior, torch.zeros(1, 4, 16, 16), _b(steps=2), seed=1)
    positive = [[POS[0][0], {**POS[0][1], "stable_cascade_prior": prior}]]
    via_cond = stages.sample_stage_b(stage_b, positive, NEG, None, torch.zeros(1, 4, 16, 16), _b(steps=2), seed=1)
    assert torch.equal(direct, via_cond)
    with pytest.raises(CascadeError, match="stage_c input"):
        stages.sample_stage_b(stage_b, POS, NEG, None, torch.zeros(1, 4, 16, 16), _b(steps=2), seed=1)


def test_memory_estimates_scale_with_batch_guidance_and_dtype(stage_c, stage_b):
    c, b = stage_c.module.config, stage_b.module.config
    one = estimate_stage_c_memory(c, (1, 16, 24, 24), torch.float32, guided=False)
    assert estimate_stage_c_memory(c, (1, 16, 24, 24), torch.float32, guided=True) == 2 * one
    assert estimate_stage_c_memory(c, (4, 16, 24, 24), torch.float32, guided=False) == 4 * one
    assert estimate_stage_c_memory(c, (1, 16, 24, 24), torch.bfloat16, guided=False) * 2 == one
    small = estimate_stage_b_memory(b, (1, 4, 64, 64), torch.float32, guided=True)
    assert estimate_stage_b_memory(b, (1, 4, 128, 128), torch.float32, guided=True) > 3 * small
    # Release sizes, batch 4 with CFG, bf16: hundreds of MB for C, a few GB at most for B (order-of-magnitude
    # bounds: the estimate is derived from layer widths, not measured).
    big_c = estimate_stage_c_memory(StageCConfig.big(), (4, 16, 24, 24), torch.bfloat16, guided=True)
    big_b = estimate_stage_b_memory(StageBConfig.big(), (4, 4, 256, 256), torch.bfloat16, guided=True)
    assert 100 * 2**20 < big_c < 4 * 2**30 and 500 * 2**20 < big_b < 8 * 2**30


# ---- settings and non-finite values at the stage boundaries ----------------------------------------------------


class _CountingZeroEps(_ZeroEps):
    def __init__(self, c_in: int) -> None:
        super().__init__(c_in)
        self.calls = 0

    def forward(self, x, r, **cond):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.mark.parametrize("changes,match", [
    ({"cfg": -3.0}, r"the Stage C sampler: cfg=-3\.0 is outside 0\.\.30"),
    ({"cfg": float("nan")}, r"the Stage C sampler: cfg=nan is not a finite number"),
    ({"steps": 500}, r"steps=500 is outside 1\.\.200"),
    ({"shift": 0.0}, r"shift=0\.0 is outside 0\.1\.\.10"),
])
def test_the_api_refuses_what_the_nodes_refuse_before_sampling(changes, match):
    net = _CountingZeroEps(16)
    with pytest.raises(CascadeError, match=match):
        stages.sample_stage_c(net, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=2).replace(**changes), seed=0)
    assert net.calls == 0
    net_b = _CountingZeroEps(4)
    with pytest.raises(CascadeError, match="the Stage B sampler: "):
        stages.sample_stage_b(net_b, POS, NEG, torch.zeros(1, 16, 2, 2), torch.zeros(1, 4, 8, 8),
                              _b(steps=2).replace(**changes), seed=0)
    assert net_b.calls == 0


class _NaNAfter(_ZeroEps):
    """Predicts zeros for ``good`` calls, then NaN (a weight that overflows late, or NaN weights at once)."""

    def __init__(self, c_in: int, dtype: torch.dtype, good: int = 0) -> None:
        super().__init__(c_in)
        self.anchor.data = self.anchor.data.to(dtype)
        self.good, self.calls = good, 0

    def forward(self, x, r, **cond):
        self.calls += 1
        out = torch.zeros_like(x)
        return out if self.calls <= self.good else out + float("nan")


@pytest.mark.parametrize("dtype,name,fix", [
    (torch.float32, "fp32", "weights file may hold NaN"),
    (torch.bfloat16, "bf16", "weights file may hold NaN"),
    (torch.float16, "fp16", "weight_dtype bf16 or fp32"),
])
def test_stage_c_stops_at_the_first_non_finite_step_naming_stage_dtype_and_fix(dtype, name, fix):
    net = _NaNAfter(16, dtype, good=2)
    with pytest.raises(CascadeError, match=f"the Stage C sampler: .* at step 3 of 5 .*Stage C weights {name}") as err:
        stages.sample_stage_c(net, POS, None, torch.zeros(1, 16, 3, 3), _c(steps=5, cfg=1.0), seed=0)
    assert fix in str(err.value) and net.calls == 3  # stopped there, the two steps after it never ran
    assert ("overflow" in str(err.value)) == (dtype == torch.float16)


def test_stage_b_with_fp32_weights_never_blames_fp16():
    net = _NaNAfter(4, torch.float32)
    with pytest.raises(CascadeError, match="the Stage B sampler: .* step 1 of 2 .*Stage B weights fp32") as err:
        stages.sample_stage_b(net, POS, None, torch.zeros(1, 16, 2, 2), torch.zeros(1, 4, 8, 8),
                              _b(steps=2, cfg=1.0), seed=0)
    assert "fp16" not in str(err.value) and "download it again" in str(err.value)


def test_nan_conditioning_is_named_not_blamed_on_the_weights():
    bad = _cond(1)
    bad[0][1]["pooled_output"][0, 0] = float("nan")
    with pytest.raises(CascadeError, match="the Stage C sampler: the positive clip_text_pooled .* NaN/inf"):
        stages.sample_stage_c(_ZeroEps(16), bad, NEG, torch.zeros(1, 16, 3, 3), _c(steps=1), seed=0)
    with pytest.raises(CascadeError, match="the Stage B sampler: the negative clip .* NaN/inf"):
        stages.sample_stage_b(_ZeroEps(4), POS, bad, torch.zeros(1, 16, 2, 2), torch.zeros(1, 4, 8, 8),
                              _b(steps=1), seed=0)


def test_a_previewer_that_gives_nan_stops_sampling_with_its_name(stage_c):
    previewer = _randomize(Previewer(PreviewerConfig.tiny()), 2)
    with torch.no_grad():
        next(previewer.parameters()).fill_(float("nan"))
    with pytest.raises(CascadeError, match=r"the Previewer's live preview .* \(weights fp32\)"):
        stages.sample_stage_c(stage_c, POS, NEG, torch.zeros(1, 16, 3, 3), _c(steps=2), seed=0,
                              previewer=host.wrap(previewer, "previewer"))
