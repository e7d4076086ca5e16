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
``format_version``         ()  int       1 or 2 (optional in a format-1 file; absent = 1)
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
  ``bptt_T<T>_lam<λ>``: the same through T damped steps ``h_{t+1} = λ F(h_t) + (1 − λ) h_t``.
- ``gdeq``: ``−∂F/∂θ|_{h*} (B_T⁻¹)ᵀ g`` with ``B_T⁻¹`` the file's ``gdeq__B_inv`` (the
  standard-layout inverse estimate of Broyden on ``F(h) − h``, so ``B_T⁻¹ ≈ −(I − J_h)⁻¹``;
  see ``deqref.gradients.broyden_reuse``).

λ is written with Python's ``format(λ, "g")`` (``upg_k5_lam0.5``, ``npg_k10_lam1``) and read
back with ``float``. The string array ``activation`` is a NumPy unicode array, so
``np.load(path, allow_pickle=False)`` reads every file.

Format 2: files that describe themselves
----------------------------------------
A file with ``format_version = 2`` carries every convention its values depend on, as plain
numbers and strings (the full table, with examples, is in ``docs/crosscheck.md``):

- per file: ``cell`` (``"affine"``: the F above) and ``cell_description``; ``layout_W``,
  ``layout_U``, ``layout_batch`` and, with ``gdeq``, ``layout_B_inv`` (strings that start
  with a code — ``"out_in:"``, ``"out_in:"``, ``"rows:"``, ``"standard:"`` — followed by
  what it means); ``sigma_prime_at_kink`` (0.0: ReLU's σ′(0)); optional ``deqref_version``,
  ``seed``, ``h_star_residual`` (n,), and ``h_eval`` (n, d), the inexact point phantom
  estimators may be evaluated at, with ``h_eval_steps`` and ``h_eval_residual`` (n,);
- per estimator: ``<name>__kind`` (``"upg"``, …), ``<name>__k``, ``<name>__lam``,
  ``<name>__T`` as numbers (the numbers are used; the name must be ``format(λ, "g")`` of
  them), ``<name>__start`` (``"h_star"``, ``"h_eval"`` or ``"zeros"``: the state h_0 the
  estimator is evaluated at, or its unroll starts from) and ``<name>__loss_at`` (the state
  ``g`` is ∂L/∂ of: ``"h_k"`` for UPG, ``"h_T"`` for BPTT, the start otherwise).

Writing a file: ``torch_params`` (``nn.Linear`` modules) or ``jax_params`` (a parameter dict,
either layout) map a model onto ``W``, ``U``, ``b``; ``write_crosscheck_file`` adds the
conventions, checks shapes and, given ``h_star``, that it is a fixed point of the mapped layer
(so a transposed W is named). Worked examples: ``docs/crosscheck.md``.

Where an estimator may start: ``implicit`` and ``gdeq`` at ``h_star`` (deqref's own tight
h*); ``jfb``, ``npg`` and ``upg`` at ``h_star`` or ``h_eval`` (the file's array, as given);
``bptt`` at ``zeros``. A format-2 key in a format-1 file, a missing one in a format-2 file,
a number that disagrees with its name or a convention deqref does not compute is refused.

What ``deqref crosscheck`` refuses
----------------------------------
Key names are commands (``bptt_T<T>`` runs T steps) and ``.npy`` headers are claims, so a file
is read in two passes. The first reads only the zip archive's directory and each member's
``.npy`` header — no array data is decompressed — and checks every key name, dtype and shape
against the table above and these bounds; only a file that passes is loaded:

============================  ==========================  ========================================
what                          bound                       why
============================  ==========================  ========================================
d (from ``W``)                1 ≤ d ≤ 4096                ``D_MAX``: one sample's dense B⁻¹ is
                                                          then 128 MiB
n (from ``x``)                1 ≤ n ≤ 100000              ``N_MAX``
d_x (from ``U``)              ≥ 1
n · d²                        ≤ 2²⁴ = 16,777,216          ``DENSE_MAX``: the reference is dense
                                                          (Broyden's B⁻¹, I − ∂F/∂h: (n, d, d))
all arrays, by their headers  ≤ 2²⁸ B = 256 MiB           ``BYTES_MAX``
archive members               ≤ 1024                      ``MEMBERS_MAX``
k of ``npg_k…``, ``upg_k…``   1 ≤ k ≤ 1000                ``K_MAX``
T of ``bptt_T…``              1 ≤ T ≤ 10000               ``T_MAX``
k · n · d (UPG), T · n · d    ≤ 2²⁴ = 16,777,216          ``STATES_MAX``: every unrolled state is
(BPTT)                                                    kept for the backward pass (128 MiB)
Σ steps · n · d² over the     ≤ 2³² ≈ 4.3e9               ``WORK_MAX``: multiply-adds of the
file's NPG, UPG and BPTT                                  unrolled estimators
‖h*‖₂ of deqref's solve,      < 1e-12 / eps ≈ 4.5e3       ``H_MAX``: where float64 can resolve
per sample                                                ‖F(h) − h‖ < 1e-12 at all
============================  ==========================  ========================================

The golden files use d ≤ 32, n ≤ 4, k ≤ 10 and T ≤ 5; the bounds are two to four orders of
magnitude above that. Within them the slowest file measured takes about a minute on two cores
(d = 4096, n = 1, UPG with k = 256: every step streams the 128 MiB W from memory three times).
A verdict is given from finite numbers only: deqref's reference must be finite, and every
relative error too, or there is no verdict.

Exit codes of ``deqref crosscheck``: 0 every relative error ≤ tol; 1 some exceed it; 2 no
verdict: the file is refused (not an npz, damaged, a key or shape not in the format, beyond a
bound) or deqref could not compute a trustworthy reference for one of its estimators (no fixed
point found, I − ∂F/∂h singular at h*, float64 overflow). The message is one line naming the
key, the bound or the estimator and the reason.

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import struct
import sys
import tokenize
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .backend import to_numpy, use_backend
from .checks import check_int, check_real
from .numerics import norm_no_overflow, pow2_exponent
from .gradients import estimate
from .layers import ACTIVATIONS, Layer
from .solvers import ConvergenceWarning, DenseInverse, solve

FORMAT_VERSION = 2            # what ``deqref golden`` writes
FORMAT_VERSIONS = (1, 2)      # what ``deqref crosscheck`` reads
# A golden h* must satisfy ‖F(h*) − h*‖₂ < RESIDUAL_MAX per sample (the golden files' contract).
RESIDUAL_MAX = 1e-12
PARAMS = ("W", "U", "b", "x")
_NAME_RE = re.compile(r"^(?:(implicit|jfb|gdeq)|(upg|npg)_k([0-9]+)_lam([0-9.eE+-]+)"
                      r"|bptt_T([0-9]+)(?:_lam([0-9.eE+-]+))?)$")
NAME_FORMS = ("implicit, jfb, gdeq, upg_k<k>_lam<λ>, npg_k<k>_lam<λ>, bptt_T<T>, "
              "bptt_T<T>_lam<λ>")

# The bounds of ``deqref crosscheck`` (module docstring, "What deqref crosscheck refuses").
D_MAX = 4096               # d, the hidden size
N_MAX = 100_000            # n, the samples
DENSE_MAX = 2 ** 24        # n · d²: the dense reference's (n, d, d) arrays, 128 MiB in float64
BYTES_MAX = 2 ** 28        # all arrays of a file together, as their headers state: 256 MiB
MEMBERS_MAX = 1024         # members of the zip archive
K_MAX = 1000               # k of NPG and UPG
T_MAX = 10_000             # T of BPTT
STATES_MAX = 2 ** 24       # k · n · d (UPG), T · n · d (BPTT): the states kept, 128 MiB
WORK_MAX = 2 ** 32         # Σ steps · n · d² over the unrolled estimators: multiply-adds
_HEADER_MAX = 10_000       # characters of one .npy header (NumPy's own default limit)
_ACTIVATION_CHARS = 32     # the activation is a short string
_EOCD = b"PK\x05\x06"      # a zip archive's end-of-central-directory record, 22 bytes + comment
_EOCD_SEARCH = 22 + 65535  # the record and the longest comment: where the record can start
# What parsing untrusted zip / .npy bytes can raise (zipfile, zlib, numpy.lib.format, whose
# header parser falls back to Python's tokenizer for Python 2 headers).
_READ_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, NotImplementedError,
                RuntimeError, zlib.error, struct.error, OverflowError, RecursionError,
                SyntaxError, tokenize.TokenError)


class CrosscheckError(ValueError):
    """A crosscheck file is refused, or deqref cannot compute a trustworthy reference for it;
    the message (one line) names the key, the bound or the estimator and the reason."""


def _short(text) -> str:
    """repr of a name from a file, cut to 60 characters (a key can be 65535 bytes long)."""
    text = repr(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(err) -> str:
    return " ".join(str(err).split())


# ------------------------------------------------------------------ estimator names
def estimator_name(kind: str, *, k: int | None = None, lam: float | None = None,
                   T: int | None = None) -> str:
    """The file name of an estimator: ``estimator_name("upg", k=5, lam=0.5) == "upg_k5_lam0.5"``."""
    if kind in ("upg", "npg"):
        return f"{kind}_k{int(k)}_lam{format(float(lam), 'g')}"
    if kind == "bptt":
        damped = lam is not None and float(lam) != 1.0
        return f"bptt_T{int(T)}" + (f"_lam{format(float(lam), 'g')}" if damped else "")
    if kind in ("implicit", "jfb", "gdeq"):
        return kind
    raise ValueError(f"kind must be one of implicit, jfb, gdeq, upg, npg, bptt; got {kind!r}")


def _steps(name: str, symbol: str, digits: str, bound: int, who: str) -> int:
    """The step count ``digits`` of estimator ``name``, 1 ≤ value ≤ ``bound`` (checked on the
    digits first: a key may carry thousands of them)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(bound)) or int(digits) > bound:
        shown = digits if len(digits) <= 12 else f"{digits[:6]}... ({len(digits)} digits)"
        raise CrosscheckError(f"estimator {_short(name)}: {symbol} = {shown} is above the bound "
                              f"{symbol} ≤ {bound} of {who} (deqref crosscheck recomputes every "
                              f"step; see deqref.crosscheck)")
    return int(digits)


def parse_estimator(name: str) -> tuple[str, dict]:
    """``"upg_k5_lam0.5"`` → ``("upg", {"k": 5, "lam": 0.5})``, ``"bptt_T4"`` →
    ``("bptt", {"T": 4})``, ``"bptt_T5_lam0.7"`` → ``("bptt", {"T": 5, "lam": 0.7})``; raises
    naming the valid forms or the bound (k ≤ ``K_MAX``, T ≤ ``T_MAX``)."""
    m = _NAME_RE.match(name)
    if m is None:
        raise CrosscheckError(f"unknown estimator name {_short(name)}; expected one of: {NAME_FORMS}")
    plain, kind, k, lam, T, T_lam = m.groups()
    if plain:
        return plain, {}

    def damping(text):
        try:
            value = float(text)
        except ValueError:
            raise CrosscheckError(f"estimator {_short(name)}: λ {text!r} is not a number") from None
        if not 0 < value <= 1:
            raise CrosscheckError(f"estimator {_short(name)}: expected λ in (0, 1]")
        return value

    if kind:
        lam_f = damping(lam)
        k_i = _steps(name, "k", k, K_MAX, "NPG and UPG")
        if k_i < 1:
            raise CrosscheckError(f"estimator {_short(name)}: expected k >= 1 and λ in (0, 1]")
        return kind, {"k": k_i, "lam": lam_f}
    T_i = _steps(name, "T", T, T_MAX, "BPTT")
    if T_i < 1:
        raise CrosscheckError(f"estimator {_short(name)}: expected T >= 1")
    return "bptt", ({"T": T_i} if T_lam is None else {"T": T_i, "lam": damping(T_lam)})


# ------------------------------------------------------------------ deqref's side
def _residuals(layer: Layer, x, h) -> np.ndarray:
    """‖F(h) − h‖₂ per sample, computed here from F (not from a solver's record); inf where
    h or F(h) is not finite   # (n,)"""
    with np.errstate(all="ignore"):
        r = norm_no_overflow(to_numpy(layer(h, x)) - to_numpy(h), axis=1)
    return np.where(np.isfinite(r), r, np.inf)


# float64 resolves ‖F(h) − h‖ < RESIDUAL_MAX only while the rounding of F(h) − h, about
# eps · ‖h‖, stays below it: ‖h‖ < RESIDUAL_MAX / eps ≈ 4.5e3. Beyond, a residual under the
# bound says nothing (a runaway iterate of F(h) = h + c has F(h) − h = 0 once ‖h‖ ≫ ‖c‖ / eps).
H_MAX = RESIDUAL_MAX / np.finfo(np.float64).eps


def _unresolved(layer: Layer, x, h) -> tuple[np.ndarray, np.ndarray]:
    """(‖F(h) − h‖₂, ‖h‖₂) per sample; a sample is solved when the first is below
    ``RESIDUAL_MAX`` and the second below ``H_MAX`` (where float64 can tell)."""
    with np.errstate(all="ignore"):
        size = norm_no_overflow(to_numpy(h), axis=1)
    return _residuals(layer, x, h), np.where(np.isfinite(size), size, np.inf)


@contextlib.contextmanager
def _quiet():
    """The forward solves' non-convergence is judged by ``solve_tight`` itself (its own
    residual), and overflow by the finiteness checks: no warnings on the way."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def solve_tight(layer: Layer, x):
    """h* by dense Broyden from h_0 = 0 to ‖F(h*) − h*‖₂ < ``RESIDUAL_MAX`` per sample.

    Returns the solver result (its ``B_inv`` is the dense B_T⁻¹ GDEQ reuses). The residual is
    recomputed from F at the returned h, whatever the solver's own record says, and counts only
    where float64 can resolve it (‖h‖ < ``H_MAX``). Raises ``CrosscheckError`` otherwise:
    F(h) = h may have no solution, or F is not contractive on this input.
    """
    with _quiet():
        # atol two decades under the contract leaves room for the float64 rounding floor
        # (‖F(h) − h‖ ≈ √d · eps ≈ 1e-15 for |h| = O(1), d ≤ 32).
        res = solve(layer, x, method="broyden", form="dense", tol=0.0, atol=RESIDUAL_MAX / 100,
                    max_iter=200, stall_iter=None, warn=False)
        r, size = _unresolved(layer, x, res.h)
        if not np.all((r < RESIDUAL_MAX) & (size < H_MAX)):
            # Broyden may stall in the last digits (skipped updates); plain iteration polishes,
            # from Broyden's iterate where that is finite and resolvable, else from 0.
            h0 = res.h if np.all(size < H_MAX) else None
            fp = solve(layer, x, h0, method="fixed_point", tol=0.0, atol=RESIDUAL_MAX / 100,
                       max_iter=2000, warn=False)
            r, size = _unresolved(layer, x, fp.h)
            _check_solved(r, size)
            res.h = fp.h
            res.abs_residual = fp.abs_residual
    # Every sample now meets the contract (residual < RESIDUAL_MAX where float64 resolves it),
    # a stricter test than the solvers' own: record it, so that no estimator flags h*.
    res.converged = np.ones(len(r), dtype=bool)
    return res


def _check_solved(r: np.ndarray, size: np.ndarray) -> None:
    """Raise naming the first sample whose residual is not below the bound, or not resolvable."""
    hint = ("F(h) = h may have no solution, or F is not a contraction (‖W‖₂ · max|σ'| < 1 "
            "would ensure one)")
    if not np.all(r < RESIDUAL_MAX):
        i = int(np.argmax(r))
        raise CrosscheckError(f"no fixed point found: deqref's forward solve (dense Broyden, then "
                              f"2000 fixed-point steps) ends with ‖F(h) − h‖ = {r[i]:.2e} for "
                              f"sample {i}, above {RESIDUAL_MAX:g}; {hint}")
    if not np.all(size < H_MAX):
        i = int(np.argmax(size))
        raise CrosscheckError(f"no fixed point found: deqref's forward solve ran away to ‖h‖ = "
                              f"{size[i]:.1e} for sample {i}, where float64 cannot resolve "
                              f"‖F(h) − h‖ < {RESIDUAL_MAX:g} (that needs ‖h‖ < {H_MAX:.1e}); "
                              f"{hint}")


def _at(result, **changes):
    """A copy of a solver result with ``changes`` and no cached states (``extra``)."""
    if "extra" in {f.name for f in fields(result)}:
        changes["extra"] = {}
    return replace(result, **changes)


def _reference_estimate(layer: Layer, x, grad_h, kind: str, options: dict, result, B_inv=None,
                        h0=None):
    """deqref's ``Gradient`` for one estimator of the format (module docstring).

    ``h0`` (n, d) is the state a phantom estimator (jfb, npg, upg) is evaluated at, or starts
    its unroll from; None means h* (``result.h``). BPTT always starts at 0.
    """
    if kind == "bptt":
        # Eq. (11): exactly T plain (or λ-damped) steps from h_0 = 0, no early stop. That is
        # UPG's unroll (Eq. 17) started at 0, so no solver's stopping rule can shorten it.
        start = _at(result, h=0.0 * result.h)
        return estimate("upg", layer, x, start, grad_h, k=options["T"], lam=options.get("lam", 1.0))
    if kind == "gdeq":
        if B_inv is not None:
            dense = DenseInverse(np, *B_inv.shape[:2], np.float64)
            dense.B_inv = np.asarray(B_inv, dtype=np.float64)
            result = _at(result, B_inv=dense)
        return estimate("gdeq", layer, x, result, grad_h)
    if kind == "implicit":
        return estimate("implicit_dense", layer, x, result, grad_h)
    if h0 is not None:
        # evaluated where the file says, an inexact point on purpose: recorded as the point to
        # differentiate at, not as an unconverged forward (no flag)
        result = _at(result, h=np.asarray(h0, dtype=np.float64))
    return estimate(kind, layer, x, result, grad_h, **options)


def reference_gradient(layer: Layer, x, grad_h, kind: str, options: dict, result,
                       B_inv=None, h0=None) -> dict:
    """deqref's A g for one estimator, as ``{"W", "U", "b", "x"}`` arrays.

    ``result`` is the tight solve of ``solve_tight`` (its ``h`` is h*); ``B_inv`` (n, d, d)
    replaces the result's Broyden inverse for ``gdeq`` when given; ``h0`` (n, d) is where
    ``jfb``, ``npg`` and ``upg`` are evaluated (default h*).
    """
    est = _reference_estimate(layer, x, grad_h, kind, options, result, B_inv, h0)
    return {"W": est.W, "U": est.U, "b": est.b, "x": est.x}


# ------------------------------------------------------------------ format 2: conventions
CELL = "affine"
CELL_DESCRIPTION = ("F(h, x) = σ(W h + U x + b) per sample, σ(h Wᵀ + x Uᵀ + b) for a batch "
                    "of rows h (n, d), x (n, d_x); σ is the key 'activation', applied "
                    "elementwise; θ = (W, U, b)")
# (code, meaning): a file's layout string must start with "<code>:"
LAYOUTS = {
    "layout_W": ("out_in", "W[i, j] multiplies h[j] into output i, shape (d, d): "
                 "torch.nn.Linear(d, d).weight as it is; a kernel K used as h @ K (flax, "
                 "haiku) is Wᵀ"),
    "layout_U": ("out_in", "U[i, j] multiplies x[j] into output i, shape (d, d_x): "
                 "torch.nn.Linear(d_x, d).weight as it is; a kernel K used as x @ K is Uᵀ"),
    "layout_batch": ("rows", "x, grad_h, h_star, h_eval and <name>__grad_x hold one row per "
                     "sample; <name>__grad_W, __grad_U, __grad_b are summed over the batch, in "
                     "the layout of W, U, b"),
    "layout_B_inv": ("standard", "gdeq__B_inv[s, i, j]: sample s's Broyden estimate of the "
                     "inverse Jacobian of F(h) − h at h*, ≈ −[(I − J_h)⁻¹][i, j] with J_h[i, j] "
                     "= ∂F_i/∂h_j; gdeq's A g = −∂F/∂θ (B_inv)ᵀ g in the paper's layout "
                     "∂F/∂θ = J_θᵀ"),
}
SIGMA_PRIME_AT_KINK = 0.0     # ReLU's σ′(0), as torch.relu and jax.nn.relu differentiate it
# where each kind may be evaluated / start its unroll, and where its loss is taken
STARTS = {"implicit": ("h_star",), "gdeq": ("h_star",), "jfb": ("h_star", "h_eval"),
          "npg": ("h_star", "h_eval"), "upg": ("h_star", "h_eval"), "bptt": ("zeros",)}
_STRING_CHARS = 1024          # a format-2 string is at most this long
# global format-2 keys: key -> (what, shape, required); what: "str", "int", "float", "array"
_META = {"cell": ("str", (), True), "cell_description": ("str", (), False),
         "sigma_prime_at_kink": ("float", (), True), "layout_W": ("str", (), True),
         "layout_U": ("str", (), True), "layout_batch": ("str", (), True),
         "layout_B_inv": ("str", (), False), "deqref_version": ("str", (), False),
         "seed": ("int", (), False), "h_star_residual": ("array", ("n",), False),
         "h_eval": ("array", ("n", "d"), False), "h_eval_steps": ("int", (), False),
         "h_eval_residual": ("array", ("n",), False)}
# per-estimator format-2 keys: suffix -> what
_EST_META = {"kind": "str", "k": "int", "lam": "float", "T": "int", "start": "str",
             "loss_at": "str"}


def loss_at(kind: str, start: str) -> str:
    """The state the upstream gradient g is ∂L/∂ of: h_k for UPG (Algorithm 1), h_T for BPTT,
    the evaluation point otherwise."""
    return {"upg": "h_k", "bptt": "h_T"}.get(kind, start)


def default_start(kind: str) -> str:
    """Where format 1 evaluates each estimator: h* for all but BPTT, which starts at 0."""
    return "zeros" if kind == "bptt" else "h_star"


def conventions(name: str, start: str | None = None, **numbers) -> dict:
    """The format-2 keys of estimator ``name``: ``<name>__kind``, its numbers (k, λ, T),
    ``__start`` and ``__loss_at``, as plain NumPy scalars and strings.

    ``numbers`` (``lam=1/3``) replace the name's rounded ones where given (the file then keeps
    λ to full precision); they must round to the name.
    """
    kind, opts = parse_estimator(name)
    opts = dict(opts, **{k: v for k, v in numbers.items() if v is not None})
    if kind == "bptt":
        opts.setdefault("lam", 1.0)
    if estimator_name(kind, **opts) != estimator_name(kind, **parse_estimator(name)[1]):
        raise ValueError(f"numbers {numbers} do not match the estimator name {name!r}")
    start = default_start(kind) if start is None else start
    if start not in STARTS[kind]:
        raise ValueError(f"start must be one of {list(STARTS[kind])} for {kind}, got {start!r}")
    out = {f"{name}__kind": np.array(kind)}
    for key, value in opts.items():
        out[f"{name}__{key}"] = np.array(float(value) if key == "lam" else int(value))
    out[f"{name}__start"] = np.array(start)
    out[f"{name}__loss_at"] = np.array(loss_at(kind, start))
    return out


def file_conventions(*, gdeq: bool = False) -> dict:
    """The format-2 keys of the file itself: ``format_version``, ``cell``,
    ``cell_description``, the layouts (``layout_B_inv`` with ``gdeq``), σ′ at kinks and the
    deqref version."""
    from . import __version__
    out = {"format_version": np.array(2), "deqref_version": np.array(__version__),
           "cell": np.array(CELL), "cell_description": np.array(CELL_DESCRIPTION),
           "sigma_prime_at_kink": np.array(SIGMA_PRIME_AT_KINK)}
    for key, (code, meaning) in LAYOUTS.items():
        if key != "layout_B_inv" or gdeq:
            out[key] = np.array(f"{code}: {meaning}")
    return out


# ------------------------------------------------------------------ exporting a model to a file
def _host(a, what: str) -> np.ndarray:
    """A PyTorch tensor, JAX or NumPy array of real numbers as a float64 NumPy array (copied to
    the host); booleans, complex numbers, strings and objects are refused, not converted."""
    if hasattr(a, "detach"):                       # torch.Tensor
        a = a.detach().cpu().numpy()
    try:
        src = np.asarray(a)
        if src.dtype.kind not in "fiu":           # float, int, unsigned int
            raise TypeError(f"dtype {src.dtype}")
        out = np.array(src, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected a real array, got {type(a).__name__} ({e})") from None
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what}: contains NaN or inf")
    return out


def torch_params(lin_h, lin_x=None, *, d: int | None = None, x=None) -> tuple[dict, dict]:
    """deqref's ``W``, ``U``, ``b`` and their gradients from ``torch.nn.Linear`` modules.

    ``F(h) = σ(lin_h(h) + lin_x(x))``: ``W = lin_h.weight``, ``U = lin_x.weight`` (both
    (out, in), as the file wants: no transpose), ``b`` = the sum of the biases present. A
    single ``nn.Linear(d + d_x, d)`` applied to ``cat([h, x], -1)`` is given as ``lin_h`` with
    ``lin_x=None`` and ``d``: ``W = weight[:, :d]``, ``U = weight[:, d:]``. Returns
    ``(params, grads)``: ``grads`` holds ``W``, ``U``, ``b`` from the ``.grad`` that are set
    (two biases have equal gradients; each one is ``grad_b``) and ``x`` from ``x.grad``.
    Raises ``ValueError`` naming the module whose shape does not fit.
    """
    def weight(mod, name):
        w = getattr(mod, "weight", None)
        if w is None or len(getattr(w, "shape", ())) != 2:
            raise ValueError(f"{name}: expected a torch.nn.Linear (a 2-d .weight), got "
                             f"{type(mod).__name__}")
        return w

    grads: dict = {}
    if lin_x is None:
        w = weight(lin_h, "lin_h")
        out, inp = w.shape
        if d is None or not 0 < int(d) < inp or out != int(d):
            raise ValueError(f"lin_h: a single Linear on cat([h, x]) needs d with weight "
                             f"(d, d + d_x); weight is {tuple(w.shape)}, d = {d!r}")
        d = int(d)
        full = _host(w, "lin_h.weight")
        params = {"W": full[:, :d], "U": full[:, d:]}
        if w.grad is not None:
            gw = _host(w.grad, "lin_h.weight.grad")
            grads.update(W=gw[:, :d], U=gw[:, d:])
        biases = [("lin_h", lin_h)]
    else:
        wh, wx = weight(lin_h, "lin_h"), weight(lin_x, "lin_x")
        if wh.shape[0] != wh.shape[1]:
            raise ValueError(f"lin_h: W maps h (d) to h (d), so its weight must be square; got "
                             f"{tuple(wh.shape)}")
        if wx.shape[0] != wh.shape[0]:
            raise ValueError(f"lin_x: weight must be (d, d_x) = ({wh.shape[0]}, d_x) to add to "
                             f"lin_h's output; got {tuple(wx.shape)}")
        params = {"W": _host(wh, "lin_h.weight"), "U": _host(wx, "lin_x.weight")}
        for key, w, name in (("W", wh, "lin_h"), ("U", wx, "lin_x")):
            if w.grad is not None:
                grads[key] = _host(w.grad, f"{name}.weight.grad")
        biases = [("lin_h", lin_h), ("lin_x", lin_x)]
    present = [(name, mod.bias) for name, mod in biases if getattr(mod, "bias", None) is not None]
    params["b"] = (sum(_host(bias, f"{name}.bias") for name, bias in present) if present
                   else np.zeros(params["W"].shape[0]))
    with_grad = [(name, _host(bias.grad, f"{name}.bias.grad")) for name, bias in present
                 if bias.grad is not None]
    if with_grad:
        if len(with_grad) == 2 and not np.allclose(with_grad[0][1], with_grad[1][1],
                                                   rtol=1e-12, atol=0):
            raise ValueError("lin_h.bias.grad and lin_x.bias.grad differ; both biases add to b, "
                             "so their gradients must be equal (were they zeroed together?)")
        grads["b"] = with_grad[0][1]
    if x is not None and getattr(x, "grad", None) is not None:
        grads["x"] = _host(x.grad, "x.grad")
    return params, grads


def jax_params(tree, *, W="W", U="U", b="b", layout: str = "out_in") -> dict:
    """deqref's ``W``, ``U``, ``b`` from a JAX parameter dict (or its gradient, same structure).

    ``W``, ``U``, ``b`` are the paths of the three leaves, keys joined by ``/`` for nested
    dicts (``W="lin_h/kernel"``). ``layout="out_in"``: the model computes ``h @ W.T`` (the
    file's layout, as ``torch.nn.Linear``); ``"in_out"``: it computes ``h @ K`` (a flax or
    haiku ``Dense`` kernel), and the kernels are transposed here. Shapes are checked (W
    square, U (d, d_x), b (d,)); a square W in the wrong layout has the right shape, so
    ``write_crosscheck_file`` checks it against ``h_star``.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' (h @ W.T) or 'in_out' (h @ K), got {layout!r}")

    def leaf(path, what):
        node = tree
        for part in str(path).split("/"):
            if not isinstance(node, dict) or part not in node:
                have = sorted(node) if isinstance(node, dict) else type(node).__name__
                raise ValueError(f"{what}={path!r}: no key {part!r} in the parameter dict "
                                 f"(keys: {have})")
            node = node[part]
        return _host(node, f"{what}={path!r}")

    paths = {"W": W, "U": U, "b": b}
    out = {key: leaf(path, key) for key, path in paths.items()}
    for key in ("W", "U"):
        if out[key].ndim != 2:
            raise ValueError(f"{key}={paths[key]!r}: expected a 2-d array, got shape "
                             f"{out[key].shape}")
        if layout == "in_out":
            out[key] = out[key].T.copy()
    d = out["W"].shape[0]
    if out["W"].shape != (d, d):
        raise ValueError(f"W={W!r}: expected a square (d, d) array, got {out['W'].shape}")
    if out["U"].shape[0] != d:
        hint = " (is it an (in, out) kernel? pass layout='in_out')" if out["U"].shape[1] == d else ""
        raise ValueError(f"U={U!r}: expected shape (d, d_x) = ({d}, d_x) in the "
                         f"{layout} layout, got {out['U'].shape}{hint}")
    if out["b"].shape != (d,):
        raise ValueError(f"b={b!r}: expected shape ({d},), got {out['b'].shape}")
    return out


def _check_mapping(params: dict, activation: str, x: np.ndarray, h: np.ndarray,
                   tol: float) -> None:
    """``h`` (the user's fixed point) must be one of F with these arrays, to ``tol`` relative;
    if it is one only with W (or U) transposed, say so."""
    def resid(W, U):
        with np.errstate(all="ignore"), use_backend("numpy"):
            layer = Layer(W, U, params["b"], activation)
            r = _residuals(layer, x, h)
        return float(np.max(r / (1.0 + np.linalg.norm(h, axis=1))))

    r = resid(params["W"], params["U"])
    if r <= tol:
        return
    tries = {"W": (params["W"].T, params["U"])}
    if params["U"].shape[0] == params["U"].shape[1]:
        tries["U"] = (params["W"], params["U"].T)
        tries["W and U"] = (params["W"].T, params["U"].T)
    for which, (W, U) in tries.items():
        if resid(W, U) <= tol:
            raise ValueError(f"params: {which} looks transposed: h_star is a fixed point of "
                             f"σ(W h + U x + b) only with {which} transposed (residual "
                             f"{resid(W, U):.1e} vs {r:.1e}); the file wants the (out, in) "
                             f"layout (jax_params(..., layout='in_out') transposes a kernel)")
    raise ValueError(f"h_star: not a fixed point of F(h) = {activation}(W h + U x + b) with "
                     f"these params (relative residual {r:.1e} > {tol:g}); check the mapping "
                     f"of W, U, b, the activation and x")


def crosscheck_arrays(params: dict, *, activation: str, x, grad_h, gradients: dict,
                      h_star=None, h_eval=None, starts: dict | None = None, B_inv=None,
                      numbers: dict | None = None, fixed_point_tol: float = 1e-3) -> dict:
    """The arrays of a format-2 crosscheck file (``numpy.savez(path, **arrays)``).

    ``params``: ``{"W", "U", "b"}`` (``torch_params``, ``jax_params``); ``gradients``:
    estimator name → ``{"W", "U", "b", "x"}`` (any subset), the estimates A g of your
    implementation; ``starts``: estimator name → ``"h_star"``, ``"h_eval"`` or ``"zeros"``
    (default: h_star, BPTT zeros); ``numbers``: estimator name → ``{"lam": ...}`` to keep λ to
    full precision. Arrays may be NumPy, PyTorch or JAX. With ``h_star`` the mapping is
    checked: h_star must be a fixed point of F to ``fixed_point_tol`` relative, and a W that is
    one only when transposed is named. Raises ``ValueError`` naming the argument.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    fixed_point_tol = check_real("fixed_point_tol", fixed_point_tol, lo=0, lo_open=True)
    if not isinstance(gradients, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                  for k, v in gradients.items()):
        raise ValueError("gradients: expected a dict of estimator name (str) -> dict of arrays")
    for name, nums in (numbers or {}).items():
        if not isinstance(nums, dict) or not set(nums) <= {"k", "lam", "T"}:
            raise ValueError(f"numbers[{name!r}]: expected a dict with keys among 'k', 'lam', 'T', "
                             f"got {nums!r:.60}")
        for key in ("k", "T"):
            if key in nums:
                check_int(f"numbers[{name!r}][{key!r}]", nums[key], minimum=1)
    missing = {"W", "U", "b"} - set(params)
    if missing:
        raise ValueError(f"params: missing {sorted(missing)}; expected the keys W, U, b")
    P = {k: _host(params[k], f"params[{k!r}]") for k in ("W", "U", "b")}
    d, d_x = P["U"].shape if P["U"].ndim == 2 else (None, None)
    if P["W"].shape != (d, d) or P["b"].shape != (d,):
        raise ValueError(f"params: expected W (d, d), U (d, d_x), b (d,); got W {P['W'].shape}, "
                         f"U {P['U'].shape}, b {P['b'].shape}")
    X = _host(x, "x")
    if X.ndim != 2 or X.shape[1] != d_x:
        raise ValueError(f"x: expected shape (n, {d_x}), got {X.shape}")
    n = X.shape[0]
    if min(n, d, d_x) < 1:
        raise ValueError(f"params, x: need n, d, d_x >= 1, got n = {n}, d = {d}, d_x = {d_x}")
    out = {**file_conventions(gdeq="gdeq" in gradients), "activation": np.array(activation),
           **P, "x": X}
    for key, a in (("grad_h", grad_h), ("h_star", h_star), ("h_eval", h_eval)):
        if a is not None:
            out[key] = _host(a, key)
            if out[key].shape != (n, d):
                raise ValueError(f"{key}: expected shape ({n}, {d}), got {out[key].shape}")
    if "grad_h" not in out:
        raise ValueError("grad_h: required (the upstream gradient g, shape (n, d))")
    if not np.any(out["grad_h"]):
        raise ValueError("grad_h: all zeros, so every A g is 0 and the comparison would test nothing")
    if h_star is not None:
        _check_mapping(P, activation, X, out["h_star"], fixed_point_tol)
    if not gradients:
        raise ValueError("gradients: give at least one estimator, e.g. {'implicit': grads}")
    shapes = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x)}
    starts, numbers = dict(starts or {}), dict(numbers or {})
    for name in set(starts) | set(numbers):
        if name not in gradients:
            raise ValueError(f"starts/numbers: {name!r} is not in gradients")
    for name, grads in gradients.items():
        try:
            out.update(conventions(name, starts.get(name), **numbers.get(name, {})))
        except CrosscheckError as e:
            raise ValueError(f"gradients: {e}") from None
        except ValueError as e:
            raise ValueError(f"starts/numbers for {name!r}: {e}") from None
        if str(out[f"{name}__start"]) == "h_eval" and h_eval is None:
            raise ValueError(f"h_eval: required, {name!r} starts there")
        unknown = set(grads) - set(shapes)
        if unknown or not grads:
            raise ValueError(f"gradients[{name!r}]: expected keys among W, U, b, x; got "
                             f"{sorted(grads)}")
        for p, a in grads.items():
            arr = _host(a, f"gradients[{name!r}][{p!r}]")
            if arr.shape != shapes[p]:
                raise ValueError(f"gradients[{name!r}][{p!r}]: expected shape {shapes[p]}, got "
                                 f"{arr.shape}" + (" (transposed?)" if arr.shape[::-1] == shapes[p] else ""))
            out[f"{name}__grad_{p}"] = arr
    if "gdeq" in gradients:
        if B_inv is None:
            raise ValueError("B_inv: required with gdeq, shape (n, d, d), the standard layout")
        out["gdeq__B_inv"] = _host(B_inv, "B_inv")
        if out["gdeq__B_inv"].shape != (n, d, d):
            raise ValueError(f"B_inv: expected shape ({n}, {d}, {d}), got {out['gdeq__B_inv'].shape}")
    return out


def write_crosscheck_file(path, params: dict, **kwargs) -> Path:
    """``crosscheck_arrays(params, **kwargs)`` saved to ``path`` (an npz file); returns it."""
    path = Path(path)
    np.savez(path, **crosscheck_arrays(params, **kwargs))
    return path


# ------------------------------------------------------------------ golden files
# (activation, d, d_x, n, seed): several activations, d ≤ 32, batch ≤ 4.
GOLDEN_CASES = (("tanh", 8, 5, 3, 101), ("relu", 16, 6, 4, 102), ("softplus", 32, 4, 2, 103))
# Format 1: every estimator at an exact h*, where several coincide (UPG = NPG, upg_k1_lam1 =
# jfb) and BPTT after 30 steps is the implicit gradient to 1e-10.
GOLDEN_ESTIMATORS_V1 = (("implicit", {}), ("jfb", {}), ("upg", {"k": 5, "lam": 0.5}),
                        ("upg", {"k": 1, "lam": 1.0}), ("npg", {"k": 5, "lam": 0.5}),
                        ("npg", {"k": 10, "lam": 1.0}), ("bptt", {"T": 30}), ("gdeq", {}))
# Format 2: estimators that every two differ by ≥ 1e-3 relative. The phantom estimators (jfb,
# npg, upg) are evaluated at h_eval, H_EVAL_STEPS plain steps from 0 (residual 0.04–0.3), where
# UPG's Jacobians along its unroll differ from NPG's at one point; BPTT is short (T = 4 plain,
# T = 5 damped) so that its start at 0 and its step count show; implicit and gdeq stay at h*.
GOLDEN_ESTIMATORS = (("implicit", {}, "h_star"), ("jfb", {}, "h_eval"),
                     ("upg", {"k": 5, "lam": 0.5}, "h_eval"), ("upg", {"k": 3, "lam": 1.0}, "h_eval"),
                     ("npg", {"k": 5, "lam": 0.5}, "h_eval"), ("npg", {"k": 3, "lam": 1.0}, "h_eval"),
                     ("npg", {"k": 10, "lam": 1.0}, "h_eval"), ("bptt", {"T": 4}, "zeros"),
                     ("bptt", {"T": 5, "lam": 0.7}, "zeros"), ("gdeq", {}, "h_star"))
H_EVAL_STEPS = 2


def golden_arrays(activation: str, d: int, d_x: int, n: int, seed: int, *,
                  format_version: int = 1) -> dict:
    """The arrays of one golden file (see the module docstring for the format).

    ``format_version`` 2 is what ``deqref golden`` writes (estimators that tell each other
    apart, every convention in the file); 1 (the default) is the earlier key set, every
    estimator at h*.
    """
    if format_version not in FORMAT_VERSIONS:
        raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}, got {format_version!r}")
    # ‖W‖₂ = 0.8 and |σ'| ≤ 1 for these activations: F is a contraction in h.
    # Golden files are host data: build them with NumPy whatever backend is selected.
    with use_backend("numpy"):
        layer = Layer.random(d, d_x, activation, seed=seed, L_h=0.8)
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n, d_x))                                   # (n, d_x)
    grad_h = rng.standard_normal((n, d))                                # (n, d)
    res = solve_tight(layer, x)
    out = {"format_version": np.array(format_version), "activation": np.array(activation),
           "W": layer.W, "U": layer.U, "b": layer.b, "x": x, "h_star": res.h, "grad_h": grad_h,
           "gdeq__B_inv": res.B_inv.dense()}
    if format_version == 1:
        for kind, opts in GOLDEN_ESTIMATORS_V1:
            name = estimator_name(kind, **opts)
            grads = reference_gradient(layer, x, grad_h, kind, opts, res)
            for p in PARAMS:
                out[f"{name}__grad_{p}"] = np.asarray(grads[p], dtype=np.float64)
        return out
    h_eval = np.zeros((n, d))
    for _ in range(H_EVAL_STEPS):                                       # plain steps from 0
        h_eval = np.asarray(layer(h_eval, x), dtype=np.float64)
    with _quiet():
        out.update(file_conventions(gdeq=True), seed=np.array(seed),
                   h_star_residual=_residuals(layer, x, res.h), h_eval=h_eval,
                   h_eval_steps=np.array(H_EVAL_STEPS),
                   h_eval_residual=_residuals(layer, x, h_eval))
    for kind, opts, start in GOLDEN_ESTIMATORS:
        name = estimator_name(kind, **opts)
        grads = reference_gradient(layer, x, grad_h, kind, opts, res,
                                   h0=h_eval if start == "h_eval" else None)
        out.update(conventions(name, start, **opts))
        for p in PARAMS:
            out[f"{name}__grad_{p}"] = np.asarray(grads[p], dtype=np.float64)
    return out


def write_golden(out: Path, *, format_version: int = FORMAT_VERSION) -> list[Path]:
    """Write the golden files into ``out`` (created if needed); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for activation, d, d_x, n, seed in GOLDEN_CASES:
        path = out / f"golden_{activation}_d{d}.npz"
        np.savez(path, **golden_arrays(activation, d, d_x, n, seed, format_version=format_version))
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
    format_version: int = 1
    h_eval: np.ndarray | None = None
    # estimator name -> {"kind", "options" (k, lam, T as numbers), "start"}
    conventions: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)      # the file's other format-2 keys, as read


@dataclass(frozen=True)
class _Header:
    """What one member's ``.npy`` header claims (no data read)."""
    info: zipfile.ZipInfo
    shape: tuple
    dtype: np.dtype
    offset: int           # bytes before the data: magic, version, header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check_container(path: Path) -> None:
    """The file exists, is a zip archive (not empty, not a .npy, not text) with an end record
    and at most ``MEMBERS_MAX`` members — read from its first and last bytes only."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise CrosscheckError("is a directory, not an npz file")
        if not stat.S_ISREG(st.st_mode):
            raise CrosscheckError("is not a regular file; expected an npz file")
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, st.st_size - _EOCD_SEARCH))
            tail = f.read(_EOCD_SEARCH)
    except FileNotFoundError:
        raise CrosscheckError("no such file") from None
    except OSError as e:
        raise CrosscheckError(f"cannot be read ({e.strerror or e})") from None
    what = "an npz file (a zip archive of .npy arrays, as numpy.savez writes)"
    if not head:
        raise CrosscheckError(f"is empty (0 bytes); expected {what}")
    if head.startswith(b"\x93NUMPY"):
        raise CrosscheckError("is a .npy file (one array), not an npz archive; save every key "
                              "into one file with numpy.savez(path, activation=..., W=..., ...)")
    if not head.startswith(b"PK"):
        raise CrosscheckError(f"is not an npz file: expected {what}, which starts with the zip "
                              f"signature b'PK'; this file starts with {head!r}")
    i = tail.rfind(_EOCD)
    if i < 0 or len(tail) - i < 22:
        raise CrosscheckError("is a truncated or damaged zip archive: it has no end record "
                              "(was the file cut short?)")
    members, directory = struct.unpack("<HI", tail[i + 10:i + 16])
    if members > MEMBERS_MAX or directory > 1024 * MEMBERS_MAX:
        raise CrosscheckError(f"the zip archive claims {members} members ({directory:,} bytes of "
                              f"directory); deqref crosscheck reads at most {MEMBERS_MAX}")


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> _Header:
    """The ``.npy`` header of one member, read from its stream: only the first few hundred
    bytes are decompressed."""
    try:
        with zf.open(info) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")          # NumPy's note on Python 2 headers
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f, max_header_size=_HEADER_MAX)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f, max_header_size=_HEADER_MAX)
            else:
                raise CrosscheckError(f"key {_short(key)}: .npy format version {version} is not "
                                      f"supported (1.0 and 2.0 are)")
            offset = f.tell()
    except _READ_ERRORS as e:
        raise CrosscheckError(f"key {_short(key)}: not a readable .npy array "
                              f"({_one_line(e)[:200]})") from None
    if dtype.hasobject:
        raise CrosscheckError(f"key {_short(key)}: needs pickle to load (an object array); "
                              f"store plain numeric / string arrays")
    if any(s < 0 for s in shape):
        raise CrosscheckError(f"key {_short(key)}: its .npy header has a negative shape {shape}")
    return _Header(info, tuple(shape), dtype, offset)


def _read_headers(zf: zipfile.ZipFile) -> dict:
    """key → ``_Header`` for every member of the archive."""
    headers = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise CrosscheckError(f"archive member {_short(info.filename)} is not a .npy array; "
                                  f"an npz file holds only '<key>.npy' members")
        key = info.filename[:-len(".npy")]
        if key in headers:
            raise CrosscheckError(f"key {_short(key)} appears twice in the archive")
        if info.flag_bits & 0x1:
            raise CrosscheckError(f"key {_short(key)}: the member is encrypted")
        headers[key] = _read_header(zf, info, key)
    return headers


def _shape_str(shape):
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _expect(headers: dict, key: str, shape, notes: list) -> _Header:
    """The header of ``key``: a floating-point array of ``shape`` (ints; None = any)."""
    if key not in headers:
        raise CrosscheckError(f"missing key {key!r}: expected an array of shape "
                              f"{_shape_str(shape)}")
    h = headers[key]
    if h.dtype.kind != "f":
        raise CrosscheckError(f"key {key!r}: expected a floating-point array, got dtype {h.dtype}")
    if h.dtype != np.float64:
        notes.append(f"{key} is {h.dtype}: compared in float64; pick --tol for {h.dtype}")
    if len(h.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, h.shape)):
        raise CrosscheckError(f"key {key!r}: expected shape {_shape_str(shape)}, got {h.shape}")
    return h


def _expect_meta(headers: dict, key: str, what: str, shape: tuple, notes: list) -> None:
    """The header of a format-2 key: a string, an integer or a real number of shape (), or a
    floating-point array of ``shape``."""
    h = headers[key]
    if what == "array":
        _expect(headers, key, shape, notes)
        return
    expected = {"str": "a string (np.array('...'))", "int": "an integer (np.array(5))",
                "float": "a real number (np.array(0.5))"}[what]
    kinds = {"str": "US", "int": "iu", "float": "fiu"}[what]
    if (h.dtype.kind not in kinds or h.shape != ()
            or (what == "str" and h.dtype.itemsize > 4 * _STRING_CHARS)):
        raise CrosscheckError(f"key {_short(key)}: expected {expected}"
                              + (f" of at most {_STRING_CHARS} characters" if what == "str" else "")
                              + f", got dtype {h.dtype}, shape {h.shape}")


def _check_sizes(d: int | None = None, d_x: int | None = None, n: int | None = None) -> None:
    """The bounds on d, d_x and n (each checked as soon as its header is read), and on the
    dense reference's n · d² once all three are known."""
    if d is not None and not 1 <= d <= D_MAX:
        raise CrosscheckError(f"key 'W': d = {d}; expected 1 ≤ d ≤ {D_MAX} (deqref crosscheck's "
                              f"bound)")
    if d_x is not None and d_x < 1:
        raise CrosscheckError("key 'U': d_x = 0; expected at least one input column")
    if n is not None and not 1 <= n <= N_MAX:
        raise CrosscheckError(f"key 'x': n = {n} samples; expected 1 ≤ n ≤ {N_MAX} (deqref "
                              f"crosscheck's bound)")
    if None not in (d, n) and n * d * d > DENSE_MAX:
        raise CrosscheckError(f"n · d² = {n} · {d}² = {n * d * d:,} is above the bound "
                              f"{DENSE_MAX:,} (2^24): deqref's reference keeps (n, d, d) arrays "
                              f"(Broyden's inverse, I − ∂F/∂h); check fewer samples")


def _check_work(names: dict, n: int, d: int) -> None:
    """The unrolled estimators' states (k · n · d, T · n · d) and their total work."""
    work = 0
    for name, (kind, opts) in names.items():
        steps = opts.get("k", opts.get("T", 0))
        if kind in ("upg", "bptt") and steps * n * d > STATES_MAX:
            symbol = "k" if kind == "upg" else "T"
            raise CrosscheckError(f"estimator {_short(name)}: {symbol} · n · d = {steps} · {n} · "
                                  f"{d} = {steps * n * d:,} states to keep is above the bound "
                                  f"{STATES_MAX:,} (2^24); use fewer steps or samples")
        work += steps * n * d * d
    if work > WORK_MAX:
        raise CrosscheckError(f"the unrolled estimators need Σ steps · n · d² = {work:.2e} "
                              f"multiply-adds, above the bound {WORK_MAX:.2e} (2^32); use fewer "
                              f"steps, samples or estimators")


def _check_format(headers: dict) -> tuple[dict, list]:
    """Every key, dtype and shape against the format and the bounds, from the headers only.
    Returns (estimator name → (kind, options), notes)."""
    notes: list = []
    if "activation" not in headers:
        raise CrosscheckError(f"missing key 'activation': expected a string array, one of "
                              f"{sorted(ACTIVATIONS)}")
    act = headers["activation"]
    if (act.dtype.kind not in "US" or math.prod(act.shape) != 1
            or act.dtype.itemsize > 4 * _ACTIVATION_CHARS):
        raise CrosscheckError(f"key 'activation': expected a single string, one of "
                              f"{sorted(ACTIVATIONS)}; got dtype {act.dtype}, shape {act.shape}")
    W = _expect(headers, "W", (None, None), notes)
    d = W.shape[0]
    if W.shape != (d, d):
        raise CrosscheckError(f"key 'W': expected a square (d, d) array, got {W.shape}")
    _check_sizes(d=d)
    d_x = _expect(headers, "U", (d, None), notes).shape[1]
    _check_sizes(d_x=d_x)
    _expect(headers, "b", (d,), notes)
    n = _expect(headers, "x", (None, d_x), notes).shape[0]
    _check_sizes(d=d, n=n)
    _expect(headers, "grad_h", (n, d), notes)
    if "h_star" in headers:
        _expect(headers, "h_star", (n, d), notes)
    if "format_version" in headers:
        fv = headers["format_version"]
        if fv.dtype.kind not in "iu" or fv.shape != ():
            raise CrosscheckError(f"key 'format_version': expected the integer 1 or 2 "
                                  f"(np.array({FORMAT_VERSION})), got dtype {fv.dtype}, shape {fv.shape}")
    shapes = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x)}
    dims = {"n": n, "d": d}
    known = {"activation", "W", "U", "b", "x", "grad_h", "h_star", "format_version", "gdeq__B_inv"}
    names: dict = {}
    graded: set = set()
    for key in sorted(headers):
        if key in known:
            continue
        if key in _META:
            what, shape, _ = _META[key]
            _expect_meta(headers, key, what, tuple(dims[s] for s in shape), notes)
            continue
        name, sep, what = key.partition("__")
        if not sep:
            raise CrosscheckError(f"unknown key {_short(key)}; expected 'activation', 'W', 'U', "
                                  f"'b', 'x', 'grad_h', 'h_star', 'format_version', a format-2 "
                                  f"key ({', '.join(_META)}) or '<estimator>__grad_<W|U|b|x>'")
        if name not in names:
            names[name] = parse_estimator(name)
        if what in _EST_META:
            _expect_meta(headers, key, _EST_META[what], (), notes)
            continue
        param = what[len("grad_"):] if what.startswith("grad_") else None
        if param not in shapes:
            raise CrosscheckError(f"unknown key {_short(key)}; expected '{name}__grad_W', "
                                  f"'{name}__grad_U', '{name}__grad_b', '{name}__grad_x' or a "
                                  f"format-2 convention '{name}__<{'|'.join(_EST_META)}>'")
        _expect(headers, key, shapes[param], notes)
        graded.add(name)
    for name in names:
        if name not in graded:
            raise CrosscheckError(f"estimator {_short(name)}: its conventions are given but no "
                                  f"gradient; expected a key '{name}__grad_<W|U|b|x>'")
    if not names:
        raise CrosscheckError("no gradients found: expected keys '<estimator>__grad_<W|U|b|x>' "
                              f"with <estimator> one of: {NAME_FORMS}")
    if "gdeq" in names:
        if "gdeq__B_inv" not in headers:
            raise CrosscheckError("missing key 'gdeq__B_inv': gdeq gradients need the (n, d, d) "
                                  "Broyden inverse estimate B_T⁻¹ they were computed from")
        _expect(headers, "gdeq__B_inv", (n, d, d), notes)
    _check_work(names, n, d)
    return names, notes


