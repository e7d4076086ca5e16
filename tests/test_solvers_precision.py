"""Broyden's inverse estimate once the iterate sits at rounding level."""
import warnings

import numpy as np
import pytest

from deqref.layers import Layer
from deqref.solvers import solve
from conftest import host


@pytest.mark.parametrize("dtype,tol_ok,tol_low", [("float32", 1e-5, 1e-12),
                                                  ("float64", 1e-13, 1e-18)])
def test_broyden_inverse_does_not_drift_at_rounding_level(be, dtype, tol_ok, tol_low):
    """Running on after the iterate reaches its attainable accuracy adds Broyden updates made
    from pairs (Δh, Δg) at rounding level. Without the rounding test each is noise and B⁻¹,
    which GDEQ reuses, drifts away: relative change 0.57–0.88 (float32) and 0.62–1.56
    (float64) over these seeds. With it, only the few late pairs that still carry information
    are applied: measured ≤ 0.16 (float32), ≤ 0.074 (float64). 0.3 separates the two."""
    for seed in range(5):
        layer = Layer.random(16, 4, "tanh", seed=seed, L_h=0.9, dtype=dtype, backend=be)
        x = be.asarray(np.random.default_rng(seed + 1).standard_normal((8, 4)), dtype)
        ok = solve(layer, x, method="broyden", form="dense", tol=tol_ok, max_iter=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low = solve(layer, x, method="broyden", form="dense", tol=tol_low, max_iter=100,
                        stall_iter=None)
        assert low.n_skipped.sum() > 0
        A, B = host(ok.B_inv.dense()), host(low.B_inv.dense())
        drift = np.linalg.norm(B - A, axis=(1, 2)) / np.linalg.norm(A, axis=(1, 2))
        assert drift.max() < 0.3, (seed, drift.max())
