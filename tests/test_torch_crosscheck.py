"""deqref side by side with PyTorch autograd and TorchDEQ, float64, same weights and inputs.

PyTorch computes every gradient here by its own autograd (no deqref code on its side):
UPG and BPTT by backpropagating through the unrolled iterations, the implicit gradient by
``torch.func.jacrev`` + ``torch.linalg.solve``. TorchDEQ runs its own forward solver and its
phantom gradient, 1-step gradient and IFT backward.

What TorchDEQ 0.1.0 does differently by construction (read from its source,
``torchdeq/solver/fp_iter.py``, ``torchdeq/grad.py``, ``torchdeq/core.py``):

1. Its ``fixed_point_iter`` returns ``F(z_t)`` for the step t with the lowest residual
   ``‖F(z_t) − z_t‖`` (``lowest_xest`` is the new iterate ``fx``), i.e. one step past the
   iterate whose residual it reports, and it stops when the *batch maximum* of the residual
   is below ``f_tol``. deqref differentiates at its own tight h*; the gap is O(residual).
2. Its 1-step gradient and IFT mode output ``F(z)`` (one extra call with grad enabled), not
   z; the phantom gradient outputs ``z_k`` after k damped steps ``τ F(z) + (1 − τ) z`` from z
   — the same recursion as deqref's UPG with λ = τ.
3. Its IFT backward solves ``y = J_h(z')ᵀ y + g`` with the Jacobian taken at
   ``z' = F(z)`` (the output) while ``∂F/∂θ`` is taken at z (the input of that call), by
   fixed-point iteration with ``b_max_iter`` / ``b_tol`` (defaults 40 and 1e-6, absolute).
   deqref's oracle takes both at h* and solves densely.

Tests below isolate each effect: fed TorchDEQ's own iterate, deqref reproduces its phantom
and 1-step gradients to rounding, and the mixed-point formula of (3) reproduces its IFT
gradient to the backward tolerance; against deqref at a tight h*, the discrepancy shrinks in
proportion to the forward residual as ``f_tol`` tightens.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'deqref[crosscheck]' "
                            "(CPU wheel: pip install torch==2.13.0)")

from deqref.backend import use_backend  # noqa: E402
from deqref.crosscheck import compare, crosscheck_file, solve_tight  # noqa: E402
from deqref.gradients import estimate  # noqa: E402
from deqref.layers import Layer  # noqa: E402
from deqref.solvers import solve  # noqa: E402

PARAMS = ("W", "U", "b", "x")
D, D_X, N = 16, 6, 4
L_H = 0.8        # ‖W‖₂: contraction, cond(I − J_h) ≤ 1 / (1 − 0.8) = 5

# Same formula, two float64 implementations: each step/solve adds a few eps_64 ≈ 2.2e-16
# relative error, times cond(I − J_h) ≤ 5, over ≤ 40 steps and length-16 sums: ≲ 1e-13.
# 1e-12 keeps a margin and is two decades under the "about 1e-10".
RTOL_SAME = 1e-12


def activations():
    return {"tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "relu": torch.relu}


def setup(activation="tanh", seed=0):
    # host NumPy whatever DEQREF_BACKEND says: PyTorch (CPU) reads the very same buffers
    with use_backend("numpy"):
        layer = Layer.random(D, D_X, activation, seed=seed, L_h=L_H)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((N, D_X))                                   # (n, d_x)
    g = rng.standard_normal((N, D))                                     # (n, d)  ∂L/∂h
    return layer, x, g


class TorchLayer:
    """F(h, x) = σ(lin_h(h) + lin_x(x)) with torch.nn.Linear: weight (out, in) = deqref's W, U."""

    def __init__(self, layer, x):
        self.lin_h = torch.nn.Linear(layer.d, layer.d, bias=False, dtype=torch.float64)
        self.lin_x = torch.nn.Linear(layer.d_x, layer.d, bias=True, dtype=torch.float64)
        with torch.no_grad():
            self.lin_h.weight.copy_(torch.from_numpy(np.asarray(layer.W)))    # W  (d, d)
            self.lin_x.weight.copy_(torch.from_numpy(np.asarray(layer.U)))    # U  (d, d_x)
            self.lin_x.bias.copy_(torch.from_numpy(np.asarray(layer.b)))      # b  (d,)
        self.x = torch.from_numpy(x).requires_grad_()
        self.sigma = activations()[layer.activation]

    def __call__(self, h):
        return self.sigma(self.lin_h(h) + self.lin_x(self.x))

    def grads(self):
        return {"W": self.lin_h.weight.grad.numpy(), "U": self.lin_x.weight.grad.numpy(),
                "b": self.lin_x.bias.grad.numpy(), "x": self.x.grad.numpy()}


