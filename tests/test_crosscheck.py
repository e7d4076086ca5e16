"""Golden reference files and ``deqref crosscheck``: the format, its contents against oracles
that share no code with deqref (plain NumPy formulas, finite differences), and the CLI's
verdicts and error messages. No PyTorch needed (see test_torch_crosscheck.py for that)."""
import numpy as np
import pytest

from deqref.cli import main
from deqref.crosscheck import (GOLDEN_CASES, RESIDUAL_MAX, CrosscheckError, estimator_name,
                               load_input, parse_estimator, write_golden)

from helpers import FD_RTOL, assert_close, fd_grad

# Plain-NumPy σ and σ' (independent of deqref.layers).
SIGMA = {"tanh": (np.tanh, lambda a: 1 - np.tanh(a) ** 2),
         "relu": (lambda a: np.maximum(a, 0), lambda a: (a > 0) * 1.0),
         "softplus": (lambda a: np.logaddexp(a, 0), lambda a: 1 / (1 + np.exp(-a)))}

# The golden numbers and these oracles are both float64 computations of the same quantity
# by different routes (LU solve vs. another LU solve, VJP vs. einsum): they differ by rounding,
# a few eps_64 ≈ 2.2e-16 times the condition number of I − J_h (≤ 1/(1 − 0.8) = 5 here) and
# the O(d) summation length. 1e-12 relative leaves a wide margin and still fails on any
# transposed Jacobian, missing factor λ or wrong sign, which are O(1) errors.
RTOL_64 = 1e-12


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    paths = write_golden(out)
    return {p.name: p for p in paths}


def load(path):
    with np.load(path, allow_pickle=False) as z:     # the format must not need pickle
        return {k: z[k] for k in z.files}


def F(z, h):
    sigma, _ = SIGMA[str(z["activation"])]
    return sigma(h @ z["W"].T + z["x"] @ z["U"].T + z["b"])


def layer_grads(z, h, y):
    """Σ_n ∂F/∂θ|_h y and per-sample ∂F/∂x|_h y, written out: r = y ⊙ σ'(a)."""
    _, dsigma = SIGMA[str(z["activation"])]
    r = y * dsigma(h @ z["W"].T + z["x"] @ z["U"].T + z["b"])
    return {"W": r.T @ h, "U": r.T @ z["x"], "b": r.sum(0), "x": r @ z["U"]}


def jac_h(z, h):
    """Standard-layout J_h per sample: s_i W[i, j]   # (n, d, d)"""
    _, dsigma = SIGMA[str(z["activation"])]
    s = dsigma(h @ z["W"].T + z["x"] @ z["U"].T + z["b"])
    return s[:, :, None] * z["W"][None]


def check(z, name, expected):
    for p in ("W", "U", "b", "x"):
        assert_close(z[f"{name}__grad_{p}"], expected[p], RTOL_64, f"{name} {p}")


# ------------------------------------------------------------------ the format
def test_golden_files_follow_the_format(golden):
    assert len(golden) == len(GOLDEN_CASES) >= 3
    activations = set()
    for path in golden.values():
        z = load(path)
        act = str(z["activation"])
        activations.add(act)
        d, d_x = z["U"].shape
        n = z["x"].shape[0]
        assert d <= 32 and n <= 4
        assert z["activation"].dtype.kind == "U"
        shapes = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x), "h_star": (n, d),
                  "grad_h": (n, d), "gdeq__B_inv": (n, d, d)}
        for key, shape in shapes.items():
            assert z[key].shape == shape and z[key].dtype == np.float64, key
        assert not np.allclose(z["W"], z["W"].T), "W must be non-symmetric"
        names = {k.split("__")[0] for k in z if "__grad_" in k}
        assert {"implicit", "jfb", "gdeq"} <= names
        assert any(nm.startswith("upg_k") for nm in names) and any(nm.startswith("bptt_T") for nm in names)
        for nm in names:
            parse_estimator(nm)
            for p, shape in (("W", (d, d)), ("U", (d, d_x)), ("b", (d,)), ("x", (n, d_x))):
                assert z[f"{nm}__grad_{p}"].shape == shape
        # h* solved to the contract, checked with the NumPy F above
        assert np.linalg.norm(F(z, z["h_star"]) - z["h_star"], axis=1).max() < RESIDUAL_MAX
    assert activations == {"tanh", "relu", "softplus"}


