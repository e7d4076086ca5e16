"""What every estimator refuses, and what it flags.

- inputs: a non-finite x, grad_h or result.h, a result that is not a SolverResult, and option
  values that are not what they say (``True`` as a number, a memory the matrix form cannot
  keep) raise a one-line ValueError naming the argument, before any work;
- what the answer rests on: a forward solve that did not converge, an adjoint solve that did
  not converge (tol > 0) or diverged (tol = 0) → a ConvergenceWarning and a line in
  ``Gradient.flags``; ``warnings.simplefilter("error", ConvergenceWarning)`` makes it an error;
- the answer: non-finite → FloatingPointError; a (nearly) singular I − ∂F/∂h where the dense
  forms need its inverse → SingularMatrixError.

Every expectation is computed here independently of deqref: spectral radii, condition numbers
and closed forms of the linear layer F(h) = W h + U x + b with NumPy.
"""
import dataclasses
import re
import warnings

import numpy as np
import pytest

from deqref.gradients import ESTIMATORS, SingularMatrixError, estimate, implicit_dense, output
from deqref.gradients.base import InnerSolve
from deqref.layers import Layer
from deqref.solvers import ConvergenceWarning, solve
from helpers import FD_RTOL, assert_close
from conftest import host
from test_estimators import oracle

D, DX, N = 6, 3, 3
EPS = np.finfo(np.float64).eps
NAMES = sorted(ESTIMATORS)
# the fixed-point adjoint's residual falls every step on a contraction, so only the forward can
# be flagged here; bptt needs the fixed-point iterates
OPTS = {"implicit": {"method": "fixed_point", "n_iter": 30}}


def problem(be, activation="tanh", seed=0):
    layer = Layer.random(D, DX, activation, seed=seed, L_h=0.9, backend=be)
    rng = np.random.default_rng(seed + 1)
    return layer, be.asarray(rng.standard_normal((N, DX))), be.asarray(rng.standard_normal((N, D)))


def forward(layer, x, name, h0=None, **kw):
    """A forward solve the estimator ``name`` accepts (bptt: fixed point with its iterates)."""
    if name == "bptt":
        return solve(layer, x, h0, method="fixed_point", return_trajectory=True, **kw)
    return solve(layer, x, h0, method="broyden", **kw)


def linear(arr, W, seed=0):
    """F(h) = W h + U x + b and its exact fixed point h* = (I − W)⁻¹ (U x + b), by NumPy."""
    rng = np.random.default_rng(seed)
    d = W.shape[0]
    U, b = rng.standard_normal((d, DX)), 0.1 * rng.standard_normal(d)
    x, g = rng.standard_normal((N, DX)), rng.standard_normal((N, d))
    h = np.linalg.solve(np.eye(d) - W, (x @ U.T + b).T).T
    layer = Layer(arr(W), arr(U), arr(b), "identity")
    res = solve(layer, arr(x), arr(h), method="fixed_point", max_iter=1, warn=False)
    assert res.all_converged                              # h is the fixed point
    y = np.linalg.solve((np.eye(d) - W).T, g.T).T         # (I − ∂F/∂h)⁻¹ g, ∂F/∂h = Wᵀ
    return layer, arr(x), arr(g), res, y                  # exact ∂L/∂b = Σ_i y_i


def with_radius(rho, seed=3, d=D):
    """A random non-symmetric W with spectral radius ``rho`` (NumPy's eigenvalues)."""
    W = np.random.default_rng(seed).standard_normal((d, d))
    return W * rho / np.abs(np.linalg.eigvals(W)).max()


