"""Image helpers of the image paths (variation, image-to-image, reconstruction), pure torch.

- layouts: ComfyUI's IMAGE (B, H, W, 3) <-> the networks' (B, 3, H, W);
- the official resize rules (SPEC §1.2, §11): ``resize_image`` (shorter side to a size, antialiased
  bilinear, as torchvision's ``F.resize`` on tensors) for image-to-image, and ``downscale_images``
  (nearest, each side ``int((side * 3/4) // 32) * 32``) for reconstruction; plus the cover-and-crop
  resize that turns any image into the EffNet input for a chosen output size;
- quality metrics: PSNR and the SSIM of Wang et al. (2004) with its standard constants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ShapeError

EFFNET_STRIDE = 32  # EfficientNetV2-S features: one latent cell per 32x32 pixels
COMPRESSION = 42.67  # pixels per Stage C latent cell of the final image (official calculate_latent_sizes)
RECONSTRUCTION_FACTOR = 3 / 4  # official downscale_images default: 1024 px -> 768 px -> 24 cells
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---- layouts ------------------------------------------------------------------------------------------


def image_to_bchw(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) float32 on the same device.

    A 4th (alpha) channel is dropped, as ComfyUI's encoders do; other channel counts are an error.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ShapeError(
            f"{what} has shape {tuple(images.shape)}; expected a ComfyUI IMAGE (B, H, W, 3) - connect an IMAGE "
            "output (e.g. LoadImage), not a mask or a latent"
        )
    return images[..., :3].permute(0, 3, 1, 2).to(torch.float32)


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) network output -> ComfyUI IMAGE (B, H, W, 3), float32, clamped to [0, 1]."""
    return x.to(torch.float32).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


# ---- sizes and resize rules ---------------------------------------------------------------------------


def stage_c_latent_size(side: int, compression: float = COMPRESSION) -> int:
    """Stage C latent cells along one side of the final image. One rule serves both conventions users bring:
    a whole-number compression is core's (``StableCascade_EmptyLatentImage``: an INT, ``side // compression``;
    42 gives 1024 -> 24, 768 -> 18), a fractional one the official ``calculate_latent_sizes`` (``ceil(side /
    compression)``; 42.67 gives 1024 -> 24, 768 -> 18). They differ only where the division is inexact, e.g.
    1024 / 42: core 24, ceil 25."""
    if float(compression).is_integer():
        return int(side) // int(compression)
    return math.ceil(side / compression)


def check_min_size(x: torch.Tensor, minimum: int, what: str, fix: str) -> None:
    """ShapeError when H or W of (B, C, H, W) is below ``minimum``."""
    h, w = x.shape[-2:]
    if h < minimum or w < minimum:
        raise ShapeError(f"{what} is {w}x{h} pixels (width x height); the minimum is {minimum}x{minimum} - {fix}")


def resize_shorter_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """The official ``resize_image(img, size)``: shorter side -> size, longer side int(size * long / short),
    bilinear with antialiasing (torchvision's tensor resize), aspect ratio kept."""
    h, w = x.shape[-2:]
    if h <= w:
        new_hw = (size, int(size * w / h))
    else:
        new_hw = (int(size * h / w), size)
    if new_hw == (h, w):
        return x
    return F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=True)


def resize_cover(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, H, W) to exactly height x width keeping the aspect ratio: scale so the image covers the
    target (antialiased bilinear, as the official resize), then center-crop. For a square image and a square
    target this is the official ``resize_image``."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[..., top : top + height, left : left + width]


def effnet_input_size(out_height: int, out_width: int, compression: float = COMPRESSION) -> tuple[int, int]:
    """(height, width) of the EffNet input whose latent matches an out_height x out_width image: 32 pixels per
    Stage C cell, i.e. 3/4 of the output at the official compression (1024 x 1024 -> 768 x 768 -> 24 x 24)."""
    return (EFFNET_STRIDE * stage_c_latent_size(out_height, compression),
            EFFNET_STRIDE * stage_c_latent_size(out_width, compression))


