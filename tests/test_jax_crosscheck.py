"""deqref side by side with JAX, jaxopt and optimistix, float64, same weights and inputs.

JAX computes every gradient here by its own autodiff (no deqref code on its side): UPG and
BPTT by ``jax.vjp`` through the unrolled iterations, the implicit gradient by ``jax.jacrev`` +
``jnp.linalg.solve``, by a ``jax.custom_vjp`` fixed-point layer in the style of the
implicit-layers tutorial (forward and adjoint by fixed-point iteration), by jaxopt
(``FixedPointIteration(implicit_diff=True)``, ``implicit_diff.custom_root``) and by optimistix
(``fixed_point`` with ``ImplicitAdjoint``). The layer is a dict ``{"W", "U", "b"}`` with
``F(h) = σ(h Wᵀ + x Uᵀ + b)``: the (out, in) layout of the golden files, no transposes.

Tolerances. Where both sides evaluate the same formula at the same point, they differ by
float64 rounding only: ``RTOL_SAME`` (below). Where a library differentiates at its own
iterate h (forward residual r = max ‖F(h) − h‖₂ per sample) and deqref at its tight h*
(residual < 1e-12), the gradients differ to first order in h − h*. For a contraction with
‖W‖₂ · max|σ′| ≤ L_h = 0.8, ‖h − h*‖ ≤ r / (1 − L_h) = 5 r, and these gradients (|g| = O(1),
O(1) weights) move by at most about their own size per unit of ‖h − h*‖ (TorchDEQ's error per
unit of residual measured 0.02–0.23, README): so ``tol = RTOL_SAME + r / (1 − L_h)``. The
residual r is read from the library's own answer, not assumed from its stopping rule.
"""
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX not installed: pip install 'deqref[crosscheck]'")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from deqref.backend import use_backend  # noqa: E402
from deqref.crosscheck import compare, crosscheck_file, solve_tight, write_golden  # noqa: E402
from deqref.gradients import estimate  # noqa: E402
from deqref.layers import Layer  # noqa: E402
from deqref.solvers import solve  # noqa: E402

PARAMS = ("W", "U", "b", "x")
D, D_X, N = 16, 6, 4
L_H = 0.8        # ‖W‖₂: contraction, cond(I − J_h) ≤ 1 / (1 − 0.8) = 5
# Same formula, two float64 implementations: each step/solve adds a few eps_64 ≈ 2.2e-16
# relative error, times cond(I − J_h) ≤ 5, over ≤ 40 steps and length-16 sums: ≲ 1e-13.
RTOL_SAME = 1e-12
SIGMA = {"tanh": jnp.tanh, "softplus": jax.nn.softplus, "relu": jax.nn.relu}


def tol_from_residual(r):
    """RTOL_SAME + r / (1 − L_h): rounding plus the first-order effect of differentiating at
    an iterate with residual r instead of at h* (module docstring)."""
    return RTOL_SAME + float(r) / (1 - L_H)


def setup(activation="tanh", seed=0):
    with use_backend("numpy"):          # host arrays whatever DEQREF_BACKEND says
        layer = Layer.random(D, D_X, activation, seed=seed, L_h=L_H)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((N, D_X))                                   # (n, d_x)
    g = rng.standard_normal((N, D))                                     # (n, d)  ∂L/∂h
    params = {"W": jnp.asarray(np.asarray(layer.W)), "U": jnp.asarray(np.asarray(layer.U)),
              "b": jnp.asarray(np.asarray(layer.b))}
    return layer, x, g, params


def cell(activation):
    sigma = SIGMA[activation]
    return lambda p, x, h: sigma(h @ p["W"].T + x @ p["U"].T + p["b"])


def residual(f, p, x, h):
    return float(jnp.max(jnp.linalg.norm(f(p, x, h) - h, axis=1)))


