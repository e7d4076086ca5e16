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
# # 1. Implicit models and the implicit function theorem
#
# An implicit layer does not say how to compute its output; it says what the output satisfies.
# Geng et al. (2021) write it as the fixed point
#
# $$h^* = F(h^*, z), \qquad z^\top = [u^\top, \theta^\top] \tag{1}$$
#
# deqref's layer is $F(h, x) = \sigma(W h + U x + b)$ with $\theta = [\mathrm{vec}(W), \mathrm{vec}(U), b]$.
# This notebook finds $h^*$, derives its gradient (Eq. 2 and 4), checks that gradient against
# finite differences computed with code that shares nothing with deqref, and shows why the
# inverse in Eq. (4) is both expensive and, as $L_h \to 1$, ill-conditioned.
#
# **Layout.** The paper writes gradients as columns, so its $\partial F/\partial h$ is the
# transpose of the usual Jacobian $J_h[i,j] = \partial F_i/\partial h_j$. deqref's `dF_dh`,
# `dF_dtheta` follow the paper; `jacobian_h` is the usual one.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import scipy.optimize

import deqref
from deqref.gradients import estimate

d, d_x, n = 8, 3, 4
layer = deqref.Layer.random(d, d_x, "tanh", seed=0, L_h=0.9)      # ‖W‖₂ = 0.9: a contraction
rng = np.random.default_rng(1)
x = rng.standard_normal((n, d_x))                                   # (n, d_x)
g = rng.standard_normal((n, d))                                     # (n, d) upstream ∂L/∂h*
print(layer)

# %% [markdown]
# ## The fixed point
#
# With $|\sigma'| \le 1$ and $\|W\|_2 = L_h < 1$, $F$ is an $L_h$-contraction in $h$, so the
# iteration $h_{t+1} = F(h_t)$ (Eq. 10) converges to the unique $h^*$. We solve to a relative
# residual of $10^{-13}$ and compare with `scipy.optimize.root` (Powell's hybrid method) on a
# plain-NumPy $F$ written below from the formula — the oracle shares no code with deqref.

# %%
res = deqref.solve(layer, x, method="fixed_point", tol=1e-13, max_iter=1000)
print(res.summary())
h_star = res.h                                                      # (n, d)

P = layer.to_numpy()                                                # plain arrays W, U, b


def F_plain(h, x, W, U, b):
    """σ(W h + U x + b) for one sample, from the formula (tanh)."""
    return np.tanh(W @ h + U @ x + b)


def root_plain(x, W, U, b):
    sol = scipy.optimize.root(lambda h: F_plain(h, x, W, U, b) - h, np.zeros(len(b)), tol=1e-13)
    assert np.linalg.norm(sol.fun) < 1e-12, sol.message           # a root to rounding level
    return sol.x


h_oracle = np.stack([root_plain(x[i], P["W"], P["U"], P["b"]) for i in range(n)])
err = np.abs(h_star - h_oracle).max()
print(f"max |h*_deqref − h*_scipy| = {err:.2e}")
# the residual 1e-13 bounds the error by 1e-13·‖F‖/(1 − L_h) ≈ 1e-12·‖h‖; 1e-10 leaves room
# for scipy's own tolerance
assert err < 1e-10

# %% [markdown]
# ## Eq. (2): differentiating the fixed point
#
# Differentiate both sides of $h^* = F(h^*, z)$ with respect to $z$, in the paper's layout
# (row index = what we differentiate by):
#
# $$\frac{\partial h^*}{\partial z} = \frac{\partial F}{\partial z} + \frac{\partial h^*}{\partial z}\frac{\partial F}{\partial h}
# \quad\Longrightarrow\quad
# \frac{\partial h^*}{\partial z} = \frac{\partial F}{\partial z}\Big|_{h^*}\Big(I - \frac{\partial F}{\partial h}\Big|_{h^*}\Big)^{-1}. \tag{2}$$
#
# The inverse exists because $\|\partial F/\partial h\| \le L_h < 1$. With the loss $L(h^*)$
# and $g = \partial L/\partial h^*$, the chain rule gives Eq. (4):
#
# $$\frac{\partial L}{\partial \theta} = \frac{\partial F}{\partial \theta}\Big(I - \frac{\partial F}{\partial h}\Big)^{-1} \frac{\partial L}{\partial h}. \tag{4}$$
#
# deqref's oracle `implicit_dense` solves $(I - \partial F/\partial h)\,y = g$ per sample with
# `scipy.linalg.solve`, then applies $\partial F/\partial\theta$ as a vector–Jacobian product.
# `form="matrix"` instead builds the $d_\theta \times d$ matrix $A = \partial F/\partial\theta\,(I - \partial F/\partial h)^{-1}$ of Eq. (2).

