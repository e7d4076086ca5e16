"""Section 6 of ``deqref bench``, "fair": deqref against TorchDEQ and against the machine's limit,
measured so that neither comparison can flatter deqref.

- **Threads fixed and printed.** The headline table runs everything on one thread: NumPy's BLAS
  (``threadpoolctl``) and PyTorch (``torch.set_num_threads``). With several threads in one process,
  OpenBLAS's worker threads, which spin for a while after each call, compete for the cores with
  PyTorch's OpenMP threads, and TorchDEQ's time then swings by 2x from run to run. So the
  multi-thread table runs each framework in its own process (``python -m deqref.bench.fair
  --worker``), alone on the machine, one after the other, for several rounds.
- **Many interleaved repeats.** Every callable of one size and dtype (deqref, TorchDEQ, the limits)
  is warmed up once and then run round-robin; min, median and max are reported, ratios are taken
  between medians.
- **The same gradient.** Each row says how far deqref's ∂L/∂W, ∂L/∂U, ∂L/∂b and ∂L/∂x are from
  TorchDEQ's and from the limit's (max relative difference, 2-norm): the limit computes the same
  gradient with the fewest library calls, which is how its list of products is checked.
- **The limit**: the time of exactly the matrix products and element-wise operations the work
  needs, in one preallocated sequence of NumPy calls (``np.matmul(..., out=)``, ``np.tanh(...,
  out=)``, the same BLAS calls and operand layouts as deqref): no checks, no residual norms, no
  temporaries, no Python beyond the loop. ``limit / time`` is the fraction of the machine's limit
  a framework reaches (1 = no overhead). The same sequence is timed on PyTorch's kernels too
  (``limit torch``: MKL instead of OpenBLAS), to show what TorchDEQ's own kernels allow.

What the limit counts (n samples, width d, d_x = d; every "product" is an (n × d)(d × d) or
(d × n)(n × d) matrix product):

- forward, T = 30 fixed-point updates from h = 0 (tol 0): the input injection c = x Uᵀ + b once,
  and T + 1 evaluations F(h) = tanh(h Wᵀ + c): one product, an add and a tanh each (the last one
  gives the final residual F(h_T) − h_T that a solver reports; deqref reports it, so it counts);
- UPG backward (k = 5, λ = 0.5) from h*: c, k evaluations of F keeping σ′ = 1 − F² from the same
  tanh, the reverse pass's k − 1 VJPs (v ⊙ s) W, the k products r_tᵀ h_t as one
  (d × kn)(kn × d) product (the same flops, no d × d sums; at d ≥ 256 one product of inner size kn
  is faster than k of inner size n, at d = 64 slightly slower), rᵀ x and r U (∂L/∂x) of the
  summed r;
- NPG backward (k = 5, λ = 0.5): c, σ′ at h* (one product and a tanh), k − 1 VJPs, rᵀ h, rᵀ x,
  r U; JFB: c, σ′, rᵀ h, rᵀ x, r U;
- implicit backward, 20 fixed-point adjoint iterations: c, σ′, 20 VJPs (19 updates from y_1 = g,
  and the one that gives the final residual), rᵀ h, rᵀ x, r U;
- a training step: the forward, the head (ŷ = h Vᵀ + c_G, MSE, its two small gradients) and the
  backward, sharing c. The backward does not reuse the forward's last F(h*) (deqref's solve
  returns h*, as TorchDEQ's does); reusing it would save one product of about 50.

TorchDEQ 0.1.0 runs the same steps (``deqref/bench/torch_step.py``) with ``f_max_iter = 30``: its
fixed-point solver returns F applied 30 times to 0, which is deqref's h after 30 updates, so both
sides differentiate at the same point and agree to rounding (deqref evaluates F once more, for the
final residual it reports, and the limit counts that evaluation). x carries ``requires_grad`` so
TorchDEQ computes ∂L/∂x too. TorchDEQ's implicit (IFT) step takes its Jacobian at F(z*) and
makes 21 VJPs from y = 0; its gradient differs from deqref's by about the forward residual.

deqref's training step is the one ``deqref.train`` takes: ``output`` and ``estimate`` inside
``shared_unrolls`` (UPG's k steps taken once).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ..backend import _load, check_finite
from ..cell import check_cell
from ..experiments.machine import blas_libraries, limit_blas_threads
from ..gradients import estimate, output, shared_unrolls
from ..gradients.base import make_gradient
from ..heads import mse
from ..solvers import ConvergenceWarning, solve
from ..solvers.common import prepare
from ..solvers.result import Monitor

T = 30                  # forward updates (tol 0)
K, LAM = 5, 0.5         # UPG / NPG
N_ADJ = 20              # implicit: fixed-point adjoint iterations
STEP_CASES = ("step upg", "step implicit")
CASES = STEP_CASES + ("forward", "backward upg", "backward npg", "backward jfb", "backward implicit")
MULTI_CASES = ("step upg", "forward")              # the multi-thread table (separate processes)
GRAD_KEYS = ("W", "U", "b", "x")
EST_OPTS = {"upg": {"k": K, "lam": LAM}, "npg": {"k": K, "lam": LAM}, "jfb": {},
            "implicit": {"method": "fixed_point", "n_iter": N_ADJ, "tol": 0.0}}

SIZES = {
    "quick": dict(d=[16], n=8, repeats=3, multi_d=[16], multi_dtypes=["float64"], rounds=1),
    "default": dict(d=[64, 256, 1024], n=64, repeats=21, multi_d=[256, 1024],
                    multi_dtypes=["float64", "float32"], rounds=3),
}


def products(case: str) -> int:
    """(n × d)(d × d)-sized matrix products the limit makes for ``case`` (d_x = d; the head's
    products with q = 10 outputs are not counted)."""
    fwd = 1 + (T + 1)                                         # c, T + 1 F
    back = {"upg": 1 + K + (K - 1) + K + 2, "npg": 1 + 1 + (K - 1) + 1 + 2,
            "jfb": 1 + 1 + 1 + 2, "implicit": 1 + 1 + N_ADJ + 1 + 2}
    kind, name = case.split(" ") if " " in case else (case, None)
    if kind == "forward":
        return fwd
    if kind == "backward":
        return back[name]
    return fwd + back[name] - 1                               # the step shares c


# ------------------------------------------------------------------ the limit
class Limit:
    """The fewest library calls for each case, on preallocated buffers (module docstring).

    ``xp`` is ``numpy`` or ``torch``: both spell these calls the same way (``matmul``, ``add``,
    ``multiply``, ``tanh``, ``negative``, ``sum`` with ``out=``). Arrays: W (d, d), U (d, d_x),
    b (d,), V (q, d), c_G (q,), x (n, d_x), y (n, q), g (n, d) an upstream ∂L/∂h, h_star (n, d).
    Every method returns the gradient ``{"W", "U", "b", "x"}`` (or ``{"h"}`` for the forward)."""

    def __init__(self, xp, W, U, b, V, cG, x, y, g, h_star):
        self.xp, self.W, self.U, self.b, self.V, self.cG = xp, W, U, b, V, cG
        self.x, self.y, self.g, self.h_star = x, y, g, h_star
        n, d = g.shape
        d_x, q = x.shape[1], V.shape[0]
        E = lambda *s: xp.empty(s, dtype=W.dtype)          # noqa: E731
        self.c = E(n, d)                                       # x Uᵀ + b
        self.h0 = xp.zeros((n, d), dtype=W.dtype)
        self.A, self.B = E(n, d), E(n, d)                      # forward ping-pong
        self.H, self.S, self.R = E(K, n, d), E(K, n, d), E(K, n, d)   # h_t, σ′_t, r_t
        self.hk, self.v, self.t1, self.t2, self.s = E(n, d), E(n, d), E(n, d), E(n, d), E(n, d)
        self.Y0, self.Y1, self.r = E(n, d), E(n, d), E(n, d)
        self.yh, self.dy, self.gh = E(n, q), E(n, q), E(n, d)
        self.gW, self.gU, self.gb, self.gx = E(d, d), E(d, d_x), E(d), E(n, d_x)
        self.gV, self.gcG = E(q, d), E(q)
        self.n, self.d, self.q = n, d, q

    # kernels
    def inject(self):
        """c = x Uᵀ + b"""
        xp = self.xp
        xp.matmul(self.x, self.U.T, out=self.c)
        xp.add(self.c, self.b, out=self.c)

    def F(self, h, out):
        """out = tanh(h Wᵀ + c)"""
        xp = self.xp
        xp.matmul(h, self.W.T, out=out)
        xp.add(out, self.c, out=out)
        xp.tanh(out, out=out)
        return out

    def prime_from(self, f):
        """f ← 1 − f² (σ′ of tanh from its value)"""
        xp = self.xp
        xp.multiply(f, f, out=f)
        xp.negative(f, out=f)
        xp.add(f, 1.0, out=f)

    def grads(self, r):
        """∂L/∂W = rᵀ h*, ∂L/∂U = rᵀ x, ∂L/∂b = Σ r, ∂L/∂x = r U, r (n, d) at h*"""
        xp = self.xp
        xp.matmul(r.T, self._h, out=self.gW)
        return self._rest(r)

    def _rest(self, r):
        xp = self.xp
        xp.matmul(r.T, self.x, out=self.gU)
        xp.sum(r, 0, out=self.gb)
        xp.matmul(r, self.U, out=self.gx)
        return {"W": self.gW, "U": self.gU, "b": self.gb, "x": self.gx}

    # the pieces
    def _forward(self):
        """T + 1 evaluations of F from 0: returns h_T (its F(h_T) computed)."""
        a, b = self.F(self.h0, self.A), self.B
        for _ in range(T):
            self.F(a, b)
            a, b = b, a
        return b                                               # h_T (a holds F(h_T))

    def forward(self):
        self.inject()
        return {"h": self._forward()}

    def _head(self, h):
        """ŷ = h Vᵀ + c_G, L = mean (ŷ − y)², ∂L/∂ŷ, ∂L/∂h = ∂L/∂ŷ V, ∂L/∂V, ∂L/∂c_G"""
        xp = self.xp
        xp.matmul(h, self.V.T, out=self.yh)
        xp.add(self.yh, self.cG, out=self.yh)
        xp.subtract(self.yh, self.y, out=self.dy)
        loss = float((self.dy * self.dy).sum()) / (self.n * self.q)
        xp.multiply(self.dy, 2.0 / (self.n * self.q), out=self.dy)
        xp.matmul(self.dy, self.V, out=self.gh)
        xp.matmul(self.dy.T, h, out=self.gV)
        xp.sum(self.dy, 0, out=self.gcG)
        return loss

    def _unroll(self, h_star):
        """k damped steps from h*: H[t] = h_t, S[t] = σ′ at h_t, returns h_k"""
        xp, H, S = self.xp, self.H, self.S
        H[0] = h_star
        for t in range(K):
            f = self.F(H[t], S[t])
            nxt = H[t + 1] if t + 1 < K else self.hk
            xp.multiply(H[t], 1.0 - LAM, out=nxt)             # h_{t+1} = λ F + (1 − λ) h_t
            xp.multiply(f, LAM, out=self.t1)
            xp.add(nxt, self.t1, out=nxt)
            self.prime_from(f)
        return self.hk

    def _upg_reverse(self, g):
        xp, R, S = self.xp, self.R, self.S
        v = self.v
        v[...] = g
        for t in range(K - 1, -1, -1):
            r = R[t]
            xp.multiply(v, S[t], out=r)                        # r_t = λ v ⊙ σ′_t
            xp.multiply(r, LAM, out=r)
            if t > 0:                                          # v ← r_t W + (1 − λ) v
                xp.matmul(r, self.W, out=self.t1)
                xp.multiply(v, 1.0 - LAM, out=v)
                xp.add(v, self.t1, out=v)
        nk = K * self.n
        xp.matmul(R.reshape(nk, self.d).T, self.H.reshape(nk, self.d), out=self.gW)   # Σ_t r_tᵀ h_t
        xp.sum(R, 0, out=self.r)                               # Σ_t r_t
        return self._rest(self.r)

    def _sigma(self, h):
        self.F(h, self.s)
        self.prime_from(self.s)
        self._h = h

    def _npg(self, g, k, lam):
        xp, s = self.xp, self.s
        gh = self.Y0
        gh[...] = g
        for _ in range(k - 1):                                 # ĝ ← g + λ (ĝ ⊙ s) W + (1 − λ) ĝ
            xp.multiply(gh, s, out=self.t1)
            xp.matmul(self.t1, self.W, out=self.t2)
            xp.multiply(gh, 1.0 - lam, out=gh)
            xp.multiply(self.t2, lam, out=self.t2)
            xp.add(gh, self.t2, out=gh)
            xp.add(gh, g, out=gh)
        xp.multiply(gh, s, out=self.r)
        if lam != 1.0:
            xp.multiply(self.r, lam, out=self.r)
        return self.grads(self.r)

    def _implicit(self, g):
        xp, s = self.xp, self.s
        a, b = self.Y0, self.Y1
        a[...] = g                                             # y_1 = g
        for j in range(N_ADJ):                                 # y ← (y ⊙ s) W + g
            xp.multiply(a, s, out=self.t1)
            xp.matmul(self.t1, self.W, out=b)
            xp.add(b, g, out=b)
            if j < N_ADJ - 1:                                  # the last one: the residual only
                a, b = b, a
        xp.multiply(a, s, out=self.r)                          # y_20 ⊙ s
        return self.grads(self.r)

    def backward(self, name):
        self.inject()
        if name == "upg":
            self._unroll(self.h_star)
            return self._upg_reverse(self.g)
        self._sigma(self.h_star)
        if name == "npg":
            return self._npg(self.g, K, LAM)
        if name == "jfb":
            return self._npg(self.g, 1, 1.0)
        return self._implicit(self.g)

    def step(self, name):
        self.inject()
        h = self._forward()
        if name == "upg":
            hk = self._unroll(h)
            self._head(hk)
            return self._upg_reverse(self.gh)
        self._head(h)
        self._sigma(h)
        return self._implicit(self.gh)

    def run(self, case):
        kind, _, name = case.partition(" ")
        if kind == "forward":
            return self.forward()
        return self.backward(name) if kind == "backward" else self.step(name)


# ------------------------------------------------------------------ deqref and TorchDEQ
def _deqref_calls(p, res):
    """case -> callable returning deqref's answer ({"W", "U", "b", "x"} or {"h"})."""
    L, x = p.layer, p.x

    def forward():
        return solve(L, x, method="fixed_point", tol=0.0, max_iter=T, stall_iter=None, warn=False)

    def step(name):
        r = forward()
        opts = EST_OPTS[name]
        with shared_unrolls():                 # as deqref.train takes a step
            h = output(name, L, x, r, **opts)
            _, dL_dy = mse(p.head(h), p.y)
            grad_h, _ = p.head.backward(h, dL_dy)
            return estimate(name, L, x, r, grad_h, **opts)

    calls = {"forward": forward,
             "step upg": lambda: step("upg"), "step implicit": lambda: step("implicit")}
    for name in ("upg", "npg", "jfb", "implicit"):
        calls[f"backward {name}"] = (lambda name=name: estimate(name, L, x, res, p.g, **EST_OPTS[name]))
    return calls


