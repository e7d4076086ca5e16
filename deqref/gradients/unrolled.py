"""Differentiating through unrolled damped iterations: BPTT (Eq. 11, 14) and UPG (Eq. 17) of [1].

Both apply the same matrix to the upstream gradient g, in the paper's layout:

    A = λ Σ_{t=0}^{T−1} ∂F/∂θ|_{h_t} Π_{s=t+1}^{T−1} M_s,    M_s = λ ∂F/∂h|_{h_s} + (1 − λ) I

where h_{t+1} = λ F(h_t) + (1 − λ) h_t and Π_{s=t+1}^{T−1} M_s = M_{t+1} M_{t+2} ⋯ M_{T−1}
(in standard layout: the transpose of M_{T−1} ⋯ M_{t+1}). The same with ∂F/∂x gives ∂L/∂x.

- **BPTT** (Eq. 11 for λ = 1, Eq. 14 damped): h_0 is the solver's initial guess and the
  states are the forward solver's own iterates, T of them per sample.
- **UPG** A^unr_{k,λ} (Eq. 17): h_0 = h* from the solver and k fresh damped steps; the loss is
  taken at h_k, as in Algorithm 1 of [1] (``upg_output`` gives h_k).

The vector form is reverse-mode through the steps: v = g; for t = T−1, …, 0:
grad_θ += λ ∂F/∂θ|_{h_t} v, grad_x += λ ∂F/∂x|_{h_t} v, then v ← M_t v — one VJP per step.
The sums over t of the θ- and x-VJPs are left to the cell (``deqref.cell.vjp_sum``), which may
share work between the terms (the dense layer takes its U and b terms once).

References
----------
[1] Geng et al., On Training Implicit Models, NeurIPS 2021.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from ..cell import vjp_sum
from ..checks import check_lam
from .base import (Gradient, check_call, check_form, check_k, check_result,
                   make_gradient)


_LAST_UNROLL = contextvars.ContextVar("deqref_last_unroll", default=None)


@contextlib.contextmanager
def shared_unrolls():
    """Within this block, ``unroll`` called again with the same layer, x and h_0 (the same
    objects) and the same k and λ returns the states of the call before instead of taking the
    steps again: for a caller that takes UPG's output (``upg_output``) and its estimate (``upg``)
    at a layer whose weights it does not change in between, as ``deqref.train.train`` does.
    Outside such a block nothing is kept between calls."""
    token = _LAST_UNROLL.set([None])                # one entry: (key, the objects, hs, ss)
    try:
        yield
    finally:
        _LAST_UNROLL.reset(token)


def unroll(layer, x, h0, k: int, lam: float, *, primes: bool = False):
    """States [h_0, …, h_k] of h_{t+1} = λ F(h_t, x) + (1 − λ) h_t (Eq. 13)   # k+1 × (n, d)

    ``primes=True`` returns ``(hs, lins)`` with lins[t] the cell's linearization at h_t (t < k),
    from the same evaluation as F(h_t) (``bind_linear``) — what Algorithm 1's autograd graph
    keeps for the backward.
    """
    last, key = _LAST_UNROLL.get(), (id(layer), id(x), id(h0), k, lam)
    if last is not None and last[0] is not None and last[0][0] == key:    # see shared_unrolls
        hs, ss = list(last[0][2]), list(last[0][3])
        return (hs, ss) if primes else hs
    F_and_lin = layer.bind_linear(x)
    hs, ss = [h0], []
    for _ in range(k):
        F_t, s_t = F_and_lin(hs[-1])                                 # (n, d), linearization
        hs.append(lam * F_t + (1.0 - lam) * hs[-1])
        ss.append(s_t)
    if last is not None:                 # the objects are kept so that their ids stay theirs
        last[0] = (key, (layer, x, h0), list(hs), list(ss))
    return (hs, ss) if primes else hs


def _reverse(layer, x, hs, grad_h, lam, steps, lins=None):
    """Vector form: reverse pass over states hs[0..T−1]; ``steps`` (n,) host ints say how
    many of them each sample took (later steps are the identity for that sample); ``lins``:
    the cell's linearizations at those states if the forward kept them (else taken here).

    Step t contributes λ ∂F/∂θ|_{h_t} v_t and λ ∂F/∂x|_{h_t} v_t; both sums over t are taken
    after the pass by ``deqref.cell.vjp_sum`` (the cell may share work between the terms).
    """
    xp, be = layer.xp, layer.backend
    T = len(hs) - 1
    masked = bool(np.any(steps < T))                                  # some sample stopped early
    v = grad_h                                                        # (n, d)
    terms = []                                                        # (linearization, v_t), t = T−1 … 0
    for t in range(T - 1, -1, -1):
        lin = layer.linearize(hs[t], x) if lins is None else lins[t]  # at h_t
        live = be.from_host(steps > t)[:, None] if masked else None  # (n, 1) step t taken
        terms.append((lin, v if live is None else xp.where(live, v, 0.0)))
        if t > 0:                                                     # v ← M_t v
            Mv = lam * lin.vjp_h(v) + (1.0 - lam) * v
            v = Mv if live is None else xp.where(live, Mv, v)
    return vjp_sum(layer, terms, lam)                                 # (grads, (n, d_x))


def unrolled_matrices(layer, x, hs, lam, steps):
    """Matrix form, literally Eq. (14)/(17): A (n, d_θ, d) and A_x (n, d_x, d) per sample.

    A = Σ_t λ ∂F/∂θ(h_t) P_t with P_t = Π_{s=t+1}^{T−1} M_s (empty for t = T−1, so that term is
    taken as λ ∂F/∂θ(h_{T−1}) without multiplying by I: the (d_θ × d)(d × d) products are the
    whole cost at d = 256)."""
    xp, be = layer.xp, layer.backend
    n, d = hs[0].shape
    T = len(hs) - 1
    eye = xp.eye(d, dtype=hs[0].dtype)
    all_live = bool(np.all(steps >= T))
    P = None                                            # Π_{s=t+1}^{T−1} M_s; None: the empty product I
    A = A_x = None                                      # Σ_t of the terms below (n, d_θ, d), (n, d_x, d)
    for t in range(T - 1, -1, -1):
        dF_dtheta, dF_dx = layer.dF_dtheta(hs[t], x), layer.dF_dx(hs[t], x)   # (n, d_θ, d), (n, d_x, d)
        if P is None:
            term, term_x = lam * dF_dtheta, lam * dF_dx
        else:
            term, term_x = dF_dtheta @ (lam * P), dF_dx @ (lam * P)
        live = None if all_live else be.from_host(steps > t)[:, None, None]   # sample took step t
        if live is not None:
            term, term_x = xp.where(live, term, 0.0), xp.where(live, term_x, 0.0)
        if A is None:
            A, A_x = term, term_x
        else:                                           # in place: A is ~d_θ·d·8 B (143 MB at d = 256)
            A += term
            A_x += term_x
        if t > 0:
            M_t = lam * layer.dF_dh(hs[t], x) + (1.0 - lam) * eye          # (n, d, d)
            MP = M_t if P is None else M_t @ P                              # M_t M_{t+1} ⋯ M_{T−1}
            P = MP if live is None else xp.where(live, MP, eye if P is None else P)
    return A, A_x


def _apply(layer, A, A_x, grad_h):
    xp = layer.xp
    theta = xp.sum((A @ grad_h[:, :, None])[:, :, 0], axis=0)             # Σ_n A g   (d_θ,)
    return layer.unflatten(theta), (A_x @ grad_h[:, :, None])[:, :, 0]    # (n, d_x)


def _estimate(layer, x, hs, grad_h, lam, steps, form, name, options, diag, result, ss=None):
    if form == "matrix":
        A, A_x = unrolled_matrices(layer, x, hs, lam, steps)
        grads, grad_x = _apply(layer, A, A_x, grad_h)
        diag.update(A=A, A_x=A_x, n_matmul=2 * len(hs) - 1)
    else:
        grads, grad_x = _reverse(layer, x, hs, grad_h, lam, steps, ss)
        diag.update(n_vjp=3 * (len(hs) - 1) - 1)
    return make_gradient(layer, grads, grad_x, name, options, diag, grad_h=grad_h, result=result)


def upg_output(layer, x, result, *, k: int = 5, lam: float = 0.5):
    """h_k of Algorithm 1: k damped steps from h* — where UPG's loss is taken   # (n, d)"""
    k, lam = check_k(k), check_lam(lam)
    check_result(layer, x, result)
    return unroll(layer, x, result.h, k, lam)[-1]


