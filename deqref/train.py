"""Training a DEQ: model, optimizers written out, and the training loop.

The model is ŷ = G(h*), h* = F(h*, x) with F(h, x) = σ(W h + U x + b) (the input is
injected through U x + b at every iteration) and the linear head G(h) = h Vᵀ + c. One step:

    forward:  h* = solve(F, x)                    any forward solver, by name
              h_out = output(estimator)           h* (h_k for UPG, Algorithm 1 of Geng et al.)
              L, ∂L/∂ŷ = loss(G(h_out), y)
    backward: ∂L/∂h, ∂L/∂V, ∂L/∂c = G's backward
              ∂L/∂θ ≈ estimate(estimator, ∂L/∂h)  any gradient estimator, by name
    update:   θ ← optimizer(θ, ∂L/∂θ)

Everything random is seeded by ``TrainConfig.seed``: the same seed gives the same numbers.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backend import DTYPES, backend_of, check_backend, check_seed, get_backend, namespace, to_numpy
from .checks import check_bool, check_choice, check_int, check_optional_int, check_real
from .gradients import ESTIMATORS, estimate, estimator_options, implicit_dense, output, shared_unrolls
from .gradients import base as gradient_base
from .heads import LinearHead, cross_entropy, mse
from .cell import check_cell
from .layers import Layer
from .solvers import SOLVERS, ConvergenceWarning, solve, solver_options
from .theory import cosine, epsilon

OPTIMIZERS = ("adam", "sgd")
TASKS = ("regression", "classification")


# ---------------------------------------------------------------- the model
class DEQModel:
    """An implicit cell and a linear head. Parameters: the cell's (``cell.PARAMS``; W, U, b for
    the dense ``Layer``) and the head's V, c, in one flat dict."""

    HEAD_PARAMS = ("V", "c")

    def __init__(self, layer, head: LinearHead):
        check_cell(layer)
        if not isinstance(head, LinearHead):
            raise TypeError(f"head must be a deqref.heads.LinearHead, got {type(head).__name__}")
        clash = sorted(set(layer.PARAMS) & set(self.HEAD_PARAMS))
        if clash:
            raise ValueError(f"layer: parameter name(s) {clash} are the head's; rename them")
        namespace(theta=layer.theta, V=head.V)   # one backend and one dtype for all parameters
        if head.d != layer.d:
            raise ValueError(f"head: expects d = {head.d} inputs but the layer has d = {layer.d}")
        self.layer, self.head = layer, head

    @classmethod
    def random(cls, d: int, d_x: int, q: int, activation: str = "tanh", *, seed: int,
               L_h: float = 0.9, dtype: str = "float64", backend=None) -> "DEQModel":
        seed = check_seed(seed)                  # the head's seed is seed + 7919
        be = check_backend(backend)
        return cls(Layer.random(d, d_x, activation, seed=seed, L_h=L_h, dtype=dtype, backend=be),
                   LinearHead.random(d, q, seed=seed + 7919, dtype=dtype, backend=be))

    def params(self) -> dict:
        return {**self.layer.params(), "V": self.head.V, "c": self.head.c}

    def set_params(self, p: dict) -> None:
        self.layer = self.layer.with_params({k: p[k] for k in self.layer.PARAMS})
        self.head = LinearHead(p["V"], p["c"])

    def save(self, path) -> None:
        """npz with W, U, b, V, c and the activation as a string array (no pickle); the dense
        ``Layer`` only."""
        if not isinstance(self.layer, Layer):
            raise TypeError(f"save: writes a model with a dense Layer, not a {type(self.layer).__name__}")
        arrays = {k: to_numpy(v) for k, v in self.params().items()}
        np.savez(path, activation=np.array(self.layer.activation), **arrays)

    @classmethod
    def load(cls, path, *, dtype: str | None = None, backend=None) -> "DEQModel":
        """Load what ``save`` wrote, bit for bit, with ``allow_pickle=False``."""
        be = check_backend(backend)
        if dtype is not None:
            check_choice("dtype", dtype, DTYPES)
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("activation", "W", "U", "b", "V", "c") if k not in f]
            if missing:
                raise KeyError(f"{path}: missing key(s) {missing}")
            dt = dtype or str(f["W"].dtype)
            p = {k: be.asarray(f[k], dt) for k in ("W", "U", "b", "V", "c")}
            activation = str(f["activation"])
        return cls(Layer(p["W"], p["U"], p["b"], activation), LinearHead(p["V"], p["c"]))


