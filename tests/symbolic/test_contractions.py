"""Tensor contractions (perturb.symbolic.contractions): names, identity and values.

Values are checked against brute force written here with explicit loops over samples
and indices, on small random symmetric per-sample tensors.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from perturb.symbolic.contractions import (
    Contraction,
    contract_moment_network,
    default_einsum,
    is_exact,
    refinements_of,
    rows_of,
    tensor_name,
)

ROWS, P = 3, 2

# order-2 and order-3 networks: (parents, parts)
NETWORKS = [
    ((-1, 0, 1), ((0,), (1,), (2,))),  # G·H·G
    ((-1, 0, 0), ((0,), (1, 2))),  # tr(C H)
    ((-1, 0, 0), ((0,), (1,), (2,))),  # G·H·G again: the chain re-rooted at its middle
    ((-1, 0, 1, 2), ((0,), (1,), (2,), (3,))),  # G·H·H·G
    ((-1, 0, 0, 0), ((0,), (1, 2, 3))),  # J:S
    ((-1, 0, 0, 0), ((0,), (1,), (2, 3))),  # C_(a,b) J_abc G_c
    ((-1, 0, 1, 1), ((0,), (1,), (2, 3))),  # the same, rooted at a leaf
    ((-1, 0, 1, 0), ((0,), (1, 3), (2,))),  # G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc
    ((-1, 0, 1, 2), ((0,), (1, 3), (2,))),  # the same, rooted at a leaf
]


def _symmetric(gen: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Random per-sample tensors ``(rows, P, …, P)``, symmetric in the ``k`` parameter axes."""
    raw = gen.normal(size=(rows,) + (P,) * k)
    perms = list(itertools.permutations(range(1, k + 1)))
    return sum(raw.transpose(0, *p) for p in perms) / len(perms)


