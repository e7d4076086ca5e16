"""The exact gradient by implicit differentiation, Eq. (4) of [1] — the oracle.

In the paper's layout (gradients are columns, ∂F/∂h = J_hᵀ, ∂F/∂θ = J_θᵀ):

    ∂L/∂θ = ∂F/∂θ (I − ∂F/∂h)⁻¹ ∂L/∂h,    ∂L/∂x = ∂F/∂x (I − ∂F/∂h)⁻¹ ∂L/∂h   (Eq. 4)

each Jacobian evaluated at h*. The inverse is never formed: per sample,
y = solve(I − ∂F/∂h, g) with a dense LU solve (``scipy.linalg.solve``; CuPy's on a
GPU), then ∂L/∂θ = ∂F/∂θ · y summed over the batch.

The "Implicit" baseline of the papers solves the same adjoint equation iteratively,
y = ∂F/∂h · y + g (paper's layout; one VJP per step), for a set number of backward
iterations (the GDEQ paper uses 20 Broyden iterations), then applies one VJP in θ.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from ..backend import check_finite
from ..solvers import solve
from .base import Gradient, check_form, check_k, make_gradient
from .neumann import neumann_matrix


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

    ``matrix=True`` builds A = ∂F/∂θ (I − ∂F/∂h)⁻¹ (d_θ, d) and A_x per sample by dense
    solves and returns them in ``diagnostics`` (small d); otherwise y = (I − ∂F/∂h)⁻¹ g is
    solved for and ∂F/∂θ · y comes from the layer's hand-written VJPs.
    """
    xp, be = layer.xp, layer.backend
    if matrix:
        # A = ∂F/∂θ (I − ∂F/∂h)⁻¹ per sample, as Aᵀ = solve((I − ∂F/∂h)ᵀ, (∂F/∂θ)ᵀ)
        layer.check_inputs(x=x, h_star=h_star, grad_h=grad_h)
        check_finite("grad_h", grad_h)
        IJ = xp.eye(layer.d, dtype=h_star.dtype) - layer.dF_dh(h_star, x)          # (n, d, d)
        Phi, Phi_x = layer.dF_dtheta(h_star, x), layer.dF_dx(h_star, x)
        A = xp.stack([be.solve(IJ[i, ...].T, Phi[i, ...].T).T for i in range(IJ.shape[0])])
        A_x = xp.stack([be.solve(IJ[i, ...].T, Phi_x[i, ...].T).T for i in range(IJ.shape[0])])
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)                  # (d_θ,)
        grad_x = (A_x @ grad_h[:, :, None])[:, :, 0]                                # (n, d_x)
        return make_gradient(layer, layer.unflatten(theta), grad_x, "implicit_dense",
                             {"matrix": True}, {"A": A, "A_x": A_x, "dense_solves": 2 * IJ.shape[0]})
    y = adjoint_dense(layer, x, h_star, grad_h)                          # (n, d)
    grads = layer.vjp_theta(h_star, x, y)
    grad_x = layer.vjp_x(h_star, x, y)
    n = h_star.shape[0]
    return make_gradient(layer, grads, grad_x, "implicit_dense", {"matrix": False},
                         {"dense_solves": n, "n_vjp": 2})


class AdjointMap:
    """y ↦ ∂F/∂h|_{h*} · y + g, the map whose fixed point is y = (I − ∂F/∂h)⁻¹ g.

    It looks like a layer to the forward solvers (call with (y, x), ``check_inputs``,
    ``xp``, ``backend``, ``d``), so the same fixed-point and Broyden code solves it.
    """

    def __init__(self, layer, x, h_star, g):
        self.layer, self.x, self.h_star, self.g = layer, x, h_star, g
        self.xp, self.backend, self.d = layer.xp, layer.backend, layer.d
        self.s = layer.sigma_prime(h_star, x)                # σ' at h*, computed once

    def check_inputs(self, x=None, **vectors):
        self.layer.check_inputs(x=x, **vectors)

    def __call__(self, y, _x):
        return self.layer.vjp_h(self.h_star, self.x, y, self.s) + self.g


