"""Anderson acceleration at the limits of float32: the small least-squares solve is guarded."""
import warnings

import numpy as np
import pytest

from deqref.layers import Layer
from deqref.solvers import solve
from helpers import assert_close
from conftest import host


def float64_fixed_point(layer, x):
    """h* = tanh(W h* + U x + b) by plain iteration in float64 NumPy, to rounding level."""
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    h = np.zeros((x.shape[0], W.shape[0]))
    for _ in range(400):                  # contraction ≤ 0.9: 0.9^400 = 5e-19 < eps_64
        h = np.tanh(h @ W.T + x @ U.T + b)
    return h


def test_anderson_float32_never_raises_on_many_layers(be):
    # With the default ridge 1e-8 (below float32's eps, 1.2e-7) a stopped sample's repeated
    # iterate made H = G Gᵀ + ρI exactly singular: LinAlgError on ~9% of these layers.
    for seed in range(120):
        d = 2 + seed % 7
        layer = Layer.random(d, 3, "tanh", seed=seed, L_h=0.9, dtype="float32", backend=be)
        x = np.random.default_rng(seed + 1000).standard_normal((4, 3))
        res = solve(layer, be.asarray(x, "float32"), method="anderson", tol=1e-6, max_iter=200)
        assert res.all_converged, seed
        # r_rel ≤ 1e-6 and contraction 0.9 give ‖h − h*‖ ≤ 1e-6 ‖F‖ / (1 − 0.9) = 1e-5 ‖F‖,
        # plus F's float32 rounding (a few eps_32 ≈ 1e-6, amplified by the same 10): ≤ 2e-5
        assert_close(host(res.h), float64_fixed_point(layer, x), 2e-5, f"seed {seed}")


def test_anderson_float32_below_attainable_accuracy(be):
    # tol 1e-12 cannot be met in float32: the iterates repeat at rounding level while the
    # samples are still iterating, and their H is singular to working precision
    n_fallback = 0
    for seed in range(20):
        d = 2 + seed % 7
        layer = Layer.random(d, 3, "tanh", seed=seed, L_h=0.9, dtype="float32", backend=be)
        x = np.random.default_rng(seed + 1000).standard_normal((4, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = solve(layer, be.asarray(x, "float32"), method="anderson", tol=1e-12,
                        max_iter=60, stall_iter=None)
        n_fallback += int(res.extra["n_fallback"].sum())
        assert not res.converged[np.asarray(res.stop_reason) != "tolerance"].any()
        # still the fixed point to float32 accuracy (bound as in the test above)
        assert_close(host(res.h), float64_fixed_point(layer, x), 2e-5, f"seed {seed}")
    assert n_fallback > 0                  # the guarded path was taken, and did not raise


def failing_solve(kind):
    def solve_(A, b):
        if kind == "raise":                # NumPy, array-api-strict
            raise np.linalg.LinAlgError("Singular matrix")
        return A[..., 0] * float("nan") if b.ndim == 1 else b * float("nan")   # CuPy: NaN
    return solve_


@pytest.mark.parametrize("kind", ["raise", "nan"])
def test_anderson_falls_back_to_the_damped_step(be, arr, monkeypatch, kind):
    # where the small solve fails, α = e_newest: h_{t+1} = β F(h_t) + (1 − β) h_t, which is
    # damped fixed-point iteration (Eq. 13 with λ = β), computed by another solver
    layer = Layer.random(6, 2, seed=1, backend=be)
    x = arr(np.random.default_rng(2).standard_normal((3, 2)))
    kw = dict(tol=1e-10, max_iter=300, return_trajectory=True)
    ref = solve(layer, x, method="fixed_point", lam=0.7, **kw)
    monkeypatch.setattr(be.xp.linalg, "solve", failing_solve(kind))
    res = solve(layer, x, method="anderson", beta=0.7, **kw)
    np.testing.assert_array_equal(res.extra["n_fallback"], res.n_iter)
    np.testing.assert_array_equal(res.n_iter, ref.n_iter)
    for a, b in zip(res.trajectory, ref.trajectory):
        # the same products (α has one 1 and zeros, which add nothing): equal to the bit
        assert_close(host(a), host(b), 0.0, "Anderson fallback = damped iteration")
