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
