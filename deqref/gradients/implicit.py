"""The exact gradient by implicit differentiation, Eq. (4) of [1] — the oracle.

In the paper's layout (gradients are columns, ∂F/∂h = J_hᵀ, ∂F/∂θ = J_θᵀ):

    ∂L/∂θ = ∂F/∂θ (I − ∂F/∂h)⁻¹ ∂L/∂h,    ∂L/∂x = ∂F/∂x (I − ∂F/∂h)⁻¹ ∂L/∂h   (Eq. 4)

each Jacobian evaluated at h*. The inverse is never formed: per sample,
y = solve(I − ∂F/∂h, g) with a dense LU solve (``scipy.linalg.solve``; CuPy's on a
GPU), then ∂L/∂θ = ∂F/∂θ · y summed over the batch. Where I − ∂F/∂h is singular or its
condition number reaches 1/eps of the dtype, there is no answer to give: ``SingularMatrixError``.

The "Implicit" baseline of the papers solves the same adjoint equation iteratively,
y = ∂F/∂h · y + g (paper's layout; one VJP per step), for a set number of backward
iterations (the GDEQ paper uses 20 Broyden iterations), then applies one VJP in θ.
The adjoint equation is linear in g, so it is solved for g scaled per sample by a power of
two to unit size (the same iterates to the last bit, but no norm or product can overflow for
a large g) and y is scaled back. Its solve is judged by ``base.InnerSolve``: not converged
(tol > 0) or diverged (tol = 0) → a ``ConvergenceWarning`` and a flag.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..backend import eps, to_numpy
from ..checks import check_bool, check_choice, check_int, check_real
from ..solvers import solve
from ..checks import check_lam
from .base import (Gradient, InnerSolve, check_arrays, check_call, check_form, check_k,
                   check_nonsingular, make_gradient, unit_scale)
from .neumann import neumann_matrix

METHODS = ("broyden", "fixed_point")
ADJOINT_OPTIONS = {"broyden": ("m",), "fixed_point": ("lam",)}   # each adjoint solver's own


def _system(layer, x, h_star):
    """I − ∂F/∂h at h* per sample, refused where (nearly) singular   # (n, d, d)

    The cell's ``jacobian_norm_bound`` (b ≥ ‖∂F/∂h‖₂ per sample, or None) lets samples with a
    small b skip the SVD of the check (``base.check_nonsingular``)."""
    A = layer.xp.eye(layer.d, dtype=h_star.dtype) - layer.dF_dh(h_star, x)
    check_nonsingular("implicit_dense", A, layer.jacobian_norm_bound(h_star, x))
    return A


def _adjoint(layer, x, h_star, grad_h):
    A = _system(layer, x, h_star)                                        # (n, d, d)
    return layer.backend.solve_each(A, grad_h)                          # (n, d)


def adjoint_dense(layer, x, h_star, grad_h):
    """y = (I − ∂F/∂h|_{h*})⁻¹ g per sample, by dense solves   # (n, d)"""
    check_arrays(layer, x, h_star=h_star, grad_h=grad_h)
    return _adjoint(layer, x, h_star, grad_h)


def _dense(layer, x, h_star, grad_h, matrix, options, result) -> Gradient:
    xp, be = layer.xp, layer.backend
    if matrix:
        # A = ∂F/∂θ (I − ∂F/∂h)⁻¹ per sample, as Aᵀ = solve((I − ∂F/∂h)ᵀ, (∂F/∂θ)ᵀ)
        IJ = _system(layer, x, h_star)                                              # (n, d, d)
        Phi, Phi_x = layer.dF_dtheta(h_star, x), layer.dF_dx(h_star, x)
        A = xp.stack([be.solve(IJ[i, ...].T, Phi[i, ...].T).T for i in range(IJ.shape[0])])
        A_x = xp.stack([be.solve(IJ[i, ...].T, Phi_x[i, ...].T).T for i in range(IJ.shape[0])])
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)                  # (d_θ,)
        grad_x = (A_x @ grad_h[:, :, None])[:, :, 0]                                # (n, d_x)
        return make_gradient(layer, layer.unflatten(theta), grad_x, "implicit_dense", options,
                             {"A": A, "A_x": A_x, "dense_solves": 2 * IJ.shape[0]},
                             grad_h=grad_h, result=result)
    y = _adjoint(layer, x, h_star, grad_h)                               # (n, d)
    lin = layer.linearize(h_star, x)
    grads, grad_x = lin.vjp_theta(y), lin.vjp_x(y)
    n = h_star.shape[0]
    return make_gradient(layer, grads, grad_x, "implicit_dense", options,
                         {"dense_solves": n, "n_vjp": 2}, grad_h=grad_h, result=result)


