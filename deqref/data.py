"""The data sets of the experiments, all generated or shipped locally and seeded.

- ``synthetic``: the synthetic setting of Geng et al. (Sec. 3): one layer with ‖W‖₂ = L_h = 0.9.
  deqref's dimensions: d = 64, d_x = 16, tanh, x ~ N(0, I), upstream g ~ N(0, I).
- ``heat_transfer``: the regression of Raitz (JFB report): target
  tanh(x/(1 + e^{−y}) + y/(1 + x² + z²)) at 3,000 points drawn uniformly in a
  20 × 13 × 8 room, a seeded 80/20 split; its metric is accuracy = |error| < 0.1.
- ``digits``: the 8 × 8 handwritten digits bundled with scikit-learn (1,797 images,
  10 classes; no download), pixels scaled to [0, 1], a seeded 80/20 split — deqref's
  teaching-scale stand-in for the papers' CIFAR-10 and ImageNet.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .backend import DTYPES, Backend, check_backend, check_seed
from .checks import check_bool, check_choice, check_int, check_real
from .layers import Layer

SYNTH_D, SYNTH_D_X, SYNTH_N, SYNTH_L_H = 64, 16, 32, 0.9
ROOM = (20.0, 13.0, 8.0)


@dataclass
class Dataset:
    """Train/validation arrays on the backend. ``y`` is (n, 1) floats for regression and
    (n,) integer labels for classification."""

    name: str
    task: str              # "regression" or "classification"
    x_train: object
    y_train: object
    x_val: object
    y_val: object
    n_outputs: int         # q: 1 for regression, number of classes otherwise
    info: dict

    @property
    def d_x(self) -> int:
        return self.x_train.shape[1]

    def subset(self, n_train: int, n_val: int | None = None) -> "Dataset":
        """The first ``n_train`` training and ``n_val`` validation samples, on any backend
        (``x[:n, ...]``: the array API does not index a 2-D array with one slice).

        ``n_val`` left out is ``n_train``. Asking for more samples than a split holds is an error."""
        n_train = check_int("n_train", n_train, minimum=1, maximum=self.x_train.shape[0])
        if n_val is None and n_train > self.x_val.shape[0]:
            raise ValueError(f"n_val must be given (<= {self.x_val.shape[0]}): left out it is "
                             f"n_train = {n_train}, more than the {self.x_val.shape[0]} validation samples")
        n_val = n_train if n_val is None else n_val
        n_val = check_int("n_val", n_val, minimum=1, maximum=self.x_val.shape[0])
        take = lambda a, n: a[:n, ...] if a.ndim > 1 else a[:n]     # noqa: E731
        return replace(self, x_train=take(self.x_train, n_train), y_train=take(self.y_train, n_train),
                       x_val=take(self.x_val, n_val), y_val=take(self.y_val, n_val))


def synthetic(seed: int = 0, *, d: int = SYNTH_D, d_x: int = SYNTH_D_X, n: int = SYNTH_N,
              L_h: float = SYNTH_L_H, activation: str = "tanh", dtype: str = "float64",
              backend: Backend | None = None):
    """(layer, x, g): a seeded layer with ‖W‖₂ = L_h, inputs x (n, d_x), upstream g (n, d)."""
    seed, n = check_seed(seed), check_int("n", n, minimum=1)
    be = check_backend(backend)
    layer = Layer.random(d, d_x, activation, seed=seed, L_h=L_h, dtype=dtype, backend=be)
    rng = np.random.default_rng(seed + 1)
    x = be.asarray(rng.standard_normal((n, d_x)), dtype)
    g = be.asarray(rng.standard_normal((n, d)), dtype)
    return layer, x, g


def check_val_fraction(val_fraction, n: int) -> tuple:
    """``val_fraction`` in (0, 1) such that both splits of n samples are non-empty:
    returns (val_fraction, n_val) with n_val = round(val_fraction · n) in [1, n − 1]."""
    val_fraction = check_real("val_fraction", val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val <= n - 1:
        raise ValueError(f"val_fraction={val_fraction:g} of n={n} samples leaves an empty "
                         f"{'validation' if n_val < 1 else 'training'} split (n_val = {n_val}); "
                         "both splits need at least one sample")
    return val_fraction, n_val


def _split(x, y, seed, n_val, shuffle_seed_offset=1000):
    """A seeded permutation; the first n_val samples are the validation split.

    Written out rather than ``sklearn.model_selection.train_test_split`` (which would do the same
    in one call) because these draws are the ones every committed figure and claim was made
    with: another generator would move every trained number."""
    n = x.shape[0]
    perm = np.random.default_rng(seed + shuffle_seed_offset).permutation(n)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def heat_transfer_target(p: np.ndarray) -> np.ndarray:
    """tanh(x/(1 + e^{−y}) + y/(1 + x² + z²)) for points p (n, 3) = (x, y, z)   # (n,)"""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    return np.tanh(x / (1.0 + np.exp(-y)) + y / (1.0 + x ** 2 + z ** 2))


def heat_transfer(seed: int = 0, *, n: int = 3000, val_fraction: float = 0.2,
                  standardize: bool = False, dtype: str = "float64",
                  backend: Backend | None = None) -> Dataset:
    """The heat-transfer regression of the JFB report: 3,000 points, seeded 80/20 split.

    Inputs are the raw room coordinates, as in the report (which mentions no scaling);
    ``standardize=True`` centres and scales them with the training split's statistics.
    """
    seed, n = check_seed(seed), check_int("n", n, minimum=2)
    val_fraction, n_val = check_val_fraction(val_fraction, n)
    standardize, dtype = check_bool("standardize", standardize), check_choice("dtype", dtype, DTYPES)
    be = check_backend(backend)
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, size=(n, 3)) * np.array(ROOM)             # (n, 3)
    t = heat_transfer_target(p)[:, None]                                # (n, 1)
    xtr, ytr, xva, yva = _split(p, t, seed, n_val)
    if standardize:
        mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
        if not np.all(sd > 0):
            raise ValueError(f"standardize=True needs training inputs that vary, but n={n} with "
                             f"val_fraction={val_fraction:g} leaves {xtr.shape[0]} training sample(s), "
                             "whose standard deviation is 0 (use a larger n or standardize=False)")
        xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    return Dataset("heat_transfer", "regression", be.asarray(xtr, dtype), be.asarray(ytr, dtype),
                   be.asarray(xva, dtype), be.asarray(yva, dtype), 1,
                   {"n": n, "room": ROOM, "val_fraction": val_fraction, "standardize": standardize,
                    "seed": seed, "metric": "accuracy = |error| < 0.1"})


def digits(seed: int = 0, *, val_fraction: float = 0.2, dtype: str = "float64",
           backend: Backend | None = None) -> Dataset:
    """scikit-learn's bundled 8 × 8 digits: x (n, 64) in [0, 1], labels 0–9, seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("the digits data set needs scikit-learn (pip install scikit-learn)") from err
    seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
    be = check_backend(backend)
    bunch = load_digits()
    x = bunch.data.astype(np.float64) / 16.0                           # (1797, 64)
    y = bunch.target.astype(np.int64)                                   # (1797,)
    val_fraction, n_val = check_val_fraction(val_fraction, len(y))
    xtr, ytr, xva, yva = _split(x, y, seed, n_val)
    return Dataset("digits", "classification", be.asarray(xtr, dtype), be.from_host(ytr),
                   be.asarray(xva, dtype), be.from_host(yva), 10,
                   {"n": len(y), "val_fraction": val_fraction, "seed": seed, "metric": "accuracy"})
