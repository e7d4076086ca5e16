"""The theorems of [1] as numerical checkers: each computes both sides and reports.

Everything here is per sample, in the paper's layout, on the host in float64 (these are
small dense-matrix checks: SVDs and eigenvalues). Notation, at h*:

    Φ = ∂F/∂θ (d_θ, d),   J = ∂F/∂h (d, d),   E = Φ (I − J)⁻¹  the exact ∂h*/∂θ (Eq. 2),
    A  the estimator's matrix (Eq. 5);  σ_max, σ_min, κ = σ_max/σ_min of Φ;  ‖·‖ = spectral norm.

- Theorem 1: condition (6) ‖A(I − J) − Φ‖ ≤ σ_min²/σ_max implies ⟨A g, E g⟩ ≥ 0 for every g.
  ``theorem1`` also reports the worst case over g exactly: min_g ⟨Ag, Eg⟩/‖g‖² is the smallest
  eigenvalue of the symmetric part of AᵀE.
- Remark 1: for A = Φ D, condition (8) ‖D(I − J) − I‖ ≤ 1/κ².
- Bound (19): ‖A(I − J) − Φ‖ ≤ (1 + L_h) ‖A − E‖, with L_h ≥ ‖J‖.
- Bound (22): ‖Ag − Eg‖ ≤ ‖A − E‖ ‖g‖.
- Theorem 2: λ Σ_{j<k} B^j → (I − J)⁻¹, B = λJ + (1 − λ)I, geometrically at rate ρ(B).
- Theorem 3: the ε of an estimator, ‖Ag − Eg‖, to be tracked along training.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_numpy


def _np(a) -> np.ndarray:
    return np.asarray(to_numpy(a), dtype=np.float64)


def _norm2(M) -> float:
    return float(np.linalg.norm(M, 2))


def exact_matrix(Phi, J) -> np.ndarray:
    """E = Φ (I − J)⁻¹ (paper's layout), by a dense solve: E = ((I − J)ᵀ \\ Φᵀ)ᵀ   # (d_θ, d)"""
    Phi, J = _np(Phi), _np(J)
    return np.linalg.solve((np.eye(J.shape[0]) - J).T, Phi.T).T


@dataclass
class Theorem1Report:
    lhs: float            # ‖A(I − J) − Φ‖
    rhs: float            # σ_min²/σ_max of Φ
    condition: bool       # (6) holds
    inner: float | None   # ⟨A g, E g⟩ for the given g
    cosine: float | None  # cos(A g, E g)
    worst_inner: float    # min over ‖g‖ = 1 of ⟨A g, E g⟩ (smallest eigenvalue of sym(AᵀE))
    descent_all_g: bool   # worst_inner ≥ −tolerance: a descent direction for every g


def theorem1(A, Phi, J, g=None) -> Theorem1Report:
    """Check Theorem 1 for one sample: A (d_θ, d), Φ = ∂F/∂θ (d_θ, d), J = ∂F/∂h (d, d)."""
    A, Phi, J = _np(A), _np(Phi), _np(J)
    d = J.shape[0]
    sv = np.linalg.svd(Phi, compute_uv=False)
    lhs = _norm2(A @ (np.eye(d) - J) - Phi)
    rhs = float(sv.min() ** 2 / sv.max())
    E = exact_matrix(Phi, J)
    S = A.T @ E
    worst = float(np.linalg.eigvalsh(0.5 * (S + S.T)).min())
    # rounding in forming S is ~ d·eps·‖A‖‖E‖; below that a negative value is noise
    tol = 64 * d * np.finfo(np.float64).eps * _norm2(A) * _norm2(E)
    inner = cosine = None
    if g is not None:
        g = _np(g)
        a, e = A @ g, E @ g
        inner = float(a @ e)
        cosine = float(inner / (np.linalg.norm(a) * np.linalg.norm(e)))
    return Theorem1Report(lhs, rhs, lhs <= rhs, inner, cosine, worst, worst >= -tol)


def remark1(D, Phi, J) -> dict:
    """Remark 1 for A = Φ D: ‖D(I − J) − I‖ against 1/κ² of Φ."""
    D, Phi, J = _np(D), _np(Phi), _np(J)
    sv = np.linalg.svd(Phi, compute_uv=False)
    kappa = float(sv.max() / sv.min())
    lhs = _norm2(D @ (np.eye(J.shape[0]) - J) - np.eye(J.shape[0]))
    return {"lhs": lhs, "rhs": 1.0 / kappa ** 2, "kappa": kappa, "condition": lhs <= 1.0 / kappa ** 2}


def bound19(A, Phi, J, L_h: float | None = None) -> dict:
    """Bound (19): ‖A(I − J) − Φ‖ ≤ (1 + L_h) ‖A − E‖; L_h defaults to ‖J‖."""
    A, Phi, J = _np(A), _np(Phi), _np(J)
    L_h = _norm2(J) if L_h is None else float(L_h)
    lhs = _norm2(A @ (np.eye(J.shape[0]) - J) - Phi)
    rhs = (1.0 + L_h) * _norm2(A - exact_matrix(Phi, J))
    return {"lhs": lhs, "rhs": rhs, "L_h": L_h, "holds": lhs <= rhs * (1 + 1e-12) + 1e-14}


def bound22(A, Phi, J, g) -> dict:
    """Bound (22): ‖A g − E g‖ ≤ ‖A − E‖ ‖g‖."""
    A, Phi, J, g = _np(A), _np(Phi), _np(J), _np(g)
    E = exact_matrix(Phi, J)
    lhs = float(np.linalg.norm(A @ g - E @ g))
    rhs = _norm2(A - E) * float(np.linalg.norm(g))
    return {"lhs": lhs, "rhs": rhs, "holds": lhs <= rhs * (1 + 1e-12) + 1e-14}


def spectral_radius(M) -> float:
    return float(np.abs(np.linalg.eigvals(_np(M))).max())


def theorem2(J, lam: float, k_max: int = 50) -> dict:
    """Neumann partial sums S_k = λ Σ_{j<k} B^j against (I − J)⁻¹ for k = 1 … k_max.

    Returns the errors ‖S_k − (I − J)⁻¹‖, ρ(J), ρ(B), ‖B‖ and the geometric rate fitted to
    the tail of the errors (which Theorem 2 predicts to approach ρ(B)).
    """
    J = _np(J)
    d = J.shape[0]
    B = lam * J + (1 - lam) * np.eye(d)
    inv = np.linalg.inv(np.eye(d) - J)
    S, P, errors = np.zeros((d, d)), np.eye(d), []
    for _ in range(k_max):
        S = S + lam * P
        P = P @ B
        errors.append(_norm2(S - inv))
    errors = np.array(errors)
    tail = errors[k_max // 2:]
    ok = tail > 1e-13 * _norm2(inv)                      # ignore errors at rounding level
    rate = float(np.exp(np.polyfit(np.arange(len(tail))[ok], np.log(tail[ok]), 1)[0])) \
        if ok.sum() >= 3 else float("nan")
    return {"errors": errors, "rho_J": spectral_radius(J), "rho_B": spectral_radius(B),
            "norm_B": _norm2(B), "fitted_rate": rate}


def epsilon(phantom, exact) -> float:
    """Theorem 3's ε for one step: ‖phantom − exact‖ (any shapes, flattened)."""
    return float(np.linalg.norm(_np(phantom).ravel() - _np(exact).ravel()))


def cosine(a, b) -> float:
    """cos∠(a, b) of two gradients (flattened)."""
    a, b = _np(a).ravel(), _np(b).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
