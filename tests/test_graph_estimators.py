"""Every solver and estimator on the IGNN graph cell, unchanged: matrix form = vector form, each
against its printed formula built from finite-difference Jacobians of the graph F written again
in plain NumPy (no code of deqref's derivatives), and padding that never reaches a gradient."""
import numpy as np
import pytest

from deqref import cell as C
from deqref.gradients import ESTIMATORS, estimate, output
from deqref.graph import GraphCell, pad_graphs, well_posed
from deqref.solvers import SOLVERS, solve
from helpers import FD_RTOL, apply_oracle, assert_close, eq4, eq18, fd_grad, fd_jacobian
from conftest import host
from test_graph_cell import F_np, graphs

M, P = 3, 2
EPS = np.finfo(np.float64).eps
# Both forms are exact algebra on the same Jacobians and differ by rounding in products of up to
# ~10 (d×d) matrices (d = 12): a few hundred eps at most; 1e-10 is the dense layer's bar.
MV_TOL = 1e-10


def setup(be, activation="tanh", seed=0, tol=1e-13, method="broyden", **kw):
    """Three graphs (3, 4 and 2 nodes, padded to 4), a cell with ‖W‖∞ λ_pf(Â) = 0.9, an
    upstream gradient g that is non-zero on padding nodes too, and a forward solve."""
    A_hat, x, mask = pad_graphs(graphs(seed), backend=be)
    cell = GraphCell.random(M, P, A_hat, activation, seed=seed, kappa=0.9, mask=mask, backend=be)
    g = be.asarray(np.random.default_rng(seed + 1).standard_normal((cell.n, cell.d)))
    res = solve(cell, x, method=method, tol=tol, max_iter=500, **kw)
    return cell, x, g, res


def rel_err(a, b):
    a, b = host(a).ravel(), host(b).ravel()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- the independent oracle
def F_theta(cell, theta, h, x, i):
    """F of graph i with θ = [vec(W), vec(Ω)] row-major, from the definition (test_graph_cell)."""
    W = theta[:M * M].reshape(M, M)
    Omega = theta[M * M:].reshape(M, P)
    return F_np(W, Omega, host(cell.A_hat)[i], cell.activation, h, x)


def fd_jacobians(cell, h, x):
    """Per graph i: (J_h, J_θ, J_x) of F at (h_i, x_i), standard layout, by FD."""
    theta, H, X = host(cell.theta), host(h), host(x)
    return [(fd_jacobian(lambda v: F_theta(cell, theta, v, X[i], i), H[i]),
             fd_jacobian(lambda v: F_theta(cell, v, H[i], X[i], i), theta),
             fd_jacobian(lambda v: F_theta(cell, theta, H[i], v, i), X[i]))
            for i in range(cell.n)]


def oracle(cell, h, x, g, D):
    """``helpers.apply_oracle`` on this cell's finite-difference Jacobians at h   # ((d_θ,), (n, d_x))"""
    return apply_oracle(fd_jacobians(cell, h, x), host(g), D)


def upg_oracle(cell, h_star, x, g, k, lam):
    """UPG, Eq. (17): k damped steps from h*, then Σ_t λ ∂F/∂θ|_{h_t} M_{t+1} ⋯ M_{k−1} g."""
    theta, H, X, G = host(cell.theta), host(h_star), host(x), host(g)
    grad_theta, grad_x = 0.0, []
    for i in range(cell.n):
        hs = [H[i]]
        for _ in range(k):
            hs.append(lam * F_theta(cell, theta, hs[-1], X[i], i) + (1 - lam) * hs[-1])
        v, gx = G[i], 0.0
        for t in range(k - 1, -1, -1):
            Jh = fd_jacobian(lambda u: F_theta(cell, theta, u, X[i], i), hs[t])
            Jt = fd_jacobian(lambda u: F_theta(cell, u, hs[t], X[i], i), theta)
            Jx = fd_jacobian(lambda u: F_theta(cell, theta, hs[t], u, i), X[i])
            grad_theta, gx = grad_theta + lam * Jt.T @ v, gx + lam * Jx.T @ v
            v = lam * Jh.T @ v + (1 - lam) * v
        grad_x.append(gx)
    return grad_theta, np.array(grad_x)


def oracle_of(name, opts, cell, x, g, res):
    h = res.h
    if name in ("npg", "jfb"):
        return oracle(cell, h, x, g, eq18(opts.get("k", 1), opts.get("lam", 1.0)))
    if name == "upg":
        return upg_oracle(cell, h, x, g, opts["k"], opts["lam"])
    if name == "implicit_dense" or (name == "implicit" and opts["method"] == "broyden"):
        return oracle(cell, h, x, g, eq4)
    if name == "implicit":                      # fixed point from y_0 = 0: Σ_{j<K} (∂F/∂h)^j
        return oracle(cell, h, x, g, eq18(opts["n_iter"], 1.0))
    if name == "gdeq":                          # −(B_T⁻¹)ᵀ from the forward Broyden solve
        B_inv = host(res.B_inv.dense())
        return oracle(cell, h, x, g, lambda i, Jh: -B_inv[i].T)
    raise ValueError(name)


