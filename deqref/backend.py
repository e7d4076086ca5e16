"""The NumPy/CuPy switch: one code path, the array module chosen here.

deqref's numerical code never imports ``numpy`` for array work; it asks for
the namespace of its inputs (``namespace(h=h, x=x)``), which also checks that
all inputs live on one backend and share one floating dtype. The namespace is
an Array-API one (``array_api_compat``), so the same code runs on

- ``"numpy"``  (default) NumPy, with ``scipy.linalg`` for dense solves;
- ``"cupy"``   CuPy on an NVIDIA GPU, with ``cupyx.scipy.linalg``;
- ``"strict"`` ``array_api_strict``, a guard namespace used by the tests: any
  NumPy-only call on a backend array fails there, on machines without a GPU.

Select with ``set_backend(name)``, the ``use_backend(name)`` context manager,
or the environment variable ``DEQREF_BACKEND``. Random draws are made on the
host with ``numpy.random.default_rng(seed)`` and then moved to the backend, so
one seed gives the same numbers on every backend.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass
from types import ModuleType

import numpy as np

BACKENDS = ("numpy", "cupy", "strict")
DTYPES = ("float64", "float32")


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here, or arrays were mixed."""


@dataclass(frozen=True)
class Backend:
    """A named array namespace ``xp`` plus what the namespace does not cover."""

    name: str
    xp: ModuleType

    def asarray(self, a, dtype: str = "float64"):
        """Move ``a`` (anything NumPy accepts) onto this backend as ``dtype``."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if self.name == "numpy":
            return np.asarray(a, dtype=dtype)
        if _is_backend_array(a, self):
            return self.xp.astype(a, getattr(self.xp, dtype))
        return self.xp.asarray(np.asarray(a, dtype=dtype))

    def from_host(self, a):
        """Move a host NumPy array of any dtype (bool, int, float) onto this backend."""
        a = np.asarray(a)
        if self.name == "numpy":
            return a
        return self.xp.asarray(a)

    @property
    def linalg(self) -> ModuleType:
        """The dense linear algebra matching ``xp``: ``scipy.linalg`` for NumPy,
        ``cupyx.scipy.linalg`` for CuPy, the namespace's own ``linalg`` otherwise."""
        if self.name == "numpy":
            import scipy.linalg
            return scipy.linalg
        if self.name == "cupy":
            import cupyx.scipy.linalg
            return cupyx.scipy.linalg
        return self.xp.linalg

    def solve(self, A, b):
        """Dense LU solve of ``A y = b`` for one square matrix A (d, d), b (d,) or (d, r)."""
        if self.name == "numpy":                           # LU with partial pivoting (LAPACK
            return self.linalg.solve(A, b, assume_a="gen")  # gesv) whatever A's structure
        if self.name == "cupy":
            y = self.linalg.lu_solve(self.linalg.lu_factor(A), b)   # cuSOLVER getrf / getrs
            if not bool(self.xp.all(self.xp.isfinite(y))):        # CuPy gives NaN, not an error
                raise np.linalg.LinAlgError("solve: the matrix is singular to working precision")
            return y
        return self.xp.linalg.solve(A, b)

    def solve_each(self, A, b):
        """``solve(A[i], b[i])`` for every i: A (n, d, d), b (n, d) -> (n, d), the same bits. On
        NumPy with SciPy >= 1.16 one call to ``scipy.linalg.solve``, which runs the same LAPACK
        solve on each matrix; otherwise one call per matrix."""
        if self.name == "numpy" and _scipy_batches():
            return self.linalg.solve(A, b[..., None], assume_a="gen")[..., 0]
        return self.xp.stack([self.solve(A[i, ...], b[i, ...]) for i in range(A.shape[0])], axis=0)


@functools.lru_cache(maxsize=None)
def _scipy_batches() -> bool:
    """SciPy's dense solve takes stacks of matrices from version 1.16 on."""
    import scipy
    major, minor = (int(re.match(r"\d+", p).group()) for p in scipy.__version__.split(".")[:2])
    return (major, minor) >= (1, 16)


