"""Control-image preparation of the released ControlNets (SPEC §12.2, §12.4, §12.5), pure torch/numpy.

- canny: the official ``CannyFilter(resize=224)``: bilinear resize to 224 x 224, ``cv2.Canny(uint8 RGB,
  100, 200)``, / 255, bilinear back to H x W. The edge detector is written here and follows OpenCV's
  ``Canny`` (aperture 3, L1 gradient) step by step: 3x3 Sobel with replicated borders (no Gaussian blur:
  OpenCV's Canny has none), on a colour image the channel with the largest gradient per pixel, non-maximum
  suppression in four directions with OpenCV's integer tangent test and tie rules, strict double threshold,
  8-connected hysteresis.
- inpainting: RGB with the masked pixels set to 1.0 (white) ++ the mask (1 = region to generate).
- outpainting: the image pasted onto a larger canvas whose new border is masked.
- super-resolution: the official ``SREffnetFilter`` (x0.5 nearest -> EffNet -> x2 nearest) and the
  notebook's inference input (EffNet -> x2 nearest), which makes the Stage C latent twice the image's.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ShapeError

CANNY_RESIZE = 224
CANNY_LOW, CANNY_HIGH = 100, 200
# Thresholds users enter are in core's units (ComfyUI's Canny node, kornia): the 3x3 Sobel magnitude of the image in
# [0, 1], a sharp black-to-white step reaching 4. OpenCV's are the same Sobel on the 8-bit image, so one core unit
# is 255 OpenCV units: the release's 100 / 200 are 0.392 / 0.784 (rounded to OpenCV's integers, exactly 100 / 200).
OPENCV_PER_UNIT = 255
CANNY_METHODS = ("official", "core")
CORE_BLUR_SIZE, CORE_BLUR_SIGMA = 5, 1.0  # core's Canny blurs first (kornia's defaults); OpenCV's does not
CORE_EPS = 1e-6  # inside the magnitude's square root, as core's: a flat pixel has magnitude 1e-3, never an edge
# OpenCV's tan(22.5 deg) in Q15 fixed point, so direction bins match its integer arithmetic exactly.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
SR_FILTER_SCALE = 0.5


# ---- canny -----------------------------------------------------------------------------------------


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel dx, dy (int32) of an (H, W, C) uint8 image with replicated borders, per channel."""
    p = np.pad(img.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return gx, gy


def _strongest_channel(gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the channel with the largest |dx| + |dy| (the first one on ties), as OpenCV does."""
    mag = np.abs(gx) + np.abs(gy)
    idx = np.argmax(mag, axis=2)[..., None]  # argmax keeps the first maximum, like OpenCV's strict '>'
    take = lambda a: np.take_along_axis(a, idx, axis=2)[..., 0]  # noqa: E731
    return take(mag), take(gx), take(gy)


def _non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray, low: int) -> np.ndarray:
    """Pixels above ``low`` that are local maxima across the gradient direction (OpenCV's rules)."""
    h, w = mag.shape
    m = np.pad(mag, 1)  # zeros outside the image, as OpenCV's magnitude ring buffer
    c = m[1:-1, 1:-1]

    def nb(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    x = np.abs(gx).astype(np.int64)
    y = np.abs(gy).astype(np.int64) << _CANNY_SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx ^ gy) >= 0  # dx, dy of one sign: the gradient runs along the top-left/bottom-right diagonal
    keep_h = (c > nb(0, -1)) & (c >= nb(0, 1))
    keep_v = (c > nb(-1, 0)) & (c >= nb(1, 0))
    keep_d = np.where(same_sign, (c > nb(-1, -1)) & (c > nb(1, 1)), (c > nb(-1, 1)) & (c > nb(1, -1)))
    keep = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    return keep & (c > low)


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel; a frontier walk, linear in edge pixels."""
    h, w = candidate.shape
    cand = np.pad(candidate, 1).ravel()
    done = np.zeros_like(cand)
    stride = w + 2
    offsets = np.array([-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1])
    frontier = np.flatnonzero(np.pad(strong & candidate, 1))
    done[frontier] = True
    while frontier.size:
        around = np.unique((frontier[:, None] + offsets[None, :]).ravel())
        frontier = around[cand[around] & ~done[around]]
        done[frontier] = True
    return done.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny_uint8(image: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Edges (0 or 255, uint8, H x W) of an (H, W) or (H, W, C) uint8 image, as ``cv2.Canny(image, low, high)``.

    Thresholds are on the L1 gradient |dx| + |dy| of the 3x3 Sobel (0..1020 for 8-bit images): a pixel is
    a candidate above ``low`` and seeds an edge above ``high`` (both strict); ``low > high`` are swapped.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ShapeError(f"canny: expected an (H, W) or (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    img = image[..., None] if image.ndim == 2 else image
    low_i, high_i = sorted((int(np.floor(low)), int(np.floor(high))))
    gx, gy = _sobel(img)
    mag, gx, gy = _strongest_channel(gx, gy)
    candidate = _non_max_suppression(mag, gx, gy, low_i)
    edges = _hysteresis(candidate, mag > high_i)
    return edges.astype(np.uint8) * 255


def opencv_threshold(value: float) -> int:
    """A threshold in core's units (0.392) as OpenCV's integer (100): OpenCV's L1 gradients of 8-bit images are
    integers, so rounding to the nearest one loses nothing a user can see and makes 0.392 exactly the release's 100."""
    return int(round(float(value) * OPENCV_PER_UNIT))


def canny_filter(images: torch.Tensor, low: float = CANNY_LOW, high: float = CANNY_HIGH,
                 resize: int | None = CANNY_RESIZE, method: str = "official") -> torch.Tensor:
    """Canny edges of (B, 3, H, W) in [0, 1] -> (B, 1, H, W) in [0, 1], float32, found at ``resize`` x ``resize``
    (224 in the release; None or 0 keeps the size) and resized back bilinearly, as the official CannyFilter.

    ``method`` "official": OpenCV's Canny on the image truncated to uint8 as ``x.mul(255).numpy().astype(uint8)``,
    thresholds in OpenCV's units (the release: 100, 200). "core": ComfyUI's Canny node (``canny_core``), thresholds
    in core's units (0.4, 0.8 its defaults).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"canny: images have shape {tuple(images.shape)}; expected (B, 3, H, W) RGB in [0, 1]")
    if method not in CANNY_METHODS:
        raise ShapeError(f"canny: method {method!r} is not one of {list(CANNY_METHODS)}")
    x = images.detach().to("cpu", torch.float32)
    size = tuple(x.shape[-2:])
    if resize:
        x = F.interpolate(x, size=(int(resize), int(resize)), mode="bilinear")
    if method == "core":
        edges = canny_core(x, float(low), float(high))
    else:
        # Clamp first: a float outside [0, 255] has no defined uint8 cast; inside, numpy truncates like the release.
        pixels = x.mul(255).clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
        edges = torch.stack([torch.from_numpy(canny_uint8(p, low, high)) for p in pixels])[:, None].float().div(255)
    if resize:
        edges = F.interpolate(edges, size=size, mode="bilinear")
    return edges


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _core_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx, dy (B, 1, H, W) as core's Canny takes them: BT.601 grey, a separable Gaussian with mirrored borders
    (horizontal pass first), then the unnormalised 3x3 Sobel (cross-correlation) with replicated borders."""
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    g = _gaussian_1d(CORE_BLUR_SIZE, CORE_BLUR_SIGMA)
    r = CORE_BLUR_SIZE // 2
    grey = F.conv2d(F.pad(grey, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    grey = F.conv2d(F.pad(grey, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return grad[:, 0:1], grad[:, 1:2]


def canny_core(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Edges (B, 1, H, W) of 0 / 1 of (B, 3, H, W) in [0, 1], as ComfyUI's Canny node finds them (kornia's canny
    with its defaults): L2 magnitude sqrt(dx^2 + dy^2 + eps) of ``_core_gradients``; non-maximum suppression
    along the gradient direction rounded to 45 degrees (a pixel must beat both neighbours, ties kept only toward
    the neighbour right of / below it, as OpenCV); weak above ``low``, strong above ``high`` (strict), weak pixels
    8-connected to a strong one kept."""
    gx, gy = _core_gradients(x.to(torch.float32))
    h, w = gx.shape[-2:]
    mag = torch.sqrt(F.pad(gx, (1, 1, 1, 1)) ** 2 + F.pad(gy, (1, 1, 1, 1)) ** 2 + CORE_EPS)  # zero ring outside
    centre = mag[..., 1:1 + h, 1:1 + w]
    # Direction k (0..7) is the angle k x 45 degrees, y pointing down: k = 0 right, 2 down, 4 left, 6 up.
    steps = [(round(math.sin(k * math.pi / 4)), round(math.cos(k * math.pi / 4))) for k in range(8)]
    around = torch.stack([mag[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in steps])
    k = torch.round(torch.nan_to_num(torch.atan2(gy, gx)) * (4 / math.pi)).long()

    def beats(direction: torch.Tensor) -> torch.Tensor:
        neighbour = torch.gather(around, 0, direction[None])[0]
        tie_ok = (direction == 0) | (direction == 2)
        return (centre > neighbour) | (tie_ok & (centre == neighbour))

    is_max = beats(k % 8) & beats((k + 4) % 8) & (centre > math.sqrt(CORE_EPS))
    ridge = centre * is_max
    edges = [_hysteresis((r > low).numpy(), (r > high).numpy()) for r in ridge[:, 0]]
    return torch.from_numpy(np.stack(edges))[:, None].float()


# ---- inpainting / outpainting -------------------------------------------------------------------------


def fit_mask(mask: torch.Tensor | None, batch: int, height: int, width: int, what: str = "mask") -> torch.Tensor:
    """A ComfyUI MASK ((H, W) or (B, H, W), 1 = generate) as a binary (B, 1, H, W) float32 for an image.

    An all-zero mask of any size means "nothing masked" (core's LoadImage gives a 64 x 64 one for images
    without alpha); any other mask must have the image's size. Values above 0.5 count as masked: the
    release was trained on boolean masks.
    """
    if mask is None:
        return torch.zeros(batch, 1, height, width)
    m = mask.detach().to("cpu", torch.float32)
    m = m[None] if m.ndim == 2 else m
    m = m[:, 0] if m.ndim == 4 and m.shape[1] == 1 else m
    if m.ndim != 3:
        raise ShapeError(f"{what} has shape {tuple(mask.shape)}; expected a MASK (B, H, W) - connect a MASK output")
    if not bool((m > 0.5).any()):
        return torch.zeros(batch, 1, height, width)
    if tuple(m.shape[-2:]) != (height, width):
        raise ShapeError(
            f"{what} is {m.shape[-1]}x{m.shape[-2]} but the image is {width}x{height}; paint the mask on this image "
            "(LoadImage's mask editor) or scale the mask to the image size (core's ImageScale / mask nodes) first")
    if m.shape[0] not in (1, batch):
        raise ShapeError(f"{what} has batch {m.shape[0]} but the image batch is {batch}; give one mask or one "
                         "per image")
    return (m > 0.5).float().expand(batch, -1, -1).unsqueeze(1).contiguous()


def inpaint_filter(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] and a binary (B, 1, H, W) mask -> (B, 4, H, W): masked pixels white ++ mask."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"inpaint: images have shape {tuple(images.shape)}; expected (B, 3, H, W)")
    if mask.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise ShapeError(f"inpaint: mask shape {tuple(mask.shape)} does not fit images {tuple(images.shape)}")
    x = images.to(torch.float32)
    m = mask.to(x.device, torch.float32)
    return torch.cat([torch.where(m > 0.5, torch.ones_like(x), x), m], dim=1)


def outpaint_pad(images: torch.Tensor, left: int, top: int, right: int, bottom: int, mask: torch.Tensor | None = None,
                 fill: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste (B, 3, H, W) images onto a canvas grown by the given pixels; returns (images, mask (B, 1, H', W')).

    The new border is masked (1) and filled with ``fill`` (white, what the inpaint filter writes there
    anyway); an existing binary (B, 1, H, W) mask is kept inside, so inpainting and outpainting combine.
    """
    pads = (int(left), int(right), int(top), int(bottom))
    if min(pads) < 0:
        raise ShapeError(f"outpaint: padding {pads} (left, right, top, bottom) must not be negative")
    x = F.pad(images.to(torch.float32), pads, value=float(fill))
    inner = mask if mask is not None else torch.zeros(images.shape[0], 1, *images.shape[-2:])
    m = F.pad(inner.to(torch.float32), pads, value=1.0)
    return x, m


# ---- super-resolution ------------------------------------------------------------------------------------


Encoder = Callable[[torch.Tensor], torch.Tensor]


def sr_effnet_filter(encode: Encoder, images: torch.Tensor, scale_factor: float = SR_FILTER_SCALE) -> torch.Tensor:
    """The official SREffnetFilter (training input): nearest x``scale_factor`` -> EffNet -> nearest x1/that.

    ``encode`` maps (B, 3, H, W) in [0, 1] to the EffNet latent (ImageNet normalisation included).
    """
    small = F.interpolate(images.to(torch.float32), scale_factor=scale_factor, mode="nearest")
    return F.interpolate(encode(small).to(torch.float32), scale_factor=1 / scale_factor, mode="nearest")


def super_resolution_hint(encode: Encoder, images: torch.Tensor) -> torch.Tensor:
    """The notebook's super-resolution input: EffNet latent of the image, nearest-upsampled x2
    ((B, 16, 2h, 2w)); the Stage C latent is sampled at that size, so the output is twice as large."""
    return F.interpolate(encode(images.to(torch.float32)).to(torch.float32), scale_factor=2, mode="nearest")