# ---------------------------------------------------------------- optimizers
class SGD:
    """θ ← θ − lr · v,  v ← μ v + ∇ (μ = momentum; μ = 0 is plain gradient descent)."""

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0):
        self.lr = check_real("lr", lr, lo=0, lo_open=True)
        self.momentum = check_real("momentum", momentum, lo=0, hi=1, hi_open=True)
        self.v = {}

    def step(self, params: dict, grads: dict) -> dict:
        out = {}
        for k, g in grads.items():
            v = self.momentum * self.v[k] + g if (self.momentum and k in self.v) else g
            self.v[k] = v
            out[k] = params[k] - self.lr * v
        return out


class Adam:
    """Adam (Kingma and Ba, 2015), bias-corrected:
    m ← β₁m + (1 − β₁)∇,  v ← β₂v + (1 − β₂)∇²,  θ ← θ − lr · m̂ / (√v̂ + ε)."""

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr = check_real("lr", lr, lo=0, lo_open=True)
        self.beta1 = check_real("beta1", beta1, lo=0, hi=1, hi_open=True)
        self.beta2 = check_real("beta2", beta2, lo=0, hi=1, hi_open=True)
        self.eps = check_real("eps", eps, lo=0, lo_open=True)      # m̂ / (√v̂ + ε) with v̂ = 0
        self.m, self.v, self.t = {}, {}, 0

    def step(self, params: dict, grads: dict) -> dict:
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        out = {}
        for k, g in grads.items():
            m = self.beta1 * self.m[k] + (1 - self.beta1) * g if k in self.m else (1 - self.beta1) * g
            v = self.beta2 * self.v[k] + (1 - self.beta2) * g * g if k in self.v else (1 - self.beta2) * g * g
            self.m[k], self.v[k] = m, v
            out[k] = params[k] - self.lr * (m / c1) / ((v / c2) ** 0.5 + self.eps)
        return out


