"""The implicit layer F(h, x; θ) = σ(W h + U x + b) with hand-written derivatives.

A batch holds n samples as rows: ``h`` is (n, d), ``x`` is (n, d_x); per row,
``F(h, x) = σ(W h + U x + b)``, i.e. ``σ(h Wᵀ + x Uᵀ + b)`` for the batch
(the ``torch.nn.Linear`` (out, in) convention for W and U).

Jacobian layouts (see docs/conventions.md). With ``s = σ'(a)``, ``a = W h + U x + b``:

- standard (numerator) layout, per sample: ``J_h[i, j] = ∂F_i/∂h_j = s_i W[i, j]``;
- the paper's layout (denominator), used by every ``dF_d*`` method here:
  ``∂F/∂h = J_hᵀ`` (d, d), ``∂F/∂θ = J_θᵀ`` (d_θ, d), ``∂F/∂x = J_xᵀ`` (d_x, d),
  so that gradients are column vectors and Eq. (4) of [1] reads left to right.

A vector-Jacobian product in standard layout, ``vᵀ J``, is the paper's-layout
matrix times ``v``: ``vjp_h(h, x, v) = ∂F/∂h · v`` per sample.

θ is flattened as ``[vec(W), vec(U), b]``, each ``vec`` row-major (C order),
so ``d_θ = d² + d·d_x + d``.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

import numpy as np

from .backend import (DTYPES, Backend, backend_of, check_backend, check_finite, check_seed,
                      check_shape, dtype_name, namespace, require_arrays, to_numpy)
from .cell import NOT_GIVEN, check_rows
from .checks import check_choice, check_int, check_real

# ---------------------------------------------------------------- activations
# Each entry: (σ(a), σ'(a)) written with the array namespace xp.
ACTIVATIONS = {
    "tanh": (lambda xp, a: xp.tanh(a),
             lambda xp, a: 1.0 - xp.tanh(a) ** 2),
    "relu": (lambda xp, a: xp.maximum(a, 0.0),            # σ'(0) := 0
             lambda xp, a: xp.astype(a > 0.0, a.dtype)),
    "identity": (lambda xp, a: a,
                 lambda xp, a: xp.ones_like(a)),
    "softplus": (lambda xp, a: xp.logaddexp(a, xp.zeros_like(a)),   # log(1 + eᵃ), stable
                 lambda xp, a: 1.0 / (1.0 + xp.exp(-a))),             # logistic sigmoid
}


# σ′ from the value f = σ(a) where that is cheaper than σ′(a) and gives the same bits:
# tanh's σ′(a) = 1 − tanh(a)² is 1 − f² with f the tanh already taken for F
PRIME_FROM_VALUE = {"tanh": lambda xp, a, f: 1.0 - f ** 2}


def check_activation(activation: str) -> str:
    return check_choice("activation", activation, sorted(ACTIVATIONS))


def spectral_normalize(W: np.ndarray, L_h: float) -> np.ndarray:
    """Scale W so that its spectral norm ‖W‖₂ is exactly ``L_h`` (host NumPy, float64).

    With |σ'| ≤ 1 this makes F L_h-Lipschitz in h (the synthetic setting of [1], Sec. 3).
    """
    L_h = check_real("L_h", L_h, lo=0, lo_open=True)
    W = np.asarray(W, dtype=np.float64)
    check_shape("W", W, (None, None))
    check_finite("W", W)
    norm = np.linalg.norm(W, 2)
    if not norm > 0:
        raise ValueError("W must be non-zero to be scaled to ‖W‖₂ = L_h, got W = 0")
    return W * (L_h / norm)


def project_spectral(W, bound: float):
    """W ← W · bound/‖W‖₂ when ‖W‖₂ > bound, else W unchanged (on W's backend); bound > 0
    finite (a negative one would flip W's sign, NaN would pass every W unchanged)."""
    check_real("bound", bound, lo=0, lo_open=True)
    s = float(namespace(W=W).linalg.matrix_norm(W, ord=2))
    return W * (bound / s) if s > bound else W




class DenseLinearization:
    """The dense layer's derivatives at one (h, x): s = σ′(a) computed once and shared by every
    product (``deqref.cell.Linearization``)."""

    def __init__(self, layer: "Layer", h, x, s):
        self.layer, self.h, self.x, self.s = layer, h, x, s       # s (n, d)

    def vjp_h(self, v):
        """∂F/∂h · v = (v ⊙ s) W   # (n, d)"""
        return (v * self.s) @ self.layer.W

    def vjp_x(self, v):
        """∂F/∂x · v = (v ⊙ s) U   # (n, d_x)"""
        return (v * self.s) @ self.layer.U

    def vjp_theta(self, v) -> dict:
        """Σ over the batch of ∂F/∂θ · v: with r = v ⊙ s, {W: rᵀ h, U: rᵀ x, b: Σ_rows r}."""
        r = v * self.s                                                # (n, d)
        return {"W": r.T @ self.h, "U": r.T @ self.x, "b": self.layer.xp.sum(r, axis=0)}

    def jvp_h(self, u):
        """J_h u = s ⊙ (u Wᵀ)   # (n, d)"""
        return self.s * (u @ self.layer.W.T)


class Layer:
    """F(h, x; θ) = σ(W h + U x + b), batched over rows: the dense cell (``deqref.cell``).

    Parameters
    ----------
    W : (d, d) array      recurrent weight (non-symmetric in general)
    U : (d, d_x) array    input-injection weight
    b : (d,) array        bias
    activation : str      one of ``ACTIVATIONS``
    """

    PARAMS = ("W", "U", "b")

    def __init__(self, W, U, b, activation: str = "tanh"):
        self.activation = check_activation(activation)
        self.xp = require_arrays(W=W, U=U, b=b)  # arrays of one backend and one float dtype
        check_shape("W", W, (None, None))
        d = W.shape[0]
        check_shape("W", W, (d, d))
        check_shape("U", U, (d, None))
        check_shape("b", b, (d,))
        if d < 1:
            raise ValueError(f"W must not be empty (d >= 1), got shape {tuple(W.shape)}")
        if U.shape[1] < 1:
            raise ValueError(f"U must have at least one column (d_x >= 1), got shape {tuple(U.shape)}")
        for name, a in (("W", W), ("U", U), ("b", b)):
            check_finite(name, a)
        self.W, self.U, self.b = W, U, b
        self.d, self.d_x = d, U.shape[1]
        self.dtype = dtype_name(W)
        self.backend: Backend = backend_of(W)
        self._sigma, self._dsigma = ACTIVATIONS[activation]

    # ------------------------------------------------------------ construction
    @classmethod
    def random(cls, d: int, d_x: int, activation: str = "tanh", *, seed: int, L_h: float = 0.9,
               dtype: str = "float64", backend: Backend | None = None) -> "Layer":
        """A seeded random layer with ‖W‖₂ = L_h exactly and W non-symmetric.

        W, U have i.i.d. N(0, 1/d) (resp. N(0, 1/d_x)) entries before W is normalized;
        b ~ N(0, 0.1²). Draws come from ``numpy.random.default_rng(seed)``. L_h must lie in
        [√tiny, √max] of the dtype (1.5e-154 … 1.3e154 in float64, 1.1e-19 … 1.8e19 in float32):
        outside it W's entries leave the normal numbers and ‖W‖₂ = L_h cannot hold.
        """
        d, d_x = check_int("d", d, minimum=1), check_int("d_x", d_x, minimum=1)
        check_activation(activation)
        seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
        fi = np.finfo(dtype)
        check_real("L_h", L_h, lo=float(np.sqrt(fi.tiny)), hi=float(np.sqrt(fi.max)))
        be = check_backend(backend)
        rng = np.random.default_rng(seed)
        W = spectral_normalize(rng.standard_normal((d, d)) / np.sqrt(d), L_h)
        U = rng.standard_normal((d, d_x)) / np.sqrt(d_x)
        b = 0.1 * rng.standard_normal(d)
        return cls(be.asarray(W, dtype), be.asarray(U, dtype), be.asarray(b, dtype), activation)

    @property
    def d_theta(self) -> int:
        return self.d * self.d + self.d * self.d_x + self.d

    @property
    def theta(self):
        """θ flattened as [vec(W), vec(U), b], row-major: shape (d_θ,)."""
        xp = self.xp
        return xp.concat([xp.reshape(self.W, (-1,)), xp.reshape(self.U, (-1,)), self.b])

    def unflatten(self, theta) -> dict:
        """Split a flat (d_θ,) vector into ``{"W": (d, d), "U": (d, d_x), "b": (d,)}``."""
        require_arrays(W=self.W, theta=theta)
        check_shape("theta", theta, (self.d_theta,))
        d, d_x, xp = self.d, self.d_x, self.xp
        nW, nU = d * d, d * d_x
        return {"W": xp.reshape(theta[:nW], (d, d)),
                "U": xp.reshape(theta[nW:nW + nU], (d, d_x)),
                "b": theta[nW + nU:]}

    def flatten(self, params: dict):
        """Inverse of ``unflatten``: ``{"W", "U", "b"}`` to a (d_θ,) vector."""
        xp = self.xp
        return xp.concat([xp.reshape(params["W"], (-1,)), xp.reshape(params["U"], (-1,)),
                          params["b"]])

    def with_theta(self, theta) -> "Layer":
        """A new layer with the same activation and parameters θ (flat)."""
        p = self.unflatten(theta)
        return Layer(p["W"], p["U"], p["b"], self.activation)

    def params(self) -> dict:
        return {"W": self.W, "U": self.U, "b": self.b}

    def with_params(self, params: dict) -> "Layer":
        """The same activation with parameters ``{"W", "U", "b"}``."""
        return Layer(params["W"], params["U"], params["b"], self.activation)

    def project(self, bound: float) -> "Layer":
        """W scaled onto ‖W‖₂ ≤ ``bound`` (unchanged where it already is): with |σ′| ≤ 1, F is
        then a ``bound``-contraction in h, so its fixed point exists and is unique."""
        return self.with_params({**self.params(), "W": project_spectral(self.W, bound)})

    def to_numpy(self) -> dict:
        return {"W": to_numpy(self.W), "U": to_numpy(self.U), "b": to_numpy(self.b),
                "activation": self.activation}

    def __repr__(self):
        return (f"Layer(d={self.d}, d_x={self.d_x}, activation={self.activation!r}, "
                f"dtype={self.dtype}, backend={self.backend.name})")

    # ------------------------------------------------------------ the value
    def check_inputs(self, x=NOT_GIVEN, **vectors):
        """Validate x (n, d_x) and named (n, d) arrays (h, h0, grad_h, ...): shapes, n >= 1,
        one backend and one dtype shared with the layer; errors name the argument. x, when
        given, must be an array; a named array may be None (an optional argument left out)."""
        check_rows({"W": self.W}, self.d, self.d_x, x, **vectors)

    def preactivation(self, h, x):
        """a = h Wᵀ + (x Uᵀ + b)   # (n, d)   (summed in that order everywhere, ``bind`` included)"""
        return h @ self.W.T + self.input_injection(x)

    def input_injection(self, x):
        """x Uᵀ + b, the part of the pre-activation that does not depend on h   # (n, d)"""
        return x @ self.U.T + self.b

    def __call__(self, h, x):
        """F(h, x) = σ(h Wᵀ + x Uᵀ + b)   # (n, d)"""
        return self._sigma(self.xp, self.preactivation(h, x))

    def bind(self, x):
        """F(·, x) as a function of h alone: ``layer.bind(x)(h) == layer(h, x)`` (a subclass that
        redefines ``__call__`` gets its own F).

        The input injection c = x Uᵀ + b does not depend on h, so a solver that calls F many
        times at one x computes it once here (with d_x ≈ d that halves the work per call). The
        sum is taken in ``preactivation``'s order, so the values are the same to the last bit.
        """
        if type(self).__call__ is not Layer.__call__:
            return lambda h: self(h, x)
        c = self.input_injection(x)                      # (n, d)
        W, sigma, xp = self.W, self._sigma, self.xp
        return lambda h: sigma(xp, h @ W.T + c)          # σ(h Wᵀ + x Uᵀ + b)   (n, d)

    def bind_with_prime(self, x):
        """h ↦ (F(h, x), σ'(a)) from one pre-activation a = h Wᵀ + x Uᵀ + b, x Uᵀ computed
        once (as in ``bind``): what an unrolled step keeps for its reverse pass."""
        c = self.input_injection(x)                      # (n, d)
        W, sigma, xp = self.W, self._sigma, self.xp
        prime = PRIME_FROM_VALUE.get(self.activation, lambda xp, a, f: self._dsigma(xp, a))

        def value_and_prime(h):
            a = h @ W.T + c                              # (n, d)
            f = sigma(xp, a)
            return f, prime(xp, a, f)
        return value_and_prime

    def bind_prime(self, x):
        """σ'(· Wᵀ + x Uᵀ + b) as a function of h alone, x Uᵀ computed once (as in ``bind``)."""
        c = self.input_injection(x)                      # (n, d)
        W, dsigma, xp = self.W, self._dsigma, self.xp
        return lambda h: dsigma(xp, h @ W.T + c)        # (n, d)

    def bind_linear(self, x):
        """h ↦ (F(h, x), its ``DenseLinearization``), from one pre-activation a = h Wᵀ + x Uᵀ + b
        with x Uᵀ + b computed once (as in ``bind``); a subclass that redefines ``__call__`` or
        ``sigma_prime`` gets its own."""
        if type(self).__call__ is not Layer.__call__ or type(self).sigma_prime is not Layer.sigma_prime:
            return lambda h: (self(h, x), self.linearize(h, x))
        value_and_prime = self.bind_with_prime(x)

        def value_and_linearization(h):
            f, s = value_and_prime(h)
            return f, DenseLinearization(self, h, x, s)
        return value_and_linearization

    def linearize(self, h, x) -> DenseLinearization:
        """F's derivatives at (h, x) as products (``deqref.cell``): σ′(a) once, shared."""
        return DenseLinearization(self, h, x, self.sigma_prime(h, x))

    def vjp_sum(self, terms, scale: float = 1.0):
        """Σ_t scale · ∂F/∂θ|_{h_t} v_t and Σ_t scale · ∂F/∂x|_{h_t} v_t (``deqref.cell.vjp_sum``).

        With r_t = scale · (v_t ⊙ s_t), step t contributes (r_tᵀ h_t, r_tᵀ x, Σ_rows r_t) for
        (W, U, b) and r_t U for x: only the W term depends on h_t, so the others are taken once
        from Σ_t r_t."""
        grad_W = r_sum = None
        for lin, v in terms:
            r = scale * (v * lin.s)                                   # r_t   (n, d)
            if grad_W is None:
                grad_W, r_sum = r.T @ lin.h, r                        # (d, d), (n, d)
            else:                                                     # in place: both are ours
                grad_W += r.T @ lin.h
                r_sum += r
        x = terms[0][0].x
        return {"W": grad_W, "U": r_sum.T @ x, "b": self.xp.sum(r_sum, axis=0)}, r_sum @ self.U

    def jacobian_norm_bound(self, h, x):
        """A host (n,) upper bound of ‖∂F/∂h‖₂ per sample: max_i |σ′(a_i)| · ‖W‖₂, since
        ∂F/∂h = (diag(σ′) W)ᵀ. None for a subclass that redefines F's Jacobian (the bound is
        this class's)."""
        if any(getattr(type(self), m) is not getattr(Layer, m)
               for m in ("dF_dh", "jacobian_h", "sigma_prime")):
            return None
        xp = self.xp
        w = float(to_numpy(xp.linalg.matrix_norm(self.W, ord=2)))                    # ‖W‖₂
        s = to_numpy(xp.max(xp.abs(self.sigma_prime(h, x)), axis=1))                # (n,)
        return np.asarray(s, dtype=np.float64) * w

    def sigma_prime(self, h, x):
        """s = σ'(a) at a = h Wᵀ + x Uᵀ + b   # (n, d)"""
        return self._dsigma(self.xp, self.preactivation(h, x))

    # ------------------------------------------------------------ dense Jacobians
    def jacobian_h(self, h, x):
        """Standard layout J_h[i, j] = ∂F_i/∂h_j = s_i W[i, j], per sample   # (n, d, d)"""
        s = self.sigma_prime(h, x)                       # (n, d)
        return s[:, :, None] * self.W[None, :, :]        # (n, d, d)

    def dF_dh(self, h, x):
        """Paper's layout ∂F/∂h = J_hᵀ, per sample: [j, i] = ∂F_i/∂h_j   # (n, d, d)"""
        return self.xp.permute_dims(self.jacobian_h(h, x), (0, 2, 1))

    def dF_dx(self, h, x):
        """Paper's layout ∂F/∂x = J_xᵀ, per sample: [q, i] = s_i U[i, q]   # (n, d_x, d)"""
        s = self.sigma_prime(h, x)                                          # (n, d)
        return self.xp.permute_dims(s[:, :, None] * self.U[None, :, :], (0, 2, 1))

    def dF_dtheta(self, h, x):
        """Paper's layout ∂F/∂θ = J_θᵀ, per sample   # (n, d_θ, d)

        Rows follow θ = [vec(W), vec(U), b]: ∂F_i/∂W[p, q] = s_i δ_ip h_q,
        ∂F_i/∂U[p, q] = s_i δ_ip x_q, ∂F_i/∂b_p = s_i δ_ip.
        """
        xp = self.xp
        n, d, d_x = h.shape[0], self.d, self.d_x
        s = self.sigma_prime(h, x)                                   # (n, d)
        eye = xp.eye(d, dtype=h.dtype)                               # (d, d)  δ_ip
        S = s[:, None, :] * eye[None, :, :]                          # (n, d, d)  [p, i] = s_i δ_ip
        dW = S[:, :, None, :] * h[:, None, :, None]                  # (n, p, q, i)
        dU = S[:, :, None, :] * x[:, None, :, None]                  # (n, p, q, i)
        return xp.concat([xp.reshape(dW, (n, d * d, d)),
                          xp.reshape(dU, (n, d * d_x, d)), S], axis=1)   # (n, d_θ, d)

    # ------------------------------------------------------------ vector forms
    def vjp_h(self, h, x, v, s=None):
        """∂F/∂h · v per sample (paper's layout) = vᵀ J_h = (v ⊙ s) W   # (n, d)"""
        s = self.sigma_prime(h, x) if s is None else s
        return (v * s) @ self.W

    def vjp_x(self, h, x, v, s=None):
        """∂F/∂x · v per sample (paper's layout) = (v ⊙ s) U   # (n, d_x)"""
        s = self.sigma_prime(h, x) if s is None else s
        return (v * s) @ self.U

    def vjp_theta(self, h, x, v, s=None) -> dict:
        """Σ over the batch of ∂F/∂θ · v, as ``{"W": (d, d), "U": (d, d_x), "b": (d,)}``.

        With r = v ⊙ s (n, d): grad_W = rᵀ h, grad_U = rᵀ x, grad_b = Σ_rows r.
        """
        s = self.sigma_prime(h, x) if s is None else s
        r = v * s                                                     # (n, d)
        return {"W": r.T @ h, "U": r.T @ x, "b": self.xp.sum(r, axis=0)}

    def jvp_h(self, h, x, u, s=None):
        """J_h u per sample (standard layout) = s ⊙ (u Wᵀ)   # (n, d)"""
        s = self.sigma_prime(h, x) if s is None else s
        return s * (u @ self.W.T)