def _deqref_answer(case, out) -> dict:
    if case == "forward":
        return {"h": np.asarray(out.h)}
    return {k: np.asarray(getattr(out, k)) for k in GRAD_KEYS}


class _TorchForward:
    """TorchDEQ's forward alone: ``fixed_point_iter``, f_max_iter = T, no autograd (eval mode)."""

    def __init__(self, W, U, b, x, dtype):
        import torch
        import torchdeq
        self.torch = torch
        tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
        t = lambda a: torch.tensor(np.asarray(a), dtype=tdt)             # noqa: E731
        self.W, self.U, self.b, self.x = t(W), t(U), t(b), t(x)
        self.z0 = torch.zeros(x.shape[0], W.shape[0], dtype=tdt)
        self.deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=T, f_tol=0.0,
                                    f_stop_mode="abs", grad=K, tau=LAM)
        self.deq.eval()
        self.z = None

    def __call__(self):
        torch = self.torch
        with torch.no_grad():
            inj = torch.nn.functional.linear(self.x, self.U, self.b)
            f = lambda z: torch.tanh(torch.nn.functional.linear(z, self.W) + inj)   # noqa: E731
            z_out, _ = self.deq(f, self.z0)
        self.z = z_out[-1]
        return self.z

    def answer(self) -> dict:
        return {"h": self.z.numpy()}


