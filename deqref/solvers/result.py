"""One result type for every forward solver, and the per-sample bookkeeping behind it.

Residuals are defined once, here, for every solver and every report:

- absolute residual  ``r_abs(h) = ‖F(h) − h‖``
- relative residual  ``r_rel(h) = ‖F(h) − h‖ / ‖F(h)‖``

per sample, with ‖·‖ the Euclidean norm (``norm="2"``) or the max-norm
(``norm="inf"``). A sample has converged when ``r_rel ≤ tol`` or ``r_abs ≤ atol``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..backend import backend_of, to_numpy

STOP_REASONS = ("tolerance", "max_iter", "diverged", "stagnated")
NORMS = ("2", "inf")


class ConvergenceWarning(UserWarning):
    """A forward solve ended without meeting its tolerance for some samples."""


@dataclass
class SolverResult:
    """What a forward solve returns.

    Attributes
    ----------
    h : (n, d) backend array   the solution, one row per sample (the last iterate
        whose residual is recorded; for a diverged sample the last finite one)
    converged : (n,) bool      per-sample: the tolerance was met
    n_iter : (n,) int          per-sample number of solver updates applied
    stop_reason : tuple of str per sample, one of ``STOP_REASONS``
    abs_residual, rel_residual : list of n NumPy arrays; entry i has length
        ``n_iter[i] + 1`` (the initial guess, then each update), no padding
    n_F : int                  batched evaluations of F
    trajectory : list of (n, d) arrays or None   iterates, on request
    B_inv : Broyden's inverse-Jacobian estimate for the returned iterate, or None
    n_skipped : (n,) int or None   skipped Sherman–Morrison updates (Broyden)
    """

    h: object
    converged: np.ndarray
    n_iter: np.ndarray
    stop_reason: tuple
    abs_residual: list
    rel_residual: list
    n_F: int
    solver: str
    options: dict
    trajectory: list | None = None
    B_inv: object = None
    n_skipped: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    @property
    def final_abs_residual(self) -> np.ndarray:
        return np.array([r[-1] for r in self.abs_residual])

    @property
    def final_rel_residual(self) -> np.ndarray:
        return np.array([r[-1] for r in self.rel_residual])

    def summary(self) -> str:
        reasons = {r: self.stop_reason.count(r) for r in STOP_REASONS if r in self.stop_reason}
        return (f"{self.solver}: {int(self.converged.sum())}/{len(self.converged)} converged, "
                f"iterations max {int(self.n_iter.max())} mean {self.n_iter.mean():.1f}, "
                f"max rel residual {self.final_rel_residual.max():.2e}, stop {reasons}")


def check_common(tol, atol, max_iter, norm, stall_iter, divergence_factor):
    """Validate the options every solver shares; raise naming the argument."""
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (np.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if str(norm) not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if stall_iter is not None and not (isinstance(stall_iter, (int, np.integer)) and stall_iter >= 1):
        raise ValueError(f"stall_iter must be None or an integer >= 1, got {stall_iter!r}")
    if not (divergence_factor > 1):
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")


def check_lam(lam, name="lam"):
    """λ must lie in (0, 1]."""
    if not (isinstance(lam, (int, float, np.floating)) and 0 < lam <= 1):
        raise ValueError(f"{name} must lie in (0, 1], got {lam!r}")
    return float(lam)


def check_memory(m, name="m"):
    if not (isinstance(m, (int, np.integer)) and m >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {m!r}")
    return int(m)


class Monitor:
    """Per-sample residual traces, convergence, divergence and stagnation.

    ``record(h, Fh)`` is called once for the initial guess and once after each
    update; it returns the (n,) host mask of samples still iterating.
    A sample diverges when its residual is not finite or exceeds
    ``divergence_factor · max(r_abs(h_0), 1)``; it stagnates when its best
    absolute residual has not decreased for ``stall_iter`` consecutive updates.
    """

    def __init__(self, n, *, tol, atol, norm, stall_iter, divergence_factor, max_iter, name, warn):
        self.n, self.tol, self.atol, self.norm = n, tol, atol, str(norm)
        self.stall_iter, self.divergence_factor = stall_iter, divergence_factor
        self.max_iter, self.name, self.warn = max_iter, name, warn
        self.abs_rows, self.rel_rows, self.act_rows = [], [], []   # one (n,) row per record
        self.active = np.ones(n, dtype=bool)
        self.converged = np.zeros(n, dtype=bool)
        self.reason = ["max_iter"] * n
        self.n_iter = np.zeros(n, dtype=np.int64)
        self.best = np.full(n, np.inf)
        self.since_best = np.zeros(n, dtype=np.int64)
        self.limit = None
        self.n_records = 0

    def norms(self, v):
        xp = backend_of(v).xp
        if self.norm == "inf":
            return xp.max(xp.abs(v), axis=1)
        # √(v·v) row by row: one pass and no temporary; vector_norm squares into a temporary the
        # size of v, which at d = 512, n = 256 made each residual record ~10x slower (page faults)
        return xp.sqrt(xp.vecdot(v, v, axis=-1))

    def record(self, h, Fh) -> np.ndarray:
        xp = backend_of(h).xp
        # both norms in one transfer to the host (one device synchronisation on a GPU)
        r_abs, f = to_numpy(xp.stack([self.norms(Fh - h), self.norms(Fh)])).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r_rel = np.where(f > 0, r_abs / np.where(f > 0, f, 1.0), np.where(r_abs > 0, np.inf, 0.0))
        first = self.n_records == 0
        if first:
            self.limit = self.divergence_factor * np.maximum(np.nan_to_num(r_abs, nan=1.0, posinf=1.0), 1.0)
        act = self.active
        self.abs_rows.append(r_abs)           # traces are cut per sample in ``finish``
        self.rel_rows.append(r_rel)
        self.act_rows.append(act)
        if not first:
            self.n_iter[act] += 1
        ok = (r_rel <= self.tol) | (r_abs <= self.atol)
        bad = ~np.isfinite(r_abs) | (r_abs > self.limit)      # r_rel = inf when F(h) = 0 ≠ h
        improved = r_abs < self.best
        self.best = np.where(act & improved, r_abs, self.best)
        self.since_best = np.where(act & ~improved, self.since_best + 1, 0)
        stalled = (self.since_best >= self.stall_iter) if self.stall_iter else np.zeros(self.n, bool)
        self.newly_bad = act & bad
        for mask, reason in ((act & ok, "tolerance"), (act & ~ok & bad, "diverged"),
                             (act & ~ok & ~bad & stalled, "stagnated")):
            for i in np.flatnonzero(mask):
                self.reason[i] = reason
            self.active = self.active & ~mask
        self.converged |= act & ok
        self.n_records += 1
        return self.active

    def finish(self, h, *, n_F, options, **kw) -> SolverResult:
        reasons = tuple(self.reason)
        if self.warn and not self.converged.all():
            counts = {r: reasons.count(r) for r in STOP_REASONS[1:] if r in reasons}
            warnings.warn(f"{self.name}: {int((~self.converged).sum())} of {self.n} samples did not "
                          f"converge to tol={self.tol:g} ({counts})", ConvergenceWarning, stacklevel=3)
        act = np.stack(self.act_rows)                                # (records, n)
        A, R = np.stack(self.abs_rows), np.stack(self.rel_rows)      # (records, n)
        return SolverResult(
            h=h, converged=self.converged.copy(), n_iter=self.n_iter.copy(), stop_reason=reasons,
            abs_residual=[A[act[:, i], i] for i in range(self.n)],    # while sample i was active
            rel_residual=[R[act[:, i], i] for i in range(self.n)],
            n_F=n_F, solver=self.name, options=options, **kw)
