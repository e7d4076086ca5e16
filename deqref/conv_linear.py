"""The convolutional cell's forward pass, kept for its derivatives, and its products.

``Forward`` holds the intermediate values of (M1) (``deqref.conv``) at one (h, x): GroupNorm's
statistics (x̂, σ) and ReLU's masks. ``ConvLinearization`` (a ``deqref.cell.Linearization``)
turns them into ∂F/∂h · v, ∂F/∂x · v, Σ ∂F/∂θ · v and J_h u, by the chain rule (M2) run
backwards or forwards through ``deqref.conv_ops``' vector forms; no Jacobian is formed. It also
gives the second derivative that Jacobian regularization's gradient needs (``vjp_theta_dh``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import conv_ops as ops

if TYPE_CHECKING:
    from .conv import ConvCell


class Forward:
    """The intermediate values of (M1) at one (h, x), kept for the derivatives."""

    def __init__(self, cell: "ConvCell", h, x, inj=None):
        xp = cell.xp
        n = h.shape[0]
        self.z = cell.image(h)                                                  # (n, C, H, W)
        self.x_img = cell.image(x, cell.C_x)                                    # (n, C_x, H, W)
        self.a1 = ops.conv2d(self.z, cell.K1)                                   # (n, C, H, W)
        self.n1, self.st1 = ops.group_norm(self.a1, cell.gamma1, cell.beta1, cell.G, cell.eps)
        self.r1 = ops.relu(self.n1)
        inj = ops.conv2d(self.x_img, cell.U) if inj is None else inj          # U ⋆ x
        self.a2 = ops.conv2d(self.r1, cell.K2) + inj
        self.n2, self.st2 = ops.group_norm(self.a2, cell.gamma2, cell.beta2, cell.G, cell.eps)
        self.a3 = self.z + self.n2
        self.r3 = ops.relu(self.a3)
        y, self.st3 = ops.group_norm(self.r3, cell.gamma3, cell.beta3, cell.G, cell.eps)
        self.F = xp.reshape(y, (n, cell.d))                                     # (n, d)
        self.m1, self.m3 = ops.relu_prime(self.n1), ops.relu_prime(self.a3)   # ReLU′ masks


class ConvLinearization:
    """(M1)'s derivatives at one (h, x) as products (``deqref.cell.Linearization``): the
    forward intermediates (GroupNorm's x̂ and σ, ReLU's masks) computed once and shared."""

    def __init__(self, cell: "ConvCell", fwd: Forward):
        self.cell, self.fwd = cell, fwd

    def _back_to_a2(self, v):
        """v = ∂L/∂F (n, d) back to ∂L/∂a₂ and ∂L/∂a₃, with GN₃'s and GN₂'s (γ, β) parts."""
        c, f = self.cell, self.fwd
        g_r3, g_gamma3, g_beta3 = ops.group_norm_vjp(f.st3, c.gamma3, c.image(v))
        g_a3 = g_r3 * f.m3                                                     # (n, C, H, W)
        g_a2, g_gamma2, g_beta2 = ops.group_norm_vjp(f.st2, c.gamma2, g_a3)
        return g_a3, g_a2, {"gamma3": g_gamma3, "beta3": g_beta3,
                            "gamma2": g_gamma2, "beta2": g_beta2}

    def _back_to_a1(self, g_a2):
        c, f = self.cell, self.fwd
        g_n1 = ops.conv2d_vjp_input(g_a2, c.K2) * f.m1                         # (n, C, H, W)
        return ops.group_norm_vjp(f.st1, c.gamma1, g_n1)                       # g_a1, g_γ1, g_β1

    def vjp_h(self, v):
        """∂F/∂h · v = vᵀ J_h per sample, (M2) backwards   # (n, d)"""
        g_a3, g_a2, _ = self._back_to_a2(v)
        g_a1 = self._back_to_a1(g_a2)[0]
        g_z = g_a3 + ops.conv2d_vjp_input(g_a1, self.cell.K1)                 # residual + T₁ᵀ
        return self.cell.flat(g_z)

    def vjp_x(self, v):
        """∂F/∂x · v per sample: back to a₂, then U ⋆'s transpose   # (n, d_x)"""
        g_a2 = self._back_to_a2(v)[1]
        return self.cell.flat(ops.conv2d_vjp_input(g_a2, self.cell.U))

    def vjp_theta(self, v) -> dict:
        """Σ over the batch of ∂F/∂θ · v, as a dict of parameter-shaped arrays."""
        c, f = self.cell, self.fwd
        _, g_a2, grads = self._back_to_a2(v)
        g_a1, g_gamma1, g_beta1 = self._back_to_a1(g_a2)
        grads.update(gamma1=g_gamma1, beta1=g_beta1,
                     K1=ops.conv2d_vjp_kernel(g_a1, ops.im2col(f.z)),
                     K2=ops.conv2d_vjp_kernel(g_a2, ops.im2col(f.r1)),
                     U=ops.conv2d_vjp_kernel(g_a2, ops.im2col(f.x_img)))
        return {name: grads[name] for name in c.PARAMS}

    def vjp_theta_dh(self, v, u) -> dict:
        """d/dt [Σ_batch ∂F/∂θ · v at (h + t u, x)] at t = 0: the parameter VJP differentiated
        along h, a second derivative of (M1) (Jacobian regularization's gradient,
        ``deqref.jacobian_reg`` (JR3)). Forward tangents δ· along u, then the backward pass of
        ``vjp_theta`` differentiated term by term: GroupNorm's VJPs through
        ``conv_ops.group_norm_vjp_tangent``, the kernels' VJPs bilinear in (g, input), ReLU's
        masks constant (σ″ = 0 away from the kinks)."""
        c, f = self.cell, self.fwd
        du = c.image(u)                                                       # δz
        d_a1 = ops.conv2d(du, c.K1)
        d_r1 = ops.group_norm_jvp(f.st1, c.gamma1, d_a1) * f.m1
        d_a2 = ops.conv2d(d_r1, c.K2)
        d_r3 = (du + ops.group_norm_jvp(f.st2, c.gamma2, d_a2)) * f.m3
        v_img = c.image(v)
        zero = v_img * 0.0
        # backward, with its tangent alongside
        g_r3 = ops.group_norm_vjp(f.st3, c.gamma3, v_img)[0]
        dg_r3, dg_gamma3, dg_beta3 = ops.group_norm_vjp_tangent(f.st3, c.gamma3, v_img, zero, d_r3)
        g_a3, dg_a3 = g_r3 * f.m3, dg_r3 * f.m3
        g_a2 = ops.group_norm_vjp(f.st2, c.gamma2, g_a3)[0]
        dg_a2, dg_gamma2, dg_beta2 = ops.group_norm_vjp_tangent(f.st2, c.gamma2, g_a3, dg_a3,
                                                                d_a2)
        g_n1 = ops.conv2d_vjp_input(g_a2, c.K2) * f.m1
        dg_n1 = ops.conv2d_vjp_input(dg_a2, c.K2) * f.m1
        g_a1 = ops.group_norm_vjp(f.st1, c.gamma1, g_n1)[0]
        dg_a1, dg_gamma1, dg_beta1 = ops.group_norm_vjp_tangent(f.st1, c.gamma1, g_n1, dg_n1,
                                                                d_a1)
        kern = ops.conv2d_vjp_kernel
        return {"K1": kern(dg_a1, ops.im2col(f.z)) + kern(g_a1, ops.im2col(du)),
                "K2": kern(dg_a2, ops.im2col(f.r1)) + kern(g_a2, ops.im2col(d_r1)),
                "U": kern(dg_a2, ops.im2col(f.x_img)),
                "gamma1": dg_gamma1, "beta1": dg_beta1, "gamma2": dg_gamma2,
                "beta2": dg_beta2, "gamma3": dg_gamma3, "beta3": dg_beta3}

    def jvp_h(self, u):
        """J_h u per sample, (M2) forwards   # (n, d)"""
        c, f = self.cell, self.fwd
        u_img = c.image(u)
        d_n1 = ops.group_norm_jvp(f.st1, c.gamma1, ops.conv2d(u_img, c.K1))
        d_n2 = ops.group_norm_jvp(f.st2, c.gamma2, ops.conv2d(d_n1 * f.m1, c.K2))
        d_F = ops.group_norm_jvp(f.st3, c.gamma3, (u_img + d_n2) * f.m3)
        return c.flat(d_F)
