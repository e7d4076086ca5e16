"""One result type for every forward solver, and the per-sample bookkeeping behind it.

What "converged", "diverged" and "stagnated" mean is defined once, here, for every solver
(``fixed_point``, ``broyden``, ``anderson``) and every report. Per sample, at an iterate h,
with ‖·‖ the Euclidean norm (``norm="2"``) or the max-norm (``norm="inf"``):

- absolute residual   r_abs(h) = ‖F(h) − h‖
- relative residual   r_rel(h) = r_abs(h) / ‖F(h)‖      (0 when F(h) = h = 0; NaN stays NaN)
- starting scale      S_0 = max(‖h_0‖, ‖F(h_0)‖)       (the initial guess and its image)

**converged** ⇔ r_abs is finite and
    [ r_abs ≤ atol   or   ( r_abs ≤ tol · max(‖F(h)‖, s)   and   r_abs ≤ s ) ],   s = √tol · S_0.
The first test in the parenthesis is the relative test r_rel ≤ tol, with its denominator
floored at s so that a fixed point at (or near) 0 can pass: there ‖F(h)‖ → 0, and the residual
passes once it has fallen below tol · s = tol^{3/2} · S_0. The second test is what an iterate
running away with a residual that does not shrink cannot meet: where no fixed point exists
(F(h) = h + 1), ‖F(h)‖ grows and r_rel shrinks, but r_abs never falls well below the starting
scale. Wherever s ≤ ‖F(h)‖ ≤ S_0 / √tol (the usual case: the image does not shrink or grow by
orders of magnitude from the start) the parenthesis is exactly r_rel ≤ tol, the relative test of
TorchDEQ's ``f_stop_mode="rel"``.

What no residual test can tell apart: a map without a fixed point whose residual still shrinks
as the iterate grows (F(h) = h + 1/(1 + |h|), F(h) = h + e^{−h}) looks, step by step, like slow
convergence, and is reported converged once r_abs ≤ s, at ‖h‖ of a few hundred for the first at
tol = 1e-5. "Converged" certifies a small residual relative to the starting scale, not the
existence of a fixed point; a contraction (‖∂F/∂h‖ < 1, as for ``Layer.random`` with L_h < 1 and
|σ'| ≤ 1) has one, and there ‖h − h*‖ ≤ r_abs / (1 − L_h).

**diverged** ⇔ anything is not finite (r_abs, ‖F(h)‖ or ‖h‖), or
r_abs > divergence_factor · max(r_abs(h_0), 1), or the iterate ran away:
‖h‖ > divergence_factor · max(S_0, 1), or eps · ‖h‖ > max(S_0, 1) (eps of the dtype). NaN is
never "converged" and never a residual of 0. The last test is the runaway test at the dtype's
resolution: once the rounding level of h exceeds the problem's scale, F(h) − h no longer
resolves it (F(h) = h + c computes exactly h in float32 once ‖h‖ ≳ ‖c‖ / eps, and a residual of
0 there is not a fixed point). The scale is floored at 1, as in the other divergence tests, so a
start near 0 (h_0 = 1e-20 next to an unstable fixed point at 0) does not make an ordinary iterate
"diverged"; the price is that a fixed point beyond max(S_0, 1) / eps (4.5e15 in float64, 8.4e6 in
float32) cannot be reported converged.

**stagnated** ⇔ the lowest r_abs seen has not decreased for ``stall_iter`` consecutive
updates (``stall_iter=None``: never). **max_iter**: ``max_iter`` updates were applied.

The tests are taken in this order after every update, and a sample stops at the first that
holds: diverged, converged ("tolerance"), stagnated; a sample that meets none within
``max_iter`` updates stops with "max_iter". So "converged" is the definition above and not
diverged: a residual of 0 at an iterate that ran away is not a fixed point found.

Norms do not overflow or underflow for finite vectors: each is √(v·v) row by row (one pass,
no temporary), and only the rows where v·v overflowed, or fell below the smallest normal
number, are recomputed as s · √((v/s)·(v/s)) with s = max|v_i|. A norm is infinite only if
v holds an infinity or the norm itself exceeds the float64 range.

Every solve that ends with a sample not converged warns with a ``ConvergenceWarning`` (unless
``warn=False``) naming the solver, how many and which samples, and the stop reasons. Turn it
into an error with ``warnings.simplefilter("error", ConvergenceWarning)``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..backend import backend_of, dtype_name, to_numpy

from ..checks import check_choice, check_int, check_optional_int, check_real, is_real

STOP_REASONS = ("tolerance", "max_iter", "diverged", "stagnated")
NORMS = ("2", "inf")
SHOWN_SAMPLES = 5        # sample indices named in a warning before "..."


class ConvergenceWarning(UserWarning):
    """A solve (forward or inner) ended without converging for some samples.

    ``warnings.simplefilter("error", ConvergenceWarning)`` turns every such warning into an
    exception.
    """


@dataclass
class SolverResult:
    """What a forward solve returns.

    Attributes
    ----------
    h : (n, d) backend array   the solution, one row per sample (the last iterate
        whose residual is recorded; for a diverged sample the last one before it diverged)
    converged : (n,) bool      per-sample: converged as defined in this module's docstring
    n_iter : (n,) int          per-sample number of solver updates applied
    stop_reason : tuple of str per sample, one of ``STOP_REASONS``
    abs_residual, rel_residual : list of n NumPy arrays; entry i has length
        ``n_iter[i] + 1`` (the initial guess, then each update), no padding. For a
        diverged sample the last entry is the value that made it diverge (may be inf or NaN).
    n_F : int                  batched evaluations of F
    trajectory : list of (n, d) arrays or None   iterates, on request
    B_inv : Broyden's inverse-Jacobian estimate for the returned iterate, or None
    n_skipped : (n,) int or None   skipped Sherman–Morrison updates (Broyden)
    extra : dict               ``"S0"``: the (n,) starting scale max(‖h_0‖, ‖F(h_0)‖);
        Anderson adds ``"n_fallback"``: (n,) steps that took its fallback step
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

    def failure_message(self, who: str | None = None) -> str:
        """One line naming ``who`` (default: the solver), how many and which samples did not
        converge, and why; ``""`` when every sample converged."""
        return not_converged_message(who or self.solver, self.converged, self.stop_reason,
                                     self.options.get("tol"), self.options.get("atol"))

    def warn_if_not_converged(self, who: str | None = None, stacklevel: int = 2) -> bool:
        """Warn with a ``ConvergenceWarning`` (``failure_message(who)``) unless every sample
        converged; return whether it warned."""
        msg = self.failure_message(who)
        if msg:
            warnings.warn(msg, ConvergenceWarning, stacklevel=stacklevel + 1)
        return bool(msg)


