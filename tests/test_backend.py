"""The backend switch: a non-NumPy namespace runs the core, mixing raises, CuPy says why."""
import numpy as np
import pytest

from deqref import backend as B
from deqref.gradients import implicit_dense
from deqref.layers import Layer
from deqref.solvers import solve
from helpers import assert_close


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity", "softplus"])
@pytest.mark.parametrize("method", ["fixed_point", "broyden", "anderson"])
def test_core_runs_through_strict_namespace(activation, method):
    """Every array op in layers, solvers and the oracle must go through ``xp``:
    array_api_strict rejects NumPy calls, implicit conversions and mixed dtypes."""
    with B.use_backend("strict"):
        layer = Layer.random(6, 3, activation, seed=0)
        assert type(layer.W).__module__.startswith("array_api_strict")
        x = B.rng_normal(1, (2, 3))
        res = solve(layer, x, method=method, tol=1e-12, max_iter=200)
        g = B.rng_normal(2, (2, 6))
        est = implicit_dense(layer, x, res.h, g)
        est_m = implicit_dense(layer, x, res.h, g, matrix=True)
        for m in (layer.dF_dh, layer.dF_dx, layer.dF_dtheta, layer.jacobian_h):
            m(res.h, x)
        layer.vjp_h(res.h, x, g), layer.jvp_h(res.h, x, g)
    # the same seeds on NumPy give the same numbers
    with B.use_backend("numpy"):
        layer_np = Layer.random(6, 3, activation, seed=0)
        x_np = B.rng_normal(1, (2, 3))
        res_np = solve(layer_np, x_np, method=method, tol=1e-12, max_iter=200)
        est_np = implicit_dense(layer_np, x_np, res_np.h, B.rng_normal(2, (2, 6)))
    assert_close(B.to_numpy(res.h), res_np.h, 1e-13, "h* strict vs numpy")
    assert_close(B.to_numpy(est.theta), est_np.theta, 1e-12, "grad strict vs numpy")
    assert_close(B.to_numpy(est_m.theta), est_np.theta, 1e-12, "matrix grad strict vs numpy")


def test_mixing_backends_raises():
    layer = Layer.random(4, 2, seed=0, backend=B._load("numpy"))
    x_strict = B._load("strict").asarray(np.ones((1, 2)))
    with pytest.raises(TypeError, match="x is a strict array but W is a numpy array"):
        solve(layer, x_strict)


def test_mixing_dtypes_raises(be):
    layer = Layer.random(4, 2, seed=0)
    with pytest.raises(TypeError, match="x has dtype float32 but W has dtype float64"):
        solve(layer, be.asarray(np.ones((1, 2)), "float32"))
    with pytest.raises(TypeError, match="U has dtype float32"):
        Layer(be.asarray(np.eye(2)), be.asarray(np.ones((2, 2)), "float32"), be.asarray(np.zeros(2)))
    with pytest.raises(TypeError, match="x must have dtype float64 or float32, got int64"):
        solve(layer, be.xp.ones((1, 2), dtype=be.xp.int64))


