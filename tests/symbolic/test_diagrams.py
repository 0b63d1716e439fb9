"""Diagram enumeration against independent brute force (networkx isomorphism)."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest

from perturb.symbolic.diagrams import (
    Diagram,
    count_rooted_trees,
    diagrams,
    rooted_trees,
    set_partitions,
)

A000081 = [1, 1, 2, 4, 9, 20, 48, 115]


def _rooted_graph(parents, parts=None):
    g = nx.Graph()
    for v in range(len(parents)):
        g.add_node(("v", v), kind="root" if v == 0 else "node")
    for v, p in enumerate(parents):
        if p >= 0:
            g.add_edge(("v", v), ("v", p), kind="tree")
    for i, part in enumerate(parts or []):
        g.add_node(("p", i), kind="part")
        for v in part:
            g.add_edge(("p", i), ("v", v), kind="member")
    return g


def _match(a, b):
    return a["kind"] == b["kind"]


def _classes(graphs):
    reps = []
    for g in graphs:
        if not any(nx.is_isomorphic(g, r, node_match=_match, edge_match=_match) for r in reps):
            reps.append(g)
    return reps


def _all_labelled_trees(n):
    """Every recursive labelling parents[v] < v: covers every rooted tree shape."""
    for choice in itertools.product(*[range(v) for v in range(1, n)]):
        yield (-1, *choice)


def test_rooted_tree_counts_match_oeis():
    assert [count_rooted_trees(n) for n in range(1, 9)] == A000081


@pytest.mark.parametrize("n", range(1, 7))
def test_rooted_trees_are_exactly_the_isomorphism_classes(n):
    brute = _classes(_rooted_graph(p) for p in _all_labelled_trees(n))
    ours = [_rooted_graph(p) for p in rooted_trees(n)]
    assert len(brute) == len(ours) == A000081[n - 1]
    assert len(_classes(ours)) == len(ours)  # pairwise non-isomorphic


@pytest.mark.parametrize("n", range(1, 8))
def test_tree_automorphisms_match_graph_matcher(n):
    for parents in rooted_trees(n):
        g = _rooted_graph(parents)
        matcher = nx.algorithms.isomorphism.GraphMatcher(g, g, node_match=_match)
        brute = sum(1 for _ in matcher.isomorphisms_iter())
        d = Diagram(parents=parents, parts=tuple((v,) for v in range(n)))
        assert d.tree_automorphisms == brute


def _brute_diagram_count(order, quantity, path_condition):
    graphs = []
    for parents in _all_labelled_trees(order + 1):
        if quantity == "displacement" and (order == 0 or parents.count(0) != 1):
            continue
        movable = list(range(1, order + 1)) if quantity != "train" else list(range(order + 1))
        for partition in set_partitions(movable):
            parts = [list(b) for b in partition]
            if quantity != "train":
                parts.append([0])
            if path_condition:
                d = Diagram(parents=parents, parts=tuple(tuple(sorted(b)) for b in parts))
                if not d.satisfies_path_condition():
                    continue
            graphs.append(_rooted_graph(parents, parts))
    return len(_classes(graphs))


@pytest.mark.parametrize("order", range(0, 4))
@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
@pytest.mark.parametrize("path_condition", [True, False])
def test_diagram_counts_match_brute_force(order, quantity, path_condition):
    ours = diagrams(order, quantity=quantity, path_condition=path_condition)
    assert len(ours) == _brute_diagram_count(order, quantity, path_condition)


def test_known_diagram_counts():
    # order 2, test: chain G-H-G, cherry with split leaves, cherry with tied leaves
    assert [len(diagrams(d)) for d in range(5)] == [1, 1, 3, 9, 37]


@pytest.mark.parametrize("order", range(0, 5))
def test_orbit_stabilizer(order):
    """Σ_D 1/|Aut(D)| = Σ_trees (#partitions)/|Aut(tree)| (each class counted by its orbit)."""
    lhs = sum(1 / d.automorphisms for d in diagrams(order))
    rhs = 0.0
    for parents in rooted_trees(order + 1):
        labelled = diagrams(order, up_to_isomorphism=False)
        mine = [d for d in labelled if d.parents == parents]
        rhs += len(mine) / mine[0].tree_automorphisms
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_path_condition():
    chain_tied = Diagram(parents=(-1, 0, 1), parts=((0,), (1, 2)))
    cherry_tied = Diagram(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    train_root_tied = Diagram(parents=(-1, 0, 1), parts=((0, 2), (1,)))
    assert not chain_tied.satisfies_path_condition()
    assert cherry_tied.satisfies_path_condition()
    assert train_root_tied.satisfies_path_condition()  # the train root is not an update


def test_set_partitions_are_bell_many():
    assert [sum(1 for _ in set_partitions(range(n))) for n in range(7)] == [
        1,
        1,
        2,
        5,
        15,
        52,
        203,
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(parents=(0, 0), parts=((0, 1),)), "parents\\[0\\] must be -1"),
        (dict(parents=(-1, 1), parts=((0, 1),)), "parents\\[1\\] must be a node"),
        (dict(parents=(-1, 0), parts=((0,),)), "parts must partition"),
    ],
)
def test_bad_diagram(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Diagram(**kwargs)


@pytest.mark.parametrize("order", [-1, 1.5, True, "2"])
def test_bad_order(order):
    with pytest.raises(ValueError, match="order must be a non-negative integer"):
        diagrams(order)


def test_bad_quantity():
    with pytest.raises(ValueError, match="quantity must be one of"):
        diagrams(2, quantity="gap")
    with pytest.raises(ValueError, match="nodes must be a positive integer"):
        rooted_trees(0)
