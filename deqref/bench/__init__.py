"""``deqref bench``: what each estimator costs, how close deqref comes to the bare matrix work,
deqref against TorchDEQ, CuPy against NumPy, and the matrix forms' build time.

Benchmarks, not tests: results go to ``OUT/bench.json`` and ``OUT/bench.md`` (default
``benchmarks/results/``) with the machine they ran on. Every ratio is taken side by side in one
run: the callables compared are run round-robin (interleaved) after one warm-up each, and the
median over the repeats is kept. Threads: NumPy's BLAS (``threadpoolctl``) and PyTorch
(``torch.set_num_threads``) get the same count, all cores unless ``DEQREF_BENCH_THREADS`` says.

The model everywhere: F(h, x) = tanh(h Wᵀ + x Uᵀ + b), ``Layer.random(d, d_x=d, L_h=0.9)``,
a linear head to q = 10 outputs and the mean squared error. A *training step* is forward solve
+ head + loss + the estimator's backward (no optimizer update). Sections:

1. ``cost``: backward time and tracemalloc peak of UPG, NPG (k = 5, λ = 0.5), JFB, GDEQ, BPTT
   relative to ``implicit`` (20 Broyden backward iterations, memory 30), and the whole step.
   Forward: 30 Broyden iterations (tol 0), except BPTT: 30 fixed-point iterations, stored.
2. ``efficiency``: bare array calls (``deqref.bench.bare``) / deqref, per solver and estimator.
3. ``torch``: deqref / TorchDEQ time per training step, forward 30 fixed-point iterations,
   UPG (k = 5, λ = 0.5) and implicit (20 fixed-point backward iterations), float64 / float32.
4. ``gpu``: when CuPy sees a GPU: section 1 and 2 on CuPy, CuPy vs NumPy at d = 2048,
   n = 1024, and deqref-on-CuPy / TorchDEQ-on-CUDA when torch sees CUDA. Skipped otherwise.
5. ``matrix``: time to build A of UPG and NPG (``form="matrix"``, n = 1, d_x = 16).
6. ``fair`` (``deqref.bench.fair``): deqref against TorchDEQ and against the machine's limit (the
   time of exactly the products and activations the work needs), one thread each in one process
   as the headline, several threads with each framework in its own process; min, median and max
   of many interleaved repeats, and the gradient agreement of both sides. Written to ``OUT/fair.json``
   and ``OUT/fair.md`` as well; ``deqref bench --only fair`` runs this section alone.

Sections 1–5 run with the thread count below in one process; where TorchDEQ is compared there,
its time swings with the threads of both libraries competing for the cores (section 6 says how
much), so section 6's one-thread table is the comparison to quote.

Every solve here runs a set number of iterations (tol 0), as the papers' timings do, so none of
them "converges" in deqref's sense: the ``ConvergenceWarning`` each would raise is silenced for the
run (``run`` below); the estimators' values and costs are what is measured, not their flags.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..backend import Backend, _load, to_numpy
from ..experiments.machine import blas_libraries, limit_blas_threads
from ..gradients import estimate, output
from ..heads import LinearHead, mse
from ..layers import Layer
from ..solvers import ConvergenceWarning, solve
from . import bare

K, LAM = 5, 0.5                 # UPG / NPG: A_{5, 0.5}
N_IMPLICIT = 20                 # backward iterations of the implicit baseline
M = 30                          # Broyden memory (deqref's default)
T_FORWARD = 30                  # forward iterations (fixed, tol = 0)
Q = 10                          # head outputs
ESTIMATORS = ("implicit", "upg", "npg", "jfb", "gdeq", "bptt")
# Speed-ups over implicit differentiation that the papers report (MDEQ on CIFAR-10 / ImageNet, GPUs):
# Geng et al. Table 3 (training 1.4x CIFAR-10, 1.7x ImageNet; peak memory 0.5x on CIFAR-10) and
# their slides ("12x acceleration for the backward"); GDEQ Table 2 (training, 18 forward and 20
# backward Broyden iterations).
PAPER = {
    "upg": "step 1.4-1.7x, backward ~12x, memory 0.5x",
    "npg": "step 1.71x",
    "jfb": "step 1.97x",
    "gdeq": "step 2.16x",
    "bptt": "",
    "implicit": "baseline",
}

SIZES = {
    "quick": dict(cost_d=[16, 32], cost_n=8, eff=[(32, 16)], torch_d=[16], torch_n=8,
                  matrix_d=[8, 16], gpu_big=(64, 32), repeats=3, matrix_repeats=1),
    "default": dict(cost_d=[64, 256, 1024], cost_n=64, eff=[(512, 256), (1024, 256)],
                    torch_d=[64, 256, 1024], torch_n=64, matrix_d=[64, 128, 256],
                    gpu_big=(2048, 1024), repeats=7, matrix_repeats=3),
}


# ------------------------------------------------------------------ timing
def _bar(items, desc: str):
    """A tqdm bar over a section's sizes, with the time left, on a terminal only."""
    return tqdm(list(items), desc=f"bench {desc}", unit="size", file=sys.stderr, disable=None,
                leave=False)


