"""Jacobian regularization of a DEQ (Bai, Koltun, Kolter, *Stabilizing Equilibrium Models by
Jacobian Regularization*, ICML 2021): the penalty ‖∂F/∂h‖_F² at the fixed point, exactly and by
Hutchinson's estimator, and its gradient w.r.t. θ.

The penalty. Per sample s, with J_s = ∂F/∂h at (h*_s, x_s) (the Frobenius norm is the same in
either layout),

    R_s = ‖J_s‖_F² = tr(J_s J_sᵀ) = Σ_{i,j} (∂F_i/∂h_j)²,                                   (JR1)

and the loss Bai et al. add to the task loss is R_s summed over the batch and divided by the
number of entries of h* (their ``jac_loss_estimate`` divides by ``z.numel()``):

    R = (1/(n·d)) Σ_s R_s,                                                                    (JR0)

the mean over samples of ‖J_s‖_F²/d — the mean squared singular value of J_s.

Hutchinson's estimator. For ε ~ N(0, I_d), E‖J_sᵀ ε‖² = tr(J_s J_sᵀ) = R_s, so with m probes

    R̂_s = (1/m) Σ_k ‖∂F/∂h · ε_k‖²,   one VJP per probe, J never formed;                  (JR2)

its variance is Var R̂_s = 2 tr((J_s J_sᵀ)²)/m = 2‖J_s J_sᵀ‖_F²/m, so the error falls as 1/√m.
The probes are drawn with ``numpy.random.default_rng(seed)`` (shape (m, n, d)), so a seed fixes
the estimate on every backend. Measured (notebooks/10_conv_cell.py: the conv cell, C = 8, 8 × 8
digits, n = 8, at its fixed point, R = 0.1556; mean over 40 seeds against √(2/π)·sd(R̂)/R):

    probes m            1       4       16      64      256
    mean |R̂ − R|/R     0.030   0.016   0.0083  0.0042  0.0018
    CLT prediction      0.033   0.016   0.0082  0.0041  0.0020

The gradient w.r.t. θ, with h* and x held fixed (Bai et al. differentiate the penalty at a
detached z*: the implicit dependence of h* on θ is not followed). For one probe ε with
u = ∂F/∂h · ε,

    ∇_θ ‖∂F/∂h · ε‖² = 2 ∇_θ ⟨u, ∂F/∂h(θ) · ε⟩ = 2 ∇_θ (εᵀ J_h(θ) u)
                     = 2 d/dt [∂F/∂θ · ε at (h + t u, x)]_{t=0},                               (JR3)

since εᵀ J_h u = d/dt εᵀF(h + t u): the parameter VJP of ε, differentiated along h in the
direction u — a second derivative of F. It is written by hand for each cell:

- the dense ``Layer``, F = σ(W h + U x + b), s = σ′(a), r = ε ⊙ s, u = r W:
  d/dt of {W: rᵀh, U: rᵀx, b: Σ r} is, with δr = ε ⊙ σ″(a) ⊙ (u Wᵀ),
  {W: δrᵀ h + rᵀ u, U: δrᵀ x, b: Σ δr}, which needs σ″ (``SIGMA_SECOND``);
- the ``ConvCell``: ``ConvLinearization.vjp_theta_dh`` (GroupNorm's curvature; ReLU's σ″ = 0
  away from its kink).

The exact gradient is (JR3) summed over the d basis vectors ε = e_j, since
Σ_j ‖∂F/∂h · e_j‖² = ‖J‖_F² exactly; for the dense layer it also has a closed form
(``exact_grad_dense``): R_s = Σ_i s_i² ‖W_i‖², so ∂R_s/∂W_pq = 2 s_p² W_pq + c_p h_q with
c = 2 s ⊙ σ″(a) ⊙ ‖W_i‖² (rows), ∂R_s/∂U_pq = c_p x_q, ∂R_s/∂b_p = c_p.
"""
from __future__ import annotations

from .backend import check_seed, rng_normal, to_numpy
from .cell import check_cell
from .checks import check_choice, check_finite, check_int
from .layers import Layer

METHODS = ("exact", "hutchinson")

