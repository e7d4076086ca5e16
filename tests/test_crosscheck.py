"""Golden reference files and ``deqref crosscheck``: the format (1 and 2), the files' contents
against oracles that share no code with deqref (plain NumPy formulas, a hand-written reverse
pass, finite differences), the separation of every two estimators in a format-2 file, planted
implementation errors that the command must catch, and its verdicts and error messages. No
PyTorch or JAX needed (see test_torch_crosscheck.py and test_jax_crosscheck.py for those)."""
import itertools

import numpy as np
import pytest

import deqref
from deqref.cli import main
from deqref.crosscheck import (GOLDEN_CASES, RESIDUAL_MAX, CrosscheckError, estimator_name,
                               load_input, parse_estimator, write_golden)

from helpers import FD_RTOL, assert_close, fd_grad

# Plain-NumPy σ and σ' (independent of deqref.layers); σ'(0) = 0 for ReLU, as the files say.
SIGMA = {"tanh": (np.tanh, lambda a: 1 - np.tanh(a) ** 2),
         "relu": (lambda a: np.maximum(a, 0), lambda a: (a > 0) * 1.0),
         "softplus": (lambda a: np.logaddexp(a, 0), lambda a: 1 / (1 + np.exp(-a)))}
PARAMS = ("W", "U", "b", "x")

# The golden numbers and these oracles are both float64 computations of the same quantity
# by different routes (LU solve vs. another LU solve, VJP vs. einsum): they differ by rounding,
# a few eps_64 ≈ 2.2e-16 times the condition number of I − J_h (≤ 1/(1 − 0.8) = 5 here) and
# the O(d) summation length. 1e-12 relative leaves a wide margin and still fails on any
# transposed Jacobian, missing factor λ or wrong sign, which are O(1) errors.
RTOL_64 = 1e-12
# Every two estimators of a format-2 golden file differ by at least this much, relative.
SEPARATION = 1e-3


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The format-2 golden files that ``deqref golden`` writes."""
    paths = write_golden(tmp_path_factory.mktemp("golden"))
    return {p.name: p for p in paths}


@pytest.fixture(scope="module")
def golden_v1(tmp_path_factory):
    """Format-1 golden files (every estimator at h*), which crosscheck still reads."""
    paths = write_golden(tmp_path_factory.mktemp("golden_v1"), format_version=1)
    return {p.name: p for p in paths}


def load(path):
    with np.load(path, allow_pickle=False) as z:     # the format must not need pickle
        return {k: z[k] for k in z.files}


def names_of(z):
    return sorted({k.split("__")[0] for k in z if "__grad_" in k})


def F(z, h, x=None):
    sigma, _ = SIGMA[str(z["activation"])]
    return sigma(h @ z["W"].T + (z["x"] if x is None else x) @ z["U"].T + z["b"])


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


def conventions(z, name):
    """(kind, start state, k or T, λ) of estimator ``name`` read from the file's own keys
    (format 2), or format 1's fixed rules from the name."""
    if f"{name}__kind" in z:
        kind = str(z[f"{name}__kind"])
        steps = int(z[f"{name}__k"]) if f"{name}__k" in z else int(z.get(f"{name}__T", 0))
        lam = float(z[f"{name}__lam"]) if f"{name}__lam" in z else 1.0
        start = {"zeros": np.zeros_like(z["h_star"])}.get(str(z[f"{name}__start"]))
        if start is None:
            start = z[str(z[f"{name}__start"])]          # the key it names: h_star or h_eval
        return kind, start, steps, lam
    kind, o = parse_estimator(name)
    start = np.zeros_like(z["h_star"]) if kind == "bptt" else z["h_star"]
    return kind, start, o.get("k", o.get("T", 0)), o.get("lam", 1.0)


