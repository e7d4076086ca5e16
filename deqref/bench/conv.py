"""``python -m deqref.bench.conv``: one training step of the convolutional cell, deqref against
the same model in PyTorch + TorchDEQ 0.1.0, one run, one thread each.

The model: ``deqref.conv.ConvCell`` (MDEQ's residual block, F(z, x) = GN₃(ReLU(z + GN₂(K₂ ⋆
ReLU(GN₁(K₁ ⋆ z)) + U ⋆ x)))) on 8 × 8 images, C = 16 channels, C_x = 1, G = 4 groups,
``ConvCell.random(..., seed=0, injection=10)``; a linear head to 10 outputs
(``LinearHead.random(d, 10, seed=1)``) and the mean squared error against seeded targets;
a batch of n = 64 seeded N(0, 1) inputs. Float64 and float32.

One step, timed whole on both sides:

- forward: ``fixed_point`` from h = 0 with ``max_iter = T``, ``tol = 0`` (T + 1 evaluations of
  F, never stopping early); TorchDEQ ``fixed_point_iter`` with ``f_max_iter = T + 1``,
  ``f_tol = 0`` (``deqref.bench.torch_step`` explains the count);
- head and loss at UPG's output h_k (``gradients.output("upg", ...)``);
- backward: UPG A_{k,λ} (``estimate("upg", ...)``), k = 5, λ = 0.5; TorchDEQ ``grad=5,
  tau=0.5`` (k damped steps from z* with autograd). deqref's step runs inside
  ``shared_unrolls`` as ``deqref.train`` does, so the k steps are taken once, as TorchDEQ does.

The PyTorch side writes F with ``torch.nn.functional.conv2d`` and ``group_norm`` on the same
weights (the mapping of ``tests/test_conv_cell.py``'s ``torch_F``), the injection U ⋆ x once per
step with grad. Min, median and max of interleaved repeats after a warm-up; one BLAS thread
(threadpoolctl) and one torch thread. ``grad diff``: the max over the parameters (K₁, K₂, U,
the GroupNorm affines, the head's V and c) of max |Δ| / max |torch's|.

Where deqref's time goes: the same step split into its phases (the forward solve, UPG's k
steps, head and loss, the reverse pass), each timed alone, and by cProfile over a few steps into
its kinds of work (``PARTS``: the convolutions' copies and products, the kernel VJPs, GroupNorm
and its VJPs, ReLU, the solver's bookkeeping) and the reverse pass's three kinds of VJP.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import write_results
from ..backend import _load, to_numpy
from ..conv import ConvCell
from ..experiments.machine import limit_blas_threads
from ..gradients import estimate, output, shared_unrolls
from ..heads import LinearHead, mse
from ..solvers import ConvergenceWarning, solve

T_FORWARD, K, LAM, Q = 30, 5, 0.5, 10
SIZES = {"default": dict(C=16, H=8, W=8, G=4, n=64, repeats=9),
         "quick": dict(C=4, H=5, W=4, G=2, n=3, repeats=2)}
DTYPES = ("float64", "float32")


class Problem:
    """The cell, head, inputs and targets of one benchmark case (NumPy backend)."""

    def __init__(self, C: int, H: int, W: int, G: int, n: int, dtype: str, seed: int = 0):
        be = _load("numpy")
        self.cell = ConvCell.random(C=C, C_x=1, H=H, W=W, G=G, seed=seed, injection=10.0,
                                    dtype=dtype, backend=be)
        self.head = LinearHead.random(self.cell.d, Q, seed=seed + 1, dtype=dtype, backend=be)
        rng = np.random.default_rng(seed + 2)
        self.x = be.asarray(rng.standard_normal((n, self.cell.d_x)), dtype)
        self.y = be.asarray(rng.standard_normal((n, Q)), dtype)
        self.n, self.dtype = n, dtype

    def forward(self):
        return solve(self.cell, self.x, method="fixed_point", tol=0.0, max_iter=T_FORWARD,
                     stall_iter=None, warn=False)

    def step(self, timer=None) -> dict:
        """One training step; returns every parameter's gradient and the loss. ``timer``, when
        given, is called with a phase's name at its end (the per-phase split)."""
        mark = timer or (lambda name: None)
        with shared_unrolls():
            res = self.forward()
            mark("forward")
            h = output("upg", self.cell, self.x, res, k=K, lam=LAM)
            mark("unroll")
            loss, dL_dy = mse(self.head(h), self.y)
            grad_h, g_head = self.head.backward(h, dL_dy)
            mark("head")
            g = estimate("upg", self.cell, self.x, res, grad_h, k=K, lam=LAM)
            mark("reverse")
        return {**g.grads, **g_head, "loss": loss}


