"""deqref.theory refuses bad inputs with a one-line error naming the argument."""
import numpy as np
import pytest

from deqref import theory

rng = np.random.default_rng(0)
PHI, J, A, G = rng.standard_normal((5, 3)), 0.2 * np.eye(3), rng.standard_normal((5, 3)), np.ones(3)


def nan_at(a, index=(0, 0)):
    a = a.copy()
    a[index] = np.nan
    return a


CASES = [
    # (call, expected start of the message)
    (lambda: theory.theorem1(A[:, :2], PHI, J), "A must have shape (5, 3)"),
    (lambda: theory.theorem1(A, PHI, J[:, :2]), "J must have shape (3, 3)"),
    (lambda: theory.theorem1(A, PHI[:, :2], J), "Phi must have shape (?, 3)"),
    (lambda: theory.theorem1(A, PHI, J, G[:2]), "g must have shape (3,)"),
    (lambda: theory.theorem1(nan_at(A), PHI, J), "A contains NaN or infinity"),
    (lambda: theory.theorem1(A, nan_at(PHI), J), "Phi contains NaN or infinity"),
    (lambda: theory.theorem1(A, PHI, J, np.array([np.inf, 0, 0])), "g contains NaN or infinity"),
    (lambda: theory.theorem1(A, PHI, np.eye(3)), "J: I - J is singular"),
    (lambda: theory.theorem1(A, np.zeros((5, 3)), J), "Phi is zero"),
    (lambda: theory.theorem1(np.zeros((0, 3)), np.zeros((0, 3)), J), "Phi must not be empty"),
    (lambda: theory.remark1(np.eye(2), PHI, J), "D must have shape (3, 3)"),
    (lambda: theory.remark1(nan_at(np.eye(3)), PHI, J), "D contains NaN or infinity"),
    (lambda: theory.exact_matrix(PHI, nan_at(J)), "J contains NaN or infinity"),
    (lambda: theory.bound19(A, PHI, J, L_h=-0.1), "L_h must be a finite number >= 0"),
    (lambda: theory.bound19(A, PHI, J, L_h=True), "L_h must be a finite number >= 0"),
    (lambda: theory.bound19(A, PHI, J, L_h=float("nan")), "L_h must be a finite number >= 0"),
    (lambda: theory.bound22(A, PHI, J, G, phantom=np.ones(4)), "phantom must have shape (5,)"),
    (lambda: theory.bound22(A, PHI, J, G, G=-1.0), "G must be a finite number >= 0"),
    (lambda: theory.theorem2(J, True), "lam must be a finite number"),
    (lambda: theory.theorem2(J, float("inf")), "lam must be a finite number"),
    (lambda: theory.theorem2(J, "0.5"), "lam must be a finite number"),
    (lambda: theory.theorem2(J, 0.5, k_max=True), "k_max must be an integer >= 3"),
    # I − J singular: were k_max accepted, the call would stop at J at once instead of running
    (lambda: theory.theorem2(np.eye(3), 0.5, k_max=10 ** 9), "k_max must be an integer >= 3 and <= 100000"),
    (lambda: theory.theorem2(J, 0.5, rate_rtol=-1), "rate_rtol must be a finite number >= 0"),
    (lambda: theory.theorem2(np.ones(3), 0.5), "J must have shape (?, ?)"),
    (lambda: theory.spectral_radius(np.ones((2, 3))), "M must have shape (2, 2)"),
    (lambda: theory.epsilon(np.ones(3), np.ones(4)), "exact must have as many entries as phantom"),
    (lambda: theory.epsilon(np.ones(3), np.array([1, np.nan, 1])), "exact contains NaN or infinity"),
    (lambda: theory.cosine(np.zeros(3), np.ones(3)), "a is zero: the cosine is undefined"),
    (lambda: theory.cosine(np.ones(3), np.ones(2)), "b must have as many entries as a"),
    (lambda: theory.condition20(np.ones((2, 3)), np.ones((2, 4)), 0.1), "exact must have shape (2, 3)"),
    (lambda: theory.condition20(np.ones(3), np.ones(3), -0.1), "eps must be a finite number >= 0"),
    (lambda: theory.theorem3(np.ones(3), np.ones(4), eps=0, ell=1, R_gap=1, G=1, M2=1),
     "grad_sq must have shape (?, 3)"),
    (lambda: theory.theorem3(np.array([1.0, 0.0]), np.ones(2), eps=0, ell=1, R_gap=1, G=1, M2=1),
     "eta must hold positive step sizes"),
    (lambda: theory.theorem3(np.ones(2), -np.ones(2), eps=0, ell=1, R_gap=1, G=1, M2=1),
     "grad_sq must hold squared norms"),
    (lambda: theory.theorem3(np.ones(2), np.ones(2), eps=0, ell=True, R_gap=1, G=1, M2=1),
     "ell must be a finite number >= 0"),
    (lambda: theory.theorem3(np.ones(2), np.ones(2), eps=0, ell=1, R_gap=1, G=1, M2=1,
                             errors=np.ones(3)), "errors must have shape (?, 2)"),
]


