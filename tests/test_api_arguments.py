"""Every integer and real argument of layers, heads, data and the trainer goes through
deqref.checks: a bool is never a number, a seed is an integer >= 0, and each error is one line
that starts with the argument's name. Array arguments: plain arrays of one backend, not empty."""
import numpy as np
import pytest

from deqref.data import digits, heat_transfer, synthetic
from deqref.heads import LinearHead, cross_entropy, mse, softmax
from deqref.layers import Layer, spectral_normalize
from deqref.solvers import solve
from deqref.train import SGD, Adam, DEQModel, TrainConfig, evaluate, train
from conftest import host

DIGITS = digits(seed=0)


def raises_one_line(error, name, call, match=""):
    """``call()`` raises ``error`` whose message is one line starting with ``name``."""
    with pytest.raises(error) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith(name), f"{text!r} does not start with {name!r}"
    assert match in text, f"{match!r} not in {text!r}"


# (argument, call) pairs: True where an integer or a real number is expected
BOOLS = [
    ("d", lambda: Layer.random(True, 2, seed=0)),
    ("d_x", lambda: Layer.random(3, True, seed=0)),
    ("L_h", lambda: Layer.random(3, 2, seed=0, L_h=True)),
    ("seed", lambda: Layer.random(3, 2, seed=True)),
    ("q", lambda: LinearHead.random(3, True, seed=0)),
    ("d", lambda: LinearHead.random(True, 2, seed=0)),
    ("n", lambda: synthetic(n=True)),
    ("n", lambda: heat_transfer(n=True)),
    ("val_fraction", lambda: heat_transfer(n=10, val_fraction=True)),
    ("seed", lambda: digits(seed=True)),
    ("n_train", lambda: DIGITS.subset(True)),
    ("n_val", lambda: DIGITS.subset(4, True)),
    ("lr", lambda: Adam(lr=True)),
    ("beta1", lambda: Adam(beta1=False)),
    ("momentum", lambda: SGD(momentum=False)),
]


@pytest.mark.parametrize("name,call", BOOLS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BOOLS)])
def test_a_bool_is_never_a_number(name, call):
    raises_one_line(ValueError, name, call, "must be")


CONFIG = [  # TrainConfig field, bad value, what the message says was expected
    ("epochs", True, "an integer >= 1"), ("epochs", 0, "an integer >= 1"),
    ("epochs", 2.0, "an integer >= 1"), ("batch_size", True, "None or an integer >= 1"),
    ("batch_size", 2.5, "None or an integer >= 1"), ("seed", -1, "an integer >= 0"),
    ("seed", True, "an integer >= 0"), ("lr", True, "> 0"), ("lr", float("nan"), "> 0"),
    ("lr", -1e-3, "> 0"), ("lr", "1e-3", "> 0"), ("momentum", 1.0, "in [0, 1)"),
    ("momentum", True, "in [0, 1)"), ("spectral_norm", True, "> 0"), ("spectral_norm", 0.0, "> 0"),
    ("track_cosine", 1, "True or False"), ("quiet", "yes", "True or False"),
    ("optimizer", None, "one of"), ("estimator", None, "unknown None"),
    ("solver", ["broyden"], "unknown ['broyden']"),
]


@pytest.mark.parametrize("field,value,expected", CONFIG)
def test_train_config_checks_every_field(field, value, expected):
    cfg = TrainConfig(**{field: value})
    raises_one_line(ValueError, field, cfg.validate, expected)


@pytest.mark.parametrize("field", ["estimator_options", "solver_options", "probes"])
def test_train_config_option_fields_must_be_dicts(field):
    raises_one_line(TypeError, field, TrainConfig(**{field: [("k", 2)]}).validate, "must be a dict")


