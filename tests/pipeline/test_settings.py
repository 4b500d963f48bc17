"""Sampling settings: the official defaults (stated once, from the SPEC), the one table of accepted ranges, and
the check the nodes, the Python API and the headless runner share; image sizes of the empty latents."""

import dataclasses
import math

import pytest
import torch

from comfyui_stablecascade.cascade.errors import CascadeError
from comfyui_stablecascade.pipeline import IMAGE_TO_IMAGE, STAGE_B, STAGE_C, SamplingSettings
from comfyui_stablecascade.pipeline.latents import (
    EMPTY_LATENT_RANGES,
    empty_latents,
    finite_output,
    latent_samples,
    snap_size,
)
from comfyui_stablecascade.pipeline.settings import SETTING_RANGES

# The official sampling settings, written here once (../shared/spec/SPEC.md):
# - line 334 (section 10.5, text-to-image): Stage C cfg 4 / shift 2 / 20 steps / t_start 1.0, Stage B cfg 1.1 /
#   shift 1 / 10 steps / t_start 1.0, DDPM, cfg_rho 0.7;
# - lines 301 and 309 (section 10.3): GDF.sample's default cfg_rho=0.7, "used by all notebooks" - the official
#   Stage B sampling (train_b.py's sampling_configs) sets cfg, sampler, shift and timesteps only, so Stage B
#   keeps it too;
# - line 336 (image-to-image): Stage C int(20 * 0.8) = 16 steps from t_start 0.8;
# - section 10.1: the steps walk GDF's own schedule, linspace(t_start, 0) in t (the "official" scheduler).
OFFICIAL = {
    "stage_c": {"steps": 20, "cfg": 4.0, "shift": 2.0, "sampler": "ddpm", "rescale": 0.7, "denoise": 1.0,
                "scheduler": "official"},
    "stage_b": {"steps": 10, "cfg": 1.1, "shift": 1.0, "sampler": "ddpm", "rescale": 0.7, "denoise": 1.0,
                "scheduler": "official"},
    "image_to_image": {"steps": 16, "cfg": 4.0, "shift": 2.0, "sampler": "ddpm", "rescale": 0.7, "denoise": 0.8,
                       "scheduler": "official"},
}


@pytest.mark.parametrize("name,settings", [("stage_c", STAGE_C), ("stage_b", STAGE_B),
                                           ("image_to_image", IMAGE_TO_IMAGE)])
def test_the_packs_defaults_are_the_official_sampling_settings(name, settings):
    assert {k: getattr(settings, k) for k in OFFICIAL[name]} == OFFICIAL[name]
    assert settings.check() is settings


def test_scheduler_is_the_last_field_so_positional_construction_keeps_its_meaning():
    settings = SamplingSettings(20, 4.0, 2.0, "ddpm", 0.7, 1.0, "consistent")
    assert settings == SamplingSettings() and settings.scheduler == "official"
    assert [f.name for f in dataclasses.fields(SamplingSettings)][-1] == "scheduler"


def test_the_ranges_hold_the_official_values_and_are_what_the_nodes_declare():
    assert set(SETTING_RANGES) == {"steps", "cfg", "shift", "rescale", "denoise"}
    for settings in OFFICIAL.values():
        for name, (low, high) in SETTING_RANGES.items():
            assert low <= settings[name] <= high


@pytest.mark.parametrize("field,value", [
    ("cfg", -3.0), ("cfg", 30.5), ("cfg", math.nan), ("cfg", math.inf), ("steps", 0), ("steps", 201),
    ("steps", 2.5), ("steps", math.nan), ("shift", 0.0), ("shift", -math.inf), ("rescale", 1.5),
    ("rescale", math.nan), ("denoise", 0.0), ("denoise", 1.01), ("denoise", math.nan), ("cfg", "4"),
    ("steps", True),
])
def test_check_refuses_values_outside_the_table_naming_field_value_and_range(field, value):
    low, high = SETTING_RANGES[field]
    with pytest.raises(CascadeError) as err:
        STAGE_C.replace(**{field: value}).check("the Stage C sampler")
    message = str(err.value)
    assert message.startswith("the Stage C sampler: ")
    assert f"{field}=" in message and f"{low:g}..{high:g}" in message
    assert (repr(value) if isinstance(value, str) else str(value).lower()) in message.lower()