def implicit_dense(layer, x, h_star, grad_h, *, matrix: bool = False) -> Gradient:
    """Eq. (4) with a dense solve per sample, at the given h* (an (n, d) array).

    ``matrix=True`` builds A = ∂F/∂θ (I − ∂F/∂h)⁻¹ (d_θ, d) and A_x per sample by dense
    solves and returns them in ``diagnostics`` (small d); otherwise y = (I − ∂F/∂h)⁻¹ g is
    solved for and ∂F/∂θ · y comes from the layer's hand-written VJPs. Either way a
    (nearly) singular I − ∂F/∂h raises ``SingularMatrixError``.
    """
    matrix = check_bool("matrix", matrix)
    check_arrays(layer, x, h_star=h_star, grad_h=grad_h)
    return _dense(layer, x, h_star, grad_h, matrix, {"matrix": matrix}, None)


def implicit_exact(layer, x, result, grad_h, *, form: str = "vector") -> Gradient:
    """The estimator ``"implicit_dense"``: Eq. (4) at h* = ``result.h``, with the forward
    solve checked as by every estimator."""
    form = check_form(form)
    check_call(layer, x, result, grad_h)
    return _dense(layer, x, result.h, grad_h, form == "matrix", {"form": form}, result)


class AdjointMap:
    """y ↦ ∂F/∂h|_{h*} · y + g, the map whose fixed point is y = (I − ∂F/∂h)⁻¹ g.

    It is a plain callable F(y, x) to the forward solvers, which start it from the given y_0
    (zeros of g's shape when none), so the same fixed-point and Broyden code solves it.
    """

    def __init__(self, layer, x, h_star, g):
        self.layer, self.x, self.h_star, self.g = layer, x, h_star, g
        self.lin = layer.linearize(h_star, x)               # F's derivatives at h*, once

    def __call__(self, y, _x):
        return self.lin.vjp_h(y) + self.g


def _adjoint_options(method, form, n_iter, tol, options) -> dict:
    """The adjoint solver's own options, checked: ``m`` (Broyden), ``lam`` (fixed point)."""
    unknown = sorted(set(options) - {"m", "lam"})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for implicit_iterative; solver options: ['m', 'lam']")
    for name in options:
        if name not in ADJOINT_OPTIONS[method]:
            raise ValueError(f"{name} is an option of the other adjoint solver, not of method={method!r}")
    out = {}
    if "m" in options:
        out["m"] = check_int("m", options["m"], minimum=1)
    if "lam" in options:
        out["lam"] = check_lam(options["lam"])
    if form == "matrix" and method == "fixed_point" and (tol != 0.0 or out):
        raise ValueError("form='matrix' with method='fixed_point' needs tol=0 and no lam")
    if form == "matrix" and out.get("m", n_iter) < n_iter:
        # the matrix form stores B⁻¹ dense and keeps every update: that is limited memory m
        # only while no update is dropped, i.e. m >= the number of updates (at most n_iter)
        raise ValueError(f"m={out['m']}: form='matrix' keeps every Broyden update (a dense B⁻¹), "
                         f"which is memory m only for m >= n_iter ({n_iter}); use form='vector'")
    return out


def _neumann_residuals(layer, x, h, g, n_iter) -> list:
    """The fixed-point adjoint's residual trace without running it: the residual at y_t is
    y_{t+1} − y_t = (∂F/∂h)^t g, recorded for t = 1 … K as the vector form does (which starts at
    y_1 = g; for K = 1 it starts at y_0 = 0, t = 0, 1)   # n host arrays"""
    xp = layer.xp
    lin = layer.linearize(h, x)
    v, rows = g, ([xp.sqrt(xp.vecdot(g, g, axis=-1))] if n_iter == 1 else [])
    for _ in range(n_iter):
        v = lin.vjp_h(v)                                                 # (∂F/∂h)^t g
        rows.append(xp.sqrt(xp.vecdot(v, v, axis=-1)))
    return list(to_numpy(xp.stack(rows, axis=1)))                       # n × (K,)


