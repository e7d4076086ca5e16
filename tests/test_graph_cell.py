"""The IGNN graph cell (deqref.graph): its Kronecker Jacobians, its products, PyTorch autograd,
the padding, the well-posedness projection and its input checks, each against an oracle that
shares no code with the cell (plain NumPy from the definition, finite differences, torch)."""
import numpy as np
import pytest

from deqref.backend import to_numpy
from deqref.cell import check_cell
from deqref.graph import (GraphCell, kron, normalized_adjacency, pad_graphs, perron_frobenius,
                          project_l1_ball, well_posed)
from deqref.layers import ACTIVATIONS
from helpers import FD_RTOL, assert_close, fd_grad, fd_jacobian
from conftest import host

M, P = 3, 2                  # state channels m, input features p
SIZES = (3, 4, 2)            # three graphs, padded to N = 4 nodes
SIGMA = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0), "identity": lambda a: a,
         "softplus": lambda a: np.log1p(np.exp(a))}
# Products of the same exact matrices in another order: only rounding differs, O(d · eps) with
# d = 12 here, ≈ 3e-15; 1e-13 leaves margin yet fails on any wrong index, sign or transpose.
PRODUCT_TOL = 1e-13


def graphs(seed=0, sizes=SIZES, p=P):
    """Random connected-ish undirected graphs (A, X): A a symmetric 0/1 adjacency without
    self-loops, X (p, N_i) node features as columns."""
    rng = np.random.default_rng(seed)
    out = []
    for k in sizes:
        A = np.triu((rng.random((k, k)) < 0.6).astype(float), 1)
        A[np.arange(k - 1), np.arange(1, k)] = 1.0          # a path, so no node is isolated
        out.append((A + A.T, rng.standard_normal((p, k))))
    return out


def setup(be, activation="tanh", seed=0):
    """A cell on three padded graphs. Â is the normalized adjacency with its entries scaled by
    random factors in [0.5, 1.5): non-symmetric, so that a test tells Â from Âᵀ (the cell takes
    any Â; ``normalized_adjacency``'s is symmetric)."""
    gs = graphs(seed)
    A_sym, x, mask = pad_graphs(gs, backend=be)
    scale = np.random.default_rng(seed + 50).uniform(0.5, 1.5, tuple(A_sym.shape))
    A_hat = be.asarray(host(A_sym) * scale)
    assert not np.allclose(host(A_hat), np.transpose(host(A_hat), (0, 2, 1)))
    cell = GraphCell.random(M, P, A_hat, activation, seed=seed, kappa=0.9, mask=mask, backend=be)
    rng = np.random.default_rng(seed + 100)
    h = rng.standard_normal((len(SIZES), cell.d))
    v = rng.standard_normal((len(SIZES), cell.d))
    return cell, gs, h, host(x), v


def F_np(W, Omega, A_hat, activation, h, x):
    """F for one graph from the definition, plain NumPy: H (m, N) from the column-major row,
    Z = W H Â + Ω X Â, F = vec(σ(Z)) column-major. Shares no code with GraphCell."""
    N = A_hat.shape[0]
    m, p = W.shape[0], Omega.shape[1]
    H = np.reshape(h, (m, N), order="F")
    X = np.reshape(x, (p, N), order="F")
    Z = W @ H @ A_hat + Omega @ X @ A_hat
    return np.ravel(SIGMA[activation](Z), order="F")


def F_cell_np(cell, i, h, x):
    """``F_np`` with the cell's parameters and graph i."""
    return F_np(host(cell.W), host(cell.Omega), host(cell.A_hat)[i], cell.activation, h, x)


# ---------------------------------------------------------------- layout and the value
def test_is_a_cell_with_the_documented_sizes(be):
    cell, *_ = setup(be)
    check_cell(cell, "cell")
    N = max(SIZES)
    assert (cell.n, cell.N, cell.m, cell.p) == (len(SIZES), N, M, P)
    assert (cell.d, cell.d_x, cell.d_theta) == (M * N, P * N, M * M + M * P)
    assert cell.PARAMS == ("W", "Omega")
    np.testing.assert_array_equal(host(cell.theta), np.concatenate(
        [host(cell.W).ravel(), host(cell.Omega).ravel()]))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_value_matches_definition(be, arr, activation):
    cell, _, h, x, _ = setup(be, activation)
    out = host(cell(arr(h), arr(x)))
    for i in range(cell.n):
        # the same arithmetic in another order: a few eps of O(1) values
        assert_close(out[i], F_cell_np(cell, i, h[i], x[i]), 1e-14, "F")


