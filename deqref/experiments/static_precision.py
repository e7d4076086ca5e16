"""Figure 1 of Geng et al.: cosine(phantom, exact) against k and λ, UPG and NPG, synthetic setting.

Three measurements, all on ``data.synthetic(seed)`` (d = 64, d_x = 16, tanh, ‖W‖₂ = L_h = 0.9,
n = 32 samples, upstream g ~ N(0, I)):

1. **Fig. 1 proper.** h* by fixed-point iteration (Eq. 10) to relative residual < 1e-5, at most
   100 iterations, as in Sec. 3 of [1]. "Exact" is the dense oracle of Eq. (4) at that h*
   (``implicit_dense``). UPG A^unr_{k,λ} (Eq. 17) and NPG A^neu_{k,λ} (Eq. 18) for k = 1 … K and
   several λ.
2. **The paper's cross-check.** [1] takes BPTT through the forward iterations (Eq. 11) as exact and
   cross-validates it with implicit differentiation by 20 Broyden iterations (cosine > 0.9999);
   deqref reports both, and both against the dense oracle.
3. **Inexact h*.** [1] reports that UPG is more robust than NPG to the numerical error of h*.
   The forward solve is stopped at tolerances 1e-1 … 1e-5; UPG and NPG run at that inexact h;
   "exact" is now the dense oracle at an h* solved to 1e-13 (the true gradient).

Choices, stated in the figure caption and the README:

- The same upstream g is used for every estimator. With the linear loss L = Σ_i ⟨g_i, h_i⟩ this
  is exactly Algorithm 1 too (∂L/∂h = g at h_k as at h*), so UPG loses nothing by it.
- Cosines are of the **batch-summed** parameter gradient ∂L/∂θ (θ = [vec W, vec U, b],
  d_θ = 5,184), the quantity an optimizer step uses; one value per seed, several seeds.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021, Sec. 3 and Fig. 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import claims as C
from ..data import SYNTH_D, SYNTH_D_X, SYNTH_L_H, synthetic
from ..backend import to_numpy
from ..gradients import estimate
from ..solvers import solve
from ..theory import cosine

PAPER_TOL, PAPER_MAX_ITER = 1e-5, 100          # Sec. 3 of [1]
EXACT_TOL, EXACT_MAX_ITER = 1e-13, 2000        # "exact" h* for the inexact-h* comparison
BROYDEN_ITERS = 20                             # the paper's cross-check

MODES = {   # ks, λs, seeds, samples, forward tolerances of the inexact-h* study, λs there
    "quick": dict(ks=list(range(1, 11)), lams=[0.5, 1.0], n_seeds=1, n=8,
                  tols=[1e-2, 1e-4], inexact_lams=[0.5]),
    "default": dict(ks=list(range(1, 31)), lams=[0.2, 0.5, 0.8, 1.0], n_seeds=3, n=32,
                    tols=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5], inexact_lams=[0.5, 1.0]),
    "full": dict(ks=list(range(1, 101)), lams=[0.1, 0.2, 0.5, 0.8, 1.0], n_seeds=10, n=32,
                 tols=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5], inexact_lams=[0.5, 1.0]),
}
METHODS = ("upg", "npg")


def _cosines(layer, x, result, g, exact_theta, ks, lam) -> dict:
    """{method: [cos(A_{k,λ} g, exact) for k in ks]} with the vector forms (Algorithms 1, 2)."""
    return {m: [cosine(estimate(m, layer, x, result, g, k=k, lam=lam).theta, exact_theta)
                for k in ks] for m in METHODS}


def run_seed(seed: int, cfg: dict) -> dict:
    """All three measurements for one seed; plain lists and floats (JSON-ready)."""
    layer, x, g = synthetic(seed, n=cfg["n"])                          # x (n, d_x), g (n, d)
    ks = cfg["ks"]

    # 1. Fig. 1: the paper's forward solve, exact = dense oracle at that h*
    fp = solve(layer, x, method="fixed_point", tol=PAPER_TOL, max_iter=PAPER_MAX_ITER,
               return_trajectory=True, warn=False)
    oracle = estimate("implicit_dense", layer, x, fp, g).theta          # (d_θ,)  Eq. (4)
    fig1 = {str(lam): _cosines(layer, x, fp, g, oracle, ks, lam) for lam in cfg["lams"]}

    # 2. the paper's cross-check: BPTT through those iterations vs implicit by 20 Broyden steps
    bptt = estimate("bptt", layer, x, fp, g).theta
    broy = estimate("implicit", layer, x, fp, g, method="broyden", n_iter=BROYDEN_ITERS).theta
    cross = {"bptt_vs_broyden20": cosine(bptt, broy), "bptt_vs_oracle": cosine(bptt, oracle),
             "broyden20_vs_oracle": cosine(broy, oracle)}

    # 3. inexact h*: phantom gradients at h from a loose solve, exact = oracle at the true h*
    ex = solve(layer, x, method="fixed_point", tol=EXACT_TOL, max_iter=EXACT_MAX_ITER)
    true_grad = estimate("implicit_dense", layer, x, ex, g).theta
    h_star = to_numpy(ex.h)
    inexact = []
    for tol in cfg["tols"] + [EXACT_TOL]:
        r = ex if tol == EXACT_TOL else solve(layer, x, method="fixed_point", tol=tol,
                                              max_iter=PAPER_MAX_ITER, warn=False)
        h_err = float(np.linalg.norm(to_numpy(r.h) - h_star) / np.linalg.norm(h_star))
        inexact.append({"tol": tol, "n_iter_max": int(r.n_iter.max()), "rel_error_h": h_err,
                        "cos": {str(lam): _cosines(layer, x, r, g, true_grad, ks, lam)
                                for lam in cfg["inexact_lams"]}})
    return {"seed": seed, "forward": {"n_iter_max": int(fp.n_iter.max()),
                                      "max_rel_residual": float(fp.final_rel_residual.max())},
            "fig1": fig1, "crosscheck": cross, "inexact": inexact}


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    """Run seeds ``seed … seed + n_seeds − 1``; write static_precision.{json,png} into ``out``."""
    cfg = MODES[mode]
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    data = {"setting": {"d": SYNTH_D, "d_x": SYNTH_D_X, "n": cfg["n"], "L_h": SYNTH_L_H,
                        "activation": "tanh", "forward": "fixed-point iteration",
                        "tol": PAPER_TOL, "max_iter": PAPER_MAX_ITER, "exact_tol": EXACT_TOL,
                        "seeds": seeds, "mode": mode, "ks": cfg["ks"], "lams": cfg["lams"],
                        "inexact_tols": cfg["tols"], "inexact_lams": cfg["inexact_lams"],
                        "cosine_of": "batch-summed dL/dtheta",
                        "upstream": "same g ~ N(0, I) for every estimator (linear loss)",
                        "exact": "dense oracle Eq. (4) (scipy solve) at the solver's h* (Fig. 1) "
                                 "or at h* solved to 1e-13 (inexact-h* study)"},
            "seeds": [run_seed(s, cfg) for s in seeds]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_precision.json").write_text(json.dumps(data, indent=1))
    from .plots import plot_static_precision
    plot_static_precision(data, out / "static_precision.png")
    return data


def seed_stat(data: dict, get, reduce=np.mean) -> np.ndarray:
    """``reduce`` over seeds of the per-seed array ``get(seed_record)``."""
    return reduce(np.array([get(r) for r in data["seeds"]]), axis=0)


def summary(data: dict) -> str:
    s = data["setting"]
    ks = s["ks"]
    show = [k for k in (1, 2, 3, 5, 10, 20, 30, 50, 100) if k in ks]
    idx = [ks.index(k) for k in show]
    lines = [f"static precision (Fig. 1 of Geng et al.): synthetic d={s['d']}, L_h={s['L_h']}, "
             f"fixed point to {s['tol']:g} (≤{s['max_iter']} it.), exact = dense oracle; "
             f"cos of batch-summed ∂L/∂θ, mean over seeds {s['seeds']}",
             "  method  λ    " + " ".join(f"{'k=' + str(k):>9s}" for k in show)]
    for lam in s["lams"]:
        for m in METHODS:
            c = seed_stat(data, lambda r: r["fig1"][str(lam)][m])
            lines.append(f"  {m:6s} {lam:4.2f} " + " ".join(f"{c[i]:9.6f}" for i in idx))
    cc = {key: seed_stat(data, lambda r: r["crosscheck"][key], np.min) for key in data["seeds"][0]["crosscheck"]}
    lines.append("  cross-check (min over seeds): " + ", ".join(f"cos {k} = {v:.10f}" for k, v in cc.items()))
    kk = [k for k in (5, ks[-1]) if k in ks]
    lines.append("  inexact h*: 1 − cos vs the true gradient (mean over seeds), UPG | NPG at "
                 + ", ".join(f"k={k}" for k in kk))
    for lam in s["inexact_lams"]:
        for j, rec in enumerate(data["seeds"][0]["inexact"]):
            u = seed_stat(data, lambda r: r["inexact"][j]["cos"][str(lam)]["upg"])
            n = seed_stat(data, lambda r: r["inexact"][j]["cos"][str(lam)]["npg"])
            cells = "   ".join(f"{1 - u[ks.index(k)]:.1e} | {1 - n[ks.index(k)]:.1e}" for k in kk)
            lines.append(f"    λ={lam:4.2f} tol={rec['tol']:7.0e} (‖h−h*‖/‖h*‖={rec['rel_error_h']:.1e}, "
                         f"{rec['n_iter_max']:3d} it.): {cells}")
    return "\n".join(lines)


def claims(data: dict) -> list:
    """Fig. 1's claims and the BPTT ≈ 20-Broyden check, from the cosines averaged over seeds
    (deterministic: each is one number per λ or per forward tolerance; no interval)."""
    st, n = data["setting"], len(data["seeds"])
    ks, lams = st["ks"], st["lams"]
    cos = {lam: seed_stat(data, lambda r, lam=lam: r["fig1"][str(lam)]["upg"]) for lam in lams}   # (ks,)
    rows = [C.claim("geng.fig1.cosine_rises_with_k", "Geng et al., Fig. 1",
                    "the cosine of the phantom gradient to the exact one rises with k",
                    "rises with k", [float(cos[lam][-1] - cos[lam][0]) for lam in lams], C.above(0.01),
                    what=f"cos(k = {ks[-1]}) − cos(k = {ks[0]}) for every λ in {lams}", n=n)]
    k5 = ks.index(5)
    rows.append(C.claim("geng.fig1.small_lambda_slows", "Geng et al., Fig. 1 and Sec. 2.3",
                        "a small λ slows the rise of the cosine with k",
                        "smaller λ, slower rise", [float(cos[b][k5] - cos[a][k5]) for a, b in zip(lams, lams[1:])],
                        C.above(0.0), what=f"cos(λ') − cos(λ) at k = 5 for consecutive λ < λ' in {lams}", n=n))
    rows.append(C.claim("geng.sec3.bptt_matches_broyden", "Geng et al., Sec. 3",
                        "BPTT and the implicit gradient by 20 Broyden iterations agree (cosine > 0.9999)",
                        "cosine > 0.9999", min(r["crosscheck"]["bptt_vs_broyden20"] for r in data["seeds"]),
                        C.above(0.9999), what="the smallest cosine over seeds", n=n))
    lam, last = 0.5, len(ks) - 1
    ratios = []
    tols = [t for t in st["inexact_tols"] if t >= 1e-4]     # below, h is as good as exact for k = 30
    for j, tol in enumerate(st["inexact_tols"]):
        if tol < 1e-4:
            continue
        err = {m: float(np.mean([1 - r["inexact"][j]["cos"][str(lam)][m][last] for r in data["seeds"]]))
               for m in METHODS}
        ratios.append(float(np.log10(max(err["npg"], 1e-16) / max(err["upg"], 1e-16))))
    rows.append(C.claim("geng.fig1.upg_robust_to_inexact_h", "Geng et al., Fig. 1 and Sec. 2.3",
                        "UPG is more robust than NPG to the error of an inexact h*",
                        "UPG's cosine stays closer to 1", ratios, C.above(1.0),
                        what=f"log10 of NPG's 1 − cos over UPG's (k = {ks[-1]}, λ = {lam:g}) at every "
                             f"forward tolerance in {tols}", n=n))
    return rows
