"""Schedules (the paper's spacetimes) and exact embedding counts of diagrams.

Every schedule perturb knows is one shape: a training set of ``N = M·B`` points
drawn iid from the population, walked ``E`` times ("epochs") in ``M`` batches of
``B`` consecutive points, either in a fixed order or reshuffled each epoch, for
``T = M·E`` steps.  Online SGD with fresh samples is one epoch (``E = 1``,
``M = T``); full-batch GD is ``M = 1``, ``B = N``, ``E = T``.

An *embedding* of a diagram labels each non-root node ``v`` with a step ``t_v`` and
a training point used at that step, children strictly before parents
(``t_child < t_parent``).  In the **cumulant form** the nodes of one part share a
point and distinct parts are unconstrained; in the **moment form** distinct parts
use distinct points.  A train-loss root ``(1/N)Σ_n l_n`` takes a training point too
(without a step).  :meth:`Schedule.embeddings` returns the exact number of
labellings (its expectation over shuffles) as a sympy expression in the schedule's
symbols.

The count is organised by *levels*.  Each labelling fixes, for every node, its
epoch, and for every part, its batch index within the epoch.  Grouping labellings
by the relative order of these values (weak orders), a weak order of epochs with
``k`` distinct values is realised in ``C(E, k)`` ways and one of batch indices with
``j`` distinct values in ``C(M, j)`` ways; a batch holding ``s`` parts takes their
points in ``B^s`` ways (cumulant form) or ``B(B-1)…(B-s+1)`` ways (moment form).
An edge inside one epoch needs a strictly smaller batch index at the child.  With
reshuffling each epoch places its points by an independent uniform permutation;
moment-form counts then use the exact probability that distinct points land in
batches of a given order, and cumulant-form counts follow by summing moment-form
counts over the coarsenings of the partition (the zeta transform of the partition
lattice).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import sympy as sp

from perturb.symbolic.diagrams import Diagram, set_partitions

__all__ = ["FORMS", "GD", "Epochs", "Online", "Schedule", "cut"]

FORMS = ("cumulant", "moment")
"""The two readings of a part: joint cumulants or joint moments."""


def _positive(name: str, value: object) -> sp.Expr | None:
    if value is None:
        return None
    if isinstance(value, sp.Basic):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (symbolic), got {value!r}")
    return sp.Integer(value)


@dataclass(frozen=True)
class Schedule:
    """A training schedule: ``E`` epochs of ``M`` batches of ``B`` points.

    Prefer the constructors :class:`Online`, :class:`Epochs` and :class:`GD`.  Every
    size may be a positive ``int`` or a sympy expression (symbolic).

    Attributes:
        batches: ``M``, batches per epoch.
        batch_size: ``B``.
        epochs: ``E``.
        shuffle: reshuffle the training set before each epoch.
        name: a short label.

    Example:
        >>> s = Epochs(train_size=6, batch_size=2, epochs=2)
        >>> s.train_size, s.steps, s.single_epoch, s.is_numeric
        (6, 6, False, True)
        >>> Online().steps, Online().is_numeric
        (T, False)
    """

    batches: sp.Expr
    batch_size: sp.Expr
    epochs: sp.Expr
    shuffle: bool = False
    name: str = "schedule"

    @property
    def train_size(self) -> sp.Expr:
        """``N = M·B``.

        Example:
            >>> Online(steps=10, batch_size=2).train_size
            20
        """
        return sp.simplify(self.batches * self.batch_size)

    @property
    def steps(self) -> sp.Expr:
        """``T = M·E``.

        Example:
            >>> Epochs(train_size=6, batch_size=2).steps
            3*E
        """
        return sp.simplify(self.batches * self.epochs)

    @property
    def single_epoch(self) -> bool:
        """Whether each point is used at one step only (so the path condition holds).

        Example:
            >>> Online().single_epoch, GD().single_epoch
            (True, False)
        """
        return self.epochs == 1

    @property
    def is_numeric(self) -> bool:
        """Whether every size is a number.

        Example:
            >>> GD(train_size=4, steps=3).is_numeric, GD(train_size=4).is_numeric
            (True, False)
        """
        return all(sp.sympify(x).is_number for x in (self.batches, self.batch_size, self.epochs))

    def embeddings(
        self, diagram: Diagram, *, form: str = "cumulant", train_root: bool = False
    ) -> sp.Expr:
        """Exact number of embeddings of ``diagram`` (expected over shuffles).

        Args:
            diagram: the diagram; node 0 is the root.
            form: ``"cumulant"`` (parts may share a point) or ``"moment"`` (distinct
                parts use distinct points).
            train_root: whether the root is a training point (train loss); then the
                root's part, too, is labelled by a point.  Otherwise the root's part
                must be the root alone.

        Returns:
            The count as a sympy expression in this schedule's symbols.

        Example:
            >>> from perturb.symbolic.diagrams import Diagram
            >>> chain = Diagram(parents=(-1, 0, 1), parts=((0,), (1,), (2,)))
            >>> Online().embeddings(chain).factor()
            B**2*T*(T - 1)/2
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not train_root and not diagram.root_alone:
            raise ValueError(
                "a test-loss root must be alone in its part; pass train_root=True for the "
                f"train loss (got parts {diagram.parts})"
            )
        key = (diagram.parents, diagram.parts, train_root)
        if form == "moment":
            return _moment_count(self, *key)
        if not self.shuffle or self.single_epoch:
            return _level_count(self, *key, weights="power")
        total = sp.Integer(0)
        for merged in _coarsenings(diagram.parts, train_root):
            total += _moment_count(self, diagram.parents, merged, train_root)
        return sp.cancel(total)