def _check_members(headers: dict) -> None:
    """The headers' total claim within ``BYTES_MAX``, and each member as long as its header
    says (a member that holds more than its array is damaged, or a zip bomb)."""
    total = sum(h.nbytes for h in headers.values())
    if total > BYTES_MAX:
        raise CrosscheckError(f"the arrays' .npy headers claim {total:,} bytes in all, above the "
                              f"bound {BYTES_MAX:,} (256 MiB) of deqref crosscheck")
    for key, h in headers.items():
        held = h.info.file_size - h.offset
        if held != h.nbytes:
            raise CrosscheckError(f"key {_short(key)}: damaged member: its .npy header describes "
                                  f"{h.nbytes:,} bytes of data, the archive holds {held:,}")


def _read_arrays(zf: zipfile.ZipFile, headers: dict, keys) -> dict:
    """The arrays of ``keys``, each read from its member's stream (never more than its header's
    claim, which ``_check_members`` bounded)."""
    data = {}
    for key in keys:
        try:
            with zf.open(headers[key].info) as f:
                a = npy_format.read_array(f, allow_pickle=False, max_header_size=_HEADER_MAX)
        except _READ_ERRORS as e:
            raise CrosscheckError(f"key {_short(key)}: damaged data ({_one_line(e)[:200]})") from None
        data[key] = a
    return data


