"""Table 3 of Geng et al.: a convolutional DEQ trained by implicit differentiation and by UPG.

With and without Jacobian regularization: accuracy, training and backward speed-up, peak memory.

Geng et al. train MDEQ on CIFAR-10 and ImageNet, and (in their slides' version of Table 3) a DEQ
transformer on Wikitext-103:

| task          | method                   | paper: metric        | training speed-up | peak memory |
|---------------|--------------------------|----------------------|-------------------|-------------|
| CIFAR-10      | MDEQ + implicit          | 93.8 ± 0.17 %        | 1×                | 1×          |
| CIFAR-10      | MDEQ + UPG A_{5,0.5}     | 95.0 ± 0.16 %        | 1.4×              | 0.5×        |
| ImageNet      | MDEQ + implicit / UPG    | 75.3 / 75.0 %        | 1× / 1.7×         | 1× / 1×     |
| Wikitext-103  | DEQ + JR + implicit      | 24.5 ppl             | 1.7×              |             |
| Wikitext-103  | DEQ + JR + UPG A_{5,0.8} | 24.4 ppl             | 2.2×              |             |

(speed-ups over plain implicit differentiation; the slides add "12× acceleration for the
backward"). deqref's teaching-scale version, the same for every method but the backward:

- data: ``data.digits(seed)`` — scikit-learn's 8 × 8 digits as 1 × 8 × 8 images, x rows
  (n, 64) in [0, 1]; the first ``n_train`` training and ``n_val`` validation images of that split;
- model: the convolutional cell ``ConvCell`` (MDEQ's residual block, one resolution, C channels,
  G GroupNorm groups; h rows (n, C·64)), and ``LinearHead`` on the whole state h* (C·64 → 10;
  no pooling: at 8 × 8 the position of a stroke is the feature), cross-entropy;
- initialization (``init_cell``): ``ConvCell.random(..., injection=10)`` (the injection kernel
  U × 10) and GN₃'s affine (γ₃, β₃) × 0.5. GroupNorm makes F scale invariant, so no projection
  makes it a contraction (``ConvCell.project`` is a no-op); what decides whether the iteration settles is
  how much of GN₂'s input comes from the input x rather than from h, and the gain γ₃ of the
  residual path. With injection 1 and γ₃ as drawn, Broyden converges on no sample of a batch in
  60 iterations (C = 8; plain iteration's residual stalls near 5 %); with this scaling it
  converges to 1e-4 in about 11 (C = 8) to 14 (C = 4) iterations at initialization.
  Convergence is recorded all along training, not assumed;
- forward: Broyden's method (memory 30) to relative residual 1e-4, at most 18 iterations
  (GDEQ's forward budget), the same for every method;
- backward: implicit = the papers' baseline, the adjoint y = ∂F/∂h y + g by exactly 20 Broyden
  iterations; UPG A_{5,0.5} (k = 5, λ = 0.5, the loss at h_k as Algorithm 1);
- Jacobian regularization (Bai et al. 2021; ``deqref.jacobian_reg``): the loss adds
  λ_JR · R, R = ‖∂F/∂h‖_F² / d at h* averaged over the batch, estimated by Hutchinson's
  estimator with one Gaussian probe per sample (as Bai et al.), its gradient at fixed h*;
  λ_JR = 1; the probes are seeded by the run's seed and the step;
- optimizer: Adam, lr 5e-3, batch 64, the same shuffling for every method of a seed;
- seeds: seed, seed + 1, … (model, head, shuffling, probes); accuracy = validation accuracy
  after the last epoch;
- sizes (``MODES``): default C = 4, G = 2, 320 / 256 images, 2 epochs (10 steps), 3 seeds;
  ``full`` C = 8, G = 4, all 1,438 / 359 images, 10 epochs (230 steps), 3 seeds; ``quick``
  C = 4, 128 / 64 images, 1 epoch, 2 seeds;
- timing: per step, forward = solve + output (UPG's k steps) + loss, backward = head backward +
  estimator (+ the JR gradient), update = Adam; NumPy float64, BLAS on one thread; every method
  first runs one warm-up step, and the methods are interleaved seed by seed in an order rotated
  by one per seed. A run's time is its median step (forward + backward + update), which a
  passing load spike on a shared machine does not move, and its backward's the median backward
  step; the speed-ups are implicit's over the method's, paired by seed;
- peak memory (``memory``): on the first batch of seed ``seed`` at initialization, after the
  same forward solve, ``tracemalloc``'s peak while the method computes its gradient from h*
  (UPG: its k unrolled steps and their VJPs; implicit: the 20-iteration adjoint; with JR: plus
  the penalty's gradient), above what was allocated before — the backward's own memory, as
  ``complexity`` measures it. Geng et al.'s 0.5× is of the whole training protocol, where
  implicit differentiation's peak is its unrolled pre-training (their Sec. 5); deqref has no
  pre-training, so this compares the backward passes alone.

References: Geng et al., On Training Implicit Models, NeurIPS 2021, Table 3 (and its slides);
Bai, Koltun, Kolter, Multiscale Deep Equilibrium Models, NeurIPS 2020; Bai, Koltun, Kolter,
Stabilizing Equilibrium Models by Jacobian Regularization, ICML 2021.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np

from .. import claims as C
from .. import jacobian_reg as jr
from ..backend import _load, backend_of, to_numpy
from ..conv import ConvCell
from ..data import Dataset, digits
from ..gradients import estimate, output, shared_unrolls
from ..heads import LinearHead, cross_entropy
from ..solvers import ConvergenceWarning, solve
from ..train import Adam
from . import complexity
from .machine import blas_threads, recorded_run

TIMED = True                   # its claims rest on wall-clock times: deqref reproduce runs it alone

MODES = {
    "quick": dict(C=4, G=2, n_train=128, n_val=64, epochs=1, n_seeds=2, batch_size=64),
    "default": dict(C=4, G=2, n_train=320, n_val=256, epochs=2, n_seeds=3, batch_size=64),
    "full": dict(C=8, G=4, n_train=1438, n_val=359, epochs=10, n_seeds=3, batch_size=64),
}
LR = 5e-3
FORWARD = {"tol": 1e-4, "max_iter": 18, "m": 30}          # Broyden, GDEQ's 18 forward iterations
IMPLICIT_ITERS = 20                                        # backward Broyden iterations, as in GDEQ
INJECTION = 10.0                                           # ConvCell.random(injection=...)
INIT = {"gamma3": 0.5, "beta3": 0.5}                       # then GN₃'s affine scaled
JR_WEIGHT = 1.0                                            # λ_JR
JR_PROBES = 1                                              # Hutchinson probes per sample

# name: (estimator, options, with JR, label)
METHODS = {
    "implicit": ("implicit", {"method": "broyden", "n_iter": IMPLICIT_ITERS}, False, "implicit (20 Broyden)"),
    "upg": ("upg", {"k": 5, "lam": 0.5}, False, "UPG A_{5,0.5}"),
    "implicit_jr": ("implicit", {"method": "broyden", "n_iter": IMPLICIT_ITERS}, True, "JR + implicit"),
    "upg_jr": ("upg", {"k": 5, "lam": 0.5}, True, "JR + UPG A_{5,0.5}"),
}

# the paper's numbers (Table 3 and its slides): metric, training speed-up over implicit, peak memory
PAPER = {
    "implicit": {"metric": "93.8 ± 0.17 % (CIFAR-10)", "speedup": "1×", "memory": "1×",
                 "short": "CIFAR-10: 93.8 %, 1×, mem 1×"},
    "upg": {"metric": "95.0 ± 0.16 % (CIFAR-10)", "speedup": "1.4× (CIFAR-10), 1.7× (ImageNet)",
            "memory": "0.5× (CIFAR-10), 1× (ImageNet)", "short": "CIFAR-10: 95.0 %, 1.4×, mem 0.5×"},
    "implicit_jr": {"metric": "24.5 ppl (Wikitext-103)", "speedup": "1.7× (Wikitext-103)", "memory": "—",
                    "short": "Wikitext-103: 24.5 ppl, 1.7×"},
    "upg_jr": {"metric": "24.4 ppl (Wikitext-103, A_{5,0.8})", "speedup": "2.2× (Wikitext-103)",
               "memory": "—", "short": "Wikitext-103: 24.4 ppl, 2.2×"},
}


# ---------------------------------------------------------------- the model
def init_cell(C: int, G: int, seed: int) -> ConvCell:
    """``ConvCell.random(C, 1, 8, 8, G, seed=seed, injection=INJECTION)`` with γ₃, β₃ scaled
    by ``INIT``."""
    cell = ConvCell.random(C=C, C_x=1, H=8, W=8, G=G, seed=seed, injection=INJECTION)
    return cell.with_params({k: v * INIT.get(k, 1.0) for k, v in cell.params().items()})


def init_head(cell: ConvCell, seed: int) -> LinearHead:
    return LinearHead.random(cell.d, 10, seed=seed + 7919)


# ---------------------------------------------------------------- one step and one run
def _recorded(fn, *args, **kwargs):
    """``(fn(...), ConvergenceWarning messages)``: flags are counted, not printed per batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        out = fn(*args, **kwargs)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def gradient(name: str, cell, x, res, dh, probe_seed: int) -> tuple[dict, list]:
    """The method's ∂L/∂θ of the cell from h* (``res``) and ∂L/∂h, plus λ_JR ∂R/∂θ with JR:
    (grads by parameter name, flag lines)."""
    est, opts, with_jr, _ = METHODS[name]
    g, flags = _recorded(estimate, est, cell, x, res, dh, **opts)
    grads = dict(g.grads)
    if with_jr:
        g_jr = jr.penalty_grad(cell, res.h, x, method="hutchinson", n_probes=JR_PROBES, seed=probe_seed)
        grads = {k: v + JR_WEIGHT * g_jr[k] for k, v in grads.items()}
    return grads, flags


