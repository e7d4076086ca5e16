"""TrainConfig.stop_loss (early stop at a target training loss) and the training progress bar."""
import io
import math
import re
import sys
import time

import pytest

import deqref.train
from deqref.data import heat_transfer
from deqref.train import DEQModel, TrainConfig, train

EPOCHS = 8


def run(**kw):
    """A few epochs of JFB on 200 heat-transfer points, batch 16 (about 0.1 s)."""
    data = heat_transfer(0, n=200, standardize=True)
    model = DEQModel.random(3, 3, 1, "tanh", seed=0, L_h=0.8)
    cfg = TrainConfig(**{"estimator": "jfb", "solver": "fixed_point", "epochs": EPOCHS,
                         "batch_size": 16, "lr": 1e-2, "seed": 0, "quiet": True, **kw})
    return train(model, data, cfg)


@pytest.fixture(scope="module")
def free():
    """The reference run: no stop_loss, all EPOCHS epochs."""
    return run()


def test_reference_run_is_not_stopped(free):
    loss = free["train_loss"]
    assert free["epochs_run"] == EPOCHS == len(loss) and free["stopped_at_target"] is False
    assert loss[-1] < loss[0]                   # it learns, so a target inside the curve is reached


@pytest.mark.parametrize("pick", [2, 5])
def test_stop_loss_stops_at_the_first_epoch_at_or_below_it(free, pick):
    """The target is a value of the reference curve itself, so "at or below" is tested at its
    edge; the stop epoch is read off the reference curve, independently of ``train``."""
    target = free["train_loss"][pick]
    first = next(i for i, v in enumerate(free["train_loss"]) if v <= target)
    hist = run(stop_loss=target)
    assert hist["epochs_run"] == first + 1 < EPOCHS and hist["stopped_at_target"] is True
    assert hist["config"]["stop_loss"] == target
    for key in ("train_loss", "val_loss", "time_epoch", "forward_iters"):
        assert len(hist[key]) == first + 1, key
    # the same run up to the stop, bit for bit
    assert hist["train_loss"] == free["train_loss"][:first + 1]
    assert hist["val_loss"] == free["val_loss"][:first + 1]


def test_stop_loss_never_reached_runs_every_epoch(free):
    hist = run(stop_loss=min(free["train_loss"]) / 2)
    assert hist["epochs_run"] == EPOCHS and hist["stopped_at_target"] is False
    assert hist["train_loss"] == free["train_loss"]


def _one_line(error, name, cfg, match):
    with pytest.raises(error) as info:
        cfg.validate()
    text = str(info.value)
    assert "\n" not in text and text.startswith(name) and match in text, text


@pytest.mark.parametrize("value", [0.0, -1e-3, math.nan, math.inf, True, "5e-4", [1e-3]])
def test_bad_stop_loss(value):
    _one_line(ValueError, "stop_loss", TrainConfig(stop_loss=value), "None or a finite number > 0")


@pytest.mark.parametrize("value", [None, 3, b"b=64", ["b=64"]])
def test_bad_label(value):
    _one_line(TypeError, "label", TrainConfig(label=value), "must be a str")


def test_good_stop_loss_and_label():
    TrainConfig(stop_loss=5e-4, label="jfb_batch b=64").validate()
    TrainConfig(stop_loss=None, label="").validate()


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that tqdm's ``disable=None`` shows the bar."""

    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_stderr(monkeypatch, capsys):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    evaluate = deqref.train.evaluate                 # tqdm redraws at most every 0.1 s:

    def slow_evaluate(*args):                        # epochs of 0.15 s are each drawn
        time.sleep(0.15)
        return evaluate(*args)

    monkeypatch.setattr(deqref.train, "evaluate", slow_evaluate)
    hist = run(quiet=False, label="jfb_batch b=16", epochs=3)
    text = err.getvalue()
    assert text.startswith("\rjfb_batch b=16:") and "epoch/s" in text
    last = [line for line in text.split("\r") if "3/3 [" in line]   # the last epoch's line
    assert last and f"loss {hist['train_loss'][-1]:.4g}, val metric {hist['val_metric'][-1]:.3f}" in last[-1]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", last[-1])       # elapsed < time left
    assert capsys.readouterr().out == ""                      # nothing on stdout


def test_progress_bar_off_when_quiet(monkeypatch, capsys):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    run(quiet=True, label="jfb_batch b=16", epochs=3)
    assert err.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_progress_bar_off_when_stderr_is_not_a_terminal(capsys):
    run(quiet=False, label="jfb_batch b=16", epochs=3)        # capsys's stderr is no terminal
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_jfb_batch_time_to_target_reads_the_curve():
    """The first epoch at or below the target (not the lowest one) and the time up to it."""
    from deqref.experiments.jfb_batch import time_to_target
    loss, t = [3.0, 6e-4, 5e-4, 4e-4, 5e-4], [0.1, 0.2, 0.3, 0.4, 0.5]
    tt = time_to_target(loss, t, 3000, target=5e-4)
    assert tt["reached"] is True and tt["epoch"] == 3 and tt["time_s"] == pytest.approx(0.6)
    assert tt["target"] == 5e-4 and tt["max_epochs"] == 3000
    tt = time_to_target(loss, t, 5, target=1e-4)
    assert tt == {"target": 1e-4, "reached": False, "epoch": None, "time_s": None, "max_epochs": 5}