@pytest.mark.parametrize("field", sorted(SETTING_RANGES))
def test_check_accepts_both_ends_of_every_range(field):
    low, high = SETTING_RANGES[field]
    for value in (low, high):
        STAGE_B.replace(**{field: value}).check()
    # A 0-d tensor (an upstream computation) is a number too.
    STAGE_B.replace(cfg=torch.tensor(2.0)).check()


def test_check_names_an_unknown_sampler_scheduler_and_noising():
    with pytest.raises(CascadeError, match="sampler 'euler_a' is unknown"):
        SamplingSettings(sampler="euler_a").check()
    with pytest.raises(CascadeError, match="the Stage B sampler: scheduler 'cosine' is unknown; choose one of "
                                           "\\['official', 'simple', 'karras'"):
        STAGE_B.replace(scheduler="cosine").check("the Stage B sampler")
    with pytest.raises(CascadeError, match="official"):
        SamplingSettings(denoise=0.5, noising="sideways").check()


# ---- image sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(0, 1024), (-64, 1024), (100000, 1024), (1024, 255), (math.nan, 1024),
                                          (1024.5, 1024)])
def test_empty_latents_refuse_sizes_outside_the_nodes_range(width, height):
    # Refused with the node's declared range (before, 0 and -64 became 8 and 100000 was accepted).
    with pytest.raises(CascadeError, match=r"empty latent: (width|height)=.* 256\.\.16384"):
        empty_latents(width, height)


@pytest.mark.parametrize("name,value", [("batch_size", 0), ("batch_size", 65), ("compression", 0.0),
                                        ("compression", math.inf)])
def test_empty_latents_refuse_other_values_outside_the_nodes_range(name, value):
    low, high = EMPTY_LATENT_RANGES[name]
    kwargs = {"width": 1024, "height": 1024, name: value}
    with pytest.raises(CascadeError, match=f"{name}=.*{low:g}..{high:g}"):
        empty_latents(**kwargs)


def test_empty_latents_at_the_ends_of_the_range():
    c, b = empty_latents(256, 16384, batch_size=1)
    assert c["samples"].shape == (1, 16, 384, 6) and b["samples"].shape == (1, 4, 4096, 64)


@pytest.mark.parametrize("value", [0, -64, 4, 100000, math.nan])
def test_snap_size_refuses_instead_of_turning_a_size_into_8(value):
    with pytest.raises(CascadeError, match=r"width=.*8\.\.16384"):
        snap_size(value, "width")
    assert snap_size(1021, "width") == 1024 and snap_size(8, "width") == 8


# ---- non-finite values ---------------------------------------------------------------------------------------


def test_nan_latent_message_does_not_guess_fp16():
    nan = torch.zeros(1, 16, 2, 2)
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(CascadeError, match="Stage C latent: the latent holds 1 NaN/inf values of 64") as err:
        latent_samples(nan, "c", "Stage C latent")
    assert "fp16" not in str(err.value)


@pytest.mark.parametrize("dtype,name,fix", [
    (torch.float16, "fp16", "bf16 or fp32"),
    (torch.bfloat16, "bf16", "download it again"),
    (torch.float32, "fp32", "download it again"),
])
def test_finite_output_names_what_the_dtype_and_the_fix(dtype, name, fix):
    x = torch.tensor([1.0, math.inf, math.nan])
    with pytest.raises(CascadeError, match=f"the thing holds 2 NaN/inf values of 3 \\(weights {name}\\)") as err:
        finite_output(x, "the thing", dtype)
    assert fix in str(err.value)
    assert ("overflow" in str(err.value)) == (dtype == torch.float16)
    ok = torch.ones(2)
    assert finite_output(ok, "the thing", dtype) is ok


def test_official_values_are_stated_once():
    """The official table above is the only place the tests spell out the defaults (the other tests read
    STAGE_C / STAGE_B); this file's OFFICIAL and the dataclass agree field by field."""
    fields = {f.name for f in dataclasses.fields(SamplingSettings)} - {"noising"}
    assert all(set(v) == fields for v in OFFICIAL.values())