@pytest.mark.parametrize("call", [
    lambda: Layer.random(3, 2, seed=-1), lambda: LinearHead.random(3, 2, seed=-1),
    lambda: synthetic(seed=-1), lambda: heat_transfer(seed=-1, n=10), lambda: digits(seed=-2),
    lambda: DEQModel.random(3, 2, 2, seed=-1), lambda: Layer.random(3, 2, seed=1.5),
])
def test_seeds_are_integers_at_least_zero(call):
    """NumPy's default_rng fails later with its own words (or takes 1.5 as entropy): say it here."""
    raises_one_line(ValueError, "seed", call, "must be an integer >= 0")


@pytest.mark.parametrize("L_h", [-1.0, 0.0, float("inf"), "0.9", None, 5e-324, 1e-160, 1e300])
def test_layer_random_checks_L_h(L_h):
    # outside [√tiny, √max] of float64 W's entries leave the normal numbers: ‖W‖₂ = L_h cannot hold
    raises_one_line(ValueError, "L_h", lambda: Layer.random(3, 2, seed=0, L_h=L_h), "finite number in [")


@pytest.mark.parametrize("dtype,L_h", [("float64", 1e-150), ("float64", 1e150), ("float32", 2e-19),
                                       ("float32", 1e19)])
def test_layer_random_meets_L_h_at_the_ends_of_its_range(dtype, L_h):
    """‖W‖₂ = L_h to the dtype's rounding (the SVD's, a few eps) at the extremes it accepts."""
    W = host(Layer.random(4, 2, seed=0, L_h=L_h, dtype=dtype).W)
    assert abs(np.linalg.norm(W, 2) - L_h) <= 16 * np.finfo(dtype).eps * L_h


def test_layer_random_refuses_float32_L_h_outside_its_range():
    raises_one_line(ValueError, "L_h", lambda: Layer.random(3, 2, seed=0, L_h=1e-30, dtype="float32"),
                    "finite number in [")


def test_spectral_normalize_refuses_what_it_cannot_scale():
    raises_one_line(ValueError, "W", lambda: spectral_normalize(np.zeros((2, 2)), 0.5), "non-zero")
    raises_one_line(ValueError, "W", lambda: spectral_normalize(np.full((2, 2), np.nan), 0.5), "NaN")


W2, U2, B2 = np.eye(2) * 0.5, np.ones((2, 1)), np.zeros(2)


@pytest.mark.parametrize("args,error,name,match", [
    (([[0.5, 0.0], [0.0, 0.5]], U2, B2), TypeError, "W", "got list"),
    ((3.0, U2, B2), TypeError, "W", "got float"),
    ((W2, 1, B2), TypeError, "U", "got int"),
    ((np.array(0.5), U2, B2), ValueError, "W", "got ()"),
    ((W2, U2, np.zeros((2, 1))), ValueError, "b", "got (2, 1)"),
    ((np.zeros((0, 0)), np.ones((0, 1)), np.zeros(0)), ValueError, "W", "must not be empty"),
    ((W2, np.ones((2, 0)), B2), ValueError, "U", "at least one column"),
    ((W2.astype(np.int64), U2, B2), TypeError, "W", "float64 or float32"),
])
def test_layer_weights_must_be_arrays_of_the_right_kind(args, error, name, match):
    raises_one_line(error, name, lambda: Layer(*args), match)


def test_layer_weights_on_two_backends():
    from deqref import backend as B
    U_strict = B._load("strict").asarray(U2)
    raises_one_line(TypeError, "U", lambda: Layer(W2, U_strict, B2), "mixing backends")


def test_layer_activation_must_be_a_name():
    raises_one_line(ValueError, "activation", lambda: Layer(W2, U2, B2, ["tanh"]), "one of")


def test_check_inputs_refuses_an_empty_batch(be):
    layer = Layer.random(3, 2, seed=0, backend=be)
    empty = be.asarray(np.zeros((0, 2)))
    raises_one_line(ValueError, "x", lambda: solve(layer, empty), "at least one sample")
    raises_one_line(ValueError, "h", lambda: layer.check_inputs(h=be.asarray(np.zeros((0, 3)))),
                    "got shape (0, 3)")