def _finite64(data: dict, key: str) -> np.ndarray:
    a = data[key].astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise CrosscheckError(f"key {key!r}: contains NaN or inf")
    return a


def _activation(a: np.ndarray) -> str:
    value = a.reshape(()).item()
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            value = repr(value)
    if value not in ACTIVATIONS:
        raise CrosscheckError(f"key 'activation': expected one of {sorted(ACTIVATIONS)}, "
                              f"got {_short(value)}")
    return value


def load_input(path: Path) -> CrosscheckInput:
    """Read and validate a crosscheck file; raise ``CrosscheckError`` naming the bad key.

    Two passes: the archive's directory and every member's ``.npy`` header are checked against
    the format and the bounds (module docstring) before any array data is decompressed.
    """
    path = Path(path)
    _check_container(path)
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise CrosscheckError(f"is a damaged zip archive ({_one_line(e)[:200]})") from None
    with zf:
        headers = _read_headers(zf)
        names, notes = _check_format(headers)
        _check_members(headers)
        keys = [k for k in headers if k != "gdeq__B_inv" or "gdeq" in names]
        data = _read_arrays(zf, headers, keys)
    activation = _activation(data["activation"])
    W, U, b, x, grad_h = (_finite64(data, k) for k in ("W", "U", "b", "x", "grad_h"))
    if not np.any(grad_h):
        raise CrosscheckError("key 'grad_h': all zeros, so every reference A g is 0 and the "
                              "comparison would test nothing; use a nonzero upstream gradient")
    h_star = _finite64(data, "h_star") if "h_star" in data else None
    version = int(data["format_version"]) if "format_version" in data else 1
    if version not in FORMAT_VERSIONS:
        raise CrosscheckError(f"key 'format_version': expected 1 or 2, got {version}")
    theirs: dict = {}
    for key in sorted(data):
        name, sep, what = key.partition("__")
        if sep and key != "gdeq__B_inv" and what.startswith("grad_"):
            theirs.setdefault(name, {})[what[len("grad_"):]] = _finite64(data, key)
    B_inv = _finite64(data, "gdeq__B_inv") if "gdeq" in theirs else None
    v2 = sorted(k for k in data if k in _META or k.partition("__")[2] in _EST_META)
    if version == 1:
        if v2:
            raise CrosscheckError(f"key {_short(v2[0])} is a format-2 key; a file that carries "
                                  f"conventions says format_version = np.array(2)")
        conv = {name: {"kind": kind, "options": opts, "start": default_start(kind)}
                for name, (kind, opts) in ((nm, parse_estimator(nm)) for nm in theirs)}
        return CrosscheckInput(activation, W, U, b, x, grad_h, h_star, B_inv, theirs, notes,
                               1, None, conv, {})
    meta = _file_meta(data, gdeq="gdeq" in theirs)
    h_eval = _finite64(data, "h_eval") if "h_eval" in data else None
    conv = {name: _estimator_conventions(data, name, h_eval is not None) for name in theirs}
    return CrosscheckInput(activation, W, U, b, x, grad_h, h_star, B_inv, theirs, notes,
                           2, h_eval, conv, meta)


