"""Smoke test of ``python -m deqref.bench.graph`` (a small graph; no timing is asserted): every
estimator has a row, and where PyTorch is installed both sides computed the same gradient."""
import json

import pytest

from deqref.backend import get_backend
from deqref.bench import graph

pytestmark = pytest.mark.skipif(get_backend().name != "numpy",
                                reason="the benchmark runs on NumPy (the CPU comparison)")


def test_quick_run_writes_rows_and_agrees_with_pytorch(tmp_path, capsys):
    assert graph.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "graph.json").read_text())
    assert [r["estimator"] for r in data["rows"]] == list(graph.ESTIMATORS)
    for r in data["rows"]:
        assert len(r["deqref_ms"]) == 3 and r["deqref_ms"][0] <= r["deqref_ms"][1] <= r["deqref_ms"][2]
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    compared = [r for r in data["rows"] if "grad_rel_diff" in r]
    assert {r["estimator"] for r in compared} == set(graph.TORCH)
    # the same gradient computed two ways in float64: a few hundred ulps at most
    assert max(r["grad_rel_diff"] for r in compared) < 1e-12
    assert "| upg |" in (tmp_path / "graph.md").read_text()
