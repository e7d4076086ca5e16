"""Read-outs of a graph cell's fixed point, with hand-written gradients.

The state of a batch of n graphs padded to N nodes is h (n, m·N) = vec(H) column by column for
H (m × N), so ``h.reshape(n, N, m)`` is Hᵀ: one node's m-vector per row (``deqref.graph``).
Both read-outs map node states to q class scores with V (q, m) and c (q,):

- ``NodeHead``: per node, ŷ_j = V H_{:, j} + c, i.e. Ŷ = Hᵀ Vᵀ + c   # (n, N, q); the loss is
  taken over the labelled nodes only (``masked_cross_entropy``);
- ``GraphHead``: masked mean pooling over each graph's real nodes, then linear:
  z = (1/|V_g|) Σ_{j real} H_{:, j}   # (n, m),   ŷ = z Vᵀ + c   # (n, q).

``backward(h, dL_dy)`` returns ∂L/∂h (n, m·N), in h's layout, and ``{"V": (q, m), "c": (q,)}``.
"""
from __future__ import annotations

import numpy as np

from .backend import (DTYPES, Backend, backend_of, check_backend, check_finite, check_seed, check_shape,
                      require_arrays)
from .checks import check_choice, check_int


def _same_backend(name: str, a, ref) -> None:
    """``a`` (a bool or integer array, which ``namespace`` does not take) lives on ``ref``'s backend."""
    try:
        be = backend_of(a)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    if be.name != backend_of(ref).name:
        raise TypeError(f"{name} is a {be.name} array but the read-out's are {backend_of(ref).name} "
                        "arrays: mixing backends is not allowed (move it with backend.from_host)")


def _check_V_c(V, c) -> None:
    require_arrays(V=V, c=c)
    check_shape("V", V, (None, None))
    check_shape("c", c, (V.shape[0],))
    if V.shape[0] < 1 or V.shape[1] < 1:
        raise ValueError(f"V must not be empty (q >= 1 classes, m >= 1 state channels), got shape {tuple(V.shape)}")
    check_finite("V", V)
    check_finite("c", c)


def _random_V_c(m: int, q: int, seed: int, dtype: str, backend):
    """V ~ N(0, 1/m) entries, c = 0, seeded (as ``heads.LinearHead.random``)."""
    m, q = check_int("m", m, minimum=1), check_int("q", q, minimum=1)
    seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
    be = check_backend(backend)
    V = np.random.default_rng(seed).standard_normal((q, m)) / np.sqrt(m)
    return be.asarray(V, dtype), be.asarray(np.zeros(q), dtype)


