"""Independent oracles for the tests: central finite differences in plain NumPy."""
import numpy as np

# Central differences with step ε have truncation error O(ε² f''') and rounding error
# O(eps_64 |f| / ε). With ε = 1e-6 in float64 both are ≲ 1e-10 for the O(1) smooth
# functions tested here, so 1e-7 relative to the largest entry is a tolerance that
# leaves three orders of margin yet fails on any wrong index, sign or transpose.
FD_STEP = 1e-6
FD_RTOL = 1e-7


def fd_jacobian(f, z, step=FD_STEP):
    """Standard-layout Jacobian J[i, j] = ∂f_i/∂z_j of f: R^p -> R^q by central differences."""
    z = np.asarray(z, dtype=np.float64)
    cols = []
    for j in range(z.size):
        e = np.zeros_like(z)
        e.flat[j] = step
        cols.append((np.ravel(f(z + e)) - np.ravel(f(z - e))) / (2 * step))
    return np.stack(cols, axis=1)


def fd_grad(f, z, step=FD_STEP):
    """Gradient of a scalar f at z by central differences (same shape as z)."""
    return fd_jacobian(lambda v: np.atleast_1d(f(v)), z, step)[0].reshape(np.shape(z))


def assert_close(a, b, rtol, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = max(np.abs(b).max(), 1e-300)
    err = np.abs(a - b).max() / scale
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.1e}"
