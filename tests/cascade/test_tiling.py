"""Tiled Stage A decode: equal to the untiled decode (odd sizes, batches, raw), automatic planning."""

import pytest
import torch

from comfyui_stablecascade.cascade import tiling
from comfyui_stablecascade.cascade.errors import ShapeError
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_a import StageA, StageAConfig

# "Equal up to float rounding" (cascade/tiling.py): a tile's convolutions sum in another order. Measured
# <= 4.3e-6 on outputs up to |9.5|, i.e. a few float32 ulps.
TOL = 1e-5


def _stage_a(config: StageAConfig) -> StageA:
    """Random weights, including the block gammas (zero at init, which would make every ResBlock local)."""
    model = randomize_(StageA(config), seed=0, vector_std=0.5, unit_norm_weights=False)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def stage_a():
    return _stage_a(StageAConfig.tiny())


def _latent(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape,tile,chunk", [
    ((2, 4, 21, 27), 12, None), ((3, 4, 23, 9), 10, 2), ((1, 4, 9, 9), 5, 1)])
def test_tiled_matches_untiled_on_odd_sizes(stage_a, shape, tile, chunk):
    z = _latent(*shape)
    ref = stage_a.decode(z)
    out = tiling.decode_tiled(stage_a, z, tile=tile, batch_chunk=chunk)
    assert out.shape == ref.shape == (shape[0], 3, 4 * shape[2], 4 * shape[3])
    assert (out - ref).abs().max().item() <= TOL


def test_deeper_variant_and_raw_decode():
    model = _stage_a(StageAConfig(levels=3, bottleneck_blocks=3, c_hidden=32, c_latent=4, codebook_size=16))
    z = _latent(2, 4, 13, 18, seed=2)
    ref = model.decode_raw(z)
    out = tiling.decode_tiled(model, z, tile=8, raw=True)
    assert out.shape == ref.shape == (2, 3, 8 * 13, 8 * 18)
    assert (out - ref).abs().max().item() <= TOL


def test_too_little_overlap_shows_seams(stage_a):
    """The comparison above can fail: without context the tile borders are wrong."""
    z = _latent(1, 4, 16, 16)
    ref = stage_a.decode(z)
    out = tiling.decode_tiled(stage_a, z, tile=8, overlap=1)
    assert (out - ref).abs().max().item() > 1e-2  # far beyond rounding: measured 3.0


def test_decode_auto_whole_when_it_fits_and_tiled_when_not(stage_a):
    z = _latent(2, 4, 30, 22, seed=3)
    ref = stage_a.decode(z)
    assert torch.equal(tiling.decode_auto(stage_a, z, memory_budget=1 << 40), ref)
    image = ref.numel() * 4
    one_sample = tiling.estimate_decode_memory(stage_a.config, (1, *z.shape[1:]), torch.float32)
    tile, chunk = tiling.plan_decode(stage_a.config, z.shape, torch.float32, image + one_sample)
    assert tile is None and chunk == 1  # one sample fits: whole samples, no spatial tiles
    small = image + tiling.estimate_decode_memory(stage_a.config, (1, 4, 24, 24), torch.float32)
    tile, chunk = tiling.plan_decode(stage_a.config, z.shape, torch.float32, small)
    assert tile is not None and tile < 30 and chunk == 1
    out = tiling.decode_auto(stage_a, z, memory_budget=small)
    assert (out - ref).abs().max().item() <= TOL


def test_estimate_scales_with_batch_area_and_dtype(stage_a):
    cfg = stage_a.config
    fixed = tiling._CHUNK_BYTES  # the chunked paths' working memory, independent of the shape

    def variable(*shape, dtype=torch.float32):
        return tiling.estimate_decode_memory(cfg, shape, dtype) - fixed

    one = variable(1, 4, 64, 64)
    assert one > 0
    assert variable(4, 4, 64, 64) == pytest.approx(4 * one, rel=1e-6)
    assert variable(1, 4, 128, 128) == pytest.approx(4 * one, rel=1e-6)
    assert variable(1, 4, 64, 64, dtype=torch.bfloat16) == pytest.approx(one / 2, rel=1e-6)
    # The release: a transposed conv's input and output (384 + 4 x 192 channels a latent pixel) dominate.
    release = tiling.estimate_decode_memory(StageAConfig(), (1, 4, 256, 256), torch.float32)
    assert release >= (384 + 768) * 256 * 256 * 4
    assert tiling.receptive_radius(StageAConfig()) == 15


def test_bad_latent_is_rejected(stage_a):
    with pytest.raises(ShapeError):
        tiling.decode_tiled(stage_a, torch.zeros(4, 8, 8))
