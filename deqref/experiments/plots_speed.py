"""The figures of the training-speed experiments (accuracy_speed, jfb_batch), from their JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import _caption, plt

METHOD_STYLE = {"implicit": ("tab:blue", "o"), "upg": ("tab:red", "s"), "npg": ("tab:orange", "D"),
                "jfb": ("tab:gray", "x"), "gdeq": ("tab:green", "^")}
BATCH_COLORS = {"2400": "black", "1200": "tab:blue", "600": "tab:green", "64": "tab:orange",
                "32": "tab:red"}


def _where(s: dict) -> str:
    m = s.get("machine") or {}
    load = m.get("loadavg_1_5_15min")
    return (f"{m.get('cpu', 'a CPU')} ({m.get('cores', '?')} cores"
            + (f", 1-min load {load[0]:g} at the start" if load else "") + ")")


def _table(ax, header, rows, fontsize=7.5):
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(fontsize)
    tab.scale(1.0, 1.35)
    return tab


def plot_accuracy_speed(data: dict, path: Path) -> None:
    """GDEQ Fig. 1 (validation accuracy against training wall time, per method) beside the
    training time split into forward / backward / update, and the table of Table 3 / Table 2."""
    s, methods = data["setting"], data["methods"]
    fig = plt.figure(figsize=(13, 7.4))
    gs = fig.add_gridspec(2, 2, height_ratios=(1.3, 0.55))
    ax_acc, ax_bar, ax_tab = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    for name, m in methods.items():
        c, mk = METHOD_STYLE.get(name, (None, "."))
        t = np.array([np.cumsum(r["time_epoch"]) for r in m["runs"]])      # (n_seeds, epochs)
        a = 100 * np.array([r["val_metric"] for r in m["runs"]])
        tm, am = t.mean(axis=0), a.mean(axis=0)
        ax_acc.plot(tm, am, marker=mk, ms=4, color=c, label=m["label"])
        ax_acc.fill_between(tm, a.min(axis=0), a.max(axis=0), color=c, alpha=0.15, lw=0)
    ax_acc.set(xlabel="training wall time, s (forward + backward + update, mean over seeds)",
               ylabel="validation accuracy, %", title="accuracy against wall time (GDEQ Fig. 1)")
    lo = min(np.min([r["val_metric"] for r in m["runs"]]) for m in methods.values())
    ax_acc.set_ylim(max(100 * lo - 2, 0), 100)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")

    names = list(methods)
    y = np.arange(len(names))[::-1]
    parts = (("time_forward_s", "forward", "tab:blue"), ("time_backward_s", "backward", "tab:red"),
             ("time_update_s", "update", "tab:gray"))
    left = np.zeros(len(names))
    for key, lab, c in parts:
        w = np.array([methods[n]["summary"][key] for n in names])
        ax_bar.barh(y, w, left=left, color=c, alpha=0.75, label=lab)
        left += w
    for yi, n in zip(y, names):
        r = methods[n]["summary"]
        ax_bar.text(left[names.index(n)], yi, f"  {r['speedup_train']:.2f}× (bwd {r['speedup_backward']:.1f}×)",
                    va="center", fontsize=8)
    ax_bar.set_yticks(y, [methods[n]["label"] for n in names], fontsize=8)
    ax_bar.set_xlim(0, 1.45 * left.max())
    ax_bar.set(xlabel="training time, s (mean over seeds)",
               title="time split; speed-up over implicit: training (backward)")
    ax_bar.legend(fontsize=8, loc="lower right")
    ax_bar.grid(alpha=0.3, axis="x")

    header = ["method", "val. accuracy %\n(mean ± std)", "train s", "forward s", "backward s",
              "fwd iters\n(converged)", "speed-up\ntraining", "speed-up\nbackward", "paper speed-up", "paper acc. %\n(CIFAR-10)"]
    rows = []
    for n in names:
        m, r = methods[n], methods[n]["summary"]
        rows.append([m["label"], f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}",
                     f"{r['time_train_s']:.2f}", f"{r['time_forward_s']:.2f}", f"{r['time_backward_s']:.3f}",
                     f"{r['forward_iters']:.1f} ({100 * r['forward_converged']:.0f} %)",
                     f"{r['speedup_train']:.2f}×", f"{r['speedup_backward']:.1f}×",
                     m["paper"]["speedup"], m["paper"]["accuracy"]])
    _table(ax_tab, header, rows)
    ax_tab.set_title("Table 3 of Geng et al. [1] / Table 2 of GDEQ [2], at teaching scale", fontsize=10)
    f = s["forward"]
    _caption(fig, f"Digits (scikit-learn 8×8; {s['n_train']} train / {s['n_val']} validation), DEQ d = {s['d']}, "
             f"tanh, ‖W‖₂ ≤ {s.get('spectral_norm') or s['L_h_init']} (projected after every update), linear head, cross-entropy; Adam lr {s['lr']:g}, batch "
             f"{s['batch_size']}, {s['epochs']} epochs; seeds {s['seeds']} (line: mean, band: min–max); accuracy "
             f"after the last epoch. Forward for all: Broyden (memory {f['m']}) to rel. residual {f['tol']:g}, "
             f"≤ {f['max_iter']} iterations. Implicit: adjoint by {s['implicit_backward_iters']} Broyden "
             f"iterations; UPG/NPG k = 5, λ = 0.5 (UPG's unrolled steps count as forward); GDEQ reuses the "
             f"forward's B_T⁻¹. Times: {s['backend']} on {_where(s)}, one BLAS thread, evaluation excluded; "
             f"they depend on the machine. [1] Geng et al. 2021 (MDEQ, CIFAR-10/ImageNet); [2] Nguyen and Mauch "
             f"(MDEQ, CIFAR-10, 4 GPUs).")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_jfb_batch(data: dict, path: Path) -> None:
    """Figure 1 and Table 1 of the JFB report: training loss against epoch and against wall time
    per batch size, the target loss 5e-4 (the report's lowest loss of batches 2400, 64 and 32) as
    a horizontal line with the point where each run first reaches it (★), and the table of lowest
    loss, its epoch, the time to the target and the time per epoch. Runs stopped at the target
    are shorter; when their lengths differ by more than 5x the epoch axis is logarithmic."""
    s, runs = data["setting"], data["runs"]
    target = s.get("target_loss", data["paper"]["lowest_loss_full_batch"])
    fig = plt.figure(figsize=(13.5, 7.4))
    gs = fig.add_gridspec(2, 2, height_ratios=(1.3, 0.5))
    ax_ep, ax_t, ax_tab = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    for key, r in runs.items():
        c = BATCH_COLORS.get(key)
        lab = f"{key} (full batch)" if r["full_batch"] else key
        loss = np.array(r["train_loss"])
        ax_ep.semilogy(np.arange(1, len(loss) + 1), loss, color=c, lw=1.2, label=lab)
        ax_t.semilogy(np.cumsum(r["time_epoch"]), loss, color=c, lw=1.2, label=lab)
        for ax, x in ((ax_ep, r["epoch_of_lowest"]), (ax_t, r["time_to_lowest_s"])):
            ax.plot([x], [r["lowest_loss"]], marker="o", ms=4, color=c)
        tt = r.get("time_to_target")
        if tt and tt["reached"]:
            for ax, x in ((ax_ep, tt["epoch"]), (ax_t, tt["time_s"])):
                ax.plot([x], [loss[tt["epoch"] - 1]], marker="*", ms=11, color=c, mec="k", mew=0.5)
    lengths = [len(r["train_loss"]) for r in runs.values()]
    if max(lengths) > 5 * min(lengths):
        ax_ep.set_xscale("log")
    for ax in (ax_ep, ax_t):
        ax.axhline(data["constant_mse"], color="k", ls=":", lw=0.9,
                   label="best constant (variance of the targets)")
        ax.axhline(target, color="tab:purple", ls="--", lw=0.9,
                   label=f"target {target:g} (report's lowest loss of 2400, 64, 32); ★ first reached")
        ax.grid(alpha=0.3, which="both")
    ax_ep.set(xlabel="epoch", ylabel="training loss (MSE, mean over the epoch's batches)",
              title="loss against epoch (report's Fig. 1, right)")
    ax_t.set(xlabel="training wall time, s (forward + backward + update)",
             title="loss against wall time (report's Fig. 1, left)")
    ax_t.legend(fontsize=7.5, title="batch size", title_fontsize=8)
    paper = data["paper"]["table1"]
    full_s = paper.get("2400", {}).get("time_s", float("nan"))
    full_ms = next(r["ms_per_epoch"] for r in runs.values() if r["full_batch"])
    header = ["batch size", "epochs\nrun", "lowest loss", "epoch of\nlowest", "total\ntime, s",
              "ms / epoch", "ms / epoch\n÷ full batch", f"loss ≤ {target:g}:\nepoch, time", "fwd iters",
              "val. acc.\n(last epoch)", "report:\nlowest loss", "report:\nepoch", "report:\ntotal s",
              "report: total\n÷ full batch"]
    rows = []
    for key, r in runs.items():
        p, tt = paper.get(key, {}), r.get("time_to_target")
        reached = ("—" if tt is None else f"{tt['epoch']}, {tt['time_s']:.1f} s" if tt["reached"]
                   else f"no ({tt['max_epochs']} ep.)")
        rows.append([key, f"{r['epochs']}", f"{r['lowest_loss']:.2e}", f"{r['epoch_of_lowest']}",
                     f"{r['time_total_s']:.2f}", f"{r['ms_per_epoch']:.1f}",
                     f"{r['ms_per_epoch'] / full_ms:.2f}", reached,
                     f"{np.mean(r['forward_iters']):.1f}", f"{100 * r['val_metric'][-1]:.1f} %",
                     f"{p.get('lowest_loss', float('nan')):.4f}", f"{p.get('epoch_of_lowest', '')}",
                     f"{p.get('time_s', float('nan')):.1f}", f"{p.get('time_s', float('nan')) / full_s:.2f}"])
    _table(ax_tab, header, rows, fontsize=7)
    ax_tab.set_title("Table 1 of the report, deqref's run beside the report's", fontsize=10)
    if s["epochs"] < s["paper_epochs"]:
        length = (f" SHORT: {s['epochs']} epochs instead of the report's {s['paper_epochs']:,}, to "
                  f"time the epochs; whether a batch size reaches {target:g}, and when, needs `--full`.")
    elif s.get("stop_loss"):
        length = (f" Each run stops after the first epoch with training loss ≤ {s['stop_loss']:g}, "
                  f"or after {s['epochs']:,} epochs.")
    else:
        length = ""
    _caption(fig, f"Heat-transfer regression (Raitz): tanh(x/(1+e^−y) + y/(1+x²+z²)), {s['n']} points in a "
             f"20×13×8 room, seeded 80/20 split (seed {s['seed']}), inputs standardized with the training "
             f"split's mean and std. DEQ latent dimension {s['d']}, ReLU, ‖W‖₂ = {s['L_h_init']} at init (no "
             f"projection), linear head, MSE; JFB gradient; forward: fixed-point iteration from h = 0 until "
             f"‖F(h) − h‖_∞ < {s['atol']:g} per sample, ≤ {s['max_iter']} iterations; Adam lr {s['lr']:g}; the "
             f"same initialization for every batch size.{length} Times: "
             f"{s['backend']} on {_where(s)}, one BLAS thread, evaluation excluded; they depend on the machine. Report: PyTorch on a "
             f"CPU, every run 3,000 epochs; its Table 1 'time' column is the total training time.")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