def _sync(be: Backend):
    if be.name == "cupy":
        import cupy
        return cupy.cuda.Device().synchronize
    return lambda: None


def interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """Median wall time (s) of each callable, run round-robin ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
        sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def peak_bytes(fn) -> int:
    """Peak bytes allocated while ``fn()`` runs, above the level before it (tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


def _threads() -> int:
    raw = os.environ.get("DEQREF_BENCH_THREADS", str(os.cpu_count() or 1))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"DEQREF_BENCH_THREADS must be an integer >= 1, got {raw!r}")
    return int(raw)


# ------------------------------------------------------------------ the model
class Problem:
    """Layer, head, data on one backend: x (n, d_x), targets y (n, Q)."""

    def __init__(self, be: Backend, d: int, n: int, *, d_x: int | None = None,
                 dtype: str = "float64", seed: int = 0):
        d_x = d if d_x is None else d_x
        self.be, self.d, self.n, self.d_x, self.dtype = be, d, n, d_x, dtype
        self.layer = Layer.random(d, d_x, "tanh", seed=seed, L_h=0.9, dtype=dtype, backend=be)
        self.head = LinearHead.random(d, Q, seed=seed + 1, dtype=dtype, backend=be)
        rng = np.random.default_rng(seed + 2)
        self.x = be.asarray(rng.standard_normal((n, d_x)), dtype)
        self.y = be.asarray(rng.standard_normal((n, Q)), dtype)
        self.g = be.asarray(rng.standard_normal((n, d)), dtype)      # an upstream ∂L/∂h

    def forward(self, method: str, trajectory: bool = True):
        """T_FORWARD iterations of ``method`` from h = 0 (tol = 0: never stops early); the
        fixed-point iterates are kept when ``trajectory`` (BPTT differentiates through them)."""
        if method == "broyden":
            return solve(self.layer, self.x, method="broyden", m=M, tol=0.0, max_iter=T_FORWARD,
                         stall_iter=None, warn=False)
        return solve(self.layer, self.x, method="fixed_point", tol=0.0, max_iter=T_FORWARD,
                     stall_iter=None, warn=False, return_trajectory=trajectory)

    def options(self, name: str) -> dict:
        if name in ("upg", "npg"):
            return {"k": K, "lam": LAM}
        if name == "implicit":
            return {"method": "broyden", "n_iter": N_IMPLICIT, "tol": 0.0}
        return {}

    def step(self, name: str, opts: dict | None = None, forward: str | None = None):
        """One training step: forward, head, loss, the estimator's backward. Returns the Gradient."""
        opts = self.options(name) if opts is None else opts
        forward = forward or ("fixed_point" if name == "bptt" else "broyden")
        res = self.forward(forward, trajectory=name == "bptt")
        h = output(name, self.layer, self.x, res, **opts)
        y_hat = self.head(h)
        _, dL_dy = mse(y_hat, self.y)
        grad_h, _ = self.head.backward(h, dL_dy)
        return estimate(name, self.layer, self.x, res, grad_h, **opts)