def test_estimator_names_round_trip():
    assert estimator_name("upg", k=5, lam=0.5) == "upg_k5_lam0.5"
    assert estimator_name("npg", k=10, lam=1.0) == "npg_k10_lam1"
    assert estimator_name("bptt", T=30) == "bptt_T30"
    assert parse_estimator("upg_k5_lam0.5") == ("upg", {"k": 5, "lam": 0.5})
    assert parse_estimator("bptt_T7") == ("bptt", {"T": 7})
    assert parse_estimator("implicit") == ("implicit", {})
    for bad in ("implicit_dense", "upg_k5", "upg_k0_lam0.5", "npg_k3_lam1.5", "bptt"):
        with pytest.raises(CrosscheckError, match="estimator"):
            parse_estimator(bad)


# ------------------------------------------------------------------ contents vs. oracles
def test_golden_gradients_match_plain_numpy_formulas(golden):
    for path in golden.values():
        z = load(path)
        h, g = z["h_star"], z["grad_h"]
        J = jac_h(z, h)                                            # (n, d, d) standard layout
        d = h.shape[1]
        # implicit: y = (I − J_h)⁻ᵀ g (paper's layout (I − ∂F/∂h)⁻¹ g)
        y = np.stack([np.linalg.solve((np.eye(d) - J[i]).T, g[i]) for i in range(len(g))])
        check(z, "implicit", layer_grads(z, h, y))
        check(z, "jfb", layer_grads(z, h, g))
        # NPG: y = λ Σ_{j<k} Bʲ g with B = λ J_hᵀ + (1 − λ) I
        for name in [k.split("__")[0] for k in z if k.startswith("npg_") and k.endswith("grad_W")]:
            _, o = parse_estimator(name)
            Bm = o["lam"] * np.transpose(J, (0, 2, 1)) + (1 - o["lam"]) * np.eye(d)
            y, term = np.zeros_like(g), g.copy()
            for _ in range(o["k"]):
                y, term = y + term, np.einsum("nij,nj->ni", Bm, term)
            check(z, name, layer_grads(z, h, o["lam"] * y))
        # GDEQ: y = −B_T⁻ᵀ g from the stored dense inverse
        y = -np.einsum("nji,nj->ni", z["gdeq__B_inv"], g)
        check(z, "gdeq", layer_grads(z, h, y))


def _unrolled(z, W, U, b, x, h0, k, lam):
    sigma, _ = SIGMA[str(z["activation"])]
    h = h0
    for _ in range(k):
        h = lam * sigma(h @ W.T + x @ U.T + b) + (1 - lam) * h
    return h


@pytest.mark.parametrize("name", ["upg_k5_lam0.5", "upg_k1_lam1", "bptt_T30"])
def test_golden_unrolled_gradients_match_finite_differences(golden, name):
    """UPG and BPTT against central differences of gᵀ h_k(θ, x) — shares nothing with deqref."""
    z = load(golden["golden_tanh_d8.npz"])
    kind, o = parse_estimator(name)
    if kind == "bptt":
        h0, k, lam = np.zeros_like(z["h_star"]), o["T"], 1.0     # plain iteration from 0
    else:
        h0, k, lam = z["h_star"], o["k"], o["lam"]               # damped steps from h*
    args = {p: z[p] for p in ("W", "U", "b", "x")}

    def loss(p, v):
        a = dict(args, **{p: v})
        return float(np.sum(z["grad_h"] * _unrolled(z, a["W"], a["U"], a["b"], a["x"], h0, k, lam)))

    for p in ("W", "U", "b", "x"):
        # FD_RTOL (helpers): central differences, float64, O(1) smooth function
        assert_close(z[f"{name}__grad_{p}"], fd_grad(lambda v: loss(p, v), args[p]), FD_RTOL,
                     f"{name} {p}")