# σ″(a) for each activation of deqref.layers.ACTIVATIONS
SIGMA_SECOND = {
    "tanh": lambda xp, a: -2.0 * xp.tanh(a) * (1.0 - xp.tanh(a) ** 2),    # (1 − tanh²)′
    "relu": lambda xp, a: xp.zeros_like(a),                                # 0 away from the kink
    "identity": lambda xp, a: xp.zeros_like(a),
    "softplus": lambda xp, a: (1.0 / (1.0 + xp.exp(-a))) * (1.0 / (1.0 + xp.exp(a))),  # s(1 − s)
}


def _check(cell, h, x):
    check_cell(cell, "cell")
    cell.check_inputs(x=x, h=h)
    check_finite("h", h)
    check_finite("x", x)


def _check_probes(n_probes, seed):
    return check_int("n_probes", n_probes, minimum=1), check_seed(seed)


# ------------------------------------------------------------------ the penalty
def frobenius_sq(cell, h, x):
    """R_s = ‖∂F/∂h‖_F² per sample (JR1), from the dense Jacobian (matrix form)   # (n,)"""
    _check(cell, h, x)
    J = cell.dF_dh(h, x)                                                  # (n, d, d)
    return cell.xp.sum(J * J, axis=(1, 2))


def probes(cell, n: int, n_probes: int, seed: int):
    """ε_k ~ N(0, I_d) for each of n samples, from ``default_rng(seed)``   # (m, n, d)"""
    n_probes, seed = _check_probes(n_probes, seed)
    return rng_normal(seed, (n_probes, n, cell.d), cell.dtype, cell.backend)


CHUNK_ROWS = 4096           # probes run in batches of at most this many rows (k, s) at a time


