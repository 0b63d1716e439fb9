r"""Measure every contraction of a series once at ``θ_0``: unbiased estimates with error bars.

Every term of a series (:mod:`perturb.symbolic.series`) multiplies a tensor network
(:class:`perturb.symbolic.contractions.Contraction`).  :meth:`Contraction.value` evaluates it
from *materialized* per-sample tensors ``∇^k l_x`` of size ``n·P^k``; :func:`measure`
evaluates the same numbers matrix-free, without forming anything of size ``P²``, so it runs
on real networks.  The pieces, one module each: :mod:`~perturb.numeric.adapters` (a model or
a loss as a function of flat parameters), :mod:`~perturb.numeric.derivatives` (nested
directional derivatives at rows), :mod:`~perturb.numeric.engine` (moment networks node by
node), :mod:`~perturb.numeric.networks` (cumulant networks as Möbius sums, exact or
unbiased) and :mod:`~perturb.numeric.statistics` (the result, its error bars and its
predictions).

**Batch means.**  With ``estimator="groups"`` the sample is split at random into ``K``
disjoint groups, the U-statistic is computed within each group, the estimate is their mean
(still exactly unbiased) and its standard error is ``sd(group estimates)/√K``.  Why this
rather than the full-sample U-statistic with a jackknife: the group estimates are
independent and identically distributed, so ``SE²`` is exactly unbiased for the variance
of the estimate (and the error is about Student-t with ``K−1`` degrees of freedom when the
group estimates are near normal), the same group estimates give the error bar of any
linear combination (a prediction at any η and T) for free, and a statistic with ``q``
distinct samples costs ``n^q/K^{q-1}`` instead of ``n^q`` evaluations.  The price is
efficiency for degenerate statistics (e.g. ``G·G`` at a minimum, where the first-order
Hoeffding term vanishes): the variance of the second-order term grows by up to a factor
``K``.  A jackknife of the full-sample U-statistic would need the leave-one-group-out sums
of every network, i.e. group axes on every message, multiplying the cost by up to
``K^{m-1}``.

**Sketches and the automatic choice (the default, ``estimator="auto"``).**  The rows are
split into ``K`` disjoint groups and each contraction is estimated in every group either
by a *sketch* (:mod:`perturb.numeric.sketches`: split means, every node one batched
derivative over many rows, at full-batch speed; networks with blocks of two or more
nodes on tuples, or opt-in random-sign probes) or by disjoint tuples inside the group;
a pilot on rows of its own picks, per contraction, the one with the smaller work ×
variance (work counted from the contraction's structure, never timed: a seed fixes the
choice), and with ``lr``, ``target_se`` or ``budget`` plans the rows and sketch
replicates (:mod:`perturb.numeric.allocation`).  Every group value is unbiased, so the
batch-means error bar above holds; it has ``K − 1`` degrees of freedom (the 95% interval
is ``± t_{0.975, K−1}·SE``).  On the order-3 online test loss of a 25k-parameter convnet
this buys 44× the certainty per unit of work of the tuples below, 103× at 98k parameters
(docs/benchmarks.md): the statistics that dominate a prediction (``l``, ``G·G``,
``G·H·G``) are products of means, which a split estimates with every row while a tuple
uses one row per factor.

**Disjoint tuples (``estimator="tuples"``, linear cost).**  The complete U-statistic above
costs ``n_g²`` or more single-row derivatives per group whenever a block spans two
subtrees.  An *incomplete* U-statistic avoids that: shuffle the rows once and cut them into
``R = ⌊n/m⌋`` disjoint tuples of ``m`` rows, ``m`` the most blocks of any refinement (the
same tuples for every requested contraction, each using its first columns).  Within tuple
``r`` every refinement's moment network is evaluated with block ``i`` on row ``i`` of the
tuple (one sample per block, no sums: every node is one single-row nested directional
derivative), and the Möbius sum of these gives ``Z_r``, an unbiased estimate of the
cumulant network because the rows of a tuple are distinct iid draws.  The ``Z_r`` of
different tuples are iid, so ``mean_r Z_r`` has standard error ``sd(Z_r)/√R``, exactly the
batch-means formula with ``K = R`` groups: :class:`~perturb.numeric.statistics.Statistics`
stores the ``Z_r`` as its group values, and since every contraction uses the same tuples,
the spread of per-tuple predictions gives a prediction's error bar.  The cost is
``R × nodes`` derivatives per network, linear in ``n``; the price is variance: each tuple
uses one assignment of its rows to the blocks instead of all of them, typically a few times
the variance of the complete U-statistic on the same rows, repaid many times over by the
rows one can afford.

**Predictions.**  :func:`measure` computes every contraction of the requested series once at
``θ_0``; :meth:`Statistics.predict` then evaluates any numeric schedule's coefficients and a
whole grid of learning rates at no further cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb.checks import check_int, check_order
from perturb.numeric.adapters import FlatLoss, Objective, flat_loss, objective
from perturb.numeric.allocation import (
    check_planning,
    fixed_choice,
    pilot_plan,
    pilot_rows,
    same_plan,
)
from perturb.numeric.distributed import (
    all_ints,
    gather_blocks,
    local_share,
    same_on_all_ranks,
    shard,
    sum_over_ranks,
    world,
)
from perturb.numeric.engine import Engine
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.networks import (
    contraction_value,
    group_values,
    moment_network,
    single_layout,
    tuple_size,
    tuple_values,
)
from perturb.numeric.population import Population
from perturb.numeric.sketches import MAX_PROBED_BLOCK, Sketcher
from perturb.numeric.statistics import HostCopy, MeasuredPrediction, Statistics
from perturb.symbolic.contractions import Contraction
from perturb.symbolic.cost import check_work, estimate_measure_work
from perturb.symbolic.resummed import check_resummable
from perturb.symbolic.schedules import Epochs, Online, Schedule
from perturb.symbolic.series import QUANTITIES, series

__all__ = [  # FlatLoss .. moment_network: re-exported from the modules that define them
    "ESTIMATOR_NAMES",
    "FlatLoss",
    "MeasuredPrediction",
    "Statistics",
    "contraction_value",
    "flat_loss",
    "measure",
    "measure_distributed",
    "moment_network",
    "requested_contractions",
]


ESTIMATOR_NAMES = ("auto", "sketch", "tuples", "groups")


def requested_contractions(
    order: int | Mapping[str, int], schedules: Sequence[Schedule], quantities: Sequence[str]
) -> dict[str, Contraction]:
    """Every contraction of the requested series, by :attr:`Contraction.key`, in order.

    These are the statistics :func:`measure` computes; ``order`` is one order for every
    quantity or ``{quantity: order}``.

    Example:
        >>> [c.text for c in requested_contractions(1, (Online(),), ("test",)).values()]
        ['l', 'G·G']
        >>> len(requested_contractions({"test": 2, "gap": 1}, (Online(),), ("test", "gap")))
        5
    """
    out: dict[str, Contraction] = {}
    for schedule in schedules:
        for quantity in quantities:
            d = order[quantity] if isinstance(order, Mapping) else order
            for term in series(d, schedule, quantity).terms:
                out.setdefault(term.contraction.key, term.contraction)
    return out


def _requested(
    order: Any,
    schedules: Sequence[Schedule] | Schedule | None,
    quantities: Sequence[str] | str | None,
    *,
    exact: bool,
    samples: int | None,
    estimator: str,
    vector_batches: int | None,
) -> tuple[int | dict[str, int], tuple[Schedule, ...], tuple[str, ...]]:
    """Stage 1: the checked order (or orders by quantity), schedules and quantities."""
    if isinstance(order, Mapping):
        if quantities is not None:
            raise ValueError(
                "pass quantities=... or one order per quantity (order={quantity: order}), "
                f"not both; got quantities={quantities!r} and order={dict(order)!r}"
            )
        if not order:
            raise ValueError("order={quantity: order} needs at least one quantity, got {}")
        quantities = tuple(order)
        order = {q: check_order(d, name=f"order of {q!r}") for q, d in order.items()}
    else:
        order = check_order(order)
    if quantities is None:
        quantities = ("test",)
    if schedules is None:
        schedules = (Online(), Epochs())
    elif isinstance(schedules, Schedule):
        schedules = (schedules,)
    schedules = tuple(schedules)
    for s in schedules:
        if not isinstance(s, Schedule):
            raise TypeError(f"schedules must hold Schedule objects, got {type(s).__name__}")
    if isinstance(quantities, str):
        quantities = (quantities,)
    quantities = tuple(quantities)
    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"quantities must be among {QUANTITIES}, got {q!r}")
    if exact and samples is not None:
        raise ValueError("exact=True averages over all rows; samples applies to estimates only")
    if not isinstance(estimator, Mapping) and estimator not in ESTIMATOR_NAMES:
        raise ValueError(
            f"estimator must be one of {ESTIMATOR_NAMES} or {{contraction: estimator}}, "
            f"got {estimator!r}"
        )
    if vector_batches is not None:
        check_int("vector_batches", vector_batches, minimum=2)
    return order, schedules, quantities


def _row_count(loss_fn_or_model: Any, data: Any, samples: int | None) -> int:
    """The rows a measurement will use, read without checking (for its cost estimate)."""
    if samples is not None:
        return int(samples)
    if isinstance(loss_fn_or_model, Population):
        data = loss_fn_or_model.data
    first = data[0] if isinstance(data, tuple | list) and len(data) else data
    shape = getattr(first, "shape", ())
    return int(shape[0]) if len(shape) else 1


@dataclass
class _Layout:
    """Which rows each group (or tuple) holds, and the objective restricted to the sample."""

    obj: Objective
    layout: torch.Tensor  # (K, n_g) rows of each group, or the (R, m) tuples
    tuples: torch.Tensor | None  # the tuples (the tuple estimator), else None
    groups: int  # K, or the R tuples evaluated here
    batching: tuple[int, int, int] | None = None  # vector batches (count, size, offset)
    meta: dict[str, Any] = field(default_factory=dict)
    sketch: bool = False  # groups measured by sketches (estimator "sketch" or "auto")
    pilot: torch.Tensor | None = None  # (K, n_p/K) the pilot's rows (estimator "auto")


def _layout(
    obj: Objective,
    contractions: dict[str, Contraction],
    gen: torch.Generator,
    *,
    exact: bool,
    samples: int | None,
    estimator: str,
    groups: int,
    vector_batches: int | None,
    tuple_range: Callable[[int], range] | None,
    pilot: int | None = None,
    planned: bool = False,
) -> _Layout:
    """Stage 2: the subset, the groups or tuples, the vector batches and the tuple range.

    Draws from ``gen`` in a fixed order: the subset of ``samples`` rows, then the split.
    """
    device = obj.theta0.device
    fallback = False
    if exact:
        plan = _Layout(obj, single_layout(obj.n, device), None, 1)
    else:
        if estimator != "tuples":
            check_int("groups", groups, minimum=2 if estimator == "sketch" else 1)
        n = obj.n
        if samples is not None:
            check_int("samples", samples, minimum=1)
            if samples > n:
                raise ValueError(f"samples={samples} exceeds the {n} rows of data")
            obj = obj.select(torch.randperm(n, generator=gen)[:samples].to(device))
            n = samples
        m = max(tuple_size(c) for c in contractions.values())
        fallback = estimator == "auto" and (groups < 2 or n < 2 * m * groups)
        if fallback:
            estimator = "tuples"
        if estimator in ("sketch", "auto"):
            rows = torch.randperm(n, generator=gen)
            held = pilot_rows(n, groups, m, pilot, least=planned) if estimator == "auto" else 0
            size = (n - held) // groups
            if size < m:
                raise ValueError(
                    f"{n - held} rows cannot be split into {groups} groups of at least {m} "
                    f"rows (the statistics need {m} distinct rows per group); use fewer "
                    "groups or more samples"
                )
            layout = rows[held : held + groups * size].reshape(groups, size)
            plan = _Layout(obj, layout.to(device), None, groups, sketch=True)
            if held:
                each = held // groups
                plan.pilot = rows[: groups * each].reshape(groups, each).to(device)
        elif estimator == "groups":
            size = n // groups
            if size < 1:
                raise ValueError(f"{n} rows cannot be split into {groups} non-empty groups")
            layout = torch.randperm(n, generator=gen)[: groups * size].reshape(groups, size)
            plan = _Layout(obj, layout.to(device), None, groups)
        else:
            k = n // m
            if k < 1:
                raise ValueError(
                    f"the statistics need tuples of {m} distinct rows, got only {n} rows"
                )
            tuples = torch.randperm(n, generator=gen)[: k * m].reshape(k, m).to(device)
            plan = _Layout(obj, tuples, tuples, k)
    k = plan.groups
    if (
        plan.tuples is not None
        and vector_batches is not None
        and any(c.open_root for c in contractions.values())
    ):
        size = -(-k // vector_batches)  # the fewest tuples per batch, then the most batches
        if k // size < 2 <= k:
            size = k // 2
        plan.batching = (k // size, size, 0)
        plan.meta.update(vector_batches=k // size, vector_batch_size=size)
    if tuple_range is not None:
        if plan.tuples is None:
            raise ValueError("tuple_range applies to estimator='tuples' with exact=False only")
        part = tuple_range(k)
        plan.meta.update(tuple_range=[part.start, part.stop], tuples_total=k)
        plan.tuples = plan.layout = plan.tuples[part.start : part.stop]
        plan.groups = len(part)
        if plan.batching is not None:
            plan.batching = (plan.batching[0], plan.batching[1], part.start)
    if fallback:
        plan.meta.update(
            estimator="tuples",
            plan={"note": f"{n} rows and groups={groups}: too few for groups of {2 * m} rows"},
        )
    return plan


def _sketched(
    plan: _Layout,
    contractions: dict[str, Contraction],
    gen: torch.Generator,
    *,
    replicates: int,
    estimators: Mapping[str, str] | None,
    chunk_size: int | None,
    progress: bool,
    probed: int,
    split: bool = False,
) -> tuple[dict[str, np.ndarray], int]:
    """Stage 3 (sketch and auto): per-group values, each contraction by its estimator;
    ``split``: each rank its :func:`shard` of the groups, the values all-gathered."""
    m = max(tuple_size(c) for c in contractions.values())
    k = plan.groups
    share = local_share(k, distributed=split)
    sketcher = Sketcher(
        plan.obj, plan.layout, gen, chunk_size=chunk_size, parts=m, probed=probed, share=share
    )
    host = HostCopy()
    values: dict[str, np.ndarray] = {}
    bar = tqdm(contractions.items(), desc="measure", disable=not progress, unit="stat")
    for key, c in bar:
        bar.set_postfix_str(c.text, refresh=False)
        if estimators is not None and estimators[key] == "tuples":
            v = sketcher.tuple_values(c)
        else:
            v = sketcher.values(c, replicates=replicates)
        values[key] = host(v).astype(np.float64, copy=False)
        if len(share) < k:
            values[key] = gather_blocks(values[key], k)
    if len(share) < k:
        return values, int(all_ints([sketcher.evaluations]).sum())
    return values, sketcher.evaluations


def _evaluate(
    engine: Engine,
    contractions: dict[str, Contraction],
    tuples: torch.Tensor | None,
    *,
    exact: bool,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Stage 3: every contraction's per-group (per-tuple) values, float64 on the host."""
    host = HostCopy()
    values: dict[str, np.ndarray] = {}
    bar = tqdm(contractions.items(), desc="measure", disable=not progress, unit="stat")
    for key, c in bar:
        bar.set_postfix_str(c.text, refresh=False)
        if tuples is None:
            v = host(group_values(engine, c, unbiased=not exact))
        else:  # an empty range of tuples gives empty per-tuple values, zero batch sums
            v = host(tuple_values(engine, c, tuples))
        values[key] = v.astype(np.float64, copy=False)
    return values


