"""Forward solvers for h* = F(h*, x): one result type, one entry point by name."""
from __future__ import annotations

import functools
import inspect

from .anderson import anderson
from .broyden import DenseInverse, LowRankInverse, broyden
from .fixed_point import fixed_point
from .result import STOP_REASONS, ConvergenceWarning, SolverResult

SOLVERS = {"fixed_point": fixed_point, "broyden": broyden, "anderson": anderson}


def solver_options(method: str) -> tuple:
    """The option names ``method`` accepts."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; valid solvers: {sorted(SOLVERS)}")
    return keyword_only(SOLVERS[method])


@functools.lru_cache(maxsize=None)
def keyword_only(fn) -> tuple:
    """The names of ``fn``'s keyword-only parameters (read from its signature once per function)."""
    params = inspect.signature(fn).parameters
    return tuple(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)


def solve(layer, x, h0=None, method: str = "fixed_point", **options) -> SolverResult:
    """Run the solver ``method`` with validated ``options`` (unknown names raise)."""
    valid = solver_options(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for solver {method!r}; valid: {list(valid)}")
    return SOLVERS[method](layer, x, h0, **options)


__all__ = ["SOLVERS", "STOP_REASONS", "ConvergenceWarning", "DenseInverse", "LowRankInverse",
           "SolverResult", "anderson", "broyden", "fixed_point", "solve", "solver_options"]
