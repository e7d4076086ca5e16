"""The export functions of deqref.crosscheck (jax_params, crosscheck_arrays,
write_crosscheck_file) on NumPy arrays: a file they write is a valid format-2 file that
``deqref crosscheck`` agrees with when its gradients are right (computed here by plain NumPy,
no deqref code), and a wrong mapping (a transposed or misshapen array, a missing key) is a
``ValueError`` naming the argument. PyTorch and JAX use: test_torch_crosscheck.py,
test_jax_crosscheck.py."""
import re
from pathlib import Path

import numpy as np
import pytest

from deqref.cli import main
from deqref.crosscheck import crosscheck_arrays, jax_params, write_crosscheck_file

D, D_X, N = 6, 3, 2


@pytest.fixture(scope="module")
def model():
    """A tanh layer with ‖W‖₂ = 0.5, its fixed point by plain iteration, an upstream g, and
    JFB's gradients at h* written out: r = g ⊙ σ′(a), ∂W = rᵀ h, ∂U = rᵀ x, ∂b = Σ r, ∂x = r U."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((D, D))
    W *= 0.5 / np.linalg.norm(W, 2)
    U, b = rng.standard_normal((D, D_X)), rng.standard_normal(D)
    x, g = rng.standard_normal((N, D_X)), rng.standard_normal((N, D))
    h = np.zeros((N, D))
    for _ in range(200):
        h = np.tanh(h @ W.T + x @ U.T + b)
    r = g * (1 - np.tanh(h @ W.T + x @ U.T + b) ** 2)
    grads = {"W": r.T @ h, "U": r.T @ x, "b": r.sum(0), "x": r @ U}
    return {"W": W, "U": U, "b": b}, x, g, h, grads


def test_a_written_file_agrees(model, tmp_path, capsys):
    params, x, g, h, grads = model
    path = write_crosscheck_file(tmp_path / "mine.npz", params, activation="tanh", x=x,
                                 grad_h=g, h_star=h, gradients={"jfb": grads})
    with np.load(path, allow_pickle=False) as z:
        assert int(z["format_version"]) == 2 and str(z["jfb__start"]) == "h_star"
    assert main(["crosscheck", str(path), "--tol", "1e-12"]) == 0
    capsys.readouterr()


def test_a_flax_style_tree_is_mapped_with_its_kernels_transposed(model):
    params, *_ = model
    tree = {"cell": {"Dense_h": {"kernel": params["W"].T},
                     "Dense_x": {"kernel": params["U"].T, "bias": params["b"]}}}
    out = jax_params(tree, W="cell/Dense_h/kernel", U="cell/Dense_x/kernel", b="cell/Dense_x/bias",
                     layout="in_out")
    for k in ("W", "U", "b"):
        assert np.array_equal(out[k], params[k])


@pytest.mark.parametrize("call, message", [
    (lambda p: jax_params(p, W="Wx"), "W='Wx': no key 'Wx' in the parameter dict (keys: ['U', 'W', 'b'])"),
    (lambda p: jax_params(p, layout="columns"), "layout must be 'out_in' (h @ W.T) or 'in_out'"),
    (lambda p: jax_params(dict(p, U=p["U"].T)), "U='U': expected shape (d, d_x) = (6, d_x) in the out_in layout, got (3, 6) (is it an (in, out) kernel? pass layout='in_out')"),
    (lambda p: jax_params(dict(p, W=p["W"][:, :3])), "W='W': expected a square (d, d) array, got (6, 3)"),
    (lambda p: jax_params(dict(p, b=p["b"][:2])), "b='b': expected shape (6,), got (2,)"),
    (lambda p: jax_params(dict(p, b="zero")), "b='b': expected a real array, got str"),
])
def test_jax_params_errors_name_the_argument(model, call, message):
    params, *_ = model
    with pytest.raises(ValueError) as err:
        call(params)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["params"].update(W=a["params"]["W"].T), "params: W looks transposed"),
    (lambda a: a["params"].update(b=-a["params"]["b"]), "h_star: not a fixed point of F(h) = tanh(W h + U x + b)"),
    (lambda a: a.update(activation="gelu"), "activation: expected one of"),
    (lambda a: a["params"].pop("b"), "params: missing ['b']"),
    (lambda a: a.update(x=a["x"][:, :2]), "x: expected shape (n, 3), got (2, 2)"),
    (lambda a: a.update(grad_h=a["grad_h"][:1]), "grad_h: expected shape (2, 6), got (1, 6)"),
    (lambda a: a.update(gradients={}), "gradients: give at least one estimator"),
    (lambda a: a.update(gradients={"upg_k5": {"b": a["params"]["b"]}}), "gradients: unknown estimator name 'upg_k5'"),
    (lambda a: a["gradients"]["jfb"].update(U=a["gradients"]["jfb"]["U"].T), "gradients['jfb']['U']: expected shape (6, 3), got (3, 6) (transposed?)"),
    (lambda a: a["gradients"]["jfb"].update(V=1.0), "gradients['jfb']: expected keys among W, U, b, x"),
    (lambda a: a.update(starts={"jfb": "h_eval"}), "h_eval: required, 'jfb' starts there"),
    (lambda a: a.update(starts={"jfb": "zeros"}), "starts/numbers for 'jfb': start must be one of ['h_star', 'h_eval']"),
    (lambda a: a.update(starts={"npg_k2_lam1": "h_star"}), "starts/numbers: 'npg_k2_lam1' is not in gradients"),
    (lambda a: a.update(gradients={"gdeq": a["gradients"]["jfb"]}), "B_inv: required with gdeq"),
    (lambda a: a.update(grad_h=0 * a["grad_h"]), "grad_h: all zeros"),
    (lambda a: a.update(fixed_point_tol=float("nan")), "fixed_point_tol must be"),
    (lambda a: a.update(x=a["x"][:0], grad_h=a["grad_h"][:0], h_star=a["h_star"][:0]), "need n, d, d_x >= 1"),
    (lambda a: a.update(gradients={"jfb": 0.5}), "gradients: expected a dict of estimator name"),
    (lambda a: a.update(numbers={"jfb": {"K": 3}}), "numbers['jfb']: expected a dict with keys among"),
    (lambda a: a["params"].update(b=a["params"]["b"] + 0j), "params['b']: expected a real array, got ndarray (dtype complex128)"),
    (lambda a: a["params"].update(b=a["params"]["b"].astype(str)), "params['b']: expected a real array, got ndarray (dtype <U"),
    (lambda a: a.update(x=a["x"] > 0), "x: expected a real array, got ndarray (dtype bool)"),
    (lambda a: a.update(gradients={"upg_k5_lam0.5": a["gradients"]["jfb"]}, numbers={"upg_k5_lam0.5": {"k": 5.7}}),
     "numbers['upg_k5_lam0.5']['k'] must be an integer"),
])
def test_crosscheck_arrays_errors_name_the_argument(model, edit, message):
    params, x, g, h, grads = model
    args = {"params": dict(params), "activation": "tanh", "x": x, "grad_h": g, "h_star": h,
            "gradients": {"jfb": dict(grads)}}
    edit(args)
    with pytest.raises(ValueError) as err:
        crosscheck_arrays(args.pop("params"), **args)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# ------------------------------------------------------------------ docs/crosscheck.md
DOC = Path(__file__).resolve().parent.parent / "docs" / "crosscheck.md"


def doc_examples():
    """(python block, the `$ deqref crosscheck FILE` output block after it) from the page."""
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```(python|)\n(.*?)```", text, flags=re.S)
    pairs = []
    for (lang, code), (_, shown) in zip(blocks, blocks[1:]):
        if lang == "python" and shown.startswith("$ deqref crosscheck"):
            pairs.append((code, shown))
    return pairs


def test_the_page_has_a_pytorch_and_a_jax_example():
    codes = [code for code, _ in doc_examples()]
    assert len(codes) == 2 and "import torch" in codes[0] and "import jax" in codes[1]


@pytest.mark.parametrize("index, library", [(0, "torch"), (1, "jax")])
def test_the_worked_examples_run_and_agree(index, library, tmp_path, monkeypatch, capsys):
    """Each worked example of docs/crosscheck.md, run as printed: it writes its file, and
    deqref crosscheck prints the estimator rows and the verdict the page shows."""
    pytest.importorskip(library, reason=f"{library} not installed")
    code, shown = doc_examples()[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/crosscheck.md example {index}", "exec"), {})
    path = shown.splitlines()[0].split()[-1]
    assert main(["crosscheck", path]) == 0
    out = capsys.readouterr().out
    rows = lambda text: [ln.split()[:2] for ln in text.splitlines() if ln.endswith(" ok")]  # noqa: E731
    assert rows(out) == rows(shown) and len(rows(out)) == 4
    assert out.splitlines()[-1].startswith("VERDICT: AGREE")
    assert out.splitlines()[-1].split("(")[0] == shown.splitlines()[-1].split("(")[0]
    # the residual line the page shows: to the digits printed where it is not rounding noise
    line = next(ln for ln in shown.splitlines() if "max residual" in ln)
    value = float(re.search(r"= ([0-9.e+-]+)", line).group(1))
    assert (line if value > 1e-10 else line.split("=")[0]) in out