class TorchConvStep:
    """The same step in PyTorch with TorchDEQ: F from ``torch.nn.functional``, same weights."""

    def __init__(self, prob: Problem, f_max_iter: int = T_FORWARD + 1):
        import torch
        import torchdeq
        self.torch, self.fn = torch, torch.nn.functional
        tdt = {"float64": torch.float64, "float32": torch.float32}[prob.dtype]
        t = lambda a: torch.tensor(np.asarray(to_numpy(a)), dtype=tdt)     # noqa: E731
        c = self.cell = prob.cell
        self.p = {k: t(v).requires_grad_() for k, v in c.params().items()}
        self.V, self.c = t(prob.head.V).requires_grad_(), t(prob.head.c).requires_grad_()
        self.x = t(prob.x).reshape(prob.n, c.C_x, c.H, c.W)
        self.y = t(prob.y)
        self.z0 = torch.zeros(prob.n, c.C, c.H, c.W, dtype=tdt)
        self.deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=f_max_iter,
                                    f_tol=0.0, f_stop_mode="abs", grad=K, tau=LAM)
        self.deq.train()

    def F(self, z, inj):
        fn, p, c = self.fn, self.p, self.cell
        r1 = self.torch.relu(fn.group_norm(fn.conv2d(z, p["K1"], padding=1), c.G, p["gamma1"],
                                           p["beta1"], eps=c.eps))
        a3 = z + fn.group_norm(fn.conv2d(r1, p["K2"], padding=1) + inj, c.G, p["gamma2"],
                               p["beta2"], eps=c.eps)
        return fn.group_norm(self.torch.relu(a3), c.G, p["gamma3"], p["beta3"], eps=c.eps)

    def __call__(self):
        leaves = [*self.p.values(), self.V, self.c]
        for a in leaves:
            a.grad = None
        inj = self.fn.conv2d(self.x, self.p["U"], padding=1)                 # U ⋆ x, once
        z_out, _ = self.deq(lambda z: self.F(z, inj), self.z0)
        y_hat = z_out[-1].reshape(z_out[-1].shape[0], -1) @ self.V.T + self.c
        loss = self.torch.mean((y_hat - self.y) ** 2)
        loss.backward()
        return float(loss.detach())

    def grads(self) -> dict:
        out = {k: v.grad.numpy() for k, v in self.p.items()}
        return {**out, "V": self.V.grad.numpy(), "c": self.c.grad.numpy()}


def torch_available() -> str | None:
    from .torch_step import available
    return available()


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _mmm(ts) -> list:
    return [1e3 * min(ts), 1e3 * statistics.median(ts), 1e3 * max(ts)]


