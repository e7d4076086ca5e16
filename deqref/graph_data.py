"""Graph data sets for the IGNN experiment, generated or shipped locally and seeded.

IGNN (Gu et al., 2020) and Table 4 of Geng et al. train on COX2 and PROTEINS (graph
classification: a few hundred molecule or protein graphs, tens of nodes, two classes) and PPI
(node classification). deqref ships no download, so it uses:

- ``karate``: **node classification** on Zachary's karate club, the real 34-node social network
  that ships inside networkx (``networkx.karate_club_graph()``); each member's label is the
  faction ("club") it joined after the split, 0 = "Mr. Hi", 1 = "Officer". The graph has no node
  features, so every node gets its **identity one-hot** feature (X = I, p = 34), as GCN and IGNN
  do for featureless graphs: the input weight Ω then learns one column per node, and a test
  node's prediction comes from its own column and, through Â, its neighbours'. Degree features
  would give every node of one degree the same input, and this graph's two leaders (degrees 16
  and 17) would be the only ones told apart. The labelled (training) nodes are a seeded
  stratified fraction of each faction; the rest are the test nodes.
- ``degree_mixing``: **graph classification**, a seeded synthetic stand-in for COX2 / PROTEINS
  built so that the label needs message passing. Graphs come in twins: a Barabási–Albert graph
  of 10–30 nodes (m = 2: hubs and leaves) is rewired twice with degree-preserving edge swaps
  (Xulvi-Brunet and Sokolov, 2004) — towards assortative mixing (hubs joined to hubs, class 1)
  and towards disassortative mixing (hubs joined to leaves, class 0). Twins have the same nodes
  and the same degree sequence, so their node counts, edge counts and multisets of node
  features (one-hot degree buckets 0, …, 7, ≥ 8) are identical: any model that pools node
  features without passing messages gives both twins the same output and is right on exactly
  one graph of each pair (50 %). One round of message passing sees the neighbours' degrees,
  which is where the classes differ. A pair is redrawn until the twins differ (Σ over edges of
  deg(u)·deg(v) is strictly larger in the assortative twin). Train and test splits keep twins
  together, so no test graph has its twin in training.

A ``GraphSet`` holds n graphs padded to N nodes as host NumPy arrays; ``GraphSet.x`` gives the
cells' input rows x (n, p·N), vec(X) column by column (X is p × N, so x.reshape(n, N, p) holds
the nodes' features one node per row). Everything random comes from
``numpy.random.default_rng(seed)``: the same seed gives the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .backend import check_seed
from .checks import check_int, check_real

KARATE_CLUBS = ("Mr. Hi", "Officer")          # label 0, label 1
DEGREE_BUCKETS = 9                             # one-hot of min(degree, 8): degrees 0, …, 7, ≥ 8
BA_M = 2                                       # Barabási–Albert edges per new node
SWAPS_PER_EDGE = 10                            # rewiring attempts per edge


@dataclass(frozen=True)
class GraphSet:
    """n graphs padded to N nodes, host NumPy arrays.

    A     (n, N, N) float64, 0/1, symmetric, no self-loops, zero rows and columns for padding
    X     (n, N, p) float64, row j = node j's features, zero for padding
    mask  (n, N) bool, the real nodes
    y     "graph" task: (n,) int64 labels; "node" task: (n, N) int64 labels (0 for padding)
    train, test
          "graph" task: int64 indices of graphs; "node" task: (n, N) bool masks of nodes
    q     number of classes
    """

    name: str
    task: str
    A: np.ndarray
    X: np.ndarray
    mask: np.ndarray
    y: np.ndarray
    train: np.ndarray
    test: np.ndarray
    q: int
    info: dict

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def N(self) -> int:
        return self.A.shape[1]

    @property
    def p(self) -> int:
        return self.X.shape[2]

    @property
    def x(self) -> np.ndarray:
        """The cells' input rows: vec(X_(p×N)) column by column   # (n, p·N)"""
        return self.X.reshape(self.n, self.N * self.p)