def _derivs(seed: int = 0, top: int = 4) -> dict[int, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {k: _symmetric(gen, ROWS, k) for k in range(top + 1)}


def _degree(parents: tuple[int, ...]) -> list[int]:
    return [(p >= 0) + sum(1 for q in parents if q == v) for v, p in enumerate(parents)]


def _node_indices(parents, v, edge_index):
    """The tensor indices of node ``v``: one per child edge, and its own edge."""
    idx = [edge_index[c] for c in range(len(parents)) if parents[c] == v]
    if parents[v] >= 0:
        idx.append(edge_index[v])
    return tuple(idx)


def _brute_moment(parents, blocks, derivs, *, open_root=False) -> np.ndarray | float:
    """Mean over one sample per block and sum over every edge index, by explicit loops."""
    n = len(parents)
    edges = [v for v in range(n) if parents[v] >= 0]
    degree = _degree(parents)
    block_of = {v: i for i, b in enumerate(blocks) for v in b}
    total = np.zeros(P) if open_root else 0.0
    for samples in itertools.product(range(ROWS), repeat=len(blocks)):
        for values in itertools.product(range(P), repeat=len(edges)):
            edge_index = dict(zip(edges, values, strict=True))
            prod = 1.0
            for v in range(n):
                if open_root and v == 0:
                    continue
                tensor = derivs[degree[v]][samples[block_of[v]]]
                prod *= tensor[_node_indices(parents, v, edge_index)]
            if open_root:
                root_edge = next(c for c in range(n) if parents[c] == 0)
                total[edge_index[root_edge]] += prod
            else:
                total += prod
    return total / ROWS ** len(blocks)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def _brute_cumulant(parents, parts, derivs, *, open_root=False):
    """The Möbius sum over refinements, each block's moment by :func:`_brute_moment`."""
    tensors = [p for p in parts if not (open_root and 0 in p)]
    fixed = [(0,)] if open_root else []
    choices = [list(_set_partitions(list(p))) for p in tensors]
    total = 0.0
    for choice in itertools.product(*choices):
        weight = math.prod((-1) ** (len(c) - 1) * math.factorial(len(c) - 1) for c in choice)
        blocks = [tuple(b) for c in choice for b in c] + fixed
        total = total + weight * _brute_moment(parents, blocks, derivs, open_root=open_root)
    return total


def _relabel(parents, parts, perm):
    """The same network with node ``v`` renamed ``perm[v]`` (``perm[0] == 0``)."""
    new = [0] * len(parents)
    for v, p in enumerate(parents):
        new[perm[v]] = -1 if p < 0 else perm[p]
    new_parts = tuple(sorted(tuple(sorted(perm[v] for v in part)) for part in parts))
    return tuple(new), new_parts


def _reroot(parents, parts, root):
    """The same undirected tree rooted at ``root`` (which becomes node 0)."""
    n = len(parents)
    adj = {v: set() for v in range(n)}
    for v, p in enumerate(parents):
        if p >= 0:
            adj[v].add(p)
            adj[p].add(v)
    order, parent_of, stack = [], {root: -1}, [root]
    while stack:
        v = stack.pop()
        order.append(v)
        for c in sorted(adj[v] - set(order)):
            if c not in parent_of:
                parent_of[c] = v
                stack.append(c)
    label = {v: i for i, v in enumerate(order)}
    new = tuple(-1 if parent_of[v] < 0 else label[parent_of[v]] for v in order)
    new_parts = tuple(sorted(tuple(sorted(label[v] for v in part)) for part in parts))
    return new, new_parts


# ----------------------------------------------------------------------- names


def test_tensor_names():
    assert tensor_name((1,)) == ("G", "G")
    assert tensor_name((2,))[0] == "H"
    assert tensor_name((3,))[0] == "J"
    assert tensor_name((4,))[0] == "∇⁴l"
    assert tensor_name((1, 1))[0] == "C"
    assert tensor_name((1, 1, 1))[0] == "S"
    assert tensor_name((2, 1))[0] == tensor_name((1, 2))[0] == "⟨∇l,∇∇l⟩"
    assert tensor_name((1, 2), form="moment")[0] == "E[∇l ∇∇l]"
    assert tensor_name((0,))[0] == "l"


def test_printed_names():
    names = {Contraction(parents=pa, parts=pt).text for pa, pt in NETWORKS[:5]}
    assert names == {"G·H·G", "tr(C H)", "G·H·H·G", "J:S"}
    moment = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)), form="moment")
    assert moment.text == "tr(E[∇l ∇l] H)"
    disp = Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)), open_root=True)
    assert disp.text == "H·G"
    assert str(disp) == disp.text


@pytest.mark.parametrize(("parents", "parts"), NETWORKS)
def test_names_and_keys_are_invariant_under_relabelling(parents, parts):
    c = Contraction(parents=parents, parts=parts)
    n = len(parents)
    for perm_rest in itertools.permutations(range(1, n)):
        perm = (0, *perm_rest)
        d = Contraction(*_relabel(parents, parts, perm))
        assert (d.text, d.key, d.canonical) == (c.text, c.key, c.canonical)
        assert d.latex == c.latex
        assert d.is_isomorphic(c)
    for root in range(1, n):  # the root's role is forgotten: re-rooting is a relabelling
        d = Contraction(*_reroot(parents, parts, root))
        assert (d.text, d.key, d.canonical) == (c.text, c.key, c.canonical)
        assert d.is_isomorphic(c)


def test_open_root_names_are_invariant_under_relabelling():
    parents, parts = (-1, 0, 1, 1), ((0,), (1,), (2, 3))
    c = Contraction(parents=parents, parts=parts, open_root=True)
    for perm_rest in itertools.permutations(range(1, 4)):
        d = Contraction(*_relabel(parents, parts, (0, *perm_rest)), open_root=True)
        assert (d.text, d.key, d.canonical) == (c.text, c.key, c.canonical)


