"""The claims table: the verdict rules on constructed inputs, the intervals against independent
formulas, stored rows that check themselves, and every experiment's rows (quick mode)."""
import json
import math
import statistics
import warnings

import numpy as np
import pytest

from deqref import claims as C
from deqref.experiments import EXPERIMENTS, ORDER

# the ids deqref promises to keep: a renamed claim breaks everyone's comparisons
IDS = {
    "static_precision": ["geng.fig1.cosine_rises_with_k", "geng.fig1.small_lambda_slows",
                         "geng.sec3.bptt_matches_broyden", "geng.fig1.upg_robust_to_inexact_h"],
    "theorem1": ["geng.thm1.condition6_gives_descent", "geng.sec23.condition6_large_k",
                 "geng.remark1.condition8_large_k", "geng.thm2.neumann_rate", "geng.thm3.convergence"],
    "complexity": ["geng.table2.time_implicit", "geng.table2.time_phantom", "gdeq.table1.time_jfb_gdeq",
                   "geng.table2.memory_upg", "geng.table2.memory_constant"],
    "dynamic_precision": ["geng.fig2.descent", "geng.fig2.large_cosine", "geng.fig2.upg_closer_than_npg"],
    "gdeq_precision": ["gdeq.fig2.close_to_implicit", "gdeq.fig2.descent",
                       "gdeq.fig2.limited_memory_descent", "gdeq.sec3.closer_than_jfb"],
    "ablation": ["geng.fig3.upg_beats_npg", "geng.fig3.upg_robust_to_k", "geng.sec23.large_k_preferable"],
    "accuracy_speed": ["geng.table3.upg_accuracy", "gdeq.table2.npg_accuracy", "gdeq.table2.jfb_accuracy",
                       "gdeq.table2.gdeq_accuracy", "geng.table3.upg_speedup", "gdeq.table2.npg_speedup",
                       "gdeq.table2.jfb_speedup", "gdeq.table2.gdeq_speedup", "gdeq.table2.gdeq_fastest"],
    "jfb_batch": ["jfb.table1.epoch_cost", "jfb.table1.full_batch_loss", "jfb.fig1.time_to_loss_b64",
                  "jfb.fig1.time_to_loss_b32"],
}

# (rule, measured, interval, expected verdict)
CASES = [
    (C.above(0.5), 1.0, [0.6, 1.4], "reproduced"),
    (C.above(0.5), 0.2, [-0.3, 0.4], "not reproduced"),
    (C.above(0.5), 0.5, [0.1, 0.9], "not resolved"),
    (C.above(0.5), 0.7, [0.5, 0.9], "not resolved"),           # touching the threshold decides nothing
    (C.above(-1.0), -0.5, [-0.9, 0.1], "reproduced"),           # no worse than 1 point
    (C.below(1.0), 0.3, [0.1, 0.6], "reproduced"),
    (C.below(1.0), 1.5, [1.2, 1.8], "not reproduced"),
    (C.below(1.0), 0.9, [0.5, 1.2], "not resolved"),
    (C.between(-1, 1), 0.0, [-0.5, 0.5], "reproduced"),
    (C.between(-1, 1), 2.0, [1.5, 2.5], "not reproduced"),
    (C.between(-1, 1), -2.0, [-2.5, -1.5], "not reproduced"),
    (C.between(-1, 1), 0.8, [0.5, 1.1], "not resolved"),
    # no interval: the range of the measured values decides
    (C.above(0.95), [0.99, 1.0, 0.97], None, "reproduced"),
    (C.above(0.95), [0.99, 0.90], None, "not resolved"),
    (C.above(0.95), [0.90, 0.93], None, "not reproduced"),
    (C.below(0.5), 0, None, "reproduced"),
    (C.below(0.5), 3, None, "not reproduced"),
    # missing or not finite: never a verdict
    (C.above(0.0), None, None, "not resolved"),
    (C.above(0.0), [1.0, None], None, "not resolved"),
    (C.above(0.0), float("nan"), None, "not resolved"),
    (C.above(0.0), 1.0, [float("nan"), 2.0], "not resolved"),
    (C.above(0.0), 1.0, [2.0, 1.0], "not resolved"),            # a reversed interval is no interval
    (C.above(0.0), [], None, "not resolved"),
    (C.above(0.0), True, None, "not resolved"),                 # a boolean is not a measurement
]


@pytest.mark.parametrize("rule, measured, interval, expected", CASES)
def test_verdict_rules_on_constructed_inputs(rule, measured, interval, expected):
    assert C.verdict(rule, measured, interval) == expected


