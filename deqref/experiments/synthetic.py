"""The synthetic setting of [1], Sec. 3: one layer, spectral norm L_h = 0.9.

deqref's dimensions: d = 64 hidden units, d_x = 16 inputs, tanh, n = 32 samples
with x ~ N(0, I). [1] does not state its dimensions.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_backend
from ..layers import Layer

D, D_X, N, L_H = 64, 16, 32, 0.9


def synthetic(seed: int = 0, *, d: int = D, d_x: int = D_X, n: int = N, L_h: float = L_H,
              activation: str = "tanh", dtype: str = "float64"):
    """(layer, x, g): a seeded layer with ‖W‖₂ = L_h, inputs x (n, d_x), upstream g (n, d)."""
    be = get_backend()
    layer = Layer.random(d, d_x, activation, seed=seed, L_h=L_h, dtype=dtype, backend=be)
    rng = np.random.default_rng(seed + 1)
    x = be.asarray(rng.standard_normal((n, d_x)), dtype)
    g = be.asarray(rng.standard_normal((n, d)), dtype)
    return layer, x, g
