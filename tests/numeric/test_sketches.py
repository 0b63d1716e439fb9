"""Split-sample sketches (perturb.numeric.sketches) against materialized tensors.

* exact and deterministic: one moment network from an explicit split and explicit sign
  patterns equals the contraction of the weighted node tensors written out by hand;
  averaged over *every* sign pattern (Rademacher for 2-node blocks, the two values of
  ``SKEWED`` with their probabilities for 3-node blocks) it equals the per-part moment
  ``Π_j (1/s_j) Σ_{i ∈ rows of block j} Π_{v ∈ B_j} ∇^{deg v} l_i``; averaged over every
  split of a tiny group, the sketch equals the complete U-statistic;
* ``skewed_signs``/``SKEWED`` moments, ``sketchable``, the tuples-in-groups fallback of
  blocks of four nodes;
* statistical (seeded): ``measure(estimator="sketch")`` is unbiased for every order-3
  contraction with calibrated standard errors, and the reported 95% intervals of
  ``"sketch"`` (1 and 2 replicates) and ``"auto"`` cover the exact values 95% of the time.

The ground truth never comes from the code under test: it is
``perturb.reference.derivative_tensors`` (materialized per-row tensors) contracted by the
einsums below or by ``Contraction.value``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string
from unittest import mock

import numpy as np
import pytest
import torch
from measure_models import F64, _one_thread, poly_loss  # noqa: F401

from perturb import Contraction, Epochs, Online, series
from perturb.numeric import allocation
from perturb.numeric.adapters import objective
from perturb.numeric.engine import Net
from perturb.numeric.intervals import t_half_width
from perturb.numeric.measuring import measure, requested_contractions
from perturb.numeric.networks import tuple_networks, tuple_size
from perturb.numeric.sketches import SKEWED, Sketcher, sketchable, skewed_signs
from perturb.reference.tensors import derivative_tensors

THETA = torch.tensor([0.3, -0.2, 0.4], dtype=F64)
BIG_CHUNK = 1 << 16  # rows per batched call: the tiny landscapes here fit whole


def _rows(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=gen, dtype=F64) * 2 - 1


# ----------------------------------------------------------------- materialized networks
def _edge_indices(parents) -> list[str]:
    """Each node's einsum indices: one letter per edge (children's edges, then its own)."""
    letter = {v: string.ascii_lowercase[v - 1] for v in range(1, len(parents))}
    out = []
    for v, p in enumerate(parents):
        idx = [letter[c] for c in range(len(parents)) if parents[c] == v]
        if p >= 0:
            idx.append(letter[v])
        out.append("".join(idx))
    return out


def _block_rows(net: Net, split: torch.Tensor) -> list[torch.Tensor]:
    """Block j takes the parts j, j + b, j + 2b, … of the split: ``(K, s_j)`` rows."""
    b, m = len(net.blocks), split.shape[1]
    return [split[:, list(range(j, m, b)), :].reshape(split.shape[0], -1) for j in range(b)]


def _contract(net: Net, tensors: dict[int, torch.Tensor]) -> torch.Tensor:
    """Contract per-group node tensors ``{v: (K, P, …)}`` along the tree: ``(K,)``/``(K, P)``."""
    idx = _edge_indices(net.parents)
    specs, ops = [], []
    for v in range(len(net.parents)):
        if v == 0 and net.open_root:
            continue
        specs.append("Z" + idx[v])
        ops.append(tensors[v])
    out = "Z" + (idx[0] if net.open_root else "")
    return torch.einsum(",".join(specs) + "->" + out, *ops)


def _weighted_by_hand(net, derivs, split, weights) -> torch.Tensor:
    """Every node of block j is ``Σ_i w_{j,i} ∇^{deg v} l_i`` over the block's rows."""
    idx = _edge_indices(net.parents)
    rows = _block_rows(net, split)
    tensors = {}
    for j, block in enumerate(net.blocks):
        for v in block:
            per_row = derivs[len(idx[v])][rows[j]]  # (K, s_j, P, …)
            tensors[v] = torch.einsum("ks,ks...->k...", weights[j], per_row)
    return _contract(net, tensors)


def _moment_by_hand(net, derivs, split) -> torch.Tensor:
    """``Π_j (1/s_j) Σ_{i ∈ block j} Π_{v ∈ B_j} ∇^{deg v} l_i``: the per-part moment."""
    idx = _edge_indices(net.parents)
    rows = _block_rows(net, split)
    specs, ops = [], []
    scale = 1.0
    for j, block in enumerate(net.blocks):
        sample = string.ascii_uppercase[j]
        scale *= rows[j].shape[1]
        for v in block:
            specs.append("Z" + sample + idx[v])
            ops.append(derivs[len(idx[v])][rows[j]])
    out = "Z" + (idx[0] if net.open_root else "")
    return torch.einsum(",".join(specs) + "->" + out, *ops) / scale