def _forward(name, cell, head, x, y):
    """Solve, the method's output h (h_k for UPG), loss; (res, h_out, loss, ∂L/∂ŷ, flags)."""
    est, opts, _, _ = METHODS[name]
    res, flags = _recorded(solve, cell, x, method="broyden", warn=True, **FORWARD)
    h_out, more = _recorded(output, est, cell, x, res, **opts)
    if not bool(cell.xp.all(cell.xp.isfinite(h_out))):
        raise FloatingPointError(f"conv_deq: {name}'s output h is not finite")
    loss, dy = cross_entropy(head(h_out), y)
    return res, h_out, loss, dy, flags + more


def _accuracy(cell, head, x, y) -> tuple[float, float, float]:
    """(accuracy, loss, fraction converged) at h* on (x, y), the training forward."""
    res, _ = _recorded(solve, cell, x, method="broyden", warn=True, **FORWARD)
    logits = head(res.h)
    hits = np.argmax(to_numpy(logits), axis=1) == to_numpy(y)
    return (float(np.mean(hits)), cross_entropy(logits, y)[0],
            float(res.converged.mean()))


def train_run(name: str, data: Dataset, C: int, G: int, seed: int, epochs: int, batch_size: int,
              n_steps: int | None = None) -> dict:
    """Train ``init_cell(C, G, seed)`` and its head with method ``name``; the per-epoch record.
    ``n_steps`` stops after that many steps (the warm-up)."""
    cell, head = init_cell(C, G, seed), init_head(init_cell(C, G, seed), seed)
    opt = Adam(LR)
    rng = np.random.default_rng(seed + 104729)             # the shuffling: the same for every method
    n = data.x_train.shape[0]
    n_batches = math.ceil(n / batch_size)
    keys = ("train_loss", "time_forward", "time_backward", "time_epoch", "forward_iters",
            "forward_converged", "forward_unconverged", "flagged_batches", "jr_penalty",
            "step_time", "step_forward", "step_backward")
    rec = {k: [] for k in keys}
    rec["flag_examples"], rec["seed"] = [], seed
    step = 0
    t_run = time.perf_counter()
    be = backend_of(data.x_train)
    with shared_unrolls():
        for epoch in range(epochs):
            perm = rng.permutation(n)
            t = dict.fromkeys(("forward", "backward", "update"), 0.0)
            loss_sum = iters = conv = penalty = 0.0
            unconv = flagged = 0
            for i in range(n_batches):
                idx = be.from_host(perm[i * batch_size:(i + 1) * batch_size])
                x, y = be.xp.take(data.x_train, idx, axis=0), be.xp.take(data.y_train, idx, axis=0)
                m = x.shape[0]
                t0 = time.perf_counter()
                res, h_out, loss, dy, flags = _forward(name, cell, head, x, y)
                t1 = time.perf_counter()
                dh, head_grads = head.backward(h_out, dy)
                grads, more = gradient(name, cell, x, res, dh, probe_seed=seed * 100003 + step)
                t2 = time.perf_counter()
                new = opt.step({**cell.params(), "V": head.V, "c": head.c}, {**grads, **head_grads})
                t3 = time.perf_counter()
                bad = [k for k, v in new.items() if not bool(be.xp.all(be.xp.isfinite(v)))]
                if bad:
                    raise FloatingPointError(f"conv_deq: {name} seed {seed} diverged at epoch {epoch}, "
                                             f"batch {i}: parameters {bad} not finite")
                if METHODS[name][2]:                        # the penalty, for the record (not timed)
                    penalty += jr.penalty(cell, res.h, x, method="hutchinson", n_probes=JR_PROBES,
                                          seed=seed * 100003 + step) * m
                cell = cell.with_params({k: new[k] for k in cell.PARAMS})
                head = LinearHead(new["V"], new["c"])
                for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
                    t[k] += dt
                rec["step_time"].append(t3 - t0)
                rec["step_forward"].append(t1 - t0)
                rec["step_backward"].append(t2 - t1)
                loss_sum += loss * m
                iters += float(res.n_iter.mean()) * m
                conv += float(res.converged.mean()) * m
                unconv += int((~res.converged).sum())
                lines = [f for f in flags + more if "forward solve" not in f and not f.startswith("broyden")]
                flagged += int(bool(lines))
                rec["flag_examples"] += [f for f in lines[:1] if len(rec["flag_examples"]) < 3]
                step += 1
                if n_steps is not None and step >= n_steps:
                    return rec
            for k, v in (("train_loss", loss_sum / n), ("time_forward", t["forward"]),
                         ("time_backward", t["backward"]), ("time_epoch", sum(t.values())),
                         ("forward_iters", iters / n), ("forward_converged", conv / n),
                         ("forward_unconverged", unconv), ("flagged_batches", flagged),
                         ("jr_penalty", penalty / n if METHODS[name][2] else None)):
                rec[k].append(v)
    rec["val_acc"], rec["val_loss"], rec["val_converged"] = _accuracy(cell, head, data.x_val, data.y_val)
    rec["wall_s"] = time.perf_counter() - t_run
    n_bad, n_flag = sum(rec["forward_unconverged"]), sum(rec["flagged_batches"])
    if n_bad or n_flag or rec["val_converged"] < 1:            # one warning per run, as ``train``
        warnings.warn(f"conv_deq: {METHODS[name][3]} seed {seed}: the forward did not converge for "
                      f"{n_bad} training sample(s) over {epochs} epoch(s) and for "
                      f"{1 - rec['val_converged']:.1%} of the validation images; {n_flag} batch(es) "
                      f"had a flagged gradient", ConvergenceWarning, stacklevel=2)
    return rec


