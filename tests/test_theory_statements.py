"""Each checker of deqref.theory answers "does not hold" on a case that violates its statement
and "holds" on one that satisfies it; both sides are compared with values computed here.

The violating cases are built by hand so that the answer is known in closed form:

- J = −0.9 I makes I − J = 1.9 I, so for any A, ‖A(I − J) − Φ‖ = 1.9 ‖A − E‖ exactly: (19)
  holds with equality at L_h = ‖J‖ = 0.9 and fails for any smaller L_h.
- A = Φ (I − 2vvᵀ)(I − J)⁻¹ reflects one direction: for g = (I − J) v, A g = −Φ v = −E g, an
  ascent direction (⟨Ag, Eg⟩ = −‖Φ v‖² < 0), and (6), (8) fail.
"""
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from deqref import theory
from deqref.backend import get_backend

D, D_THETA = 3, 5


def jacobians(seed=0, J=None):
    rng = np.random.default_rng(seed)
    Phi = rng.standard_normal((D_THETA, D))
    J = -0.9 * np.eye(D) if J is None else J
    E = scipy.linalg.solve((np.eye(D) - J).T, Phi.T).T                    # Φ (I − J)⁻¹, (d_θ, d)
    return rng, Phi, J, E


def reflected(Phi, J, v):
    """A = Φ (I − 2vvᵀ)(I − J)⁻¹ (and its D): reverses the phantom gradient along v."""
    Dm = (np.eye(D) - 2 * np.outer(v, v)) @ scipy.linalg.inv(np.eye(D) - J)
    return Phi @ Dm, Dm


# ---------------------------------------------------------------------------------------- (19)

def test_bound19_fails_when_L_h_is_below_norm_J_and_holds_at_norm_J():
    rng, Phi, J, E = jacobians()
    A = E + 0.1 * np.outer(rng.standard_normal(D_THETA), rng.standard_normal(D))
    gap = np.linalg.norm(A - E, 2)
    ok = theory.bound19(A, Phi, J, L_h=0.9)                                 # ‖J‖ = 0.9: tight
    assert ok["assumption"] and ok["holds"], ok["verdict"]
    assert abs(ok["lhs"] - 1.9 * gap) < 1e-13 and abs(ok["rhs"] - 1.9 * gap) < 1e-13
    for L_h in (0.5, 0.9 * (1 - 1e-6)):                                     # assumption violated
        bad = theory.bound19(A, Phi, J, L_h=L_h)
        assert not bad["assumption"] and not bad["holds"], bad["verdict"]
        assert abs(bad["rhs"] - (1 + L_h) * gap) < 1e-13
        assert bad["verdict"].startswith("(19) does not hold") and "|J| <= L_h" in bad["verdict"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.05, 0.99), L_h=st.floats(0.0, 0.99))
def test_property_bound19_assumption_implies_conclusion(seed, scale, L_h):
    """On arbitrary A and contractive J: whenever ‖J‖ ≤ L_h the inequality holds; whenever it
    fails, the checker blames the assumption."""
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((D, D))
    J *= scale / np.linalg.norm(J, 2)
    Phi, A = rng.standard_normal((D_THETA, D)), rng.standard_normal((D_THETA, D))
    rep = theory.bound19(A, Phi, J, L_h=L_h)
    assert rep["assumption"] == (np.linalg.norm(J, 2) <= L_h) or abs(np.linalg.norm(J, 2) - L_h) < 1e-12
    if rep["assumption"]:
        assert rep["holds"], rep["verdict"]
    if not rep["holds"]:
        assert not rep["assumption"]


# ---------------------------------------------------------------------------------------- (22)

def test_bound22_fails_when_g_exceeds_G_or_phantom_is_not_Ag():
    rng, Phi, J, E = jacobians()
    A = E + 0.1 * np.outer(rng.standard_normal(D_THETA), rng.standard_normal(D))
    _, s, Vt = np.linalg.svd(A - E)
    g = 2.0 * Vt[0]                                                        # top right singular vector
    ok = theory.bound22(A, Phi, J, g)
    assert ok["assumption"] and ok["holds"], ok["verdict"]
    assert abs(ok["lhs"] - 2 * s[0]) < 1e-13 and abs(ok["rhs"] - 2 * s[0]) < 1e-13   # equality
    bad = theory.bound22(A, Phi, J, g, G=1.0)                              # ‖g‖ = 2 > G
    assert not bad["assumptions"]["|g| <= G"] and not bad["holds"], bad["verdict"]
    assert abs(bad["rhs"] - s[0]) < 1e-13
    wrong = A @ g + 2 * (A - E) @ g                                        # not Eq. (5)'s A g
    bad = theory.bound22(A, Phi, J, g, phantom=wrong)
    assert not bad["assumptions"]["phantom = A g (5)"] and not bad["holds"], bad["verdict"]
    assert abs(bad["lhs"] - 3 * 2 * s[0]) < 1e-12                          # ‖3 (A − E) g‖