CASES = [("upg", dict(k=k, lam=lam)) for k in (1, 3, 5) for lam in (0.5, 1.0)] + \
        [("npg", dict(k=k, lam=lam)) for k in (1, 3, 5) for lam in (0.5, 1.0)] + \
        [("jfb", {}), ("gdeq", {}), ("implicit_dense", {}),
         ("implicit", dict(method="fixed_point", n_iter=7)),
         ("implicit", dict(method="broyden", n_iter=60, tol=1e-14))]


# ---------------------------------------------------------------- every estimator
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_matrix_form_equals_vector_form_and_the_oracle(be, activation):
    cell, x, g, res = setup(be, activation, form="dense")
    assert res.converged.all()
    for name, opts in CASES:
        v = estimate(name, cell, x, res, g, form="vector", **opts)
        m = estimate(name, cell, x, res, g, form="matrix", **opts)
        assert set(v.grads) == {"W", "Omega"}
        assert rel_err(v.theta, m.theta) < MV_TOL, (name, opts)
        assert rel_err(v.x, m.x) < MV_TOL, (name, opts)
        theta, gx = oracle_of(name, opts, cell, x, g, res)
        # FD Jacobians are good to ~1e-10 (helpers); products of up to ten of them with norms
        # ≤ 0.56, or (I − ∂F/∂h)⁻¹ with cond ≤ 2 (measured), keep that below FD_RTOL = 1e-7
        assert_close(host(m.theta), theta, FD_RTOL, f"{name} {opts} dθ vs the FD oracle")
        assert_close(host(m.x), gx, FD_RTOL, f"{name} {opts} dx vs the FD oracle")


def test_every_estimator_runs_on_the_graph_cell(be):
    """Each of ESTIMATORS, by name, on the graph cell: finite, flag-free, θ-shaped."""
    cell, x, g, res = setup(be, form="dense")
    traj = solve(cell, x, method="fixed_point", tol=1e-10, max_iter=500, return_trajectory=True)
    exact = estimate("implicit_dense", cell, x, res, g)
    for name in sorted(ESTIMATORS):
        r = traj if name == "bptt" else res
        est = estimate(name, cell, x, r, g)
        assert est.ok, (name, est.flags)
        assert host(est.theta).shape == (cell.d_theta,) and host(est.x).shape == (cell.n, cell.d_x)
        if name in ("implicit", "bptt"):       # these converge to Eq. (4) itself
            # measured: implicit 2e-16 (its adjoint to rounding), BPTT 1e-9 (the forward
            # trajectory to 1e-10, times cond(I − ∂F/∂h) ≤ 2)
            assert rel_err(est.theta, exact.theta) < 1e-6, name


def test_implicit_iterative_equals_implicit_dense(be):
    cell, x, g, res = setup(be)
    dense = estimate("implicit_dense", cell, x, res, g)
    for method in ("fixed_point", "broyden"):
        it = estimate("implicit", cell, x, res, g, method=method, n_iter=400, tol=1e-14)
        # the adjoint solved to 1e-14, times cond(I − ∂F/∂h) ≤ 2 (measured), to rounding
        assert rel_err(it.theta, dense.theta) < 1e-12, method
        assert rel_err(it.x, dense.x) < 1e-12, method


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_bptt_matrix_equals_vector_and_fd_of_the_unrolled_solver(be, arr, lam):
    """L(θ, x) = Σ c ⊙ h_T with h_T the same damped iteration from 0, differentiated by FD."""
    cell, x, c, res = setup(be, method="fixed_point", lam=lam, tol=1e-6, return_trajectory=True)
    v, m = (estimate("bptt", cell, x, res, c, form=f) for f in ("vector", "matrix"))
    assert rel_err(v.theta, m.theta) < MV_TOL and rel_err(v.x, m.x) < MV_TOL
    T = res.n_iter.copy()

    def loss(theta, xx):
        total = 0.0
        for i in range(cell.n):
            h = np.zeros(cell.d)
            for _ in range(T[i]):
                h = lam * F_theta(cell, theta, h, xx.reshape(cell.n, -1)[i], i) + (1 - lam) * h
            total += host(c)[i] @ h
        return total
    theta, xn = host(cell.theta), host(x)
    # FD of a smooth explicit map (1e-7, helpers), loosened ×10 for T ~ 10–20 steps
    assert_close(host(v.theta), fd_grad(lambda t: loss(t, xn), theta), 1e-6, "BPTT dθ")
    assert_close(host(v.x), fd_grad(lambda z: loss(theta, z), xn), 1e-6, "BPTT dx")


