"""The parts of the convolutional cell (``deqref.conv``), each with its hand-written derivatives.

Images are batched as (n, C, H, W), channel-major and row-major (PyTorch's NCHW); a flattened
image is ``reshape(n, C·H·W)`` of that, so pixel (c, i, j) sits at index c·H·W + i·W + j.
Every part comes twice: as the *matrix form*, the explicit (d_out, d_in) matrix in the
**standard** layout J[p, q] = ∂out_p/∂in_q of one sample (the paper's layout is its transpose),
and as the *vector form*, the array program a network runs, with its VJP (vector-Jacobian
product, ``vᵀ J`` = the paper's-layout matrix times v) and JVP (``J u``).

Parts
-----
- **2-D convolution**, 3 × 3 kernel K (C_out, C_in, 3, 3), stride 1, zero padding 1 (the output
  has the input's H × W), no bias; as PyTorch's ``conv2d`` it is a cross-correlation:

      out[o, i, j] = Σ_{c, a, b} K[o, c, a, b] · z_pad[c, i + a, j + b],   a, b ∈ {0, 1, 2}    (C1)

  with z_pad the input padded by one zero on every side.
- **GroupNorm** with G groups and a per-channel affine (γ, β) (``torch.nn.GroupNorm``).
- **ReLU**, σ′(0) := 0 as everywhere in deqref.

References: Bai, Koltun, Kolter, *Multiscale Deep Equilibrium Models* (NeurIPS 2020);
Wu and He, *Group Normalization* (ECCV 2018).
"""
from __future__ import annotations

KERNEL = 3                                    # 3 × 3 kernels, padding 1: "same" convolution


# ------------------------------------------------------------------ 2-D convolution
def conv_matrix(K, H: int, W: int):
    """The convolution (C1) as one explicit matrix, standard layout   # (C_out·H·W, C_in·H·W)

    The doubly-block Toeplitz matrix: each of the 9 taps (a, b) mixes channels by K[:, :, a, b]
    and shifts the image by (a − 1, b − 1) with zeros coming in at the border, so

        T = Σ_{a,b} K[:, :, a, b] ⊗ (E_{a−1}^{(H)} ⊗ E_{b−1}^{(W)}),
        E_k^{(m)}[i, i′] = 1  iff  i′ = i + k   (the m × m matrix with ones on diagonal k),

    ⊗ the Kronecker product. T[(o, i, j), (c, i′, j′)] = K[o, c, i′ − i + 1, j′ − j + 1] where
    that index lies in {0, 1, 2}, else 0; out = T vec(z) for one sample.
    """
    xp = _xp(K)
    C_out, C_in = K.shape[0], K.shape[1]
    T = xp.zeros((C_out * H * W, C_in * H * W), dtype=K.dtype)
    for a in range(KERNEL):
        for b in range(KERNEL):
            E_a = xp.eye(H, H, k=a - 1, dtype=K.dtype)                 # (H, H)
            E_b = xp.eye(W, W, k=b - 1, dtype=K.dtype)                 # (W, W)
            T = T + _kron(K[:, :, a, b], _kron(E_a, E_b))
    return T


def _kron(A, B):
    """The Kronecker product A ⊗ B of two matrices   # (p·r, q·s)"""
    xp = _xp(A)
    p, q = A.shape
    r, s = B.shape
    return xp.reshape(A[:, None, :, None] * B[None, :, None, :], (p * r, q * s))


def pad1(z):
    """z padded with one zero on each side of both image axes   # (n, C, H + 2, W + 2)"""
    xp = _xp(z)
    n, C, H, W = z.shape
    out = xp.zeros((n, C, H + 2, W + 2), dtype=z.dtype)
    out[:, :, 1:H + 1, 1:W + 1] = z
    return out


def im2col(z):
    """The 9 shifted copies of z that (C1) sums over, as columns   # (n, C·9, H·W)

    cols[n, (c, a, b), (i, j)] = z_pad[n, c, i + a, j + b], so that (C1) is one matrix product
    out[n] = K.reshape(C_out, C_in·9) @ cols[n] (``conv2d`` computes the same sum from three
    copies, ``row_shifts``); the kernel's VJP and ``conv_kernel_matrix`` take cols as it is.
    """
    xp = _xp(z)
    n, C, H, W = z.shape
    zp = pad1(z)
    taps = [zp[:, :, a:a + H, b:b + W] for a in range(KERNEL) for b in range(KERNEL)]
    cols = xp.stack(taps, axis=2)                                  # (n, C, 9, H, W)
    return xp.reshape(cols, (n, C * KERNEL * KERNEL, H * W))


