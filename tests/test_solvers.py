"""Forward solvers against scipy.optimize.root, closed forms and Broyden's defining properties."""
import warnings

import numpy as np
import pytest
import scipy.optimize

from deqref.backend import to_numpy
from deqref.layers import Layer
from deqref.solvers import ConvergenceWarning, solve
from helpers import assert_close
from conftest import host

D, DX, N = 12, 4, 3
D_SECANT = 8


def problem(be, activation="tanh", seed=0, d=D, L_h=0.9):
    layer = Layer.random(d, DX, activation, seed=seed, L_h=L_h, backend=be)
    x = np.random.default_rng(seed + 1).standard_normal((N, DX))
    return layer, x


def scipy_fixed_point(layer, x_i, method):
    """Solve F(h) − h = 0 for one sample with scipy's own Broyden / Anderson."""
    W, U, b = (to_numpy(a) for a in (layer.W, layer.U, layer.b))
    sig = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0), "identity": lambda a: a,
           "softplus": lambda a: np.logaddexp(a, 0)}[layer.activation]
    sol = scipy.optimize.root(lambda h: sig(W @ h + U @ x_i + b) - h, np.zeros(layer.d),
                              method=method, options={"fatol": 1e-13, "maxiter": 500})
    assert sol.success, sol.message
    return sol.x


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus", "identity"])
@pytest.mark.parametrize("method,opts", [("fixed_point", {}), ("fixed_point", {"lam": 0.5}),
                                         ("broyden", {}), ("broyden", {"form": "dense"}),
                                         ("anderson", {"m": 5})])
def test_fixed_point_agrees_with_scipy(be, arr, activation, method, opts):
    layer, x = problem(be, activation)
    res = solve(layer, arr(x), method=method, tol=1e-12, max_iter=500, **opts)
    assert res.all_converged and set(res.stop_reason) == {"tolerance"}
    h = host(res.h)
    for i in range(N):
        ref = scipy_fixed_point(layer, x[i], "broyden1")
        ref2 = scipy_fixed_point(layer, x[i], "anderson")
        # both solves stop at residual ≲ 1e-12·‖F‖; with contraction 0.9 the error is ≤ r/(1−0.9)
        assert_close(h[i], ref, 1e-10, f"{method} vs broyden1")
        assert_close(h[i], ref2, 1e-10, f"{method} vs anderson")


@pytest.mark.parametrize("method", ["fixed_point", "broyden", "anderson"])
def test_linear_layer_closed_form(be, arr, method):
    layer, x = problem(be, "identity")
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    res = solve(layer, arr(x), method=method, tol=1e-13, max_iter=1000)
    closed = np.linalg.solve(np.eye(D) - W, (x @ U.T + b).T).T      # (I − W)⁻¹(Ux + b)
    # condition number of I − W is ≤ 1.9/0.1 = 19; residual 1e-13 gives error ≲ 2e-12
    assert_close(host(res.h), closed, 1e-11, "closed form")


def test_traces_have_no_padding(be, arr):
    layer, x = problem(be)
    res = solve(layer, arr(x), method="broyden", tol=1e-10)
    for i in range(N):
        assert len(res.abs_residual[i]) == len(res.rel_residual[i]) == res.n_iter[i] + 1
        assert np.all(np.isfinite(res.abs_residual[i]))
    # the relative residual is ‖F(h) − h‖ / ‖F(h)‖ at the returned h
    Fh = host(layer(res.h, arr(x)))
    r = np.linalg.norm(Fh - host(res.h), axis=1)
    assert_close(res.final_abs_residual, r, 1e-12, "abs residual")
    assert_close(res.final_rel_residual, r / np.linalg.norm(Fh, axis=1), 1e-12, "rel residual")


def test_trajectory_on_request(be, arr):
    layer, x = problem(be)
    res = solve(layer, arr(x), method="fixed_point", lam=0.7, tol=1e-8, return_trajectory=True)
    traj = [host(t) for t in res.trajectory]
    assert len(traj) == res.n_iter.max() + 1
    np.testing.assert_array_equal(traj[-1], host(res.h))
    # Eq. (13): h_{t+1} = λ F(h_t) + (1 − λ) h_t for samples still iterating
    F0 = host(layer(arr(traj[0]), arr(x)))
    assert_close(traj[1], 0.7 * F0 + 0.3 * traj[0], 1e-15, "damped step")


