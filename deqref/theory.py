"""The theorems of [1] as numerical checkers: each computes both sides and says whether it holds.

Everything here is per sample, in the paper's layout, on the host in float64 (these are
small dense-matrix checks: SVDs and eigenvalues). Notation, at h*:

    Φ = ∂F/∂θ (d_θ, d),   J = ∂F/∂h (d, d),   g = ∂L/∂h (d,),
    E = Φ (I − J)⁻¹  the exact ∂h*/∂θ (Eq. 2),   E g the exact gradient (Eq. 4),
    A  the estimator's matrix, A g the phantom gradient (Eq. 5);
    σ_max, σ_min, κ = σ_max/σ_min of Φ as a map R^d → R^{d_θ};  ‖·‖ = spectral / Euclidean norm.

Every checker computes the two sides of its statement from independent ingredients (a side
that reads A never reads E, and E comes from its own dense solve), reports the statement's
assumptions separately from its conclusion, and answers ``holds`` True or False with a
one-line ``verdict``. The theorems are true, so "does not hold" means an assumption is
violated (the verdict names it) or the inputs are not what the statement is about.

- Theorem 1: (6) ‖A(I − J) − Φ‖ ≤ σ_min²/σ_max  ⟹  (7) ⟨A g, E g⟩ ≥ 0 for every g.
  ``theorem1`` decides (7) over all g exactly: min_{‖g‖=1} ⟨Ag, Eg⟩ is the smallest
  eigenvalue of the symmetric part of AᵀE.
- Remark 1: for A = Φ D, (8) ‖D(I − J) − I‖ ≤ 1/κ²  ⟹  (6)  (and so (7)).
- Bound (19): if ‖J‖ ≤ L_h, then ‖A(I − J) − Φ‖ ≤ (1 + L_h) ‖A − E‖.
- Bound (22) (Remark 3): ‖A g − E g‖ ≤ ‖A − E‖ ‖g‖ ≤ ‖A − E‖ G when ‖g‖ ≤ G.
- Theorem 2 (i): if J is contractive (‖J‖ < 1) and λ ∈ (0, 1], the partial sums
  S_k = λ Σ_{j<k} B^j, B = λJ + (1 − λ)I (Eq. 15), converge to (I − J)⁻¹; the error
  S_k − (I − J)⁻¹ = −B^k (I − J)⁻¹ decays geometrically at the rate ρ(B).
- Theorem 3: (20) ‖∂L/∂θ^ − ∂L/∂θ‖ ≤ ε at every step, and (21) the ε-neighbourhood bound
  on E[Σ η_τ ‖∇R(θ_τ)‖² / Σ η_τ] with explicit constants (see ``theorem3``).

Inputs are validated: arrays of the wrong shape, empty or holding NaN/inf raise a one-line
``ValueError`` naming the argument (``TypeError`` for something that is not a real array);
a singular I − J (E does not exist) is a ``ValueError`` naming J.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .checks import check_finite, check_int, check_real, check_shape
from .numerics import norm_no_overflow, scaled_to_unit

EPS = float(np.finfo(np.float64).eps)
# Rounding slack of a float64 computation of d-term sums whose terms have size `scale`:
# each entry is off by at most ~d·eps·scale; 64 covers the few such steps of one check
# (a product, a solve, a norm) and stays far below any violation worth reporting.
SLACK = 64


def _slack(d: int, scale: float) -> float:
    return SLACK * d * EPS * scale


# ---------------------------------------------------------------------------------------------
# inputs


def _array(name: str, a, shape: tuple | None) -> np.ndarray:
    """``a`` as a finite, non-empty float64 host array of ``shape`` (None: any shape; a None
    entry: any size along that axis)."""
    host = np.asarray(to_numpy(a))
    if host.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got {type(a).__name__} of dtype {host.dtype}")
    host = host.astype(np.float64, copy=False)
    if shape is not None:
        check_shape(name, host, shape)
    if host.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {host.shape}")
    check_finite(name, host)
    return host


def _square(name: str, M) -> np.ndarray:
    M = _array(name, M, (None, None))
    check_shape(name, M, (M.shape[0], M.shape[0]))
    return M


def _jacobians(Phi, J) -> tuple[np.ndarray, np.ndarray]:
    """Φ (d_θ, d) and J (d, d), checked against each other."""
    J = _square("J", J)
    return _array("Phi", Phi, (None, J.shape[0])), J


def _i_minus_j(J: np.ndarray) -> tuple[np.ndarray, float]:
    """I − J (d, d) and its condition number; refused when singular (E of Eq. 2 does not exist)."""
    M = np.eye(J.shape[0]) - J
    cond = float(np.linalg.cond(M))
    if not cond < 1.0 / EPS:
        raise ValueError(f"J: I - J is singular to working precision (condition number {cond:.3g}), "
                         "so E = Phi (I - J)^-1 (Eq. 2) does not exist")
    return M, cond


def _norm2(M) -> float:
    return float(np.linalg.norm(M, 2))


def _finite(who: str, inputs: str, **values) -> None:
    """Raise FloatingPointError naming the checker and its ``inputs`` when a computed value
    overflowed float64 (finite inputs so large that a product or a norm is out of range)."""
    for name, v in values.items():
        if v is not None and not np.all(np.isfinite(v)):
            raise FloatingPointError(f"{who}: {name} is not finite in float64: {inputs} are too large "
                                     "for this check (scale them down)")


def _quiet(checker):
    """Run a checker without NumPy's overflow warnings: ``_finite`` turns an overflow into one
    FloatingPointError naming the checker instead."""
    @functools.wraps(checker)
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            return checker(*args, **kwargs)
    return run


def _vector_norm(v: np.ndarray) -> float:
    """‖v‖ without overflow or underflow for finite v (``deqref.numerics``)."""
    return float(norm_no_overflow(v))


# ---------------------------------------------------------------------------------------------
# the exact Jacobian and gradient


def _exact(Phi: np.ndarray, J: np.ndarray) -> np.ndarray:
    """E = Φ (I − J)⁻¹ by a dense solve of the transposed system: E = ((I − J)ᵀ \\ Φᵀ)ᵀ."""
    return np.linalg.solve((np.eye(J.shape[0]) - J).T, Phi.T).T          # (d_θ, d)


def exact_matrix(Phi, J) -> np.ndarray:
    """E = Φ (I − J)⁻¹ (Eq. 2, paper's layout), by a dense solve   # (d_θ, d)"""
    Phi, J = _jacobians(Phi, J)
    _i_minus_j(J)
    return _exact(Phi, J)


def _exact_gradient(Phi: np.ndarray, IJ: np.ndarray, g: np.ndarray) -> np.ndarray:
    """∂L/∂θ = Φ (I − J)⁻¹ g (Eq. 4) by a vector solve (I − J) y = g, a route apart from E."""
    return Phi @ np.linalg.solve(IJ, g)                                    # (d_θ,)


def _sigma(Phi: np.ndarray) -> tuple[float, float]:
    """σ_max and σ_min of Φ as a map R^d → R^{d_θ} (σ_min = 0 when d_θ < d: a null space)."""
    sv = np.linalg.svd(Phi, compute_uv=False)
    if sv.max() == 0:
        raise ValueError("Phi is zero: sigma_min^2 / sigma_max of condition (6) is undefined")
    s_min = float(sv.min()) if Phi.shape[0] >= Phi.shape[1] else 0.0
    return float(sv.max()), s_min


def _broken(assumptions: dict) -> str:
    """'; assumption violated: …' naming each assumption that is False (None: not checked)."""
    names = [name for name, ok in assumptions.items() if ok is not None and not ok]
    return "; assumption violated: " + ", ".join(names) if names else ""


def _verdict(holds: bool, lhs: float, rhs: float, assumptions: dict, what: str) -> str:
    """'holds: lhs ≤ rhs' or 'does not hold: lhs > rhs', with the violated assumptions named."""
    text = (f"{what} holds: {lhs:.8g} <= {rhs:.8g}" if holds
            else f"{what} does not hold: {lhs:.8g} > {rhs:.8g}")
    broken = _broken(assumptions)
    if not holds and not broken:
        broken = " although every assumption holds (the inputs are not what the statement is about)"
    return text + broken


# ---------------------------------------------------------------------------------------------
# Theorem 1 and Remark 1


@dataclass
class Theorem1Report:
    lhs: float            # ‖A(I − J) − Φ‖, from A, J, Φ
    rhs: float            # σ_min²/σ_max of Φ
    condition: bool       # (6) holds: the theorem's assumption
    inner: float | None   # ⟨A g, E g⟩ for the given g
    cosine: float | None  # cos(A g, E g) (None when one of them is 0)
    worst_inner: float    # min over ‖g‖ = 1 of ⟨A g, E g⟩ (smallest eigenvalue of sym(AᵀE))
    descent_all_g: bool   # (7) for every g: worst_inner ≥ −tolerance
    tolerance: float = 0.0  # rounding level of worst_inner

    @property
    def assumption(self) -> bool:
        """Condition (6)."""
        return self.condition

    @property
    def holds(self) -> bool:
        """The conclusion (7): ⟨A g, E g⟩ ≥ 0 for every g."""
        return self.descent_all_g

    @property
    def verdict(self) -> str:
        six = (f"(6) {'holds' if self.condition else 'does not hold'}: "
               f"{self.lhs:.6g} {'<=' if self.condition else '>'} {self.rhs:.6g}")
        if self.descent_all_g:
            return f"(7) holds: min_g <Ag, Eg>/|g|^2 = {self.worst_inner:.6g} >= 0; {six}"
        tail = "" if not self.condition else " (contradicts Theorem 1: A, Phi, J are inconsistent)"
        return f"(7) does not hold: <Ag, Eg> < 0 for some g (min {self.worst_inner:.6g}); {six}{tail}"


@_quiet
def theorem1(A, Phi, J, g=None) -> Theorem1Report:
    """Theorem 1 for one sample: A (d_θ, d), Φ = ∂F/∂θ (d_θ, d), J = ∂F/∂h (d, d), g (d,).

    Assumption (6): ‖A(I − J) − Φ‖ ≤ σ_min²/σ_max, the left side from A, J, Φ and the right
    from the singular values of Φ. Conclusion (7): ⟨A g, E g⟩ ≥ 0, decided for every g at once
    by the smallest eigenvalue of ½(AᵀE + EᵀA), with E from its own dense solve (never from A).
    """
    Phi, J = _jacobians(Phi, J)
    A = _array("A", A, Phi.shape)
    g = None if g is None else _array("g", g, (J.shape[0],))
    return _theorem1(A, Phi, J, g, "theorem1", "A, Phi, J, g")


def _theorem1(A, Phi, J, g, who: str, inputs: str) -> Theorem1Report:
    """Theorem 1 on checked arrays; ``who`` and ``inputs`` name the caller in errors."""
    d = J.shape[0]
    IJ, _ = _i_minus_j(J)
    s_max, s_min = _sigma(Phi)
    lhs = _norm2(A @ IJ - Phi)                                             # (6), left
    rhs = float(np.float64(s_min) ** 2 / s_max)                            # (6), right
    E = _exact(Phi, J)                                                     # (d_θ, d)
    S = A.T @ E                                                            # (d, d): ⟨Ag, Eg⟩ = gᵀSg
    _finite(who, inputs, **{"A^T E": S, "A (I - J) - Phi": lhs, "sigma_min^2 / sigma_max": rhs})
    worst = float(np.linalg.eigvalsh(0.5 * (S + S.T)).min())
    # rounding in forming S is ~ d·eps·‖A‖‖E‖; below that a negative value is noise
    tol = _slack(d, _norm2(A) * _norm2(E))
    inner = cosine_ = None
    if g is not None:
        a, e = A @ g, E @ g                                                # (d_θ,) each
        inner = float(a @ e)
        norms = float(np.linalg.norm(a) * np.linalg.norm(e))
        cosine_ = float(inner / norms) if norms > 0 else None
    _finite(who, inputs, worst_inner=worst, tolerance=tol, inner=inner, cosine=cosine_)
    return Theorem1Report(lhs, rhs, lhs <= rhs, inner, cosine_, worst, worst >= -tol, tol)


@_quiet
def remark1(D, Phi, J) -> dict:
    """Remark 1 for A = Φ D: (8) ‖D(I − J) − I‖ ≤ 1/κ² of Φ implies (6) (and so (7)).

    Keys: ``lhs``, ``rhs``, ``kappa``, ``condition`` — (8), the assumption (also
    ``assumption``); ``lhs6``, ``rhs6``, ``condition6`` — (6) for A = Φ D, the conclusion
    (``holds``); ``worst_inner`` and ``descent_all_g`` — (7) through Theorem 1; ``verdict``.
    (8) reads D and J; (6) reads A = Φ D; (7) compares A with E from its own solve.
    """
    Phi, J = _jacobians(Phi, J)
    d = J.shape[0]
    D = _array("D", D, (d, d))
    s_max, s_min = _sigma(Phi)
    kappa = s_max / s_min if s_min > 0 else float("inf")
    lhs = _norm2(D @ (np.eye(d) - J) - np.eye(d))                          # (8), left
    rhs = float(1.0 / np.float64(kappa) ** 2)                              # (8), right
    A = Phi @ D                                                            # (d_θ, d)
    _finite("remark1", "D, Phi, J", **{"D (I - J) - I": lhs, "A = Phi D": A})
    t1 = _theorem1(A, Phi, J, None, "remark1", "D, Phi, J")                # (6) and (7) for A = Φ D
    eight = {"(8)": lhs <= rhs}
    return {"lhs": lhs, "rhs": rhs, "kappa": kappa, "condition": lhs <= rhs, "assumption": lhs <= rhs,
            "lhs6": t1.lhs, "rhs6": t1.rhs, "condition6": t1.condition, "holds": t1.condition,
            "worst_inner": t1.worst_inner, "descent_all_g": t1.descent_all_g,
            "verdict": _verdict(t1.condition, t1.lhs, t1.rhs, eight, "(6)")
            + f"; (7) {'holds' if t1.descent_all_g else 'does not hold'}"}


# ---------------------------------------------------------------------------------------------
# bounds (19) and (22)


@_quiet
def bound19(A, Phi, J, L_h: float | None = None) -> dict:
    """Bound (19): if ‖J‖ ≤ L_h, then ‖A(I − J) − Φ‖ ≤ (1 + L_h) ‖A − E‖.

    L_h is an assumption about F (‖∂F/∂h‖ ≤ L_h); it defaults to ‖J‖. The left side is read
    from A, J, Φ; the right side from the given L_h and E = Φ (I − J)⁻¹ by its own dense
    solve. ``assumption`` says whether ‖J‖ ≤ L_h (to rounding); ``holds`` whether the
    inequality does, within ``tolerance`` (the rounding of both sides, condition number of
    I − J included). With L_h < ‖J‖ the inequality can fail: ‖(A − E)(I − J)‖ reaches
    ‖A − E‖ ‖I − J‖ when A − E lies along the top singular direction of I − J.
    """
    Phi, J = _jacobians(Phi, J)
    A = _array("A", A, Phi.shape)
    d = J.shape[0]
    norm_J = _norm2(J)
    L_h = norm_J if L_h is None else check_real("L_h", L_h, lo=0)
    IJ, cond = _i_minus_j(J)
    lhs = _norm2(A @ IJ - Phi)                                             # from A, J, Φ
    E = _exact(Phi, J)                                                     # (d_θ, d)
    rhs = (1.0 + L_h) * _norm2(A - E)                                      # from E and L_h
    norm_A = _norm2(A)
    tol = _slack(d, norm_A * (1 + norm_J) + _norm2(Phi) + (1 + L_h) * (norm_A + cond * _norm2(E)))
    assumptions = {"|J| <= L_h": norm_J <= L_h + _slack(d, norm_J)}
    _finite("bound19", "A, Phi, J", lhs=lhs, rhs=rhs, tolerance=tol)
    holds = lhs <= rhs + tol
    return {"lhs": lhs, "rhs": rhs, "L_h": L_h, "norm_J": norm_J, "holds": holds,
            "assumption": assumptions["|J| <= L_h"], "tolerance": tol,
            "verdict": _verdict(holds, lhs, rhs, assumptions, "(19)")}


@_quiet
def bound22(A, Phi, J, g, phantom=None, G: float | None = None) -> dict:
    """Bound (22) of Remark 3: ‖∂L/∂θ^ − ∂L/∂θ‖ ≤ ‖A − E‖ ‖g‖ ≤ ‖A − E‖ G.

    Left side: the phantom gradient (Eq. 5; ``phantom``, default A g — pass an estimator's own
    output to test it) minus the exact gradient Φ (I − J)⁻¹ g (Eq. 4) by a vector solve.
    Right side: ‖A − E‖ with E from a matrix solve of the transposed system, times G, the
    assumed bound on ‖∂L/∂h‖ (default ‖g‖). Assumptions, reported in ``assumptions``: the
    phantom gradient is A g (Eq. 5) and ‖g‖ ≤ G. Its right side is the ε of (20).
    """
    Phi, J = _jacobians(Phi, J)
    A = _array("A", A, Phi.shape)
    d = J.shape[0]
    g = _array("g", g, (d,))
    Ag = A @ g                                                             # (d_θ,)
    phantom = Ag if phantom is None else _array("phantom", phantom, (Phi.shape[0],))
    norm_g = float(np.linalg.norm(g))
    G = norm_g if G is None else check_real("G", G, lo=0)
    IJ, cond = _i_minus_j(J)
    lhs = float(np.linalg.norm(phantom - _exact_gradient(Phi, IJ, g)))    # from phantom, Φ, J, g
    E = _exact(Phi, J)
    rhs = _norm2(A - E) * G                                                # from A, E and G
    norm_A = _norm2(A)
    tol = _slack(d, (norm_A + cond * _norm2(E)) * max(norm_g, G))
    assumptions = {"phantom = A g (5)": bool(np.linalg.norm(phantom - Ag) <= _slack(d, norm_A * norm_g)),
                   "|g| <= G": norm_g <= G + _slack(d, norm_g)}
    _finite("bound22", "A, Phi, J, g, phantom", lhs=lhs, rhs=rhs, tolerance=tol)
    holds = lhs <= rhs + tol
    return {"lhs": lhs, "rhs": rhs, "G": G, "norm_g": norm_g, "holds": holds,
            "assumption": all(assumptions.values()), "assumptions": assumptions, "tolerance": tol,
            "verdict": _verdict(holds, lhs, rhs, assumptions, "(22)")}


# ---------------------------------------------------------------------------------------------
# Theorem 2


def spectral_radius(M) -> float:
    """ρ(M) = max |eigenvalue| of a square matrix."""
    return float(np.abs(np.linalg.eigvals(_square("M", M))).max())


def _partial_sum_errors(J: np.ndarray, lam: float, k_max: int) -> tuple[np.ndarray, float]:
    """‖S_k − (I − J)⁻¹‖ for k = 1 … k_max, S_k = λ Σ_{j<k} B^j accumulated term by term, the
    limit by an LU inverse; and the rounding floor of those errors. Once a sum overflows
    (ρ(B) > 1) the remaining errors are inf."""
    d = J.shape[0]
    B = lam * J + (1 - lam) * np.eye(d)                                    # (d, d), Eq. (15)
    inv = np.linalg.inv(np.eye(d) - J)
    S, P, mass = np.zeros((d, d)), np.eye(d), 0.0
    errors = np.full(k_max, np.inf)
    for k in range(k_max):
        S = S + lam * P
        term = abs(lam) * _vector_norm(P.ravel())                          # ‖λB^j‖_F
        if not (np.all(np.isfinite(S)) and np.isfinite(mass + term)):
            break
        mass += term                                                       # Σ_j ‖λB^j‖_F
        errors[k] = _norm2(S - inv)
        P = P @ B
    floor = _slack(d, mass + np.linalg.cond(np.eye(d) - J) * _norm2(inv))
    return errors, floor


def _fit_rate(errors: np.ndarray, floor: float) -> float | None:
    """exp(slope) of log ‖S_k − (I − J)⁻¹‖ over the later half of the finite errors above the
    rounding floor (None when fewer than 3 such points)."""
    k = np.flatnonzero(np.isfinite(errors) & (errors > floor))
    k = k[len(k) // 2:] if len(k) >= 6 else k
    if len(k) < 3:
        return None
    return float(np.exp(np.polyfit(k, np.log(errors[k]), 1)[0]))


@_quiet
def theorem2(J, lam: float, k_max: int = 50, rate_rtol: float = 0.05) -> dict:
    """Theorem 2 (i): the Neumann partial sums S_k = λ Σ_{j<k} B^j, B = λJ + (1 − λ)I (Eq. 15),
    converge to (I − J)⁻¹, at the geometric rate ρ(B) (S_k − (I − J)⁻¹ = −B^k (I − J)⁻¹).

    Assumptions (the paper's): J contractive, ‖J‖ < 1 (``contractive``), and λ ∈ (0, 1]
    (``lam_in_range``); ρ(J) < 1 is already enough for (i) and is reported too.
    Left side: the errors ‖S_k − (I − J)⁻¹‖, k = 1 … k_max, from the sums and an LU inverse,
    and the rate fitted to them (``fitted_rate``: exp of the slope of log error over the later
    half of the errors above the rounding floor ``floor``; None when fewer than 3 lie above it;
    an error is inf where the sum overflowed). Right side: ρ(B) from the
    eigenvalues of B. ``holds`` ⇔ the errors converge (fitted rate < 1, or the last error at the
    rounding floor) and, where a rate could be fitted, |fitted − ρ(B)| ≤ rate_rtol · ρ(B)
    (``rate_matches``). The default 5 % allows the slowly varying factor (polynomial in k for
    clustered or defective eigenvalues) that the fit sees beside ρ(B)^k.
    """
    J = _square("J", J)
    lam = check_real("lam", lam)
    k_max = check_int("k_max", k_max, minimum=3, maximum=100_000)
    rate_rtol = check_real("rate_rtol", rate_rtol, lo=0)
    _i_minus_j(J)
    d = J.shape[0]
    B = lam * J + (1 - lam) * np.eye(d)
    _finite("theorem2", "J, lam", **{"B = lam J + (1 - lam) I": B})
    rho_J, rho_B, norm_J = spectral_radius(J), spectral_radius(B), _norm2(J)
    errors, floor = _partial_sum_errors(J, lam, k_max)
    rate = _fit_rate(errors, floor)
    converges = bool(np.isfinite(errors[-1]) and (errors[-1] <= floor or (rate is not None and rate < 1)))
    matches = None if rate is None else bool(abs(rate - rho_B) <= rate_rtol * rho_B)
    holds = converges and matches is not False
    assumptions = {"|J| < 1": norm_J < 1, "0 < lam <= 1": 0 < lam <= 1}
    return {"errors": errors, "rho_J": rho_J, "rho_B": rho_B, "norm_B": _norm2(B),
            "fitted_rate": rate, "norm_J": norm_J, "lam": lam, "floor": floor,
            "contractive": assumptions["|J| < 1"], "lam_in_range": assumptions["0 < lam <= 1"],
            "assumption": all(assumptions.values()), "converges": converges,
            "rate_rtol": rate_rtol, "rate_matches": matches, "holds": holds,
            "verdict": _theorem2_verdict(holds, converges, matches, rate, rho_B, errors[-1], assumptions)}


def _theorem2_verdict(holds, converges, matches, rate, rho_B, last, assumptions) -> str:
    what = (f"fitted rate {rate:.6g} vs rho(B) {rho_B:.6g}" if rate is not None
            else f"last error {last:.3g} at the rounding floor" if converges
            else f"last error {last:.3g}, no rate fitted")
    if holds:
        return f"Theorem 2 holds: the partial sums converge; {what}"
    why = "the errors do not decay" if not converges else "the rate is not rho(B)"
    return f"Theorem 2 does not hold: {why}; {what}" + _broken(assumptions)


# ---------------------------------------------------------------------------------------------
# Theorem 3


def epsilon(phantom, exact) -> float:
    """Theorem 3's ε for one step: ‖phantom − exact‖ (any shapes of one size, flattened)."""
    a, b = _array("phantom", phantom, None), _array("exact", exact, None)
    if a.size != b.size:
        raise ValueError(f"exact must have as many entries as phantom ({a.size}), got {b.size}")
    with np.errstate(over="ignore", invalid="ignore"):
        diff = a.ravel() - b.ravel()
    _finite("epsilon", "phantom, exact", **{"phantom - exact": diff})
    eps = _vector_norm(diff)
    _finite("epsilon", "phantom, exact", **{"|phantom - exact|": eps})
    return eps


def cosine(a, b) -> float:
    """cos∠(a, b) of two gradients (flattened; one size; neither zero)."""
    a, b = _array("a", a, None).ravel(), _array("b", b, None).ravel()
    if a.size != b.size:
        raise ValueError(f"b must have as many entries as a ({a.size}), got {b.size}")
    if not np.any(a) or not np.any(b):
        raise ValueError(f"{'a' if not np.any(a) else 'b'} is zero: the cosine is undefined")
    a, b = scaled_to_unit(a), scaled_to_unit(b)                                  # exact: powers of 2
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _steps(name: str, a, T: int | None = None) -> np.ndarray:
    """A record along training as (runs, T): a (T,) array is one run."""
    a = _array(name, a, None)
    a = a[None, :] if a.ndim == 1 else a
    check_shape(name, a, (None, T))
    return a


@_quiet
def condition20(phantom, exact, eps: float) -> dict:
    """Condition (20) of Theorem 3: ‖∂L/∂θ^ − ∂L/∂θ‖ ≤ ε at every step (almost surely).

    ``phantom`` and ``exact`` are the phantom (Eq. 5) and exact (Eq. 4) gradients along
    training, (T, d_θ) (a (d_θ,) array is one step), computed by the caller by different
    routes. Left side: max_τ ‖phantom_τ − exact_τ‖ (``lhs``, per step ``errors``); right
    side: the given ε (bound (22) gives one: ``bound22(...)["rhs"]``). Holds ⇔ lhs ≤ ε (to the
    rounding of the differences, ``tolerance``).
    """
    phantom = _steps("phantom", phantom)
    exact = _steps("exact", exact)
    check_shape("exact", exact, phantom.shape)
    eps = check_real("eps", eps, lo=0)
    with np.errstate(over="ignore", invalid="ignore"):
        diff = phantom - exact                                             # (T, d_θ)
    _finite("condition20", "phantom, exact", **{"phantom - exact": diff})
    errors = np.array([_vector_norm(row) for row in diff])                 # (T,)
    lhs, worst = float(errors.max()), int(errors.argmax())
    # a difference of two gradients is off by ~eps·(‖phantom‖ + ‖exact‖) per step
    tol = _slack(1, max(_vector_norm(p) + _vector_norm(e) for p, e in zip(phantom, exact)))
    _finite("condition20", "phantom, exact", errors=errors, tolerance=tol)
    holds = lhs <= eps + tol
    return {"lhs": lhs, "rhs": eps, "errors": errors, "worst_step": worst, "holds": holds, "tolerance": tol,
            "verdict": f"(20) {'holds' if holds else 'does not hold'}: max_step |g_hat - g| = {lhs:.8g} "
                       f"{'<=' if holds else '>'} eps = {eps:.8g} (worst step {worst})"}


@_quiet
def theorem3(eta, grad_sq, *, eps: float, ell: float, R_gap: float, G: float, M2: float,
             errors=None, phantom_sq=None) -> dict:
    """Theorem 3, bound (21) with its O(·) written out, checked on a training record.

    The paper states E[Σ_τ η_τ ‖∇R(θ_τ)‖² / Σ_τ η_τ] ≤ O(ε + log T/√T) for R ℓ-smooth and
    lower-bounded, the gradient (4) unbiased with bounded covariance, ‖∇R‖ bounded, the phantom
    gradient (5) an ε-approximation (20), and η_τ = O(1/√τ). Its proof (the paper's appendix) is
    not among deqref's sources; the constants here come from the standard argument. With
    ĝ_τ the phantom gradient, E_τ ĝ_τ = ∇R(θ_τ) + b_τ, ‖b_τ‖ ≤ ε by (20) and unbiasedness;
    ℓ-smoothness (the descent lemma) gives
        E R(θ_{τ+1}) ≤ E R(θ_τ) − η_τ E‖∇R(θ_τ)‖² + η_τ G ε + (ℓ/2) η_τ² M2,
    with G ≥ ‖∇R‖ and M2 ≥ E‖ĝ_τ‖². Summing over τ ≤ T and dividing by Σ η_τ (any η_τ > 0):
        lhs_T = E[Σ_{τ≤T} η_τ ‖∇R(θ_τ)‖²] / Σ_{τ≤T} η_τ
        rhs_T = (R_gap + (ℓ/2) M2 Σ_{τ≤T} η_τ²) / Σ_{τ≤T} η_τ + G ε,     R_gap ≥ R(θ_1) − inf R,
    which for η_τ = η_1/√τ (Σ η ≈ 2η_1√T, Σ η² ≤ η_1²(1 + ln T)) is (21)'s O(ε + log T/√T).

    ``eta`` (T,) the step sizes; ``grad_sq`` (T,) or (runs, T) the true ‖∇R(θ_τ)‖² along each
    run (the expectation is estimated by the mean over runs). Left side from ``grad_sq`` and
    ``eta``; right side from ``eta`` and the constants. ``holds`` ⇔ lhs_T ≤ rhs_T for every T
    (to the rounding of the cumulative sums). Checked from the record where given: ‖∇R‖ ≤ G,
    (20) from ``errors`` (per-step ‖ĝ_τ − g_τ‖), ‖ĝ_τ‖² ≤ M2 from ``phantom_sq``. ℓ-smoothness,
    the lower bound and unbiasedness are taken as given.
    """
    eta = _array("eta", eta, (None,))
    if np.any(eta <= 0):
        raise ValueError("eta must hold positive step sizes")
    T = eta.shape[0]
    grad_sq = _steps("grad_sq", grad_sq, T)                                 # (runs, T)
    if np.any(grad_sq < 0):
        raise ValueError("grad_sq must hold squared norms (>= 0)")
    eps, ell = check_real("eps", eps, lo=0), check_real("ell", ell, lo=0)
    R_gap, G, M2 = check_real("R_gap", R_gap, lo=0), check_real("G", G, lo=0), check_real("M2", M2, lo=0)
    sum_eta = np.cumsum(eta)                                               # (T,)
    lhs = np.cumsum(eta * grad_sq, axis=1).mean(axis=0) / sum_eta           # (T,), from the record
    rhs = (R_gap + 0.5 * ell * M2 * np.cumsum(eta ** 2)) / sum_eta + G * eps   # (T,), constants
    _finite("theorem3", "eta, grad_sq and the constants", lhs=lhs, rhs=rhs)
    ok = lhs <= rhs * (1 + SLACK * T * EPS)                                # cumulative sums' rounding
    holds = bool(ok.all())
    worst = int(np.argmin(ok)) if not holds else int(np.argmax(lhs - rhs))   # first failure, or closest
    assumptions = _theorem3_assumptions(T, grad_sq, G, eps, M2, errors, phantom_sq)
    return {"lhs": lhs, "rhs": rhs, "holds": holds, "worst_T": worst + 1, "runs": grad_sq.shape[0],
            "assumption": all(assumptions.values()), "assumptions": assumptions,
            "verdict": _verdict(holds, float(lhs[worst]), float(rhs[worst]), assumptions, "(21)")
            + f" (at T = {worst + 1})"}


def _theorem3_assumptions(T, grad_sq, G, eps, M2, errors, phantom_sq) -> dict:
    """The assumptions of Theorem 3 that a training record can show: ‖∇R‖ ≤ G, and where given,
    (20) and ‖ĝ‖² ≤ M2 at every recorded step."""
    out = {"|grad R| <= G": bool(np.sqrt(grad_sq.max()) <= G)}
    if errors is not None:
        # the recorded errors are differences of gradients: a relative rounding slack
        out["(20) |g_hat - g| <= eps"] = bool(_steps("errors", errors, T).max() <= eps * (1 + SLACK * EPS))
    if phantom_sq is not None:
        out["|g_hat|^2 <= M2"] = bool(_steps("phantom_sq", phantom_sq, T).max() <= M2)
    return out
