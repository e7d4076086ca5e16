"""The convolutional cell (deqref.conv) and its parts (deqref.conv_ops): values and every derivative
against central finite differences of a NumPy definition written here (shares no code with
deqref), against PyTorch (conv2d, group_norm, torch.func.jacrev) with the same weights, matrix
forms against vector forms, and the input checks.

Tolerances (float64, eps = 2.2e-16):
- against PyTorch and between the matrix and vector forms only rounding differs: a few hundred
  operations per output, each O(eps) relative, amplified by GroupNorm's 1/σ (σ ≥ 0.3 here) and
  summed over d ≤ 512 terms: ≲ 1e-13 of the largest entry; TIGHT = 1e-12 leaves margin and
  still fails on any wrong index, sign, transpose or missing term (each an O(1) error).
- against central differences (step 1e-6): truncation O(step² F‴) ≲ 1e-11 for these O(1)
  smooth maps (GroupNorm's curvature ~ 1/σ² ≲ 10), rounding O(eps/step) ≈ 1e-10; FD_RTOL =
  1e-7 leaves three orders. ReLU has a kink: each case checks that every pre-activation lies
  ≥ 1e-3 from 0, so no step of 1e-6 (times ‖J‖ ≲ 100) crosses it.
"""
import numpy as np
import pytest

from deqref.cell import check_cell, is_cell
from deqref.conv import ConvCell
from deqref import conv_ops as ops
from helpers import FD_RTOL, assert_close, fd_jacobian
from conftest import host

TIGHT = 1e-12
N, C, C_X, H, W, G = 2, 4, 2, 5, 4, 2           # small: d = 80, d_x = 40, d_θ = 384


# ------------------------------------------------------------------ the NumPy definition
def conv_np(z, K):
    """(C1) from its definition, one sample: z (C_in, H, W), K (C_out, C_in, 3, 3)."""
    Hh, Ww = z.shape[1:]
    zp = np.pad(z, ((0, 0), (1, 1), (1, 1)))
    return sum(np.einsum("oc,cij->oij", K[:, :, a, b], zp[:, a:a + Hh, b:b + Ww])
               for a in range(3) for b in range(3))


def gn_np(v, gamma, beta, groups, eps=1e-5):
    """GroupNorm from its definition, one sample: v (C, H, W)."""
    c = v.shape[0]
    vg = v.reshape(groups, -1)
    mu, var = vg.mean(axis=1, keepdims=True), vg.var(axis=1, keepdims=True)
    v_hat = ((vg - mu) / np.sqrt(var + eps)).reshape(v.shape)
    return gamma.reshape(c, 1, 1) * v_hat + beta.reshape(c, 1, 1)


def F_np(p, h, x, shape):
    """(M1) for one sample, h (d,), x (d_x,); p the parameters as NumPy arrays."""
    c, c_x, hh, ww, groups = shape
    z, xi = h.reshape(c, hh, ww), x.reshape(c_x, hh, ww)
    r1 = np.maximum(gn_np(conv_np(z, p["K1"]), p["gamma1"], p["beta1"], groups), 0)
    a2 = conv_np(r1, p["K2"]) + conv_np(xi, p["U"])
    a3 = z + gn_np(a2, p["gamma2"], p["beta2"], groups)
    return gn_np(np.maximum(a3, 0), p["gamma3"], p["beta3"], groups).ravel()


def kinks_np(p, h, x, shape):
    """The ReLU pre-activations of (M1), one sample (to keep finite differences off the kinks)."""
    c, c_x, hh, ww, groups = shape
    z, xi = h.reshape(c, hh, ww), x.reshape(c_x, hh, ww)
    n1 = gn_np(conv_np(z, p["K1"]), p["gamma1"], p["beta1"], groups)
    a2 = conv_np(np.maximum(n1, 0), p["K2"]) + conv_np(xi, p["U"])
    return np.concatenate([n1.ravel(), (z + gn_np(a2, p["gamma2"], p["beta2"], groups)).ravel()])


