# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10. A convolutional cell: MDEQ's block, its Jacobian, and Jacobian regularization
#
# Geng et al.'s Table 3 trains MDEQ, whose cell is a residual block of convolutions and
# GroupNorms. `deqref.conv.ConvCell` is that block at one resolution:
#
# $$a_1 = K_1 \star z,\quad r_1 = \mathrm{ReLU}(\mathrm{GN}_1(a_1)),\quad
#   a_2 = K_2 \star r_1 + U \star x,\quad a_3 = z + \mathrm{GN}_2(a_2),\quad
#   F(z, x) = \mathrm{GN}_3(\mathrm{ReLU}(a_3)) \tag{M1}$$
#
# with 3 × 3 convolutions (padding 1, no bias) and GroupNorm with $G$ groups and affine
# $(\gamma_k, \beta_k)$. A state row is the image $z$ $(C, H, W)$ flattened channel-major
# (PyTorch's NCHW). Every part has a hand-written derivative, each as an explicit matrix
# (the *matrix form*) and as an array program (the *vector form*); here we look at the
# matrices, then at Jacobian regularization (Bai et al. 2021), whose penalty is
# $\|\partial F/\partial h\|_F^2$ at the fixed point.

# %%
import matplotlib.pyplot as plt
import numpy as np

from deqref import conv_ops as ops
from deqref import jacobian_reg as jr
from deqref.conv import ConvCell
from deqref.data import digits
from deqref.gradients import estimate
from deqref.solvers import solve
from deqref.theory import cosine

plt.rcParams["figure.dpi"] = 60                     # keeps the stored images small
data = digits(seed=0)
x = data.x_train[:8]                                  # (8, 64): 8 × 8 digits, one channel
cell = ConvCell.random(C=8, C_x=1, H=8, W=8, G=4, seed=0, injection=10.0)
print(cell, " d_θ =", cell.d_theta)
# Broyden with the dense inverse: the limited-memory form (m = 30 updates) reaches ~1e-9 on
# every sample but then stagnates on 3 of these 8 above tol = 1e-10
res = solve(cell, x, method="broyden", form="dense", tol=1e-10, max_iter=100)
print(res.summary())
assert res.converged.all()

# %% [markdown]
# ## A convolution is a doubly-block Toeplitz matrix
#
# $T = \sum_{a,b} K[:, :, a, b] \otimes (E_{a-1} \otimes E_{b-1})$: each of the nine taps mixes
# channels and shifts the image, zeros entering at the border. Below, $|T|$ for two channels on
# a 4 × 4 image: 2 × 2 channel blocks, each a 4 × 4 grid of 4 × 4 tridiagonal blocks. The check:
# $T\,\mathrm{vec}(z)$ equals the im2col program exactly up to rounding.

# %%
rng = np.random.default_rng(0)
K_small = rng.standard_normal((2, 2, 3, 3))
T = ops.conv_matrix(K_small, 4, 4)                                    # (32, 32)
z = rng.standard_normal((1, 2, 4, 4))
err = np.abs(T @ z.ravel() - ops.conv2d(z, K_small).ravel()).max()
print(f"max |T vec(z) − conv2d(z)| = {err:.1e}")
assert err < 1e-13

fig, ax = plt.subplots(1, 2, figsize=(9, 4))
ax[0].imshow(np.abs(T) > 0, cmap="Greys")
ax[0].set_title("nonzeros of T (2 channels, 4 × 4)")
T8 = ops.conv_matrix(cell.K1, 8, 8)
ax[1].imshow(np.abs(T8) > 0, cmap="Greys")
ax[1].set_title(f"nonzeros of T₁ (C = 8, 8 × 8): {np.mean(T8 != 0):.1%} filled")
plt.tight_layout()

