"""Theorem 1 of Geng et al. in pictures: both sides of condition (6) and the descent inner product (7).

Per sample, in the paper's layout, at h*: Φ = ∂F/∂θ (d_θ, d), J = ∂F/∂h (d, d),
E = Φ (I − J)⁻¹ the exact ∂h*/∂θ (Eq. 2), A the phantom matrix (Eq. 5). Theorem 1:

    ‖A (I − J) − Φ‖ ≤ σ_min² / σ_max   (6)   ⟹   ⟨A g, E g⟩ ≥ 0 for every g   (7)

with σ_max, σ_min the extreme singular values of Φ and ‖·‖ the spectral norm. For A = Φ D,
Remark 1 reduces (6) to ‖D (I − J) − I‖ ≤ 1/κ² (8), κ = σ_max/σ_min. For NPG,
D = λ Σ_{j<k} B^j and (I − B) = λ (I − J), so D (I − J) − I = −B^k: (8) reads ‖B^k‖ ≤ 1/κ²,
which implies (6) (‖Φ B^k‖ ≤ σ_max ‖B^k‖).

deqref evaluates, over k and λ, for UPG A^unr_{k,λ} (Eq. 17) and NPG A^neu_{k,λ} (Eq. 18) in their
matrix forms (``form="matrix"``, ``diagnostics["A"]``), with ``theory.theorem1`` per sample:
the ratio lhs/rhs of (6) (≤ 1: the condition holds), cos(A g, E g) for the upstream g of the
synthetic setting, and the exact worst case over g, min_{‖g‖=1} ⟨A g, E g⟩ — the smallest
eigenvalue of the symmetric part of AᵀE — shown normalized by ‖A‖ ‖E‖. At an exact fixed
point UPG and NPG are the same matrix (all unrolled states equal h*); the last panel therefore
evaluates both at an inexact h (forward tolerance 1e-2) against Φ, J, E at the true h*.

The layer is small (d = 12, d_x = 4 by default, so d_θ = 204) so that every A is a dense matrix.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021, Theorem 1, Remark 1, Eq. (17), (18).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data import SYNTH_L_H, synthetic
from ..gradients import estimate, neumann_matrix
from ..solvers import solve
from .. import claims as C
from ..theory import exact_matrix, remark1, theorem1, theorem2

MODES = {
    "quick": dict(d=8, d_x=4, n=4, ks=list(range(1, 9)), lams=[0.5, 1.0], inexact_lams=[0.5]),
    "default": dict(d=12, d_x=4, n=8, ks=list(range(1, 31)), lams=[0.2, 0.5, 0.8, 1.0],
                    inexact_lams=[0.5, 1.0]),
    "full": dict(d=16, d_x=8, n=32, ks=list(range(1, 61)), lams=[0.1, 0.2, 0.5, 0.8, 1.0],
                 inexact_lams=[0.5, 1.0]),
}
EXACT_TOL, INEXACT_TOL = 1e-13, 1e-2
METHODS = ("upg", "npg")
THEOREM2_K = 50            # partial sums S_1 … S_50 for Theorem 2


def _sample_reports(A, Phi, J, g) -> dict:
    """theory.theorem1 for every sample: lists over samples of lhs, rhs, cos, worst (normalized)."""
    rows = {"lhs": [], "rhs": [], "cos": [], "inner": [], "worst": [], "worst_normalized": []}
    for i in range(A.shape[0]):
        rep = theorem1(A[i], Phi[i], J[i], g[i])
        E = exact_matrix(Phi[i], J[i])                                   # (d_θ, d)
        scale = np.linalg.norm(A[i], 2) * np.linalg.norm(E, 2)
        rows["lhs"].append(rep.lhs)
        rows["rhs"].append(rep.rhs)
        rows["cos"].append(rep.cosine)
        rows["inner"].append(rep.inner)
        rows["worst"].append(rep.worst_inner)
        rows["worst_normalized"].append(rep.worst_inner / scale)
    return rows


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    cfg = MODES[mode]
    ks = cfg["ks"]
    layer, x, g = synthetic(seed, d=cfg["d"], d_x=cfg["d_x"], n=cfg["n"])   # x (n, d_x), g (n, d)
    star = solve(layer, x, method="fixed_point", tol=EXACT_TOL, max_iter=2000)
    h = star.h                                                               # (n, d)
    Phi = to_numpy(layer.dF_dtheta(h, x))                                    # (n, d_θ, d)
    J = to_numpy(layer.dF_dh(h, x))                                          # (n, d, d)
    g_np = to_numpy(g)

    # condition (6), (7) and Remark 1 over k and λ at the exact h*
    exact = {}
    upg_npg_gap = 0.0                  # max_k,λ ‖A_upg − A_npg‖ / ‖A_npg‖ (0 at an exact h*)
    for lam in cfg["lams"]:
        per_m = {m: [] for m in METHODS}
        r1 = []
        for k in ks:
            As = {m: to_numpy(estimate(m, layer, x, star, g, k=k, lam=lam, form="matrix").diagnostics["A"])
                  for m in METHODS}                                          # (n, d_θ, d) each
            upg_npg_gap = max(upg_npg_gap, float(np.linalg.norm(As["upg"] - As["npg"])
                                                 / np.linalg.norm(As["npg"])))
            for m in METHODS:
                per_m[m].append(_sample_reports(As[m], Phi, J, g_np))
            D = to_numpy(neumann_matrix(layer, x, h, k, lam))                # (n, d, d)
            reps = [remark1(D[i], Phi[i], J[i]) for i in range(D.shape[0])]
            r1.append({"lhs": [r["lhs"] for r in reps], "rhs": [r["rhs"] for r in reps]})
        exact[str(lam)] = {**per_m, "remark1_npg": r1}

    # the same at an inexact h (forward tolerance 1e-2), against Φ, J, E at the true h*
    loose = solve(layer, x, method="fixed_point", tol=INEXACT_TOL, max_iter=100, warn=False)
    h_err = float(np.linalg.norm(to_numpy(loose.h) - to_numpy(h)) / np.linalg.norm(to_numpy(h)))
    inexact = {str(lam): {m: [_sample_reports(
        to_numpy(estimate(m, layer, x, loose, g, k=k, lam=lam, form="matrix").diagnostics["A"]),
        Phi, J, g_np) for k in ks] for m in METHODS} for lam in cfg["inexact_lams"]}

    # Theorem 2 (i): the Neumann partial sums converge to (I − ∂F/∂h)⁻¹ at the rate ρ(B), per sample
    thm2 = {}
    for lam in cfg["lams"]:
        reps = [theorem2(J[i], lam, k_max=THEOREM2_K) for i in range(J.shape[0])]
        thm2[str(lam)] = {"holds": [bool(r["holds"]) for r in reps], "rho_B": [r["rho_B"] for r in reps],
                          "converges": [bool(r["converges"]) for r in reps],
                          "fitted_rate": [r["fitted_rate"] for r in reps],
                          "assumption": [bool(r["assumption"]) for r in reps]}

    sv = np.linalg.svd(Phi, compute_uv=False)                                # (n, d)
    data = {"setting": {"d": cfg["d"], "d_x": cfg["d_x"], "d_theta": layer.d_theta, "n": cfg["n"],
                        "L_h": SYNTH_L_H, "activation": "tanh", "seed": seed, "mode": mode, "ks": ks,
                        "lams": cfg["lams"], "inexact_lams": cfg["inexact_lams"],
                        "exact_tol": EXACT_TOL, "inexact_tol": INEXACT_TOL,
                        "inexact_rel_error_h": h_err, "norm": "spectral",
                        "exact": "E = dF/dtheta (I - dF/dh)^-1 by a dense solve at h* (tol 1e-13)"},
            "kappa": (sv.max(axis=1) / sv.min(axis=1)).tolist(),
            "rho_J": [float(np.abs(np.linalg.eigvals(Ji)).max()) for Ji in J],
            "upg_npg_gap_at_h_star": upg_npg_gap,
            "exact": exact, "inexact": inexact, "theorem2": thm2}
    data["findings"] = findings(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "theorem1.json").write_text(json.dumps(data, indent=1))
    from .plots import plot_theorem1
    plot_theorem1(data, out / "theorem1.png")
    return data


def _first_k(ks, holds_all) -> int | None:
    """Smallest k from which ``holds_all`` stays true for every larger k on the grid."""
    first = None
    for k, ok in zip(ks, holds_all):
        first = (first or k) if ok else None
    return first


def findings(data: dict) -> dict:
    """Per λ: the smallest k from which (6), (8) and descent-for-every-g hold for all samples;
    the worst cosine at k = 1; and counts of (6) holding while (7) fails (Theorem 1 says: none)."""
    ks = data["setting"]["ks"]
    res, violations, necessary = {}, 0, 0
    for lam, rec in data["exact"].items():
        npg = rec["npg"]
        cond6 = [np.all(np.array(r["lhs"]) <= np.array(r["rhs"])) for r in npg]
        descent = [np.all(np.array(r["worst"]) >= 0) for r in npg]
        rem1 = [np.all(np.array(r["lhs"]) <= np.array(r["rhs"])) for r in rec["remark1_npg"]]
        for m in METHODS:
            for r in rec[m]:
                lhs, rhs, worst = (np.array(r[key]) for key in ("lhs", "rhs", "worst"))
                violations += int(np.sum((lhs <= rhs) & (worst < 0)))
                necessary += int(np.sum((lhs > rhs) & (worst >= 0)))
        res[lam] = {"k_condition6": _first_k(ks, cond6), "k_remark1": _first_k(ks, rem1),
                    "k_descent_all_g": _first_k(ks, descent),
                    "min_cos_k1": float(np.min(npg[0]["cos"])),
                    "min_worst_normalized_k1": float(np.min(npg[0]["worst_normalized"]))}
    return {"per_lambda": res, "condition6_but_not_descent": violations,
            "descent_without_condition6": necessary}


def summary(data: dict) -> str:
    s, f = data["setting"], data["findings"]
    lines = [f"Theorem 1 (Geng et al.): d={s['d']}, d_x={s['d_x']}, d_θ={s['d_theta']}, n={s['n']} samples, "
             f"L_h={s['L_h']}, seed {s['seed']}, h* to {s['exact_tol']:g}; κ(∂F/∂θ) "
             f"{min(data['kappa']):.2f}–{max(data['kappa']):.2f}; ‖A_upg − A_npg‖/‖A_npg‖ at h* = "
             f"{data['upg_npg_gap_at_h_star']:.1e}",
             "  smallest k from which, for every sample: (6) holds | Remark 1 (8) holds | "
             "⟨Ag, Eg⟩ ≥ 0 for every g;  at k=1: min cos(Ag, Eg), min worst/(‖A‖‖E‖)",
             f"  {'λ':>5s} {'(6)':>5s} {'(8)':>5s} {'(7)∀g':>6s} {'cos k=1':>8s} {'worst k=1':>9s}"]
    fmt = lambda k: f"{k:5d}" if k is not None else f"{'>' + str(s['ks'][-1]):>5s}"  # noqa: E731
    for lam, r in f["per_lambda"].items():
        lines.append(f"  {float(lam):5.2f} {fmt(r['k_condition6'])} {fmt(r['k_remark1'])} "
                     f"{fmt(r['k_descent_all_g']):>6s} {r['min_cos_k1']:8.4f} {r['min_worst_normalized_k1']:9.1e}")
    lines.append(f"  (k, λ, sample) with (6) but not descent for every g: {f['condition6_but_not_descent']} "
                 f"(Theorem 1: 0); descent for every g without (6): {f['descent_without_condition6']}")
    ks = s["ks"]
    for lam, rec in data["inexact"].items():
        last = {m: np.array(rec[m][-1]["lhs"]) / np.array(rec[m][-1]["rhs"]) for m in METHODS}
        lines.append(f"  inexact h (tol {s['inexact_tol']:g}, ‖h−h*‖/‖h*‖ = {s['inexact_rel_error_h']:.1e}), "
                     f"λ={float(lam):g}, k={ks[-1]}: lhs/rhs of (6) median (max): "
                     f"UPG {np.median(last['upg']):.1e} ({last['upg'].max():.1e}), "
                     f"NPG {np.median(last['npg']):.1e} ({last['npg'].max():.1e})")
    return "\n".join(lines)


def claims(data: dict) -> list:
    """Theorem 1, Sec. 2.3's "(6) holds for k large enough", Remark 1 and Theorem 2 on the
    synthetic layer (deterministic: counts and smallest k over every sample); Theorem 3 is not
    measured by any experiment."""
    f, st = data["findings"], data["setting"]
    lams = [lam for lam in st["lams"]]
    n_cases = len(st["ks"]) * len(lams) * st["n"] * len(METHODS)
    rows = [C.claim("geng.thm1.condition6_gives_descent", "Geng et al., Theorem 1",
                    "where condition (6) holds, the phantom gradient is a descent direction for every g",
                    "(6) ⇒ ⟨Ag, Eg⟩ ≥ 0", f["condition6_but_not_descent"], C.below(0.5),
                    what="the number of (k, λ, sample, method) cases with (6) but not descent", n=n_cases)]
    k6 = [f["per_lambda"][str(lam)]["k_condition6"] for lam in lams]
    rows.append(C.claim("geng.sec23.condition6_large_k", "Geng et al., Sec. 2.3",
                        "condition (6) holds once k is large enough", "for k large enough", k6,
                        C.below(st["ks"][-1] + 0.5),
                        what=f"the smallest k from which (6) holds for every sample, for λ in {lams} "
                             f"(none on the grid k ≤ {st['ks'][-1]}: not resolved)", n=st["n"]))
    kr = [f["per_lambda"][str(lam)]["k_remark1"] for lam in lams]
    rows.append(C.claim("geng.remark1.condition8_large_k", "Geng et al., Remark 1",
                        "for NPG, the sufficient condition (8) holds once k is large enough",
                        "for k large enough", kr, C.below(st["ks"][-1] + 0.5),
                        what=f"the smallest k from which (8) holds for every sample, for λ in {lams} "
                             f"(none on the grid: not resolved)", n=st["n"]))
    # the theorem bounds the rate from above: an error that falls no slower than ρ(B)^k (5 %
    # allowed for the fit's polynomial factor) agrees; a finite window may see a faster transient
    slower = [not c or (r is not None and r > 1.05 * rho)
              for rec in data["theorem2"].values()
              for c, r, rho in zip(rec["converges"], rec["fitted_rate"], rec["rho_B"])]
    rows.append(C.claim("geng.thm2.neumann_rate", "Geng et al., Theorem 2",
                        "the Neumann partial sums converge to (I − ∂F/∂h)⁻¹ at the rate ρ(λ ∂F/∂h + (1 − λ) I)",
                        "converge at rate ρ(B)", sum(slower), C.below(0.5),
                        what="the number of (sample, λ) cases whose error does not converge or falls "
                             "slower than ρ(B)^k (fitted rate > 1.05 ρ(B))", n=len(slower)))
    rows.append(C.claim("geng.thm3.convergence", "Geng et al., Theorem 3",
                        "SGD with an ε-accurate phantom gradient and η_τ = O(1/√τ) reaches an "
                        "O(ε + log T/√T) neighbourhood of a stationary point", "bound (21)", None, C.below(0.5),
                        what="the number of T where (21) fails on a training record",
                        note="the trained experiments use Adam at a constant step, and R's smoothness ℓ "
                             "and bounds G, M2 are not measured; deqref.theory.theorem3 checks (21) on a "
                             "record given those constants"))
    return rows