def not_converged_message(who, converged, stop_reason, tol=None, atol=None) -> str:
    """``"who: 2 of 32 samples did not converge to tol=1e-05 (samples 3, 17; stop reasons:
    diverged 1, max_iter 1)"``, or ``""`` when every sample converged."""
    failed = np.flatnonzero(~np.asarray(converged, dtype=bool))
    if failed.size == 0:
        return ""
    shown = ", ".join(str(i) for i in failed[:SHOWN_SAMPLES])
    shown += ", ..." if failed.size > SHOWN_SAMPLES else ""
    reasons = [stop_reason[i] for i in failed]
    counts = ", ".join(f"{r} {reasons.count(r)}" for r in STOP_REASONS if r in reasons)
    target = "" if tol is None else f" to tol={tol:g}" + (f", atol={atol:g}" if atol else "")
    return (f"{who}: {failed.size} of {len(converged)} samples did not converge{target} "
            f"(sample{'s' if failed.size > 1 else ''} {shown}; stop reasons: {counts})")


def check_common(tol, atol, max_iter, norm, stall_iter, divergence_factor) -> dict:
    """Validate the options every solver shares (errors name the argument); return them as
    plain Python values."""
    if is_real(norm) and (norm == 2 or norm == math.inf):       # norm=2 or np.inf: as "2", "inf"
        norm = "2" if norm == 2 else "inf"
    return dict(tol=check_real("tol", tol, lo=0), atol=check_real("atol", atol, lo=0),
                max_iter=check_int("max_iter", max_iter, minimum=1),
                norm=check_choice("norm", norm, NORMS),
                stall_iter=check_optional_int("stall_iter", stall_iter, minimum=1),
                divergence_factor=check_real("divergence_factor", divergence_factor, lo=1,
                                             lo_open=True))