def _weights_of(net, split, signs) -> list[torch.Tensor]:
    """The weights the module notes prescribe: ``1/s`` alone, ``ε_i / s^{1/q}`` in a q-block."""
    k, m, b = split.shape[0], split.shape[1], len(net.blocks)
    out = []
    for j, block in enumerate(net.blocks):
        parts = list(range(j, m, b))
        s = len(parts) * split.shape[2]
        q = len(block)
        if q == 1:
            out.append(torch.full((k, s), 1.0 / s, dtype=F64))
        else:
            out.append(signs[q][:, parts, :].reshape(k, -1) / s ** (1.0 / q))
    return out


def _all_patterns(net, m, s):
    """Every sign pattern of the rows of the net's 2- and 3-node blocks, one per group.

    Returns ``(signs, probabilities)``: ``signs[q]`` is ``(K, m, s)``, NaN wherever the
    net must not look (rows of other blocks), and the patterns' probabilities ``(K,)``.
    """
    a, b_, p = SKEWED
    values = {2: ((1.0, 0.5), (-1.0, 0.5)), 3: ((a, p), (b_, 1 - p))}
    nb = len(net.blocks)
    slots = []  # (q, part, position)
    for j, block in enumerate(net.blocks):
        if len(block) >= 2:
            slots += [(len(block), part, i) for part in range(j, m, nb) for i in range(s)]
    combos = list(itertools.product(*(values[q] for q, _, _ in slots)))
    k = len(combos)
    signs = {q: torch.full((k, m, s), math.nan, dtype=F64) for q in (2, 3)}
    prob = torch.ones(k, dtype=F64)
    for g, combo in enumerate(combos):
        for (q, part, i), (value, pr) in zip(slots, combo, strict=True):
            signs[q][g, part, i] = value
            prob[g] *= pr
    return signs, prob


# Moment networks (parents, blocks, open root, parts m, rows per part s): singleton-only,
# 2-node blocks (adjacent and not, two of them), 3-node blocks (with the root and without),
# and open-root (displacement) networks.  m > b exercises "block j takes parts j, j+b, …".
NETWORKS = {
    "G·H·G": ((-1, 0, 1), ((0,), (1,), (2,)), False, 4, 2),
    "tr(C H) moment": ((-1, 0, 0), ((0,), (1, 2)), False, 3, 3),
    "J:S moment": ((-1, 0, 0, 0), ((0,), (1, 2, 3)), False, 2, 3),
    "E[g g H] (root in a 3-block)": ((-1, 0, 0), ((0, 1, 2),), False, 1, 3),
    "C·<g,J> (two 2-blocks)": ((-1, 0, 1, 1), ((0, 2), (1, 3)), False, 2, 2),
    "G <g,H>_(c,ab) H (2-block, not adjacent)": ((-1, 0, 1, 2), ((0,), (1, 3), (2,)), False, 3, 3),
    "H·G (open)": ((-1, 0, 1), ((1,), (2,)), True, 2, 3),
    "H·H·G (open)": ((-1, 0, 1, 2), ((1,), (2,), (3,)), True, 4, 2),
    "[J C]_a (open, 2-block)": ((-1, 0, 1, 1), ((1,), (2, 3)), True, 3, 3),
    "[<g,g,J>]_a (open, 3-block)": ((-1, 0, 1, 1), ((1, 2, 3),), True, 1, 3),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_is_the_weighted_contraction_and_averages_to_the_part_moment(name):
    parents, blocks, open_root, m, s = NETWORKS[name]
    net = Net(parents=parents, blocks=blocks, open_root=open_root)
    rows = _rows(m * s + 3, seed=1)
    derivs = derivative_tensors(poly_loss, rows, THETA, 3)
    obj = objective(poly_loss, rows, THETA)
    signs, prob = _all_patterns(net, m, s)
    k = prob.shape[0]
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(2))
    split = order[: m * s].reshape(1, m, s).expand(k, m, s).contiguous()  # one split, K patterns
    sketcher = Sketcher(obj, split.reshape(k, -1), torch.Generator().manual_seed(0))
    got = sketcher.network(net, split, signs, name)
    assert got.dtype == torch.float64 and got.shape == ((k, 3) if open_root else (k,))
    assert torch.isfinite(got).all()  # NaN signs outside the probed blocks were never read
    # every pattern: the weighted node tensors contracted by hand
    want = _weighted_by_hand(net, derivs, split, _weights_of(net, split, signs))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    # the average over every pattern: the moment of the parts, exactly
    mean = torch.einsum("k,k...->...", prob, got)
    moment = _moment_by_hand(net, derivs, split[:1])[0]
    assert abs(float(prob.sum()) - 1) < 1e-14
    torch.testing.assert_close(mean, moment, rtol=1e-12, atol=1e-13)
    if all(len(b) == 1 for b in blocks):  # no probes: the product of the part means
        assert k == 1


def _ordered_splits(n: int, m: int, s: int) -> torch.Tensor:
    """Every ordered split of rows ``0..n-1`` into ``m`` labelled parts of ``s``: ``(S, m, s)``."""
    seen = set()
    for perm in itertools.permutations(range(n)):
        key = tuple(tuple(sorted(perm[i * s : (i + 1) * s])) for i in range(m))
        seen.add(key)
    return torch.tensor(sorted(seen))