_LOADED: dict = {}        # name -> Backend, once it has loaded (a failed load is tried again)


def _load(name: str) -> Backend:
    """The backend ``name``, made once per process (``backend_of`` asks for it on every call)."""
    be = _LOADED.get(name)
    if be is None:
        be = _LOADED[name] = _make(name)
    return be


def _make(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp
        return Backend("numpy", xp)
    if name == "cupy":
        try:
            import cupy
            n_dev = cupy.cuda.runtime.getDeviceCount()
        except Exception as err:  # ImportError, CUDARuntimeError, ...
            raise BackendError(
                f"backend 'cupy' cannot run here: {type(err).__name__}: {err}. "
                "Install the GPU extra (pip install 'deqref[gpu]') on a machine "
                "with an NVIDIA GPU and a CUDA driver, or use backend 'numpy'."
            ) from err
        if n_dev < 1:
            raise BackendError("backend 'cupy' cannot run here: CuPy sees no GPU")
        import array_api_compat.cupy as xp
        return Backend("cupy", xp)
    if name == "strict":
        try:
            import array_api_strict as xp
        except ImportError as err:
            raise BackendError(
                "backend 'strict' needs the package array-api-strict "
                "(pip install 'deqref[test]')"
            ) from err
        return Backend("strict", xp)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


_current: Backend | None = None


def get_backend() -> Backend:
    """The active backend (from ``DEQREF_BACKEND`` on first use; NumPy by default)."""
    global _current
    if _current is None:
        _current = _load(os.environ.get("DEQREF_BACKEND", "numpy").strip().lower())
    return _current


def set_backend(name: str) -> Backend:
    """Make ``name`` (one of ``BACKENDS``) the active backend and return it."""
    global _current
    _current = _load(name)
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("cupy"): ...`` runs the block on that backend."""
    global _current
    before = _current
    _current = _load(name)
    try:
        yield _current
    finally:
        _current = before


def _is_backend_array(a, backend: Backend) -> bool:
    if backend.name == "numpy":
        return isinstance(a, np.ndarray)
    if backend.name == "cupy":
        import cupy
        return isinstance(a, cupy.ndarray)
    return type(a).__module__.startswith("array_api_strict")


def _is_plain_ndarray(a) -> bool:
    """``numpy.ndarray`` itself (or a ``numpy.memmap``, which computes like one). Other subclasses
    are refused: ``numpy.matrix`` turns ``*`` into a matrix product and keeps every result 2-D,
    a masked array silently skips entries, so the formulas here would not mean what they say."""
    return type(a) is np.ndarray or isinstance(a, np.memmap)


def backend_of(a) -> Backend:
    """The backend an array belongs to (TypeError for anything else, ndarray subclasses such as
    ``numpy.matrix`` included)."""
    mod = type(a).__module__
    if isinstance(a, np.ndarray):
        if not _is_plain_ndarray(a):
            raise TypeError(f"expected a plain numpy.ndarray, got the subclass "
                            f"{mod}.{type(a).__name__}, whose * and @ do not follow array "
                            "semantics (convert with numpy.asarray)")
        return _load("numpy")
    if mod.startswith("cupy"):
        return _load("cupy")
    if mod.startswith("array_api_strict"):
        return _load("strict")
    raise TypeError(f"expected a NumPy, CuPy or array-api-strict array, got {type(a).__name__}")


def namespace(**arrays) -> ModuleType:
    """Check named arrays share one backend and one float dtype; return its ``xp``.

    ``namespace(h=h, x=x)`` raises a ``TypeError`` that names the argument when
    an input is not an array, is on another backend than the first, has a
    non-floating dtype or a dtype different from the first.
    """
    first_name = first_backend = first_dtype = None
    for name, a in arrays.items():
        if a is None:
            continue
        try:
            be = backend_of(a)
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
        dtype = str(a.dtype).replace("array_api_strict.", "")
        if dtype not in DTYPES:
            raise TypeError(f"{name} must have dtype float64 or float32, got {dtype}")
        if first_backend is None:
            first_name, first_backend, first_dtype = name, be, dtype
            continue
        if be.name != first_backend.name:
            raise TypeError(
                f"{name} is a {be.name} array but {first_name} is a {first_backend.name} "
                "array: mixing backends is not allowed (move both with backend.asarray)"
            )
        if dtype != first_dtype:
            raise TypeError(
                f"{name} has dtype {dtype} but {first_name} has dtype {first_dtype}: "
                "mixing dtypes is not allowed (cast one explicitly)"
            )
    if first_backend is None:
        raise TypeError("namespace() needs at least one array")
    return first_backend.xp


def require_arrays(**arrays) -> ModuleType:
    """``namespace`` for arguments that are all required: None is refused naming it
    (``namespace`` skips None, for optional arrays such as ``h0``)."""
    for name, a in arrays.items():
        if a is None:
            raise TypeError(f"{name}: expected a NumPy, CuPy or array-api-strict array, got None")
    return namespace(**arrays)


def to_numpy(a) -> np.ndarray:
    """Copy any backend array to a NumPy array on the host."""
    if isinstance(a, np.ndarray):
        return a
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a.get()
    if mod.startswith("array_api_strict"):
        return np.asarray(a._array)
    return np.asarray(a)


def dtype_name(a) -> str:
    """``"float64"`` or ``"float32"`` for an array of any backend."""
    return str(a.dtype).replace("array_api_strict.", "")


def eps(a) -> float:
    """Machine epsilon of an array's dtype."""
    return float(np.finfo(dtype_name(a)).eps)


def all_finite(a, xp=None) -> bool:
    """Every entry of the backend array ``a`` is finite (``xp``: its namespace, where ``a`` may be
    a scalar of it). A finite sum proves it (NaN and ±inf propagate through a sum), in one pass
    and without a temporary the size of ``a``; only where the sum is not finite (such an entry, or
    finite entries whose sum overflows) are the entries looked at one by one."""
    xp = backend_of(a).xp if xp is None else xp
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(xp.sum(a))):
            return True
    return bool(xp.all(xp.isfinite(a)))


