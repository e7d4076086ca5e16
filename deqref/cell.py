"""What a cell is: the one interface every solver, estimator, theory checker and trainer uses.

A *cell* is the map F(h, x; θ) of an implicit model, batched over n samples. Whatever its inside
(a dense layer, a graph layer, a convolution), it shows the rest of deqref the same face:

- **state and input as rows.** ``h`` is (n, d) and ``x`` is (n, d_x): one row per sample, each
  the cell's state or input flattened in an order the cell documents (the graph cell: vec(H)
  column by column). Solvers, estimators and their per-sample stop tests see only rows.
- **θ as one vector.** ``cell.theta`` is (d_θ,), the parameters flattened in the order of
  ``cell.PARAMS`` (each one row-major); ``unflatten`` / ``flatten`` go between it and the dict
  ``{name: array}``; ``with_theta`` / ``with_params`` give the same cell with other parameters.
- **Jacobians in the paper's layout** (denominator layout, Geng et al.; ``docs/conventions.md``):
  ``dF_dh`` (n, d, d) with [j, i] = ∂F_i/∂h_j, ``dF_dtheta`` (n, d_θ, d), ``dF_dx`` (n, d_x, d),
  per sample. They are for small problems (the matrix forms, the oracle, the tests).
- **products that never form them.** ``linearize(h, x)`` returns a :class:`Linearization` at
  (h, x), which holds whatever the products share (σ′ of the pre-activation, say) and gives
      ``vjp_h(v)``     = ∂F/∂h · v per sample        (n, d)
      ``vjp_x(v)``     = ∂F/∂x · v per sample        (n, d_x)
      ``vjp_theta(v)`` = Σ_samples ∂F/∂θ · v as a dict of parameter-shaped arrays
      ``jvp_h(u)``     = (∂F/∂h)ᵀ · u per sample     (n, d)   (standard layout J_h u)
  ``bind(x)`` is F(·, x) with the work that depends on x alone done once (a solver calls it
  many times at one x); ``bind_linear(x)`` is h ↦ (F(h, x), linearize(h, x)) from one
  evaluation (what an unrolled step keeps for its reverse pass).
- **its own checks.** ``check_inputs(x=..., **named_states)`` validates x (n, d_x) and named
  (n, d) arrays (backend, dtype, shapes, n ≥ 1) with one-line errors naming the argument.
- **a bound when it knows one.** ``jacobian_norm_bound(h, x)``: a host (n,) upper bound of
  ‖∂F/∂h‖₂ per sample, or None. Estimators that invert I − ∂F/∂h use it to skip an SVD.
- **well-posedness.** ``project(bound)`` returns the cell with its parameters moved onto the set
  where its own well-posedness condition holds with margin ``bound`` < 1 (the dense layer:
  ‖W‖₂ ≤ bound; the graph cell: ‖W‖∞ λ_pf(Â) ≤ bound), as a trainer calls it after each step.

Attributes every cell has: ``d``, ``d_x``, ``d_theta``, ``dtype`` (a name), ``backend``, ``xp``
(the backend's array namespace), ``PARAMS`` (names in θ's order).

``check_cell(obj)`` says in one line what an object lacks to be a cell. Adding a cell needs no
change in ``deqref.solvers`` or ``deqref.gradients``: they use only the names above.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

CELL_ATTRIBUTES = ("d", "d_x", "d_theta", "dtype", "backend", "xp", "PARAMS", "theta")
CELL_METHODS = ("check_inputs", "__call__", "bind", "bind_linear", "linearize", "dF_dh",
                "dF_dtheta", "dF_dx", "unflatten", "flatten", "with_theta", "params",
                "with_params", "jacobian_norm_bound", "project")


@runtime_checkable
class Linearization(Protocol):
    """F's derivatives at one (h, x), products only (see the module docstring)."""

    def vjp_h(self, v): ...

    def vjp_x(self, v): ...

    def vjp_theta(self, v) -> dict: ...

    def jvp_h(self, u): ...


