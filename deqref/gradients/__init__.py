"""Gradient estimators: the exact implicit gradient and its cheaper estimates.

``estimate(name, layer, x, result, grad_h, **options)`` selects one by name; every
estimator returns a ``Gradient`` (∂L/∂θ summed over the batch, ∂L/∂x per sample,
diagnostics). ``output(name, ...)`` gives the state at which the loss is taken (h* for
all but UPG, which takes it at h_k as in Algorithm 1 of Geng et al.).
"""
from __future__ import annotations

import inspect

from .base import Gradient
from .broyden_reuse import gdeq
from .implicit import AdjointMap, adjoint_dense, implicit_dense, implicit_iterative
from .neumann import jfb, neumann_matrix, npg
from .unrolled import bptt, unroll, upg, upg_output


def _implicit_dense(layer, x, result, grad_h, *, form: str = "vector"):
    """Eq. (4) with a dense solve per sample (the oracle)."""
    from .base import check_form
    est = implicit_dense(layer, x, result.h, grad_h, matrix=check_form(form) == "matrix")
    est.options = {"form": form}
    return est


ESTIMATORS = {
    "implicit_dense": _implicit_dense,
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
    params = inspect.signature(ESTIMATORS[name]).parameters
    names = tuple(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    return names + (("m", "lam") if name == "implicit" else ())


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
    if name == "upg":
        return upg_output(layer, x, result, **{k: v for k, v in options.items() if k in ("k", "lam")})
    return result.h


__all__ = ["AdjointMap", "ESTIMATORS", "Gradient", "adjoint_dense", "bptt", "estimate",
           "estimator_options", "gdeq", "implicit_dense", "implicit_iterative", "jfb",
           "neumann_matrix", "npg", "output", "unroll", "upg", "upg_output"]
