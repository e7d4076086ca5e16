"""Golden reference files and checking another implementation's gradients against deqref.

The interchange format (one ``.npz`` file, float64, nothing that needs pickle) describes one
layer ``F(h, x) = σ(W h + U x + b)`` per sample — ``σ(h Wᵀ + x Uᵀ + b)`` for row-batched
``h``, the ``torch.nn.Linear`` (out, in) convention — one batch, one upstream gradient
``g = ∂L/∂h`` and, per estimator, the estimate ``A g`` of Eq. (5) of [1]:

=========================  ============  ==================================================
key                        shape         meaning
=========================  ============  ==================================================
``activation``             ()  str       ``"tanh"``, ``"relu"``, ``"softplus"``, ``"identity"``
``W``                      (d, d)        recurrent weight (``nn.Linear(d, d).weight``)
``U``                      (d, d_x)      input weight (``nn.Linear(d_x, d).weight``)
``b``                      (d,)          bias
``x``                      (n, d_x)      inputs, one row per sample
``grad_h``                 (n, d)        the upstream gradient g = ∂L/∂h, one row per sample
``h_star``                 (n, d)        the fixed point (golden: ‖F(h*) − h*‖₂ < 1e-12 per row)
``<name>__grad_W``         (d, d)        A g for W, summed over the batch
``<name>__grad_U``         (d, d_x)      A g for U, summed over the batch
``<name>__grad_b``         (d,)          A g for b, summed over the batch
``<name>__grad_x``         (n, d_x)      A_x g for x, per sample
``gdeq__B_inv``            (n, d, d)     per sample the dense inverse estimate B_T⁻¹ of Broyden
``format_version``         ()  int       1 (optional in a user's file)
=========================  ============  ==================================================

Estimator names ``<name>`` and what ``A g`` means for each (paper's layout, ∂F/∂· = J_·ᵀ):

- ``implicit``: ``∂F/∂θ|_{h*} (I − ∂F/∂h|_{h*})⁻¹ g`` (Eq. 4), by a dense solve.
- ``jfb``: ``∂F/∂θ|_{h*} g``.
- ``npg_k<k>_lam<λ>``: ``λ ∂F/∂θ|_{h*} (I + B + ⋯ + B^{k−1}) g``, ``B = λ ∂F/∂h|_{h*} + (1 − λ) I``
  (Eq. 18).
- ``upg_k<k>_lam<λ>``: k damped steps ``h_{t+1} = λ F(h_t) + (1 − λ) h_t`` from ``h_0 = h*``;
  ``A g`` is reverse-mode autodiff of ``h_k`` with respect to θ (and x) applied to ``g``
  (Eq. 17, Algorithm 1). In Algorithm 1 the loss is taken at ``h_k``; here ``g`` is given,
  so ``A g`` is well defined whatever ``g`` is — treat it as ``∂L/∂h_k``.
- ``bptt_T<T>``: T steps of *plain* iteration ``h_{t+1} = F(h_t)`` from ``h_0 = 0`` (no
  early stopping, no damping); ``A g`` is reverse-mode autodiff of ``h_T`` applied to ``g``
  (Eq. 11). ``h_star`` plays no part in it; ``g`` is treated as ``∂L/∂h_T``.
- ``gdeq``: ``−∂F/∂θ|_{h*} (B_T⁻¹)ᵀ g`` with ``B_T⁻¹`` the file's ``gdeq__B_inv`` (the
  standard-layout inverse estimate of Broyden on ``F(h) − h``, so ``B_T⁻¹ ≈ −(I − J_h)⁻¹``;
  see ``deqref.gradients.broyden_reuse``).

λ is written with Python's ``format(λ, "g")`` (``upg_k5_lam0.5``, ``npg_k10_lam1``) and read
back with ``float``. The string array ``activation`` is a NumPy unicode array, so
``np.load(path, allow_pickle=False)`` reads every file.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import use_backend
from .gradients import estimate
from .layers import ACTIVATIONS, Layer
from .solvers import DenseInverse, solve

FORMAT_VERSION = 1
# A golden h* must satisfy ‖F(h*) − h*‖₂ < RESIDUAL_MAX per sample (the contract).
RESIDUAL_MAX = 1e-12
PARAMS = ("W", "U", "b", "x")
_NAME_RE = re.compile(r"^(?:(implicit|jfb|gdeq)|(upg|npg)_k([0-9]+)_lam([0-9.eE+-]+)|bptt_T([0-9]+))$")
NAME_FORMS = "implicit, jfb, gdeq, upg_k<k>_lam<λ>, npg_k<k>_lam<λ>, bptt_T<T>"


class CrosscheckError(ValueError):
    """A crosscheck file is malformed; the message names the key and what was expected."""


# ------------------------------------------------------------------ estimator names
def estimator_name(kind: str, *, k: int | None = None, lam: float | None = None,
                   T: int | None = None) -> str:
    """The file name of an estimator: ``estimator_name("upg", k=5, lam=0.5) == "upg_k5_lam0.5"``."""
    if kind in ("upg", "npg"):
        return f"{kind}_k{int(k)}_lam{format(float(lam), 'g')}"
    if kind == "bptt":
        return f"bptt_T{int(T)}"
    if kind in ("implicit", "jfb", "gdeq"):
        return kind
    raise ValueError(f"kind must be one of implicit, jfb, gdeq, upg, npg, bptt; got {kind!r}")


def parse_estimator(name: str) -> tuple[str, dict]:
    """``"upg_k5_lam0.5"`` → ``("upg", {"k": 5, "lam": 0.5})``; raises naming the valid forms."""
    m = _NAME_RE.match(name)
    if m is None:
        raise CrosscheckError(f"unknown estimator name {name!r}; expected one of: {NAME_FORMS}")
    plain, kind, k, lam, T = m.groups()
    if plain:
        return plain, {}
    if kind:
        try:
            lam_f = float(lam)
        except ValueError:
            raise CrosscheckError(f"estimator {name!r}: λ {lam!r} is not a number") from None
        if not (0 < lam_f <= 1) or int(k) < 1:
            raise CrosscheckError(f"estimator {name!r}: expected k >= 1 and λ in (0, 1]")
        return kind, {"k": int(k), "lam": lam_f}
    if int(T) < 1:
        raise CrosscheckError(f"estimator {name!r}: expected T >= 1")
    return "bptt", {"T": int(T)}


# ------------------------------------------------------------------ deqref's side
def solve_tight(layer: Layer, x):
    """h* by dense Broyden from h_0 = 0 to ‖F(h*) − h*‖₂ < ``RESIDUAL_MAX`` per sample.

    Returns the solver result (its ``B_inv`` is the dense B_T⁻¹ GDEQ reuses). Raises when
    the residual is not reached (F is probably not contractive on this input).
    """
    # atol two decades under the contract leaves room for the float64 rounding floor
    # (‖F(h) − h‖ ≈ √d · eps ≈ 1e-15 for |h| = O(1), d ≤ 32).
    res = solve(layer, x, method="broyden", form="dense", tol=0.0, atol=RESIDUAL_MAX / 100,
                max_iter=200, stall_iter=None, warn=False)
    r = res.final_abs_residual
    if not np.all(r < RESIDUAL_MAX):
        # Broyden may stall in the last digits (skipped updates); plain iteration polishes.
        fp = solve(layer, x, res.h, method="fixed_point", tol=0.0, atol=RESIDUAL_MAX / 100,
                   max_iter=2000, warn=False)
        if not np.all(fp.final_abs_residual < RESIDUAL_MAX):
            raise CrosscheckError(
                f"forward solve: residual ‖F(h) − h‖ = {fp.final_abs_residual.max():.2e} did not "
                f"reach {RESIDUAL_MAX:g}; is F contractive (‖W‖₂ · max|σ'| < 1)?")
        res.h = fp.h
        res.abs_residual = fp.abs_residual
    return res


def reference_gradient(layer: Layer, x, grad_h, kind: str, options: dict, result,
                       B_inv=None) -> dict:
    """deqref's A g for one estimator, as ``{"W", "U", "b", "x"}`` host float64 arrays.

    ``result`` is the tight solve of ``solve_tight`` (its ``h`` is h*); ``B_inv`` (n, d, d)
    replaces the result's Broyden inverse for ``gdeq`` when given.
    """
    if kind == "bptt":
        traj = solve(layer, x, method="fixed_point", tol=0.0, atol=0.0, max_iter=options["T"],
                     warn=False, return_trajectory=True)
        est = estimate("bptt", layer, x, traj, grad_h)
    elif kind == "gdeq":
        if B_inv is not None:
            dense = DenseInverse(np, *B_inv.shape[:2], np.float64)
            dense.B_inv = np.asarray(B_inv, dtype=np.float64)
            result = _with_B_inv(result, dense)
        est = estimate("gdeq", layer, x, result, grad_h)
    elif kind == "implicit":
        est = estimate("implicit_dense", layer, x, result, grad_h)
    else:
        est = estimate(kind, layer, x, result, grad_h, **options)
    return {"W": est.W, "U": est.U, "b": est.b, "x": est.x}


def _with_B_inv(result, B_inv):
    from dataclasses import replace
    return replace(result, B_inv=B_inv, extra={})


# ------------------------------------------------------------------ golden files
# (activation, d, d_x, n, seed): several activations, d ≤ 32, batch ≤ 4.
GOLDEN_CASES = (("tanh", 8, 5, 3, 101), ("relu", 16, 6, 4, 102), ("softplus", 32, 4, 2, 103))
GOLDEN_ESTIMATORS = (("implicit", {}), ("jfb", {}), ("upg", {"k": 5, "lam": 0.5}),
                     ("upg", {"k": 1, "lam": 1.0}), ("npg", {"k": 5, "lam": 0.5}),
                     ("npg", {"k": 10, "lam": 1.0}), ("bptt", {"T": 30}), ("gdeq", {}))


def golden_arrays(activation: str, d: int, d_x: int, n: int, seed: int) -> dict:
    """The arrays of one golden file (see the module docstring for the format)."""
    # ‖W‖₂ = 0.8 and |σ'| ≤ 1 for these activations: F is a contraction in h.
    # Golden files are host data: build them with NumPy whatever backend is selected.
    with use_backend("numpy"):
        layer = Layer.random(d, d_x, activation, seed=seed, L_h=0.8)
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n, d_x))                                   # (n, d_x)
    grad_h = rng.standard_normal((n, d))                                # (n, d)
    res = solve_tight(layer, x)
    out = {"format_version": np.array(FORMAT_VERSION), "activation": np.array(activation),
           "W": layer.W, "U": layer.U, "b": layer.b, "x": x, "h_star": res.h, "grad_h": grad_h,
           "gdeq__B_inv": res.B_inv.dense()}
    for kind, opts in GOLDEN_ESTIMATORS:
        name = estimator_name(kind, **opts)
        grads = reference_gradient(layer, x, grad_h, kind, opts, res)
        for p in PARAMS:
            out[f"{name}__grad_{p}"] = np.asarray(grads[p], dtype=np.float64)
    return out


def write_golden(out: Path) -> list[Path]:
    """Write the golden files into ``out`` (created if needed); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for activation, d, d_x, n, seed in GOLDEN_CASES:
        path = out / f"golden_{activation}_d{d}.npz"
        np.savez(path, **golden_arrays(activation, d, d_x, n, seed))
        paths.append(path)
    return paths