def interleaved(fns: dict, repeats: int) -> dict:
    """Seconds per call of each function, one warm-up each, then ``repeats`` rounds in turn."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def phases(prob: Problem, repeats: int) -> dict:
    """Median ms of each phase of deqref's step (``Problem.step``'s marks), over ``repeats``."""
    out = {k: [] for k in ("forward", "unroll", "head", "reverse")}
    for _ in range(repeats + 1):
        last = [time.perf_counter()]
        got = {}

        def mark(name):
            now = time.perf_counter()
            got[name] = now - last[0]
            last[0] = now
        prob.step(mark)
        for k, v in got.items():
            out[k].append(v)
    return {k: 1e3 * statistics.median(v[1:]) for k, v in out.items()}     # first: warm-up


# the parts of a step, as (label, module, function, "cum" or "own"): disjoint pieces of work
PARTS = (("convolutions' three row-shifted copies (row_shifts)", "conv_ops", "row_shifts",
          "cum"),
         ("convolutions' products (three per convolution)", "conv_ops", "conv2d", "own"),
         ("im2col for the kernel VJPs (nine shifted copies)", "conv_ops", "im2col", "cum"),
         ("kernel VJPs Σ_n g_n cols_nᵀ", "conv_ops", "conv2d_vjp_kernel", "cum"),
         ("GroupNorm forward", "conv_ops", "group_norm", "cum"),
         ("GroupNorm VJPs", "conv_ops", "group_norm_vjp", "cum"),
         ("ReLU and its masks", "conv_ops", "relu", "cum"),
         ("", "conv_ops", "relu_prime", "cum"),
         ("solver bookkeeping (residual norms, stopping tests)", "result", "record", "cum"),
         ("", "result", "finish", "cum"))


def profile(prob: Problem, steps: int) -> dict:
    """cProfile over ``steps`` steps: ms per step of each of ``PARTS`` (a function's own time,
    or its time with what it calls), and of everything else together."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        prob.step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    parts, label = {}, None
    for name, mod, func, kind in PARTS:
        label = name or label
        for (file, _, f), (_, _, tottime, cumtime, _) in stats.items():
            if Path(file).stem == mod and f == func:
                parts[label] = parts.get(label, 0.0) + (cumtime if kind == "cum" else tottime)
    parts = {k: 1e3 * v / steps for k, v in parts.items()}
    reverse = {f: 1e3 * sum(v[3] for (file, _, fn), v in stats.items()
                            if Path(file).stem == "conv_linear" and fn == f) / steps
               for f in ("vjp_h", "vjp_theta", "vjp_x")}
    parts["everything else (Python, reshapes, the unrolled steps' sums, head, checks)"] = (
        1e3 * total / steps - sum(parts.values()))
    return {"per_step_ms": parts, "reverse_ms": reverse, "profiled_step_ms": 1e3 * total / steps}


