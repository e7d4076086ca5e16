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
# # 2. Forward solvers
#
# The forward pass of a DEQ is a root-finding problem: find $h$ with $g(h) = F(h, x) - h = 0$.
# This notebook runs deqref's three solvers on the synthetic setting of Geng et al. (one tanh
# layer, $\|W\|_2 = L_h = 0.9$; deqref uses $d = 64$, $d_x = 16$), checks their answers against
# `scipy.optimize.root`, writes out Broyden's Sherman–Morrison update and checks it against a
# plain `numpy.linalg.inv`, and shows what happens when $F$ is not a contraction.
#
# Every solver reports, per sample, the relative residual $\|F(h) - h\| / \|F(h)\|$ after each
# update (`rel_residual`), how many updates it took and why it stopped.

# %%
import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import scipy.optimize

import deqref
from deqref.data import synthetic

layer, x, _ = synthetic(seed=0, n=8)                                 # d = 64, d_x = 16, L_h = 0.9
P = layer.to_numpy()
print(layer, " x:", x.shape)

# %% [markdown]
# ## Fixed-point iteration and its damped form
#
# $$h_{t+1} = F(h_t, x) \tag{10}$$
# $$h_{t+1} = \lambda F(h_t, x) + (1 - \lambda) h_t, \quad \lambda \in (0, 1] \tag{13}$$
#
# For an $L_h$-contraction, Eq. (10) shrinks the error by at least $L_h$ per step (Banach), so
# reaching a residual $10^{-10}$ from $O(1)$ takes about $\log 10^{-10} / \log 0.9 \approx 220$
# steps in the worst case (here about 20: tanh saturates and the random $W$'s eigenvalues are
# small). Damping keeps the same fixed point but (here) slows convergence: the
# iteration map $\lambda F + (1-\lambda) I$ is only $(\lambda L_h + 1 - \lambda)$-contractive.
#
# ## Broyden's method
#
# Newton's method on $g$ needs the Jacobian $J_h - I$ at every step; Broyden keeps an estimate
# $B_t$ of it and updates the *inverse* directly, starting from $B_0^{-1} = -I$ (the inverse
# Jacobian of $g$ when $F$ is constant). With $\Delta h = h_{t+1} - h_t$, $\Delta g = g_{t+1} - g_t$:
#
# $$h_{t+1} = h_t - B_t^{-1} g(h_t), \qquad
# B_{t+1}^{-1} = B_t^{-1} + \frac{(\Delta h - B_t^{-1}\Delta g)\,\Delta h^\top B_t^{-1}}{\Delta h^\top B_t^{-1} \Delta g}.$$
#
# This is the Sherman–Morrison inverse of the "good" Broyden update of $B$ itself,
# $B_{t+1} = B_t + (\Delta g - B_t \Delta h)\Delta h^\top / (\Delta h^\top \Delta h)$, the smallest
# change to $B_t$ that satisfies the **secant condition** $B_{t+1}\Delta h = \Delta g$,
# equivalently $B_{t+1}^{-1}\Delta g = \Delta h$. deqref stores $B^{-1}$ either densely (`form="dense"`,
# $d^2$ numbers) or as $-I + \sum_i u_i v_i^\top$ keeping the last $m$ pairs (`form="lowrank"`,
# $2md$ numbers, the limited-memory form of the GDEQ paper).
#
# ## Anderson acceleration
#
# Anderson mixes the last $m$ iterates: it picks weights $\alpha$ (summing to 1) that minimize
# $\|\sum_i \alpha_i g(h_i)\|$ and steps to $\sum_i \alpha_i F(h_i)$ — a small $m \times m$
# least-squares problem per step instead of a $d \times d$ matrix.

# %%
configs = [("fixed_point", {}), ("fixed_point", {"lam": 0.5}), ("anderson", {"m": 5}),
           ("broyden", {"form": "dense"}), ("broyden", {"form": "lowrank", "m": 30})]