def errors(est, theirs):
    """Relative error per parameter of ``theirs`` against deqref's ``est``."""
    return {p: compare(np.asarray(getattr(est, p)), theirs[p])[0] for p in PARAMS}


def assert_errors(est, theirs, rtol, what):
    errs = errors(est, theirs)
    assert max(errs.values()) <= rtol, f"{what}: relative errors {errs} > {rtol:g}"
    return errs


# ------------------------------------------------------------------ PyTorch autograd
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("k, lam", [(5, 0.5), (1, 1.0), (12, 0.8)])
def test_torch_autograd_through_algorithm1_is_upg(activation, k, lam):
    layer, x, g = setup(activation, seed=1)
    res = solve_tight(layer, x)
    tl = TorchLayer(layer, x)
    h = torch.from_numpy(np.asarray(res.h))                          # h_0 = h*, no grad
    for _ in range(k):                                                # Algorithm 1
        h = lam * tl(h) + (1 - lam) * h
    h.backward(torch.from_numpy(g))                                   # g = ∂L/∂h_k
    est = estimate("upg", layer, x, res, g, k=k, lam=lam)
    assert_errors(est, tl.grads(), RTOL_SAME, f"UPG k={k} λ={lam} {activation}")


@pytest.mark.parametrize("T, lam", [(30, 1.0), (40, 0.7)])
def test_torch_autograd_through_the_solver_is_bptt(T, lam):
    layer, x, g = setup("tanh", seed=2)
    run = solve(layer, x, method="fixed_point", lam=lam, tol=0.0, max_iter=T, warn=False,
                return_trajectory=True)
    tl = TorchLayer(layer, x)
    h = torch.zeros(N, D, dtype=torch.float64)                        # h_0 = 0, all T steps
    for _ in range(T):
        h = lam * tl(h) + (1 - lam) * h
    assert np.abs(h.detach().numpy() - np.asarray(run.h)).max() < 1e-14   # same iterates
    h.backward(torch.from_numpy(g))
    assert_errors(estimate("bptt", layer, x, run, g), tl.grads(), RTOL_SAME, f"BPTT T={T}")


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_torch_jacobian_and_solve_is_the_implicit_gradient(activation):
    layer, x, g = setup(activation, seed=3)
    res = solve_tight(layer, x)
    tl = TorchLayer(layer, x)
    h_star = torch.from_numpy(np.asarray(res.h))
    gt = torch.from_numpy(g)
    ys = []
    for i in range(N):                                                # per sample
        f_i = lambda h, i=i: tl.sigma(tl.lin_h(h) + tl.lin_x(tl.x[i].detach()))
        J = torch.func.jacrev(f_i)(h_star[i])                         # (d, d) ∂F_a/∂h_b
        ys.append(torch.linalg.solve((torch.eye(D, dtype=torch.float64) - J).T, gt[i]))
    y = torch.stack(ys)                                               # (I − J)⁻ᵀ g
    tl(h_star).backward(y)                                            # ∂F/∂θ · y at h*
    est = estimate("implicit_dense", layer, x, res, g)
    assert_errors(est, tl.grads(), RTOL_SAME, f"implicit {activation}")


