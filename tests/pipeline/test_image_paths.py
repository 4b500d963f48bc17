"""Image paths: resize rules, PSNR/SSIM against hand computations, image-to-image noising against the
official gdf.diffuse formula, image-variation conditioning and the reconstruction chain on tiny networks."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade import image_ops
from comfyui_stablecascade.cascade.clip_vision import ClipVision, ClipVisionConfig
from comfyui_stablecascade.cascade.effnet import EffNetConfig, EfficientNetEncoder, normalize_imagenet
from comfyui_stablecascade.cascade.errors import CascadeError, ShapeError
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.cascade.stage_a import StageA, StageAConfig
from comfyui_stablecascade.cascade.stage_b import StageB, StageBConfig
from comfyui_stablecascade.cascade.stage_c import StageC, StageCConfig
from comfyui_stablecascade.nodes import image as image_nodes
from comfyui_stablecascade.pipeline import IMAGE_TO_IMAGE, STAGE_B, STAGE_C, SamplingSettings, stages
from comfyui_stablecascade.pipeline.conditioning import CLIP_IMG_KEY, clip_image_embeds
from comfyui_stablecascade.samplers import img2img, schedule
from comfyui_stablecascade.samplers.noise import prepare_noise

TEXT_WIDTH = 32

# ---- layouts and resize rules -------------------------------------------------------------------------


def test_image_layout_round_trip_and_alpha():
    images = torch.rand(2, 5, 7, 4)
    x = image_ops.image_to_bchw(images)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    torch.testing.assert_close(image_ops.bchw_to_image(x), images[..., :3], rtol=0, atol=0)
    assert image_ops.bchw_to_image(x * 3 - 1).min() == 0 and image_ops.bchw_to_image(x * 3 - 1).max() == 1
    with pytest.raises(ShapeError, match=r"\(1, 4, 8, 8\).*IMAGE \(B, H, W, 3\)"):
        image_ops.image_to_bchw(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("height,width,expected", [
    (1024, 1024, (768, 768)),   # the official 3/4: 768 px -> 24 x 24 cells
    (1024, 1536, (768, 1152)),
    (1000, 1000, (768, 768)),   # ceil(1000 / 42.67) = 24 cells, as calculate_latent_sizes
    (512, 384, (384, 288)),
])
def test_effnet_input_size_is_32_pixels_per_stage_c_cell(height, width, expected):
    assert image_ops.effnet_input_size(height, width) == expected
    assert expected[0] // 32 == math.ceil(height / 42.67) and expected[1] // 32 == math.ceil(width / 42.67)


@pytest.mark.parametrize("height,width,expected", [
    (1024, 1024, (768, 768)), (1000, 600, (736, 448)), (512, 384, (384, 288)), (1536, 1024, (1152, 768)),
])
def test_reconstruction_size_is_the_official_rule(height, width, expected):
    assert image_ops.reconstruction_size(height, width) == expected
    assert expected == (int((height * 0.75) // 32) * 32, int((width * 0.75) // 32) * 32)


def test_downscale_for_reconstruction_is_nearest():
    h, w = 96, 64
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).repeat(1, 3, 1, 1)
    y = image_ops.downscale_for_reconstruction(x)
    assert y.shape == (1, 3, 64, 32)  # int(72 // 32) * 32, int(48 // 32) * 32
    rows = [math.floor(i * h / 64) for i in range(64)]  # torch/torchvision "nearest": floor(dst * in / out)
    cols = [math.floor(j * w / 32) for j in range(32)]
    expected = x[0, 0][rows][:, cols]
    torch.testing.assert_close(y[0, 1], expected, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="at least 43x43"):
        image_ops.downscale_for_reconstruction(torch.rand(1, 3, 40, 100))


def test_resize_shorter_side_is_the_official_resize_image():
    x = torch.rand(1, 3, 600, 800)
    y = image_ops.resize_shorter_side(x, 768)
    assert y.shape == (1, 3, 768, 1024)  # long side int(768 * 800 / 600)
    ref = torch.nn.functional.interpolate(x, size=(768, 1024), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert image_ops.resize_shorter_side(torch.rand(1, 3, 1536, 1024), 768).shape == (1, 3, 1152, 768)


def test_resize_cover_crops_center_and_matches_official_for_squares():
    square = torch.rand(1, 3, 1024, 1024)
    torch.testing.assert_close(image_ops.resize_cover(square, 768, 768), image_ops.resize_shorter_side(square, 768),
                               rtol=0, atol=0)
    wide = torch.zeros(1, 1, 100, 300)
    wide[..., 100:200] = 1.0  # the middle third
    out = image_ops.resize_cover(wide, 64, 64)
    assert out.shape == (1, 1, 64, 64)
    assert out[..., :, 8:56].min() > 0.99  # the crop keeps the middle; edges of the middle third blend
    tall = image_ops.resize_cover(torch.rand(2, 3, 300, 100), 96, 160)
    assert tall.shape == (2, 3, 96, 160)


# ---- metrics ------------------------------------------------------------------------------------------


def _ssim_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one (C, H, W) pair with explicit 11x11 windows, float64 (Wang et al. 2004)."""
    coords = np.arange(11) - 5.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for ch in range(a.shape[0]):
        values = []
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[ch, i:i + 11, j:j + 11], b[ch, i:i + 11, j:j + 11]
                mx, my = (window * pa).sum(), (window * pb).sum()
                vx = (window * (pa - mx) ** 2).sum()
                vy = (window * (pb - my) ** 2).sum()
                cov = (window * (pa - mx) * (pb - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert image_ops.psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 9, 7, generator=gen), torch.rand(2, 3, 9, 7, generator=gen)
    nx, ny = x.double().numpy(), y.double().numpy()
    expected = [10 * math.log10(1.0 / np.mean((nx[k] - ny[k]) ** 2)) for k in range(2)]
    assert image_ops.psnr(x, y).tolist() == pytest.approx(expected, abs=1e-9)
    same = image_ops.psnr(x, x)
    assert torch.isinf(same).all() and (same > 0).all()
    assert image_ops.format_psnr(same[0].item()) == "inf dB (identical)"
    assert image_ops.format_psnr(20.0) == "20.00 dB"


def test_ssim_by_hand():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 14, generator=gen)
    y = (x + 0.2 * torch.randn(2, 3, 16, 14, generator=gen)).clamp(0, 1)
    got = image_ops.ssim(x, y)
    expected = [_ssim_by_hand(x[k].double().numpy(), y[k].double().numpy()) for k in range(2)]
    assert got.tolist() == pytest.approx(expected, abs=1e-10)
    assert 0.1 < got.min() and got.max() < 0.95
    assert image_ops.ssim(x, x).tolist() == [1.0, 1.0]
    # Constant images: variances vanish, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    pair = [torch.full((1, 3, 12, 12), v, dtype=torch.float64) for v in (0.2, 0.6)]
    const = image_ops.ssim(*pair).item()
    assert const == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.04 + 0.36 + 1e-4), abs=1e-9)


