"""Property-based suite over the ``deqref`` command: bad input never ends in a traceback.

For every argument list and every crosscheck file drawn here, ``deqref.cli.main(argv)``

- on bad input (a bad option value, an output path that is a file, a malformed, truncated or
  hostile ``.npz``) exits with code 2 and prints exactly one line on stderr, no traceback;
- on good input exits 0 (``crosscheck``: 0 only when every relative error is finite and within
  ``--tol``, 1 when some are not);
- never raises, never runs for more than ``LIMIT_S`` CPU seconds (a key ``upg_k100000000_lam1__grad_b``
  is a command: its k must be bounded).

Input classes (d): argument lists per subcommand, and crosscheck files made from a golden file
by one mutation each (``MUTATIONS``). A few subprocess runs check the same at the process level.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deqref.backend import get_backend
from deqref.cli import main
from deqref.crosscheck import golden_arrays

STRICT = get_backend().name == "strict"
LIMIT_S = 10.0        # CPU seconds; a valid d = 4 crosscheck takes ~0.05 s: ten is a runaway
BUDGETS: dict = {}


def budget(n: int) -> int:
    return max(5, n // 3) if STRICT else n


def fuzz(n: int):
    """Seeded (derandomized), no per-example deadline (``LIMIT_S`` bounds each call instead)."""
    s = settings(max_examples=budget(n), deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    def register(f):
        BUDGETS[f.__name__] = budget(n)
        return s(f)
    return register


# ================================================================ running the command
class RanTooLong(BaseException):
    """Raised by the alarm inside ``main`` (a BaseException: ``except Exception`` cannot eat it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``RanTooLong`` after ``seconds`` of CPU time (user + system) of this process: CPU
    time, not wall time, so that a loaded CI machine does not turn a slow run into a failure."""
    def alarm(signum, frame):
        raise RanTooLong(f"ran past {seconds:g} s of CPU time")
    old = signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


@dataclass
class Run:
    code: object
    out: str
    err: str
    exc: BaseException | None


def run_cli(argv) -> Run:
    """``main(argv)`` with stdout/stderr captured, SystemExit read as the exit code."""
    out, err = io.StringIO(), io.StringIO()
    code = exc = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with time_limit(LIMIT_S):
                code = main([str(a) for a in argv])
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        except (Exception, RanTooLong) as e:         # the test: nothing may escape
            exc = e
    return Run(code, out.getvalue(), err.getvalue(), exc)


def assert_refused(run: Run, argv):
    """Bad input: exit 2, one line on stderr, no traceback."""
    assert run.exc is None, f"deqref {argv}: {type(run.exc).__name__}: {run.exc} escaped (a traceback)"
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert run.code == 2, f"deqref {argv}: exit {run.code!r}, expected 2; stderr {run.err[-300:]!r}"
    assert "Traceback" not in run.err, f"deqref {argv}: a traceback on stderr"
    assert len(lines) == 1, f"deqref {argv}: {len(lines)} lines on stderr, expected one: {lines}"


def assert_ran(run: Run, argv, codes=(0,)):
    assert run.exc is None, f"deqref {argv}: {type(run.exc).__name__}: {run.exc} escaped (a traceback)"
    assert run.code in codes, f"deqref {argv}: exit {run.code!r}, expected {codes}; stderr {run.err[-300:]!r}"
    assert "Traceback" not in run.err


# ================================================================ class (d): argument lists
BAD_SEEDS = st.sampled_from(["-1", "abc", "1.5", "", "nan", "1e3", "-99999999999999999999"])
BAD_TOLS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "abc", "", "1e400", "-0"])


@st.composite
def argv_cases(draw, tmp: Path, golden: Path):
    """(argv, "bad" | "good"): one subcommand with one bad (or all good) argument."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder\n")
    kind = draw(st.sampled_from([
        "no_command", "unknown_command", "unknown_option", "reproduce_name", "reproduce_seed",
        "reproduce_out_file", "reproduce_both_sizes", "golden_no_out", "golden_out_file",
        "crosscheck_no_file", "crosscheck_missing", "crosscheck_folder", "crosscheck_tol",
        "bench_out_file", "bench_bad_flag", "list", "golden_ok", "crosscheck_ok"]))
    exp = "reproduce solver_traces --quick".split()
    return {
        "no_command": ([], "bad"),
        "unknown_command": ([draw(st.sampled_from(["frobnicate", "LIST", "reproduces", "-1"]))], "bad"),
        "unknown_option": (["list", draw(st.sampled_from(["--frob", "-x", "--seed=1"]))], "bad"),
        "reproduce_name": (["reproduce", draw(st.sampled_from(["figure99", "", "SOLVER_TRACES"])),
                            "--quick", "--out", tmp / "r"], "bad"),
        "reproduce_seed": (exp + ["--seed", draw(BAD_SEEDS), "--out", tmp / "r"], "bad"),
        "reproduce_out_file": (exp + ["--out", a_file], "bad"),
        "reproduce_both_sizes": (exp + ["--full", "--out", tmp / "r"], "bad"),
        "golden_no_out": (["golden"], "bad"),
        "golden_out_file": (["golden", "--out", a_file], "bad"),
        "crosscheck_no_file": (["crosscheck"], "bad"),
        "crosscheck_missing": (["crosscheck", tmp / "nope.npz"], "bad"),
        "crosscheck_folder": (["crosscheck", tmp], "bad"),
        "crosscheck_tol": (["crosscheck", golden, "--tol", draw(BAD_TOLS)], "bad"),
        "bench_out_file": (["bench", "--quick", "--out", a_file], "bad"),
        "bench_bad_flag": (["bench", "--quick", "--repeat", "3"], "bad"),
        "list": (["list"], "good"),
        "golden_ok": (["golden", "--out", tmp / "g" / "sub"], "good"),
        "crosscheck_ok": (["crosscheck", golden, "--tol", draw(st.sampled_from(["1e-8", "0.5", "1e-3"]))],
                          "good"),
    }[kind]