def test_key_is_name_and_hash_and_separates_distinct_networks():
    contractions = [Contraction(parents=pa, parts=pt) for pa, pt in NETWORKS]
    for c in contractions:
        assert c.key == f"{c.text}|{c.hash}"
    classes: list[list[int]] = []
    for i, c in enumerate(contractions):
        for group in classes:
            if c.is_isomorphic(contractions[group[0]]):
                group.append(i)
                break
        else:
            classes.append([i])
    assert classes == [[0, 2], [1], [3], [4], [5, 6], [7, 8]]
    for group in classes:  # isomorphic ⇒ equal keys
        assert len({contractions[i].key for i in group}) == 1
    # distinct networks ⇒ distinct keys
    assert len({contractions[group[0]].key for group in classes}) == len(classes)
    assert not contractions[0].is_isomorphic(contractions[3])
    # form and an open root are part of the identity
    tree, parts = (-1, 0, 0), ((0,), (1, 2))
    variants = [
        Contraction(parents=tree, parts=parts),
        Contraction(parents=tree, parts=parts, form="moment"),
        Contraction(parents=(-1, 0, 1), parts=((0,), (1, 2)), open_root=True),
        Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)), open_root=True),
    ]
    assert len({v.key for v in variants}) == len(variants)
    assert not variants[0].is_isomorphic(variants[1])


def test_max_degree_and_tensors():
    c = Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3)))
    assert c.max_degree == 3
    assert c.tensors == ((0,), (1, 2, 3))
    assert Contraction(parents=(-1, 0), parts=((0, 1),), open_root=True).tensors == ()


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize(("parents", "parts"), NETWORKS)
@pytest.mark.parametrize("form", ["moment", "cumulant"])
def test_value_is_the_brute_force_sum(parents, parts, form):
    derivs = _derivs(1)
    got = Contraction(parents=parents, parts=parts, form=form).value(derivs)
    if form == "moment":
        expected = _brute_moment(parents, parts, derivs)
    else:
        expected = _brute_cumulant(parents, parts, derivs)
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("form", ["moment", "cumulant"])
def test_open_root_value_is_the_brute_force_vector(form):
    derivs = _derivs(2)
    for parents, parts in [((-1, 0, 1), ((0,), (1,), (2,))), ((-1, 0, 1, 1), ((0,), (1,), (2, 3)))]:
        got = Contraction(parents=parents, parts=parts, form=form, open_root=True).value(derivs)
        if form == "moment":
            expected = _brute_moment(parents, [*parts[1:], (0,)], derivs, open_root=True)
        else:
            expected = _brute_cumulant(parents, parts, derivs, open_root=True)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_cumulant_of_two_is_the_covariance():
    """tr(C H) = Σ_ab (E[g_a g_b] − E[g_a]E[g_b]) H_ab, with C from np.cov."""
    derivs = _derivs(3)
    g, hess = derivs[1], derivs[2].mean(0)
    cov = np.cov(g.T, bias=True)
    direct = float(np.sum(cov * hess))
    moment = float(np.einsum("xa,xb,ab->", g, g, hess) / ROWS)
    means = float(g.mean(0) @ hess @ g.mean(0))
    c = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    assert float(c.value(derivs)) == pytest.approx(direct, rel=1e-12)
    assert direct == pytest.approx(moment - means, rel=1e-12)


def test_cumulant_of_three_is_the_third_central_moment():
    derivs = _derivs(4)
    g, jerk = derivs[1], derivs[3].mean(0)
    centred = g - g.mean(0)
    third = np.einsum("xa,xb,xc->abc", centred, centred, centred) / ROWS
    c = Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3)))
    assert float(c.value(derivs)) == pytest.approx(float(np.sum(third * jerk)), rel=1e-12)


@pytest.mark.parametrize(("parents", "parts"), NETWORKS)
def test_value_is_invariant_under_relabelling(parents, parts):
    derivs = _derivs(5)
    value = float(Contraction(parents=parents, parts=parts).value(derivs))
    perm = (0, *reversed(range(1, len(parents))))
    other = Contraction(*_relabel(parents, parts, perm))
    assert float(other.value(derivs)) == pytest.approx(value, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("parents", "parts"), NETWORKS)
