"""The exact gradient by implicit differentiation, Eq. (4) of [1] — the oracle.

In the paper's layout (gradients are columns, ∂F/∂h = J_hᵀ, ∂F/∂θ = J_θᵀ):

    ∂L/∂θ = ∂F/∂θ (I − ∂F/∂h)⁻¹ ∂L/∂h,    ∂L/∂x = ∂F/∂x (I − ∂F/∂h)⁻¹ ∂L/∂h   (Eq. 4)

each Jacobian evaluated at h*. The inverse is never formed: per sample,
y = solve(I − ∂F/∂h, g) with a dense LU solve (``scipy.linalg.solve``; CuPy's on a
GPU), then ∂L/∂θ = ∂F/∂θ · y summed over the batch.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from ..backend import check_finite
from .base import Gradient, make_gradient


def adjoint_dense(layer, x, h_star, grad_h):
    """y = (I − ∂F/∂h|_{h*})⁻¹ g per sample, by dense solves   # (n, d)"""
    layer.check_inputs(x=x, h_star=h_star, grad_h=grad_h)
    for name, a in (("x", x), ("h_star", h_star), ("grad_h", grad_h)):
        check_finite(name, a)
    xp, be = layer.xp, layer.backend
    A = xp.eye(layer.d, dtype=h_star.dtype) - layer.dF_dh(h_star, x)    # (n, d, d)  I − ∂F/∂h
    ys = [be.solve(A[i, ...], grad_h[i, ...]) for i in range(h_star.shape[0])]
    return xp.stack(ys, axis=0)                                          # (n, d)


def implicit_dense(layer, x, h_star, grad_h, *, matrix: bool = False) -> Gradient:
    """Eq. (4) with a dense solve per sample.

    ``matrix=True`` also applies ∂F/∂θ and ∂F/∂x as explicit (d_θ, d), (d_x, d)
    matrices (small d); otherwise their products with y come from the layer's
    hand-written VJPs, which the tests check against those matrices.
    """
    xp = layer.xp
    y = adjoint_dense(layer, x, h_star, grad_h)                          # (n, d)
    if matrix:
        theta = xp.sum((layer.dF_dtheta(h_star, x) @ y[:, :, None])[:, :, 0], axis=0)   # (d_θ,)
        grads = layer.unflatten(theta)
        grad_x = (layer.dF_dx(h_star, x) @ y[:, :, None])[:, :, 0]                     # (n, d_x)
    else:
        grads = layer.vjp_theta(h_star, x, y)
        grad_x = layer.vjp_x(h_star, x, y)
    n = h_star.shape[0]
    return make_gradient(layer, grads, grad_x, "implicit_dense", {"matrix": matrix},
                         {"dense_solves": n, "n_vjp": 0 if matrix else 2})
