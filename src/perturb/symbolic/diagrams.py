"""Diagrams: rooted trees whose nodes are grouped into parts.

SGD's expected loss after ``T`` steps expands into a sum over rooted trees.  Node
0 is the root (the measured loss); every other node ``v`` is one gradient update
``-(η/B) ∇^{k+1} l_x`` Taylor-expanded to order ``k`` in the displacement, where
``k`` is the number of children of ``v``; an edge contracts one index.  Nodes that
use the same data point form one *part* of a partition of the nodes.

Two readings of a part exist and both are offered:

* **moment form**: a part is one data point, so distinct parts use distinct points
  and the part's value is the joint moment ``E_x[∏_i ∇^{d_i} l_x]``;
* **cumulant form** (the paper's fuzzy outlines): a part's value is the joint
  cumulant of its nodes' derivatives, and distinct parts may share a point.  The
  two are related by Möbius inversion over the partition lattice.

A tree with ``d`` edges contributes ``O(η^d)``.  In a single-epoch schedule a point
is used at one step only, so a part never holds a non-root node and one of its
non-root ancestors (the *path condition*).  The train loss's root ``(1/N)Σ_n l_n``
is not an update and may share a point with any node; with several epochs the same
point recurs, so the path condition is dropped there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import networkx as nx

from perturb.checks import check_order

__all__ = [
    "Diagram",
    "count_rooted_trees",
    "diagrams",
    "labelled_partitions",
    "rooted_trees",
    "set_partitions",
]

# --------------------------------------------------------------------------- trees
# A canonical rooted tree is the sorted tuple of its children's canonical trees, so
# ``()`` is a single node and ``((),)`` a root with one leaf.


def _size(tree: tuple) -> int:
    return 1 + sum(_size(c) for c in tree)


@cache
def _canonical_trees(n: int) -> tuple[tuple, ...]:
    """All rooted trees with ``n`` nodes as canonical nested tuples."""
    if n == 1:
        return ((),)
    out: list[tuple] = []

    def extend(remaining: int, bound: tuple | None, children: list[tuple]) -> None:
        if remaining == 0:
            out.append(tuple(children))
            return
        for size in range(remaining, 0, -1):
            for child in _canonical_trees(size):
                key = (size, child)
                if bound is not None and key > bound:
                    continue
                extend(remaining - size, key, [*children, child])

    extend(n - 1, None, [])
    return tuple(out)


def _aut(tree: tuple) -> int:
    total = 1
    for child, group in itertools.groupby(tree):
        size = len(list(group))
        total *= math.factorial(size) * _aut(child) ** size
    return total


def _parents(tree: tuple) -> tuple[int, ...]:
    """Parent array of a canonical tree labelled in depth-first order (root 0)."""
    parents: list[int] = [-1]

    def walk(node: tuple, label: int) -> None:
        for child in node:
            parents.append(label)
            walk(child, len(parents) - 1)

    walk(tree, 0)
    return tuple(parents)


def rooted_trees(nodes: int) -> list[tuple[int, ...]]:
    """All rooted trees with ``nodes`` nodes, up to isomorphism, as parent arrays.

    Node 0 is the root and ``parents[v] < v`` is the parent of node ``v``.

    Args:
        nodes: number of nodes, at least 1.

    Returns:
        One parent array per isomorphism class (OEIS A000081: 1, 1, 2, 4, 9, ...).

    Example:
        >>> rooted_trees(3)
        [(-1, 0, 1), (-1, 0, 0)]
    """
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    return [_parents(t) for t in _canonical_trees(nodes)]


@cache
def count_rooted_trees(nodes: int) -> int:
    """Number of rooted trees with ``nodes`` nodes (OEIS A000081), without listing them.

    By the recurrence ``a(n+1) = (1/n) Σ_{k=1}^{n} (Σ_{d|k} d·a(d)) a(n−k+1)``, so it
    answers at once for sizes whose trees could never be enumerated.

    Example:
        >>> [count_rooted_trees(n) for n in range(1, 9)]
        [1, 1, 2, 4, 9, 20, 48, 115]
        >>> count_rooted_trees(21)
        35221832
    """
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    if nodes == 1:
        return 1
    n = nodes - 1
    total = 0
    for k in range(1, n + 1):
        weight = sum(d * count_rooted_trees(d) for d in range(1, k + 1) if k % d == 0)
        total += weight * count_rooted_trees(n - k + 1)
    return total // n


# ---------------------------------------------------------------------- partitions


def set_partitions(items: Sequence[int]) -> Iterator[list[list[int]]]:
    """All set partitions of ``items`` (Bell-number many), blocks in first-seen order.

    Example:
        >>> list(set_partitions([1, 2]))
        [[[1, 2]], [[1], [2]]]
    """
    items = list(items)
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]
        yield [[first], *partition]


# ------------------------------------------------------------------------ diagrams


@dataclass(frozen=True)
class Diagram:
    """A rooted tree with a partition of its nodes.

    Attributes:
        parents: ``parents[v]`` is the parent of node ``v``; ``parents[0] == -1`` and
            node 0 is the root (the measured loss).
        parts: the partition, a tuple of sorted tuples of nodes.  For a test-loss
            diagram the root is alone in its part.

    Example:
        >>> d = Diagram(parents=(-1, 0, 0), parts=((0,), (1, 2)))
        >>> d.edges, d.degree(0), d.degree(1)
        (2, 2, 1)
    """

    parents: tuple[int, ...]
    parts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.parents)
        if n == 0 or self.parents[0] != -1:
            raise ValueError(f"parents[0] must be -1 (the root), got {self.parents!r}")
        for v in range(1, n):
            if not 0 <= self.parents[v] < v:
                raise ValueError(
                    f"parents[{v}] must be a node in 0..{v - 1}, got {self.parents[v]}"
                )
        covered = sorted(x for part in self.parts for x in part)
        if covered != list(range(n)):
            raise ValueError(f"parts must partition the nodes 0..{n - 1}, got {self.parts!r}")

    @property
    def nodes(self) -> int:
        """Number of nodes, ``edges + 1``.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.nodes
            4
        """
        return len(self.parents)

    @property
    def edges(self) -> int:
        """Number of edges ``d``: the diagram contributes at order ``η^d``.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.edges
            3
        """
        return len(self.parents) - 1

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """``children[v]``: the children of node ``v``.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.children
            ((1,), (2, 3), (), ())
        """
        kids: list[list[int]] = [[] for _ in self.parents]
        for v, p in enumerate(self.parents[1:], start=1):
            kids[p].append(v)
        return tuple(tuple(k) for k in kids)

    def degree(self, v: int) -> int:
        """Number of tensor indices at node ``v``: its edges (``∇^degree l``).

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> [d.degree(v) for v in range(4)]
            [1, 3, 1, 1]
        """
        return len(self.children[v]) + (v != 0)

    @cached_property
    def part_of(self) -> tuple[int, ...]:
        """``part_of[v]``: index into :attr:`parts` of the part holding ``v``.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.part_of
            (0, 1, 2, 2)
        """
        out = [0] * self.nodes
        for i, part in enumerate(self.parts):
            for v in part:
                out[v] = i
        return tuple(out)

    def ancestors(self, v: int) -> list[int]:
        """Strict ancestors of ``v``, nearest first (the root last).

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.ancestors(3)
            [1, 0]
        """
        out = []
        while self.parents[v] != -1:
            v = self.parents[v]
            out.append(v)
        return out

    @property
    def root_alone(self) -> bool:
        """Whether the root is alone in its part (always true for the test loss).

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.root_alone
            True
        """
        return len(self.parts[self.part_of[0]]) == 1

    def satisfies_path_condition(self) -> bool:
        """No part holds a non-root node together with one of its non-root ancestors.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.satisfies_path_condition()
            True
            >>> Diagram(parents=(-1, 0, 1), parts=((0,), (1, 2))).satisfies_path_condition()
            False
        """
        for part in self.parts:
            members = set(part) - {0}
            for v in members:
                if members.intersection(a for a in self.ancestors(v) if a != 0):
                    return False
        return True

    @cached_property
    def tree_automorphisms(self) -> int:
        """``|Aut|`` of the underlying rooted tree (ignoring the partition).

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.tree_automorphisms
            2
        """
        return _aut(_canonical(self.parents, 0))

    def graph(self) -> nx.DiGraph:
        """The diagram as a networkx DiGraph: edges point from child to parent.

        Node attributes: ``part`` (index of its part), ``root`` (bool), ``degree``.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> sorted(d.graph().edges)
            [(1, 0), (2, 1), (3, 1)]
        """
        g = nx.DiGraph()
        for v in range(self.nodes):
            g.add_node(v, part=self.part_of[v], root=v == 0, degree=self.degree(v))
        g.add_edges_from((v, p) for v, p in enumerate(self.parents) if p >= 0)
        return g

    def _labelled_graph(self) -> nx.Graph:
        g = nx.Graph()
        for v in range(self.nodes):
            g.add_node(("v", v), kind="root" if v == 0 else "node")
        for i, part in enumerate(self.parts):
            g.add_node(("p", i), kind="part")
            g.add_edges_from((("p", i), ("v", v)) for v in part)
        for v, p in enumerate(self.parents):
            if p >= 0:
                g.add_edge(("v", v), ("v", p), kind="child")
        nx.set_edge_attributes(g, {e: g.edges[e].get("kind", "member") for e in g.edges}, "kind")
        return g

    @cached_property
    def automorphisms(self) -> int:
        """``|Aut(D)|``: automorphisms of the rooted tree that map parts to parts.

        Example:
            >>> d = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3)))
            >>> d.automorphisms
            2
            >>> Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1, 2), (3,))).automorphisms
            1
        """
        g = self._labelled_graph()
        matcher = nx.algorithms.isomorphism.GraphMatcher(
            g,
            g,
            node_match=lambda a, b: a["kind"] == b["kind"],
            edge_match=lambda a, b: a["kind"] == b["kind"],
        )
        return sum(1 for _ in matcher.isomorphisms_iter())

    def is_isomorphic(self, other: Diagram) -> bool:
        """Whether the two diagrams are equal up to relabelling nodes and parts.

        Example:
            >>> a = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1, 2), (3,)))
            >>> a.is_isomorphic(Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1, 3), (2,))))
            True
            >>> a.is_isomorphic(Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1,), (2, 3))))
            False
        """
        return nx.is_isomorphic(
            self._labelled_graph(),
            other._labelled_graph(),
            node_match=lambda a, b: a["kind"] == b["kind"],
            edge_match=lambda a, b: a["kind"] == b["kind"],
        )

    @cached_property
    def hash(self) -> str:
        """A Weisfeiler-Lehman hash, equal for isomorphic diagrams.

        Example:
            >>> a = Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1, 2), (3,)))
            >>> a.hash == Diagram(parents=(-1, 0, 1, 1), parts=((0,), (1, 3), (2,))).hash
            True
        """
        return nx.weisfeiler_lehman_graph_hash(
            self._labelled_graph(), node_attr="kind", edge_attr="kind", iterations=4
        )

    def __str__(self) -> str:
        parts = " ".join("{" + ",".join(map(str, p)) + "}" for p in self.parts)
        return f"tree {list(self.parents)} parts {parts}"


def _canonical(parents: Sequence[int], v: int) -> tuple:
    kids = [c for c in range(len(parents)) if parents[c] == v]
    return tuple(sorted((_canonical(parents, c) for c in kids), key=lambda t: (_size(t), t)))[::-1]


def labelled_partitions(
    parents: tuple[int, ...], *, quantity: str, path_condition: bool
) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Partitions of one labelled tree's nodes allowed for ``quantity``.

    Every partition of the movable nodes (the non-root nodes, and for ``"train"`` the
    root too), minus those breaking the path condition when ``path_condition``; for
    ``"test"`` and ``"displacement"`` the root is added as its own part.

    Args:
        parents: the tree, a parent array.
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.
        path_condition: drop parts holding a non-root node and a non-root ancestor.

    Example:
        >>> list(labelled_partitions((-1, 0, 1), quantity="test", path_condition=True))
        [((0,), (1,), (2,))]
        >>> list(labelled_partitions((-1, 0, 1), quantity="test", path_condition=False))
        [((0,), (1, 2)), ((0,), (1,), (2,))]
    """
    n = len(parents)
    ancestors = []
    for v in range(n):
        anc, u = set(), v
        while parents[u] > 0:
            u = parents[u]
            anc.add(u)
        ancestors.append(anc)
    movable = list(range(1, n)) if quantity in ("test", "displacement") else list(range(n))
    for partition in set_partitions(movable):
        if path_condition and any(
            ancestors[v] & set(block) for block in partition for v in block if v != 0
        ):
            continue
        parts = [tuple(sorted(b)) for b in partition]
        if quantity in ("test", "displacement"):
            parts.append((0,))
        yield tuple(sorted(parts))


