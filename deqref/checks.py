"""Argument checks, in one place: every public call validates its scalars here.

Each check raises ``ValueError`` (``TypeError`` for a value of the wrong kind) with a one-line
message that names the argument and says what was expected, and returns the value in a plain
Python type. ``bool`` is never accepted where a number is expected (``True`` is an ``int`` in
Python, and ``max_iter=True`` silently meaning 1 is exactly the kind of answer deqref refuses).

Array checks (shape, finiteness, one backend and dtype) live in ``deqref.backend``
(``check_shape``, ``check_finite``, ``namespace``); they are re-exported here so that a module
needs one import for all of its argument checks. Other modules only name domain checks built
on these (``gradients.base.check_k``: a count >= 1; ``check_form``; ``layers.check_activation``).
"""
from __future__ import annotations

import math
import numbers

from .backend import check_finite, check_shape, namespace   # noqa: F401  (re-exported)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    """An integer that is not a bool (NumPy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number that is not a bool (NumPy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) with ``minimum <= value <= maximum``."""
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    want = f"an integer{lo}{' and' if lo and hi else ''}{hi}"
    if not is_int(value):
        raise ValueError(f"{name} must be {want}, got {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {want}, got {_describe(value)}")
    return int(value)


def check_optional_int(name: str, value, *, minimum: int | None = None,
                       maximum: int | None = None) -> int | None:
    """None, or an integer as in ``check_int``."""
    if value is None:
        return None
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except ValueError as err:
        raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None


def check_real(name: str, value, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval given by ``lo``/``hi``.

    ``lo_open`` / ``hi_open`` exclude the end point: ``check_real("lam", v, lo=0, hi=1,
    lo_open=True)`` accepts (0, 1].
    """
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}, "
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        want = f"a finite number in {left}{right}"
    elif lo is not None:
        want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        want = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        want = "a finite number"
    if not is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be {want}, got {_describe(value)}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {want}, got {_describe(value)}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {want}, got {_describe(value)}")
    return v


def check_optional_real(name: str, value, **interval) -> float | None:
    """None, or a finite real number as in ``check_real``."""
    if value is None:
        return None
    try:
        return check_real(name, value, **interval)
    except ValueError as err:
        raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None


def check_lam(lam, name: str = "lam") -> float:
    """A damping or mixing factor λ ∈ (0, 1] (Eq. 13 of Geng et al.): a finite number, not a bool."""
    return check_real(name, lam, lo=0.0, hi=1.0, lo_open=True)


def check_choice(name: str, value, choices) -> str:
    """One of ``choices`` (compared as given; the message lists them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {_describe(value)}")
    return value


def check_bool(name: str, value) -> bool:
    """True or False (NumPy bools included); not 0, 1 or a string."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)