def measure(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    order: int | Mapping[str, int],
    schedules: Sequence[Schedule] | Schedule | None = None,
    quantities: Sequence[str] | str | None = None,
    samples: int | None = None,
    exact: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    groups: int = 16,
    progress: bool = True,
    loss: Callable | None = None,
    max_message_elements: int | None = None,
    estimator: str | Mapping[str, str] = "auto",
    tuple_range: Callable[[int], range] | None = None,
    distributed: bool = True,
    vector_batches: int | None = 64,
    resummed: bool = False,
    rank: int | None = None,
    probes: int = 8,
    higher_rank: int | None = None,
    replicates: int = 1,
    pilot: int | None = None,
    lr: float | Sequence[float] | None = None,
    target_se: float | None = None,
    budget: float | None = None,
    probe_blocks: int = 1,
    force: bool = False,
) -> Statistics:
    r"""Measure every contraction of the requested series once at ``θ_0``.

    With ``exact=True`` the rows are the population and each value is the exact average
    (V-statistic), as :func:`perturb.predict` computes from materialized tensors.  Otherwise
    the rows are an iid sample from the population (``samples`` of them drawn without
    replacement when given), and ``estimator`` picks the unbiased estimate:

    * ``"auto"`` (default): a pilot on ``pilot`` rows of their own (default the smaller
      of ``n/8`` and ``max(256, 2mK)``, ``max(128, 2mK)`` with ``target_se`` or
      ``budget``, when there are enough rows, else none) measures
      every contraction both as ``"sketch"`` and as ``"tuples"`` inside groups, and each
      contraction takes the one with the smaller work-normalized variance (counted
      derivative evaluations × variance, deterministic); with ``lr`` (and numeric
      ``schedules``), ``target_se`` or ``budget``
      plan the rows and sketch replicates (:mod:`perturb.numeric.allocation`).  The rest
      of the rows are split into ``groups`` groups; ``meta["plan"]`` records the pilot
      and the choice.  Without a pilot every contraction is sketched; with fewer than
      ``2mK`` rows (or ``groups < 2``) the tuples below are used.
    * ``"sketch"``: the rows are split at random into ``groups`` disjoint groups; in each
      group every moment network of single-node blocks is a product of means over
      disjoint parts of the group's rows, every node one batched derivative
      (:mod:`perturb.numeric.sketches`), networks with blocks of up to ``probe_blocks``
      nodes are probed with random signs, the rest averaged over tuples inside the
      group; averaged over ``replicates`` draws; value and standard error are batch
      means over the ``K`` groups, as for ``"groups"``.  Cost linear in ``n``.
    * ``"tuples"`` (cost linear in ``n``): the rows are shuffled (``seed``) and cut
      into ``R = ⌊n/m⌋`` disjoint tuples of ``m`` rows, ``m`` the most independent blocks of
      any refinement of any requested contraction (the same tuples serve every contraction,
      each using the first columns it needs, so per-tuple predictions are well defined).
      Each tuple gives one unbiased estimate ``Z_r`` per contraction (every block of every
      refinement takes its own row of the tuple, one single-row derivative per node); the
      value is ``mean_r Z_r`` with standard error ``sd(Z_r)/√R`` (the ``Z_r`` are iid).
      :attr:`Statistics.groups` is ``R`` and :attr:`Statistics.group_values` holds the
      ``Z_r``; ``groups`` is ignored.  An open-root (displacement) statistic is a
      ``P``-vector per tuple; it is kept as ``K = ⌊R/s⌋`` batch means of
      ``s = ⌈R/vector_batches⌉`` consecutive tuples (``s = ⌊R/2⌋`` if that leaves one
      batch; the first ``K·s`` tuples, fewer than ``s`` left out; the batch means are
      iid, so ``sd/√K`` is still the standard error), accumulated on the device:
      ``K × P`` numbers instead of ``R × P`` (0.8 GB per statistic at ``R = 1024``,
      ``P ≈ 10⁵``).
    * ``"groups"`` (cost up to quadratic in ``n``): the rows are split at random into
      ``groups`` disjoint groups of ``⌊n/K⌋`` rows (the ``n mod K`` left over are unused),
      each contraction's complete U-statistic is computed within every group, and the value
      is the mean of the group estimates with standard error ``sd/√K`` (batch means; see
      the module notes).  More efficient per row, far slower per second.

    Args:
        loss_fn_or_model: an ``nn.Module`` (``data = (x, y)``), a :class:`FlatLoss`, a
            :class:`perturb.Population` (``data=None``) or a per-row
            ``loss_fn(params, *row) -> scalar``.
        data: the rows (a tensor, or a tuple of tensors with a common first axis).
        theta0: the point; default a model's parameters.
        order: highest power of η (and number of edges of the re-summed diagrams), or
            one per quantity, ``{quantity: order}``, which then also names the
            quantities (e.g. ``{"test": 3, "gap": 2}``).
        schedules: schedules whose series are needed; default ``(Online(), Epochs())`` with
            symbolic sizes, which covers every contraction of every schedule.
        quantities: any of ``"test"``, ``"train"``, ``"gap"``, ``"displacement"``.
        samples: use a random subset of this many rows (estimates only).
        exact: exact averages over the rows.
        seed: seed of the subset and of the split into groups.
        chunk_size: rows per ``vmap`` call (default from ``P``: memory bounded, ``vmap_rows``).
        device: where to compute (default: ``theta0``'s or the model's device).
        dtype: ``torch.float32`` or ``torch.float64`` (sums are accumulated in float64).
        groups: ``K``, the number of groups for the error bars (``estimator="groups"``).
        progress: show a tqdm bar over the contractions.
        loss: a model's per-sample loss (default cross-entropy).
        max_message_elements: memory bound of one message (see
            :func:`~perturb.numeric.networks.moment_network`).
        estimator: ``"auto"``, ``"sketch"``, ``"tuples"`` or ``"groups"`` (estimates
            only; see above), or a fixed choice per contraction,
            ``{name or key: "sketch" | "tuples"}`` (e.g. the ``"estimator"`` entries of
            an earlier run's ``meta["plan"]``: a deterministic run with that choice,
            no pilot, every row in the groups as for ``"sketch"``).
        tuple_range: for sharding across processes (:mod:`perturb.numeric.distributed`): given
            the number ``R`` of tuples, the range of tuples this call evaluates; the
            result then holds those tuples only (``meta["tuples_total"]`` is ``R``).
        distributed: under ``torchrun`` (a default :mod:`torch.distributed` process
            group of ``W > 1`` processes is initialized), split the ``R`` tuples across
            the ranks and all-gather the per-tuple values
            (:func:`measure_distributed`); ``"sketch"``/``"auto"``: each rank sketches
            its :func:`shard` of the groups (pilot and measurement) and the group values
            are all-gathered; ``resummed`` (estimates): each rank its share of the rows
            of the Krylov build (:func:`perturb.krylov_subspace`).  Every rank must pass
            the same arguments and gets the single-process result (to rounding).
            ``exact=True`` and ``"groups"`` are computed whole on every rank.
            ``False``: compute everything here.
        vector_batches: most batch means kept per open-root statistic (tuple estimator;
            at least 2); ``None`` keeps every tuple's vector.
        resummed: also build what the re-summed diagrams need: a rank-``rank`` Krylov
            subspace of ``H`` by Hessian-vector products on the device, every tensor the
            diagrams contract projected on it (:func:`perturb.krylov_subspace`; no
            ``P×P`` array unless ``rank = P``), for the re-summable ``schedules`` (online
            SGD, epochs and GD; default online) and ``quantities``, kept in
            :attr:`Statistics.subspace` for ``predict(..., resummed=True)``.  The rows
            (the ``samples`` subset) are its population; with ``exact=False`` it also
            keeps their projected gradients, split into ``min(groups, n)`` groups for
            jackknife error bars.
        rank: ``k``, the subspace dimension (required with ``resummed``).
        probes: random centred-gradient combinations in the Krylov starting block.
        higher_rank: ``k_3 ≤ k``: the per-sample Hessians and third derivatives (order 3,
            and GD's order 2) are projected on the first ``k_3`` basis vectors only
            (default ``k``; :func:`perturb.krylov_subspace`).
        replicates: sketch draws averaged per group (``"sketch"``; ``"auto"`` plans its
            own with ``target_se`` or ``budget``).
        pilot: ``"auto"``: rows held out for the pilot (``0``: no pilot, sketch all).
        lr: ``"auto"``: learning rates of the predictions to plan for (with numeric
            ``schedules``).
        target_se: ``"auto"``: the largest standard error wanted of any planned
            prediction; the plan uses the fewest rows and replicates that reach it.
        budget: ``"auto"``: the measurement's cost in full-batch gradients over the
            rows (counted derivative evaluations); the plan takes the least variance
            within it.
        probe_blocks: ``"sketch"``/``"auto"``: the largest block (in nodes, 1–3) the
            sketches estimate by random-sign probes; networks with larger blocks are
            measured on tuples inside the groups.  Default 1, no probes: a probe's
            variance does not fall with the rows and its intervals undercover
            (:mod:`perturb.numeric.sketches`).
        force: measure even when the estimated work
            (:func:`perturb.symbolic.cost.estimate_measure_work`: the series, then every
            contraction on the rows) is over a minute.

    Returns:
        :class:`Statistics`.

    Raises:
        perturb.errors.BudgetError: when the estimated work is over a minute (the
            message gives it), unless ``force``.

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> st = measure(f, torch.eye(2), torch.zeros(2), order=2, exact=True, progress=False)
        >>> round(float(st.predict(Online(steps=2, batch_size=1), lr=0.1).total[0]), 6)
        0.42
    """
    if distributed and tuple_range is None and estimator == "tuples" and not exact:
        if world()[1] > 1:
            return measure_distributed(
                loss_fn_or_model, data, theta0, order=order, schedules=schedules,
                quantities=quantities, samples=samples, exact=exact, seed=seed,
                chunk_size=chunk_size, device=device, dtype=dtype, groups=groups,
                progress=progress, loss=loss, max_message_elements=max_message_elements,
                estimator=estimator, vector_batches=vector_batches, resummed=resummed,
                rank=rank, probes=probes, higher_rank=higher_rank, replicates=replicates,
                pilot=pilot, lr=lr, target_se=target_se, budget=budget,
                probe_blocks=probe_blocks, force=force,
            )  # fmt: skip
    order, schedules, quantities = _requested(
        order,
        schedules,
        quantities,
        exact=exact,
        samples=samples,
        estimator=estimator,
        vector_batches=vector_batches,
    )
    orders = order if isinstance(order, dict) else dict.fromkeys(quantities, order)
    rows = _row_count(loss_fn_or_model, data, samples)
    work = estimate_measure_work(orders, schedules, rows=rows)
    check_work(work, force=force, option="force=True")
    contractions = requested_contractions(order, schedules, quantities)
    fixed = None
    if isinstance(estimator, Mapping):
        fixed, estimator = fixed_choice(estimator, contractions), "sketch"
    lrs = check_planning(estimator, schedules, replicates, lr, target_se, budget)
    if pilot is not None:
        check_int("pilot", pilot, minimum=0)
        if estimator != "auto":
            raise ValueError(f"pilot applies to estimator='auto', got {estimator!r}")
    check_int("probe_blocks", probe_blocks, minimum=1, maximum=MAX_PROBED_BLOCK)
    if probe_blocks > 1 and estimator not in ("auto", "sketch"):
        raise ValueError(
            f"probe_blocks={probe_blocks} applies to estimator='sketch' or 'auto', got "
            f"{estimator!r}"
        )
    obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    split = distributed and world()[1] > 1  # sketches, pilot, Krylov: each rank its share
    progress = progress and not (split and world()[0] > 0)
    gen = torch.Generator().manual_seed(int(seed))
    plan = _layout(
        obj,
        contractions,
        gen,
        exact=exact,
        samples=samples,
        estimator=estimator,
        groups=groups,
        vector_batches=vector_batches,
        tuple_range=tuple_range,
        pilot=pilot,
        planned=target_se is not None or budget is not None,
    )
    meta = dict(plan.meta)
    if plan.sketch and not exact:
        if split:
            agree = all_ints([obj.n, obj.size, int(seed), len(contractions), plan.groups])
            same_on_all_ranks("rows, parameters, seed, contractions, groups", agree)
        chosen = fixed
        if fixed is not None:
            meta["plan"] = {"pilot_rows": 0, "note": "estimators given per contraction"}
        if plan.pilot is not None:
            numeric = [(s, q) for s in schedules if s.is_numeric for q in quantities]
            outline = pilot_plan(
                plan.obj, contractions, plan.pilot, gen, available=int(plan.layout.numel()),
                predictions=numeric, lr=lrs, target_se=target_se, budget=budget,
                chunk_size=chunk_size, probed=probe_blocks, split=split, progress=progress,
            )  # fmt: skip
            chosen, replicates, rows = same_plan(outline, list(contractions))
            each = max(rows // groups, max(tuple_size(c) for c in contractions.values()))
            plan.layout = plan.layout[:, :each]
            meta["plan"] = outline.report
        elif estimator == "auto":
            if target_se is not None or budget is not None:
                raise ValueError(
                    f"target_se and budget are planned from a pilot, and {plan.obj.n} rows "
                    f"leave no room for one ({groups} groups of 2m rows, at most n/8); "
                    "pass more rows, fewer groups or pilot=..."
                )
            meta["plan"] = {"pilot_rows": 0, "note": "too few rows for a pilot: all sketched"}
        values, evaluations = _sketched(
            plan, contractions, gen, replicates=replicates, estimators=chosen,
            chunk_size=chunk_size, progress=progress, probed=probe_blocks, split=split,
        )  # fmt: skip
        meta.update(replicates=replicates, **({"world_size": world()[1]} if split else {}))
        networks_count = 0
    else:
        engine = Engine(
            plan.obj,
            plan.layout,
            chunk_size=chunk_size,
            budget=max_message_elements,
            vector_batches=plan.batching,
        )
        values = _evaluate(engine, contractions, plan.tuples, exact=exact, progress=progress)
        evaluations = engine.evaluations
        networks_count = sum(len(b) for b in engine.cache.values()) + sum(
            len(b) for b in engine.tuple_cache.values()
        )
    subspace = None  # stage 4: the Statistics
    if resummed:
        subspace = _subspace(
            plan.obj, order, schedules, quantities, rank=rank, probes=probes, seed=seed,
            chunk_size=chunk_size, exact=exact, higher_rank=higher_rank,
            split=split and not exact,  # a population (validate's) is built whole
            progress=progress,
        )  # fmt: skip
        meta["resummed_groups"] = 1 if exact else min(int(groups), plan.obj.n)
        meta["resummed_rank"] = subspace.rank
    if not exact:
        meta.setdefault("estimator", estimator)
        if plan.tuples is not None:
            meta["tuple_size"] = int(plan.tuples.shape[1])
    return Statistics(
        order=max(order.values()) if isinstance(order, dict) else order,
        exact=bool(exact),
        rows=int(plan.layout.numel()),
        groups=plan.groups,
        parameters=plan.obj.size,
        contractions=contractions,
        group_values=values,
        meta={
            "dtype": str(dtype).replace("torch.", ""),
            "seed": int(seed),
            "quantities": list(quantities),
            **({"orders": dict(order)} if isinstance(order, dict) else {}),
            "schedules": [str(s) for s in schedules],
            "evaluations": evaluations,
            "networks": networks_count,
            **meta,
        },
        subspace=subspace,
    )


def _subspace(
    obj, order, schedules, quantities, *, rank, probes, seed, chunk_size, exact, higher_rank, split,
    progress,
):  # fmt: skip
    """Stage 3b (``resummed=True``): the Krylov subspace of the re-summable schedules."""
    if rank is None:
        raise ValueError("resummed=True needs rank=k, the dimension of the Krylov subspace")
    usable = []
    for s in schedules:
        try:
            check_resummable(s)
        except ValueError:
            continue
        usable.append(s)
    return krylov_subspace(
        obj,
        None,
        rank=rank,
        order={q: max(order[q] if isinstance(order, dict) else order, 1) for q in quantities},
        quantities=quantities,
        schedules=usable or (Online(),),
        probes=probes,
        seed=seed,
        chunk_size=chunk_size,
        per_sample_gradients=not exact,
        higher_rank=higher_rank,
        distributed=split,
        progress=progress,
    )


def measure_distributed(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    exact: bool = False,
    estimator: str = "tuples",
    progress: bool = True,
    **kw: Any,
) -> Statistics:
    """:func:`perturb.numeric.measuring.measure`, with the tuples split across the ranks.

    (Its own default estimator is ``"tuples"``, the one it splits; ``measure`` passes
    its own.)

    Every rank builds the same seeded layout of ``R`` disjoint tuples as ``measure``;
    rank ``r`` evaluates the tuples :func:`shard` ``(R, r, W)`` only, and the per-tuple
    values are all-gathered (float64) in tuple order (an open-root statistic's batch
    means, ``vector_batches``, are partial on each rank and summed), so every rank returns the
    :class:`~perturb.numeric.statistics.Statistics` of a single-process ``measure`` (to float64
    rounding); ``meta["evaluations"]`` is the total over the ranks and
    ``meta["world_size"]`` is ``W``.  Other estimators go to ``measure`` under the
    process group, which splits ``"sketch"`` and ``"auto"`` by groups (and the Krylov
    subspace of ``resummed=True`` by rows) and computes ``exact=True`` and ``"groups"``
    whole.  ``measure`` itself calls this for the tuples under a process group; same
    arguments; the progress bar shows on rank 0 only.

    Raises:
        ValueError: For bad arguments (as ``measure``), or when the ranks disagree on the
            number of tuples, tuple size, parameters, seed or number of contractions.

    Example:
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> x = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> a = measure_distributed(f, x, torch.zeros(2), order=2, progress=False)
        >>> b = measure(f, x, torch.zeros(2), order=2, estimator="tuples", progress=False)
        >>> all(np.array_equal(a.group_values[k], b.group_values[k]) for k in b.group_values)
        True
    """
    rank, size = world()
    if size == 1 or exact or estimator != "tuples":  # split inside measure
        return measure(
            loss_fn_or_model, data, theta0, exact=exact, estimator=estimator,
            progress=progress, distributed=True, **kw,
        )  # fmt: skip
    local = measure(  # distributed: the Krylov subspace of resummed=True is split too
        loss_fn_or_model, data, theta0, exact=False, estimator="tuples",
        progress=progress and rank == 0, tuple_range=lambda k: shard(k, rank, size),
        distributed=True, **kw,
    )  # fmt: skip
    total = int(local.meta["tuples_total"])
    layout = [total, local.meta["tuple_size"], local.parameters, local.meta["seed"]]
    rows = all_ints([*layout, len(local.group_values), local.meta["evaluations"]])
    same_on_all_ranks("tuples, tuple size, parameters, seed, contractions", rows[:, :5])
    batched = "vector_batches" in local.meta
    values = {
        key: sum_over_ranks(v)
        if batched and local.contractions[key].open_root
        else gather_blocks(v, total, axis=0)
        for key, v in local.group_values.items()
    }
    meta = {k: v for k, v in local.meta.items() if k not in ("tuple_range", "tuples_total")}
    meta.update(evaluations=int(rows[:, 5].sum()), world_size=size)
    return replace(
        local,
        rows=total * int(local.meta["tuple_size"]),
        groups=total,
        group_values=values,
        meta=meta,
    )