@given(data=st.data())
@fuzz(60)
def test_cli_arguments(data):
    """Bad arguments to any subcommand: exit 2 and one line (reproduce --seed -1 and golden
    --out EXISTING_FILE once ended in tracebacks)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        golden = tmp / "golden.npz"
        np.savez(golden, **base_arrays("tanh"))
        argv, cls = data.draw(argv_cases(tmp, golden))
        run = run_cli(argv)
        if cls == "bad":
            assert_refused(run, argv)
        else:
            assert_ran(run, argv)


# ================================================================ class (d): crosscheck files
_BASE: dict = {}


def base_arrays(activation: str) -> dict:
    """A small golden file's arrays (d = 4, d_x = 3, n = 2): deqref agrees with it exactly."""
    if activation not in _BASE:
        _BASE[activation] = golden_arrays(activation, 4, 3, 2, 7)
    return {k: v.copy() for k, v in _BASE[activation].items()}


REQUIRED = ("activation", "W", "U", "b", "x", "grad_h")
FLOATS = ("W", "U", "b", "x", "grad_h", "h_star", "gdeq__B_inv", "jfb__grad_W", "implicit__grad_x")


def npy_bytes_with_header(shape, dtype="<f8") -> bytes:
    """A .npy member whose header claims ``shape`` but that holds no data (a lie about size)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@st.composite
def crosscheck_files(draw, folder: Path):
    """(path, allowed exit codes, what): a golden file changed by one mutation."""
    act = draw(st.sampled_from(["tanh", "relu", "softplus", "identity"]))
    arrays = base_arrays(act if act != "identity" else "tanh")
    if act == "identity":
        arrays["activation"] = np.array("identity")      # now their numbers are for tanh: differ
    path = folder / "in.npz"
    kind = draw(st.sampled_from(sorted(MUTATIONS)))
    codes, what = MUTATIONS[kind](draw, arrays, path)
    if act == "identity":               # a file that would agree now differs
        codes = tuple(sorted({1 if c == 0 else c for c in codes}))
    return path, codes, f"{kind}: {what}"


def _save(arrays, path):
    np.savez(path, **arrays)


def m_valid(draw, arrays, path):
    if draw(st.booleans()):
        arrays.pop("h_star")                              # optional
    if draw(st.booleans()):
        arrays.pop("format_version")                      # optional
    _save(arrays, path)
    return (0,), "unchanged"


def m_drop(draw, arrays, path):
    key = draw(st.sampled_from(REQUIRED + ("gdeq__B_inv", "all_gradients")))
    if key == "all_gradients":
        for k in [k for k in arrays if "__grad_" in k]:
            arrays.pop(k)
    else:
        arrays.pop(key)
    _save(arrays, path)
    return (2,), f"without {key}"


def m_unknown_key(draw, arrays, path):
    key = draw(st.sampled_from(["foo", "upg__grad_W", "npg_k5_lam0.5__grad_Q", "jfb__grad_W__x",
                                "JFB__grad_W", "jfb_grad_W", "__grad_W", "implicit__B_inv",
                                "npg_k-1_lam0.5__grad_b", "npg_k0_lam0.5__grad_b",
                                "upg_k5_lam0__grad_b", "upg_k5_lam1.5__grad_b", "upg_k5_lamnan__grad_b",
                                "upg_k5_lam1e400__grad_b", "upg_k5_lam1e-400__grad_b",
                                "upg_k5_lam.__grad_b", "upg_k5_lam-0.5__grad_b", "bptt_T0__grad_b",
                                "bptt_T-3__grad_b", "upg_k٣_lam1__grad_b"]))
    arrays[key] = np.zeros_like(arrays["b"])
    _save(arrays, path)
    return (2,), f"key {key!r}"


def m_huge_count(draw, arrays, path):
    """A key name is a command: k or T must be bounded (exit 2) or the run must stay short."""
    kind = draw(st.sampled_from(["upg", "npg", "bptt"]))
    big = draw(st.sampled_from([10 ** 4, 10 ** 5, 10 ** 6, 10 ** 8, 10 ** 12, 10 ** 100]))
    name = f"bptt_T{big}" if kind == "bptt" else f"{kind}_k{big}_lam{draw(st.sampled_from(['1', '0.5']))}"
    arrays[f"{name}__grad_b"] = np.zeros_like(arrays["b"])
    _save(arrays, path)
    return (1, 2), f"key {name}__grad_b"


def m_shape(draw, arrays, path):
    key = draw(st.sampled_from(FLOATS))
    a = arrays[key]
    new = draw(st.sampled_from(["add_dim", "drop_dim", "grow", "transpose", "scalar"]))
    if new == "transpose" and (a.ndim != 2 or a.shape[0] == a.shape[1]):
        new = "grow"
    arrays[key] = {"add_dim": lambda: a[None],
                   "drop_dim": lambda: a.reshape(-1)[:-1] if a.ndim == 1 else a[..., 0],
                   "grow": lambda: np.concatenate([a, a[..., :1]], axis=-1),
                   "transpose": lambda: a.T, "scalar": lambda: np.float64(1.0)}[new]()
    _save(arrays, path)
    return (2,), f"{key} {new} → shape {np.shape(arrays[key])}"


def m_dtype(draw, arrays, path):
    key = draw(st.sampled_from(FLOATS))
    dt = draw(st.sampled_from(["int64", "complex128", "bool", "float16", "U5", "object", "float32"]))
    a = arrays[key]
    arrays[key] = a.astype(object) if dt == "object" else a.astype(dt)
    _save(arrays, path)
    # a narrower float is read with a note (and compared in float64): a verdict or a refusal
    return ((0, 1, 2) if dt in ("float32", "float16") else (2,)), f"{key} as {dt}"


def m_non_finite(draw, arrays, path):
    key = draw(st.sampled_from(FLOATS))
    a = arrays[key].astype(np.float64)
    a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    arrays[key] = a
    _save(arrays, path)
    return (2,), f"{key} with NaN/inf"


def m_huge_values(draw, arrays, path):
    """grad_h and every gradient scaled by s (the map is linear, so they still agree): with s
    large the computation overflows; it must not say AGREE on NaN errors."""
    s = draw(st.sampled_from([1e100, 1e155, 1e200, 1e300]))
    for k in list(arrays):
        if k == "grad_h" or "__grad_" in k:
            arrays[k] = arrays[k] * s
    _save(arrays, path)
    return (0, 1, 2), f"grad_h and gradients × {s:g}"


def m_format_version(draw, arrays, path):
    v = draw(st.sampled_from(["abc", "x", "[1, 2]", "1.5", "2", "-1", "10**30", "nan", "empty"]))
    arrays["format_version"] = {"abc": np.array("abc"), "x": np.array(b"1"), "[1, 2]": np.array([1, 2]),
                                "1.5": np.array(1.5), "2": np.array(2), "-1": np.array(-1),
                                "10**30": np.array(10 ** 30, dtype=object), "nan": np.array(np.nan),
                                "empty": np.array([])}[v]
    _save(arrays, path)
    return (2,), f"format_version {v}"


def m_activation(draw, arrays, path):
    v = draw(st.sampled_from(["int", "two", "gelu", "empty", "float", "2d"]))
    arrays["activation"] = {"int": np.array(1), "two": np.array(["tanh", "relu"]),
                            "gelu": np.array("gelu"), "empty": np.array(""), "float": np.array(0.5),
                            "2d": np.array([[str(arrays["activation"])]])}[v]
    _save(arrays, path)
    # a single string in a (1, 1) array is unambiguous: reading it is a choice, not an error
    return ((0, 2) if v == "2d" else (2,)), f"activation {v}"


def m_no_fixed_point(draw, arrays, path):
    """I − W singular (W = I, identity: F(h) = h + c), or a linear layer with ‖W‖₂ = 3."""
    d = arrays["W"].shape[0]
    arrays["activation"] = np.array("identity")
    if draw(st.booleans()):
        arrays["W"] = np.eye(d)
        _save(arrays, path)
        return (2,), "W = I, identity: no fixed point"
    # linear with ‖W‖₂ = 3: h* = (I − W)⁻¹ c exists (Broyden finds it) but iteration diverges;
    # a refusal or an honest DIFFERS (the gradients in the file are for another layer)
    arrays["W"] = 3.0 * arrays["W"] / np.linalg.norm(arrays["W"], 2)
    _save(arrays, path)
    return (1, 2), "‖W‖₂ = 3, identity"


def m_empty_batch(draw, arrays, path):
    """n = 0 samples, d = 0 units or d_x = 0 inputs, every array cut consistently."""
    n0 = draw(st.sampled_from(["n", "d", "d_x"]))
    # the axes of each key that are n, d or d_x
    axes = {"W": "dd", "U": "dx", "b": "d", "x": "nx", "grad_h": "nd", "h_star": "nd",
            "gdeq__B_inv": "ndd"}
    for k, a in list(arrays.items()):
        if k in ("activation", "format_version"):
            continue
        ax = axes.get(k) or {"W": "dd", "U": "dx", "b": "d", "x": "nx"}[k.rsplit("__grad_", 1)[1]]
        cut = {"n": "n", "d": "d", "d_x": "x"}[n0]
        arrays[k] = a[tuple(slice(0, 0) if c == cut else slice(None) for c in ax)]
    _save(arrays, path)
    return (2,), f"{n0} = 0"


def m_bytes(draw, arrays, path):
    """Not an npz at all, or a broken one: truncated, empty, a renamed .npy, random bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    kind = draw(st.sampled_from(["truncate", "empty", "npy", "garbage", "text", "flip"]))
    if kind == "truncate":
        raw = raw[:draw(st.integers(1, len(raw) - 1))]
    elif kind == "empty":
        raw = b""
    elif kind == "npy":
        b2 = io.BytesIO()
        np.save(b2, arrays["W"])
        raw = b2.getvalue()
    elif kind == "garbage":
        raw = np.random.default_rng(draw(st.integers(0, 99))).bytes(draw(st.integers(1, 4000)))
    elif kind == "text":
        raw = b"W,U,b\n1,2,3\n"
    else:                                                # one byte changed in the middle
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
    path.write_bytes(raw)
    return ((0, 1, 2) if kind == "flip" else (2,)), f"bytes: {kind}"