def implicit_iterative(layer, x, result, grad_h, *, method: str = "broyden", n_iter: int = 20,
                       tol: float = 0.0, form: str = "vector", **solver_options) -> Gradient:
    """The papers' "Implicit" baseline: y = ∂F/∂h y + g by ``n_iter`` backward iterations.

    Parameters
    ----------
    method : "broyden" or "fixed_point" for the adjoint solve (from y_0 = 0; fixed point starts
        at its first iterate y_1 = λ g, so ``n_iter`` iterations cost ``n_iter`` VJPs in h)
    n_iter : number of backward iterations (at most; fewer if ``tol`` is met)
    tol : relative-residual tolerance of the adjoint solve (0: always ``n_iter`` steps; then
        only divergence is flagged, see ``base.InnerSolve``)
    form : "vector" (the adjoint solver, then VJPs) or "matrix": for fixed-point iteration
        with tol = 0 the matrix ∂F/∂θ Σ_{j<n_iter} (∂F/∂h)^j it applies (y_0 = 0); for
        Broyden the dense-form Broyden solve (every update kept, so ``m`` must be >= n_iter)
        followed by the explicit ∂F/∂θ and ∂F/∂x
    solver_options : ``m`` (Broyden's memory) or ``lam`` (the fixed-point adjoint's damping)
    """
    n_iter, form = check_k(n_iter, "n_iter"), check_form(form)
    method = check_choice("method", method, METHODS)
    tol = check_real("tol", tol, lo=0.0)
    solver_options = _adjoint_options(method, form, n_iter, tol, solver_options)
    check_call(layer, x, result, grad_h)
    h, xp = result.h, layer.xp
    opts = {"method": method, "n_iter": n_iter, "tol": tol, "form": form, **solver_options}
    who = f"implicit ({method} adjoint)"
    s, s_inv = unit_scale(grad_h)                                    # (n, 1) powers of two
    g = grad_h * s                                                   # g at unit scale, exactly
    if form == "matrix" and method == "fixed_point":
        D = neumann_matrix(layer, x, h, n_iter, 1.0)                 # Σ_{j<K} (∂F/∂h)^j
        A, A_x = layer.dF_dtheta(h, x) @ D, layer.dF_dx(h, x) @ D
        theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)
        trace = _neumann_residuals(layer, x, h, g, n_iter)
        inner = InnerSolve(who, trace, np.zeros(len(trace), dtype=bool), ("max_iter",) * len(trace),
                           tol, True, eps(h))
        return make_gradient(layer, layer.unflatten(theta), (A_x @ grad_h[:, :, None])[:, :, 0],
                             "implicit", opts, {"A": A, "A_x": A_x}, grad_h=grad_h, result=result,
                             inner=inner)
    if method == "broyden":
        solver_options = {**solver_options, "form": "dense" if form == "matrix" else "lowrank"}
    amap = AdjointMap(layer, x, h, g)
    if method == "fixed_point" and n_iter > 1:
        # from y_0 = 0 the first update is y_1 = λ (∂F/∂h · 0 + g) + (1 − λ) 0 = λ g exactly: start
        # there and save a VJP of zero (the trace begins at y_1; y_K is the same K-term sum)
        lam = solver_options.get("lam", 1.0)
        y0, max_iter = (g if lam == 1.0 else lam * g), n_iter - 1
    else:
        y0, max_iter = xp.zeros_like(g), n_iter
    adj = solve(amap, x, y0, method=method, tol=tol,
                max_iter=max_iter, stall_iter=None, warn=False, **solver_options)
    inner = InnerSolve(who, adj.abs_residual, adj.converged, adj.stop_reason, tol,
                       method == "fixed_point", eps(h))
    y = adj.h * s_inv                                                # (n, d) back to g's scale
    scale = to_numpy(s_inv)[:, 0].astype(float)
    adj = replace(adj, h=y, abs_residual=[r * f for r, f in zip(adj.abs_residual, scale)])
    diag = {"adjoint": adj, "rel_residual": adj.rel_residual, "n_vjp": adj.n_F + 2}
    if form == "matrix":
        theta = xp.sum((layer.dF_dtheta(h, x) @ y[:, :, None])[:, :, 0], axis=0)
        grads, grad_x = layer.unflatten(theta), (layer.dF_dx(h, x) @ y[:, :, None])[:, :, 0]
    else:
        grads, grad_x = amap.lin.vjp_theta(y), amap.lin.vjp_x(y)
    return make_gradient(layer, grads, grad_x, "implicit", opts, diag, grad_h=grad_h,
                         result=result, inner=inner)
