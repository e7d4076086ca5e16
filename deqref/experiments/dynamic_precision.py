"""Figure 2 of Geng et al.: cos(phantom, exact) along a training run trained with the implicit gradient.

What the paper did (Sec. 3, "Precision of the Phantom Gradient", ablation setting): MDEQ-Tiny
(170K parameters) on CIFAR-10, trained by implicit differentiation under MDEQ's official schedule
(Broyden forward and backward); at the training steps it computes the cosine between the phantom
gradient and the exact gradient, UPG (Eq. 17) and NPG (Eq. 18), and plots their distribution
against training steps (x: cosine, y: training step). Its claims: (i) along real training the
phantom gradient stays a descent direction ("large cosine similarity"); (ii) UPG matches the exact
gradient better than NPG, as in the synthetic setting. The extracted text names no (k, λ) for the
figure; the ablation setting's phantom gradient is A_{5,0.5} (Sec. 3, Tab. 1), so deqref shows
A_{5,0.5} and adds A_{10,0.5} (larger k) and A_{5,1} (no damping). The plotted values are not in
the text, so only the two claims are compared.

What deqref does instead, at teaching scale (numbers are the default mode):

- data: ``data.digits(seed)`` — scikit-learn's 8 × 8 digits, 1,438 training / 359 validation
  images (the real data set standing in for CIFAR-10);
- model: ``DEQModel.random(d, 64, 10, "tanh", seed=seed, L_h=0.9)``, F(h, x) = tanh(W h + U x + b)
  with ‖W‖₂ = 0.9 at initialization and kept ≤ 0.9 by projection after every update (as in
  ``accuracy_speed``), a linear head, cross-entropy; d = 64
  (quick 16, full 128) — the same model and optimizer as ``accuracy_speed``;
- training: the papers' implicit baseline, the adjoint y = ∂F/∂h y + g by 20 Broyden iterations
  (``estimate("implicit", method="broyden", n_iter=20)``); Adam lr 5e-3, batch 64, 10 epochs
  (quick 2, full 30), i.e. 230 steps;
- forward: Broyden (memory 30) to relative residual 1e-4, at most 18 iterations ("tight"), and a
  second run whose forward is cut at 3 Broyden iterations ("inexact h*": it never reaches 1e-4;
  with ‖W‖₂ ≤ 0.9 the layer contracts fast enough that a cut at 5 left a median relative
  residual of only 1e-3), since the paper's UPG-vs-NPG claim is about the forward error;
- "exact": the trainer's reference, the dense oracle of Eq. (4) (a ``scipy.linalg.solve`` per
  sample) at the solver's output h and the same batch, ∂L/∂h taken at h. This is the gradient the
  paper's implicit training would use at that h. With it, NPG → exact as k → ∞ even at an inexact
  h (it uses ∂F/∂h at h), while UPG's k steps move on towards the true h* — the static-precision
  experiment measures against the true h* instead;
- at every step: cos(UPG, exact) and cos(NPG, exact) for each (k, λ), with the upstream g = ∂L/∂h
  at h for every estimator; and cos(training gradient, exact), the paper's cross-check between its
  exact gradient and 20 Broyden iterations;
- cosines are of the batch-summed ∂L/∂θ (θ = [vec W, vec U, b]); 2 seeds by default (full: 3);
  the claims (``claims``) take one number per run (a median or a share of steps), since the
  steps of one run are not independent.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021, Sec. 3 and Fig. 2.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .. import claims as C
from ..data import digits
from ..solvers import solve
from ..train import DEQModel, TrainConfig, train
from .accuracy_speed import SPECTRAL_NORM
from .machine import blas_threads, recorded_run

MODES = {
    "quick": dict(d=16, epochs=2, n_seeds=1, batch_size=64),
    "default": dict(d=64, epochs=10, n_seeds=2, batch_size=64),
    "full": dict(d=128, epochs=30, n_seeds=3, batch_size=64),
}
LR, L_H_INIT = 5e-3, 0.9
TRAIN_ESTIMATOR = ("implicit", {"method": "broyden", "n_iter": 20})     # the papers' baseline
FORWARDS = {   # name: Broyden options
    "tight": {"tol": 1e-4, "max_iter": 18, "m": 30},
    "inexact": {"tol": 1e-4, "max_iter": 3, "m": 30},
}
KLAMS = {"tight": [(5, 0.5), (10, 0.5), (5, 1.0)], "inexact": [(5, 0.5)]}
PAPER_KLAM = (5, 0.5)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
HIST_KEYS = ("train_loss", "train_metric", "val_loss", "val_metric", "forward_iters",
             "forward_converged", "time_epoch")


def probe_name(method: str, k: int, lam: float) -> str:
    """The probe's label in the trainer: estimator ``method`` under "@k…,lam…"."""
    return f"{method}@k{k},lam{lam:g}"


