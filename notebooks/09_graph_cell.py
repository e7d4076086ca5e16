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
# # 9. An implicit graph cell: IGNN
#
# Geng et al. (Table 4 of the slides) train IGNN (Gu et al. 2020) with the implicit gradient and
# with UPG. IGNN's layer holds one state vector per node. For a graph with $N$ nodes, states
# $H \in \mathbb{R}^{m\times N}$ (one column per node), features $X \in \mathbb{R}^{p\times N}$ and the
# normalized adjacency $\hat A = \tilde D^{-1/2}(A + I)\tilde D^{-1/2}$, the equilibrium is
#
# $$H = F(H) = \sigma\big(W H \hat A + \Omega X \hat A\big), \qquad W \in \mathbb{R}^{m\times m},\ \Omega \in \mathbb{R}^{m\times p}.$$
#
# Right-multiplying by $\hat A$ mixes each node's state with its neighbours'; $\Omega X \hat A$ is the
# input injection, propagated one hop as in IGNN's code. `deqref.graph.GraphCell` is this $F$ as a
# deqref cell: each sample is one graph, its row is $h = \mathrm{vec}(H)$, the columns of $H$ stacked
# node by node ($d = mN$), so every solver and estimator of deqref runs on it unchanged.
#
# ## The Jacobian is a Kronecker product
#
# The identity $\mathrm{vec}(ABC) = (C^\top \otimes A)\,\mathrm{vec}(B)$ gives
# $\mathrm{vec}(W H \hat A) = (\hat A^\top \otimes W)\,\mathrm{vec}(H)$. With $Z = W H \hat A + \Omega X \hat A$
# and $s = \mathrm{vec}(\sigma'(Z))$, the chain rule gives, in the standard layout,
#
# $$\frac{\partial\,\mathrm{vec}F}{\partial\,\mathrm{vec}H} = \mathrm{diag}(s)\,(\hat A^\top \otimes W),
# \qquad\text{so in the paper's layout}\qquad \frac{\partial F}{\partial h} = (\hat A \otimes W^\top)\,\mathrm{diag}(s).$$
#
# `GraphCell.dF_dh` builds exactly this $(mN)\times(mN)$ matrix (matrix form, small graphs only).
# The products never form it: $\frac{\partial F}{\partial h}v = \mathrm{vec}\big(W^\top (V \odot S)\,\hat A^\top\big)$
# with $V$ the $m\times N$ matrix of $v$, which costs $O(m^2N + mN^2)$ instead of $O(m^2N^2)$.

# %%
import matplotlib.pyplot as plt
import numpy as np

import deqref
from deqref.gradients import estimate
from deqref.graph import GraphCell, pad_graphs, well_posed
from deqref.theory import cosine


def cycle(k):
    A = np.zeros((k, k))
    A[np.arange(k), (np.arange(k) + 1) % k] = 1
    return A + A.T


def star(k):
    A = np.zeros((k, k))
    A[0, 1:] = 1
    return A + A.T


rng = np.random.default_rng(0)
m, p = 3, 2
small = [(cycle(4), rng.standard_normal((p, 4))), (star(3), rng.standard_normal((p, 3)))]
A_hat, x, mask = pad_graphs(small)               # (2, 4, 4), (2, p·4), (2, 4): the star is padded
cell = GraphCell.random(m, p, A_hat, "tanh", seed=0, kappa=0.9, mask=mask)
h = rng.standard_normal((cell.n, cell.d))
print(cell, "  d =", cell.d, "  d_x =", cell.d_x, "  mask:", mask.tolist())

# %% [markdown]
# The Kronecker formula, written again with `numpy.kron`, against `dF_dh` and against central
# differences of $F$ itself (step $10^{-6}$: truncation and rounding errors both about $10^{-10}$
# relative, so $10^{-7}$ separates them from any mistake). A padding node (the fourth node of the
# star) is isolated: its columns of $\hat A$ are zero, so it neither reads nor is read.

# %%
s = cell.sigma_prime(h, x)                                         # (n, d) = vec σ'(Z)
J = cell.dF_dh(h, x)                                               # (n, d, d), paper's layout
for i in range(cell.n):
    kron = np.kron(cell.A_hat[i], cell.W.T) @ np.diag(s[i])        # (Â ⊗ Wᵀ) diag(s)
    fd = np.zeros((cell.d, cell.d))                                # row j: ∂F/∂h_j, paper's layout
    for j in range(cell.d):
        e = np.zeros((cell.n, cell.d))
        e[i, j] = 1e-6                                             # graph i's h_j only
        fd[j] = (cell(h + e, x) - cell(h - e, x))[i] / 2e-6
    err_kron = np.abs(J[i] - kron).max()
    err_fd = np.abs(J[i] - fd).max() / np.abs(fd).max()
    print(f"graph {i}: |dF_dh − kron| = {err_kron:.1e},  |dF_dh − FD| / |FD| = {err_fd:.1e}")
    assert err_kron < 1e-15 and err_fd < 1e-7

v = rng.standard_normal((cell.n, cell.d))
lin = cell.linearize(h, x)
err = np.abs(lin.vjp_h(v) - np.einsum("nji,ni->nj", J, v)).max()
print(f"vector form vjp_h = vec(Wᵀ (V ⊙ S) Âᵀ) against the Kronecker matrix: {err:.1e}")
assert err < 1e-14