def _torch_calls(p, dtype):
    """case -> (callable, answer()) for TorchDEQ; x requires grad (∂L/∂x is compared)."""
    from .torch_step import TorchStep
    L, H = p.layer, p.head
    arrays = [np.asarray(a) for a in (L.W, L.U, L.b, H.V, H.c, p.x, p.y)]
    calls = {}
    for name in ("upg", "implicit"):
        # T - 1: TorchStep runs f_max_iter = T + 1 of its argument, T here (module docstring)
        ts = TorchStep(*arrays, estimator=name, T=T - 1, k=K, lam=LAM, K=N_ADJ, dtype=dtype)
        ts.x.requires_grad_(True)

        def call(ts=ts):
            ts.x.grad = None
            return ts()

        def answer(ts=ts):
            g = ts.grads()
            return {"W": g["W"], "U": g["U"], "b": g["b"], "x": ts.x.grad.detach().numpy()}
        calls[f"step {name}"] = (call, answer)
    fw = _TorchForward(L.W, L.U, L.b, p.x, dtype)
    calls["forward"] = (fw, fw.answer)
    return calls


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _max_rel(a: dict, b: dict) -> float:
    return max(_rel(a[k], b[k]) for k in a)


def _as_numpy(ans: dict) -> dict:
    return {k: (v.detach().numpy() if hasattr(v, "detach") else np.array(v)) for k, v in ans.items()}


