"""GDEQ: reuse the forward Broyden inverse B_T⁻¹ in the backward pass (Nguyen and Mauch).

Broyden runs on g(h) = F(h) − h, so B_T estimates the standard-layout Jacobian J_h − I and
B_T⁻¹ ≈ −(I − J_h)⁻¹. The paper's-layout inverse of Eq. (4) is its transpose:

    (I − ∂F/∂h)⁻¹ = ((I − J_h)⁻¹)ᵀ ≈ −(B_T⁻¹)ᵀ,   so   ∂L/∂θ ≈ −∂F/∂θ (B_T⁻¹)ᵀ ∂L/∂h.

The GDEQ paper prints −∂f/∂θ B_T⁻¹ ∂ℓ/∂z* without the transpose; for a non-symmetric W
the transpose is what makes it right (the tests show the untransposed form is off).
Vector form: y = −B_T⁻ᵀ g (an rmatvec of the low-rank form, O(m d)), then one VJP.

Optional fallback: where ‖y‖ > ``fallback_factor`` · ‖g‖ for a sample (a poor inverse
estimate), that sample uses JFB's y = g instead; ``diagnostics["n_fallback"]`` counts them.
"""
from __future__ import annotations

import numpy as np

from ..backend import check_finite, to_numpy
from .base import Gradient, check_form, make_gradient


def gdeq(layer, x, result, grad_h, *, form: str = "vector",
         fallback_factor: float | None = None) -> Gradient:
    """−∂F/∂θ (B_T⁻¹)ᵀ g with B_T⁻¹ from ``result`` (a Broyden solve); ``grad_h`` at h*."""
    form = check_form(form)
    if result.B_inv is None:
        raise ValueError(f"result: gdeq reuses Broyden's inverse estimate, but the result of "
                         f"solver {result.solver!r} has none; solve with method='broyden'")
    if fallback_factor is not None and not (np.isfinite(fallback_factor) and fallback_factor > 0):
        raise ValueError(f"fallback_factor must be None or a finite number > 0, got {fallback_factor!r}")
    h, xp, be = result.h, layer.xp, layer.backend
    layer.check_inputs(x=x, h_star=h, grad_h=grad_h)
    check_finite("grad_h", grad_h)
    if form == "matrix":
        B_inv = result.B_inv.dense()                                   # (n, d, d)
        D = -xp.permute_dims(B_inv, (0, 2, 1))                         # −(B_T⁻¹)ᵀ
        y = (D @ grad_h[:, :, None])[:, :, 0]
    else:
        y = -result.B_inv.rmatvec(grad_h)                              # −B_T⁻ᵀ g   (n, d)
    n_fallback = 0
    if fallback_factor is not None:
        big = to_numpy(xp.linalg.vector_norm(y, axis=1)
                       > fallback_factor * xp.linalg.vector_norm(grad_h, axis=1))
        n_fallback = int(big.sum())
        y = xp.where(be.from_host(big)[:, None], grad_h, y)
    opts = {"form": form, "fallback_factor": fallback_factor}
    diag = {"n_fallback": n_fallback}
    if form == "matrix" and fallback_factor is None:
        A, A_x = layer.dF_dtheta(h, x) @ D, layer.dF_dx(h, x) @ D     # (n, d_θ, d), (n, d_x, d)
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)
        diag.update(A=A, A_x=A_x)
        return make_gradient(layer, layer.unflatten(theta), (A_x @ grad_h[:, :, None])[:, :, 0],
                             "gdeq", opts, diag)
    s = layer.sigma_prime(h, x)
    diag["n_vjp"] = 2
    return make_gradient(layer, layer.vjp_theta(h, x, y, s), layer.vjp_x(h, x, y, s), "gdeq", opts, diag)
