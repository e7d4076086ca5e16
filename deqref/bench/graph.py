"""``python -m deqref.bench.graph``: the backward of each estimator on the IGNN graph cell, deqref
against the same model in PyTorch autograd, one run, one thread each.

The model: ``deqref.graph.GraphCell``, F(H) = tanh(W H Â + Ω X Â) on one graph of N nodes
(a seeded random graph, mean degree about 6, Â its ``normalized_adjacency``), m state channels,
p input features, ‖W‖∞ λ_pf(Â) = κ = 0.5 (so the forward contracts by at most 0.5 per step).
The upstream gradient is a seeded G = ∂L/∂H, i.e. the loss L = ⟨G, H⟩ at the point each
estimator takes it (h* for implicit, NPG, JFB and GDEQ, h_k for UPG).

Timed: everything after the forward, from the same h* (50 fixed-point iterations from 0, tol 0;
GDEQ from a Broyden solve): deqref's ``estimate``, and on the PyTorch side the same work with
autograd (``TorchIGNN``: what TorchDEQ's backward hooks do): implicit = 20 fixed-point adjoint
iterations, UPG and NPG A_{5,0.5}, JFB. GDEQ has no PyTorch counterpart. The vector forms never
build the (m·N)² Kronecker Jacobian. Min, median and max of interleaved repeats; one BLAS thread
and one torch thread. ``grad diff``: max relative difference of ∂L/∂W and ∂L/∂Ω between sides.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings

import numpy as np

from . import write_results
from ..backend import _load, to_numpy
from ..experiments.machine import limit_blas_threads
from ..gradients import estimate
from ..graph import GraphCell, normalized_adjacency
from ..solvers import ConvergenceWarning, solve

T_FORWARD, K, LAM, N_IMPLICIT = 50, 5, 0.5, 20
SIZES = {"default": dict(N=1000, m=32, p=16, repeats=7), "quick": dict(N=60, m=8, p=4, repeats=2)}
ESTIMATORS = {"implicit": {"method": "fixed_point", "n_iter": N_IMPLICIT, "tol": 0.0},
              "upg": {"k": K, "lam": LAM}, "npg": {"k": K, "lam": LAM}, "jfb": {}, "gdeq": {}}
TORCH = ("implicit", "upg", "npg", "jfb")


def random_graph(N: int, seed: int, degree: float = 6.0) -> np.ndarray:
    """A seeded undirected 0/1 adjacency (N, N): each pair joined with probability degree/N,
    plus a ring so that the graph is connected."""
    rng = np.random.default_rng(seed)
    A = np.triu(rng.random((N, N)) < degree / N, 1)
    ring = np.roll(np.eye(N, dtype=bool), 1, axis=1)
    A = A | ring | ring.T
    A = np.triu(A, 1)
    return (A | A.T).astype(np.float64)


class Problem:
    """The graph cell, its input, one forward result (fixed point and Broyden) and G."""

    def __init__(self, N: int, m: int, p: int, seed: int = 0):
        be = _load("numpy")
        A_hat = normalized_adjacency(random_graph(N, seed))[None]          # (1, N, N)
        self.cell = GraphCell.random(m, p, A_hat, "tanh", seed=seed, kappa=0.5, backend=be)
        rng = np.random.default_rng(seed + 1)
        self.x = rng.standard_normal((1, p * N))                          # vec(X), (1, p·N)
        self.G = rng.standard_normal((1, m * N))                          # ∂L/∂h
        self.fp = solve(self.cell, self.x, method="fixed_point", tol=0.0, max_iter=T_FORWARD)
        self.broyden = solve(self.cell, self.x, method="broyden", tol=0.0, max_iter=T_FORWARD)
        self.N, self.m, self.p = N, m, p

    def backward(self, name):
        res = self.broyden if name == "gdeq" else self.fp
        return lambda: estimate(name, self.cell, self.x, res, self.G, **ESTIMATORS[name])


class TorchIGNN:
    """The same F in PyTorch on a dense Â, (Hᵀ)' = tanh(Âᵀ Hᵀ Wᵀ + Âᵀ Xᵀ Ωᵀ), and each
    estimator's backward written with autograd from the same h* — the work TorchDEQ's backward
    hooks do (``grad=k, tau=λ``: k damped steps with autograd from z*; ``ift=True`` with a
    fixed-point ``b_solver``: VJPs y ← ∂F/∂h · y + g, then one VJP in θ), timed from h* on, as
    deqref's ``estimate`` is (UPG's k steps included on both sides)."""

    def __init__(self, prob: Problem):
        import torch
        self.torch = torch
        t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)    # noqa: E731
        c = prob.cell
        self.W = t(to_numpy(c.W)).requires_grad_()
        self.Omega = t(to_numpy(c.Omega)).requires_grad_()
        self.AT = t(to_numpy(c.A_hat)[0].T)                                # Âᵀ (N, N)
        self.Xt = t(prob.x.reshape(prob.N, prob.p))                        # Xᵀ (N, p)
        self.Gt = t(prob.G.reshape(prob.N, prob.m))                        # Gᵀ (N, m)
        self.Ht = t(to_numpy(prob.fp.h).reshape(prob.N, prob.m))           # h*ᵀ (N, m)

    def F(self, Ht):
        return self.torch.tanh(self.AT @ (Ht @ self.W.T) + self.AT @ (self.Xt @ self.Omega.T))

    def backward(self, name) -> dict:
        torch, params = self.torch, (self.W, self.Omega)
        z = self.Ht.clone()
        if name == "upg":                                                  # Algorithm 1
            for _ in range(K):
                z = LAM * self.F(z) + (1 - LAM) * z
            g = torch.autograd.grad(torch.sum(self.Gt * z), params)
        elif name == "jfb":
            g = torch.autograd.grad(self.F(z), params, self.Gt)
        else:                                                              # implicit, npg
            z.requires_grad_()
            f = self.F(z)
            vjp = lambda v: torch.autograd.grad(f, z, v, retain_graph=True)[0]   # noqa: E731
            if name == "implicit":                     # y_0 = 0: y_1 = g, then 19 more VJPs
                y = self.Gt
                for _ in range(N_IMPLICIT - 1):
                    y = vjp(y) + self.Gt
                g = torch.autograd.grad(f, params, y)
            else:                                                          # Algorithm 2
                y = self.Gt
                for _ in range(K - 1):
                    y = self.Gt + LAM * vjp(y) + (1 - LAM) * y
                g = [LAM * a for a in torch.autograd.grad(f, params, y)]
        return {"W": g[0].numpy(), "Omega": g[1].numpy()}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def measure(sizes: dict, log=print) -> list:
    prob = Problem(sizes["N"], sizes["m"], sizes["p"])
    sides = {(name, "deqref"): prob.backward(name) for name in ESTIMATORS}
    try:
        import torch
        torch.set_num_threads(1)
        tm = TorchIGNN(prob)
        for name in TORCH:
            sides[(name, "torch")] = lambda name=name: tm.backward(name)
    except ImportError as err:
        log(f"bench graph: PyTorch side skipped ({err})")
    times = {key: [] for key in sides}
    for fn in sides.values():                                              # one warm-up each
        fn()
    for _ in range(sizes["repeats"]):                                      # interleaved
        for key, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rows = []
    products = _product_times(prob, sizes["repeats"])
    for name in ESTIMATORS:
        ours = times[(name, "deqref")]
        row = {"estimator": name, "N": prob.N, "m": prob.m, "p": prob.p, "d": prob.m * prob.N,
               "deqref_ms": [1e3 * min(ours), 1e3 * statistics.median(ours), 1e3 * max(ours)]}
        if (name, "torch") in times:
            theirs = times[(name, "torch")]
            row["torch_ms"] = [1e3 * min(theirs), 1e3 * statistics.median(theirs),
                               1e3 * max(theirs)]
            row["ratio"] = row["deqref_ms"][1] / row["torch_ms"][1]
            g = prob.backward(name)()
            row["grad_rel_diff"] = max(_rel(g.grads[k], v) for k, v in sides[(name, "torch")]().items())
        rows.append(row)
    return rows, products


def _product_times(prob: Problem, repeats: int) -> dict:
    """The median time of one product Â (V ⊙ S)ᵀ — (N, N) by (N, m), the unit of work every
    estimator here repeats — with NumPy's BLAS and with PyTorch's, in ms."""
    rng = np.random.default_rng(2)
    A, R = to_numpy(prob.cell.A_hat)[0], rng.standard_normal((prob.N, prob.m))
    fns = {"numpy": lambda: A @ R}
    try:
        import torch
        tA, tR = torch.tensor(A), torch.tensor(R)
        fns["torch"] = lambda: tA @ tR
    except ImportError:
        pass
    out = {}
    for k, f in fns.items():
        f()
        ts = []
        for _ in range(max(repeats, 5)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        out[k] = 1e3 * statistics.median(ts)
    return out


def markdown(data: dict) -> str:
    s = data["sizes"]
    out = [f"# The graph cell's backward: deqref against PyTorch autograd ({data['mode']})", "",
           f"Run {data['date']} on {data['machine']['cpu']} ({data['machine']['cores']} cores, "
           f"load {data['machine']['loadavg_1_5_15min']}); 1 BLAS thread, 1 torch thread; "
           f"{s['repeats']} interleaved repeats after a warm-up.",
           f"IGNN cell F(H) = tanh(W H Â + Ω X Â), one graph, N = {s['N']} nodes, m = {s['m']}, "
           f"p = {s['p']} (d = m·N = {s['m'] * s['N']}), ‖W‖∞ λ_pf(Â) = 0.5; forward "
           f"{T_FORWARD} fixed-point iterations; implicit = {N_IMPLICIT} fixed-point adjoint "
           f"iterations; UPG and NPG A_{{{K},{LAM}}}. Backward alone, ms as min / median / max; "
           "ratio = deqref / PyTorch medians (goal: ≤ 1). Both sides start from the same h* and "
           "time everything after it (UPG's k unrolled steps included); the PyTorch side is "
           "autograd doing what TorchDEQ's backward hooks do. grad diff: max relative "
           "difference of ∂L/∂W, ∂L/∂Ω between the sides.", "",
           "| estimator | deqref ms | PyTorch ms | ratio | grad diff |", "|---|---|---|---|---|"]
    fmt = lambda t: " / ".join(f"{v:.2f}" for v in t)                     # noqa: E731
    for r in data["rows"]:
        theirs = fmt(r["torch_ms"]) if "torch_ms" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        diff = f"{r['grad_rel_diff']:.1e}" if "grad_rel_diff" in r else "—"
        out.append(f"| {r['estimator']} | {fmt(r['deqref_ms'])} | {theirs} | {ratio} | {diff} |")
    pm = data.get("product_ms", {})
    if pm:
        out += ["", "One product Â (V ⊙ S)ᵀ, (N, N) by (N, m), the unit of work every estimator "
                "repeats: " + ", ".join(f"{k} {v:.2f} ms" for k, v in pm.items())
                + " (the BLAS each side calls; implicit makes about 21 of them on either side)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deqref.bench.graph",
                                 description="The graph cell's backward per estimator against "
                                             "PyTorch + TorchDEQ (one thread each).")
    ap.add_argument("--quick", action="store_true", help="a small graph (N = 60), seconds")
    ap.add_argument("--out", default=None, help="write graph.json and graph.md here")
    a = ap.parse_args(argv)
    mode = "quick" if a.quick else "default"
    from ..experiments.machine import machine
    with warnings.catch_warnings(), limit_blas_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)     # tol 0: set iteration counts
        t0 = time.perf_counter()
        rows, products = measure(SIZES[mode])
    data = {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(), "sizes": SIZES[mode], "rows": rows, "product_ms": products,
            "total_s": time.perf_counter() - t0}
    md = markdown(data)
    print(md)
    if a.out:
        write_results(a.out, "graph", data, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
