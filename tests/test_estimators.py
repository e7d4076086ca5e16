"""Every estimator: matrix form = vector form, the identities and limits of the papers,
and finite-difference oracles that share no code with deqref's derivatives."""

import numpy as np
import pytest

from deqref.gradients import ESTIMATORS, estimate, estimator_options, implicit_dense, output
from deqref.layers import ACTIVATIONS, Layer
from deqref.solvers import solve
from deqref.theory import cosine
from helpers import FD_RTOL, apply_oracle, assert_close, eq4, eq18, fd_grad, fd_jacobian
from conftest import host

D, DX, N = 6, 3, 3


def setup(be, activation="tanh", seed=0, d=D, L_h=0.9, tol=1e-13, method="broyden", **kw):
    layer = Layer.random(d, DX, activation, seed=seed, L_h=L_h, backend=be)
    rng = np.random.default_rng(seed + 1)
    x = be.asarray(rng.standard_normal((N, DX)))
    g = be.asarray(rng.standard_normal((N, d)))
    res = solve(layer, x, method=method, tol=tol, max_iter=500, **kw)
    return layer, x, g, res


def rel_err(a, b):
    a, b = host(a).ravel(), host(b).ravel()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------- an independent oracle
# F(h, x; θ) written again in plain NumPy and differentiated by central differences
# (helpers.fd_jacobian): none of deqref's derivative code (σ', dF_d*, vjp_*) is used. Each
# estimator is then its printed formula, applied per sample in the standard layout
# (∂F/∂h = J_hᵀ, ∂F/∂θ = J_θᵀ of the paper's layout).
SIGMA = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0.0), "identity": lambda a: a,
         "softplus": lambda a: np.logaddexp(a, 0.0)}


def F_np(layer, theta, h, x):
    """σ(W h + U x + b) for one sample, θ = [vec(W), vec(U), b] row-major   # (d,)"""
    d, d_x = layer.d, layer.d_x
    W = theta[:d * d].reshape(d, d)
    U = theta[d * d:d * d + d * d_x].reshape(d, d_x)
    return SIGMA[layer.activation](W @ h + U @ x + theta[d * d + d * d_x:])


def fd_jacobians(layer, h, x):
    """Per sample i: (J_h, J_θ, J_x) of F at (h_i, x_i), standard layout, by FD."""
    theta, H, X = host(layer.theta), host(h), host(x)
    return [(fd_jacobian(lambda v: F_np(layer, theta, v, X[i]), H[i]),
             fd_jacobian(lambda v: F_np(layer, v, H[i], X[i]), theta),
             fd_jacobian(lambda v: F_np(layer, theta, H[i], v), X[i])) for i in range(H.shape[0])]


def oracle(layer, h, x, g, D):
    """``helpers.apply_oracle`` on this layer's finite-difference Jacobians at h   # ((d_θ,), (n, d_x))"""
    return apply_oracle(fd_jacobians(layer, h, x), host(g), D)


def upg_oracle(layer, h_star, x, g, k, lam):
    """UPG, Eq. (17): k damped steps h_{t+1} = λ F(h_t) + (1 − λ) h_t from h*, then
    Σ_t λ ∂F/∂θ|_{h_t} M_{t+1} ⋯ M_{k−1} g with M_s = λ ∂F/∂h|_{h_s} + (1 − λ) I."""
    theta, H, X, G = host(layer.theta), host(h_star), host(x), host(g)
    grad_theta, grad_x = 0.0, []
    for i in range(H.shape[0]):
        hs = [H[i]]
        for _ in range(k):
            hs.append(lam * F_np(layer, theta, hs[-1], X[i]) + (1 - lam) * hs[-1])
        v, gx = G[i], 0.0
        for t in range(k - 1, -1, -1):                    # reverse: v = M_{t+1} ⋯ M_{k−1} g
            Jh = fd_jacobian(lambda u: F_np(layer, theta, u, X[i]), hs[t])
            Jt = fd_jacobian(lambda u: F_np(layer, u, hs[t], X[i]), theta)
            Jx = fd_jacobian(lambda u: F_np(layer, theta, hs[t], u), X[i])
            grad_theta, gx = grad_theta + lam * Jt.T @ v, gx + lam * Jx.T @ v
            v = lam * Jh.T @ v + (1 - lam) * v
        grad_x.append(gx)
    return grad_theta, np.array(grad_x)