def test_averaging_over_every_split_gives_the_complete_u_statistic():
    rows = _rows(6, seed=3)
    d = derivative_tensors(poly_loss, rows, THETA, 3)
    g, h = d[1], d[2]
    obj = objective(poly_loss, rows, THETA)
    gen = torch.Generator().manual_seed(0)
    none = {q: torch.full((1, 1, 1), math.nan, dtype=F64) for q in (2, 3)}

    # G·G on 4 rows: the 6 ordered splits into 2 parts of 2 (3 distinct products)
    splits = _ordered_splits(4, 2, 2)
    assert splits.shape == (6, 2, 2)
    gg = Net(parents=(-1, 0), blocks=((0,), (1,)), open_root=False)
    sk = Sketcher(obj, splits.reshape(6, -1), gen)
    signs = {q: v.expand(6, 2, 2) for q, v in none.items()}
    values = sk.network(gg, splits, signs, "G·G")
    total = g[:4].sum(0)
    u_stat = (total @ total - (g[:4] * g[:4]).sum()) / (4 * 3)
    assert abs(float(values.mean()) - float(u_stat)) < 1e-13
    assert len({round(float(v), 12) for v in values}) == 3

    # G·H·G on 6 rows: the 90 ordered splits into 3 parts of 2
    splits = _ordered_splits(6, 3, 2)
    assert splits.shape == (90, 3, 2)
    ghg = Net(parents=(-1, 0, 1), blocks=((0,), (1,), (2,)), open_root=False)
    sk = Sketcher(obj, splits.reshape(90, -1), gen)
    signs = {q: v.expand(90, 3, 2) for q, v in none.items()}
    values = sk.network(ghg, splits, signs, "G·H·G")
    triple = torch.einsum("ia,jab,kb->ijk", g, h, g)
    distinct = [(i, j, k) for i, j, k in itertools.permutations(range(6), 3)]
    u_stat = sum(float(triple[i, j, k]) for i, j, k in distinct) / len(distinct)
    assert abs(float(values.mean()) - u_stat) < 1e-13


