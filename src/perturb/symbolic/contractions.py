"""Tensor contractions: what a diagram's value multiplies, named and evaluated.

A diagram's value is a tensor network: each part is one tensor, the joint
cumulant (or moment) of the derivatives ``∇^{d_i} l_x`` of its nodes, and each
tree edge contracts one index of the child's tensor with one of the parent's.  The
root's role is forgotten (the test root is the mean ``∇^k l``, a one-node
cumulant), so different diagrams with the same network share one
:class:`Contraction` and their coefficients add up.

Names: ``G = E∇l``, ``H = E∇∇l``, ``J = E∇³l``, ``∇⁴l`` …, ``C = ⟨∇l,∇l⟩``
(covariance), ``S = ⟨∇l,∇l,∇l⟩`` (third cumulant), and ``⟨∇l,∇∇l⟩`` and so on for
every other joint cumulant; moment-form tensors are written ``E[∇l ∇∇l]``.
Networks of vectors and matrices print as ``G·H·G`` or ``tr(C H)``, two tensors
contracted on all indices as ``S:J``, anything else in index notation such as
``J_abc G_a G_b G_c``.

Numerically a network is evaluated from per-sample derivative tensors
``D[k]`` of shape ``(n, P, …, P)`` with uniform weights over the ``n`` rows: a
moment network puts one sample index on each part and averages; a cumulant
network is the Möbius sum ``Σ_ρ Π_B (-1)^{k_B-1}(k_B-1)!`` of moment networks over
the refinements ``ρ`` of its partition.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import networkx as nx
import numpy as np
import opt_einsum
import sympy as sp

from perturb.symbolic.diagrams import set_partitions

__all__ = [
    "Contraction",
    "contract_moment_network",
    "default_einsum",
    "is_exact",
    "refinements_of",
    "rows_of",
    "tensor_name",
]

_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_MEANS = {1: ("G", "G"), 2: ("H", "H"), 3: ("J", "J")}
_CUMULANTS = {(1, 1): ("C", "C"), (1, 1, 1): ("S", "S")}


def _nabla(d: int) -> tuple[str, str]:
    if d == 0:
        return "l", "l"
    if d <= 2:
        return "∇" * d + "l", r"\nabla" + ("^2" if d == 2 else "") + " l"
    return f"∇{str(d).translate(_SUPERSCRIPTS)}l", rf"\nabla^{{{d}}} l"


def tensor_name(degrees: tuple[int, ...], *, form: str = "cumulant") -> tuple[str, str]:
    """Plain-text and LaTeX names of the tensor of one part.

    Args:
        degrees: derivative order of each node of the part.
        form: ``"cumulant"`` or ``"moment"``.

    Example:
        >>> tensor_name((1, 1)), tensor_name((2, 1))[0], tensor_name((1, 1), form="moment")[0]
        (('C', 'C'), '⟨∇l,∇∇l⟩', 'E[∇l ∇l]')
    """
    degs = tuple(sorted(degrees))
    if len(degs) == 1:
        return _MEANS.get(degs[0], _nabla(degs[0]))
    names = [_nabla(d) for d in degs]
    if form == "moment":
        return (
            "E[" + " ".join(t for t, _ in names) + "]",
            r"\mathbb{E}[" + r"\,".join(t for _, t in names) + "]",
        )
    if degs in _CUMULANTS:
        return _CUMULANTS[degs]
    return (
        "⟨" + ",".join(t for t, _ in names) + "⟩",
        r"\langle " + ", ".join(t for _, t in names) + r" \rangle",
    )


@dataclass(frozen=True)
class Contraction:
    """The tensor network of a diagram.

    Attributes:
        parents: the tree (``parents[0] == -1``).
        parts: the partition of the nodes; each part is one tensor.
        form: ``"cumulant"`` or ``"moment"``.
        open_root: the root is a free index (the displacement ``E[θ_T − θ_0]``)
            rather than a tensor.

    Example:
        >>> Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))).text
        'tr(C H)'
        >>> Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,))).text
        'G·H·G'
    """

    parents: tuple[int, ...]
    parts: tuple[tuple[int, ...], ...]
    form: str = "cumulant"
    open_root: bool = False

    # ------------------------------------------------------------------ structure
    @cached_property
    def _degree(self) -> tuple[int, ...]:
        deg = [0 if p < 0 else 1 for p in self.parents]
        for p in self.parents[1:]:
            deg[p] += 1
        return tuple(deg)

    @cached_property
    def tensors(self) -> tuple[tuple[int, ...], ...]:
        """The parts that carry a tensor, nodes sorted by degree (name order).

        Example:
            >>> Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))).tensors
            ((0,), (1, 2))
            >>> Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)), open_root=True).tensors
            ((1, 2),)
        """
        out = []
        for part in self.parts:
            if self.open_root and 0 in part:
                continue
            out.append(tuple(sorted(part, key=lambda v: (self._degree[v], v))))
        return tuple(out)

    @cached_property
    def graph(self) -> nx.Graph:
        """Network as a graph: slot vertices (nodes), tensor vertices (parts).

        Slot ``("v", v)`` is node ``v`` (kind ``"slot"``, or ``"open"`` for a free root);
        tensor ``("t", i)`` is ``tensors[i]`` (kind: the form), joined to its slots by
        ``"member"`` edges; ``"index"`` edges join a node to its parent.

        Example:
            >>> g = Contraction(parents=(-1, 0), parts=((0,), (1,))).graph
            >>> sorted(g.nodes), g.number_of_edges()
            ([('t', 0), ('t', 1), ('v', 0), ('v', 1)], 3)
        """
        g = nx.Graph()
        for v in range(len(self.parents)):
            g.add_node(("v", v), kind="open" if self.open_root and v == 0 else "slot")
        for i, part in enumerate(self.tensors):
            g.add_node(("t", i), kind=self.form)
            g.add_edges_from(((("t", i), ("v", v)) for v in part), kind="member")
        g.add_edges_from(
            ((("v", v), ("v", p)) for v, p in enumerate(self.parents) if p >= 0), kind="index"
        )
        return g

    @cached_property
    def hash(self) -> str:
        """Weisfeiler-Lehman hash: isomorphic networks hash equal (a bucket, not an identity).

        Example:
            >>> a = Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)))
            >>> b = Contraction(parents=(-1, 0, 0), parts=((1,), (0,), (2,)))  # re-rooted
            >>> a.hash == b.hash
            True
        """
        return nx.weisfeiler_lehman_graph_hash(
            self.graph, node_attr="kind", edge_attr="kind", iterations=4
        )

    def is_isomorphic(self, other: Contraction) -> bool:
        """Whether both networks are the same contraction (exact graph isomorphism).

        Example:
            >>> chain = Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)))
            >>> chain.is_isomorphic(Contraction(parents=(-1, 0, 0), parts=((0,), (1,), (2,))))
            True
            >>> chain.is_isomorphic(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))))
            False
        """
        if self.hash != other.hash:
            return False
        return nx.is_isomorphic(
            self.graph,
            other.graph,
            node_match=lambda a, b: a["kind"] == b["kind"],
            edge_match=lambda a, b: a["kind"] == b["kind"],
        )

    @cached_property
    def canonical(self) -> Contraction:
        """The same network relabelled in a canonical order (used for names and keys).

        Slots are coloured by Weisfeiler-Lehman hashes of the network; the tree is then
        rooted at the slot with the smallest AHU encoding (the free index when
        :attr:`open_root`) and relabelled in depth-first order, children sorted by their
        encodings.  Isomorphic networks almost always get identical canonical forms;
        :meth:`is_isomorphic` remains the exact test.

        Example:
            >>> Contraction(parents=(-1, 0, 0), parts=((0, 2), (1,))).canonical
            Contraction(parents=(-1, 0, 0), parts=((0, 1), (2,)), form='cumulant', open_root=False)
        """
        n = len(self.parents)
        hashes = nx.weisfeiler_lehman_subgraph_hashes(
            self.graph, node_attr="kind", edge_attr="kind", iterations=3
        )
        color = {v: hashes[("v", v)][-1] for v in range(n)}
        adj: dict[int, list[int]] = {v: [] for v in range(n)}
        for v, p in enumerate(self.parents):
            if p >= 0:
                adj[v].append(p)
                adj[p].append(v)

        def encode(v: int, parent: int) -> tuple:
            return (color[v], tuple(sorted(encode(c, v) for c in adj[v] if c != parent)))

        roots = [0] if self.open_root else range(n)
        root = min(roots, key=lambda r: encode(r, -1))
        order: list[int] = []
        new_parent: dict[int, int] = {root: -1}

        def visit(v: int, parent: int) -> None:
            order.append(v)
            kids = sorted((c for c in adj[v] if c != parent), key=lambda c: encode(c, v))
            for c in kids:
                new_parent[c] = v
                visit(c, v)

        visit(root, -1)
        label = {v: i for i, v in enumerate(order)}
        parents = tuple(-1 if new_parent[v] < 0 else label[new_parent[v]] for v in order)
        parts = tuple(sorted(tuple(sorted(label[v] for v in part)) for part in self.parts))
        return Contraction(parents=parents, parts=parts, form=self.form, open_root=self.open_root)

    @cached_property
    def key(self) -> str:
        """The contraction's identity: its printed name and its Weisfeiler-Lehman hash.

        perturb stores, caches and looks up measured values under this key (it is what
        saved statistics files hold); isomorphic networks have equal keys.  The hash alone
        (:attr:`hash`) only buckets candidates for :meth:`is_isomorphic`.

        Example:
            >>> Contraction(parents=(-1, 0), parts=((0,), (1,))).key.startswith("G·G|")
            True
        """
        return f"{self.text}|{self.hash}"

    @cached_property
    def max_degree(self) -> int:
        """Highest derivative order any node needs.

        Example:
            >>> Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1,), (2,), (3,))).max_degree
            3
        """
        return max(self._degree)

    # ------------------------------------------------------------------- printing
    def _names(self) -> list[tuple[str, str]]:
        return [
            tensor_name(tuple(self._degree[v] for v in t), form=self.form) for t in self.tensors
        ]

    def _tensor_links(self) -> tuple[dict[int, int], list[tuple[int, int]], int | None]:
        """Tensor of each node, tensor-tensor index links, the tensor at the free index."""
        owner = {v: i for i, t in enumerate(self.tensors) for v in t}
        links, free = [], None
        for v, p in enumerate(self.parents):
            if p < 0:
                continue
            if p == 0 and self.open_root:
                free = owner[v]
            else:
                links.append((owner[v], owner[p]))
        return owner, links, free

    @cached_property
    def _pretty(self) -> tuple[str, str]:
        return self.canonical._raw_pretty

    @cached_property
    def _raw_pretty(self) -> tuple[str, str]:
        names = self._names()
        _, links, free = self._tensor_links()
        ranks = [sum(self._degree[v] for v in t) for t in self.tensors]
        if len(self.tensors) == 1 and ranks[0] == (1 if free is not None else 0):
            return names[0]
        if len(self.tensors) == 1 and ranks[0] == 2 and free is None:
            return f"tr({names[0][0]})", rf"\operatorname{{tr}}({names[0][1]})"
        if all(r <= 2 for r in ranks) and all(a != b for a, b in links):
            walk = _walk(len(self.tensors), links, free)
            if walk is not None:
                order, cycle = walk
                if cycle:
                    turns = [order[i:] + order[:i] for i in range(len(order))]
                    candidates = turns + [t[::-1] for t in turns]
                else:
                    candidates = [order] if free is not None else [order, order[::-1]]
                order = min(candidates, key=lambda o: [names[i][0] for i in o])
                text = [names[i][0] for i in order]
                tex = [names[i][1] for i in order]
                if cycle:
                    return "tr(" + " ".join(text) + ")", r"\operatorname{tr}(" + " ".join(tex) + ")"
                return "·".join(text), r" \cdot ".join(tex)
        if len(self.tensors) == 2 and free is None and all(a != b for a, b in links):
            if ranks[0] == ranks[1] == len(links):
                first, second = sorted(names)
                return f"{first[0]}:{second[0]}", f"{first[1]} : {second[1]}"
        return self._einstein(names)

    def _einstein(self, names: list[tuple[str, str]]) -> tuple[str, str]:
        letter = {}
        free_letter = None
        for v, p in enumerate(self.parents):
            if p < 0:
                continue
            letter[v] = string.ascii_lowercase[len(letter)]
            if p == 0 and self.open_root:
                free_letter = letter[v]
        texts, texes = [], []
        for (text, tex), tensor in zip(names, self.tensors, strict=True):
            groups = []
            for v in tensor:
                idx = [letter[c] for c in range(len(self.parents)) if self.parents[c] == v]
                if v != 0:
                    idx.append(letter[v])
                groups.append("".join(sorted(idx)))
            if len(tensor) == 1:
                sub = groups[0]
                texts.append(f"{text}_{sub}" if sub else text)
                texes.append(f"{tex}_{{{sub}}}" if sub else tex)
            else:
                texts.append(f"{text}_({','.join(groups)})")
                texes.append(f"{tex}_{{{','.join(groups)}}}")
        text, tex = " ".join(texts), " ".join(texes)
        if free_letter is not None:
            text, tex = f"[{text}]_{free_letter}", rf"\left[{tex}\right]_{{{free_letter}}}"
        return text, tex

    @property
    def text(self) -> str:
        """Plain-text name, e.g. ``G·H·G``, ``tr(C H)``, ``S:J``, of the canonical form.

        Example:
            >>> Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3))).text
            'J:S'
        """
        return self._pretty[0]

    @property
    def latex(self) -> str:
        """LaTeX name of the canonical form.

        Example:
            >>> print(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))).latex)
            \\operatorname{tr}(C H)
        """
        return self._pretty[1]

    @property
    def einstein(self) -> tuple[str, str]:
        """Plain-text and LaTeX names in index notation, one letter per edge, as labelled.

        Example:
            >>> Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3))).einstein[0]
            'J_abc S_(a,b,c)'
        """
        return self._einstein(self._names())

    def __str__(self) -> str:
        return self.text

    # ------------------------------------------------------------------ numerics
    def value(
        self,
        derivs: Mapping[int, object],
        *,
        einsum: Callable[..., object] | None = None,
        means: Mapping[int, object] | None = None,
    ):
        """Evaluate the network from per-sample derivative tensors.

        Args:
            derivs: ``derivs[k]`` has shape ``(n, P, …, P)`` (``k`` parameter axes)
                and holds ``∇^k l_x`` for each of ``n`` equally weighted rows;
                ``derivs[0]`` holds the losses.  Arrays may be numpy (any dtype,
                ``object`` for exact rationals) or torch tensors.
            einsum: the einsum to use (default: numpy's, or torch's for tensors).
            means: optional mean tensors ``E∇^k l`` (shape ``(P,)*k``), used for nodes
                alone in their block, so that per-sample tensors of that order are not
                needed (e.g. the Hessian of a test root).

        Returns:
            A scalar, or a vector of length ``P`` when :attr:`open_root`.

        Example:
            >>> import numpy as np
            >>> g = np.array([[1.0], [3.0]])  # two rows, one parameter
            >>> d = {1: g, 2: np.array([[[2.0]], [[2.0]]])}
            >>> float(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))).value(d))
            2.0
        """
        if einsum is None:
            einsum = default_einsum(derivs)
        n = rows_of(derivs)
        total = None
        for refined, weight in self._refinements():
            term = contract_moment_network(
                self.parents, refined, self.open_root, derivs, n, einsum, means
            )
            term = term * weight
            total = term if total is None else total + term
        return total

    def _refinements(self) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
        return refinements_of(self.tensors, open_root=self.open_root, form=self.form)


def refinements_of(
    parts, *, open_root: bool, form: str = "cumulant"
) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
    """Moment networks and Möbius weights whose sum is the cumulant network of ``parts``.

    With ``open_root`` the root's part is left out of the tensors and kept as the
    singleton block ``(0,)``.  The weights are the Möbius function of the partition
    lattice, ``κ(X_1..X_k) = Σ_ρ (−1)^{|ρ|−1}(|ρ|−1)! Π_{B∈ρ} E[Π_{i∈B} X_i]``.

    Example:
        >>> refinements_of([(0,), (1, 2)], open_root=False)  # ⟨x,y⟩ = E[xy] − E[x]E[y]
        [(((0,), (1, 2)), 1), (((0,), (1,), (2,)), -1)]
        >>> refinements_of([(0,), (1, 2)], open_root=False, form="moment")
        [(((0,), (1, 2)), 1)]
    """
    tensors = [tuple(p) for p in parts if not (open_root and 0 in p)]
    if open_root:
        tensors.append((0,))
    if form == "moment":
        return [(tuple(tensors), 1)]
    options = []
    for part in tensors:
        opts = []
        for sub in set_partitions(list(part)):
            k = len(sub)
            opts.append(([tuple(b) for b in sub], (-1) ** (k - 1) * math.factorial(k - 1)))
        options.append(opts)
    out = []
    for choice in itertools.product(*options):
        blocks = tuple(b for sub, _ in choice for b in sub)
        out.append((blocks, math.prod(w for _, w in choice)))
    return out


def _walk(count: int, links: list[tuple[int, int]], free: int | None):
    """Order the tensors of a path (ends first) or a cycle; ``None`` if neither."""
    adj: dict[int, list[int]] = {i: [] for i in range(count)}
    for a, b in links:
        adj[a].append(b)
        adj[b].append(a)
    degree = {i: len(adj[i]) + (i == free) for i in adj}
    if any(d > 2 for d in degree.values()):
        return None
    ends = [i for i in adj if len(adj[i]) < 2]
    cycle = not ends
    start = free if free is not None else (ends[0] if ends else 0)
    order, prev, cur = [start], None, start
    while True:
        nxt = [j for j in adj[cur] if j != prev]
        if not nxt or (cycle and nxt[0] == start):
            break
        if cycle and len(order) == count:
            break
        prev, cur = cur, nxt[0]
        order.append(cur)
    if len(order) != count:
        return None
    return order, cycle


def rows_of(derivs: Mapping[int, object]) -> int:
    """The number of samples ``n`` of per-sample derivative arrays ``{k: (n, P, …)}``.

    Example:
        >>> rows_of({1: np.zeros((5, 2))})
        5
    """
    return int(next(iter(derivs.values())).shape[0])


def default_einsum(derivs: Mapping[int, object]) -> Callable[..., object]:
    """An ``einsum`` for the array type of ``derivs``: numpy's, or opt_einsum's dispatch.

    numpy arrays use ``np.einsum`` with a greedy path; any other array library (torch,
    on any device) goes through :func:`opt_einsum.contract` with that library as the
    backend, so this symbolic module never imports it.

    Example:
        >>> einsum = default_einsum({1: np.ones((2, 3))})
        >>> float(einsum("ia,ia->", np.ones((2, 3)), np.ones((2, 3))))
        6.0
    """
    first = next(iter(derivs.values()))
    if isinstance(first, np.ndarray):
        return lambda spec, *ops: np.einsum(spec, *ops, optimize="greedy")
    backend = type(first).__module__.split(".")[0]
    return lambda spec, *ops: opt_einsum.contract(spec, *ops, backend=backend)


def contract_moment_network(
    parents, blocks, open_root, derivs, n, einsum, means=None, keep_edges=False
):
    """``E`` over one independent sample per block of the contracted product.

    A node alone in its block uses ``means[k]`` (no sample index) when given.  With
    ``keep_edges`` every edge index stays open in the output (edges in node order).

    Args:
        parents: the tree.
        blocks: the partition into independently sampled blocks.
        open_root: leave the root's edge index free instead of a root tensor.
        derivs: per-sample derivative tensors ``{k: (n, P, …)}``.
        n: the number of rows.
        einsum: the einsum to contract with.
        means: optional mean tensors ``{k: (P,)*k}``.
        keep_edges: leave every edge index open.

    Example:
        >>> g = np.array([[1.0], [3.0]])
        >>> d = {1: g, 2: np.array([[[2.0]], [[2.0]]])}
        >>> float(contract_moment_network((-1, 0, 0), ((0,), (1, 2)), False, d, 2, np.einsum))
        10.0
    """
    means = means or {}
    letter = {}
    for v, p in enumerate(parents):
        if p >= 0:
            letter[v] = string.ascii_lowercase[len(letter)]
    sample = {}
    for i, block in enumerate(blocks):
        for v in block:
            sample[v] = string.ascii_uppercase[i]
    specs, operands = [], []
    out = ""
    for v, p in enumerate(parents):
        idx = [letter[c] for c in range(len(parents)) if parents[c] == v]
        if p >= 0:
            idx.append(letter[v])
        if v == 0 and open_root:
            out = idx[0]
            continue
        k = len(idx)
        alone = sum(1 for u in sample if sample[u] == sample[v]) == 1
        if alone and k in means:
            specs.append("".join(idx))
            operands.append(means[k])
            continue
        if k not in derivs:
            raise KeyError(
                f"per-sample derivative tensors of order {k} are needed, got orders "
                f"{sorted(derivs)} (and means of orders {sorted(means)})"
            )
        specs.append(sample[v] + "".join(idx))
        operands.append(derivs[k])
    nblocks = len({s[0] for s in specs if s[:1].isupper()})
    if keep_edges:
        out = "".join(letter[v] for v in range(1, len(parents)))
    value = einsum(",".join(specs) + "->" + out, *operands)
    count = n**nblocks
    if is_exact(value):
        return value * Fraction(1, count)
    return value / count


def is_exact(value) -> bool:
    """Whether ``value`` holds exact numbers (``object`` arrays, fractions, sympy).

    Example:
        >>> is_exact(np.array([Fraction(1, 2)], dtype=object)), is_exact(np.ones(2))
        (True, False)
    """
    if isinstance(value, np.ndarray):
        return value.dtype == object
    return isinstance(value, Fraction | int | sp.Basic)
