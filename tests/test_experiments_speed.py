"""The training-speed experiments (Table 3 of Geng et al. / Table 2 of GDEQ, and Table 1 of the
JFB report) in quick mode: files well formed, the tables agree with the recorded curves, the
times add up, and training learns."""
import json

import numpy as np
import pytest

from deqref.experiments import EXPERIMENTS
from deqref.experiments.jfb_batch import lowest

NAMES = ("accuracy_speed", "jfb_batch")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run each experiment once in quick mode: {name: (JSON on disk, out dir)}."""
    out = tmp_path_factory.mktemp("speed")
    res = {}
    for name in NAMES:
        EXPERIMENTS[name].run(out, seed=0, mode="quick")
        res[name] = (json.loads((out / f"{name}.json").read_text()), out)
    return res


def _times_add_up(rec):
    """forward + backward ≤ epoch time (which adds the update), every epoch; all positive."""
    fwd, bwd, ep = (np.array(rec[k]) for k in ("time_forward", "time_backward", "time_epoch"))
    assert np.all(fwd > 0) and np.all(bwd > 0) and np.all(ep > 0)
    assert np.all(fwd + bwd <= ep * (1 + 1e-12))
    assert rec["wall_s"] >= ep.sum()                      # the wall clock also covers evaluation


@pytest.mark.parametrize("name", NAMES)
def test_files_and_summary(outputs, name):
    data, out = outputs[name]
    assert (out / f"{name}.png").stat().st_size > 5000
    assert data["setting"]["mode"] == "quick"
    mod = EXPERIMENTS[name]
    assert mod.__doc__.splitlines()[0].strip()
    text = mod.summary(data)                              # works from the JSON alone
    assert isinstance(text, str) and len(text.splitlines()) >= 3


def test_accuracy_speed(outputs):
    data = outputs["accuracy_speed"][0]
    s, methods = data["setting"], data["methods"]
    assert set(methods) == {"implicit", "upg", "npg", "jfb", "gdeq"}
    assert len(s["seeds"]) >= 2
    for name, m in methods.items():
        assert [r["seed"] for r in m["runs"]] == s["seeds"]
        for r in m["runs"]:
            assert len(r["val_metric"]) == s["epochs"]
            assert all(np.isfinite(r["train_loss"]))
            _times_add_up(r)
        summ = m["summary"]
        acc = np.array([r["val_metric"][-1] for r in m["runs"]])
        # the table is the mean ± std (ddof = 1) of the last epoch's accuracy
        assert summ["acc_mean"] == pytest.approx(acc.mean(), abs=1e-15)
        assert summ["acc_std"] == pytest.approx(acc.std(ddof=1), abs=1e-15)
        # 10 classes: chance is 10 %; two epochs of any of these estimators reach far more
        assert summ["acc_mean"] > 0.5, name
        t = summ["time_train_s"]
        assert summ["time_forward_s"] + summ["time_backward_s"] <= t * (1 + 1e-12)
        assert summ["speedup_train"] == pytest.approx(
            methods["implicit"]["summary"]["time_train_s"] / t, rel=1e-12)
    assert methods["implicit"]["summary"]["speedup_train"] == pytest.approx(1.0)
    # 20 Broyden iterations (each a VJP and low-rank updates) cost more than one VJP (JFB)
    assert methods["implicit"]["summary"]["time_backward_s"] > methods["jfb"]["summary"]["time_backward_s"]


def test_jfb_batch_table_matches_curves(outputs):
    data = outputs["jfb_batch"][0]
    s, runs = data["setting"], data["runs"]
    assert [int(k) for k in runs] == [2400, 1200, 600, 64, 32]
    assert runs["2400"]["full_batch"] and not runs["1200"]["full_batch"]
    for key, r in runs.items():
        loss = np.array(r["train_loss"])
        assert len(loss) == s["epochs"] and np.all(np.isfinite(loss))
        # the table row is read off the recorded curve, independently of ``lowest``
        i = int(np.argmin(loss))
        assert r["lowest_loss"] == loss.min() and r["epoch_of_lowest"] == i + 1
        assert r["time_to_lowest_s"] == pytest.approx(np.sum(r["time_epoch"][:i + 1]), rel=1e-12)
        assert r["time_total_s"] == pytest.approx(np.sum(r["time_epoch"]), rel=1e-12)
        assert r["steps_per_epoch"] == -(-s["n_train"] // int(key))
        assert min(r["forward_converged"]) == 1.0         # ‖F(h) − h‖_∞ < 1e-3 for every sample
        _times_add_up(r)
    # same initialization, same learning rate: more Adam steps per epoch, lower loss after 3 epochs
    assert runs["32"]["lowest_loss"] < runs["600"]["lowest_loss"] < runs["2400"]["lowest_loss"]
    # the reference level is the variance of the targets (MSE of the best constant)
    assert 0 < data["constant_mse"] < 0.05


def test_lowest_reads_the_curve():
    loss, t = [3.0, 1.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4]
    row = lowest(loss, t)
    assert row["lowest_loss"] == 1.0 and row["epoch_of_lowest"] == 2      # the first minimum
    assert row["time_to_lowest_s"] == pytest.approx(0.3) and row["time_total_s"] == pytest.approx(1.0)
    assert row["ms_per_epoch"] == pytest.approx(250.0)


def test_bad_mode(tmp_path):
    for name in NAMES:
        with pytest.raises(ValueError, match="mode"):
            EXPERIMENTS[name].run(tmp_path, seed=0, mode="fast")


def test_machine_records_the_blas_kernel():
    """The machine record names the BLAS kernel, the thing that decides a trained run's last bits.

    Oracle: OpenBLAS's own override. A child process started with OPENBLAS_CORETYPE=Haswell must
    record the Haswell kernel, and one with SkylakeX the SkylakeX kernel (OpenBLAS accepts an
    override the CPU supports; both need an x86-64 CPU with AVX2, resp. AVX-512)."""
    import os
    import subprocess
    import sys

    from deqref.experiments.machine import numerics
    rec = numerics()
    if not rec["blas_kernel"] or not rec["blas_kernel"][0].startswith("openblas"):
        pytest.skip(f"BLAS is not OpenBLAS seen through threadpoolctl: {rec['blas_kernel']}")
    want = {"Haswell": "X86_V3", "SkylakeX": "X86_V4"}
    runnable = [k for k, feature in want.items() if feature in (rec["numpy_simd"] or [])]
    if not runnable:
        pytest.skip(f"this CPU runs neither kernel (NumPy SIMD: {rec['numpy_simd']})")
    code = "from deqref.experiments.machine import numerics; print(numerics()['blas_kernel'])"
    for kernel in runnable:
        env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert kernel in out, (kernel, out)


def test_blas_thread_limit():
    """limit_blas_threads(n) limits every loaded BLAS to n threads (threadpoolctl's own record is
    the oracle) and restores them after; a count below 1 is an error naming the argument, and so
    is a bad DEQREF_BENCH_THREADS."""
    from deqref.bench import _threads
    from deqref.experiments.machine import blas_threads, limit_blas_threads, one_blas_thread
    with pytest.raises(ValueError, match="n: the number of BLAS threads"):
        limit_blas_threads(0)
    with pytest.raises(ValueError, match="n: the number of BLAS threads"):
        limit_blas_threads(1.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEQREF_BENCH_THREADS", "two")
        with pytest.raises(ValueError, match="DEQREF_BENCH_THREADS"):
            _threads()
    before = blas_threads()
    if not before:
        pytest.skip("threadpoolctl sees no BLAS library")
    with one_blas_thread():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
