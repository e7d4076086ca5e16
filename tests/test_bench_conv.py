"""Smoke test of ``python -m deqref.bench.conv`` (tiny images and batch; no timing is asserted):
both dtypes have a row and the split of deqref's step, and where PyTorch and TorchDEQ import,
both sides computed the same gradients."""
import json

import pytest

from deqref.backend import get_backend
from deqref.bench import conv

pytestmark = pytest.mark.skipif(get_backend().name != "numpy",
                                reason="the benchmark runs on NumPy (the CPU comparison)")


def test_quick_run_writes_rows_and_agrees_with_torchdeq(tmp_path):
    assert conv.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "conv.json").read_text())
    assert [r["dtype"] for r in data["rows"]] == list(conv.DTYPES)
    for r in data["rows"]:
        assert len(r["deqref_ms"]) == 3 and r["deqref_ms"][0] <= r["deqref_ms"][1] <= r["deqref_ms"][2]
    assert set(data["where"]) == set(conv.DTYPES)
    for w in data["where"].values():
        assert set(w["phases_ms"]) == {"forward", "unroll", "head", "reverse"}
    md = (tmp_path / "conv.md").read_text()
    assert "| float64 |" in md and "| float32 |" in md and "Where deqref's time goes" in md
    if conv.torch_available() is not None:
        return
    diffs = {r["dtype"]: r["grad_rel_diff"] for r in data["rows"]}
    # the same gradient computed two ways: rounding only (float64: a few hundred ulps; float32:
    # eps 6e-8 through ~36 evaluations of F with GroupNorm's 1/σ)
    assert diffs["float64"] < 1e-12
    assert diffs["float32"] < 1e-4


def test_bad_argument_is_one_line_error(capsys):
    with pytest.raises(SystemExit):
        conv.main(["--sizes", "huge"])
    assert "unrecognized arguments" in capsys.readouterr().err