# ---------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a run depends on. ``batch_size=None`` is full batch."""

    estimator: str = "implicit"
    estimator_options: dict = field(default_factory=dict)
    solver: str = "broyden"
    solver_options: dict = field(default_factory=lambda: {"tol": 1e-5, "max_iter": 50})
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    epochs: int = 10
    batch_size: int | None = 64
    seed: int = 0
    spectral_norm: float | None = None    # cell.project(this) after every update: ‖W‖₂ ≤ it for
                                          # the dense layer (None: off)
    track_cosine: bool = False            # cos(estimator's ∂L/∂θ, exact) at every step
    # {name: options}: cos(probe, exact) per step; "upg@k10" runs "upg" under its own label
    probes: dict = field(default_factory=dict)
    stop_loss: float | None = None        # stop after the first epoch with train_loss <= this
    label: str = ""                       # the progress bar's description, e.g. "jfb_batch b=64"
    quiet: bool = False                   # no progress bar

    def validate(self) -> None:
        """Check every field; each error is one line naming the field (``train`` calls this).

        Option *values* (``estimator_options``, ``solver_options``, ``probes``) are checked by the
        estimator and the solver themselves, on the first batch; their *names* are checked here.
        """
        _check_known("estimator", self.estimator, ESTIMATORS)
        _check_dict("estimator_options", self.estimator_options)
        _check_dict("probes", self.probes)
        for label, opts in [(self.estimator, self.estimator_options), *self.probes.items()]:
            if not isinstance(label, str):
                raise TypeError(f"probes: labels must be strings, got {label!r}")
            _check_dict(f"probes[{label!r}]", opts)
            name = label.split("@", 1)[0]
            if name not in ESTIMATORS:
                raise ValueError(f"probes: unknown estimator {label!r}; valid: {sorted(ESTIMATORS)}, "
                                 f"optionally with '@label'")
            bad = sorted(set(opts) - set(estimator_options(name)))
            if bad:
                raise TypeError(f"estimator_options: unknown option(s) {bad} for {name!r}; "
                                f"valid: {list(estimator_options(name))}")
        _check_known("solver", self.solver, SOLVERS)
        _check_dict("solver_options", self.solver_options)
        valid = [o for o in solver_options(self.solver) if o != "warn"]   # the trainer sets warn
        bad = sorted(set(self.solver_options) - set(valid))
        if bad:
            raise TypeError(f"solver_options: unknown option(s) {bad} for {self.solver!r}; valid: {valid}")
        self._check_unrolled_forward()
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_real("lr", self.lr, lo=0, lo_open=True)
        check_real("momentum", self.momentum, lo=0, hi=1, hi_open=True)
        check_int("epochs", self.epochs, minimum=1)
        check_optional_int("batch_size", self.batch_size, minimum=1)
        check_seed(self.seed)
        if self.spectral_norm is not None:
            check_real("spectral_norm", self.spectral_norm, lo=0, lo_open=True)
        check_bool("track_cosine", self.track_cosine)
        if self.stop_loss is not None:
            try:
                check_real("stop_loss", self.stop_loss, lo=0, lo_open=True)
            except ValueError as err:
                raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None
        if not isinstance(self.label, str):
            raise TypeError(f"label must be a str, got {type(self.label).__name__} {self.label!r:.40}")
        check_bool("quiet", self.quiet)

    def _check_unrolled_forward(self) -> None:
        """BPTT differentiates through the forward iterates: they must be fixed-point iterates
        (Eq. (13)) and kept (``return_trajectory``)."""
        kept = self.solver == "fixed_point" and self.solver_options.get("return_trajectory") is True
        for field_name, label in [("estimator", self.estimator), *(("probes", p) for p in self.probes)]:
            if label.split("@", 1)[0] == "bptt" and not kept:
                raise ValueError(f"{field_name}: {label!r} differentiates the forward iterates; it "
                                 "needs solver='fixed_point' and solver_options={'return_trajectory': "
                                 "True, ...}")


def _check_known(field_name: str, value, known: dict) -> None:
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"{field_name}: unknown {value!r}; valid: {sorted(known)}")


def _check_dict(field_name: str, value) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{field_name} must be a dict, got {type(value).__name__} {value!r:.40}")


# ---------------------------------------------------------------- the loop
def _progress(cfg: TrainConfig) -> tqdm:
    """One tqdm bar over the epochs of a run, on stderr, described by ``cfg.label``: off when
    ``cfg.quiet``, otherwise shown only when stderr is a terminal (``disable=None``)."""
    return tqdm(total=cfg.epochs, desc=cfg.label or None, unit="epoch", file=sys.stderr,
                disable=True if cfg.quiet else None, leave=False, dynamic_ncols=True)


def _cosine_or_none(a, b):
    """cos∠(a, b), or None where either gradient is exactly 0 (it has no direction: recorded as
    None, so a step whose exact gradient vanishes neither stops training nor records NaN)."""
    try:
        return cosine(a, b)
    except ValueError:
        return None


def _loss(task, y_hat, y):
    return mse(y_hat, y) if task == "regression" else cross_entropy(y_hat, y)


def _metric(task, y_hat, y) -> float:
    yh, yy = to_numpy(y_hat), to_numpy(y)
    if task == "regression":
        return float(np.mean(np.abs(yh - yy) < 0.1))                    # |error| < 0.1
    return float(np.mean(np.argmax(yh, axis=1) == yy))