# ------------------------------------------------------------------ 1. cost per estimator
def cost(be: Backend, sizes: dict, repeats: int, memory: bool = True) -> list:
    rows = []
    sync = _sync(be)
    for d in _bar(sizes["cost_d"], f"1. cost ({be.name})"):
        p = Problem(be, d, sizes["cost_n"])
        res = {"broyden": p.forward("broyden"), "fixed_point": p.forward("fixed_point")}
        res_of = lambda name: res["fixed_point" if name == "bptt" else "broyden"]   # noqa: E731
        back = {name: (lambda name=name: estimate(name, p.layer, p.x, res_of(name), p.g,
                                                  **p.options(name))) for name in ESTIMATORS}
        step = {name: (lambda name=name: p.step(name)) for name in ESTIMATORS}
        t_back = interleaved(back, repeats, sync)
        t_step = interleaved(step, repeats, sync)
        m_back = {n_: peak_bytes(f) for n_, f in back.items()} if memory else {}
        m_step = {n_: peak_bytes(f) for n_, f in step.items()} if memory else {}
        for name in ESTIMATORS:
            rows.append({
                "d": d, "n": p.n, "estimator": name,
                "backward_s": t_back[name], "step_s": t_step[name],
                "backward_peak_bytes": m_back.get(name), "step_peak_bytes": m_step.get(name),
                "backward_speedup": t_back["implicit"] / t_back[name],
                "step_speedup": t_step["implicit"] / t_step[name],
                "backward_memory_ratio": (m_back[name] / m_back["implicit"]) if memory else None,
                "step_memory_ratio": (m_step[name] / m_step["implicit"]) if memory else None,
            })
    return rows


# ------------------------------------------------------------------ 2. efficiency
def _module(be: Backend):
    if be.name == "cupy":
        import cupy
        return cupy
    return np


def _rel(a, b) -> float:
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def efficiency(be: Backend, sizes: dict, repeats: int) -> list:
    xp, sync, rows = _module(be), _sync(be), []
    for d, n in _bar(sizes["eff"], f"2. efficiency ({be.name})"):
        p = Problem(be, d, n)
        L, x, g = p.layer, p.x, p.g
        W, U, b = L.W, L.U, L.b
        h0 = xp.zeros((n, d), dtype=W.dtype)
        rb, rf = p.forward("broyden"), p.forward("fixed_point")
        h = rb.h
        Us, Vs = rb.B_inv.Us, rb.B_inv.Vs
        est = lambda name, r=rb: estimate(name, L, x, r, g, **p.options(name))   # noqa: E731
        cases = {
            "forward fixed_point (30 it.)": (
                lambda: solve(L, x, method="fixed_point", tol=0.0, max_iter=T_FORWARD,
                              stall_iter=None, warn=False),
                lambda: bare.fixed_point(xp, W, U, b, x, h0, T_FORWARD), "h"),
            "forward broyden (30 it., m=30)": (
                lambda: solve(L, x, method="broyden", m=M, tol=0.0, max_iter=T_FORWARD,
                              stall_iter=None, warn=False),
                lambda: bare.broyden_forward(xp, W, U, b, x, h0, T_FORWARD, M), "h"),
            "implicit (broyden, 20 it.)": (
                lambda: est("implicit"),
                lambda: bare.implicit_broyden(xp, W, U, b, x, h, g, N_IMPLICIT, M), "g"),
            "implicit (fixed_point, 20 it.)": (
                lambda: estimate("implicit", L, x, rb, g, method="fixed_point", n_iter=N_IMPLICIT,
                                 tol=0.0),
                lambda: bare.implicit_fixed_point(xp, W, U, b, x, h, g, N_IMPLICIT), "g"),
            "upg (k=5, lam=0.5)": (lambda: est("upg"),
                                   lambda: bare.upg(xp, W, U, b, x, h, g, K, LAM), "g"),
            "npg (k=5, lam=0.5)": (lambda: est("npg"),
                                   lambda: bare.npg(xp, W, U, b, x, h, g, K, LAM), "g"),
            "jfb": (lambda: est("jfb"), lambda: bare.jfb(xp, W, U, b, x, h, g), "g"),
            "gdeq": (lambda: est("gdeq"), lambda: bare.gdeq(xp, W, U, b, x, h, g, Us, Vs), "g"),
            "bptt (30 it.)": (lambda: est("bptt", rf),
                              lambda: bare.bptt(xp, W, U, b, x, rf.trajectory, g), "g"),
        }
        for name, (ours, theirs, kind) in cases.items():
            t = interleaved({"deqref": ours, "bare": theirs}, repeats, sync)
            a, c = ours(), theirs()
            if kind == "h":
                agree = _rel(a.h, c[0] if isinstance(c, tuple) else c)
            else:
                agree = max(_rel(getattr(a, key), c[key]) for key in ("W", "U", "b", "x"))
            rows.append({"d": d, "n": n, "case": name, "deqref_s": t["deqref"], "bare_s": t["bare"],
                         "efficiency": t["bare"] / t["deqref"], "rel_diff": agree})
    return rows


