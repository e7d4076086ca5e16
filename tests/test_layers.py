"""Layer Jacobians (paper's layout) and VJPs/JVPs against central finite differences."""
import numpy as np
import pytest

from deqref.backend import to_numpy
from deqref.layers import ACTIVATIONS, Layer, spectral_normalize
from helpers import FD_RTOL, assert_close, fd_jacobian
from conftest import host

N, D, DX = 3, 5, 4


def setup(be, activation, seed=0):
    layer = Layer.random(D, DX, activation, seed=seed, L_h=0.9, backend=be)
    rng = np.random.default_rng(seed + 100)
    h, x, v = rng.standard_normal((N, D)), rng.standard_normal((N, DX)), rng.standard_normal((N, D))
    return layer, h, x, v


def F_np(layer, h, x):
    """F for one sample in NumPy, written from the definition (shares no code with Layer)."""
    W, U, b = (to_numpy(a) for a in (layer.W, layer.U, layer.b))
    a = W @ h + U @ x + b
    return {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0), "identity": lambda a: a,
            "softplus": lambda a: np.log1p(np.exp(a))}[layer.activation](a)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_value_matches_definition(be, arr, activation):
    layer, h, x, _ = setup(be, activation)
    out = host(layer(arr(h), arr(x)))
    for i in range(N):
        assert_close(out[i], F_np(layer, h[i], x[i]), 1e-14, "F")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_value_and_prime_from_one_preactivation(be, arr, activation):
    """bind_with_prime gives F and σ′ bit for bit as F(h, x) and sigma_prime(h, x) (tanh's σ′ is
    taken there as 1 − f² from the F it has just computed)."""
    layer, h, x, _ = setup(be, activation)
    f, s = layer.bind_with_prime(arr(x))(arr(h))
    assert np.array_equal(host(f), host(layer(arr(h), arr(x))))
    assert np.array_equal(host(s), host(layer.sigma_prime(arr(h), arr(x))))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_jacobians_paper_layout_against_fd(be, arr, activation):
    layer, h, x, _ = setup(be, activation)
    assert not np.allclose(to_numpy(layer.W), to_numpy(layer.W).T), "W must be non-symmetric"
    dF_dh, dF_dx = host(layer.dF_dh(arr(h), arr(x))), host(layer.dF_dx(arr(h), arr(x)))
    dF_dth = host(layer.dF_dtheta(arr(h), arr(x)))
    theta = host(layer.theta)
    for i in range(N):
        J_h = fd_jacobian(lambda hh: F_np(layer, hh, x[i]), h[i])        # standard layout
        J_x = fd_jacobian(lambda xx: F_np(layer, h[i], xx), x[i])

        def F_theta(t):
            lay = layer.with_theta(arr(t))
            return F_np(lay, h[i], x[i])
        J_th = fd_jacobian(F_theta, theta)
        # the paper's layout is the transpose of the standard one
        assert_close(dF_dh[i], J_h.T, FD_RTOL, "dF/dh")
        assert_close(dF_dx[i], J_x.T, FD_RTOL, "dF/dx")
        assert_close(dF_dth[i], J_th.T, FD_RTOL, "dF/dtheta")
    assert_close(host(layer.jacobian_h(arr(h), arr(x))), np.transpose(dF_dh, (0, 2, 1)), 0, "J_h")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_vector_forms_equal_matrix_forms(be, arr, activation):
    layer, h, x, v = setup(be, activation)
    H, X, V = arr(h), arr(x), arr(v)
    dF_dh, dF_dx, dF_dth = (host(m) for m in (layer.dF_dh(H, X), layer.dF_dx(H, X),
                                              layer.dF_dtheta(H, X)))
    # products of exact matrices: only rounding differs, O(d · eps) ≈ 1e-15; 1e-13 leaves margin
    tol = 1e-13
    assert_close(host(layer.vjp_h(H, X, V)), np.einsum("nji,ni->nj", dF_dh, v), tol, "vjp_h")
    assert_close(host(layer.vjp_x(H, X, V)), np.einsum("nqi,ni->nq", dF_dx, v), tol, "vjp_x")
    g = layer.vjp_theta(H, X, V)
    assert_close(host(layer.flatten(g)), np.einsum("nti,ni->t", dF_dth, v), tol, "vjp_theta")
    J_h = np.transpose(dF_dh, (0, 2, 1))
    assert_close(host(layer.jvp_h(H, X, V)), np.einsum("nij,nj->ni", J_h, v), tol, "jvp_h")


def test_theta_flatten_roundtrip_and_order(be, arr):
    layer, *_ = setup(be, "tanh")
    theta = host(layer.theta)
    W, U, b = (host(a) for a in (layer.W, layer.U, layer.b))
    assert theta.shape == (D * D + D * DX + D,) == (layer.d_theta,)
    np.testing.assert_array_equal(theta, np.concatenate([W.ravel(), U.ravel(), b]))
    p = layer.unflatten(layer.theta)
    for k, ref in (("W", W), ("U", U), ("b", b)):
        np.testing.assert_array_equal(host(p[k]), ref)


def test_spectral_normalization_exact(be):
    layer = Layer.random(16, 3, seed=3, L_h=0.9, backend=be)
    # the 2-norm from an SVD is backward stable: exact to a few eps
    assert abs(np.linalg.norm(host(layer.W), 2) - 0.9) < 1e-14
    W = spectral_normalize(np.arange(9.0).reshape(3, 3), 0.5)
    assert abs(np.linalg.norm(W, 2) - 0.5) < 1e-15


def test_same_seed_same_numbers(be):
    a, b = Layer.random(6, 2, seed=11, backend=be), Layer.random(6, 2, seed=11, backend=be)
    np.testing.assert_array_equal(host(a.theta), host(b.theta))
    c = Layer.random(6, 2, seed=12, backend=be)
    assert not np.array_equal(host(a.theta), host(c.theta))


def test_float32_works(be):
    layer = Layer.random(6, 2, seed=0, dtype="float32", backend=be)
    h = be.asarray(np.ones((2, 6)), "float32")
    x = be.asarray(np.ones((2, 2)), "float32")
    out = layer(h, x)
    assert "float32" in str(out.dtype)
    assert_close(host(out), host(Layer.random(6, 2, seed=0, backend=be)(
        be.asarray(np.ones((2, 6))), be.asarray(np.ones((2, 2))))), 1e-6, "float32 vs float64")