def _text(data: dict, key: str) -> str:
    value = data[key].reshape(()).item()
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise CrosscheckError(f"key {key!r}: not a UTF-8 string") from None
    return value


def _missing(key: str, expected: str) -> CrosscheckError:
    return CrosscheckError(f"missing key {_short(key)}: format 2 carries it ({expected})")


def _file_meta(data: dict, gdeq: bool) -> dict:
    """The file's format-2 keys, checked against the conventions deqref computes with."""
    for key, (what, _, required) in _META.items():
        if (required or (key == "layout_B_inv" and gdeq)) and key not in data:
            if key in LAYOUTS:
                raise _missing(key, f"a string starting {LAYOUTS[key][0] + ':'!r}: "
                                    f"{LAYOUTS[key][1][:80]}...")
            raise _missing(key, {"cell": f"np.array({CELL!r})",
                                 "sigma_prime_at_kink": f"np.array({SIGMA_PRIME_AT_KINK})"}[key])
    meta: dict = {}
    for key, (what, _, _) in _META.items():
        if key not in data:
            continue
        if what == "str":
            meta[key] = _text(data, key)
        elif what == "int":
            meta[key] = int(data[key])
        elif what == "float":
            meta[key] = float(data[key])
            if not math.isfinite(meta[key]):
                raise CrosscheckError(f"key {key!r}: expected a finite number, got {meta[key]}")
        else:
            meta[key] = _finite64(data, key)
    if meta["cell"] != CELL:
        raise CrosscheckError(f"key 'cell': deqref crosscheck computes the cell {CELL!r} "
                              f"(F = σ(W h + U x + b)); got {_short(meta['cell'])}")
    if meta["sigma_prime_at_kink"] != SIGMA_PRIME_AT_KINK:
        raise CrosscheckError(f"key 'sigma_prime_at_kink': deqref takes σ′ = "
                              f"{SIGMA_PRIME_AT_KINK:g} at a kink (ReLU at 0, as torch.relu and "
                              f"jax.nn.relu do); got {meta['sigma_prime_at_kink']:g}")
    for key, (code, meaning) in LAYOUTS.items():
        if key in meta and meta[key].partition(":")[0].strip() != code:
            hint = ("; transpose the array (a kernel used as h @ K is the transpose: "
                    "deqref.crosscheck.from_jax_params does it)" if code == "out_in" else "")
            raise CrosscheckError(f"key {key!r}: deqref reads the layout {code!r} ({meaning[:60]}"
                                  f"...), expected a string starting {code + ':'!r}, got "
                                  f"{_short(meta[key][:40])}{hint}")
    return meta