# ------------------------------------------------------------------ reading a user's file
@dataclass
class CrosscheckInput:
    activation: str
    W: np.ndarray
    U: np.ndarray
    b: np.ndarray
    x: np.ndarray
    grad_h: np.ndarray
    h_star: np.ndarray | None
    B_inv: np.ndarray | None
    theirs: dict          # estimator name -> {param: array}
    notes: list


def _array(data, key, shape, notes):
    """data[key] as float64, checked against ``shape`` (ints; None = any)."""
    if key not in data:
        raise CrosscheckError(f"missing key {key!r}: expected an array of shape "
                              f"{_shape_str(shape)}")
    a = data[key]
    if not np.issubdtype(a.dtype, np.floating):
        raise CrosscheckError(f"key {key!r}: expected a floating-point array, got dtype {a.dtype}")
    if a.dtype != np.float64:
        notes.append(f"{key} is {a.dtype}: compared in float64; pick --tol for {a.dtype}")
    if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        raise CrosscheckError(f"key {key!r}: expected shape {_shape_str(shape)}, got {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise CrosscheckError(f"key {key!r}: contains NaN or inf")
    return a


def _shape_str(shape):
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def load_input(path: Path) -> CrosscheckInput:
    """Read and validate a crosscheck file; raise ``CrosscheckError`` naming the bad key."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CrosscheckError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise CrosscheckError(f"{path}: not a readable .npz file without pickle ({e})") from None
    try:
        data = {}
        for key in npz.files:
            try:
                data[key] = npz[key]
            except ValueError:
                raise CrosscheckError(f"key {key!r}: needs pickle to load (an object array); "
                                      f"store plain numeric / string arrays") from None
    finally:
        npz.close()
    notes = []
    if "activation" not in data:
        raise CrosscheckError(f"missing key 'activation': expected a string array, one of "
                              f"{sorted(ACTIVATIONS)}")
    act = data["activation"]
    if act.dtype.kind not in "US" or act.size != 1:
        raise CrosscheckError(f"key 'activation': expected a single string, one of "
                              f"{sorted(ACTIVATIONS)}; got dtype {act.dtype}, shape {act.shape}")
    activation = str(act.reshape(()).item())
    if isinstance(act.reshape(()).item(), bytes):
        activation = act.reshape(()).item().decode()
    if activation not in ACTIVATIONS:
        raise CrosscheckError(f"key 'activation': expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    W = _array(data, "W", (None, None), notes)
    d = W.shape[0]
    if W.shape != (d, d):
        raise CrosscheckError(f"key 'W': expected a square (d, d) array, got {W.shape}")
    U = _array(data, "U", (d, None), notes)
    d_x = U.shape[1]
    b = _array(data, "b", (d,), notes)
    x = _array(data, "x", (None, d_x), notes)
    n = x.shape[0]
    grad_h = _array(data, "grad_h", (n, d), notes)
    h_star = _array(data, "h_star", (n, d), notes) if "h_star" in data else None
    if "format_version" in data and int(data["format_version"]) != FORMAT_VERSION:
        raise CrosscheckError(f"key 'format_version': expected {FORMAT_VERSION}, "
                              f"got {data['format_version']!r}")
    shapes = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x)}
    known = {"activation", "W", "U", "b", "x", "grad_h", "h_star", "format_version", "gdeq__B_inv"}
    theirs: dict = {}
    for key in sorted(data):
        if key in known:
            continue
        name, sep, what = key.partition("__")
        if not sep:
            raise CrosscheckError(f"unknown key {key!r}; expected 'activation', 'W', 'U', 'b', 'x', "
                                  f"'grad_h', 'h_star', 'format_version' or '<estimator>__grad_<W|U|b|x>'")
        parse_estimator(name)
        param = what[len("grad_"):] if what.startswith("grad_") else None
        if param not in shapes:
            raise CrosscheckError(f"unknown key {key!r}; expected '{name}__grad_W', '{name}__grad_U', "
                                  f"'{name}__grad_b' or '{name}__grad_x'")
        theirs.setdefault(name, {})[param] = _array(data, key, shapes[param], notes)
    if not theirs:
        raise CrosscheckError("no gradients found: expected keys '<estimator>__grad_<W|U|b|x>' "
                              f"with <estimator> one of: {NAME_FORMS}")
    B_inv = None
    if "gdeq" in theirs:
        if "gdeq__B_inv" not in data:
            raise CrosscheckError("missing key 'gdeq__B_inv': gdeq gradients need the (n, d, d) "
                                  "Broyden inverse estimate B_T⁻¹ they were computed from")
        B_inv = _array(data, "gdeq__B_inv", (n, d, d), notes)
    return CrosscheckInput(activation, W, U, b, x, grad_h, h_star, B_inv, theirs, notes)


# ------------------------------------------------------------------ comparing
def compare(mine, theirs) -> tuple[float, float | None]:
    """(relative error ‖theirs − mine‖ / ‖mine‖, cosine) in the Frobenius norm.

    The relative error falls back to the absolute error when deqref's array is exactly 0;
    the cosine is None when either array is 0.
    """
    mine, theirs = np.ravel(mine), np.ravel(theirs)
    n_mine, n_theirs = np.linalg.norm(mine), np.linalg.norm(theirs)
    err = np.linalg.norm(theirs - mine) / (n_mine if n_mine > 0 else 1.0)
    cos = float(mine @ theirs / (n_mine * n_theirs)) if n_mine > 0 and n_theirs > 0 else None
    return float(err), cos


def crosscheck(inp: CrosscheckInput) -> list[dict]:
    """Recompute every estimator in ``inp`` with deqref; one row per (estimator, parameter)."""
    layer = Layer(inp.W, inp.U, inp.b, inp.activation)
    res = solve_tight(layer, inp.x)
    rows = []
    for name, grads in inp.theirs.items():
        kind, opts = parse_estimator(name)
        mine = reference_gradient(layer, inp.x, inp.grad_h, kind, opts, res, B_inv=inp.B_inv)
        for p in [q for q in PARAMS if q in grads]:
            theirs = grads[p]
            err, cos = compare(mine[p], theirs)
            rows.append({"estimator": name, "param": p, "rel_err": err, "cosine": cos,
                         "max_abs": float(np.max(np.abs(np.asarray(mine[p]) - theirs)))})
    return rows


def format_table(rows: list[dict], tol: float) -> str:
    lines = [f"{'estimator':18s} {'param':5s} {'rel. error':>11s} {'cosine':>18s} "
             f"{'max |diff|':>11s}  verdict (tol {tol:g})"]
    for r in rows:
        cos = "n/a" if r["cosine"] is None else f"{r['cosine']:.15f}"
        ok = "ok" if r["rel_err"] <= tol else "DIFFERS"
        lines.append(f"{r['estimator']:18s} {r['param']:5s} {r['rel_err']:11.3e} {cos:>18s} "
                     f"{r['max_abs']:11.3e}  {ok}")
    return "\n".join(lines)


def crosscheck_file(path: Path, tol: float) -> int:
    """Check the gradients in ``path`` against deqref; print a table; exit code.

    0: every relative error ≤ ``tol``; 1: some exceed it; 2: the file is malformed
    (the message names the key and what was expected).
    """
    if not (np.isfinite(tol) and tol > 0):
        print(f"deqref crosscheck: error: --tol must be a finite number > 0, got {tol!r}", file=sys.stderr)
        return 2
    try:
        inp = load_input(Path(path))
        rows = crosscheck(inp)
    except CrosscheckError as e:
        print(f"deqref crosscheck: error: {path}: {e}", file=sys.stderr)
        return 2
    layer = Layer(inp.W, inp.U, inp.b, inp.activation)
    n, d = inp.grad_h.shape
    print(f"{path}: activation {inp.activation}, d = {d}, d_x = {inp.U.shape[1]}, n = {n}; "
          f"deqref's h* solved to ‖F(h*) − h*‖ < {RESIDUAL_MAX:g}")
    if inp.h_star is not None:
        r = np.linalg.norm(layer(inp.h_star, inp.x) - inp.h_star, axis=1).max()
        print(f"  your h_star: max residual ‖F(h) − h‖ = {r:.2e}")
    for note in inp.notes:
        print(f"  note: {note}")
    print(format_table(rows, tol))
    bad = [r for r in rows if r["rel_err"] > tol]
    worst = max(rows, key=lambda r: r["rel_err"])
    if bad:
        print(f"VERDICT: DIFFERS — {len(bad)} of {len(rows)} gradients exceed tol {tol:g} "
              f"(worst: {worst['estimator']} {worst['param']}, {worst['rel_err']:.2e})")
        return 1
    print(f"VERDICT: AGREE — all {len(rows)} gradients within tol {tol:g} "
          f"(worst: {worst['estimator']} {worst['param']}, {worst['rel_err']:.2e})")
    return 0
