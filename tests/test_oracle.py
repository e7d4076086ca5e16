"""The dense implicit gradient (Eq. 4) against finite differences of h*(θ) and closed forms."""
import numpy as np
import pytest

from deqref.gradients import implicit_dense
from deqref.layers import Layer
from deqref.solvers import solve
from helpers import assert_close, fd_grad
from conftest import host

D, DX, N = 6, 3, 2


@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
def test_oracle_against_finite_differences(be, arr, activation):
    layer = Layer.random(D, DX, activation, seed=4, L_h=0.9, backend=be)
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((N, DX)), rng.standard_normal((N, D))

    def loss_of(theta, xx):
        """L = Σ c ⊙ h*(θ, x), h* solved to 1e-13 — so ∂L/∂h* = c."""
        lay = layer.with_theta(arr(theta))
        h = solve(lay, arr(xx.reshape(N, DX)), method="broyden", tol=1e-13, max_iter=300).h
        return float(np.sum(c * host(h)))

    h_star = solve(layer, arr(x), method="broyden", tol=1e-13, max_iter=300).h
    for matrix in (False, True):
        g = implicit_dense(layer, arr(x), h_star, arr(c), matrix=matrix)
        theta = host(layer.theta)
        # FD of a solve to 1e-13: solve error / step ≈ 1e-13/1e-6 = 1e-7 absolute on O(1) grads
        assert_close(host(g.theta), fd_grad(lambda t: loss_of(t, x), theta), 1e-6, "dL/dθ")
        assert_close(host(g.x), fd_grad(lambda z: loss_of(theta, z), x), 1e-6, "dL/dx")


def test_oracle_linear_closed_form(be, arr):
    layer = Layer.random(D, DX, "identity", seed=7, L_h=0.9, backend=be)
    rng = np.random.default_rng(8)
    x, g = rng.standard_normal((N, DX)), rng.standard_normal((N, D))
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    h = np.linalg.solve(np.eye(D) - W, (x @ U.T + b).T).T         # h* = (I − W)⁻¹(Ux + b)
    y = np.linalg.solve((np.eye(D) - W).T, g.T).T                  # y = (I − W)⁻ᵀ g
    est = implicit_dense(layer, arr(x), arr(h), arr(g))
    # cond(I − W) ≤ 19: errors are a few eps · 19
    assert_close(host(est.W), y.T @ h, 1e-13, "grad W = Σ y h*ᵀ")
    assert_close(host(est.U), y.T @ x, 1e-13, "grad U = Σ y xᵀ")
    assert_close(host(est.b), y.sum(axis=0), 1e-13, "grad b = Σ y")
    assert_close(host(est.x), y @ U, 1e-13, "grad x = Uᵀ y")