def _estimator_conventions(data: dict, name: str, has_h_eval: bool) -> dict:
    """One estimator's format-2 keys: present, consistent with its name, and a convention
    deqref computes. Returns {"kind", "options" (the file's numbers), "start"}."""
    kind, opts = parse_estimator(name)
    what = f"estimator {_short(name)}"
    numbers = {"npg": ("k", "lam"), "upg": ("k", "lam"), "bptt": ("T", "lam")}.get(kind, ())
    for suffix in ("kind",) + numbers + ("start", "loss_at"):
        if f"{name}__{suffix}" not in data:
            raise _missing(f"{name}__{suffix}", f"{what}: its {suffix} as "
                           + ("a number" if suffix in numbers else "a string"))
    for suffix in set(_EST_META) - {"kind", "start", "loss_at"} - set(numbers):
        if f"{name}__{suffix}" in data:
            raise CrosscheckError(f"key {_short(name + '__' + suffix)}: {kind} has no {suffix}")
    if _text(data, f"{name}__kind") != kind:
        raise CrosscheckError(f"key {_short(name + '__kind')}: the name says {kind!r}, the key "
                              f"says {_short(_text(data, name + '__kind'))}")
    given = dict(opts)
    for suffix in numbers:
        value = data[f"{name}__{suffix}"].item()
        if suffix == "lam":
            value = float(value)
            if not (math.isfinite(value) and 0 < value <= 1):
                raise CrosscheckError(f"key {_short(name + '__lam')}: expected λ in (0, 1], "
                                      f"got {value}")
        elif int(value) != value:
            raise CrosscheckError(f"key {_short(name + '__' + suffix)}: expected an integer")
        given[suffix] = value
    canonical = estimator_name(kind, **opts)
    if estimator_name(kind, **given) != canonical:
        shown = ", ".join(f"{k} = {given[k]!r}" for k in numbers)
        raise CrosscheckError(f"{what}: its numbers ({shown}) do not match its name (expected "
                              f"the name {estimator_name(kind, **given)!r})")
    start = _text(data, f"{name}__start")
    if start not in STARTS[kind]:
        raise CrosscheckError(f"key {_short(name + '__start')}: {kind} starts at "
                              f"{' or '.join(map(repr, STARTS[kind]))} in deqref's definition, "
                              f"got {_short(start)}")
    if start == "h_eval" and not has_h_eval:
        raise _missing("h_eval", f"{what} starts at 'h_eval': the (n, d) state it is "
                       f"evaluated at")
    loss = _text(data, f"{name}__loss_at")
    if loss != loss_at(kind, start):
        raise CrosscheckError(f"key {_short(name + '__loss_at')}: {kind} from {start} takes its "
                              f"loss at {loss_at(kind, start)!r} (g = ∂L/∂ of that state), got "
                              f"{_short(loss)}")
    return {"kind": kind, "options": {k: v for k, v in given.items()}, "start": start}