class _Head:
    def __init__(self, V, c):
        _check_V_c(V, c)
        self.V, self.c = V, c
        self.q, self.m = V.shape

    def params(self) -> dict:
        return {"V": self.V, "c": self.c}

    def _nodes(self, h, name: str = "h"):
        """Hᵀ per graph   # (n, N, m)"""
        xp = require_arrays(V=self.V, **{name: h})
        check_shape(name, h, (None, None))
        if h.shape[1] % self.m or h.shape[1] == 0:
            raise ValueError(f"{name} must have shape (n, m·N) with m = {self.m} (the head's V has "
                             f"{self.m} columns), got {tuple(h.shape)}")
        check_finite(name, h)
        return xp.reshape(h, (h.shape[0], h.shape[1] // self.m, self.m))


class NodeHead(_Head):
    """Ŷ = Hᵀ Vᵀ + c per graph: q scores per node, V (q, m), c (q,)."""

    @classmethod
    def random(cls, m: int, q: int, *, seed: int, dtype: str = "float64",
               backend: Backend | None = None) -> "NodeHead":
        return cls(*_random_V_c(m, q, seed, dtype, backend))

    def with_params(self, params: dict) -> "NodeHead":
        return NodeHead(params["V"], params["c"])

    def __call__(self, h):
        """Ŷ = Hᵀ Vᵀ + c   # (n, N, q)"""
        Ht = self._nodes(h)                                       # (n, N, m)
        return Ht @ self.V.T + self.c

    def backward(self, h, dL_dy):
        """Given ∂L/∂Ŷ (n, N, q): ∂L/∂h = vec(Vᵀ ∂L/∂Ŷᵀ) (n, m·N), ∂L/∂V = Σ ∂L/∂Ŷᵀ Hᵀ, ∂L/∂c."""
        Ht = self._nodes(h)                                       # (n, N, m)
        xp = require_arrays(V=self.V, dL_dy=dL_dy)
        n, N, _ = Ht.shape
        check_shape("dL_dy", dL_dy, (n, N, self.q))
        check_finite("dL_dy", dL_dy)
        dH = dL_dy @ self.V                                       # (n, N, m)
        G = xp.reshape(dL_dy, (n * N, self.q))
        return (xp.reshape(dH, (n, N * self.m)),
                {"V": G.T @ xp.reshape(Ht, (n * N, self.m)), "c": xp.sum(G, axis=0)})


class GraphHead(_Head):
    """ŷ = z Vᵀ + c, z = masked mean of the node states of each graph; ``mask`` (n, N), bool or
    0/1 (``GraphCell.mask``), the real nodes of this batch (``on(mask)``: the same V, c on another batch)."""

    def __init__(self, V, c, mask):
        super().__init__(V, c)
        xp = require_arrays(V=V)
        _same_backend("mask", mask, V)
        if len(mask.shape) != 2:
            raise ValueError(f"mask must be a (n, N) array (bool, or 0/1 as GraphCell.mask), got "
                             f"{type(mask).__name__} of shape {getattr(mask, 'shape', None)}")
        mask01 = xp.astype(mask, V.dtype)                           # (n, N) 1 on real nodes
        if not bool(xp.all((mask01 == 0) | (mask01 == 1))):
            raise ValueError("mask must hold only 0 (padding node) and 1 (real node), or booleans")
        count = xp.sum(mask01, axis=1)                              # (n,) real nodes per graph
        if not bool(xp.all(count > 0)):
            raise ValueError("mask must mark at least one real node in every graph")
        self.mask = mask
        self.w = mask01 / count[:, None]                            # (n, N) pooling weights 1/|V_g|

    @classmethod
    def random(cls, m: int, q: int, mask, *, seed: int, dtype: str = "float64",
               backend: Backend | None = None) -> "GraphHead":
        return cls(*_random_V_c(m, q, seed, dtype, backend), mask)

    def on(self, mask) -> "GraphHead":
        return GraphHead(self.V, self.c, mask)

    def with_params(self, params: dict) -> "GraphHead":
        return GraphHead(params["V"], params["c"], self.mask)

    def _pool(self, h):
        Ht = self._nodes(h)                                       # (n, N, m)
        check_shape("h", h, (self.w.shape[0], self.w.shape[1] * self.m))
        return Ht, (self.w[:, None, :] @ Ht)[:, 0, :]              # z (n, m)

    def __call__(self, h):
        """ŷ = z Vᵀ + c   # (n, q)"""
        return self._pool(h)[1] @ self.V.T + self.c

    def backward(self, h, dL_dy):
        """Given ∂L/∂ŷ (n, q): ∂L/∂z = ∂L/∂ŷ V (n, m), spread to the real nodes with weight
        1/|V_g| (0 on padding) as ∂L/∂h (n, m·N); ∂L/∂V = ∂L/∂ŷᵀ z, ∂L/∂c = Σ ∂L/∂ŷ."""
        Ht, z = self._pool(h)
        xp = require_arrays(V=self.V, dL_dy=dL_dy)
        n, N, _ = Ht.shape
        check_shape("dL_dy", dL_dy, (n, self.q))
        check_finite("dL_dy", dL_dy)
        dz = dL_dy @ self.V                                       # (n, m)
        dHt = self.w[:, :, None] * dz[:, None, :]                 # (n, N, m)
        return xp.reshape(dHt, (n, N * self.m)), {"V": dL_dy.T @ z, "c": xp.sum(dL_dy, axis=0)}


def masked_cross_entropy(logits, labels, labelled):
    """Mean softmax cross-entropy over the labelled nodes only.

    logits (n, N, q), labels (n, N) integer classes (any class where not labelled), labelled
    (n, N) bool. With w = labelled and n_L = Σ w:
    L = −(1/n_L) Σ_{i,j} w_ij log softmax(ŷ_ij)[y_ij];  ∂L/∂ŷ_ij = w_ij (softmax(ŷ_ij) − onehot(y_ij)) / n_L.
    Returns (L, ∂L/∂logits (n, N, q)).
    """
    xp = require_arrays(logits=logits)
    check_shape("logits", logits, (None, None, None))
    n, N, q = logits.shape
    if n < 1 or N < 1 or q < 1:
        raise ValueError(f"logits must hold at least one graph, node and class (n, N, q >= 1), "
                         f"got shape {tuple(logits.shape)}")
    check_finite("logits", logits)
    for name, a, kind in (("labels", labels, "int"), ("labelled", labelled, "bool")):
        _same_backend(name, a, logits)
        check_shape(name, a, (n, N))
        if kind not in str(a.dtype):
            raise TypeError(f"{name} must be a {kind} array, got dtype {a.dtype}")
    if int(xp.min(labels)) < 0 or int(xp.max(labels)) >= q:
        raise ValueError(f"labels must lie in [0, {q}), got values outside it")
    w = xp.astype(labelled, logits.dtype)[:, :, None]              # (n, N, 1)
    n_L = float(xp.sum(w))
    if n_L == 0:
        raise ValueError("labelled must mark at least one node")
    onehot = xp.astype(labels[:, :, None] == xp.arange(q)[None, None, :], logits.dtype)   # (n, N, q)
    z = logits - xp.max(logits, axis=2, keepdims=True)
    log_p = z - xp.log(xp.sum(xp.exp(z), axis=2, keepdims=True))                         # (n, N, q)
    value = -float(xp.sum(w * onehot * log_p)) / n_L
    return value, w * (xp.exp(log_p) - onehot) / n_L