def evaluate(model: DEQModel, x, y, task: str, cfg: TrainConfig) -> dict:
    """Loss and metric of the model at h* on (x, y), solved as in training.

    ``converged`` is the fraction of samples whose forward solve converged and ``unconverged``
    their number; the solver warns (``ConvergenceWarning``) when that number is not 0.
    """
    check_choice("task", task, TASKS)
    res = solve(model.layer, x, method=cfg.solver, warn=True, **cfg.solver_options)
    y_hat = model.head(res.h)
    loss, _ = _loss(task, y_hat, y)
    return {"loss": loss, "metric": _metric(task, y_hat, y), "iters": float(res.n_iter.mean()),
            "converged": float(res.converged.mean()), "unconverged": int((~res.converged).sum())}


class _Recorded:
    """Calls whose ``ConvergenceWarning``s are recorded instead of shown, so a run does not print
    one warning per batch; ``train`` counts them and warns once at the end. Every other warning
    is passed on, once per ``train`` call (the warnings module's own registries cannot do this:
    they are cleared whenever the filters change, as ``catch_warnings`` does). The user's
    filters still apply inside: ``warnings.simplefilter("error", ConvergenceWarning)`` stops
    training at the first one."""

    def __init__(self):
        self.passed_on = set()    # each other warning is passed on once per train() call

    def __call__(self, fn, *args, **kwargs):
        """``(fn(*args, **kwargs), [messages of the ConvergenceWarnings it issued]])``"""
        with warnings.catch_warnings(record=True) as caught:
            out = fn(*args, **kwargs)
        messages = []
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                messages.append(str(w.message))
            elif (key := (str(w.message), w.category, w.filename, w.lineno)) not in self.passed_on:
                self.passed_on.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, messages


# per-epoch convergence records of the history (see ``train``)
CONVERGENCE_KEYS = ("forward_unconverged", "forward_unconverged_batches", "estimator_flagged",
                    "estimator_flags", "probe_flagged", "val_unconverged")


def _flags(grad, warned: list, res) -> list:
    """The problems a gradient estimate reports beyond its forward solve: its ``flags`` (one
    line each), or the ``ConvergenceWarning``s it issued when it carries no flags, less the line
    that only repeats that the forward solve ``res`` did not converge (counted on its own)."""
    lines = list(getattr(grad, "flags", ()) or warned)
    forward_flag = getattr(gradient_base, "forward_flag", None)
    if forward_flag is not None and hasattr(grad, "name"):
        lines = [f for f in lines if f != forward_flag(grad.name, res)]
    return lines


def _not_finite(arrays: dict) -> list:
    """Names of the arrays that hold NaN or infinity."""
    return [k for k, a in arrays.items() if not bool(backend_of(a).xp.all(backend_of(a).xp.isfinite(a)))]


def _diverged(hist: dict, epoch: int, batch: int, what: str, cfg: TrainConfig) -> FloatingPointError:
    err = FloatingPointError(f"training diverged at epoch {epoch}, batch {batch}: {what} "
                             f"(estimator {cfg.estimator!r}, lr {cfg.lr:g}); training stopped, "
                             "the history of the finished epochs is on this error's .history")
    err.history = hist
    return err


def _check_data(model: DEQModel, data) -> None:
    """The data set fits the model: task, d_x, outputs, backend and dtype, non-empty splits."""
    if not isinstance(model, DEQModel):
        raise TypeError(f"model must be a deqref.train.DEQModel, got {type(model).__name__}")
    check_choice("data.task", getattr(data, "task", None), TASKS)
    namespace(theta=model.layer.theta, x_train=data.x_train, x_val=data.x_val)
    for name, x in (("data.x_train", data.x_train), ("data.x_val", data.x_val)):
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != model.layer.d_x:
            raise ValueError(f"{name} must have shape (n >= 1, {model.layer.d_x}) for this model "
                             f"(its layer's d_x), got {tuple(x.shape)}")
    if data.n_outputs != model.head.q:
        raise ValueError(f"data.n_outputs = {data.n_outputs} but the model's head has q = "
                         f"{model.head.q} outputs")