def test_broyden_dense_and_lowrank_same_iterates(be, arr):
    layer, x = problem(be, "tanh", d=8)
    kw = dict(tol=1e-12, max_iter=40, return_trajectory=True)
    a = solve(layer, arr(x), method="broyden", form="dense", **kw)
    b = solve(layer, arr(x), method="broyden", form="lowrank", m=40, **kw)
    assert len(a.trajectory) == len(b.trajectory)
    for ta, tb in zip(a.trajectory, b.trajectory):
        # the two forms compute the same products in a different order: agreement to
        # rounding amplified along the run; 1e-10 is ~1e5 eps, far below any real difference
        assert_close(host(ta), host(tb), 1e-10, "iterates")
    # B⁻¹ compared while the steps are far from rounding level: each update divides by
    # Δhᵀ B⁻¹ Δg, so the two forms' rounding differences grow like eps / r_rel (measured: 2e-16
    # after 2 updates, 3e-14 after 6 at r_rel ≤ 7e-4, 1e-12 after 8 at r_rel ~ 1e-6). After 6
    # updates 1e-12 leaves a margin of 30; a wrong term or transpose gives O(1).
    kw = dict(tol=0.0, max_iter=6, warn=False)
    a = solve(layer, arr(x), method="broyden", form="dense", **kw)
    b = solve(layer, arr(x), method="broyden", form="lowrank", m=6, **kw)
    assert_close(host(a.B_inv.dense()), host(b.B_inv.dense()), 1e-12, "B_inv")


def step_pair(layer, X, res):
    """(Δh, Δg) of the last step of a run with a trajectory, recomputed on the host   # (n, d)"""
    h1, h0 = res.trajectory[-1], res.trajectory[-2]
    dh = host(h1) - host(h0)
    dg = (host(layer(h1, X)) - host(h1)) - (host(layer(h0, X)) - host(h0))
    return dh, dg


def test_broyden_secant_condition_after_every_update(be, arr):
    layer, x = problem(be, "softplus", d=D_SECANT)
    X = arr(x)
    full = solve(layer, X, method="broyden", tol=1e-12, max_iter=25, return_trajectory=True,
                 warn=False)
    T = int(full.n_iter.min())
    assert T >= 5
    eps = np.finfo(np.float64).eps
    for form in ("dense", "lowrank"):                        # lowrank: m = 30 ≥ T, memory not full
        for t in range(1, T + 1):
            # the run stopped after t updates ends with B_t⁻¹ built from the t-th step
            res = solve(layer, X, method="broyden", form=form, tol=0.0, max_iter=t, warn=False,
                        return_trajectory=True)
            dh, dg = step_pair(layer, X, res)
            B_dg = host(res.B_inv.matvec(arr(dg)))
            assert np.all(res.n_skipped == 0)
            # exact in exact arithmetic: B_t⁻¹Δg = B_{t−1}⁻¹Δg + u (vᵀΔg) with vᵀΔg = Δhᵀ B_{t−1}⁻¹ Δg,
            # the denominator of u. Each side is a sum of d products rounded once (≤ d eps),
            # amplified by the dot product's condition κ = ‖Δh‖ ‖B_{t−1}⁻¹Δg‖ / |Δhᵀ B_{t−1}⁻¹Δg|,
            # ≈ 1 here since B_{t−1}⁻¹Δg ≈ Δh (measured ≤ 1.07): 8 d eps = 1.4e-14 leaves a
            # factor 4 for κ and the sum on top of d eps. Measured error ≤ 2.6e-16.
            assert_close(B_dg, dh, 8 * D_SECANT * eps, f"secant B⁻¹Δg = Δh ({form}, t={t})")


@pytest.mark.parametrize("d", [3, 6, 10])
def test_broyden_exact_on_linear_map_within_2d_steps(be, arr, d):
    # Gay (1979): Broyden's method finds the root of a linear map in at most 2d steps
    layer, x = problem(be, "identity", d=d, seed=d)
    res = solve(layer, arr(x), method="broyden", form="dense", tol=1e-12, max_iter=2 * d)
    assert res.all_converged and res.n_iter.max() <= 2 * d


