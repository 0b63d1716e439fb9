"""Re-summation: predictions that stay finite for large ηT.

In the cumulant form, a non-root node with one child that sits alone in its part
is the mean Hessian ``H`` at some step.  Chains of such nodes along an edge whose
endpoints sit at steps ``t < t'`` sum, over the ``t' − t − 1`` steps in between, to

    Σ_k C(t'−t−1, k) (−ηH)^k = K^{t'−t−1},   K = I − ηH,

so the *re-summed* diagrams are the diagrams without such nodes, each edge carrying
``η K^{Δt−1}`` instead of ``η`` (the root sits at step ``T``).  Their value depends
on the steps of the embedding, not only on how many there are.  In an eigenbasis
``H = Σ_μ h_μ v_μ v_μᵀ`` an edge with eigen-index ``μ`` carries ``x_μ^{Δt−1}`` with
``x_μ = 1 − ηh_μ``.

Exact sums over embeddings.  Group embeddings by the weak order of their *time
units* (a part in online SGD, where all nodes of a part share a step; a node in GD,
where every step sees every point), with ``j`` distinct times
``0 ≤ τ_1 < … < τ_j ≤ T−1``.  An edge from level ``a`` to level ``b`` (``b = j+1``
for the root) spans the gaps ``a … b−1``; with ``y_i`` the product of ``x_e`` over
the edges spanning gap ``i``,

    Σ_τ Π_e x_e^{τ_b − τ_a − 1} = Π_e x_e^{b_e − a_e − 1} · h_{T−j}(1, y_1, …, y_j),

where ``h_n`` is the complete homogeneous symmetric polynomial; at ``η = 0`` it is
``C(T, j)``, the un-resummed count.  ``h_n(z_0..z_j)`` is the divided difference of
``z^{n+j}`` and equals the corner entry of the ``(n+j)``-th power of the bidiagonal
matrix with diagonal ``z`` and unit sub-diagonal (Opitz), computed by repeated
squaring: ``O(log T)`` products, stable when the ``z`` nearly coincide, and the
same cost for ``T = 10^5`` as for ``T = 10^2``.

Several epochs of several batches (fixed order or reshuffled): the groups and their sums
are in :mod:`perturb.symbolic.embeddings`.

Supported schedules: online SGD (any batch size), full-batch GD, and epochs in a fixed
order or reshuffled.
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass

import sympy as sp

from perturb.checks import check_order
from perturb.symbolic.contractions import Contraction
from perturb.symbolic.diagrams import Diagram, labelled_partitions, rooted_trees
from perturb.symbolic.embeddings import (
    EpochGroup,
    EpochOrders,
    epoch_time_sum_exact,
    epoch_time_sum_expr,
    is_multi_epoch,
    multi_epoch_orders,
    strict_weak_orders,
)
from perturb.symbolic.schedules import Schedule

__all__ = [
    "EpochGroup",
    "EpochOrders",
    "ResummedTerm",
    "check_resummable",
    "is_multi_epoch",
    "resummed_report",
    "resummed_terms",
    "time_sum_exact",
]


@dataclass(frozen=True)
class ResummedTerm:
    """One re-summed diagram with the time structure of its embeddings.

    Attributes:
        diagram: the diagram (no singleton one-child non-root nodes).
        prefactor: ``(−1/B)^d · B^{#parts} / |Aut(tree)|`` (``/N`` for the train loss,
            times ``N`` for a train-root part that holds the root alone), a sympy number.
        edges: the edges as ``(child, parent)`` pairs, in the order of the eigen-indices.
        orders: one entry per weak order of the time units: ``(j, spans)`` where
            ``spans[e] = (a_e, b_e)`` are the levels of edge ``e``'s child and parent;
            under several epochs of several batches an :class:`EpochOrders`.
        open_root: the root is a free index (displacement).

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> cherry = [t for t in resummed_terms(2, Online(batch_size=1))
        ...           if t.contraction.text == "tr(C H)"][0]
        >>> cherry.edges, cherry.orders, cherry.prefactor
        (((1, 0), (2, 0)), ((1, ((1, 2), (1, 2))),), 1/2)
    """

    diagram: Diagram
    prefactor: sp.Expr
    edges: tuple[tuple[int, int], ...]
    orders: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] | EpochOrders
    open_root: bool = False

    @property
    def contraction(self) -> Contraction:
        """The diagram's tensor network (edges carry ``η K^{Δt−1}``).

        Example:
            >>> from perturb.symbolic.schedules import Online
            >>> [t.contraction.text for t in resummed_terms(1, Online())]
            ['l', 'G·G']
        """
        d = self.diagram
        return Contraction(parents=d.parents, parts=d.parts, open_root=self.open_root)

    def time_integral_expr(self, steps: sp.Expr) -> sp.Expr:
        """Remark 2's integral form of :meth:`time_sum_expr`, in rates ``r_a = ηh_a``.

        Example:
            >>> import sympy as sp
            >>> from perturb.symbolic.schedules import Online
            >>> skew = [t for t in resummed_terms(3, Online(batch_size=1))
            ...         if t.contraction.text == "J:S"][0]
            >>> skew.time_integral_expr(sp.Symbol("T"))
            (1 - exp(T*(-r_a - r_b - r_c)))/(r_a + r_b + r_c)

        Raises:
            ValueError: several epochs of several batches, which have no integral form
                here.
        """
        if isinstance(self.orders, EpochOrders):
            raise ValueError(_NO_EPOCH_INTEGRAL)
        rs = [sp.Symbol(f"r_{string.ascii_lowercase[i]}") for i in range(len(self.edges))]
        total = sp.Integer(0)
        for j, spans in self.orders:
            lams = [sp.Integer(0)] + [
                sp.Add(*(r for r, (a, b) in zip(rs, spans, strict=True) if a <= i < b))
                for i in range(1, j + 1)
            ]
            if j == 1:  # the common case, in the paper's form (1 − e^{−λT})/λ
                total += (1 - sp.exp(-lams[1] * steps)) / lams[1]
            else:
                total += _divided_difference_exp(lams, steps)
        return total

    def time_sum_expr(self, steps: sp.Expr) -> sp.Expr:
        """The sum over embeddings as a sympy expression in ``x_a = 1 − η h_a``.

        One symbol ``x_a`` per edge, named by the edge's letter; closed forms of the
        geometric sums by divided differences (valid where the ``y`` differ).

        Example:
            >>> import sympy as sp
            >>> from perturb.symbolic.schedules import Online
            >>> skew = [t for t in resummed_terms(3, Online(batch_size=1))
            ...         if t.contraction.text == "J:S"][0]
            >>> sp.simplify(skew.time_sum_expr(sp.Symbol("T")))
            ((x_a*x_b*x_c)**T - 1)/(x_a*x_b*x_c - 1)

        Under several epochs (``T = M·E``) each group is
        ``Π x^{c} (x^M)^{β−α−1} h_{M−j}(y) h_{E−k}(w)``, each ``h`` a confluent divided
        difference (exact for coinciding ``y`` too):

            >>> from perturb.symbolic.schedules import Epochs
            >>> s = Epochs(train_size=4, batch_size=2, epochs=3)  # M = 2
            >>> leaf = [t for t in resummed_terms(1, s) if t.diagram.edges == 1][0]
            >>> sp.factor(leaf.time_sum_expr(6))
            (x_a + 1)*(x_a**2 - x_a + 1)*(x_a**2 + x_a + 1)
        """
        xs = [sp.Symbol(f"x_{string.ascii_lowercase[i]}") for i in range(len(self.edges))]
        if isinstance(self.orders, EpochOrders):
            m = self.orders.batches_per_epoch
            return epoch_time_sum_expr(self.orders, xs, m, sp.simplify(steps / m))
        total = sp.Integer(0)
        for j, spans in self.orders:
            factor = sp.Mul(*(x ** (b - a - 1) for x, (a, b) in zip(xs, spans, strict=True)))
            ys = [sp.Integer(1)] + [
                sp.Mul(*(x for x, (a, b) in zip(xs, spans, strict=True) if a <= i < b))
                for i in range(1, j + 1)
            ]
            total += factor * _divided_difference_power(ys, steps)
        return total


def time_sum_exact(orders, xs: list[sp.Expr], steps: int) -> sp.Expr:
    """:func:`time_sum` in exact sympy arithmetic, for any values (equal ones too).

    For :class:`EpochOrders` this is :func:`epoch_time_sum_exact` (``steps = M·E``).

    Example:
        >>> import sympy as sp
        >>> x = sp.Symbol("x")
        >>> sp.expand(time_sum_exact(((1, ((1, 2),)),), [x], 3))
        x**2 + x + 1
    """
    if isinstance(orders, EpochOrders):
        return epoch_time_sum_exact(orders, xs, steps)
    total = sp.Integer(0)
    for j, spans in orders:
        factor = sp.Mul(*(x ** (b - a - 1) for x, (a, b) in zip(xs, spans, strict=True)))
        zs = [sp.Integer(1)] + [
            sp.Mul(*(x for x, (a, b) in zip(xs, spans, strict=True) if a <= i < b))
            for i in range(1, j + 1)
        ]
        if steps - j < 0:
            continue
        z = sp.zeros(j + 1, j + 1)
        for i, zi in enumerate(zs):
            z[i, i] = zi
            if i:
                z[i, i - 1] = 1
        total += factor * (z ** (steps))[j, 0]
    return total


_NO_EPOCH_INTEGRAL = (
    "Remark 2's integral form is implemented for online SGD and full-batch GD; for "
    "several epochs of several batches use the exact sums (integral=False)"
)


def _divided_difference_exp(lams: list[sp.Expr], steps: sp.Expr) -> sp.Expr:
    """``∫_{Σg=T} Π e^{−λ_i g_i} = Σ_i e^{−λ_i T} / Π_{k≠i} (λ_k − λ_i)`` (distinct λ)."""
    out = sp.Integer(0)
    for i, li in enumerate(lams):
        den = sp.Mul(*(lk - li for k, lk in enumerate(lams) if k != i))
        out += sp.exp(-li * steps) / den
    return out


def _divided_difference_power(zs: list[sp.Expr], steps: sp.Expr) -> sp.Expr:
    """``h_{T−j}(z_0..z_j) = Σ_i z_i^T / Π_{k≠i} (z_i − z_k)`` for distinct ``z``."""
    out = sp.Integer(0)
    for i, zi in enumerate(zs):
        den = sp.Mul(*(zi - zk for k, zk in enumerate(zs) if k != i))
        out += zi**steps / den
    return out


def _time_units(schedule: Schedule, diagram: Diagram, train: bool) -> tuple[list, dict]:
    """Time units and the unit of each non-root node."""
    if schedule.batches == 1:  # GD: every node has its own step
        units = list(range(1, diagram.nodes))
        return units, {v: v for v in units}
    unit_of = {}
    units = []
    for i, part in enumerate(diagram.parts):
        members = [v for v in part if v != 0]
        if members:
            units.append(i)
            unit_of.update({v: i for v in members})
    return units, unit_of


def check_resummable(schedule: Schedule) -> None:
    """Raise unless ``schedule`` is a :class:`~perturb.symbolic.schedules.Schedule`.

    Re-summation supports every schedule perturb knows: online SGD (one epoch, any batch
    size), full-batch GD, and several epochs of several batches in a fixed order or
    reshuffled each epoch (any ``N``, ``B``, ``E``).

    Raises:
        TypeError: not a :class:`~perturb.symbolic.schedules.Schedule`.

    Example:
        >>> from perturb.symbolic.schedules import GD, Epochs
        >>> check_resummable(GD())
        >>> check_resummable(Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True))
        >>> check_resummable("online")
        Traceback (most recent call last):
        ...
        TypeError: schedule must be a Schedule, got str
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")