def oracle_of(name, opts, layer, x, g, res):
    """The independent value of estimator ``name`` with ``opts`` at ``res`` (see above)."""
    h = res.h
    if name in ("npg", "jfb"):
        return oracle(layer, h, x, g, eq18(opts.get("k", 1), opts.get("lam", 1.0)))
    if name == "upg":
        return upg_oracle(layer, h, x, g, opts["k"], opts["lam"])
    if name == "implicit_dense" or (name == "implicit" and opts["method"] == "broyden"):
        return oracle(layer, h, x, g, eq4)      # 20 Broyden steps solve this d = 6 adjoint
    if name == "implicit":                      # fixed point from y_0 = 0: Σ_{j<K} (∂F/∂h)^j
        return oracle(layer, h, x, g, eq18(opts["n_iter"], 1.0))
    if name == "gdeq":                          # −(B_T⁻¹)ᵀ, B_T⁻¹ from the forward Broyden solve
        B_inv = host(res.B_inv.dense())
        return oracle(layer, h, x, g, lambda i, Jh: -B_inv[i].T)
    raise ValueError(name)


# ---------------------------------------------------------------- matrix form = vector form
# Both forms are exact algebra on the same Jacobians; they differ by rounding in products of
# up to ~10 (d×d) matrices, a few hundred eps at most. 1e-10 is the bar.
# Each matrix form is also held against the finite-difference oracle above, so that a mistake
# both forms share (σ', a transpose, a factor λ) cannot pass: the FD Jacobians are good to
# ~1e-10 (helpers), and products of up to ten of them with norms ≤ 1 keep that below
# FD_RTOL = 1e-7 relative to the largest entry.
MV_TOL = 1e-10
CASES = [("upg", dict(k=k, lam=lam)) for k in (1, 2, 3, 5, 10) for lam in (0.3, 0.5, 1.0)] + \
        [("npg", dict(k=k, lam=lam)) for k in (1, 2, 3, 5, 10) for lam in (0.3, 0.5, 1.0)] + \
        [("jfb", {}), ("gdeq", {}), ("implicit_dense", {}),
         ("implicit", dict(method="fixed_point", n_iter=7)), ("implicit", dict(method="broyden"))]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matrix_form_equals_vector_form(be, activation):
    layer, x, g, res = setup(be, activation, form="dense")
    cases = CASES + [(name, dict(k=k, lam=0.6)) for k in range(1, 11) for name in ("upg", "npg")]
    for name, opts in cases:                     # the issue asks for every k in 1..10
        v = estimate(name, layer, x, res, g, form="vector", **opts)
        m = estimate(name, layer, x, res, g, form="matrix", **opts)
        assert rel_err(v.theta, m.theta) < MV_TOL, (name, opts)
        assert rel_err(v.x, m.x) < MV_TOL, (name, opts)
        theta, gx = oracle_of(name, opts, layer, x, g, res)
        assert_close(host(m.theta), theta, FD_RTOL, f"{name} {opts} dθ vs the FD oracle")
        assert_close(host(m.x), gx, FD_RTOL, f"{name} {opts} dx vs the FD oracle")


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_bptt_matrix_equals_vector(be, lam):
    layer, x, g, res = setup(be, "softplus", method="fixed_point", lam=lam, tol=1e-8,
                             return_trajectory=True)
    v, m = (estimate("bptt", layer, x, res, g, form=f) for f in ("vector", "matrix"))
    assert rel_err(v.theta, m.theta) < MV_TOL and rel_err(v.x, m.x) < MV_TOL


# ---------------------------------------------------------------- finite-difference oracles
def test_bptt_against_finite_differences_of_the_unrolled_solver(be, arr):
    """L(θ, x) = Σ c ⊙ h_T with h_T from the same damped iteration, differentiated by FD."""
    layer, x, c, res = setup(be, "tanh", method="fixed_point", lam=0.7, tol=1e-6,
                             return_trajectory=True)
    T = res.n_iter.copy()

    def loss(theta, xx):
        lay = layer.with_theta(arr(theta))
        W, U, b = (host(a) for a in (lay.W, lay.U, lay.b))
        total = 0.0
        for i in range(N):
            h = np.zeros(D)
            for _ in range(T[i]):                          # the same number of steps per sample
                h = 0.7 * np.tanh(W @ h + U @ xx.reshape(N, DX)[i] + b) + 0.3 * h
            total += host(c)[i] @ h
        return total
    est = estimate("bptt", layer, x, res, c)
    theta, xn = host(layer.theta), host(x)
    # FD of a smooth explicit map: tolerance from helpers (1e-7), loosened ×10 for T ~ 10 steps
    assert_close(host(est.theta), fd_grad(lambda t: loss(t, xn), theta), 1e-6, "BPTT dθ")
    assert_close(host(est.x), fd_grad(lambda z: loss(theta, z), xn), 1e-6, "BPTT dx")