def row_shifts(z):
    """The three horizontal shifts of z, each with a zero row above and below, rows flattened
    # (n, C·3, (H + 2)·W)

    shifts[n, (c, b), i′·W + j] = z_pad[n, c, i′, j + b] for i′ = 0 … H + 1 (z_pad of (C1)):
    tap (a, b) of (C1) at every output pixel (i, j) is then the window of H·W consecutive
    entries from a·W on, shifts[n, (c, b), a·W + i·W + j]. Three copies of z instead of
    im2col's nine, and each window is a strided view, not a copy.
    """
    xp = _xp(z)
    n, C, H, W = z.shape
    out = xp.zeros((n, C, KERNEL, H + 2, W), dtype=z.dtype)
    out[:, :, 0, 1:H + 1, 1:] = z[:, :, :, :W - 1]                  # b = 0 reads column j − 1
    out[:, :, 1, 1:H + 1, :] = z
    out[:, :, 2, 1:H + 1, :W - 1] = z[:, :, :, 1:]                  # b = 2 reads column j + 1
    return xp.reshape(out, (n, C * KERNEL, (H + 2) * W))


def conv2d(z, K):
    """(C1) as three products, one per kernel row a   # (n, C_out, H, W)

        out[n] = Σ_a K[:, :, a, :].reshape(C_out, C_in·3) @ shifts[n, :, a·W : a·W + H·W]

    with ``row_shifts(z)``: the same sum over (c, a, b) as im2col's out[n] =
    K.reshape(C_out, C_in·9) @ im2col(z)[n], without building the nine shifted copies."""
    xp = _xp(z)
    n, C_in, H, W = z.shape
    C_out = K.shape[0]
    shifts = row_shifts(z)                                          # (n, C_in·3, (H + 2)·W)
    out = None
    for a in range(KERNEL):
        K_a = xp.reshape(K[:, :, a, :], (C_out, C_in * KERNEL))     # (C_out, C_in·3)
        term = K_a @ shifts[:, :, a * W:a * W + H * W]              # (n, C_out, H·W)
        out = term if out is None else out + term
    return xp.reshape(out, (n, C_out, H, W))


def conv2d_vjp_input(g, K):
    """Tᵀ g per sample, the VJP of (C1) w.r.t. its input   # (n, C_in, H, W)

    ∂out[o, i, j]/∂z[c, i′, j′] = K[o, c, i′ − i + 1, j′ − j + 1], so
        (Tᵀ g)[c, i′, j′] = Σ_{o, a′, b′} K[o, c, 2 − a′, 2 − b′] · g_pad[o, i′ + a′, j′ + b′]
    (a′ = 2 − a): the same padded convolution with the kernel flipped in both image axes and its
    two channel axes swapped, K′[c, o, a′, b′] = K[o, c, 2 − a′, 2 − b′].
    """
    xp = _xp(g)
    K_t = xp.permute_dims(xp.flip(K, axis=(2, 3)), (1, 0, 2, 3))          # (C_in, C_out, 3, 3)
    return conv2d(g, K_t)


