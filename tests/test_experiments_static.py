"""The static experiments (Fig. 1, Table 2 / GDEQ Table 1, Theorem 1) in quick mode: outputs
well formed, and the numbers behave as the papers (and the algebra) say they must."""
import json

import numpy as np
import pytest

from deqref.cli import main
from deqref.experiments import EXPERIMENTS

NAMES = ("static_precision", "complexity", "theorem1")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run each experiment once in quick mode: {name: (data returned, JSON on disk, out dir)}."""
    out = tmp_path_factory.mktemp("static")
    res = {}
    for name in NAMES:
        data = EXPERIMENTS[name].run(out, seed=0, mode="quick")
        res[name] = (data, json.loads((out / f"{name}.json").read_text()), out)
    return res


@pytest.mark.parametrize("name", NAMES)
def test_files_and_summary(outputs, name):
    data, on_disk, out = outputs[name]
    assert (out / f"{name}.png").stat().st_size > 5000
    assert on_disk["setting"]["mode"] == "quick"
    mod = EXPERIMENTS[name]
    assert mod.__doc__.splitlines()[0].strip()             # first line names the figure/table
    text = mod.summary(on_disk)                             # works from the JSON alone
    assert isinstance(text, str) and len(text.splitlines()) >= 3


def test_static_precision_cosines(outputs):
    data = outputs["static_precision"][1]
    s = data["setting"]
    for rec in data["seeds"]:
        assert rec["forward"]["max_rel_residual"] < s["tol"]
        for lam in s["lams"]:
            for m in ("upg", "npg"):
                c = np.array(rec["fig1"][str(lam)][m])
                assert c.shape == (len(s["ks"]),) and np.all(np.abs(c) <= 1 + 1e-12)
                assert c[-1] > c[0]                          # more terms, closer to exact
        # λ = 1, k = 10 at a contractive layer: essentially the exact direction
        assert rec["fig1"]["1.0"]["upg"][-1] > 0.9999
        # the paper's cross-check: BPTT and 20 Broyden iterations agree (> 0.9999)
        assert rec["crosscheck"]["bptt_vs_broyden20"] > 0.9999
        # at the exact h* UPG and NPG are the same matrix (Sec. 3 of Geng et al.)
        exact = rec["inexact"][-1]
        assert exact["tol"] == s["exact_tol"]
        for lam in s["inexact_lams"]:
            np.testing.assert_allclose(exact["cos"][str(lam)]["upg"], exact["cos"][str(lam)]["npg"],
                                       atol=1e-10)
            # and at the loosest h, UPG's unrolled states correct the error of h; NPG's cannot
            loose = rec["inexact"][0]["cos"][str(lam)]
            assert 1 - loose["upg"][-1] < 1 - loose["npg"][-1]


def test_complexity_has_every_method(outputs):
    data = outputs["complexity"][1]
    grid = data["setting"]["grid"]
    expected = {"implicit_broyden", "implicit_fixed_point", "upg", "npg", "jfb", "gdeq"}
    assert set(data["rows"]) == expected
    for r in data["rows"].values():
        assert len(r["times_s"]) == len(r["peak_bytes"]) == len(grid)
        assert all(t > 0 for t in r["times_s"]) and all(b > 0 for b in r["peak_bytes"])
        assert {"slope", "share", "growth", "matches"} <= set(r["time"]) | set(r["mem"])
    # memory is deterministic: UPG stores its k states, NPG only a running vector
    n_d_bytes = data["setting"]["n"] * data["setting"]["d"] * 8
    upg, npg = data["rows"]["upg"]["peak_bytes"], data["rows"]["npg"]["peak_bytes"]
    assert upg[-1] - upg[0] >= (grid[-1] - grid[0]) * n_d_bytes
    assert npg[-1] - npg[0] < 2 * n_d_bytes


def test_theorem1_sides(outputs):
    data = outputs["theorem1"][1]
    s, f = data["setting"], data["findings"]
    assert data["upg_npg_gap_at_h_star"] < 1e-10           # UPG = NPG at an exact fixed point
    assert f["condition6_but_not_descent"] == 0             # Theorem 1 itself
    rec = data["exact"]["1.0"]["npg"]
    assert len(rec) == len(s["ks"]) and len(rec[0]["lhs"]) == s["n"]
    ratio = [np.median(np.array(r["lhs"]) / np.array(r["rhs"])) for r in rec]
    assert ratio[-1] < ratio[0] and ratio[-1] < 1            # (6) holds for k large enough
    # rhs σ_min²/σ_max of ∂F/∂θ does not depend on k
    np.testing.assert_allclose(rec[0]["rhs"], rec[-1]["rhs"], rtol=1e-12)
    # Remark 1 for NPG: ‖D(I − J) − I‖ = ‖B^k‖ decreases with k
    r1 = data["exact"]["1.0"]["remark1_npg"]
    assert np.all(np.array(r1[-1]["lhs"]) < np.array(r1[0]["lhs"]))


def test_cli_reproduces_theorem1(tmp_path, capsys):
    assert main(["reproduce", "theorem1", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "theorem1.png").exists()
    assert "Theorem 1" in capsys.readouterr().out