# %%
exact = estimate("implicit_dense", layer, x, res, g)                 # vector form
exact_M = estimate("implicit_dense", layer, x, res, g, form="matrix")
A = exact_M.diagnostics["A"]                                          # (n, d_θ, d)  ∂h*/∂θ per sample
print("d_θ =", layer.d_theta, " A per sample:", A.shape[1:])
np.testing.assert_allclose(exact.theta, exact_M.theta, rtol=1e-12, atol=1e-14)

# %% [markdown]
# ## Check: finite differences
#
# Take the loss $L(\theta) = \sum_i g_i^\top h^*_i(\theta)$, whose $\partial L/\partial h^*$ is
# exactly $g$. Its gradient by central differences, $(L(\theta + \delta e_j) - L(\theta - \delta e_j))/2\delta$,
# with every $h^*$ re-solved by `scipy.optimize.root` on the plain $F$, is an oracle that
# shares no code with deqref. With $\delta = 10^{-5}$ the truncation error is
# $O(\delta^2) \approx 10^{-10}$ and rounding $O(\epsilon/\delta) \approx 10^{-11}$, relative to
# $|L|$; a relative tolerance of $10^{-6}$ on the gradient is comfortably above both.

# %%
def loss_plain(theta):
    W = theta[:d * d].reshape(d, d)
    U = theta[d * d:d * d + d * d_x].reshape(d, d_x)
    b = theta[d * d + d * d_x:]
    return sum(g[i] @ root_plain(x[i], W, U, b) for i in range(n))


theta0 = np.concatenate([P["W"].ravel(), P["U"].ravel(), P["b"]])
delta = 1e-5
t0 = time.perf_counter()
fd = np.array([(loss_plain(theta0 + delta * e) - loss_plain(theta0 - delta * e)) / (2 * delta)
               for e in np.eye(layer.d_theta)])
print(f"{2 * layer.d_theta * n} root solves in {time.perf_counter() - t0:.1f} s")
rel = np.linalg.norm(fd - exact.theta) / np.linalg.norm(fd)
print(f"relative error of Eq. (4) against finite differences: {rel:.2e}")
assert rel < 1e-6

# %% [markdown]
# Finite differences cost $2 d_\theta$ forward solves; Eq. (4) costs one linear solve per
# sample. And ignoring the inverse is not an option: JFB (notebook 5) replaces it by $I$, and the
# result is a different vector.

# %%
jfb = estimate("jfb", layer, x, res, g)
cos = jfb.theta @ exact.theta / np.linalg.norm(jfb.theta) / np.linalg.norm(exact.theta)
print(f"cos(JFB, exact) = {cos:.3f}")

# %% [markdown]
# ## Why the inverse is expensive
#
# $(I - \partial F/\partial h)$ is $d \times d$ per sample: storing it costs $d^2$ numbers and a
# dense solve $O(d^3)$ flops. For a DEQ on ImageNet $d > 10^5$ (Sec. 2.1) — $10^{10}$ entries.
# Below, the dense oracle's time per sample against $d$; the dashed line has slope 3.

