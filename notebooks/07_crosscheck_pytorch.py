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
# # 7. Cross-checking an autograd implementation (PyTorch, JAX)
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

# %% [markdown]
# ## The same in JAX, and a golden file that tells the estimators apart
#
# JAX users get the same oracle. Below, the layer is a parameter dict `{"W", "U", "b"}` with
# $F(h) = \tanh(h W^\top + x U^\top + b)$; UPG is `jax.vjp` through Algorithm 1 and the implicit
# gradient is `jax.jacrev` + `jnp.linalg.solve`. JAX computes in float32 unless told otherwise:
# `jax_enable_x64` makes it float64, which the $10^{-10}$ tolerance needs.

# %%
try:
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
except ImportError:
    jax = None
    print("JAX is not installed: this section is skipped (pip install jax jaxopt optimistix).")

# %%
if jax is not None:
    P = layer.to_numpy()
    params = {k_: jnp.asarray(P[k_]) for k_ in ("W", "U", "b")}
    xj, gj = jnp.asarray(x), jnp.asarray(g)
    fj = lambda p, xx, h: jnp.tanh(h @ p["W"].T + xx @ p["U"].T + p["b"])   # noqa: E731
    hs = jnp.asarray(np.asarray(res.h))                                 # deqref's h*, a constant

    def upg_jax(p, xx):                                                 # Algorithm 1
        h = hs
        for _ in range(k):
            h = lam * fj(p, xx, h) + (1 - lam) * h
        return h

    def theta(tree):
        return np.concatenate([np.ravel(tree[k_]) for k_ in ("W", "U", "b")])

    jax_theirs = {"upg": theta(jax.vjp(upg_jax, params, xj)[1](gj)[0])}
    J = jax.vmap(lambda xi, hi: jax.jacrev(lambda h: fj(params, xi, h))(hi))(xj, hs)   # (n, d, d)
    y = jnp.linalg.solve(jnp.swapaxes(jnp.eye(64) - J, 1, 2), gj[..., None])[..., 0]    # (I − J)⁻ᵀ g
    jax_theirs["implicit"] = theta(jax.vjp(lambda p: fj(p, xj, hs), params)[1](y)[0])
    for name, t in jax_theirs.items():
        e = np.linalg.norm(ours[name].theta - t) / np.linalg.norm(ours[name].theta)
        print(f"{name:9s} ‖deqref − jax‖ / ‖deqref‖ = {e:.1e}")
        assert e < 1e-10

# %% [markdown]
# At an exact $h^*$, though, UPG and NPG give the same number, so a check there cannot tell an
# implementation that computes one for the other. The golden files of format 2 evaluate the
# phantom estimators at `h_eval`, an inexact point two plain steps from 0, and run BPTT for only
# 4 (and a damped 5) steps; every convention is in the file. JAX reproduces each estimator from
# the file's keys alone — here UPG — and `deqref crosscheck` catches a planted swap.

# %%
if jax is not None:
    import tempfile
    from pathlib import Path

    from deqref.cli import main as deqref_cli
    from deqref.crosscheck import write_golden

    folder = Path(tempfile.mkdtemp())
    z = dict(np.load(write_golden(folder)[0], allow_pickle=False))       # golden_tanh_d8.npz
    name = "upg_k5_lam0.5"
    print({key: str(z[f"{name}__{key}"]) for key in ("kind", "k", "lam", "start", "loss_at")})
    pz = {k_: jnp.asarray(z[k_]) for k_ in ("W", "U", "b")}
    start = jnp.asarray(z[str(z[f"{name}__start"])])                   # the file's h_eval

    def upg_file(p, xx):
        h = start
        for _ in range(int(z[f"{name}__k"])):
            h = float(z[f"{name}__lam"]) * fj(p, xx, h) + (1 - float(z[f"{name}__lam"])) * h
        return h

    gp, gx = jax.vjp(upg_file, pz, jnp.asarray(z["x"]))[1](jnp.asarray(z["grad_h"]))
    mine = {**gp, "x": gx}
    for p_ in ("W", "U", "b", "x"):
        e = np.linalg.norm(z[f"{name}__grad_{p_}"] - mine[p_]) / np.linalg.norm(z[f"{name}__grad_{p_}"])
        print(f"golden {name} {p_}: relative error of JAX {e:.1e}")
        assert e < 1e-12
    npg = "npg_k5_lam0.5"
    gap = np.linalg.norm(z[f"{name}__grad_W"] - z[f"{npg}__grad_W"]) / np.linalg.norm(z[f"{name}__grad_W"])
    print(f"UPG vs NPG (k = 5, λ = 0.5) in this file: {gap:.1e} apart")
    swapped = dict(z, **{f"{name}__grad_{p_}": z[f"{npg}__grad_{p_}"] for p_ in ("W", "U", "b", "x")})
    np.savez(folder / "swapped.npz", **swapped)
    import contextlib
    import io
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = deqref_cli(["crosscheck", str(folder / "swapped.npz")])
    print("deqref crosscheck on the file with UPG and NPG swapped: exit code", code)
    print("\n".join(ln for ln in table.getvalue().splitlines() if "DIFFERS" in ln))
    assert code == 1