def setup(be, seed=0, n=N, c=C, c_x=C_X, hh=H, ww=W, groups=G, dtype="float64"):
    cell = ConvCell.random(c, c_x, hh, ww, groups, seed=seed, dtype=dtype, backend=be)
    rng = np.random.default_rng(seed + 100)
    h, x = rng.standard_normal((n, cell.d)), rng.standard_normal((n, cell.d_x))
    v = rng.standard_normal((n, cell.d))
    return cell, h, x, v


def np_params(cell):
    return {k: host(v) for k, v in cell.params().items()}


def shape_of(cell):
    return (cell.C, cell.C_x, cell.H, cell.W, cell.G)


# ------------------------------------------------------------------ convolution
def test_conv_matrix_vector_and_definition_agree(be, arr):
    rng = np.random.default_rng(0)
    K, z = rng.standard_normal((3, C, 3, 3)), rng.standard_normal((N, C, H, W))
    T = host(ops.conv_matrix(arr(K), H, W))                          # (3·H·W, C·H·W)
    out = host(ops.conv2d(arr(z), arr(K)))                           # (N, 3, H, W)
    for i in range(N):
        ref = conv_np(z[i], K)
        assert_close(out[i], ref, TIGHT, "im2col conv")
        assert_close(T @ z[i].ravel(), ref.ravel(), TIGHT, "Toeplitz conv")
    # the Toeplitz matrix entry by entry: T[(o,i,j),(c,i',j')] = K[o, c, i'-i+1, j'-j+1]
    T4 = T.reshape(3, H, W, C, H, W)
    assert T4[1, 2, 3, 0, 1, 2] == K[1, 0, 0, 0] and T4[2, 0, 0, 3, 1, 1] == K[2, 3, 2, 2]
    assert T4[0, 0, 0, 0, 2, 0] == 0.0                               # two rows apart: no tap


def test_conv_vjps_against_matrix_and_fd(be, arr):
    rng = np.random.default_rng(1)
    K, z = rng.standard_normal((3, C, 3, 3)), rng.standard_normal((N, C, H, W))
    g = rng.standard_normal((N, 3, H, W))
    T = host(ops.conv_matrix(arr(K), H, W))
    gz = host(ops.conv2d_vjp_input(arr(g), arr(K)))
    for i in range(N):
        assert_close(gz[i].ravel(), T.T @ g[i].ravel(), TIGHT, "vjp input = Tᵀ g")
    # w.r.t. the kernel: the gradient of Σ_n <g_n, conv(z_n; K)> by central differences
    gK = host(ops.conv2d_vjp_kernel(arr(g), ops.im2col(arr(z))))
    f = lambda k: sum(np.vdot(g[i], conv_np(z[i], k.reshape(K.shape))) for i in range(N))  # noqa
    assert_close(gK.ravel(), fd_jacobian(lambda k: np.atleast_1d(f(k)), K.ravel())[0], FD_RTOL,
                 "vjp kernel")
    # the paper-layout kernel matrix: (I ⊗ cols) against the Jacobian of conv w.r.t. K
    M = host(ops.conv_kernel_matrix(arr(z), 3))                     # (N, 3·C·9, 3·H·W)
    for i in range(N):
        J = fd_jacobian(lambda k: conv_np(z[i], k.reshape(K.shape)).ravel(), K.ravel())
        assert_close(M[i], J.T, FD_RTOL, "∂conv/∂K")


def test_conv_against_torch(be, arr):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    K, z = rng.standard_normal((3, C, 3, 3)), rng.standard_normal((N, C, H, W))
    g = rng.standard_normal((N, 3, H, W))
    zt, Kt = torch.tensor(z, requires_grad=True), torch.tensor(K, requires_grad=True)
    out = torch.nn.functional.conv2d(zt, Kt, padding=1)
    out.backward(torch.tensor(g))
    assert_close(host(ops.conv2d(arr(z), arr(K))), out.detach().numpy(), TIGHT, "conv2d")
    assert_close(host(ops.conv2d_vjp_input(arr(g), arr(K))), zt.grad.numpy(), TIGHT, "grad z")
    assert_close(host(ops.conv2d_vjp_kernel(arr(g), ops.im2col(arr(z)))), Kt.grad.numpy(),
                 TIGHT, "grad K")


