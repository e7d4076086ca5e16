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


# ---------------------------------------------------------------- each estimator's printed matrix
# Shared by the estimator tests of every cell: given per-sample standard-layout Jacobians
# (J_h, J_θ, J_x) from ``fd_jacobian`` (no deqref derivative code), an estimator is its formula
# with D(i, J_h), the (d, d) matrix it puts in place of (I − ∂F/∂h)⁻¹ (paper's layout: J_hᵀ).
def apply_oracle(jacobians, g, D):
    """Σ_i ∂F/∂θ D_i g_i and the rows ∂F/∂x D_i g_i, i.e. Σ_i J_θ,iᵀ D_i g_i and J_x,iᵀ D_i g_i
    (g host (n, d))   # ((d_θ,), (n, d_x))"""
    theta, gx = 0.0, []
    for i, (Jh, Jt, Jx) in enumerate(jacobians):
        y = D(i, Jh) @ g[i]
        theta, gx = theta + Jt.T @ y, gx + [Jx.T @ y]
    return theta, np.array(gx)


def eq18(k, lam):
    """NPG, Eq. (18) of Geng et al.: λ Σ_{j<k} B^j with B = λ ∂F/∂h + (1 − λ) I (JFB: k = 1,
    λ = 1; the fixed-point adjoint from y_0 = 0: k = K, λ = 1)."""
    def D(i, Jh):
        B = lam * Jh.T + (1 - lam) * np.eye(len(Jh))
        return lam * sum(np.linalg.matrix_power(B, j) for j in range(k))
    return D


def eq4(i, Jh):
    """The exact (I − ∂F/∂h)⁻¹ of Eq. (4), by a dense LU solve (scipy.linalg.solve)."""
    import scipy.linalg
    return scipy.linalg.solve(np.eye(len(Jh)) - Jh.T, np.eye(len(Jh)))
