"""Jacobian regularization (deqref.jacobian_reg): the penalty against independent Jacobians, the
Hutchinson estimate against the exact value within its own CLT error, the gradients against
central differences of the penalty, and against PyTorch's double backward (Bai et al.'s
``jac_loss_estimate`` written in torch with the same probes).

Tolerances (float64): central differences with step 1e-6 of these O(1) smooth penalties have
truncation ≲ 1e-11 and rounding ≲ 1e-10 (FD_RTOL = 1e-7 leaves three orders; the conv cell's
ReLU kinks are kept ≥ 1e-3 away, as in test_conv_cell.py); two exact computations of one
quantity differ by rounding only, ≲ 1e-13 relative (TIGHT = 1e-12).
"""
import math

import numpy as np
import pytest

from deqref import conv_ops as ops
from deqref import jacobian_reg as jr
from deqref.conv import ConvCell
from deqref.layers import ACTIVATIONS, Layer
from conftest import host
from helpers import FD_RTOL, FD_STEP, assert_close, fd_grad
from test_conv_cell import F_np, kinks_np, np_params, shape_of, torch_F

TIGHT = 1e-12
N = 2


def dense_case(be, activation, seed=0, d=5, d_x=3):
    layer = Layer.random(d, d_x, activation, seed=seed, L_h=0.9, backend=be)
    rng = np.random.default_rng(seed + 10)
    return layer, rng.standard_normal((N, d)), rng.standard_normal((N, d_x))


def conv_case(be, seed=0, fd=True):
    cell = ConvCell.random(4, 2, 5, 4, 2, seed=seed, backend=be)
    rng = np.random.default_rng(seed + 10)
    h, x = rng.standard_normal((N, cell.d)), rng.standard_normal((N, cell.d_x))
    p = np_params(cell)
    for i in range(N if fd else 0):                  # central differences need no kink nearby
        assert np.abs(kinks_np(p, h[i], x[i], shape_of(cell))).min() > 1e-3, "near a ReLU kink"
    return cell, h, x


# ------------------------------------------------------------------ the penalty
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_exact_penalty_dense_closed_form(be, arr, activation):
    """‖∂F/∂h‖_F² = Σ_i σ′(a_i)² ‖W_i‖², written here from the definition."""
    layer, h, x = dense_case(be, activation)
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    a = h @ W.T + x @ U.T + b
    s = {"tanh": 1 - np.tanh(a) ** 2, "relu": (a > 0) * 1.0, "identity": np.ones_like(a),
         "softplus": 1 / (1 + np.exp(-a))}[activation]
    ref = (s ** 2) @ (W ** 2).sum(axis=1)                                    # (n,)
    assert_close(host(jr.frobenius_sq(layer, arr(h), arr(x))), ref, TIGHT, "R_s")
    assert math.isclose(jr.penalty(layer, arr(h), arr(x)), ref.sum() / (N * layer.d),
                        rel_tol=TIGHT)                                      # (JR0): / (n·d)


def test_exact_penalty_conv_against_fd_jacobian(be, arr):
    from helpers import fd_jacobian
    cell, h, x = conv_case(be)
    p, shape = np_params(cell), shape_of(cell)
    ref = [np.sum(fd_jacobian(lambda hh: F_np(p, hh, x[i], shape), h[i]) ** 2) for i in range(N)]
    assert_close(host(jr.frobenius_sq(cell, arr(h), arr(x))), np.array(ref), FD_RTOL, "R_s")


def _clt_sigma(cell, h, x, m):
    """The standard deviation of R̂_s with m Gaussian probes: √(2 tr((J Jᵀ)²)/m)   (n,)"""
    J = host(cell.dF_dh(h, x))
    JJ = np.einsum("nij,nkj->nik", J, J)
    return np.sqrt(2 * np.einsum("nij,nji->n", JJ, JJ) / m)


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_hutchinson_mean_within_clt_tolerance(be, arr, which):
    """|R̂_s − R_s| ≤ 4 σ_m per sample, σ_m = √(2 tr((JJᵀ)²)/m): a 4-sigma band (the estimate
    is a mean of m i.i.d. terms, near-normal for these m; a wrong scale, a missing square or a
    transposed J moves it by many σ). And over 20 seeds the mean |error| shrinks ~ 1/√m."""
    cell, h, x = dense_case(be, "tanh", d=6) if which == "dense" else conv_case(be)
    H_, X_ = arr(h), arr(x)
    exact = host(jr.frobenius_sq(cell, H_, X_))
    for m in (10, 100, 1000):
        est = host(jr.hutchinson(cell, H_, X_, n_probes=m, seed=m))
        assert np.all(np.abs(est - exact) <= 4 * _clt_sigma(cell, H_, X_, m)), (m, est, exact)
    err = {m: np.mean([np.abs(host(jr.hutchinson(cell, H_, X_, n_probes=m, seed=s)) - exact)
                       for s in range(20)]) for m in (4, 400)}
    # E|err| ∝ 1/√m: the ratio is 10 in expectation; 20 seeds × N samples keep it within 5–20
    assert 5 < err[4] / err[400] < 20, err