def test_upg_against_finite_differences_of_algorithm1(be):
    """Algorithm 1 on the graph cell: h* held fixed, k = 3 damped steps with λ = 0.5."""
    k, lam = 3, 0.5
    cell, x, c, res = setup(be, "softplus", tol=1e-6)
    h_star = host(res.h)

    def loss(theta, xx):
        total = 0.0
        for i in range(cell.n):
            h = h_star[i]
            for _ in range(k):
                h = lam * F_theta(cell, theta, h, xx.reshape(cell.n, -1)[i], i) + (1 - lam) * h
            total += host(c)[i] @ h
        return total
    est = estimate("upg", cell, x, res, c, k=k, lam=lam)
    theta, xn = host(cell.theta), host(x)
    assert_close(host(est.theta), fd_grad(lambda t: loss(t, xn), theta), FD_RTOL, "UPG dθ")
    assert_close(host(est.x), fd_grad(lambda z: loss(theta, z), xn), FD_RTOL, "UPG dx")
    h_k = host(output("upg", cell, x, res, k=k, lam=lam))         # the loss is taken at h_k
    assert abs(float(np.sum(host(c) * h_k)) - loss(theta, xn)) < 1e-12


def test_shared_vjp_sum_equals_the_generic_one(be):
    """GraphCell.vjp_sum takes Ω's and x's terms once from Σ_t R_t; deqref.cell.vjp_sum adds
    every term's vjp_theta and vjp_x: the same sums reordered (a few ulps)."""
    cell, x, g, res = setup(be)
    rng = np.random.default_rng(4)
    terms = [(cell.linearize(be.asarray(rng.standard_normal((cell.n, cell.d))), x),
              be.asarray(rng.standard_normal((cell.n, cell.d)))) for _ in range(4)]

    class Plain:                      # the cell's products, without its vjp_sum
        pass
    fast, fast_x = C.vjp_sum(cell, terms, 0.5)
    slow, slow_x = C.vjp_sum(Plain(), terms, 0.5)
    for k in ("W", "Omega"):
        assert_close(host(fast[k]), host(slow[k]), 64 * EPS, k)
    assert_close(host(fast_x), host(slow_x), 64 * EPS, "x")


# ---------------------------------------------------------------- padding
def test_padding_never_reaches_a_gradient(be, arr):
    """The implicit gradient of the padded batch, with g non-zero on padding nodes, equals the
    sum over the graphs of each graph's own, unpadded: a padding state is σ(0) whatever θ is."""
    cell, x, g, res = setup(be)
    batch = estimate("implicit_dense", cell, x, res, g)
    G, X, total = host(g), host(x), 0.0
    for i, (A, Xi) in enumerate(graphs(0)):
        k = A.shape[0]
        alone = cell.on(arr(host(cell.A_hat)[i, :k, :k][None]))
        xi = arr(X[i, :k * P][None])
        ri = solve(alone, xi, method="broyden", tol=1e-13, max_iter=500)
        gi = estimate("implicit_dense", alone, xi, ri, arr(G[i, :k * M][None]))
        total = total + host(gi.theta)
        # ∂L/∂x on real nodes matches; on padding features it is 0 (Â's padding rows are 0)
        assert_close(host(batch.x)[i, :k * P], host(gi.x)[0], 1e-12, f"dx graph {i}")
        assert not host(batch.x)[i, k * P:].any()
    # two forward solves to 1e-13, each amplified by cond(I − ∂F/∂h) ≤ 2 (measured)
    assert_close(host(batch.theta), total, 1e-11, "dθ")


# ---------------------------------------------------------------- the forward solvers
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solvers_converge_on_a_well_posed_graph_cell(be, arr, method, activation):
    """With ‖W‖∞ λ_pf(Â) = 0.9 (IGNN's condition) each solver reaches the fixed point, which
    equals the plain NumPy iteration of F run to its limit (a contraction in a weighted norm)."""
    cell, x, _, _ = setup(be, activation, seed=4)        # ReLU active on every graph here
    assert abs(well_posed(cell) - 0.9) < 1e-14
    res = solve(cell, x, method=method, tol=1e-12, max_iter=500)
    assert res.converged.all(), res.summary()
    theta, X = host(cell.theta), host(x)
    for i in range(cell.n):
        h = np.zeros(cell.d)
        for _ in range(600):          # 0.9⁶⁰⁰ ≈ 3e-28 of the first step
            h = F_theta(cell, theta, h, X[i], i)
        # the solver stops at a relative residual of 1e-12, which (I − ∂F/∂h)⁻¹ amplifies by
        # ≤ 1/(1 − ‖∂F/∂h‖₂) ≈ 6 here (‖∂F/∂h‖₂ ≤ 0.84, measured): ≲ 1e-11
        assert_close(host(res.h)[i], h, 1e-10, f"{method} graph {i}")
