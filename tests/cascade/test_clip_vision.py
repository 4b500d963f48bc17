"""ClipVision: preprocessing numbers, parity with transformers, key loading."""

import numpy as np
import pytest
import torch
from comfyui_stablecascade.cascade import clip_vision as V
from comfyui_stablecascade.cascade.errors import CheckpointError, ShapeError, UnknownLayoutError

MEAN = torch.tensor(V.CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(V.CLIP_STD).view(1, 3, 1, 1)


def _smooth_image(h, w):
    """A low-frequency RGB image inside [0.1, 0.9], so bicubic overshoot never leaves [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.35 * np.sin(3 * xx + yy), 0.5 + 0.3 * np.cos(2 * yy), 0.2 + 0.6 * xx * yy], -1)
    return img.astype(np.float32)


def test_constant_image_by_hand():
    img = torch.empty(2, 300, 500, 3)
    img[0] = torch.tensor([0.2, 0.5, 0.9])
    img[1] = torch.tensor([1.0, 0.0, 0.25])
    out = V.clip_preprocess(img)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = (img[:, :1, :1].permute(0, 3, 1, 2) - MEAN) / STD
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-5, rtol=0)


def test_crop_offsets_follow_torchvision():
    # Shorter side already 224: no resampling, only the crop. 291 - 224 = 67 is odd: torchvision
    # takes int(round(33.5)) = 34 (Python rounds half to even), not 67 // 2 = 33.
    cols = torch.arange(291, dtype=torch.float32) / 290
    img = cols.view(1, 1, 291, 1).expand(1, 224, 291, 3).contiguous()
    out = V.clip_preprocess(img) * STD + MEAN
    torch.testing.assert_close(out[0, 0, 0], cols[34 : 34 + 224], atol=1e-6, rtol=0)
    tall = img.transpose(1, 2).contiguous()  # 291 x 224: the crop moves along the height
    out = V.clip_preprocess(tall) * STD + MEAN
    torch.testing.assert_close(out[0, 0, :, 0], cols[34 : 34 + 224], atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(300, 400), (256, 320), (200, 260), (180, 240)])
def test_resample_matches_pil_bicubic_in_float(hw):
    """Against PIL's float ('F') bicubic per channel: same kernel (a = -0.5), same output grid."""
    from PIL import Image

    h, w = hw
    img = _smooth_image(h, w)
    short_is_h = h <= w
    new = (224, int(224 * w / h)) if short_is_h else (int(224 * h / w), 224)
    chans = [np.asarray(Image.fromarray(img[..., c], mode="F").resize((new[1], new[0]), Image.BICUBIC))
             for c in range(3)]
    resized = torch.from_numpy(np.stack(chans, 0))[None]
    top, left = int(round((new[0] - 224) / 2)), int(round((new[1] - 224) / 2))
    expected = (resized[:, :, top : top + 224, left : left + 224] - MEAN) / STD
    out = V.clip_preprocess(torch.from_numpy(img)[None])
    # float32 rounding of the 4-tap sums, divided by CLIP's std (~0.27): measured <= 1.2e-6.
    torch.testing.assert_close(out, expected, atol=5e-6, rtol=0)


@pytest.mark.parametrize("hw", [(300, 400), (256, 320), (180, 240), (448, 224)])
def test_matches_transformers_clip_image_processor(hw):
    """Against transformers' CLIPImageProcessor (PIL backend) on an 8-bit image.

    Tolerance: PIL resizes 8-bit images in two separable passes and rounds to uint8 after each. The
    second pass adds at most 0.5/255; the first pass's rounding (<= 0.5/255) is carried through the
    second pass's kernel, whose absolute weights sum to at most 1.25 for bicubic a = -0.5 (taps
    0.5625, 0.5625, -0.0625, -0.0625 at half-pixel offsets). Bound: 0.5 + 0.625 = 1.125/255 in pixel
    units; we allow 1.2/255 (compared after multiplying the normalised difference by std). Sizes keep
    the crop offset the same in both (transformers floors (H - 224) / 2, torchvision rounds it).
    """
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    h, w = hw
    u8 = np.round(_smooth_image(h, w) * 255).astype(np.uint8)
    ref = CLIPImageProcessorPil()(images=Image.fromarray(u8), return_tensors="pt")["pixel_values"]
    out = V.clip_preprocess(torch.from_numpy(u8).float()[None] / 255)
    assert ref.shape == out.shape == (1, 3, 224, 224)
    err = ((out - ref) * STD).abs().max().item() * 255
    assert err <= 1.2, f"{err:.3f}/255"


def test_preprocess_rejects_wrong_layout():
    with pytest.raises(ShapeError, match="B, H, W, 3"):
        V.clip_preprocess(torch.rand(1, 3, 224, 224))


@pytest.fixture(scope="module")
def vision():
    model = V.ClipVision(V.ClipVisionConfig.tiny())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_encode_matches_transformers(vision):
    from transformers import CLIPVisionModelWithProjection

    images = torch.rand(2, 240, 320, 3, generator=torch.Generator().manual_seed(0))
    embeds = vision.encode(images)
    assert embeds.shape == (2, 768)
    hf = CLIPVisionModelWithProjection(vision.config.to_transformers()).eval()
    hf.load_state_dict(vision.state_dict(), strict=True)
    with torch.no_grad():
        ref = hf(pixel_values=V.clip_preprocess(images)).image_embeds
    # The pack's pure-torch tower runs the same kernels in the same order as transformers': bit for bit.
    torch.testing.assert_close(embeds, ref, atol=0, rtol=0)
    assert list(vision.state_dict()) == list(hf.state_dict())
    # Another batch size: float32 rounding only (measured 3.7e-8 on embeddings up to 0.38).
    torch.testing.assert_close(vision.encode(images[1:]), embeds[1:], atol=1e-6, rtol=1e-5)


def test_encode_pixels_checks_the_size(vision):
    with pytest.raises(ShapeError, match=r"\(B, 3, 224, 224\)"):
        vision.encode_pixels(torch.zeros(1, 3, 112, 112))


def test_vit_l14_config_matches_release():
    cfg = V.ClipVisionConfig.vit_l14().to_transformers()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        1024, 4096, 24, 16)
    assert (cfg.image_size, cfg.patch_size, cfg.projection_dim, cfg.hidden_act) == (224, 14, 768, "quick_gelu")
    model = V.ClipVision(V.ClipVisionConfig.vit_l14(), device="meta")
    assert V.ClipVisionConfig.from_state_dict(model.state_dict()) == V.ClipVisionConfig.vit_l14()