def check_memory(m, name="m") -> int:
    """A memory size m >= 1 (not a bool)."""
    return check_int(name, m, minimum=1)


def row_norms(vectors, norm: str = "2", xp=None) -> np.ndarray:
    """‖v‖ of every row of each (n, d) backend array in ``vectors``, as a host float64 array
    (len(vectors), n), with one device-to-host transfer on the usual path (``xp``: the arrays'
    namespace, when the caller knows it).

    ``norm="2"``: √(v·v) per row; rows where v·v overflowed or fell below the smallest normal
    number are recomputed as s · √((v/s)·(v/s)), s = max|v_i| (finite for every finite v
    whose norm fits in float64). ``norm="inf"``: max|v_i|, which cannot overflow.
    """
    xp = backend_of(vectors[0]).xp if xp is None else xp
    if norm == "inf":
        return to_numpy(xp.stack([xp.max(xp.abs(v), axis=1) for v in vectors])).astype(np.float64, copy=False)
    # √(v·v) row by row: one pass and no temporary; vector_norm squares into a temporary the
    # size of v, which at d = 512, n = 256 made each residual record ~10x slower (page faults)
    with np.errstate(over="ignore", under="ignore"):                 # rows redone below
        out = to_numpy(xp.sqrt(xp.stack([xp.vecdot(v, v, axis=-1) for v in vectors])))
    out = out.astype(np.float64, copy=False)
    redo = ~np.isfinite(out) | (out < _sqrt_tiny(vectors[0].dtype))  # (k, n) host
    if redo.any():                                                   # rare: rescale those rows
        for k in np.flatnonzero(redo.any(axis=1)):
            out[k] = np.where(redo[k], _scaled_norms(xp, vectors[k], redo[k]), out[k])
    return out


_SQRT_TINY = {}


def _sqrt_tiny(dtype) -> float:
    """√(smallest normal number) of a backend dtype, looked up once per dtype (keyed by the dtype
    with its type in front: array_api_strict warns when its dtypes are compared with NumPy's, and
    the types differ first; the name is read, slowly, only on a dtype's first call)."""
    key = (type(dtype), dtype)
    if key not in _SQRT_TINY:
        name = str(dtype).replace("array_api_strict.", "")
        _SQRT_TINY[key] = math.sqrt(float(np.finfo(name).tiny))
    return _SQRT_TINY[key]


def _scaled_norms(xp, v, rows) -> np.ndarray:
    """s · √((v/s)·(v/s)), s = max|v_i| per row, the product taken on the host in float64; only
    the rows in the host mask ``rows`` are needed (the others may hold anything)."""
    s = xp.max(xp.abs(v), axis=1)                                    # (n,)
    s_h = to_numpy(s).astype(np.float64)
    if np.all(s_h[rows] == 0):            # only zero rows (h_0 = 0, a stopped sample's Δg): 0
        return np.zeros_like(s_h)
    w = v / xp.where(s > 0, s, xp.ones_like(s))[:, None]             # entries in [−1, 1]
    q = to_numpy(xp.sqrt(xp.vecdot(w, w, axis=-1))).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return s_h * q                                               # 0 · q = 0 for v = 0


