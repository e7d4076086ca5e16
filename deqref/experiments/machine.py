"""Where an experiment ran: the machine record every JSON carries, and the BLAS thread control.

Times depend on the CPU, its load and the BLAS threads; trained numbers depend, in the last bit and
chaotically from there, on the floating-point kernels (README, "How far the trained numbers can be
trusted"). One place reads them all: the BLAS libraries as ``threadpoolctl`` sees them (installed
with scikit-learn; optional, so a missing one is recorded as None and never fails a run).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np


def blas_libraries() -> list[dict] | None:
    """threadpoolctl's records of the loaded BLAS libraries (NumPy's and SciPy's may differ)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [p for p in threadpool_info() if p.get("user_api") == "blas"]


def blas_threads() -> list[int] | None:
    libs = blas_libraries()
    return None if libs is None else [p.get("num_threads") for p in libs]


def limit_blas_threads(n: int):
    """A context with every BLAS limited to ``n`` threads; a no-op without threadpoolctl (times
    are then taken with the default threads)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: the number of BLAS threads must be an integer >= 1, got {n!r}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=n)


def one_blas_thread():
    """The experiments' timing setting: one BLAS thread."""
    return limit_blas_threads(1)


def numerics() -> dict:
    """What fixes the last bits of a float64 result on this machine, so a trained run can be redone.

    The same code and seed give bit-identical numbers only with the same BLAS kernel and the same
    NumPy SIMD loops: OpenBLAS picks its kernel by CPU (override: ``OPENBLAS_CORETYPE``) and NumPy its
    loops by CPU features (override: ``NPY_DISABLE_CPU_FEATURES``), and their results differ in the
    last bit. The SIMD list comes from a private NumPy interface (``__cpu_features__``); where it is
    missing it is recorded as None.
    """
    libs = blas_libraries()
    blas = None if libs is None else sorted(                   # sorted: the load order varies
        f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}" for p in libs)
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        except ImportError:   # NumPy < 2
            from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        simd = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    except ImportError:
        simd = None
    return {"blas_kernel": blas, "numpy_simd": simd}


def machine() -> dict:
    """Where the times were taken: CPU model, core count, load averages (other processes share
    it), versions, and the floating-point kernels (``numerics``)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "loadavg_1_5_15min": load,
            "python": platform.python_version(), "numpy": np.__version__, **numerics()}


def recorded_run(name: str, measure, out: Path, seed: int, mode: str, modes, plot: str,
                 backend: str | None = None) -> dict:
    """An experiment's ``run``: ``measure(seed, mode)`` with one BLAS thread (on ``backend``, a name,
    where given), its setting noting the machine before and the load after (``machine``) and
    ``wall_s``; written to ``out/name.json`` and drawn by ``plot`` ("module.function" under
    ``deqref.experiments``) into ``out/name.png``. ``mode`` must be one of ``modes``."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    from ..backend import use_backend
    before, t0 = machine(), time.perf_counter()
    with (use_backend(backend) if backend else nullcontext()), one_blas_thread():
        data = measure(seed, mode)
    data["setting"]["wall_s"] = time.perf_counter() - t0
    data["setting"]["machine"] = {**before, "loadavg_after": machine()["loadavg_1_5_15min"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    module, function = plot.rsplit(".", 1)
    getattr(importlib.import_module(f"{__package__}.{module}"), function)(data, out / f"{name}.png")
    return data