def m_lying_header(draw, arrays, path):
    """A member whose header claims a huge shape (100000 × 100000 float64 = 80 GB) with no data
    behind it: names and header shapes are checked before anything is read (no MemoryError)."""
    key = draw(st.sampled_from(["W", "grad_h", "zzz", "jfb__grad_W"]))
    shape = draw(st.sampled_from([(100000, 100000), (10 ** 9,), (4, 4, 100000, 100000)]))
    with zipfile.ZipFile(path, "w") as z:
        for k, a in arrays.items():
            if k != key:
                b = io.BytesIO()
                np.save(b, a)
                z.writestr(k + ".npy", b.getvalue())
        z.writestr(key + ".npy", npy_bytes_with_header(shape))
    return (2,), f"{key} header claims {shape}"


def m_odd_members(draw, arrays, path):
    """A zip with a member that is not .npy, a directory entry, or a duplicate name."""
    kind = draw(st.sampled_from(["text_member", "dir_member", "duplicate"]))
    _save(arrays, path)
    with zipfile.ZipFile(path, "a") as z:
        if kind == "text_member":
            z.writestr("README.txt", "hello")
        elif kind == "dir_member":
            z.writestr("sub/", "")
        else:
            b = io.BytesIO()
            np.save(b, np.zeros((7, 7)))
            with warnings.catch_warnings():            # zipfile warns about the duplicate
                warnings.simplefilter("ignore")
                z.writestr("W.npy", b.getvalue())
    return (2,), f"zip {kind}"