def rel(a, b):
    a, b = host(a).ravel(), np.ravel(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- (a) the forward solve
@pytest.mark.parametrize("name", [n for n in NAMES if n != "bptt"])
def test_an_unconverged_forward_is_flagged_by_every_estimator(be, name):
    layer, x, g = problem(be)
    star = host(solve(layer, x, method="broyden", tol=1e-13, max_iter=300).h)
    star[1] = 0.0                                         # only sample 1 starts away from h*
    res = forward(layer, x, name, be.asarray(star), tol=1e-12, max_iter=2, warn=False)
    assert np.flatnonzero(~res.converged).tolist() == [1]
    match = rf"{name}: the forward solve \(.*\) did not converge for 1 of 3 samples \[1\]"
    with pytest.warns(ConvergenceWarning, match=match):
        est = estimate(name, layer, x, res, g, **OPTS.get(name, {}))
    assert not est.ok and len(est.flags) == 1 and "1 of 3 samples [1]" in est.flags[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match=match):
            estimate(name, layer, x, res, g, **OPTS.get(name, {}))


def test_bptt_is_not_flagged_for_an_unconverged_forward(be):
    """BPTT is the exact gradient of the iterate h_T it differentiates, converged or not (a set
    number of steps is its usual use): no flag, no warning — and the same answer as the literal
    Eq. (11) matrix form, so the missing flag hides nothing."""
    layer, x, g = problem(be)
    res = forward(layer, x, "bptt", tol=1e-12, max_iter=3, warn=False)
    assert not res.converged.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = estimate("bptt", layer, x, res, g)
        lit = estimate("bptt", layer, x, res, g, form="matrix")
    assert est.ok and est.flags == ()
    # vector and matrix forms are two summation orders of the same T = 3 terms: ~10 eps apart
    assert rel(host(est.theta), host(lit.theta)) <= 100 * np.finfo(np.float64).eps


@pytest.mark.parametrize("name", NAMES)
def test_a_converged_forward_gives_no_flag(be, name):
    layer, x, g = problem(be)
    res = forward(layer, x, name, tol=1e-12, max_iter=300)
    assert res.all_converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = estimate(name, layer, x, res, g, **OPTS.get(name, {}))
    assert est.ok and est.flags == ()


# ---------------------------------------------------------------- (b) the adjoint solve
@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_fixed_point_adjoint_with_spectral_radius_above_one_is_flagged(be, arr, form):
    W = with_radius(1.2)                       # ρ(∂F/∂h) = ρ(Wᵀ) = 1.2: the Neumann series diverges
    layer, x, g, res, y = linear(arr, W)
    match = r"implicit \(fixed_point adjoint\): the adjoint diverged or made no progress for 3 of 3 samples"
    with pytest.warns(ConvergenceWarning, match=match):
        est = estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=20, form=form)
    assert not est.ok and "ρ(∂F/∂h) ≥ 1" in est.flags[0]
    assert rel(est.b, y.sum(axis=0)) > 0.5                # what the flag is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match=match):
            estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=20, form=form)


def test_broyden_adjoint_solves_what_the_fixed_point_adjoint_cannot(be, arr):
    """Broyden is a root finder: it solves the linear adjoint whatever ρ(∂F/∂h), unflagged
    (in exact arithmetic within 2d = 12 steps, Gay 1979)."""
    layer, x, g, res, y = linear(arr, with_radius(1.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = estimate("implicit", layer, x, res, g, method="broyden", n_iter=20)
    # cond(I − W) here is ~60: the dense answer is good to ~60 eps, Broyden's to ~its rounding
    assert est.ok and rel(est.b, y.sum(axis=0)) < 1e-10


def test_a_runaway_adjoint_is_flagged_not_returned_as_nan(be, arr):
    layer, x, g, res, _ = linear(arr, with_radius(3.0))    # y_t ~ 3^t: not finite by t ≈ 650
    with pytest.warns(ConvergenceWarning, match=r"non-finite or runaway 3"):
        est = estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=1000)
    assert np.all(np.isfinite(host(est.theta))) and not est.ok


def test_adjoint_tolerance_not_met_is_flagged(be):
    layer, x, g = problem(be)
    res = solve(layer, x, method="broyden", tol=1e-12, max_iter=300)
    exact = estimate("implicit_dense", layer, x, res, g).theta
    with pytest.warns(ConvergenceWarning, match=r"implicit \(fixed_point adjoint\): did not converge "
                                                r"to tol=1e-10 for 3 of 3 samples \[0, 1, 2\] \(stop: max_iter 3\)"):
        short = estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=3, tol=1e-10)
    assert not short.ok and rel(short.theta, host(exact)) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        long = estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=300, tol=1e-10)
    assert long.ok and rel(long.theta, host(exact)) < 1e-8