# ---------------------------------------------------------------- the backward's memory
def _peak_bytes(fn) -> int:
    """tracemalloc's peak while ``fn()`` runs, above what was allocated before (NumPy's buffers;
    ``complexity._peak_bytes`` on the host)."""
    return complexity._peak_bytes(fn, _load("numpy"))


def memory(data: Dataset, C: int, G: int, seed: int, batch_size: int, repeats: int = 2) -> dict:
    """Peak bytes and median time of each method's gradient from h* on one batch (see the
    module docstring); the forward solve is shared and measured once."""
    cell, head = init_cell(C, G, seed), init_head(init_cell(C, G, seed), seed)
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    res, _ = _recorded(solve, cell, x, method="broyden", warn=True, **FORWARD)

    def backward(name):
        est, opts, _, _ = METHODS[name]
        with shared_unrolls():                                  # UPG's unroll: fresh every call
            h_out, _ = _recorded(output, est, cell, x, res, **opts)
            _, dy = cross_entropy(head(h_out), y)
            dh, _ = head.backward(h_out, dy)
            gradient(name, cell, x, res, dh, probe_seed=seed)

    out = {"forward_peak_bytes": _peak_bytes(
        lambda: _recorded(solve, cell, x, method="broyden", warn=True, **FORWARD)),
        "forward_iters": float(res.n_iter.mean()), "forward_converged": float(res.converged.mean())}
    for name in METHODS:
        backward(name)                                          # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backward(name)
            ts.append(time.perf_counter() - t0)
        out[name] = {"peak_bytes": _peak_bytes(lambda: backward(name)), "time_s": float(np.median(ts))}
    return out