def limited_memory_broyden(F, h0, m, n_steps):
    """Limited-memory good Broyden for one sample, written out in plain NumPy: B⁻¹ = −I + Σ u vᵀ
    over the last m pairs, the oldest dropped first. Returns the iterates (n_steps + 1, d) and
    every pair (u, v) in the order applied."""
    pairs, h = [], h0
    g = F(h) - h

    def B_inv(w):
        return -w + sum(u * (v @ w) for u, v in pairs[-m:])

    def B_invT(w):
        return -w + sum(v * (u @ w) for u, v in pairs[-m:])

    traj = [h]
    for _ in range(n_steps):
        h_new = h - B_inv(g)
        g_new = F(h_new) - h_new
        dh, dg = h_new - h, g_new - g
        B_dg = B_inv(dg)
        pairs.append(((dh - B_dg) / (dh @ B_dg), B_invT(dh)))
        h, g = h_new, g_new
        traj.append(h)
    return np.array(traj), pairs


def host_layer(layer, x_i):
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    return lambda h: np.tanh(W @ h + U @ x_i + b)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_lowrank_limited_memory_against_independent_loop(be, arr, m):
    """Memory full (m < iterations): the iterates and the kept pairs are those of limited-memory
    Broyden with drop-oldest, written as a per-sample loop in the test."""
    layer, x = problem(be, "tanh", d=10)
    res = solve(layer, arr(x), method="broyden", m=m, tol=1e-10, max_iter=200,
                return_trajectory=True)
    assert res.all_converged and np.all(res.n_skipped == 0)
    assert res.n_iter.min() >= m + 5                      # the regime under test
    traj = np.stack([host(t) for t in res.trajectory])    # (T + 1, n, d)
    Us, Vs = host(res.B_inv.Us), host(res.B_inv.Vs)       # (n, m, d)
    eps = np.finfo(np.float64).eps
    for i in range(N):
        T = int(res.n_iter[i])
        ref, pairs = limited_memory_broyden(host_layer(layer, x[i]), np.zeros(10), m, T)
        # the same formulas in another order. B⁻¹'s rounding differences grow like eps / r_rel,
        # but they multiply g, of size r_rel ‖F‖: the iterates stay eps-close. 500 eps = 1.1e-13
        # leaves room for the ~20 steps; measured ≤ 2.7e-16
        assert_close(traj[:T + 1, i], ref, 500 * eps, f"iterates, m={m}, sample {i}")
        for k, (u, v) in enumerate(pairs[-m:], start=T - m):   # update k+1 sits in slot k mod m
            slot = k % m
            # u ∝ Δh − B⁻¹Δg = −B⁻¹ g_{k+1}, of size r_rel(h_{k+1}) ‖F‖, computed from iterates
            # that differ by eps ‖h‖ between the two codes: relative error eps / r_rel(h_{k+1})
            # (measured ≤ 2.1×that). Pairs are kept up to a power of two per sample: compare u vᵀ.
            # Keeping the wrong pairs differs by 0.1–0.5.
            rtol = 100 * eps / res.rel_residual[i][k + 1]
            assert_close(np.outer(Us[i, slot], Vs[i, slot]), np.outer(u, v), rtol,
                         f"pair {k + 1} in slot {slot}, m={m}, sample {i}")


def test_lowrank_secant_condition_once_memory_is_full(be, arr):
    """What holds after update k > m: B_k⁻¹Δg = Δh − u_old (v_oldᵀΔg), with (u_old, v_old) the
    pair the update wrote over; the plain secant condition B_k⁻¹Δg = Δh does not."""
    layer, x = problem(be, "softplus", d=8)
    X, m = arr(x), 2
    eps = np.finfo(np.float64).eps
    for k in range(m + 1, 9):
        before = solve(layer, X, method="broyden", m=m, tol=0.0, max_iter=k - 1, warn=False)
        res = solve(layer, X, method="broyden", m=m, tol=0.0, max_iter=k, warn=False,
                    return_trajectory=True)
        assert np.all(res.B_inv.n_updates == k)
        dh, dg = step_pair(layer, X, res)
        slot = (k - 1) % m                                 # update k wrote into this slot
        u_old, v_old = host(before.B_inv.Us)[:, slot], host(before.B_inv.Vs)[:, slot]
        B_dg = host(res.B_inv.matvec(arr(dg)))
        dropped = u_old * np.sum(v_old * dg, axis=1, keepdims=True)
        # as in the secant test above: d products rounded once, κ ≤ 1.04 measured; the error
        # measured is ≤ 1.7e-16
        assert_close(B_dg, dh - dropped, 8 * D_SECANT * eps, f"B_k⁻¹Δg, k={k}")
        # the dropped term is not small: measured 0.06–0.12 of ‖Δh‖
        secant = np.abs(B_dg - dh).max() / np.abs(dh).max()
        assert secant > 1e-2, f"k={k}: the plain secant condition should not hold ({secant:.1e})"


