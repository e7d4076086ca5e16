"""The implicit graph cell of IGNN (Gu et al. 2020): F(H) = σ(W H Â + Ω X Â), batched over graphs.

Per graph, with N nodes, m state channels and p input features per node:

    H (m, N)   node states, one column per node
    X (p, N)   node features (the input x)
    Â (N, N)   the normalized adjacency (``normalized_adjacency``), fixed, not trained
    W (m, m)   recurrent weight,  Ω (m, p)  input weight        θ = [vec(W), vec(Ω)], row-major

    F(H) = σ(W H Â + Ω X Â)        (IGNN's equilibrium equation, H = F(H) at the fixed point)

IGNN's official code (SwiftieH/IGNN, ``ImplicitGraph``) builds the injection as Ω₁ U A, i.e. the
features are propagated one hop as well; so does this cell. That code declares a bias but never
adds it, and this cell has none: PARAMS = ("W", "Omega"). Without a bias a padding node's state
is σ(0) whatever θ is, so padding cannot leak into a parameter gradient.
σ is one of ``deqref.layers.ACTIVATIONS``; IGNN uses ReLU, the default here is tanh, smooth, so
that finite differences and every estimator's oracle are exact to rounding (ReLU's kink makes
σ′ jump where a pre-activation crosses 0); pass ``activation="relu"`` for IGNN's own setting.

**Layout of the rows (vec column-major).** A batch is n graphs, each padded to N nodes. Sample i's
state row is h_i = vec(H_i), the columns of H_i stacked node by node, so h_i[j·m + a] = H_i[a, j]
and ``reshape(h, (n, N, m))`` is H_iᵀ per sample; likewise x_i = vec(X_i), ``reshape(x, (n, N,
p))`` is X_iᵀ. Hence d = m·N and d_x = p·N. Inside, the code works on those transposes:
(W H Â)ᵀ = Âᵀ Hᵀ Wᵀ.

**Padding.** ``pad_graphs`` pads each graph with isolated nodes: their rows and columns of Â are
0 (no self-loop) and their features 0. Then no real node reads a padding node, a padding node's
state is σ(0) (0 for tanh and ReLU, log 2 for softplus) and its rows of ∂F/∂h are 0. ``mask``
(n, N) is 1 on real nodes and 0 on padding nodes: a readout must mask the padding nodes out
(sum or average over ``mask``), else σ(0) enters the prediction.

**Jacobians** (vec(A B C) = (Cᵀ ⊗ A) vec(B)). With Z = W H Â + Ω X Â and S = σ′(Z), s = vec(S):

    standard layout   ∂vec F/∂vec H = diag(s) (Âᵀ ⊗ W)          (d, d)
    paper's layout    ∂F/∂h = (Â ⊗ Wᵀ) diag(s)                   (d, d), [j, i] = ∂F_i/∂h_j

``dF_dh`` builds it literally with a Kronecker product (matrix form, small graphs only); the
``GraphLinearization`` products never form it (vector form): ∂F/∂h · v = vec(Wᵀ (V ⊙ S) Âᵀ).

**Well-posedness** (IGNN). F has a unique fixed point when λ_pf(|Âᵀ ⊗ W|) < 1 and |σ′| ≤ 1; a
sufficient condition is ‖W‖∞ λ_pf(Â) < 1, λ_pf the Perron–Frobenius eigenvalue of |Â| (the
largest over the batch's graphs). ``project(κ)`` keeps it by projecting each row of W onto the
ℓ1 ball of radius κ/λ_pf (IGNN's projection; ``project_l1_ball``, Duchi et al. 2008);
``well_posed(cell)`` returns ‖W‖∞ λ_pf(Â). For the symmetric normalization of
``normalized_adjacency``, λ_pf(Â) = 1 exactly.

References
----------
Gu, Chang, Zhu, Sojoudi, El Ghaoui, Implicit Graph Neural Networks, NeurIPS 2020.
Duchi, Shalev-Shwartz, Singer, Chandra, Efficient Projections onto the ℓ1-Ball for Learning in
High Dimensions, ICML 2008.
"""
from __future__ import annotations