def resummed_terms(order: int, schedule: Schedule, quantity: str = "test") -> list[ResummedTerm]:
    """The re-summed diagrams with up to ``order`` edges and their time structure.

    Args:
        order: highest number of edges.
        schedule: :func:`perturb.Online`, :func:`perturb.GD` or
            :func:`perturb.Epochs`, fixed order or reshuffled (sizes may be symbolic).
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.

    Returns:
        One :class:`ResummedTerm` per labelled partition of each tree; under several
        epochs of several batches its ``orders`` is an :class:`EpochOrders`.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> sorted({t.contraction.text for t in resummed_terms(2, Online())})
        ['G·G', 'G·H·G', 'l', 'tr(C H)']
    """
    check_order(order)
    check_resummable(schedule)
    if quantity not in ("test", "train", "displacement"):
        raise ValueError(
            f"quantity must be one of 'test', 'train', 'displacement', got {quantity!r}"
        )
    return list(_resummed_terms(int(order), schedule, quantity))


@functools.lru_cache(maxsize=256)
def _resummed_terms(order: int, schedule: Schedule, quantity: str) -> tuple[ResummedTerm, ...]:
    """:func:`resummed_terms` once per argument set (the terms are frozen)."""
    train = quantity == "train"
    open_root = quantity == "displacement"
    out: list[ResummedTerm] = []
    for d in range(order + 1):
        for parents in rooted_trees(d + 1):
            if open_root and (d == 0 or parents.count(0) != 1):
                continue
            tree = Diagram(parents=parents, parts=tuple((v,) for v in range(d + 1)))
            for parts in labelled_partitions(
                parents, quantity="train" if train else "test", path_condition=schedule.single_epoch
            ):
                diagram = Diagram(parents=parents, parts=parts)
                if any(
                    len(diagram.children[v]) == 1 and len(parts[diagram.part_of[v]]) == 1
                    for v in range(1, d + 1)
                ):
                    continue
                term = _term(schedule, diagram, tree.tree_automorphisms, train, open_root)
                if term is not None:
                    out.append(term)
    return tuple(out)