def _orthogonal(scale, seed=4):
    return scale * np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))[0]


@pytest.mark.parametrize("W,first", [(_orthogonal(0.95), 1), (with_radius(0.8), 4)],
                         ids=["slow-contraction", "non-normal"])
def test_fixed_iterations_that_converge_are_not_flagged(be, arr, W, first):
    """tol = 0 (the papers' baseline): short of any tolerance by design, but converging — no
    flag. W = 0.95 Q (Q orthogonal): the residual falls by exactly 0.95 per step. W with ρ = 0.8
    but ‖W‖₂ = 1.26: the residual rises in its first 3 steps (no progress yet: flagged) and
    ripples by up to 1.2x on the way down (not flagged)."""
    layer, x, g, res, y = linear(arr, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        for method, n_iters in (("fixed_point", range(first, 41)), ("broyden", (5, 20))):
            for n in n_iters:
                for form in ("vector", "matrix"):
                    assert estimate("implicit", layer, x, res, g, method=method, n_iter=n, form=form).ok
    if first > 1:
        with pytest.warns(ConvergenceWarning, match=r"made no progress for 1 of 3 samples \[1\] \(no progress 1"):
            estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=first - 1)


def _inner(traces, tol=0.0, converged=None, stop=None):
    n = len(traces)
    return InnerSolve("who", [np.asarray(t, dtype=float) for t in traces],
                      np.zeros(n, bool) if converged is None else np.asarray(converged),
                      stop or ("max_iter",) * n, tol, True, EPS)


@pytest.mark.parametrize("trace,kind", [
    ([1, 0.5, 0.25], None),                         # a contraction
    ([0, 0], None),                                 # g = 0: nothing to solve
    ([1, 1e-9, 3e-9], None),                        # a rise below √eps · r_0 = 1.5e-8: rounding
    ([1, 0.1, 0.5], None),                          # a rise by less than 10x on the way down
    ([1, 0.01, 0.5], "rose"),                       # more than a digit lost
    ([1, 1e-16, 1e-3], "rose"),                     # lost the accuracy it had reached
    ([1, 1, 1], "no progress"),                     # I − ∂F/∂h singular: r_t = ‖g‖ ...
    ([1, 1, 1 - 1e-12], "no progress"),             # ... up to the rounding of r itself
    ([1, 0.5, 2.0], "no progress"),
    ([1, 10, np.inf], "non-finite or runaway"),
    ([1, np.nan], "non-finite or runaway"),
])
def test_inner_solve_divergence_rules(trace, kind):
    inner = _inner([trace])
    found = [k for k, m in inner.diverged().items() if m[0]]
    assert found == ([] if kind is None else [kind])
    assert (inner.flag() is None) == (kind is None)


def test_inner_solve_with_a_tolerance_flags_exactly_the_unconverged():
    inner = _inner([[1, 1e-9], [1, 0.5], [1, 0.4]], tol=1e-8, converged=[True, False, False],
                   stop=("tolerance", "max_iter", "stagnated"))
    assert inner.flag() == ("who: did not converge to tol=1e-08 for 2 of 3 samples [1, 2] "
                            "(stop: max_iter 1, stagnated 1)")
    inner = _inner([[1, 2.0]], converged=[False], stop=("diverged",))
    assert "non-finite or runaway 1" in inner.flag()


# ---------------------------------------------------------------- (c) the output
@pytest.mark.parametrize("name", NAMES)
def test_an_overflowing_answer_raises(be, arr, name):
    """grad_h = 1e308 everywhere: ∂L/∂b = Σ_i (…) g_i passes float64's 1.8e308 for 3 samples."""
    W = with_radius(0.1)
    layer = Layer(arr(W), arr(np.eye(D, DX)), arr(np.zeros(D)), "identity")
    x = arr(np.random.default_rng(0).standard_normal((N, DX)))
    res = forward(layer, x, name, tol=1e-12, max_iter=300)
    g = arr(np.full((N, D), 1e308))
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(FloatingPointError, match=rf"^{name}: ∂L/∂θ.* not finite; cause: overflow"):
            estimate(name, layer, x, res, g, **OPTS.get(name, {}))


