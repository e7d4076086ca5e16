"""The graph read-outs (deqref.graph_heads) against independent oracles: per-node and per-graph
loops over H = vec⁻¹(h) written with NumPy's own column-major reshape, scipy's logsumexp for the
loss, and central finite differences for every gradient."""
import numpy as np
import pytest
from scipy.special import logsumexp

from deqref.graph_heads import GraphHead, NodeHead, masked_cross_entropy
from deqref.heads import cross_entropy

from conftest import host

n, N, m, q = 3, 5, 4, 3
# real nodes per graph: 5, 3, 1 (graph 2 has a single node, graph 1 two padded ones)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)


def H_of(h):
    """Oracle of the layout: H_g (m × N) with h_g = vec(H_g) column by column."""
    return [np.reshape(host(h)[g], (m, N), order="F") for g in range(h.shape[0])]


@pytest.fixture
def setup(arr, be):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, m * N))
    V, c = rng.standard_normal((q, m)), rng.standard_normal(q)
    labels = rng.integers(0, q, size=(n, N))
    labelled = rng.random((n, N)) < 0.5
    labelled[0, 0] = True
    return dict(h=h, V=V, c=c, labels=labels, labelled=labelled, mask=be.from_host(MASK))


def test_node_head_is_V_H_plus_c_per_node(setup, arr):
    s = setup
    head = NodeHead(arr(s["V"]), arr(s["c"]))
    Y = host(head(arr(s["h"])))                                      # (n, N, q)
    for g, H in enumerate(H_of(arr(s["h"]))):
        for j in range(N):
            np.testing.assert_allclose(Y[g, j], s["V"] @ H[:, j] + s["c"], rtol=1e-13, atol=1e-13)


def test_graph_head_pools_real_nodes_only(setup, arr):
    s = setup
    head = GraphHead(arr(s["V"]), arr(s["c"]), s["mask"])
    Y = host(head(arr(s["h"])))                                      # (n, q)
    for g, H in enumerate(H_of(arr(s["h"]))):
        z = np.mean(H[:, MASK[g]], axis=1)                           # mean over the real nodes
        np.testing.assert_allclose(Y[g], s["V"] @ z + s["c"], rtol=1e-13, atol=1e-13)
    # padded node states do not matter: overwrite them with large values
    h2 = np.reshape(s["h"].copy(), (n, N, m))
    h2[~MASK] = 1e3
    np.testing.assert_array_equal(host(head(arr(np.reshape(h2, (n, N * m))))), Y)
    # the cell's own mask, 0/1 in its float dtype, reads the same
    np.testing.assert_array_equal(host(GraphHead(arr(s["V"]), arr(s["c"]), arr(MASK * 1.0))(arr(s["h"]))), Y)


def test_masked_cross_entropy_against_logsumexp(setup, arr, be):
    s = setup
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((n, N, q)) * 3
    L, dL = masked_cross_entropy(arr(logits), be.from_host(s["labels"]), be.from_host(s["labelled"]))
    lab = s["labelled"]
    terms = logsumexp(logits, axis=2) - np.take_along_axis(logits, s["labels"][:, :, None], 2)[:, :, 0]
    assert L == pytest.approx(terms[lab].mean(), rel=1e-13)
    assert np.all(host(dL)[~lab] == 0.0)                              # unlabelled nodes: no gradient
    # the labelled nodes' rows are cross_entropy's gradient on those nodes, rescaled by the count
    _, d_rows = cross_entropy(arr(logits[lab]), be.from_host(s["labels"][lab]))
    np.testing.assert_allclose(host(dL)[lab], host(d_rows), rtol=1e-13, atol=1e-16)