# ------------------------------------------------------------------ comparing
def compare(mine, theirs) -> tuple[float, float | None]:
    """(relative error ‖theirs − mine‖ / ‖mine‖, cosine) in the Frobenius norm.

    The relative error falls back to the absolute error when deqref's array is exactly 0;
    the cosine is None when either array is 0. Both arrays are scaled by one power of two
    near their largest entry first (exact), so finite arrays give finite numbers (√(v·v) would
    overflow above ~1e154) and ordinary ones the same bits as without scaling.
    """
    mine = np.ravel(np.asarray(mine, dtype=np.float64))
    theirs = np.ravel(np.asarray(theirs, dtype=np.float64))
    top = max(np.max(np.abs(mine), initial=0.0), np.max(np.abs(theirs), initial=0.0))
    scale = math.ldexp(1.0, int(pow2_exponent(top)) - 1) if math.isfinite(top) else 1.0
    mine, theirs = mine / scale, theirs / scale
    n_mine, n_theirs = np.linalg.norm(mine), np.linalg.norm(theirs)
    diff = np.linalg.norm(theirs - mine)
    err = diff / n_mine if n_mine > 0 else float(diff) * scale
    cos = float(mine @ theirs / (n_mine * n_theirs)) if n_mine > 0 and n_theirs > 0 else None
    return float(err), cos


