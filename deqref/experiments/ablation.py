"""Figure 3 of Geng et al.: final accuracy against k and λ, UPG against NPG, on a real data set.

What the paper did ([1], Sec. 3, "ablative setting"): an MDEQ-Tiny (170K parameters) on CIFAR-10,
trained with the unrolled phantom gradient A^unr_{k,λ} (UPG, Eq. 17) or the Neumann one
A^neu_{k,λ} (NPG, Eq. 18) in place of implicit differentiation; the ablation results are "averaged
from 6 runs and reported as mean(best) accuracy". Fig. 3 plots (a) the accuracy for several k and λ
and (b) UPG against NPG. Its plotted values and its grid are in the figure only (the text we have
does not print them); the text claims:

- Sec. 2.3: "a large k is preferable for a more accurate A, while a small λ contributes to the
  conditioning of A" — k and λ should be chosen as a trade-off;
- Sec. 3: Fig. 3 "validates the advantages of the unrolling phantom gradient over the Neumann
  phantom gradient and show[s] the influences of λ and k", and UPG "is robust to a wide range of
  unrolled steps (see Fig. 3(b))";
- the operating point of its other experiments: A_{5,0.5} (Tables 1 and 3; the slides' tables also
  use A_{5,0.6}, A_{5,0.8}, A_{5,1.0} and A_{6,0.5}).

What deqref does instead, at teaching scale (the model and forward of ``accuracy_speed``, so the
numbers compare):

- data: ``data.digits(seed)`` — scikit-learn's 8 × 8 digits, 1,438 training / 359 validation images;
- model: ``DEQModel.random(d, 64, 10, "tanh", seed=s, L_h=0.9)``, F(h, x) = tanh(W h + U x + b),
  a linear head, cross-entropy; d = 64 (default and full), 16 (quick);
- forward: Broyden (memory 30) to relative residual 1e-4, at most 18 iterations, as in
  ``accuracy_speed``; UPG takes its loss at h_k (Algorithm 1), NPG at h*;
- optimizer: Adam, lr 5e-3, batch 64, the same initialization and data order for every (method, k, λ)
  of one seed, so UPG and NPG are compared paired;
- grid (trimmed to the budget, the paper's grid being unknown): k ∈ {1, 2, 5, 8} at the paper's
  λ = 0.5 — 4 points, 8 phantom runs per seed (the claims are about k and about UPG against
  NPG); ``--full`` adds λ (k = 1 … 6, 8, 10 for λ ∈ {0.5, 1.0}; λ = 0.1 … 1.0, 7 values, at k = 5);
- length and seeds: 10 epochs (``accuracy_speed``'s setting, ‖W‖₂ ≤ 0.9 kept by projection, so
  the runs the two share — implicit and A_{5,0.5} — are trained once) and **4 seeds** by default,
  the paper's 6 seeds with ``--full``, 2 epochs and 2 seeds (d = 16, 4 points) with ``--quick``;
- reported: validation accuracy after the last epoch, mean ± std (ddof = 1) over seeds, and the best
  epoch's (the paper's "(best)"); the implicit baseline (adjoint by 20 Broyden iterations, as in
  ``accuracy_speed``) trained on the same seeds, for reference.

Two identities give the grid a reference. NPG with k = 1, λ = 1 *is* JFB (∂F/∂θ|_{h*} g, the same
computation; the tests check it bit for bit). And NPG with k = 1 is λ · JFB for the layer's
parameters, a scale that Adam's m̂ / (√v̂ + ε) removes up to its ε = 1e-8: NPG at k = 1 would train
the same for every λ but for that ε. The measured spread of NPG's k = 1 runs over λ (same seed) is
therefore reported as the **noise floor**: how far two runs that differ only by ε-sized
perturbations drift apart once training has amplified them, the size a difference on the grid has
to beat.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021, Sec. 2.3, Sec. 3, Table 1 and Fig. 3.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy import stats

from ..data import digits
from ..train import TrainConfig
from .. import claims as C
from .accuracy_speed import ACCURACY_DELTA, FORWARD, IMPLICIT_ITERS, L_H_INIT, LR, SPECTRAL_NORM
from .machine import blas_threads, recorded_run
from .runs import trained

MODES = {
    "quick": dict(d=16, epochs=2, n_seeds=2, batch_size=64,
                  ks=[1, 2], lams_for_k=[0.5, 1.0], k_for_lam=2, lams=[0.5, 1.0]),
    "default": dict(d=64, epochs=10, n_seeds=4, batch_size=64,
                    ks=[1, 2, 5, 8], lams_for_k=[0.5], k_for_lam=5, lams=[0.5]),
    "full": dict(d=64, epochs=10, n_seeds=6, batch_size=64,
                 ks=[1, 2, 3, 4, 5, 6, 8, 10], lams_for_k=[0.5, 1.0], k_for_lam=5,
                 lams=[0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0]),
}
METHODS = ("upg", "npg")
IMPLICIT = ("implicit", {"method": "broyden", "n_iter": IMPLICIT_ITERS})
KEYS = ("train_loss", "train_metric", "val_loss", "val_metric", "forward_iters", "forward_converged")

PAPER = {"setting": "MDEQ-Tiny (170K parameters), CIFAR-10, 6 runs, mean(best) accuracy",
         "claims": ["a large k is preferable for a more accurate A, a small λ for its conditioning (Sec. 2.3)",
                    "UPG better than NPG, and robust to a wide range of unrolled steps (Fig. 3(b))",
                    "A_{5,0.5} chosen for the large-scale runs (Tables 1, 3)"],
         "values": "in the figure only; not in the text"}


def grid_points(cfg: dict) -> list:
    """The (k, λ) points: every k for each λ of ``lams_for_k``, every λ at ``k_for_lam``; sorted."""
    pts = {(k, lam) for lam in cfg["lams_for_k"] for k in cfg["ks"]}
    pts |= {(cfg["k_for_lam"], lam) for lam in cfg["lams"]}
    return sorted(pts)


def config(estimator: str, options: dict, seed: int, epochs: int, batch_size: int) -> TrainConfig:
    """The training configuration shared by every run (only the backward differs); the same as
    ``accuracy_speed``'s, so that runs the two share are trained once."""
    return TrainConfig(estimator=estimator, estimator_options=dict(options), solver="broyden",
                       solver_options=dict(FORWARD), optimizer="adam", lr=LR, epochs=epochs,
                       batch_size=batch_size, seed=seed, spectral_norm=SPECTRAL_NORM,
                       label=f"ablation {estimator} {options} seed {seed}")


