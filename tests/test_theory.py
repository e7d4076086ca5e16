"""The theorem checkers: hand-made cases and hypothesis property tests over random layers."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deqref import theory
from deqref.gradients import estimate
from deqref.layers import Layer
from deqref.solvers import solve
from conftest import host


def sample_matrices(be, d, d_x, activation, seed, L_h, name, k, lam):
    layer = Layer.random(d, d_x, activation, seed=seed, L_h=L_h, backend=be)
    rng = np.random.default_rng(seed)
    x = be.asarray(rng.standard_normal((1, d_x)))
    g = be.asarray(rng.standard_normal((1, d)))
    res = solve(layer, x, method="broyden", tol=1e-13, max_iter=500, form="dense")
    opts = {"k": k, "lam": lam} if name in ("upg", "npg") else {}
    est = estimate(name, layer, x, res, g, form="matrix", **opts)
    A = host(est.diagnostics["A"])[0]
    Phi, J = host(layer.dF_dtheta(res.h, x))[0], host(layer.dF_dh(res.h, x))[0]
    return A, Phi, J, host(g)[0], host(est.theta)


def test_exact_matrix_satisfies_condition_trivially(be):
    A, Phi, J, g, _ = sample_matrices(be, 5, 2, "tanh", 0, 0.9, "implicit_dense", 1, 1.0)
    rep = theory.theorem1(A, Phi, J, g)
    assert rep.lhs < 1e-13 and rep.condition and rep.descent_all_g
    assert abs(rep.cosine - 1) < 1e-14


def test_theorem1_inner_product_matches_estimator(be):
    """⟨A g, E g⟩ from the checker uses the estimator's own A; compare with its gradient."""
    A, Phi, J, g, theta = sample_matrices(be, 5, 2, "tanh", 1, 0.9, "npg", 5, 0.5)
    rep = theory.theorem1(A, Phi, J, g)
    E = theory.exact_matrix(Phi, J)
    assert abs(rep.inner - theta @ (E @ g)) < 1e-12 * abs(rep.inner)


def test_worst_case_is_attained(be):
    """The worst-case inner product over unit g is attained by the eigenvector (independent
    check: random unit vectors never go below it)."""
    A, Phi, J, g, _ = sample_matrices(be, 4, 2, "tanh", 2, 0.95, "jfb", 1, 1.0)
    rep = theory.theorem1(A, Phi, J)
    E = theory.exact_matrix(Phi, J)
    G = np.random.default_rng(0).standard_normal((4, 20000))
    G /= np.linalg.norm(G, axis=0)
    vals = np.einsum("ij,ij->j", A @ G, E @ G)
    assert vals.min() >= rep.worst_inner - 1e-12
    assert vals.min() - rep.worst_inner < 0.05 * abs(rep.worst_inner) + 1e-3


def test_theorem2_rate_is_spectral_radius_of_B():
    rng = np.random.default_rng(3)
    J = rng.standard_normal((6, 6))
    J *= 0.8 / np.abs(np.linalg.eigvals(J)).max()
    for lam in (0.5, 1.0):
        rep = theory.theorem2(J, lam, k_max=200)
        assert rep["errors"][-1] < 1e-8
        assert abs(rep["fitted_rate"] - rep["rho_B"]) < 0.02 * rep["rho_B"], rep


def test_remark1_for_npg_matches_theorem1_direction(be):
    A, Phi, J, g, _ = sample_matrices(be, 4, 2, "tanh", 4, 0.5, "npg", 10, 1.0)
    D = np.linalg.lstsq(Phi, A, rcond=None)[0]          # A = Φ D
    r = theory.remark1(D, Phi, J)
    # (8) implies (6): when Remark 1's condition holds so does Theorem 1's
    if r["condition"]:
        assert theory.theorem1(A, Phi, J).condition


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(2, 5), seed=st.integers(0, 10_000), L_h=st.floats(0.1, 0.95),
       activation=st.sampled_from(["tanh", "softplus", "identity"]),
       name=st.sampled_from(["upg", "npg", "jfb", "gdeq"]), k=st.integers(1, 12),
       lam=st.floats(0.05, 1.0))
def test_property_condition6_implies_descent_and_bounds_hold(be, d, seed, L_h, activation, name, k, lam):
    A, Phi, J, g, _ = sample_matrices(be, d, 2, activation, seed, L_h, name, k, lam)
    rep = theory.theorem1(A, Phi, J, g)
    if rep.condition:
        assert rep.descent_all_g, rep
        assert rep.inner >= -1e-12 * abs(rep.inner) - 1e-15
    assert theory.bound19(A, Phi, J)["holds"]
    assert theory.bound19(A, Phi, J, L_h=L_h)["holds"]       # ‖J‖ ≤ L_h for |σ'| ≤ 1
    assert theory.bound22(A, Phi, J, g)["holds"]