def test_pad_graphs_layout(be):
    gs = graphs(1)
    A_hat, x, mask = (host(a) for a in pad_graphs(gs, N=5, backend=be))
    p = gs[0][1].shape[0]
    assert A_hat.shape == (3, 5, 5) and x.shape == (3, p * 5) and mask.shape == (3, 5)
    for i, (A, X) in enumerate(gs):
        k = A.shape[0]
        X_pad = np.zeros((p, 5))
        X_pad[:, :k] = X
        np.testing.assert_array_equal(x[i], np.ravel(X_pad, order="F"))   # vec, column-major
        np.testing.assert_array_equal(mask[i], [1.0] * k + [0.0] * (5 - k))
        assert_close(A_hat[i, :k, :k], normalized_adjacency(A), 0, "Â block")
        assert not A_hat[i, k:, :].any() and not A_hat[i, :, k:].any()    # padding isolated


def test_normalized_adjacency_against_networkx():
    nx = pytest.importorskip("networkx")
    A, _ = graphs(2, sizes=(6,))[0]
    G = nx.from_numpy_array(A + np.eye(6))          # with a self-loop on every node
    # networkx: L = D̃^{-1/2} (D̃ − Ã) D̃^{-1/2} with D̃ the row sums of Ã, so Â = I − L
    A_ref = np.eye(6) - nx.normalized_laplacian_matrix(G, nodelist=range(6)).toarray()
    assert_close(normalized_adjacency(A), A_ref, 1e-15, "Â")
    # λ_pf(Â) = 1 exactly in exact arithmetic; LAPACK's eigenvalues: to a few eps
    assert abs(perron_frobenius(normalized_adjacency(A)[None]) - 1.0) < 1e-14


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_batch_equals_each_graph_alone(be, arr, activation):
    """Padding changes nothing on the real nodes: F of the batch, restricted to graph i's real
    nodes, is F of graph i alone (unpadded, its own cell); padding nodes hold σ(0)."""
    cell, gs, h, x, _ = setup(be, activation)
    out = host(cell(arr(h), arr(x)))                          # (n, d)
    for i, (A, X) in enumerate(gs):
        k = A.shape[0]
        _, x1, _ = pad_graphs([(A, X)], backend=be)            # (1, p·k), no padding
        alone = cell.on(arr(host(cell.A_hat)[i, :k, :k][None]))   # (1, k, k), graph i alone
        h1 = h[i, :k * M][None]                               # the first k nodes' columns
        np.testing.assert_array_equal(host(x1)[0], x[i, :k * P])
        f1 = host(alone(arr(h1), x1))[0]
        assert_close(out[i, :k * M], f1, 1e-15, f"graph {i}")
        pad = out[i, k * M:]
        np.testing.assert_array_equal(pad, np.full(pad.shape, SIGMA[activation](0.0)))


def test_bind_and_bind_linear_agree_with_call_and_linearize(be, arr):
    cell, _, h, x, v = setup(be)
    H, X, V = arr(h), arr(x), arr(v)
    F = host(cell(H, X))
    np.testing.assert_array_equal(host(cell.bind(X)(H)), F)           # the same sums, same bits
    f, lin = cell.bind_linear(X)(H)
    np.testing.assert_array_equal(host(f), F)
    ref = cell.linearize(H, X)
    for name in ("vjp_h", "vjp_x", "jvp_h"):
        np.testing.assert_array_equal(host(getattr(lin, name)(V)), host(getattr(ref, name)(V)))