# ------------------------------------------------------------------ TorchDEQ
try:
    import torchdeq
except ImportError:        # the PyTorch tests above still run
    torchdeq = None
needs_torchdeq = pytest.mark.skipif(torchdeq is None, reason="TorchDEQ not installed: "
                                    "pip install --no-deps torchdeq")

MODES = {   # TorchDEQ configuration -> deqref estimator with the same meaning
    "phantom_k5_tau0.5": (dict(grad=5, tau=0.5), ("upg", dict(k=5, lam=0.5))),
    "phantom_k3_tau1": (dict(grad=3, tau=1.0), ("upg", dict(k=3, lam=1.0))),
    "one_step": (dict(grad=1, tau=1.0), ("jfb", {})),
    "ift": (dict(ift=True, b_solver="fixed_point_iter", b_max_iter=2000, b_tol=1e-15,
                 b_stop_mode="abs"), ("implicit_dense", {})),
}


def run_torchdeq(layer, x, g, f_tol, **config):
    """TorchDEQ forward (its own fixed_point_iter from z_0 = 0) and backward with upstream g.

    Returns its gradients, its solver info and z: the state its gradient function started
    from (recorded as the first grad-enabled input to F — the solver runs under no_grad).
    """
    tl = TorchLayer(layer, x)
    seen = []

    def f(z):
        if torch.is_grad_enabled() and not seen:
            seen.append(z.detach().clone())
        return tl(z)

    deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=500, f_tol=f_tol,
                           f_stop_mode="abs", **config)
    z_out, info = deq(f, torch.zeros(N, D, dtype=torch.float64))
    z_out[-1].backward(torch.from_numpy(g))
    return tl.grads(), info, seen[0].numpy()


@needs_torchdeq
@pytest.mark.parametrize("mode", ["phantom_k5_tau0.5", "phantom_k3_tau1", "one_step"])
def test_torchdeq_phantom_and_one_step_equal_deqref_at_its_iterate(mode):
    """At a loose forward tolerance, deqref fed TorchDEQ's own iterate z reproduces its
    phantom (UPG, λ = τ) and 1-step (JFB) gradients to rounding: same formula."""
    layer, x, g = setup("tanh", seed=4)
    config, (name, opts) = MODES[mode]
    theirs, info, z = run_torchdeq(layer, x, g, f_tol=1e-3, **config)
    res = solve_tight(layer, x)
    res.h = z                                              # differentiate where TorchDEQ did
    assert_errors(estimate(name, layer, x, res, g, **opts), theirs, RTOL_SAME, mode)


@needs_torchdeq
def test_torchdeq_returns_one_step_past_its_reported_residual():
    """Difference (1): the returned z is F(z_t) of the best step t, and its stop is on the
    batch max of ‖F(z_t) − z_t‖ < f_tol; so z's own residual is ≈ contraction × reported."""
    layer, x, g = setup("tanh", seed=4)
    _, info, z = run_torchdeq(layer, x, g, f_tol=1e-3, grad=1, tau=1.0)
    reported = info["abs_lowest"].numpy()                              # (n,)
    own = np.linalg.norm(np.asarray(layer(z, x)) - z, axis=1)          # (n,)
    assert info["abs_lowest"].max() < 1e-3
    assert np.all(own < reported) and np.all(own > 0.05 * reported)   # one step of a ~0.5–0.8 contraction


