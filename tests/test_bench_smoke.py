"""Smoke test of ``deqref bench --quick`` (tiny sizes, a few seconds): the benchmark must run end
to end, write its JSON and Markdown, and every timed deqref call must agree with the independent
bare-NumPy version it is compared with (``deqref/bench/bare.py`` shares no code with the
estimators) and, when torch is installed, with TorchDEQ. No timing is asserted: CI machines are
noisy and these are benchmarks, not timed tests.
"""
import json
import math

import numpy as np
import pytest

from deqref import bench
from deqref.bench import fair
from deqref.cli import main as cli_main

EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli_main(["bench", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_files_and_sections(quick):
    out, data, md = quick
    assert data["mode"] == "quick"
    assert data["machine"]["threads"] >= 1 and data["machine"]["numpy"] == np.__version__
    for title in ("1. Backward cost", "2. Efficiency", "3. deqref against TorchDEQ", "4", "5. Matrix forms",
                  "6. Fair"):
        assert f"## {title}" in md
    # the Markdown table has one row per estimator and size of section 1
    sizes = bench.SIZES["quick"]
    assert len(data["cost"]) == len(sizes["cost_d"]) * len(bench.ESTIMATORS)
    assert md.count("| gdeq |") >= len(sizes["cost_d"])


def test_cost_rows_are_ratios_to_implicit(quick):
    _, data, _ = quick
    for r in data["cost"]:
        for key in ("backward_s", "step_s", "backward_speedup", "step_speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["estimator"], key, r[key])
        assert r["backward_peak_bytes"] > 0 and r["step_peak_bytes"] > 0
    for d in {r["d"] for r in data["cost"]}:
        rows = {r["estimator"]: r for r in data["cost"] if r["d"] == d}
        assert set(rows) == set(bench.ESTIMATORS)
        imp = rows["implicit"]
        assert imp["backward_speedup"] == 1.0 and imp["step_speedup"] == 1.0
        assert imp["backward_memory_ratio"] == 1.0
        # speed-up is implicit's time over the row's own, exactly as stored
        up = rows["upg"]
        assert up["backward_speedup"] == pytest.approx(imp["backward_s"] / up["backward_s"], rel=1e-12)


def test_deqref_agrees_with_bare_numpy(quick):
    """Each vector form against its bare re-implementation: float64 sums of at most a few hundred
    products per entry, so the relative difference is a few hundred ulps at most."""
    _, data, _ = quick
    cases = {r["case"] for r in data["efficiency"]}
    assert {"jfb", "gdeq", "upg (k=5, lam=0.5)", "npg (k=5, lam=0.5)", "bptt (30 it.)"} <= cases
    for r in data["efficiency"]:
        assert r["rel_diff"] < 1e3 * EPS64, r
        assert r["efficiency"] > 0 and math.isfinite(r["efficiency"])


def test_against_torchdeq(quick):
    _, data, _ = quick
    if isinstance(data["torch"], str):
        pytest.skip(data["torch"])
    for r in data["torch"]:
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
        if r["estimator"] == "upg":
            # the same unrolled steps on the same weights: agreement to rounding, ~1e-11 in float64
            # after 30 + 5 tanh layers; float32 to ~1e-6 of its 6e-8 epsilon times the depth
            assert r["grad_rel_diff"] < (1e-9 if r["dtype"] == "float64" else 1e-4), r
        else:
            # TorchDEQ's IFT takes its Jacobian at F(z*) instead of z*, a difference of the size
            # of the forward residual after 31 iterations (README, "Cross-checking")
            assert r["grad_rel_diff"] < 1e-3, r


def test_gpu_section_says_why_it_is_skipped(quick):
    _, data, md = quick
    g = data["gpu"]
    if isinstance(g, str):
        assert "CuPy" in g and "benchmarks/gpu.sh" in md
    else:  # on a GPU machine
        assert {"cost", "efficiency", "cupy_vs_numpy", "torch"} <= set(g)


def test_matrix_forms(quick):
    _, data, _ = quick
    assert {(r["d"], r["estimator"]) for r in data["matrix"]} == {
        (d, e) for d in bench.SIZES["quick"]["matrix_d"] for e in ("upg", "npg")}
    for r in data["matrix"]:
        assert r["d_theta"] == r["d"] * r["d"] + r["d"] * 16 + r["d"]   # W, U, b
        assert r["target_met"] == (r["build_s"] < 1.0)


def test_interleaved_and_peak_bytes():
    calls = []
    t = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3          # one warm-up each, then round-robin
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    n = 1 << 20
    assert bench.peak_bytes(lambda: np.ones(n)) >= 8 * n   # one float64 buffer of n entries


# ------------------------------------------------------------------ section 6, fair
@pytest.fixture(scope="module")
def fair_data(quick):
    out, _, _ = quick
    return json.loads((out / "fair.json").read_text()), (out / "fair.md").read_text()


def test_fair_structure(fair_data):
    data, md = fair_data
    assert md.startswith("# 6. Fair") and "## One thread (headline)" in md
    assert "limit / deqref" in md and "Where deqref's time goes" in md
    sizes = fair.SIZES["quick"]
    rows = data["one_thread"]["rows"]
    assert {(r["dtype"], r["d"], r["case"]) for r in rows} == {
        (t, d, c) for t in ("float64", "float32") for d in sizes["d"] for c in fair.CASES}
    # the headline is on one thread: BLAS (when threadpoolctl sees it) and torch
    rec = data["one_thread"]["threads"]
    assert all("(1 threads)" in b for b in rec["blas"] or [])
    if rec["torchdeq"] is None:
        assert rec["torch_threads"] == 1
    for r in rows:
        assert r["threads"] == 1 and r["products"] == fair.products(r["case"])
        for side in ("deqref", "limit", "torchdeq", "limit torch"):
            if side in r:
                st = r[side]
                assert 0 < st["min"] <= st["median"] <= st["max"] and st["repeats"] == sizes["repeats"]
        # ratios are of the medians, as stored
        assert r["limit_over_deqref"] == pytest.approx(r["limit"]["median"] / r["deqref"]["median"], rel=1e-12)
        if "torchdeq" in r:
            assert r["deqref_over_torchdeq"] == pytest.approx(
                r["deqref"]["median"] / r["torchdeq"]["median"], rel=1e-12)
    assert len(data["causes"]) == 2 * len(sizes["d"])
    assert all(set(fair.CAUSES) <= set(c["causes_s"]) for c in data["causes"])
    assert all(c["causes_s"][k] >= 0 for c in data["causes"] for k in fair.CAUSES)


def test_fair_gradients_agree(fair_data):
    """The limit computes deqref's answer with the fewest calls (to rounding: it sums the k
    products of UPG's ∂L/∂W as one product); TorchDEQ differentiates at the same h*."""
    data, _ = fair_data
    rows = list(data["one_thread"]["rows"])
    if isinstance(data["multi_thread"], dict):
        rows += data["multi_thread"]["rows"]
        assert all(r["threads"] >= 2 for r in data["multi_thread"]["rows"])
    for r in rows:
        f64 = r["dtype"] == "float64"
        assert r["diff_limit"] < (1e3 * EPS64 if f64 else 1e-5), r
        if "diff_limit_torch" in r:
            assert r["diff_limit_torch"] < (1e3 * EPS64 if f64 else 1e-4), r
        if "diff_torchdeq" in r:
            if r["case"] == "step implicit":     # TorchDEQ's IFT: Jacobian at F(z*), not z*
                assert r["diff_torchdeq"] < 1e-3, r
            else:
                assert r["diff_torchdeq"] < (1e3 * EPS64 if f64 else 1e-4), r


def test_fair_limit_counts():
    """The limit's product count: forward 1 + (T + 1); UPG's step shares c with the forward."""
    assert fair.products("forward") == 1 + fair.T + 1
    assert fair.products("backward jfb") == 5
    assert fair.products("step upg") == fair.products("forward") + fair.products("backward upg") - 1


def test_bench_only_refuses_unknown_section(capsys):
    assert cli_main(["bench", "--only", "cost", "--out", "/tmp/unused-deqref-bench"]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "Traceback" not in err