# %% [markdown]
# ## Well-posedness: IGNN's condition and projection
#
# With $|\sigma'| \le 1$, $|F(H_1) - F(H_2)| \le |W|\,|H_1 - H_2|\,|\hat A|$ entrywise, and the
# iteration contracts (in a weighted norm) when the Perron–Frobenius eigenvalue
# $\lambda_{pf}(|\hat A^\top \otimes W|) = \lambda_{pf}(|\hat A|)\,\lambda_{pf}(|W|)$ is below 1. IGNN keeps
# the sufficient condition
#
# $$\|W\|_\infty\,\lambda_{pf}(\hat A) < 1$$
#
# by projecting each row of $W$ onto the $\ell_1$ ball of radius $\kappa/\lambda_{pf}$ after every
# update (`cell.project(κ)`; the sort-based projection of Duchi et al. 2008). For the symmetric
# normalization $\lambda_{pf}(\hat A) = 1$. This is not the Euclidean condition of the dense layer:
# $\|\partial F/\partial h\|_2$ may exceed 1 while the iteration still contracts.

# %%
graphs = [(cycle(k), rng.standard_normal((4, k))) for k in (6, 8)] + \
         [(star(k), rng.standard_normal((4, k))) for k in (5, 7)]
A8, x8, mask8 = pad_graphs(graphs)
lin_cell = GraphCell.random(6, 4, A8, "identity", seed=3, kappa=0.9, mask=mask8)   # σ = identity
big = lin_cell.with_params({"W": 3.0 * lin_cell.W, "Omega": lin_cell.Omega})     # ‖W‖∞ λ_pf = 2.7
print(f"λ_pf(Â) = {big.lambda_pf:.6f},  ‖W‖∞ λ_pf(Â) = {well_posed(big):.3f},  "
      f"ρ(W) = {np.abs(np.linalg.eigvals(big.W)).max():.3f}")
pro = big.project(0.9)
print(f"after project(0.9): ‖W‖∞ λ_pf(Â) = {well_posed(pro):.6f},  row ℓ1 norms "
      f"{np.abs(pro.W).sum(axis=1).round(6).tolist()}")
assert abs(well_posed(pro) - 0.9) < 1e-12 and np.array_equal(pro.project(0.95).W, pro.W)

runs = {}
for label, c in (("W × 3", big), ("projected", pro)):
    runs[label] = deqref.solve(c, x8, method="fixed_point", tol=1e-10, max_iter=300, warn=False)
    print(f"{label:10s} {runs[label].summary()}")
assert not runs["W × 3"].converged.any() and runs["projected"].converged.all()

# %% [markdown]
# With $\sigma$ the identity, $F$ is linear and its iteration converges exactly when the spectral
# radius $\lambda_{pf}(\hat A)\,\rho(W)$ is below 1: above, $\rho(W) > 1$ and every graph diverges; the
# projection brings it back. The condition is IGNN's, not the dense layer's Euclidean one: a cell
# on the same graphs (seed 0) projected to $\kappa = 0.9$ has $\|\partial F/\partial h\|_2 > 1$ and
# still converges.

# %%
c0 = GraphCell.random(6, 4, A8, "identity", seed=0, kappa=0.9, mask=mask8)
c0 = c0.with_params({"W": 3.0 * c0.W, "Omega": c0.Omega}).project(0.9)
r0 = deqref.solve(c0, x8, method="fixed_point", tol=1e-10, max_iter=300, warn=False)
norm2 = max(np.linalg.norm(J_i, 2) for J_i in c0.dF_dh(r0.h, x8))
print(f"‖W‖∞ λ_pf = {well_posed(c0):.2f},  max ‖∂F/∂h‖₂ = {norm2:.3f},  {r0.summary()}")
assert norm2 > 1 and r0.converged.all()

# %% [markdown]
# ## UPG against the implicit gradient on graphs
#
# Eight graphs (cycles and stars of 5–10 nodes, padded to 10), $m = 8$ channels, $p = 4$ features,
# ReLU as in IGNN and $\|W\|_\infty\lambda_{pf} = 0.9$. The exact gradient is the dense oracle
# (Eq. 4, one $80\times 80$ solve per graph); the upstream gradient $g$ is masked to the real nodes,
# as a readout over real nodes would give. As in notebook 3, the cosine to the exact gradient
# grows with $k$; Table 4's $A_{5,0.5}$ is already close.

# %%
sizes = [5, 6, 7, 8, 9, 10, 6, 8]
G8 = [(cycle(k) if j % 2 else star(k), rng.standard_normal((4, k))) for j, k in enumerate(sizes)]
A_g, x_g, mask_g = pad_graphs(G8)
net = GraphCell.random(8, 4, A_g, "relu", seed=2, kappa=0.9, mask=mask_g)
res = deqref.solve(net, x_g, method="broyden", tol=1e-12, max_iter=200)
g = rng.standard_normal((net.n, net.d)) * np.repeat(mask_g, 8, axis=1)   # 0 on padding nodes
exact = estimate("implicit_dense", net, x_g, res, g).theta
print(res.summary())

ks = list(range(1, 16))
fig, ax = plt.subplots(figsize=(6, 3.6))
table = {}
for lam in (1.0, 0.5):
    cs = [cosine(estimate("upg", net, x_g, res, g, k=k, lam=lam).theta, exact) for k in ks]
    table[lam] = cs
    ax.plot(ks, cs, ".-", label=f"UPG, λ = {lam}")
jfb = cosine(estimate("jfb", net, x_g, res, g).theta, exact)
ax.axhline(jfb, color="gray", ls=":", label="JFB")
ax.set(xlabel="k", ylabel="cos(estimate, implicit)", title="IGNN cell: UPG against Eq. (4)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
print(f"cos(UPG A_5,0.5, implicit) = {table[0.5][4]:.4f};  cos(UPG A_5,1, implicit) = "
      f"{table[1.0][4]:.4f};  cos(JFB, implicit) = {jfb:.4f}")
assert table[1.0][-1] > table[1.0][0] and table[0.5][4] > 0.9