def per_epoch(values, epochs: int) -> dict:
    """Quantiles, mean, min and the fraction > 0 of per-step ``values``, epoch by epoch.

    The trainer takes the same number of steps in every epoch (ceil(n / batch)), so step s
    belongs to epoch s // (steps / epochs)."""
    v = np.asarray(values, dtype=float)
    if v.size % epochs:
        raise ValueError(f"values: {v.size} steps do not split into {epochs} equal epochs")
    e = v.reshape(epochs, -1)                                          # (epochs, steps per epoch)
    return {"quantiles": {f"{q:g}": np.quantile(e, q, axis=1).tolist() for q in QUANTILES},
            "mean": e.mean(axis=1).tolist(), "min": e.min(axis=1).tolist(),
            "frac_positive": (e > 0).mean(axis=1).tolist()}


def overall(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "q10": float(np.quantile(v, 0.1)),
            "q90": float(np.quantile(v, 0.9)), "mean": float(v.mean()), "min": float(v.min()),
            "max": float(v.max()), "frac_positive": float((v > 0).mean()), "n": int(v.size)}


def forward_residual(model: DEQModel, x, fwd: dict) -> dict:
    """Relative residual ‖F(h) − h‖/‖F(h)‖ of the trained model's forward on x (the validation set)."""
    r = solve(model.layer, x, method="broyden", warn=False, **fwd).final_rel_residual
    return {"median": float(np.median(r)), "max": float(np.max(r))}


def train_run(data, d: int, seed: int, epochs: int, batch_size: int, fwd: dict, klams) -> dict:
    """One training run with the implicit gradient; per-step cosines of every probe to the exact."""
    probes = {probe_name(m, k, lam): {"k": k, "lam": lam} for k, lam in klams for m in ("upg", "npg")}
    est, opts = TRAIN_ESTIMATOR
    cfg = TrainConfig(estimator=est, estimator_options=dict(opts), solver="broyden",
                      solver_options=dict(fwd), optimizer="adam", lr=LR, epochs=epochs,
                      batch_size=batch_size, seed=seed, spectral_norm=SPECTRAL_NORM,
                      track_cosine=True, label=f"dynamic_precision {fwd['max_iter']} it. seed {seed}",
                      probes={n: dict(o) for n, o in probes.items()})
    model = DEQModel.random(d, data.d_x, data.n_outputs, "tanh", seed=seed, L_h=L_H_INIT)
    t0 = time.perf_counter()
    hist = train(model, data, cfg)
    wall = time.perf_counter() - t0
    cos = dict(hist["probe_cosine"])
    cos["train"] = hist["step_cosine"]                       # cos(20 Broyden adjoint, dense)
    rec = {"seed": seed, "wall_s": wall, "forward": dict(fwd),
           "steps_per_epoch": math.ceil(data.x_train.shape[0] / min(batch_size, data.x_train.shape[0])),
           "klams": [list(kl) for kl in klams], "step_cosine": cos,
           "per_epoch": {name: per_epoch(c, epochs) for name, c in cos.items()},
           "overall": {name: overall(c) for name, c in cos.items()},
           "final_forward_residual_val": forward_residual(model, data.x_val, fwd),
           **{k: hist[k] for k in HIST_KEYS}}
    for k, lam in klams:                                     # UPG − NPG, step by step
        diff = np.subtract(cos[probe_name("upg", k, lam)], cos[probe_name("npg", k, lam)])
        rec.setdefault("upg_minus_npg", {})[f"k{k},lam{lam:g}"] = {
            "median": float(np.median(diff)), "mean": float(diff.mean()),
            "max_abs": float(np.abs(diff).max()), "frac_upg_higher": float((diff > 0).mean())}
    return rec


def measure(seed: int = 0, mode: str = "default") -> dict:
    cfg = MODES[mode]
    data = digits(seed)
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    runs = {name: [train_run(data, cfg["d"], s, cfg["epochs"], cfg["batch_size"], fwd, KLAMS[name])
                   for s in seeds] for name, fwd in FORWARDS.items()}
    return {"setting": {"mode": mode, "seed": seed, "seeds": seeds, "data": "digits (scikit-learn 8x8)",
                        "n_train": int(data.x_train.shape[0]), "n_val": int(data.x_val.shape[0]),
                        "d": cfg["d"], "d_x": data.d_x, "q": data.n_outputs, "activation": "tanh",
                        "L_h_init": L_H_INIT, "spectral_norm": SPECTRAL_NORM, "loss": "cross-entropy", "optimizer": "adam", "lr": LR,
                        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
                        "train_estimator": {"name": TRAIN_ESTIMATOR[0], **TRAIN_ESTIMATOR[1]},
                        "forwards": {n: {"solver": "broyden", **f} for n, f in FORWARDS.items()},
                        "klams": {n: [list(kl) for kl in v] for n, v in KLAMS.items()},
                        "paper_klam": list(PAPER_KLAM), "quantiles": list(QUANTILES),
                        "exact": "dense oracle Eq. (4) (scipy solve per sample) at the solver's h, same batch",
                        "upstream": "g = dL/dh at the solver's h for every estimator",
                        "cosine_of": "batch-summed dL/dtheta, theta = [vec W, vec U, b]",
                        "backend": "numpy float64", "blas_threads": blas_threads()},
            "runs": runs,
            "paper": {"claims": ["phantom gradients keep a large cosine to the exact gradient along "
                                 "training (a descent direction)",
                                 "UPG matches the exact gradient better than NPG"],
                      "setting": "MDEQ-Tiny (170K parameters), CIFAR-10, trained by implicit "
                                 "differentiation under MDEQ's official schedule"}}


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    """Train, write dynamic_precision.{json,png} into ``out``."""
    return recorded_run("dynamic_precision", measure, out, seed, mode, MODES,
                        "plots_precision.plot_dynamic_precision")