def conv2d_vjp_kernel(g, cols):
    """Σ over the batch of ∂out/∂K · g, the VJP of (C1) w.r.t. K   # (C_out, C_in, 3, 3)

    ∂out[n, o, i, j]/∂K[o′, c, a, b] = δ_oo′ z_pad[n, c, i + a, j + b], so
        grad_K[o, (c, a, b)] = Σ_{n, (i, j)} g[n, o, (i, j)] · cols[n, (c, a, b), (i, j)].

    Per sample cols[n] (C_in·9, H·W), read as it lies, times g[n]ᵀ (H·W, C_out), then the sum
    over the batch and one transpose of the small result (a contraction over both axes at once
    would first copy cols transposed).
    """
    xp = _xp(g)
    n, C_out, H, W = g.shape
    C9 = cols.shape[1]
    per_sample = cols @ xp.permute_dims(xp.reshape(g, (n, C_out, H * W)), (0, 2, 1))
    grad = xp.permute_dims(xp.sum(per_sample, axis=0), (1, 0))            # (C_out, C_in·9)
    return xp.reshape(grad, (C_out, C9 // (KERNEL * KERNEL), KERNEL, KERNEL))


def conv_kernel_matrix(z, C_out: int):
    """∂out/∂K of one sample in the paper's layout, per sample   # (n, C_out·C_in·9, C_out·H·W)

    [(o′, c, a, b), (o, i, j)] = δ_oo′ · cols[(c, a, b), (i, j)], i.e. I_{C_out} ⊗ cols.
    """
    xp = _xp(z)
    cols = im2col(z)                                                     # (n, C_in·9, H·W)
    n, q, p = cols.shape
    eye = xp.eye(C_out, dtype=z.dtype)
    out = eye[None, :, None, :, None] * cols[:, None, :, None, :]        # (n, o′, q, o, p)
    return xp.reshape(out, (n, C_out * q, C_out * p))


# ------------------------------------------------------------------ GroupNorm
class GroupStats:
    """μ, σ and x̂ of GroupNorm's input, kept for its derivatives.

    Group g holds the channels g·C/G … (g + 1)·C/G − 1 of one sample, M = (C/G)·H·W values:
        μ = (1/M) Σ x,   σ² = (1/M) Σ (x − μ)² + ε  (biased variance, as PyTorch),
        x̂ = (x − μ)/σ.                                                                (N1)
    """

    def __init__(self, x, G: int, eps: float):
        xp = _xp(x)
        n, C, H, W = x.shape
        self.shape, self.G, self.M = (n, C, H, W), G, (C // G) * H * W
        xg = xp.reshape(x, (n, G, self.M))                                 # (n, G, M)
        mu = xp.mean(xg, axis=2, keepdims=True)                            # (n, G, 1)
        centred = xg - mu                                                  # (n, G, M)
        var = xp.mean(centred * centred, axis=2, keepdims=True)            # (n, G, 1)
        self.sigma = xp.sqrt(var + eps)                                    # (n, G, 1)
        self.x_hat = centred / self.sigma                                  # (n, G, M)

    def grouped(self, v):
        """v (n, C, H, W) seen as (n, G, M)."""
        return _xp(v).reshape(v, (self.shape[0], self.G, self.M))

    def image(self, v):
        """v (n, G, M) back to (n, C, H, W)."""
        return _xp(v).reshape(v, self.shape)


def _per_channel(gamma, shape):
    """γ (C,) broadcast against (n, C, H, W)."""
    return _xp(gamma).reshape(gamma, (1, shape[1], 1, 1))


def group_norm(x, gamma, beta, G: int, eps: float):
    """y = γ_c x̂ + β_c (N1), and its ``GroupStats``   # (n, C, H, W)"""
    st = GroupStats(x, G, eps)
    y = _per_channel(gamma, x.shape) * st.image(st.x_hat) + _per_channel(beta, x.shape)
    return y, st


def _project(st: GroupStats, v):
    """P v per group with P = I − 11ᵀ/M − x̂x̂ᵀ/M (N2), v (n, G, M)."""
    xp = _xp(v)
    mean_v = xp.mean(v, axis=2, keepdims=True)                          # 1ᵀv / M
    mean_vx = xp.mean(v * st.x_hat, axis=2, keepdims=True)             # x̂ᵀv / M
    return v - mean_v - st.x_hat * mean_vx


def group_norm_jvp(st: GroupStats, gamma, u):
    """J u: GroupNorm's derivative w.r.t. x in direction u   # (n, C, H, W)

    With x̂ of (N1), ∂σ/∂x_j = x̂_j/M and ∂μ/∂x_j = 1/M, so for i, j in one group
        ∂x̂_i/∂x_j = (δ_ij − 1/M − x̂_i x̂_j/M)/σ,   i.e.   ∂x̂/∂x = P/σ,
        P = I − 11ᵀ/M − x̂x̂ᵀ/M,                                                         (N2)
    and ∂y_i/∂x_j = γ_{c(i)} P_ij/σ: standard layout J = diag(γ) P/σ (zero across groups;
    ε inside σ changes nothing in (N2)). P is symmetric (a projector when ε = 0: x̂ ⊥ 1 and
    ‖x̂‖² = M), so ‖J‖₂ ≤ max|γ|/σ.
    """
    Pu = _project(st, st.grouped(u)) / st.sigma                          # (n, G, M)
    return _per_channel(gamma, u.shape) * st.image(Pu)


def group_norm_vjp(st: GroupStats, gamma, g):
    """VJPs of (N1): (∂y/∂x · g, ∂y/∂γ · g, ∂y/∂β · g), the paper's layout = Jᵀ g.

    w.r.t. x: Jᵀ g = (P/σ)(γ ⊙ g), per sample   # (n, C, H, W)
    w.r.t. γ: Σ_{n, i, j} g ⊙ x̂ per channel     # (C,)   (∂y_{c,i,j}/∂γ_c = x̂_{c,i,j})
    w.r.t. β: Σ_{n, i, j} g per channel          # (C,)
    """
    xp = _xp(g)
    gx = st.image(_project(st, st.grouped(_per_channel(gamma, g.shape) * g)) / st.sigma)
    g_gamma = xp.sum(g * st.image(st.x_hat), axis=(0, 2, 3))
    g_beta = xp.sum(g, axis=(0, 2, 3))
    return gx, g_gamma, g_beta


def group_norm_vjp_tangent(st: GroupStats, gamma, g, dg, dx):
    """The change of ``group_norm_vjp(st, γ, g)`` when GroupNorm's input moves along dx and the
    upstream g along dg: d/dt of the three VJPs at (x + t dx, g + t dg), t = 0 (a second
    derivative of (N1), for Jacobian regularization's gradient).

    With g̃ = γ ⊙ g and Jᵀg = P(g̃)/σ, P(v) = v − mean(v) − x̂ mean(v x̂) per group:
        δσ = mean(x̂ δx)          (σ² = var + ε, δvar = 2σ mean(x̂ δx)),
        δx̂ = P(δx)/σ,
        δ(Jᵀg) = −(δσ/σ) Jᵀg + [δg̃ − mean(δg̃) − δx̂ mean(g̃ x̂) − x̂ mean(δg̃ x̂ + g̃ δx̂)]/σ,
        δ(grad γ) = Σ (δg ⊙ x̂ + g ⊙ δx̂),   δ(grad β) = Σ δg   (per channel).
    Returns (δ(Jᵀg) (n, C, H, W), δ(grad γ) (C,), δ(grad β) (C,)).
    """
    xp = _xp(g)
    gt = st.grouped(_per_channel(gamma, g.shape) * g)                     # g̃   (n, G, M)
    dgt = st.grouped(_per_channel(gamma, g.shape) * dg)                   # δg̃  (n, G, M)
    dx_g = st.grouped(dx)
    d_sigma = xp.mean(st.x_hat * dx_g, axis=2, keepdims=True)             # (n, G, 1)
    d_xhat = _project(st, dx_g) / st.sigma                                # (n, G, M)
    gx = _project(st, gt) / st.sigma                                      # Jᵀg  (n, G, M)
    d_gx = (-(d_sigma / st.sigma) * gx
            + (dgt - xp.mean(dgt, axis=2, keepdims=True)
               - d_xhat * xp.mean(gt * st.x_hat, axis=2, keepdims=True)
               - st.x_hat * xp.mean(dgt * st.x_hat + gt * d_xhat, axis=2, keepdims=True))
            / st.sigma)
    d_g_gamma = xp.sum(dg * st.image(st.x_hat) + g * st.image(d_xhat), axis=(0, 2, 3))
    return st.image(d_gx), d_g_gamma, xp.sum(dg, axis=(0, 2, 3))


def group_norm_matrix(st: GroupStats, gamma):
    """J = diag(γ) P/σ of (N2) per sample, standard layout, block diagonal over the G groups
    # (n, C·H·W, C·H·W)

    Written on the whole image: with S[p, q] = 1 iff p and q lie in one group (I_G ⊗ 11ᵀ),
        J[p, q] = γ_{c(p)} (δ_pq − S_pq/M − S_pq x̂_p x̂_q/M) / σ_{g(p)}.
    """
    xp = _xp(gamma)
    n, C, H, W = st.shape
    d, M = C * H * W, st.M
    S = _kron(xp.eye(st.G, dtype=gamma.dtype), xp.ones((M, M), dtype=gamma.dtype))   # (d, d)
    x_hat = xp.reshape(st.x_hat, (n, d))                                  # (n, d)
    sigma = xp.reshape(xp.broadcast_to(st.sigma, (n, st.G, M)), (n, d))  # σ_{g(p)}  (n, d)
    gamma_p = xp.reshape(xp.broadcast_to(gamma[:, None], (C, H * W)), (d,))   # γ_{c(p)}
    P = (xp.eye(d, dtype=gamma.dtype)[None, :, :] - S[None, :, :] / M
         - S[None, :, :] * x_hat[:, :, None] * x_hat[:, None, :] / M)   # (n, d, d)
    return (gamma_p[None, :] / sigma)[:, :, None] * P


def group_norm_affine_matrices(st: GroupStats):
    """∂y/∂γ and ∂y/∂β in the paper's layout, per sample   # (n, C, C·H·W) each

    [c, (c′, i, j)] = δ_cc′ x̂[c′, i, j] and δ_cc′.
    """
    xp = _xp(st.x_hat)
    n, C, H, W = st.shape
    x_hat = xp.reshape(st.x_hat, (n, C, H * W))                          # (n, C, H·W)
    eye = xp.eye(C, dtype=x_hat.dtype)
    d_gamma = eye[None, :, :, None] * x_hat[:, None, :, :]                # (n, c, c′, H·W)
    d_beta = xp.broadcast_to(eye[None, :, :, None], (n, C, C, H * W))
    return (xp.reshape(d_gamma, (n, C, C * H * W)), xp.reshape(d_beta, (n, C, C * H * W)))


# ------------------------------------------------------------------ ReLU
def relu(a):
    """max(a, 0)."""
    return _xp(a).maximum(a, 0.0)


def relu_prime(a):
    """σ′(a) = 1 where a > 0, else 0 (σ′(0) := 0)."""
    xp = _xp(a)
    return xp.astype(a > 0.0, a.dtype)


def _xp(a):
    from .backend import backend_of
    return backend_of(a).xp
