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
# # 3. Phantom gradients: unrolling (UPG) and the Neumann series (NPG)
#
# Geng et al. replace the exact $\partial h^*/\partial\theta$ of Eq. (2) by a cheaper matrix $A$ and
# call $A\,\partial L/\partial h$ a *phantom gradient* (Eq. 5). Two choices of $A$ come from two
# ways of writing the inverse. Unrolling the damped iteration (Eq. 13),
# $h_{t+1} = \lambda F(h_t) + (1-\lambda) h_t$, and differentiating $T$ steps gives, in the paper's
# layout,
#
# $$\frac{\partial h_T}{\partial\theta} = \lambda \sum_{t=0}^{T-1} \frac{\partial F}{\partial\theta}\Big|_{h_t}
# \prod_{s=t+1}^{T-1}\Big(\lambda \frac{\partial F}{\partial h}\Big|_{h_s} + (1-\lambda) I\Big), \tag{14}$$
#
# where $\prod_{s=t+1}^{T-1} M_s = M_{t+1} M_{t+2} \cdots M_{T-1}$. This is BPTT through the solver.
# Starting instead from $h_0 = h^*$ and taking only $k$ steps gives the **unrolling-based phantom
# gradient**
#
# $$A^{\rm unr}_{k,\lambda} = \lambda \sum_{t=0}^{k-1} \frac{\partial F}{\partial\theta}\Big|_{h_t}
# \prod_{s=t+1}^{k-1}\Big(\lambda \frac{\partial F}{\partial h}\Big|_{h_s} + (1-\lambda) I\Big), \quad h_0 = h^*. \tag{17}$$
#
# If $h^*$ is exact, every $h_t = h^*$ and the product collapses to powers of
# $B = \lambda\,\partial F/\partial h|_{h^*} + (1-\lambda)I$: the **Neumann-series phantom gradient**
#
# $$A^{\rm neu}_{k,\lambda} = \lambda \frac{\partial F}{\partial\theta}\Big|_{h^*}\big(I + B + B^2 + \cdots + B^{k-1}\big), \tag{18}$$
#
# a truncation of $\lambda \sum_j B^j = (I - \partial F/\partial h)^{-1}$ (Eq. 15).
#
# deqref gives each as the literal matrix (`form="matrix"`, returned in `diagnostics["A"]`) and as
# the algorithm of the slides (`form="vector"`): Algorithm 1 (UPG) is reverse-mode through $k$
# steps, one VJP each; Algorithm 2 (NPG) is $\hat g \leftarrow g + B\hat g$, $k-1$ times, then one
# VJP in $\theta$ — no $d\times d$ matrix is ever formed.

# %%
import matplotlib.pyplot as plt
import numpy as np

import deqref
from deqref.data import synthetic
from deqref.gradients import estimate, output
from deqref.theory import cosine

d, d_x, n = 8, 3, 4
layer = deqref.Layer.random(d, d_x, "tanh", seed=0, L_h=0.9)
rng = np.random.default_rng(1)
x, g = rng.standard_normal((n, d_x)), rng.standard_normal((n, d))
res = deqref.solve(layer, x, method="fixed_point", tol=1e-14, max_iter=1000)
k, lam = 5, 0.5

# %% [markdown]
# ## Matrix form = vector form
#
# The two forms compute the same numbers in a different order, so they agree to rounding:
# $10^{-12}$ relative (a few hundred float64 operations, each off by at most $\epsilon \approx 10^{-16}$).
# For UPG the upstream gradient is taken at $h_k$, as in Algorithm 1 (`output("upg", ...)` gives $h_k$).

# %%
traj = deqref.solve(layer, x, method="fixed_point", lam=lam, tol=0.0, max_iter=12, stall_iter=None,
                    return_trajectory=True, warn=False)
cases = {"bptt (Eq. 14)": ("bptt", traj, {}),
         "upg (Eq. 17, Alg. 1)": ("upg", res, {"k": k, "lam": lam}),
         "npg (Eq. 18, Alg. 2)": ("npg", res, {"k": k, "lam": lam})}