def test_metric_errors_name_the_fix():
    with pytest.raises(ShapeError, match=r"\(1, 3, 8, 8\) and \(1, 3, 8, 9\).*resize one"):
        image_ops.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ShapeError, match="minimum is 11x11"):
        image_ops.ssim(torch.zeros(1, 3, 10, 30), torch.zeros(1, 3, 10, 30))


# ---- image-to-image noising ---------------------------------------------------------------------------


def _official_diffuse(x0: torch.Tensor, noise: torch.Tensor, t: float, shift: float = 1.0) -> torch.Tensor:
    """gdf.diffuse(x0, t, shift) written out from the spec (CosineSchedule s=0.008, clamp [1e-4, 0.9999],
    shift as logSNR + 2 ln(1/shift) clamped to the shift-1 limits, VPScaler), float32 like the original."""
    s = torch.tensor(0.008)
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2

    def log_snr(tt: torch.Tensor) -> torch.Tensor:
        var = (torch.cos((s + tt) / (1 + s) * torch.pi * 0.5) ** 2 / min_var).clamp(1e-4, 0.9999)
        return (var / (1 - var)).log()

    limits = log_snr(torch.tensor([1.0, 0.0]))
    value = (log_snr(torch.tensor(t)) + 2 * math.log(1 / shift)).clamp(limits[0], limits[1])
    a, b = value.sigmoid().sqrt(), (1 - value.sigmoid()).sqrt()
    return x0 * a + noise * b


