"""The cell interface (``deqref.cell``): a cell written here, outside deqref, runs through every
solver, estimator and the trainer unchanged, and agrees with oracles that share no code with it;
the solvers take plain functions; the dense layer's shared reverse-pass sum equals the generic one."""
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from deqref import cell as C
from deqref.backend import backend_of, require_arrays
from deqref.gradients import ESTIMATORS, estimate
from deqref.heads import LinearHead
from deqref.layers import Layer
from deqref.solvers import SOLVERS, solve
from deqref.train import DEQModel, TrainConfig, train
from helpers import FD_RTOL, assert_close, fd_jacobian
from conftest import host

D, DX, N = 5, 3, 3
EPS = np.finfo(np.float64).eps


class DiagLinearization:
    def __init__(self, cell, h, x, s):
        self.cell, self.h, self.x, self.s = cell, h, x, s          # s = σ′(a)   (n, d)

    def vjp_h(self, v):
        return v * self.s * self.cell.a                             # ∂F/∂h · v = diag(s ⊙ a) v

    def vjp_x(self, v):
        return (v * self.s) @ self.cell.U

    def vjp_theta(self, v) -> dict:
        r = v * self.s
        xp = self.cell.xp
        return {"a": xp.sum(r * self.h, axis=0), "U": r.T @ self.x, "b": xp.sum(r, axis=0)}

    def jvp_h(self, u):
        return self.s * self.cell.a * u


class DiagonalCell:
    """F(h, x) = tanh(a ⊙ h + x Uᵀ + b): a cell with a diagonal recurrence, θ = [a, vec(U), b].
    Written against deqref.cell alone; deqref's solvers and estimators know nothing of it."""

    PARAMS = ("a", "U", "b")

    def __init__(self, a, U, b):
        self.xp = require_arrays(a=a, U=U, b=b)
        self.a, self.U, self.b = a, U, b
        self.d, self.d_x = U.shape
        self.d_theta = self.d + self.d * self.d_x + self.d
        self.backend = backend_of(a)
        self.dtype = str(a.dtype)

    @classmethod
    def random(cls, be, seed=0, bound=0.9):
        rng = np.random.default_rng(seed)
        a = bound * np.tanh(rng.standard_normal(D))
        return cls(be.asarray(a), be.asarray(rng.standard_normal((D, DX)) / np.sqrt(DX)),
                   be.asarray(0.1 * rng.standard_normal(D)))

    # θ
    @property
    def theta(self):
        xp = self.xp
        return xp.concat([self.a, xp.reshape(self.U, (-1,)), self.b])

    def unflatten(self, theta):
        d, xp = self.d, self.xp
        return {"a": theta[:d], "U": xp.reshape(theta[d:d + d * self.d_x], (d, self.d_x)),
                "b": theta[d + d * self.d_x:]}

    def flatten(self, p):
        return self.xp.concat([p["a"], self.xp.reshape(p["U"], (-1,)), p["b"]])

    def params(self):
        return {"a": self.a, "U": self.U, "b": self.b}

    def with_params(self, p):
        return DiagonalCell(p["a"], p["U"], p["b"])

    def with_theta(self, theta):
        return self.with_params(self.unflatten(theta))

    def project(self, bound):
        xp = self.xp
        return self.with_params({**self.params(), "a": xp.clip(self.a, -bound, bound)})

    def check_inputs(self, x=None, **vectors):
        if x is not None and x.shape[1:] != (self.d_x,):
            raise ValueError(f"x must have shape (n, {self.d_x}), got {tuple(x.shape)}")
        for name, v in vectors.items():
            if v is not None and v.shape[1:] != (self.d,):
                raise ValueError(f"{name} must have shape (n, {self.d}), got {tuple(v.shape)}")

    # F and its derivatives
    def _pre(self, h, x):
        return self.a * h + x @ self.U.T + self.b

    def __call__(self, h, x):
        return self.xp.tanh(self._pre(h, x))

    def bind(self, x):
        return lambda h: self(h, x)

    def linearize(self, h, x):
        return DiagLinearization(self, h, x, 1.0 - self.xp.tanh(self._pre(h, x)) ** 2)

    def bind_linear(self, x):
        return lambda h: (self(h, x), self.linearize(h, x))

    def jacobian_norm_bound(self, h, x):
        return None

    def dF_dh(self, h, x):                     # paper's layout; diagonal, so its own transpose
        s = self.linearize(h, x).s
        return (s * self.a)[:, :, None] * self.xp.eye(self.d, dtype=h.dtype)[None, ...]

    def dF_dx(self, h, x):
        s = self.linearize(h, x).s
        return self.xp.permute_dims(s[:, :, None] * self.U[None, ...], (0, 2, 1))       # (n, d_x, d)

    def dF_dtheta(self, h, x):
        xp, n, d = self.xp, h.shape[0], self.d
        s = self.linearize(h, x).s
        eye = xp.eye(d, dtype=h.dtype)
        S = s[:, None, :] * eye[None, ...]                                # (n, d, d) [p, i] = s_i δ_ip
        da = S * h[:, :, None]                                       # [p, i] = s_i δ_ip h_p
        dU = S[:, :, None, :] * x[:, None, :, None]                  # (n, p, q, i)
        return xp.concat([da, xp.reshape(dU, (n, d * self.d_x, d)), S], axis=1)