# ------------------------------------------------------------------------- Theorem 1, Remark 1

def test_theorem1_and_remark1_do_not_hold_for_a_reflected_direction():
    rng, Phi, J, E = jacobians(1, J=0.3 * np.eye(D) + 0.1 * np.ones((D, D)))
    v = np.array([1.0, 0.0, 0.0])
    A, Dm = reflected(Phi, J, v)
    g = (np.eye(D) - J) @ v                                                # A g = −Φ v = −E g
    rep = theory.theorem1(A, Phi, J, g)
    assert not rep.condition and not rep.holds, rep.verdict
    assert rep.verdict.startswith("(7) does not hold")
    assert abs(rep.inner + np.linalg.norm(Phi @ v) ** 2) < 1e-12            # ⟨Ag, Eg⟩ = −‖Φv‖²
    sym = 0.5 * (A.T @ E + E.T @ A)
    assert abs(rep.worst_inner - scipy.linalg.eigh(sym, eigvals_only=True)[0]) < 1e-12
    assert rep.worst_inner <= rep.inner / (g @ g) < 0
    r1 = theory.remark1(Dm, Phi, J)
    assert abs(r1["lhs"] - 2.0) < 1e-12                                     # ‖D(I − J) − I‖ = ‖2vvᵀ‖
    assert not r1["assumption"] and not r1["condition6"] and not r1["holds"], r1["verdict"]
    assert not r1["descent_all_g"]


def test_theorem1_and_remark1_hold_for_npg_with_large_k():
    """NPG, k = 60, λ = 1, ‖J‖ ≤ 0.5: D(I − J) − I = −J⁶⁰, far below 1/κ²."""
    from test_theory import sample_matrices
    A, Phi, J, g, _ = sample_matrices(get_backend(), 4, 2, "tanh", 5, 0.5, "npg", 60, 1.0)
    rep = theory.theorem1(A, Phi, J, g)
    sv = scipy.linalg.svdvals(Phi)
    assert abs(rep.rhs - sv.min() ** 2 / sv.max()) < 1e-12 * rep.rhs
    assert rep.condition and rep.holds and rep.inner > 0, rep.verdict
    Dm = np.linalg.matrix_power(J, 0)
    for j in range(1, 60):
        Dm = Dm + np.linalg.matrix_power(J, j)                             # λ Σ_{j<k} B^j, B = J
    r1 = theory.remark1(Dm, Phi, J)
    assert r1["assumption"] and r1["holds"] and r1["descent_all_g"], r1["verdict"]


# ---------------------------------------------------------------------------------- Theorem 2

def test_theorem2_does_not_hold_when_errors_grow():
    """ρ(J) = 1.3 (not contractive): the errors grow like 1.3^k, computed here in closed form."""
    rng = np.random.default_rng(3)
    J = rng.standard_normal((6, 6))
    J *= 1.3 / np.abs(np.linalg.eigvals(J)).max()
    rep = theory.theorem2(J, 1.0, k_max=60)
    inv = scipy.linalg.inv(np.eye(6) - J)
    closed = [np.linalg.norm(np.linalg.matrix_power(J, k) @ inv, 2) for k in (1, 60)]
    np.testing.assert_allclose(rep["errors"][[0, -1]], closed, rtol=1e-9)
    assert not rep["contractive"] and not rep["assumption"]
    assert not rep["converges"] and not rep["holds"], rep["verdict"]
    assert rep["verdict"].startswith("Theorem 2 does not hold: the errors do not decay")


def test_theorem2_does_not_hold_for_lam_outside_0_1():
    """J = −0.9 I is contractive, but λ = 2 gives B = −2.8 I: |error| = 2.8^k / 1.9."""
    rep = theory.theorem2(-0.9 * np.eye(3), 2.0, k_max=40)
    np.testing.assert_allclose(rep["errors"], 2.8 ** np.arange(1, 41) / 1.9, rtol=1e-12)
    assert rep["contractive"] and not rep["lam_in_range"] and not rep["holds"], rep["verdict"]


