"""Experiments: one module per figure or table, each with ``run(out, seed, mode) -> dict``
(writes PNG + JSON/CSV into ``out``) and ``summary(data) -> str``; ``TIMED = True`` in a module
whose claims rest on wall-clock times (``deqref reproduce`` runs those alone; ``parallel``).

``EXPERIMENTS`` maps names to modules in the order ``deqref reproduce`` runs them; a module
is imported only when it is used.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping

# name -> module under deqref.experiments (the paper figure it reproduces in the docstring)
# accuracy_speed before ablation: it times its runs interleaved, and the ablation reuses them
ORDER = ("solver_traces", "static_precision", "theorem1", "complexity", "dynamic_precision",
         "gdeq_precision", "accuracy_speed", "ablation", "jfb_batch", "ignn", "conv_deq")


class _Registry(Mapping):
    def _names(self):
        return [n for n in ORDER if importlib.util.find_spec(f"{__name__}.{n}") is not None]

    def __getitem__(self, name):
        if name not in self._names():
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{name}")

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())


EXPERIMENTS = _Registry()
