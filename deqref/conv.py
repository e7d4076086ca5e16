"""A convolutional residual cell shaped as MDEQ's residual block, with hand-written derivatives.

The cell (one resolution of MDEQ's ``BasicBlock``, Bai et al. 2020, as its DEQ and TorchDEQ's
image examples write it; ``deqref.conv_ops`` holds the parts and their derivatives):

    a₁ = K₁ ⋆ z                     3 × 3 convolution, C → C channels, padding 1, no bias
    r₁ = ReLU(GN₁(a₁))
    a₂ = K₂ ⋆ r₁ + U ⋆ x            the input injection U ⋆ x (3 × 3, C_x → C) joins before GN₂
    a₃ = z + GN₂(a₂)                 the residual connection
    F(z, x) = GN₃(ReLU(a₃))                                                                 (M1)

GN_k is GroupNorm with G groups and its own per-channel affine (γ_k, β_k), ε = 1e-5 as
``torch.nn.GroupNorm``. Why this form: it is MDEQ's block (conv → GN → ReLU → conv, the
injection added before the second GroupNorm, the residual, ReLU, a last GroupNorm), the block
whose equilibrium Geng et al. train in Table 3 and GDEQ on CIFAR-10. The last GroupNorm keeps
F(z) bounded whatever z is, which is what lets the DEQ iterate at all; with the injection
inside GN₂, x and the recurrent path share one normalization, so their relative scale (not
their absolute one) shapes the cell (``ConvCell.random``'s ``injection`` sets it). The
implicit-layers tutorial's variant, GN₃(ReLU(z + GN₂(x + K₂ ⋆ GN₁(ReLU(K₁ ⋆ z))))), orders
GN₁ and the first ReLU the other way; deqref follows MDEQ. MDEQ's inner-channel expansion
(DEQ_EXPAND) and its multiple resolutions are left out: one resolution, C channels throughout.

Layout. A state row is the image z (C, H, W) flattened channel-major, row-major (PyTorch's
NCHW): h (n, d), d = C·H·W, h[:, c·H·W + i·W + j] = z[:, c, i, j]; an input row likewise,
x (n, d_x), d_x = C_x·H·W. θ = [vec K₁, vec K₂, vec U, γ₁, β₁, γ₂, β₂, γ₃, β₃] in ``PARAMS``
order, each row-major, K (C_out, C_in, 3, 3) as ``torch.nn.Conv2d.weight``:
d_θ = 2·9C² + 9C·C_x + 6C.

Jacobians. With B₃ = J_GN₃ diag(ReLU′(a₃)) (= ∂F/∂a₃, standard layout), the chain rule reads

    J_h = B₃ (I + J_GN₂ T₂ diag(ReLU′(n₁)) J_GN₁ T₁),     n₁ = GN₁(a₁),                    (M2)

T_k the doubly-block Toeplitz matrix of K_k ⋆ (``conv_ops.conv_matrix``) and J_GN the
GroupNorm Jacobian diag(γ) P/σ of ``conv_ops.group_norm_jvp``. ``dF_dh`` returns J_hᵀ (the
paper's layout, [j, i] = ∂F_i/∂h_j), built from these explicit matrices; ``linearize`` gives
the same products as vector programs that never form them.

Well-posedness. GroupNorm makes F invariant to the scale of K₁ (GN₁(t a) = GN₁(a), t > 0) and of
(K₂, U) together, so no rescaling of the kernels bounds ∂F/∂h: ``project`` changes nothing
(see there). What holds for every θ: F is continuous and maps into a bounded set (each
channel c of GN₃'s output has ‖·‖₂ ≤ |γ₃c|·√M + |β₃c|·√(HW), M the group size), so a fixed point
exists (Brouwer); it need not be unique, and the plain iteration need not converge (MDEQ uses
Broyden). ``jacobian_norm_bound`` gives a per-sample bound of ‖∂F/∂h‖₂ from (M2).

References: Bai, Koltun, Kolter, *Multiscale Deep Equilibrium Models*, NeurIPS 2020;
Geng et al., *On Training Implicit Models*, NeurIPS 2021 (Table 3).
"""
from __future__ import annotations

import numpy as np

from . import conv_ops as ops
from .backend import (DTYPES, Backend, backend_of, check_backend, check_finite, check_seed,
                      check_shape, dtype_name, require_arrays, to_numpy)
from .cell import NOT_GIVEN, check_rows
from .checks import check_choice, check_int, check_real
from .conv_linear import ConvLinearization, Forward