def train_one(data, estimator: str, options: dict, seed: int, mode: str = "default",
              data_tag: str = "digits") -> dict:
    """One run of the ablation: a fresh seeded model trained with ``estimator``; its records."""
    cfg = MODES[mode]
    return trained(data, data_tag, cfg["d"], "tanh", L_H_INIT,
                   config(estimator, options, seed, cfg["epochs"], cfg["batch_size"]), KEYS)


def _stats(runs: list) -> dict:
    """Final (last epoch) and best-epoch validation accuracy over seeds: mean, std (ddof = 1)."""
    final = np.array([r["val_metric"][-1] for r in runs])
    best = np.array([max(r["val_metric"]) for r in runs])
    std = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)
    return {"acc_mean": float(final.mean()), "acc_std": std(final), "acc_per_seed": final.tolist(),
            "best_mean": float(best.mean()), "best_std": std(best),
            "forward_converged": float(np.mean([np.mean(r["forward_converged"]) for r in runs]))}


def measure(seed: int = 0, mode: str = "default") -> dict:
    """Train UPG and NPG at every grid point, and the implicit baseline, on every seed."""
    cfg = MODES[mode]
    data = digits(seed)
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    points = grid_points(cfg)
    runs = {(m, k, lam): [] for m in METHODS for k, lam in points}
    implicit = []
    t0 = time.perf_counter()
    for s in seeds:
        implicit.append(train_one(data, *IMPLICIT, s, mode, f"digits({seed})"))
        for k, lam in points:
            for m in METHODS:
                runs[m, k, lam].append(train_one(data, m, {"k": k, "lam": lam}, s, mode, f"digits({seed})"))
    wall = time.perf_counter() - t0
    rows = []
    for k, lam in points:
        row = {"k": k, "lam": lam}
        for m in METHODS:
            row[m] = {"summary": _stats(runs[m, k, lam]), "runs": runs[m, k, lam]}
        # paired by seed (same initialization and data order): UPG − NPG, final accuracy
        diff = np.array(row["upg"]["summary"]["acc_per_seed"]) - np.array(row["npg"]["summary"]["acc_per_seed"])
        row["upg_minus_npg"] = {"mean": float(diff.mean()), "per_seed": diff.tolist()}
        rows.append(row)
    return {"setting": {"mode": mode, "seed": seed, "seeds": seeds, "data": "digits (scikit-learn 8x8)",
                        "n_train": int(data.x_train.shape[0]), "n_val": int(data.x_val.shape[0]),
                        "d": cfg["d"], "d_x": data.d_x, "q": data.n_outputs, "activation": "tanh",
                        "L_h_init": L_H_INIT, "spectral_norm": SPECTRAL_NORM, "loss": "cross-entropy", "optimizer": "adam", "lr": LR,
                        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
                        "forward": {"solver": "broyden", **FORWARD},
                        "implicit_backward_iters": IMPLICIT_ITERS, "backend": "numpy float64",
                        "blas_threads": blas_threads(), "training_wall_s": wall},
            "grid": {"ks": cfg["ks"], "lams_for_k": cfg["lams_for_k"], "k_for_lam": cfg["k_for_lam"],
                     "lams": cfg["lams"], "points": [list(p) for p in points]},
            "paper": PAPER,
            "implicit": {"label": "implicit (20 Broyden)", "summary": _stats(implicit), "runs": implicit},
            "rows": rows, "pooled": pooled(rows), "noise_floor": noise_floor(rows)}