def _term(schedule, diagram, aut, train, open_root) -> ResummedTerm | None:
    edges = tuple((v, diagram.parents[v]) for v in range(1, diagram.nodes))
    if is_multi_epoch(schedule):
        orders = multi_epoch_orders(schedule, diagram)
        if orders is None:
            return None
        return ResummedTerm(
            diagram=diagram,
            prefactor=_prefactor(schedule, diagram, aut, train),
            edges=edges,
            orders=orders,
            open_root=open_root,
        )
    units, unit_of = _time_units(schedule, diagram, train)
    below: dict = {}
    for v in range(1, diagram.nodes):
        p = diagram.parents[v]
        if p > 0:
            if unit_of[v] == unit_of[p]:
                return None
            below.setdefault(unit_of[p], set()).add(unit_of[v])
    orders = []
    for levels in strict_weak_orders(units, below):
        j = max(levels.values(), default=0)
        spans = tuple(
            (levels[unit_of[v]], j + 1 if p == 0 else levels[unit_of[p]]) for v, p in edges
        )
        orders.append((j, spans))
    if not orders:  # the part constraints are cyclic: no embedding
        return None
    return ResummedTerm(
        diagram=diagram,
        prefactor=_prefactor(schedule, diagram, aut, train),
        edges=edges,
        orders=tuple(orders),
        open_root=open_root,
    )