def test_official_img2img_noising_is_gdf_diffuse_with_shift_1():
    latent = torch.randn(2, 16, 24, 24, generator=torch.Generator().manual_seed(3))
    noise = prepare_noise(latent, seed=7)
    official = img2img.noise_latent(latent, noise, 0.8, "official", sampler_shift=2.0)
    torch.testing.assert_close(official, _official_diffuse(latent, noise, 0.8), rtol=0, atol=1e-6)
    torch.testing.assert_close(img2img.prepare_start(latent, 7, 0.8, "official", 2.0), official, rtol=0, atol=0)
    ls = img2img.start_logsnr(0.8, "official", 2.0).item()
    a = math.sqrt(1 / (1 + math.exp(-ls)))
    assert round(ls, 3) == -2.265 and round(a, 3) == 0.307  # SPEC §11
    # ... while the sampler's first step (16 steps from t 0.8, shift 2) assumes far more noise.
    first = schedule.logsnr_schedule(img2img.steps_to_run(20, 0.8), 2.0, t_start=0.8)[0].item()
    assert round(first, 3) == -3.652 and round(schedule.alpha_sigma(first)[0].item(), 5) == 0.15905


def test_consistent_img2img_noising_uses_the_sampler_shift():
    latent = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5))
    consistent = img2img.noise_latent(latent, noise, 0.8, "consistent", sampler_shift=2.0)
    torch.testing.assert_close(consistent, _official_diffuse(latent, noise, 0.8, shift=2.0), rtol=0, atol=1e-6)
    first = schedule.logsnr_schedule(16, 2.0, t_start=0.8)[0]
    assert img2img.start_logsnr(0.8, "consistent", 2.0).item() == pytest.approx(first.item(), abs=1e-6)
    # More noise than the official recipe at the same denoise: the input's share drops from 0.307 to 0.159.
    official = img2img.noise_latent(latent, noise, 0.8, "official", sampler_shift=2.0)
    assert (consistent - noise).abs().mean() < (official - noise).abs().mean()
    # With shift 1 (Stage B) the two recipes agree.
    torch.testing.assert_close(img2img.noise_latent(latent, noise, 0.6, "consistent", 1.0),
                               img2img.noise_latent(latent, noise, 0.6, "official", 1.0), rtol=0, atol=0)


def test_partial_schedule_is_the_tail_of_the_full_one():
    assert img2img.steps_to_run(20, 0.8) == 16
    full = schedule.timesteps(20)
    torch.testing.assert_close(schedule.timesteps(16, t_start=0.8), full[4:], rtol=0, atol=1e-6)


def test_img2img_bad_input():
    with pytest.raises(CascadeError, match="'official' .* or 'consistent'"):
        img2img.noise_shift("sdxl", 2.0)
    with pytest.raises(CascadeError, match="draw the noise like the latent"):
        img2img.noise_latent(torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 5), 0.5)


# ---- image variation ----------------------------------------------------------------------------------


def _conditioning(seed: int, batch: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, TEXT_WIDTH, generator=gen),
             {"pooled_output": torch.randn(batch, TEXT_WIDTH, generator=gen)}]]


@pytest.fixture(scope="module")
def clip_vision():
    torch.manual_seed(0)
    return host.wrap(ClipVision(ClipVisionConfig.tiny()), "clip_vision")


@pytest.fixture(scope="module")
def stage_c():
    config = dataclasses.replace(StageCConfig.tiny(), c_clip_text=TEXT_WIDTH, c_clip_text_pooled=TEXT_WIDTH)
    return host.wrap(randomize_(StageC(config), 0), "stage_c")


