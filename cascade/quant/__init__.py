"""Quantized weights (fp8, GGUF): tensors that stay quantized in memory and layers that expand them per layer.

``ops.OPS`` is the ``operations`` namespace for quantized networks, ``ops.QTensor`` the weight type, ``fp8`` and
``gguf_file`` the formats, ``convert`` the writers, ``policy`` which tensors are quantized. docs/QUANTIZED.md.
"""

from .ops import OPS, QTensor, is_quantized, weight_bytes

WEIGHT_FORMATS = ("fp8_e4m3fn", "fp8_e5m2")

__all__ = ["OPS", "QTensor", "is_quantized", "weight_bytes", "WEIGHT_FORMATS"]