MUTATIONS = {"valid": m_valid, "drop": m_drop, "unknown_key": m_unknown_key,
             "huge_count": m_huge_count, "shape": m_shape, "dtype": m_dtype,
             "non_finite": m_non_finite, "huge_values": m_huge_values,
             "format_version": m_format_version, "activation": m_activation,
             "no_fixed_point": m_no_fixed_point, "empty_batch": m_empty_batch, "bytes": m_bytes,
             "lying_header": m_lying_header, "odd_members": m_odd_members}

TABLE_NUMBER = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


@given(data=st.data())
@fuzz(150)
def test_crosscheck_files(data):
    """Malformed and hostile crosscheck files: exit 2 and one line; a well-formed file: a
    verdict (0 AGREE only with every error finite and within --tol, 1 DIFFERS), in time."""
    with tempfile.TemporaryDirectory() as d:
        path, codes, what = data.draw(crosscheck_files(Path(d)))
        argv = ["crosscheck", path]
        run = run_cli(argv)
        assert run.exc is None, f"{what}: {type(run.exc).__name__}: {run.exc} escaped (a traceback)"
        assert run.code in codes, (f"{what}: exit {run.code!r}, expected one of {codes}; "
                                   f"stderr {run.err[-300:]!r}; stdout {run.out[-300:]!r}")
        if run.code == 2:
            assert_refused(run, f"{argv} ({what})")
        elif run.code == 0:
            assert "VERDICT: AGREE" in run.out and not TABLE_NUMBER.search(run.out), \
                f"{what}: AGREE with a NaN or inf in the table:\n{run.out}"
        else:
            assert "VERDICT: DIFFERS" in run.out, f"{what}: exit 1 without a DIFFERS verdict"