def backprop_unroll(z, h0, steps, lam, g):
    """Reverse-mode derivative of gᵀ h_steps through h_{t+1} = λ σ(W h_t + U x + b) +
    (1 − λ) h_t from the constant h0, written out by hand: Σ_n for W, U, b, per sample for x."""
    sigma, dsigma = SIGMA[str(z["activation"])]
    W, U, b, x = z["W"], z["U"], z["b"], z["x"]
    hs, pre = [h0], []
    for _ in range(steps):
        pre.append(hs[-1] @ W.T + x @ U.T + b)
        hs.append(lam * sigma(pre[-1]) + (1 - lam) * hs[-1])
    out = {"W": np.zeros_like(W), "U": np.zeros_like(U), "b": np.zeros_like(b),
           "x": np.zeros_like(x)}
    bar = g
    for t in reversed(range(steps)):
        r = lam * bar * dsigma(pre[t])
        out["W"] += r.T @ hs[t]
        out["U"] += r.T @ x
        out["b"] += r.sum(0)
        out["x"] += r @ U
        bar = r @ W + (1 - lam) * bar
    return out


def oracle(z, name, start=None, steps=None, lam=None):
    """A g of estimator ``name`` by plain NumPy, at the conventions the file states (or the
    ones passed in, to plant an error)."""
    kind, h0, n_steps, lam_f = conventions(z, name)
    h0 = h0 if start is None else start
    n_steps = n_steps if steps is None else steps
    lam_f = lam_f if lam is None else lam
    g, d = z["grad_h"], z["h_star"].shape[1]
    if kind in ("upg", "bptt"):
        return backprop_unroll(z, h0, n_steps, lam_f, g)
    J = jac_h(z, h0)                                                   # (n, d, d)
    if kind == "implicit":                           # y = (I − J_h)⁻ᵀ g at h*
        y = np.stack([np.linalg.solve((np.eye(d) - J[i]).T, g[i]) for i in range(len(g))])
    elif kind == "jfb":
        y = g
    elif kind == "npg":                              # y = λ Σ_{j<k} Bʲ g, B = λ J_hᵀ + (1 − λ) I
        Bm = lam_f * np.transpose(J, (0, 2, 1)) + (1 - lam_f) * np.eye(d)
        y, term = np.zeros_like(g), g.copy()
        for _ in range(n_steps):
            y, term = y + term, np.einsum("nij,nj->ni", Bm, term)
        y = lam_f * y
    else:                                            # gdeq: y = −B_T⁻ᵀ g
        y = -np.einsum("nji,nj->ni", z["gdeq__B_inv"], g)
    return layer_grads(z, h0, y)


def check(z, name, expected, rtol=RTOL_64):
    for p in PARAMS:
        assert_close(z[f"{name}__grad_{p}"], expected[p], rtol, f"{name} {p}")


