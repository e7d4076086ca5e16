"""Training runs shared between experiments within one process.

A seeded run is a pure function of its data, its model's initialization and its
``TrainConfig``: the same inputs give the same bits. ``trained`` memoizes runs by those inputs,
so that ``deqref reproduce`` trains, e.g., the implicit baseline on seed 0 once for the
accuracy-and-speed table and the ablation grid, which share it. Timings in a shared record are
those of the run that trained it.
"""
from __future__ import annotations

import dataclasses
import time

from ..backend import backend_of, dtype_name, get_backend
from ..train import DEQModel, TrainConfig, train

_RUNS: dict = {}


def trained(data, data_tag: str, d: int, activation: str, L_h: float, cfg: TrainConfig, keys) -> dict:
    """The history (``keys`` only, plus ``seed`` and ``wall_s``) of training
    ``DEQModel.random(d, …, seed=cfg.seed, L_h=L_h)`` on ``data`` (named ``data_tag``) with ``cfg``."""
    # the data by name and by what the run sees of it (backend, dtype, shape); the model's
    # backend; the configuration but for the progress bar
    x = data.x_train
    key = (data_tag, backend_of(x).name, dtype_name(x), tuple(x.shape), get_backend().name, d, activation,
           L_h, repr(dataclasses.replace(cfg, label="", quiet=True)))
    if key not in _RUNS:
        model = DEQModel.random(d, data.d_x, data.n_outputs, activation, seed=cfg.seed, L_h=L_h)
        t0 = time.perf_counter()
        hist = train(model, data, cfg)
        _RUNS[key] = (hist, time.perf_counter() - t0)
    hist, wall = _RUNS[key]
    rec = {k: list(hist[k]) if isinstance(hist[k], list) else hist[k] for k in keys}
    rec["seed"], rec["wall_s"] = cfg.seed, wall
    return rec


def clear() -> None:
    _RUNS.clear()