# ------------------------------------------------------------------ 3. against TorchDEQ
def against_torch(be: Backend, sizes: dict, repeats: int, device: str = "cpu") -> list:
    from .torch_step import TorchStep
    sync, rows = _sync(be), []
    for dtype, d in _bar([(t, d) for t in ("float64", "float32") for d in sizes["torch_d"]],
                         f"3. TorchDEQ ({device})"):
        p = Problem(be, d, sizes["torch_n"], dtype=dtype)
        for name in ("upg", "implicit"):
            opts = ({"k": K, "lam": LAM} if name == "upg" else
                    {"method": "fixed_point", "n_iter": N_IMPLICIT, "tol": 0.0})
            ts = TorchStep(to_numpy(p.layer.W), to_numpy(p.layer.U), to_numpy(p.layer.b),
                           to_numpy(p.head.V), to_numpy(p.head.c), to_numpy(p.x), to_numpy(p.y),
                           estimator=name, T=T_FORWARD, k=K, lam=LAM, K=N_IMPLICIT,
                           dtype=dtype, device=device)
            ours = lambda name=name, opts=opts: p.step(name, opts, forward="fixed_point")  # noqa: E731
            t = interleaved({"deqref": ours, "torchdeq": ts}, repeats, sync)
            gr = ours()
            ts()
            tg = ts.grads()
            agree = max(_rel(getattr(gr, key), tg[key]) for key in ("W", "U", "b"))
            rows.append({"dtype": dtype, "d": d, "n": p.n, "estimator": name, "device": device,
                         "deqref_s": t["deqref"], "torchdeq_s": t["torchdeq"],
                         "ratio": t["deqref"] / t["torchdeq"], "grad_rel_diff": agree})
    return rows