results = {}
for method, opts in configs:
    name = method + "".join(f" {k}={v}" for k, v in opts.items())
    results[name] = deqref.solve(layer, x, method=method, tol=1e-10, max_iter=500, **opts)
    print(results[name].summary())

fig, ax = plt.subplots(figsize=(6.5, 4))
for name, r in results.items():
    ax.semilogy(r.rel_residual[0], ".-", ms=3, label=name)
ax.set(xlabel="update t", ylabel="‖F(h) − h‖ / ‖F(h)‖", title="Residual traces, sample 0 (d = 64, L_h = 0.9)")
ax.legend(fontsize=8); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Check: every solver finds scipy's root
#
# `scipy.optimize.root` (MINPACK's hybrid Powell method) on a plain-NumPy $g$ shares no code with
# deqref. A relative residual $r$ bounds the distance to the root by $r\|F\|/(1 - L_h) = 10 r \|F\|$,
# so at $r = 10^{-10}$ every solver must agree with scipy to $10^{-8}$ relative.

# %%
def g_plain(h, xi):
    return np.tanh(P["W"] @ h + P["U"] @ xi + P["b"]) - h


h_scipy = np.stack([scipy.optimize.root(g_plain, np.zeros(64), args=(x[i],), tol=1e-13).x
                    for i in range(x.shape[0])])
for name, r in results.items():
    err = np.linalg.norm(r.h - h_scipy, axis=1) / np.linalg.norm(h_scipy, axis=1)
    print(f"{name:28s} max relative distance to scipy's root: {err.max():.1e}")
    assert err.max() < 1e-8, name

# %% [markdown]
# ## Broyden's update, dense and low rank, side by side
#
# Three checks on the same solve (4 samples, 6 updates, tolerance 0 so every update is taken):
#
# 1. the low-rank form with $m \ge 6$ holds the same matrix as the dense form;
# 2. the secant condition $B_T^{-1}\Delta g = \Delta h$ for the last step;
# 3. deqref's $B_T^{-1}$ equals `numpy.linalg.inv` of the *direct* update of $B$ (the formula
#    before Sherman–Morrison), applied to `numpy.linalg.inv` of $B_{T-1}^{-1}$ from a solve one
#    step shorter.
#
# All are identities in exact arithmetic; in float64 they hold to rounding amplified by the
# conditioning of $B$ — $10^{-10}$ relative is loose enough for that and tight enough to fail on
# any error in the formula (a wrong transpose gives $O(1)$).

# %%
x4, T = x[:4], 6
opts = dict(tol=0.0, max_iter=T, stall_iter=None, warn=False, return_trajectory=True)
dense = deqref.solve(layer, x4, method="broyden", form="dense", **opts)
lowrank = deqref.solve(layer, x4, method="broyden", form="lowrank", m=10, **opts)
prev = deqref.solve(layer, x4, method="broyden", form="dense", **{**opts, "max_iter": T - 1})
assert dense.n_skipped.sum() == 0                                     # every update applied

B_dense, B_low = dense.B_inv.dense(), lowrank.B_inv.dense()           # (4, d, d) each
print("low-rank pairs stored:", lowrank.B_inv.Us.shape[1], "× 2 vectors of length", layer.d)
np.testing.assert_allclose(B_low, B_dense, rtol=0, atol=1e-10 * np.abs(B_dense).max())
np.testing.assert_allclose(lowrank.h, dense.h, rtol=0, atol=1e-12)

h_prev, h_T = dense.trajectory[-2], dense.trajectory[-1]
g = lambda h: layer(h, x4) - h                                        # noqa: E731
dh, dg = h_T - h_prev, g(h_T) - g(h_prev)                             # (4, d)
secant = np.einsum("nij,nj->ni", B_dense, dg)                          # B_T⁻¹ Δg
print("secant condition, max |B_T⁻¹Δg − Δh| / |Δh|:",
      f"{(np.abs(secant - dh).max() / np.abs(dh).max()):.1e}")
np.testing.assert_allclose(secant, dh, rtol=0, atol=1e-10 * np.abs(dh).max())