# %% [markdown]
# ## GroupNorm's Jacobian
#
# For a group of $M$ values with $\hat x = (x - \mu)/\sigma$, $\sigma^2 = \mathrm{var} + \epsilon$:
# $\partial\hat x/\partial x = P/\sigma$, $P = I - \mathbf 1\mathbf 1^\top/M - \hat x\hat x^\top/M$, and with the
# affine $y = \gamma\hat x + \beta$, $J = \mathrm{diag}(\gamma)\,P/\sigma$, zero across groups.
# $P$ removes the mean direction $\mathbf 1$ (eigenvalue 0) and shrinks $\hat x$ to
# $1 - \|\hat x\|^2/M = \epsilon/\sigma^2$ (nearly 0): GroupNorm forgets the shift and the
# scale of its input, which is why rescaling the kernels cannot make the cell a contraction
# (`ConvCell.project` is the identity).

# %%
fwd_in = ops.conv2d(cell.image(res.h), cell.K1)                       # GN₁'s input at h*
_, st = ops.group_norm(fwd_in, cell.gamma1, cell.beta1, cell.G, cell.eps)
J_gn = ops.group_norm_matrix(st, cell.gamma1)[0]                      # (512, 512)
M = st.M
P = (np.eye(M) - 1 / M - np.outer(st.x_hat[0, 0], st.x_hat[0, 0]) / M)
ev = np.sort(np.linalg.eigvalsh(P))
print(f"group size M = {M}; eigenvalues of P: {ev[0]:.2e}, {ev[1]:.2e}, then {ev[2]:.3f} … {ev[-1]:.3f}")
plt.figure(figsize=(4, 4))
plt.imshow(np.log10(np.abs(J_gn) + 1e-12), cmap="viridis")
plt.colorbar(label="log₁₀ |J_GN|")
plt.title("GN₁'s Jacobian: 4 dense diagonal blocks")
plt.tight_layout()

# %% [markdown]
# ## The cell's Jacobian at the fixed point
#
# $J_h = B_3\,(I + J_{GN_2} T_2\,\mathrm{diag}(\mathrm{ReLU}'(n_1))\,J_{GN_1} T_1)$,
# $B_3 = J_{GN_3}\mathrm{diag}(\mathrm{ReLU}'(a_3))$: the residual connection gives the identity
# term, which GN₃'s blocks then spread over a group; the convolutions mix channels of every
# group, so J_h is dense (unlike T, 12 % filled).
# The dense matrix (`dF_dh`, the paper's layout) and the products (`linearize(...).vjp_h`, never
# forming it) agree. With `injection = 10` the fixed point is a contraction, $\|J_h\|_2 < 1$.

# %%
J = cell.jacobian_h(res.h, x)                                          # (8, 512, 512) standard
v = rng.standard_normal((8, cell.d))
err = np.abs(cell.linearize(res.h, x).vjp_h(v) - np.einsum("nij,ni->nj", J, v)).max()
print(f"max |vjp_h − vᵀJ| = {err:.1e}")
rho = [np.abs(np.linalg.eigvals(J[i])).max() for i in range(3)]     # the first three digits
norm2 = [np.linalg.norm(J[i], 2) for i in range(3)]
print("spectral radius:", np.round(rho, 3))
print("‖J_h‖₂:         ", np.round(norm2, 3))
print("cheap bound:    ", np.round(cell.jacobian_norm_bound(res.h, x)[:3], 1))
assert max(norm2) < 1
plt.figure(figsize=(4, 4))
plt.imshow(np.log10(np.abs(J[0]) + 1e-12), cmap="viridis", vmin=-6)
plt.colorbar(label="log₁₀ |J_h|")
plt.title("∂F_i/∂h_j at h* (digit 0)")
plt.tight_layout()

# %% [markdown]
# ## The estimators on the conv cell
#
# Every estimator takes the cell through `deqref.cell` alone. At this contracting fixed point
# the cheap estimates point where the exact gradient (Eq. 4, dense solve) points:

# %%
g = rng.standard_normal((8, cell.d))
exact = estimate("implicit_dense", cell, x, res, g)
for name, opts in [("jfb", {}), ("npg", dict(k=5, lam=0.8)), ("upg", dict(k=5, lam=0.8)),
                   ("implicit", dict(method="broyden", n_iter=20))]:
    est = estimate(name, cell, x, res, g, **opts)
    print(f"cos({name:8s} {str(opts):28s}, exact) = {cosine(est.theta, exact.theta):.4f}")

# %% [markdown]
# ## Jacobian regularization: exact against Hutchinson
#
# Bai et al. add $R = \frac{1}{nd}\sum_s \|J_s\|_F^2$ to the loss (their estimator divides by the
# number of entries of $h^*$), estimated with $m$ Gaussian probes:
# $\hat R_s = \frac1m\sum_k \|\partial F/\partial h\cdot\varepsilon_k\|^2$, one VJP per probe. Its
# variance is $2\,\mathrm{tr}((J_sJ_s^\top)^2)/m$, so the relative error falls as $1/\sqrt m$.
# The table: the mean relative error of $\hat R$ over 40 seeds, and the CLT prediction
# $\sqrt{2/\pi}\,\mathrm{sd}(\hat R)/R$.

# %%
R = jr.penalty(cell, res.h, x)
JJ = np.einsum("nij,nkj->nik", J, J)
var1 = 2 * np.einsum("nij,nji->n", JJ, JJ).sum() / (8 * cell.d) ** 2     # Var of R̂ with m = 1
ms = [1, 4, 16, 64, 256]
rows = []
for m in ms:
    errs = [abs(jr.penalty(cell, res.h, x, method="hutchinson", n_probes=m, seed=s) - R) / R
            for s in range(40)]
    rows.append((m, np.mean(errs), np.sqrt(2 / np.pi) * np.sqrt(var1 / m) / R))
print(f"R = {R:.5f}   (exact, from the dense Jacobian)")
print(" probes m | mean |R̂ − R|/R | CLT prediction")
for m, e, p in rows:
    print(f" {m:8d} | {e:14.4f} | {p:14.4f}")
plt.figure(figsize=(4.5, 3.5))
plt.loglog(ms, [r[1] for r in rows], "o-", label="measured (40 seeds)")
plt.loglog(ms, [r[2] for r in rows], "k--", label="CLT: ∝ 1/√m")
plt.xlabel("probes m")
plt.ylabel("relative error of R̂")
plt.legend()
plt.tight_layout()

# %% [markdown]
# ## Its gradient, and one step of it
#
# $\nabla_\theta\|\partial F/\partial h\cdot\varepsilon\|^2 = 2\,\frac{d}{dt}\big[\partial F/\partial\theta\cdot\varepsilon\big]_{h + tu}$,
# $u = \partial F/\partial h\cdot\varepsilon$ (JR3): a second derivative of the cell, through
# GroupNorm's curvature (ReLU's σ″ is 0 away from its kink). Summed over the basis vectors it is
# the exact gradient. The cosine of Hutchinson's gradient to the exact one rises with $m$; a
# small step against the exact gradient lowers the penalty, as a descent direction must.

# %%
grad = jr.penalty_grad(cell, res.h, x)
flat = cell.flatten(grad)
for m in (1, 4, 16, 64):
    gh = cell.flatten(jr.penalty_grad(cell, res.h, x, method="hutchinson", n_probes=m, seed=0))
    print(f"m = {m:3d}: cos(Hutchinson ∇R̂, exact ∇R) = {cosine(gh, flat):.3f}")
step = 0.1 * R / float(flat @ flat)                     # a first-order decrease of 10 % of R
lower = jr.penalty(cell.with_theta(cell.theta - step * flat), res.h, x)
print(f"R = {R:.5f} → {lower:.5f} after θ ← θ − η ∇R (η = {step:.2e}, h*, x held fixed)")
assert lower < R