def F_np(theta, h, x):
    """The same F for one sample, written again in NumPy: the finite-difference oracle's."""
    a, U, b = theta[:D], theta[D:D + D * DX].reshape(D, DX), theta[D + D * DX:]
    return np.tanh(a * h + U @ x + b)


def problem(be, seed=0):
    cell = DiagonalCell.random(be, seed)
    rng = np.random.default_rng(seed + 1)
    x = be.asarray(rng.standard_normal((N, DX)))
    g = be.asarray(rng.standard_normal((N, D)))
    return cell, x, g


# ---------------------------------------------------------------- the interface
def test_check_cell_accepts_cells_and_names_what_is_missing(be):
    C.check_cell(Layer.random(3, 2, seed=0, backend=be))
    C.check_cell(DiagonalCell.random(be))
    with pytest.raises(ValueError, match=r"^layer must be a deqref cell .* got function without d, d_x"):
        C.check_cell(lambda h, x: h)
    with pytest.raises(ValueError, match="layer must be a deqref cell"):
        estimate("jfb", object(), None, None, None)


def test_check_cell_looks_at_the_object_and_its_classes(be):
    """Names count where getattr finds them without running them: the object's own attributes
    and its classes'; two objects of one class are judged each on its own, and the metaclass's
    __call__ (type.__call__) does not stand in for F."""
    class Bare:
        pass

    for name in C.CELL_METHODS + ("PARAMS", "theta"):
        if name != "__call__":
            setattr(Bare, name, None)
    partly, whole = Bare(), Bare()
    for name in ("d", "d_x", "d_theta", "dtype", "backend", "xp"):
        setattr(whole, name, None)
    with pytest.raises(ValueError, match=r"got Bare without __call__$"):
        C.check_cell(whole)
    Bare.__call__ = lambda self, h, x: h
    C.check_cell(whole)
    with pytest.raises(ValueError, match=r"got Bare without d, d_x, d_theta, dtype, \.\.\.$"):
        C.check_cell(partly)
    partly.d = partly.d_x = partly.d_theta = partly.dtype = partly.backend = 1
    with pytest.raises(ValueError, match=r"got Bare without xp$"):
        C.check_cell(partly)
    del Bare.flatten                                            # a class changed later is seen
    with pytest.raises(ValueError, match=r"got Bare without flatten$"):
        C.check_cell(whole)


def test_an_estimate_pickles_and_its_theta_is_the_cells_flatten(be):
    """Gradient.theta, made on first use, is cell.flatten of the parameter gradients; a Gradient
    holds no cell, so it pickles and deep-copies (a worker process can send it back)."""
    import copy
    import pickle
    cell, x, g = problem(be)
    res = solve(cell, x, method="fixed_point", tol=1e-12, max_iter=500)
    est = estimate("upg", cell, x, res, g)
    assert np.array_equal(host(est.theta), host(cell.flatten(est.grads)))
    if be.name == "numpy":
        for twin in (pickle.loads(pickle.dumps(est)), copy.deepcopy(est)):
            assert np.array_equal(twin.theta, est.theta) and twin.name == "upg"