def implicit_iterative(layer, x, result, grad_h, *, method: str = "broyden", n_iter: int = 20,
                       tol: float = 0.0, form: str = "vector", **solver_options) -> Gradient:
    """The papers' "Implicit" baseline: y = ∂F/∂h y + g by ``n_iter`` backward iterations.

    Parameters
    ----------
    method : "broyden" or "fixed_point" for the adjoint solve (from y_0 = 0; fixed point starts
        at its first iterate y_1 = g, so ``n_iter`` iterations cost ``n_iter`` VJPs in h)
    n_iter : number of backward iterations (at most; fewer if ``tol`` is met)
    tol : relative-residual tolerance of the adjoint solve (0: always ``n_iter`` steps)
    form : "vector" (the adjoint solver, then VJPs) or "matrix": for fixed-point iteration
        with tol = 0 the matrix ∂F/∂θ Σ_{j<n_iter} (∂F/∂h)^j it applies (y_0 = 0); for
        Broyden the dense-form Broyden solve followed by the explicit ∂F/∂θ and ∂F/∂x
    solver_options : passed to the adjoint solver (``m``, ``lam``; ``form`` is set by ``form``)
    """
    n_iter, form = check_k(n_iter, "n_iter"), check_form(form)
    if method not in ("broyden", "fixed_point"):
        raise ValueError(f"method must be 'broyden' or 'fixed_point', got {method!r}")
    bad = sorted(set(solver_options) - {"m", "lam"})
    if bad:
        raise TypeError(f"unknown option(s) {bad} for implicit_iterative; solver options: ['m', 'lam']")
    h, xp = result.h, layer.xp
    layer.check_inputs(x=x, h_star=h, grad_h=grad_h)
    check_finite("grad_h", grad_h)
    opts = {"method": method, "n_iter": n_iter, "tol": tol, "form": form, **solver_options}
    if form == "matrix" and method == "fixed_point":
        if tol != 0.0 or solver_options:
            raise ValueError("form='matrix' with method='fixed_point' needs tol=0 and no lam/m")
        D = neumann_matrix(layer, x, h, n_iter, 1.0)                 # Σ_{j<K} (∂F/∂h)^j
        A, A_x = layer.dF_dtheta(h, x) @ D, layer.dF_dx(h, x) @ D
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)
        return make_gradient(layer, layer.unflatten(theta), (A_x @ grad_h[:, :, None])[:, :, 0],
                             "implicit", opts, {"A": A, "A_x": A_x})
    if method == "broyden":
        solver_options = {**solver_options, "form": "dense" if form == "matrix" else "lowrank"}
    amap = AdjointMap(layer, x, h, grad_h)
    if method == "fixed_point" and n_iter > 1:
        # from y_0 = 0 the first update is y_1 = ∂F/∂h · 0 + g = g exactly: start there and save
        # a VJP of zero (the trace begins at y_1; y_K is the same K-term Neumann sum)
        y0, max_iter = grad_h, n_iter - 1
    else:
        y0, max_iter = None, n_iter
    adj = solve(amap, x, y0, method=method, tol=tol,
                max_iter=max_iter, stall_iter=None, warn=False, **solver_options)
    y = adj.h                                                        # (n, d)
    diag = {"adjoint": adj, "rel_residual": adj.rel_residual, "n_vjp": adj.n_F + 2}
    if form == "matrix":
        theta = xp.sum((layer.dF_dtheta(h, x) @ y[:, :, None])[:, :, 0], axis=0)
        grads, grad_x = layer.unflatten(theta), (layer.dF_dx(h, x) @ y[:, :, None])[:, :, 0]
    else:
        grads, grad_x = layer.vjp_theta(h, x, y, amap.s), layer.vjp_x(h, x, y, amap.s)
    return make_gradient(layer, grads, grad_x, "implicit", opts, diag)