def as_dict(grads_p, grad_x):
    return {"W": np.asarray(grads_p["W"]), "U": np.asarray(grads_p["U"]),
            "b": np.asarray(grads_p["b"]), "x": np.asarray(grad_x)}


def errors(est, theirs):
    mine = {"W": est.W, "U": est.U, "b": est.b, "x": est.x} if not isinstance(est, dict) else est
    return {p: compare(np.asarray(mine[p]), theirs[p])[0] for p in PARAMS}


def assert_errors(est, theirs, rtol, what):
    errs = errors(est, theirs)
    assert max(errs.values()) <= rtol, f"{what}: relative errors {errs} > {rtol:g}"
    return errs


def vjp_of(fun, p, x, g):
    """(∂/∂p, ∂/∂x) of gᵀ fun(p, x) by jax.vjp."""
    _, pull = jax.vjp(fun, p, jnp.asarray(x))
    gp, gx = pull(jnp.asarray(g))
    return as_dict(gp, gx)


# ------------------------------------------------------------------ JAX autodiff
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("k, lam", [(5, 0.5), (3, 1.0), (12, 0.8)])
def test_jax_through_algorithm1_is_upg(activation, k, lam):
    layer, x, g, params = setup(activation, seed=1)
    res = solve_tight(layer, x)
    f = cell(activation)
    h_star = jnp.asarray(np.asarray(res.h))                          # h_0 = h*, a constant

    def unroll(p, xx):                                               # Algorithm 1
        h = h_star
        for _ in range(k):
            h = lam * f(p, xx, h) + (1 - lam) * h
        return h

    theirs = vjp_of(unroll, params, x, g)
    assert_errors(estimate("upg", layer, x, res, g, k=k, lam=lam), theirs, RTOL_SAME,
                  f"UPG k={k} λ={lam} {activation}")


@pytest.mark.parametrize("T, lam", [(4, 1.0), (30, 1.0), (5, 0.7)])
def test_jax_through_T_steps_is_bptt(T, lam):
    layer, x, g, params = setup("tanh", seed=2)
    run = solve(layer, x, method="fixed_point", lam=lam, tol=0.0, max_iter=T, warn=False,
                return_trajectory=True)
    f = cell("tanh")

    def unroll(p, xx):                                               # h_0 = 0, all T steps
        h = jnp.zeros((N, D))
        for _ in range(T):
            h = lam * f(p, xx, h) + (1 - lam) * h
        return h

    assert np.abs(np.asarray(unroll(params, x)) - np.asarray(run.h)).max() < 1e-14
    assert_errors(estimate("bptt", layer, x, run, g), vjp_of(unroll, params, x, g), RTOL_SAME,
                  f"BPTT T={T} λ={lam}")


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_jax_jacrev_and_solve_is_the_implicit_gradient(activation):
    layer, x, g, params = setup(activation, seed=3)
    res = solve_tight(layer, x)
    f = cell(activation)
    h_star = jnp.asarray(np.asarray(res.h))
    J = jax.vmap(lambda xi, hi: jax.jacrev(lambda h: f(params, xi, h))(hi))(jnp.asarray(x), h_star)
    y = jnp.linalg.solve(jnp.swapaxes(jnp.eye(D) - J, 1, 2), jnp.asarray(g)[..., None])[..., 0]
    theirs = vjp_of(lambda p, xx: f(p, xx, h_star), params, x, y)      # ∂F/∂θ · y at h*
    assert_errors(estimate("implicit_dense", layer, x, res, g), theirs, RTOL_SAME,
                  f"implicit {activation}")


# ------------------------------------------------------------------ a custom_vjp DEQ layer
def fwd_solver(step, z0, tol, max_iter=2000):
    """Fixed-point iteration z ← step(z) until ‖z_{t+1} − z_t‖ < tol (as in the tutorial)."""
    def cond(c):
        z_prev, z, i = c
        return (jnp.linalg.norm(z - z_prev) >= tol) & (i < max_iter)

    def body(c):
        _, z, i = c
        return z, step(z), i + 1

    return jax.lax.while_loop(cond, body, (z0, step(z0), 0))[1]


