"""Property-based tests of ``deqref crosscheck`` on inputs nobody wrote on purpose: random
damage to the bytes of a valid file, and random small archives of keys, shapes, dtypes and
values. The invariant, for every input: the command returns 0, 1 or 2 and raises nothing;
with 2 it prints exactly one line on stderr and no verdict; a verdict (0 or 1) comes only from
finite relative errors, and AGREE (0) only when every one of them is within the tolerance."""
import io
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deqref.cli import main
from deqref.crosscheck import golden_arrays

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOL = 1e-8
ROW = re.compile(r"^(\S+)\s+([WUbx])\s+(\S+)\s")


@pytest.fixture(scope="module")
def valid_bytes():
    buf = io.BytesIO()
    arrays = golden_arrays("tanh", 8, 5, 3, 101)
    np.savez(buf, **{k: arrays[k] for k in ("activation", "W", "U", "b", "x", "grad_h",
                                            "jfb__grad_W", "upg_k5_lam0.5__grad_b", "format_version")})
    return buf.getvalue()


def check_invariant(capsys, data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.npz"
        path.write_bytes(data)
        code = main(["crosscheck", str(path), "--tol", str(TOL)])
    out, err = capsys.readouterr()
    assert code in (0, 1, 2)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("deqref crosscheck: error: "), err
        assert "VERDICT" not in out
        return code
    errors = [float(m.group(3)) for m in map(ROW.match, out.splitlines()) if m and m.group(1) != "estimator"]
    assert errors and all(math.isfinite(e) for e in errors), out
    assert ("VERDICT: AGREE" in out) == (code == 0) == all(e <= TOL for e in errors), out
    return code


damage = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10 ** 6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 6), st.integers(0, 255)),
), min_size=1, max_size=4)


@FUZZ
@given(ops=damage)
def test_damaged_bytes_never_crash(capsys, valid_bytes, ops):
    data = bytearray(valid_bytes)
    for op, pos, value in ops:
        pos %= max(len(data), 1)
        if op == "flip" and data:
            data[pos] ^= value
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([value]) * 8
    check_invariant(capsys, bytes(data))


REQUIRED = ["activation", "W", "U", "b", "x", "grad_h"]
OPTIONAL = ["h_star", "format_version", "gdeq__B_inv", "weights", "jfb__grad_V", "upg_k3__grad_W"]
ESTIMATORS = ["jfb__grad_W", "implicit__grad_b", "gdeq__grad_U", "upg_k{}_lam0.5__grad_x",
              "npg_k{}_lam1__grad_W", "bptt_T{}__grad_b", "implicit__grad_x", "jfb__grad_U"]
STEPS = [1, 7, 60, 1000] * 3 + [0, 1001, 10 ** 4, 10 ** 8]
ODD_DTYPES = ["<f4", ">f8", "<f2", "<i8", "|b1", "<U4", "<c16"]
VALUES = st.sampled_from([0.0, 1.0, -0.5, 1e-300, 1e300, 1e308, np.nan, np.inf])
ACTIVATION = st.sampled_from(["tanh", "relu", "softplus", "identity"] * 3 + ["gelu", ""])


@st.composite
def archives(draw):
    """A small archive: the required keys with the right shapes and a few estimators, then now
    and then something wrong (a key missing or unknown, a shape, a dtype, an extreme value)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32)))
    one_in = lambda k: rng.random() * k < 1                              # noqa: E731
    # (the rare cases by the seeded rng: Hypothesis draws boundary values far more often)
    d = 0 if one_in(20) else draw(st.integers(1, 5))
    d_x = 0 if one_in(20) else draw(st.integers(1, 4))
    n = 0 if one_in(20) else draw(st.integers(1, 3))
    W = rng.standard_normal((d, d))
    W *= 0.8 / max(np.linalg.norm(W, 2), 1e-300) if d else 1.0          # a contraction, mostly
    arrays = {"activation": np.array(draw(ACTIVATION)), "W": W,
              "U": rng.standard_normal((d, d_x)), "b": 0.1 * rng.standard_normal(d),
              "x": rng.standard_normal((n, d_x)), "grad_h": rng.standard_normal((n, d))}
    params = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x)}
    keys = draw(st.lists(st.sampled_from(ESTIMATORS), min_size=1, max_size=4, unique=True))
    keys += draw(st.lists(st.sampled_from(OPTIONAL), max_size=2, unique=True)) if one_in(3) else []
    for key in keys:
        key = key.format(draw(st.sampled_from(STEPS)))
        if key == "format_version":
            arrays[key] = np.array(draw(st.sampled_from([1, 1, 2, 1.0, "1"])))
        else:
            shape = {"h_star": (n, d), "gdeq__B_inv": (n, d, d)}.get(key, params.get(key[-1], (d,)))
            arrays[key] = rng.standard_normal(shape)
    if "gdeq__grad_U" in arrays and not one_in(5):
        arrays["gdeq__B_inv"] = -np.broadcast_to(np.eye(d), (n, d, d)).copy()
    if one_in(8):
        del arrays[draw(st.sampled_from(REQUIRED))]
    for key in list(arrays):
        if key in ("activation", "format_version"):
            continue
        if one_in(15):
            arrays[key] = rng.standard_normal(tuple(draw(st.lists(st.integers(0, 4), max_size=3))))
        if one_in(6) and arrays[key].size:
            arrays[key].flat[draw(st.integers(0, arrays[key].size - 1))] = draw(VALUES)
        if one_in(15):
            with np.errstate(all="ignore"):
                arrays[key] = arrays[key].astype(draw(st.sampled_from(ODD_DTYPES)))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@FUZZ
@given(data=archives())
def test_random_archives_never_crash(capsys, data):
    check_invariant(capsys, data)
