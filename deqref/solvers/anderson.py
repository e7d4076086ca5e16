"""Anderson acceleration of the fixed-point iteration (Walker and Ni, 2011).

Per sample, with the last m_t = min(m, t + 1) iterates h_i, their images F_i = F(h_i)
and residuals G_i = F_i − h_i (rows of G, (m_t, d)):

    α = argmin ‖Σ α_i G_i‖²  s.t.  Σ α_i = 1
      = H⁻¹1 / (1ᵀ H⁻¹ 1),   H = G Gᵀ + ρ I,   ρ = ridge · (tr(G Gᵀ)/m_t + tiny)
    h_{t+1} = β Σ α_i F_i + (1 − β) Σ α_i h_i

The ridge term scaled by tr(GGᵀ) keeps H positive definite, so the small
(m_t × m_t) system is never singular, even when residuals are collinear or zero.
"""
from __future__ import annotations

import numpy as np

from .common import bound, prepare
from .result import check_lam, check_memory


def anderson(layer, x, h0=None, *, m: int = 5, ridge: float = 1e-8, beta: float = 1.0,
             tol: float = 1e-5, atol: float = 0.0, max_iter: int = 100, norm: str = "2",
             stall_iter: int | None = 30, divergence_factor: float = 1e8,
             return_trajectory: bool = False, warn: bool = True):
    """Solve h = F(h, x) by Anderson acceleration with memory ``m``.

    Parameters
    ----------
    m : number of past iterates mixed (>= 1; m = 1 is damped iteration with λ = β)
    ridge : relative Tikhonov regularization ρ of the small least-squares system (> 0)
    beta : mixing β ∈ (0, 1]
    Other options as in ``fixed_point``.
    """
    m = check_memory(m)
    beta = check_lam(beta, "beta")
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")
    xp, h, mon, opts = prepare(layer, x, h0, "anderson", tol=tol, atol=atol, max_iter=max_iter,
                               norm=norm, stall_iter=stall_iter,
                               divergence_factor=divergence_factor, warn=warn)
    opts.update(m=m, ridge=ridge, beta=beta)
    be, n = layer.backend, h.shape[0]
    tiny = float(np.finfo(str(h.dtype).replace("array_api_strict.", "")).tiny) ** 0.5

    F = bound(layer, x)                                        # h ↦ F(h, x)
    Fh = F(h)
    X, Fs = [h], [Fh]                                          # histories, newest last
    active = mon.record(h, Fh)
    n_F, traj = 1, ([h] if return_trajectory else None)
    for _ in range(max_iter):
        if not active.any():
            break
        Xs, FF = xp.stack(X, axis=1), xp.stack(Fs, axis=1)      # (n, m_t, d)
        G = FF - Xs                                            # (n, m_t, d)
        mt = G.shape[1]
        H = G @ xp.permute_dims(G, (0, 2, 1))                   # (n, m_t, m_t)
        trace = xp.sum(G * G, axis=(1, 2))                      # (n,)
        rho = ridge * (trace / mt + tiny)                       # (n,)
        H = H + rho[:, None, None] * xp.eye(mt, dtype=h.dtype)
        z = xp.linalg.solve(H, xp.ones((n, mt, 1), dtype=h.dtype))[:, :, 0]   # H⁻¹1  (n, m_t)
        alpha = z / xp.sum(z, axis=1, keepdims=True)                          # Σ α = 1
        mixed_F = (alpha[:, None, :] @ FF)[:, 0, :]             # Σ α_i F_i   (n, d)
        mixed_h = (alpha[:, None, :] @ Xs)[:, 0, :]             # Σ α_i h_i   (n, d)
        h_new = xp.where(be.from_host(active)[:, None], beta * mixed_F + (1 - beta) * mixed_h, h)
        F_new = F(h_new)
        n_F += 1
        active = mon.record(h_new, F_new)
        bad = be.from_host(mon.newly_bad)[:, None]             # keep the last finite iterate
        h, Fh = xp.where(bad, h, h_new), xp.where(bad, Fh, F_new)
        X, Fs = (X + [h])[-m:], (Fs + [Fh])[-m:]
        if traj is not None:
            traj.append(h)
    return mon.finish(h, n_F=n_F, options=opts, trajectory=traj)
