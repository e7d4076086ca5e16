"""Every estimator of deqref.gradients on the convolutional cell: matrix form = vector form, and
the matrix form against its printed formula evaluated on finite-difference Jacobians of the
NumPy definition of the cell (tests/test_conv_cell.py's F_np, no deqref derivative code), as
tests/test_estimators.py does for the dense layer.

The cell is ConvCell.random(C = 4, C_x = 2, 5 × 4 images, G = 2, injection = 10): a strong
injection makes it contract at its fixed point (‖∂F/∂h‖₂ ≈ 0.8, so every solver converges and
the Neumann-type estimators are meaningful); d = 80, d_θ = 384.

Tolerances. Matrix and vector forms are exact algebra on the same derivatives and differ by
rounding in products of ≤ 10 (80 × 80) matrices: ≲ 1e-13 relative; MV_TOL = 1e-10 (as in
test_estimators.py). The FD Jacobians are good to ~1e-10 relative (helpers.FD_RTOL), and
products of a few of them with ‖(I − ∂F/∂h)⁻¹‖ ≤ 1/(1 − 0.8) = 5 keep that below FD_RTOL = 1e-7.
"""
import numpy as np
import pytest

from deqref.conv import ConvCell
from deqref.gradients import ESTIMATORS, estimate, output
from deqref.solvers import solve
from helpers import FD_RTOL, apply_oracle, assert_close, eq4, eq18, fd_jacobian
from conftest import host
from test_conv_cell import F_np, kinks_np, np_params, shape_of

N = 2
MV_TOL = 1e-10
_CACHE = {}


def problem(be):
    """The cell, x, g, a tight Broyden solve (dense B⁻¹ for GDEQ) and the FD Jacobians at h*,
    computed once per backend."""
    if be.name not in _CACHE:
        cell = ConvCell.random(4, 2, 5, 4, 2, seed=0, injection=10.0, backend=be)
        rng = np.random.default_rng(1)
        x = be.asarray(rng.standard_normal((N, cell.d_x)))
        g = be.asarray(rng.standard_normal((N, cell.d)))
        res = solve(cell, x, method="broyden", form="dense", tol=1e-13, max_iter=200)
        assert res.converged.all()
        _CACHE[be.name] = (cell, x, g, res, fd_jacobians(cell, host(res.h), host(x)))
    return _CACHE[be.name]


def unflatten_np(cell, theta):
    out, start = {}, 0
    for name, a in cell.params().items():
        out[name] = theta[start:start + a.size].reshape(a.shape)
        start += a.size
    return out


def fd_jacobians(cell, H, X):
    """Per sample: (J_h, J_θ, J_x) of F_np at (H[i], X[i]), standard layout, by central
    differences; every ReLU pre-activation ≥ 1e-3 from its kink, so no step crosses one."""
    p, shape, theta = np_params(cell), shape_of(cell), host(cell.theta)
    out = []
    for i in range(H.shape[0]):
        assert np.abs(kinks_np(p, H[i], X[i], shape)).min() > 1e-3, "too close to a ReLU kink"
        out.append((fd_jacobian(lambda v: F_np(p, v, X[i], shape), H[i]),
                    fd_jacobian(lambda t: F_np(unflatten_np(cell, t), H[i], X[i], shape), theta),
                    fd_jacobian(lambda v: F_np(p, H[i], v, shape), X[i])))
    return out


def oracle(jacobians, g, D):
    return apply_oracle(jacobians, host(g), D)


def upg_oracle(cell, jac_star, h_star, x, g, k, lam):
    """UPG, Eq. (17): k damped steps from h*, then Σ_t λ ∂F/∂θ|_{h_t} M_{t+1} ⋯ M_{k−1} g."""
    p, shape, H, X, G = np_params(cell), shape_of(cell), host(h_star), host(x), host(g)
    grad_theta, grad_x = 0.0, []
    for i in range(N):
        hs = [H[i]]
        for _ in range(k - 1):
            hs.append(lam * F_np(p, hs[-1], X[i], shape) + (1 - lam) * hs[-1])
        jacs = [jac_star[i]] + [fd_jacobians(cell, h_t[None], X[i][None])[0] for h_t in hs[1:]]
        v, gx = G[i], 0.0
        for t in range(k - 1, -1, -1):                      # v = M_{t+1} ⋯ M_{k−1} g
            Jh, Jt, Jx = jacs[t]
            grad_theta, gx = grad_theta + lam * Jt.T @ v, gx + lam * Jx.T @ v
            v = lam * Jh.T @ v + (1 - lam) * v
        grad_x.append(gx)
    return grad_theta, np.array(grad_x)


CASES = [("jfb", {}), ("npg", dict(k=3, lam=0.5)), ("npg", dict(k=5, lam=1.0)),
         ("upg", dict(k=1, lam=1.0)), ("upg", dict(k=2, lam=0.5)), ("gdeq", {}),
         ("implicit_dense", {}), ("implicit", dict(method="fixed_point", n_iter=7)),
         ("implicit", dict(method="broyden", n_iter=60, tol=1e-12))]