@pytest.mark.parametrize("prefix", ["", "clip_l_vision.", "image_encoder."])
def test_load_any_prefix(vision, prefix):
    sd = {prefix + k: v.clone() for k, v in vision.state_dict().items()}
    sd["model.diffusion_model.clip_img_mapper.weight"] = torch.zeros(2, 2)  # another component of a package
    loaded = V.ClipVision.from_state_dict(sd)
    assert loaded.config == vision.config
    images = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.encode(images), vision.encode(images), atol=0, rtol=0)


def test_load_keeps_or_casts_dtype(vision):
    sd = {k: v.half() for k, v in vision.state_dict().items()}
    kept = V.ClipVision.from_state_dict(sd)
    assert all(p.dtype == torch.float16 for p in kept.parameters())
    cast = V.ClipVision.from_state_dict(sd, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in cast.parameters())
    assert torch.equal(cast.visual_projection.weight, sd["visual_projection.weight"].float())


def test_load_errors(vision):
    sd = dict(vision.state_dict())
    del sd["visual_projection.weight"]
    with pytest.raises(CheckpointError, match="visual_projection"):
        V.ClipVision.from_state_dict(sd)
    target = V.ClipVision(vision.config, device="meta")
    with pytest.raises(CheckpointError, match="missing"):
        target.load_state_dict_any(sd)
    with pytest.raises(UnknownLayoutError, match="vision_model.post_layernorm"):
        V.ClipVision.from_state_dict({"text_model.final_layer_norm.weight": torch.zeros(4)})


def test_bf16_weights_compute_in_bf16(vision):
    sd = {k: v.to(torch.bfloat16) for k, v in vision.state_dict().items()}
    low, ref = V.ClipVision.from_state_dict(sd), V.ClipVision.from_state_dict(sd, dtype=torch.float32)
    images = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(2))
    a, b = low.encode(images), ref.encode(images)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    # bf16 keeps 8 significant bits; the embedding stays collinear with the fp32 one.
    assert torch.nn.functional.cosine_similarity(a.float(), b).item() > 0.999