def rel(a, b):
    """‖a − b‖ / ‖b‖, Frobenius (plain NumPy, not deqref.crosscheck.compare)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ the format
def test_golden_files_follow_format_2(golden):
    assert len(golden) == len(GOLDEN_CASES) >= 3
    activations = set()
    for (activation, d, d_x, n, seed), path in zip(GOLDEN_CASES, golden.values()):
        z = load(path)
        assert str(z["activation"]) == activation
        activations.add(activation)
        assert int(z["format_version"]) == 2 and z["format_version"].dtype.kind == "i"
        assert d <= 32 and n <= 4
        shapes = {"W": (d, d), "U": (d, d_x), "b": (d,), "x": (n, d_x), "h_star": (n, d),
                  "grad_h": (n, d), "gdeq__B_inv": (n, d, d), "h_eval": (n, d),
                  "h_star_residual": (n,), "h_eval_residual": (n,)}
        for key, shape in shapes.items():
            assert z[key].shape == shape and z[key].dtype == np.float64, key
        for key in ("activation", "cell", "cell_description", "deqref_version", "layout_W",
                    "layout_U", "layout_batch", "layout_B_inv"):
            assert z[key].dtype.kind == "U" and z[key].shape == (), key        # plain strings
        assert str(z["deqref_version"]) == deqref.__version__
        assert int(z["seed"]) == seed and str(z["cell"]) == "affine"
        assert float(z["sigma_prime_at_kink"]) == 0.0
        for key, code in (("layout_W", "out_in:"), ("layout_U", "out_in:"),
                          ("layout_batch", "rows:"), ("layout_B_inv", "standard:")):
            assert str(z[key]).startswith(code), key
        assert not np.allclose(z["W"], z["W"].T), "W must be non-symmetric"
        # h* solved to the contract and its residual recorded, checked with the NumPy F above
        r_star = np.linalg.norm(F(z, z["h_star"]) - z["h_star"], axis=1)
        assert r_star.max() < RESIDUAL_MAX
        assert np.allclose(z["h_star_residual"], r_star, rtol=0, atol=1e-15)
        # h_eval: h_eval_steps plain steps from 0, an inexact point (residual ≫ 1e-12)
        h = np.zeros((n, d))
        for _ in range(int(z["h_eval_steps"])):
            h = F(z, h)
        assert_close(z["h_eval"], h, 1e-15, "h_eval")
        r_eval = np.linalg.norm(F(z, h) - h, axis=1)
        assert_close(z["h_eval_residual"], r_eval, 1e-13, "h_eval_residual")
        assert r_eval.min() > 1e-2
        # every estimator describes itself; its numbers agree with its name
        names = names_of(z)
        assert len(names) == 10
        for nm in names:
            kind, o = parse_estimator(nm)
            assert str(z[f"{nm}__kind"]) == kind
            for key, value in o.items():
                assert z[f"{nm}__{key}"].item() == value and z[f"{nm}__{key}"].shape == ()
            start, loss = str(z[f"{nm}__start"]), str(z[f"{nm}__loss_at"])
            expected = {"implicit": ("h_star", "h_star"), "gdeq": ("h_star", "h_star"),
                        "jfb": ("h_eval", "h_eval"), "npg": ("h_eval", "h_eval"),
                        "upg": ("h_eval", "h_k"), "bptt": ("zeros", "h_T")}[kind]
            assert (start, loss) == expected, nm
            for p, shape in (("W", (d, d)), ("U", (d, d_x)), ("b", (d,)), ("x", (n, d_x))):
                assert z[f"{nm}__grad_{p}"].shape == shape
        kinds = {str(z[f"{nm}__kind"]) for nm in names}
        assert kinds == {"implicit", "jfb", "npg", "upg", "bptt", "gdeq"}
        assert {int(z[f"{nm}__T"]) for nm in names if nm.startswith("bptt")} <= {3, 4, 5}
        assert any(float(z[f"{nm}__lam"]) < 1 for nm in names if nm.startswith("bptt"))
        assert all(int(z[f"{nm}__k"]) >= 2 for nm in names if nm[:3] in ("upg", "npg"))
    assert activations == {"tanh", "relu", "softplus"}


def test_golden_v1_files_follow_format_1(golden_v1):
    for path in golden_v1.values():
        z = load(path)
        assert int(z["format_version"]) == 1
        assert not any("__start" in k or k in ("cell", "h_eval") for k in z)
        assert {"implicit", "jfb", "gdeq", "upg_k5_lam0.5", "bptt_T30"} <= set(names_of(z))


def test_estimator_names_round_trip():
    assert estimator_name("upg", k=5, lam=0.5) == "upg_k5_lam0.5"
    assert estimator_name("npg", k=10, lam=1.0) == "npg_k10_lam1"
    assert estimator_name("bptt", T=30) == "bptt_T30"
    assert estimator_name("bptt", T=5, lam=0.7) == "bptt_T5_lam0.7"
    assert estimator_name("bptt", T=5, lam=1.0) == "bptt_T5"
    assert parse_estimator("upg_k5_lam0.5") == ("upg", {"k": 5, "lam": 0.5})
    assert parse_estimator("bptt_T7") == ("bptt", {"T": 7})
    assert parse_estimator("bptt_T5_lam0.7") == ("bptt", {"T": 5, "lam": 0.7})
    assert parse_estimator("implicit") == ("implicit", {})
    for bad in ("implicit_dense", "upg_k5", "upg_k0_lam0.5", "npg_k3_lam1.5", "bptt",
                "bptt_T5_lam0", "bptt_T5_lam", "bptt_lam0.5"):
        with pytest.raises(CrosscheckError, match="estimator"):
            parse_estimator(bad)


# ------------------------------------------------------------------ contents vs. oracles
def test_golden_gradients_match_plain_numpy_formulas(golden, golden_v1):
    """Every estimator of every file, formats 1 and 2, at the conventions the file states."""
    for path in list(golden.values()) + list(golden_v1.values()):
        z = load(path)
        for name in names_of(z):
            check(z, name, oracle(z, name))


@pytest.mark.parametrize("name", ["upg_k5_lam0.5", "upg_k3_lam1", "bptt_T4", "bptt_T5_lam0.7"])
def test_golden_unrolled_gradients_match_finite_differences(golden, name):
    """UPG and BPTT against central differences of gᵀ h_k(θ, x) from the file's start — the
    check of the hand-written reverse pass above, and of the file; shares nothing with deqref."""
    z = load(golden["golden_tanh_d8.npz"])
    _, h0, steps, lam = conventions(z, name)
    sigma, _ = SIGMA["tanh"]
    args = {p: z[p] for p in PARAMS}

    def loss(p, v):
        a = dict(args, **{p: v})
        h = h0
        for _ in range(steps):
            h = lam * sigma(h @ a["W"].T + a["x"] @ a["U"].T + a["b"]) + (1 - lam) * h
        return float(np.sum(z["grad_h"] * h))

    for p in PARAMS:
        # FD_RTOL (helpers): central differences, float64, O(1) smooth function
        assert_close(z[f"{name}__grad_{p}"], fd_grad(lambda v: loss(p, v), args[p]), FD_RTOL,
                     f"{name} {p}")


def separation(a: dict, b: dict, params=PARAMS) -> float:
    """How far apart two estimates are as ``deqref crosscheck`` sees them: with either one as
    the reference, the largest relative error over ``params``; the smaller of the two ways."""
    return min(max(rel(a[p], b[p]) for p in params), max(rel(b[p], a[p]) for p in params))


def test_every_two_estimators_of_a_golden_file_differ(golden):
    """Within each format-2 file every two estimators differ by ≥ 1e-3 relative, so that an
    implementation that swaps them fails ``deqref crosscheck`` at any tol < 1e-3. For the
    smooth activations this holds for each parameter alone (a file may carry only grad_b).
    With ReLU the U, b and x gradients depend on the states only through σ′'s 0/1 pattern,
    which h_eval, the unrolled states and h* share here (no kink is crossed): UPG and NPG of
    one (k, λ) then have the very same U, b and x gradients, and only the W gradient (which
    involves the states themselves) separates every pair."""
    for path in golden.values():
        z = load(path)
        grads = {nm: {p: z[f"{nm}__grad_{p}"] for p in PARAMS} for nm in names_of(z)}
        relu = str(z["activation"]) == "relu"
        for a, b in itertools.combinations(grads, 2):
            assert separation(grads[a], grads[b]) >= SEPARATION, (path.name, a, b)
            for p in ("W",) if relu else PARAMS:
                assert separation(grads[a], grads[b], (p,)) >= SEPARATION, (path.name, a, b, p)
            if relu and {a[:3], b[:3]} == {"upg", "npg"} and a[3:] == b[3:]:
                for p in ("U", "b", "x"):
                    assert rel(grads[a][p], grads[b][p]) < 1e-13, (a, b, p)      # the same


def test_format_1_files_could_not_tell_them_apart(golden_v1):
    """Why format 2: at an exact h* UPG and NPG coincide and upg_k1_lam1 is jfb."""
    z = load(golden_v1["golden_tanh_d8.npz"])
    g = {nm: {p: z[f"{nm}__grad_{p}"] for p in PARAMS} for nm in names_of(z)}
    assert separation(g["upg_k5_lam0.5"], g["npg_k5_lam0.5"]) < 1e-14
    assert separation(g["upg_k1_lam1"], g["jfb"]) < 1e-14
    assert separation(g["bptt_T30"], g["implicit"]) < 1e-8


# ------------------------------------------------------------------ planted errors
def _write(tmp_path, arrays, name="user.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _swap(z, a, b):
    return {f"{a}__grad_{p}": z[f"{b}__grad_{p}"] for p in PARAMS}


PLANTS = {
    # an implementation that computes NPG where UPG is asked for, and the other way round
    "upg computed as npg": lambda z: _swap(z, "upg_k5_lam0.5", "npg_k5_lam0.5"),
    "npg computed as upg": lambda z: _swap(z, "npg_k3_lam1", "upg_k3_lam1"),
    # BPTT started at h* instead of 0, or one step too few / too many
    "bptt from h*": lambda z: {f"bptt_T4__grad_{p}": v for p, v in
                               oracle(z, "bptt_T4", start=z["h_star"]).items()},
    "bptt T - 1": lambda z: {f"bptt_T4__grad_{p}": v for p, v in oracle(z, "bptt_T4", steps=3).items()},
    "bptt T + 1": lambda z: {f"bptt_T4__grad_{p}": v for p, v in oracle(z, "bptt_T4", steps=5).items()},
    "damped bptt undamped": lambda z: {f"bptt_T5_lam0.7__grad_{p}": v for p, v in
                                       oracle(z, "bptt_T5_lam0.7", lam=1.0).items()},
    # the phantom gradient taken at h* although the file says h_eval
    "upg from h*": lambda z: {f"upg_k5_lam0.5__grad_{p}": v for p, v in
                              oracle(z, "upg_k5_lam0.5", start=z["h_star"]).items()},
    "jfb at h*": lambda z: {f"jfb__grad_{p}": v for p, v in oracle(z, "jfb", start=z["h_star"]).items()},
}


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_planted_error_makes_crosscheck_exit_1(golden, tmp_path, capsys, activation, plant):
    """A golden file whose values for one estimator come from a wrong implementation (computed
    by the NumPy oracle above with the error planted): crosscheck names it and exits 1."""
    path = next(p for p in golden.values() if activation in p.name)
    z = load(path)
    wrong = PLANTS[plant](z)
    name = next(iter(wrong)).split("__")[0]
    assert main(["crosscheck", _write(tmp_path, {**z, **wrong})]) == 1
    out = capsys.readouterr().out
    assert "VERDICT: DIFFERS" in out
    rows = [ln.split() for ln in out.splitlines() if ln.endswith("DIFFERS") and "VERDICT" not in ln]
    assert rows and {r[0] for r in rows} == {name}, out


def test_the_oracle_itself_agrees_with_crosscheck(golden, tmp_path, capsys):
    """Control for the plants: the same files rebuilt from the NumPy oracle, nothing planted,
    agree at 1e-12."""
    for path in golden.values():
        z = load(path)
        for name in names_of(z):
            z.update({f"{name}__grad_{p}": v for p, v in oracle(z, name).items()})
        assert main(["crosscheck", _write(tmp_path, z), "--tol", "1e-12"]) == 0
    capsys.readouterr()


def test_the_upg_npg_swap_passes_format_1_and_fails_format_2(golden, golden_v1, tmp_path, capsys):
    z1 = load(golden_v1["golden_tanh_d8.npz"])
    assert main(["crosscheck", _write(tmp_path, {**z1, **_swap(z1, "upg_k5_lam0.5", "npg_k5_lam0.5")})]) == 0
    z2 = load(golden["golden_tanh_d8.npz"])
    assert main(["crosscheck", _write(tmp_path, {**z2, **_swap(z2, "upg_k5_lam0.5", "npg_k5_lam0.5")})]) == 1
    capsys.readouterr()


def test_lambda_is_read_as_a_number(golden, tmp_path, capsys):
    """λ = 1/3 cannot be written in a name (upg_k5_lam0.333333); the number __lam carries it
    to full precision, and deqref uses it."""
    z = load(golden["golden_tanh_d8.npz"])
    name, third = "upg_k5_lam0.333333", 1 / 3
    exact = oracle(z, "upg_k5_lam0.5", lam=third)                  # k = 5 from h_eval, λ = 1/3
    keep = {k: v for k, v in z.items() if "__" not in k or k.startswith("upg_k5_lam0.5__")}
    arrays = {k.replace("upg_k5_lam0.5", name): v for k, v in keep.items()}
    arrays.update({f"{name}__lam": np.array(third), **{f"{name}__grad_{p}": exact[p] for p in PARAMS}})
    assert main(["crosscheck", _write(tmp_path, arrays), "--tol", "1e-12"]) == 0
    arrays[f"{name}__lam"] = np.array(0.333333)                    # the rounded λ: 1e-6 apart
    assert main(["crosscheck", _write(tmp_path, arrays), "--tol", "1e-12"]) == 1
    capsys.readouterr()


# ------------------------------------------------------------------ the command
def test_crosscheck_agrees_with_golden_files(golden, golden_v1, capsys):
    for path in list(golden.values()) + list(golden_v1.values()):
        assert main(["crosscheck", str(path), "--tol", "1e-12"]) == 0
        out = capsys.readouterr().out
        assert "VERDICT: AGREE" in out and "implicit" in out and "cosine" in out
        if "v1" not in str(path.parent.name):
            assert "format 2: cell affine" in out and "at your h_eval" in out


def test_crosscheck_flags_a_transposed_jacobian(golden, tmp_path, capsys):
    """The classic layout bug, (I − J_h)⁻¹ g instead of (I − J_h)⁻ᵀ g, must fail the check."""
    z = load(golden["golden_tanh_d8.npz"])
    h, g = z["h_star"], z["grad_h"]
    J = jac_h(z, h)
    y = np.stack([np.linalg.solve(np.eye(h.shape[1]) - J[i], g[i]) for i in range(len(g))])
    wrong = layer_grads(z, h, y)
    arrays = {k: z[k] for k in ("activation", "W", "U", "b", "x", "grad_h")}
    arrays.update({f"implicit__grad_{p}": wrong[p] for p in PARAMS})
    assert main(["crosscheck", _write(tmp_path, arrays)]) == 1
    out = capsys.readouterr().out
    assert "VERDICT: DIFFERS" in out and "DIFFERS" in out.splitlines()[2]


def test_crosscheck_tolerance_option(golden_v1, tmp_path, capsys):
    z = load(golden_v1["golden_relu_d16.npz"])
    arrays = {k: z[k] for k in ("activation", "W", "U", "b", "x", "grad_h")}
    arrays["jfb__grad_W"] = z["jfb__grad_W"] * (1 + 1e-6)      # relative error 1e-6
    path = _write(tmp_path, arrays)
    assert main(["crosscheck", path]) == 1                      # default tol 1e-8
    assert main(["crosscheck", path, "--tol", "1e-5"]) == 0
    capsys.readouterr()


def _base(golden_v1):
    z = load(golden_v1["golden_tanh_d8.npz"])
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
def test_crosscheck_errors_name_the_key(golden_v1, tmp_path, capsys, edit, message):
    z, arrays = _base(golden_v1)
    edit(arrays, z)
    assert main(["crosscheck", _write(tmp_path, arrays)]) == 2
    assert message in capsys.readouterr().err


def _drop(*keys):
    return lambda a: [a.pop(k) for k in keys]


def _set(**values):
    return lambda a: a.update({k: np.array(v) for k, v in values.items()})


@pytest.mark.parametrize("edit, message", [
    (_drop("cell"), "missing key 'cell': format 2 carries it (np.array('affine'))"),
    (_drop("layout_W"), "missing key 'layout_W': format 2 carries it (a string starting 'out_in:'"),
    (_drop("layout_B_inv"), "missing key 'layout_B_inv'"),
    (_drop("sigma_prime_at_kink"), "missing key 'sigma_prime_at_kink'"),
    (_drop("jfb__start"), "missing key 'jfb__start': format 2 carries it (estimator 'jfb': its start"),
    (_drop("upg_k5_lam0.5__lam"), "missing key 'upg_k5_lam0.5__lam'"),
    (_drop("h_eval"), "missing key 'h_eval': format 2 carries it (estimator"),
    (_set(cell="conv"), "key 'cell': deqref crosscheck computes the cell 'affine'"),
    (_set(sigma_prime_at_kink=1.0), "key 'sigma_prime_at_kink': deqref takes σ′ = 0 at a kink"),
    (_set(layout_W="in_out: h @ K"), "key 'layout_W': deqref reads the layout 'out_in'"),
    (_set(layout_B_inv="paper: transposed"), "key 'layout_B_inv': deqref reads the layout 'standard'"),
    (_set(bptt_T4__start="h_star"), "key 'bptt_T4__start': bptt starts at 'zeros' in deqref's"),
    (_set(implicit__start="h_eval"), "key 'implicit__start': implicit starts at 'h_star'"),
    (_set(upg_k3_lam1__start="zeros"), "key 'upg_k3_lam1__start': upg starts at 'h_star' or 'h_eval'"),
    (_set(upg_k3_lam1__loss_at="h_eval"), "key 'upg_k3_lam1__loss_at': upg from h_eval takes its loss at 'h_k'"),
    (_set(bptt_T4__T=5), "estimator 'bptt_T4': its numbers (T = 5, lam = 1.0) do not match its name"),
    (_set(**{"upg_k5_lam0.5__lam": 0.4}), "do not match its name (expected the name 'upg_k5_lam0.4')"),
    (_set(**{"npg_k5_lam0.5__k": 4}), "estimator 'npg_k5_lam0.5': its numbers (k = 4"),
    (_set(**{"npg_k5_lam0.5__lam": 1.5}), "key 'npg_k5_lam0.5__lam': expected λ in (0, 1]"),
    (_set(jfb__kind="npg"), "key 'jfb__kind': the name says 'jfb', the key says 'npg'"),
    (_set(jfb__k=3), "key 'jfb__k': jfb has no k"),
    (_set(jfb__start=3), "key 'jfb__start': expected a string"),
    (_set(jfb__k="3"), "key 'jfb__k': expected an integer"),
    (_set(seed=1.5), "key 'seed': expected an integer"),
    (_set(cell="x" * 2000), "key 'cell': expected a string (np.array('...')) of at most 1024"),
    (lambda a: a.update(h_eval=a["h_eval"][:, :3]), "key 'h_eval': expected shape (3, 8), got (3, 3)"),
    (lambda a: a.update(upg_k9_lam1__kind=np.array("upg")),
     "estimator 'upg_k9_lam1': its conventions are given but no gradient"),
    (_set(format_version=1), "is a format-2 key; a file that carries conventions says format_version"),
    (_set(format_version=3), "key 'format_version': expected 1 or 2, got 3"),
])
def test_format_2_errors_name_the_key(golden, tmp_path, capsys, edit, message):
    z = load(golden["golden_tanh_d8.npz"])
    edit(z)
    assert main(["crosscheck", _write(tmp_path, z)]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "VERDICT" not in out


def test_crosscheck_refuses_pickle(golden_v1, tmp_path, capsys):
    z, arrays = _base(golden_v1)
    arrays["activation"] = np.array(["tanh", None], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    assert main(["crosscheck", str(path)]) == 2
    assert "needs pickle" in capsys.readouterr().err
    with pytest.raises(CrosscheckError, match="no such file"):
        load_input(tmp_path / "absent.npz")


def test_crosscheck_notes_float32_input(golden_v1, tmp_path, capsys):
    z, arrays = _base(golden_v1)
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


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(grad_h=0 * a["grad_h"]), "key 'grad_h': all zeros"),
    (lambda a: a.update(jfb__grad_W=np.full_like(a["jfb__grad_W"], 1e308)), "no verdict for jfb: the relative error of W is inf"),
])
def test_no_verdict_from_nothing_or_from_an_overflow(golden, tmp_path, capsys, edit, message):
    """A zero upstream gradient makes every reference 0 (any zero answer would 'agree'); a value
    near the float64 limit makes the relative error overflow: exit 2, one line, no verdict."""
    arrays = dict(np.load(golden["golden_tanh_d8.npz"]))
    edit(arrays)
    path = tmp_path / "edited.npz"
    np.savez(path, **arrays)
    assert main(["crosscheck", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