def measure(sizes: dict, log=print) -> tuple:
    rows, where = [], {}
    reason = torch_available()
    if reason is None:
        import torch
        torch.set_num_threads(1)
    else:
        log(f"bench conv: PyTorch side skipped ({reason})")
    geo = {k: sizes[k] for k in ("C", "H", "W", "G", "n")}
    for dtype in DTYPES:
        prob = Problem(**geo, dtype=dtype)
        fns = {"deqref": prob.step}
        if reason is None:
            ts = TorchConvStep(prob)
            fns["torch"] = ts
        times = interleaved(fns, sizes["repeats"])
        res = prob.forward()
        rates = [r[-1] / r[-2] for r in res.rel_residual]
        row = {"dtype": dtype, **geo, "d": prob.cell.d, "d_theta": prob.cell.d_theta,
               "T": T_FORWARD, "k": K, "lam": LAM,
               "forward_rel_residual_max": float(res.final_rel_residual.max()),
               "forward_rate_max": float(max(rates)),
               "deqref_ms": _mmm(times["deqref"])}
        if "torch" in times:
            row["torch_ms"] = _mmm(times["torch"])
            row["ratio"] = row["deqref_ms"][1] / row["torch_ms"][1]
            ours = prob.step()
            same = TorchConvStep(prob, f_max_iter=T_FORWARD)     # returns h_T, as deqref does
            loss_t = same()
            theirs = same.grads()
            row["grad_rel_diff"] = max(_rel(ours[k], v) for k, v in theirs.items())
            row["grad_rel_diff_per_param"] = {k: _rel(ours[k], v) for k, v in theirs.items()}
            row["loss_rel_diff"] = abs(ours["loss"] - loss_t) / abs(loss_t)
            ts()                                      # the timed one: one more update, h_{T+1}
            row["grad_rel_diff_timed"] = max(_rel(ours[k], v) for k, v in ts.grads().items())
        rows.append(row)
        where[dtype] = {"phases_ms": phases(prob, sizes["repeats"]),
                        **profile(prob, max(2, sizes["repeats"] // 3))}
    return rows, where


def markdown(data: dict) -> str:
    s, m = data["sizes"], data["machine"]
    load = m["loadavg_1_5_15min"]
    busy = (" — a 1-minute load above 1 on this machine: other processes shared the cores, "
            "so the times are noisier and likely higher than on an idle machine"
            if load and load[0] > 1 else "")
    out = [f"# The conv cell's training step: deqref against PyTorch + TorchDEQ ({data['mode']})",
           "",
           f"Run {data['date']} on {m['cpu']} ({m['cores']} cores, load {load} at the start, "
           f"{data.get('load_end')} at the end{busy}); 1 BLAS thread, 1 torch thread; "
           f"{s['repeats']} interleaved repeats after a warm-up.",
           f"ConvCell (MDEQ's residual block) on {s['H']} × {s['W']} images, C = {s['C']}, "
           f"C_x = 1, G = {s['G']}, injection 10, batch n = {s['n']}; linear head to {Q} outputs, "
           f"MSE. One step = forward ({T_FORWARD} fixed-point updates, tol 0: {T_FORWARD + 1} "
           f"evaluations of F; TorchDEQ f_max_iter = {T_FORWARD + 1}) + head + loss + UPG "
           f"A_{{{K},{LAM}}} backward (TorchDEQ grad={K}, tau={LAM}). ms as min / median / max; "
           "ratio = deqref / TorchDEQ medians (goal: ≤ 1.5). grad diff: max over K₁, K₂, U, the "
           "GroupNorm affines and the head of max |Δ| / max |PyTorch's|. residual: the forward's "
           "largest relative residual ‖F(h) − h‖ / ‖F(h)‖ after its updates.", "",
           "| dtype | d | d_θ | deqref ms | TorchDEQ ms | ratio | grad diff | residual |",
           "|---|---|---|---|---|---|---|---|"]
    fmt = lambda t: " / ".join(f"{v:.1f}" for v in t)                     # noqa: E731
    for r in data["rows"]:
        theirs = fmt(r["torch_ms"]) if "torch_ms" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        diff = f"{r['grad_rel_diff']:.1e}" if "grad_rel_diff" in r else "—"
        out.append(f"| {r['dtype']} | {r['d']} | {r['d_theta']} | {fmt(r['deqref_ms'])} | "
                   f"{theirs} | {ratio} | {diff} | {r['forward_rel_residual_max']:.1e} |")
    out += ["", "## Where deqref's time goes", ""]
    for dtype, w in data["where"].items():
        ph = w["phases_ms"]
        total = sum(ph.values())
        out.append(f"{dtype}: forward {ph['forward']:.1f} ms ({T_FORWARD + 1} evaluations of F, "
                   f"{ph['forward'] / (T_FORWARD + 1):.2f} ms each, the solver's residuals "
                   f"included), UPG's {K} steps {ph['unroll']:.1f} ms (F with its "
                   f"intermediates kept), head and loss {ph['head']:.2f} ms, reverse pass "
                   f"{ph['reverse']:.1f} ms ({K - 1} ∂F/∂h VJPs and {K} parameter and input "
                   f"VJPs); {total:.1f} ms in all (phases timed alone, median of "
                   f"{s['repeats']}). By cProfile ({w['profiled_step_ms']:.1f} ms a step under "
                   "the profiler), ms per step: "
                   + "; ".join(f"{k} {v:.1f}" for k, v in w["per_step_ms"].items()) + ". "
                   f"In the reverse pass, ∂F/∂h VJPs take {w['reverse_ms']['vjp_h']:.1f} ms, "
                   f"the parameter VJPs {w['reverse_ms']['vjp_theta']:.1f} ms and the input "
                   f"VJPs {w['reverse_ms']['vjp_x']:.1f} ms: each runs its own pass back "
                   "through GN₃ and GN₂ (and the parameter VJP through K₂ and GN₁ too), the "
                   "pass the ∂F/∂h VJP at that state (4 of the 5) has already made.")
        out.append("")
    r = data["rows"][0]
    out += ["## Notes", "",
            f"- Convergence: the plain iteration converges at this cell (injection 10) but "
            f"slowly: after {T_FORWARD} updates the largest relative residual is "
            f"{max(x['forward_rel_residual_max'] for x in data['rows']):.1e}, shrinking by at "
            f"most {max(x['forward_rate_max'] for x in data['rows']):.2f} per update. It is a "
            "timing benchmark: both sides make the same number of evaluations of F whatever "
            "the residual.",
            f"- grad diff compares deqref with TorchDEQ run with f_max_iter = {T_FORWARD}: "
            "TorchDEQ's fixed_point_iter returns the lowest-residual F(z_k), here the last, "
            f"so after {T_FORWARD} evaluations it holds F^{T_FORWARD}(0) = deqref's h_{T_FORWARD} "
            f"(deqref evaluates F(h_{T_FORWARD}) too, for the residual, but returns "
            f"h_{T_FORWARD}). The timed TorchDEQ run (f_max_iter = {T_FORWARD + 1}, the same "
            f"{T_FORWARD + 1} evaluations as deqref) returns one update more; its gradients "
            "differ from deqref's by "
            + ", ".join(f"{x['grad_rel_diff_timed']:.1e} ({x['dtype']})" for x in data["rows"]
                        if "grad_rel_diff_timed" in x)
            + ", the size of that last update. float32 differs from PyTorch by float32 "
            "rounding (eps 6e-8) through 36 evaluations of F with GroupNorm's 1/σ.",
            "- deqref runs the step inside `shared_unrolls` (as `deqref.train` does), so "
            "UPG's 5 steps are taken once for the loss's state and the backward, as TorchDEQ "
            "takes them once."]
    if data.get("notes"):
        out += data["notes"]
    return "\n".join(out).rstrip() + "\n"


NOTES = ["- deqref's convolutions (`conv_ops.conv2d`) copy their input three times, shifted by "
         "a column either way with a zero row above and below, and sum three products over "
         "strided windows of those copies (one per kernel row), instead of building im2col's "
         "nine shifted copies; the kernel VJPs still take im2col's columns. PyTorch's "
         "convolutions and GroupNorm are compiled kernels; deqref's are NumPy array programs."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deqref.bench.conv",
                                 description="The conv cell's training step (UPG) against "
                                             "PyTorch + TorchDEQ (one thread each).")
    ap.add_argument("--quick", action="store_true", help="tiny images and batch, seconds")
    ap.add_argument("--out", default=None, help="write conv.json and conv.md here")
    a = ap.parse_args(argv)
    mode = "quick" if a.quick else "default"
    from ..experiments.machine import machine
    import os
    info = machine()
    with warnings.catch_warnings(), limit_blas_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)     # tol 0: set iteration counts
        t0 = time.perf_counter()
        rows, where = measure(SIZES[mode])
    data = {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": info, "load_end": [round(v, 2) for v in os.getloadavg()],
            "sizes": SIZES[mode], "rows": rows, "where": where, "notes": NOTES,
            "total_s": time.perf_counter() - t0}
    md = markdown(data)
    print(md)
    if a.out:
        write_results(a.out, "conv", data, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