@needs_torchdeq
def test_torchdeq_ift_uses_the_jacobian_at_its_output():
    """Difference (3): TorchDEQ's IFT gradient is ∂F/∂θ|_z (I − ∂F/∂h|_{F(z)})⁻¹ g. With its
    iterate z from a loose solve, that mixed formula matches it to the backward tolerance
    while deqref's h*-consistent formula at z is off by O(residual)."""
    layer, x, g = setup("tanh", seed=5)
    config, _ = MODES["ift"]
    theirs, info, z = run_torchdeq(layer, x, g, f_tol=1e-3, **config)
    z_out = np.asarray(layer(z, x))                                     # F(z), TorchDEQ's output
    I = np.eye(D)
    J = np.asarray(layer.jacobian_h(z_out, x))                          # (n, d, d) at F(z)
    y = np.stack([np.linalg.solve((I - J[i]).T, g[i]) for i in range(N)])
    mixed = {**layer.vjp_theta(z, x, y), "x": layer.vjp_x(z, x, y)}     # ∂F/∂·|_z y
    # The backward fixed-point iteration stops when ‖y_{t+1} − y_t‖ < 1e-15 (or at 2000
    # steps); its error is ≤ that step / (1 − 0.8) plus rounding: ≲ 1e-14 relative to |y| = O(1).
    errs = {p: compare(mixed[p], theirs[p])[0] for p in PARAMS}
    assert max(errs.values()) < RTOL_SAME, errs
    res = solve_tight(layer, x)
    res.h = z
    at_z = errors(estimate("implicit_dense", layer, x, res, g), theirs)
    assert min(at_z.values()) > 1e-8, at_z               # a real, not a rounding, difference


@needs_torchdeq
@pytest.mark.parametrize("mode", list(MODES))
def test_torchdeq_discrepancy_shrinks_with_the_forward_tolerance(mode):
    """Against deqref at its tight h* (residual < 1e-12), TorchDEQ's gradient error falls in
    proportion to its forward residual: measured ratio error / residual ≈ 0.02–0.2 here, so
    error ≤ residual at every f_tol, and at f_tol = 1e-13 the two agree to ~1e-13."""
    layer, x, g = setup("tanh", seed=6)
    config, (name, opts) = MODES[mode]
    ref = estimate(name, layer, x, solve_tight(layer, x), g, **opts)
    worst = []
    for f_tol in (1e-3, 1e-6, 1e-9, 1e-13):
        theirs, info, _ = run_torchdeq(layer, x, g, f_tol=f_tol, **config)
        resid = float(info["abs_lowest"].max())
        err = max(errors(ref, theirs).values())
        # the deviation is first order in h − h*, |h − h*| ≤ residual / (1 − 0.8); the
        # gradient's sensitivity to h is O(1) for |g| = O(1): error ≤ residual (+ rounding)
        assert err <= resid + RTOL_SAME, (mode, f_tol, err, resid)
        worst.append(err)
    assert worst[0] > 1e3 * worst[-1], worst             # it does shrink (≥ 3 decades)
    assert worst[-1] < 1e-11, worst


@needs_torchdeq
def test_torchdeq_default_backward_tolerance_limits_ift():
    """Difference (3), second half: with TorchDEQ's default b_tol = 1e-6 and b_max_iter = 40
    the IFT gradient is only as good as that backward solve, even at a tight forward solve."""
    layer, x, g = setup("tanh", seed=6)
    ref = estimate("implicit_dense", layer, x, solve_tight(layer, x), g)
    theirs, _, _ = run_torchdeq(layer, x, g, f_tol=1e-13, ift=True)
    err = max(errors(ref, theirs).values())
    assert 1e-12 < err < 1e-4, err


# ------------------------------------------------------------------ the README's workflow
def test_readme_workflow_export_from_pytorch_then_crosscheck(tmp_path, capsys):
    """The README's worked example: export a PyTorch DEQ's gradients, run deqref crosscheck."""
    layer, x, g = setup("tanh", seed=7)
    tl = TorchLayer(layer, x)
    with torch.no_grad():                              # forward: plain iteration to 1e-13
        h = torch.zeros(N, D, dtype=torch.float64)
        for _ in range(500):
            h_new = tl(h)
            if (h_new - h).norm(dim=1).max() < 1e-13:
                break
            h = h_new
        h_star = h_new
    h = h_star                                         # UPG, k = 5, λ = 0.5, from h*
    for _ in range(5):
        h = 0.5 * tl(h) + 0.5 * h
    h.backward(torch.from_numpy(g))
    gr = tl.grads()
    path = tmp_path / "mine.npz"
    np.savez(path, activation=np.array("tanh"), W=tl.lin_h.weight.detach().numpy(),
             U=tl.lin_x.weight.detach().numpy(), b=tl.lin_x.bias.detach().numpy(),
             x=tl.x.detach().numpy(), grad_h=g, h_star=h_star.numpy(),
             **{f"upg_k5_lam0.5__grad_{p}": gr[p] for p in PARAMS})
    assert crosscheck_file(path, tol=1e-10) == 0
    assert "VERDICT: AGREE" in capsys.readouterr().out