def test_hutchinson_is_seeded_and_uses_vjps(be, arr):
    cell, h, x = conv_case(be)
    H_, X_ = arr(h), arr(x)
    a = host(jr.hutchinson(cell, H_, X_, n_probes=3, seed=7))
    np.testing.assert_array_equal(a, host(jr.hutchinson(cell, H_, X_, n_probes=3, seed=7)))
    eps = host(jr.probes(cell, N, 3, 7))                                     # (3, n, d)
    J = host(cell.dF_dh(H_, X_))                                             # paper layout
    ref = np.mean([np.sum(np.einsum("nji,ni->nj", J, eps[k]) ** 2, axis=1) for k in range(3)],
                  axis=0)
    assert_close(a, ref, TIGHT, "R̂ from the dense J")


def test_probes_in_runs_equal_one_batch(be, arr, monkeypatch):
    """Probes run in batches of ≤ CHUNK_ROWS rows: with runs of 1 and 2 probes the estimate and
    the gradient equal the single-batch ones (the same sums in another order)."""
    cell, h, x = conv_case(be)
    H_, X_ = arr(h), arr(x)
    kw = dict(method="hutchinson", n_probes=5, seed=2)
    one = (jr.penalty(cell, H_, X_, **kw), host(cell.flatten(jr.penalty_grad(cell, H_, X_, **kw))))
    for rows in (N, 2 * N + 1):                          # runs of 1 probe, then of 2
        monkeypatch.setattr(jr, "CHUNK_ROWS", rows)
        assert math.isclose(jr.penalty(cell, H_, X_, **kw), one[0], rel_tol=TIGHT)
        assert_close(host(cell.flatten(jr.penalty_grad(cell, H_, X_, **kw))), one[1], TIGHT,
                     f"runs of {rows // N}")


# ------------------------------------------------------------------ the gradients
def _fd_theta(cell, h, x, arr, **kw):
    theta = host(cell.theta)
    return fd_grad(lambda t: jr.penalty(cell.with_theta(arr(t)), arr(h), arr(x), **kw), theta)


@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
def test_dense_gradients_against_fd(be, arr, activation):
    layer, h, x = dense_case(be, activation, seed=1)
    H_, X_ = arr(h), arr(x)
    exact = host(layer.flatten(jr.penalty_grad(layer, H_, X_)))
    assert_close(exact, _fd_theta(layer, h, x, arr), FD_RTOL, "exact ∇R")
    # the closed form against (JR3) summed over the basis vectors: two independent programs
    basis = jr.grad_for_probes(layer, H_, X_, jr.basis_probes(layer, N))
    assert_close(exact, host(layer.flatten(basis)) / (N * layer.d), TIGHT, "closed vs basis")
    kw = dict(method="hutchinson", n_probes=3, seed=5)
    hutch = host(layer.flatten(jr.penalty_grad(layer, H_, X_, **kw)))
    assert_close(hutch, _fd_theta(layer, h, x, arr, **kw), FD_RTOL, "Hutchinson ∇R̂")


def test_dense_sigma_second_against_fd():
    a = np.linspace(-2, 2, 9) + 0.05                                         # off relu's kink
    for name, (_, dsigma) in ACTIVATIONS.items():
        import array_api_compat.numpy as xp
        fd = (dsigma(xp, a + FD_STEP) - dsigma(xp, a - FD_STEP)) / (2 * FD_STEP)
        assert_close(jr.SIGMA_SECOND[name](xp, a), fd, FD_RTOL if name != "relu" else 0, name)


def test_group_norm_vjp_tangent_against_fd(be, arr):
    rng = np.random.default_rng(3)
    x, g, dx, dg = (rng.standard_normal((N, 4, 3, 5)) for _ in range(4))
    gamma, beta = 1 + 0.3 * rng.standard_normal(4), 0.3 * rng.standard_normal(4)

    def vjps(t):
        _, st = ops.group_norm(arr(x + t * dx), arr(gamma), arr(beta), 2, 1e-5)
        return [host(a) for a in ops.group_norm_vjp(st, arr(gamma), arr(g + t * dg))]
    _, st = ops.group_norm(arr(x), arr(gamma), arr(beta), 2, 1e-5)
    ours = ops.group_norm_vjp_tangent(st, arr(gamma), arr(g), arr(dg), arr(dx))
    plus, minus = vjps(FD_STEP), vjps(-FD_STEP)
    for o, p, mi, what in zip(ours, plus, minus, ("δ(Jᵀg)", "δ grad γ", "δ grad β")):
        assert_close(host(o), (p - mi) / (2 * FD_STEP), FD_RTOL, what)