# ------------------------------------------------------------------ timing
def round_robin(fns: dict, repeats: int) -> dict:
    """Wall times (s) of each callable: one warm-up each, then ``repeats`` rounds, each callable
    once per round in a fixed order. Returns {name: [times]}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def stats(ts) -> dict:
    return {"min": float(np.min(ts)), "median": float(np.median(ts)), "max": float(np.max(ts)),
            "repeats": len(ts)}


# ------------------------------------------------------------------ where the time goes
_BACK = ("backward upg", "backward npg", "backward jfb", "backward implicit")
_STEPS = ("step upg", "step implicit")
# cause: (column title, what it is, {case: how many times the case pays it})
CAUSES = {
    "temporaries": ("F temporaries", f"the forward's {T + 1} evaluations of F with new arrays for "
                    "each product, add and tanh (deqref's F = layer.bind(x)), less the limit's "
                    "in-place forward", {"forward": 1, "step upg": 1, "step implicit": 1}),
    "bookkeeping": ("forward bookkeeping", f"the forward's residual bookkeeping: {T + 1} records of "
                    "per-sample norms ‖F(h) − h‖, ‖F(h)‖, ‖h‖ and stop tests, and the result's "
                    "per-sample traces", {"forward": 1, "step upg": 1, "step implicit": 1}),
    "setup": ("solver set-up", "a solve's argument checks (x, h0 finite, shapes, options) and set-up",
              {"forward": 1, "step upg": 1, "step implicit": 2, "backward implicit": 1}),
    "cell": ("cell check", "deqref.cell.check_cell, which every estimator check and output() runs "
             "twice (what the class defines is looked up once per class, the object's own names on "
             "every call)", {**{c: 2 for c in _BACK}, "step upg": 6, "step implicit": 4}),
    "checks": ("array checks", "the estimator's input checks without the cell check (x, h*, ∂L/∂h "
               "finite, shapes), and in a step those of output() and UPG's upg_output (x, h*)",
               {**{c: 1 for c in _BACK}, "step upg": 1, "step implicit": 1}),
    "theta": ("output check", "∂L/∂θ (each parameter's gradient) and ∂L/∂x checked finite, one "
              "sum each (θ itself is flattened only when asked for)", {c: 1 for c in _BACK + _STEPS}),
    "injection": ("x Uᵀ + b again", "the input injection computed again by the estimator (the "
                  "limit computes it once per step)", {c: 1 for c in _BACK + _STEPS}),
    "wsums": ("∂L/∂W by parts", f"UPG: ∂L/∂W as {K} products r_tᵀ h_t of inner size n, each "
              f"into a new d × d array, added in place, less the limit's one (d × kn)(kn × d) "
              "product into its buffer (the same flops)", {"backward upg": 1, "step upg": 1}),
    "adjoint": ("adjoint bookkeeping", f"implicit: the adjoint solve's {N_ADJ} residual records, its "
                "per-sample divergence test and the traces rescaled",
                {"backward implicit": 1, "step implicit": 1}),
}
CAUSE_CASES = ("forward", "backward upg", "backward implicit", "step upg", "step implicit")


def causes(p, res) -> dict:
    """Time (s, median of 15, round-robin) of each cause in ``CAUSES``, timed alone on the same
    arrays as the cases: what deqref does that the limit does not."""
    from ..backend import eps
    from ..gradients.base import InnerSolve
    L, x, g, h = p.layer, p.x, p.g, res.h
    xp, n = L.xp, x.shape[0]
    opts = dict(tol=0.0, atol=0.0, max_iter=T, norm="2", stall_iter=None, divergence_factor=1e8)
    F = L.bind(x)
    hs = [xp.zeros_like(h)]                     # the forward's own iterates, from 0
    for _ in range(T + 1):
        hs.append(F(hs[-1]))
    arrays = [np.asarray(a) for a in (L.W, L.U, L.b, p.head.V, p.head.c, x, p.y, g, h)]
    lim = Limit(np, *arrays)
    h0 = xp.zeros_like(h)

    def deqref_F():                             # deqref's F, T + 1 times, injection once
        f = L.bind(x)
        a = f(h0)
        for _ in range(T):
            a = f(a)

    def records(count):
        mon = Monitor(n, **{**opts, "max_iter": count - 1}, name="fixed_point", warn=False)
        for t in range(count):
            mon.record(hs[t], hs[t + 1])
        return mon.finish(h, n_F=count, options=opts)

    def adjoint():
        r = records(N_ADJ)
        InnerSolve("implicit", r.abs_residual, r.converged, r.stop_reason, 0.0, True, eps(h)).flag()
        [a * 1.0 for a in r.abs_residual]

    def array_checks(*arrays):                  # check_call / check_result less check_cell
        named = dict(zip(("result.h", "grad_h"), arrays))
        L.check_inputs(x=x, **named)
        for name, a in (("x", x), *named.items()):
            check_finite(name, a)

    def setup():
        prepare(L, x, None, "fixed_point", warn=False, **opts)

    def theta():
        make_gradient(L, {"W": L.W, "U": L.U, "b": L.b}, x, "upg", {}, {}, grad_h=g, result=res)

    Rs = xp.stack([g * (0.5 ** t) for t in range(K)])           # K × (n, d), like the r_t
    Hs = xp.stack([hs[T - t] for t in range(K)])                 # K × (n, d), like the h_t
    G = xp.empty_like(L.W)

    def w_parts():                              # as deqref.layers.Layer.vjp_sum
        acc = Rs[0].T @ Hs[0]
        for t in range(1, K):
            acc += Rs[t].T @ Hs[t]

    def w_fused():                              # as Limit._upg_reverse
        xp.matmul(Rs.reshape(K * n, -1).T, Hs.reshape(K * n, -1), out=G)

    WT = np.ascontiguousarray(L.W.T)                             # Wᵀ stored row-major
    out_nt, out_nn = xp.empty_like(h), xp.empty_like(h)

    def product_nt():                           # h Wᵀ on W's transposed view, as deqref and the limit
        for t in range(T + 1):
            xp.matmul(hs[t], L.W.T, out=out_nt)

    def product_nn():                           # the same product on a contiguous copy of Wᵀ
        for t in range(T + 1):
            xp.matmul(hs[t], WT, out=out_nn)

    fns = {"deqref F": deqref_F, "limit forward": lim.forward,
           "product nt": product_nt, "product nn": product_nn,
           "bookkeeping": lambda: records(T + 1), "setup": setup,
           "checks": lambda: array_checks(h, g), "result_checks": lambda: array_checks(h),
           "cell": lambda: check_cell(L),
           "theta": theta,
           "injection": lambda: L.input_injection(x),
           "w parts": w_parts, "w fused": w_fused,
           "adjoint": adjoint}
    t = {k: float(np.median(v)) for k, v in round_robin(fns, 15).items()}
    t["temporaries"] = max(t.pop("deqref F") - t.pop("limit forward"), 0.0)
    t["wsums"] = max(t.pop("w parts") - t.pop("w fused"), 0.0)
    # not beyond the limit (it makes the same calls): what the layout of W costs the forward
    t["layout"] = t.pop("product nt") - t.pop("product nn")
    return t


def cause_seconds(c: dict, case: str) -> dict:
    """{cause: seconds} that ``case`` pays, from the per-call times ``c`` of ``causes``."""
    out = {}
    for key, (_, _, per) in CAUSES.items():
        if case in per:
            out[key] = per[case] * c[key]
    if "checks" in out and case in _STEPS:      # output() (and UPG's upg_output) check too
        out["checks"] += (2 if case == "step upg" else 1) * c["result_checks"]
    return out


# ------------------------------------------------------------------ one size, one process
def _problem(d, n, dtype):
    from . import Problem
    return Problem(_load("numpy"), d, n, dtype=dtype)


def measure(d: int, n: int, dtype: str, repeats: int, sides=("deqref", "torchdeq", "limit",
            "limit torch"), cases=CASES, with_causes: bool = True) -> dict:
    """Time ``cases`` for ``sides`` at one size in this process, round-robin; check the answers.
    Returns {"times": {side: {case: [s]}}, "answers": {side: {case: dict}}, "causes": ...}."""
    p = _problem(d, n, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solve(p.layer, p.x, method="fixed_point", tol=0.0, max_iter=T, stall_iter=None,
                    warn=False)
    fns, answers = {}, {}
    if "deqref" in sides:
        dq = _deqref_calls(p, res)
        for case in cases:
            fns[("deqref", case)] = dq[case]
    arrays = [np.asarray(a) for a in (p.layer.W, p.layer.U, p.layer.b, p.head.V, p.head.c,
                                      p.x, p.y, p.g, res.h)]
    if "limit" in sides:
        lim = Limit(np, *arrays)
        for case in cases:
            fns[("limit", case)] = (lambda case=case: lim.run(case))
    torch_fns = {}
    if "torchdeq" in sides or "limit torch" in sides:
        import torch
        tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
        if "limit torch" in sides:
            lim_t = Limit(torch, *[torch.tensor(a, dtype=tdt) for a in arrays])
            for case in cases:
                fns[("limit torch", case)] = (lambda case=case: lim_t.run(case))
        if "torchdeq" in sides:
            torch_fns = _torch_calls(p, dtype)
            for case in cases:
                if case in torch_fns:
                    fns[("torchdeq", case)] = torch_fns[case][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = round_robin(fns, repeats)
        for (side, case), fn in fns.items():
            out = fn()
            if side == "deqref":
                ans = _deqref_answer(case, out)
            elif side == "torchdeq":
                ans = torch_fns[case][1]()
            else:
                ans = _as_numpy({k: v for k, v in out.items()})
            answers.setdefault(side, {})[case] = {k: np.array(v, dtype=np.float64) for k, v in ans.items()}
        cz = causes(p, res) if with_causes else None
    times = {}
    for (side, case), ts in raw.items():
        times.setdefault(side, {})[case] = ts
    return {"times": times, "answers": answers, "causes": cz}


def _thread_record(torch_threads: bool = True) -> dict:
    libs = blas_libraries()
    rec = {"blas": None if libs is None else
           [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)" for p in libs]}
    if torch_threads:
        try:
            import torch
            rec["torch_threads"] = torch.get_num_threads()
            rec["torch_interop_threads"] = torch.get_num_interop_threads()
        except Exception:
            pass
    return rec


def _set_torch_threads(n: int) -> None:
    try:
        import torch
    except Exception:
        return
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:          # only before any parallel work; then it stays as it was
        pass


# ------------------------------------------------------------------ the tables
def _rows(d, n, dtype, m, threads) -> list:
    """Rows of one size from a ``measure`` record (or the merged records of two workers)."""
    T_, A = m["times"], m["answers"]
    rows = []
    for case in CASES:
        if case not in T_.get("deqref", {}):
            continue
        row = {"threads": threads, "dtype": dtype, "d": d, "n": n, "case": case,
               "products": products(case)}
        for side in ("deqref", "torchdeq", "limit", "limit torch"):
            if case in T_.get(side, {}):
                row[side] = stats(T_[side][case])
        med = lambda s: row[s]["median"] if s in row else None      # noqa: E731
        if med("torchdeq"):
            row["deqref_over_torchdeq"] = med("deqref") / med("torchdeq")
        if med("limit"):
            row["limit_over_deqref"] = med("limit") / med("deqref")
            if med("torchdeq"):
                row["limit_over_torchdeq"] = med("limit") / med("torchdeq")
        if med("limit torch") and med("torchdeq"):
            row["limit_torch_over_torchdeq"] = med("limit torch") / med("torchdeq")
        ours = A["deqref"][case]
        if case in A.get("torchdeq", {}):
            row["diff_torchdeq"] = _max_rel(ours, A["torchdeq"][case])
        if case in A.get("limit", {}):
            row["diff_limit"] = _max_rel(ours, A["limit"][case])
        if case in A.get("limit torch", {}):          # torch's kernels on the same sequence
            row["diff_limit_torch"] = _max_rel(A["limit torch"][case], ours)
        rows.append(row)
    return rows


def run_one_thread(sizes: dict, log=print) -> tuple[list, list, dict]:
    """The headline: everything in this process on one thread."""
    rows, cz = [], []
    from .torch_step import available
    why = available()
    sides = ("deqref", "limit") + (("torchdeq", "limit torch") if why is None else ())
    with limit_blas_threads(1):
        _set_torch_threads(1)
        rec = _thread_record(why is None)
        for dtype in ("float64", "float32"):
            for d in sizes["d"]:
                log(f"bench fair: 1 thread, {dtype}, d = {d}")
                load = _load1()
                m = measure(d, sizes["n"], dtype, sizes["repeats"], sides)
                rs = _rows(d, sizes["n"], dtype, m, 1)
                for r in rs:
                    r["load_1min"] = [load, _load1()]           # before and after this size
                rows += rs
                cz.append({"dtype": dtype, "d": d, "n": sizes["n"], "causes_s": m["causes"]})
    rec["torchdeq"] = why
    return rows, cz, rec


def _load1() -> float | None:
    """The 1-minute load average (other work on the machine shows in every time)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _worker_cmd(side, threads, d, n, dtype, repeats, out):
    return [sys.executable, "-m", "deqref.bench.fair", "--worker", side, "--threads", str(threads),
            "--d", str(d), "--n", str(n), "--dtype", dtype, "--repeats", str(repeats),
            "--out", str(out)]


