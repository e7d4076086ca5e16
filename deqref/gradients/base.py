"""The result every gradient estimator returns, and the checks every estimator runs.

Every estimator goes through the same three steps, written once here so none can skip one:

1. ``check_call`` before any work: ``result`` is a ``SolverResult``; x, ``result.h`` and
   ``grad_h`` have the layer's shapes, backend and dtype and are finite (``ValueError``
   naming the argument). Options are checked with ``deqref.checks`` (``True`` is no number).
2. the estimator's own arithmetic;
3. ``make_gradient``, which looks at what the estimate rests on:

   (a) the forward solve: samples with ``result.converged`` False;
   (b) an inner solve (the iterative implicit estimator's adjoint, ``InnerSolve``): with
       tol > 0, samples that did not reach it; with tol = 0 (a fixed number of backward
       iterations) not reaching a tolerance is the design, but divergence is not: see
       ``InnerSolve.diverged``;
   (c) the output: ∂L/∂θ and ∂L/∂x must be finite, else ``FloatingPointError`` naming the
       estimator and the cause.

   Each problem of (a) and (b) is one line, issued as a ``ConvergenceWarning`` and kept in
   ``Gradient.flags`` (``Gradient.ok`` is True when there is none). Turn every such warning
   into an error with ``warnings.simplefilter("error", deqref.ConvergenceWarning)``.

Where an estimator needs (I − ∂F/∂h)⁻¹ explicitly (the dense oracle, in both forms),
``check_nonsingular`` refuses a matrix whose condition number reaches 1/eps of the dtype
(``SingularMatrixError``, a ``LinAlgError`` and so a ``ValueError``).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..backend import all_finite, backend_of, dtype_name, eps, to_numpy
from ..cell import check_cell
from ..checks import check_choice, check_finite, check_int
from ..numerics import pow2_exponent
from ..solvers import ConvergenceWarning, SolverResult

FORMS = ("vector", "matrix")
SHOW = 5                      # sample indices named in a message before "..."


class SingularMatrixError(np.linalg.LinAlgError):
    """I − ∂F/∂h is singular, or so nearly that a solve with it is rounding noise."""


def check_form(form: str) -> str:
    """``"vector"`` (the algorithm, no matrices) or ``"matrix"`` (the printed formula)."""
    return check_choice("form", form, FORMS)


def check_k(k, name: str = "k") -> int:
    """A step / term count k >= 1 (an integer, not a bool)."""
    return check_int(name, k, minimum=1)


def check_arrays(layer, x, **arrays) -> None:
    """``layer`` is a cell (``deqref.cell``); x (n, d_x) and the named (n, d) ``arrays`` are
    arrays of its backend and dtype, with n >= 1 and no NaN or infinity (errors name the
    argument)."""
    check_cell(layer)
    for name, a in (("x", x), *arrays.items()):
        if a is None:
            raise ValueError(f"{name} must be an array, got None")
    layer.check_inputs(x=x, **arrays)
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one sample (n >= 1 rows), got shape {tuple(x.shape)}")
    for name, a in (("x", x), *arrays.items()):
        check_finite(name, a)


def _check_type(result) -> None:
    if not isinstance(result, SolverResult):
        raise ValueError(f"result must be a SolverResult (what deqref.solve returns), "
                         f"got {type(result).__name__}")


def check_result(layer, x, result) -> None:
    """``result`` is a ``SolverResult`` whose h, with x, passes ``check_arrays``."""
    check_cell(layer)
    _check_type(result)
    check_arrays(layer, x, **{"result.h": result.h})


def check_call(layer, x, result, grad_h) -> None:
    """Validate an estimator's inputs before any work: ``check_result``, and ``grad_h`` (n, d)
    an array like ``result.h``, finite."""
    check_cell(layer)
    _check_type(result)
    check_arrays(layer, x, **{"result.h": result.h, "grad_h": grad_h})


def samples(mask) -> str:
    """'k of n samples [i, j, ...]' for a host bool mask (n,)."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(int(i)) for i in idx[:SHOW]) + (", ..." if idx.size > SHOW else "")
    return f"{idx.size} of {np.size(mask)} samples [{shown}]"


def _counts(reasons, mask) -> str:
    picked = [r for r, m in zip(reasons, mask) if m]
    return ", ".join(f"{r} {picked.count(r)}" for r in dict.fromkeys(picked))


def forward_flag(name: str, result) -> str | None:
    """(a) The forward solve did not converge for some samples: the estimate is taken at a
    point that is not a fixed point."""
    bad = ~np.asarray(result.converged, dtype=bool)
    if not bad.any():
        return None
    return (f"{name}: the forward solve ({result.solver}) did not converge for {samples(bad)} "
            f"(stop: {_counts(result.stop_reason, bad)}); the gradient is taken away from h*")


