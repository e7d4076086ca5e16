"""Neumann-series phantom gradient NPG (Eq. 18 of [1]) and Jacobian-free backprop (JFB).

In the paper's layout, with everything evaluated at h*:

    A^neu_{k,λ} = λ ∂F/∂θ (I + B + B² + ⋯ + B^{k−1}),   B = λ ∂F/∂h + (1 − λ) I     (Eq. 18)

The vector form is Algorithm 2 of [1]: ĝ = g; repeat k − 1 times ĝ ← g + B ĝ; then
∂L/∂θ ≈ λ ∂F/∂θ ĝ — k − 1 VJPs in h and one in θ (and x).

JFB (Fung et al. 2021; Raitz, Sec. 2) replaces (I − ∂F/∂h)⁻¹ by I: A = ∂F/∂θ — which is
NPG with k = 1, λ = 1.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from ..checks import check_lam
from .base import Gradient, check_call, check_form, check_k, make_gradient


def neumann_matrix(layer, x, h_star, k: int, lam: float):
    """λ (I + B + ⋯ + B^{k−1}) per sample, B = λ ∂F/∂h + (1 − λ) I (paper's layout)   # (n, d, d)"""
    xp = layer.xp
    eye = xp.eye(layer.d, dtype=h_star.dtype)
    B = lam * layer.dF_dh(h_star, x) + (1.0 - lam) * eye           # (n, d, d)
    S = xp.broadcast_to(eye, B.shape)                                # I
    P = S                                                            # B⁰
    for _ in range(k - 1):
        P = P @ B                                                    # B^j
        S = S + P
    return lam * S


def _neumann(layer, x, h, grad_h, k, lam, form):
    """A^neu_{k,λ} g at h (Eq. 18): (grads, grad_x, diagnostics)."""
    xp = layer.xp
    if form == "matrix":
        D = neumann_matrix(layer, x, h, k, lam)                      # (n, d, d)
        A = layer.dF_dtheta(h, x) @ D                                # (n, d_θ, d)   Eq. (18)
        A_x = layer.dF_dx(h, x) @ D                                  # (n, d_x, d)
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)
        grad_x = (A_x @ grad_h[:, :, None])[:, :, 0]
        return layer.unflatten(theta), grad_x, {"A": A, "A_x": A_x, "n_matmul": k + 1}
    lin = layer.linearize(h, x)                                      # at h*, shared by every VJP
    g_hat = grad_h
    for _ in range(k - 1):                                           # ĝ ← g + B ĝ
        g_hat = grad_h + lam * lin.vjp_h(g_hat) + (1.0 - lam) * g_hat
    grads = {key: lam * v for key, v in lin.vjp_theta(g_hat).items()}
    grad_x = lam * lin.vjp_x(g_hat)
    return grads, grad_x, {"n_vjp": k + 1}


def npg(layer, x, result, grad_h, *, k: int = 5, lam: float = 0.5, form: str = "vector") -> Gradient:
    """NPG A^neu_{k,λ} g, Eq. (18) of [1]; vector form = Algorithm 2. ``grad_h`` at h*."""
    k, lam, form = check_k(k), check_lam(lam), check_form(form)
    check_call(layer, x, result, grad_h)
    grads, grad_x, diag = _neumann(layer, x, result.h, grad_h, k, lam, form)
    return make_gradient(layer, grads, grad_x, "npg", {"k": k, "lam": lam, "form": form}, diag,
                         grad_h=grad_h, result=result)


def jfb(layer, x, result, grad_h, *, form: str = "vector") -> Gradient:
    """JFB: ∂F/∂θ|_{h*} g — the inverse replaced by I (= NPG with k = 1, λ = 1)."""
    form = check_form(form)
    check_call(layer, x, result, grad_h)
    grads, grad_x, diag = _neumann(layer, x, result.h, grad_h, 1, 1.0, form)
    return make_gradient(layer, grads, grad_x, "jfb", {"form": form}, diag,
                         grad_h=grad_h, result=result)