def pooled(rows: list) -> dict:
    """UPG − NPG over every (k, λ, seed) of the grid: mean, its standard error, the counts."""
    d = np.array([v for r in rows for v in r["upg_minus_npg"]["per_seed"]])
    up, down = int(np.sum(d > 0)), int(np.sum(d < 0))
    return {"n": int(d.size), "mean": float(d.mean()),
            "sem": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0,
            "upg_higher": up, "npg_higher": down, "equal": int(d.size - up - down),
            "sign_test_p": sign_test(up, down)}


def sign_test(a: int, b: int) -> float:
    """Two-sided sign test: P(a split at least this uneven | each side 1/2), ties left out
    (``scipy.stats.binomtest``; 1 when there is nothing to test)."""
    return float(stats.binomtest(a, a + b).pvalue) if a + b else 1.0


def noise_floor(rows: list) -> dict | None:
    """NPG at k = 1 over λ, per seed: max − min final accuracy (see the module docstring)."""
    k1 = [r for r in rows if r["k"] == 1]
    if len(k1) < 2:
        return None
    acc = np.array([r["npg"]["summary"]["acc_per_seed"] for r in k1])          # (n_lams, n_seeds)
    spread = acc.max(axis=0) - acc.min(axis=0)
    return {"lams": [r["lam"] for r in k1], "spread_per_seed": spread.tolist(), "max": float(spread.max())}


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    return recorded_run("ablation", measure, out, seed, mode, MODES, "plots_ablation.plot_ablation")


def row(data: dict, k: int, lam: float) -> dict:
    """The grid row at (k, λ); KeyError naming the grid when it is not there."""
    for r in data["rows"]:
        if r["k"] == k and r["lam"] == lam:
            return r
    raise KeyError(f"(k, lam) = ({k}, {lam}) is not on the grid {data['grid']['points']}")


