"""Bad input raises an error that names the argument; no option is silently ignored."""
import numpy as np
import pytest

from deqref.gradients import implicit_dense
from deqref.heads import LinearHead, cross_entropy, mse
from deqref.layers import Layer
from deqref.solvers import solve

LAYER = Layer.random(4, 2, seed=0)
BE = LAYER.backend
X = BE.asarray(np.ones((3, 2)))


def on(a):
    """A host array moved to the backend under test (DEQREF_BACKEND), so only the check fires."""
    return BE.asarray(np.asarray(a, dtype=np.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fixed_point", lam=0.0), "lam must be a finite number in \\(0, 1\\]"),
    (dict(method="fixed_point", lam=1.5), "lam must be a finite number in \\(0, 1\\]"),
    (dict(method="broyden", m=0), "m must be an integer >= 1"),
    (dict(method="anderson", m=0), "m must be an integer >= 1"),
    (dict(method="anderson", beta=2.0), "beta must be a finite number in \\(0, 1\\]"),
    (dict(method="anderson", ridge=0.0), "ridge must be a finite number > 0"),
    (dict(method="broyden", form="full"), "form must be one of"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    (dict(tol=-1.0), "tol must be a finite number >= 0"),
    (dict(norm="1"), "norm must be one of"),
])
def test_bad_solver_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(LAYER, X, **kwargs)


def test_unknown_solver_and_option_names():
    with pytest.raises(ValueError, match="unknown solver 'newton'; valid solvers"):
        solve(LAYER, X, method="newton")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['damping'\].*valid: \["):
        solve(LAYER, X, method="fixed_point", damping=0.5)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 2\), got \(3, 5\)"):
        solve(LAYER, on(np.ones((3, 5))))
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 4\)"):
        solve(LAYER, X, on(np.ones((3, 3))))
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 4\)"):
        solve(LAYER, X, on(np.ones((2, 4))))
    with pytest.raises(ValueError, match=r"W must have shape \(3, 3\)"):
        Layer(np.ones((3, 4)), np.ones((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
        Layer(np.eye(3), np.ones((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match=r"grad_h must have shape \(3, 4\)"):
        implicit_dense(LAYER, X, on(np.zeros((3, 4))), on(np.zeros((3, 5))))


def test_non_finite_inputs():
    bad = np.ones((3, 2))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        solve(LAYER, on(bad))
    with pytest.raises(ValueError, match="W contains NaN or infinity"):
        Layer(np.full((2, 2), np.inf), np.ones((2, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="grad_h contains NaN"):
        implicit_dense(LAYER, X, on(np.zeros((3, 4))), on(np.full((3, 4), np.nan)))
    with pytest.raises(ValueError, match="h0 contains NaN"):
        solve(LAYER, X, on(np.full((3, 4), np.nan)))


def test_bad_layer_construction():
    with pytest.raises(ValueError, match="activation must be one of"):
        Layer.random(3, 2, "gelu", seed=0)
    with pytest.raises(ValueError, match="L_h must be a finite number in "):
        Layer.random(3, 2, seed=0, L_h=-1.0)
    with pytest.raises(ValueError, match="d must be an integer >= 1"):
        Layer.random(0, 2, seed=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Layer.random(3, 2, seed=0, dtype="float16")


def test_bad_head_and_loss_input(arr):
    head = LinearHead.random(4, 3, seed=0)
    with pytest.raises(ValueError, match=r"h must have shape \(\?, 4\)"):
        head(arr(np.ones((2, 5))))
    with pytest.raises(ValueError, match="y must have the shape of y_hat"):
        mse(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cross_entropy(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="labels must be an integer array"):
        cross_entropy(np.ones((2, 3)), np.array([0.0, 1.0]))
