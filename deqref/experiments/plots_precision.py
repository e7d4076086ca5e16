"""The figures of the precision-along-training experiments (dynamic_precision, gdeq_precision),
drawn from their JSON alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import _caption, plt
from .plots_speed import _where

UPG_NPG = {"upg": ("tab:red", "UPG"), "npg": ("tab:orange", "NPG")}
KLAM_STYLE = [("-", "o"), ("--", "s"), (":", "D")]
MEM_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:cyan"]


def _seed_text(s: dict) -> str:
    seeds = s["seeds"]
    return f"seed {seeds[0]}" + (f" (shown; the JSON holds seeds {seeds})" if len(seeds) > 1 else "")


def _quantile_boxes(ax, per_epoch: dict, offset: float, color: str, label: str) -> None:
    """One horizontal box per epoch: q10–q90 (thin), q25–q75 (thick), median (white dot), min (x)."""
    q = {k: np.array(v) for k, v in per_epoch["quantiles"].items()}
    y = np.arange(1, len(q["0.5"]) + 1) + offset
    ax.hlines(y, q["0.1"], q["0.9"], color=color, lw=1.0)
    ax.hlines(y, q["0.25"], q["0.75"], color=color, lw=5.0, label=label)
    ax.plot(q["0.5"], y, "o", ms=3.5, mfc="white", mec=color, mew=1.0)
    ax.plot(per_epoch["min"], y, "x", ms=3.5, color=color, alpha=0.7)


def _box_panel(ax, r: dict, k: int, lam: float, title: str) -> None:
    for i, (m, (c, lab)) in enumerate(UPG_NPG.items()):
        pe = r["per_epoch"][f"{m}@k{k},lam{lam:g}"]
        o = r["overall"][f"{m}@k{k},lam{lam:g}"]
        _quantile_boxes(ax, pe, 0.17 if i == 0 else -0.17, c,
                        f"{lab} A_{{{k},{lam:g}}} (median {o['median']:.3f}, min {o['min']:.2f})")
    n_ep = len(r["val_metric"])
    ax.set_yticks(np.arange(1, n_ep + 1))
    ax.set_ylim(0.5, n_ep + 0.5 + 0.12 * n_ep)             # room for the legend above the last epoch
    ax.set(xlabel="cos(phantom gradient, exact)", ylabel="training epoch", title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7.5, loc="upper left")


def plot_dynamic_precision(data: dict, path: Path) -> None:
    """Fig. 2 of Geng et al.: per epoch, the distribution of cos(phantom, exact) over that
    epoch's steps, UPG beside NPG (tight and inexact forward); medians for several (k, λ);
    UPG − NPG step by step."""
    s, runs = data["setting"], data["runs"]
    k0, lam0 = s["paper_klam"]
    tight, loose = runs["tight"][0], runs["inexact"][0]
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 9.6))
    (ax_a, ax_b), (ax_c, ax_d) = axes
    for ax, r, name in ((ax_a, tight, "tight"), (ax_b, loose, "inexact")):
        f = s["forwards"][name]
        conv = 100 * np.mean(r["forward_converged"])
        _box_panel(ax, r, k0, lam0, f"{name} forward: Broyden ≤ {f['max_iter']} it. to {f['tol']:g} "
                                    f"({conv:.0f} % converged)")
    lo = min(min(r["per_epoch"][f"{m}@k{k0},lam{lam0:g}"]["min"]) for r in (tight, loose) for m in UPG_NPG)
    for ax in (ax_a, ax_b):
        ax.set_xlim(min(lo - 0.03, 0.5), 1.005)

    ep = np.arange(1, len(tight["val_metric"]) + 1)
    for (k, lam), (ls, mk) in zip(tight["klams"], KLAM_STYLE):
        for m, (c, lab) in UPG_NPG.items():
            pe = tight["per_epoch"][f"{m}@k{k},lam{lam:g}"]
            q = pe["quantiles"]
            wide = m == "upg"                    # UPG drawn wide underneath: NPG often lies on it
            ax_c.plot(ep, q["0.5"], ls=ls, marker=mk, ms=5 if wide else 3, lw=3.5 if wide else 1.2,
                      alpha=0.45 if wide else 1.0, color=c, label=f"{lab} A_{{{k},{lam:g}}}")
            if (k, lam) == (k0, lam0):
                ax_c.fill_between(ep, q["0.1"], q["0.9"], color=c, alpha=0.12, lw=0)
    tr = tight["per_epoch"]["train"]
    ax_c.plot(ep, tr["quantiles"]["0.5"], color="tab:blue", marker=".", label="implicit, 20 Broyden (trained with)")
    ax_c.set_xticks(ep)
    ax_c.set(xlabel="training epoch", ylabel="median cos(·, exact) over the epoch's steps",
             title=f"tight forward: medians (band: 10–90 % for A_{{{k0},{lam0:g}}})")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=7, ncol=2, loc="best")

    key = f"k{k0},lam{lam0:g}"
    for r, name, c in ((tight, "tight", "black"), (loose, "inexact", "tab:purple")):
        u, n = (np.array(r["step_cosine"][f"{m}@{key}"]) for m in ("upg", "npg"))
        dd = r["upg_minus_npg"][key]
        ax_d.plot(np.arange(1, u.size + 1), u - n, lw=0.8, color=c,
                  label=f"{name} forward: UPG higher on {100 * dd['frac_upg_higher']:.0f} % of steps, "
                        f"max |Δ| {dd['max_abs']:.1e}")
    ax_d.axhline(0, color="gray", lw=0.6)
    ax_d.set_yscale("symlog", linthresh=1e-5)
    ax_d.set(xlabel="training step", ylabel="cos(UPG, exact) − cos(NPG, exact)",
             title=f"UPG − NPG, A_{{{k0},{lam0:g}}}, step by step")
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=7.5, loc="upper left")
    fig.suptitle("Dynamic precision (Fig. 2 of Geng et al.): cos(phantom, exact) along training with the "
                 "implicit gradient", fontsize=11)
    ft, fl = s["forwards"]["tight"], s["forwards"]["inexact"]
    _caption(fig, f"Digits (scikit-learn 8×8; {s['n_train']} train / {s['n_val']} validation), DEQ d = {s['d']}, tanh, "
             f"‖W‖₂ ≤ {s.get('spectral_norm') or s['L_h_init']} (projected after every update), linear head, cross-entropy; trained with implicit differentiation "
             f"(adjoint by {s['train_estimator']['n_iter']} Broyden iterations), Adam lr {s['lr']:g}, batch "
             f"{s['batch_size']}, {s['epochs']} epochs ({tight['steps_per_epoch']} steps each), {_seed_text(s)}. "
             f"Forward: Broyden (memory {ft['m']}) to rel. residual {ft['tol']:g}, ≤ {ft['max_iter']} iterations "
             f"(tight) or ≤ {fl['max_iter']} (inexact). Exact = dense oracle of Eq. (4) at the solver's h, same batch; "
             f"every estimator gets ∂L/∂h at h; cosines of the batch-summed ∂L/∂θ. Boxes: 10–90 % (thin), 25–75 % "
             f"(thick), median (dot), minimum (×) over each epoch's steps. Final val. accuracy: tight "
             f"{100 * tight['val_metric'][-1]:.1f} %, inexact {100 * loose['val_metric'][-1]:.1f} %. "
             f"Paper: MDEQ-Tiny on CIFAR-10; its (k, λ) for Fig. 2 are not in its text (A_{{5,0.5}} is the ablation "
             f"setting's). {s['backend']} on {_where(s)}.")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gdeq_precision(data: dict, path: Path) -> None:
    """Fig. 2 of GDEQ: cos(GDEQ, implicit) per epoch for full and limited memory, JFB for scale;
    how closely the iterative implicit gradient matches the dense oracle; accuracy and forward
    convergence of each run."""
    from .gdeq_precision import run_label   # on use: at the top it would close a cycle through dynamic_precision
    s, runs = data["setting"], data["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 9.4))
    (ax_a, ax_b), (ax_c, ax_d) = axes
    keys = list(runs)
    for i, key in enumerate(keys):
        r, c = runs[key][0], MEM_COLORS[i % len(MEM_COLORS)]
        lab = run_label(r, s["full_memory"])
        pe, o = r["per_epoch"]["gdeq"], r["overall"]["gdeq"]
        off = 0.2 * (i - (len(keys) - 1) / 2)
        _quantile_boxes(ax_a, pe, off, c, f"GDEQ {lab}: median {o['median']:.3f}")
        jq = r["per_epoch"]["jfb"]["quantiles"]["0.5"]
        y = np.arange(1, len(jq) + 1) + off
        ax_a.plot(jq, y, "|", ms=8, mew=1.6, color=c, alpha=0.9)
        ep = np.arange(1, len(r["val_metric"]) + 1)
        ax_b.plot(ep, pe["quantiles"]["0.5"], marker="o", ms=3, color=c, label=f"GDEQ {lab}")
        lo = r["per_epoch"]["gdeq_vs_implicit_lower"]["quantiles"]["0.5"]
        hi = r["per_epoch"]["gdeq_vs_implicit_upper"]["quantiles"]["0.5"]
        ax_b.fill_between(ep, lo, hi, color=c, alpha=0.3, lw=0)
        ax_b.plot(ep, r["per_epoch"]["jfb"]["quantiles"]["0.5"], ls="--", lw=1, color=c,
                  label="JFB at the same steps")
        one_minus = np.maximum(1.0 - np.array(r["step_cosine"]["implicit"]), 1e-17)
        ax_c.semilogy(np.arange(1, one_minus.size + 1), one_minus, lw=0.8, color=c,
                      label=f"{lab}: max {one_minus.max():.1e}")
        ax_d.plot(ep, 100 * np.array(r["val_metric"]), marker="o", ms=3, color=c, label=f"val. accuracy, {lab}")
        ax_d.plot(ep, 100 * np.array(r["forward_converged"]), ls=":", marker=".", color=c,
                  label=f"forward converged, m = {r['m']}")
    n_ep = s["epochs"]
    ax_a.set_yticks(np.arange(1, n_ep + 1))
    ax_a.set_ylim(0.5, n_ep + 0.6 + 0.06 * n_ep * len(keys))   # room for the legend
    ax_a.set(xlabel="cos(GDEQ, exact)", ylabel="training epoch",
             title="distribution over each epoch's steps (| : JFB's median)")
    ax_a.grid(alpha=0.3, axis="x")
    ax_a.legend(fontsize=7.5, loc="upper left")
    ax_b.set(xlabel="training epoch", ylabel="median cosine over the epoch's steps",
             title="medians: GDEQ (band: bracket vs 20-Broyden implicit), JFB")
    ax_b.set_xticks(np.arange(1, n_ep + 1))
    ax_d.set_xticks(np.arange(1, n_ep + 1))
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=6.5, loc="best", ncol=2)
    ax_c.set(xlabel="training step", ylabel="1 − cos(implicit by 20 Broyden it., dense oracle)",
             title="the two 'implicit' gradients agree (why the bracket is thin)")
    ax_c.grid(alpha=0.3, which="both")
    ax_c.legend(fontsize=7.5)
    ax_d.set(xlabel="training epoch", ylabel="%", title="each run: validation accuracy, forward converged")
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=6.5, loc="best", ncol=2)
    fig.suptitle("GDEQ precision (Fig. 2 of Nguyen and Mauch): cos(GDEQ, implicit) along training, "
                 "full and limited Broyden memory", fontsize=11)
    f = s["forward"]
    _caption(fig, f"Digits (scikit-learn 8×8; {s['n_train']} train / {s['n_val']} validation), DEQ d = {s['d']}, tanh, "
             f"‖W‖₂ ≤ {s.get('spectral_norm') or s['L_h_init']} (projected after every update), linear head, cross-entropy; trained with GDEQ (the run marked implicit-trained: "
             f"with the adjoint by {s['implicit_iterative']['n_iter']} Broyden iterations), Adam lr {s['lr']:g}, "
             f"batch {s['batch_size']}, {s['epochs']} epochs, {_seed_text(s)}; one run per line, same "
             f"initialization. Forward: Broyden to rel. residual {f['tol']:g}, ≤ {f['max_iter']} iterations, keeping "
             f"the last m low-rank updates (m ≥ {s['full_memory']} keeps all). Exact = dense oracle of Eq. (4) at "
             f"the solver's h, same batch; the papers' implicit = adjoint by {s['implicit_iterative']['n_iter']} "
             f"Broyden iterations; cos(GDEQ, that) is bracketed by the angle triangle inequality. JFB = GDEQ "
             f"with B⁻¹ = −I. Cosines of the batch-summed ∂L/∂θ. Boxes: 10–90 % (thin), 25–75 % (thick), median "
             f"(dot), minimum (×). Paper: MDEQ on CIFAR-10, memory sizes not in its text. {s['backend']} on "
             f"{_where(s)}.")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