def _at_least_1(v) -> np.ndarray:
    """max(v, 1), with 1 where v is not finite (that sample has diverged already)."""
    return np.maximum(np.nan_to_num(v, nan=1.0, posinf=1.0), 1.0)


class Monitor:
    """Per-sample residual traces and the stop tests of this module's docstring.

    ``record(h, Fh)`` is called once for the initial guess and once after each update; it
    returns the (n,) host mask of samples still iterating, and leaves in ``newly_bad`` the
    samples that diverged at this record (the solvers then keep their previous iterate).
    ``n_active`` (the mask's count) and ``any_newly_bad`` are the same as Python numbers, updated
    only at a record where some sample stops: the solvers test them after every update.
    """

    def __init__(self, n, *, tol, atol, norm, stall_iter, divergence_factor, max_iter, name, warn):
        self.n, self.tol, self.atol, self.norm = n, tol, atol, str(norm)
        self.stall_iter, self.divergence_factor = stall_iter, divergence_factor
        self.max_iter, self.name, self.warn = max_iter, name, warn
        self.abs_rows, self.rel_rows, self.act_rows = [], [], []   # one (n,) row per record
        self.active = np.ones(n, dtype=bool)
        self.n_active, self.any_newly_bad = n, False
        self.converged = np.zeros(n, dtype=bool)
        self.reason = ["max_iter"] * n
        self.n_iter = np.zeros(n, dtype=np.int64)
        self.best = np.full(n, np.inf)
        self.since_best = np.zeros(n, dtype=np.int64)
        self.S0 = self.limit = self.runaway = self.eps = None        # set by the first record
        self.floor = self.scale = None                               # s = √tol·S_0, max(S_0, 1)
        self.xp = None
        self.n_records = 0

    def start(self, h, r_abs, f, hn):
        """The per-sample constants of the first record: S_0 and the divergence limits."""
        self.eps = float(np.finfo(dtype_name(h)).eps)
        self.S0 = np.maximum(hn, f)                                    # S_0 = max(‖h_0‖, ‖F(h_0)‖)
        self.limit = self.divergence_factor * _at_least_1(r_abs)      # on r_abs
        self.runaway = self.divergence_factor * _at_least_1(self.S0)  # on ‖h‖
        self.floor = math.sqrt(self.tol) * self.S0                    # s, the floor of ‖F(h)‖
        self.scale = _at_least_1(self.S0)                             # max(S_0, 1)
        # the divergence limits on (r_abs, ‖F(h)‖, ‖h‖) as one (3, n) array: eps·‖h‖ > max(S_0, 1)
        # is ‖h‖ > max(S_0, 1)/eps (eps a power of two: exact, the same test), folded with the
        # runaway limit on ‖h‖
        self.limits = np.stack([self.limit, np.full_like(self.limit, np.inf),
                                np.minimum(self.runaway, self.scale / self.eps)])

    def record(self, h, Fh, g=None, extra=()) -> np.ndarray:
        """``g``: F(h) − h where the solver has computed it already; ``extra``: more (n, d)
        arrays whose row norms the solver needs, taken in the same transfer to the host and
        left in ``extra_norms``."""
        first = self.n_records == 0
        if first:
            if tuple(Fh.shape) != tuple(h.shape):
                raise ValueError(f"F(h0, x) must return an array of the shape of h0 {tuple(h.shape)}, "
                                 f"got {tuple(Fh.shape)}")
            self.xp = backend_of(h).xp
        # the norms in one transfer to the host (one device synchronisation on a GPU)
        norms = row_norms([Fh - h if g is None else g, Fh, h, *extra], self.norm, self.xp)
        r_abs, f, hn = self.last_norms = norms[0], norms[1], norms[2]   # (n,) float64 each
        self.extra_norms = norms[3:]
        finite = np.isfinite(norms[:3]).all(axis=0)                   # r_abs, ‖F(h)‖, ‖h‖ finite
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r_rel = r_abs / f                                          # r/0 = inf; NaN stays NaN
            if not f.all():                                            # but 0/0 = 0: F(h) = h = 0
                r_rel[(f == 0) & (r_abs == 0)] = 0.0
            if first:
                self.start(h, r_abs, f, hn)
            bad = self._diverged(norms[:3], finite)
            ok = self._converged(r_abs, f, finite) & ~bad             # diverged comes first
        improved = r_abs < self.best                                   # a new lowest residual
        act = self.active
        self.abs_rows.append(r_abs)           # traces are cut per sample in ``finish``
        self.rel_rows.append(r_rel)
        self.act_rows.append(act)
        if not first:
            self.n_iter += act                # one more update for each active sample
        self.best = np.where(act & improved, r_abs, self.best)
        self.since_best = np.where(act & ~improved, self.since_best + 1, 0)
        self.newly_bad = act & bad
        stop = bad | ok
        if self.stall_iter:
            stop |= self.since_best >= self.stall_iter
        stop &= act
        self.any_newly_bad = False            # newly_bad ⊆ stop
        if stop.any():                        # diverged, else converged, else stagnated
            for i in np.flatnonzero(stop):
                self.reason[i] = "diverged" if bad[i] else "tolerance" if ok[i] else "stagnated"
            self.active = act & ~stop
            self.converged |= act & ok
            self.n_active = int(np.count_nonzero(self.active))
            self.any_newly_bad = bool(self.newly_bad.any())
        self.n_records += 1
        return self.active

    def converged_mask(self, r_abs, f, hn) -> np.ndarray:
        """r_abs finite and [r_abs ≤ atol or (r_abs ≤ tol·max(‖F(h)‖, s) and r_abs ≤ s)], s = √tol·S_0"""
        with np.errstate(invalid="ignore"):
            return self._converged(r_abs, f, np.isfinite(np.stack([r_abs, f, hn])).all(axis=0))

    def diverged_mask(self, r_abs, f, hn) -> np.ndarray:
        """anything non-finite, r_abs > factor·max(r_abs(h_0), 1), ‖h‖ > factor·max(S_0, 1),
        or eps·‖h‖ > max(S_0, 1)"""
        norms = np.stack([r_abs, f, hn])
        with np.errstate(invalid="ignore"):
            return self._diverged(norms, np.isfinite(norms).all(axis=0))

    def _converged(self, r_abs, f, finite):
        s = self.floor                                                 # (n,) the floor of ‖F(h)‖
        relative = (r_abs <= self.tol * np.maximum(f, s)) & (r_abs <= s)
        return finite & ((r_abs <= self.atol) | relative)

    def _diverged(self, norms, finite):
        """norms: (3, n) rows r_abs, ‖F(h)‖, ‖h‖; ``limits`` holds the tests of ``diverged_mask``"""
        return ~finite | (norms > self.limits).any(axis=0)

    def finish(self, h, *, n_F, options, **kw) -> SolverResult:
        # a sample is active in records 0 … n_iter (it stops for good), so its trace is the
        # first n_iter + 1 entries of its column (read from the transposed records)
        length = np.stack(self.act_rows).sum(axis=0)                  # (n,) records while active
        A = np.stack(self.abs_rows, axis=1)                           # (n, records)
        R = np.stack(self.rel_rows, axis=1)
        res = SolverResult(
            h=h, converged=self.converged.copy(), n_iter=self.n_iter.copy(),
            stop_reason=tuple(self.reason),
            abs_residual=[A[i, :k] for i, k in enumerate(length.tolist())],   # while sample i was active
            rel_residual=[R[i, :k] for i, k in enumerate(length.tolist())],
            n_F=n_F, solver=self.name, options=options, extra={"S0": self.S0}, **kw)
        if self.warn:
            res.warn_if_not_converged(stacklevel=3)
        return res