def test_theta_roundtrip_and_with_params(be, arr):
    cell, _, h, x, _ = setup(be)
    p = cell.unflatten(cell.theta)
    np.testing.assert_array_equal(host(p["W"]), host(cell.W))
    np.testing.assert_array_equal(host(p["Omega"]), host(cell.Omega))
    np.testing.assert_array_equal(host(cell.flatten(p)), host(cell.theta))
    t2 = host(cell.theta) * 0.5
    c2 = cell.with_theta(arr(t2))
    np.testing.assert_array_equal(host(c2.theta), t2)
    np.testing.assert_array_equal(host(c2.A_hat), host(cell.A_hat))
    c3 = cell.with_params({"W": c2.W, "Omega": c2.Omega})
    np.testing.assert_array_equal(host(c3(arr(h), arr(x))), host(c2(arr(h), arr(x))))


# ---------------------------------------------------------------- Jacobians: matrix form
def test_kron_is_numpy_kron(be, arr):
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5))
    K = host(kron(arr(A), arr(B)))
    for i in range(2):
        np.testing.assert_array_equal(K[i], np.kron(A[i], B))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_jacobians_paper_layout_against_fd(be, arr, activation):
    cell, _, h, x, _ = setup(be, activation)
    H, X = arr(h), arr(x)
    dF_dh, dF_dx, dF_dth = (host(J) for J in (cell.dF_dh(H, X), cell.dF_dx(H, X),
                                               cell.dF_dtheta(H, X)))
    assert dF_dh.shape == (cell.n, cell.d, cell.d)
    assert dF_dx.shape == (cell.n, cell.d_x, cell.d)
    assert dF_dth.shape == (cell.n, cell.d_theta, cell.d)
    theta = host(cell.theta)
    for i in range(cell.n):
        J_h = fd_jacobian(lambda hh: F_cell_np(cell, i, hh, x[i]), h[i])     # standard layout
        J_x = fd_jacobian(lambda xx: F_cell_np(cell, i, h[i], xx), x[i])
        J_th = fd_jacobian(lambda t: F_cell_np(cell.with_theta(arr(t)), i, h[i], x[i]), theta)
        # helpers.FD_RTOL: ε = 1e-6 central differences in float64 err by ≲ 1e-10 relative
        assert_close(dF_dh[i], J_h.T, FD_RTOL, "dF/dh")
        assert_close(dF_dx[i], J_x.T, FD_RTOL, "dF/dx")
        assert_close(dF_dth[i], J_th.T, FD_RTOL, "dF/dtheta")


def test_dF_dh_is_the_kronecker_formula(be, arr):
    """∂F/∂h = (Â ⊗ Wᵀ) diag(s) (paper's layout), written here with numpy.kron."""
    cell, _, h, x, _ = setup(be)
    W, A_hat = host(cell.W), host(cell.A_hat)
    s = host(cell.sigma_prime(arr(h), arr(x)))
    J = host(cell.dF_dh(arr(h), arr(x)))
    for i in range(cell.n):
        assert_close(J[i], np.kron(A_hat[i], W.T) @ np.diag(s[i]), PRODUCT_TOL, "Kronecker")


# ---------------------------------------------------------------- products: vector form
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_vector_forms_equal_matrix_forms(be, arr, activation):
    cell, _, h, x, v = setup(be, activation)
    H, X, V = arr(h), arr(x), arr(v)
    dF_dh, dF_dx, dF_dth = (host(J) for J in (cell.dF_dh(H, X), cell.dF_dx(H, X),
                                               cell.dF_dtheta(H, X)))
    lin = cell.linearize(H, X)
    assert_close(host(lin.vjp_h(V)), np.einsum("nji,ni->nj", dF_dh, v), PRODUCT_TOL, "vjp_h")
    assert_close(host(lin.vjp_x(V)), np.einsum("nqi,ni->nq", dF_dx, v), PRODUCT_TOL, "vjp_x")
    assert_close(host(cell.flatten(lin.vjp_theta(V))), np.einsum("nti,ni->t", dF_dth, v),
                 PRODUCT_TOL, "vjp_theta")
    assert_close(host(lin.jvp_h(V)), np.einsum("nji,nj->ni", dF_dh, v), PRODUCT_TOL, "jvp_h")


