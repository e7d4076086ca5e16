"""The result every gradient estimator returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMS = ("vector", "matrix")


def check_form(form: str) -> str:
    """``"vector"`` (the algorithm, no matrices) or ``"matrix"`` (the printed formula)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form


def check_k(k, name: str = "k") -> int:
    """A step / term count k >= 1."""
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    return int(k)


@dataclass
class Gradient:
    """An estimate of ∂L/∂θ and ∂L/∂x for a batch, given the upstream g = ∂L/∂h*.

    Attributes
    ----------
    W, U, b : the parameter gradients, summed over the batch: (d, d), (d, d_x), (d,)
    x : (n, d_x) per-sample ∂L/∂x
    theta : (d_θ,) the parameter gradient flattened as [vec(W), vec(U), b]
    name : estimator name;  options : the options it ran with
    diagnostics : counts of VJPs / matrix products, residual traces, ...
    """

    W: object
    U: object
    b: object
    x: object
    theta: object
    name: str
    options: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    def params(self) -> dict:
        return {"W": self.W, "U": self.U, "b": self.b}


def make_gradient(layer, grads: dict, grad_x, name, options, diagnostics) -> Gradient:
    return Gradient(W=grads["W"], U=grads["U"], b=grads["b"], x=grad_x,
                    theta=layer.flatten(grads), name=name, options=options,
                    diagnostics=diagnostics)