@pytest.mark.parametrize("form", ["moment", "cumulant"])
def test_torch_inputs_give_the_numpy_value(parents, parts, form):
    derivs = _derivs(6)
    tensors = {k: torch.from_numpy(v) for k, v in derivs.items()}
    c = Contraction(parents=parents, parts=parts, form=form)
    got = c.value(tensors)
    assert isinstance(got, torch.Tensor)
    assert float(got) == pytest.approx(float(c.value(derivs)), rel=1e-12, abs=1e-12)


def test_exact_inputs_give_exact_values():
    g = np.array([[Fraction(1)], [Fraction(3)], [Fraction(-1)]], dtype=object)
    h = np.array([[[Fraction(2)]]] * 3, dtype=object)
    c = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    value = c.value({1: g, 2: h})
    # C = E[g²] − E[g]² = 11/3 − 1 = 8/3; H = 2
    assert value == Fraction(16, 3)
    assert is_exact(value) and is_exact(g) and not is_exact(1.0)


def test_means_replace_per_sample_tensors_of_lone_nodes():
    derivs = _derivs(7)
    c = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    lean = c.value({1: derivs[1]}, means={2: derivs[2].mean(0)})
    assert float(lean) == pytest.approx(float(c.value(derivs)), rel=1e-12)
    with pytest.raises(KeyError, match="per-sample derivative tensors of order 2"):
        c.value({1: derivs[1]})


# ------------------------------------------------------------ Möbius and einsum


def test_refinement_weights_are_the_moebius_function():
    # ⟨x,y⟩ = E[xy] − E[x]E[y]
    assert refinements_of([(1, 2)], open_root=False) == [(((1, 2),), 1), (((1,), (2,)), -1)]
    # ⟨x,y,z⟩ = E[xyz] − 3 E[xy]E[z] + 2 E[x]E[y]E[z]
    weights = {
        tuple(sorted(len(b) for b in blocks)): w
        for blocks, w in refinements_of([(1, 2, 3)], open_root=False)
    }
    assert weights == {(3,): 1, (1, 2): -1, (1, 1, 1): 2}
    assert len(refinements_of([(1, 2, 3)], open_root=False)) == 5
    assert sum(w for _, w in refinements_of([(1, 2, 3, 4)], open_root=False)) == 0
    # every block of a product of parts refines independently; an open root stays alone
    pairs = refinements_of([(0, 5), (1, 2), (3, 4)], open_root=True)
    assert len(pairs) == 4 and all(blocks[-1] == (0,) for blocks, _ in pairs)
    assert refinements_of([(1, 2)], open_root=False, form="moment") == [(((1, 2),), 1)]


def test_contract_moment_network_with_open_edges():
    derivs = _derivs(8)
    out = contract_moment_network(
        (-1, 0, 1), ((0,), (1,), (2,)), False, derivs, ROWS, np.einsum, keep_edges=True
    )
    g, hess = derivs[1].mean(0), derivs[2].mean(0)
    np.testing.assert_allclose(out, np.einsum("a,ab,b->ab", g, hess, g), rtol=1e-12)


def test_default_einsum_numpy_and_torch_agree():
    derivs = _derivs(9)
    tensors = {k: torch.from_numpy(v) for k, v in derivs.items()}
    assert rows_of(derivs) == rows_of(tensors) == ROWS
    spec = "xab,xa,yb->"
    a = default_einsum(derivs)(spec, derivs[2], derivs[1], derivs[1])
    b = default_einsum(tensors)(spec, tensors[2], tensors[1], tensors[1])
    assert isinstance(b, torch.Tensor)
    assert float(b) == pytest.approx(float(a), rel=1e-12)
    assert float(a) == pytest.approx(float(np.einsum(spec, derivs[2], derivs[1], derivs[1])))