def test_values_over_every_split_and_sign_is_the_u_statistic_of_tr_ch(monkeypatch):
    # tr(C H) = E[H]:E[g gᵀ] − E g·E[H]·E g on 6 rows, m = 3 parts of 2.  Sketcher.values
    # is fed 90 groups holding the same 6 rows, group j split by the j-th of the 90
    # ordered splits, and 4 replicates, replicate r carrying the r-th Rademacher pattern
    # of part 1 (the rows of the 2-node block of the network ((0,), (1, 2)) when m = 3:
    # block 0 takes parts 0 and 2); every other sign is NaN, never to be read.  The mean
    # over the groups of the replicates' mean is then exactly the complete U-statistic
    #   Σ_{i≠j} tr(H_i g_j g_jᵀ)/(n(n−1)) − Σ_{i,j,k distinct} g_jᵀ H_i g_k/(n(n−1)(n−2)).
    rows = _rows(6, seed=4)
    d = derivative_tensors(poly_loss, rows, THETA, 3)
    g, h = d[1], d[2]
    trch = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    assert tuple_size(trch) == 3
    assert sorted((n.blocks, w) for n, w in tuple_networks(trch)) == [
        (((0,), (1,), (2,)), -1.0),
        (((0,), (1, 2)), 1.0),
    ]
    splits = _ordered_splits(6, 3, 2)
    k = splits.shape[0]
    assert k == 90
    draws = []
    for pattern in itertools.product((1.0, -1.0), repeat=2):
        signs = {q: torch.full((k, 3, 2), math.nan, dtype=F64) for q in (2, 3)}
        signs[2][:, 1] = torch.tensor(pattern, dtype=F64)
        draws.append((splits, signs))
    feed = iter(draws)
    obj = objective(poly_loss, rows, THETA)
    sk = Sketcher(obj, torch.arange(6).repeat(k, 1), torch.Generator().manual_seed(0))
    monkeypatch.setattr(sk, "_draw", lambda m: next(feed))
    got = sk.values(trch, replicates=4)
    assert next(feed, None) is None  # one draw per replicate
    assert got.shape == (k,) and torch.isfinite(got).all()
    n = 6
    pair = torch.einsum("iab,ja,jb->ij", h, g, g)
    first = sum(float(pair[i, j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    triple = torch.einsum("ja,iab,kb->ijk", g, h, g)
    second = sum(float(triple[i, j, k]) for i, j, k in itertools.permutations(range(n), 3))
    u_stat = first - second / (n * (n - 1) * (n - 2))
    assert abs(float(got.mean()) - u_stat) < 1e-12 * max(1, abs(u_stat))


def test_values_draws_random_splits_of_each_group():
    # G·G on 4 rows: a split gives one of the three products ḡ_A·ḡ_B.  2400 groups holding
    # the same 4 rows (Sketcher does not need disjoint groups): every value is one of the
    # three, each drawn with probability 1/3; the count of each is Binomial(2400, 1/3),
    # sd 23.1, and a band of ±140 (6 sd) fails with probability < 1e-8.
    rows = _rows(4, seed=5)
    g = derivative_tensors(poly_loss, rows, THETA, 1)[1]
    products = sorted(
        float(g[list(a)].mean(0) @ g[[i for i in range(4) if i not in a]].mean(0))
        for a in ((0, 1), (0, 2), (0, 3))
    )
    obj = objective(poly_loss, rows, THETA)
    layout = torch.arange(4).repeat(2400, 1)
    sk = Sketcher(obj, layout, torch.Generator().manual_seed(7), chunk_size=BIG_CHUNK)
    gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))
    values = sk.values(gg, replicates=1).numpy()
    assert values.shape == (2400,) and values.dtype == np.float64
    nearest = np.abs(values[:, None] - np.array(products)[None, :]).argmin(axis=1)
    assert np.allclose(values, np.array(products)[nearest], rtol=0, atol=1e-12)
    counts = np.bincount(nearest, minlength=3)
    assert np.all(np.abs(counts - 800) < 140), counts
    # two replicates average two independent splits: values are means of two products
    two = sk.values(gg, replicates=2).numpy()
    pair_means = {round((a + b) / 2, 10) for a in products for b in products}
    assert {round(float(v), 10) for v in two} <= pair_means
    assert len({round(float(v), 10) for v in two}) > 3  # not a single split reused


def test_skewed_sign_moments():
    a, b, p = SKEWED
    assert 0 < p < 1
    assert abs(a * p + b * (1 - p)) < 1e-15  # E ε = 0
    assert abs(a**3 * p + b**3 * (1 - p) - 1) < 1e-15  # E ε³ = 1
    assert abs(a - 4 ** (1 / 3)) < 1e-15 and abs(b + a / 2) < 1e-15 and abs(p - 1 / 3) < 1e-15
    # the draws take the two values only, a with probability p: the count of a in 300000
    # draws is Binomial(300000, 1/3), sd 258; a band of ±1500 (5.8 sd) fails w.p. < 1e-8
    e = skewed_signs((300_000,), torch.Generator().manual_seed(0))
    values = e.double()
    is_a = torch.isclose(values, torch.tensor(a, dtype=F64), rtol=1e-6, atol=0)
    is_b = torch.isclose(values, torch.tensor(b, dtype=F64), rtol=1e-6, atol=0)
    assert bool((is_a | is_b).all())
    assert abs(int(is_a.sum()) - 100_000) < 1500


def test_skewed_signs_are_exact_in_float64():
    # (an earlier version drew them in float32: E ε³ = 1 − 3.7e-8)
    a, b, p = SKEWED
    draws = skewed_signs((64,), torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float64
    values = draws.unique()
    assert sorted(values.tolist()) == sorted([a, b])
    third = sum(v**3 * (p if v > 0 else 1 - p) for v in values.tolist())
    assert abs(third - 1) < 1e-15


ORDER3 = (Online(steps=3, batch_size=2), Epochs(train_size=4, batch_size=2, epochs=2))


def test_sketchable():
    assert sketchable(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))))  # tr(C H)
    assert sketchable(Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3))))  # J:S
    assert sketchable(Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,))))  # G·H·G
    assert not sketchable(Contraction(parents=(-1, 0, 0, 0), parts=((0, 1, 2, 3),)))
    cs = requested_contractions(3, ORDER3, ("test", "train", "displacement"))
    unsketchable = sorted(c.text for c in cs.values() if not sketchable(c))
    # exactly the cumulants of one 4-node tensor: their refinement into a single block of
    # four nodes would pick up E[ε²]² ≠ 0
    assert unsketchable == ["⟨∇l,∇l,∇l,∇³l⟩_(a,b,c,abc)", "⟨∇l,∇l,∇∇l,∇∇l⟩_(b,c,ac,ab)"]
    for c in cs.values():
        largest = max(len(b) for net, _ in tuple_networks(c) for b in net.blocks)
        assert sketchable(c) == (largest <= 3), c.text