def check_finite(name: str, a) -> None:
    """Raise ``ValueError`` naming ``name`` if ``a`` holds NaN or infinity."""
    if not all_finite(a):
        raise ValueError(f"{name} contains NaN or infinity")


def check_shape(name: str, a, shape: tuple) -> None:
    """Raise ``ValueError`` unless ``a.shape`` matches ``shape`` (None = any size)."""
    ok = len(a.shape) == len(shape) and all(s is None or s == t for s, t in zip(shape, a.shape))
    if not ok:
        parts = ["?" if s is None else str(s) for s in shape]
        want = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")


def check_backend(backend) -> Backend:
    """``backend`` itself if it is a ``Backend``, the active backend for None; TypeError otherwise
    (a name such as ``"numpy"`` goes through ``set_backend`` or ``use_backend``, not here)."""
    if backend is None:
        return get_backend()
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be None or a deqref.backend.Backend (from get_backend(), "
                        f"set_backend(name) or use_backend(name)), got {type(backend).__name__} "
                        f"{backend!r:.40}")
    return backend


def check_seed(seed, name: str = "seed") -> int:
    """A seed for ``numpy.random.default_rng``: an integer >= 0 (not a bool)."""
    from .checks import check_int          # deqref.checks imports this module
    return check_int(name, seed, minimum=0)


def rng_normal(seed: int, shape: tuple, dtype: str = "float64", backend: Backend | None = None):
    """Standard normal draws from ``default_rng(seed)``, moved to the backend."""
    seed = check_seed(seed)
    be = check_backend(backend)
    return be.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