def test_cases_cover_every_estimator():
    assert {name for name, _ in CASES} | {"bptt"} == set(ESTIMATORS)


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_matrix_form_equals_vector_form_and_the_fd_oracle(be, name, opts):
    cell, x, g, res, jac = problem(be)
    v = estimate(name, cell, x, res, g, form="vector", **opts)
    m = estimate(name, cell, x, res, g, form="matrix", **opts)
    assert v.ok and m.ok, (v.flags, m.flags)
    assert_close(host(v.theta), host(m.theta), MV_TOL, f"{name} θ vector vs matrix")
    assert_close(host(v.x), host(m.x), MV_TOL, f"{name} x vector vs matrix")
    if name in ("npg", "jfb"):
        want = oracle(jac, g, eq18(opts.get("k", 1), opts.get("lam", 1.0)))
    elif name == "upg":
        want = upg_oracle(cell, jac, res.h, x, g, opts["k"], opts["lam"])
    elif name == "implicit_dense" or opts.get("method") == "broyden":
        want = oracle(jac, g, eq4)
    elif name == "implicit":                   # fixed point from y₀ = 0: Σ_{j<K} (∂F/∂h)^j
        want = oracle(jac, g, eq18(opts["n_iter"], 1.0))
    else:                                      # gdeq: −(B_T⁻¹)ᵀ from the forward Broyden solve
        B_inv = host(res.B_inv.dense())
        want = oracle(jac, g, lambda i, Jh: -B_inv[i].T)
    assert_close(host(m.theta), want[0], FD_RTOL, f"{name} {opts} dθ vs the FD oracle")
    assert_close(host(m.x), want[1], FD_RTOL, f"{name} {opts} dx vs the FD oracle")
    assert set(m.grads) == set(cell.PARAMS)


def test_bptt_matrix_equals_vector_and_directional_fd(be, arr):
    """BPTT through the damped fixed-point solver's own T steps from h₀ = 0: both forms, and
    the loss Σ c ⊙ h_T differentiated by central differences along random directions of θ and x
    (the same T steps per sample, unrolled in NumPy). tol = 1e-2 keeps T short (≈ 10)."""
    cell, x, c, *_ = problem(be)
    lam = 0.8
    res = solve(cell, x, method="fixed_point", lam=lam, tol=1e-2, max_iter=200,
                return_trajectory=True)
    assert res.converged.all() and res.n_iter.max() <= 12, res.n_iter
    v, m = (estimate("bptt", cell, x, res, c, form=f) for f in ("vector", "matrix"))
    assert_close(host(v.theta), host(m.theta), MV_TOL, "bptt θ")
    assert_close(host(v.x), host(m.x), MV_TOL, "bptt x")
    T, shape, X, C_ = res.n_iter.copy(), shape_of(cell), host(x), host(c)

    def loss(theta, xx):
        p, total = unflatten_np(cell, theta), 0.0
        for i in range(N):
            h = np.zeros(cell.d)
            for _ in range(T[i]):
                h = lam * F_np(p, h, xx[i], shape) + (1 - lam) * h
            total += C_[i] @ h
        return total
    theta, rng, step = host(cell.theta), np.random.default_rng(5), 1e-6
    for _ in range(2):
        w, u = rng.standard_normal(theta.size), rng.standard_normal(X.shape)
        fd_t = (loss(theta + step * w, X) - loss(theta - step * w, X)) / (2 * step)
        fd_x = (loss(theta, X + step * u) - loss(theta, X - step * u)) / (2 * step)
        # FD error ~1e-10 relative per step, ×T ≈ 10 steps: 1e-6 of the directional scale
        scale = np.abs(host(v.theta)).max() * np.abs(w).sum()
        assert abs(host(v.theta) @ w - fd_t) <= 1e-6 * scale, (host(v.theta) @ w, fd_t)
        scale_x = np.abs(host(v.x)).max() * np.abs(u).sum()
        assert abs(np.sum(host(v.x) * u) - fd_x) <= 1e-6 * scale_x, (np.sum(host(v.x) * u), fd_x)


def test_upg_loss_is_taken_at_h_k(be):
    cell, x, g, res, _ = problem(be)
    p, shape = np_params(cell), shape_of(cell)
    h = host(res.h)
    for _ in range(2):
        h = np.stack([0.5 * F_np(p, h[i], host(x)[i], shape) + 0.5 * h[i] for i in range(N)])
    assert_close(host(output("upg", cell, x, res, k=2, lam=0.5)), h, 1e-13, "h_k")


def test_train_runs_the_conv_cell_on_digits(be):
    """deqref.train takes the conv cell unchanged: two epochs of UPG on 100 digits lower the
    training loss; ``project`` (TrainConfig.spectral_norm) is called and keeps the cell."""
    from deqref.data import Dataset, digits
    from deqref.heads import LinearHead
    from deqref.train import DEQModel, TrainConfig, train
    full = digits(seed=0, backend=be)
    data = Dataset("digits-120", "classification", full.x_train[:100, ...], full.y_train[:100],
                   full.x_val[:20, ...], full.y_val[:20], 10, full.info)
    cell = ConvCell.random(4, 1, 8, 8, 2, seed=0, injection=10.0, backend=be)
    model = DEQModel(cell, LinearHead.random(cell.d, 10, seed=1, backend=be))
    hist = train(model, data, TrainConfig(epochs=2, lr=1e-2, batch_size=50, estimator="upg",
                                          estimator_options={"k": 3, "lam": 0.8},
                                          spectral_norm=0.9, seed=0, quiet=True))
    assert hist["train_loss"][-1] < hist["train_loss"][0], hist["train_loss"]
    assert sum(hist["forward_unconverged"]) == 0 and sum(hist["estimator_flagged"]) == 0
    assert isinstance(model.layer, ConvCell)