for i in range(4):
    B = np.linalg.inv(prev.B_inv.dense()[i])                          # B_{T−1}
    B_next = B + np.outer(dg[i] - B @ dh[i], dh[i]) / (dh[i] @ dh[i])  # good Broyden on B
    np.testing.assert_allclose(np.linalg.inv(B_next), B_dense[i], rtol=0,
                               atol=1e-10 * np.abs(B_dense[i]).max())
print("Sherman–Morrison form = inverse of the direct update: OK")

# %% [markdown]
# With limited memory ($m$ smaller than the number of updates) the oldest pairs are dropped and
# the two forms part ways; Broyden still converges, a little more slowly.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for m in (2, 5, 10, 30):
    r = deqref.solve(layer, x, method="broyden", form="lowrank", m=m, tol=1e-10, max_iter=200)
    ax.semilogy(r.rel_residual[0], ".-", ms=3, label=f"low rank, m = {m} ({int(r.n_iter.mean())} updates on average)")
ax.set(xlabel="update t", ylabel="relative residual", title="Limited-memory Broyden, sample 0")
ax.legend(fontsize=8); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## A layer that is not a contraction
#
# Take the identity activation, $F(h) = W h + U x + b$, with a symmetric $W$ whose eigenvalues
# lie in $[-0.5, 1.5]$. The fixed point still exists — it is the solution of the linear system
# $(I - W) h = U x + b$ (1 is not an eigenvalue) — but fixed-point iteration multiplies the error by
# $W$ each step and diverges along the eigenvalue 1.5. Broyden is a root finder: on a linear $g$
# it terminates in at most $2d$ steps (Gay, 1979), whatever the spectrum. The oracle is
# `scipy.linalg.solve(I − W, U x + b)`. The eigenvalues of the symmetric $I - W$ have moduli in
# $[0.3, 1.5]$, so $\kappa(I - W) = 5$ and Broyden's relative residual $10^{-10}$ means agreement
# to better than $10^{-8}$.

# %%
d = 16
rng = np.random.default_rng(3)
Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
eig = np.concatenate([np.linspace(-0.5, 0.7, d - 1), [1.5]])          # eigenvalues of W
W = Q @ np.diag(eig) @ Q.T
lin = deqref.Layer(W, rng.standard_normal((d, 3)), 0.1 * rng.standard_normal(d), "identity")
xl = rng.standard_normal((4, 3))
fp = deqref.solve(lin, xl, method="fixed_point", tol=1e-10, max_iter=200, warn=False)
br = deqref.solve(lin, xl, method="broyden", form="dense", tol=1e-10, max_iter=200)
an = deqref.solve(lin, xl, method="anderson", m=5, tol=1e-10, max_iter=200, warn=False)
for r in (fp, br, an):
    print(r.summary())

h_lin = scipy.linalg.solve(np.eye(d) - W, (xl @ lin.U.T + lin.b).T).T   # (4, d)
err = np.abs(br.h - h_lin).max() / np.abs(h_lin).max()
print(f"Broyden vs scipy.linalg.solve: {err:.1e};  updates: {br.n_iter} (2d = {2 * d})")
assert err < 1e-8 and br.all_converged and (br.n_iter <= 2 * d).all()
assert set(fp.stop_reason) == {"diverged"}

fig, ax = plt.subplots(figsize=(6, 3.5))
for r in (fp, an, br):
    ax.semilogy(r.abs_residual[0], ".-", ms=3, label=f"{r.solver}: {r.stop_reason[0]}")
ax.set(xlabel="update t", ylabel="absolute residual ‖F(h) − h‖",
       title="Linear F, spectral radius 1.5 (sample 0)")
ax.legend(fontsize=8); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# (The absolute residual is plotted: the relative one of a diverging linear iteration tends to a
# constant.) Fixed-point iteration stops as soon as its residual exceeds $10^8$ times the initial one
# (`stop_reason == "diverged"`, with the last finite iterate kept). Training a DEQ whose $F$ drifts
# out of the contractive regime is exactly where Broyden's robustness pays, and where notebooks 3
# and 4 show the Neumann-series gradients lose their guarantees.