def make_deq(f, fwd_tol, bwd_tol):
    """The implicit-layers tutorial's fixed-point layer: forward by iteration, backward by
    iterating the adjoint u = (∂F/∂h)ᵀ u + z̄, then ∂F/∂(p, x) at z* applied to u."""
    @jax.custom_vjp
    def deq(p, x):
        return fwd_solver(lambda z: f(p, x, z), jnp.zeros((x.shape[0], D)), fwd_tol)

    def deq_fwd(p, x):
        z = deq(p, x)
        return z, (p, x, z)

    def deq_bwd(saved, z_bar):
        p, x, z = saved
        _, vjp_px = jax.vjp(lambda p, x: f(p, x, z), p, x)
        _, vjp_z = jax.vjp(lambda h: f(p, x, h), z)
        u = fwd_solver(lambda u: vjp_z(u)[0] + z_bar, jnp.zeros_like(z_bar), bwd_tol)
        return vjp_px(u)

    deq.defvjp(deq_fwd, deq_bwd)
    return deq


@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("fwd_tol", [1e-6, 1e-13])
def test_custom_vjp_layer_against_the_dense_oracle(activation, fwd_tol):
    """At its own z the custom_vjp layer is deqref's dense implicit gradient to rounding and
    the adjoint iteration's tolerance; against deqref at its tight h* the difference is
    bounded by the forward residual (module docstring)."""
    layer, x, g, params = setup(activation, seed=4)
    f = cell(activation)
    # adjoint iterated to ‖u_{t+1} − u_t‖ < 1e-14: its error ≤ 1e-14 / (1 − 0.8) ≈ 5e-14
    deq = make_deq(f, fwd_tol, bwd_tol=1e-14)
    z = np.asarray(deq(params, jnp.asarray(x)))
    theirs = vjp_of(deq, params, x, g)
    res = solve_tight(layer, x)
    r = residual(f, params, jnp.asarray(x), jnp.asarray(z))
    at_h_star = assert_errors(estimate("implicit_dense", layer, x, res, g), theirs,
                              tol_from_residual(r), f"custom_vjp vs h* ({activation}, r={r:.1e})")
    res.h = z                                                  # differentiate where JAX did
    assert_errors(estimate("implicit_dense", layer, x, res, g), theirs, RTOL_SAME,
                  f"custom_vjp at its z ({activation})")
    if fwd_tol > 1e-9:                       # a loose forward shows, and stays within its bound
        assert max(at_h_star.values()) > 1e3 * RTOL_SAME


# ------------------------------------------------------------------ jaxopt and optimistix
try:
    with warnings.catch_warnings():    # jaxopt 0.8.5 says on import that it is unmaintained
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
except ImportError:                    # the JAX tests above still run
    jaxopt = None
try:
    import optimistix as optx
except ImportError:
    optx = None
needs_jaxopt = pytest.mark.skipif(jaxopt is None, reason="jaxopt not installed: pip install jaxopt")
needs_optx = pytest.mark.skipif(optx is None, reason="optimistix not installed: pip install optimistix")


def jaxopt_fixed_point(f, tol):
    from jaxopt.linear_solve import solve_lu     # a dense LU solve: no backward tolerance

    def T(h, p, x):
        return f(p, x, h)

    solver = jaxopt.FixedPointIteration(fixed_point_fun=T, maxiter=2000, tol=tol,
                                        implicit_diff=True, implicit_diff_solve=solve_lu)
    return lambda p, x: solver.run(jnp.zeros((x.shape[0], D)), p, x).params


def jaxopt_custom_root(f, tol):
    from jaxopt.linear_solve import solve_lu

    @jaxopt.implicit_diff.custom_root(lambda h, p, x: f(p, x, h) - h, solve=solve_lu)
    def root(h0, p, x):
        return fwd_solver(lambda z: f(p, x, z), h0, tol)

    return lambda p, x: root(jnp.zeros((x.shape[0], D)), p, x)