@dataclass
class InnerSolve:
    """An inner (adjoint) solve, as ``make_gradient`` judges it (b).

    who : e.g. ``"implicit (broyden adjoint)"``
    abs_residual : per sample, the residual trace r_0 … r_K of the solve (host arrays)
    converged, stop_reason : per sample, as in ``SolverResult``
    tol : the tolerance it was asked for (0: a fixed number of iterations)
    fixed_point : the solve is the fixed-point iteration y ← ∂F/∂h y + g, which diverges when
        ρ(∂F/∂h) > 1 (named in the flag as the likely cause)
    eps : machine epsilon of the dtype
    """

    who: str
    abs_residual: list
    converged: np.ndarray
    stop_reason: tuple
    tol: float
    fixed_point: bool
    eps: float

    # A residual may rise on the way down: Broyden's (a secant method) was measured up to 6.6x
    # above its lowest value at iteration 20 on non-normal layers while converging, and the
    # fixed-point residual ‖(∂F/∂h)^t g‖ rose 1.2x on a contraction with ‖∂F/∂h‖₂ = 1.26 > 1 >
    # ρ = 0.8. A rise of more than RISE is more than a digit of accuracy lost.
    RISE = 10.0

    def diverged(self) -> dict:
        """Per-sample host masks of the three ways a fixed-iteration (tol = 0) solve fails:

        - "non-finite or runaway": a non-finite residual, or the solver stopped it as diverged;
        - "no progress": r_K ≥ (1 − √eps) r_0 > 0 (the last residual is not below the first,
          up to the rounding of r itself);
        - "rose": r_K > RISE · min_t r_t while r_K > √eps · r_0 (it lost the accuracy it had
          reached; below √eps · r_0 a rise is rounding noise, and harmless).
        """
        n, root = len(self.abs_residual), np.sqrt(self.eps)
        out = {k: np.zeros(n, dtype=bool) for k in ("non-finite or runaway", "no progress", "rose")}
        for i, r in enumerate(self.abs_residual):
            r = np.asarray(r, dtype=np.float64)
            if not np.all(np.isfinite(r)) or self.stop_reason[i] == "diverged":
                out["non-finite or runaway"][i] = True
            elif r[0] > 0 and r[-1] >= (1 - root) * r[0]:
                out["no progress"][i] = True
            elif r[-1] > root * r[0] and r[-1] > self.RISE * r.min():
                out["rose"][i] = True
        return out

    def flag(self) -> str | None:
        if self.tol > 0:
            bad = ~np.asarray(self.converged, dtype=bool)
            if not bad.any():
                return None
            return (f"{self.who}: did not converge to tol={self.tol:g} for {samples(bad)} "
                    f"(stop: {_counts(self.stop_reason, bad)})")
        kinds = self.diverged()
        bad = np.logical_or.reduce(list(kinds.values()))
        if not bad.any():
            return None
        why = ", ".join(f"{k} {int(m.sum())}" for k, m in kinds.items() if m.any())
        hint = "; ρ(∂F/∂h) ≥ 1?" if self.fixed_point else ""
        return f"{self.who}: the adjoint diverged or made no progress for {samples(bad)} ({why}{hint})"