class Cell(Protocol):
    """The interface of the module docstring, for type checkers and readers."""

    d: int
    d_x: int
    d_theta: int
    dtype: str
    PARAMS: tuple

    def check_inputs(self, x=..., **vectors) -> None: ...

    def __call__(self, h, x): ...

    def bind(self, x) -> Callable: ...

    def bind_linear(self, x) -> Callable: ...

    def linearize(self, h, x) -> Linearization: ...

    def dF_dh(self, h, x): ...

    def dF_dtheta(self, h, x): ...

    def dF_dx(self, h, x): ...

    def unflatten(self, theta) -> dict: ...

    def flatten(self, params: dict): ...

    def with_theta(self, theta) -> "Cell": ...

    def params(self) -> dict: ...

    def with_params(self, params: dict) -> "Cell": ...

    def jacobian_norm_bound(self, h, x): ...

    def project(self, bound: float) -> "Cell": ...


def vjp_sum(cell, terms, scale: float = 1.0):
    """(Σ_t scale · ∂F/∂θ|_{h_t} v_t as a dict, Σ_t scale · ∂F/∂x|_{h_t} v_t  # (n, d_x)) over
    ``terms`` = [(linearization at h_t, v_t), ...], summed in the order given.

    A cell may define ``vjp_sum(terms, scale)`` to share work between the terms (the dense layer
    takes its U and b terms once from Σ_t v_t ⊙ σ′_t); otherwise each term's ``vjp_theta`` and
    ``vjp_x`` are added up. This is the reverse pass of unrolled steps (UPG, BPTT)."""
    own = getattr(cell, "vjp_sum", None)
    if own is not None:
        return own(terms, scale)
    grads = grad_x = None
    for lin, v in terms:
        g, gx = lin.vjp_theta(v), lin.vjp_x(v)
        grads = ({k: scale * a for k, a in g.items()} if grads is None
                 else {k: grads[k] + scale * g[k] for k in grads})
        grad_x = scale * gx if grad_x is None else grad_x + scale * gx
    return grads, grad_x


NOT_GIVEN = object()          # check_rows: x left out (None passed for x is an error)


def check_rows(anchor: dict, d: int, d_x: int, x=NOT_GIVEN, **vectors) -> None:
    """``check_inputs`` of a cell whose samples are free rows: x (n, d_x) and the named (n, d)
    arrays (h, h0, grad_h, ...) share one n >= 1 and the backend and dtype of ``anchor`` (one of
    the cell's parameters, ``{name: array}``); errors name the argument. x, when given, must be
    an array; a named array may be None (an optional argument left out)."""
    from .backend import check_shape, namespace, require_arrays
    if x is NOT_GIVEN:
        x = None
    else:
        require_arrays(x=x)
    namespace(**anchor, x=x, **vectors)
    n = None
    if x is not None:
        check_shape("x", x, (None, d_x))
        n = x.shape[0]
    for name, v in vectors.items():
        if v is not None:
            check_shape(name, v, (n, d))
            n = v.shape[0]
    if n == 0:
        name, a = next((k, v) for k, v in (("x", x), *vectors.items()) if v is not None)
        raise ValueError(f"{name} must hold at least one sample (n >= 1 rows), "
                         f"got shape {tuple(a.shape)}")


def missing(obj) -> list:
    """The names of the interface that ``obj`` lacks, looked up without running them (a
    property such as ``theta`` is not evaluated: it copies every parameter): in the object's own
    ``__dict__`` and in the ``__dict__`` of each class of its MRO (where ``getattr`` finds them,
    less ``__getattr__``; not on the metaclass, where ``type.__call__`` would stand in for F)."""
    found = set(getattr(obj, "__dict__", ())).union(*(vars(k) for k in type(obj).__mro__))
    return [n for n in CELL_ATTRIBUTES + CELL_METHODS if n not in found]


def is_cell(obj) -> bool:
    return not missing(obj)


def check_cell(obj, name: str = "layer") -> None:
    """Refuse, in one line naming the argument, an object that is not a cell."""
    lacks = missing(obj)
    if lacks:
        shown = ", ".join(lacks[:4]) + (", ..." if len(lacks) > 4 else "")
        raise ValueError(f"{name} must be a deqref cell (Layer, GraphCell, ...: see deqref.cell), "
                         f"got {type(obj).__name__} without {shown}")
