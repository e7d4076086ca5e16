"""Forward solvers on the synthetic setting: iterations and residual traces."""
from __future__ import annotations

import json
from pathlib import Path


from ..solvers import solve
from ..data import SYNTH_D as D, SYNTH_L_H as L_H, synthetic

CONFIGS = [("fixed_point", {}), ("fixed_point", {"lam": 0.5}), ("anderson", {"m": 5}),
           ("broyden", {"form": "lowrank", "m": 30}), ("broyden", {"form": "dense"})]


def label(method, opts):
    return method + "".join(f" {k}={v}" for k, v in opts.items())


def run(out: Path, seed: int = 0, mode: str = "default", tol: float = 1e-10) -> dict:
    """Solve the synthetic setting with every solver to relative residual ``tol``.

    ``mode`` is "quick" (8 samples), "default" or "full" (32 samples)."""
    layer, x, _ = synthetic(seed, n=8 if mode == "quick" else 32)
    rows, traces = [], {}
    for method, opts in CONFIGS:
        res = solve(layer, x, method=method, tol=tol, max_iter=500, **opts)
        name = label(method, opts)
        rows.append({"solver": name, "converged": int(res.converged.sum()), "n": len(res.converged),
                     "iterations_mean": float(res.n_iter.mean()), "iterations_max": int(res.n_iter.max()),
                     "n_F": res.n_F, "max_rel_residual": float(res.final_rel_residual.max())})
        traces[name] = res.rel_residual[0].tolist()
    data = {"setting": {"d": D, "L_h": L_H, "activation": "tanh", "tol": tol, "seed": seed},
            "rows": rows, "rel_residual_sample0": traces}
    out.mkdir(parents=True, exist_ok=True)
    (out / "solver_traces.json").write_text(json.dumps(data, indent=1))
    from .plots import plot_solver_traces
    plot_solver_traces(data, out / "solver_traces.png")
    return data


def summary(data: dict) -> str:
    lines = [f"forward solvers, synthetic setting (d={data['setting']['d']}, L_h={data['setting']['L_h']}, "
             f"rel. tol {data['setting']['tol']:g}):",
             f"  {'solver':34s} {'conv':>6s} {'iter mean':>9s} {'iter max':>8s} {'max rel res':>11s}"]
    for r in data["rows"]:
        lines.append(f"  {r['solver']:34s} {r['converged']:>3d}/{r['n']:<2d} {r['iterations_mean']:9.1f} "
                     f"{r['iterations_max']:8d} {r['max_rel_residual']:11.2e}")
    return "\n".join(lines)