def reconstruction_size(height: int, width: int, factor: float = RECONSTRUCTION_FACTOR) -> tuple[int, int]:
    """The official ``downscale_images`` size: each side int((side * factor) // 32) * 32 (1024 -> 768)."""
    return (int((height * factor) // EFFNET_STRIDE) * EFFNET_STRIDE,
            int((width * factor) // EFFNET_STRIDE) * EFFNET_STRIDE)


def downscale_for_reconstruction(x: torch.Tensor, factor: float = RECONSTRUCTION_FACTOR) -> torch.Tensor:
    """The official reconstruction input: nearest-neighbour resize of (B, C, H, W) to ``reconstruction_size``.

    Raises ShapeError when a side would become 0 (the image is smaller than 32 / factor pixels).
    """
    h, w = x.shape[-2:]
    new_h, new_w = reconstruction_size(h, w, factor)
    if new_h < EFFNET_STRIDE or new_w < EFFNET_STRIDE:
        need = math.ceil(EFFNET_STRIDE / factor)
        raise ShapeError(
            f"reconstruction: a {w}x{h} image downscaled by {factor:g} is below the EffNet's {EFFNET_STRIDE} pixels "
            f"(one Stage C cell) - use an image of at least {need}x{need} pixels or a larger factor"
        )
    return F.interpolate(x, size=(new_h, new_w), mode="nearest")


# ---- metrics ------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ShapeError(
            f"image comparison: the images have shapes {tuple(a.shape)} and {tuple(b.shape)}; both must have the "
            "same batch, size and channels - resize one to the other's size first (e.g. core's ImageScale), or "
            "compare the reconstruction with the image it was made from"
        )


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images: 10 log10(range^2 / MSE). Identical images give +inf."""
    _check_pair(a, b)
    mse = (a.to(torch.float64) - b.to(torch.float64)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> +inf, which is the right answer


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (float64); the 2-D SSIM window is its outer product."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13).

    Standard settings: 11x11 Gaussian window with sigma 1.5, K1 0.01, K2 0.03, L = data_range; local
    statistics over the valid region only (no padding), the SSIM map averaged over positions and then over
    channels (each RGB channel is compared on its own). Identical images give exactly 1.
    """
    _check_pair(a, b)
    check_min_size(a, SSIM_WINDOW, "SSIM: the images", f"SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its window)")
    c = a.shape[1]
    g = gaussian_window().to(a.device)
    kernel_h = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region, per channel
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_w, groups=c)

    x, y = a.to(torch.float64), b.to(torch.float64)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


def format_psnr(value: float) -> str:
    """'inf dB (identical)' for +inf, else the value with two decimals."""
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"


# ---- inpainting paste-back ------------------------------------------------------------------------------


def _blur(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur (sigma radius / 2, support 2 radius + 1) of (B, 1, H, W) with replicated borders."""
    x = torch.arange(2 * radius + 1, dtype=torch.float32) - radius
    g = torch.exp(-(x * x) / (2 * (radius / 2) ** 2))
    g = (g / g.sum()).to(mask.dtype)
    mask = F.conv2d(F.pad(mask, (radius, radius, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(mask, (0, 0, radius, radius), mode="replicate"), g.view(1, 1, -1, 1))


def paste_mask(mask: torch.Tensor, size: tuple[int, int], grow: int, feather: int) -> torch.Tensor:
    """The blend mask of a paste-back at ``size`` (H, W): ``mask`` (B, 1, h, w; 1 = generated, above 0.5 counts)
    resized, grown by ``grow`` pixels (a square max filter), its edge blurred over ``feather`` pixels; the masked
    region itself stays 1, so every pixel that was generated is kept whole."""
    m = mask.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    hard = (m > 0.5).to(torch.float32)
    out = F.max_pool2d(hard, 2 * grow + 1, stride=1, padding=grow) if grow > 0 else hard
    if feather > 0:
        out = torch.maximum(_blur(out, feather), hard)
    return out.clamp(0.0, 1.0)


def paste_back(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, grow: int,
               feather: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, blend mask): the generated (B, 3, H, W) where the mask says, the original elsewhere, at the
    generated image's size (the original is resized to it, antialiased bilinear). Batches of 1 are broadcast."""
    size = tuple(generated.shape[-2:])
    if tuple(original.shape[-2:]) != size:
        original = F.interpolate(original.to(torch.float32), size=size, mode="bilinear", align_corners=False,
                                 antialias=True)
    blend = paste_mask(mask, size, grow, feather)
    batch = max(original.shape[0], generated.shape[0], blend.shape[0])
    for name, t in (("original", original), ("generated", generated), ("mask", blend)):
        if t.shape[0] not in (1, batch):
            raise ShapeError(f"paste back: the {name} batch is {t.shape[0]}, the others {batch}; give batches of 1 "
                             "or of the same size")
    out = original.to(torch.float32) * (1 - blend) + generated.to(torch.float32) * blend
    return out.clamp(0.0, 1.0), blend.expand(batch, -1, -1, -1)