@pytest.mark.parametrize("k,lam", [(1, 1.0), (3, 0.5), (5, 0.8)])
def test_upg_against_finite_differences_of_algorithm1(be, arr, k, lam):
    """Algorithm 1: h* is computed without gradient (held fixed), then k damped steps."""
    layer, x, c, res = setup(be, "softplus", tol=1e-6)
    h_star = host(res.h)

    def loss(theta, xx):
        lay = layer.with_theta(arr(theta))
        W, U, b = (host(a) for a in (lay.W, lay.U, lay.b))
        h = h_star.copy()
        for _ in range(k):
            h = lam * np.logaddexp(h @ W.T + xx.reshape(N, DX) @ U.T + b, 0) + (1 - lam) * h
        return float(np.sum(host(c) * h))
    est = estimate("upg", layer, x, res, c, k=k, lam=lam)
    theta, xn = host(layer.theta), host(x)
    assert_close(host(est.theta), fd_grad(lambda t: loss(t, xn), theta), 1e-7, "UPG dθ")
    assert_close(host(est.x), fd_grad(lambda z: loss(theta, z), xn), 1e-7, "UPG dx")
    # and UPG's loss is taken at h_k
    h_k = host(output("upg", layer, x, res, k=k, lam=lam))
    assert abs(float(np.sum(host(c) * h_k)) - loss(theta, xn)) < 1e-12


# ---------------------------------------------------------------- identities
def test_jfb_equals_npg_11_and_upg_11(be):
    layer, x, g, res = setup(be, "tanh", tol=1e-6)     # holds at any h*, exact or not
    jfb = estimate("jfb", layer, x, res, g)
    for name in ("npg", "upg"):
        other = estimate(name, layer, x, res, g, k=1, lam=1.0)
        assert rel_err(other.theta, jfb.theta) < 1e-15 and rel_err(other.x, jfb.x) < 1e-15
    # and all three are ∂F/∂θ g of Eq. (18) with k = 1, λ = 1, by the FD oracle (not the code)
    theta, gx = oracle(layer, res.h, x, g, eq18(1, 1.0))
    assert_close(host(jfb.theta), theta, FD_RTOL, "JFB dθ = ∂F/∂θ g")
    assert_close(host(jfb.x), gx, FD_RTOL, "JFB dx = ∂F/∂x g")
    for k, lam in ((2, 0.5), (5, 0.8)):                # NPG beyond k = 1, against Eq. (18) itself
        npg = estimate("npg", layer, x, res, g, k=k, lam=lam)
        theta, gx = oracle(layer, res.h, x, g, eq18(k, lam))
        assert_close(host(npg.theta), theta, FD_RTOL, f"NPG({k}, {lam}) dθ vs Eq. (18)")
        assert_close(host(npg.x), gx, FD_RTOL, f"NPG({k}, {lam}) dx vs Eq. (18)")


def test_upg_equals_npg_at_exact_fixed_point_linear(be, arr):
    layer = Layer.random(D, DX, "identity", seed=3, L_h=0.9, backend=be)
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((N, DX)), rng.standard_normal((N, D))
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    h = np.linalg.solve(np.eye(D) - W, (x @ U.T + b).T).T            # the exact h*
    res = solve(layer, arr(x), arr(h), method="fixed_point", max_iter=1, warn=False)
    assert res.final_rel_residual.max() < 1e-14
    for k, lam in ((2, 0.5), (5, 0.5), (10, 0.9)):
        u = estimate("upg", layer, arr(x), res, arr(g), k=k, lam=lam)
        n = estimate("npg", layer, arr(x), res, arr(g), k=k, lam=lam)
        # h_t = h* up to rounding, so only rounding separates them: ~k·cond·eps
        assert rel_err(u.theta, n.theta) < 1e-12 and rel_err(u.x, n.x) < 1e-12