@pytest.mark.parametrize("call, message", CASES, ids=[f"{i:02d}-{m.split()[0]}" for i, (_, m) in enumerate(CASES)])
def test_bad_input_raises_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("bad", [np.array([["a", "b"]]), np.ones((1, 2), dtype=complex), None])
def test_non_real_arrays_raise_type_error_naming_the_argument(bad):
    with pytest.raises(TypeError, match=r"^J must be a real array"):
        theory.theorem2(bad, 0.5)


def test_backend_arrays_are_accepted(be):
    """Inputs on the backend under test (array_api_strict under DEQREF_BACKEND=strict) give the
    same report as NumPy arrays."""
    on_be = theory.theorem1(be.asarray(A), be.asarray(PHI), be.asarray(J), be.asarray(G))
    on_np = theory.theorem1(A, PHI, J, G)
    assert on_be == on_np


# ------------------------------------------------------------------- float64 range: no inf, no NaN

def test_overflowing_sides_raise_floating_point_error_naming_the_checker():
    big = np.full((5, 3), 1e300)
    with pytest.raises(FloatingPointError, match=r"^theorem1: A\^T E is not finite"):
        theory.theorem1(big, big, J, G)
    with pytest.raises(FloatingPointError, match=r"^remark1: .* D, Phi, J are too large"):
        theory.remark1(np.full((3, 3), 1e300), big, J)                    # A = Φ D overflows
    with pytest.raises(FloatingPointError, match=r"^epsilon: "):
        theory.epsilon(np.full(3, 1.7e308), np.zeros(3))                  # |v| = 2.9e308 > max
    with pytest.raises(FloatingPointError, match=r"^theorem3: lhs is not finite"):
        theory.theorem3(np.full(3, 1e300), np.full(3, 1e300), eps=0, ell=1, R_gap=1, G=1, M2=1)


def test_norms_and_cosines_do_not_overflow_for_finite_values():
    """sqrt(v·v) overflows above ~1e154 and underflows below ~1e-162; the exact answers here are
    √3·s and 2/√6 (a relative error of a few ulps is the rounding of one norm)."""
    for s in (1e300, 1e-320, 1.0):
        assert abs(theory.epsilon(np.full(3, s), np.zeros(3)) / (np.sqrt(3) * s) - 1) < 1e-14
        assert abs(theory.cosine(np.full(3, s), np.array([s, 0, s])) - 2 / np.sqrt(6)) < 1e-15
    a, b = np.random.default_rng(5).standard_normal((2, 50))
    # in the ordinary range the values are NumPy's own, bit for bit (recorded training histories)
    assert theory.epsilon(a, b) == float(np.linalg.norm(a - b))
    assert theory.cosine(a, b) == float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_theorem2_reports_no_nan():
    """A rate that cannot be fitted is None (J = 0: the sums are exact from k = 1); a sum that
    overflows (ρ(B) = 2.5, k = 1000) gives inf errors past the overflow, a finite rounding floor,
    the rate 2.5 fitted to the finite errors, and 'does not converge'."""
    rep = theory.theorem2(np.zeros((3, 3)), 1.0)
    assert rep["fitted_rate"] is None and rep["converges"] and rep["holds"], rep["verdict"]
    Jx = np.random.default_rng(6).standard_normal((3, 3))
    Jx *= 2.5 / np.abs(np.linalg.eigvals(Jx)).max()
    rep = theory.theorem2(Jx, 1.0, k_max=1000)
    assert np.isinf(rep["errors"][-1]) and not np.isnan(rep["errors"]).any()
    assert np.isfinite(rep["floor"]) and abs(rep["fitted_rate"] - 2.5) < 0.05 * 2.5
    assert not rep["converges"] and not rep["holds"], rep["verdict"]