import numpy as np

from .backend import (DTYPES, Backend, backend_of, check_backend, check_finite, check_seed,
                      check_shape, dtype_name, namespace, require_arrays, to_numpy)
from .cell import NOT_GIVEN
from .checks import check_choice, check_int, check_real
from .layers import ACTIVATIONS, check_activation



# ---------------------------------------------------------------- graphs on the host
def normalized_adjacency(A) -> np.ndarray:
    """Â = D̃^{-1/2} (A + I) D̃^{-1/2}, D̃ = diag of the row sums of A + I (host NumPy, float64).

    IGNN's ``AugNormAdj`` (GCN's renormalization): A is a dense, symmetric 0/1 adjacency (N, N)
    of an undirected graph; a self-loop is added to every node (one already in A gets weight 2,
    as there). Â is symmetric with entries in [0, 1] and λ_pf(Â) = 1 (eigenvector D̃^{1/2} 1).
    """
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"A must be a square adjacency matrix (N, N) with N >= 1, got shape "
                         f"{A.shape}")
    if not np.all((A == 0) | (A == 1)):
        raise ValueError("A must hold only 0 and 1 (a dense 0/1 adjacency)")
    if not np.array_equal(A, A.T):
        raise ValueError("A must be symmetric (an undirected graph)")
    A_tilde = A.astype(np.float64) + np.eye(A.shape[0])          # (N, N)  A + I
    d_inv_sqrt = 1.0 / np.sqrt(A_tilde.sum(axis=1))              # (N,)    D̃^{-1/2}, D̃ ≥ 1
    return d_inv_sqrt[:, None] * A_tilde * d_inv_sqrt[None, :]


