"""The figure of the IGNN experiment (Table 4 of Geng et al.), from its JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import _caption, plt

STYLE = {"implicit": ("tab:blue", "o"), "upg_0.5": ("tab:red", "s"), "upg_1.0": ("tab:orange", "D")}


def plot_ignn(data: dict, path: Path) -> None:
    """Per task: test accuracy against training wall time (mean over seeds, band = range), and
    the final accuracy per seed with each method's backward time per step and speed-up."""
    s, tasks = data["setting"], data["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, (task, t) in zip(axes, tasks.items()):
        ax_t, ax_a = row
        names = list(t["methods"])
        for i, name in enumerate(names):
            m = t["methods"][name]
            c, mk = STYLE.get(name, (None, "."))
            time_ = np.array([np.cumsum(np.add(np.add(r["time_forward"], r["time_backward"]), r["time_update"]))
                              for r in m["runs"]])                            # (seeds, epochs)
            time_ = time_[:, np.array(m["runs"][0]["eval_epoch"]) - 1]         # at the evaluated epochs
            acc = 100 * np.array([r["test_acc"] for r in m["runs"]])
            ax_t.plot(time_.mean(axis=0), acc.mean(axis=0), color=c, marker=mk, ms=3, label=m["label"])
            ax_t.fill_between(time_.mean(axis=0), acc.min(axis=0), acc.max(axis=0), color=c, alpha=0.15, lw=0)
            r = m["summary"]
            ax_a.scatter(np.full(len(r["acc_per_seed"]), i) + np.linspace(-0.15, 0.15, len(r["acc_per_seed"])),
                         r["acc_per_seed"], color=c, marker=mk, s=18, alpha=0.7)
            ax_a.errorbar(i + 0.3, r["acc_mean"], yerr=r["acc_std"], color=c, marker="_", ms=14, capsize=4)
            sp = "" if name == "implicit" else f"\n{r['speedup_train']:.2f}× train, {r['speedup_backward']:.1f}× bwd"
            ax_a.annotate(f"{r['acc_mean']:.1f} ± {r['acc_std']:.1f} %\nbwd {r['backward_ms_per_step']:.2f} ms/step{sp}",
                          (i, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=7.5)
        d = t["data"]
        ax_t.set(xlabel="training wall time, s (forward + backward + update, mean over seeds)",
                 ylabel="test accuracy, %",
                 title=f"{task}: {t['kind']} classification, {d['n_train']} train / {d['n_test']} test")
        ax_t.grid(alpha=0.3)
        ax_t.legend(fontsize=8, loc="lower right")
        ax_a.set_xticks(range(len(names)), [t["methods"][n]["label"] for n in names], fontsize=8)
        lo = min(min(t["methods"][n]["summary"]["acc_per_seed"]) for n in names)
        ax_a.set_ylim(max(lo - 12, 0), 100 + 0.12 * min(lo, 88))      # room for the paper's line
        ax_a.set(ylabel="final test accuracy per seed, %",
                 title=f"final test accuracy after {t['epochs']} epochs, per seed and mean ± std")
        ax_a.text(0.01, 0.98, "paper (Table 4):\n" + "\n".join(
            f"  {t['methods'][n]['label'].split(' (')[0]}: {t['methods'][n]['paper']}" for n in names),
            transform=ax_a.transAxes, fontsize=6.5, va="top")
        ax_a.grid(alpha=0.3, axis="y")
    _caption(fig, f"IGNN cell m = {s['m']}, {s['activation']}, ‖W‖∞ λ_pf(Â) ≤ {s['kappa']:g} after every "
                  f"Adam step (lr {s['lr']:g}); fixed-point forward to {s['forward']['tol']:g}; implicit = "
                  f"fixed-point adjoint to 1e-6; seeds {s['seeds']}; {s['backend']}, one BLAS thread")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
