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
# # 8. On a GPU: one code path, three array backends
#
# deqref never calls NumPy on its arrays directly. Every function asks its inputs for their
# Array-API namespace (`array_api_compat`), so the same source runs on
#
# - `"numpy"` — the default, with `scipy.linalg` for dense solves;
# - `"cupy"` — CuPy on an NVIDIA GPU, with `cupyx.scipy.linalg`;
# - `"strict"` — `array_api_strict`, a CPU namespace that *refuses* anything outside the standard,
#   so a NumPy-only call on a backend array fails on any machine, GPU or not.
#
# Switch with `deqref.set_backend(name)`, the context manager `deqref.use_backend(name)`, or the
# environment variable `DEQREF_BACKEND`. Random draws are made on the host and moved, so one seed
# gives the same numbers everywhere. This notebook runs one training-step computation on each
# available backend, checks they agree with NumPy, and times them.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import deqref
from deqref.backend import BackendError, to_numpy
from deqref.data import synthetic
from deqref.gradients import estimate

available = ["numpy", "strict"]
try:
    with deqref.use_backend("cupy"):
        pass
    available.append("cupy")
    print("CuPy found a GPU: the cupy backend runs below.")
except BackendError as err:
    print(f"No GPU here, the CuPy parts are skipped.\n  {err}")


# %% [markdown]
# ## The same computation on each backend
#
# One forward solve (Broyden) and three gradients: the dense oracle (Eq. 4), NPG (Algorithm 2)
# and GDEQ. Arrays stay on their backend; `to_numpy` copies a result back to the host.

# %%
def step(d, n=32, seed=0):
    layer, x, g = synthetic(seed=seed, d=d, n=n)                      # made on the active backend
    res = deqref.solve(layer, x, method="broyden", tol=1e-10, max_iter=100)
    out = {"h": res.h}
    for name, opts in (("implicit_dense", {}), ("npg", {"k": 5, "lam": 0.5}), ("gdeq", {})):
        out[name] = estimate(name, layer, x, res, g, **opts).theta
    return layer, out


results = {}
for name in available:
    with deqref.use_backend(name):
        layer, out = step(64)
        print(f"{name:7s}: h* is a {type(out['h']).__module__}.{type(out['h']).__name__}, {layer}")
        results[name] = {k: to_numpy(v) for k, v in out.items()}

# %% [markdown]
# **Check.** Every backend must reproduce NumPy. `array_api_strict` wraps NumPy, so it may differ
# only where the Array-API route takes a different order of operations: $10^{-12}$ relative. A GPU
# runs other kernels (cuBLAS, cuSOLVER) whose summation order differs: $10^{-9}$ relative after a
# 100-step solve and a dense solve in float64.

# %%
for name in available[1:]:
    tol = 1e-12 if name == "strict" else 1e-9
    for key, ref in results["numpy"].items():
        err = np.linalg.norm(results[name][key] - ref) / np.linalg.norm(ref)
        print(f"{name:7s} {key:15s} relative difference to numpy: {err:.1e}")
        assert err < tol, (name, key)

# %% [markdown]
# ## What "strict" catches
#
# A NumPy-only call on a backend array is the bug that breaks GPU runs. Under `strict` it fails on
# a laptop, in one of three ways: a NumPy-only method or a function outside the standard raises
# at once; a NumPy ufunc silently returns a *NumPy* array, which the backend then refuses to mix
# with its own arrays (CuPy refuses the conversion itself).

# %%
with deqref.use_backend("strict"):
    layer, x, _ = synthetic(seed=0, d=8, n=2)
    h = layer.xp.zeros((2, 8), dtype=layer.W.dtype)
    attempts = {"W.dot(W)  (NumPy-only method)": lambda: layer.W.dot(layer.W),
                "xp.einsum  (not in the standard)": lambda: layer.xp.einsum("ij->i", layer.W),
                "layer.vjp_h(np.tanh(h), x, h)  (NumPy ufunc)": lambda: layer.vjp_h(np.tanh(h), x, h)}
    failures = 0
    for label, attempt in attempts.items():
        try:
            attempt()
            print(f"{label}: ran (not caught)")
        except (AttributeError, TypeError) as err:
            failures += 1
            print(f"{label}: {type(err).__name__}: {str(err)[:90]}")
assert failures == len(attempts)

# %% [markdown]
# ## Timings
#
# Best of three runs of `step(d)` (32 samples) per backend and width $d$. On a GPU the dense
# oracle's $O(d^3)$ solves are where CuPy pays off; for small $d$ the kernel-launch overhead
# dominates and NumPy wins. `strict` measures the cost of the Array-API wrapper itself.
# (CuPy timings synchronize the device before reading the clock.)

# %%
def timed(name, d):
    best = np.inf
    with deqref.use_backend(name):
        for _ in range(3):
            t0 = time.perf_counter()
            _, out = step(d)
            if name == "cupy":
                import cupy
                cupy.cuda.Device().synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


ds = [16, 32, 64, 128]
times = {name: [timed(name, d) for d in ds] for name in available}
print("d      " + "".join(f"{name:>10s}" for name in available))
for i, d in enumerate(ds):
    print(f"{d:<7d}" + "".join(f"{times[name][i]:9.3f}s" for name in available))

fig, ax = plt.subplots(figsize=(5.5, 3.5))
for name in available:
    ax.loglog(ds, times[name], "o-", label=name)
ax.set_xticks(ds, [str(v) for v in ds]); ax.minorticks_off()
ax.set(xlabel="d", ylabel="seconds (solve + 3 gradients)", title="One step on each backend")
ax.legend(); ax.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# On a machine with an NVIDIA GPU, `pip install -e ".[gpu]"` and re-run: the `cupy` line appears,
# and the test suite runs the same way with `DEQREF_BACKEND=cupy python -m pytest -q`.
