"""Table 2 of Geng et al. and Table 1 of GDEQ: backward time and peak memory against k, measured.

The papers' complexity claims for one backward pass (k: unrolled / Neumann steps; K: backward
iterations of the implicit baseline; m: Broyden's memory):

| method   | time (claim)      | memory (claim) | source                        |
|----------|-------------------|----------------|-------------------------------|
| implicit | O(K)              | O(1)           | Table 2 of [1], Table 1 of [2] |
| UPG      | O(k)              | O(k)           | Table 2 of [1]                 |
| NPG      | O(k)              | O(1)           | Table 2 of [1], Table 1 of [2] |
| JFB      | O(1)              | O(1)           | Table 1 of [2]                 |
| GDEQ     | O(1)              | O(1)           | Table 1 of [2]                 |

deqref measures, on ``data.synthetic(seed, d=128, n=32)`` (default mode) at an h* from Broyden's
method, with the BLAS limited to one thread (``threadpoolctl``, where installed: the machine is
shared and multithreaded BLAS on small matrices mostly measures contention):
the median wall time of ``estimate(name, …)`` (the vector forms: VJPs only) over repeats, and
the peak memory it allocates (``tracemalloc``, which sees NumPy's buffers; on CuPy the device
memory pool's allocations), against its step
parameter x — k for UPG/NPG, K for the implicit baseline (its adjoint solved by K Broyden
iterations with deqref's default memory m = 30, or by K fixed-point iterations), m for GDEQ
(the rank of the stored B_T⁻¹, which its backward applies), nothing for JFB (measured at every
grid point all the same: the noise floor of a constant). UPG's time includes its k forward
steps from h* (Algorithm 1 unrolls them in the backward graph).

Growth is summarized by the log–log slope of the measurement over the upper half of the grid
(≈ 1: linear, ≈ 0: constant) and compared with the claim.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021, Table 2.
[2] Nguyen and Mauch, Efficient Training of Deep Equilibrium Models (GDEQ), Table 1.
"""
from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .. import claims as C
from ..data import SYNTH_L_H, synthetic
from ..gradients import estimate
from ..solvers import solve
from .machine import blas_threads, one_blas_thread

TIMED = True                   # its claims rest on wall-clock times: deqref reproduce runs it alone

SHARE = 0.5        # growth share above which a cost grows with x (see linear_fit)

MODES = {
    "quick": dict(d=32, n=8, grid=[1, 2, 4, 8], repeats=3),
    "default": dict(d=128, n=32, grid=[1, 2, 4, 8, 16, 32, 64], repeats=7),
    "full": dict(d=512, n=64, grid=[1, 2, 4, 8, 16, 32, 64, 128], repeats=15),
}
LAM = 0.5                       # damping of UPG and NPG (the paper's A_{5,0.5})
IMPLICIT_M = 30                 # Broyden memory of the implicit baseline's adjoint solve

# method: (x-axis parameter, time claim, memory claim)
CLAIMS = {
    "implicit_broyden": ("K", "O(K)", "O(1)"),
    "implicit_fixed_point": ("K", "O(K)", "O(1)"),
    "upg": ("k", "O(k)", "O(k)"),
    "npg": ("k", "O(k)", "O(1)"),
    "jfb": ("—", "O(1)", "O(1)"),
    "gdeq": ("m", "O(1)", "O(1)"),
}


def _backward(method, layer, x, g, h_result, broyden_results, p):
    """A closure running one backward pass of ``method`` at step parameter ``p``."""
    if method == "implicit_broyden":
        return lambda: estimate("implicit", layer, x, h_result, g, method="broyden", n_iter=p,
                                tol=0.0, m=IMPLICIT_M)
    if method == "implicit_fixed_point":
        return lambda: estimate("implicit", layer, x, h_result, g, method="fixed_point",
                                n_iter=p, tol=0.0)
    if method in ("upg", "npg"):
        return lambda: estimate(method, layer, x, h_result, g, k=p, lam=LAM)
    if method == "jfb":
        return lambda: estimate("jfb", layer, x, h_result, g)
    if method == "gdeq":
        return lambda: estimate("gdeq", layer, x, broyden_results[p], g)
    raise ValueError(method)