grads = {}
for label, (name, r, opts) in cases.items():
    vec = estimate(name, layer, x, r, g, **opts)
    mat = estimate(name, layer, x, r, g, form="matrix", **opts)
    err = np.linalg.norm(vec.theta - mat.theta) / np.linalg.norm(mat.theta)
    print(f"{label:22s} A per sample {mat.diagnostics['A'].shape[1:]}, |vector − matrix| / |matrix| = {err:.1e}")
    assert err < 1e-12
    grads[name] = vec

# %% [markdown]
# ## Check: finite differences through the steps
#
# Each estimator is the exact derivative of *something*, and that something can be computed
# with plain NumPy and differenced:
#
# - BPTT: $\theta \mapsto \sum_i g_i^\top h_T$, with $T = 12$ damped steps from $h_0 = 0$;
# - UPG: $\theta \mapsto \sum_i g_i^\top h_k$, with $k$ damped steps from $h_0 = h^*$ **held fixed**
#   (Algorithm 1 detaches $h^*$);
# - NPG: $\lambda\,\Phi\sum_{j<k} B^j g$, with $\Phi = \partial F/\partial\theta$ and $\partial F/\partial h$
#   at $h^*$ obtained by finite differences of the plain $F$ (not from deqref's Jacobians).
#
# Central differences with step $10^{-6}$ are accurate to about $10^{-9}$ relative here; the
# tolerance $10^{-7}$ sits well above that and far below any error in a formula.

# %%
P = layer.to_numpy()
theta0 = np.concatenate([P["W"].ravel(), P["U"].ravel(), P["b"]])
h_star = res.h


def F_plain(h, theta):                                              # (n, d) -> (n, d)
    W = theta[:d * d].reshape(d, d)
    U = theta[d * d:d * d + d * d_x].reshape(d, d_x)
    return np.tanh(h @ W.T + x @ U.T + theta[d * d + d * d_x:])


def unrolled(theta, h0, steps):
    h = h0
    for _ in range(steps):
        h = lam * F_plain(h, theta) + (1 - lam) * h
    return h


def fd_grad(f, delta=1e-6):
    return np.array([(f(theta0 + delta * e) - f(theta0 - delta * e)) / (2 * delta)
                     for e in np.eye(len(theta0))])


fd = {"bptt": fd_grad(lambda th: np.sum(g * unrolled(th, np.zeros((n, d)), 12))),
      "upg": fd_grad(lambda th: np.sum(g * unrolled(th, h_star, k)))}

# NPG from finite-difference Jacobians of the plain F at h*, one sample at a time
npg_fd = np.zeros_like(theta0)
for i in range(n):
    Fi = lambda th, h: F_plain(np.tile(h, (n, 1)), th)[i]              # noqa: E731
    Phi = np.array([(Fi(theta0 + 1e-6 * e, h_star[i]) - Fi(theta0 - 1e-6 * e, h_star[i])) / 2e-6
                    for e in np.eye(len(theta0))])                     # (d_θ, d) paper's layout
    J = np.array([(Fi(theta0, h_star[i] + 1e-6 * e) - Fi(theta0, h_star[i] - 1e-6 * e)) / 2e-6
                  for e in np.eye(d)])                                  # (d, d) ∂F/∂h, paper's layout
    B = lam * J + (1 - lam) * np.eye(d)
    npg_fd += lam * Phi @ sum(np.linalg.matrix_power(B, j) for j in range(k)) @ g[i]
fd["npg"] = npg_fd

for name in ("bptt", "upg", "npg"):
    err = np.linalg.norm(grads[name].theta - fd[name]) / np.linalg.norm(fd[name])
    print(f"{name}: relative error against finite differences {err:.1e}")
    assert err < 1e-7

# %% [markdown]
# And the defining limits: at an exact $h^*$ (residual $10^{-14}$ here), UPG and NPG coincide;
# JFB is NPG with $k = 1$, $\lambda = 1$.