# ---------------------------------------------------------------- the experiment
def _summary_of(runs: list, ref: list | None) -> dict:
    acc = np.array([r["val_acc"] for r in runs])
    t_st = np.array([np.median(r["step_time"]) for r in runs])
    t_bw = np.array([np.median(r["step_backward"]) for r in runs])
    out = {"acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
           "acc_per_seed": acc.tolist(), "time_step_s": t_st.tolist(), "time_backward_step_s": t_bw.tolist(),
           "forward_iters": float(np.mean([np.mean(r["forward_iters"]) for r in runs])),
           "forward_iters_last": float(np.mean([r["forward_iters"][-1] for r in runs])),
           "forward_converged": float(np.mean([np.mean(r["forward_converged"]) for r in runs])),
           "val_converged": float(np.mean([r["val_converged"] for r in runs])),
           "flagged_batches": int(sum(sum(r["flagged_batches"]) for r in runs))}
    if ref is not None:
        out["speedup_train"] = float(np.exp(np.mean(np.log(
            [np.median(a["step_time"]) / np.median(r["step_time"]) for a, r in zip(ref, runs)]))))
        out["speedup_backward"] = float(np.exp(np.mean(np.log(
            [np.median(a["step_backward"]) / np.median(r["step_backward"]) for a, r in zip(ref, runs)]))))
    return out


