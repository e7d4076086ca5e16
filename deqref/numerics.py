"""Overflow-safe scaling, in one place: norms and products of finite vectors stay finite.

√(v·v) overflows once |v| passes ~1e154 in float64 (~1.8e19 in float32) and underflows below
~1e-154. Dividing v by a power of two 2^e near its largest entry is exact (short of subnormal
results), so every quantity below gives, for ordinary values, the same bits as without scaling,
and for huge or tiny finite values a finite answer. Host (NumPy) helpers; the backend-aware
ones (``deqref.solvers.result.row_norms``, ``deqref.gradients.base.unit_scale``) build on these.
"""
from __future__ import annotations

import numpy as np


def pow2_exponent(m) -> np.ndarray:
    """e with m = f · 2^e, f ∈ [½, 1) (``frexp``), elementwise; 0 where m is 0 or not finite."""
    m = np.asarray(m, dtype=np.float64)
    usable = np.isfinite(m) & (m > 0)
    return np.frexp(np.where(usable, m, 1.0))[1] * usable


def pow2_scale(norms, dtype: str) -> np.ndarray:
    """2^e per sample with norms / 2^e in [0.5, 1); 1 where a norm is 0 or not finite, and e
    kept inside the dtype's exponent range."""
    info = np.finfo(dtype)
    return np.ldexp(1.0, np.clip(pow2_exponent(norms), info.minexp + 1, info.maxexp - 1))


def norm_no_overflow(v, axis=None):
    """‖v‖₂ (over ``axis``, host float64) that does not overflow or underflow for finite v.

    v is divided by 2^(e−1) ≤ max|v| < 2^e first (exact), so for ordinary values the result is
    bit for bit NumPy's ``norm(v)``. Non-finite v gives a non-finite norm."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):
        top = np.max(np.abs(v), axis=axis, keepdims=True, initial=0.0)
        scale = np.ldexp(1.0, np.frexp(top)[1] - 1)                    # 2^(e−1) ≤ top < 2^e
        out = np.linalg.norm(v / scale, axis=axis, keepdims=True) * scale
    return out.reshape(()) if axis is None else np.squeeze(out, axis)


def scaled_to_unit(v) -> np.ndarray:
    """v · 2^−e with e the exponent of max|v| (max|v · 2^−e| ∈ [½, 1)); v itself when it is 0
    or not finite. An exact scaling: cosines and ratios of norms are unchanged by it."""
    v = np.asarray(v, dtype=np.float64)
    return np.ldexp(v, -int(pow2_exponent(np.max(np.abs(v), initial=0.0))))