def run_multi(sizes: dict, threads: int, log=print) -> list | str:
    """Each framework in its own process (``--worker``), alone, ``rounds`` times in turn."""
    from .torch_step import available
    why = available()
    if why is not None:
        return f"torch/torchdeq: {why}"
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in sizes["multi_dtypes"]:
            for d in sizes["multi_d"]:
                log(f"bench fair: {threads} threads, separate processes, {dtype}, d = {d}")
                merged = {"times": {}, "answers": {}, "round_medians": {}}
                for rnd in range(sizes["rounds"]):
                    for side in ("deqref", "torchdeq"):
                        out = Path(tmp) / f"{side}-{dtype}-{d}-{rnd}"
                        proc = subprocess.run(_worker_cmd(side, threads, d, sizes["n"], dtype,
                                                          sizes["repeats"], out),
                                              capture_output=True, text=True, env=env)
                        if proc.returncode != 0:
                            raise RuntimeError(f"bench fair worker ({side}) failed: "
                                               f"{proc.stderr.strip().splitlines()[-1:]}")
                        rec = json.loads((out.with_suffix(".json")).read_text())
                        ans = np.load(out.with_suffix(".npz"))
                        for s, per_case in rec["times"].items():
                            for case, ts in per_case.items():
                                merged["times"].setdefault(s, {}).setdefault(case, []).extend(ts)
                                merged["round_medians"].setdefault(s, {}).setdefault(case, []).append(
                                    float(np.median(ts)))
                        for key in ans.files:
                            s, case, k = key.split("|")
                            merged["answers"].setdefault(s, {}).setdefault(case, {})[k] = ans[key]
                        merged.setdefault("threads_seen", {})[side] = rec["threads"]
                rs = _rows(d, sizes["n"], dtype, merged, threads)
                for r in rs:
                    r["thread_record"] = merged["threads_seen"]
                    r["round_medians"] = {s: m[r["case"]] for s, m in merged["round_medians"].items()
                                          if r["case"] in m}
                rows += rs
    return rows