def measure(seed: int = 0, mode: str = "default") -> dict:
    """Train every method on every seed and measure the backward's memory; JSON-ready."""
    cfg = MODES[mode]
    data = digits(seed).subset(cfg["n_train"], cfg["n_val"])
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    names = list(METHODS)
    for name in names:                                           # warm-up: one step each
        train_run(name, data, cfg["C"], cfg["G"], seed, 1, cfg["batch_size"], n_steps=1)
    runs = {name: [] for name in names}
    for i, s in enumerate(seeds):            # interleaved, order rotated per seed: noise is shared
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(train_run(name, data, cfg["C"], cfg["G"], s, cfg["epochs"], cfg["batch_size"]))
    mem = memory(data, cfg["C"], cfg["G"], seed, cfg["batch_size"])
    methods = {name: {"label": METHODS[name][3], "estimator": METHODS[name][0],
                      "options": METHODS[name][1], "jr": METHODS[name][2], "paper": PAPER[name],
                      "summary": _summary_of(runs[name], runs["implicit"]),
                      "memory": mem[name], "runs": runs[name]} for name in names}
    cell = init_cell(cfg["C"], cfg["G"], seed)
    return {"setting": {"mode": mode, "seed": seed, "seeds": seeds, "data": "digits (scikit-learn 8x8), 1 x 8 x 8 images",
                        "n_train": cfg["n_train"], "n_val": cfg["n_val"], "C": cfg["C"], "G": cfg["G"],
                        "d": cell.d, "d_x": cell.d_x, "d_theta": cell.d_theta, "head": "LinearHead on h* (d -> 10)",
                        "injection": INJECTION, "init_scale": INIT, "loss": "cross-entropy", "optimizer": "adam", "lr": LR,
                        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
                        "forward": {"solver": "broyden", **FORWARD}, "implicit_backward_iters": IMPLICIT_ITERS,
                        "jr": {"weight": JR_WEIGHT, "probes": JR_PROBES, "estimator": "hutchinson",
                               "penalty": "||dF/dh||_F^2 / d at h*, batch mean"},
                        "backend": "numpy float64", "blas_threads": blas_threads(),
                        "timer": "time.perf_counter per step (evaluation excluded); median step, median backward step"},
            "memory": {"forward_peak_bytes": mem["forward_peak_bytes"], "forward_iters": mem["forward_iters"],
                       "forward_converged": mem["forward_converged"], "batch_size": cfg["batch_size"]},
            "methods": methods}


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    # on NumPy: tracemalloc sees its buffers
    return recorded_run("conv_deq", measure, out, seed, mode, MODES, "plots_conv.plot_conv_deq",
                        backend="numpy")