def test_four_node_blocks_fall_back_to_tuples_in_groups(monkeypatch):
    # ⟨∇l,∇l,∇l,∇³l⟩_(a,b,c,abc): its refinement ((0, 1, 2, 3),) is one block of four
    # nodes, evaluated on disjoint tuples inside each group; every other refinement is
    # sketched on the (here fixed) split and signs.  By hand: the fallback is the mean over
    # the ⌊n_g/m⌋ tuples of consecutive layout rows of ∇³l_r[g_r, g_r, g_r], r the
    # tuple's first row (the single block takes column 0).
    cs = requested_contractions(3, (Online(),), ("train",))
    (c,) = [c for c in cs.values() if c.text == "⟨∇l,∇l,∇l,∇³l⟩_(a,b,c,abc)"]
    m = tuple_size(c)
    assert m == 4 and not sketchable(c)
    k, n_g = 3, 10  # two tuples per group, two rows left over
    rows = _rows(k * n_g + 4, seed=6)
    d = derivative_tensors(poly_loss, rows, THETA, 3)
    gen = torch.Generator().manual_seed(8)
    layout = torch.randperm(rows.shape[0], generator=gen)[: k * n_g].reshape(k, n_g)
    size = n_g // m
    split = layout[:, torch.randperm(n_g, generator=gen)[: m * size]].reshape(k, m, size)
    signs = {
        2: (torch.randint(0, 2, (k, m, size), generator=gen) * 2 - 1).double(),
        3: torch.where(
            torch.rand(k, m, size, generator=gen) < SKEWED[2],
            torch.tensor(SKEWED[0], dtype=F64),
            torch.tensor(SKEWED[1], dtype=F64),
        ),
    }
    obj = objective(poly_loss, rows, THETA)
    sk = Sketcher(obj, layout, torch.Generator().manual_seed(0))
    monkeypatch.setattr(sk, "_draw", lambda parts: (split, signs))
    got = sk.values(c, replicates=1)

    want = torch.zeros(k, dtype=F64)
    fallback = 0
    for net, weight in tuple_networks(c):
        if max(len(b) for b in net.blocks) <= 3:
            w = _weights_of(net, split, signs)
            want += weight * _weighted_by_hand(net, d, split, w)
        else:
            assert net.blocks == ((0, 1, 2, 3),)
            fallback += 1
            first = layout[:, : (n_g // m) * m].reshape(k, n_g // m, m)[:, :, 0]  # (K, 2)
            gr = d[1][first]
            per_tuple = torch.einsum("ktabc,kta,ktb,ktc->kt", d[3][first], gr, gr, gr)
            want += weight * per_tuple.mean(dim=1)
    assert fallback == 1
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    # and tuple_values: every refinement on the same tuples, the tuple estimator in groups
    tv = sk.tuple_values(c)
    assert tv.shape == (k,) and torch.isfinite(tv).all()


def test_group_smaller_than_the_tuple_is_an_error():
    rows = _rows(6, seed=9)
    obj = objective(poly_loss, rows, THETA)
    sk = Sketcher(obj, torch.arange(6).reshape(2, 3), torch.Generator().manual_seed(0))
    js = Contraction(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3)))  # 4 distinct rows
    with pytest.raises(ValueError, match="needs 4 distinct rows per group"):
        sk.values(js, replicates=1)
    with pytest.raises(ValueError, match="needs 4 distinct rows per group"):
        sk.tuple_values(js)


def test_non_finite_derivative_names_the_row():
    rows = _rows(8, seed=10)
    rows[5, 0] = 2.0  # sqrt(θ_0 + 1 − x_0) is NaN at row 5 only

    def loss(p, x):
        return torch.sqrt(p[0] + 1 - x[0]) + (p * x).sum()

    obj = objective(loss, rows, THETA)
    sk = Sketcher(obj, torch.arange(8).reshape(1, 8), torch.Generator().manual_seed(0))
    gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))
    with pytest.raises(ValueError, match=r"non-finite derivative .* at data row 5"):
        sk.values(gg, replicates=1)


# ----------------------------------------------------------------- statistical: bias
def test_sketch_unbiased_and_calibrated():
    # Every order-3 contraction of the test and train loss and of the displacement, online
    # and epochs.  Population: 40 rows of the polynomial landscape, uniform noise; truth
    # from materialized tensors.  reps = 300 replicates of per = 4 groups of 8 iid rows
    # (drawn with replacement), measured in one call as 1200 groups (a random split of iid
    # rows into groups gives iid groups): replicate r is groups 4r..4r+3, its estimate
    # their mean and its SE² their variance / 4, unbiased for Var(estimate).
    reps, per, size = 300, 4, 8
    gen = torch.Generator().manual_seed(13)
    population = torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1
    derivs = derivative_tensors(poly_loss, population, THETA, 3)
    draws = population[torch.randint(0, 40, (reps * per * size,), generator=gen)]
    stats = measure(
        poly_loss,
        draws,
        THETA,
        order=3,
        schedules=ORDER3,
        quantities=("test", "train", "displacement"),
        groups=reps * per,
        seed=5,
        chunk_size=BIG_CHUNK,
        progress=False,
        estimator="sketch",
    )
    assert stats.meta["estimator"] == "sketch" and stats.meta["replicates"] == 1
    assert stats.groups == reps * per and stats.rows == reps * per * size
    assert len(stats.contractions) == 36
    ratios, checked = [], 0
    for key, c in stats.contractions.items():
        truth = np.asarray(c.value(derivs).numpy(), dtype=float).reshape(-1)
        groups = stats.group_values[key].reshape(reps, per, -1)
        assert groups.dtype == np.float64
        est = groups.mean(axis=1)
        se2 = groups.var(axis=1, ddof=1) / per
        for j in range(est.shape[1]):
            sem = math.sqrt(se2[:, j].mean() / reps)
            # |z| > 4.5 has probability 7e-6 for a normal z; the mean of 1200 iid group
            # values is close to normal, so over the 58 comparisons here about 0.04% false
            # failures (the seed is fixed, so the outcome itself is deterministic).
            z = (est[:, j].mean() - truth[j]) / sem
            assert abs(z) < 4.5, f"{c.text}[{j}]: mean {est[:, j].mean()} vs {truth[j]} (z={z})"
            ratios.append(est[:, j].var(ddof=1) / se2[:, j].mean())
            checked += 1
    assert checked == 58  # 25 scalars, 11 vectors of P = 3
    # Calibration: E[SE²] = Var(estimate).  The variance of 300 estimates has a relative
    # sd of sqrt((2 + κ)/299), κ the excess kurtosis of an estimate (a mean of 4 group
    # values): about 0.1 for the light-tailed statistics, up to 0.25 for the probed
    # 3-node blocks (group values with κ ≈ 30).  Each ratio in [0.45, 1.8] is outside at
    # more than 3 sd for the heaviest, and the median of the 58 must be close to 1.
    # Simulated over 40 other draws and seeds: the extreme ratios were 0.70 and 1.35, the
    # medians in [0.96, 1.05], the largest |z| 3.8.
    ratios = np.array(ratios)
    assert np.all((ratios > 0.45) & (ratios < 1.8)), ratios
    assert 0.85 < np.median(ratios) < 1.15, np.median(ratios)