def test_theorem2_holds_for_contractive_J():
    rng = np.random.default_rng(4)
    J = rng.standard_normal((5, 5))
    J *= 0.7 / np.linalg.norm(J, 2)
    for lam in (0.3, 1.0):
        rep = theory.theorem2(J, lam, k_max=120)
        rho = np.abs(scipy.linalg.eigvals(lam * J + (1 - lam) * np.eye(5))).max()
        assert rep["assumption"] and rep["holds"], rep["verdict"]
        assert abs(rep["fitted_rate"] - rho) <= 0.05 * rho


def test_theorem2_rate_mismatch_is_reported():
    """A rate tolerance of 0 cannot be met by a fitted rate: the verdict says which part failed."""
    rng = np.random.default_rng(4)
    J = rng.standard_normal((5, 5))
    J *= 0.7 / np.linalg.norm(J, 2)
    rep = theory.theorem2(J, 1.0, k_max=120, rate_rtol=0.0)
    assert rep["converges"] and rep["rate_matches"] is False and not rep["holds"]
    assert "the rate is not rho(B)" in rep["verdict"]


# ------------------------------------------------------------------------------ Theorem 3 (20)

def test_condition20_finds_the_worst_step():
    exact = np.zeros((3, 2))
    phantom = np.array([[0.1, 0.0], [0.3, 0.4], [0.0, -0.2]])               # errors 0.1, 0.5, 0.2
    rep = theory.condition20(phantom, exact, eps=0.4)
    assert not rep["holds"] and rep["worst_step"] == 1 and rep["lhs"] == 0.5, rep["verdict"]
    assert rep["verdict"] == "(20) does not hold: max_step |g_hat - g| = 0.5 > eps = 0.4 (worst step 1)"
    np.testing.assert_allclose(rep["errors"], [0.1, 0.5, 0.2], rtol=1e-15)
    assert theory.condition20(phantom, exact, eps=0.5)["holds"]


def test_condition20_with_epsilon_from_bound22():
    """Remark 3: ε = ‖A − E‖ G bounds the error of every g with ‖g‖ ≤ G; half of it does not
    bound the error along the top right singular vector of A − E."""
    rng, Phi, J, E = jacobians(2)
    A = E + 0.1 * rng.standard_normal((D_THETA, D))
    gs = rng.standard_normal((20, D))
    gs /= np.linalg.norm(gs, axis=1, keepdims=True)
    gs[0] = np.linalg.svd(A - E)[2][0]                                     # attains ‖A − E‖
    eps = theory.bound22(A, Phi, J, gs[0], G=1.0)["rhs"]
    exact = gs @ E.T                                                       # (T, d_θ) exact gradients
    assert theory.condition20(gs @ A.T, exact, eps)["holds"]
    bad = theory.condition20(gs @ A.T, exact, eps / 2)
    assert not bad["holds"] and bad["worst_step"] == 0


# ------------------------------------------------------------------------------ Theorem 3 (21)