# ------------------------------------------------------------------ the golden files, format 2
@pytest.fixture(scope="module")
def golden_files(tmp_path_factory):
    from deqref.crosscheck import write_golden
    return write_golden(tmp_path_factory.mktemp("golden"))


def file_conventions(z, name):
    """(kind, h_0, k or T, λ) from the file's own keys — no deqref code reads them here."""
    kind = str(z[f"{name}__kind"])
    steps = int(z[f"{name}__k"]) if f"{name}__k" in z else int(z[f"{name}__T"]) if f"{name}__T" in z else 0
    lam = float(z[f"{name}__lam"]) if f"{name}__lam" in z else 1.0
    start = str(z[f"{name}__start"])
    h0 = np.zeros_like(z["h_star"]) if start == "zeros" else z[start]       # h_star / h_eval
    return kind, torch.from_numpy(h0), steps, lam


def torch_estimate(z, name):
    """A g of estimator ``name`` of a format-2 file by PyTorch autograd, at the file's
    conventions: nn.Linear layers with the file's W, U, b and its x."""
    acts = activations()
    lin_h = torch.nn.Linear(*z["W"].shape[::-1], bias=False, dtype=torch.float64)
    lin_x = torch.nn.Linear(*z["U"].shape[::-1], dtype=torch.float64)
    with torch.no_grad():
        lin_h.weight.copy_(torch.from_numpy(z["W"]))
        lin_x.weight.copy_(torch.from_numpy(z["U"]))
        lin_x.bias.copy_(torch.from_numpy(z["b"]))
    x = torch.from_numpy(z["x"]).requires_grad_()
    sigma = acts[str(z["activation"])]
    f = lambda h: sigma(lin_h(h) + lin_x(x))                                   # noqa: E731
    g = torch.from_numpy(z["grad_h"])
    kind, h0, steps, lam = file_conventions(z, name)
    if kind in ("upg", "bptt"):                       # backprop through the unroll from h_0
        h = h0
        for _ in range(steps):
            h = lam * f(h) + (1 - lam) * h
        h.backward(g)
    else:
        if kind == "implicit":                        # jacrev + solve: (I − J_h)⁻ᵀ g per sample
            d = h0.shape[1]
            ys = []
            for i in range(h0.shape[0]):
                fi = lambda h, i=i: sigma(lin_h(h) + lin_x(x[i].detach()))   # noqa: E731
                J = torch.func.jacrev(fi)(h0[i])
                ys.append(torch.linalg.solve((torch.eye(d, dtype=torch.float64) - J).T, g[i]))
            y = torch.stack(ys)
        elif kind == "npg":                           # λ Σ_{j<k} Bʲ g, Bv = λ ∂F/∂h v + (1 − λ) v
            hr = h0.clone().requires_grad_()
            out = f(hr)
            y, term = torch.zeros_like(g), g
            for _ in range(steps):
                y = y + term
                vjp, = torch.autograd.grad(out, hr, term, retain_graph=True)
                term = lam * vjp + (1 - lam) * term
            y = lam * y
            lin_h.zero_grad(), lin_x.zero_grad()
            x.grad = None
        elif kind == "gdeq":                          # −(B_inv)ᵀ g, B_inv in the standard layout
            y = -torch.einsum("nji,nj->ni", torch.from_numpy(z["gdeq__B_inv"]), g)
        else:                                         # jfb
            y = g
        f(h0).backward(y)
    return {"W": lin_h.weight.grad.numpy(), "U": lin_x.weight.grad.numpy(),
            "b": lin_x.bias.grad.numpy(), "x": x.grad.numpy()}