def upg(layer, x, result, grad_h, *, k: int = 5, lam: float = 0.5, form: str = "vector") -> Gradient:
    """UPG A^unr_{k,λ} g, Eq. (17) of [1]; vector form = Algorithm 1.

    h_0 = h* = ``result.h``; the Jacobians are evaluated at the unrolled states h_0 … h_{k−1},
    computed here from the layer as it is now (nothing is cached between calls, so an edit
    of the layer's weights is always seen; only inside ``shared_unrolls``, which the trainer
    uses, are ``upg_output``'s states taken again for the same layer, x and h*). ``grad_h`` is ∂L/∂h taken at h_k (``upg_output``),
    as in Algorithm 1.
    """
    k, lam, form = check_k(k), check_lam(lam), check_form(form)
    check_call(layer, x, result, grad_h)
    hs, ss = unroll(layer, x, result.h, k, lam, primes=True)
    steps = np.full(x.shape[0], k)
    diag = {"n_F": k, "h_k": hs[-1]}
    return _estimate(layer, x, hs, grad_h, lam, steps, form, "upg",
                     {"k": k, "lam": lam, "form": form}, diag, result, ss)


def bptt(layer, x, result, grad_h, *, form: str = "vector") -> Gradient:
    """Backpropagation through the forward solver's own iterations, Eq. (11) / (14) of [1].

    ``result`` must come from ``fixed_point`` with ``return_trajectory=True``; λ is the
    solver's damping. Sample i is differentiated through its own ``n_iter[i]`` steps
    (after it stopped, its row was frozen: those steps are the identity map).
    ``grad_h`` is ∂L/∂h at the returned iterate ``result.h``.
    """
    form = check_form(form)
    check_call(layer, x, result, grad_h)
    if not result.solver.endswith("fixed_point"):
        raise ValueError(f"result: bptt differentiates through fixed-point iterations; "
                         f"got a result of solver {result.solver!r}")
    if result.trajectory is None:
        raise ValueError("result: bptt needs the iterates; solve with return_trajectory=True")
    if "diverged" in result.stop_reason:
        raise ValueError("result: some samples diverged; their iterates cannot be differentiated")
    lam = result.options["lam"]
    steps = np.asarray(result.n_iter)
    diag = {"T": steps.copy(), "rel_residual": [r[-1] for r in result.rel_residual]}
    # no forward flag (result=None below): BPTT is the exact gradient of the iterate h_T it is
    # given, converged or not; it does not estimate the implicit gradient at h*
    return _estimate(layer, x, result.trajectory, grad_h, lam, steps, form, "bptt",
                     {"form": form}, diag, None)
