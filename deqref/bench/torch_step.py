"""The TorchDEQ side of benchmark item 3: one training step of the same model, same weights.

F(z) = tanh(z Wᵀ + x Uᵀ + b) with ``torch.nn.Linear`` weights copied from a deqref ``Layer``;
the input injection x Uᵀ + b is computed once per step (with grad, so U and b get theirs).
TorchDEQ 0.1.0 is configured to do the same work as deqref (read from its source:
``torchdeq/core.py``, ``grad.py``, ``solver/fp_iter.py``):

- forward: ``fixed_point_iter`` with ``f_tol=0`` runs exactly ``f_max_iter`` F evaluations
  (it stops only when the batch-max residual is ``< f_tol``); deqref's ``fixed_point`` with
  ``max_iter=T, tol=0`` evaluates F T + 1 times, so TorchDEQ gets ``f_max_iter = T + 1``;
- UPG: ``grad=k, tau=λ`` unrolls k damped steps ``τ F(z) + (1 − τ) z`` from z* with autograd,
  the loss at z_k — deqref's ``upg_output`` + ``upg``;
- implicit: ``ift=True`` with ``b_solver="fixed_point_iter"``, ``b_tol=0``: from y_0 = 0 it
  makes ``b_max_iter`` VJP evaluations; deqref's ``implicit`` with ``method="fixed_point",
  n_iter=K`` makes K + 1 (the first on y = 0), so TorchDEQ gets ``b_max_iter = K + 1``.
  TorchDEQ's IFT adds one F call with grad at z* (its output is F(z*)).

Head and loss: ŷ = h Vᵀ + c, mean squared error, gradients for W, U, b, V, c by autograd.
"""
from __future__ import annotations

import numpy as np


def available() -> str | None:
    """None when torch and torchdeq import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import torchdeq  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA install
        return f"{type(err).__name__}: {err}"
    return None


class TorchStep:
    """A callable running one TorchDEQ training step; built from host NumPy weights."""

    def __init__(self, W, U, b, V, c, x, y, *, estimator, T, k, lam, K, dtype, device="cpu"):
        import torch
        import torchdeq
        self.torch = torch
        tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
        t = lambda a: torch.tensor(np.asarray(a), dtype=tdt, device=device)   # noqa: E731
        d, d_x = W.shape[0], U.shape[1]
        q = V.shape[0]
        self.lin_h = torch.nn.Linear(d, d, bias=False, dtype=tdt, device=device)
        self.lin_x = torch.nn.Linear(d_x, d, bias=True, dtype=tdt, device=device)
        self.head = torch.nn.Linear(d, q, bias=True, dtype=tdt, device=device)
        with torch.no_grad():
            self.lin_h.weight.copy_(t(W))
            self.lin_x.weight.copy_(t(U))
            self.lin_x.bias.copy_(t(b))
            self.head.weight.copy_(t(V))
            self.head.bias.copy_(t(c))
        self.params = [self.lin_h.weight, self.lin_x.weight, self.lin_x.bias,
                       self.head.weight, self.head.bias]
        self.x, self.y = t(x), t(y)
        self.z0 = torch.zeros(x.shape[0], d, dtype=tdt, device=device)
        if estimator == "upg":
            cfg = dict(grad=k, tau=lam)
        elif estimator == "implicit":
            cfg = dict(ift=True, b_solver="fixed_point_iter", b_max_iter=K + 1, b_tol=0.0,
                       b_stop_mode="abs")
        else:
            raise ValueError(f"TorchStep: estimator must be 'upg' or 'implicit', got {estimator!r}")
        self.deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=T + 1, f_tol=0.0,
                                    f_stop_mode="abs", **cfg)
        self.deq.train()
        self.device = device

    def __call__(self):
        torch = self.torch
        for p in self.params:
            p.grad = None
        inj = self.lin_x(self.x)                                     # x Uᵀ + b, once
        f = lambda z: torch.tanh(self.lin_h(z) + inj)                # noqa: E731
        z_out, _ = self.deq(f, self.z0)
        y_hat = self.head(z_out[-1])
        loss = torch.mean((y_hat - self.y) ** 2)
        loss.backward()
        if self.device != "cpu":
            torch.cuda.synchronize()
        return float(loss.detach())

    def grads(self) -> dict:
        g = [p.grad.detach().cpu().numpy() for p in self.params]
        return dict(zip(("W", "U", "b", "V", "c"), g))