def test_rule_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        C.verdict({"kind": "sideways", "threshold": 0}, 1.0)
    with pytest.raises(ValueError, match="a < b"):
        C.between(1, -1)


def test_mean_interval_against_the_t_table():
    x = [1.0, 2.0, 4.0, 3.0, 5.0]
    m, (lo, hi) = C.mean_interval(x)
    t_975_4 = 2.7764451051977987                         # Student t, 4 degrees of freedom, 97.5 %
    half = t_975_4 * statistics.stdev(x) / math.sqrt(len(x))
    assert m == pytest.approx(3.0, rel=1e-15)
    assert (lo, hi) == (pytest.approx(3.0 - half, rel=1e-12), pytest.approx(3.0 + half, rel=1e-12))
    assert C.mean_interval([2.0]) == (2.0, None)           # one unit: no interval
    assert C.mean_interval([0.5, 0.5, 0.5]) == (0.5, [0.5, 0.5])
    assert C.mean_interval([1.0, float("nan")]) == (None, None)


def test_ratio_interval_is_the_geometric_one():
    g, (lo, hi) = C.ratio_interval([2.0, 8.0])
    assert g == pytest.approx(4.0, rel=1e-14)
    t_975_1 = 12.706204736174698
    half = t_975_1 * statistics.stdev([math.log(2), math.log(8)]) / math.sqrt(2)
    assert lo == pytest.approx(4.0 * math.exp(-half), rel=1e-12)
    assert hi == pytest.approx(4.0 * math.exp(half), rel=1e-12)
    assert C.ratio_interval([1.0, -1.0]) == (None, None)


def _row(**kw):
    args = dict(id="t.one", source="doc, Table 1", text="A beats B", paper="yes", measured=0.7,
                rule_spec=C.above(0.5), what="A − B", interval=[0.6, 0.8], n=5)
    args.update(kw)
    return C.claim(args.pop("id"), args.pop("source"), args.pop("text"), args.pop("paper"),
                   args.pop("measured"), args.pop("rule_spec"), **args)


def test_rows_check_themselves_after_a_json_round_trip():
    row = json.loads(json.dumps(_row()))
    C.check_row(row)
    assert row["verdict"] == "reproduced" and "lies above 0.5" in row["rule"]
    bad = dict(row, verdict="not reproduced")               # a verdict typed by hand
    with pytest.raises(ValueError, match="its rule gives 'reproduced'"):
        C.check_row(bad)
    with pytest.raises(ValueError, match="missing field"):
        C.check_row({k: v for k, v in row.items() if k != "rule_spec"})
    # stored to 10 digits, and the verdict is the stored numbers' (a value just above the
    # threshold that rounds onto it is 'not resolved' in the row and in the recomputation)
    edge = _row(measured=0.5 + 1e-13, interval=None)
    assert edge["measured"] == 0.5 and edge["verdict"] == "not resolved"


def test_write_merges_by_experiment_and_keeps_order(tmp_path):
    a = dict(_row(id="a.1"), experiment="ablation")
    s = dict(_row(id="s.1", measured=0.1, interval=[0.0, 0.2]), experiment="static_precision")
    path = tmp_path / "claims.json"
    C.write(path, [a], {}, ORDER)
    doc = C.write(path, [s], {}, ORDER)                     # a later run of another experiment
    assert [r["id"] for r in doc["claims"]] == ["s.1", "a.1"]  # static_precision comes first
    assert doc["counts"] == {"reproduced": 1, "not reproduced": 1, "not resolved": 0}
    a2 = dict(_row(id="a.1", measured=None, interval=None), experiment="ablation")
    doc = C.write(path, [a2], {}, ORDER)                    # a rerun replaces the experiment's rows
    assert [r["verdict"] for r in doc["claims"]] == ["not reproduced", "not resolved"]
    assert json.loads(path.read_text()) == doc


def test_table_counts_and_formats():
    rows = [_row(), _row(id="t.two", measured=0.999999998, interval=None, rule_spec=C.above(0.9999))]
    text = C.table(rows)
    assert text.count("\n| ") == 2 and "0.999999998" in text
    assert "2 claims: 2 reproduced, 0 not reproduced, 0 not resolved." in text


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """Every experiment with claims, run once in quick mode: {name: rows}. (The quick runs stop
    solves at small budgets on purpose; their warnings are not what is tested here.)"""
    out = tmp_path_factory.mktemp("claims")
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in IDS:
            data = EXPERIMENTS[name].run(out, seed=0, mode="quick")
            rows[name] = C.rows_of(name, json.loads(json.dumps(data)), "quick")
    return rows


