"""The figure of the ablation experiment (Fig. 3 of Geng et al.), from its JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import LAM_COLORS, _caption, plt
from .plots_speed import METHOD_STYLE, _where

LINE = {"upg": "-", "npg": "--"}


def _acc(row: dict, method: str, key: str = "acc") -> tuple:
    s = row[method]["summary"]
    return 100 * s[f"{key}_mean"], 100 * s[f"{key}_std"]


def _implicit_band(ax, data: dict) -> None:
    s = data["implicit"]["summary"]
    m, sd = 100 * s["acc_mean"], 100 * s["acc_std"]
    ax.axhspan(m - sd, m + sd, color="0.5", alpha=0.15, lw=0)
    ax.axhline(m, color="0.3", lw=1.0, ls=":", label=f"implicit (20 Broyden): {m:.1f} ± {sd:.1f} "
               f"(best epoch {100 * s['best_mean']:.1f})")


def plot_ablation(data: dict, path: Path) -> None:
    """(a) final validation accuracy against k (one line per λ) and against λ (at the paper's k),
    UPG solid and NPG dashed, mean ± std over seeds, the implicit baseline as a band; (b) UPG
    against NPG, paired by seed (same initialization and data order)."""
    s, g, rows = data["setting"], data["grid"], data["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.2))
    (ax_k, ax_l), (ax_sc, ax_d) = axes

    for lam in g["lams_for_k"]:
        sel = sorted((r for r in rows if r["lam"] == lam and r["k"] in g["ks"]), key=lambda r: r["k"])
        ks = np.array([r["k"] for r in sel])
        for i, m in enumerate(("upg", "npg")):
            mean, sd = np.array([_acc(r, m) for r in sel]).T
            ax_k.errorbar(ks + (i - 0.5) * 0.08, mean, yerr=sd, ls=LINE[m], marker=METHOD_STYLE[m][1],
                          ms=4, capsize=2, color=LAM_COLORS.get(lam), label=f"{m.upper()}, λ = {lam:g}")
    ax_k.set(xlabel="k (unrolled steps / Neumann terms)", ylabel="validation accuracy after the last epoch, %",
             title="(a) accuracy against k")
    ax_k.set_xticks(g["ks"])

    k0 = g["k_for_lam"]
    sel = sorted((r for r in rows if r["k"] == k0 and r["lam"] in g["lams"]), key=lambda r: r["lam"])
    lams = np.array([r["lam"] for r in sel])
    for i, m in enumerate(("upg", "npg")):
        mean, sd = np.array([_acc(r, m) for r in sel]).T
        ax_l.errorbar(lams + (i - 0.5) * 0.01, mean, yerr=sd, ls=LINE[m], marker=METHOD_STYLE[m][1], ms=4,
                      capsize=2, color=METHOD_STYLE[m][0], label=f"{m.upper()}, k = {k0}")
    ax_l.set(xlabel="λ (damping)", title=f"(a) accuracy against λ at k = {k0}")
    ax_l.set_xticks(g["lams"])
    for ax in (ax_k, ax_l):
        _implicit_band(ax, data)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    lo = min(ax_k.get_ylim()[0], ax_l.get_ylim()[0])
    hi = max(ax_k.get_ylim()[1], ax_l.get_ylim()[1])
    ax_k.set_ylim(lo, hi)
    ax_l.set_ylim(lo, hi)

    # (b) UPG against NPG: every (k, λ, seed), paired
    u = np.array([a for r in rows for a in r["upg"]["summary"]["acc_per_seed"]]) * 100
    n = np.array([a for r in rows for a in r["npg"]["summary"]["acc_per_seed"]]) * 100
    kk = np.array([r["k"] for r in rows for _ in r["upg"]["summary"]["acc_per_seed"]])
    sc = ax_sc.scatter(n, u, c=np.log2(kk), cmap="viridis", s=22, edgecolor="k", lw=0.3)
    cb = fig.colorbar(sc, ax=ax_sc, ticks=np.log2(sorted(set(kk))))
    cb.ax.set_yticklabels([str(k) for k in sorted(set(kk))])
    cb.set_label("k")
    a, b = min(u.min(), n.min()) - 0.5, max(u.max(), n.max()) + 0.5
    ax_sc.plot([a, b], [a, b], color="k", lw=0.8)
    ax_sc.set(xlim=(a, b), ylim=(a, b), xlabel="NPG accuracy, %", ylabel="UPG accuracy, %",
              title="(b) UPG against NPG, every (k, λ, seed)")
    p = data["pooled"]
    ax_sc.text(0.03, 0.97, f"UPG higher: {p['upg_higher']}\nNPG higher: {p['npg_higher']}\nequal: {p['equal']}\n"
               f"sign test p = {p['sign_test_p']:.2f}\nUPG − NPG: {100 * p['mean']:+.2f} ± {100 * p['sem']:.2f} (s.e.)",
               transform=ax_sc.transAxes, va="top", fontsize=8,
               bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax_sc.grid(alpha=0.3)

    x = np.arange(len(rows))
    d_mean = np.array([100 * r["upg_minus_npg"]["mean"] for r in rows])
    ax_d.bar(x, d_mean, color=np.where(d_mean >= 0, "tab:red", "tab:orange"), alpha=0.7)
    for i, r in enumerate(rows):
        ps = 100 * np.array(r["upg_minus_npg"]["per_seed"])
        ax_d.plot(np.full(len(ps), i), ps, "k.", ms=4)
    ax_d.axhline(0, color="k", lw=0.8)
    ax_d.axhline(100 / s["n_val"], color="gray", lw=0.6, ls=":")
    ax_d.axhline(-100 / s["n_val"], color="gray", lw=0.6, ls=":", label="± one validation image")
    nf = data.get("noise_floor")
    if nf:
        ax_d.axhspan(-100 * nf["max"], 100 * nf["max"], color="0.5", alpha=0.15, lw=0,
                     label=f"noise floor: NPG k = 1 over λ = {', '.join(f'{v:g}' for v in nf['lams'])}")
    ax_d.set_xticks(x, [f"{r['k']}\n{r['lam']:g}" for r in rows], fontsize=7.5)
    ax_d.set(xlabel="k (top), λ (bottom)", ylabel="UPG − NPG, percentage points",
             title="(b) paired difference per (k, λ): bar = mean, dots = seeds")
    ax_d.legend(fontsize=7.5, loc="lower left")
    ax_d.grid(alpha=0.3, axis="y")

    f = s["forward"]
    _caption(fig, f"Fig. 3 of Geng et al. at teaching scale. Digits (scikit-learn 8×8; {s['n_train']} train / "
             f"{s['n_val']} validation), DEQ d = {s['d']}, tanh, ‖W‖₂ ≤ {s.get('spectral_norm') or s['L_h_init']} (projected after every update), linear head, "
             f"cross-entropy; Adam lr {s['lr']:g}, batch {s['batch_size']}, {s['epochs']} epochs; seeds "
             f"{s['seeds']} (mean ± std, ddof = 1); accuracy after the last epoch. Forward for all: Broyden "
             f"(memory {f['m']}) to rel. residual {f['tol']:g}, ≤ {f['max_iter']} iterations; UPG takes its loss "
             f"at h_k (Algorithm 1), NPG at h*. Same initialization and data order for every run of a seed. "
             f"NPG at k = 1, λ = 1 is JFB. Paper: MDEQ-Tiny on CIFAR-10, 6 runs, mean(best); its grid and values "
             f"are in its figure only. Run on {_where(s)}.")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