def summary(data: dict) -> str:
    s, imp = data["setting"], data["implicit"]["summary"]
    pct = (lambda st, key="acc": f"{100 * st[key + '_mean']:5.1f} ± {100 * st[key + '_std']:3.1f}")
    lines = [f"ablation (Fig. 3 of Geng et al.): digits, d={s['d']}, {s['epochs']} epochs, batch "
             f"{s['batch_size']}, Adam lr {s['lr']:g}, seeds {s['seeds']}; final validation accuracy (%), "
             f"mean ± std; implicit baseline {pct(imp)}",
             f"  {'k':>3s} {'λ':>4s} {'UPG':>12s} {'NPG':>12s} {'UPG−NPG':>8s}   best epoch: UPG / NPG"]
    for r in data["rows"]:
        u, n = r["upg"]["summary"], r["npg"]["summary"]
        lines.append(f"  {r['k']:3d} {r['lam']:4g} {pct(u):>12s} {pct(n):>12s} "
                     f"{100 * r['upg_minus_npg']['mean']:+7.1f}   {pct(u, 'best')} / {pct(n, 'best')}")
    p, nf = data["pooled"], data["noise_floor"]
    lines.append(f"  pooled UPG − NPG over {p['n']} paired runs: {100 * p['mean']:+.2f} ± {100 * p['sem']:.2f} "
                 f"(s.e.) points; UPG higher {p['upg_higher']}, NPG higher {p['npg_higher']}, equal {p['equal']} "
                 f"(sign test p = {p['sign_test_p']:.2f})")
    if nf:
        lines.append(f"  noise floor: NPG at k = 1 over λ = {nf['lams']} (the same up to Adam's ε) differs "
                     f"by up to {100 * nf['max']:.1f} points on a seed")
    return "\n".join(lines)


def claims(data: dict) -> list:
    """Fig. 3's claims, paired by seed (every run of a seed shares its initialization and data
    order): UPG against NPG over the grid, UPG's spread over k, and k = 8 against k = 1."""
    rows, seeds = [], data["setting"]["seeds"]
    n, grid = len(seeds), data["grid"]
    per_seed = 100 * np.array([r["upg_minus_npg"]["per_seed"] for r in data["rows"]])   # (points, seeds)
    m, iv = C.mean_interval(per_seed.mean(axis=0))
    rows.append(C.claim("geng.fig3.upg_beats_npg", "Geng et al., Fig. 3 and Sec. 3",
                        "UPG trains to a higher accuracy than NPG at the same k and λ",
                        "UPG above NPG (values in the figure only)", m, C.above(ACCURACY_DELTA),
                        what="UPG − NPG (points), per seed averaged over the grid", interval=iv, n=n,
                        unit="points"))
    lam = grid["lams_for_k"][0]
    ks = [k for k in grid["ks"] if k >= 2]
    acc = 100 * np.array([row(data, k, lam)["upg"]["summary"]["acc_per_seed"] for k in ks])   # (ks, seeds)
    m, iv = C.mean_interval(acc.max(axis=0) - acc.min(axis=0))
    rows.append(C.claim("geng.fig3.upg_robust_to_k", "Geng et al., Fig. 3(b)",
                        f"UPG is robust to a wide range of unrolled steps (k = {ks}, λ = {lam:g})",
                        "robust (values in the figure only)", m, C.below(ACCURACY_DELTA),
                        what="the range of UPG's accuracy over k (points), per seed", interval=iv, n=n,
                        unit="points"))
    k_lo, k_hi = min(grid["ks"]), max(grid["ks"])
    diff = 100 * (np.array(row(data, k_hi, lam)["upg"]["summary"]["acc_per_seed"])
                  - np.array(row(data, k_lo, lam)["upg"]["summary"]["acc_per_seed"]))
    m, iv = C.mean_interval(diff)
    rows.append(C.claim("geng.sec23.large_k_preferable", "Geng et al., Sec. 2.3 and Fig. 3(a)",
                        f"a large k is preferable: UPG with k = {k_hi} trains to a higher accuracy than "
                        f"with k = {k_lo} (λ = {lam:g})", "a large k is preferable for a more accurate A",
                        m, C.above(ACCURACY_DELTA), what=f"UPG k = {k_hi} − k = {k_lo} (points)",
                        interval=iv, n=n, unit="points"))
    return rows