# ----------------------------------------------------------------- statistical: coverage
COVER_SCHEDULE = Online(steps=3, batch_size=2)
COVER_LR = 0.5
COVER_K = 16  # groups per seed: the default of measure
COVER_ROWS = 8  # rows per group (twice the m = 4 distinct rows of order 3)
CONFIGS = {
    "sketch": {"estimator": "sketch", "replicates": 1},
    "sketch-r2": {"estimator": "sketch", "replicates": 2},
    "sketch-probes": {"estimator": "sketch", "probe_blocks": 3},
    "auto": {"estimator": "auto"},
}


def _exact_prediction(order, quantity, truth_of, lr) -> float:
    """The series value from the exact contraction values and the series coefficients."""
    terms = series(order, COVER_SCHEDULE, quantity).terms
    return sum(float(t.coefficient) * lr**t.power * truth_of(t.contraction) for t in terms)


def _block_coverage(values: np.ndarray, truth: float, k: int) -> float:
    """Consecutive blocks of ``k`` groups as independent measurements of ``k`` groups:
    the fraction whose interval ``mean ± t_{0.975, k−1}·sd/√k`` covers ``truth``."""
    blocks = values.reshape(-1, k)
    se = blocks.std(axis=1, ddof=1) / math.sqrt(k)
    half = t_half_width(1.0, k) * se  # t_half_width is linear in the standard error
    return float(np.mean(np.abs(blocks.mean(axis=1) - truth) <= half))


# Checked in every configuration: the predictions of the test and train loss, a
# singleton-only network, one with a 2-node block and one with a 3-node block, on the
# polynomial landscape.  Coverage measured with 20000 seeds (sd 0.0015) at K = 16
# (default sketch: no probes, blocks of 2+ nodes on tuples inside the groups):
#                                       sketch  sketch-r2  sketch-probes  auto
#   test loss at η = 0.5                 0.953    0.948      0.953       0.948
#   train loss at η = 0.5                0.951    0.949      0.944       0.949
#   G·H·G                                0.948    0.942      0.948       0.952
#   G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc  (2-node)   0.954    0.955      0.954       0.951
#   G_a ⟨∇l,∇l,∇³l⟩_(b,c,abc) (3-node)   0.960    0.958      0.956       0.959
COVER_CHECKS = ("G·H·G", "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc", "G_a ⟨∇l,∇l,∇³l⟩_(b,c,abc)")
# Statistics whose group values are far from normal when probed (a quadratic or cubic
# form in the signs; excess kurtosis up to 30), 20000 seeds, sketch / sketch-r2 /
# sketch-probes (probe_blocks=3) / auto: tr(C H) 0.943 / 0.943 / 0.924 / 0.943,
# tr(C) 0.945 / 0.946 / 0.924 / 0.945, ⟨∇l,∇l,∇∇l⟩_(a,b,ab) 0.953 / 0.952 / 0.913 /
# 0.954, H_ac ⟨∇l,∇l,∇∇l⟩_(b,c,ab) 0.952 / 0.951 / 0.892 / 0.951, J:S 0.954 / 0.955 /
# 0.963 / 0.955.  With probes they undercover (why probes are opt-in); without, every
# one lies in [0.94, 0.96].
PROBED_CHECKS = ("tr(C H)", "tr(C)", "⟨∇l,∇l,∇∇l⟩_(a,b,ab)", "H_ac ⟨∇l,∇l,∇∇l⟩_(b,c,ab)", "J:S")
_BLOCKS: dict = {}