def optimistix_fixed_point(f, tol):
    solver = optx.FixedPointIteration(rtol=0.0, atol=tol)       # max-norm of the step

    def run(p, x):
        sol = optx.fixed_point(lambda h, args: f(args[0], args[1], h), solver,
                               jnp.zeros((x.shape[0], D)), args=(p, x), max_steps=2000,
                               adjoint=optx.ImplicitAdjoint())   # lineax LU for this system
        return sol.value

    return run


LIBRARIES = {"jaxopt FixedPointIteration": (jaxopt_fixed_point, needs_jaxopt),
             "jaxopt custom_root": (jaxopt_custom_root, needs_jaxopt),
             "optimistix fixed_point": (optimistix_fixed_point, needs_optx)}


@pytest.mark.parametrize("library", [pytest.param(name, marks=mark) for name, (_, mark)
                                     in LIBRARIES.items()])
@pytest.mark.parametrize("activation, fwd_tol", [("tanh", 1e-6), ("tanh", 1e-13),
                                                 ("softplus", 1e-13), ("relu", 1e-13)])
def test_implicit_differentiation_libraries_against_the_dense_oracle(library, activation, fwd_tol):
    """Their implicit differentiation takes ∂F/∂h and ∂F/∂θ at their returned iterate and
    solves the linear system by LU: deqref's dense formula at that iterate agrees to
    rounding; at deqref's own h* within the residual bound."""
    layer, x, g, params = setup(activation, seed=5)
    f = cell(activation)
    fun = LIBRARIES[library][0](f, fwd_tol)
    z = np.asarray(fun(params, jnp.asarray(x)))
    theirs = vjp_of(fun, params, x, g)
    r = residual(f, params, jnp.asarray(x), jnp.asarray(z))
    res = solve_tight(layer, x)
    assert_errors(estimate("implicit_dense", layer, x, res, g), theirs, tol_from_residual(r),
                  f"{library} vs deqref's h* ({activation}, r={r:.1e})")
    res.h = z
    assert_errors(estimate("implicit_dense", layer, x, res, g), theirs, RTOL_SAME,
                  f"{library} at its own iterate ({activation})")


# ------------------------------------------------------------------ the golden files, format 2
@pytest.fixture(scope="module")
def golden_files(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("golden"))


def jax_estimate(z, name):
    """A g of estimator ``name`` of a format-2 file by JAX autodiff, at the conventions the
    file's own keys state (start, k, λ, T), with the file's W, U, b as a parameter dict."""
    f = cell(str(z["activation"]))
    p = {k: jnp.asarray(z[k]) for k in ("W", "U", "b")}
    x, g = z["x"], z["grad_h"]
    kind = str(z[f"{name}__kind"])
    steps = int(z[f"{name}__k"]) if f"{name}__k" in z else int(z[f"{name}__T"]) if f"{name}__T" in z else 0
    lam = float(z[f"{name}__lam"]) if f"{name}__lam" in z else 1.0
    start = str(z[f"{name}__start"])
    h0 = jnp.zeros_like(z["h_star"]) if start == "zeros" else jnp.asarray(z[start])
    if kind in ("upg", "bptt"):
        def unroll(pp, xx):
            h = h0
            for _ in range(steps):
                h = lam * f(pp, xx, h) + (1 - lam) * h
            return h
        return vjp_of(unroll, p, x, g)
    gj = jnp.asarray(g)
    if kind == "implicit":
        J = jax.vmap(lambda xi, hi: jax.jacrev(lambda h: f(p, xi, h))(hi))(jnp.asarray(x), h0)
        y = jnp.linalg.solve(jnp.swapaxes(jnp.eye(h0.shape[1]) - J, 1, 2), gj[..., None])[..., 0]
    elif kind == "npg":                          # λ Σ_{j<k} Bʲ g, Bv = λ ∂F/∂h v + (1 − λ) v
        _, pull = jax.vjp(lambda h: f(p, jnp.asarray(x), h), h0)
        y, term = jnp.zeros_like(gj), gj
        for _ in range(steps):
            y = y + term
            term = lam * pull(term)[0] + (1 - lam) * term
        y = lam * y
    elif kind == "gdeq":                         # −(B_inv)ᵀ g, B_inv in the standard layout
        y = -jnp.einsum("nji,nj->ni", jnp.asarray(z["gdeq__B_inv"]), gj)
    else:                                        # jfb
        y = gj
    return vjp_of(lambda pp, xx: f(pp, xx, h0), p, x, y)


