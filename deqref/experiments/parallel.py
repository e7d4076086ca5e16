"""Running experiments side by side: the timed ones alone, the others in worker processes.

An experiment whose claims rest on wall-clock times says so with ``TIMED = True`` in its module
(complexity, accuracy_speed, jfb_batch, ignn, conv_deq). ``deqref reproduce`` runs those one
after the other in its own process while no other experiment runs, so their times are those of
an otherwise idle machine. The others' claims rest on numbers that no clock enters (cosines,
accuracies, errors; their records note wall times too, which are not compared); they run
afterwards in up to ``jobs`` worker processes at once. Every experiment runs with one BLAS
thread, here or in a worker, so its numbers have the same bits either way (``tests/test_cli.py``
compares them).

Each worker gets the training runs shared so far (``runs.snapshot()``), so the ablation reuses
accuracy_speed's runs as it does in one process, and the caller's backend; settings made in the
caller's code otherwise (warning filters, patches) do not reach it. What a worker prints is
captured and shown whole when its experiment ends (no progress bars); its warnings come back to
be summed up like the others. An error or Ctrl-C cancels the experiments not yet started.

Workers are spawned: they import the caller's main module, so a script that calls
``deqref.cli.main(["reproduce", ...])`` must do so under ``if __name__ == "__main__":`` (or
pass ``--jobs 1``), as for any ``multiprocessing`` program.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from ..backend import get_backend, set_backend
from . import EXPERIMENTS, runs


def is_timed(name: str) -> bool:
    """Whether an experiment's claims rest on wall-clock times (it then runs alone)."""
    return bool(getattr(EXPERIMENTS[name], "TIMED", False))


def available_cores() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                    # macOS, Windows
        return os.cpu_count() or 1


def split(names, jobs: int) -> tuple[list, list]:
    """(run here one by one, run in workers): with one job, or fewer than two untimed
    experiments (a worker would gain nothing and hide the progress bars), everything here."""
    untimed = [n for n in names if not is_timed(n)]
    if jobs <= 1 or len(untimed) < 2:
        return list(names), []
    return [n for n in names if is_timed(n)], untimed


def run_in_workers(names, out, seed: int, mode: str, jobs: int):
    """Run the experiments ``names`` in ``min(jobs, len(names))`` spawned processes; yield
    ``(name, data, printed, caught, seconds)`` as each ends (``printed``: its captured output;
    ``caught``: its warnings as ``warnings.WarningMessage``; ``seconds``: its time). An
    experiment's error is raised here, as it would be in one process."""
    if not names:
        return
    shared, backend = runs.snapshot(), get_backend().name
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=get_context("spawn"))
    try:
        # the last in ORDER first: the longest (ablation, the precision runs) are there, and a
        # long one started last would leave the other workers idle at the end
        futures = {pool.submit(_in_worker, name, out, seed, mode, shared, backend): name
                   for name in reversed(names)}
        for future in as_completed(futures):
            data, printed, caught, seconds = future.result()
            yield (futures[future], data, printed, [warnings.WarningMessage(*w) for w in caught],
                   seconds)
    except BaseException:                     # an experiment's error, Ctrl-C: start nothing more
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def run_one(name: str, out, seed: int, mode: str):
    """One experiment with one BLAS thread (here or in a worker: the same bits), its
    ConvergenceWarnings recorded; ``(data, caught warnings, seconds)``."""
    from ..solvers.result import ConvergenceWarning
    from .machine import one_blas_thread
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, one_blas_thread():
        warnings.simplefilter("always", ConvergenceWarning)
        data = EXPERIMENTS[name].run(out, seed=seed, mode=mode)
    return data, list(caught), time.perf_counter() - t0


def _in_worker(name, out, seed, mode, shared, backend):
    """In a worker: ``run_one`` on the caller's backend with the runs shared so far, its output
    captured."""
    set_backend(backend)
    runs.restore(shared)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        data, caught, seconds = run_one(name, out, seed, mode)
    return (data, buf.getvalue(), [(str(w.message), w.category, w.filename, w.lineno) for w in caught],
            seconds)