def worker(side, threads, d, n, dtype, repeats, out) -> int:
    """One framework alone in this process: deqref (+ the NumPy limit) with ``threads`` BLAS
    threads and torch not imported, or TorchDEQ (+ torch's limit) with ``threads`` torch threads
    and NumPy's BLAS on one thread (used only to build the problem)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if side == "deqref":
            with limit_blas_threads(threads):
                m = measure(d, n, dtype, repeats, ("deqref", "limit"), MULTI_CASES, False)
                rec = _thread_record(torch_threads=False)
        else:
            with limit_blas_threads(1):
                _set_torch_threads(threads)
                m = measure(d, n, dtype, repeats, ("torchdeq", "limit torch"), MULTI_CASES, False)
                rec = _thread_record()
    out = Path(out)
    out.with_suffix(".json").write_text(json.dumps({"times": m["times"], "threads": rec}))
    np.savez(out.with_suffix(".npz"), **{f"{s}|{c}|{k}": v for s, per in m["answers"].items()
                                         for c, a in per.items() for k, v in a.items()})
    return 0


def run(quick: bool = False, log=print, multi: bool = True) -> dict:
    mode = "quick" if quick else "default"
    sizes = SIZES[mode]
    from . import machine
    data = {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "sizes": sizes, "settings": {"forward_updates": T, "k": K, "lam": LAM,
                                         "implicit_adjoint_iterations": N_ADJ, "head_outputs": 10}}
    t0 = time.perf_counter()
    with limit_blas_threads(1):
        data["machine"] = machine(1)
    data["machine"]["simd"] = _simd()
    rows, cz, rec = run_one_thread(sizes, log)
    data["one_thread"] = {"rows": rows, "threads": rec}
    data["causes"] = cz
    threads = os.cpu_count() or 1
    if not multi:
        data["multi_thread"] = "not run (multi=False)"
    elif threads < 2:
        data["multi_thread"] = "one core: no multi-thread table"
    else:
        rows_mt = run_multi(sizes, threads, log)
        data["multi_thread"] = ({"threads": threads, "rows": rows_mt} if isinstance(rows_mt, list)
                                else f"TorchDEQ not available ({rows_mt})")
    if hasattr(os, "getloadavg"):
        data["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    data["total_s"] = time.perf_counter() - t0
    return data


def _simd() -> str | None:
    """The widest x86 vector extension the CPU reports (/proc/cpuinfo), None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    return next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
                 if flag in flags), None)