def _fd(f, x, step=1e-6):
    """Central differences of the scalar f at x (a NumPy array), entry by entry."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = step
        g[i] = (f(x + e) - f(x - e)) / (2 * step)
    return g


# float64 central differences with step 1e-6: truncation ~ step² · |L'''| ≈ 1e-12, rounding
# ~ eps · |L| / step ≈ 1e-10; the gradients are O(0.1), so 1e-7 absolute leaves a 1000x margin
# and still catches a wrong factor or a transposed layout (errors O(0.01) and up)
FD_ATOL = 1e-7


@pytest.mark.parametrize("kind", ["node", "graph"])
def test_backward_against_finite_differences(setup, arr, be, kind):
    s = setup
    labels, labelled = be.from_host(s["labels"]), be.from_host(s["labelled"])
    y = be.from_host(s["labels"][:, 0])

    def make(V, c):
        return NodeHead(arr(V), arr(c)) if kind == "node" else GraphHead(arr(V), arr(c), s["mask"])

    def loss(head, h):
        out = head(arr(h))
        return masked_cross_entropy(out, labels, labelled) if kind == "node" else cross_entropy(out, y)

    head = make(s["V"], s["c"])
    _, dy = loss(head, s["h"])
    dh, grads = head.backward(arr(s["h"]), dy)
    assert tuple(dh.shape) == (n, m * N)
    np.testing.assert_allclose(host(dh), _fd(lambda h: loss(head, h)[0], s["h"]), atol=FD_ATOL)
    np.testing.assert_allclose(host(grads["V"]), _fd(lambda V: loss(make(V, s["c"]), s["h"])[0], s["V"]),
                               atol=FD_ATOL)
    np.testing.assert_allclose(host(grads["c"]), _fd(lambda c: loss(make(s["V"], c), s["h"])[0], s["c"]),
                               atol=FD_ATOL)
    if kind == "graph":                                              # no gradient to padded nodes
        assert np.all(np.reshape(host(dh), (n, N, m))[~MASK] == 0.0)


def test_on_and_with_params_keep_the_rest(setup, arr, be):
    s = setup
    head = GraphHead(arr(s["V"]), arr(s["c"]), s["mask"])
    other = be.from_host(np.ones((2, N), dtype=bool))
    moved = head.on(other)
    assert moved.V is head.V and moved.mask is other
    assert head.with_params({"V": arr(2 * s["V"]), "c": arr(s["c"])}).mask is head.mask


def test_bad_input_names_the_argument(setup, arr, be):
    s = setup
    V, c = arr(s["V"]), arr(s["c"])
    with pytest.raises(ValueError, match="^c must have shape"):
        NodeHead(V, arr(np.zeros(q + 1)))
    with pytest.raises(ValueError, match="^h must have shape"):
        NodeHead(V, c)(arr(np.zeros((n, m * N + 1))))
    with pytest.raises(ValueError, match="^h contains NaN"):
        NodeHead(V, c)(arr(np.full((n, m * N), np.nan)))
    with pytest.raises(ValueError, match="^mask must mark at least one real node"):
        GraphHead(V, c, be.from_host(np.zeros((n, N), dtype=bool)))
    with pytest.raises(ValueError, match="^mask must be a"):
        GraphHead(V, c, arr(np.ones(n)))
    with pytest.raises(TypeError, match="^mask"):
        GraphHead(V, c, [[True] * N] * n)                             # not an array
    with pytest.raises(ValueError, match="^logits must hold at least one"):
        masked_cross_entropy(arr(np.zeros((n, 0, q))), be.from_host(np.zeros((n, 0), dtype=np.int64)),
                             be.from_host(np.zeros((n, 0), dtype=bool)))
    with pytest.raises(ValueError, match="^mask must hold only 0"):
        GraphHead(V, c, arr(np.full((n, N), 0.5)))
    with pytest.raises(ValueError, match="^dL_dy must have shape"):
        NodeHead(V, c).backward(arr(s["h"]), arr(np.zeros((n, q))))
    with pytest.raises(ValueError, match="^labelled must mark at least one node"):
        masked_cross_entropy(arr(np.zeros((n, N, q))), be.from_host(s["labels"]),
                             be.from_host(np.zeros((n, N), dtype=bool)))
    with pytest.raises(ValueError, match="^labels must lie in"):
        masked_cross_entropy(arr(np.zeros((n, N, q))), be.from_host(s["labels"] + q),
                             be.from_host(s["labelled"]))
