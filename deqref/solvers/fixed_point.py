"""Fixed-point iteration, plain (Eq. 10 of [1]) and damped (Eq. 13 of [1]).

    h_{t+1} = λ F(h_t, x) + (1 − λ) h_t,   λ ∈ (0, 1]   (λ = 1: Eq. 10)

Each sample stops on its own; a stopped sample's row is frozen.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

from .common import bound, prepare
from ..checks import check_lam


def fixed_point(layer, x, h0=None, *, lam: float = 1.0, tol: float = 1e-5, atol: float = 0.0,
                max_iter: int = 100, norm: str = "2", stall_iter: int | None = None,
                divergence_factor: float = 1e8, return_trajectory: bool = False,
                warn: bool = True):
    """Solve h = F(h, x) by (damped) fixed-point iteration.

    Parameters
    ----------
    layer : a cell (``deqref.cell``: ``Layer``, ``GraphCell``, ...), or a plain callable
        F(h, x) -> (n, d) (then h0 is required; x is passed to it unchanged, None allowed)
    x : (n, d_x) array;  h0 : (n, d) array or None (zeros; a layer only)
    lam : damping λ ∈ (0, 1] of Eq. (13); 1 gives plain iteration, Eq. (10)
    tol, atol : stop a sample once it has converged: r_abs ≤ atol, or r_abs ≤ tol · max(‖F(h)‖, s)
        and r_abs ≤ s, with s = √tol · S_0 and S_0 = max(‖h_0‖, ‖F(h_0)‖) (``deqref.solvers.result``)
    max_iter : at most this many updates;  norm : "2" or "inf"
    stall_iter : stop a sample as "stagnated" after this many updates without a new
        lowest residual (None: never)
    divergence_factor : "diverged" once anything is not finite, r_abs > factor · max(r_abs(h0), 1)
        or ‖h‖ > factor · max(S_0, 1); also once eps · ‖h‖ > max(S_0, 1) (``deqref.solvers.result``)
    warn : warn with a ``ConvergenceWarning`` when a sample did not converge

    Returns
    -------
    SolverResult
    """
    lam = check_lam(lam)
    xp, be, h, mon, opts = prepare(layer, x, h0, "fixed_point" if lam == 1 else "damped_fixed_point",
                                   tol=tol, atol=atol, max_iter=max_iter, norm=norm,
                                   stall_iter=stall_iter, divergence_factor=divergence_factor,
                                   warn=warn, return_trajectory=return_trajectory)
    opts["lam"] = lam
    F = bound(layer, x)                                      # h ↦ F(h, x)
    Fh = F(h)                                                # (n, d)
    active = mon.record(h, Fh)
    n_F, traj = 1, ([h] if return_trajectory else None)
    for _ in range(max_iter):
        if mon.n_active == 0:                                # every sample has stopped
            break
        h_new = Fh if lam == 1.0 else lam * Fh + (1.0 - lam) * h   # Eq. (13)   (n, d)
        if mon.n_active < mon.n:                             # freeze the stopped samples
            h_new = xp.where(be.from_host(active)[:, None], h_new, h)
        F_new = F(h_new)
        n_F += 1
        active = mon.record(h_new, F_new)
        if mon.any_newly_bad:                                # keep the last finite iterate
            bad = be.from_host(mon.newly_bad)[:, None]
            h_new, F_new = xp.where(bad, h, h_new), xp.where(bad, Fh, F_new)
        h, Fh = h_new, F_new
        if traj is not None:
            traj.append(h)
    return mon.finish(h, n_F=n_F, options=opts, trajectory=traj)