def test_unknown_backend_and_cupy_error_message(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        B.set_backend("jax")
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("CuPy and a GPU are present here: the error path cannot be exercised")
    except Exception:
        pass
    with pytest.raises(B.BackendError, match="backend 'cupy' cannot run here"):
        B.set_backend("cupy")
    assert B.get_backend().name in B.BACKENDS


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("DEQREF_BACKEND", "strict")
    monkeypatch.setattr(B, "_current", None)
    assert B.get_backend().name == "strict"
    monkeypatch.setattr(B, "_current", None)
    monkeypatch.setenv("DEQREF_BACKEND", "numpy")
    assert B.get_backend().name == "numpy"


def test_use_backend_restores():
    before = B.get_backend()
    with B.use_backend("strict") as be:
        assert B.get_backend() is be
    assert B.get_backend() is before


ESTIMATOR_CASES = [("implicit_dense", {}), ("implicit", {"method": "broyden"}),
                   ("implicit", {"method": "fixed_point", "n_iter": 5}), ("upg", {"k": 3}),
                   ("npg", {"k": 3}), ("jfb", {}), ("gdeq", {}), ("gdeq", {"fallback_factor": 0.5})]


@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_estimators_run_through_strict_namespace(form):
    from deqref.gradients import estimate

    def run():
        layer = Layer.random(5, 2, "tanh", seed=0)
        x, g = B.rng_normal(1, (2, 2)), B.rng_normal(2, (2, 5))
        res = solve(layer, x, method="broyden", tol=1e-12, form="dense")
        out = [estimate(n, layer, x, res, g, form=form, **o).theta for n, o in ESTIMATOR_CASES
               if not (form == "matrix" and "fallback_factor" in o)]
        fp = solve(layer, x, method="fixed_point", lam=0.5, tol=1e-8, return_trajectory=True)
        out.append(estimate("bptt", layer, x, fp, g, form=form).theta)
        return [B.to_numpy(t) for t in out]
    with B.use_backend("strict"):
        strict = run()
    with B.use_backend("numpy"):
        numpy = run()
    for a, b in zip(strict, numpy):
        assert_close(a, b, 1e-12, "strict vs numpy")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")     # np.matrix's own
@pytest.mark.parametrize("make,kind", [(np.matrix, "numpy.matrix"),
                                       (np.ma.masked_array, "numpy.ma.MaskedArray")])
def test_ndarray_subclasses_are_refused_naming_the_argument(make, kind):
    """np.matrix makes * a matrix product and keeps results 2-D; a masked array skips entries.
    Neither may pass as an array: the formulas would silently mean something else."""
    W = make(np.eye(2))
    with pytest.raises(TypeError, match=rf"^W: expected a plain numpy.ndarray, got the subclass {kind}"):
        B.namespace(W=W)
    with pytest.raises(TypeError, match=rf"^W: .*{kind}"):
        Layer(W, np.ones((2, 1)), np.zeros(2))
    layer = Layer.random(2, 2, seed=0, backend=B._load("numpy"))
    with pytest.raises(TypeError, match=rf"^x: .*{kind}"):
        solve(layer, make(np.ones((3, 2))))


def test_memmap_computes_like_an_ndarray(tmp_path):
    """numpy.memmap is the one ndarray subclass accepted: its operators are the array ones."""
    W = np.array([[0.5, 0.1], [-0.2, 0.3]])
    mm = np.memmap(tmp_path / "W.bin", dtype="float64", mode="w+", shape=(2, 2))
    mm[...] = W
    a = Layer(mm, np.ones((2, 1)), np.zeros(2))
    b = Layer(W, np.ones((2, 1)), np.zeros(2))
    x, h = np.ones((3, 1)), np.full((3, 2), 0.25)
    np.testing.assert_array_equal(a(h, x), b(h, x))       # the same operations, bit for bit


def test_backend_argument_and_seed_are_checked():
    with pytest.raises(TypeError, match="^backend must be None or a deqref.backend.Backend"):
        Layer.random(3, 2, seed=0, backend="numpy")
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        B.rng_normal(-1, (2, 2))
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got True$"):
        B.rng_normal(True, (2, 2))
    assert B.check_backend(None) is B.get_backend()


@pytest.mark.parametrize("batched", [True, False])
def test_solve_each_is_one_solve_per_sample(be, monkeypatch, batched):
    """solve_each(A, b)[i] = solve(A[i], b[i]) to the last bit, with SciPy's batched solve (on
    NumPy) or one call per matrix (other backends, SciPy < 1.16): general matrices, 1 × 1 ones and
    a stack that mixes symmetric and triangular ones (LU for every one: no structure is guessed);
    a singular A[i] is refused."""
    monkeypatch.setattr(B, "_scipy_batches", lambda: batched)
    rng = np.random.default_rng(3)
    S = rng.standard_normal((3, 5, 5))
    stacks = [np.eye(7) - 0.4 * rng.standard_normal((5, 7, 7)) / np.sqrt(7),
              3.0 + rng.standard_normal((6, 1, 1)),
              np.concatenate([S + S.transpose(0, 2, 1) + 10 * np.eye(5),
                              np.triu(rng.standard_normal((3, 5, 5))) + 5 * np.eye(5)])]
    for A in stacks:
        n, d = A.shape[:2]
        b = rng.standard_normal((n, d))
        A_b, b_b = be.asarray(A), be.asarray(b)
        each = B.to_numpy(be.solve_each(A_b, b_b))
        one_by_one = np.stack([B.to_numpy(be.solve(A_b[i, ...], b_b[i, ...])) for i in range(n)])
        assert each.shape == (n, d)
        assert np.array_equal(each, one_by_one)
        # it solves A y = b: LU with partial pivoting is backward stable, a residual of a few d · eps
        assert_close(np.einsum("nij,nj->ni", A, each), b, 100 * d * np.finfo(np.float64).eps)
    A[3] = 0.0
    with pytest.raises(np.linalg.LinAlgError):
        be.solve_each(be.asarray(A), be.asarray(b))


def test_a_backend_is_made_once():
    assert B.backend_of(np.ones(2)) is B.backend_of(np.zeros(3)) is B._load("numpy")


def test_all_finite_is_isfinite_everywhere(be):
    """all_finite takes the sum's fast path only where the sum is finite; an infinity, a NaN or a
    sum that overflows is looked at entry by entry, so the answer is always all(isfinite)."""
    big = np.finfo(np.float64).max
    cases = [np.ones((3, 4)), np.array([1.0, np.inf]), np.array([np.inf, -np.inf]),
             np.array([np.nan, 1.0]), np.array([big, big]), np.array([-big, -big, 1.0]),
             np.zeros((0, 3))]
    for a in cases:
        assert B.all_finite(be.asarray(a)) == bool(np.all(np.isfinite(a))), a
    assert B.all_finite(be.asarray(np.array([3e38, 3e38]), "float32"))     # overflows in float32
