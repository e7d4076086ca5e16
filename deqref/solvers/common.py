"""Input checks and set-up shared by the forward solvers."""
from __future__ import annotations

from ..backend import check_finite
from .result import Monitor, check_common


def prepare(layer, x, h0, name, *, tol, atol, max_iter, norm, stall_iter, divergence_factor, warn):
    """Validate (x, h0, options); return (xp, h0, Monitor, options dict)."""
    check_common(tol, atol, max_iter, norm, stall_iter, divergence_factor)
    layer.check_inputs(x=x, h0=h0)
    check_finite("x", x)
    xp = layer.xp
    if h0 is None:
        h0 = xp.zeros((x.shape[0], layer.d), dtype=x.dtype)
    else:
        check_finite("h0", h0)
    mon = Monitor(x.shape[0], tol=tol, atol=atol, norm=norm, stall_iter=stall_iter,
                  divergence_factor=divergence_factor, max_iter=max_iter, name=name, warn=warn)
    opts = dict(tol=tol, atol=atol, max_iter=max_iter, norm=str(norm), stall_iter=stall_iter,
                divergence_factor=divergence_factor)
    return xp, h0, mon, opts


def bound(layer, x):
    """h ↦ F(h, x): ``layer.bind(x)`` where the layer has it (input injection computed once)."""
    from ..layers import Layer
    if isinstance(layer, Layer) and type(layer).__call__ is Layer.__call__:   # not overridden
        return layer.bind(x)
    return lambda h: layer(h, x)