def test_upg_differs_from_npg_when_h_star_inexact(be):
    """The gap shrinks in proportion to the forward residual (measured, not assumed)."""
    gaps, residuals = [], []
    for tol in (1e-2, 1e-4, 1e-6, 1e-8, 1e-12):
        layer, x, g, res = setup(be, "tanh", seed=5, tol=tol, method="fixed_point")
        u = estimate("upg", layer, x, res, g, k=5, lam=0.5)
        n = estimate("npg", layer, x, res, g, k=5, lam=0.5)
        gaps.append(rel_err(u.theta, n.theta))
        residuals.append(res.final_rel_residual.max())
    gaps, residuals = np.array(gaps), np.array(residuals)
    assert gaps[0] > 1e-4 and np.all(np.diff(gaps) < 0)
    # gap = C · residual: C depends on the residual's direction, so it varies with tol (measured
    # spread 1.7). The residuals span 10 decades, so a spread below 4 pins the power of the
    # residual to 1 ± 0.06 (gap ∝ residual^1.1 would spread it by 10).
    ratio = gaps / residuals
    assert ratio.max() / ratio.min() < 4, ratio


# ---------------------------------------------------------------- limits
def _exact(layer, x, res, g):
    return implicit_dense(layer, x, res.h, g)


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_npg_and_upg_converge_geometrically_to_exact(be, lam):
    layer, x, g, res = setup(be, "tanh", seed=6)
    exact = _exact(layer, x, res, g)
    ks = np.arange(1, 121)
    for name in ("npg", "upg"):
        errs = np.array([rel_err(estimate(name, layer, x, res, g, k=int(k), lam=lam).theta,
                                 exact.theta) for k in ks])
        # at k = 120 the truncation ρ(B)^k ≤ 0.74^120 ≈ 2e-16 is gone. NPG is then rounding:
        # a few eps times cond(I − ∂F/∂h) ≤ (1 + 0.9)/(1 − 0.9) = 19 (measured 1.4e-16). UPG's
        # states leave h*, which is exact only to the forward tolerance 1e-13, and its gap to
        # NPG is 0.2–0.4 times the residual (test above; measured 2.8e-14).
        assert errs[-1] < (100 * EPS if name == "npg" else 1e-13), (name, errs[-1])
        # rate: the error's geometric factor is at most ρ(B) for the slowest sample
        J = host(layer.dF_dh(res.h, x))
        rho_B = max(np.abs(np.linalg.eigvals(lam * J[i] + (1 - lam) * np.eye(D))).max()
                    for i in range(N))
        live = errs > 1e-13
        rate = np.exp(np.polyfit(ks[live][5:], np.log(errs[live][5:]), 1)[0])
        # the fitted rate is ρ(B), biased low by the faster modes still in the fit window and
        # high by rounding near the end (measured 0.96–0.98 ρ(B))
        assert rate <= rho_B * 1.05, (name, rate, rho_B)
        assert rate >= rho_B * 0.9, (name, rate, rho_B)


def test_bptt_converges_to_exact(be):
    errs = []
    for tol in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10):
        layer, x, g, res = setup(be, "tanh", seed=7, tol=tol, method="fixed_point",
                                 return_trajectory=True)
        errs.append(rel_err(estimate("bptt", layer, x, res, g).theta, _exact(layer, x, res, g).theta))
    assert np.all(np.diff(errs) < 0) and errs[-1] < 1e-8, errs


@pytest.mark.parametrize("method", ["fixed_point", "broyden"])
def test_implicit_iterative_converges_to_oracle(be, method):
    layer, x, g, res = setup(be, "tanh", seed=8)
    exact = _exact(layer, x, res, g)
    errs = [rel_err(estimate("implicit", layer, x, res, g, method=method, n_iter=n).theta, exact.theta)
            for n in (1, 2, 4, 8, 16, 32)]
    J = host(layer.dF_dh(res.h, x))
    rho = max(np.abs(np.linalg.eigvals(J[i])).max() for i in range(N))     # 0.40 here
    # fixed point: 32 terms of the Neumann series leave ~ρ^32 = 1.5e-13 (measured 2.6e-14);
    # Broyden solves this d = 6 linear adjoint to rounding well before 32 steps, leaving a few
    # eps times cond(I − ∂F/∂h) ≤ 19 (measured 2.1e-16)
    bound = rho ** 32 if method == "fixed_point" else 100 * EPS
    assert errs[-1] < bound and errs[-1] < errs[0] * 1e-6, errs


# ---------------------------------------------------------------- GDEQ
def test_gdeq_equals_its_dense_formula_with_the_transpose(be):
    layer, x, g, res = setup(be, "tanh", seed=9, tol=1e-8)
    assert not np.allclose(host(layer.W), host(layer.W).T)
    est = estimate("gdeq", layer, x, res, g)
    B_inv = host(res.B_inv.dense())                       # (n, d, d), from the solver
    Phi = host(layer.dF_dtheta(res.h, x))                 # (n, d_θ, d)
    gn = host(g)
    ref = -np.einsum("ntd,ned,ne->t", Phi, B_inv, gn)     # −Φ (B_T⁻¹)ᵀ g, summed over n
    assert rel_err(est.theta, ref) < 1e-12
    wrong = -np.einsum("ntd,nde,ne->t", Phi, B_inv, gn)   # the formula as printed, no transpose
    exact = host(_exact(layer, x, res, g).theta)
    assert cosine(ref, exact) > cosine(wrong, exact)
    assert rel_err(wrong, ref) > 1e-3                     # the transpose matters here