# ------------------------------------------------------------------ Markdown
def _load_range(rows) -> str:
    loads = [v for r in rows for v in (r.get("load_1min") or []) if v is not None]
    return f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"


def _ms(st) -> str:
    if st is None:
        return "-"
    return f"{1e3 * st['median']:.3g} ({1e3 * st['min']:.3g}–{1e3 * st['max']:.3g})"


def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _table(rows, title, note, h="###") -> list:
    L = [f"{h} {title}", "", note, "",
         "| dtype | d | case | products | deqref ms | TorchDEQ ms | limit ms (NumPy) | "
         "limit ms (torch) | deqref / TorchDEQ | limit / deqref | limit / TorchDEQ | "
         "torch limit / TorchDEQ | grad diff TorchDEQ | grad diff limit |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['dtype']} | {r['d']} | {r['case']} | {r['products']} | {_ms(r.get('deqref'))} | "
                 f"{_ms(r.get('torchdeq'))} | {_ms(r.get('limit'))} | {_ms(r.get('limit torch'))} | "
                 f"{_f(r.get('deqref_over_torchdeq'))} | {_f(r.get('limit_over_deqref'))} | "
                 f"{_f(r.get('limit_over_torchdeq'))} | {_f(r.get('limit_torch_over_torchdeq'))} | "
                 f"{_f(r.get('diff_torchdeq'), '.1e')} | {_f(r.get('diff_limit'), '.1e')} |")
    L.append("")
    return L


def _causes_paragraph(data, case: str = "step upg", top: int = 3) -> str:
    """The largest causes of the UPG step's time beyond the limit, per dtype and size."""
    by = {(r["dtype"], r["d"], r["case"]): r for r in data["one_thread"]["rows"]}
    parts = []
    for c in data["causes"]:
        r = by.get((c["dtype"], c["d"], case))
        if r is None:
            continue
        gap = r["deqref"]["median"] - r["limit"]["median"]
        paid = sorted(cause_seconds(c["causes_s"], case).items(), key=lambda kv: -kv[1])[:top]
        named = ", ".join(f"{CAUSES[k][0]} {1e3 * v:.2g}" for k, v in paid)
        parts.append(f"{c['dtype']}, d = {c['d']}: {1e3 * gap:.2g} ms beyond the limit "
                     f"({1e3 * r['deqref']['median']:.3g} against {1e3 * r['limit']['median']:.3g}); "
                     f"largest causes {named}")
    return (f"**Where the time goes** ({case}, ms per step): " + "; ".join(parts) + ". The forward's "
            "per-sample residual bookkeeping is a fixed cost per update (three row norms, the stop "
            "tests, the traces), which weighs most at small d; the work deqref does twice (the input "
            "injection, ∂L/∂W in parts) and its checks grow with d." + _layout_sentence(data))


def _layout_sentence(data) -> str:
    layout = [(c["dtype"], c["d"], c["causes_s"]["layout"]) for c in data["causes"]
              if "layout" in c["causes_s"]]
    if not layout:
        return ""
    return (" Not in the gap, because the limit makes the same calls: the forward's "
            f"{T + 1} products h Wᵀ on W's transposed view take "
            + "; ".join(f"{dt}, d = {d}: {1e3 * v:+.2g} ms" for dt, d, v in layout)
            + " more than on a row-major copy of Wᵀ.")


def where_the_time_goes(data, h="###") -> list:
    """The causes table: deqref's time beyond the limit, split by cause (1 thread)."""
    L = [f"{h} Where deqref's time goes beyond the limit (one thread)", "",
         "deqref − limit: the medians' difference (ms) in the one-thread table. Each cause is timed "
         "alone on the same arrays in the same run (median of 15, ms per case: a cause the case pays "
         "twice counts twice); rest = deqref − limit − the causes (Python between the calls and other "
         "temporaries; below 0 where a cause timed alone costs more than inside the case, or the "
         "run's noise is larger). The causes:", ""]
    for key, (title, what, _) in CAUSES.items():
        L.append(f"- **{title}**: {what}.")
    L += ["", _causes_paragraph(data)]
    L += ["", "| dtype | d | case | deqref − limit | " + " | ".join(t for t, _, _ in CAUSES.values())
          + " | rest |", "|---|---|---|---|" + "---|" * (len(CAUSES) + 1)]
    by = {(r["dtype"], r["d"], r["case"]): r for r in data["one_thread"]["rows"]}
    for c in data["causes"]:
        for case in CAUSE_CASES:
            r = by.get((c["dtype"], c["d"], case))
            if r is None:
                continue
            gap = r["deqref"]["median"] - r["limit"]["median"]
            paid = cause_seconds(c["causes_s"], case)
            cells = [f"{1e3 * paid[key]:.3f}" if key in paid else "–" for key in CAUSES]
            total = sum(paid.values())
            L.append(f"| {c['dtype']} | {c['d']} | {case} | {1e3 * gap:.3f} | " + " | ".join(cells)
                     + f" | {1e3 * (gap - total):.3f} |")
    L.append("")
    return L