def test_every_experiment_has_its_claims(quick_rows):
    for name, ids in IDS.items():
        got = [r["id"] for r in quick_rows[name]]
        assert got == ids, name
    all_ids = [r["id"] for rows in quick_rows.values() for r in rows]
    assert len(all_ids) == len(set(all_ids)) >= 12
    for rows in quick_rows.values():
        for r in rows:
            C.check_row(json.loads(json.dumps(r)))
            assert r["source"].split(",")[0].split(" ")[0] in ("Geng", "GDEQ", "JFB")
            assert r["claim"] and r["rule"].startswith("reproduced if")
            assert r["interval"] is None or (r["n"] >= 2 and r["interval"][0] <= r["interval"][1])
            assert np.all(np.isfinite([v for v in np.ravel([r["measured"]]) if v is not None]))


def _jfb(full_reached, b_reached, t_full=50.0, t_b=40.0, epochs=3000):
    def run(reached, t, total):
        return {"time_to_target": {"target": 5e-4, "reached": reached, "epoch": 10 if reached else None,
                                   "time_s": t if reached else None, "max_epochs": epochs},
                "time_total_s": total, "lowest_loss": 4e-4 if reached else 4e-3, "ms_per_epoch_vs_full": 4.0}
    runs = {"2400": run(full_reached, t_full, 60.0)}
    runs.update({b: run(b_reached, t_b, 70.0) for b in ("64", "32")})
    return {"setting": {"epochs": epochs, "paper_epochs": 3000}, "runs": runs}


@pytest.mark.parametrize("full_reached, b_reached, t_b, expected", [
    (True, True, 200.0, "reproduced"),          # both reach 5e-4: the exact ratio, 4×
    (True, True, 60.0, "not reproduced"),       # 1.2×
    (False, True, 40.0, "not reproduced"),      # full batch never gets there: ratio < 40 / 60
    (False, True, 150.0, "not resolved"),       # a bound of 2.5× settles nothing
    (True, False, 40.0, "not resolved"),        # the mini-batch never gets there
])
def test_jfb_time_to_loss_uses_only_what_the_runs_decide(full_reached, b_reached, t_b, expected):
    from deqref.experiments.jfb_batch import claims
    rows = {r["id"]: r for r in claims(_jfb(full_reached, b_reached, t_b=t_b))}
    assert rows["jfb.fig1.time_to_loss_b64"]["verdict"] == expected
    short = {r["id"]: r for r in claims(_jfb(True, True, t_b=200.0, epochs=40))}
    assert short["jfb.fig1.time_to_loss_b64"]["verdict"] == "not resolved"      # needs --full
    assert short["jfb.table1.full_batch_loss"]["measured"] is None


def test_write_drops_an_earlier_row_edited_by_hand(tmp_path):
    path = tmp_path / "claims.json"
    a = dict(_row(id="a.1"), experiment="ablation")
    C.write(path, [a], {}, ORDER)
    doc = json.loads(path.read_text())
    doc["claims"][0]["verdict"] = "not reproduced"           # a verdict typed by hand
    path.write_text(json.dumps(doc))
    s = dict(_row(id="s.1"), experiment="static_precision")
    with pytest.warns(UserWarning, match="dropped.*'a.1'"):
        doc = C.write(path, [s], {}, ORDER)
    assert [r["id"] for r in doc["claims"]] == ["s.1"]
    with pytest.raises(ValueError, match="its rule gives"):   # this run's rows must be right
        C.write(path, [dict(s, verdict="not resolved")], {}, ORDER)


def test_shared_runs_are_keyed_by_backend_and_data():
    """A run trained on one backend or data set is not handed to a caller on another, and a
    shared run's warnings reach every caller."""
    from deqref.backend import use_backend
    from deqref.data import digits
    from deqref.experiments import runs
    from deqref.train import TrainConfig
    cfg = TrainConfig(estimator="jfb", epochs=1, batch_size=256, quiet=True, solver_options={"max_iter": 3})
    runs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with use_backend("numpy"):
            a = runs.trained(digits(0).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
            b = runs.trained(digits(0).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
            c = runs.trained(digits(0).subset(128), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
            e = runs.trained(digits(1).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
        with use_backend("strict"):
            d = runs.trained(digits(0, backend=None).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
    assert a == b and len(runs._RUNS) == 4          # another seed's split, same shape: its own run
    assert c["train_loss"] != a["train_loss"] != e["train_loss"] and d["train_loss"] == a["train_loss"]
    runs.clear()

    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        runs.trained(digits(0).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        runs.trained(digits(0).subset(256), "digits", 8, "tanh", 0.9, cfg, ["train_loss"])
    assert len(first) >= 1 and [str(w.message) for w in again] == [str(w.message) for w in first]
    runs.clear()