def test_the_toy_cell_against_finite_differences(be):
    """The test's own cell is right (else the estimator tests below would prove nothing)."""
    cell, x, _ = problem(be)
    h = cell(cell(be.asarray(np.zeros((N, D))), x), x)
    theta, H, X = host(cell.theta), host(h), host(x)
    for name, got, i_arg in (("dF_dh", cell.dF_dh(h, x), 1), ("dF_dtheta", cell.dF_dtheta(h, x), 0),
                             ("dF_dx", cell.dF_dx(h, x), 2)):
        for i in range(N):
            args = [theta, H[i], X[i]]

            def f(v, i_arg=i_arg, args=args):
                return F_np(*[v if j == i_arg else a for j, a in enumerate(args)])
            assert_close(host(got)[i], fd_jacobian(f, args[i_arg]).T, FD_RTOL, name)


# ---------------------------------------------------------------- every estimator, unchanged
def oracle_gradient(cell, h_star, x, g):
    """Eq. (4) from finite-difference Jacobians and scipy.linalg.solve, per sample (standard
    layout: ∂L/∂θ = Σ_i J_θ,iᵀ (I − J_h,i)⁻ᵀ g_i)."""
    theta, H, X, G = host(cell.theta), host(h_star), host(x), host(g)
    total = np.zeros_like(theta)
    for i in range(N):
        J_h = fd_jacobian(lambda v: F_np(theta, v, X[i]), H[i])
        J_t = fd_jacobian(lambda v: F_np(v, H[i], X[i]), theta)
        y = scipy.linalg.solve((np.eye(D) - J_h).T, G[i])
        total += J_t.T @ y
    return total


def test_implicit_gradients_on_a_new_cell_match_the_oracle(be):
    cell, x, g = problem(be)
    res = solve(cell, x, method="broyden", tol=1e-13, max_iter=300)
    assert res.converged.all()
    want = oracle_gradient(cell, res.h, x, g)
    # FD Jacobians carry ~1e-10 relative error (helpers.FD_RTOL's reasoning), amplified by
    # ‖(I − J_h)⁻¹‖ ≤ 1/(1 − 0.9) = 10: 1e-7 is the same margin as the dense layer's tests
    for name, opts in (("implicit_dense", {}), ("implicit_dense", {"form": "matrix"}),
                       ("implicit", {"n_iter": 200, "tol": 1e-14}),
                       ("implicit", {"method": "fixed_point", "n_iter": 400, "tol": 1e-14})):
        got = estimate(name, cell, x, res, g, **opts)
        assert_close(host(got.theta), want, FD_RTOL, f"{name} {opts}")
        assert set(got.grads) == {"a", "U", "b"}


@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - {"implicit_dense"}))
def test_every_estimator_matrix_form_equals_vector_form_on_a_new_cell(be, name):
    cell, x, g = problem(be)
    method = "fixed_point" if name == "bptt" else "broyden"
    res = solve(cell, x, method=method, tol=1e-10, max_iter=300,
                **({"return_trajectory": True} if name == "bptt" else {}))
    opts = {"method": "fixed_point", "n_iter": 7} if name == "implicit" else {}
    vec = estimate(name, cell, x, res, g, **opts)
    mat = estimate(name, cell, x, res, g, form="matrix", **opts)
    # the two forms sum the same terms in other orders: a few ulps per term, ~1e-14 overall
    assert_close(host(vec.theta), host(mat.theta), 1e3 * EPS, f"{name} θ")
    assert_close(host(vec.x), host(mat.x), 1e3 * EPS, f"{name} x")


def test_jfb_on_a_new_cell_is_its_formula(be):
    """JFB = ∂F/∂θ g at h*: Σ_i J_θ,iᵀ g_i from finite differences."""
    cell, x, g = problem(be)
    res = solve(cell, x, method="broyden", tol=1e-13, max_iter=300)
    theta, H, X, G = host(cell.theta), host(res.h), host(x), host(g)
    want = sum(fd_jacobian(lambda v: F_np(v, H[i], X[i]), theta).T @ G[i] for i in range(N))
    assert_close(host(estimate("jfb", cell, x, res, g).theta), want, FD_RTOL, "jfb")