def test_jax_reproduces_the_format_2_golden_files(golden_files):
    """Every estimator of every format-2 golden file, computed by JAX from the file's keys
    alone, to ≤ 1e-12 relative."""
    count = 0
    for path in golden_files:
        with np.load(path, allow_pickle=False) as fz:
            z = {k: fz[k] for k in fz.files}
        for name in sorted({k.split("__")[0] for k in z if "__grad_" in k}):
            errs = {p: compare(z[f"{name}__grad_{p}"], v)[0] for p, v in jax_estimate(z, name).items()}
            assert max(errs.values()) <= RTOL_SAME, (path.name, name, errs)
            count += 1
    assert count == 30


def test_jax_user_file_through_the_command(tmp_path, capsys):
    """A JAX user's file from a flax-style parameter dict (kernels used as h @ K, i.e. the
    (in, out) layout): the custom_vjp layer's gradients, mapped by jax_params, written by
    write_crosscheck_file, checked by crosscheck_file at a tolerance from its residual."""
    from deqref.crosscheck import jax_params, write_crosscheck_file
    layer, x, g, params = setup("tanh", seed=7)
    f = cell("tanh")
    deq = make_deq(f, fwd_tol=1e-13, bwd_tol=1e-14)
    z = deq(params, jnp.asarray(x))
    r = residual(f, params, jnp.asarray(x), z)
    # the same model written with kernels: {"lin_h": {"kernel": Wᵀ}, "lin_x": {"kernel": Uᵀ, "bias": b}}
    tree = {"lin_h": {"kernel": params["W"].T}, "lin_x": {"kernel": params["U"].T, "bias": params["b"]}}
    flax_f = lambda t, xx: deq({"W": t["lin_h"]["kernel"].T, "U": t["lin_x"]["kernel"].T,  # noqa: E731
                                "b": t["lin_x"]["bias"]}, xx)
    _, pull = jax.vjp(flax_f, tree, jnp.asarray(x))
    d_tree, d_x = pull(jnp.asarray(g))
    paths = dict(W="lin_h/kernel", U="lin_x/kernel", b="lin_x/bias", layout="in_out")
    path = write_crosscheck_file(tmp_path / "mine.npz", jax_params(tree, **paths), activation="tanh",
                                 x=x, grad_h=g, h_star=z,
                                 gradients={"implicit": {**jax_params(d_tree, **paths), "x": d_x}})
    assert crosscheck_file(path, tol=tol_from_residual(r)) == 0
    assert "VERDICT: AGREE" in capsys.readouterr().out
    # kernels taken as they are (the wrong layout): U's shape gives it away at once ...
    with pytest.raises(ValueError, match=r"U='lin_x/kernel'.*pass layout='in_out'"):
        jax_params(tree, **dict(paths, layout="out_in"))
    # ... a square W has the right shape either way, and h_star gives it away
    wrong = {"W": tree["lin_h"]["kernel"], "U": params["U"], "b": params["b"]}
    with pytest.raises(ValueError, match="params: W looks transposed"):
        write_crosscheck_file(tmp_path / "bad.npz", jax_params(wrong), activation="tanh", x=x,
                              grad_h=g, h_star=z, gradients={"implicit": {"x": d_x}})