# ------------------------------------------------------------------ 4. CuPy against NumPy
def cupy_vs_numpy(gpu: Backend, cpu: Backend, d: int, n: int, repeats: int) -> list:
    rows = []
    for dtype in ("float64", "float32"):
        pg, pc = Problem(gpu, d, n, dtype=dtype), Problem(cpu, d, n, dtype=dtype)
        sync = _sync(gpu)
        for name in ("upg", "implicit"):
            opts = ({"k": K, "lam": LAM} if name == "upg" else
                    {"method": "fixed_point", "n_iter": N_IMPLICIT, "tol": 0.0})
            t_gpu = interleaved({"x": lambda: pg.step(name, opts, forward="fixed_point")}, repeats, sync)
            t_cpu = interleaved({"x": lambda: pc.step(name, opts, forward="fixed_point")},
                                max(1, repeats // 2))
            rows.append({"dtype": dtype, "d": d, "n": n, "estimator": name,
                         "numpy_s": t_cpu["x"], "cupy_s": t_gpu["x"],
                         "speedup": t_cpu["x"] / t_gpu["x"]})
    return rows


def _cupy_backend():
    try:
        return _load("cupy"), None
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------ 5. matrix forms
def matrix_forms(sizes: dict, repeats: int) -> list:
    be, rows = _load("numpy"), []
    for d in _bar(sizes["matrix_d"], "5. matrix forms"):
        p = Problem(be, d, 1, d_x=16)
        res = p.forward("broyden")
        fns = {name: (lambda name=name: estimate(name, p.layer, p.x, res, p.g, k=K, lam=LAM,
                                                 form="matrix")) for name in ("upg", "npg")}
        t = interleaved(fns, repeats)
        for name in fns:
            rows.append({"d": d, "d_x": 16, "n": 1, "d_theta": p.layer.d_theta, "estimator": name,
                         "build_s": t[name], "target_met": t[name] < 1.0})
    return rows


# ------------------------------------------------------------------ machine
def machine(threads: int) -> dict:
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "threads": threads, "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):   # other work on the machine shows up in the timings
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket"):
                info[key.strip()] = val.strip()
    except Exception:
        pass
    libs = blas_libraries()
    info["blas"] = None if libs is None else [
        f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} ({p.get('num_threads')} threads)"
        for p in libs]
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        import torchdeq
        info["torchdeq"] = getattr(torchdeq, "__version__", "0.1.0")
    except Exception:
        pass
    try:
        import cupy
        info["cupy"] = cupy.__version__
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception:
        pass
    return info


# ------------------------------------------------------------------ report
def _fmt_ms(s):
    return f"{1e3 * s:.2f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.2f}"


def markdown(data: dict) -> str:
    """bench.md from the record: Markdown tables joined by hand (one join per row; a table library
    would add a dependency and no clarity)."""
    m = data["machine"]
    L = [f"# deqref benchmarks ({data['mode']})", "",
         f"Run {data['date']} on {m.get('Model name', '?')}, {m.get('CPU(s)', m['cpu_count'])} CPUs; "
         f"Python {m['python']}, NumPy {m['numpy']} (BLAS: {', '.join(m.get('blas') or ['?'])}), "
         f"torch {m.get('torch', '-')}, TorchDEQ {m.get('torchdeq', '-')}; "
         f"{m['threads']} threads for BLAS and torch"
         + (f"; GPU {m['gpu']}, CuPy {m['cupy']}" if "gpu" in m else "; no GPU") + ".",
         f"Medians of {data['repeats']} interleaved repeats after a warm-up. Model "
         f"F = tanh(h Wᵀ + x Uᵀ + b), d_x = d, ‖W‖₂ = 0.9, head to {Q} outputs, MSE.", ""]

    def cost_table(rows, title, memory=True):
        L.extend([f"## {title}", "",
                  "Backward (the estimator alone, at a given h*) and training step (forward + head + "
                  f"loss + backward), speed-up = implicit time / its time; implicit = {N_IMPLICIT} "
                  f"Broyden backward iterations (m = {M}); forward {T_FORWARD} Broyden iterations "
                  f"(BPTT: {T_FORWARD} fixed-point iterations, differentiated through). UPG's "
                  f"backward includes its k = {K} unrolled steps from h*. Memory = tracemalloc peak "
                  "/ implicit's. paper: the papers' ratios (MDEQ on GPUs; Geng et al. Table 3 and "
                  "slides, GDEQ Table 2).", "",
                  "| d | n | estimator | backward ms | backward speed-up | step ms | step speed-up | "
                  "backward MiB | backward mem ratio | step mem ratio | paper |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"])
        for r in rows:
            mem = (_mib(r["backward_peak_bytes"]), f"{r['backward_memory_ratio']:.2f}",
                   f"{r['step_memory_ratio']:.2f}") if r["backward_memory_ratio"] is not None else ("-",) * 3
            L.append(f"| {r['d']} | {r['n']} | {r['estimator']} | {_fmt_ms(r['backward_s'])} | "
                     f"{r['backward_speedup']:.2f}x | {_fmt_ms(r['step_s'])} | {r['step_speedup']:.2f}x | "
                     f"{mem[0]} | {mem[1]} | {mem[2]} | {PAPER[r['estimator']]} |")
        L.append("")

    def eff_table(rows, title):
        L.extend([f"## {title}", "",
                  "Time of the bare array calls the algorithm cannot avoid (`deqref/bench/bare.py`) "
                  "divided by deqref's time for the same work; target ≥ 0.8 at d ≥ 512, n ≥ 256. "
                  "rel. diff: deqref's result against the bare one.", "",
                  "| d | n | case | deqref ms | bare ms | efficiency | target ≥ 0.8 | rel. diff |",
                  "|---|---|---|---|---|---|---|---|"])
        for r in rows:
            met = ("met" if r["efficiency"] >= 0.8 else "**not met**") if r["d"] >= 512 and r["n"] >= 256 else ""
            L.append(f"| {r['d']} | {r['n']} | {r['case']} | {_fmt_ms(r['deqref_s'])} | "
                     f"{_fmt_ms(r['bare_s'])} | {r['efficiency']:.2f} | {met} | {r['rel_diff']:.1e} |")
        L.append("")

    def torch_table(rows, title, target, aim):
        L.extend([f"## {title}", "",
                  f"Time per training step, forward {T_FORWARD} fixed-point iterations (TorchDEQ "
                  f"`fixed_point_iter`, f_tol = 0, {T_FORWARD + 1} F calls each), UPG (k = {K}, "
                  f"λ = τ = {LAM}) or implicit ({N_IMPLICIT} fixed-point backward iterations); "
                  f"ratio = deqref / TorchDEQ, target ≤ {target} at d = 256, n = 64"
                  + (f" (aim {aim})" if aim else "") + ". grad diff: max relative difference of "
                  "∂L/∂W, ∂L/∂U, ∂L/∂b (TorchDEQ's IFT takes its Jacobian at F(z*), see README).", "",
                  "| dtype | d | n | estimator | deqref ms | TorchDEQ ms | ratio | target | grad diff |",
                  "|---|---|---|---|---|---|---|---|---|"])
        for r in rows:
            met = ("met" if r["ratio"] <= target else "**not met**") if r["d"] == 256 else ""
            L.append(f"| {r['dtype']} | {r['d']} | {r['n']} | {r['estimator']} | {_fmt_ms(r['deqref_s'])} | "
                     f"{_fmt_ms(r['torchdeq_s'])} | {r['ratio']:.2f} | {met} | {r['grad_rel_diff']:.1e} |")
        L.append("")

    cost_table(data["cost"], "1. Backward cost per estimator (NumPy)")
    eff_table(data["efficiency"], "2. Efficiency against the unavoidable work (NumPy)")
    if isinstance(data["torch"], list):
        torch_table(data["torch"], "3. deqref against TorchDEQ on the CPU", 1.0, 0.7)
    else:
        L.extend(["## 3. deqref against TorchDEQ on the CPU", "", f"Skipped: {data['torch']}", ""])
    g = data["gpu"]
    if isinstance(g, dict):
        cost_table(g["cost"], "4a. Backward cost per estimator (CuPy)")
        eff_table(g["efficiency"], "4b. Efficiency against the unavoidable work (CuPy)")
        L.extend(["## 4c. CuPy against NumPy (training step, same machine)", "",
                  "| dtype | d | n | estimator | NumPy ms | CuPy ms | speed-up | target ≥ 20x |",
                  "|---|---|---|---|---|---|---|---|"])
        for r in g["cupy_vs_numpy"]:
            L.append(f"| {r['dtype']} | {r['d']} | {r['n']} | {r['estimator']} | {_fmt_ms(r['numpy_s'])} | "
                     f"{_fmt_ms(r['cupy_s'])} | {r['speedup']:.1f}x | "
                     f"{'met' if r['speedup'] >= 20 else '**not met**'} |")
        L.append("")
        if isinstance(g["torch"], list):
            torch_table(g["torch"], "4d. deqref (CuPy) against TorchDEQ (CUDA)", 1.2, None)
        else:
            L.extend(["## 4d. deqref (CuPy) against TorchDEQ (CUDA)", "", f"Skipped: {g['torch']}", ""])
    else:
        L.extend(["## 4. GPU", "", f"Skipped: {g}. On a machine with an NVIDIA GPU and CuPy, "
                  "`bash benchmarks/gpu.sh` runs the test suite on CuPy and this benchmark.", ""])
    L.extend(["## 5. Matrix forms: time to build A (n = 1, d_x = 16)", "",
              "| d | d_θ | estimator | build s | target < 1 s |", "|---|---|---|---|---|"])
    for r in data["matrix"]:
        L.append(f"| {r['d']} | {r['d_theta']} | {r['estimator']} | {r['build_s']:.3f} | "
                 f"{'met' if r['target_met'] else '**not met**'} |")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------ entry point
def run(quick: bool = False, log=print) -> dict:
    with warnings.catch_warnings():
        # set iteration counts (tol 0) by design: see the module docstring
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _run(quick, log)


def _run(quick: bool, log) -> dict:
    mode = "quick" if quick else "default"
    sizes, threads = SIZES[mode], _threads()
    reps = sizes["repeats"]
    cpu = _load("numpy")
    data = {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "repeats": reps, "sizes": {k: v for k, v in sizes.items()},
            "settings": {"k": K, "lam": LAM, "implicit_iterations": N_IMPLICIT, "broyden_m": M,
                         "forward_iterations": T_FORWARD, "head_outputs": Q}}
    try:
        import torch
        torch.set_num_threads(threads)
    except Exception:
        pass
    t_all = time.perf_counter()
    with limit_blas_threads(threads):
        data["machine"] = machine(threads)
        log("bench: 1. backward cost per estimator (NumPy)")
        data["cost"] = cost(cpu, sizes, reps)
        log("bench: 2. efficiency against the bare array calls (NumPy)")
        data["efficiency"] = efficiency(cpu, sizes, reps)
        from .torch_step import available
        why = available()
        log("bench: 3. deqref against TorchDEQ (CPU)" + (f": skipped, {why}" if why else ""))
        data["torch"] = against_torch(cpu, sizes, reps) if why is None else f"torch/torchdeq: {why}"
        gpu, why_gpu = _cupy_backend()
        log("bench: 4. GPU" + (f": skipped, {why_gpu}" if gpu is None else " (CuPy)"))
        if gpu is None:
            data["gpu"] = f"CuPy backend unavailable ({why_gpu})"
        else:
            big_d, big_n = sizes["gpu_big"]
            g = {"cost": cost(gpu, sizes, reps, memory=False),
                 "efficiency": efficiency(gpu, sizes, reps),
                 "cupy_vs_numpy": cupy_vs_numpy(gpu, cpu, big_d, big_n, reps)}
            try:
                import torch
                cuda = torch.cuda.is_available()
            except Exception:
                cuda = False
            g["torch"] = (against_torch(gpu, sizes, reps, device="cuda") if cuda and why is None
                          else "torch with CUDA and torchdeq are not both available")
            data["gpu"] = g
        log("bench: 5. matrix forms")
        data["matrix"] = matrix_forms(sizes, sizes["matrix_repeats"])
    log("bench: 6. fair: deqref against TorchDEQ and the machine's limit")
    from . import fair          # imported here: ``python -m deqref.bench.fair`` runs it as a script
    data["fair"] = fair.run(quick, log=log)       # sets its own threads
    data["total_s"] = time.perf_counter() - t_all
    return data


ONLY = ("fair",)


def write_results(out, stem: str, data: dict, md: str) -> None:
    """``OUT/stem.json`` (every number) and ``OUT/stem.md`` (the tables), OUT created if needed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out / f"{stem}.md").write_text(md)


def main(out: Path, quick: bool = False, only: str | None = None) -> int:
    """Run every section (``only=None``) or the section ``only`` names; write the files."""
    from . import fair
    if only is not None and only not in ONLY:
        raise ValueError(f"only must be one of {ONLY} or None, got {only!r}")
    if only == "fair":
        return fair.main(out, quick)
    data = run(quick)
    fair_data = data.pop("fair")
    write_results(out, "fair", fair_data, fair.markdown(fair_data, level=1) + "\n")
    md = markdown(data) + "\n" + fair.markdown(fair_data, level=2)
    write_results(out, "bench", data, md)
    print(md)
    print(f"deqref bench: {data['total_s']:.1f} s, written to {out}/bench.json, bench.md, "
          "fair.json and fair.md")
    return 0

