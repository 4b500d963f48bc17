"""Images in and out of the cascade: EffNet and CLIP-vision encoding, Stage A encode/decode, Previewer decode.

Every network runs inside ``host.using`` (loaded with a memory estimate where one matters, patches taken
back off on any error) and results go to the host's intermediate device as float32. A network output with
NaN/inf values stops with an error naming the network and its weights' dtype (a NaN decode would otherwise be
a black image).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..cascade import image_ops, tiling
from ..cascade.effnet import normalize_imagenet
from .latents import finite_output, latent_samples


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def effnet_encode(effnet: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> Stage C latent (B, 16, H/32, W/32): ImageNet-normalised in float32 (the
    official ``effnet_preprocess``), then run in the weights' dtype; float32 on the intermediate device."""
    with host.using([effnet]):
        module = host.module_of(effnet)
        weight = _weight(module)
        pixels = normalize_imagenet(x.to(weight.device, torch.float32)).to(weight.dtype)
        with torch.no_grad():
            z = module(pixels)
    return finite_output(z, "the EffNet encoder's output", weight.dtype).float().to(host.intermediate_device())


def encode_clip_images(clip_vision: Any, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) -> CLIP ViT-L image_embeds (N, 768), float32 on the intermediate device;
    ``crop``: center-crop to a square first (official), else squeeze the whole image (core's crop "none")."""
    with host.using([clip_vision]):
        embeds = host.module_of(clip_vision).encode(images, crop)
    return embeds.float().to(host.intermediate_device())


def stage_a_encode(stage_a: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> Stage B latent in core's SC_B storage (the encoder output before the
    official / 0.43), so Stage A decode nodes and core's VAEDecode read it back."""
    with host.using([stage_a]):
        module = host.module_of(stage_a)
        weight = _weight(module)
        with torch.no_grad():
            z = module.encode_raw(x.to(weight.device, weight.dtype))
    return finite_output(z, "the Stage A encoder's output", weight.dtype).float().to(host.intermediate_device())


def decode_stage_a(stage_a: Any, latent: Any) -> torch.Tensor:
    """Stage B LATENT (SC_B storage convention) -> B x 3 x H x W. The host is asked to make room for a whole
    decode (offloading other networks); if that still does not fit, the decode runs in tiles."""
    z = latent_samples(latent, "b", "Stage A decode latent")
    module = host.module_of(stage_a)
    with host.using([stage_a], tiling.estimate_decode_memory(module.config, tuple(z.shape), module.dtype)):
        weight = _weight(module)
        image = tiling.decode_auto(module, z.to(weight.device, weight.dtype), host.free_memory(weight.device),
                                   raw=True)
    return finite_output(image, "Stage A decode: the decoded image (of a finite latent)", weight.dtype)


def decode_previewer(previewer: Any, latent: Any) -> torch.Tensor:
    """Stage C LATENT -> the Previewer's B x 3 x 8h x 8w image."""
    z = latent_samples(latent, "c", "Previewer latent")
    with host.using([previewer]):
        module = host.module_of(previewer)
        weight = _weight(module)
        with torch.no_grad():
            image = module(z.to(weight.device, weight.dtype))
    return finite_output(image, "Previewer decode: the preview image (of a finite latent)", weight.dtype)


def to_image(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W network output -> ComfyUI IMAGE (B x H x W x 3, float32, CPU, clamped to [0, 1])."""
    return x.float().clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu()


def input_pixels(image: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE -> (B, 3, H, W), at least one EffNet cell (32 x 32 pixels)."""
    x = image_ops.image_to_bchw(image, f"{what}: input 'image'")
    image_ops.check_min_size(x, image_ops.EFFNET_STRIDE, f"{what}: the image",
                             "the EffNet needs 32 pixels for one Stage C cell; use a larger image or upscale it "
                             "(core's ImageScale)")
    return x


def comparison(reference: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-image PSNR, per-image SSIM, PSNR of the whole batch) of two IMAGEs; a batch-1 reference is
    compared with every image."""
    a = image_ops.image_to_bchw(reference, "'Stable Cascade Image Compare (PSNR, SSIM)': input 'reference'")
    b = image_ops.image_to_bchw(image, "'Stable Cascade Image Compare (PSNR, SSIM)': input 'image'")
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = a.expand_as(b) if a.shape[1:] == b.shape[1:] else a
    psnr, ssim = image_ops.psnr(a, b), image_ops.ssim(a, b)
    overall = image_ops.psnr(a.reshape(1, -1, *a.shape[2:]), b.reshape(1, -1, *b.shape[2:]))[0]
    return psnr, ssim, overall


def comparison_report(psnr: torch.Tensor, ssim: torch.Tensor, overall: torch.Tensor) -> str:
    lines = [f"image {i + 1}: PSNR {image_ops.format_psnr(p)}, SSIM {s:.4f}"
             for i, (p, s) in enumerate(zip(psnr.tolist(), ssim.tolist()))]
    if len(lines) > 1:
        lines.append(f"batch: PSNR {image_ops.format_psnr(overall.item())}, mean SSIM {ssim.mean().item():.4f}")
    return "\n".join(lines)
