"""Input checks and set-up shared by the forward solvers."""
from __future__ import annotations

from ..backend import backend_of, namespace
from ..checks import check_bool, check_finite, check_shape
from .result import Monitor, check_common

LAYER_ATTRIBUTES = ("check_inputs", "xp", "backend", "d")


def is_layer_like(layer) -> bool:
    """A cell (``deqref.cell``: a ``Layer``, ``GraphCell``, ...) or anything that, like one,
    checks its inputs and knows its namespace, backend and width d."""
    return all(hasattr(layer, a) for a in LAYER_ATTRIBUTES)


def prepare(layer, x, h0, name, *, tol, atol, max_iter, norm, stall_iter, divergence_factor, warn,
            return_trajectory=False):
    """Validate (x, h0, options); return (xp, backend, h0, Monitor, options dict).

    ``layer`` is a layer (see ``is_layer_like``), or a plain callable F(h, x): then ``h0``
    (n, d) is required, gives the namespace and the shape, and ``x`` is passed to F unchanged
    (checked for NaN/inf when it is an array).
    """
    opts = check_common(tol, atol, max_iter, norm, stall_iter, divergence_factor)
    check_bool("warn", warn)
    check_bool("return_trajectory", return_trajectory)
    if is_layer_like(layer):
        layer.check_inputs(x=x, h0=h0)
        check_finite("x", x)
        xp, be = layer.xp, layer.backend
        if h0 is None:
            h0 = xp.zeros((x.shape[0], layer.d), dtype=x.dtype)
    elif callable(layer):
        if h0 is None:
            raise ValueError("h0: a plain callable F(h, x) needs the initial guess h0 (n, d); "
                             "only a layer knows its width d")
        xp, be = namespace(h0=h0), backend_of(h0)
        check_shape("h0", h0, (None, None))
        if _is_array(x):
            check_finite("x", x)
    else:
        raise TypeError(f"layer must be a deqref cell or a callable F(h, x), got {type(layer).__name__}")
    check_finite("h0", h0)
    mon = Monitor(h0.shape[0], **opts, name=name, warn=warn)
    return xp, be, h0, mon, opts


def _is_array(a) -> bool:
    try:
        backend_of(a)
    except TypeError:
        return False
    return True


def bound(layer, x):
    """h ↦ F(h, x): a cell's ``bind(x)`` (the work on x alone done once; ``deqref.cell``), or
    the plain callable F(h, x) with x fixed."""
    bind = getattr(layer, "bind", None)
    if is_layer_like(layer) and callable(bind):
        return bind(x)
    return lambda h: layer(h, x)
