r"""Which estimator measures each contraction, on how many rows: a pilot, then a plan.

Two unbiased estimators serve every contraction (both per group of a ``(K, n_g)``
layout, so the batch-means error bar holds for any mix of them):

* ``"tuples"``: disjoint tuples inside each group, one per-row derivative per node
  (:meth:`~perturb.numeric.sketches.Sketcher.tuple_values`);
* ``"sketch"``: split means and random-sign probes, one batched derivative per node over
  all the group's rows (:meth:`~perturb.numeric.sketches.Sketcher.values`), averaged over
  ``r`` replicates.

**The pilot.**  On ``n_p`` rows of their own (left out of the measurement that follows,
so the choice is independent of the rows it is applied to and every estimate stays
exactly unbiased) each contraction ``c`` is measured both ways in ``K`` groups, the
sketch with two replicates.  With ``X_{g,1}, X_{g,2}`` the two replicates of
group ``g``,

.. math::  \hat B = \tfrac12\,\overline{(X_{g,1}-X_{g,2})^2},\qquad
           \hat A = \widehat{\operatorname{Var}}_g(X_{g,1}) - \hat B ,

split a group value's variance into the part of the rows (``A``) and the part of the
split and the probes (``B``), so ``r`` replicates give ``A + B/r``.  Per contraction the
estimator with the smaller *work-normalized variance* ``work × variance`` is chosen, its
work counted from the contraction's structure, never timed (:func:`estimator_work`:
derivative evaluations per row, one row through one node of a moment network counting
1), so the choice, and every number after it, depends on the seed only, not on the
machine or its load.  The pilot's seconds are recorded for information.

**The plan.**  With the learning rates and numeric schedules of the predictions wanted
(``lr`` and ``schedules``), the same decomposition is made for those predictions
(per-group predictions are linear in the group values, so covariances between
contractions are included), and a prediction's variance on ``n`` rows is modelled as
``(n_p/n)(A + B/r)/K`` for ``n ≥ n_p``: without probes (the default) both parts fall at
least as ``1/n`` as the groups grow (for degenerate statistics faster), so the model is
conservative there; below ``n_p`` it is not (degenerate terms grow faster than ``1/n``
as groups shrink), so no plan takes fewer rows than the pilot had.  Its cost is
``n·(c_t + r·c_s)`` (:func:`estimator_work`'s evaluations per row of the tuple-measured
and of the sketched contractions).
``target_se``: the cheapest ``(n, r)`` whose largest predicted standard error is at most
the target (all rows and the best ``r`` when no ``n`` reaches it); ``budget`` (in
full-batch gradients over the rows, i.e. ``budget`` evaluations per row): the ``(n, r)``
of least variance that fits; neither: every row, ``r = 1``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb.checks import check_int
from perturb.numeric.adapters import Objective
from perturb.numeric.derivatives import summed
from perturb.numeric.distributed import all_ints, gather_blocks, local_share, world
from perturb.numeric.engine import tree_order
from perturb.numeric.networks import tuple_networks, tuple_size
from perturb.numeric.sketches import Sketcher
from perturb.symbolic.contractions import Contraction
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import series

__all__ = [
    "ESTIMATORS",
    "MAX_REPLICATES",
    "PILOT_ROWS",
    "Plan",
    "check_planning",
    "estimator_work",
    "fixed_choice",
    "full_gradient_seconds",
    "pilot_plan",
    "pilot_rows",
    "prediction_weights",
    "same_plan",
]

ESTIMATORS = ("sketch", "tuples")
PILOT_ROWS = 256  # the default pilot's rows, at most n/8 (estimator "auto")
MAX_REPLICATES = 64


@dataclass(frozen=True)
class Plan:
    """The outcome of a pilot: an estimator per contraction, replicates and rows.

    Attributes:
        estimators: contraction key -> ``"sketch"`` or ``"tuples"``.
        replicates: ``r``, the sketch replicates per group.
        rows: the rows the measurement should use (at most those left after the pilot).
        report: JSON-able record of the pilot (per contraction: variance, counted work
            per row and, for information, seconds per estimator; the predicted standard
            error), for ``Statistics.meta``.
    """

    estimators: dict[str, str]
    replicates: int
    rows: int
    report: dict[str, Any] = field(default_factory=dict)


def prediction_weights(
    contractions: Mapping[str, Contraction],
    predictions: Sequence[tuple[Schedule, str]],
    lr: Sequence[float],
) -> np.ndarray:
    """``w[j, c]``: the coefficient of contraction ``c`` in prediction ``j`` at each ``lr``.

    Predictions are ``(schedule, quantity)`` pairs (numeric schedules), crossed with the
    learning rates; the series order is the highest power whose terms are all measured.
    A prediction is ``Σ_c w[j, c] v_c``; vector (displacement) terms are left out.

    Example:
        >>> from perturb.numeric.measuring import requested_contractions
        >>> from perturb.symbolic.schedules import Online
        >>> cs = requested_contractions(1, (Online(),), ("test",))
        >>> prediction_weights(cs, [(Online(steps=10, batch_size=1), "test")], [0.1]).tolist()
        [[1.0, -1.0]]
    """
    keys = list(contractions)
    index = {k: i for i, k in enumerate(keys)}
    rows = []
    for schedule, quantity in predictions:
        if quantity == "displacement":
            continue
        order = 0
        while True:  # the highest order whose every term was measured
            terms = series(order + 1, schedule, quantity).terms
            if not all(t.contraction.key in index for t in terms):
                break
            order += 1
            if order >= 8:
                break
        terms = series(order, schedule, quantity).terms
        for eta in lr:
            w = np.zeros(len(keys))
            for t in terms:
                w[index[t.contraction.key]] += float(t.coefficient) * float(eta) ** t.power
            rows.append(w)
    return np.array(rows).reshape(len(rows), len(keys))


def estimator_work(
    contraction: Contraction, group_size: int, *, parts: int | None = None, probed: int = 1
) -> dict[str, float]:
    """Derivative evaluations per row of each estimator: the pilot's cost model.

    Counted from the structure, one row through one node of a moment network counting 1
    (an open root is no node), each distinct message of the contraction once, as the
    estimators share them: a node's message is fixed by its rows and the messages it
    receives.  With ``m`` the contraction's :func:`~perturb.numeric.networks.tuple_size`
    and ``M = parts`` (default ``m``) the sketch's parts of ``s = ⌊n_g/M⌋`` rows:

    * ``"tuples"``: a node on tuple column ``j`` (its block) over the ``⌊n_g/m⌋`` tuples
      of the group;
    * ``"sketch"``: a node of block ``j`` of ``b`` over the ``s·|{j, j + b, …} ∩ [0, M)|``
      rows of its parts; a network with a block of more than ``probed`` nodes on the
      tuples, as above.

    Summed over the moment networks (the tree hung from node 0) and divided by ``n_g``.
    Messages that other contractions share are counted again (a model of the work, not
    a trace of one run's caches).

    Example:
        >>> gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))  # G·G: ḡ_(1) · ḡ_(2)
        >>> estimator_work(gg, 8)  # 2 nodes on 4 tuples; 2 nodes on a 4-row part each
        {'sketch': 1.0, 'tuples': 1.0}
        >>> trc = Contraction(parents=(-1, 0), parts=((0, 1),))  # tr(C) = E g·g − G·G
        >>> estimator_work(trc, 8)  # 2 + 2 messages on 4 tuples, the same by sketch
        {'sketch': 2.0, 'tuples': 2.0}
        >>> estimator_work(trc, 8, probed=2)  # probed: E g·g's nodes on all 8 rows
        {'sketch': 3.0, 'tuples': 2.0}
    """
    m = tuple_size(contraction)
    parts = m if parts is None else parts
    size, count = group_size // parts, group_size // m
    tuple_seen: dict[str, set] = {"tuples": set(), "sketch": set()}
    split_seen: set[tuple] = set()
    work = {"tuples": 0, "sketch": 0}
    for net, _ in tuple_networks(contraction):
        b = len(net.blocks)
        block_of = {v: j for j, blk in enumerate(net.blocks) for v in blk}
        split = max((len(blk) for blk in net.blocks), default=0) <= probed
        children, postorder = tree_order(net.parents)
        keys: dict[int, tuple] = {}
        for v in postorder:
            if v == 0 and net.open_root:
                break
            j = block_of[v]
            keys[v] = (j, len(net.blocks[j]), v == 0, tuple(sorted(keys[c] for c in children[v])))
            for name in ("tuples",) if split else ("tuples", "sketch"):  # on the tuples
                if keys[v] not in tuple_seen[name]:
                    tuple_seen[name].add(keys[v])
                    work[name] += count
            if split and (v == 0 or (b, *keys[v]) not in split_seen):  # roots never shared
                split_seen.add((b, *keys[v]))
                work["sketch"] += size * len(range(j, parts, b))
    return {e: work[e] / group_size for e in ("sketch", "tuples")}


def full_gradient_seconds(obj: Objective, *, repeat: int = 3) -> float:
    """Seconds of one gradient of the summed loss over the objective's rows: the unit of
    work (median of ``repeat`` after one warm-up call).

    Example:
        >>> from perturb.numeric.adapters import objective
        >>> obj = objective(lambda p, x: (p * x).sum(), torch.ones(4, 3), torch.zeros(3))
        >>> full_gradient_seconds(obj) > 0
        True
    """
    g = torch.func.grad(summed(obj.batch))
    g(obj.theta0, *obj.rows)
    times = []
    for _ in range(repeat):
        _sync(obj.theta0.device)
        start = time.perf_counter()
        g(obj.theta0, *obj.rows)
        _sync(obj.theta0.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decompose(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """``(A, B)`` per group from two replicates ``(K,)`` each (module notes)."""
    b = float(np.mean((first - second) ** 2) / 2)
    v = float(np.var(np.concatenate([first, second]), ddof=1))
    return max(v - b, 0.0), b


def pilot_plan(
    obj: Objective,
    contractions: Mapping[str, Contraction],
    layout: torch.Tensor,
    generator: torch.Generator,
    *,
    available: int,
    predictions: Sequence[tuple[Schedule, str]] = (),
    lr: Sequence[float] | None = None,
    target_se: float | None = None,
    budget: float | None = None,
    chunk_size: int | None = None,
    probed: int = 1,
    split: bool = False,
    progress: bool = False,
) -> Plan:
    """Measure every contraction both ways on the pilot ``layout`` and plan the measurement.

    With ``split`` under ``torchrun`` (``W > 1`` ranks, ``K ≥ W``) each rank measures
    its :func:`~perturb.numeric.distributed.shard` of the ``K`` groups and the group
    values are all-gathered: the variances are the single-process ones; the seconds are
    the rank's own, scaled by ``K / |shard|`` (the whole pilot's).

    Args:
        obj: the rows (pilot and measurement rows alike).
        contractions: the statistics to plan, by key.
        layout: ``(K, n_p/K)`` the pilot's rows, in ``K`` groups.
        generator: draws the pilot's splits and probes.
        available: rows left for the measurement.
        predictions: numeric ``(schedule, quantity)`` pairs the plan serves.
        lr: their learning rates (needed with ``target_se``).
        target_se: largest standard error wanted of any prediction.
        budget: full-batch gradients (over ``available`` rows) the measurement may cost,
            in :func:`estimator_work`'s evaluations (``budget`` per available row).
        chunk_size: rows per batched call.
        probed: the sketches' largest probed block (:class:`~perturb.numeric.sketches.Sketcher`).
        split: split the pilot's groups across the ranks (above).
        progress: show a tqdm bar (standard error) over the contractions measured; the
            plan does not depend on it.

    Returns:
        The :class:`Plan`.
    """
    k, size = (int(s) for s in layout.shape)
    m = max(tuple_size(c) for c in contractions.values())
    share = local_share(k, distributed=split)
    scale = k / len(share)

    def whole(v: torch.Tensor) -> np.ndarray:  # every group's values, on every rank
        host = v.double().cpu().numpy()
        return gather_blocks(host, k) if len(share) < k else host

    sketcher = Sketcher(
        obj, layout, generator, chunk_size=chunk_size, parts=m, probed=probed, share=share
    )
    planning = lr is not None
    values: dict[str, dict[str, np.ndarray]] = {"tuples": {}, "sketch": {}, "sketch2": {}}
    seconds: dict[str, dict[str, float]] = {"tuples": {}, "sketch": {}}  # information only
    work: dict[str, dict[str, float]] = {}
    report: dict[str, Any] = {"pilot_rows": k * size, "pilot_groups": k, "contractions": {}}
    estimators: dict[str, str] = {}
    bar = tqdm(contractions.items(), desc="pilot", disable=not progress, unit="stat")
    for key, c in bar:
        bar.set_postfix_str(c.text, refresh=False)
        start = time.perf_counter()
        values["tuples"][key] = whole(sketcher.tuple_values(c))
        seconds["tuples"][key] = (time.perf_counter() - start) * scale
        start = time.perf_counter()
        values["sketch"][key] = whole(sketcher.values(c, replicates=1))
        seconds["sketch"][key] = (time.perf_counter() - start) * scale
        if planning:  # a second replicate, for the split of the variance (module notes)
            values["sketch2"][key] = whole(sketcher.values(c, replicates=1, start=1))
        entry: dict[str, Any] = {"text": c.text}
        if c.open_root:  # vectors: compare the summed variance over coordinates
            var = {e: float(values[e][key].var(axis=0, ddof=1).sum()) for e in ESTIMATORS}
        else:
            var = {e: float(values[e][key].var(ddof=1)) for e in ESTIMATORS}
        work[key] = estimator_work(c, size, parts=m, probed=probed)
        wnv = {e: var[e] * work[key][e] for e in ESTIMATORS}
        choice = min(ESTIMATORS, key=lambda e: (wnv[e], e != "sketch"))
        estimators[key] = choice
        for e in ESTIMATORS:
            entry[e] = {"variance": var[e], "work": work[key][e], "seconds": seconds[e][key]}
        entry["estimator"] = choice
        report["contractions"][key] = entry
    per_row = {  # evaluations per row of the measurement
        e: sum(work[key][e] for key in contractions if estimators[key] == e) for e in ESTIMATORS
    }
    fb = float(available)  # a full-batch gradient: every row through one node
    report.update(evaluations_per_row=per_row, full_batch_gradient_evaluations=fb)
    available = available // k * k  # whole groups
    replicates, rows = 1, available
    weights = prediction_weights(contractions, predictions, lr) if lr is not None else None
    if weights is not None and weights.size:
        keys = list(contractions)

        def per_group(name: str) -> np.ndarray:
            cols = []
            for key in keys:
                source = name if estimators[key] == "sketch" else "tuples"
                v = values[source][key]
                cols.append(np.zeros(k) if v.ndim > 1 else v)
            return weights @ np.stack(cols)  # (J, K)

        first, second = per_group("sketch"), per_group("sketch2")
        parts = [_decompose(first[j], second[j]) for j in range(len(first))]
        a = np.array([p[0] for p in parts])
        b = np.array([p[1] for p in parts])

        def variance(n: float, r: int) -> float:
            return float(np.max((k * size / n) * (a + b / r) / k))

        def cost(n: float, r: int) -> float:
            return n * (per_row["tuples"] + r * per_row["sketch"])

        options = range(1, MAX_REPLICATES + 1)
        least = min(available, k * size)  # never fewer rows than the pilot (module notes)
        if target_se is not None:
            goal = float(target_se) ** 2
            feasible = []
            for r in options:
                need = max(math.ceil(np.max(size * (a + b / r)) / goal), least)
                need = -(-need // k) * k  # whole groups
                if need <= available:
                    feasible.append((cost(need, r), r, need))
            if feasible:
                _, replicates, rows = min(feasible)
            else:
                replicates = min(options, key=lambda r: (variance(available, r), r))
                report["target_unreachable"] = True
        elif budget is not None:
            affordable = []
            for r in options:
                n = min(available, int(float(budget) * fb / max(cost(1, r), 1e-30)) // k * k)
                if n >= least:
                    affordable.append((variance(n, r), r, n))
            if affordable:
                _, replicates, rows = min(affordable)
            else:
                rows = least
                report["budget_too_small"] = True
        report["predicted_se"] = math.sqrt(variance(rows, replicates))
        report["predicted_evaluations"] = cost(rows, replicates)
    report.update(replicates=replicates, rows=rows)
    return Plan(estimators=estimators, replicates=replicates, rows=rows, report=report)


def pilot_rows(n: int, groups: int, m: int, pilot: int | None, *, least: bool) -> int:
    """Rows held out for the pilot: ``pilot``, or ``min(n/8, max(PILOT_ROWS, 2mK))`` when
    that gives every pilot group ``2m`` rows and leaves ``4m`` per group (else none);
    ``least`` (a ``target_se`` or ``budget`` plan): ``PILOT_ROWS/2`` instead, since every
    pilot row costs and the plan's own rows will exceed the pilot's (groups much smaller
    than that are dominated by degenerate terms, which make the plan over-cautious).

    Example:
        >>> pilot_rows(2048, 16, 4, None, least=False), pilot_rows(2048, 16, 4, None, least=True)
        (256, 128)
        >>> pilot_rows(500, 16, 4, None, least=False)  # n/8 = 62 < 2mK = 128: no pilot
        0
    """
    if pilot is not None:
        check_int("pilot", pilot, minimum=0)
        if pilot and pilot < 2 * m * groups:
            raise ValueError(
                f"pilot={pilot} rows cannot fill {groups} groups of {2 * m} rows (twice the "
                f"{m} distinct rows the statistics need); pass pilot=0 or at least "
                f"{2 * m * groups}"
            )
        if pilot > n - m * groups:
            raise ValueError(
                f"pilot={pilot} leaves fewer than {m * groups} of the {n} rows to measure"
            )
        return pilot
    held = min(n // 8, max(PILOT_ROWS // 2 if least else PILOT_ROWS, 2 * m * groups))
    return held if held >= 2 * m * groups and n - held >= 4 * m * groups else 0


def fixed_choice(
    choice: Mapping[Any, str], contractions: Mapping[str, Contraction]
) -> dict[str, str]:
    """``{key: estimator}`` from ``{name, key or Contraction: estimator}``, checked.

    Raises:
        ValueError: An estimator not in :data:`ESTIMATORS`, or a contraction left out.

    Example:
        >>> from perturb.numeric.measuring import requested_contractions
        >>> from perturb.symbolic.schedules import Online
        >>> cs = requested_contractions(1, (Online(),), ("test",))
        >>> sorted(fixed_choice({"l": "sketch", "G·G": "tuples"}, cs).values())
        ['sketch', 'tuples']
    """
    out: dict[str, str] = {}
    names = {c.text: k for k, c in contractions.items()}
    for item, kind in choice.items():
        if kind not in ESTIMATORS:
            raise ValueError(f"a contraction's estimator must be one of {ESTIMATORS}, got {kind!r}")
        key = item.key if isinstance(item, Contraction) else names.get(item, item)
        if key in contractions:
            out[key] = kind
    missing = sorted(c.text for k, c in contractions.items() if k not in out)
    if missing:
        raise ValueError(f"the estimator per contraction lacks {missing}")
    return out


def same_plan(outline: Plan, keys: Sequence[str]) -> tuple[dict[str, str], int, int]:
    """The plan's choices, replicates and rows; under ``torchrun`` rank 0's on every rank
    (the plan is a function of the pilot's values, whose rounding may differ between
    processes: one plan for all).

    Example:
        >>> same_plan(Plan(estimators={"k": "sketch"}, replicates=1, rows=64), ["k"])
        ({'k': 'sketch'}, 1, 64)
    """
    if world()[1] == 1:
        return outline.estimators, outline.replicates, outline.rows
    mine = [ESTIMATORS.index(outline.estimators[k]) for k in keys]
    first = all_ints([*mine, outline.replicates, outline.rows])[0]
    chosen = {k: ESTIMATORS[int(i)] for k, i in zip(keys, first[:-2], strict=True)}
    for k in keys:
        outline.report["contractions"][k]["estimator"] = chosen[k]
    outline.report.update(replicates=int(first[-2]), rows=int(first[-1]), from_rank=0)
    return chosen, int(first[-2]), int(first[-1])


def check_planning(
    estimator: str,
    schedules: Sequence[Schedule],
    replicates: int,
    lr: float | Sequence[float] | None,
    target_se: float | None,
    budget: float | None,
) -> list[float] | None:
    """Check ``measure``'s planning options; the learning rates as a list (or ``None``).

    Raises:
        ValueError: Options that do not apply to ``estimator``, both ``target_se`` and
            ``budget``, non-positive or non-finite values, ``target_se``/``budget``
            without ``lr``, or ``lr`` without a numeric schedule.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> check_planning("auto", [Online(steps=10, batch_size=1)], 1, 0.1, 0.01, None)
        [0.1]
    """
    check_int("replicates", replicates, minimum=1)
    if replicates > 1 and estimator != "sketch":
        raise ValueError(
            f"replicates={replicates} applies to estimator='sketch' (estimator='auto' plans "
            f"its own with target_se or budget); got estimator={estimator!r}"
        )
    planned = {"lr": lr, "target_se": target_se, "budget": budget}
    given = [k for k, v in planned.items() if v is not None]
    if given and estimator != "auto":
        raise ValueError(f"{', '.join(given)} apply to estimator='auto', got {estimator!r}")
    if target_se is not None and budget is not None:
        raise ValueError("pass target_se or budget, not both")
    for name in ("target_se", "budget"):
        v = planned[name]
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if v is not None and not (number and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    lrs = None
    if lr is not None:
        lrs = [float(v) for v in np.atleast_1d(np.asarray(lr, dtype=float))]
        if not lrs or not all(math.isfinite(v) and v >= 0 for v in lrs):
            raise ValueError(f"lr must be non-negative numbers, got {lr!r}")
    if (target_se is not None or budget is not None) and lrs is None:
        raise ValueError("target_se and budget plan for predictions: pass lr=... too")
    if lrs is not None and not any(s.is_numeric for s in schedules):
        raise ValueError(
            "lr plans for predictions of numeric schedules, e.g. Online(steps=100, "
            f"batch_size=1); got {[str(s) for s in schedules]}"
        )
    return lrs
