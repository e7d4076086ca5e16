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
# # 7. Cross-checking an autograd implementation (PyTorch)
#
# A DEQ written in PyTorch gets its gradients from autograd plus whatever the author wrote around
# the solver: a backward hook solving the adjoint equation, a detached fixed point for JFB,
# `k` unrolled steps for UPG. deqref's hand-written formulas are an independent oracle for each.
# Here we build the *same* layer in PyTorch (float64, same weights), implement four estimators the
# way a PyTorch user would — with `torch.autograd`, never with deqref — and compare.
#
# The adjoint equation of Eq. (4), in the paper's layout: $y = (I - \partial F/\partial h)^{-1} g$
# is the fixed point of $y \mapsto \partial F/\partial h\, y + g$, where $\partial F/\partial h\,y$ is a
# vector–Jacobian product — `torch.autograd.grad(f, h, y)`.

# %%
import matplotlib.pyplot as plt
import numpy as np

import deqref
from deqref.data import synthetic
from deqref.gradients import estimate, output

try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: this notebook's cross-check is skipped.\n"
          "Install the CPU build with  pip install torch==2.13.0  (or pip install -e '.[crosscheck]')\n"
          "and run it again.")

# %% [markdown]
# ## The same layer, twice

# %%
layer, x, g = synthetic(seed=0, n=16)                                 # d = 64, d_x = 16, tanh
res = deqref.solve(layer, x, method="broyden", tol=1e-12, max_iter=200)
k, lam = 5, 0.5
ours = {"implicit": estimate("implicit_dense", layer, x, res, g),
        "jfb": estimate("jfb", layer, x, res, g),
        "npg": estimate("npg", layer, x, res, g, k=k, lam=lam)}
h_k = output("upg", layer, x, res, k=k, lam=lam)                      # UPG's loss is taken at h_k
ours["upg"] = estimate("upg", layer, x, res, g, k=k, lam=lam)
print(layer)

# %%
if torch is not None:
    torch.set_default_dtype(torch.float64)
    P = layer.to_numpy()
    W, U, b = (torch.tensor(P[k_], requires_grad=True) for k_ in ("W", "U", "b"))
    xt, gt = torch.tensor(x), torch.tensor(g)

    def f(h):                                                         # F(h, x) = tanh(h Wᵀ + x Uᵀ + b)
        return torch.tanh(h @ W.T + xt @ U.T + b)

    with torch.no_grad():                                             # forward: plain iteration
        h = torch.zeros(16, 64)
        for _ in range(500):
            h = f(h)
    h_star = h

    def grads(loss_or_out, grad_out=None):
        gs = torch.autograd.grad(loss_or_out, (W, U, b), grad_out)
        return np.concatenate([t.detach().numpy().ravel() for t in gs])

    theirs = {}
    # implicit: solve y = (∂F/∂h) y + g with VJPs, then one VJP in θ  (Eq. 4)
    h0 = h_star.clone().requires_grad_()
    fh = f(h0)
    y = gt.clone()
    for _ in range(300):
        y = torch.autograd.grad(fh, h0, y, retain_graph=True)[0] + gt
    theirs["implicit"] = grads(fh, y)
    # JFB: one tracked call at the detached fixed point
    theirs["jfb"] = grads(f(h_star), gt)
    # UPG, Algorithm 1: k damped steps from the detached h*, backprop through them
    hh = h_star
    for _ in range(k):
        hh = lam * f(hh) + (1 - lam) * hh
    theirs["upg"] = grads(hh, gt)
    upg_state_err = np.abs(hh.detach().numpy() - h_k).max()
    # NPG, Algorithm 2: ĝ ← g + (λ ∂F/∂h + (1 − λ) I) ĝ, k − 1 times, then λ ∂F/∂θ ĝ
    h0 = h_star.clone().requires_grad_()
    fh = f(h0)
    gh = gt.clone()
    for _ in range(k - 1):
        gh = gt + lam * torch.autograd.grad(fh, h0, gh, retain_graph=True)[0] + (1 - lam) * gh
    theirs["npg"] = lam * grads(fh, gh)

# %% [markdown]
# ## The verdict
#
# Both sides are float64 and compute the same quantity by different operations, so they agree to
# rounding amplified by the conditioning of $I - \partial F/\partial h$ ($\kappa \lesssim 3$ here):
# we require $10^{-10}$ relative. The torch forward (500 plain iterations) and adjoint (300) are run
# far past the contraction's $0.9^{300} \approx 10^{-14}$. A wrong transpose or a missing $\lambda$
# gives errors of order 1.

# %%
if torch is not None:
    errs = {}
    for name in ("implicit", "jfb", "upg", "npg"):
        a, t = ours[name].theta, theirs[name]
        errs[name] = np.linalg.norm(a - t) / np.linalg.norm(a)
        print(f"{name:9s} ‖deqref − torch‖ / ‖deqref‖ = {errs[name]:.1e}")
    print(f"UPG's output h_k: max |deqref − torch| = {upg_state_err:.1e}")
    assert max(errs.values()) < 1e-10 and upg_state_err < 1e-12

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(list(errs), [max(e, 1e-17) for e in errs.values()])
    ax.axhline(1e-10, color="k", ls="--", lw=1, label="tolerance")
    ax.set(yscale="log", ylabel="relative error", title="deqref against torch.autograd, float64")
    ax.legend(); ax.grid(alpha=0.3, axis="y")
    plt.show()

# %% [markdown]
# ## What a bug looks like
#
# A common slip is to apply the Jacobian instead of its transpose in the adjoint iteration —
# a JVP (`torch.func.jvp`, standard layout $J_h y$) where a VJP is needed. The result is still a
# plausible-looking vector, and only an oracle catches it.

# %%
if torch is not None:
    y = gt.clone()
    for _ in range(300):                                              # y ← J_h y + g  (wrong layout)
        y = torch.func.jvp(f, (h_star,), (y,))[1] + gt
    wrong = grads(f(h_star), y)
    err = np.linalg.norm(ours["implicit"].theta - wrong) / np.linalg.norm(ours["implicit"].theta)
    cos = wrong @ ours["implicit"].theta / np.linalg.norm(wrong) / np.linalg.norm(ours["implicit"].theta)
    print(f"transposed adjoint: relative error {err:.2e}, cosine {cos:.4f}  → caught")
    assert err > 1e-3