def _overflow_reason(inp: CrosscheckInput) -> str:
    """Why a reference came out non-finite: float64 overflowed; name the largest input."""
    arrays = {"W": inp.W, "U": inp.U, "b": inp.b, "x": inp.x, "grad_h": inp.grad_h}
    key, top = max(((k, float(np.max(np.abs(a)))) for k, a in arrays.items()), key=lambda kv: kv[1])
    return f"float64 overflowed; the file's largest entry is |{key}| = {top:.1e}"


def _reference(name: str, kind: str, opts: dict, layer: Layer, inp: CrosscheckInput, res,
               h0=None) -> dict:
    """deqref's reference for estimator ``name``, finite and unflagged, or ``CrosscheckError``
    saying why there is none (no verdict can come from it)."""
    from scipy.linalg import LinAlgWarning
    why = None
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("error", LinAlgWarning)       # I − ∂F/∂h ill-conditioned
            est = _reference_estimate(layer, inp.x, inp.grad_h, kind, opts, res, inp.B_inv, h0)
    except (np.linalg.LinAlgError, LinAlgWarning) as e:
        why = (f"I − ∂F/∂h at h* is singular to working precision, so h* is not an isolated "
               f"fixed point and Eq. (4) has no solution ({_one_line(e)[:160].rstrip(';')})")
    except (FloatingPointError, ConvergenceWarning) as e:
        why = _one_line(e)
    else:
        flags = tuple(getattr(est, "flags", ()))
        mine = {"W": est.W, "U": est.U, "b": est.b, "x": est.x}
        bad = [p for p in PARAMS if not np.all(np.isfinite(to_numpy(mine[p])))]
        if bad:
            why = f"its {', '.join(bad)} gradient is not finite ({_overflow_reason(inp)})"
        elif flags:
            why = f"deqref flags it: {'; '.join(flags)}"
    if why is not None:
        raise CrosscheckError(f"deqref could not compute a reference for {name}: {why}")
    return {p: np.asarray(to_numpy(v), dtype=np.float64) for p, v in mine.items()}