def summary(data: dict) -> str:
    s = data["setting"]
    lines = [f"dynamic_precision (Fig. 2 of Geng et al.): digits, d={s['d']}, {s['epochs']} epochs, "
             f"trained with implicit (20 Broyden), seeds {s['seeds']}; cos(phantom, dense exact) per step",
             f"  {'forward':8s} {'estimator':14s} {'median':>7s} {'q10':>7s} {'q90':>7s} {'min':>7s} "
             f"{'cos>0':>6s}  val acc  fwd conv"]
    for fname, runs in data["runs"].items():
        for r in runs:
            tag = f"{fname}" + (f" s{r['seed']}" if len(runs) > 1 else "")
            names = [probe_name(m, k, lam) for k, lam in r["klams"] for m in ("upg", "npg")] + ["train"]
            for name in names:
                o = r["overall"][name]
                label = "implicit(20B)" if name == "train" else name.upper().replace("@K", " k").replace("LAM", "λ")
                lines.append(f"  {tag:8s} {label:14s} {o['median']:7.4f} {o['q10']:7.4f} {o['q90']:7.4f} "
                             f"{o['min']:7.4f} {100 * o['frac_positive']:5.1f}%  "
                             f"{100 * r['val_metric'][-1]:5.1f}%  {100 * np.mean(r['forward_converged']):5.1f}%")
            for key, dd in r["upg_minus_npg"].items():
                lines.append(f"  {tag:8s} UPG − NPG ({key}): median {dd['median']:+.2e}, max |·| "
                             f"{dd['max_abs']:.2e}, UPG higher on {100 * dd['frac_upg_higher']:.0f}% of steps")
    return "\n".join(lines)


LARGE_COSINE = 0.8      # deqref's reading of "a large cosine" (Fig. 2 plots no values in the text)
DESCENT_SHARE = 0.95    # "a descent direction along training": cos > 0 on at least this share of steps
COSINE_DELTA = 0.01     # a difference of cosines below this counts as none


def claims(data: dict) -> list:
    """Fig. 2's claims at the paper's A_{5,0.5}, per seed (one training run each): the cosine
    to the exact gradient stays positive and large along training, and UPG is closer than NPG
    where the forward is inexact (paired step by step, the median per seed)."""
    rows, tag = [], probe_name("upg", *PAPER_KLAM)
    tight, inexact = data["runs"]["tight"], data["runs"]["inexact"]
    n = len(tight)
    share = [r["overall"][tag]["frac_positive"] for r in tight]
    rows.append(C.claim("geng.fig2.descent", "Geng et al., Fig. 2",
                        "the phantom gradient is a descent direction along training: cos(UPG A_{5,0.5}, "
                        "exact) > 0", "positive along training", share, C.above(DESCENT_SHARE),
                        what="the share of training steps with cos > 0, on every seed", n=n))
    m, iv = C.mean_interval([r["overall"][tag]["median"] for r in tight])
    rows.append(C.claim("geng.fig2.large_cosine", "Geng et al., Fig. 2",
                        "the phantom gradient keeps a large cosine to the exact gradient along training",
                        "a large cosine (values in the figure only)", m, C.above(LARGE_COSINE),
                        what="the median cosine of a run (UPG A_{5,0.5})", interval=iv, n=n))
    key = "k{},lam{:g}".format(*PAPER_KLAM)
    m, iv = C.mean_interval([r["upg_minus_npg"][key]["median"] for r in inexact])
    rows.append(C.claim("geng.fig2.upg_closer_than_npg", "Geng et al., Fig. 2",
                        "UPG matches the exact gradient better than NPG (forward cut at "
                        f"{data['setting']['forwards']['inexact']['max_iter']} Broyden iterations)",
                        "UPG closer than NPG", m, C.above(COSINE_DELTA),
                        what="the median over steps of cos(UPG) − cos(NPG), per seed", interval=iv, n=n))
    return rows