def test_with_theta_checks_theta(be):
    layer = Layer.random(3, 2, seed=0, backend=be)
    raises_one_line(TypeError, "theta", lambda: layer.with_theta([0.0] * layer.d_theta), "got list")
    raises_one_line(ValueError, "theta", lambda: layer.with_theta(be.asarray(np.zeros(5))),
                    f"shape ({layer.d_theta},)")
    theta = host(layer.theta) + 1.0                   # a round trip: θ in, the same θ out
    np.testing.assert_array_equal(host(layer.with_theta(be.asarray(theta)).theta), theta)


def test_losses_refuse_an_empty_batch(arr, be):
    """n = 0 has no mean: mse and cross-entropy divided by 0 (ZeroDivisionError)."""
    raises_one_line(ValueError, "y_hat", lambda: mse(arr(np.ones((0, 2))), arr(np.ones((0, 2)))),
                    "at least one sample")
    labels = be.from_host(np.zeros(0, dtype=np.int64))
    raises_one_line(ValueError, "logits", lambda: cross_entropy(arr(np.ones((0, 2))), labels),
                    "at least one sample")
    raises_one_line(ValueError, "y_hat", lambda: mse(arr(np.ones(3)), arr(np.ones(3))), "shape (?, ?)")
    raises_one_line(TypeError, "labels", lambda: cross_entropy(arr(np.ones((2, 2))), [0, 1]), "got list")


NONE_CALLS = [
    ("W", lambda L: Layer(None, U2, B2)), ("c", lambda L: LinearHead(np.eye(2), None)),
    ("h", lambda L: LinearHead(np.eye(2), np.zeros(2))(None)),
    ("y_hat", lambda L: mse(None, np.ones((2, 2)))),
    ("labels", lambda L: cross_entropy(np.ones((2, 2)), None)),
    ("z", lambda L: softmax(None)), ("theta", lambda L: L.with_theta(None)),
    ("x", lambda L: solve(L, None)), ("x", lambda L: L.check_inputs(x=None)),
]


@pytest.mark.parametrize("name,call", NONE_CALLS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(NONE_CALLS)])
def test_a_required_array_is_not_none(name, call):
    """None was skipped as an optional array and failed later ('NoneType' has no 'shape')."""
    layer = Layer(W2, U2, B2)
    raises_one_line(TypeError, name, lambda: call(layer), "got None")


def test_head_and_losses_refuse_non_finite_input(arr, be):
    """NaN went through the head and the losses into a NaN loss and gradient."""
    head = LinearHead.random(2, 2, seed=0, backend=be)
    bad = arr(np.array([[0.5, np.nan]]))
    raises_one_line(ValueError, "h", lambda: head(bad), "contains NaN or infinity")
    raises_one_line(ValueError, "h", lambda: head.backward(bad, arr(np.ones((1, 2)))), "NaN")
    raises_one_line(ValueError, "y_hat", lambda: mse(bad, arr(np.ones((1, 2)))), "NaN")
    raises_one_line(ValueError, "y", lambda: mse(arr(np.ones((1, 2))), bad), "NaN")
    labels = be.from_host(np.zeros(1, dtype=np.int64))
    raises_one_line(ValueError, "logits", lambda: cross_entropy(bad * np.inf, labels), "NaN")
    raises_one_line(ValueError, "z", lambda: softmax(bad), "NaN")


def test_head_weights_are_checked():
    raises_one_line(TypeError, "V", lambda: LinearHead([[1.0, 0.0]], np.zeros(1)), "got list")
    raises_one_line(ValueError, "V", lambda: LinearHead(np.zeros((0, 2)), np.zeros(0)),
                    "must not be empty")


def n_val_of(n, val_fraction):
    """The split rule written out: round(val_fraction · n) validation samples."""
    return int(round(val_fraction * n))