@pytest.mark.parametrize("method", ["fixed_point", "broyden"])
def test_a_huge_grad_h_gives_the_scaled_gradient(be, arr, method):
    """The adjoint is linear in g: g = 1e155 (whose squared norm overflows) gives 1e155 times
    the answer for g (it was zeros from the Broyden adjoint, JFB's value from the fixed point)."""
    layer, x, g, res, y = linear(arr, with_radius(0.5))
    big = arr(host(g) * 1e155)
    est = estimate("implicit", layer, x, res, big, method=method, n_iter=80)
    # 80 terms leave 0.5^80 ≈ 1e-24; cond(I − W) ≤ 3: a few eps
    assert est.ok and rel(host(est.b) / 1e155, y.sum(axis=0)) < 100 * EPS


# ---------------------------------------------------------------- inputs
def _bad(a, value):
    a = host(a).copy()
    a[0, 0] = value
    return a


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what", ["x", "grad_h", "result.h"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_are_refused(be, arr, name, what, value):
    layer, x, g = problem(be)
    res = forward(layer, x, name, tol=1e-10, max_iter=300)
    if what == "x":
        x = arr(_bad(x, value))
    elif what == "grad_h":
        g = arr(_bad(g, value))
    else:
        res = dataclasses.replace(res, h=arr(_bad(res.h, value)))
    with pytest.raises(ValueError, match=rf"^{what} contains NaN or infinity$"):
        estimate(name, layer, x, res, g)


@pytest.mark.parametrize("name", NAMES)
def test_result_must_be_a_solver_result(be, name):
    layer, x, g = problem(be)
    res = forward(layer, x, name, tol=1e-10, max_iter=300)
    for bad in (None, res.h, {"h": res.h}):
        with pytest.raises(ValueError, match=r"^result must be a SolverResult \(what deqref.solve "
                                             rf"returns\), got {type(bad).__name__}$"):
            estimate(name, layer, x, bad, g)
        with pytest.raises(ValueError, match="^result must be a SolverResult"):
            output(name, layer, x, bad)
    with pytest.raises(ValueError, match="^grad_h must be an array, got None$"):
        estimate(name, layer, x, res, None)


@pytest.mark.parametrize("name,options,argument", [
    ("upg", {"k": True}, "k"), ("upg", {"lam": True}, "lam"), ("npg", {"k": True}, "k"),
    ("npg", {"lam": True}, "lam"), ("implicit", {"n_iter": True}, "n_iter"),
    ("implicit", {"tol": True}, "tol"), ("implicit", {"m": True}, "m"),
    ("implicit", {"method": "fixed_point", "lam": True}, "lam"),
    ("gdeq", {"fallback_factor": True}, "fallback_factor"), ("jfb", {"form": True}, "form"),
    ("implicit", {"method": True}, "method"), ("upg", {"lam": 2.0}, "lam"),
    ("implicit", {"tol": float("nan")}, "tol"), ("gdeq", {"fallback_factor": -1.0}, "fallback_factor"),
])
def test_options_that_are_no_numbers_are_refused(be, name, options, argument):
    layer, x, g = problem(be)
    res = forward(layer, x, name, tol=1e-10, max_iter=300)
    with pytest.raises(ValueError, match=rf"^{argument} must be "):
        estimate(name, layer, x, res, g, **options)


def test_implicit_dense_matrix_must_be_a_bool(be):
    layer, x, g = problem(be)
    res = solve(layer, x, method="broyden", tol=1e-10, max_iter=300)
    with pytest.raises(ValueError, match="^matrix must be True or False, got 1$"):
        implicit_dense(layer, x, res.h, g, matrix=1)


def test_each_adjoint_takes_only_its_own_option(be):
    layer, x, g = problem(be)
    res = solve(layer, x, method="broyden", tol=1e-10, max_iter=300)
    with pytest.raises(ValueError, match=r"^lam is an option of the other adjoint solver, not of method='broyden'"):
        estimate("implicit", layer, x, res, g, method="broyden", lam=0.5)
    with pytest.raises(ValueError, match=r"^m is an option of the other adjoint solver, not of method='fixed_point'"):
        estimate("implicit", layer, x, res, g, method="fixed_point", m=5)