def test_variation_conditioning_shapes_strength_and_chaining(clip_vision):
    images = torch.rand(2, 64, 80, 3, generator=torch.Generator().manual_seed(2))
    prompt = _conditioning(0)
    (cond,) = image_nodes.ClipVisionEncode().encode(prompt, clip_vision, images, 1.0)
    embeds = clip_vision.module.encode(images)
    assert embeds.shape == (2, 768)
    got = cond[0][1][CLIP_IMG_KEY]
    assert got.shape == (1, 2, 768)  # two images -> two image prompts of one conditioning
    torch.testing.assert_close(got[0], embeds, rtol=0, atol=0)
    assert cond[0][0] is prompt[0][0] and CLIP_IMG_KEY not in prompt[0][1]  # the input is unchanged
    (half,) = image_nodes.ClipVisionEncode().encode(prompt, clip_vision, images, 0.5)
    torch.testing.assert_close(half[0][1][CLIP_IMG_KEY], 0.5 * got, rtol=0, atol=0)
    # Chaining adds the next image with its own strength after the first ones.
    third = torch.rand(1, 50, 50, 3, generator=torch.Generator().manual_seed(3))
    (chained,) = image_nodes.ClipVisionEncode().encode(cond, clip_vision, third, 2.0)
    tokens = chained[0][1][CLIP_IMG_KEY]
    assert tokens.shape == (1, 3, 768)
    torch.testing.assert_close(tokens[:, :2], got, rtol=0, atol=0)
    torch.testing.assert_close(tokens[0, 2], 2.0 * clip_vision.module.encode(third)[0], rtol=0, atol=0)
    # The runner reads the same tensor; a conditioning without images reads as one zero embedding.
    torch.testing.assert_close(clip_image_embeds(chained[0][1], 1, 768), tokens, rtol=0, atol=0)
    assert not clip_image_embeds(prompt[0][1], 1, 768).any()


def _spy_conditioning(module, seen):
    original = module._conditioning

    def spy(clip_text, clip_text_pooled, clip_img, dtype):
        out = original(clip_text, clip_text_pooled, clip_img, dtype)
        seen.append((clip_img.detach().clone(), tuple(out.shape)))
        return out

    module._conditioning = spy
    return original


@pytest.mark.parametrize("prompt_seed", [None, 5], ids=["empty-prompt", "prompt"])
def test_variation_reaches_stage_c_with_zero_uncond(clip_vision, stage_c, prompt_seed):
    images = torch.rand(3, 48, 48, 3, generator=torch.Generator().manual_seed(4))
    empty = _conditioning(1)
    positive = empty if prompt_seed is None else _conditioning(prompt_seed)
    (positive,) = image_nodes.ClipVisionEncode().encode(positive, clip_vision, images, 0.8)
    seen = []
    module = stage_c.module
    original = _spy_conditioning(module, seen)
    try:
        out = stages.sample_stage_c(stage_c, positive, empty, torch.zeros(1, 16, 4, 4),
                                    STAGE_C.replace(steps=2, cfg=4.0), seed=1)
    finally:
        module._conditioning = original
    assert out.shape == (1, 16, 4, 4) and torch.isfinite(out).all()
    clip_img, kv_shape = seen[0]
    assert clip_img.shape == (2, 3, 768)  # cond and uncond batched; N = 3 images
    torch.testing.assert_close(clip_img[0], 0.8 * clip_vision.module.encode(images), rtol=0, atol=1e-6)
    assert not clip_img[1].any()  # the unconditional branch: zeros, as many as the positive has
    assert kv_shape == (2, 77 + 4 + 4 * 3, module.config.c_cond)  # text + pooled + 4 tokens per image


# ---- image-to-image sampler node ----------------------------------------------------------------------


def test_runner_noising_matches_img2img_module():
    latent = torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(8))
    noise = prepare_noise(latent, seed=3)
    logsnrs = schedule.logsnr_schedule(16, 2.0, t_start=0.8)
    for mode in img2img.NOISING_MODES:
        torch.testing.assert_close(stages.initial_state(latent, noise, logsnrs, 0.8, mode),
                                   img2img.noise_latent(latent, noise, 0.8, mode, sampler_shift=2.0),
                                   rtol=0, atol=1e-7)


