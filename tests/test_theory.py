"""The theorem checkers: hand-made cases and hypothesis property tests over random layers."""
import numpy as np
import scipy.linalg
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
    """⟨A g, E g⟩ from the checker uses the estimator's own A; compare with its gradient and an
    exact gradient Φ (I − J)⁻¹ g solved here with scipy.linalg (not theory.exact_matrix)."""
    A, Phi, J, g, theta = sample_matrices(be, 5, 2, "tanh", 1, 0.9, "npg", 5, 0.5)
    rep = theory.theorem1(A, Phi, J, g)
    exact = Phi @ scipy.linalg.solve(np.eye(5) - J, g)                    # Eq. (4), (d_θ,)
    # two float64 routes to one inner product of O(1) terms: 1e-12 relative is ~5000 eps
    assert abs(rep.inner - theta @ exact) < 1e-12 * abs(rep.inner)
    cos = theta @ exact / (np.linalg.norm(theta) * np.linalg.norm(exact))
    assert abs(rep.cosine - cos) < 1e-12


def test_worst_case_is_attained(be):
    """The worst-case inner product over unit g is attained by the eigenvector (independent
    check: with E solved here by scipy.linalg, random unit vectors never go below it and come
    within 5 %)."""
    A, Phi, J, g, _ = sample_matrices(be, 4, 2, "tanh", 2, 0.95, "jfb", 1, 1.0)
    rep = theory.theorem1(A, Phi, J)
    E = scipy.linalg.solve((np.eye(4) - J).T, Phi.T).T                     # (d_θ, d)
    G = np.random.default_rng(0).standard_normal((4, 20000))
    G /= np.linalg.norm(G, axis=0)
    vals = np.einsum("ij,ij->j", A @ G, E @ G)
    assert vals.min() >= rep.worst_inner - 1e-12
    assert vals.min() - rep.worst_inner < 0.05 * abs(rep.worst_inner) + 1e-3


def test_theorem2_rate_is_spectral_radius_of_B():
    """The errors equal the closed form ‖B^k (I − J)⁻¹‖ (S_k − (I − J)⁻¹ = −B^k (I − J)⁻¹),
    computed here with numpy.linalg.matrix_power and scipy.linalg.inv, and the fitted rate is
    within 2 % of ρ(B) from scipy.linalg.eigvals."""
    rng = np.random.default_rng(3)
    J = rng.standard_normal((6, 6))
    J *= 0.8 / np.abs(np.linalg.eigvals(J)).max()
    inv = scipy.linalg.inv(np.eye(6) - J)
    for lam in (0.5, 1.0):
        B = lam * J + (1 - lam) * np.eye(6)
        rho = np.abs(scipy.linalg.eigvals(B)).max()
        rep = theory.theorem2(J, lam, k_max=200)
        closed = [np.linalg.norm(np.linalg.matrix_power(B, k) @ inv, 2) for k in range(1, 201)]
        # both sides carry rounding ~ d·eps·Σ‖λB^j‖‖(I − J)⁻¹‖ ≲ 1e-13 absolute here
        np.testing.assert_allclose(rep["errors"], closed, rtol=1e-9, atol=1e-13)
        assert abs(rep["rho_B"] - rho) < 1e-12
        assert abs(rep["fitted_rate"] - rho) < 0.02 * rho, rep
        assert rep["holds"] and rep["rate_matches"]


def test_remark1_for_npg_matches_theorem1_direction(be):
    """For NPG, D = λ Σ_{j<k} B^j and D (I − J) − I = −B^k: both sides of (8) against ‖B^k‖ and
    1/κ² from scipy.linalg.svdvals; (6) against its left side for A = Φ D computed here."""
    A, Phi, J, g, _ = sample_matrices(be, 4, 2, "tanh", 4, 0.5, "npg", 10, 1.0)
    D = np.linalg.lstsq(Phi, A, rcond=None)[0]          # A = Φ D
    r = theory.remark1(D, Phi, J)
    sv = scipy.linalg.svdvals(Phi)
    Bk = np.linalg.matrix_power(J, 10)                   # λ = 1: B = J
    # lstsq recovers D to ~κ(Φ)·eps relative; 1e-8 relative leaves a wide margin
    assert abs(r["lhs"] - np.linalg.norm(Bk, 2)) < 1e-8 * np.linalg.norm(Bk, 2)
    assert abs(r["rhs"] - (sv.min() / sv.max()) ** 2) < 1e-12 * r["rhs"]
    lhs6 = np.linalg.norm(Phi @ D @ (np.eye(4) - J) - Phi, 2)
    assert abs(r["lhs6"] - lhs6) < 1e-10 * lhs6
    assert r["condition"] and r["condition6"] and r["descent_all_g"] and r["holds"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(2, 5), seed=st.integers(0, 10_000), L_h=st.floats(0.1, 0.95),
       activation=st.sampled_from(["tanh", "softplus", "identity"]),
       name=st.sampled_from(["upg", "npg", "jfb", "gdeq"]), k=st.integers(1, 12),
       lam=st.floats(0.05, 1.0))
def test_property_condition6_implies_descent_and_bounds_hold(be, d, seed, L_h, activation, name, k, lam):
    A, Phi, J, g, _ = sample_matrices(be, d, 2, activation, seed, L_h, name, k, lam)
    rep = theory.theorem1(A, Phi, J, g)
    if rep.condition:                                          # Theorem 1: (6) ⟹ (7)
        assert rep.holds, rep.verdict
        assert rep.inner >= -1e-12 * abs(rep.inner) - 1e-15
    b19 = theory.bound19(A, Phi, J, L_h=L_h)
    assert b19["assumption"], b19                              # ‖J‖ ≤ L_h for |σ'| ≤ 1, ‖W‖ = L_h
    assert b19["holds"], b19["verdict"]
    assert theory.bound19(A, Phi, J)["holds"]
    b22 = theory.bound22(A, Phi, J, g)
    assert b22["assumption"] and b22["holds"], b22["verdict"]