@pytest.mark.parametrize("val_fraction,match", [
    (-0.1, "in (0, 1)"), (0.0, "in (0, 1)"), (1.0, "in (0, 1)"), (1.5, "in (0, 1)"),
    (1e-4, "empty validation split"), (0.9999, "empty training split"),
])
def test_val_fraction_must_leave_two_non_empty_splits(val_fraction, match):
    """digits(val_fraction=-0.1) gave 180 training samples (a slice from the end)."""
    raises_one_line(ValueError, "val_fraction", lambda: digits(val_fraction=val_fraction), match)


def test_splits_have_the_sizes_asked_for():
    for fraction in (0.2, 0.5, 0.05):
        d = digits(seed=1, val_fraction=fraction)
        assert d.x_val.shape[0] == n_val_of(1797, fraction)
        assert d.x_train.shape[0] == 1797 - n_val_of(1797, fraction)


def test_standardize_needs_inputs_that_vary():
    """heat_transfer(n=2, standardize=True) gave NaN inputs: its split left one training sample
    (or none), whose standard deviation is 0."""
    raises_one_line(ValueError, "val_fraction", lambda: heat_transfer(n=2, standardize=True),
                    "empty validation split")
    raises_one_line(ValueError, "standardize", lambda: heat_transfer(n=2, val_fraction=0.5,
                                                                     standardize=True),
                    "1 training sample")
    raises_one_line(ValueError, "standardize", lambda: heat_transfer(n=10, standardize="yes"),
                    "True or False")
    d = heat_transfer(seed=2, n=10, standardize=True)      # 8 training samples: mean 0, std 1
    x = host(d.x_train)
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(host(d.x_val)))
    # the mean of 8 standardized numbers is a sum of rounding errors: a few eps
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-15)
    np.testing.assert_allclose(x.std(axis=0), 1.0, rtol=1e-15)


def test_subset_cannot_ask_for_more_samples_than_there_are():
    """subset(5000) silently returned all 1438 training samples."""
    raises_one_line(ValueError, "n_train", lambda: DIGITS.subset(5000), "<= 1438")
    raises_one_line(ValueError, "n_val", lambda: DIGITS.subset(10, 360), "<= 359")
    small = DIGITS.subset(20, 4)
    assert small.subset(3).x_val.shape[0] == 3          # n_val left out is n_train
    raises_one_line(ValueError, "n_val", lambda: small.subset(6),
                    "left out it is n_train = 6, more than the 4 validation samples")


def test_bptt_needs_the_fixed_point_iterates():
    """BPTT failed at the first batch with an error about 'result', which train() builds."""
    raises_one_line(ValueError, "estimator", TrainConfig(estimator="bptt").validate,
                    "solver='fixed_point'")
    raises_one_line(ValueError, "probes", TrainConfig(probes={"bptt@a": {}}).validate,
                    "'return_trajectory': True")
    raises_one_line(ValueError, "estimator",
                    TrainConfig(estimator="bptt", solver="fixed_point").validate,
                    "'return_trajectory': True")
    ok = TrainConfig(estimator="bptt", solver="fixed_point", epochs=1, quiet=True,
                     solver_options={"tol": 1e-6, "max_iter": 100, "return_trajectory": True})
    hist = train(DEQModel.random(4, 64, 10, seed=0), DIGITS.subset(32, 8), ok)
    assert np.isfinite(hist["train_loss"][0])


def test_data_and_model_must_fit_each_other():
    small = DIGITS.subset(16, 8)
    cfg = TrainConfig(epochs=1, quiet=True)
    raises_one_line(ValueError, "data.x_train", lambda: train(DEQModel.random(4, 3, 10, seed=0),
                                                              small, cfg), "(n >= 1, 3)")
    raises_one_line(ValueError, "data.n_outputs", lambda: train(DEQModel.random(4, 64, 3, seed=0),
                                                                small, cfg), "q = 3")
    raises_one_line(TypeError, "cfg", lambda: train(DEQModel.random(4, 64, 10, seed=0), small,
                                                    {"epochs": 1}))
    raises_one_line(ValueError, "task", lambda: evaluate(DEQModel.random(4, 64, 10, seed=0),
                                                         small.x_val, small.y_val, "regresion", cfg),
                    "one of ('regression', 'classification')")
