"""Seeded random weights for untrained networks: the demo networks, tests and benchmarks share this one.

Some constructors leave parameters uninitialised (they are always loaded from files), and the default
inits draw from the global RNG, so nothing of them is kept: every parameter is drawn from a generator
seeded with ``seed``, in ``named_parameters`` order.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, vector_std: float = 0.02, unit_norm_weights: bool = True) -> nn.Module:
    """Draw every parameter of ``module`` in place and return it.

    Matrices and kernels get N(0, 1 / fan-in) (fan-in: the elements of one output row), so activations stay
    O(1) through deep stacks. 1-D parameters get N(0, vector_std^2), plus 1 for those named ``weight``
    (norm scales) when ``unit_norm_weights``; biases and gates stay near 0.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim > 1:
            p.copy_(noise / max(1, p[0].numel()) ** 0.5)
        else:
            p.copy_(float(unit_norm_weights and name.endswith("weight")) + vector_std * noise)
    return module
