"""Embeddings under several epochs of several batches, and their exact sums.

The time structure of a re-summed diagram (:mod:`perturb.symbolic.resummed`) when the
schedule has ``E > 1`` epochs of ``M > 1`` batches, ``T = M·E``, each edge carrying
``x_e^{t_p − t_c − 1}`` with ``x_e = 1 − ηh_e``.

Fixed-order epochs (``E`` epochs of ``M`` batches, ``T = M·E``).  A part has a batch
index ``m`` and each of its nodes an epoch ``e_v``, at step ``t_v = e_v M + m``; the root
sits at epoch ``E``, batch ``0``.  An edge inside one epoch needs ``m_c < m_p``; across
epochs any batches, and its exponent splits as

    t_p − t_c − 1 = (e_p − e_c − 1)·M + (M − 1 − m_c) + m_p,

both pieces ``≥ 0``.  Grouping by the weak order of the nodes' epochs (``k`` levels) and
of the parts' batch indices (``j`` levels), the gaps ``f_0..f_k`` between epoch levels
(``Σf = E − k``) and ``g_0..g_j`` between batch levels (``Σg = M − j``) are free, and the
exponent of each ``x_e`` is linear in them with coefficients ``0, 1, 2`` (a crossing edge
from batch level ``a`` to ``b`` spans the gaps ``a..j`` and ``0..b−1``).  So each group is

    Π_e x_e^{c_e} (x_e^M)^{β_e − α_e − 1} · h_{M−j}(y_0..y_j) · h_{E−k}(1, w_1..w_k),

``y_i = Π_e x_e^{(multiplicity of batch gap i in e)}``, ``w_i`` the product of ``x_e^M``
over the crossing edges spanning epoch gap ``i``: a polynomial, no division, ``O(log T)``.

Reshuffled epochs (an independent uniform permutation per epoch).  A node's batch index
now depends on its epoch: group the parts by which share a training point (a set
partition, ``N^{(#points)}`` choices); in each epoch level the points used there get
their own batch weak order, of probability ``Π_i B^{(s_i)} / N^{(r)}`` for level sizes
``s_i`` of ``r`` points (falling factorials), independently per epoch.  The exponent split
above still holds, the batch gaps now per epoch level, so each group is a weight times
one ``h_{M−j}`` per epoch level and ``h_{E−k}``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from perturb.symbolic.diagrams import Diagram, set_partitions
from perturb.symbolic.schedules import Schedule

__all__ = [
    "EpochGroup",
    "EpochOrders",
    "epoch_time_sum_exact",
    "epoch_time_sum_expr",
    "is_multi_epoch",
    "multi_epoch_orders",
    "strict_weak_orders",
]


@dataclass(frozen=True)
class EpochGroup:
    """One weak order of the nodes' epochs and of the batch indices, for several epochs.

    The batch indices live in *coordinates*: under a fixed order one coordinate holds the
    parts' batch indices, shared by every epoch; under reshuffling each epoch level has
    its own coordinate, holding the batch indices of the training points used there.

    Attributes:
        epochs: ``k``, the number of distinct epochs of the non-root nodes.
        batches: per coordinate, its number ``j`` of distinct batch indices.
        spans: per edge ``(α, β, a, b)``: the epoch levels of child and parent
            (``β = k+1`` for the root) and their batch levels in the coordinates of
            those epoch levels (``b = 0`` for the root, at batch index 0 of epoch ``E``).
        coordinates: per epoch level ``1..k``, the index of its batch coordinate.
        weight: a number multiplying the group (reshuffling: probabilities and counts
            of training points, over ``B^{#parts}``).

    Example:
        >>> g = EpochGroup(epochs=1, batches=(1,), spans=((1, 2, 1, 0),), coordinates=(0,))
        >>> g.exponents()  # x^{0} (x^M)^0, batch gap 1, epoch gap 1
        ((0,), (0,), (((0,), (1,)),), ((0,), (1,)))
    """

    epochs: int
    batches: tuple[int, ...]
    spans: tuple[tuple[int, int, int, int], ...]
    coordinates: tuple[int, ...]
    weight: sp.Expr | int = 1

    def exponents(self) -> tuple[tuple, tuple, tuple, tuple]:
        """Per edge the constant exponent ``c_e`` and the multiple ``β−α−1`` of ``M``;
        per coordinate ``c`` and batch gap ``0..j_c``, and per epoch gap ``0..k``, the
        multiplicity of each edge.

        The exponent of ``x_e`` is ``c_e + M·(β_e−α_e−1) + Σ_{c,i} batch[c][i][e] g_{c,i}
        + M Σ_i epoch[i][e] f_i``: an edge inside one epoch spans the batch gaps
        ``a..b−1`` (``m_p − m_c − 1``); across epochs the gaps ``a..j`` of the child's
        coordinate (``M − 1 − m_c``) and ``0..b−1`` of the parent's (``m_p``).

        Example:
            >>> g = EpochGroup(epochs=2, batches=(2,), spans=((1, 2, 2, 1),), coordinates=(0, 0))
            >>> g.exponents()
            ((0,), (0,), (((1,), (0,), (1,)),), ((0,), (1,), (0,)))
        """
        k = self.epochs
        consts, mults, batch, epoch = [], [], [], []
        for alpha, beta, a, b in self.spans:
            bm = [[0] * (j + 1) for j in self.batches]
            em = [0] * (k + 1)
            child = self.coordinates[alpha - 1]
            if alpha == beta:  # inside one epoch: m_p − m_c − 1
                consts.append(b - a - 1)
                mults.append(0)
                for i in range(a, b):
                    bm[child][i] += 1
            else:  # across epochs: (e_p−e_c−1)M + (M−1−m_c) + m_p
                j = self.batches[child]
                consts.append(j - a + max(b - 1, 0))
                mults.append(beta - alpha - 1)
                for i in range(a, j + 1):
                    bm[child][i] += 1
                if beta <= k:
                    parent = self.coordinates[beta - 1]
                    for i in range(b):
                        bm[parent][i] += 1
                for i in range(alpha, beta):
                    em[i] += 1
            batch.append(bm)
            epoch.append(em)
        by_batch_gap = tuple(
            tuple(tuple(row[c][i] for row in batch) for i in range(j + 1))
            for c, j in enumerate(self.batches)
        )
        by_epoch_gap = tuple(tuple(row[i] for row in epoch) for i in range(k + 1))
        return tuple(consts), tuple(mults), by_batch_gap, by_epoch_gap


@dataclass(frozen=True)
class EpochOrders:
    """The time structure of a re-summed term under several epochs of several batches.

    Takes the place of :attr:`ResummedTerm.orders` for ``E > 1`` epochs of ``M > 1``
    batches (fixed order or reshuffled); the evaluators read ``M`` here and ``E = T/M``.

    Attributes:
        batches_per_epoch: ``M`` (a sympy expression).
        groups: the :class:`EpochGroup` s, one per feasible pair of weak orders.

    Example:
        >>> from perturb.symbolic.resummed import resummed_terms
        >>> from perturb.symbolic.schedules import Epochs
        >>> s = Epochs(train_size=4, batch_size=2, epochs=2)
        >>> leaf = [t for t in resummed_terms(1, s) if t.diagram.edges == 1][0]
        >>> leaf.orders.batches_per_epoch, len(leaf.orders.groups)
        (2, 1)
    """

    batches_per_epoch: sp.Expr
    groups: tuple[EpochGroup, ...]


def is_multi_epoch(schedule: Schedule) -> bool:
    """Whether ``schedule`` has several epochs of several batches (the epoch time structure).

    Example:
        >>> from perturb.symbolic.schedules import GD, Epochs, Online
        >>> [is_multi_epoch(s) for s in (Online(), GD(), Epochs(train_size=4, batch_size=2))]
        [False, False, True]
    """
    return not (schedule.single_epoch or schedule.batches == 1)


def epoch_time_sum_exact(orders: EpochOrders, xs: list, steps: int):
    """The exact sum over multi-epoch embeddings of ``Π_e x_e^{t_p − t_c − 1}``.

    Sums, over the groups, ``weight · Π_e x_e^{c_e} (x_e^M)^{β_e−α_e−1} · Π_c h_{M−j_c}(y_c)
    · h_{E−k}(w)``
    (see the module docstring) with ``h`` by its recursion
    ``h_n(z_0..z_i) = h_n(z_0..z_{i−1}) + z_i h_{n−1}(z_0..z_i)``: plain ring
    arithmetic, so ``xs`` may be sympy expressions, rationals or ``sympy.Poly`` s.

    Args:
        orders: an :class:`EpochOrders`.
        xs: one value per edge.
        steps: ``T = M·E`` (integer).

    Example:
        >>> import sympy as sp
        >>> from perturb.symbolic.resummed import resummed_terms
        >>> from perturb.symbolic.schedules import Epochs
        >>> s = Epochs(train_size=2, batch_size=1, epochs=2)  # M = 2, T = 4
        >>> leaf = [t for t in resummed_terms(1, s) if t.diagram.edges == 1][0]
        >>> x = sp.Symbol("x")
        >>> sp.expand(epoch_time_sum_exact(leaf.orders, [x], 4))  # Σ_{t<4} x^{3−t}
        x**3 + x**2 + x + 1
    """
    m = int(orders.batches_per_epoch)
    if steps % m:
        raise ValueError(f"steps must be a multiple of M = {m}, got {steps}")
    e = steps // m
    xms = [x**m for x in xs]
    total = 0
    for group in orders.groups:
        consts, mults, batch, epoch = group.exponents()
        value = 1
        for x, xm, c, q in zip(xs, xms, consts, mults, strict=True):
            value = value * x**c * xm**q
        for gaps, j in zip(batch, group.batches, strict=True):
            ys = [_product(x**p for x, p in zip(xs, col, strict=True)) for col in gaps]
            value = value * _homogeneous(ys, m - j)
        ws = [_product(xm**p for xm, p in zip(xms, col, strict=True)) for col in epoch]
        value = value * _homogeneous(ws, e - group.epochs)
        if group.weight != 1:
            value = value * group.weight
        total = total + value
    return total


def _product(factors):
    out = 1
    for f in factors:
        out = out * f
    return out


def _homogeneous(zs: list, n: int):
    """``h_n(z_0..z_j)`` by the recursion in the number of variables (exact arithmetic)."""
    if n < 0:
        return 0
    row = [1] + [0] * n  # h_m() = [m == 0]
    for z in zs:
        for m in range(1, n + 1):
            row[m] = row[m] + z * row[m - 1]
    return row[n]


def epoch_time_sum_expr(orders: EpochOrders, xs: list, m: sp.Expr, e: sp.Expr) -> sp.Expr:
    """:func:`epoch_time_sum_exact` with symbolic ``M`` and ``E`` (confluent closed forms).

    Example:
        >>> import sympy as sp
        >>> from perturb.symbolic.resummed import resummed_terms
        >>> from perturb.symbolic.schedules import Epochs
        >>> leaf = [t for t in resummed_terms(1, Epochs()) if t.diagram.edges == 1][0]
        >>> x, m, e = sp.symbols("x M E")
        >>> s = epoch_time_sum_expr(leaf.orders, [x], m, e)  # (1 + … + x^{M−1})(1 + … + x^{M(E−1)})
        >>> s
        (x**M/(x - 1) + 1/(1 - x))*((x**M)**E/(x**M - 1) + 1/(1 - x**M))
        >>> sp.simplify(s.subs({m: 3, e: 2}) - sum(x**k for k in range(6)))
        0
    """
    total = sp.Integer(0)
    for group in orders.groups:
        consts, mults, batch, epoch = group.exponents()
        value = sp.Mul(*(x**c * x ** (m * q) for x, c, q in zip(xs, consts, mults, strict=True)))
        for gaps in batch:
            ys = [sp.Mul(*(x**p for x, p in zip(xs, col, strict=True))) for col in gaps]
            value *= _confluent_power(ys, m)
        ws = [sp.Mul(*(x ** (m * p) for x, p in zip(xs, col, strict=True))) for col in epoch]
        total += group.weight * value * _confluent_power(ws, e)
    return total


def _confluent_power(zs: list[sp.Expr], steps: sp.Expr) -> sp.Expr:
    """``h_{T−j}(z_0..z_j)``: the divided difference of ``z^T``, repeated values allowed.

    ``Σ_u 1/(r_u−1)! · ∂^{r_u−1}[z^T / Π_{w≠u} (z − w)^{r_w}]`` at ``z = u`` over the
    distinct values ``u`` of multiplicity ``r_u``.
    """
    counts: dict = {}
    for z in zs:
        counts[z] = counts.get(z, 0) + 1
    var = sp.Dummy("z")
    out = sp.Integer(0)
    for u, r in counts.items():
        rest = sp.Mul(*((var - w) ** q for w, q in counts.items() if w != u))
        out += sp.diff(var**steps / rest, var, r - 1).subs(var, u) / sp.factorial(r - 1)
    return out


def strict_weak_orders(units: list, below: dict) -> list[dict]:
    """Every weak order of ``units`` (levels ``1..j``) with ``below[u]`` strictly lower than ``u``.

    Example:
        >>> strict_weak_orders([1, 2], {2: {1}})
        [{1: 1, 2: 2}]
        >>> len(strict_weak_orders([1, 2], {}))  # 1<2, 2<1, 1=2
        3
    """
    out: list[dict] = []

    def rec(remaining: frozenset, level: int, acc: dict) -> None:
        if not remaining:
            out.append(dict(acc))
            return
        minimal = [u for u in sorted(remaining) if not (below.get(u, set()) & remaining)]
        for r in range(1, len(minimal) + 1):
            for chosen in itertools.combinations(minimal, r):
                for u in chosen:
                    acc[u] = level
                rec(remaining - frozenset(chosen), level + 1, acc)
                for u in chosen:
                    del acc[u]

    rec(frozenset(units), 1, {})
    return out


def multi_epoch_orders(schedule: Schedule, diagram: Diagram) -> EpochOrders | None:
    """The :class:`EpochOrders` of ``diagram`` under ``schedule`` (``None``: no embedding).

    Example:
        >>> from perturb.symbolic.diagrams import Diagram
        >>> from perturb.symbolic.schedules import Epochs
        >>> chain = Diagram(parents=(-1, 0, 1), parts=((0,), (1, 2)))  # one point, two epochs
        >>> [g.spans for g in multi_epoch_orders(Epochs(epochs=2), chain).groups]
        [((2, 3, 1, 0), (1, 2, 1, 1))]
    """
    if schedule.shuffle:
        return _shuffled_orders(schedule, diagram)
    return _fixed_orders(schedule, diagram)


def _data_units(diagram: Diagram) -> tuple[list, dict]:
    """The parts with a non-root node (they take a training point) and each node's part."""
    units, unit_of = [], {}
    for i, part in enumerate(diagram.parts):
        members = [v for v in part if v != 0]
        if members:
            units.append(i)
            unit_of.update({v: i for v in members})
    return units, unit_of


def _fixed_orders(schedule: Schedule, diagram: Diagram) -> EpochOrders | None:
    """Feasible (epoch weak order of nodes, batch weak order of parts) pairs."""
    parents = diagram.parents
    nodes = list(range(1, diagram.nodes))
    units, unit_of = _data_units(diagram)
    groups = []
    for epoch_of in _monotone_weak_orders(nodes, parents):
        k = max(epoch_of.values(), default=0)
        below: dict = {}
        feasible = True
        for v in nodes:
            p = parents[v]
            if p > 0 and epoch_of[v] == epoch_of[p]:
                if unit_of[v] == unit_of[p]:
                    feasible = False
                    break
                below.setdefault(unit_of[p], set()).add(unit_of[v])
        if not feasible:
            continue
        for batch_of in strict_weak_orders(units, below):
            j = max(batch_of.values(), default=0)
            spans = tuple(
                (
                    epoch_of[v],
                    k + 1 if parents[v] == 0 else epoch_of[parents[v]],
                    batch_of[unit_of[v]],
                    0 if parents[v] == 0 else batch_of[unit_of[parents[v]]],
                )
                for v in nodes
            )
            groups.append(EpochGroup(epochs=k, batches=(j,), spans=spans, coordinates=(0,) * k))
    if not groups:
        return None
    return EpochOrders(batches_per_epoch=schedule.batches, groups=tuple(groups))


def _shuffled_orders(schedule: Schedule, diagram: Diagram) -> EpochOrders | None:
    """Reshuffled epochs: average over an independent uniform permutation per epoch.

    The parts' training points are grouped by which coincide (a set partition of the
    parts into distinct points); for ``r`` distinct points used in one epoch, batch
    indices with level sizes ``s_1..s_j`` have probability ``Π_i B^{(s_i)} / N^{(r)}``
    (falling factorials), independently per epoch, so each epoch level has its own
    batch coordinate.  The distinct points are chosen in ``N^{(#points)}`` ways; the
    group weight divides by the ``B^{#parts}`` already in the prefactor.
    """
    parents = diagram.parents
    nodes = list(range(1, diagram.nodes))
    units, unit_of = _data_units(diagram)
    n, b = schedule.train_size, schedule.batch_size
    groups = []
    for blocks in set_partitions(units):
        if n.is_number and len(blocks) > n:
            continue  # more distinct points than the training set holds
        point_of = {u: i for i, block in enumerate(blocks) for u in block}
        point = {v: point_of[unit_of[v]] for v in nodes}
        base = _falling(n, len(blocks)) / b ** len(units)
        for epoch_of in _monotone_weak_orders(nodes, parents):
            per_level = _shuffled_levels(nodes, parents, point, epoch_of, n, b)
            if per_level is None:
                continue
            k = len(per_level)
            for choice in itertools.product(*per_level):
                weight = base
                for _, w in choice:
                    weight *= w
                spans = tuple(
                    (
                        epoch_of[v],
                        k + 1 if parents[v] == 0 else epoch_of[parents[v]],
                        choice[epoch_of[v] - 1][0][point[v]],
                        0
                        if parents[v] == 0
                        else choice[epoch_of[parents[v]] - 1][0][point[parents[v]]],
                    )
                    for v in nodes
                )
                groups.append(
                    EpochGroup(
                        epochs=k,
                        batches=tuple(max(levels.values()) for levels, _ in choice),
                        spans=spans,
                        coordinates=tuple(range(k)),
                        weight=sp.nsimplify(sp.factor(weight)),
                    )
                )
    if not groups:
        return None
    return EpochOrders(batches_per_epoch=schedule.batches, groups=tuple(groups))


def _shuffled_levels(nodes, parents, point, epoch_of, n, b) -> list[list] | None:
    """Per epoch level, its batch weak orders of the points used there, with probabilities."""
    k = max(epoch_of.values(), default=0)
    out = []
    for level in range(1, k + 1):
        members = [v for v in nodes if epoch_of[v] == level]
        active = sorted({point[v] for v in members})
        below: dict = {}
        for v in members:
            p = parents[v]
            if p > 0 and epoch_of[p] == level:
                if point[v] == point[p]:
                    return None  # one point, one epoch: one step
                below.setdefault(point[p], set()).add(point[v])
        options = []
        for levels in strict_weak_orders(active, below):
            sizes = [list(levels.values()).count(i) for i in range(1, max(levels.values()) + 1)]
            prob = sp.Mul(*(_falling(b, size) for size in sizes)) / _falling(n, len(active))
            options.append((levels, prob))
        if not options:
            return None
        out.append(options)
    return out


def _falling(n: sp.Expr, k: int) -> sp.Expr:
    return sp.expand_func(sp.ff(n, k))


def _monotone_weak_orders(nodes: list[int], parents: tuple[int, ...]) -> list[dict]:
    """Every weak order (levels 1..k) of ``nodes`` with no child above its parent."""
    out = []
    for levels in itertools.product(range(1, len(nodes) + 1), repeat=len(nodes)):
        used = sorted(set(levels))
        if used != list(range(1, len(used) + 1)):
            continue
        level = dict(zip(nodes, levels, strict=True))
        if all(parents[v] == 0 or level[v] <= level[parents[v]] for v in nodes):
            out.append(level)
    return out