def gradient_descent(T, bias, seed=0, eta_1=1.0):
    """GD on R(θ) = ½ θᵀHθ (ℓ = 1, inf R = 0) with ĝ = ∇R + bias(∇R), η_τ = η_1/√τ."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    H = Q @ np.diag([1.0, 0.5, 0.2, 0.05]) @ Q.T
    theta = np.ones(4)
    R_gap = 0.5 * theta @ H @ theta
    eta = eta_1 / np.sqrt(np.arange(1, T + 1))
    grad_sq, errors, phantom_sq = [], [], []
    for t in range(T):
        grad = H @ theta
        g_hat = grad + bias(grad)
        grad_sq.append(grad @ grad)
        errors.append(np.linalg.norm(g_hat - grad))
        phantom_sq.append(g_hat @ g_hat)
        theta = theta - eta[t] * g_hat
    return eta, np.array(grad_sq), np.array(errors), np.array(phantom_sq), R_gap


def bound21(eta, grad_sq, eps, ell, R_gap, G, M2):
    """Both sides of (21) with its constants, by plain loops (the oracle)."""
    lhs, rhs, s, s2, w = [], [], 0.0, 0.0, 0.0
    for e, q in zip(eta, grad_sq):
        s, s2, w = s + e, s2 + e * e, w + e * q
        lhs.append(w / s)
        rhs.append((R_gap + 0.5 * ell * M2 * s2) / s + G * eps)
    return np.array(lhs), np.array(rhs)


EPS20 = 0.01
U = np.full(4, 0.5)                                                        # a unit vector


def test_theorem3_holds_for_an_eps_approximate_gradient():
    eta, grad_sq, errors, phantom_sq, R_gap = gradient_descent(2000, lambda gr: EPS20 * U)
    G, M2 = np.sqrt(grad_sq.max()), phantom_sq.max()
    rep = theory.theorem3(eta, grad_sq, eps=EPS20, ell=1.0, R_gap=R_gap, G=G, M2=M2,
                          errors=errors, phantom_sq=phantom_sq)
    lhs, rhs = bound21(eta, grad_sq, EPS20, 1.0, R_gap, G, M2)
    # cumulative sums of 2000 positive terms in two orders: 1e-12 relative
    np.testing.assert_allclose(rep["lhs"], lhs, rtol=1e-12)
    np.testing.assert_allclose(rep["rhs"], rhs, rtol=1e-12)
    assert rep["assumption"] and rep["holds"], rep["verdict"]


def test_theorem3_does_not_hold_when_the_bias_exceeds_eps():
    """A bias of 50 ε with ε claimed: GD settles where ‖∇R‖ = 50 ε, so the left side tends to
    2500 ε² = 0.25 while the right side tends to G ε ≈ 0.01 (G, M2 honest, from the run)."""
    eta, grad_sq, errors, phantom_sq, R_gap = gradient_descent(2000, lambda gr: 50 * EPS20 * U)
    G, M2 = np.sqrt(grad_sq.max()), phantom_sq.max()
    rep = theory.theorem3(eta, grad_sq, eps=EPS20, ell=1.0, R_gap=R_gap, G=G, M2=M2,
                          errors=errors, phantom_sq=phantom_sq)
    lhs, rhs = bound21(eta, grad_sq, EPS20, 1.0, R_gap, G, M2)
    assert lhs[-1] > 1.3 * rhs[-1]                                          # the oracle says: violated
    assert not rep["holds"] and rep["lhs"][-1] > rep["rhs"][-1], rep["verdict"]
    assert rep["assumptions"] == {"|grad R| <= G": True, "(20) |g_hat - g| <= eps": False,
                                  "|g_hat|^2 <= M2": True}
    assert lhs[rep["worst_T"] - 1] > rhs[rep["worst_T"] - 1]


def test_theorem3_does_not_hold_for_an_ascent_direction():
    eta, grad_sq, errors, phantom_sq, R_gap = gradient_descent(50, lambda gr: -2 * gr)
    G = np.sqrt(grad_sq[0])                                                # as if ‖∇R‖ never grew
    rep = theory.theorem3(eta, grad_sq, eps=EPS20, ell=1.0, R_gap=R_gap, G=G, M2=(G + EPS20) ** 2,
                          errors=errors)
    assert not rep["holds"] and not rep["assumption"], rep["verdict"]
    assert not any(rep["assumptions"].values())


def test_theorem3_rounding_slack_is_small():
    """A right side 1e-9 below the left side fails: the slack is rounding-sized, not a margin."""
    eta = np.ones(10)
    grad_sq = np.full(10, 1.0)
    rep = theory.theorem3(eta, grad_sq, eps=0.0, ell=0.0, R_gap=1.0 - 1e-9, G=0.0, M2=0.0)
    # lhs_T = 1 for every T, rhs_T = (1 − 1e-9)/T: fails from T = 1
    assert not rep["holds"] and rep["worst_T"] == 1, rep["verdict"]


@pytest.mark.parametrize("runs", [1, 5])
def test_theorem3_takes_the_mean_over_runs(runs):
    eta = np.ones(4)
    grad_sq = np.arange(runs * 4, dtype=float).reshape(runs, 4)
    rep = theory.theorem3(eta, grad_sq, eps=0.0, ell=0.0, R_gap=100.0, G=100.0, M2=0.0)
    expected = np.cumsum(grad_sq.mean(axis=0)) / np.arange(1, 5)
    np.testing.assert_allclose(rep["lhs"], expected, rtol=1e-15)
    assert rep["runs"] == runs