# ------------------------------------------------------------------ GroupNorm
def gn_case(seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)) * 2.0 + 0.5
    gamma, beta = 1 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    return x, gamma, beta, rng.standard_normal((N, C, H, W))


def test_group_norm_jacobian_against_fd(be, arr):
    x, gamma, beta, g = gn_case()
    y, st = ops.group_norm(arr(x), arr(gamma), arr(beta), G, 1e-5)
    J = host(ops.group_norm_matrix(st, arr(gamma)))                  # (N, d, d) standard
    dg, db = (host(m) for m in ops.group_norm_affine_matrices(st))  # (N, C, d) paper
    for i in range(N):
        assert_close(host(y)[i], gn_np(x[i], gamma, beta, G), TIGHT, "GN value")
        J_fd = fd_jacobian(lambda v: gn_np(v.reshape(C, H, W), gamma, beta, G).ravel(),
                           x[i].ravel())
        assert_close(J[i], J_fd, FD_RTOL, "GN Jacobian")
        Jg = fd_jacobian(lambda t: gn_np(x[i], t, beta, G).ravel(), gamma)
        Jb = fd_jacobian(lambda t: gn_np(x[i], gamma, t, G).ravel(), beta)
        assert_close(dg[i], Jg.T, FD_RTOL, "∂GN/∂γ")
        assert_close(db[i], Jb.T, FD_RTOL, "∂GN/∂β")
    # the formula's structure: zero across groups, (γ/σ)(I − 11ᵀ/M − x̂x̂ᵀ/M) within one
    d, M = C * H * W, C // G * H * W
    assert np.all(J[:, :M, M:] == 0) and np.all(J[:, M:, :M] == 0)
    xh = host(st.x_hat)[0, 0]                                        # sample 0, group 0
    sig = host(st.sigma)[0, 0, 0]
    blk = (np.eye(M) - 1 / M - np.outer(xh, xh) / M) / sig
    assert_close(J[0, :M, :M], np.repeat(gamma[:C // G], H * W)[:, None] * blk, TIGHT, "block")
    assert d == J.shape[1]


def test_group_norm_products_equal_matrix(be, arr):
    x, gamma, beta, g = gn_case(4)
    _, st = ops.group_norm(arr(x), arr(gamma), arr(beta), G, 1e-5)
    J = host(ops.group_norm_matrix(st, arr(gamma)))
    dg, db = (host(m) for m in ops.group_norm_affine_matrices(st))
    gx, g_gamma, g_beta = (host(a) for a in ops.group_norm_vjp(st, arr(gamma), arr(g)))
    jv = host(ops.group_norm_jvp(st, arr(gamma), arr(g)))
    gf = g.reshape(N, -1)
    assert_close(gx.reshape(N, -1), np.einsum("nij,ni->nj", J, gf), TIGHT, "GN vjp x")
    assert_close(jv.reshape(N, -1), np.einsum("nij,nj->ni", J, gf), TIGHT, "GN jvp")
    assert_close(g_gamma, np.einsum("nci,ni->c", dg, gf), TIGHT, "GN vjp γ")
    assert_close(g_beta, np.einsum("nci,ni->c", db, gf), TIGHT, "GN vjp β")


def test_group_norm_against_torch(be, arr):
    torch = pytest.importorskip("torch")
    x, gamma, beta, g = gn_case(5)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    y = torch.nn.functional.group_norm(xt, G, gt, bt, eps=1e-5)
    y.backward(torch.tensor(g))
    ours, st = ops.group_norm(arr(x), arr(gamma), arr(beta), G, 1e-5)
    assert_close(host(ours), y.detach().numpy(), TIGHT, "GN value")
    gx, g_gamma, g_beta = (host(a) for a in ops.group_norm_vjp(st, arr(gamma), arr(g)))
    assert_close(gx, xt.grad.numpy(), TIGHT, "GN grad x")
    assert_close(g_gamma, gt.grad.numpy(), TIGHT, "GN grad γ")
    assert_close(g_beta, bt.grad.numpy(), TIGHT, "GN grad β")
    Jt = torch.func.jacrev(lambda v: torch.nn.functional.group_norm(
        v[None], G, torch.tensor(gamma), torch.tensor(beta), eps=1e-5)[0])(torch.tensor(x[0]))
    assert_close(host(ops.group_norm_matrix(st, arr(gamma)))[0],
                 Jt.numpy().reshape(C * H * W, C * H * W), TIGHT, "GN jacrev")


def test_relu_prime_at_zero_is_zero(be, arr):
    a = arr([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(host(ops.relu_prime(a)), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(host(ops.relu(a)), [0.0, 0.0, 2.0])


# ------------------------------------------------------------------ the whole cell
def test_cell_is_a_cell(be):
    cell, *_ = setup(be)
    assert is_cell(cell)
    check_cell(cell)
    assert (cell.d, cell.d_x) == (C * H * W, C_X * H * W)
    assert cell.d_theta == 2 * 9 * C * C + 9 * C * C_X + 6 * C == host(cell.theta).size


def test_value_matches_definition(be, arr):
    cell, h, x, _ = setup(be)
    p, out = np_params(cell), host(cell(arr(h), arr(x)))
    for i in range(N):
        assert_close(out[i], F_np(p, h[i], x[i], shape_of(cell)), TIGHT, "F")
    # bind and bind_linear give the same values, bit for bit
    H_, X_ = arr(h), arr(x)
    np.testing.assert_array_equal(host(cell.bind(X_)(H_)), out)
    f, lin = cell.bind_linear(X_)(H_)
    np.testing.assert_array_equal(host(f), out)
    np.testing.assert_array_equal(host(lin.vjp_h(H_)), host(cell.linearize(H_, X_).vjp_h(H_)))


def test_jacobians_paper_layout_against_fd(be, arr):
    cell, h, x, _ = setup(be)
    p, shape = np_params(cell), shape_of(cell)
    H_, X_ = arr(h), arr(x)
    dF_dh, dF_dx, dF_dth = (host(m) for m in (cell.dF_dh(H_, X_), cell.dF_dx(H_, X_),
                                              cell.dF_dtheta(H_, X_)))
    theta = host(cell.theta)

    def F_theta(t, i):
        q = {k: host(v) for k, v in cell.unflatten(arr(t)).items()}
        return F_np(q, h[i], x[i], shape)
    for i in range(N):
        assert np.abs(kinks_np(p, h[i], x[i], shape)).min() > 1e-3, "too close to a ReLU kink"
        J_h = fd_jacobian(lambda hh: F_np(p, hh, x[i], shape), h[i])          # standard layout
        J_x = fd_jacobian(lambda xx: F_np(p, h[i], xx, shape), x[i])
        J_th = fd_jacobian(lambda t: F_theta(t, i), theta)
        assert_close(dF_dh[i], J_h.T, FD_RTOL, "dF/dh")                     # paper = Jᵀ
        assert_close(dF_dx[i], J_x.T, FD_RTOL, "dF/dx")
        assert_close(dF_dth[i], J_th.T, FD_RTOL, "dF/dtheta")
    assert_close(host(cell.jacobian_h(H_, X_)), np.transpose(dF_dh, (0, 2, 1)), 0, "J_h")


def torch_F(torch, cell, h, x, p):
    """(M1) in PyTorch for a batch of rows; p maps PARAMS names to tensors."""
    fn = torch.nn.functional
    n = h.shape[0]
    z, xi = h.reshape(n, cell.C, cell.H, cell.W), x.reshape(n, cell.C_x, cell.H, cell.W)
    r1 = torch.relu(fn.group_norm(fn.conv2d(z, p["K1"], padding=1), cell.G, p["gamma1"],
                                  p["beta1"], eps=cell.eps))
    a2 = fn.conv2d(r1, p["K2"], padding=1) + fn.conv2d(xi, p["U"], padding=1)
    a3 = z + fn.group_norm(a2, cell.G, p["gamma2"], p["beta2"], eps=cell.eps)
    return fn.group_norm(torch.relu(a3), cell.G, p["gamma3"], p["beta3"],
                         eps=cell.eps).reshape(n, -1)


def test_cell_against_torch_jacrev(be, arr):
    torch = pytest.importorskip("torch")
    cell, h, x, v = setup(be, seed=1)
    H_, X_ = arr(h), arr(x)
    p = {k: torch.tensor(a) for k, a in np_params(cell).items()}
    ht, xt, vt = (torch.tensor(a) for a in (h, x, v))
    assert_close(host(cell(H_, X_)), torch_F(torch, cell, ht, xt, p).numpy(), TIGHT, "F")
    diag = lambda J: np.stack([J[i, :, i, :] for i in range(N)])           # noqa: E731
    J_h = diag(torch.func.jacrev(lambda a: torch_F(torch, cell, a, xt, p))(ht).numpy())
    J_x = diag(torch.func.jacrev(lambda a: torch_F(torch, cell, ht, a, p))(xt).numpy())
    assert_close(host(cell.dF_dh(H_, X_)), np.transpose(J_h, (0, 2, 1)), TIGHT, "dF/dh")
    assert_close(host(cell.dF_dx(H_, X_)), np.transpose(J_x, (0, 2, 1)), TIGHT, "dF/dx")
    # the parameter VJP against torch.autograd, parameter by parameter
    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    torch_F(torch, cell, ht, xt, leaves).backward(vt)
    ours = cell.linearize(H_, X_).vjp_theta(arr(v))
    for k in cell.PARAMS:
        assert_close(host(ours[k]), leaves[k].grad.numpy(), TIGHT, f"vjp_theta[{k}]")


@pytest.mark.parametrize("geometry", [(C, C_X, H, W, G), (8, 1, 8, 8, 4)],
                         ids=["small", "digits-8x8"])
def test_vector_forms_equal_matrix_forms(be, arr, geometry):
    c, c_x, hh, ww, groups = geometry
    cell, h, x, v = setup(be, seed=2, c=c, c_x=c_x, hh=hh, ww=ww, groups=groups)
    H_, X_, V = arr(h), arr(x), arr(v)
    lin = cell.linearize(H_, X_)
    dF_dh, dF_dx = host(cell.dF_dh(H_, X_)), host(cell.dF_dx(H_, X_))
    assert_close(host(lin.vjp_h(V)), np.einsum("nji,ni->nj", dF_dh, v), TIGHT, "vjp_h")
    assert_close(host(lin.jvp_h(V)), np.einsum("nji,nj->ni", dF_dh, v), TIGHT, "jvp_h")
    assert_close(host(lin.vjp_x(V)), np.einsum("nqi,ni->nq", dF_dx, v), TIGHT, "vjp_x")
    if c == C:                     # ∂F/∂θ dense is (n, 1272, 512) at 8 × 8: the small case only
        dF_dth = host(cell.dF_dtheta(H_, X_))
        assert_close(host(cell.flatten(lin.vjp_theta(V))), np.einsum("nti,ni->t", dF_dth, v),
                     TIGHT, "vjp_theta")


def test_float32_matches_float64(be, arr):
    """float32 rounding, eps = 1.2e-7, through ~20 operations with 1/σ ≲ 10 and sums of ≤ 80
    terms: ≲ 1e-5 of the largest entry; 1e-4 leaves margin (an O(1) error still fails)."""
    c64, h, x, v = setup(be, seed=3)
    c32 = ConvCell.random(C, C_X, H, W, G, seed=3, dtype="float32", backend=be)
    for cell, dt in ((c64, "float64"), (c32, "float32")):
        lin = cell.linearize(arr(h, dt), arr(x, dt))
        out = [host(cell(arr(h, dt), arr(x, dt))), host(lin.vjp_h(arr(v, dt))),
               host(lin.jvp_h(arr(v, dt))), host(cell.flatten(lin.vjp_theta(arr(v, dt)))),
               host(cell.dF_dh(arr(h, dt), arr(x, dt)))]
        if dt == "float64":
            ref = out
    for a, b, what in zip(out, ref, ("F", "vjp_h", "jvp_h", "vjp_theta", "dF_dh")):
        assert_close(a, b, 1e-4, f"float32 {what}")


def test_theta_order_and_roundtrip(be, arr):
    cell, h, x, _ = setup(be)
    theta = host(cell.theta)
    np.testing.assert_array_equal(theta, np.concatenate(
        [np.ravel(host(getattr(cell, k))) for k in cell.PARAMS]))
    p = cell.unflatten(cell.theta)
    assert [tuple(p[k].shape) for k in cell.PARAMS[:3]] == [(C, C, 3, 3), (C, C, 3, 3),
                                                            (C, C_X, 3, 3)]
    np.testing.assert_array_equal(host(cell.flatten(p)), theta)
    other = cell.with_theta(cell.theta * 2)
    np.testing.assert_array_equal(host(other.K2), 2 * host(cell.K2))
    assert (other.H, other.W, other.G, other.eps) == (cell.H, cell.W, cell.G, cell.eps)


def test_jacobian_norm_bound_holds_and_project_is_identity(be, arr):
    cell, h, x, _ = setup(be)
    bound = cell.jacobian_norm_bound(arr(h), arr(x))
    J = host(cell.jacobian_h(arr(h), arr(x)))
    norms = np.array([np.linalg.norm(J[i], 2) for i in range(N)])
    assert isinstance(bound, np.ndarray) and bound.shape == (N,)
    assert np.all(norms <= bound * (1 + 1e-12)), (norms, bound)
    assert cell.project(0.9) is cell
    with pytest.raises(ValueError, match="^bound must be"):
        cell.project(-1.0)


def test_scale_invariance_that_makes_project_a_no_op(be, arr):
    """GN₁ divides out the scale of K₁, so rescaling K₁ leaves F unchanged (up to ε)."""
    cell, h, x, _ = setup(be)
    scaled = cell.with_params({**cell.params(), "K1": cell.K1 * 0.5})
    a, b = host(cell(arr(h), arr(x))), host(scaled(arr(h), arr(x)))
    assert_close(b, a, 1e-4, "F with K1/2")                # ε = 1e-5 against var ≈ 1


# ------------------------------------------------------------------ refusals
def test_input_checks(be, arr):
    cell, h, x, _ = setup(be)
    cell.check_inputs(x=arr(x), h=arr(h))
    cases = [(dict(x=arr(x[:, :-1])), "^x must have shape"),
             (dict(x=arr(x), h=arr(h[:, :-1])), "^h must have shape"),
             (dict(x=arr(x), h=arr(h[:1])), "^h must have shape"),
             (dict(x=arr(x[:0])), "^x must hold at least one sample")]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cell.check_inputs(**kwargs)
    with pytest.raises(TypeError, match="^h has dtype float32"):
        cell.check_inputs(x=arr(x), h=arr(h, "float32"))


def test_constructor_checks(be, arr):
    cell, *_ = setup(be)
    p = cell.params()
    geo = dict(H=H, W=W, G=G)
    with pytest.raises(ValueError, match="^G must divide"):
        ConvCell(**p, H=H, W=W, G=3)
    with pytest.raises(ValueError, match="^K2 must have shape"):
        ConvCell(**{**p, "K2": p["K2"][:, :1, ...]}, **geo)
    with pytest.raises(ValueError, match="^gamma3 must have shape"):
        ConvCell(**{**p, "gamma3": p["gamma3"][:1]}, **geo)
    with pytest.raises(ValueError, match="^U contains NaN"):
        ConvCell(**{**p, "U": p["U"] * float("nan")}, **geo)
    with pytest.raises(ValueError, match="^eps must be"):
        ConvCell(**p, **geo, eps=0.0)
    with pytest.raises(ValueError, match="^H must be"):
        ConvCell(**p, H=0, W=W, G=G)
    with pytest.raises(ValueError, match="^seed must be"):
        ConvCell.random(seed=-1)
    with pytest.raises(ValueError, match="^theta must have shape"):
        cell.unflatten(cell.theta[:-1])
    assert host(ConvCell.random(C, C_X, H, W, G, seed=0, backend=be).K1).tolist() \
        == host(cell.K1).tolist()                                   # seeded: same numbers