def test_gdeq_fallback_to_jfb(be):
    layer, x, g, res = setup(be, "tanh", seed=10, tol=1e-8)
    off = estimate("gdeq", layer, x, res, g)
    assert off.diagnostics["n_fallback"] == 0
    allfb = estimate("gdeq", layer, x, res, g, fallback_factor=1e-9)
    assert allfb.diagnostics["n_fallback"] == N
    assert rel_err(allfb.theta, estimate("jfb", layer, x, res, g).theta) < 1e-15
    nofb = estimate("gdeq", layer, x, res, g, fallback_factor=1e9)
    assert nofb.diagnostics["n_fallback"] == 0 and rel_err(nofb.theta, off.theta) == 0


def test_gdeq_needs_broyden(be):
    layer, x, g, res = setup(be, "tanh", method="fixed_point")
    with pytest.raises(ValueError, match="gdeq reuses Broyden's inverse"):
        estimate("gdeq", layer, x, res, g)


# ---------------------------------------------------------------- the synthetic setting
def test_synthetic_setting_bptt_vs_broyden_implicit(be):
    """[1], Sec. 3: L_h = 0.9, fixed-point iteration to relative error < 1e-5 (≤ 100 steps);
    BPTT through those steps and implicit differentiation by 20 Broyden iterations agree with
    cosine > 0.9999. deqref's dimensions: d = 64, d_x = 16, tanh, 32 samples."""
    from deqref.data import synthetic
    layer, x, g = synthetic(0)
    res = solve(layer, x, method="fixed_point", tol=1e-5, max_iter=100, return_trajectory=True)
    assert res.all_converged
    b = estimate("bptt", layer, x, res, g)
    imp = estimate("implicit", layer, x, res, g, method="broyden", n_iter=20)
    assert cosine(b.theta, imp.theta) > 0.9999


# ---------------------------------------------------------------- the entry point
def test_entry_point_validates(be):
    layer, x, g, res = setup(be)
    with pytest.raises(ValueError, match="unknown estimator 'ift'; valid estimators"):
        estimate("ift", layer, x, res, g)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['K'\] for estimator 'upg'; valid"):
        estimate("upg", layer, x, res, g, K=5)
    with pytest.raises(ValueError, match=r"lam must be a finite number in \(0, 1\], got 0.0"):
        estimate("npg", layer, x, res, g, lam=0.0)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        estimate("upg", layer, x, res, g, k=0)
    with pytest.raises(ValueError, match="form must be one of"):
        estimate("jfb", layer, x, res, g, form="dense")
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1"):
        estimate("implicit", layer, x, res, g, n_iter=0)
    with pytest.raises(ValueError, match=r"grad_h must have shape \(3, 6\)"):
        estimate("jfb", layer, x, res, g[:, :2])
    assert set(estimator_options("upg")) == {"k", "lam", "form"}
    assert set(ESTIMATORS) == {"implicit_dense", "implicit", "bptt", "upg", "npg", "jfb", "gdeq"}


def test_upg_sees_an_in_place_edit_of_the_layer(be):
    """No state is kept between calls: after ``layer.W[0, 0] += 0.3`` (in place: the same
    object), ``upg_output`` and ``upg`` equal those of a new layer built from the edited weights."""
    layer, x, g, res = setup(be, "tanh", tol=1e-6)
    output("upg", layer, x, res, k=4, lam=0.5)
    before = estimate("upg", layer, x, res, g, k=4, lam=0.5)
    layer.W[0, 0] += 0.3
    h_k = output("upg", layer, x, res, k=4, lam=0.5)
    after = estimate("upg", layer, x, res, g, k=4, lam=0.5)
    fresh = Layer(be.asarray(host(layer.W)), layer.U, layer.b, layer.activation)
    np.testing.assert_array_equal(host(h_k), host(output("upg", fresh, x, res, k=4, lam=0.5)))
    np.testing.assert_array_equal(host(after.theta),
                                  host(estimate("upg", fresh, x, res, g, k=4, lam=0.5).theta))
    assert rel_err(after.theta, before.theta) > 1e-3            # the edit matters here
