"""The IGNN experiment (Table 4 of Geng et al.) in quick mode: files well formed, the table read
back from the recorded runs, the claims rows valid and recomputable, the same seed giving the
same bits; and one training step's gradient against finite differences of the loss through the
fixed point."""
import json

import numpy as np
import pytest

from conftest import host
from deqref import claims as C
from deqref.experiments import EXPERIMENTS, ORDER
from deqref.experiments import ignn
from deqref.graph import GraphCell
from deqref.graph_data import karate
from deqref.graph_heads import NodeHead, masked_cross_entropy
from deqref.solvers import solve

TIMES = ("time_forward", "time_backward", "time_update")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Two quick runs with the same seed, in two folders."""
    res = []
    for tag in ("a", "b"):
        out = tmp_path_factory.mktemp(f"ignn_{tag}")
        ignn.run(out, seed=0, mode="quick")
        res.append((json.loads((out / "ignn.json").read_text()), out))
    return res


def test_registered_last():
    # after the experiments before it; conv_deq, registered later, follows it
    assert ORDER.index("ignn") == ORDER.index("jfb_batch") + 1 and EXPERIMENTS["ignn"] is ignn


def test_files_and_summary(outputs):
    data, out = outputs[0]
    assert (out / "ignn.png").stat().st_size > 5000
    assert data["setting"]["mode"] == "quick"
    assert ignn.__doc__.splitlines()[0].strip()
    text = ignn.summary(data)                                        # from the JSON alone
    assert len(text.splitlines()) == 1 + 2 * (2 + len(ignn.METHODS))


def test_table_is_read_off_the_runs(outputs):
    data = outputs[0][0]
    seeds = data["setting"]["seeds"]
    assert len(seeds) >= 2 and set(data["tasks"]) == set(ignn.TASKS)
    for task, t in data["tasks"].items():
        assert set(t["methods"]) == set(ignn.METHODS)
        ref = t["methods"]["implicit"]["runs"]
        for name, m in t["methods"].items():
            assert [r["seed"] for r in m["runs"]] == seeds
            for r in m["runs"]:
                assert all(len(r[k]) == t["epochs"] for k in ("train_loss", "forward_iters", *TIMES))
                assert r["eval_epoch"][-1] == t["epochs"] and len(r["test_acc"]) == len(r["eval_epoch"])
                assert all(v > 0 for k in TIMES for v in r[k])
                assert len(r["step_time"]) == r["steps_per_epoch"] * t["epochs"]
                assert sum(r["step_time"]) == pytest.approx(sum(sum(r[k]) for k in TIMES), rel=1e-9)
                assert all(np.isfinite(r["train_loss"]))
                # the model is kept well posed, so every forward converges and no adjoint is flagged
                assert sum(r["forward_unconverged"]) == 0 and sum(r["estimator_flagged"]) == 0
                assert min(r["test_converged"]) == 1.0
            acc = 100 * np.array([r["test_acc"][-1] for r in m["runs"]])
            s = m["summary"]
            assert s["acc_mean"] == pytest.approx(acc.mean(), abs=1e-12)
            assert s["acc_std"] == pytest.approx(acc.std(ddof=1), abs=1e-12)
            if name != "implicit":
                total = lambda runs: np.mean([sum(r["time_forward"]) + sum(r["time_backward"])  # noqa: E731
                                              + sum(r["time_update"]) for r in runs])
                assert s["speedup_train"] == pytest.approx(total(ref) / total(m["runs"]), rel=1e-12)
    # an accuracy is a count of test nodes (graphs) over their number
    for task, t in data["tasks"].items():
        n_test = t["data"]["n_test"]
        for m in t["methods"].values():
            counts = np.array(m["summary"]["acc_per_seed"]) * n_test / 100
            np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)


def test_training_learns(outputs):
    """Karate in quick mode: 20 full-batch Adam steps lower the training loss on every run."""
    t = outputs[0][0]["tasks"]["karate"]
    for m in t["methods"].values():
        for r in m["runs"]:
            assert r["train_loss"][-1] < 0.9 * r["train_loss"][0]


def test_claims_rows(outputs):
    data = outputs[0][0]
    rows = ignn.claims(data)
    # the ids deqref promises to keep (as tests/test_claims.py does for the other experiments)
    assert [r["id"] for r in rows] == [
        "geng.table4.ppi.upg05_accuracy", "geng.table4.ppi.upg10_accuracy", "geng.table4.ppi.upg05_speedup",
        "geng.table4.graphs.upg05_accuracy", "geng.table4.graphs.upg10_accuracy",
        "geng.table4.graphs.upg05_speedup"]
    for r in rows:
        C.check_row(r)                                               # the verdict is its rule's
        assert r["n"] == len(data["setting"]["seeds"])
    by_id = {r["id"]: r for r in rows}
    # the paper's Table 4 numbers are in the rows
    assert "84.1" in by_id["geng.table4.graphs.upg05_accuracy"]["paper"]
    assert "97.6" in by_id["geng.table4.ppi.upg10_accuracy"]["paper"]
    # the accuracy rows are the paired differences of the recorded final accuracies
    t = data["tasks"]["degree_mixing"]["methods"]
    diff = [100 * (a["test_acc"][-1] - b["test_acc"][-1]) for a, b in zip(t["upg_0.5"]["runs"], t["implicit"]["runs"])]
    assert by_id["geng.table4.graphs.upg05_accuracy"]["measured"] == pytest.approx(np.mean(diff), abs=1e-8)
    # and the rows written by the CLI's claims file are the same
    again = ignn.claims(json.loads(json.dumps(data)))
    assert [r["verdict"] for r in again] == [r["verdict"] for r in rows]


def test_same_seed_same_bits(outputs):
    (a, _), (b, _) = outputs
    for task in ignn.TASKS:
        for name in ignn.METHODS:
            ra, rb = a["tasks"][task]["methods"][name]["runs"], b["tasks"][task]["methods"][name]["runs"]
            for x, y in zip(ra, rb):
                for k in x:
                    if k not in TIMES + ("step_time",):
                        assert x[k] == y[k], (task, name, k)


def test_robust_time_drops_a_spike():
    """Oracle: by hand. Steps of 1 s with one spike of 100 s: the window median drops it."""
    assert ignn.robust_time([1.0] * 7 + [100.0], window=8) == 8.0
    assert ignn.robust_time([1.0] * 8 + [2.0, 3.0], window=8) == 8.0 + 2.5 * 2
    assert ignn.robust_time([1.0] * 7 + [100.0], window=1) == 107.0      # no window, no robustness


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="^mode must be one of"):
        ignn.run(tmp_path, seed=0, mode="fast")


def test_step_gradient_against_finite_differences(be):
    """The training step's ∂L/∂θ (implicit, a fixed-point adjoint to 1e-6) on karate, against
    central differences of L(θ) = masked cross-entropy of the read-out at h*(θ), h* solved to
    1e-13, along three random directions.

    Tolerance: the adjoint stops at relative residual 1e-6, which with a contraction of rate
    ≤ 0.9 leaves a relative error of at most 1e-6 / (1 − 0.9) = 1e-5 in y, and so in ∂L/∂θ;
    the differences (step 1e-5, float64) are good to ~1e-9. 1e-4 relative leaves a margin of
    ten, and a wrong read-out or adjoint (errors of whole percents) fails it."""
    data = ignn.Batches(karate(0))
    cell = GraphCell.random(8, data.data.p, data.A_hat, ignn.ACTIVATION, seed=3, kappa=ignn.KAPPA,
                            mask=data.mask)
    head = NodeHead.random(8, 2, seed=4)
    est, opts, _ = ignn.METHODS["implicit"]
    _, grads, res, _, _ = ignn.step(est, opts, cell, head, data.x, data.y, data.labelled)
    assert bool(np.all(res.converged))

    def loss(theta):
        c = cell.with_theta(be.asarray(theta))
        r = solve(c, data.x, method="fixed_point", tol=1e-13, max_iter=2000)
        return masked_cross_entropy(head(r.h), data.y, data.labelled)[0]

    theta = host(cell.theta)
    g = np.concatenate([np.ravel(host(grads["W"])), np.ravel(host(grads["Omega"]))])
    rng = np.random.default_rng(0)
    for _ in range(3):
        u = rng.standard_normal(theta.size)
        fd = (loss(theta + 1e-5 * u) - loss(theta - 1e-5 * u)) / 2e-5
        assert g @ u == pytest.approx(fd, rel=1e-4)