def Online(*, steps: int | sp.Expr | None = None, batch_size: int | sp.Expr | None = None):
    """Online SGD: ``T`` steps, each on ``B`` fresh iid samples.

    Args:
        steps: ``T``; ``None`` keeps the symbol ``T``.
        batch_size: ``B``; ``None`` keeps the symbol ``B``.

    Example:
        >>> Online(steps=10, batch_size=2).train_size
        20
    """
    t = _positive("steps", steps)
    b = _positive("batch_size", batch_size)
    return Schedule(
        batches=sp.Symbol("T", positive=True, integer=True) if t is None else t,
        batch_size=sp.Symbol("B", positive=True, integer=True) if b is None else b,
        epochs=sp.Integer(1),
        shuffle=False,
        name="online",
    )


def Epochs(
    *,
    train_size: int | sp.Expr | None = None,
    batch_size: int | sp.Expr | None = None,
    epochs: int | sp.Expr | None = None,
    shuffle: bool = False,
):
    """Multi-epoch SGD on a training set of ``N`` iid points in batches of ``B``.

    Args:
        train_size: ``N``; ``None`` keeps the symbol ``N``.
        batch_size: ``B``, dividing ``N``; ``None`` keeps the symbol ``B``.
        epochs: ``E``; ``None`` keeps the symbol ``E``.
        shuffle: reshuffle before each epoch (``False``: the same order every epoch).

    Example:
        >>> s = Epochs(train_size=6, batch_size=2, epochs=3)
        >>> s.batches, s.steps
        (3, 9)
    """
    n = _positive("train_size", train_size)
    b = _positive("batch_size", batch_size)
    e = _positive("epochs", epochs)
    n = sp.Symbol("N", positive=True, integer=True) if n is None else n
    b = sp.Symbol("B", positive=True, integer=True) if b is None else b
    if n.is_number and b.is_number and n % b != 0:
        raise ValueError(f"batch_size must divide train_size, got B={b} and N={n}")
    return Schedule(
        batches=n / b,
        batch_size=b,
        epochs=sp.Symbol("E", positive=True, integer=True) if e is None else e,
        shuffle=bool(shuffle),
        name="epochs",
    )


def GD(*, train_size: int | sp.Expr | None = None, steps: int | sp.Expr | None = None):
    """Full-batch gradient descent: ``T`` steps on the whole training set of ``N``.

    Example:
        >>> GD(train_size=4, steps=3).batch_size
        4
    """
    n = _positive("train_size", train_size)
    t = _positive("steps", steps)
    return Schedule(
        batches=sp.Integer(1),
        batch_size=sp.Symbol("N", positive=True, integer=True) if n is None else n,
        epochs=sp.Symbol("T", positive=True, integer=True) if t is None else t,
        shuffle=False,
        name="gd",
    )


# ----------------------------------------------------------------------- counting


def cut(schedule: Schedule, steps: int) -> Schedule:
    """The schedule's first ``steps`` steps, itself a schedule (for epochs: whole epochs).

    Example:
        >>> cut(GD(train_size=8, steps=10), 4).steps
        4
        >>> cut(Epochs(train_size=4, batch_size=2, epochs=3), 4).epochs
        2
    """
    if schedule.name == "epochs":
        return Epochs(
            train_size=int(schedule.train_size),
            batch_size=int(schedule.batch_size),
            epochs=steps // int(schedule.batches),
            shuffle=schedule.shuffle,
        )
    if schedule.name == "gd":
        return GD(train_size=int(schedule.train_size), steps=steps)
    return Online(steps=steps, batch_size=int(schedule.batch_size))


def _binomial(n: sp.Expr, k: int) -> sp.Expr:
    if n.is_Integer:
        return sp.Integer(math.comb(int(n), k))
    return sp.expand_func(sp.binomial(n, k))


def _falling(n: sp.Expr, k: int) -> sp.Expr:
    return sp.expand_func(sp.ff(n, k))


@cache
def _weak_orders(items: frozenset, preds: tuple) -> Counter:
    """Weak orders (ordered set partitions) of ``items`` with ``preds`` strictly lower.

    ``preds`` holds pairs ``(item, frozenset_of_items_strictly_below)``.  Returns a
    Counter mapping the sorted tuple of level sizes to the number of weak orders.
    """
    below = dict(preds)
    out: Counter = Counter()
    if not items:
        out[()] = 1
        return out
    minimal = [i for i in sorted(items) if not (below.get(i, frozenset()) & items)]
    for r in range(1, len(minimal) + 1):
        for level in itertools.combinations(minimal, r):
            rest = items - frozenset(level)
            for sizes, c in _weak_orders(rest, _restrict(preds, rest)).items():
                out[tuple(sorted((*sizes, r)))] += c
    return out