def _summary(hist: dict, cfg: TrainConfig, n_batches: int) -> str | None:
    """One line on every non-converged solve and flagged estimate of a run, or None."""
    parts = []

    def tally(key):
        v = hist[key]
        return sum(v), sum(1 for c in v if c)

    s, e = tally("forward_unconverged")
    run = hist["epochs_run"]
    if s:
        b, _ = tally("forward_unconverged_batches")
        parts.append(f"the forward solve ({cfg.solver}) did not converge for {s} sample(s) in {b} of "
                     f"{n_batches * run} batches, over {e} of {run} epoch(s)")
    b, e = tally("estimator_flagged")
    if b:
        first = hist["flag_examples"][0] if hist["flag_examples"] else ""
        parts.append(f"the estimator {cfg.estimator!r} was flagged in {b} batch(es) over {e} "
                     f"epoch(s) (first: {first})")
    b, e = tally("probe_flagged")
    if b:
        parts.append(f"the probes or the exact reference were flagged in {b} batch(es) over {e} "
                     "epoch(s)")
    s, e = tally("val_unconverged")
    if s:
        parts.append(f"on the validation set the forward solve did not converge for {s} sample(s) "
                     f"over {e} epoch(s)")
    if not parts:
        return None
    return ("train: " + "; ".join(parts) + ". Per-epoch counts: the history's "
            + ", ".join(CONVERGENCE_KEYS) + ".")