# ------------------------------------------------------------------ the command
def _write(tmp_path, arrays, name="user.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_crosscheck_agrees_with_golden_files(golden, capsys):
    for path in golden.values():
        assert main(["crosscheck", str(path)]) == 0
        out = capsys.readouterr().out
        assert "VERDICT: AGREE" in out and "implicit" in out and "cosine" in out


def test_crosscheck_flags_a_transposed_jacobian(golden, tmp_path, capsys):
    """The classic layout bug, (I − J_h)⁻¹ g instead of (I − J_h)⁻ᵀ g, must fail the check."""
    z = load(golden["golden_tanh_d8.npz"])
    h, g = z["h_star"], z["grad_h"]
    J = jac_h(z, h)
    y = np.stack([np.linalg.solve(np.eye(h.shape[1]) - J[i], g[i]) for i in range(len(g))])
    wrong = layer_grads(z, h, y)
    arrays = {k: z[k] for k in ("activation", "W", "U", "b", "x", "grad_h")}
    arrays.update({f"implicit__grad_{p}": wrong[p] for p in ("W", "U", "b", "x")})
    assert main(["crosscheck", _write(tmp_path, arrays)]) == 1
    out = capsys.readouterr().out
    assert "VERDICT: DIFFERS" in out and "DIFFERS" in out.splitlines()[2]


def test_crosscheck_tolerance_option(golden, tmp_path, capsys):
    z = load(golden["golden_relu_d16.npz"])
    arrays = {k: z[k] for k in ("activation", "W", "U", "b", "x", "grad_h")}
    arrays["jfb__grad_W"] = z["jfb__grad_W"] * (1 + 1e-6)      # relative error 1e-6
    path = _write(tmp_path, arrays)
    assert main(["crosscheck", path]) == 1                      # default tol 1e-8
    assert main(["crosscheck", path, "--tol", "1e-5"]) == 0
    capsys.readouterr()


def _base(golden):
    z = load(golden["golden_tanh_d8.npz"])
    return z, {k: z[k] for k in ("activation", "W", "U", "b", "x", "grad_h", "jfb__grad_W")}


@pytest.mark.parametrize("edit, message", [
    (lambda a, z: a.pop("grad_h"), "missing key 'grad_h': expected an array of shape (3, 8)"),
    (lambda a, z: a.pop("activation"), "missing key 'activation'"),
    (lambda a, z: a.update(activation=np.array("gelu")), "key 'activation': expected one of"),
    (lambda a, z: a.update(U=z["U"].T), "key 'U': expected shape (8, ?), got (5, 8)"),
    (lambda a, z: a.update(x=z["x"][:, :2]), "key 'x': expected shape (?, 5), got (3, 2)"),
    (lambda a, z: a.update(jfb__grad_W=z["W"][:2]), "key 'jfb__grad_W': expected shape (8, 8)"),
    (lambda a, z: a.update(upg_k5__grad_W=z["W"]), "unknown estimator name 'upg_k5'"),
    (lambda a, z: a.update(jfb__grad_V=z["W"]), "unknown key 'jfb__grad_V'"),
    (lambda a, z: a.update(weights=z["W"]), "unknown key 'weights'"),
    (lambda a, z: a.update(gdeq__grad_W=z["W"]), "missing key 'gdeq__B_inv'"),
    (lambda a, z: a.pop("jfb__grad_W"), "no gradients found"),
    (lambda a, z: a.update(b=np.full(8, np.nan)), "key 'b': contains NaN"),
    (lambda a, z: a.update(b=np.arange(8)), "key 'b': expected a floating-point array"),
])
def test_crosscheck_errors_name_the_key(golden, tmp_path, capsys, edit, message):
    z, arrays = _base(golden)
    edit(arrays, z)
    assert main(["crosscheck", _write(tmp_path, arrays)]) == 2
    assert message in capsys.readouterr().err


def test_crosscheck_refuses_pickle(golden, tmp_path, capsys):
    z, arrays = _base(golden)
    arrays["activation"] = np.array(["tanh", None], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    assert main(["crosscheck", str(path)]) == 2
    assert "needs pickle" in capsys.readouterr().err
    with pytest.raises(CrosscheckError, match="no such file"):
        load_input(tmp_path / "absent.npz")


def test_crosscheck_notes_float32_input(golden, tmp_path, capsys):
    z, arrays = _base(golden)
    arrays["jfb__grad_W"] = arrays["jfb__grad_W"].astype(np.float32)
    # float32 rounding: relative error ≈ eps_32 ≈ 6e-8 > the default 1e-8, < 1e-6
    path = _write(tmp_path, arrays)
    assert main(["crosscheck", path, "--tol", "1e-6"]) == 0
    assert "jfb__grad_W is float32" in capsys.readouterr().out


def test_golden_command_is_seeded(golden, tmp_path, capsys):
    """``deqref golden --out DIR`` prints the paths and rewrites the same numbers every time."""
    assert main(["golden", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / name) for name in golden)
    for name, path in golden.items():
        a, b = load(path), load(tmp_path / name)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), f"{name}: {key} differs between runs"