def test_generic_vjp_sum_equals_the_dense_layers_shared_sum(be):
    """deqref.cell.vjp_sum term by term (a cell without its own) against Layer.vjp_sum, which
    takes the U and b terms once: the same sums, reordered (a few ulps)."""
    layer = Layer.random(D, DX, seed=3, backend=be)
    rng = np.random.default_rng(4)
    x = be.asarray(rng.standard_normal((N, DX)))
    terms = [(layer.linearize(be.asarray(rng.standard_normal((N, D))), x),
              be.asarray(rng.standard_normal((N, D)))) for _ in range(4)]

    class Plain:                      # the layer's products, without its vjp_sum
        pass
    fast_grads, fast_x = C.vjp_sum(layer, terms, 0.5)
    slow_grads, slow_x = C.vjp_sum(Plain(), terms, 0.5)
    for k in ("W", "U", "b"):
        assert_close(host(fast_grads[k]), host(slow_grads[k]), 64 * EPS, k)
    assert_close(host(fast_x), host(slow_x), 64 * EPS, "x")


# ---------------------------------------------------------------- training a new cell
def test_train_runs_a_new_cell_and_keeps_its_projection(be):
    from deqref.data import Dataset
    cell, _, _ = problem(be)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, DX))
    Y = np.tanh(X @ rng.standard_normal((DX, 2)))
    data = Dataset("toy", "regression", be.asarray(X[:30]), be.asarray(Y[:30]),
                   be.asarray(X[30:]), be.asarray(Y[30:]), 2, {})
    model = DEQModel(cell, LinearHead.random(D, 2, seed=1, backend=be))
    hist = train(model, data, TrainConfig(epochs=4, lr=5e-2, estimator="upg", spectral_norm=0.5,
                                          solver="broyden", seed=0, quiet=True))
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert np.abs(host(model.layer.a)).max() <= 0.5          # project(0.5) after every update


# ---------------------------------------------------------------- plain functions
def teacher_F(h, x):
    """A hand-written F, no cell: F(h, x) = 0.5 tanh(h) + x."""
    return 0.5 * np.tanh(h) + x


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solvers_take_a_plain_function(method):
    x = np.array([[0.3, -1.2, 2.0]])
    res = solve(teacher_F, x, np.zeros((1, 3)), method=method, tol=1e-12, max_iter=200)
    want = scipy.optimize.fixed_point(lambda h: teacher_F(h, x[0]), np.zeros(3), xtol=1e-14)
    assert res.converged.all()
    assert_close(res.h[0], want, 1e-10, method)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solvers_find_the_root_of_a_root_problem_written_as_F_equals_h_plus_G(method):
    """G(h) = 0 solved as the fixed point of F(h) = h + G(h) (no input: x = None), against
    scipy.optimize.root. G = −(A h − c + 0.1 tanh h) with A well-conditioned, so the plain
    iteration contracts (‖I − A‖ < 1)."""
    rng = np.random.default_rng(0)
    A = np.eye(4) + 0.2 * rng.standard_normal((4, 4)) / 2
    c = rng.standard_normal(4)

    def G(h):
        return -(h @ A.T - c + 0.1 * np.tanh(h))
    res = solve(lambda h, x: h + G(h), None, np.zeros((1, 4)), method=method, tol=1e-12,
                max_iter=500)
    want = scipy.optimize.root(lambda h: G(h[None])[0], np.zeros(4), tol=1e-14).x
    assert res.converged.all()
    assert_close(res.h[0], want, 1e-9, method)
    assert np.abs(G(res.h)).max() < 1e-10


@pytest.mark.parametrize("bound", [0.0, -0.5, float("nan"), float("inf"), True, "0.9", None])
def test_every_cells_projection_refuses_a_bound_that_is_not_positive_and_finite(be, bound):
    """project(bound) of each deqref cell names the argument; the dense layer's used to flip W's
    sign for a negative bound and to keep any W for NaN."""
    from deqref.conv import ConvCell
    from deqref.graph import GraphCell, normalized_adjacency
    A = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cells = [Layer.random(3, 2, seed=0, backend=be), ConvCell.random(2, 1, 4, 4, 2, seed=0, backend=be),
             GraphCell.random(2, 2, normalized_adjacency(A)[None, ...], seed=0, backend=be)]
    for cell in cells:
        with pytest.raises(ValueError, match=r"^bound must be a finite number > 0"):
            cell.project(bound)
