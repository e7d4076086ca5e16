"""Every figure deqref draws, from the data its experiment wrote."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_solver_traces(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, trace in data["rel_residual_sample0"].items():
        ax.semilogy(trace, label=name, marker=".", ms=3)
    s = data["setting"]
    ax.set(xlabel="iteration", ylabel="relative residual ‖F(h) − h‖ / ‖F(h)‖",
           title=f"Forward solvers, synthetic setting (d={s['d']}, L_h={s['L_h']}, sample 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- static precision, complexity, Theorem 1
import numpy as np  # noqa: E402

LAM_COLORS = {0.1: "tab:purple", 0.2: "tab:red", 0.5: "tab:orange", 0.8: "tab:green", 1.0: "tab:blue"}


def _caption(fig, text: str) -> None:
    """The setting, under the panels (every figure states d, L_h, tolerances, seeds, "exact")."""
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom", ha="left", wrap=True)


def _over_seeds(data, get):
    a = np.array([get(r) for r in data["seeds"]])          # (n_seeds, n_k)
    return a.mean(axis=0), a.min(axis=0), a.max(axis=0)


def plot_static_precision(data: dict, path: Path) -> None:
    """Fig. 1 of Geng et al.: cos(phantom, exact) against k, per λ, UPG and NPG; and 1 − cos
    against k at inexact h* for UPG (solid) and NPG (dashed)."""
    s = data["setting"]
    ks = np.array(s["ks"])
    n_in = len(s["inexact_lams"])
    nrows = (2 + n_in + 1) // 2
    fig, axes = plt.subplots(nrows, 2, figsize=(10, 4.0 * nrows + 0.6), squeeze=False)
    axes = axes.ravel()
    for ax in axes[2 + n_in:]:
        ax.set_visible(False)
    for ax, m in zip(axes[:2], ("upg", "npg")):
        for lam in s["lams"]:
            mean, lo, hi = _over_seeds(data, lambda r: r["fig1"][str(lam)][m])
            c = LAM_COLORS.get(lam)
            ax.plot(ks, mean, marker=".", ms=3, color=c, label=f"λ = {lam:g}")
            ax.fill_between(ks, lo, hi, color=c, alpha=0.2, lw=0)
        ax.set(xlabel="k", ylabel="cos(phantom, exact)",
               title=f"{m.upper()}, h* to rel. residual {s['tol']:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    cmap = plt.get_cmap("viridis")
    recs = data["seeds"][0]["inexact"]
    for ax, lam in zip(axes[2:], s["inexact_lams"]):
        for j, rec in enumerate(recs):
            c = cmap(j / max(len(recs) - 1, 1))
            tol = "exact (1e-13)" if rec["tol"] == s["exact_tol"] else f"tol {rec['tol']:g}"
            for m, ls in (("upg", "-"), ("npg", "--")):
                mean, _, _ = _over_seeds(data, lambda r: r["inexact"][j]["cos"][str(lam)][m])
                ax.semilogy(ks, np.maximum(1.0 - mean, 1e-16), ls=ls, color=c,
                            label=f"{tol}" if m == "upg" else None)
        ax.set(xlabel="k", ylabel="1 − cos(phantom, true gradient)", ylim=(1e-16, 1),
               title=f"inexact h, λ = {lam:g}: UPG solid, NPG dashed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    _caption(fig, f"Synthetic setting: d = {s['d']}, d_x = {s['d_x']}, n = {s['n']} samples, tanh, "
             f"‖W‖₂ = L_h = {s['L_h']}; seeds {s['seeds']} (line: mean, band: min–max). "
             f"Cosine of the batch-summed ∂L/∂θ; the same upstream g ~ N(0, I) for every estimator. "
             f"Top: h* by fixed-point iteration to relative residual < {s['tol']:g} (≤ {s['max_iter']} it.), "
             f"exact = dense implicit oracle (Eq. 4) at that h*. Bottom: UPG/NPG at h from a solve stopped at "
             f"the given tolerance, exact = dense oracle at h* solved to {s['exact_tol']:g}.")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_complexity(data: dict, path: Path) -> None:
    """Table 2 of Geng et al. / Table 1 of GDEQ as curves: backward time and peak memory
    against each method's step parameter, log–log."""
    s = data["setting"]
    grid = np.array(s["grid"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {"implicit_broyden": ("tab:blue", "o"), "implicit_fixed_point": ("tab:cyan", "v"),
              "upg": ("tab:red", "s"), "npg": ("tab:orange", "D"), "jfb": ("tab:gray", "x"),
              "gdeq": ("tab:green", "^")}
    for name, r in data["rows"].items():
        c, mk = styles.get(name, (None, "."))
        lab = (f"{name} (x = {r['param']}; claim {r['time_claim']}, measured {r['time']['growth']}, "
               f"{1e3 * r['time']['b']:.3f} ms/step)")
        ax_t.loglog(grid, 1e3 * np.array(r["times_s"]), marker=mk, color=c, label=lab)
        lab = (f"{name} (claim {r['mem_claim']}, measured {r['mem']['growth']}, "
               f"{r['mem']['b'] / 2**10:.1f} KiB/step)")
        ax_m.loglog(grid, np.array(r["peak_bytes"]) / 2**20, marker=mk, color=c, label=lab)
    ax_t.set(xlabel="step parameter x (k, K or m)", ylabel="backward time, ms (median)",
             title="backward time")
    ax_m.set(xlabel="step parameter x (k, K or m)", ylabel="peak memory, MiB (tracemalloc)",
             title="backward peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="upper left")
    _caption(fig, f"Synthetic layer: d = {s['d']}, d_x = {s['d_x']}, batch n = {s['n']}, tanh, ‖W‖₂ = "
             f"{s['L_h']}, seed {s['seed']}, {s['backend']} float64 on the CPU; h* by Broyden to 1e-10. Vector forms "
             f"(VJPs only); UPG/NPG λ = {s['lam']}; implicit: K adjoint iterations (Broyden with memory "
             f"{s['implicit_m']}, or fixed point); GDEQ: x = rank m of the reused B_T⁻¹; JFB has no parameter. "
             f"Time: median of {s['repeats']} runs. Measured growth: a least-squares fit a + b·x; O(1) when the "
             f"steps b·x_max are < 30 % of the cost at x_max.")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _band(ax, ks, per_k, key, color, label, ls="-", reduce=np.median, log=False, transform=None):
    """Median over samples (line) and min–max (band) of ``per_k[i][key]`` against k."""
    a = np.array([r[key] if transform is None else transform(r) for r in per_k])   # (n_k, n)
    plot = ax.semilogy if log else ax.plot
    plot(ks, reduce(a, axis=1), ls=ls, color=color, label=label)
    ax.fill_between(ks, a.min(axis=1), a.max(axis=1), color=color, alpha=0.15, lw=0)


def plot_theorem1(data: dict, path: Path) -> None:
    """Theorem 1 of Geng et al.: lhs/rhs of condition (6) (and Remark 1's (8)), cos(Ag, Eg) and
    the worst case over g of ⟨Ag, Eg⟩ against k, per λ; and (6) at an inexact h for UPG vs NPG."""
    s = data["setting"]
    ks = np.array(s["ks"])
    ratio = lambda r: np.array(r["lhs"]) / np.array(r["rhs"])  # noqa: E731
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 8.4))
    (a6, acos), (aw, ain) = axes
    for lam in s["lams"]:
        rec, c = data["exact"][str(lam)], LAM_COLORS.get(lam)
        _band(a6, ks, rec["npg"], None, c, f"(6), λ = {lam:g}", log=True, transform=ratio)
        _band(a6, ks, rec["remark1_npg"], None, c, None, ls=":", log=True, transform=ratio)
        _band(acos, ks, rec["npg"], "cos", c, f"λ = {lam:g}")
        _band(aw, ks, rec["npg"], "worst_normalized", c, f"λ = {lam:g}", log=True)
    a6.axhline(1.0, color="k", lw=0.8)
    a6.set(xlabel="k", ylabel="lhs / rhs", title="condition (6) (solid) and Remark 1's (8) (dotted): "
           "holds below 1")
    acos.set(xlabel="k", ylabel="cos(A g, E g)", title="(7) for the setting's upstream g, per sample")
    aw.set(xlabel="k", ylabel="min_g ⟨Ag, Eg⟩ / (‖A‖ ‖E‖)  (log: all > 0)",
           title="(7) in the worst case over g: min eigenvalue of sym(AᵀE)")
    for lam in s["inexact_lams"]:
        c = LAM_COLORS.get(lam)
        for m, ls in (("upg", "-"), ("npg", "--")):
            _band(ain, ks, data["inexact"][str(lam)][m], None, c,
                  f"{m.upper()}, λ = {lam:g}", ls=ls, log=True, transform=ratio)
    ain.axhline(1.0, color="k", lw=0.8)
    ain.set(xlabel="k", ylabel="lhs / rhs of (6)",
            title=f"inexact h (tol {s['inexact_tol']:g}): UPG solid, NPG dashed")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
    _caption(fig, f"Synthetic layer: d = {s['d']}, d_x = {s['d_x']} (d_θ = {s['d_theta']}), tanh, ‖W‖₂ = L_h = "
             f"{s['L_h']}, n = {s['n']} samples (line: median, band: min–max over samples), seed {s['seed']}. "
             f"h* by fixed-point iteration to {s['exact_tol']:g}; exact E = ∂F/∂θ (I − ∂F/∂h)⁻¹ by a dense solve at h*; "
             f"spectral norms. A: NPG Eq. (18) matrix form (at h*, UPG Eq. (17) is the same matrix: max relative "
             f"gap {data['upg_npg_gap_at_h_star']:.0e}). Bottom right: A at h from a forward solve to "
             f"{s['inexact_tol']:g} (‖h − h*‖/‖h*‖ = {s['inexact_rel_error_h']:.1e}), Φ, J at h*.")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