def test_torch_reproduces_the_format_2_golden_files(golden_files):
    """Every estimator of every format-2 golden file, computed by PyTorch autograd from the
    file's keys alone, to ≤ 1e-12 relative (RTOL_SAME: same formula, two float64 codes)."""
    worst = {}
    for path in golden_files:
        with np.load(path, allow_pickle=False) as f:
            z = {k: f[k] for k in f.files}
        assert int(z["format_version"]) == 2
        names = sorted({k.split("__")[0] for k in z if "__grad_" in k})
        for name in names:
            theirs = torch_estimate(z, name)
            errs = {p: compare(z[f"{name}__grad_{p}"], theirs[p])[0] for p in PARAMS}
            worst[(path.name, name)] = max(errs.values())
            assert max(errs.values()) <= RTOL_SAME, (path.name, name, errs)
    assert len(worst) == 30


# ------------------------------------------------------------------ the export functions
def test_torch_export_functions_write_a_file_that_agrees(tmp_path, capsys):
    """torch_params + write_crosscheck_file: UPG from an inexact h_eval with two nn.Linear,
    JFB at h* with one nn.Linear on cat([h, x]); both files agree with deqref to 1e-12."""
    from deqref.crosscheck import torch_params, write_crosscheck_file
    layer, x, g = setup("tanh", seed=8)
    tl = TorchLayer(layer, x)
    with torch.no_grad():
        h_eval = torch.zeros(N, D, dtype=torch.float64)
        for _ in range(3):                             # an inexact point: 3 plain steps
            h_eval = tl(h_eval)
    h = h_eval
    for _ in range(4):                                 # UPG k = 4, λ = 0.6 from h_eval
        h = 0.6 * tl(h) + 0.4 * h
    h.backward(torch.from_numpy(g))
    params, grads = torch_params(tl.lin_h, tl.lin_x, x=tl.x)
    assert set(grads) == {"W", "U", "b", "x"}
    path = write_crosscheck_file(tmp_path / "mine.npz", params, activation="tanh", x=x, grad_h=g,
                                 h_eval=h_eval, gradients={"upg_k4_lam0.6": grads},
                                 starts={"upg_k4_lam0.6": "h_eval"})
    assert crosscheck_file(path, tol=RTOL_SAME) == 0
    # the same layer as one Linear(d + d_x, d) on cat([h, x]): W and U are its two blocks
    cat = torch.nn.Linear(D + D_X, D, dtype=torch.float64)
    with torch.no_grad():
        cat.weight.copy_(torch.cat([tl.lin_h.weight, tl.lin_x.weight], 1))
        cat.bias.copy_(tl.lin_x.bias)
    h_star = torch.from_numpy(np.asarray(solve_tight(layer, x).h))
    tl.x.grad = None
    torch.tanh(cat(torch.cat([h_star, tl.x], 1))).backward(torch.from_numpy(g))   # JFB at h*
    params, grads = torch_params(cat, d=D, x=tl.x)
    path = write_crosscheck_file(tmp_path / "cat.npz", params, activation="tanh", x=x, grad_h=g,
                                 h_star=h_star, gradients={"jfb": grads})
    assert crosscheck_file(path, tol=RTOL_SAME) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="lin_x: weight must be"):
        torch_params(tl.lin_h, torch.nn.Linear(D_X, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lin_h: W maps h"):
        torch_params(tl.lin_x, tl.lin_x)
    with pytest.raises(ValueError, match=r"lin_h: a single Linear on cat\(\[h, x\]\) needs d"):
        torch_params(cat)