def _prefactor(schedule: Schedule, diagram: Diagram, aut: int, train: bool) -> sp.Expr:
    """``(−1/B)^d B^{#parts} / |Aut|``, ``N`` for a train root alone, ``/N`` for the train loss."""
    b = schedule.batch_size
    prefactor = sp.Integer(-1) ** diagram.edges / b**diagram.edges / aut
    for part in diagram.parts:
        if train or 0 not in part:
            prefactor *= schedule.train_size if part == (0,) else b
    if train:
        prefactor /= schedule.train_size
    return sp.nsimplify(prefactor)


def resummed_report(
    order: int,
    schedule: Schedule,
    quantity: str = "test",
    *,
    fmt: str = "text",
    integral: bool = False,
):
    """The re-summed diagrams of ``quantity`` with their exact sums over embeddings.

    Each line is ``η^d · prefactor · Σ_{indices} (tensor network) · S(x)``: the
    network in index notation with one letter per edge, summed over an eigenbasis of
    ``H``, and ``S`` the exact sum over embeddings in ``x_a = 1 − η h_a`` (``h_a`` the
    eigenvalue of edge ``a``'s index), symbolic in ``T``.

    Args:
        order: highest number of edges.
        schedule: online SGD or GD.
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.
        fmt: ``"text"``, ``"latex"`` or ``"json"``.
        integral: print Remark 2's integrals of exponentials in ``r_a = ηh_a`` instead
            of the exact sums in ``x_a``.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> lines = resummed_report(3, Online(batch_size=1)).splitlines()
        >>> print(next(line for line in lines if "S_(a,b,c)" in line))
        η^3·(-1/6)·Σ J_abc S_(a,b,c) · (x_a**T*x_b**T*x_c**T - 1)/(x_a*x_b*x_c - 1)
    """
    if fmt not in ("text", "latex", "json"):
        raise ValueError(f"fmt must be one of 'text', 'latex', 'json', got {fmt!r}")
    steps = schedule.steps
    if not (steps.is_number or is_multi_epoch(schedule)):  # several epochs: T = M·E as given
        steps = sp.Symbol("T", positive=True, integer=True)
    records = []
    for term in resummed_terms(order, schedule, quantity):
        network = term.contraction
        text, tex = network.einstein
        if not term.edges:
            time = sp.Integer(1)
        elif integral:
            time = term.time_integral_expr(steps)
        else:
            time = sp.factor(sp.simplify(term.time_sum_expr(steps)))
        records.append((term.diagram.edges, sp.factor(term.prefactor), text, tex, time))
    if fmt == "json":
        return json.dumps(
            [
                {"edges": d, "prefactor": str(p), "network": t, "latex": x, "time_sum": str(s)}
                for d, p, t, x, s in records
            ],
            indent=2,
            ensure_ascii=False,
        )
    if fmt == "latex":
        return " \\\\\n".join(
            rf"\eta^{{{d}}} \left({sp.latex(p)}\right) \sum {x} \; {sp.latex(s)}"
            for d, p, _, x, s in records
        )
    return "\n".join(f"η^{d}·({p})·Σ {t} · {s}" for d, p, t, _, s in records)