def test_products_against_fd(be, arr):
    """Each product against finite differences of F itself (no Jacobian formed anywhere)."""
    cell, _, h, x, v = setup(be)
    lin = cell.linearize(arr(h), arr(x))
    vjp_h, vjp_x, jvp_h = (host(getattr(lin, k)(arr(v))) for k in ("vjp_h", "vjp_x", "jvp_h"))
    g_theta = host(cell.flatten(lin.vjp_theta(arr(v))))
    theta = host(cell.theta)
    fd_theta = sum(fd_grad(lambda t: v[i] @ F_cell_np(cell.with_theta(arr(t)), i, h[i], x[i]),
                           theta) for i in range(cell.n))
    assert_close(g_theta, fd_theta, FD_RTOL, "vjp_theta")             # summed over the batch
    eps = 1e-6                                                          # helpers.FD_STEP
    for i in range(cell.n):
        assert_close(vjp_h[i], fd_grad(lambda hh: v[i] @ F_cell_np(cell, i, hh, x[i]), h[i]),
                     FD_RTOL, "vjp_h")
        assert_close(vjp_x[i], fd_grad(lambda xx: v[i] @ F_cell_np(cell, i, h[i], xx), x[i]),
                     FD_RTOL, "vjp_x")
        # a directional derivative: J_h u ≈ (F(h + εu) − F(h − εu)) / 2ε, same error budget
        jvp_fd = (F_cell_np(cell, i, h[i] + eps * v[i], x[i])
                  - F_cell_np(cell, i, h[i] - eps * v[i], x[i])) / (2 * eps)
        assert_close(jvp_h[i], jvp_fd, FD_RTOL, "jvp_h")


def test_against_pytorch_autograd(be, arr):
    torch = pytest.importorskip("torch")
    cell, _, h, x, v = setup(be)
    n, N = cell.n, cell.N
    W, Om, A = (torch.tensor(host(a)) for a in (cell.W, cell.Omega, cell.A_hat))   # float64

    def F_torch(h_t, x_t, W, Om):
        """The same F with a dense adjacency, batched: H_i = h_i as (m, N) column-major."""
        H = h_t.reshape(n, N, M).transpose(1, 2)                       # (n, m, N)
        X = x_t.reshape(n, N, P).transpose(1, 2)                       # (n, p, N)
        Z = W @ H @ A + Om @ X @ A                                     # (n, m, N)
        return torch.tanh(Z).transpose(1, 2).reshape(n, N * M)         # (n, d)

    h_t, x_t, v_t = (torch.tensor(a, requires_grad=True) for a in (h, x, v))
    J_h = torch.func.jacrev(F_torch, argnums=0)(h_t, x_t, W, Om)       # (n, d, n, d)
    J_h = torch.stack([J_h[i, :, i, :] for i in range(n)]).detach().numpy()   # per sample
    # autograd and the cell compute the same products in another order: rounding only
    tol = 1e-13
    assert_close(host(cell.dF_dh(arr(h), arr(x))), np.transpose(J_h, (0, 2, 1)), tol, "dF/dh")
    W_t, Om_t = W.clone().requires_grad_(True), Om.clone().requires_grad_(True)
    out = (F_torch(h_t, x_t, W_t, Om_t) * v_t.detach()).sum()          # Σ_i v_iᵀ F_i
    gh, gx, gW, gO = torch.autograd.grad(out, (h_t, x_t, W_t, Om_t))
    lin = cell.linearize(arr(h), arr(x))
    assert_close(host(lin.vjp_h(arr(v))), gh.numpy(), tol, "vjp_h")
    assert_close(host(lin.vjp_x(arr(v))), gx.numpy(), tol, "vjp_x")
    g = lin.vjp_theta(arr(v))
    assert_close(host(g["W"]), gW.numpy(), tol, "vjp_theta W")
    assert_close(host(g["Omega"]), gO.numpy(), tol, "vjp_theta Omega")
    jvp = torch.func.jvp(lambda hh: F_torch(hh, x_t.detach(), W, Om), (h_t.detach(),),
                         (v_t.detach(),))[1]
    assert_close(host(lin.jvp_h(arr(v))), jvp.numpy(), tol, "jvp_h")


