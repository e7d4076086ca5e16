"""Gradient estimators: the exact implicit gradient and its cheaper estimates.

``estimate(name, layer, x, result, grad_h, **options)`` selects one by name; every
estimator returns a ``Gradient`` (∂L/∂θ summed over the batch, ∂L/∂x per sample,
diagnostics, flags). ``output(name, ...)`` gives the state at which the loss is taken (h* for
all but UPG, which takes it at h_k as in Algorithm 1 of Geng et al.).

Every estimator checks its inputs before any work, and looks at what its answer rests on
(``base``): a forward solve that did not converge, or an adjoint solve that did not converge
or diverged, gives a ``ConvergenceWarning`` and a line in ``Gradient.flags``; a non-finite
answer raises ``FloatingPointError``; a (nearly) singular I − ∂F/∂h where the inverse is
needed raises ``SingularMatrixError``. ``warnings.simplefilter("error", ConvergenceWarning)``
turns every flag into an error.
"""
from __future__ import annotations

from ..solvers import keyword_only
from .base import Gradient, SingularMatrixError, check_result
from .broyden_reuse import gdeq
from .implicit import AdjointMap, adjoint_dense, implicit_dense, implicit_exact, implicit_iterative
from .neumann import jfb, neumann_matrix, npg
from .unrolled import bptt, shared_unrolls, unroll, upg, upg_output

ESTIMATORS = {
    "implicit_dense": implicit_exact,
    "implicit": implicit_iterative,
    "bptt": bptt,
    "upg": upg,
    "npg": npg,
    "jfb": jfb,
    "gdeq": gdeq,
}


def estimator_options(name: str) -> tuple:
    """The option names the estimator ``name`` accepts."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid estimators: {sorted(ESTIMATORS)}")
    return keyword_only(ESTIMATORS[name]) + (("m", "lam") if name == "implicit" else ())


def _check_options(name, options):
    valid = estimator_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for estimator {name!r}; valid: {list(valid)}")


def estimate(name: str, layer, x, result, grad_h, **options) -> Gradient:
    """Run estimator ``name`` with validated ``options`` (unknown names raise)."""
    _check_options(name, options)
    return ESTIMATORS[name](layer, x, result, grad_h, **options)


def output(name: str, layer, x, result, **options):
    """Where the loss is taken for estimator ``name``: h_k for UPG, ``result.h`` otherwise."""
    _check_options(name, options)
    check_result(layer, x, result)
    if name == "upg":
        return upg_output(layer, x, result, **{k: v for k, v in options.items() if k in ("k", "lam")})
    return result.h


__all__ = ["AdjointMap", "ESTIMATORS", "Gradient", "SingularMatrixError", "adjoint_dense", "bptt",
           "estimate", "estimator_options", "gdeq", "implicit_dense", "implicit_exact",
           "implicit_iterative", "jfb", "neumann_matrix", "npg", "output", "shared_unrolls", "unroll",
           "upg", "upg_output"]