# %%
ds, times = [32, 64, 128, 256, 512], []
for dd in ds:
    lay = deqref.Layer.random(dd, 4, "tanh", seed=0)
    xx = np.random.default_rng(0).standard_normal((2, 4))
    r = deqref.solve(lay, xx, tol=1e-10, max_iter=500)
    gg = np.ones((2, dd))
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        estimate("implicit_dense", lay, xx, r, gg)
        best = min(best, (time.perf_counter() - t0) / 2)
    times.append(best)
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(ds, times, "o-", label="implicit_dense, per sample")
ax.loglog(ds, times[-1] * (np.array(ds) / ds[-1]) ** 3, "k--", lw=1, label="∝ d³")
ax.set_xticks(ds, [str(v) for v in ds]); ax.minorticks_off()
ax.set(xlabel="d", ylabel="seconds", title="The dense inverse: cost per sample")
ax.legend(); ax.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# (At small $d$ the time is dominated by Python overhead; the $d^3$ regime takes over as $d$ grows.)
#
# ## Why the inverse can be ill-conditioned
#
# Since $\|\partial F/\partial h\|_2 \le L_h$, every singular value of $I - \partial F/\partial h$
# lies in $[1 - L_h, 1 + L_h]$, so
#
# $$\kappa\Big(I - \frac{\partial F}{\partial h}\Big) \le \frac{1 + L_h}{1 - L_h},$$
#
# which can blow up as $L_h \to 1$ — the paper's warning that the Jacobian-inverse is "numerically
# unstable and prone to exploding" when an eigenvalue of $\partial F/\partial h$ nears 1.
# Whether it does depends on the eigenvalues, not only on the norm. We compare two recurrent
# weights with $\|W\|_2 = L_h$: deqref's random one (non-symmetric; its eigenvalues stay well
# inside the disc) and a symmetric one with eigenvalue $+L_h$, built below as $Q\,\mathrm{diag}\,Q^\top$.
# With the identity activation $\partial F/\partial h = W^\top$, and for the symmetric $W$ the
# bound is attained up to the factor $(1 + L_h)/(1 + L_h/2)$.
# The check: for every $L_h$, weight and activation, $\kappa$ (from `numpy.linalg.cond`) is below
# the bound, up to a relative $10^{-10}$ for rounding in the SVD.

# %%
L_hs = 1 - np.logspace(-3, -0.3, 12)                                  # 0.999 … 0.5
Q = np.linalg.qr(np.random.default_rng(2).standard_normal((d, d)))[0]
W_sym = Q @ np.diag(np.linspace(-0.5, 1.0, d)) @ Q.T                   # eigenvalues in [−0.5, 1]
base = deqref.Layer.random(d, d_x, "tanh", seed=0)
kappas = {}
for kind in ("random W", "symmetric W, eigenvalue L_h"):
    for act in ("identity", "tanh"):
        ks = []
        for L_h in L_hs:
            if kind == "random W":
                lay = deqref.Layer.random(d, d_x, act, seed=0, L_h=L_h)
            else:
                lay = deqref.Layer(L_h * W_sym, base.U, base.b, act)
            r = deqref.solve(lay, x, method="broyden", tol=1e-12, max_iter=200)
            M = np.eye(d) - lay.dF_dh(r.h, x)                          # (n, d, d)
            kap = max(np.linalg.cond(M[i]) for i in range(n))
            assert kap <= (1 + L_h) / (1 - L_h) * (1 + 1e-10), (kind, act, L_h, kap)
            ks.append(kap)
        kappas[f"{kind}, {act}"] = ks

fig, ax = plt.subplots(figsize=(6, 4))
for label, ks in kappas.items():
    ax.loglog(1 - L_hs, ks, "o-", ms=4, label=label)
ax.loglog(1 - L_hs, (1 + L_hs) / (1 - L_hs), "k--", lw=1, label="bound (1 + L_h)/(1 − L_h)")
ax.set(xlabel="1 − L_h", ylabel="κ(I − ∂F/∂h), worst sample", title="The inverse as L_h → 1")
ax.invert_xaxis(); ax.legend(fontsize=7); ax.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# The symmetric weight with an eigenvalue at $L_h$ follows the bound: $\kappa \sim 2/(1 - L_h)$.
# tanh's saturation ($\sigma' < 1$) damps the growth; the random non-symmetric weight stays
# well-conditioned even at $L_h = 0.999$, because its eigenvalues (not its norm) stay away from 1. Notebooks 3 and 4 replace the inverse by truncated series whose terms stay bounded.