def test_jacobian_norm_bound_is_an_upper_bound(be, arr):
    cell, _, h, x, _ = setup(be)
    bound = cell.jacobian_norm_bound(arr(h), arr(x))
    J = host(cell.dF_dh(arr(h), arr(x)))
    assert isinstance(bound, np.ndarray) and bound.shape == (cell.n,)
    for i in range(cell.n):
        # ‖·‖₂ from an SVD: backward stable, a few eps relative
        assert np.linalg.norm(J[i], 2) <= bound[i] * (1 + 1e-12)


# ---------------------------------------------------------------- well-posedness
def l1_projection_by_bisection(v, radius):
    """The ℓ1-ball projection from its optimality condition: w = sign(v) max(|v| − τ, 0) with τ ≥ 0
    the root of Σ max(|v| − τ, 0) = radius (a decreasing function of τ), found by bisection."""
    a = np.abs(v)
    if a.sum() <= radius:
        return v.copy()
    lo, hi = 0.0, a.max()
    for _ in range(200):                 # halving [0, max|v|] to below float64's resolution
        tau = 0.5 * (lo + hi)
        if np.maximum(a - tau, 0).sum() > radius:
            lo = tau
        else:
            hi = tau
    return np.sign(v) * np.maximum(a - 0.5 * (lo + hi), 0)


def test_l1_ball_projection_against_bisection(be, arr):
    rng = np.random.default_rng(7)
    V = rng.standard_normal((40, 6))
    V[0] = [1.0, 1.0, 1.0, -1.0, 0.0, 0.0]          # ties and zeros
    V[1] = 0.01 * V[1]                                # inside the ball
    for radius in (0.05, 0.5, 1.0, 3.0):
        Wp = host(project_l1_ball(arr(V), radius))
        ref = np.stack([l1_projection_by_bisection(v, radius) for v in V])
        # bisection's τ is exact to ~1 ulp of max|v|; τ enters w linearly: 1e-13 absolute
        np.testing.assert_allclose(Wp, ref, rtol=0, atol=1e-13)
        outside = np.abs(V).sum(axis=1) > radius
        assert np.allclose(np.abs(Wp[outside]).sum(axis=1), radius, rtol=1e-14)
        np.testing.assert_array_equal(Wp[~outside], V[~outside])


def test_l1_ball_projection_is_the_closest_point():
    """Against scipy's constrained minimizer (SLSQP) on tiny rows: the same closest point."""
    opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(8)
    for _ in range(5):
        v, radius = rng.standard_normal(4), 0.7
        w = to_numpy(project_l1_ball(np.asarray(v[None]), radius))[0]
        # the ℓ1 ball as its 2⁴ = 16 linear facets sᵀz ≤ radius, s ∈ {±1}⁴ (smooth for SLSQP)
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 4)).reshape(4, -1).T     # (16, 4)
        res = opt.minimize(lambda z: np.sum((z - v) ** 2), np.zeros(4), method="SLSQP",
                           jac=lambda z: 2 * (z - v),
                           constraints=[{"type": "ineq", "fun": lambda z: radius - signs @ z,
                                         "jac": lambda z: -signs}],
                           options={"ftol": 1e-12, "maxiter": 500})
        assert res.success, res.message
        # a QP solved by SLSQP to ftol 1e-12: its minimizer was within 2e-9 of w on these rows
        # (√ftol = 1e-6 is what ftol promises); 1e-7 fails on any wrong τ or sign
        np.testing.assert_allclose(w, res.x, rtol=0, atol=1e-7)
        assert np.abs(w).sum() <= radius * (1 + 1e-14)