def crosscheck(inp: CrosscheckInput) -> list[dict]:
    """Recompute every estimator in ``inp`` with deqref; one row per (estimator, parameter).

    Raises ``CrosscheckError`` when deqref finds no fixed point, or its reference for an
    estimator is not finite or not trustworthy (a verdict needs finite numbers on both sides).
    """
    layer = Layer(inp.W, inp.U, inp.b, inp.activation)
    res = solve_tight(layer, inp.x)
    rows = []
    for name, grads in inp.theirs.items():
        conv = inp.conventions.get(name)
        if conv is None:                           # an input built by hand: format 1's rules
            kind, opts = parse_estimator(name)
            conv = {"kind": kind, "options": opts, "start": default_start(kind)}
        kind, opts = conv["kind"], conv["options"]
        h0 = inp.h_eval if conv["start"] == "h_eval" else None
        mine = _reference(name, kind, opts, layer, inp, res, h0)
        for p in [q for q in PARAMS if q in grads]:
            theirs = grads[p]
            err, cos = compare(mine[p], theirs)
            if not math.isfinite(err):             # no verdict from NaN or from an overflow
                raise CrosscheckError(f"no verdict for {name}: the relative error of {p} is {err} "
                                      f"(a value near the float64 limit, or no reference)")
            diff = float(np.max(np.abs(mine[p] / 2.0 - theirs / 2.0))) * 2.0   # no overflow
            rows.append({"estimator": name, "param": p, "rel_err": err, "cosine": cos,
                         "max_abs": diff})
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

    0: every relative error ≤ ``tol``; 1: some exceed it; 2: no verdict — the file is refused
    or deqref could not compute a reference (one line on stderr naming the key, bound or
    estimator and why).
    """
    try:
        tol = check_real("--tol", tol, lo=0, lo_open=True)
    except ValueError as e:
        print(f"deqref crosscheck: error: {e}", file=sys.stderr)
        return 2
    try:
        inp = load_input(Path(path))
        rows = crosscheck(inp)
    except CrosscheckError as e:
        print(f"deqref crosscheck: error: {path}: {_one_line(e)}", file=sys.stderr)
        return 2
    layer = Layer(inp.W, inp.U, inp.b, inp.activation)
    n, d = inp.grad_h.shape
    print(f"{path}: activation {inp.activation}, d = {d}, d_x = {inp.U.shape[1]}, n = {n}; "
          f"deqref's h* solved to ‖F(h*) − h*‖ < {RESIDUAL_MAX:g}")
    if inp.format_version == 2:
        made = ", ".join(f"{k} {inp.meta[k]}" for k in ("deqref_version", "seed") if k in inp.meta)
        print(f"  format 2: cell {inp.meta['cell']}" + (f" ({made})" if made else ""))
    if inp.h_star is not None:
        r = _residuals(layer, inp.x, inp.h_star).max()
        print(f"  your h_star: max residual ‖F(h) − h‖ = {r:.2e}")
    at_eval = [nm for nm, c in inp.conventions.items() if c["start"] == "h_eval"]
    if at_eval:
        with np.errstate(all="ignore"):
            r = _residuals(layer, inp.x, inp.h_eval).max()
        print(f"  at your h_eval (max residual ‖F(h) − h‖ = {r:.2e}): {', '.join(at_eval)}")
    for note in inp.notes:
        print(f"  note: {note}")
    print(format_table(rows, tol))
    bad = [r for r in rows if not r["rel_err"] <= tol]
    worst = max(rows, key=lambda r: r["rel_err"])
    if bad:
        print(f"VERDICT: DIFFERS — {len(bad)} of {len(rows)} gradients exceed tol {tol:g} "
              f"(worst: {worst['estimator']} {worst['param']}, {worst['rel_err']:.2e})")
        return 1
    print(f"VERDICT: AGREE — all {len(rows)} gradients within tol {tol:g} "
          f"(worst: {worst['estimator']} {worst['param']}, {worst['rel_err']:.2e})")
    return 0
