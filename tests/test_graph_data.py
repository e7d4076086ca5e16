"""The graph data sets (deqref.graph_data) against networkx's own reading of the same graphs:
degrees, assortativity, the karate club's factions; the layouts against NumPy's column-major
reshape; splits and seeds by counting."""
import networkx as nx
import numpy as np
import pytest

from deqref.graph_data import DEGREE_BUCKETS, degree_mixing, karate, resplit


def _graph(data, g):
    """networkx graph of graph g's real nodes (the oracle reads the padded arrays back)."""
    real = data.mask[g]
    return nx.from_numpy_array(data.A[g][np.ix_(real, real)])


@pytest.fixture(scope="module")
def mixing():
    return degree_mixing(3, n_pairs=24, nodes=(10, 20), test_fraction=0.25)


def test_karate_is_the_club():
    d = karate(0)
    G = nx.karate_club_graph()
    assert (d.n, d.N, d.p, d.q, d.task) == (1, 34, 34, 2, "node")
    edges = lambda g: {frozenset(e) for e in g.edges()}              # noqa: E731
    assert edges(_graph(d, 0)) == edges(G) and len(edges(G)) == 78    # same edges, unweighted
    assert np.all(d.A[0] == d.A[0].T) and np.all(np.diag(d.A[0]) == 0)
    assert set(np.unique(d.A)) == {0.0, 1.0}
    clubs = nx.get_node_attributes(G, "club")
    assert [("Mr. Hi", "Officer")[c] for c in d.y[0]] == [clubs[i] for i in range(34)]
    np.testing.assert_array_equal(d.X[0], np.eye(34))                 # identity one-hot features


def test_karate_split_is_stratified_and_seeded():
    a, b, c = karate(0), karate(0), karate(1)
    assert np.array_equal(a.train, b.train)                           # same seed, same split
    assert not np.array_equal(a.train, c.train)
    for d in (a, c):
        assert not np.any(d.train & d.test) and np.all(d.train | d.test)
        for cls in (0, 1):                                            # 17 members each: 8 labelled
            members = d.y[0] == cls
            assert members.sum() == 17 and (d.train[0] & members).sum() == round(0.5 * 17)
    assert karate(0, train_fraction=0.25).train.sum() == 2 * round(0.25 * 17)


def test_x_is_vec_of_X_column_by_column(mixing):
    """x_g = vec(X_g) for X_g = features (p × N) column by column (Fortran order)."""
    for g in (0, 5):
        np.testing.assert_array_equal(mixing.x[g], np.reshape(mixing.X[g].T, -1, order="F"))


def test_twins_share_nodes_and_degrees_but_not_mixing(mixing):
    d = mixing
    assert (d.n, d.N, d.p, d.task) == (48, 20, DEGREE_BUCKETS, "graph")
    np.testing.assert_array_equal(d.y, np.tile([0, 1], 24))
    for i in range(24):
        g0, g1 = _graph(d, 2 * i), _graph(d, 2 * i + 1)
        assert 10 <= g0.number_of_nodes() == g1.number_of_nodes() <= 20
        deg0 = np.array([g0.degree(v) for v in range(g0.number_of_nodes())])
        deg1 = np.array([g1.degree(v) for v in range(g1.number_of_nodes())])
        np.testing.assert_array_equal(deg0, deg1)                     # node by node
        # the features are the degree buckets, so a pooled model sees the same multiset
        np.testing.assert_array_equal(d.X[2 * i][d.mask[2 * i]], np.eye(DEGREE_BUCKETS)[np.minimum(deg0, 8)])
        np.testing.assert_array_equal(d.X[2 * i], d.X[2 * i + 1])
        # the label is the mixing: networkx's assortativity coefficient is larger in class 1
        assert nx.degree_assortativity_coefficient(g1) > nx.degree_assortativity_coefficient(g0)
    assert np.all(d.A == np.transpose(d.A, (0, 2, 1)))
    assert np.all(d.A[:, np.arange(20), np.arange(20)] == 0)
    assert np.all(d.A[~d.mask] == 0) and np.all(d.X[~d.mask] == 0)   # padding is zero


def test_splits_keep_twins_together(mixing):
    for d in (mixing, resplit(mixing, 7)):
        train, test = set(d.train.tolist()), set(d.test.tolist())
        assert not train & test and train | test == set(range(48))
        assert len(test) == 2 * round(0.25 * 24)
        assert all((g ^ 1) in test for g in test)                     # 2i and 2i + 1 together
    r = resplit(mixing, 7)
    assert r.A is mixing.A and not np.array_equal(r.test, mixing.test)


def test_same_seed_same_bits(mixing):
    again = degree_mixing(3, n_pairs=24, nodes=(10, 20), test_fraction=0.25)
    for field in ("A", "X", "mask", "y", "train", "test"):
        a, b = getattr(mixing, field), getattr(again, field)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
    other = degree_mixing(4, n_pairs=24, nodes=(10, 20), test_fraction=0.25)
    assert not np.array_equal(other.A, mixing.A)


def test_bad_arguments_name_the_argument(mixing):
    with pytest.raises(ValueError, match="^train_fraction"):
        karate(0, train_fraction=1.0)
    with pytest.raises(ValueError, match="^train_fraction=0.01 leaves faction"):
        karate(0, train_fraction=0.01)
    with pytest.raises(ValueError, match="^seed"):
        karate(-1)
    with pytest.raises(ValueError, match="^n_pairs"):
        degree_mixing(0, n_pairs=1)
    with pytest.raises(ValueError, match="^nodes"):
        degree_mixing(0, n_pairs=4, nodes=(20, 10))
    with pytest.raises(ValueError, match="^test_fraction"):
        degree_mixing(0, n_pairs=4, test_fraction=0.01)
    with pytest.raises(ValueError, match="^data must be a graph-classification set"):
        resplit(karate(0), 1)