def test_project_keeps_the_condition_and_leaves_a_feasible_W_alone(be, arr):
    cell, _, h, x, _ = setup(be)
    W_big = 5.0 * host(cell.W)
    big = cell.with_params({"W": arr(W_big), "Omega": cell.Omega})
    assert well_posed(big) > 1
    for bound in (0.5, 0.9, 0.99):
        pr = big.project(bound)
        # each row's ℓ1 norm is bound/λ_pf up to the rounding of a sum of m terms
        assert well_posed(pr) <= bound * (1 + 1e-14)
        assert abs(well_posed(pr) - bound) < 1e-14
        np.testing.assert_array_equal(host(pr.Omega), host(cell.Omega))
    assert well_posed(cell) <= 0.9 * (1 + 1e-14)
    np.testing.assert_array_equal(host(cell.project(0.95).W), host(cell.W))   # bit for bit
    # the value: ‖W‖∞ λ_pf from the definitions (row ℓ1 norms; eigenvalues of |Â|)
    lam = max(np.abs(np.linalg.eigvals(np.abs(a))).max() for a in host(cell.A_hat))
    assert abs(well_posed(big) - np.abs(W_big).sum(axis=1).max() * lam) < 1e-13


def test_well_posed_cell_has_one_fixed_point(be, arr):
    """‖W‖∞ λ_pf(Â) < 1 makes F a contraction in a weighted norm: the fixed-point iteration from
    two different starts reaches one fixed point, also where ‖W‖₂ ‖Â‖₂ > 1 (ReLU, IGNN's σ)."""
    cell, _, h, x, _ = setup(be, "relu", seed=3)
    F = cell.bind(arr(x))
    a, b = arr(np.zeros_like(h)), arr(10.0 * h)
    for _ in range(400):          # 0.9⁴⁰⁰ ≈ 5e-19 of the initial gap, in the weighted norm
        a, b = F(a), F(b)
    assert np.abs(host(a) - host(b)).max() < 1e-12
    assert np.abs(host(F(a)) - host(a)).max() < 1e-12