def summary(data: dict) -> str:
    s = data["setting"]
    lines = [f"conv_deq (Table 3 of Geng et al.): ConvCell C={s['C']}, G={s['G']} on digits "
             f"({s['n_train']} train / {s['n_val']} val), {s['epochs']} epochs, batch {s['batch_size']}, "
             f"Adam lr {s['lr']:g}, seeds {s['seeds']}; Broyden forward (tol {s['forward']['tol']:g}, "
             f"≤ {s['forward']['max_iter']} it.); JR λ = {s['jr']['weight']:g}, {s['jr']['probes']} probe",
             f"  {'method':22s} {'val acc (%)':>13s} {'fwd it':>6s} {'conv':>5s} {'flag':>4s} "
             f"{'train sp.':>9s} {'bwd sp.':>7s} {'bwd MiB':>7s}  paper"]
    for name, m in data["methods"].items():
        r = m["summary"]
        lines.append(f"  {m['label']:22s} {100 * r['acc_mean']:6.1f} ± {100 * r['acc_std']:4.1f} "
                     f"{r['forward_iters']:6.1f} {100 * r['forward_converged']:4.0f}% {r['flagged_batches']:4d} "
                     f"{r['speedup_train']:8.2f}× {r['speedup_backward']:6.2f}× "
                     f"{m['memory']['peak_bytes'] / 2**20:7.2f}  {m['paper']['metric']}, {m['paper']['speedup']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- claims
ACCURACY_DELTA = 1.0     # points: an accuracy difference below this counts as none
SPEED_DELTA = 0.1        # a speed-up below 1.1× counts as none
MEMORY_DELTA = 0.1       # a memory ratio within 1 ± 0.1 counts as the same
ITERS_DELTA = 0.5
SLIDES = "Geng et al., Table 3 (slides)"     # the JR rows and the backward's 12× are in the slides        # forward iterations per sample: a smaller difference counts as none


def _per_seed(data: dict, name: str, what: str) -> np.ndarray:
    runs = data["methods"][name]["runs"]
    if what == "acc":
        return 100 * np.array([r["val_acc"] for r in runs])
    if what == "iters":
        return np.array([r["forward_iters"][-1] for r in runs])
    if what == "backward":
        return np.array([np.median(r["step_backward"]) for r in runs])
    return np.array([np.median(r["step_time"]) for r in runs])


def claims(data: dict) -> list:
    """Table 3's rows, paired by seed: UPG's accuracy against implicit's (no worse by more than
    ACCURACY_DELTA points), its training and backward speed-ups (above 1 + SPEED_DELTA), its
    backward's peak memory against implicit's (clearly less: below 1 − MEMORY_DELTA; comparable
    or less: below 1 + MEMORY_DELTA; one deterministic measurement); with JR, the forward's
    iterations with and without it and the speed-ups of JR + implicit and
    JR + UPG over plain implicit and JR + UPG's accuracy against JR + implicit's."""
    rows, n = [], len(data["setting"]["seeds"])
    acc, ep, bw, it = ({k: _per_seed(data, k, w) for k in data["methods"]}
                       for w in ("acc", "step", "backward", "iters"))
    lab = {k: m["label"] for k, m in data["methods"].items()}
    lab["implicit"] = "implicit differentiation"

    def accuracy(cid, a, b, paper, source="Geng et al., Table 3"):
        m, iv = C.mean_interval(acc[a] - acc[b])
        return C.claim(cid, source, f"{lab[a]} trains a convolutional DEQ to an accuracy "
                       f"comparable to {lab[b]}'s or better", paper, m, C.above(-ACCURACY_DELTA),
                       what=f"{lab[a]} − {lab[b]} (points)", interval=iv, n=n, unit="points")

    def speedup(cid, a, t, kind, paper, source="Geng et al., Table 3"):
        m, iv = C.ratio_interval(t["implicit"] / t[a])
        text = "trains faster" if kind == "training" else "runs its backward faster"
        return C.claim(cid, source, f"{lab[a]} {text} than implicit differentiation "
                       "(convolutional DEQ)", paper, m, C.above(1 + SPEED_DELTA),
                       what=f"the {kind} speed-up of {lab[a]} over implicit (×)", interval=iv,
                       n=n, unit="×")

    rows.append(accuracy("geng.table3.conv_upg_accuracy", "upg", "implicit", "95.0 against 93.8 (CIFAR-10)"))
    rows.append(speedup("geng.table3.conv_upg_speedup", "upg", ep, "training", "1.4× (CIFAR-10), 1.7× (ImageNet)"))
    rows.append(speedup("geng.table3.conv_upg_backward_speedup", "upg", bw, "backward",
                        "12× (\"12× acceleration for the backward\")", SLIDES))
    mem = {k: m["memory"]["peak_bytes"] for k, m in data["methods"].items()}
    ratio, what = mem["upg"] / mem["implicit"], "UPG's backward peak bytes / implicit's (tracemalloc, one batch)"
    note = "the backward alone: the paper's peak includes implicit's unrolled pre-training"
    rows.append(C.claim("geng.table3.conv_upg_memory_half", "Geng et al., Table 3",
                        "UPG A_{5,0.5} needs clearly less peak memory than implicit differentiation "
                        "(convolutional DEQ, CIFAR-10's row)", "0.5× (CIFAR-10)", ratio,
                        C.below(1 - MEMORY_DELTA), what=what, unit="×", n=1, note=note))
    rows.append(C.claim("geng.table3.conv_upg_memory_comparable", "Geng et al., Table 3 and Sec. 5",
                        "UPG A_{5,0.5} needs comparable or less peak memory than implicit differentiation "
                        "(convolutional DEQ)", "0.5× (CIFAR-10), 1× (ImageNet)", ratio,
                        C.below(1 + MEMORY_DELTA), what=what, unit="×", n=1, note=note))
    rows.append(speedup("geng.table3.conv_jr_implicit_speedup", "implicit_jr", ep, "training",
                        "1.7× (Wikitext-103, DEQ transformer)", SLIDES))
    rows.append(speedup("geng.table3.conv_jr_upg_speedup", "upg_jr", ep, "training",
                        "2.2× (Wikitext-103, DEQ transformer)", SLIDES))
    rows.append(accuracy("geng.table3.conv_jr_upg_accuracy", "upg_jr", "implicit_jr",
                         "24.4 against 24.5 perplexity (Wikitext-103)", SLIDES))
    m, iv = C.mean_interval(it["implicit"] - it["implicit_jr"])
    rows.append(C.claim("geng.table3.conv_jr_fewer_iterations", f"{SLIDES} (JR rows; Bai et al. 2021)",
                        "Jacobian regularization lowers the forward solver's iteration count, the source "
                        "of the JR rows' speed-up (convolutional DEQ)", "1.7× with JR + implicit (Wikitext-103)",
                        m, C.above(ITERS_DELTA), what="implicit's − JR + implicit's mean forward iterations "
                        "in the last epoch", interval=iv, n=n, unit="iterations"))
    return rows
