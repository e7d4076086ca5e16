"""Head and losses against finite differences."""
import numpy as np

from deqref.heads import LinearHead, cross_entropy, mse, softmax
from helpers import FD_RTOL, assert_close, fd_grad
from conftest import host


def test_linear_head_gradients(be, arr):
    head = LinearHead.random(5, 3, seed=0, backend=be)
    rng = np.random.default_rng(1)
    h, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    V, c = host(head.V), host(head.c)
    dh, grads = head.backward(arr(h), arr(dy))
    # L = Σ dy ⊙ G(h) is linear, so its gradients are what backward returns
    L = lambda hh, VV, cc: np.sum(dy * (hh.reshape(4, 5) @ VV.reshape(3, 5).T + cc))
    assert_close(host(dh), fd_grad(lambda z: L(z, V, c), h), FD_RTOL, "dL/dh")
    assert_close(host(grads["V"]), fd_grad(lambda z: L(h, z, c), V), FD_RTOL, "dL/dV")
    assert_close(host(grads["c"]), fd_grad(lambda z: L(h, V, z), c), FD_RTOL, "dL/dc")
    assert_close(host(head(arr(h))), h @ V.T + c, 1e-14, "G(h)")


def test_mse_gradient(be, arr):
    rng = np.random.default_rng(2)
    y_hat, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    value, grad = mse(arr(y_hat), arr(y))
    assert abs(value - np.mean((y_hat - y) ** 2)) < 1e-15
    assert_close(host(grad), fd_grad(lambda z: np.mean((z - y) ** 2), y_hat), FD_RTOL, "mse")


def test_cross_entropy_gradient(be, arr):
    rng = np.random.default_rng(3)
    z, labels = 3 * rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])

    def ce(zz):
        zz = zz - zz.max(axis=1, keepdims=True)
        logp = zz - np.log(np.exp(zz).sum(axis=1, keepdims=True))
        return -np.mean(logp[np.arange(5), labels])
    value, grad = cross_entropy(arr(z), be.from_host(labels))
    assert abs(value - ce(z)) < 1e-14
    assert_close(host(grad), fd_grad(ce, z), FD_RTOL, "cross-entropy")
    p = host(softmax(arr(z)))
    assert_close(p.sum(axis=1), np.ones(5), 1e-15, "softmax rows")
