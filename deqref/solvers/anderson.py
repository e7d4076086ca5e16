"""Anderson acceleration of the fixed-point iteration (Walker and Ni, 2011).

Per sample, with the last m_t = min(m, t + 1) iterates h_i, their images F_i = F(h_i)
and residuals G_i = F_i − h_i (rows of G, (m_t, d)):

    α = argmin ‖Σ α_i G_i‖²  s.t.  Σ α_i = 1
      = H⁻¹1 / (1ᵀ H⁻¹ 1),   H = G Gᵀ + ρ I,   ρ = ridge · (tr(G Gᵀ)/m_t + tiny)
    h_{t+1} = β Σ α_i F_i + (1 − β) Σ α_i h_i

The ridge ρ makes H positive definite in exact arithmetic. In floating point it does so
only where ρ is above H's rounding level: the default ridge 1e-8 is, in float64
(eps 2.2e-16), and is not in float32 (eps 1.2e-7), where H can be singular to working
precision when residuals repeat (an iterate that no longer moves at float32 resolution).
So the solve is guarded: where the small LU solve fails for a sample (an exact zero pivot
raises in NumPy; CuPy returns NaN) or gives a non-finite α, that sample takes the step
with α = (0, …, 0, 1), the damped fixed-point step h_{t+1} = β F(h_t) + (1 − β) h_t from
its newest iterate, and the step is counted in ``result.extra["n_fallback"]``. Anderson
therefore never raises on a singular system, in either dtype; samples that have stopped
are given H = I (their α is not used), so they never trigger it.

G is divided by a power of two per sample (exact, so α keeps its bits) of the size of the
recent iterates: G Gᵀ cannot overflow for huge iterates (1e200 in float64).
"""
from __future__ import annotations

import numpy as np

from ..backend import dtype_name, to_numpy
from ..checks import check_real
from .common import bound, prepare
from ..checks import check_lam
from ..numerics import pow2_scale
from .result import check_memory


def solve_small(xp, H):
    """z = H⁻¹1 per sample   # (n, m_t); a row of NaN where the solve failed.

    One batched LU solve; where it raises (NumPy, array-api-strict: an exactly singular
    pivot), each sample is solved alone. CuPy returns NaN instead of raising, which the
    caller treats the same way.
    """
    n, mt = H.shape[0], H.shape[1]
    ones = xp.ones((n, mt, 1), dtype=H.dtype)
    try:
        return xp.linalg.solve(H, ones)[:, :, 0]
    except np.linalg.LinAlgError:
        rows = []
        for i in range(n):
            try:
                rows.append(xp.linalg.solve(H[i, ...], ones[i, :, 0]))
            except np.linalg.LinAlgError:
                rows.append(xp.full((mt,), float("nan"), dtype=H.dtype))
        return xp.stack(rows, axis=0)


def newest(xp, mt, dtype):
    """α = (0, …, 0, 1): all weight on the newest iterate   # (1, m_t)"""
    return xp.reshape(xp.astype(xp.arange(mt) == mt - 1, dtype), (1, mt))


def mixing_weights(xp, G, ridge, tiny, run):
    """α = H⁻¹1 / (1ᵀH⁻¹1), H = G Gᵀ + ρ I, per sample; the newest iterate's α = e_{m_t} where
    the solve fails. G (n, m_t, d) residual rows; run (n,) samples still iterating.
    Returns (α (n, m_t), usable (n,): the solve gave a finite α)."""
    mt = G.shape[1]
    H = G @ xp.permute_dims(G, (0, 2, 1))                       # (n, m_t, m_t)
    trace = xp.sum(G * G, axis=(1, 2))                          # (n,)
    rho = ridge * (trace / mt + tiny)                           # (n,)
    eye = xp.eye(mt, dtype=G.dtype)
    # a stopped sample repeats its iterate, so its H is singular: give it I (its α is unused)
    H = xp.where(run[:, None, None], H + rho[:, None, None] * eye, eye)
    z = solve_small(xp, H)                                      # H⁻¹1, NaN where it failed
    alpha = z / xp.sum(z, axis=1, keepdims=True)                # Σ α = 1
    usable = xp.all(xp.isfinite(alpha), axis=1)                 # (n,)
    return xp.where(usable[:, None], alpha, newest(xp, mt, G.dtype)), usable