def test_conv_second_derivative_and_gradients_against_fd(be, arr):
    cell, h, x = conv_case(be, seed=1)
    H_, X_ = arr(h), arr(x)
    rng = np.random.default_rng(4)
    v, u = rng.standard_normal((N, cell.d)), rng.standard_normal((N, cell.d))
    def vjp_at(t):
        return host(cell.flatten(cell.linearize(arr(h + t * u), X_).vjp_theta(arr(v))))
    assert_close(host(cell.flatten(cell.linearize(H_, X_).vjp_theta_dh(arr(v), arr(u)))),
                 (vjp_at(FD_STEP) - vjp_at(-FD_STEP)) / (2 * FD_STEP), FD_RTOL, "(JR3)")
    # ∇R along one random direction inside each parameter block (d_θ = 384 full differences
    # are slow on the strict backend; a wrong entry of a block changes its directional
    # derivative, and PyTorch checks every entry below)
    theta = host(cell.theta)
    for kw in (dict(), dict(method="hutchinson", n_probes=2, seed=3)):
        grad = host(cell.flatten(jr.penalty_grad(cell, H_, X_, **kw)))
        start = 0
        for name, a in cell.params().items():
            w = np.zeros_like(theta)
            w[start:start + a.size] = rng.standard_normal(a.size)
            start += a.size
            R = lambda t: jr.penalty(cell.with_theta(arr(theta + t * w)), H_, X_, **kw)  # noqa
            fd = (R(FD_STEP) - R(-FD_STEP)) / (2 * FD_STEP)
            assert abs(grad @ w - fd) <= FD_RTOL * np.abs(grad).max() * np.abs(w).sum(), \
                (name, kw, grad @ w, fd)


def test_conv_penalty_and_gradient_against_torch_double_backward(be, arr):
    """Bai et al.'s estimator in PyTorch, vJ by autograd.grad(create_graph=True), its gradient
    by a second backward, with deqref's probes: the same numbers up to rounding."""
    torch = pytest.importorskip("torch")
    cell, h, x = conv_case(be, seed=2, fd=False)
    H_, X_ = arr(h), arr(x)
    m, seed = 3, 11
    eps = torch.tensor(host(jr.probes(cell, N, m, seed)))
    p = {k: torch.tensor(a, requires_grad=True) for k, a in np_params(cell).items()}
    z = torch.tensor(h, requires_grad=True)
    f = torch_F(torch, cell, z, torch.tensor(x), p)
    loss = 0.0
    for k in range(m):
        vJ = torch.autograd.grad(f, z, eps[k], retain_graph=True, create_graph=True)[0]
        loss = loss + (vJ ** 2).sum()
    loss = loss / m / z.numel()                                              # (JR0)
    loss.backward()
    ours = jr.penalty(cell, H_, X_, method="hutchinson", n_probes=m, seed=seed)
    assert math.isclose(ours, float(loss.detach()), rel_tol=TIGHT)
    g = jr.penalty_grad(cell, H_, X_, method="hutchinson", n_probes=m, seed=seed)
    for k in cell.PARAMS:            # β₃ does not enter ∂F/∂h: torch leaves its .grad None
        ref = np.zeros(p[k].shape) if p[k].grad is None else p[k].grad.numpy()
        assert_close(host(g[k]), ref, TIGHT if p[k].grad is not None else 0, f"∇R̂[{k}]")


# ------------------------------------------------------------------ refusals
def test_argument_checks(be, arr):
    layer, h, x = dense_case(be, "tanh")
    H_, X_ = arr(h), arr(x)
    for kw, msg in [(dict(method="hutchinson", n_probes=0, seed=0), "^n_probes must be"),
                    (dict(method="hutchinson", n_probes=True, seed=0), "^n_probes must be"),
                    (dict(method="hutchinson", n_probes=2, seed=-1), "^seed must be"),
                    (dict(method="hutchinson", n_probes=None, seed=0), "^n_probes must be"),
                    (dict(method="power"), "^method must be one of"),
                    (dict(n_probes=4), "^n_probes and seed must be None with method='exact'")]:
        with pytest.raises(ValueError, match=msg):
            jr.penalty(layer, H_, X_, **kw)
        with pytest.raises(ValueError, match=msg):
            jr.penalty_grad(layer, H_, X_, **kw)
    with pytest.raises(ValueError, match="^h must have shape"):
        jr.penalty(layer, arr(h[:, :-1]), X_)
    with pytest.raises(ValueError, match="^h contains NaN"):
        jr.penalty(layer, arr(h * np.nan), X_)
    with pytest.raises(ValueError, match="^cell must be a deqref cell"):
        jr.penalty(object(), H_, X_)
