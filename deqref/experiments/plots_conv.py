"""The figure of the convolutional-DEQ experiment (conv_deq, Table 3 of Geng et al.), from its JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from .plots import _caption, plt
from .plots_speed import _table, _where

STYLE = {"implicit": "tab:blue", "upg": "tab:red", "implicit_jr": "tab:cyan", "upg_jr": "tab:orange"}


def plot_conv_deq(data: dict, path: Path) -> None:
    """Four panels: validation accuracy per seed; the median training step split into forward /
    backward / update; the forward's iterations per epoch (mean over seeds); the backward's peak
    memory; and Table 3's row of numbers beneath."""
    s, methods = data["setting"], data["methods"]
    names = list(methods)
    fig = plt.figure(figsize=(13, 8.2))
    gs = fig.add_gridspec(2, 4, height_ratios=(1.25, 0.5))
    ax_acc, ax_time, ax_it, ax_mem = (fig.add_subplot(gs[0, i]) for i in range(4))
    ax_tab = fig.add_subplot(gs[1, :])
    y = np.arange(len(names))[::-1]
    labels = [methods[n]["label"] for n in names]

    for yi, n in zip(y, names):                       # accuracy: one dot per seed, bar = mean
        a = 100 * np.array(methods[n]["summary"]["acc_per_seed"])
        ax_acc.barh(yi, a.mean(), color=STYLE.get(n), alpha=0.35)
        ax_acc.plot(a, np.full(a.shape, yi), "o", color=STYLE.get(n), ms=4)
    lo = min(min(methods[n]["summary"]["acc_per_seed"]) for n in names)
    ax_acc.set(yticks=y, yticklabels=labels, xlim=(max(100 * lo - 10, 0), 100),
               xlabel="validation accuracy, % (dots: seeds)", title="accuracy after training")

    left = np.zeros(len(names))                       # the median step, split
    for key, lab, c in (("step_forward", "forward", "tab:blue"), ("step_backward", "backward", "tab:red"),
                        ("step_update", "update", "tab:gray")):
        w = 1e3 * np.array([np.mean([np.median(_step(r, key)) for r in methods[n]["runs"]]) for n in names])
        ax_time.barh(y, w, left=left, color=c, alpha=0.75, label=lab)
        left += w
    for yi, n, x in zip(y, names, left):
        r = methods[n]["summary"]
        ax_time.text(x, yi, f" {r['speedup_train']:.2f}× / {r['speedup_backward']:.1f}×", va="center", fontsize=7.5)
    ax_time.set(yticks=y, yticklabels=[], xlim=(0, 1.6 * left.max()),
                xlabel="median training step, ms (mean over seeds)",
                title="speed-up over implicit: step / backward")
    ax_time.legend(fontsize=7.5, loc="lower right")

    for n in names:                                   # the forward's iterations over training
        it = np.array([r["forward_iters"] for r in methods[n]["runs"]])          # (seeds, epochs)
        ax_it.plot(np.arange(1, it.shape[1] + 1), it.mean(axis=0), marker="o", ms=3,
                   color=STYLE.get(n), label=methods[n]["label"])
    ax_it.axhline(s["forward"]["max_iter"], color="k", lw=0.8, ls=":")
    ax_it.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_it.set(xlabel="epoch", ylabel="Broyden iterations per sample (mean over seeds)",
              title=f"forward (tol {s['forward']['tol']:g}, ≤ {s['forward']['max_iter']} it.)")
    ax_it.grid(alpha=0.3)
    ax_it.legend(fontsize=7)

    mb = np.array([methods[n]["memory"]["peak_bytes"] for n in names]) / 2 ** 20
    ax_mem.barh(y, mb, color=[STYLE.get(n) for n in names], alpha=0.75)
    for yi, v, n in zip(y, mb, names):
        ax_mem.text(v, yi, f" {v / mb[names.index('implicit')]:.2f}×", va="center", fontsize=7.5)
    ax_mem.set(yticks=y, yticklabels=[], xlim=(0, 1.35 * mb.max()),
               xlabel=f"MiB (tracemalloc, batch {data['memory']['batch_size']})",
               title="backward's peak memory")

    header = ["method", "val acc %", "fwd it.", "converged", "step sp.", "bwd sp.", "bwd mem",
              "paper (metric, training speed-up, peak memory)"]
    rows = []
    for n in names:
        r, m = methods[n]["summary"], methods[n]
        rows.append([m["label"], f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}",
                     f"{r['forward_iters']:.1f}", f"{100 * r['forward_converged']:.1f} %",
                     f"{r['speedup_train']:.2f}×", f"{r['speedup_backward']:.2f}×",
                     f"{m['memory']['peak_bytes'] / methods['implicit']['memory']['peak_bytes']:.2f}×",
                     m["paper"]["short"]])
    tab = _table(ax_tab, header, rows, fontsize=7.5)
    for (row, col), cell in tab.get_celld().items():          # the paper's column is the widest
        cell.set_width(0.25 if col == len(header) - 1 else 0.75 / (len(header) - 1))
    _caption(fig, f"Table 3 of Geng et al. at teaching scale: ConvCell C={s['C']}, G={s['G']} on "
                  f"digits ({s['n_train']} train / {s['n_val']} val, 1×8×8), {s['epochs']} epochs, "
                  f"Adam lr {s['lr']:g}, seeds {s['seeds']}; JR λ={s['jr']['weight']:g}, "
                  f"{s['jr']['probes']} probe; NumPy float64, 1 BLAS thread, {_where(s)}")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _step(run: dict, key: str) -> list:
    """A run's per-step forward, backward or update times (update = step − forward − backward)."""
    if key == "step_update":
        return list(np.array(run["step_time"]) - np.array(run["step_forward"]) - np.array(run["step_backward"]))
    return run[key]