def test_image_to_image_node_defaults_and_noising(stage_c):
    specs = image_nodes.StageCImageToImage.INPUT_TYPES()["required"]
    names = ("steps", "cfg", "shift", "sampler", "rescale", "denoise", "noising")
    assert {k: specs[k][1]["default"] for k in names} == {k: getattr(IMAGE_TO_IMAGE, k) for k in names}
    # The notebook's image-to-image: 16 steps from t_start 0.8, noised as gdf.diffuse with shift 1.
    assert (IMAGE_TO_IMAGE.steps, IMAGE_TO_IMAGE.denoise, IMAGE_TO_IMAGE.noising) == (16, 0.8, "official")
    assert IMAGE_TO_IMAGE.replace(steps=STAGE_C.steps, denoise=1.0, noising=STAGE_C.noising) == STAGE_C
    latent = {"samples": torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(9)), "scw_stage": "c"}
    node = image_nodes.StageCImageToImage()
    args = dict(stage_c=stage_c, positive=_conditioning(0), negative=_conditioning(1), latent=latent, seed=3,
                steps=2, cfg=4.0, shift=2.0, sampler="ddim", rescale=0.7, denoise=0.8)
    (official,) = node.sample(**args, noising="official")
    (again,) = node.sample(**args, noising="official")
    (consistent,) = node.sample(**args, noising="consistent")
    assert official["samples"].shape == (1, 16, 4, 4) and official["scw_stage"] == "c"
    torch.testing.assert_close(official["samples"], again["samples"], rtol=0, atol=0)
    direct = stages.sample_stage_c(stage_c, args["positive"], args["negative"], latent["samples"],
                                   SamplingSettings(2, 4.0, 2.0, "ddim", 0.7, 0.8, "official"), seed=3)
    torch.testing.assert_close(official["samples"], direct, rtol=0, atol=0)
    assert not torch.allclose(official["samples"], consistent["samples"])


# ---- Stage A on its own and the comparison node -------------------------------------------------------


@pytest.fixture(scope="module")
def stage_a():
    return host.wrap(randomize_(StageA(StageAConfig.tiny()), 1), "stage_a")


def test_stage_a_encode_node_round_trip(stage_a):
    from comfyui_stablecascade.nodes.decode import StageADecode

    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(6))
    (latent,) = image_nodes.StageAEncode().encode(stage_a, image)
    x = image_ops.image_to_bchw(image)
    assert latent["samples"].shape == (1, 4, 10, 14) and latent["scw_stage"] == "b"
    # core's SC_B storage: the encoder output before the official / 0.43
    torch.testing.assert_close(latent["samples"], stage_a.module.encode_raw(x), rtol=0, atol=0)
    torch.testing.assert_close(latent["samples"], stage_a.module.encode(x) * 0.43, rtol=1e-5, atol=1e-6)
    (decoded,) = StageADecode().decode(stage_a, latent)
    assert decoded.shape == image.shape
    torch.testing.assert_close(decoded, image_ops.bchw_to_image(stage_a.module.decode_raw(latent["samples"])),
                               rtol=0, atol=1e-6)
    with pytest.raises(ShapeError, match="42x30 pixels; Stage A needs width and height multiples of 4"):
        image_nodes.StageAEncode().encode(stage_a, torch.rand(1, 30, 42, 3))


def test_image_compare_node():
    gen = torch.Generator().manual_seed(7)
    reference = torch.rand(1, 24, 20, 3, generator=gen)
    images = torch.cat([reference, (reference + 0.05 * torch.randn(1, 24, 20, 3, generator=gen)).clamp(0, 1)])
    out = image_nodes.ImageCompare().compare(reference, images, gain=2.0)
    lines = out["ui"]["text"][0].splitlines()
    assert lines[0] == "image 1: PSNR inf dB (identical), SSIM 1.0000"
    x = image_ops.image_to_bchw(images[1:])
    r = image_ops.image_to_bchw(reference)
    expected = f"image 2: PSNR {image_ops.psnr(r, x).item():.2f} dB, SSIM {image_ops.ssim(r, x).item():.4f}"
    assert lines[1] == expected
    mse = ((images[1] - reference[0]) ** 2).double().mean().item() / 2  # two images, one identical
    assert lines[2].startswith(f"batch: PSNR {10 * math.log10(1 / mse):.2f} dB")
    (diff,) = out["result"]
    assert diff.shape == images.shape and not diff[0].any()
    torch.testing.assert_close(diff[1], ((images[1] - reference[0]).abs() * 2).clamp(0, 1), rtol=0, atol=0)
    with pytest.raises(ShapeError, match=r"\(1, 3, 24, 20\) and \(1, 3, 24, 21\)"):
        image_nodes.ImageCompare().compare(reference, torch.rand(1, 24, 21, 3))


# ---- EffNet encode nodes and the reconstruction chain -------------------------------------------------


@pytest.fixture(scope="module")
def effnet():
    return host.wrap(randomize_(EfficientNetEncoder(EffNetConfig.tiny()), 2), "effnet")