# ---------------------------------------------------------------- options that say what they do
def test_broyden_matrix_form_refuses_a_memory_it_cannot_keep(be):
    """The matrix form keeps every update (a dense B⁻¹): that is memory m only for m ≥ n_iter."""
    layer, x, g = problem(be)
    res = solve(layer, x, method="broyden", tol=1e-12, max_iter=300)
    with pytest.raises(ValueError, match=r"^m=2: form='matrix' keeps every Broyden update"):
        estimate("implicit", layer, x, res, g, method="broyden", form="matrix", m=2)
    v = estimate("implicit", layer, x, res, g, method="broyden", n_iter=20, m=20)
    m = estimate("implicit", layer, x, res, g, method="broyden", n_iter=20, m=20, form="matrix")
    assert m.options["m"] == 20 and rel(m.theta, host(v.theta)) < 1e-10


def test_gdeq_matrix_form_falls_back_literally(be):
    """form='matrix' with fallback_factor: sample i's matrix −(B_T⁻¹)ᵀ becomes I where
    ‖B_T⁻ᵀ g_i‖ > factor ‖g_i‖ — built here from the forward's B_T⁻¹ and FD Jacobians."""
    layer, x, g = problem(be, seed=10)
    res = solve(layer, x, method="broyden", tol=1e-8, max_iter=300)
    B_inv, G = host(res.B_inv.dense()), host(g)
    ratio = [np.linalg.norm(B_inv[i].T @ G[i]) / np.linalg.norm(G[i]) for i in range(N)]
    factor = float(np.mean(sorted(ratio)[:2]))            # between two samples: some fall back
    falls = [r > factor for r in ratio]
    assert 0 < sum(falls) < N
    v = estimate("gdeq", layer, x, res, g, fallback_factor=factor)
    m = estimate("gdeq", layer, x, res, g, fallback_factor=factor, form="matrix")
    assert v.diagnostics["n_fallback"] == m.diagnostics["n_fallback"] == sum(falls)
    theta, gx = oracle(layer, res.h, x, g, lambda i, Jh: np.eye(D) if falls[i] else -B_inv[i].T)
    assert_close(host(m.theta), theta, FD_RTOL, "GDEQ matrix form with fallback, dθ")
    assert_close(host(m.x), gx, FD_RTOL, "GDEQ matrix form with fallback, dx")
    assert "A" in m.diagnostics and rel(m.theta, host(v.theta)) < 1e-12


def test_damped_fixed_point_adjoint_is_the_damped_iteration_from_zero(be, arr):
    """lam = λ: y_{t+1} = λ (∂F/∂h y_t + g) + (1 − λ) y_t from y_0 = 0, n_iter steps."""
    W = with_radius(0.8)
    layer, x, g, res, _ = linear(arr, W)
    for n_iter in (1, 2, 5):
        y = np.zeros((N, D))
        for _ in range(n_iter):
            y = 0.5 * (y @ W + host(g)) + 0.5 * y             # ∂F/∂h y = Wᵀ y, rows: y W
        est = estimate("implicit", layer, x, res, g, method="fixed_point", n_iter=n_iter, lam=0.5)
        assert rel(est.b, y.sum(axis=0)) < 100 * EPS, n_iter


# ---------------------------------------------------------------- singular I − ∂F/∂h
def _flat(arr, W):
    """F(h) = W h with x = 0, b = 0: h = 0 is a fixed point (the forward converges at once)."""
    layer = Layer(arr(W), arr(np.ones((W.shape[0], DX))), arr(np.zeros(W.shape[0])), "identity")
    x = arr(np.zeros((N, DX)))
    res = solve(layer, x, method="fixed_point", max_iter=1)
    assert res.all_converged
    return layer, x, arr(np.random.default_rng(0).standard_normal((N, W.shape[0]))), res