def _blocks_measurement(config: str, seeds: int):
    """One ``measure`` call of ``seeds × K`` groups of 8 iid rows (and the exact values).

    Groups are disjoint samples of iid rows, so consecutive blocks of K groups are
    independent measurements of K groups each ("auto" shares one pilot, on rows of its
    own, across the blocks; its clock is a counter, so no plan can depend on the
    machine's speed or load)."""
    if (config, seeds) not in _BLOCKS:
        k, size = COVER_K, COVER_ROWS
        gen = torch.Generator().manual_seed(21)
        population = torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1
        derivs = derivative_tensors(poly_loss, population, THETA, 3)
        kw = dict(CONFIGS[config])
        n = seeds * k * size
        if kw["estimator"] == "auto":
            kw["pilot"] = 2 * 4 * seeds * k  # the least pilot: 2m rows per group
            n += kw["pilot"]
        draws = population[torch.randint(0, 40, (n,), generator=gen)]
        ticks = itertools.count().__next__  # every timed block "takes" 1 tick
        with mock.patch.object(allocation.time, "perf_counter", ticks):
            stats = measure(
                poly_loss,
                draws,
                THETA,
                order=3,
                schedules=(COVER_SCHEDULE,),
                quantities=("test", "train"),
                groups=seeds * k,
                seed=3,
                chunk_size=BIG_CHUNK,
                progress=False,
                **kw,
            )
        _BLOCKS[config, seeds] = (stats, derivs)
    return _BLOCKS[config, seeds]


def _coverages(config: str, seeds: int, names) -> dict[str, float]:
    stats, derivs = _blocks_measurement(config, seeds)
    k = COVER_K
    assert stats.groups == seeds * k and stats.rows == seeds * k * COVER_ROWS
    assert stats.meta["estimator"] == CONFIGS[config]["estimator"]

    def truth_of(c):
        return float(c.value(derivs))

    coverage = {}
    for quantity in ("test", "train"):
        terms = series(3, COVER_SCHEDULE, quantity).terms
        per_group = sum(
            float(t.coefficient) * COVER_LR**t.power * stats.group_values[stats.key(t.contraction)]
            for t in terms
        )
        exact = _exact_prediction(3, quantity, truth_of, COVER_LR)
        coverage[f"{quantity} loss"] = _block_coverage(per_group, exact, k)
        # the per-group prediction is the one Statistics.predict makes (first block)
        first = dataclasses.replace(
            stats,
            groups=k,
            group_values={key: v[:k] for key, v in stats.group_values.items()},
        )
        pred = first.predict(COVER_SCHEDULE, lr=COVER_LR, quantity=quantity)
        assert abs(pred.total[0] - per_group[:k].mean()) < 1e-12
        assert abs(pred.se[0] - per_group[:k].std(ddof=1) / math.sqrt(k)) < 1e-12
    for name in names:
        key = stats.key(name)
        coverage[name] = _block_coverage(
            stats.group_values[key], truth_of(stats.contractions[key]), k
        )
    return coverage


# Two replicates average two independent splits per group, and the interval is built from
# the group values as for one: the default run checks "sketch" (one replicate), -m slow
# "sketch-r2" as well (the same bands, the same measurements).
SLOW_R2 = pytest.param("sketch-r2", marks=pytest.mark.slow)


@pytest.mark.parametrize("config", [SLOW_R2 if c == "sketch-r2" else c for c in CONFIGS])
def test_interval_coverage(config):
    # 2000 seeds as blocks of K = 16 groups of one call.  Acceptance: coverage in
    # [92%, 98%] of the 2000.  With the coverages above (all in [0.942, 0.960]) one check
    # fails with probability ≤ 6e-5 (binomial, at p = 0.942), the 5 checks of a
    # configuration ≤ 3e-4 and the 20 of the four ≤ 1.2e-3.  "auto" is checked for
    # whatever its pilot chose (which one is test_allocation's business): the intervals
    # must cover with any mix of sketched and tuple group values.
    coverage = _coverages(config, 2000, COVER_CHECKS)
    if config == "auto":
        stats, _ = _blocks_measurement(config, 2000)
        chosen = {e["estimator"] for e in stats.meta["plan"]["contractions"].values()}
        assert chosen and chosen <= {"sketch", "tuples"}, chosen
    bad = {name: c for name, c in coverage.items() if not 0.92 <= c <= 0.98}
    assert not bad, f"{config}: coverage outside [0.92, 0.98]: {bad} (all: {coverage})"


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_interval_coverage_many_seeds(config):
    # As test_interval_coverage with 20000 seeds and the band [93%, 97%]: the coverages
    # above lie at least 0.011 = 7 binomial sd (0.0015) inside it, so a false failure
    # has probability < 1e-11 per check.
    coverage = _coverages(config, 20000, COVER_CHECKS)
    del _BLOCKS[config, 20000]  # 320000 groups: free them
    bad = {name: c for name, c in coverage.items() if not 0.93 <= c <= 0.97}
    assert not bad, f"{config}: coverage outside [0.93, 0.97]: {bad} (all: {coverage})"


