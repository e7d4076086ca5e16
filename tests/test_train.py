"""Trainer, optimizers and data sets: determinism, save/load, optimizer steps, validation."""
import json

import numpy as np
import pytest

from deqref.data import digits, heat_transfer, synthetic
from deqref.train import SGD, Adam, DEQModel, TrainConfig, save_history, train
from conftest import host


def small_digits():
    return digits(seed=0).subset(256, 128)


def run(seed=0, **kw):
    model = DEQModel.random(16, 64, 10, "tanh", seed=seed)
    kw = {"epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": seed, "quiet": True, **kw}
    cfg = TrainConfig(**kw)
    return model, train(model, small_digits(), cfg)


def test_same_seed_same_numbers_bit_for_bit():
    (m1, h1), (m2, h2) = run(1), run(1)
    for k, v in m1.params().items():
        np.testing.assert_array_equal(host(v), host(m2.params()[k]))
    assert h1["train_loss"] == h2["train_loss"] and h1["val_metric"] == h2["val_metric"]
    m3, _ = run(2)
    assert not np.array_equal(host(m1.layer.W), host(m3.layer.W))


@pytest.mark.parametrize("estimator,opts", [("implicit", {}), ("upg", {"k": 5, "lam": 0.5}),
                                            ("npg", {"k": 5, "lam": 0.5}), ("jfb", {}), ("gdeq", {}),
                                            ("implicit_dense", {})])
def test_training_lowers_the_loss(estimator, opts):
    _, h = run(0, estimator=estimator, estimator_options=opts)
    assert h["train_loss"][1] < h["train_loss"][0]
    assert len(h["time_forward"]) == 2 and all(t > 0 for t in h["time_backward"])


def test_track_cosine_is_one_for_the_exact_gradient_and_probes_record():
    _, h = run(0, estimator="implicit_dense", track_cosine=True, probes={"jfb": {}, "upg": {"k": 3}})
    assert np.allclose(h["step_cosine"], 1.0, atol=1e-12)       # the same gradient twice
    assert np.allclose(h["step_epsilon"], 0.0, atol=1e-12)
    assert len(h["probe_cosine"]["jfb"]) == len(h["step_cosine"]) == 2 * 4
    assert all(-1 <= c <= 1 for c in h["probe_cosine"]["upg"])


def test_save_and_load_bit_for_bit(tmp_path):
    model, hist = run(0)
    model.save(tmp_path / "m.npz")
    back = DEQModel.load(tmp_path / "m.npz")
    for k, v in model.params().items():
        np.testing.assert_array_equal(host(v), host(back.params()[k]))
    assert back.layer.activation == model.layer.activation
    with np.load(tmp_path / "m.npz", allow_pickle=False) as f:     # no pickle anywhere
        assert set(f.files) == {"activation", "W", "U", "b", "V", "c"}
    save_history(hist, tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["train_loss"] == hist["train_loss"]


def test_full_batch_mode_is_deterministic_gradient_descent():
    _, h = run(0, batch_size=None, optimizer="sgd")
    assert len(h["train_loss"]) == 2


def test_adam_and_sgd_steps_by_hand():
    p, g = {"a": np.array([1.0, -2.0])}, {"a": np.array([0.5, 0.25])}
    out = Adam(lr=0.1).step(p, g)
    # first Adam step: m̂ = g, v̂ = g², so the step is lr · g/(|g| + ε) ≈ lr · sign(g)
    np.testing.assert_allclose(out["a"], p["a"] - 0.1 * g["a"] / (np.abs(g["a"]) + 1e-8), rtol=1e-15)
    sgd = SGD(lr=0.5, momentum=0.9)
    a1 = sgd.step(p, g)
    a2 = sgd.step(a1, g)
    np.testing.assert_allclose(a2["a"], a1["a"] - 0.5 * (0.9 * g["a"] + g["a"]), rtol=1e-15)


def test_spectral_norm_projection():
    model, _ = run(0, spectral_norm=0.5, lr=0.05)
    assert np.linalg.norm(host(model.layer.W), 2) <= 0.5 + 1e-12


def test_bad_config_raises():
    model = DEQModel.random(4, 64, 10, seed=0)
    with pytest.raises(ValueError, match="estimator: unknown 'ift'"):
        train(model, small_digits(), TrainConfig(estimator="ift"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['K'\] for 'upg'"):
        train(model, small_digits(), TrainConfig(estimator="upg", estimator_options={"K": 2}))
    with pytest.raises(TypeError, match=r"solver_options: unknown option\(s\) \['lam'\] for 'broyden'"):
        train(model, small_digits(), TrainConfig(solver_options={"lam": 0.5}))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(model, small_digits(), TrainConfig(optimizer="lbfgs"))
    with pytest.raises(ValueError, match="batch_size must be None"):
        train(model, small_digits(), TrainConfig(batch_size=0))
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Adam(lr=0.0)


def test_heat_transfer_data():
    d = heat_transfer(seed=3)
    assert d.x_train.shape == (2400, 3) and d.x_val.shape == (600, 3)
    x = host(d.x_train)
    assert np.all(x >= 0) and np.all(x <= np.array([20, 13, 8]))
    # the target, recomputed from the formula independently
    t = np.tanh(x[:, 0] / (1 + np.exp(-x[:, 1])) + x[:, 1] / (1 + x[:, 0] ** 2 + x[:, 2] ** 2))
    np.testing.assert_allclose(host(d.y_train)[:, 0], t, rtol=1e-15)
    np.testing.assert_array_equal(host(heat_transfer(seed=3).x_val), host(d.x_val))   # seeded split
    assert not np.array_equal(host(heat_transfer(seed=4).x_val), host(d.x_val))


def test_digits_and_synthetic_data():
    d = digits(seed=0)
    assert d.x_train.shape == (1438, 64) and d.x_val.shape == (359, 64) and d.n_outputs == 10
    assert host(d.x_train).max() <= 1.0
    layer, x, g = synthetic(0)
    assert (layer.d, layer.d_x, x.shape, g.shape) == (64, 16, (32, 16), (32, 64))
    assert abs(np.linalg.norm(host(layer.W), 2) - 0.9) < 1e-14


def test_dataset_subset_takes_the_first_samples_and_validates():
    full, sub = digits(seed=0), digits(seed=0).subset(10, 4)
    assert sub.x_train.shape == (10, full.d_x) and sub.y_train.shape == (10,)
    assert sub.x_val.shape == (4, full.d_x) and sub.y_val.shape == (4,)
    np.testing.assert_array_equal(host(sub.x_train), host(full.x_train)[:10])
    np.testing.assert_array_equal(host(sub.y_val), host(full.y_val)[:4])
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        full.subset(0)
    with pytest.raises(ValueError, match="n_val must be an integer >= 1"):
        full.subset(5, 2.5)