def headline(data, case: str = "step upg") -> str:
    """One sentence per dtype: the one-thread ratios of ``case`` at every size."""
    rows = [r for r in data["one_thread"]["rows"] if r["case"] == case]
    out = []
    for dtype in ("float64", "float32"):
        rs = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["d"])
        if not rs:
            continue
        ds = " / ".join(str(r["d"]) for r in rs)
        part = f"{dtype}, d = {ds}: "
        if all("deqref_over_torchdeq" in r for r in rs):
            part += ("deqref / TorchDEQ " + " / ".join(f"{r['deqref_over_torchdeq']:.2f}" for r in rs)
                     + ", limit / TorchDEQ " + " / ".join(f"{r['limit_over_torchdeq']:.2f}" for r in rs)
                     + ", ")
        part += "limit / deqref " + " / ".join(f"{r['limit_over_deqref']:.2f}" for r in rs)
        out.append(part)
    return f"**Headline ({case}, one thread, ratios of medians):** " + "; ".join(out) + "."


def markdown(data, level: int = 2, summary: str | None = None) -> str:
    m = data["machine"]
    h, h2 = "#" * level, "#" * (level + 1)
    one = data["one_thread"]
    L = [f"{h} 6. Fair: deqref against TorchDEQ and against the machine's limit ({data['mode']})", "",
         f"Run {data['date']} on {m.get('Model name', '?')}"
         + (f" with {m['simd']}" if m.get("simd") else "")
         + f", {m.get('CPU(s)', m['cpu_count'])} CPUs, "
         f"load average {m.get('load_average_at_start', '?')} at the start and "
         f"{data.get('load_average_at_end', '?')} at the end (1-minute load while the one-thread "
         f"table ran, its own busy thread included: {_load_range(one['rows'])}); Python {m['python']}, NumPy {m['numpy']}, "
         f"torch {m.get('torch', '-')}, TorchDEQ {m.get('torchdeq', '-')}. "
         f"Threads in the one-thread table: {', '.join(one['threads'].get('blas') or ['?'])}; torch "
         f"{one['threads'].get('torch_threads', '-')} (inter-op {one['threads'].get('torch_interop_threads', '-')}).",
         "",
         f"Each cell: median (min–max) of {data['sizes']['repeats']} repeats, every callable of a size "
         "run round-robin after one warm-up. n = 64 samples, d_x = d, ‖W‖₂ = 0.9, head to 10 outputs, "
         f"MSE. forward: {T} fixed-point updates from 0, tol 0 ({T + 1} F); UPG and NPG: k = {K}, "
         f"λ = {LAM}; implicit: {N_ADJ} fixed-point adjoint iterations; step = forward + head + loss "
         "+ backward. products: the (n × d)(d × d) products the limit makes (see "
         "`deqref/bench/fair.py`). **limit / deqref** = limit time / deqref time: the fraction of the "
         "machine's limit deqref reaches (1 = no overhead; goal ≥ 0.9); limit / TorchDEQ the same for "
         "TorchDEQ; deqref / TorchDEQ < 1: deqref faster. grad diff: max relative difference of "
         "∂L/∂W, ∂L/∂U, ∂L/∂b, ∂L/∂x (forward: of h*) between deqref and TorchDEQ / the limit. "
         "TorchDEQ has no backward alone; its implicit step takes its Jacobian at F(z*) (a "
         "difference of the size of the forward residual). TorchDEQ 0.1.0 runs f_max_iter = 30, so "
         "it returns deqref's h after 30 updates (deqref evaluates F once more, for the residual it "
         "reports); x requires grad there, so both compute ∂L/∂x. deqref's step is the one "
         "deqref.train takes (output and estimate inside shared_unrolls). limit (torch): the same "
         "calls on PyTorch's kernels (MKL).", ""]
    L += [headline(data), ""]
    if summary:
        L += [summary, ""]
    L += _table(one["rows"], "One thread (headline)",
                "NumPy's BLAS and torch on one thread each, both frameworks in this one process.", h2)
    mt = data["multi_thread"]
    if isinstance(mt, dict):
        L += _table(mt["rows"], f"{mt['threads']} threads, each framework in its own process",
                    f"deqref (with the NumPy limit) in one process with {mt['threads']} BLAS threads "
                    f"and torch not imported; TorchDEQ (with torch's limit) in another with "
                    f"{mt['threads']} torch threads and NumPy's BLAS on one thread; the two run one "
                    f"after the other, {data['sizes']['rounds']} rounds, times pooled over the rounds "
                    f"({data['sizes']['rounds']} × {data['sizes']['repeats']} repeats).", h2)
        L += ["Median of each round (ms), deqref | TorchDEQ — a process that drew a bad round shows "
              "here:", ""]
        for r in mt["rows"]:
            rm = r.get("round_medians", {})
            fmt = lambda side: ", ".join(f"{1e3 * v:.3g}" for v in rm.get(side, []))   # noqa: E731
            L.append(f"- {r['dtype']}, d = {r['d']}, {r['case']}: {fmt('deqref')} | {fmt('torchdeq')}")
        L.append("")
    else:
        L += [f"{h2} Several threads", "", f"Not run: {mt}.", ""]
    L += where_the_time_goes(data, h2)
    return "\n".join(L)


def main(out: Path, quick: bool = False) -> int:
    from . import write_results
    data = run(quick)
    md = markdown(data, level=1)
    write_results(out, "fair", data, md + "\n")
    print(md)
    print(f"deqref bench fair: {data['total_s']:.1f} s, written to {out}/fair.json and fair.md")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m deqref.bench.fair")
    ap.add_argument("--worker", choices=("deqref", "torchdeq"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--dtype", choices=("float64", "float32"))
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.worker:
        sys.exit(worker(a.worker, a.threads, a.d, a.n, a.dtype, a.repeats, a.out))
    sys.exit(main(Path(a.out or "benchmarks/results"), a.quick))
