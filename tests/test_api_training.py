"""The trainer is honest about its solves: every forward solve that did not converge and every
flagged gradient estimate is counted in the history, a run ends with one ConvergenceWarning
that sums them up (not one per batch), warning filters still apply, and non-finite numbers stop
training with a FloatingPointError instead of going on with NaN."""
import json
import dataclasses
import warnings

import numpy as np
import pytest

import deqref.train as T
from deqref.gradients import base as gradient_base
from deqref.data import digits, heat_transfer
from deqref.heads import LinearHead
from deqref.layers import Layer
from deqref.solvers import ConvergenceWarning, solve
from deqref.train import DEQModel, TrainConfig, save_history, train

# the history's per-epoch convergence records, as train()'s docstring defines them
CONVERGENCE_KEYS = ("forward_unconverged", "forward_unconverged_batches", "estimator_flagged",
                    "estimator_flags", "probe_flagged", "val_unconverged")
DATA = digits(seed=0).subset(256, 128)          # 4 batches of 64 per epoch
N_BATCHES = 4


def config(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": 0, "quiet": True, **kw})


def model(seed=0):
    return DEQModel.random(16, 64, 10, "tanh", seed=seed)


def run_recording(cfg, m=None, action="always"):
    """Train; return (history, every warning that left train())."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        hist = train(m or model(), DATA, cfg)
    return hist, caught


def convergence_warnings(caught):
    return [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_a_converged_run_is_silent_and_counts_zero():
    hist, caught = run_recording(config())
    assert convergence_warnings(caught) == []
    for key in CONVERGENCE_KEYS:
        assert hist[key] == [0, 0], key
    assert hist["forward_converged"] == [1.0, 1.0] and hist["flag_examples"] == []


def test_forward_non_convergence_is_counted_against_the_solver():
    """Full batch, so each epoch's forward solve is one solve at known parameters; the oracle is
    the solver run on those parameters by the test. max_iter = 15 at tol = 1e-8 leaves some
    samples unconverged and some converged (measured: 100 of 256 and 60 of 128)."""
    opts = {"tol": 1e-8, "max_iter": 15}
    cfg = lambda epochs: config(epochs=epochs, batch_size=None, solver_options=opts)  # noqa: E731

    def unconverged(mdl, x):
        return int((~solve(mdl.layer, x, method="broyden", warn=False, **opts).converged).sum())
    start, after_one = model(), model()
    want_epoch0 = unconverged(start, DATA.x_train)
    hist, caught = run_recording(cfg(2), start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        train(after_one, DATA, cfg(1))                     # the parameters after one update
    want = [want_epoch0, unconverged(after_one, DATA.x_train)]
    assert all(0 < w < 256 for w in want), "the case must mix converged and unconverged samples"
    assert hist["forward_unconverged"] == want
    assert hist["forward_unconverged_batches"] == [1, 1]
    assert hist["forward_converged"] == [1 - w / 256 for w in want]
    assert hist["val_unconverged"][0] == unconverged(after_one, DATA.x_val)   # after the update
    (summary,) = convergence_warnings(caught)              # one warning for the whole run
    assert f"did not converge for {sum(want)} sample(s) in 2 of 2 batches" in str(summary.message)


def test_one_warning_per_run_not_one_per_batch(tmp_path):
    """max_iter = 1 at tol = 0: no forward solve converges. Every batch's solver (and estimator)
    warning is recorded, not shown; train() ends with one warning that counts them all."""
    cfg = config(estimator="jfb", solver_options={"tol": 0.0, "max_iter": 1})
    hist, caught = run_recording(cfg)
    assert hist["forward_unconverged"] == [256, 256]
    assert hist["forward_unconverged_batches"] == [N_BATCHES, N_BATCHES]
    assert hist["forward_converged"] == [0.0, 0.0]
    assert hist["val_unconverged"] == [128, 128]
    if hasattr(gradient_base, "forward_flag"):
        # JFB has no inner solve: its only flag repeats the forward one, counted above
        assert hist["estimator_flagged"] == [0, 0] and hist["flag_examples"] == []
    assert all(0 <= b <= N_BATCHES for b in hist["estimator_flagged"])
    (summary,) = convergence_warnings(caught)
    text = str(summary.message)
    assert "did not converge for 512 sample(s) in 8 of 8 batches, over 2 of 2 epoch(s)" in text
    assert "validation set" in text and "256 sample(s)" in text
    assert summary.filename == __file__                    # it points at the caller of train()
    save_history(hist, tmp_path / "h.json")                # the new fields are plain JSON
    assert json.loads((tmp_path / "h.json").read_text())["forward_unconverged"] == [256, 256]


def test_error_filter_stops_training_at_the_first_unconverged_solve():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning):
            train(model(), DATA, config(solver_options={"tol": 0.0, "max_iter": 1}))


def flagging(real, every, flags=True, extra_warning=None):
    """An estimator wrapper: call i (0, 1, ...) is flagged when i % every == every − 1.
    With ``flags`` the flag is in ``Gradient.flags`` and warned; without, only warned
    (an estimator that carries no flags)."""
    calls = []

    def estimate(*args, **kwargs):
        g = real(*args, **kwargs)
        g.flags = ()
        i = len(calls)
        calls.append(i)
        if extra_warning:
            warnings.warn(extra_warning, RuntimeWarning)
        if i % every == every - 1:
            line = f"fake: adjoint did not converge at call {i}"
            warnings.warn(line, ConvergenceWarning)
            if flags:
                g.flags = (line,)
        if not flags:
            del g.flags
        return g
    return estimate


@pytest.mark.parametrize("with_flags", [True, False])
def test_flagged_estimates_are_counted(monkeypatch, with_flags):
    monkeypatch.setattr(T, "estimate", flagging(T.estimate, every=2, flags=with_flags))
    hist, caught = run_recording(config())
    assert hist["estimator_flagged"] == [2, 2]             # calls 1, 3 | 5, 7 of 4 per epoch
    assert hist["estimator_flags"] == [2, 2]
    assert hist["flag_examples"][:2] == ["fake: adjoint did not converge at call 1",
                                         "fake: adjoint did not converge at call 3"]
    (summary,) = convergence_warnings(caught)
    assert "flagged in 4 batch(es) over 2 epoch(s) (first: fake: adjoint" in str(summary.message)


def test_the_forward_flag_is_not_counted_twice(monkeypatch):
    """An estimator flags a batch whose forward solve did not converge (it is given that
    solve); that line is in forward_unconverged already, so only the other lines count."""
    if not hasattr(gradient_base, "forward_flag"):
        pytest.skip("the estimators do not flag the forward solve here")
    real = T.estimate

    def estimate(name, layer, x, result, grad_h, **kwargs):
        g = real(name, layer, x, result, grad_h, **kwargs)
        forward = gradient_base.forward_flag(g.name, result)
        g.flags = tuple(f for f in (forward, "fake: the adjoint diverged") if f)
        return g
    monkeypatch.setattr(T, "estimate", estimate)
    cfg = config(estimator="jfb", solver_options={"tol": 0.0, "max_iter": 1})
    hist, _ = run_recording(cfg)
    assert hist["forward_unconverged_batches"] == [N_BATCHES, N_BATCHES]
    assert hist["estimator_flagged"] == [N_BATCHES, N_BATCHES]
    assert hist["estimator_flags"] == [N_BATCHES, N_BATCHES]      # one line each, not two
    assert hist["flag_examples"] == ["fake: the adjoint diverged"]


def test_probes_flags_are_counted_apart(monkeypatch):
    monkeypatch.setattr(T, "estimate", flagging(T.estimate, every=3))
    hist, caught = run_recording(config(estimator="implicit_dense", probes={"jfb": {}}))
    # calls alternate estimator (even) and probe (odd): 0 e, 1 p, 2 e*, 3 p, 4 e, 5 p*, 6 e, 7 p
    # | 8 e*, 9 p, 10 e, 11 p*, 12 e, 13 p, 14 e*, 15 p; flagged (*) every third call
    assert hist["estimator_flagged"] == [1, 2] and hist["probe_flagged"] == [1, 1]
    assert len(convergence_warnings(caught)) == 1


def test_other_warnings_pass_through_once_per_run(monkeypatch):
    monkeypatch.setattr(T, "estimate", flagging(T.estimate, every=10 ** 6, extra_warning="odd value"))
    _, caught = run_recording(config(), action="default")
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == ["odd value"]


def nan_at(real, call):
    """An estimator wrapper whose estimate at call ``call`` has a NaN in ∂L/∂W."""
    calls = []

    def estimate(*args, **kwargs):
        g = real(*args, **kwargs)
        calls.append(len(calls))
        if len(calls) - 1 == call:
            W = g.W * float("nan")
            g = dataclasses.replace(g, grads={**g.grads, "W": W})
        return g
    return estimate


def test_non_finite_parameters_stop_training(monkeypatch):
    """Today's code went on to Layer(...) and failed there with 'W contains NaN'."""
    monkeypatch.setattr(T, "estimate", nan_at(T.estimate, call=5))     # epoch 1, batch 1
    with pytest.raises(FloatingPointError,
                       match=r"^training diverged at epoch 1, batch 1: the updated parameter\(s\) "
                             r"\['W'\] are not finite") as info:
        train(model(), DATA, config())
    assert len(info.value.history["train_loss"]) == 1      # the one finished epoch


def test_a_non_finite_output_stops_training(monkeypatch):
    real = T.output
    monkeypatch.setattr(T, "output", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(FloatingPointError, match=r"^training diverged at epoch 0, batch 0: "
                                                 r"the implicit output h is not finite"):
        train(model(), DATA, config())


def test_an_estimators_floating_point_error_names_the_batch(monkeypatch):
    def failing(*args, **kwargs):
        raise FloatingPointError("fake: ∂L/∂θ not finite; cause: overflow")
    monkeypatch.setattr(T, "estimate", failing)
    with pytest.raises(FloatingPointError, match=r"^training diverged at epoch 0, batch 0: fake: "):
        train(model(), DATA, config())


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_non_finite_loss_stops_training_at_its_batch(be):
    """A head of size 1e200 makes ŷ² overflow: the loss is inf at the first batch. Today's code
    trained the whole epoch on it (Adam steps stay finite) and stopped only at its end."""
    data = heat_transfer(seed=0, n=100)
    layer = Layer.random(4, 3, seed=0, backend=be)
    head = LinearHead(be.asarray(np.full((1, 4), 1e200)), be.asarray(np.zeros(1)))
    with pytest.raises(FloatingPointError, match=r"^training diverged at epoch 0, batch 0: "
                                                 r"the loss is not finite \(inf\)"):
        train(DEQModel(layer, head), data, TrainConfig(epochs=1, batch_size=16, quiet=True))