@dataclass
class Gradient:
    """An estimate of ∂L/∂θ and ∂L/∂x for a batch, given the upstream g = ∂L/∂h*.

    Attributes
    ----------
    grads : the parameter gradients, summed over the batch, by the cell's parameter names
        (``cell.PARAMS``); each is also an attribute: for the dense layer ``W`` (d, d),
        ``U`` (d, d_x), ``b`` (d,)
    x : (n, d_x) per-sample ∂L/∂x
    theta : (d_θ,) the parameter gradient flattened in the cell's θ order (``cell.PARAMS``,
        each row-major, as ``cell.flatten`` does), made on first use: a copy of every parameter
        gradient, which a training step does not need
    name : estimator name;  options : the options it ran with
    diagnostics : counts of VJPs / matrix products, residual traces, ...
    flags : one line per problem found (forward solve not converged, adjoint not converged
        or diverged); each was also issued as a ``ConvergenceWarning``
    """

    grads: dict
    x: object
    name: str
    options: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    order: tuple = field(default=(), repr=False)     # the cell's PARAMS: θ's order

    @property
    def ok(self) -> bool:
        """No flag: the forward (and any inner) solve converged and nothing diverged."""
        return not self.flags

    @property
    def theta(self):
        """∂L/∂θ flattened in the cell's θ order   # (d_θ,)"""
        if "_theta" not in self.__dict__:
            first = self.grads[self.order[0]]
            xp = backend_of(first).xp
            self.__dict__["_theta"] = xp.concat([xp.reshape(self.grads[k], (-1,)) for k in self.order])
        return self.__dict__["_theta"]

    def __getattr__(self, name):          # only for names that are not fields: the parameters
        grads = self.__dict__.get("grads")
        if grads is not None and name in grads:
            return grads[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def params(self) -> dict:
        return dict(self.grads)


def _check_output(name, grads, grad_x, grad_h, flags) -> None:
    """(c) A non-finite ∂L/∂θ or ∂L/∂x is an error naming the estimator and the cause."""
    xp = backend_of(grad_h).xp
    theta_ok = all(all_finite(a, xp) for a in grads.values())
    bad = [what for what, ok in (("∂L/∂θ", theta_ok), ("∂L/∂x", all_finite(grad_x, xp))) if not ok]
    if not bad:
        return
    if flags:
        cause = " | ".join(flags)
    else:
        g_max = float(to_numpy(xp.max(xp.abs(grad_h))))
        cause = (f"overflow: the values pass the range of {dtype_name(grad_h)} "
                 f"(largest |grad_h| {g_max:.3g})")
    raise FloatingPointError(f"{name}: {' and '.join(bad)} not finite; cause: {cause}")


def _caller_level() -> int:
    """``stacklevel`` for ``warnings.warn`` called in ``make_gradient``: the first frame outside
    this package (estimators call each other and ``estimate``, so the depth varies)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2                    # 1: make_gradient itself
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


def make_gradient(layer, grads: dict, grad_x, name, options, diagnostics, *, grad_h,
                  result=None, inner: InnerSolve | None = None) -> Gradient:
    """The ``Gradient``, after (a) the forward ``result``, (b) the ``inner`` solve and (c) the
    output were looked at (see the module docstring). Flags are warned at the first caller
    outside ``deqref.gradients``."""
    flags = [f for f in (forward_flag(name, result) if result is not None else None,
                         inner.flag() if inner is not None else None) if f]
    if set(grads) != set(layer.PARAMS):
        raise ValueError(f"{name}: the cell's gradient has the parameters {sorted(grads)}, "
                         f"expected those of its PARAMS {list(layer.PARAMS)}")
    _check_output(name, grads, grad_x, grad_h, flags)
    for f in flags:
        warnings.warn(f, ConvergenceWarning, stacklevel=_caller_level())
    return Gradient(grads={k: grads[k] for k in layer.PARAMS}, x=grad_x, name=name,
                    options=options, diagnostics=diagnostics, flags=tuple(flags),
                    order=tuple(layer.PARAMS))


def check_nonsingular(name: str, A, jac_norm=None) -> None:
    """Refuse A = I − ∂F/∂h (n, d, d) where cond₂(A) = σ_max/σ_min ≥ 1/eps of its dtype: a
    solve with it would be rounding noise (LAPACK's own test is rcond < eps).

    ``jac_norm`` (n,) host, optional: an upper bound b_i of ‖∂F/∂h‖₂ per sample. Where b < 1,
    cond₂(I − ∂F/∂h) ≤ (1 + b)/(1 − b) (‖(I − J)⁻¹‖ ≤ 1/(1 − ‖J‖), the Neumann series); where
    that bound is below √(1/eps) — room for the rounding of b itself — the sample passes
    without its SVD (the SVD costs 3–5x the LU solve it guards).
    """
    be = backend_of(A)
    n = A.shape[0]
    need = np.ones(n, dtype=bool)
    if jac_norm is not None:
        b = np.asarray(jac_norm, dtype=np.float64)
        with np.errstate(divide="ignore"):
            need = ~((b < 1) & ((1 + b) / (1 - b) < np.sqrt(1.0 / eps(A))))
    if not need.any():
        return
    idx = np.flatnonzero(need)
    sub = A if need.all() else be.xp.take(A, be.from_host(idx), axis=0)
    sv = to_numpy(be.xp.linalg.svdvals(sub)).astype(np.float64)             # (m, d), descending
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(sv[:, -1] > 0, sv[:, 0] / np.where(sv[:, -1] > 0, sv[:, -1], 1.0), np.inf)
    bad = np.zeros(n, dtype=bool)
    bad[idx] = ~(cond < 1.0 / eps(A))
    if bad.any():
        raise SingularMatrixError(
            f"{name}: I − ∂F/∂h is singular (or nearly: condition number "
            f"{cond[~(cond < 1.0 / eps(A))].max():.3g} >= 1/eps = {1.0 / eps(A):.3g}) for "
            f"{samples(bad)}; Eq. (4) has no answer there")


def unit_scale(v):
    """Per-row powers of two (s, 1/s), each (n, 1) on v's backend, with max_j |v_ij s_i| in
    [1/2, 1) (zero rows: s = 1): a linear solve for v·s takes the same steps as the solve for
    v, to the last bit (a power of two rescales without rounding, barring underflow), but its
    norms and products cannot overflow."""
    be = backend_of(v)
    m = to_numpy(be.xp.max(be.xp.abs(v), axis=1)).astype(np.float64)          # (n,)
    e = pow2_exponent(m)                                                     # m = f 2^e, f ∈ [½, 1)
    dtype = dtype_name(v)
    e_max = np.finfo(dtype).maxexp - 2
    e = np.clip(e, -e_max, e_max)                                            # 2^±e representable
    return (be.from_host(np.ldexp(1.0, -e)[:, None].astype(dtype)),
            be.from_host(np.ldexp(1.0, e)[:, None].astype(dtype)))
