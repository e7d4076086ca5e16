"""GDEQ: reuse the forward Broyden inverse B_T⁻¹ in the backward pass (Nguyen and Mauch).

Broyden runs on g(h) = F(h) − h, so B_T estimates the standard-layout Jacobian J_h − I and
B_T⁻¹ ≈ −(I − J_h)⁻¹. The paper's-layout inverse of Eq. (4) is its transpose:

    (I − ∂F/∂h)⁻¹ = ((I − J_h)⁻¹)ᵀ ≈ −(B_T⁻¹)ᵀ,   so   ∂L/∂θ ≈ −∂F/∂θ (B_T⁻¹)ᵀ ∂L/∂h.

The GDEQ paper prints −∂f/∂θ B_T⁻¹ ∂ℓ/∂z* without the transpose; for a non-symmetric W
the transpose is what makes it right (the tests show the untransposed form is off).
Vector form: y = −B_T⁻ᵀ g (an rmatvec of the low-rank form, O(m d)), then one VJP.

Optional fallback: where ‖y‖ > ``fallback_factor`` · ‖g‖ for a sample (a poor inverse
estimate), that sample uses JFB's y = g instead; ``diagnostics["n_fallback"]`` counts them.
In the matrix form the fallback is literal: that sample's matrix −(B_T⁻¹)ᵀ is replaced by I.
"""
from __future__ import annotations

from ..backend import to_numpy
from ..checks import check_optional_real
from .base import Gradient, check_call, check_form, make_gradient, unit_scale


def _fallback(xp, y, grad_h, factor):
    """(n,) host mask ‖y_i‖ > factor · ‖g_i‖. Both sides are taken at g's unit scale (a power of
    two per sample: the comparison is unchanged, but a huge g cannot overflow the norms)."""
    s = unit_scale(grad_h)[0]                                          # (n, 1)
    return to_numpy(xp.linalg.vector_norm(y * s, axis=1)
                    > factor * xp.linalg.vector_norm(grad_h * s, axis=1))


def gdeq(layer, x, result, grad_h, *, form: str = "vector",
         fallback_factor: float | None = None) -> Gradient:
    """−∂F/∂θ (B_T⁻¹)ᵀ g with B_T⁻¹ from ``result`` (a Broyden solve); ``grad_h`` at h*."""
    form = check_form(form)
    fallback_factor = check_optional_real("fallback_factor", fallback_factor, lo=0.0, lo_open=True)
    check_call(layer, x, result, grad_h)
    if result.B_inv is None:
        raise ValueError(f"result: gdeq reuses Broyden's inverse estimate, but the result of "
                         f"solver {result.solver!r} has none; solve with method='broyden'")
    h, xp, be = result.h, layer.xp, layer.backend
    if form == "matrix":
        B_inv = result.B_inv.dense()                                   # (n, d, d)
        D = -xp.permute_dims(B_inv, (0, 2, 1))                         # −(B_T⁻¹)ᵀ
        y = (D @ grad_h[:, :, None])[:, :, 0]
    else:
        y = -result.B_inv.rmatvec(grad_h)                              # −B_T⁻ᵀ g   (n, d)
    n_fallback = 0
    if fallback_factor is not None:
        big = _fallback(xp, y, grad_h, fallback_factor)                # (n,) host
        n_fallback = int(big.sum())
        if form == "matrix":                                           # JFB's matrix: I
            D = xp.where(be.from_host(big)[:, None, None], xp.eye(layer.d, dtype=h.dtype), D)
        else:
            y = xp.where(be.from_host(big)[:, None], grad_h, y)
    opts = {"form": form, "fallback_factor": fallback_factor}
    diag = {"n_fallback": n_fallback}
    if form == "matrix":
        A, A_x = layer.dF_dtheta(h, x) @ D, layer.dF_dx(h, x) @ D     # (n, d_θ, d), (n, d_x, d)
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)
        diag.update(A=A, A_x=A_x)
        return make_gradient(layer, layer.unflatten(theta), (A_x @ grad_h[:, :, None])[:, :, 0],
                             "gdeq", opts, diag, grad_h=grad_h, result=result)
    lin = layer.linearize(h, x)                                        # F's derivatives at h*
    diag["n_vjp"] = 2
    return make_gradient(layer, lin.vjp_theta(y), lin.vjp_x(y), "gdeq",
                         opts, diag, grad_h=grad_h, result=result)