@given(activation=st.sampled_from(["tanh", "relu", "softplus"]),
       estimator=st.sampled_from(["implicit", "jfb", "upg_k5_lam0.5", "npg_k10_lam1", "bptt_T30",
                                  "gdeq"]),
       param=st.sampled_from(["W", "U", "b", "x"]),
       delta=st.sampled_from([0.0, 1e-13, 1e-10, -1e-10, 1e-6, -1e-3, 0.5, -2.0]),
       tol=st.sampled_from([1e-8, 1e-6, 1e-2]))
@fuzz(40)
def test_crosscheck_verdict(activation, estimator, param, delta, tol):
    """Their gradient = golden × (1 + δ) has relative error |δ| exactly (Frobenius norm), so the
    verdict is AGREE (0) when |δ| is well within tol and DIFFERS (1) when well beyond it."""
    arrays = base_arrays(activation)
    key = f"{estimator}__grad_{param}"
    arrays[key] = arrays[key] * (1 + delta)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "theirs.npz"
        np.savez(path, **arrays)
        argv = ["crosscheck", path, "--tol", repr(tol)]
        run = run_cli(argv)
    # golden files agree with deqref to ~1e-15 (rounding), far below every |δ| ≠ 0 and tol here
    want = 0 if abs(delta) <= tol / 10 else 1 if abs(delta) >= 10 * tol else None
    assert_ran(run, argv, codes=(0, 1))
    if want is not None:
        assert run.code == want, f"{key} × (1 + {delta:g}), tol {tol:g}: exit {run.code}\n{run.out}"


# ================================================================ at the process level
def _process(args, cwd):
    return subprocess.run([sys.executable, "-m", "deqref.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_process_exit_codes(tmp_path):
    """Three bad inputs through a real process: exit 2, one stderr line, no traceback."""
    truncated = tmp_path / "t.npz"
    np.savez(truncated, **base_arrays("tanh"))
    truncated.write_bytes(truncated.read_bytes()[:300])
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for args in (["crosscheck", truncated], ["reproduce", "solver_traces", "--quick", "--seed", "-1",
                                             "--out", tmp_path / "o"], ["golden", "--out", a_file]):
        p = _process(args, tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(lines) == 1, \
            f"deqref {args}: exit {p.returncode}, stderr {p.stderr[-500:]!r}"


def test_suite_budget():
    props = [n for n, f in globals().items() if n.startswith("test_") and hasattr(f, "hypothesis")]
    assert sorted(props) == sorted(BUDGETS)
    assert all(math.isfinite(v) and v >= 5 for v in BUDGETS.values())