# ---------------------------------------------------------------- node classification
def karate(seed: int = 0, *, train_fraction: float = 0.5) -> GraphSet:
    """Zachary's karate club: one graph, 34 nodes, 78 edges (unweighted), identity features,
    labels = faction; a seeded stratified ``train_fraction`` of each faction is labelled."""
    seed = check_seed(seed)
    train_fraction = check_real("train_fraction", train_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
    G = nx.karate_club_graph()
    N = G.number_of_nodes()
    A = nx.to_numpy_array(G, nodelist=range(N), weight=None)              # (N, N) 0/1
    y = np.array([KARATE_CLUBS.index(G.nodes[i]["club"]) for i in range(N)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train = np.zeros(N, dtype=bool)
    for c in range(len(KARATE_CLUBS)):
        members = np.flatnonzero(y == c)
        k = int(round(train_fraction * members.size))
        if not 1 <= k <= members.size - 1:
            raise ValueError(f"train_fraction={train_fraction:g} leaves faction {c} "
                             f"({members.size} nodes) without a training or a test node")
        train[rng.permutation(members)[:k]] = True
    return GraphSet(name="karate", task="node", A=A[None], X=np.eye(N)[None],
                    mask=np.ones((1, N), dtype=bool), y=y[None], train=train[None],
                    test=~train[None], q=2,
                    info={"source": "networkx.karate_club_graph()", "features": "identity one-hot",
                          "labels": dict(enumerate(KARATE_CLUBS)), "train_fraction": train_fraction,
                          "seed": seed})


# ---------------------------------------------------------------- graph classification
def _edge_key(u: int, v: int) -> tuple:
    return (u, v) if u < v else (v, u)


def rewire(edges: list, degree: np.ndarray, assortative: bool, attempts: int,
           rng: np.random.Generator) -> list:
    """Degree-preserving rewiring towards (dis)assortative mixing (Xulvi-Brunet and Sokolov,
    2004), ``attempts`` times: pick two edges at random (an attempt whose two edges share an end is
    skipped), order their four ends by degree (ties at random);
    assortative joins the two largest and the two smallest, disassortative the largest with the
    smallest and the middle two. A swap that would duplicate an edge is skipped."""
    edges = [_edge_key(u, v) for u, v in edges]
    present = set(edges)
    picks = rng.integers(0, len(edges), size=(attempts, 2))         # the two edges of each attempt
    ties = rng.random((attempts, 4))                                # tie-breaks among equal degrees
    for (i, j), tie in zip(picks.tolist(), ties.tolist()):
        ends = [*edges[i], *edges[j]]
        if len(set(ends)) < 4:                                      # also i == j
            continue
        a, b, c, d = (ends[k] for k in sorted(range(4), key=lambda k: (degree[ends[k]], tie[k]), reverse=True))
        new = [_edge_key(a, b), _edge_key(c, d)] if assortative else [_edge_key(a, d), _edge_key(b, c)]
        if new[0] in present or new[1] in present:
            continue
        present.difference_update((edges[i], edges[j]))
        present.update(new)
        edges[i], edges[j] = new
    return edges


def mixing(edges: list, degree: np.ndarray) -> int:
    """Σ over edges of deg(u)·deg(v): for a fixed degree sequence, the degree assortativity
    coefficient is an increasing function of it."""
    return int(sum(int(degree[u]) * int(degree[v]) for u, v in edges))


def degree_features(degree: np.ndarray, p: int = DEGREE_BUCKETS) -> np.ndarray:
    """One-hot of min(degree, p − 1) per node   # (N, p)"""
    return np.eye(p)[np.minimum(degree, p - 1)]


def _twins(N: int, rng: np.random.Generator) -> tuple:
    """Edges of a BA graph rewired disassortatively and assortatively, until they differ."""
    while True:
        G = nx.barabasi_albert_graph(N, BA_M, seed=int(rng.integers(2**31)))
        edges = list(G.edges())
        degree = np.array([G.degree(v) for v in range(N)])
        attempts = SWAPS_PER_EDGE * len(edges)
        dis = rewire(edges, degree, False, attempts, rng)
        ass = rewire(edges, degree, True, attempts, rng)
        if mixing(ass, degree) > mixing(dis, degree):
            return degree, dis, ass


def degree_mixing(seed: int = 0, *, n_pairs: int = 150, nodes: tuple = (10, 30),
                  test_fraction: float = 0.2) -> GraphSet:
    """2·``n_pairs`` graphs, twins (graph 2i: disassortative, label 0; 2i + 1: assortative,
    label 1) of ``nodes`` = (min, max) nodes each, one-hot degree features; a seeded split of the
    pairs, ``test_fraction`` of them to test (see the module docstring)."""
    seed = check_seed(seed)
    n_pairs = check_int("n_pairs", n_pairs, minimum=2)
    if (not isinstance(nodes, tuple) or len(nodes) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in nodes)
            or not BA_M + 2 <= nodes[0] <= nodes[1]):
        raise ValueError(f"nodes must be a tuple (min, max) of integers with {BA_M + 2} <= min <= max, "
                         f"got {nodes!r}")
    test_fraction = check_real("test_fraction", test_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
    n_test = int(round(test_fraction * n_pairs))
    if not 1 <= n_test <= n_pairs - 1:
        raise ValueError(f"test_fraction={test_fraction:g} of n_pairs={n_pairs} leaves an empty split")
    rng = np.random.default_rng(seed)
    N = nodes[1]
    A = np.zeros((2 * n_pairs, N, N))
    X = np.zeros((2 * n_pairs, N, DEGREE_BUCKETS))
    mask = np.zeros((2 * n_pairs, N), dtype=bool)
    for i in range(n_pairs):
        n_i = int(rng.integers(nodes[0], nodes[1] + 1))
        degree, dis, ass = _twins(n_i, rng)
        for g, edges in ((2 * i, dis), (2 * i + 1, ass)):
            u, v = np.array(edges).T
            A[g, u, v] = A[g, v, u] = 1.0
            X[g, :n_i] = degree_features(degree)
            mask[g, :n_i] = True
    y = np.tile(np.array([0, 1], dtype=np.int64), n_pairs)
    test_pairs = np.sort(rng.permutation(n_pairs)[:n_test])
    is_test = np.zeros(n_pairs, dtype=bool)
    is_test[test_pairs] = True
    pairs = np.repeat(np.arange(n_pairs), 2)                    # graph -> its pair
    return GraphSet(name="degree_mixing", task="graph", A=A, X=X, mask=mask, y=y,
                    train=np.flatnonzero(~is_test[pairs]), test=np.flatnonzero(is_test[pairs]), q=2,
                    info={"source": "Barabási–Albert (m = 2) twins, degree-preserving rewiring",
                          "features": f"one-hot degree buckets 0..{DEGREE_BUCKETS - 2}, >= {DEGREE_BUCKETS - 1}",
                          "labels": {0: "disassortative", 1: "assortative"}, "n_pairs": n_pairs,
                          "nodes": list(nodes), "test_fraction": test_fraction, "seed": seed})


def resplit(data: GraphSet, seed: int) -> GraphSet:
    """The same twins with a new seeded split of the pairs (as many test pairs as before), as a
    fold of cross-validation. (The node task's split is ``karate(seed)``.)"""
    from dataclasses import replace
    seed = check_seed(seed)
    if data.task != "graph":
        raise ValueError(f"data must be a graph-classification set (task 'graph'), got task {data.task!r}")
    n_pairs, n_test = data.n // 2, data.test.size // 2
    is_test = np.zeros(n_pairs, dtype=bool)
    is_test[np.random.default_rng(seed).permutation(n_pairs)[:n_test]] = True
    pairs = np.repeat(np.arange(n_pairs), 2)                    # graph -> its pair
    return replace(data, train=np.flatnonzero(~is_test[pairs]), test=np.flatnonzero(is_test[pairs]))