def train(model: DEQModel, data, cfg: TrainConfig) -> dict:
    """Train ``model`` on ``data`` (a ``deqref.data.Dataset``) in place; return the history.

    The history holds, per epoch: train_loss (sample-weighted mean over the epoch's
    batches), train_metric, val_loss, val_metric, time_forward, time_backward, time_epoch
    (forward + backward + update; evaluation and probes are not timed), forward_iters,
    forward_converged (the fraction of training samples whose forward solve converged); and
    per step (when asked) the cosine to the exact gradient (``step_cosine``), Theorem 3's
    ε = ‖estimate − exact‖ (``step_epsilon``) and the probes' cosines (``probe_cosine``).
    "Exact" is the dense implicit gradient at h* for the same batch, with ∂L/∂h taken at h*.

    Convergence is recorded, not assumed. Per epoch (integers):

    - ``forward_unconverged``: training samples whose forward solve did not converge (summed
      over the epoch's batches); ``forward_unconverged_batches``: batches with at least one;
    - ``estimator_flagged``: batches whose gradient estimate was flagged (``Gradient.flags``
      not empty, or a ``ConvergenceWarning`` from ``output``/``estimate``), e.g. an adjoint
      solve that did not converge; ``estimator_flags``: the number of flag lines. The flag
      that only repeats that the batch's forward solve did not converge is not counted here
      (``forward_unconverged`` has it);
    - ``probe_flagged``: batches in which a probe or the exact reference (``track_cosine``)
      was flagged;
    - ``val_unconverged``: validation samples whose forward solve did not converge;

    and ``flag_examples``: the first few distinct flag lines of the run. The solvers' and
    estimators' ``ConvergenceWarning``s are recorded, not shown, during the run; if any count
    is not 0, ``train`` ends with ONE ``ConvergenceWarning`` that sums them up. Warning filters
    still apply: under ``warnings.simplefilter("error", deqref.ConvergenceWarning)`` training
    stops with the first one.

    Training runs ``cfg.epochs`` epochs, or stops after the first epoch whose ``train_loss`` is
    at or below ``cfg.stop_loss`` (when set); the per-epoch lists then end with that epoch. The
    history's ``epochs_run`` is the number of epochs run and ``stopped_at_target`` whether the
    run stopped at ``stop_loss``.

    Progress: one tqdm bar over the epochs on stderr, described by ``cfg.label``, with tqdm's
    time-left estimate and the latest train_loss and val_metric. It is off when ``cfg.quiet``
    and otherwise shown only when stderr is a terminal; it is removed when the run ends.

    A non-finite output h or prediction, a non-finite loss, a non-finite gradient estimate (the
    estimator's ``FloatingPointError``) or non-finite updated parameters stop training with a ``FloatingPointError`` naming the
    epoch, the batch and what is not finite; the history of the finished epochs is on the
    error's ``history`` attribute. Training never goes on with NaN.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a deqref.train.TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    _check_data(model, data)
    task = data.task
    n = data.x_train.shape[0]
    bs = n if cfg.batch_size is None else min(cfg.batch_size, n)
    n_batches = math.ceil(n / bs)
    opt = Adam(cfg.lr) if cfg.optimizer == "adam" else SGD(cfg.lr, cfg.momentum)
    rng = np.random.default_rng(cfg.seed + 104729)
    be = get_backend()
    hist = {k: [] for k in ("train_loss", "train_metric", "val_loss", "val_metric", "time_forward",
                            "time_backward", "time_epoch", "forward_iters", "forward_converged",
                            "cosine_mean", *CONVERGENCE_KEYS)}
    hist["flag_examples"] = []
    hist["step_cosine"], hist["step_epsilon"] = [], []
    hist["probe_cosine"] = {name: [] for name in cfg.probes}
    hist["config"] = asdict(cfg)
    hist["epochs_run"], hist["stopped_at_target"] = 0, False
    recorded = _Recorded()
    # shared_unrolls: UPG's k steps from h* are taken once per batch, for h_out and for the
    # estimate (the layer is replaced, never changed, after both)
    with _progress(cfg) as bar, shared_unrolls():   # closed also when training stops on an error
        for epoch in range(cfg.epochs):
            perm = be.from_host(rng.permutation(n)) if bs < n else None
            t_fwd = t_bwd = t_upd = 0.0
            loss_sum = metric_sum = iters = conv = 0.0
            cos_epoch = []
            count = dict.fromkeys(CONVERGENCE_KEYS, 0)
            for i in range(n_batches):
                if perm is None:
                    xb, yb = data.x_train, data.y_train
                else:
                    idx = perm[i * bs:min((i + 1) * bs, n)]          # the array API forbids stop > n
                    xb, yb = be.xp.take(data.x_train, idx, axis=0), be.xp.take(data.y_train, idx, axis=0)
                m = xb.shape[0]
                layer, head = model.layer, model.head
                t0 = time.perf_counter()
                res, _ = recorded(solve, layer, xb, method=cfg.solver, warn=True, **cfg.solver_options)
                h_out, warned = recorded(output, cfg.estimator, layer, xb, res, **cfg.estimator_options)
                if _not_finite({"h": h_out}):
                    raise _diverged(hist, epoch, i, f"the {cfg.estimator} output h is not finite", cfg)
                y_hat = head(h_out)
                if _not_finite({"y_hat": y_hat}):
                    raise _diverged(hist, epoch, i, "the predictions G(h) are not finite", cfg)
                loss, dy = _loss(task, y_hat, yb)
                t1 = time.perf_counter()
                if not math.isfinite(loss):
                    raise _diverged(hist, epoch, i, f"the loss is not finite ({loss})", cfg)
                dh, head_grads = head.backward(h_out, dy)
                try:
                    est, warned_est = recorded(estimate, cfg.estimator, layer, xb, res, dh,
                                               **cfg.estimator_options)
                except FloatingPointError as err:                     # a non-finite estimate
                    raise _diverged(hist, epoch, i, str(err), cfg) from err
                t2 = time.perf_counter()
                grads = {**est.grads, **head_grads}
                new = opt.step(model.params(), grads)
                t3 = time.perf_counter()
                bad = _not_finite(new)                                 # not timed
                if bad:
                    raise _diverged(hist, epoch, i, f"the updated parameter(s) {bad} are not finite", cfg)
                if cfg.spectral_norm is not None:            # the cell's well-posedness projection
                    t_proj = time.perf_counter()
                    cell = layer.with_params({k: new[k] for k in layer.PARAMS}).project(cfg.spectral_norm)
                    new.update(cell.params())
                    t3 += time.perf_counter() - t_proj
                flags = _flags(est, warned + warned_est, res)
                unconverged = int((~res.converged).sum())
                count["forward_unconverged"] += unconverged
                count["forward_unconverged_batches"] += int(unconverged > 0)
                count["estimator_flagged"] += int(bool(flags))
                count["estimator_flags"] += len(flags)
                for line in flags:
                    if len(hist["flag_examples"]) < 5 and line not in hist["flag_examples"]:
                        hist["flag_examples"].append(line)
                if cfg.track_cosine or cfg.probes:                    # not timed
                    dh_star, _ = head.backward(res.h, _loss(task, head(res.h), yb)[1])
                    exact, warned_probe = recorded(implicit_dense, layer, xb, res.h, dh_star)
                    flagged = bool(_flags(exact, warned_probe, res))
                    if cfg.track_cosine:
                        c = _cosine_or_none(est.theta, exact.theta)
                        hist["step_cosine"].append(c)
                        hist["step_epsilon"].append(epsilon(est.theta, exact.theta))   # Theorem 3's ε
                        if c is not None:
                            cos_epoch.append(c)
                    for label, opts in cfg.probes.items():
                        probe, warned_probe = recorded(estimate, label.split("@", 1)[0], layer, xb, res,
                                                       dh_star, **opts)
                        flagged = flagged or bool(_flags(probe, warned_probe, res))
                        hist["probe_cosine"][label].append(_cosine_or_none(probe.theta, exact.theta))
                    count["probe_flagged"] += int(flagged)
                model.set_params(new)
                t_fwd, t_bwd, t_upd = t_fwd + t1 - t0, t_bwd + t2 - t1, t_upd + t3 - t2
                loss_sum += loss * m
                metric_sum += _metric(task, y_hat, yb) * m
                iters += float(res.n_iter.mean()) * m
                conv += float(res.converged.mean()) * m
            val, _ = recorded(evaluate, model, data.x_val, data.y_val, task, cfg)
            count["val_unconverged"] = val["unconverged"]
            for k, v in (("train_loss", loss_sum / n), ("train_metric", metric_sum / n),
                         ("val_loss", val["loss"]), ("val_metric", val["metric"]),
                         ("time_forward", t_fwd), ("time_backward", t_bwd),
                         ("time_epoch", t_fwd + t_bwd + t_upd), ("forward_iters", iters / n),
                         ("forward_converged", conv / n),
                         ("cosine_mean", float(np.mean(cos_epoch)) if cos_epoch else None),
                         *count.items()):
                hist[k].append(v)
            hist["epochs_run"] = epoch + 1
            if not all(np.isfinite([loss_sum, val["loss"]])):
                raise _diverged(hist, epoch, n_batches - 1, "the validation loss is not finite", cfg)
            bar.set_postfix_str(f"loss {hist['train_loss'][-1]:.4g}, val metric {val['metric']:.3f}",
                                refresh=False)
            bar.update(1)
            if cfg.stop_loss is not None and hist["train_loss"][-1] <= cfg.stop_loss:
                hist["stopped_at_target"] = True
                break
    summary = _summary(hist, cfg, n_batches)
    if summary:
        warnings.warn(summary, ConvergenceWarning, stacklevel=2)
    return hist


def save_history(hist: dict, path) -> None:
    """Write a history as JSON."""
    Path(path).write_text(json.dumps(hist, indent=1))
