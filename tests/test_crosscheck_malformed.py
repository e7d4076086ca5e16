"""``deqref crosscheck`` on files it must refuse: every case ends in exit code 2 and one line on
stderr naming the path once, the key, bound or estimator, and why — never a traceback, never
a verdict. Headers are checked before any array is decompressed (a zip bomb stays small in
memory), key names are bounded (they are commands), and no verdict comes from a non-finite
reference."""
import io
import math
import tracemalloc
import zipfile

import numpy as np
import pytest

import deqref.crosscheck as cc
from deqref.cli import main
from deqref.crosscheck import (BYTES_MAX, D_MAX, DENSE_MAX, K_MAX, MEMBERS_MAX, N_MAX, STATES_MAX,
                               T_MAX, WORK_MAX, CrosscheckError, golden_arrays, parse_estimator)


@pytest.fixture(scope="module")
def golden():
    """The tanh golden case (d = 8, d_x = 5, n = 3) as a dict of arrays."""
    return golden_arrays("tanh", 8, 5, 3, 101)


def base(z, *extra):
    keys = ("activation", "W", "U", "b", "x", "grad_h", "jfb__grad_W") + extra
    return {k: z[k] for k in keys}


def save(tmp_path, arrays, name="user.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def npy_header(shape, descr="<f8") -> bytes:
    """Only the .npy header of an array of ``shape``: what a member claims, without the data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def write_zip(path, members: dict, compression=zipfile.ZIP_STORED):
    """An npz archive written member by member: name -> bytes."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def refused(capsys, path, *fragments):
    """crosscheck exits 2 with one line on stderr that names the path once and each fragment."""
    assert main(["crosscheck", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deqref crosscheck: error: {path}: "), err
    assert lines[0].count(str(path)) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert "VERDICT" not in out and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ not an npz file
def test_missing_file_and_directory(tmp_path, capsys):
    refused(capsys, tmp_path / "absent.npz", "no such file")
    refused(capsys, tmp_path, "is a directory")


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    refused(capsys, path, "is empty (0 bytes)", "zip archive of .npy arrays")


def test_text_file_is_not_called_pickled(tmp_path, capsys):
    path = tmp_path / "passwd.npz"
    path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin\n")
    line = refused(capsys, path, "is not an npz file", "zip", "b'root:x:0'")
    assert "pickle" not in line


def test_npy_renamed_npz(tmp_path, capsys, golden):
    path = tmp_path / "W.npz"
    path.write_bytes(npy_bytes(golden["W"]))
    refused(capsys, path, "is a .npy file (one array), not an npz archive", "numpy.savez")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, capsys, golden, keep):
    data = save(tmp_path, base(golden), "whole.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:int(len(data) * keep)])
    refused(capsys, path, "truncated or damaged zip archive")


def test_damaged_member_data(tmp_path, capsys, golden):
    """One byte of W's data flipped: the zip's CRC-32 says so when the member is read."""
    data = bytearray(save(tmp_path, base(golden), "whole.npz").read_bytes())
    w = npy_bytes(golden["W"])
    i = bytes(data).index(w) + len(w) - 3                     # inside W's last float
    data[i] ^= 0xFF
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    refused(capsys, path, "key 'W': ", "Bad CRC-32")


def test_member_that_is_not_npy(tmp_path, capsys, golden):
    members = {f"{k}.npy": npy_bytes(v) for k, v in base(golden).items()}
    members["notes.txt"] = b"hello"
    refused(capsys, write_zip(tmp_path / "m.npz", members), "member 'notes.txt' is not a .npy array")


def test_member_with_a_broken_header(tmp_path, capsys, golden):
    members = {f"{k}.npy": npy_bytes(v) for k, v in base(golden).items()}
    members["W.npy"] = b"\x93NUMPY\x01\x00" + b"\x10\x00" + b"{'descr': '<f8', 'sh"
    refused(capsys, write_zip(tmp_path / "h.npz", members), "key 'W': not a readable .npy array")


def test_too_many_members(tmp_path, capsys, golden):
    members = {f"{k}.npy": npy_bytes(v) for k, v in base(golden).items()}
    members.update({f"m{i}.npy": b"" for i in range(MEMBERS_MAX)})
    refused(capsys, write_zip(tmp_path / "many.npz", members), f"at most {MEMBERS_MAX}")


# ------------------------------------------------------------------ keys and shapes
@pytest.mark.parametrize("value, got", [
    (np.array("1"), "dtype <U1, shape ()"),
    (np.array([1, 2]), "dtype int64, shape (2,)"),
    (np.array(1.5), "dtype float64, shape ()"),
    (np.array(1.0), "dtype float64, shape ()"),
])
def test_malformed_format_version(tmp_path, capsys, golden, value, got):
    arrays = dict(base(golden), format_version=value)
    refused(capsys, save(tmp_path, arrays), "key 'format_version': expected the integer 1 or 2", got)


def test_other_format_version(tmp_path, capsys, golden):
    arrays = dict(base(golden), format_version=np.array(3))
    refused(capsys, save(tmp_path, arrays), "key 'format_version': expected 1 or 2, got 3")


def test_format_2_without_its_conventions(tmp_path, capsys, golden):
    """A file that says format 2 must carry the conventions format 2 is about."""
    arrays = dict(base(golden), format_version=np.array(2))
    refused(capsys, save(tmp_path, arrays), "missing key 'cell': format 2 carries it")


def test_format_version_1_is_read(tmp_path, capsys, golden):
    arrays = dict(base(golden), format_version=np.array(1))
    assert main(["crosscheck", str(save(tmp_path, arrays))]) == 0
    assert "VERDICT: AGREE" in capsys.readouterr().out


@pytest.mark.parametrize("edit, fragment", [
    (lambda z: dict(x=z["x"][:0], grad_h=z["grad_h"][:0]), "key 'x': n = 0 samples; expected 1 ≤ n"),
    (lambda z: dict(W=np.zeros((0, 0))), "key 'W': d = 0; expected 1 ≤ d ≤ 4096"),
    (lambda z: dict(U=z["U"][:, :0], x=z["x"][:, :0]), "key 'U': d_x = 0"),
])
def test_empty_dimensions(tmp_path, capsys, golden, edit, fragment):
    refused(capsys, save(tmp_path, dict(base(golden), **edit(golden))), fragment)


def test_bounds_are_what_the_docstring_says():
    """The bounds the messages and the module docstring state, in one place."""
    assert (D_MAX, N_MAX, K_MAX, T_MAX, MEMBERS_MAX) == (4096, 100_000, 1000, 10_000, 1024)
    assert (DENSE_MAX, STATES_MAX, WORK_MAX, BYTES_MAX) == (2 ** 24, 2 ** 24, 2 ** 32, 2 ** 28)
    for text in ("1 ≤ d ≤ 4096", "1 ≤ n ≤ 100000", "1 ≤ k ≤ 1000", "1 ≤ T ≤ 10000",
                 "2²⁴ = 16,777,216", "2²⁸ B = 256 MiB", "2³² ≈ 4.3e9", "≤ 1024"):
        assert text in cc.__doc__, text


# ------------------------------------------------------------------ key names are commands
@pytest.mark.parametrize("name, fragment", [
    ("upg_k100000000_lam1", "k = 100000000 is above the bound k ≤ 1000"),
    ("npg_k1001_lam0.5", "k = 1001 is above the bound k ≤ 1000"),
    ("bptt_T100000000", "T = 100000000 is above the bound T ≤ 10000"),
    ("bptt_T10001", "T = 10001 is above the bound T ≤ 10000"),
    ("bptt_T" + "9" * 5000, "(5000 digits) is above the bound T ≤ 10000"),
])
def test_step_counts_are_bounded(tmp_path, capsys, golden, name, fragment):
    """Refused from the name alone: the old code ran these for minutes or ran out of memory."""
    arrays = dict(base(golden), **{f"{name}__grad_b": golden["b"]})
    line = refused(capsys, save(tmp_path, arrays), fragment)
    assert len(line) < 400
    with pytest.raises(CrosscheckError, match="is above the bound"):
        parse_estimator(name)


def test_largest_step_counts_are_accepted():
    assert parse_estimator(f"upg_k{K_MAX}_lam0.5") == ("upg", {"k": K_MAX, "lam": 0.5})
    assert parse_estimator(f"bptt_T{T_MAX}") == ("bptt", {"T": T_MAX})
    assert parse_estimator("npg_k0005_lam1") == ("npg", {"k": 5, "lam": 1.0})


def _problem(d, d_x, n, seed=0):
    rng = np.random.default_rng(seed)
    return {"activation": np.array("tanh"), "W": 0.5 * np.eye(d), "U": rng.standard_normal((d, d_x)),
            "b": np.zeros(d), "x": rng.standard_normal((n, d_x)), "grad_h": rng.standard_normal((n, d))}


def test_states_kept_are_bounded(tmp_path, capsys):
    """T · n · d above 2^24 (each state kept for the backward pass) with T itself allowed."""
    d, n, T = 8, 210, T_MAX
    assert T * n * d > STATES_MAX and T * n * d * d < WORK_MAX
    arrays = dict(_problem(d, 5, n), **{f"bptt_T{T}__grad_b": np.zeros(d)})
    refused(capsys, save(tmp_path, arrays), "estimator 'bptt_T10000': T · n · d = 10000 · 210 · 8",
            "16,777,216 (2^24)")


def test_total_work_is_bounded(tmp_path, capsys):
    """Two unrolled estimators each within the bounds, together above 2^32 multiply-adds."""
    d, n, k = 256, 64, 1000
    assert k * n * d <= STATES_MAX and k * n * d * d <= WORK_MAX < 2 * k * n * d * d
    arrays = dict(_problem(d, 4, n), **{f"upg_k{k}_lam1__grad_b": np.zeros(d),
                                        f"npg_k{k}_lam1__grad_b": np.zeros(d)})
    refused(capsys, save(tmp_path, arrays), "Σ steps · n · d² = 8.39e+09", "(2^32)")


# ------------------------------------------------------------------ headers before data
def header_only(tmp_path, golden, claims: dict):
    """An archive whose members in ``claims`` are a .npy header claiming a shape, no data."""
    members = {f"{k}.npy": npy_bytes(v) for k, v in base(golden).items()}
    members.update({f"{k}.npy": npy_header(shape) for k, shape in claims.items()})
    return write_zip(tmp_path / "claims.npz", members)


@pytest.mark.parametrize("claims, fragment", [
    ({"W": (100_000, 100_000)}, "key 'W': d = 100000; expected 1 ≤ d ≤ 4096"),
    ({"W": (4096, 4096), "U": (4096, 5), "b": (4096,), "grad_h": (3, 4096)},
     "n · d² = 3 · 4096² = 50,331,648 is above the bound 16,777,216"),
    ({"x": (100_001, 5), "grad_h": (100_001, 8)}, "key 'x': n = 100001 samples"),
    ({"x": (100_000, 100_000)}, "key 'x': expected shape (?, 5), got (100000, 100000)"),
    ({"jfb__grad_W": (8, 8)}, "key 'jfb__grad_W': damaged member: its .npy header describes "
                              "512 bytes of data, the archive holds 0"),
])
def test_header_claims_are_checked_without_reading_data(tmp_path, capsys, golden, claims, fragment):
    """The old code ended in MemoryError on a header claiming 100000 × 100000."""
    refused(capsys, header_only(tmp_path, golden, claims), fragment)


def zip_bomb(path, arrays, key, header: bytes, zeros: int):
    """An npz whose member ``key`` is ``header`` and then ``zeros`` zero bytes, deflated while
    streaming (1 GiB of zeros compresses to ~1 MB; the test never holds it in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, a in arrays.items():
            zf.writestr(f"{k}.npy", npy_bytes(a))
        with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
            f.write(header)
            chunk = bytes(1 << 24)
            for start in range(0, zeros, len(chunk)):
                f.write(chunk[:min(len(chunk), zeros - start)])
    return path


def peak_memory(run):
    """(result, peak bytes allocated while ``run()`` ran), by tracemalloc (NumPy reports its
    array buffers to it)."""
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_1_gib_zip_bomb_is_refused_in_little_memory(tmp_path, capsys, golden):
    """x claims (100000, 1343) float64 and holds it: 1 GiB of zeros, ~1 MB on disk, every shape
    consistent. The headers' total is above BYTES_MAX, so nothing is decompressed. The old code
    decompressed every member first: 2.4 GB resident, ~30 s."""
    n, d_x = 100_000, 1343
    zeros = n * d_x * 8
    assert zeros >= 2 ** 30
    arrays = dict(base(golden), U=np.zeros((8, d_x)), grad_h=np.zeros((n, 8)))
    arrays.pop("x")
    claimed = zeros + sum(a.nbytes for a in arrays.values())
    path = zip_bomb(tmp_path / "bomb.npz", arrays, "x", npy_header((n, d_x)), zeros)
    assert path.stat().st_size < 16 * 2 ** 20
    code, peak = peak_memory(lambda: main(["crosscheck", str(path)]))
    assert code == 2
    err = capsys.readouterr().err
    assert f"the arrays' .npy headers claim {claimed:,} bytes in all" in err and "256 MiB" in err
    assert peak < 16 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB"


def test_a_member_longer_than_its_header_is_refused_unread(tmp_path, capsys, golden):
    """A small header (3, 5) followed by 64 MiB of zeros: the member's size in the archive's
    directory disagrees with its header, refused before any data is decompressed."""
    arrays = base(golden)
    arrays.pop("x")
    path = zip_bomb(tmp_path / "trailing.npz", arrays, "x", npy_header((3, 5)), 64 * 2 ** 20)
    code, peak = peak_memory(lambda: main(["crosscheck", str(path)]))
    assert code == 2
    assert "key 'x': damaged member: its .npy header describes 120 bytes of data, the archive " \
           "holds 67,108,864" in capsys.readouterr().err
    assert peak < 8 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------ no verdict from NaN
def test_overflowing_reference_is_no_verdict(tmp_path, capsys, golden):
    """grad_h = 1e308: deqref's implicit gradient overflows float64. The old code printed
    relative errors NaN and 'VERDICT: AGREE' with exit code 0."""
    arrays = dict(base(golden, "implicit__grad_W"), grad_h=np.full((3, 8), 1e308))
    refused(capsys, save(tmp_path, arrays), "deqref could not compute a reference for")


def test_no_verdict_from_a_non_finite_reference(tmp_path, capsys, golden, monkeypatch):
    """Whatever makes deqref's reference non-finite, it is named and there is no verdict."""
    real = cc._reference_estimate

    def nan_in_W(*args, **kwargs):
        est = real(*args, **kwargs)
        est.W = est.W * np.nan
        return est

    monkeypatch.setattr(cc, "_reference_estimate", nan_in_W)
    refused(capsys, save(tmp_path, base(golden)),
            "deqref could not compute a reference for jfb: its W gradient is not finite")


@pytest.mark.parametrize("error, fragment", [
    (FloatingPointError("jfb: the output overflowed"), "jfb: the output overflowed"),
    (np.linalg.LinAlgError("Singular matrix"), "singular to working precision"),
])
def test_reference_failures_are_no_verdict(tmp_path, capsys, golden, monkeypatch, error, fragment):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(cc, "_reference_estimate", fails)
    refused(capsys, save(tmp_path, base(golden)), "deqref could not compute a reference for jfb",
            fragment)


def test_a_flagged_reference_is_no_verdict(tmp_path, capsys, golden, monkeypatch):
    real = cc._reference_estimate

    def flagged(*args, **kwargs):
        est = real(*args, **kwargs)
        try:
            est.flags = ("adjoint solve did not converge",)
        except AttributeError:                       # a frozen Gradient: wrap it
            est = type("Flagged", (), {"W": est.W, "U": est.U, "b": est.b, "x": est.x,
                                       "flags": ("adjoint solve did not converge",)})()
        return est

    monkeypatch.setattr(cc, "_reference_estimate", flagged)
    refused(capsys, save(tmp_path, base(golden)), "deqref flags it: adjoint solve did not converge")


def test_compare_does_not_overflow():
    """Oracle: the same quantities after dividing both arrays by 1e300 by hand."""
    rng = np.random.default_rng(0)
    mine = 1e300 * rng.standard_normal(50)
    theirs = mine * (1 + 1e-3 * rng.standard_normal(50))
    err, cos = cc.compare(mine, theirs)
    a, b = mine / 1e300, theirs / 1e300
    # the hand-scaled oracle rounds differently (1e300 is not a power of two): a few eps
    assert math.isclose(err, np.linalg.norm(b - a) / np.linalg.norm(a), rel_tol=1e-13)
    assert math.isclose(cos, a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel_tol=1e-13)
    err, cos = cc.compare(np.full(4, 1e308), np.full(4, -1e308))
    assert err == 2.0 and math.isclose(cos, -1.0, rel_tol=1e-15)


# ------------------------------------------------------------------ no fixed point, singular
def test_no_fixed_point(tmp_path, capsys, golden):
    """F(h) = h + c (identity activation, W = I): no fixed point. Broyden runs away to an h so
    large that F(h) − h rounds to 0; the old code took that as h* and crashed in the solve."""
    arrays = dict(base(golden), activation=np.array("identity"), W=np.eye(8))
    refused(capsys, save(tmp_path, arrays), "no fixed point found")


def test_singular_jacobian_at_the_fixed_point(tmp_path, capsys, golden):
    """F(h) = W h + c with W = diag(1, ½, …) and c₀ = 0: h* exists (h₀ stays 0) but I − ∂F/∂h
    is singular, so the implicit gradient does not exist; the old code ended in LinAlgError."""
    arrays = dict(base(golden, "implicit__grad_W"), activation=np.array("identity"),
                  W=np.diag([1.0] + [0.5] * 7), U=np.zeros((8, 5)), b=np.r_[0.0, np.ones(7)])
    refused(capsys, save(tmp_path, arrays), "deqref could not compute a reference for implicit",
            "singular")


def test_runaway_iterates_are_not_a_fixed_point(golden):
    """solve_tight judges ‖F(h) − h‖ itself and only where float64 resolves it (‖h‖ < H_MAX)."""
    from deqref.layers import Layer
    layer = Layer(np.eye(8), golden["U"], golden["b"], "identity")
    with pytest.raises(CrosscheckError, match="no fixed point found"):
        cc.solve_tight(layer, golden["x"])
    assert cc.H_MAX == pytest.approx(1e-12 / np.finfo(np.float64).eps)


@pytest.mark.parametrize("tol", [True, "1e-8", None, float("nan"), 0.0, -1e-8])
def test_crosscheck_file_checks_tol(tmp_path, capsys, golden, tol):
    """The API checks tol as the command does (True is no number; a string is no tolerance)."""
    assert cc.crosscheck_file(save(tmp_path, base(golden)), tol) == 2
    out, err = capsys.readouterr()
    assert err == f"deqref crosscheck: error: --tol must be a finite number > 0, got {tol!r}\n"
    assert out == ""