# ---------------------------------------------------------------- refusals
def one_line(call, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        call()
    assert "\n" not in str(err.value), str(err.value)


def test_bad_inputs_are_refused_in_one_line(be, arr):
    cell, gs, h, x, _ = setup(be)
    H, X = arr(h), arr(x)
    n, N = cell.n, cell.N
    W, Om, A = cell.W, cell.Omega, cell.A_hat
    one_line(lambda: GraphCell(W, Om, arr(np.eye(N))), "A_hat must have shape")
    one_line(lambda: GraphCell(W, Om, arr(np.zeros((n, N, N + 1)))), "A_hat must have shape")
    one_line(lambda: GraphCell(W, Om, A, mask=arr(np.ones((n, N + 1)))), "mask must have shape")
    one_line(lambda: GraphCell(W, Om, A, mask=arr(np.full((n, N), 0.5))), "mask must hold")
    one_line(lambda: GraphCell(W, Om, A, mask=arr(np.zeros((n, N)))), "A_hat must have zero rows")
    bad = host(A).copy()
    bad[0, 0, 0] = np.nan
    one_line(lambda: GraphCell(W, Om, arr(bad)), "A_hat contains NaN")
    one_line(lambda: GraphCell(arr(np.full((M, M), np.inf)), Om, A), "W contains NaN")
    one_line(lambda: GraphCell(arr(np.ones((M, M + 1))), Om, A), "W must have shape")
    one_line(lambda: GraphCell(W, arr(np.ones((M + 1, P))), A), "Omega must have shape")
    one_line(lambda: GraphCell(W, Om, A, "sigmoid"), "activation must be one of")
    one_line(lambda: cell(H, arr(np.ones((n, cell.d_x + 1)))), "x must have shape")
    one_line(lambda: cell(arr(np.ones((n - 1, cell.d))), X), "h must have shape")
    one_line(lambda: cell.check_inputs(x=arr(np.ones((n + 1, cell.d_x)))), "x must have shape")
    one_line(lambda: cell.check_inputs(x=X, grad_h=arr(np.ones((n, 2)))), "grad_h must have shape")
    one_line(lambda: cell.check_inputs(x=None), "x: expected")
    one_line(lambda: cell.linearize(H, X).vjp_h(arr(np.ones((n, 1)))), "v must have shape")
    one_line(lambda: cell.project(float("inf")), "bound must be")
    one_line(lambda: cell.project(0), "bound must be")
    one_line(lambda: cell.with_params({"W": W}), "params must be a dict with the keys")
    one_line(lambda: cell.unflatten(arr(np.ones(3))), "theta must have shape")
    one_line(lambda: well_posed("cell"), "cell must be a GraphCell")
    one_line(lambda: GraphCell.random(M, P, A, seed=0, kappa=1.0, backend=be), "kappa must be")
    one_line(lambda: GraphCell.random(0, P, A, seed=0, backend=be), "m must be")
    one_line(lambda: GraphCell.random(M, P, A, seed=-1, backend=be), "seed must be")
    one_line(lambda: project_l1_ball(arr(np.ones((2, 2))), 0.0), "radius must be")
    one_line(lambda: normalized_adjacency(np.ones((2, 3))), "A must be a square")
    one_line(lambda: normalized_adjacency(np.array([[0, 1], [0, 0]])), "A must be symmetric")
    one_line(lambda: normalized_adjacency(np.array([[0, 2], [2, 0]])), "A must hold only 0 and 1")
    A0, X0 = gs[0]
    one_line(lambda: pad_graphs([(A0, X0[:, :-1])], backend=be), r"graphs\[0\] X must have shape")
    one_line(lambda: pad_graphs([(A0, X0), (A0, np.ones((P + 1, A0.shape[0])))], backend=be),
             "same number p")
    one_line(lambda: pad_graphs([(A0, X0 * np.nan)], backend=be), "contains NaN")
    one_line(lambda: pad_graphs([(A0, X0)], N=1, backend=be), "N must be")
    one_line(lambda: pad_graphs([], backend=be), "graphs must be a non-empty list")


def test_seeded_float32_and_defaults(be, arr):
    """The same seed gives the same cell; float32 computes the same F to float32 precision; no
    mask means every node is real."""
    cell, gs, h, x, _ = setup(be)
    again, _, _, _, _ = setup(be)
    np.testing.assert_array_equal(host(cell.theta), host(again.theta))
    A32, x32, m32 = pad_graphs(gs, dtype="float32", backend=be)
    c32 = GraphCell.random(M, P, A32, seed=0, kappa=0.9, mask=m32, dtype="float32", backend=be)
    c64 = GraphCell.random(M, P, pad_graphs(gs, backend=be)[0], seed=0, kappa=0.9,
                           mask=pad_graphs(gs, backend=be)[2], backend=be)
    out32 = c32(be.asarray(h, "float32"), x32)
    assert "float32" in str(out32.dtype)
    # O(1) values through two products of ≤ 4 terms: a few float32 eps (1.2e-7) each
    assert_close(host(out32), host(c64(arr(h), arr(x))), 1e-5, "float32 vs float64")
    np.testing.assert_array_equal(host(GraphCell(cell.W, cell.Omega, cell.A_hat).mask),
                                  np.ones((cell.n, cell.N)))


def test_a_vector_changed_in_place_is_not_answered_from_the_kept_product(be):
    """GraphLinearization keeps P = (V ⊙ S) Âᵀ for the last v; a v edited in place between two
    calls must give the VJP of its new values (checked against a fresh linearization)."""
    rng = np.random.default_rng(11)
    A = (rng.random((6, 6)) < 0.5).astype(float)
    A_hat = be.asarray(normalized_adjacency(np.triu(A, 1) + np.triu(A, 1).T)[None, ...])
    cell = GraphCell.random(3, 2, A_hat, seed=0, backend=be)
    h = be.asarray(rng.standard_normal((1, cell.d)))
    x = be.asarray(rng.standard_normal((1, cell.d_x)))
    v = np.asarray(rng.standard_normal((1, cell.d)))
    lin = cell.linearize(h, x)
    first = host(lin.vjp_h(be.asarray(v)))
    w = be.asarray(v)
    lin.vjp_h(w)
    if be.name == "numpy":
        w *= 2.0                                             # in place: the same object
    else:
        w = be.asarray(2.0 * v)
    fresh = cell.linearize(h, x)
    np.testing.assert_array_equal(host(lin.vjp_x(w)), host(fresh.vjp_x(w)))
    np.testing.assert_array_equal(host(lin.vjp_h(w)), 2.0 * first)