def _time(fn, repeats: int, backend) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs, after one warm-up run; on CuPy the
    device is synchronized before the clock stops (its kernels run asynchronously)."""
    sync = _cupy_sync() if backend.name == "cupy" else (lambda: None)
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _peak_bytes(fn, backend) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before: tracemalloc
    (NumPy's buffers) on the host; on CuPy, the device memory pool's hand-outs and returns, each
    rounded up to the pool's 512-byte unit (tracemalloc does not see GPU memory)."""
    if backend.name == "cupy":
        return _device_peak_bytes(fn)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


def _cupy_sync():
    import cupy
    return cupy.cuda.Device().synchronize


def _device_peak_bytes(fn) -> int:
    import cupy

    class Peak(cupy.cuda.MemoryHook):
        name = "deqref_peak_bytes"

        def __init__(self):
            self.now = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw):
            self.now -= kw["mem_size"]

    hook = Peak()
    with hook:
        fn()
        cupy.cuda.Device().synchronize()
    return int(hook.peak)


def loglog_slope(xs, ys) -> float:
    """Slope of log y against log x over the upper half of the grid (x ≥ the median x)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    upper = xs >= np.median(xs)
    return float(np.polyfit(np.log(xs[upper]), np.log(ys[upper]), 1)[0])


def linear_fit(xs, ys) -> tuple:
    """Least-squares y ≈ a + b x over the grid: (a, b, growth share b·x_max / (a + b·x_max)).

    The share is the part of the cost at the largest x that the steps account for; a fixed
    overhead a (estimate's checks, the final VJP, the output gradient) dilutes the log–log slope
    of a linear cost, so the verdict uses the share: O(1) below SHARE = 0.5, else growing.
    """
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(xs, ys, 1)
    top = a + b * xs.max()
    return float(a), float(b), float(b * xs.max() / top) if top > 0 else float("nan")


def growth(share: float, slope: float) -> str:
    """'O(1)' when the steps account for < SHARE (half) of the cost at x_max; otherwise 'O(x)' when
    the log–log slope of the upper half is at most 1.5, else 'super-linear'."""
    if share < SHARE:
        return "O(1)"
    return "O(x)" if slope <= 1.5 else "super-linear"


def _verdict(claim: str, xs, ys) -> dict:
    a, b, share = linear_fit(xs, ys)
    slope = loglog_slope(xs, ys)
    g = growth(share, slope)
    return {"slope": slope, "a": a, "b": b, "share": share, "growth": g,
            "matches": g == ("O(1)" if claim == "O(1)" else "O(x)")}


def run(out: Path, seed: int = 0, mode: str = "default") -> dict:
    with one_blas_thread():
        data = measure(seed, mode)
    out.mkdir(parents=True, exist_ok=True)
    (out / "complexity.json").write_text(json.dumps(data, indent=1))
    from .plots import plot_complexity
    plot_complexity(data, out / "complexity.png")
    return data


def measure(seed: int = 0, mode: str = "default") -> dict:
    """Time and peak memory of every method over the grid (see the module docstring)."""
    cfg = MODES[mode]
    grid, reps = cfg["grid"], cfg["repeats"]
    layer, x, g = synthetic(seed, d=cfg["d"], n=cfg["n"])             # x (n, 16), g (n, d)
    h_result = solve(layer, x, method="broyden", tol=1e-10, max_iter=200, m=IMPLICIT_M)
    # GDEQ reuses B_T⁻¹ of a Broyden forward solve with memory m (its rank): one solve per m
    broyden_results = {m: solve(layer, x, method="broyden", tol=1e-10, max_iter=200, m=m, warn=False)
                       for m in grid}
    rows = {}
    for method, (param, t_claim, m_claim) in CLAIMS.items():
        times = [_time(_backward(method, layer, x, g, h_result, broyden_results, p), reps, layer.backend)
                 for p in grid]
        peaks = [_peak_bytes(_backward(method, layer, x, g, h_result, broyden_results, p), layer.backend)
                 for p in grid]
        rows[method] = {"param": param, "times_s": times, "peak_bytes": peaks,
                        "time_claim": t_claim, "mem_claim": m_claim,
                        "time": _verdict(t_claim, grid, times), "mem": _verdict(m_claim, grid, peaks)}
    data = {"setting": {"d": cfg["d"], "d_x": layer.d_x, "n": cfg["n"], "L_h": SYNTH_L_H,
                        "activation": "tanh", "seed": seed, "mode": mode, "grid": grid,
                        "repeats": reps, "lam": LAM, "implicit_m": IMPLICIT_M,
                        "forward": "Broyden (low-rank) to rel. residual 1e-10",
                        "h_star_iterations": int(h_result.n_iter.max()),
                        "timer": "median of time.perf_counter over repeats after one warm-up",
                        "memory": ("CuPy memory-pool peak above the start of the call"
                                   if layer.backend.name == "cupy"
                                   else "tracemalloc peak above the start of the call"),
                        "backend": layer.backend.name, "blas_threads": blas_threads()},
            "rows": rows}
    return data


def summary(data: dict) -> str:
    s = data["setting"]
    g = s["grid"]
    lines = [f"complexity (Table 2 of Geng et al., Table 1 of GDEQ): d={s['d']}, n={s['n']}, "
             f"median of {s['repeats']} runs, x = {g[0]} … {g[-1]}; per step = b of a + b·x, "
             f"share = b·x_max / cost(x_max), slope = log–log over x ≥ {int(np.median(g))}",
             f"  {'method':20s} {'x':>1s} {'t(x_max)':>8s} {'per step':>8s} {'share':>5s} {'slope':>5s} "
             f"{'claim':>5s} {'ok':>3s} | {'MiB(max)':>8s} {'KiB/step':>8s} {'share':>5s} {'claim':>5s} {'ok':>3s}"]
    for name, r in data["rows"].items():
        t, m = r["time"], r["mem"]
        lines.append(f"  {name:20s} {r['param']:>1s} {1e3 * r['times_s'][-1]:6.2f}ms {1e3 * t['b']:6.3f}ms "
                     f"{t['share']:5.2f} {t['slope']:5.2f} {r['time_claim']:>5s} {'yes' if t['matches'] else 'NO':>3s} | "
                     f"{r['peak_bytes'][-1] / 2**20:8.2f} {m['b'] / 2**10:8.1f} {m['share']:5.2f} "
                     f"{r['mem_claim']:>5s} {'yes' if m['matches'] else 'NO':>3s}")
    lines.append(f"  (one stored state = n·d·8 B = {s['n'] * s['d'] * 8 / 2**10:.0f} KiB)")
    return "\n".join(lines)


def claims(data: dict) -> list:
    """Table 2 of Geng et al. and Table 1 of GDEQ: the growth share of each cost (the part of the
    cost at the largest x that the x steps account for) above or below SHARE."""
    rows = data["rows"]

    def row(cid, source, text, paper, names, kind, grows):
        shares = [rows[nm][kind]["share"] for nm in names]
        rule = C.above(SHARE) if grows else C.below(SHARE)
        x = ", ".join(f"{nm} in {rows[nm]['param']}" for nm in names)
        return C.claim(cid, source, text, paper, shares, rule,
                       what=f"the {'time' if kind == 'time' else 'peak-memory'} growth share ({x})",
                       n=len(data["setting"]["grid"]))
    return [
        row("geng.table2.time_implicit", "Geng et al., Table 2; GDEQ, Table 1",
            "implicit differentiation's backward time grows with its iterations K", "O(K)",
            ["implicit_broyden", "implicit_fixed_point"], "time", True),
        row("geng.table2.time_phantom", "Geng et al., Table 2",
            "UPG's and NPG's backward time grows with k", "O(k)", ["upg", "npg"], "time", True),
        row("gdeq.table1.time_jfb_gdeq", "GDEQ, Table 1",
            "JFB's and GDEQ's backward time does not grow (GDEQ: with the rank m of the reused B⁻¹)",
            "O(1)", ["jfb", "gdeq"], "time", False),
        row("geng.table2.memory_upg", "Geng et al., Table 2",
            "UPG's backward memory grows with k (it stores the unrolled states)", "O(k)", ["upg"], "mem", True),
        row("geng.table2.memory_constant", "Geng et al., Table 2; GDEQ, Table 1",
            "the backward memory of implicit, NPG, JFB and GDEQ does not grow", "O(1)",
            ["implicit_broyden", "implicit_fixed_point", "npg", "jfb", "gdeq"], "mem", False),
    ]