def _chunks(eps, n: int):
    """ε (m, n, d) in runs of probes of at most ``CHUNK_ROWS`` rows (at least one probe each)."""
    m, step = eps.shape[0], max(1, CHUNK_ROWS // n)
    return [eps[k:min(k + step, m), ...] for k in range(0, m, step)]   # stops within the axis


def _stacked(cell, h, x, eps):
    """A run of m probes as one batch of m·n rows: (h, x) repeated m times, ε (m, n, d) →
    (m·n, d), so that one linearization and one VJP serve all of them."""
    xp = cell.xp
    m = eps.shape[0]
    return (xp.tile(h, (m, 1)), xp.tile(x, (m, 1)),
            xp.reshape(eps, (m * h.shape[0], cell.d)))


def hutchinson(cell, h, x, *, n_probes: int, seed: int):
    """R̂_s = (1/m) Σ_k ‖∂F/∂h · ε_k‖² per sample (JR2), one VJP per probe   # (n,)"""
    _check(cell, h, x)
    eps = probes(cell, h.shape[0], n_probes, seed)                        # (m, n, d)
    xp, n = cell.xp, h.shape[0]
    total = 0.0
    for run in _chunks(eps, n):
        h_m, x_m, eps_m = _stacked(cell, h, x, run)
        u = cell.linearize(h_m, x_m).vjp_h(eps_m)                         # (m_run·n, d)
        total = total + xp.sum(xp.reshape(xp.sum(u * u, axis=1), (run.shape[0], n)), axis=0)
    return total / eps.shape[0]


def penalty(cell, h, x, *, method: str = "exact", n_probes: int | None = None,
            seed: int | None = None) -> float:
    """The loss R = Σ_s R_s / (n·d) of (JR0), R_s exact (JR1) or estimated (JR2)."""
    per_sample = _per_sample(cell, h, x, method, n_probes, seed)
    return float(to_numpy(cell.xp.sum(per_sample))) / (h.shape[0] * cell.d)


def _check_method(method, n_probes, seed) -> str:
    """``method`` is one of METHODS; n_probes and seed belong to Hutchinson's alone."""
    method = check_choice("method", method, METHODS)
    if method == "exact" and (n_probes is not None or seed is not None):
        raise ValueError("n_probes and seed must be None with method='exact' (they are "
                         f"Hutchinson's), got n_probes={n_probes!r}, seed={seed!r}")
    return method


def _per_sample(cell, h, x, method, n_probes, seed):
    if _check_method(method, n_probes, seed) == "exact":
        return frobenius_sq(cell, h, x)
    return hutchinson(cell, h, x, n_probes=n_probes, seed=seed)


# ------------------------------------------------------------------ its gradient w.r.t. θ
def dense_vjp_theta_dh(layer: Layer, h, x, v, u) -> dict:
    """d/dt [∂F/∂θ · v at (h + t u, x)] at t = 0, summed over the batch (JR3), for the dense
    layer: with s = σ′(a), r = v ⊙ s and δr = v ⊙ σ″(a) ⊙ (u Wᵀ) (the change of s along u),
    {W: δrᵀ h + rᵀ u, U: δrᵀ x, b: Σ_rows δr}."""
    xp = layer.xp
    a = layer.preactivation(h, x)                                         # (n, d)
    r = v * layer.sigma_prime(h, x)                                       # (n, d)
    dr = v * SIGMA_SECOND[layer.activation](xp, a) * (u @ layer.W.T)      # (n, d)
    return {"W": dr.T @ h + r.T @ u, "U": dr.T @ x, "b": xp.sum(dr, axis=0)}


def _vjp_theta_dh(cell, h, x, lin):
    """The second derivative (JR3) of ``cell`` as a function (v, u) ↦ dict."""
    if hasattr(lin, "vjp_theta_dh"):
        return lin.vjp_theta_dh
    if type(cell) is Layer:
        return lambda v, u: dense_vjp_theta_dh(cell, h, x, v, u)
    raise ValueError(f"cell must be a Layer or a cell whose linearization has vjp_theta_dh "
                     f"(the second derivative of (JR3)), got {type(cell).__name__}")


def grad_for_probes(cell, h, x, eps) -> dict:
    """∇_θ of Σ_k Σ_s ‖∂F/∂h · ε_{k,s}‖² at fixed h, x (JR3), ε (m, n, d): summed over the
    probes (Hutchinson's mean divides by m; over the basis vectors the sum is exact). Each run
    of probes is one batch of rows, and the parameter VJP sums over the rows, i.e. over k and s."""
    total = None
    for run in _chunks(eps, h.shape[0]):
        h_m, x_m, eps_m = _stacked(cell, h, x, run)
        lin = cell.linearize(h_m, x_m)
        g = _vjp_theta_dh(cell, h_m, x_m, lin)(eps_m, lin.vjp_h(eps_m))
        total = g if total is None else {p: total[p] + g[p] for p in total}
    return {p: 2.0 * t for p, t in total.items()}


def basis_probes(cell, n: int):
    """The d basis vectors e_j, each for all n samples   # (d, n, d)"""
    xp = cell.xp
    eye = xp.eye(cell.d, dtype=getattr(xp, cell.dtype))
    return xp.broadcast_to(eye[:, None, :], (cell.d, n, cell.d))


def exact_grad_dense(layer: Layer, h, x) -> dict:
    """∇_θ Σ_s ‖∂F/∂h‖_F² for the dense layer in closed form (module docstring):
    R_s = Σ_i s_i² ‖W_i‖², c = 2 s ⊙ σ″(a) ⊙ ‖W_i‖²;  {W: 2 (Σ_s s²) ⊙_rows W + cᵀ h, U: cᵀ x,
    b: Σ_s c}."""
    xp = layer.xp
    a = layer.preactivation(h, x)                                         # (n, d)
    s = layer.sigma_prime(h, x)                                           # (n, d)
    row_sq = xp.sum(layer.W * layer.W, axis=1)                            # ‖W_i‖²  (d,)
    c = 2.0 * s * SIGMA_SECOND[layer.activation](xp, a) * row_sq          # (n, d)
    return {"W": 2.0 * xp.sum(s * s, axis=0)[:, None] * layer.W + c.T @ h,
            "U": c.T @ x, "b": xp.sum(c, axis=0)}


def penalty_grad(cell, h, x, *, method: str = "exact", n_probes: int | None = None,
                 seed: int | None = None) -> dict:
    """∇_θ of the loss R of (JR0) at fixed h, x: exact (the closed form for the dense layer,
    (JR3) over the basis vectors otherwise) or Hutchinson's (JR3) with the probes of
    ``hutchinson(..., n_probes, seed)``. A dict of parameter-shaped arrays."""
    _check(cell, h, x)
    scale = 1.0 / (h.shape[0] * cell.d)                                   # (JR0)
    if _check_method(method, n_probes, seed) == "exact":
        g = (exact_grad_dense(cell, h, x) if type(cell) is Layer
             else grad_for_probes(cell, h, x, basis_probes(cell, h.shape[0])))
    else:
        eps = probes(cell, h.shape[0], n_probes, seed)                    # (m, n, d)
        g = {p: v / eps.shape[0] for p, v in grad_for_probes(cell, h, x, eps).items()}
    return {p: scale * v for p, v in g.items()}