def anderson(layer, x, h0=None, *, m: int = 5, ridge: float = 1e-8, beta: float = 1.0,
             tol: float = 1e-5, atol: float = 0.0, max_iter: int = 100, norm: str = "2",
             stall_iter: int | None = 30, divergence_factor: float = 1e8,
             return_trajectory: bool = False, warn: bool = True):
    """Solve h = F(h, x) by Anderson acceleration with memory ``m``.

    Parameters
    ----------
    m : number of past iterates mixed (>= 1; m = 1 is damped iteration with λ = β)
    ridge : relative Tikhonov regularization ρ of the small least-squares system (> 0; see
        the module docstring for what it guarantees in each dtype)
    beta : mixing β ∈ (0, 1]
    Other options as in ``fixed_point``.
    """
    m = check_memory(m)
    beta = check_lam(beta, "beta")
    ridge = check_real("ridge", ridge, lo=0, lo_open=True)
    xp, be, h, mon, opts = prepare(layer, x, h0, "anderson", tol=tol, atol=atol, max_iter=max_iter,
                                   norm=norm, stall_iter=stall_iter,
                                   divergence_factor=divergence_factor, warn=warn,
                                   return_trajectory=return_trajectory)
    opts.update(m=m, ridge=ridge, beta=beta)
    n = h.shape[0]
    tiny = float(np.finfo(dtype_name(h)).tiny) ** 0.5
    n_fallback = xp.zeros((n,), dtype=xp.int64)                # per sample, on the device

    F = bound(layer, x)                                        # h ↦ F(h, x)
    Fh = F(h)
    X, Fs = [h], [Fh]                                          # histories, newest last
    active = mon.record(h, Fh)
    scales = [np.maximum(mon.last_norms[1], mon.last_norms[2])]   # host (n,) per record
    n_F, traj = 1, ([h] if return_trajectory else None)
    for _ in range(max_iter):
        if mon.n_active == 0:                                   # every sample has stopped
            break
        Xs, FF = xp.stack(X, axis=1), xp.stack(Fs, axis=1)      # (n, m_t, d)
        run = be.from_host(active)                              # (n,) samples still iterating
        # α does not change when G is divided by one number per sample; a power of two (exact)
        # keeps G Gᵀ below overflow for huge iterates (1e200)
        s = be.asarray(pow2_scale(np.max(scales[-m:], axis=0), dtype_name(h)), dtype_name(h))
        alpha, usable = mixing_weights(xp, (FF - Xs) / s[:, None, None], ridge, tiny, run)
        n_fallback = n_fallback + xp.astype(~usable & run, xp.int64)
        mixed_F = (alpha[:, None, :] @ FF)[:, 0, :]             # Σ α_i F_i   (n, d)
        mixed_h = (alpha[:, None, :] @ Xs)[:, 0, :]             # Σ α_i h_i   (n, d)
        h_new = xp.where(run[:, None], beta * mixed_F + (1 - beta) * mixed_h, h)
        F_new = F(h_new)
        n_F += 1
        active = mon.record(h_new, F_new)
        scales.append(np.maximum(mon.last_norms[1], mon.last_norms[2]))   # max(‖F(h)‖, ‖h‖)
        bad = be.from_host(mon.newly_bad)[:, None]             # keep the last finite iterate
        h, Fh = xp.where(bad, h, h_new), xp.where(bad, Fh, F_new)
        X, Fs = (X + [h])[-m:], (Fs + [Fh])[-m:]
        if traj is not None:
            traj.append(h)
    res = mon.finish(h, n_F=n_F, options=opts, trajectory=traj)
    res.extra["n_fallback"] = to_numpy(n_fallback)
    return res
