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