class ConvCell:
    """The cell (M1) on C × H × W images, batched over rows (``deqref.cell``).

    Parameters
    ----------
    K1, K2 : (C, C, 3, 3) arrays          the recurrent kernels
    U : (C, C_x, 3, 3) array              the input-injection kernel
    gamma1, beta1, ..., beta3 : (C,)      GroupNorm affines
    H, W : int                            image height and width
    G : int                               GroupNorm groups (G divides C)
    eps : float                           GroupNorm's ε (1e-5, as PyTorch)
    """

    PARAMS = ("K1", "K2", "U", "gamma1", "beta1", "gamma2", "beta2", "gamma3", "beta3")

    def __init__(self, K1, K2, U, gamma1, beta1, gamma2, beta2, gamma3, beta3, *,
                 H: int, W: int, G: int, eps: float = 1e-5):
        p = dict(K1=K1, K2=K2, U=U, gamma1=gamma1, beta1=beta1, gamma2=gamma2, beta2=beta2,
                 gamma3=gamma3, beta3=beta3)
        self.xp = require_arrays(**p)                 # one backend, one float dtype
        self.H, self.W = check_int("H", H, minimum=1), check_int("W", W, minimum=1)
        check_shape("K1", K1, (None, None, 3, 3))
        C = K1.shape[0]
        if C < 1:
            raise ValueError(f"K1 must have at least one output channel, "
                             f"got shape {tuple(K1.shape)}")
        self.G = check_int("G", G, minimum=1, maximum=C)
        if C % self.G:
            raise ValueError(f"G must divide the channel count C = {C}, got {G}")
        self.eps = check_real("eps", eps, lo=0, lo_open=True)
        check_shape("K1", K1, (C, C, 3, 3))
        check_shape("K2", K2, (C, C, 3, 3))
        check_shape("U", U, (C, None, 3, 3))
        if U.shape[1] < 1:
            raise ValueError(f"U must have at least one input channel, got shape {tuple(U.shape)}")
        for name in self.PARAMS[3:]:
            check_shape(name, p[name], (C,))
        for name, a in p.items():
            check_finite(name, a)
        for name, a in p.items():
            setattr(self, name, a)
        self.C, self.C_x = C, U.shape[1]
        self.d, self.d_x = C * self.H * self.W, self.C_x * self.H * self.W
        self.dtype = dtype_name(K1)
        self.backend: Backend = backend_of(K1)

    # ------------------------------------------------------------ construction
    @classmethod
    def random(cls, C: int = 8, C_x: int = 1, H: int = 8, W: int = 8, G: int = 4, *, seed: int,
               injection: float = 1.0, eps: float = 1e-5, dtype: str = "float64",
               backend: Backend | None = None) -> "ConvCell":
        """A seeded random cell: kernels with i.i.d. N(0, 1/fan_in) entries (fan_in = 9·C_in,
        so a convolution keeps the variance of its input), U's scaled by ``injection``,
        γ_k = 1 + 0.1·N(0, 1) and β_k = 0.1·N(0, 1) (not PyTorch's 1 and 0, so that a misplaced
        γ or β shows in a test). Draws come from ``numpy.random.default_rng(seed)`` in
        ``PARAMS`` order.

        ``injection`` sets how much U ⋆ x dominates a₂. With 1, ∂F/∂h at a fixed point often
        has spectral radius near 1 and fixed points need not be unique (Broyden finds some where
        every a₃ < 0, so ReLU′ = 0 and ∂F/∂h = 0); with 10, GN₂ divides by the injection's
        spread, the recurrent path K₂ ⋆ r₁ is damped by it, and (C = 4, 5 × 4 images, seeds 0
        and 1) ‖∂F/∂h‖₂ ≈ 0.8 at the fixed point, which plain iteration then finds."""
        C, C_x = check_int("C", C, minimum=1), check_int("C_x", C_x, minimum=1)
        seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
        injection = check_real("injection", injection, lo=0, lo_open=True)
        be = check_backend(backend)
        rng = np.random.default_rng(seed)
        p = {"K1": rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C),
             "K2": rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C),
             "U": injection * rng.standard_normal((C, C_x, 3, 3)) / np.sqrt(9 * C_x)}
        for k in (1, 2, 3):
            p[f"gamma{k}"] = 1.0 + 0.1 * rng.standard_normal(C)
            p[f"beta{k}"] = 0.1 * rng.standard_normal(C)
        return cls(**{k: be.asarray(v, dtype) for k, v in p.items()}, H=H, W=W, G=G, eps=eps)

    def _shapes(self) -> dict:
        C, C_x = self.C, self.C_x
        shapes = {"K1": (C, C, 3, 3), "K2": (C, C, 3, 3), "U": (C, C_x, 3, 3)}
        return {**shapes, **{name: (C,) for name in self.PARAMS[3:]}}

    @property
    def d_theta(self) -> int:
        return sum(int(np.prod(s)) for s in self._shapes().values())

    @property
    def theta(self):
        """θ = [vec K₁, vec K₂, vec U, γ₁, β₁, γ₂, β₂, γ₃, β₃], row-major   # (d_θ,)"""
        return self.flatten(self.params())

    def params(self) -> dict:
        return {name: getattr(self, name) for name in self.PARAMS}

    def flatten(self, params: dict):
        """``{name: array}`` in ``PARAMS`` order to a (d_θ,) vector."""
        xp = self.xp
        return xp.concat([xp.reshape(params[name], (-1,)) for name in self.PARAMS])

    def unflatten(self, theta) -> dict:
        """A flat (d_θ,) vector to ``{name: array}`` with the shapes of ``PARAMS``."""
        require_arrays(K1=self.K1, theta=theta)
        check_shape("theta", theta, (self.d_theta,))
        out, start = {}, 0
        for name, shape in self._shapes().items():
            size = int(np.prod(shape))
            out[name] = self.xp.reshape(theta[start:start + size], shape)
            start += size
        return out

    def with_params(self, params: dict) -> "ConvCell":
        """The same geometry (H, W, G, ε) with parameters ``{name: array}``."""
        return ConvCell(**{name: params[name] for name in self.PARAMS}, H=self.H, W=self.W,
                        G=self.G, eps=self.eps)

    def with_theta(self, theta) -> "ConvCell":
        return self.with_params(self.unflatten(theta))

    def project(self, bound: float) -> "ConvCell":
        """The cell itself, unchanged: no projection of θ makes (M1) a ``bound``-contraction.

        GN₁ and GN₂ divide out the scale of K₁ and of (K₂, U), so rescaling kernels leaves F
        and ∂F/∂h as they are; and GN₃'s Jacobian diag(γ₃) P/σ₃ grows without limit as the
        spread σ₃ of ReLU(a₃) in a group shrinks, which θ alone does not control. What holds
        for every θ is existence of a fixed point (F is continuous into a bounded set), not
        uniqueness; a trainer that needs a contraction must use a cell that has one.
        ``bound`` is still checked, as every cell's ``project`` does."""
        check_real("bound", bound, lo=0, lo_open=True)
        return self

    def to_numpy(self) -> dict:
        return {**{k: to_numpy(v) for k, v in self.params().items()},
                "H": self.H, "W": self.W, "G": self.G, "eps": self.eps}

    def __repr__(self):
        return (f"ConvCell(C={self.C}, C_x={self.C_x}, H={self.H}, W={self.W}, G={self.G}, "
                f"dtype={self.dtype}, backend={self.backend.name})")

    # ------------------------------------------------------------ layout
    def image(self, rows, channels: int | None = None):
        """Rows (n, c·H·W) to images (n, c, H, W), c = C unless given (NCHW order)."""
        c = self.C if channels is None else channels
        return self.xp.reshape(rows, (rows.shape[0], c, self.H, self.W))

    def flat(self, img):
        """Images (n, c, H, W) to rows (n, c·H·W)."""
        return self.xp.reshape(img, (img.shape[0], -1))

    # ------------------------------------------------------------ the value
    def check_inputs(self, x=NOT_GIVEN, **vectors):
        """Validate x (n, d_x) and named (n, d) arrays (h, h0, grad_h, ...): shapes, n >= 1,
        one backend and one dtype shared with the cell; errors name the argument. x, when
        given, must be an array; a named array may be None (an optional argument left out)."""
        check_rows({"K1": self.K1}, self.d, self.d_x, x, **vectors)

    def injection(self, x):
        """U ⋆ x, the part of a₂ that does not depend on h   # (n, C, H, W)"""
        return ops.conv2d(self.image(x, self.C_x), self.U)

    def __call__(self, h, x):
        """F(h, x) of (M1)   # (n, d)"""
        return Forward(self, h, x).F

    def bind(self, x):
        """F(·, x) with U ⋆ x computed once: ``cell.bind(x)(h) == cell(h, x)`` bit for bit."""
        inj = self.injection(x)
        return lambda h: Forward(self, h, x, inj).F

    def bind_linear(self, x):
        """h ↦ (F(h, x), its ``ConvLinearization``) from one forward pass, U ⋆ x computed once."""
        inj = self.injection(x)

        def value_and_linearization(h):
            fwd = Forward(self, h, x, inj)
            return fwd.F, ConvLinearization(self, fwd)
        return value_and_linearization

    def linearize(self, h, x) -> ConvLinearization:
        return ConvLinearization(self, Forward(self, h, x))

    def jacobian_norm_bound(self, h, x):
        """A host (n,) upper bound of ‖∂F/∂h‖₂ per sample, from (M2) with |ReLU′| ≤ 1:

            ‖J_h‖₂ ≤ b₃ (1 + b₂ t₂ b₁ t₁),   b_k = max|γ_k| / min_groups σ_k,
            t_k = Σ_{a,b} ‖K_k[:, :, a, b]‖₂

        (‖diag(γ)P/σ‖₂ ≤ max|γ|/σ since ‖P‖₂ ≤ 1; T_k is a sum of 9 taps, each a channel mix
        ⊗ a zero-filling shift of norm ≤ 1). It is often far above 1: GroupNorm's 1/σ."""
        xp, f = self.xp, Forward(self, h, x)

        def b(gamma, st):                                                   # (n,)
            g_max = float(to_numpy(xp.max(xp.abs(gamma))))
            return g_max / np.asarray(to_numpy(xp.min(st.sigma, axis=(1, 2))), dtype=np.float64)

        def t(K):
            taps = xp.permute_dims(K, (2, 3, 0, 1))                             # (3, 3, C, C)
            return float(to_numpy(xp.sum(xp.linalg.matrix_norm(taps, ord=2))))
        return b(self.gamma3, f.st3) * (1.0 + b(self.gamma2, f.st2) * t(self.K2)
                                        * b(self.gamma1, f.st1) * t(self.K1))

    # ------------------------------------------------------------ dense Jacobians
    def _dense(self, h, x):
        """The standard-layout matrices of (M2) at (h, x), per sample: B₃ = ∂F/∂a₃,
        B₂ = ∂F/∂a₂, B_n1 = ∂F/∂n₁, B₁ = ∂F/∂a₁ (each (n, d, d)), T_U and the forward pass."""
        f = Forward(self, h, x)
        T2 = ops.conv_matrix(self.K2, self.H, self.W)                            # (d, d)
        J1, J2, J3 = (ops.group_norm_matrix(st, g) for st, g in
                      ((f.st1, self.gamma1), (f.st2, self.gamma2), (f.st3, self.gamma3)))
        B3 = J3 * self.flat(f.m3)[:, None, :]                                  # J_GN₃ diag(m₃)
        B2 = B3 @ J2
        B_n1 = (B2 @ T2) * self.flat(f.m1)[:, None, :]                         # ∂F/∂n₁
        B1 = B_n1 @ J1
        return f, B3, B2, B_n1, B1

    def jacobian_h(self, h, x):
        """J_h of (M2), standard layout [i, j] = ∂F_i/∂h_j   # (n, d, d)"""
        _, B3, _, _, B1 = self._dense(h, x)
        return B3 + B1 @ ops.conv_matrix(self.K1, self.H, self.W)              # B₃ (I + …T₁)

    def dF_dh(self, h, x):
        """The paper's layout ∂F/∂h = J_hᵀ: [j, i] = ∂F_i/∂h_j   # (n, d, d)"""
        return self.xp.permute_dims(self.jacobian_h(h, x), (0, 2, 1))

    def dF_dx(self, h, x):
        """The paper's layout ∂F/∂x = (B₂ T_U)ᵀ   # (n, d_x, d)"""
        _, _, B2, _, _ = self._dense(h, x)
        T_U = ops.conv_matrix(self.U, self.H, self.W)                            # (d, d_x)
        return self.xp.permute_dims(B2 @ T_U, (0, 2, 1))

    def dF_dtheta(self, h, x):
        """The paper's layout ∂F/∂θ, rows in θ's order   # (n, d_θ, d)

        Each block is (∂ part/∂θ_k) in the paper's layout times (∂F/∂ part)ᵀ:
        K₁: (I ⊗ cols(z)) B₁ᵀ; K₂: (I ⊗ cols(r₁)) B₂ᵀ; U: (I ⊗ cols(x)) B₂ᵀ;
        (γ₁, β₁): ∂n₁/∂(γ₁, β₁) B_n1ᵀ; (γ₂, β₂): ∂n₂/∂(γ₂, β₂) B₃ᵀ; (γ₃, β₃): ∂F/∂(γ₃, β₃).
        """
        xp, C = self.xp, self.C
        f, B3, B2, B_n1, B1 = self._dense(h, x)
        tr = lambda B: xp.permute_dims(B, (0, 2, 1))                              # noqa: E731
        blocks = [ops.conv_kernel_matrix(f.z, C) @ tr(B1),
                  ops.conv_kernel_matrix(f.r1, C) @ tr(B2),
                  ops.conv_kernel_matrix(f.x_img, C) @ tr(B2)]
        for st, B in ((f.st1, B_n1), (f.st2, B3), (f.st3, None)):
            d_gamma, d_beta = ops.group_norm_affine_matrices(st)                 # (n, C, d)
            blocks += [d_gamma, d_beta] if B is None else [d_gamma @ tr(B), d_beta @ tr(B)]
        return xp.concat(blocks, axis=1)