def test_non_contractive_diverges(be, arr):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    layer = Layer(arr(1.5 * Q), arr(rng.standard_normal((D, DX))), arr(np.zeros(D)), "identity")
    x = rng.standard_normal((N, DX))
    with pytest.warns(ConvergenceWarning, match="diverged"):
        res = solve(layer, arr(x), method="fixed_point", max_iter=500)
    assert not res.converged.any() and set(res.stop_reason) == {"diverged"}
    assert np.all(np.isfinite(host(res.h)))


def test_oscillating_layer_stagnates(be, arr):
    # F(h) = −h + c: the iteration flips between two points forever, residual constant
    layer = Layer(arr(-np.eye(D)), arr(np.ones((D, DX))), arr(np.zeros(D)), "identity")
    x = np.ones((N, DX))
    with pytest.warns(ConvergenceWarning):
        res = solve(layer, arr(x), method="fixed_point", max_iter=100, stall_iter=10)
    assert not res.converged.any() and set(res.stop_reason) == {"stagnated"}
    with pytest.warns(ConvergenceWarning):
        res = solve(layer, arr(x), method="fixed_point", max_iter=20)
    assert set(res.stop_reason) == {"max_iter"} and np.all(res.n_iter == 20)


def test_per_sample_stopping(be, arr):
    layer, x = problem(be)
    x[0] = 0.0                        # sample 0 converges faster than the others
    res = solve(layer, arr(x), method="fixed_point", tol=1e-10)
    assert res.all_converged
    for i in range(N):
        assert res.rel_residual[i][-1] <= 1e-10 and np.all(res.rel_residual[i][:-1] > 1e-10)


def test_anderson_never_fails_on_singular_system(be, arr):
    # identical rows of G (x = 0, h0 = 0, zero bias) make GGᵀ rank-deficient
    layer = Layer(arr(0.5 * np.eye(D)), arr(np.zeros((D, DX))), arr(np.zeros(D)), "tanh")
    res = solve(layer, arr(np.zeros((N, DX))), method="anderson", m=5, tol=1e-12)
    assert res.all_converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve(layer, arr(np.ones((N, DX))), method="anderson", m=5, tol=1e-12)
    assert res.all_converged and np.all(np.isfinite(host(res.h)))


def test_skipped_sherman_morrison_updates_are_counted(be, arr):
    """|Δhᵀ B⁻¹ Δg| ≤ ‖Δh‖ ‖B⁻¹Δg‖ (Cauchy–Schwarz), so skip_tol > 1 skips every update:
    B⁻¹ stays −I and Broyden's step h − B⁻¹g(h) = F(h) is plain fixed-point iteration."""
    layer, x = problem(be, "tanh")
    b = solve(layer, arr(x), method="broyden", skip_tol=1.5, tol=1e-10, return_trajectory=True)
    f = solve(layer, arr(x), method="fixed_point", tol=1e-10, return_trajectory=True)
    np.testing.assert_array_equal(b.n_skipped, b.n_iter)
    np.testing.assert_array_equal(b.B_inv.n_updates, 0)
    assert_close(host(b.B_inv.dense()), -np.broadcast_to(np.eye(D), (N, D, D)), 0, "B⁻¹ = −I")
    assert len(b.trajectory) == len(f.trajectory)
    for tb, tf in zip(b.trajectory, f.trajectory):
        # h − (−I)(F(h) − h) vs F(h): the same number up to one rounding of the subtraction
        assert_close(host(tb), host(tf), 1e-15, "iterates")
    assert np.all(np.isfinite(host(b.h)))
