"""The unavoidable work of each vector form, as bare array calls (benchmark item 2).

Each function below does, for F(h) = tanh(h Wᵀ + x Uᵀ + b), only the matrix products and
element-wise operations that the algorithm cannot avoid at its shape: no input checks, no
per-sample residual bookkeeping, no masks, no result objects. They take the arrays a deqref
estimator or solver receives (h*, x, g, the stored Broyden pairs) and compute the same
numbers, so ``bench`` can time deqref against them and check they agree.

What counts as unavoidable (per sample-batch, n rows, d hidden, d_x input):

- the input injection c = x Uᵀ + b once per solve (it does not depend on h);
- one F evaluation = one (n, d) × (d, d) product, an add, a tanh;
- one VJP in h = (v ⊙ s) W, with s = σ'(a) computed once per state;
- the parameter gradient = rᵀ h (and rᵀ x, Σ r, r U once: x and U do not change over steps,
  so the terms in x, U, b of a sum over steps are one product of the summed r);
- Broyden: three low-rank products per step (B⁻¹g, B⁻¹Δg, B⁻ᵀΔh), each two batched
  (n, m, d) products, and the rank-one update written into its slot.

``xp`` is the array module itself (``numpy`` or ``cupy``), so the same code times the GPU.
"""
from __future__ import annotations


def injection(xp, x, U, b):
    """c = x Uᵀ + b   # (n, d)"""
    return x @ U.T + b


def F(xp, h, W, c):
    """tanh(h Wᵀ + c)   # (n, d)"""
    a = h @ W.T
    a += c
    return xp.tanh(a, out=a)


def fixed_point(xp, W, U, b, x, h0, n_updates):
    """n_updates plain iterations h ← F(h); returns h_T and F(h_T), whose residual F(h_T) − h_T
    any solver must evaluate to know where it stands (n_updates + 1 F in all)."""
    c = injection(xp, x, U, b)
    h, Fh = h0, F(xp, h0, W, c)
    for _ in range(n_updates):
        h, Fh = Fh, F(xp, Fh, W, c)
    return h, Fh


def _lowrank(xp, A, Bm, w):
    """−w + Σ_i a_i (b_iᵀ w) with rows a_i of A (n, j, d) and b_i of Bm (n, j, d)   # (n, d)

    Batched matrix products (as fast as ``einsum`` or faster at every size we time)."""
    coef = (Bm @ w[:, :, None])[:, :, 0]                          # (n, j)  b_iᵀ w
    out = (coef[:, None, :] @ A)[:, 0, :]                         # (n, d)  Σ_i a_i coef_i
    out -= w
    return out


def broyden(xp, G, h0, n_updates, m):
    """Limited-memory Broyden on G(h) = Fmap(h) − h, n_updates steps; returns (h, Us, Vs)."""
    n, d = h0.shape
    Us = xp.zeros((n, m, d), dtype=h0.dtype)
    Vs = xp.zeros((n, m, d), dtype=h0.dtype)
    h, g = h0, G(h0)
    for t in range(n_updates):
        j = min(t, m)                                             # slots written so far
        U_, V_ = Us[:, :j], Vs[:, :j]                             # the rest are zeros
        h_new = h - _lowrank(xp, U_, V_, g)                       # h − B⁻¹ g
        g_new = G(h_new)
        dh, dg = h_new - h, g_new - g
        B_dg = _lowrank(xp, U_, V_, dg)                           # B⁻¹ Δg
        v = _lowrank(xp, V_, U_, dh)                              # B⁻ᵀ Δh
        den = xp.einsum("nd,nd->n", dh, B_dg)
        den[den == 0] = 1.0
        Us[:, t % m] = (dh - B_dg) / den[:, None]
        Vs[:, t % m] = v
        h, g = h_new, g_new
    return h, Us, Vs


def broyden_forward(xp, W, U, b, x, h0, n_updates, m):
    c = injection(xp, x, U, b)
    return broyden(xp, lambda h: F(xp, h, W, c) - h, h0, n_updates, m)


def _grads(xp, r_sum, rh_W, x, U):
    """Gradients from Σ_t r_t (for U, b, x) and Σ_t r_tᵀ h_t (for W)."""
    return {"W": rh_W, "U": r_sum.T @ x, "b": r_sum.sum(axis=0), "x": r_sum @ U}


def _s_at(xp, h, W, c):
    """σ'(a) = 1 − tanh(a)² at a = h Wᵀ + c   # (n, d)"""
    t = F(xp, h, W, c)
    t *= t
    return 1.0 - t


def jfb(xp, W, U, b, x, h, g):
    r = g * _s_at(xp, h, W, injection(xp, x, U, b))
    return _grads(xp, r, r.T @ h, x, U)


def npg(xp, W, U, b, x, h, g, k, lam):
    s = _s_at(xp, h, W, injection(xp, x, U, b))
    g_hat = g
    for _ in range(k - 1):                                        # ĝ ← g + λ J_hᵀĝ + (1 − λ) ĝ
        g_hat = g + lam * ((g_hat * s) @ W) + (1.0 - lam) * g_hat
    r = lam * g_hat * s
    return _grads(xp, r, r.T @ h, x, U)


def upg(xp, W, U, b, x, h, g, k, lam):
    """k damped steps from h* (keeping σ' of each), then the reverse pass."""
    c = injection(xp, x, U, b)
    hs, ss = [h], []
    for _ in range(k):
        Fh = F(xp, hs[-1], W, c)
        hs.append(lam * Fh + (1.0 - lam) * hs[-1])
        Fh *= Fh
        ss.append(1.0 - Fh)
    v, r_sum, gW = g, 0.0, 0.0
    for t in range(k - 1, -1, -1):
        r = lam * v * ss[t]
        r_sum = r_sum + r
        gW = gW + r.T @ hs[t]
        if t > 0:
            v = r @ W + (1.0 - lam) * v
    return _grads(xp, r_sum, gW, x, U)


def bptt(xp, W, U, b, x, hs, g):
    """Through the stored plain (λ = 1) iterates hs[0..T]; σ' recomputed per state."""
    c = injection(xp, x, U, b)
    v, r_sum, gW = g, 0.0, 0.0
    for t in range(len(hs) - 2, -1, -1):
        r = v * _s_at(xp, hs[t], W, c)
        r_sum = r_sum + r
        gW = gW + r.T @ hs[t]
        if t > 0:
            v = r @ W
    return _grads(xp, r_sum, gW, x, U)


def gdeq(xp, W, U, b, x, h, g, Us, Vs):
    y = -_lowrank(xp, Vs, Us, g)                                  # −B⁻ᵀ g
    r = y * _s_at(xp, h, W, injection(xp, x, U, b))
    return _grads(xp, r, r.T @ h, x, U)


def implicit_fixed_point(xp, W, U, b, x, h, g, n_iter):
    """y_K = Σ_{j<K} (J_hᵀ)^j g: K − 1 VJPs from y_1 = g."""
    s = _s_at(xp, h, W, injection(xp, x, U, b))
    y = g
    for _ in range(n_iter - 1):
        y = (y * s) @ W + g
    r = y * s
    return _grads(xp, r, r.T @ h, x, U)


def implicit_broyden(xp, W, U, b, x, h, g, n_iter, m):
    s = _s_at(xp, h, W, injection(xp, x, U, b))
    y, _, _ = broyden(xp, lambda y: (y * s) @ W + g - y, xp.zeros_like(g), n_iter, m)
    r = y * s
    return _grads(xp, r, r.T @ h, x, U)