# %%
upg_vs_npg = np.linalg.norm(grads["upg"].theta - grads["npg"].theta) / np.linalg.norm(grads["npg"].theta)
jfb_vs_npg = np.abs(estimate("jfb", layer, x, res, g).theta - estimate("npg", layer, x, res, g, k=1, lam=1.0).theta).max()
print(f"UPG vs NPG at exact h*: {upg_vs_npg:.1e};  JFB vs NPG(1, 1): {jfb_vs_npg:.1e}")
assert upg_vs_npg < 1e-11 and jfb_vs_npg == 0.0

# %% [markdown]
# ## Figure 1: cosine to the exact gradient against k and λ
#
# The synthetic setting of the paper: one tanh layer with $\|W\|_2 = 0.9$, here $d = 64$, $d_x = 16$,
# 32 samples, an upstream $g \sim N(0, I)$; the exact gradient is the dense oracle (Eq. 4).
# (Only the $\theta$-gradient summed over the batch is compared, as in the paper.)

# %%
lay64, x64, g64 = synthetic(seed=0)
res64 = deqref.solve(lay64, x64, method="broyden", tol=1e-12, max_iter=200)
exact64 = estimate("implicit_dense", lay64, x64, res64, g64).theta
ks, lams = list(range(1, 31)), [1.0, 0.8, 0.5, 0.3]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
cos_table = {}
for ax, name in zip(axes, ("upg", "npg")):
    for lam_ in lams:
        cs = [cosine(estimate(name, lay64, x64, res64, g64, k=kk, lam=lam_).theta, exact64) for kk in ks]
        cos_table[name, lam_] = cs
        ax.plot(ks, cs, ".-", ms=3, label=f"λ = {lam_}")
    ax.set(xlabel="k", title=f"{name.upper()}: cos(phantom, exact)")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("cosine similarity"); axes[1].legend()
plt.show()
assert cos_table["npg", 1.0][-1] > 0.9999                             # k = 30, λ = 1: 0.9³⁰ ≈ 0.04 left

# %% [markdown]
# The cosine grows with $k$ and is already high for a few steps; smaller $\lambda$ converges more
# slowly — $\rho(B) = \lambda\rho(\partial F/\partial h) + 1 - \lambda$ is closer to 1 — and, the paper
# notes, "explores a wider range" of angles on the way.
#
# ## UPG against NPG when h* is inexact
#
# In practice $h^*$ comes from a solver stopped at some tolerance. NPG evaluates every Jacobian
# at that inexact point; UPG takes $k$ more damped steps from it, moving towards the true $h^*$,
# and differentiates those steps — the paper finds it "more robust to the numerical error of the
# solution". Below $h^*$ is solved to relative residual $10^{-1}$, $10^{-2}$ and $10^{-12}$, and
# both are compared with the exact gradient at the accurate $h^*$ ($\lambda = 0.5$). On a log scale
# of $1 - \cos$: NPG's error levels off at a floor set by the error in $h^*$; UPG's keeps falling.

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for tol, style in ((1e-1, ":"), (1e-2, "--"), (1e-12, "-")):
    r = deqref.solve(lay64, x64, method="fixed_point", tol=tol, max_iter=200)
    for name, color in (("upg", "C0"), ("npg", "C1")):
        cs = [cosine(estimate(name, lay64, x64, r, g64, k=kk, lam=0.5).theta, exact64) for kk in ks]
        ax.semilogy(ks, np.maximum(1 - np.array(cs), 1e-16), style, color=color,
                    label=f"{name.upper()}, h* to {tol:g}")
    if tol == 1e-1:
        gap = cs[-1], cosine(estimate("upg", lay64, x64, r, g64, k=30, lam=0.5).theta, exact64)
ax.set(xlabel="k", ylabel="1 − cos(phantom, exact at accurate h*)", title="Inexact h*, λ = 0.5")
ax.legend(fontsize=7, ncol=2); ax.grid(alpha=0.3)
plt.show()
print(f"h* to 1e-1, k = 30: cos NPG = {gap[0]:.4f}, cos UPG = {gap[1]:.4f}")
assert gap[1] > gap[0]                                                # UPG's extra steps repair h*