def _restrict(preds: tuple, items: frozenset) -> tuple:
    return tuple((i, s & items) for i, s in preds if i in items and s & items)


def _epoch_patterns(parents: tuple[int, ...], single: bool) -> Iterator[list[frozenset]]:
    """Weak orders of the non-root nodes by epoch, children never in later epochs."""
    nodes = frozenset(range(1, len(parents)))
    if single or not nodes:
        yield [nodes] if nodes else []
        return
    kids = {v: frozenset(c for c in nodes if parents[c] == v) for v in nodes}

    def rec(remaining: frozenset) -> Iterator[list[frozenset]]:
        if not remaining:
            yield []
            return
        items = sorted(remaining)
        for r in range(1, len(items) + 1):
            for level in itertools.combinations(items, r):
                chosen = frozenset(level)
                if any(kids[v] & remaining - chosen for v in chosen):
                    continue
                for tail in rec(remaining - chosen):
                    yield [chosen, *tail]

    yield from rec(nodes)


def _data_parts(parts: tuple, train_root: bool) -> list[int]:
    return [i for i, p in enumerate(parts) if train_root or 0 not in p]


def _level_constraints(parents, part_of, level: frozenset) -> tuple[tuple, bool]:
    """Strict batch-order constraints among parts from the edges inside one epoch."""
    below: dict[int, set] = {}
    for v in level:
        p = parents[v]
        if p > 0 and p in level:
            if part_of[v] == part_of[p]:
                return (), False
            below.setdefault(part_of[p], set()).add(part_of[v])
    return tuple(sorted((k, frozenset(v)) for k, v in below.items())), True


def _merge_preds(a: tuple, b: tuple) -> tuple:
    merged: dict[int, frozenset] = dict(a)
    for k, v in b:
        merged[k] = merged.get(k, frozenset()) | v
    return tuple(sorted(merged.items()))


def _part_index(parents, parts):
    part_of = [0] * len(parents)
    for i, p in enumerate(parts):
        for v in p:
            part_of[v] = i
    return part_of


def _batch_sum(schedule: Schedule, orders: Counter, weights: str) -> sp.Expr:
    return _batch_sum_cached(schedule, tuple(sorted(orders.items())), weights)


@cache
def _batch_sum_cached(schedule: Schedule, orders: tuple, weights: str) -> sp.Expr:
    m, b = schedule.batches, schedule.batch_size
    total = sp.Integer(0)
    for sizes, count in orders:
        w = sp.Integer(count) * _binomial(m, len(sizes))
        for s in sizes:
            w *= b**s if weights == "power" else _falling(b, s)
        total += w
    return total


@cache
def _level_count(schedule: Schedule, parents, parts, train_root, *, weights: str) -> sp.Expr:
    """Fixed-order count: batch indices per part shared across epochs."""
    part_of = _part_index(parents, parts)
    items = frozenset(_data_parts(parts, train_root))
    total = sp.Integer(0)
    for pattern in _epoch_patterns(parents, schedule.single_epoch):
        preds: tuple = ()
        feasible = True
        for level in pattern:
            extra, feasible = _level_constraints(parents, part_of, level)
            if not feasible:
                break
            preds = _merge_preds(preds, extra)
        if not feasible:
            continue
        orders = _weak_orders(items, preds)
        if orders:
            total += _binomial(schedule.epochs, len(pattern)) * _batch_sum(
                schedule, orders, weights
            )
    return sp.expand(total)


@cache
def _moment_count(schedule: Schedule, parents, parts, train_root) -> sp.Expr:
    """Moment-form count: distinct parts use distinct training points."""
    if not schedule.shuffle or schedule.single_epoch:
        return _level_count(schedule, parents, parts, train_root, weights="falling")
    part_of = _part_index(parents, parts)
    n = schedule.train_size
    data = _data_parts(parts, train_root)
    if n.is_number and len(data) > n:
        return sp.Integer(0)
    total = sp.Integer(0)
    for pattern in _epoch_patterns(parents, False):
        term = _binomial(schedule.epochs, len(pattern))
        for level in pattern:
            preds, feasible = _level_constraints(parents, part_of, level)
            if not feasible:
                term = sp.Integer(0)
                break
            active = frozenset(part_of[v] for v in level)
            orders = _weak_orders(active, preds)
            term *= _batch_sum(schedule, orders, "falling") / _falling(n, len(active))
        total += term
    return sp.cancel(total * _falling(n, len(data)))


def _coarsenings(parts: tuple, train_root: bool) -> Iterator[tuple]:
    """Partitions coarser than ``parts`` (merging data parts only)."""
    data = _data_parts(parts, train_root)
    fixed = [parts[i] for i in range(len(parts)) if i not in data]
    for grouping in set_partitions(data):
        merged = [tuple(sorted(v for i in g for v in parts[i])) for g in grouping]
        yield tuple(sorted(merged + fixed))