def pad_graphs(graphs, *, N: int | None = None, dtype: str = "float64",
               backend: Backend | None = None):
    """A batch from a list of graphs ``[(A_i, X_i), ...]``: A_i (N_i, N_i) a symmetric 0/1
    adjacency, X_i (p, N_i) the node features as columns (host arrays).

    Returns ``(A_hat, x, mask)`` on the backend: A_hat (n, N, N) with ``normalized_adjacency``
    (A_i) in its top-left block and 0 elsewhere (padding nodes isolated, no self-loop); x (n, p·N)
    with x_i = vec(X_i padded with zero columns), column-major (the cell's layout); mask (n, N),
    1 on the N_i real nodes and 0 on padding. N defaults to the largest N_i.
    """
    dtype = check_choice("dtype", dtype, DTYPES)
    be = check_backend(backend)
    if not isinstance(graphs, (list, tuple)) or len(graphs) < 1:
        raise ValueError(f"graphs must be a non-empty list of (A, X) pairs, got "
                         f"{type(graphs).__name__}")
    pairs = []
    for i, g in enumerate(graphs):
        if not isinstance(g, (list, tuple)) or len(g) != 2:
            raise ValueError(f"graphs[{i}] must be a pair (A, X), got {type(g).__name__}")
        A_hat_i = normalized_adjacency(g[0])
        X = np.asarray(g[1], dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != A_hat_i.shape[0]:
            raise ValueError(f"graphs[{i}] X must have shape (p, {A_hat_i.shape[0]}) (features "
                             f"as columns, one per node), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"graphs[{i}] X contains NaN or infinity")
        pairs.append((A_hat_i, X))
    p = pairs[0][1].shape[0]
    if p < 1 or any(X.shape[0] != p for _, X in pairs):
        raise ValueError(f"graphs must all have the same number p >= 1 of features (rows of X), "
                         f"got {[X.shape[0] for _, X in pairs]}")
    N_max = max(A.shape[0] for A, _ in pairs)
    N = N_max if N is None else check_int("N", N, minimum=N_max)
    n = len(pairs)
    A_hat = np.zeros((n, N, N))                                  # (n, N, N)
    Xt = np.zeros((n, N, p))                                     # (n, N, p)  X_iᵀ, padded
    mask = np.zeros((n, N))                                      # (n, N)
    for i, (A, X) in enumerate(pairs):
        k = A.shape[0]
        A_hat[i, :k, :k], Xt[i, :k, :], mask[i, :k] = A, X.T, 1.0
    x = Xt.reshape(n, N * p)                                     # (n, p·N)  vec(X_i) per row
    return be.asarray(A_hat, dtype), be.asarray(x, dtype), be.asarray(mask, dtype)


def perron_frobenius(A_hat) -> float:
    """λ_pf(|Â|), the largest over the batch: the spectral radius of the non-negative |Â_i|,
    which is its Perron–Frobenius eigenvalue (host NumPy, dense eigenvalues, small N)."""
    A = np.abs(np.asarray(to_numpy(A_hat), dtype=np.float64))            # (n, N, N)
    return float(max(np.max(np.abs(np.linalg.eigvals(A_i))) for A_i in A))


# ---------------------------------------------------------------- the ℓ1-ball projection
def project_l1_ball(V, radius: float):
    """Each row of V (r, c) projected onto {w : ‖w‖₁ ≤ radius} (Duchi et al. 2008, Fig. 1).

    A row already inside is returned unchanged. Otherwise, with u the row's |v| sorted in
    decreasing order and c_j = u_1 + … + u_j,

        ρ = max{ j : u_j − (c_j − radius)/j > 0 },   τ = (c_ρ − radius)/ρ,
        w = sign(v) ⊙ max(|v| − τ, 0),

    the closest point in Euclidean distance, with ‖w‖₁ = radius. On V's backend.
    """
    xp = require_arrays(V=V)
    check_shape("V", V, (None, None))
    radius = check_real("radius", radius, lo=0, lo_open=True)
    c = V.shape[1]
    u = xp.sort(xp.abs(V), axis=1, descending=True)                     # (r, c)
    cs = xp.cumulative_sum(u, axis=1)                                    # (r, c)  c_j
    j = xp.arange(1, c + 1, dtype=V.dtype)                               # (c,)
    cond = (u - (cs - radius) / j) > 0                                   # (r, c)  true, then false
    rho = xp.sum(xp.astype(cond, V.dtype), axis=1)                       # (r,)
    tau = xp.sum(xp.where(j == rho[:, None], (cs - radius) / j, 0.0), axis=1)   # (r,)  τ
    W = xp.sign(V) * xp.maximum(xp.abs(V) - tau[:, None], 0.0)          # (r, c)
    inside = xp.sum(xp.abs(V), axis=1) <= radius                         # (r,)
    return xp.where(inside[:, None], V, W)


# ---------------------------------------------------------------- helpers
def kron(A, B):
    """The Kronecker product per sample, A (n, r, c) ⊗ B (s, t) → (n, r·s, c·t) with
    [i·s + k, j·t + l] = A[i, j] B[k, l] (as numpy.kron; the Array API has no kron)."""
    xp = namespace(A=A, B=B)
    n, r, c = A.shape
    s, t = B.shape
    return xp.reshape(A[:, :, None, :, None] * B[None, None, :, None, :], (n, r * s, c * t))


def infinity_norm(W) -> float:
    """‖W‖∞ = max_a Σ_b |W[a, b]|, the largest row ℓ1 norm (host float)."""
    return float(np.max(np.sum(np.abs(to_numpy(W)), axis=1)))


def well_posed(cell: "GraphCell") -> float:
    """IGNN's sufficient well-posedness value ‖W‖∞ λ_pf(Â): the cell has a unique fixed point
    (with |σ′| ≤ 1) when it is < 1."""
    if not isinstance(cell, GraphCell):
        raise ValueError(f"cell must be a GraphCell, got {type(cell).__name__}")
    return infinity_norm(cell.W) * cell.lambda_pf


class GraphLinearization:
    """The graph cell's derivatives at one (h, x), products only (``deqref.cell.Linearization``);
    S = σ′(Z) computed once and shared. Everything is per sample on the transposes Hᵀ (n, N, m),
    Xᵀ (n, N, p), Sᵀ (n, N, m), so V ⊙ S is ``Vt * St``.

    Every VJP at v goes through one product with Â: with R = V ⊙ S and P = R Âᵀ,

        ∂F/∂h · v = vec(Wᵀ P),   ∂F/∂x · v = vec(Ωᵀ P),   ∂F/∂θ · v = {W: P Hᵀ, Ω: P Xᵀ}

    (R (H Â)ᵀ = R Âᵀ Hᵀ). P is kept with a copy of the last v asked, and reused while v holds the
    same values (an O(d) comparison against the O(d·N) product), so the VJPs in h, x and θ of
    one vector, as an estimator's last step or an unrolled reverse pass takes them, cost one
    product with Â together; a v changed in place since is seen and recomputed."""

    def __init__(self, cell: "GraphCell", Ht, Xt, St):
        self.cell, self.Ht, self.Xt, self.St = cell, Ht, Xt, St
        self._last = (None, None)                                        # (copy of v, Pᵀ)

    def Pt(self, v):
        """Pᵀ = Â (V ⊙ S)ᵀ per sample, P = (V ⊙ S) Âᵀ   # (n, N, m)"""
        c, xp = self.cell, self.cell.xp
        last = self._last[0]
        if last is None or last.shape != v.shape or not bool(xp.all(last == v)):
            self._last = (xp.asarray(v, copy=True), c.A_hat @ (c.nodes(v, c.m, "v") * self.St))
        return self._last[1]

    def vjp_h(self, v):
        """∂F/∂h · v = (Â ⊗ Wᵀ) (s ⊙ v) = vec(Wᵀ P); transposed, Pᵀ W   # (n, d)"""
        return self.cell.rows(self.Pt(v) @ self.cell.W)

    def vjp_x(self, v):
        """∂F/∂x · v = (Â ⊗ Ωᵀ) (s ⊙ v) = vec(Ωᵀ P); transposed, Pᵀ Ω   # (n, d_x)"""
        return self.cell.rows(self.Pt(v) @ self.cell.Omega)

    def vjp_theta(self, v) -> dict:
        """Σ over the batch of ∂F/∂θ · v: {W: Σ P Hᵀ, Omega: Σ P Xᵀ} (= Σ R (H Â)ᵀ, Σ R (X Â)ᵀ)."""
        c, xp = self.cell, self.cell.xp
        Pt = self.Pt(v)                                                  # (n, N, m)
        nN = Pt.shape[0] * Pt.shape[1]
        P = xp.reshape(Pt, (nN, c.m))                                    # all nodes of all graphs
        return {"W": P.T @ xp.reshape(self.Ht, (nN, c.m)),               # (m, m)
                "Omega": P.T @ xp.reshape(self.Xt, (nN, c.p))}           # (m, p)

    def jvp_h(self, u):
        """J_h u = s ⊙ vec(W U Â) = s ⊙ (Âᵀ ⊗ W) u; transposed, Sᵀ ⊙ (Âᵀ Uᵀ Wᵀ)   # (n, d)"""
        c = self.cell
        return c.rows(self.St * (c.A_hatT @ (c.nodes(u, c.m, "u") @ c.W.T)))


class GraphCell:
    """F(h, x; θ) = σ(W H Â + Ω X Â) per graph, rows vec column-major: the IGNN cell
    (``deqref.cell``; the module docstring gives the layout, padding and well-posedness).

    Parameters
    ----------
    W : (m, m) array        recurrent weight
    Omega : (m, p) array    input weight Ω
    A_hat : (n, N, N) array the normalized adjacencies of the batch's n graphs (fixed, not trained)
    activation : str        one of ``ACTIVATIONS`` (IGNN: "relu")
    mask : (n, N) array or None   1 on real nodes, 0 on padding nodes (None: all real); a
                            padding node must be isolated (its row and column of Â zero)
    """

    PARAMS = ("W", "Omega")

    def __init__(self, W, Omega, A_hat, activation: str = "tanh", mask=None):
        self.activation = check_activation(activation)
        require_arrays(W=W, Omega=Omega, A_hat=A_hat)
        namespace(W=W, mask=mask)
        check_shape("A_hat", A_hat, (None, None, None))
        n, N = A_hat.shape[0], A_hat.shape[1]
        check_shape("A_hat", A_hat, (n, N, N))
        if n < 1 or N < 1:
            raise ValueError(f"A_hat must hold at least one graph of at least one node, "
                             f"got shape {tuple(A_hat.shape)}")
        check_finite("A_hat", A_hat)
        xp = backend_of(A_hat).xp
        if mask is None:
            mask = xp.ones((n, N), dtype=A_hat.dtype)
        check_shape("mask", mask, (n, N))
        m_host, A_host = to_numpy(mask), np.abs(to_numpy(A_hat))
        if not np.all((m_host == 0) | (m_host == 1)):
            raise ValueError("mask must hold only 0 (padding node) and 1 (real node)")
        pad = m_host == 0                                                 # (n, N)
        if np.any(A_host.sum(axis=2)[pad] > 0) or np.any(A_host.sum(axis=1)[pad] > 0):
            raise ValueError("A_hat must have zero rows and columns at padding nodes (mask 0): "
                             "padding nodes are isolated")
        self.A_hat, self.A_hatT, self.mask = A_hat, xp.permute_dims(A_hat, (0, 2, 1)), mask
        self.n, self.N = n, N
        self._graph_cache = {}            # λ_pf and ‖Â_i‖₂, host; shared by cells on these graphs
        self._set_params(W, Omega)

    def _set_params(self, W, Omega):
        require_arrays(W=W, Omega=Omega, A_hat=self.A_hat)
        check_shape("W", W, (None, None))
        m = W.shape[0]
        check_shape("W", W, (m, m))
        check_shape("Omega", Omega, (m, None))
        if m < 1 or Omega.shape[1] < 1:
            raise ValueError(f"W and Omega must not be empty (m, p >= 1), got shapes "
                             f"{tuple(W.shape)} and {tuple(Omega.shape)}")
        check_finite("W", W)
        check_finite("Omega", Omega)
        self.W, self.Omega = W, Omega
        self.m, self.p = m, Omega.shape[1]
        self.d, self.d_x = m * self.N, self.p * self.N
        self.dtype = dtype_name(W)
        self.backend: Backend = backend_of(W)
        self.xp = self.backend.xp
        self._sigma, self._dsigma = ACTIVATIONS[self.activation]

    def _same_graphs(self, W, Omega) -> "GraphCell":
        """A cell on these graphs (validated once) with other parameters."""
        new = object.__new__(GraphCell)
        new.activation, new.A_hat, new.A_hatT, new.mask = (self.activation, self.A_hat,
                                                          self.A_hatT, self.mask)
        new.n, new.N, new._graph_cache = self.n, self.N, self._graph_cache
        new._set_params(W, Omega)
        return new

    # ------------------------------------------------------------ construction
    @classmethod
    def random(cls, m: int, p: int, A_hat, activation: str = "tanh", *, seed: int,
               kappa: float = 0.9, mask=None, dtype: str = "float64",
               backend: Backend | None = None) -> "GraphCell":
        """A seeded random cell on the graphs A_hat (n, N, N) with ‖W‖∞ λ_pf(Â) = kappa exactly.

        W has i.i.d. N(0, 1/m) entries, then is scaled to ‖W‖∞ = kappa/λ_pf (to kappa where
        λ_pf = 0); Ω has N(0, 1/p) entries. Draws come from ``numpy.random.default_rng(seed)``.
        """
        m, p = check_int("m", m, minimum=1), check_int("p", p, minimum=1)
        check_activation(activation)
        seed, dtype = check_seed(seed), check_choice("dtype", dtype, DTYPES)
        kappa = check_real("kappa", kappa, lo=0, hi=1, lo_open=True, hi_open=True)
        be = check_backend(backend)
        A_hat = be.asarray(to_numpy(A_hat), dtype)
        mask = None if mask is None else be.asarray(to_numpy(mask), dtype)
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((m, m)) / np.sqrt(m)
        Omega = rng.standard_normal((m, p)) / np.sqrt(p)
        lam = perron_frobenius(A_hat)
        W *= (kappa / lam if lam > 0 else kappa) / np.max(np.sum(np.abs(W), axis=1))
        return cls(be.asarray(W, dtype), be.asarray(Omega, dtype), A_hat, activation, mask)

    def on(self, A_hat, mask=None) -> "GraphCell":
        """The same θ and activation on another batch of graphs A_hat (n', N', N')."""
        return GraphCell(self.W, self.Omega, A_hat, self.activation, mask)

    @property
    def d_theta(self) -> int:
        return self.m * self.m + self.m * self.p

    @property
    def theta(self):
        """θ = [vec(W), vec(Ω)], each row-major: shape (d_θ,)."""
        xp = self.xp
        return xp.concat([xp.reshape(self.W, (-1,)), xp.reshape(self.Omega, (-1,))])

    def unflatten(self, theta) -> dict:
        """Split a flat (d_θ,) vector into ``{"W": (m, m), "Omega": (m, p)}``."""
        require_arrays(W=self.W, theta=theta)
        check_shape("theta", theta, (self.d_theta,))
        m, p, xp = self.m, self.p, self.xp
        return {"W": xp.reshape(theta[:m * m], (m, m)),
                "Omega": xp.reshape(theta[m * m:], (m, p))}

    def flatten(self, params: dict):
        """Inverse of ``unflatten``: ``{"W", "Omega"}`` to a (d_θ,) vector."""
        xp = self.xp
        return xp.concat([xp.reshape(params["W"], (-1,)), xp.reshape(params["Omega"], (-1,))])

    def with_theta(self, theta) -> "GraphCell":
        p = self.unflatten(theta)
        return self._same_graphs(p["W"], p["Omega"])

    def params(self) -> dict:
        return {"W": self.W, "Omega": self.Omega}

    def with_params(self, params: dict) -> "GraphCell":
        if not isinstance(params, dict) or set(params) != set(self.PARAMS):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"params must be a dict with the keys {self.PARAMS}, got {got}")
        return self._same_graphs(params["W"], params["Omega"])

    # ------------------------------------------------------------ well-posedness
    @property
    def lambda_pf(self) -> float:
        """λ_pf(|Â|), the largest over the batch's graphs (host, computed once per batch)."""
        if "lambda_pf" not in self._graph_cache:
            self._graph_cache["lambda_pf"] = perron_frobenius(self.A_hat)
        return self._graph_cache["lambda_pf"]

    def project(self, bound: float) -> "GraphCell":
        """W's rows projected onto the ℓ1 ball of radius bound/λ_pf (IGNN's projection), so that
        ‖W‖∞ λ_pf(Â) ≤ bound (well-posed for bound < 1); a W already there is returned unchanged."""
        bound = check_real("bound", bound, lo=0, lo_open=True)
        lam = self.lambda_pf
        if lam == 0:                      # Â nilpotent: F does not depend on h through a cycle
            return self
        return self._same_graphs(project_l1_ball(self.W, bound / lam), self.Omega)

    def vjp_sum(self, terms, scale: float = 1.0):
        """Σ_t scale · ∂F/∂θ|_{h_t} v_t and Σ_t scale · ∂F/∂x|_{h_t} v_t (``deqref.cell.vjp_sum``),
        over ``terms`` = [(GraphLinearization at h_t, v_t), ...] at one x.

        With P_t = (V_t ⊙ S_t) Âᵀ (``GraphLinearization.Pt``, kept from the reverse pass's
        VJP in h at v_t): W gets scale · Σ_t P_t H_tᵀ; only that term depends on h_t, so Ω's
        term scale · (Σ_t P_t) Xᵀ and x's term vec(Ωᵀ scale · Σ_t P_t) are taken once."""
        xp, m, p = self.xp, self.m, self.p
        grad_W = P_sum = None
        for lin, v in terms:
            Pt = scale * lin.Pt(v)                                       # (n, N, m)  P_tᵀ
            gW = xp.reshape(Pt, (-1, m)).T @ xp.reshape(lin.Ht, (-1, m))  # (m, m)
            grad_W = gW if grad_W is None else grad_W + gW
            P_sum = Pt if P_sum is None else P_sum + Pt
        grad_Omega = xp.reshape(P_sum, (-1, m)).T @ xp.reshape(terms[0][0].Xt, (-1, p))  # (m, p)
        return {"W": grad_W, "Omega": grad_Omega}, self.rows(P_sum @ self.Omega)

    def jacobian_norm_bound(self, h, x):
        """A host (n,) upper bound of ‖∂F/∂h‖₂ per sample: max over real nodes of |σ′| times
        ‖Âᵀ ⊗ W‖₂ = ‖W‖₂ ‖Â_i‖₂ (rows of padding nodes of ∂F/∂h are 0, so their σ′ is left out)."""
        if "A_norm" not in self._graph_cache:
            self._graph_cache["A_norm"] = np.linalg.norm(
                np.asarray(to_numpy(self.A_hat), dtype=np.float64), 2, axis=(1, 2))   # (n,)
        xp = self.xp
        St = self._dsigma(xp, self.preactivation(self.nodes(h, self.m, "h"), self.injection(x)))
        s = xp.max(xp.abs(St) * self.mask[:, :, None], axis=(1, 2))                    # (n,)
        w = float(np.linalg.norm(np.asarray(to_numpy(self.W), dtype=np.float64), 2))  # ‖W‖₂
        return np.asarray(to_numpy(s), dtype=np.float64) * w * self._graph_cache["A_norm"]

    def to_numpy(self) -> dict:
        return {"W": to_numpy(self.W), "Omega": to_numpy(self.Omega),
                "A_hat": to_numpy(self.A_hat), "mask": to_numpy(self.mask),
                "activation": self.activation}

    def __repr__(self):
        return (f"GraphCell(m={self.m}, p={self.p}, n={self.n}, N={self.N}, "
                f"activation={self.activation!r}, dtype={self.dtype}, backend={self.backend.name})")

    # ------------------------------------------------------------ rows and nodes
    def nodes(self, r, c: int, name: str = "h"):
        """A (n, c·N) row array, vec column-major, as the per-sample transposes (n, N, c)."""
        check_shape(name, r, (self.n, c * self.N))
        return self.xp.reshape(r, (self.n, self.N, c))

    def rows(self, t):
        """Per-sample transposes (n, N, c) back to rows (n, c·N), vec column-major."""
        return self.xp.reshape(t, (self.n, t.shape[1] * t.shape[2]))

    def check_inputs(self, x=NOT_GIVEN, **vectors):
        """Validate x (n, d_x) and named (n, d) arrays: shapes (n is the batch's number of
        graphs), one backend and one dtype shared with the cell; errors name the argument. A
        named array may be None (an optional argument left out)."""
        if x is NOT_GIVEN:
            x = None
        else:
            require_arrays(x=x)
        namespace(W=self.W, x=x, **vectors)
        if x is not None:
            check_shape("x", x, (self.n, self.d_x))
        for name, v in vectors.items():
            if v is not None:
                check_shape(name, v, (self.n, self.d))

    # ------------------------------------------------------------ the value
    def injection(self, x):
        """(Ω X)ᵀ = Xᵀ Ωᵀ per sample, the input's part of Z before Â   # (n, N, m)"""
        return self.nodes(x, self.p, "x") @ self.Omega.T

    def preactivation(self, Ht, C):
        """Zᵀ = Âᵀ (Hᵀ Wᵀ + C), C = Xᵀ Ωᵀ: Z = W H Â + Ω X Â = (W H + Ω X) Â, one product with
        Â per evaluation (the same everywhere, so every path gives the same bits)   # (n, N, m)"""
        return self.A_hatT @ (Ht @ self.W.T + C)

    def __call__(self, h, x):
        """F(h, x) = vec(σ(W H Â + Ω X Â)) per sample   # (n, d)"""
        Z = self.preactivation(self.nodes(h, self.m, "h"), self.injection(x))
        return self.rows(self._sigma(self.xp, Z))

    def bind(self, x):
        """F(·, x) as a function of h alone, the input term Ω X computed once."""
        C = self.injection(x)                                            # (n, N, m)
        sigma, xp = self._sigma, self.xp

        def F(h):
            return self.rows(sigma(xp, self.preactivation(self.nodes(h, self.m, "h"), C)))
        return F

    def bind_linear(self, x):
        """h ↦ (F(h, x), its ``GraphLinearization``) from one pre-activation, Ω X once."""
        C = self.injection(x)                                            # (n, N, m)
        Xt = self.nodes(x, self.p, "x")                                          # (n, N, p)
        sigma, dsigma, xp = self._sigma, self._dsigma, self.xp

        def value_and_linearization(h):
            Ht = self.nodes(h, self.m, "h")
            Z = self.preactivation(Ht, C)                                # (n, N, m)
            return self.rows(sigma(xp, Z)), GraphLinearization(self, Ht, Xt, dsigma(xp, Z))
        return value_and_linearization

    def linearize(self, h, x) -> GraphLinearization:
        """F's derivatives at (h, x) as products: S = σ′(Z) once, shared."""
        Ht = self.nodes(h, self.m, "h")
        St = self._dsigma(self.xp, self.preactivation(Ht, self.injection(x)))
        return GraphLinearization(self, Ht, self.nodes(x, self.p, "x"), St)

    def sigma_prime(self, h, x):
        """s = vec(σ′(Z)) per sample   # (n, d)"""
        return self.rows(self._dsigma(self.xp, self.preactivation(self.nodes(h, self.m, "h"),
                                                                   self.injection(x))))

    # ------------------------------------------------------------ dense Jacobians (matrix form)
    def jacobian_h(self, h, x):
        """Standard layout ∂vec F/∂vec H = diag(s) (Âᵀ ⊗ W), per sample   # (n, d, d)"""
        s = self.sigma_prime(h, x)                                       # (n, d)
        return s[:, :, None] * kron(self.A_hatT, self.W)                 # (n, d, d)

    def dF_dh(self, h, x):
        """Paper's layout ∂F/∂h = (Â ⊗ Wᵀ) diag(s) = J_hᵀ: [j, i] = ∂F_i/∂h_j   # (n, d, d)"""
        return self.xp.permute_dims(self.jacobian_h(h, x), (0, 2, 1))

    def dF_dx(self, h, x):
        """Paper's layout ∂F/∂x = (diag(s) (Âᵀ ⊗ Ω))ᵀ: [q, i] = ∂F_i/∂x_q   # (n, d_x, d)"""
        s = self.sigma_prime(h, x)                                       # (n, d)
        return self.xp.permute_dims(s[:, :, None] * kron(self.A_hatT, self.Omega), (0, 2, 1))

    def dF_dtheta(self, h, x):
        """Paper's layout ∂F/∂θ = J_θᵀ, per sample   # (n, d_θ, d)

        Rows follow θ = [vec(W), vec(Ω)] (row-major); the state index (j, a) is j·m + a. With
        Z = W H Â + Ω X Â: ∂F_(j,a)/∂W[c, b] = s_(j,a) δ_ac (H Â)[b, j] and
        ∂F_(j,a)/∂Ω[c, q] = s_(j,a) δ_ac (X Â)[q, j].
        """
        xp = self.xp
        n, m, p, d = self.n, self.m, self.p, self.d
        s = self.sigma_prime(h, x)                                       # (n, d)
        HAt = self.A_hatT @ self.nodes(h, m, "h")                        # (n, N, m)  [j, b] = (H Â)[b, j]
        XAt = self.A_hatT @ self.nodes(x, p, "x")                        # (n, N, p)  [j, q] = (X Â)[q, j]
        eye = xp.eye(m, dtype=h.dtype)                                   # (m, m)  δ_ac
        JW = HAt[:, :, None, None, :] * eye[None, None, :, :, None]      # (n, j, a, c, b)
        JO = XAt[:, :, None, None, :] * eye[None, None, :, :, None]      # (n, j, a, c, q)
        J = xp.concat([xp.reshape(JW, (n, d, m * m)), xp.reshape(JO, (n, d, m * p))], axis=2)
        return xp.permute_dims(s[:, :, None] * J, (0, 2, 1))            # (n, d_θ, d)
