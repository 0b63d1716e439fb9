"""How much work a series or diagram listing will be, estimated without enumerating it.

``perturb series --order N`` and ``perturb diagrams --order N`` walk every labelled
partition (a *labelling*) of one representative of every rooted tree with up to
``N + 1`` nodes, and both numbers grow faster than exponentially: there are
``A000081(N + 1)`` trees, and a tree's nodes have up to ``Bell(N)`` partitions.
:func:`estimate_work` counts them from formulas, so that a caller can refuse an order
that would run for hours before starting it (:func:`check_work`).

Counting labellings.  A labelling of a tree is a partition of its movable nodes (the
non-root nodes; for the train loss the root too).  Without the path condition every
partition is allowed, ``Bell(m)`` of them for ``m`` movable nodes.  With it (one
epoch) a block may not hold a node together with one of its non-root ancestors, so
the partitions are those into independent sets of the graph joining each node to its
non-root ancestors.  Colouring that graph from the root down, the ``a_v`` non-root
ancestors of node ``v`` are pairwise joined and already hold ``a_v`` distinct colours,
so ``v`` has ``x − a_v`` choices and the chromatic polynomial is
``P(x) = Π_v (x − a_v)``; writing ``P(x) = Σ_k p_k x^{\\underline{k}}``, ``p_k``
counts the partitions into ``k`` independent blocks, and since
``x^m = Σ_k S(m, k) x^{\\underline{k}}`` their number is ``P`` with every ``x^m``
replaced by ``Bell(m)``.  That is exact per tree; it is summed over the trees for
orders up to :data:`EXACT_ORDERS` and bounded by ``A000081 · Bell`` above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from perturb.checks import check_order
from perturb.errors import BudgetError
from perturb.symbolic.diagrams import count_rooted_trees, rooted_trees
from perturb.symbolic.schedules import Schedule

__all__ = [
    "EXACT_ORDERS",
    "WORK_BUDGET_SECONDS",
    "WorkEstimate",
    "bell",
    "check_work",
    "estimate_measure_work",
    "estimate_work",
    "labellings",
]

WORK_BUDGET_SECONDS = 60.0
"""Estimated seconds above which the command line asks for ``--force``."""

EXACT_ORDERS = 10
"""Labellings are counted exactly tree by tree up to this order (1842 trees at order 10,
well under a second); above it they are bounded by ``A000081 · Bell``."""

# Calibration (see estimate_work): seconds per labelling at order d for the series is
# _SERIES_SECONDS with one epoch and _MULTI_EPOCH_SECONDS * _MULTI_EPOCH_GROWTH**d with several;
# re-summed reports cost _RESUMMED_SECONDS * _RESUMMED_GROWTH**d per labelling.
_SERIES_SECONDS = 5e-3
_MULTI_EPOCH_SECONDS = 1.5e-4
_MULTI_EPOCH_GROWTH = 3.0
_RESUMMED_SECONDS = 2e-2
_RESUMMED_GROWTH = 3.5
_BASE_SECONDS = 0.3
_BYTES_PER_LABELLING = 20_000
_BASE_BYTES = 150_000_000
_MEASURE_SECONDS = 1.2e-7  # per row and labelling of order d, times _MEASURE_GROWTH**d
_MEASURE_ROWS = 64  # the fixed work of a contraction, in rows
_MEASURE_GROWTH = 5.0
_QUANTITIES = ("test", "train", "gap", "displacement")


@cache
def bell(m: int) -> int:
    """The Bell number ``B_m``: the number of set partitions of ``m`` items.

    Example:
        >>> [bell(m) for m in range(8)]
        [1, 1, 2, 5, 15, 52, 203, 877]
    """
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    row = [1]
    for _ in range(m):
        nxt = [row[-1]]
        for value in row:
            nxt.append(nxt[-1] + value)
        row = nxt
    return row[0]


def _umbral(depths: list[int]) -> int:
    """``Π_v (x − a_v)`` with every ``x^m`` replaced by ``Bell(m)``."""
    coeffs = [1]  # coefficients of x^0, x^1, ...
    for a in depths:
        shifted = [0, *coeffs]
        for m, c in enumerate(coeffs):
            shifted[m] -= a * c
        coeffs = shifted
    return sum(c * bell(m) for m, c in enumerate(coeffs))


def _tree_labellings(parents: tuple[int, ...], *, train: bool, path_condition: bool) -> int:
    n = len(parents)
    movable = n if train else n - 1
    if not path_condition:
        return bell(movable)
    depth = [0] * n
    for v in range(1, n):
        depth[v] = 0 if parents[v] == 0 else depth[parents[v]] + 1
    return _umbral(depth[1:] + ([0] if train else []))


@cache
def labellings(order: int, *, quantity: str = "test", path_condition: bool = True) -> int:
    """Labelled partitions of one representative of every tree with ``order`` edges.

    This is the number of (tree, partition) pairs that :func:`~perturb.symbolic.series.series`
    visits at ``η^order`` (each costing one embedding count and one canonical form) and an
    upper bound on the number of diagrams :func:`~perturb.symbolic.diagrams.diagrams`
    returns.  Exact up to :data:`EXACT_ORDERS`, an upper bound above it.

    Args:
        order: number of edges.
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.
        path_condition: whether a part may not hold a node and a non-root ancestor.

    Example:
        >>> from perturb.symbolic.diagrams import labelled_partitions, rooted_trees
        >>> brute = sum(1 for p in rooted_trees(5)
        ...             for _ in labelled_partitions(p, quantity="test", path_condition=True))
        >>> labellings(4), brute
        (54, 54)
    """
    check_order(order)
    if quantity not in ("test", "train", "displacement"):
        raise ValueError(
            f"quantity must be one of 'test', 'train', 'displacement', got {quantity!r}"
        )
    train = quantity == "train"
    if quantity == "displacement":
        if order == 0:
            return 0
        if order > EXACT_ORDERS or not path_condition:
            return count_rooted_trees(order) * bell(order)
        trees = [(-1, *(0 if p < 0 else p + 1 for p in t)) for t in rooted_trees(order)]
    elif order > EXACT_ORDERS or not path_condition:
        return count_rooted_trees(order + 1) * bell(order + 1 if train else order)
    else:
        trees = rooted_trees(order + 1)
    return sum(_tree_labellings(t, train=train, path_condition=path_condition) for t in trees)


def _short(value: float) -> str:
    """Two significant digits, exponents written ``3.1e12``."""
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


@dataclass(frozen=True)
class WorkEstimate:
    """How big a series (or a diagram listing) of one order is, and what it will cost.

    Attributes:
        order: the highest power of η.
        diagrams: an upper bound on the number of diagrams with ``order`` edges (what
            ``perturb diagrams`` lists): the labellings at that order.
        terms: an upper bound on the number of terms of the series through ``order``
            (the labellings of every power, which the merged terms never exceed).
        labellings: labellings visited for every power through ``order`` (the work).
        seconds: a rough estimate of the run time on one core.
        memory_bytes: a rough estimate of the peak memory.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> estimate_work(3, Online()).diagrams
        11
    """

    order: int
    diagrams: int
    terms: int
    labellings: int
    seconds: float
    memory_bytes: int

    def describe(self) -> str:
        """One line: the order, the number of diagrams, the time and the memory.

        Example:
            >>> WorkEstimate(20, 3.1e12, 4e12, 4e12, 1e9, 4e14).describe()
            'order 20: about 3.1e12 diagrams, ~1e9 s, ~4e14 bytes'
        """
        return (
            f"order {self.order}: about {_short(self.diagrams)} diagrams, "
            f"~{_short(self.seconds)} s, ~{_short(self.memory_bytes)} bytes"
        )


def estimate_work(
    order: int, schedule: Schedule, *, quantity: str = "test", resummed: bool = False
) -> WorkEstimate:
    """Estimate the size and cost of ``series(order, schedule, quantity)`` without building it.

    The labellings of each power ``d`` are counted by :func:`labellings` (the path
    condition applies for single-epoch schedules); the gap is test plus train.  The time
    is ``0.3 s + Σ_d labellings(d) · c · g^d`` and the memory
    ``150 MB + 20 kB · Σ_d labellings(d)``.  The constants ``c``, ``g`` were calibrated
    by timing :func:`~perturb.symbolic.series.series` and
    :func:`~perturb.symbolic.resummed.resummed_report` (test loss, symbolic sizes) in
    fresh processes at orders 2–6 on a shared core: one epoch ``c = 5 ms``, ``g = 1``
    (online: 2.0 s at order 5, 11 s at order 6); several epochs ``c = 0.15 ms``,
    ``g = 3`` (each labelling has more epoch patterns: GD 1.4 s and 25 s, epochs 2.8 s
    and 81 s at orders 4 and 5); re-summed reports ``c = 20 ms``, ``g = 3.5`` (sympy
    simplification of the sums over embeddings: online 0.8 s and 6.8 s, GD 1.9 s and
    27 s at orders 2 and 3).  Memory per labelling was measured with ``tracemalloc``
    at orders 4–5.  The estimate is good to a factor of a few; it is
    meant to tell seconds from hours.

    Args:
        order: the highest power of η, at least 0.
        schedule: the schedule (only whether it is single-epoch matters).
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        resummed: estimate the re-summed report instead of the series.

    Returns:
        The :class:`WorkEstimate`.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> estimate_work(20, Online()).seconds > WORK_BUDGET_SECONDS
        True
        >>> estimate_work(2, Online()).seconds < WORK_BUDGET_SECONDS
        True
    """
    check_order(order)
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity must be one of {_QUANTITIES}, got {quantity!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    single = bool(schedule.single_epoch)
    parts = ("test", "train") if quantity == "gap" else (quantity,)
    per_power = [
        sum(labellings(d, quantity=q, path_condition=single) for q in parts)
        for d in range(order + 1)
    ]
    if resummed:
        unit, growth = _RESUMMED_SECONDS, _RESUMMED_GROWTH
    elif single:
        unit, growth = _SERIES_SECONDS, 1.0
    else:
        unit, growth = _MULTI_EPOCH_SECONDS, _MULTI_EPOCH_GROWTH
    seconds = _BASE_SECONDS + sum(n * unit * growth**d for d, n in enumerate(per_power))
    total = sum(per_power)
    return WorkEstimate(
        order=order,
        diagrams=per_power[-1],
        terms=total,
        labellings=total,
        seconds=float(seconds),
        memory_bytes=_BASE_BYTES + _BYTES_PER_LABELLING * total,
    )


def estimate_measure_work(
    orders: Mapping[str, int], schedules: Sequence[Schedule], *, rows: int
) -> WorkEstimate:
    """The work of :func:`perturb.measure`: its series, then every contraction on ``rows``.

    Before it measures anything, ``measure`` builds the series ``series(orders[q], s,
    q)`` of every schedule ``s`` and quantity ``q`` (the sum of their
    :func:`estimate_work`, the fixed part counted once); then it evaluates each
    contraction on the rows, ``(rows + 64) · Σ_{d ≥ 4} labellings(d) · 1.2·10⁻⁷ s · 5^d``
    (with the labellings of the several-epoch series, which holds every contraction of
    the others; the 64 stand for the fixed work of a contraction).  Orders up to 3 cost a
    few batched derivative passes per row, linear in the rows the caller chose, and are
    not counted: the bound guards the growth with the order, not the size of the data.
    The constants were timed with the default sketch estimator on one core for a
    43-parameter network on 64 rows (order 4: 1 s; order 5: 36 s, besides the 60 s of its
    series); larger networks and ``exact=True`` take longer, so this is rather a lower
    bound, good for telling seconds from hours.

    Example:
        >>> from perturb.symbolic.schedules import Epochs, Online
        >>> five = estimate_measure_work({"test": 5}, [Online(), Epochs()], rows=64)
        >>> five.seconds > WORK_BUDGET_SECONDS, five.order
        (True, 5)
        >>> estimate_measure_work({"test": 4}, [Online(), Epochs()], rows=64).seconds < 10
        True
    """
    parts = [estimate_work(d, s, quantity=q) for s in schedules for q, d in orders.items()]
    if not parts:
        raise ValueError("expected at least one schedule and one quantity, got none")
    numeric = 0.0
    for q, top in orders.items():
        for d in range(4, top + 1):  # orders ≤ 3: a few passes a row, sized by the caller
            for piece in ("test", "train") if q == "gap" else (q,):
                count = labellings(d, quantity=piece, path_condition=False)
                numeric += count * _MEASURE_SECONDS * _MEASURE_GROWTH**d
    return WorkEstimate(
        order=max(e.order for e in parts),
        diagrams=sum(e.diagrams for e in parts),
        terms=sum(e.terms for e in parts),
        labellings=sum(e.labellings for e in parts),
        seconds=_BASE_SECONDS
        + sum(e.seconds - _BASE_SECONDS for e in parts)
        + (rows + _MEASURE_ROWS) * numeric,
        memory_bytes=_BASE_BYTES + sum(e.memory_bytes - _BASE_BYTES for e in parts),
    )


def check_work(estimate: WorkEstimate, *, force: bool, option: str = "--force") -> None:
    """Raise unless the estimated time is within :data:`WORK_BUDGET_SECONDS` or ``force``.

    Args:
        estimate: the estimate.
        force: run whatever the estimate.
        option: how the caller lifts the bound, named in the message (``"--force"`` on
            the command line, ``"force=True"`` in Python).

    Raises:
        perturb.errors.BudgetError: (a ``ValueError``) naming the estimated size and
            saying to pass ``option``.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> check_work(estimate_work(2, Online()), force=False)
        >>> check_work(estimate_work(20, Online()), force=True)
        >>> check_work(estimate_work(20, Online()), force=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        perturb.errors.BudgetError: order 20: about ... s budget; pass --force to run it anyway
    """
    if force or estimate.seconds <= WORK_BUDGET_SECONDS:
        return
    raise BudgetError(
        f"{estimate.describe()}: over the {WORK_BUDGET_SECONDS:.0f} s budget; "
        f"pass {option} to run it anyway"
    )