def diagrams(
    order: int,
    *,
    quantity: str = "test",
    path_condition: bool = True,
    up_to_isomorphism: bool = True,
) -> list[Diagram]:
    """All diagrams with ``order`` edges for a measured quantity.

    Args:
        order: number of edges ``d`` (the power of ``η``), at least 0.
        quantity: ``"test"`` (root alone in its part), ``"train"`` (the root may
            share a training point), or ``"displacement"`` (root with one child).
        path_condition: drop partitions with a non-root node and a non-root
            ancestor in one part (right for single-epoch schedules).
        up_to_isomorphism: one diagram per isomorphism class; otherwise every
            partition of one labelled representative of each tree.

    Returns:
        The diagrams, ordered by tree and partition.

    Example:
        >>> [str(d) for d in diagrams(2)]  # doctest: +NORMALIZE_WHITESPACE
        ['tree [-1, 0, 1] parts {0} {1} {2}',
         'tree [-1, 0, 0] parts {0} {1,2}', 'tree [-1, 0, 0] parts {0} {1} {2}']
    """
    check_order(order)
    if quantity not in ("test", "train", "displacement"):
        raise ValueError(
            f"quantity must be one of 'test', 'train', 'displacement', got {quantity!r}"
        )
    out: list[Diagram] = []
    for parents in rooted_trees(order + 1):
        if quantity == "displacement" and (order == 0 or parents.count(0) != 1):
            continue
        found: dict[str, list[Diagram]] = {}
        for parts in labelled_partitions(parents, quantity=quantity, path_condition=path_condition):
            d = Diagram(parents=parents, parts=parts)
            if up_to_isomorphism:
                bucket = found.setdefault(d.hash, [])
                if any(d.is_isomorphic(e) for e in bucket):
                    continue
                bucket.append(d)
            out.append(d)
    return out
