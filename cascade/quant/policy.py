"""Which tensors are quantized: the large matrices; norms, biases, embeddings, the head and small tensors stay.

One rule for every writer (GGUF, fp8 files) and for fp8 at load, as ComfyUI-GGUF's converter does for other
models: a tensor is quantized when it has two or more dimensions, more than ``THRESHOLD`` values, and is not
one of the sensitive tensors below. The kept ones are a small part of the weights (under 1% for the
released Stage C and B) and are where quantization error is amplified: the input embedding and the output head
(``clf``) touch every pixel, the conditioning and timestep mappers scale whole blocks, GRN and biases are
vectors.
"""

from __future__ import annotations

import re

import torch

# ComfyUI-GGUF's QUANTIZATION_THRESHOLD: below this a tensor's quantization saves nothing worth its error.
THRESHOLD = 1024
_KEEP = re.compile(
    r"^(embedding\.|clf\.|clip_txt_mapper\.|clip_txt_pooled_mapper\.|clip_img_mapper\.|clip_mapper\.|"
    r"effnet_mapper\.|pixels_mapper\.)|\.mapper(_\w+)?\.weight$|\.gamma$|\.beta$|bias$"
)


def should_quantize(key: str, shape: tuple[int, ...] | torch.Size, threshold: int = THRESHOLD) -> bool:
    """True for the large matrices (original-layout ``key``) a quantized file stores quantized."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return len(shape) >= 2 and numel > threshold and not _KEEP.search(key)