@pytest.mark.parametrize("config", ["sketch", SLOW_R2])
def test_interval_coverage_of_probed_statistics(config):
    # The statistics with blocks of 2-3 nodes, which the default sketch (probe_blocks=1)
    # measures on tuples inside the groups: the same 2000 blocks as test_interval_coverage
    # and its band [92%, 98%].  Measured (2000 seeds, sd 0.005): sketch tr(C H) 0.9385,
    # tr(C) 0.9435, ⟨∇l,∇l,∇∇l⟩_(a,b,ab) 0.9545, H_ac ⟨∇l,∇l,∇∇l⟩_(b,c,ab) 0.9495,
    # J:S 0.9525 (sketch-r2 within 0.002 of these; 20000 seeds: 0.943 and up); the
    # lowest is 3.4 sd above 0.92, so a false failure has probability about 3e-4 per
    # check, 3e-3 for the 10.
    coverage = _coverages(config, 2000, PROBED_CHECKS)
    bad = {name: c for name, c in coverage.items() if not 0.92 <= c <= 0.98}
    assert not bad, f"{config}: coverage outside [0.92, 0.98]: {bad} (all: {coverage})"


def _lin_loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A cheap smooth landscape (few tensor operations: fast under nested torch.func)."""
    u = x @ p
    q = p @ p
    return 0.5 * q + u + u * q / 6 + x[0] * p[0] * p[1] * p[2]


AUTO_K = 64  # groups per measurement (t-intervals with 63 degrees of freedom)
# Coverage of one measure(estimator="auto") call per seed (order 2, the test and train
# loss of COVER_SCHEDULE on _lin_loss, K = 64 groups of 8 rows after a pilot of 2m rows
# per group), measured with 4000 seeds (sd 0.0035).  The pilot picks tuples for tr(C H)
# and ⟨∇l,∇l,∇∇l⟩_(a,b,ab) in all but a few seeds, and a mix for the others.
AUTO_CHECKS = {
    "test loss": 0.949,
    "train loss": 0.948,
    "G·H·G": 0.9465,
    "tr(C H)": 0.9475,  # 2-node block
    "⟨∇l,∇l,∇∇l⟩_(a,b,ab)": 0.9445,  # 3-node block
}


@pytest.mark.slow
def test_auto_interval_coverage_per_seed():
    # 1200 seeds, each a fresh iid draw of rows from the population and its own seed=, one
    # measure(estimator="auto") call each (its own pilot and choice of estimators; about
    # 0.12 s a call).  Acceptance: coverage in [93%, 97%] of the 1200, i.e. 1116..1164
    # covering seeds.  False failures (binomial, 1200 seeds, at the measured coverages
    # above): 0.2%, 0.3%, 0.6%, 0.4% and 1.4%, about 3% for the test (more if the true
    # coverages lie lower than measured; at exactly 95% it would be 0.1% per check).
    seeds, k, size, m = 1200, AUTO_K, 8, 3
    gen = torch.Generator().manual_seed(21)
    population = torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1
    derivs = derivative_tensors(_lin_loss, population, THETA, 3)
    cs = requested_contractions(2, (COVER_SCHEDULE,), ("test", "train"))
    truth = {c.text: float(c.value(derivs)) for c in cs.values()}
    exact = {
        f"{q} loss": _exact_prediction(2, q, lambda c: float(c.value(derivs)), COVER_LR)
        for q in ("test", "train")
    }
    hits = dict.fromkeys(AUTO_CHECKS, 0)
    chosen = set()
    for seed in range(seeds):
        draws = population[torch.randint(0, 40, (2 * m * k + size * k,), generator=gen)]
        st = measure(
            _lin_loss,
            draws,
            THETA,
            order=2,
            schedules=(COVER_SCHEDULE,),
            quantities=("test", "train"),
            groups=k,
            pilot=2 * m * k,
            seed=seed,
            chunk_size=BIG_CHUNK,
            progress=False,
        )
        assert st.meta["estimator"] == "auto" and st.groups == k and st.rows == size * k
        chosen |= {e["estimator"] for e in st.meta["plan"]["contractions"].values()}
        for name in AUTO_CHECKS:
            if name.endswith(" loss"):
                pred = st.predict(COVER_SCHEDULE, lr=COVER_LR, quantity=name.split()[0])
                value, se, want = pred.total[0], pred.se[0], exact[name]
            else:
                value, se, want = float(st.value(name)), float(st.se(name)), truth[name]
            hits[name] += abs(value - want) <= t_half_width(se, k)
    assert chosen == {"sketch", "tuples"}
    coverage = {name: h / seeds for name, h in hits.items()}
    bad = {name: c for name, c in coverage.items() if not 0.93 <= c <= 0.97}
    assert not bad, f"auto: coverage outside [0.93, 0.97]: {bad} (all: {coverage})"