def _record_inputs(module, seen):
    hook = module.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    return hook


def test_stage_c_encode_official_size_and_values(effnet):
    image = torch.rand(1, 1024, 1024, 3, generator=torch.Generator().manual_seed(10))
    seen = []
    hook = _record_inputs(effnet.module, seen)
    try:
        stage_c, stage_b = image_nodes.StageCEncode().encode(effnet, image, 1024, 1024, 42.67)
    finally:
        hook.remove()
    assert seen == [(1, 3, 768, 768)]  # 3/4 of the output: the official resize_image(image, 768)
    assert stage_c["samples"].shape == (1, 16, 24, 24) and stage_c["scw_stage"] == "c"
    assert stage_b["samples"].shape == (1, 4, 256, 256) and not stage_b["samples"].any()
    x = image_ops.resize_shorter_side(image_ops.image_to_bchw(image), 768)
    with torch.no_grad():
        direct = effnet.module(normalize_imagenet(x))
    torch.testing.assert_close(stage_c["samples"], direct, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width,height,effnet_hw,c_hw,b_hw", [
    (640, 384, (288, 480), (9, 15), (96, 160)),  # 4:3 image into 5:3: center crop
    (0, 0, (288, 384), (9, 12), (96, 128)),  # the image's own 384 x 512
])
def test_stage_c_encode_non_square(effnet, width, height, effnet_hw, c_hw, b_hw):
    image = torch.rand(2, 384, 512, 3, generator=torch.Generator().manual_seed(11))
    seen = []
    hook = _record_inputs(effnet.module, seen)
    try:
        stage_c, stage_b = image_nodes.StageCEncode().encode(effnet, image, width, height, 42.67)
    finally:
        hook.remove()
    assert seen == [(2, 3, *effnet_hw)]
    assert stage_c["samples"].shape == (2, 16, *c_hw) and stage_b["samples"].shape == (2, 4, *b_hw)


def test_encode_nodes_name_the_minimum_size(effnet):
    with pytest.raises(ShapeError, match="20x24 pixels.*minimum is 32x32.*upscale"):
        image_nodes.StageCEncode().encode(effnet, torch.rand(1, 24, 20, 3), 1024, 1024, 42.67)
    with pytest.raises(ShapeError, match="at least 43x43"):
        image_nodes.ReconstructionEncode().encode(effnet, torch.rand(1, 40, 64, 3))


def test_reconstruction_chain_shapes_non_square(effnet, stage_a):
    from comfyui_stablecascade.nodes.decode import StageADecode

    stage_b = host.wrap(randomize_(StageB(dataclasses.replace(StageBConfig.tiny(), c_clip=TEXT_WIDTH)), 3), "stage_b")
    image = torch.rand(1, 192, 256, 3, generator=torch.Generator().manual_seed(12))
    seen = []
    hook = _record_inputs(effnet.module, seen)
    try:
        prior, empty_b = image_nodes.ReconstructionEncode().encode(effnet, image)
    finally:
        hook.remove()
    assert seen == [(1, 3, 128, 192)]  # int((192 * 3/4) // 32) * 32, int((256 * 3/4) // 32) * 32
    assert prior["samples"].shape == (1, 16, 4, 6) and empty_b["samples"].shape == (1, 4, 48, 64)
    latent_b = stages.sample_stage_b(stage_b, _conditioning(0), _conditioning(1), prior["samples"],
                                     empty_b["samples"], STAGE_B.replace(steps=2), seed=1)
    assert latent_b.shape == (1, 4, 48, 64) and torch.isfinite(latent_b).all()
    (decoded,) = StageADecode().decode(stage_a, {"samples": latent_b, "scw_stage": "b"})
    assert decoded.shape == image.shape
    out = image_nodes.ImageCompare().compare(image, decoded)
    assert out["ui"]["text"][0].startswith("image 1: PSNR ") and "inf" not in out["ui"]["text"][0]


def test_stage_c_encode_validates_output_size():
    check = image_nodes.StageCEncode.VALIDATE_INPUTS
    assert check(width=0, height=0) is True and check(width=1024, height=256) is True
    assert "width 64 is too small for Stage C - use 0 (the image's own width) or at least 256" in check(width=64)
    assert check(width=512, height=100).startswith("height 100")
