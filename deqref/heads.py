"""Post-processing G (a linear head) and losses, with hand-written gradients.

G(h) = h Vᵀ + c maps the fixed point h* (n, d) to predictions ŷ (n, q).
Losses average over the batch; each returns ``(value, ∂L/∂ŷ)``.
"""
from __future__ import annotations

import numpy as np

from .backend import (DTYPES, Backend, backend_of, check_backend, check_finite, check_seed,
                      check_shape, require_arrays)
from .checks import check_choice, check_int


class LinearHead:
    """G(h) = h Vᵀ + c with V (q, d), c (q,)."""

    def __init__(self, V, c):
        require_arrays(V=V, c=c)                 # arrays of one backend and one float dtype
        check_shape("V", V, (None, None))
        check_shape("c", c, (V.shape[0],))
        if V.shape[0] < 1 or V.shape[1] < 1:
            raise ValueError(f"V must not be empty (q >= 1 outputs, d >= 1 inputs), "
                             f"got shape {tuple(V.shape)}")
        check_finite("V", V)
        check_finite("c", c)
        self.V, self.c = V, c
        self.q, self.d = V.shape

    @classmethod
    def random(cls, d: int, q: int, *, seed: int, dtype: str = "float64",
               backend: Backend | None = None) -> "LinearHead":
        """V ~ N(0, 1/d) entries, c = 0, seeded."""
        d, q = check_int("d", d, minimum=1), check_int("q", q, minimum=1)
        seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
        be = check_backend(backend)
        V = np.random.default_rng(seed).standard_normal((q, d)) / np.sqrt(d)
        return cls(be.asarray(V, dtype), be.asarray(np.zeros(q), dtype))

    def __call__(self, h):
        """ŷ = h Vᵀ + c   # (n, q)"""
        require_arrays(V=self.V, h=h)
        check_shape("h", h, (None, self.d))
        check_finite("h", h)
        return h @ self.V.T + self.c

    def backward(self, h, dL_dy):
        """Given ∂L/∂ŷ (n, q): returns ∂L/∂h (n, d) and ``{"V": (q, d), "c": (q,)}``."""
        xp = require_arrays(V=self.V, h=h, dL_dy=dL_dy)
        check_shape("h", h, (None, self.d))
        check_shape("dL_dy", dL_dy, (h.shape[0], self.q))
        check_finite("h", h)
        check_finite("dL_dy", dL_dy)
        return dL_dy @ self.V, {"V": dL_dy.T @ h, "c": xp.sum(dL_dy, axis=0)}


def check_nonempty(name: str, a) -> None:
    """A loss averages over n samples and q outputs: both must be >= 1 (n = 0 has no mean)."""
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one sample and one output (n >= 1, q >= 1), "
                         f"got shape {tuple(a.shape)}")


def mse(y_hat, y):
    """L = mean over all n·q entries of (ŷ − y)²; returns (L, ∂L/∂ŷ = 2(ŷ − y)/(n q))."""
    xp = require_arrays(y_hat=y_hat, y=y)
    check_shape("y_hat", y_hat, (None, None))
    if tuple(y.shape) != tuple(y_hat.shape):
        raise ValueError(f"y must have the shape of y_hat {tuple(y_hat.shape)}, got {tuple(y.shape)}")
    check_nonempty("y_hat", y_hat)
    check_finite("y_hat", y_hat)
    check_finite("y", y)
    r = y_hat - y                                              # (n, q)
    size = r.shape[0] * r.shape[1]
    return float(xp.sum(r * r)) / size, (2.0 / size) * r


def softmax(z):
    """Row-wise softmax, shifted by the row maximum for stability   # (n, q)"""
    xp = require_arrays(z=z)
    check_finite("z", z)
    e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy; labels are integer classes (n,).

    L = −(1/n) Σ_i log softmax(z_i)[y_i];  ∂L/∂z = (softmax(z) − onehot(y)) / n.
    """
    xp = require_arrays(logits=logits)
    check_shape("logits", logits, (None, None))
    check_nonempty("logits", logits)
    check_finite("logits", logits)
    n, q = logits.shape
    try:
        labels_backend = backend_of(labels).name
    except TypeError as err:
        raise TypeError(f"labels: {err}") from None
    if labels_backend != backend_of(logits).name:
        raise TypeError(f"labels is a {labels_backend} array but logits is a {backend_of(logits).name} "
                        "array: mixing backends is not allowed (move labels with backend.from_host)")
    check_shape("labels", labels, (n,))
    if "int" not in str(labels.dtype):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if int(xp.min(labels)) < 0 or int(xp.max(labels)) >= q:
        raise ValueError(f"labels must lie in [0, {q}), got values outside it")
    onehot = xp.astype(labels[:, None] == xp.arange(q)[None, :], logits.dtype)   # (n, q)
    z = logits - xp.max(logits, axis=1, keepdims=True)
    log_p = z - xp.log(xp.sum(xp.exp(z), axis=1, keepdims=True))               # (n, q)
    value = -float(xp.sum(onehot * log_p)) / n
    return value, (xp.exp(log_p) - onehot) / n
