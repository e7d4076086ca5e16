"""Training runs shared between experiments within one process.

A seeded run is a pure function of its data, its model's initialization and its
``TrainConfig``: the same inputs give the same bits. ``trained`` memoizes runs by those inputs,
so that ``deqref reproduce`` trains, e.g., the implicit baseline on seed 0 once for the
accuracy-and-speed table and the ablation grid, which share it. Timings in a shared record are
those of the run that trained it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings

import numpy as np

from ..backend import backend_of, dtype_name, get_backend, to_numpy
from ..train import DEQModel, TrainConfig, train

_RUNS: dict = {}


def trained(data, data_tag: str, d: int, activation: str, L_h: float, cfg: TrainConfig, keys) -> dict:
    """The history (``keys`` only, plus ``seed`` and ``wall_s``) of training
    ``DEQModel.random(d, …, seed=cfg.seed, L_h=L_h)`` on ``data`` (named ``data_tag``) with ``cfg``."""
    # the data by name and by its values (a hash of every split), the model's backend, the
    # configuration but for the progress bar
    key = (data_tag, _fingerprint(data), get_backend().name, d, activation, L_h,
           repr(dataclasses.replace(cfg, label="", quiet=True)))
    if key not in _RUNS:
        model = DEQModel.random(d, data.d_x, data.n_outputs, activation, seed=cfg.seed, L_h=L_h)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = train(model, data, cfg)
        _RUNS[key] = (hist, time.perf_counter() - t0, caught)
    hist, wall, caught = _RUNS[key]
    for w in caught:                          # every caller sees the run's warnings, hit or not
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    rec = {k: list(hist[k]) if isinstance(hist[k], list) else hist[k] for k in keys}
    rec["seed"], rec["wall_s"] = cfg.seed, wall
    return rec


def _fingerprint(data) -> str:
    """SHA-1 of the data's arrays (backend, dtype, shape and bytes of every split)."""
    h = hashlib.sha1()
    for a in (data.x_train, data.y_train, data.x_val, data.y_val):
        h.update(f"{backend_of(a).name} {dtype_name(a)} {tuple(a.shape)}".encode())
        h.update(np.ascontiguousarray(to_numpy(a)).tobytes())
    return h.hexdigest()


def clear() -> None:
    _RUNS.clear()


def snapshot() -> dict:
    """The runs trained so far, to hand to another process (``restore`` there)."""
    return dict(_RUNS)


def restore(shared: dict) -> None:
    """Add runs trained in another process (``snapshot``) to this one's."""
    _RUNS.update(shared)