@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_singular_I_minus_dF_dh_is_refused_by_the_dense_forms(be, arr, form):
    layer, x, g, res = _flat(arr, np.eye(D))                # I − ∂F/∂h = 0
    with pytest.raises(SingularMatrixError, match=r"^implicit_dense: I − ∂F/∂h is singular \(or nearly: "
                                                  r"condition number inf >= 1/eps = 4.5e\+15\) for 3 of 3"):
        estimate("implicit_dense", layer, x, res, g, form=form)
    assert issubclass(SingularMatrixError, np.linalg.LinAlgError)
    assert issubclass(SingularMatrixError, ValueError)


@pytest.mark.parametrize("method", ["fixed_point", "broyden"])
@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_singular_I_minus_dF_dh_is_flagged_by_the_iterative_adjoint(be, arr, method, form):
    layer, x, g, res = _flat(arr, np.eye(D))
    with pytest.warns(ConvergenceWarning, match=rf"implicit \({method} adjoint\): the adjoint "
                                                r"diverged or made no progress for 3 of 3 samples"):
        est = estimate("implicit", layer, x, res, g, method=method, form=form)
    assert not est.ok


@pytest.mark.parametrize("dtype,gap,refused", [("float64", 2.0 ** -52, True), ("float32", 2.0 ** -24, True),
                                               ("float64", 2.0 ** -24, False)])
def test_nearly_singular_is_refused_at_one_over_eps(be, dtype, gap, refused):
    """I − W = P diag(gap, .5, .7, 2, .9, 1) Pᵀ exactly (a permutation P; 1 − gap is a float of
    the dtype): cond = 2/gap, against 1/eps of the dtype (float64 4.5e15, float32 8.4e6)."""
    P = np.eye(D)[[3, 0, 5, 1, 4, 2]]
    W = np.eye(D) - P @ np.diag([gap, 0.5, 0.7, 2.0, 0.9, 1.0]) @ P.T
    cond = np.linalg.cond(np.eye(D) - W.astype(dtype).astype(np.float64))
    assert (cond >= 1 / np.finfo(dtype).eps) == refused          # what the case is, by NumPy
    layer, x, g, res = _flat(lambda a: be.asarray(a, dtype), W)
    if refused:
        with pytest.raises(SingularMatrixError, match=re.escape(f"condition number {cond:.3g} >= 1/eps")):
            implicit_dense(layer, x, res.h, g)
        with pytest.raises(SingularMatrixError, match="condition number"):
            implicit_dense(layer, x, res.h, g, matrix=True)
    else:                                                        # still solvable: y = (I − W)⁻ᵀ g
        y = np.linalg.solve(np.eye(D) - W.T, host(g).T).T
        assert rel(implicit_dense(layer, x, res.h, g).b, y.sum(axis=0)) < cond * 10 * EPS


def test_the_svd_is_skipped_only_where_a_norm_bound_settles_the_condition(be, monkeypatch):
    """‖∂F/∂h_i‖₂ ≤ max_j |σ'_ij| ‖W‖₂ = b_i, and cond₂(I − ∂F/∂h) ≤ (1 + b)/(1 − b) for b < 1:
    with ‖W‖₂ = 0.9 (|σ'| ≤ 1) no SVD is needed; with ‖W‖₂ = 1.5, or a layer whose ∂F/∂h is
    its own, the bound says nothing and the SVD is taken."""
    calls = []
    svdvals = be.xp.linalg.svdvals
    monkeypatch.setattr(be.xp.linalg, "svdvals", lambda A: calls.append(A.shape) or svdvals(A))

    class Own(Layer):
        def dF_dh(self, h, x):
            return super().dF_dh(h, x)

    rng = np.random.default_rng(0)
    x, h, g = (be.asarray(rng.standard_normal(s)) for s in ((N, DX), (N, D), (N, D)))
    for L_h, cls, svd in ((0.9, Layer, False), (1.5, Layer, True), (0.9, Own, True)):
        base = Layer.random(D, DX, "tanh", seed=1, L_h=L_h, backend=be)
        layer = cls(base.W, base.U, base.b, "tanh")
        calls.clear()
        implicit_dense(layer, x, h, g)
        assert bool(calls) == svd, (L_h, cls.__name__)
