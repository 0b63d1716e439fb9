r"""``perturb plan --check``: run the grid for real and score the plan against it.

Real SGD (the trials of :func:`perturb.compare`,
:func:`perturb.experiments.pipeline.run_trials`: ``K`` vectorized runs per ``(η, B)``
from ``θ_0``, the mean test loss with a 95% t-interval over the finite trials) at every
point of the plan's grid and at the other tools' picks, one run per batch size up to the
longest horizon, recorded at each.  Per horizon:

* **regret** of a pick: its actual mean minus the best grid point's, in units of the
  95% half-width of that difference, ``(m_pick − m_best)/\sqrt{h_pick² + h_best²}``
  (the best among the points where no trial blew up or passed the loss limit);
* **divergence**: a point *diverged* when a trial blew up (a loss or parameter not
  finite) or passed the loss limit (:meth:`~perturb.experiments.simulation.Trials.limits`)
  by the horizon; it was *flagged* when it lies beyond the predicted instability
  boundary or within one grid step of it: ``η`` one step up, or the same ``η`` at a
  neighbouring batch size, is beyond the boundary;
* **cost**: the grid search's SGD steps counted in full-batch gradients, ``K·T·B/n``
  summed over the grid (every horizon its own search), and the simulation's seconds.

Example:
    >>> round(regret(1.2, 0.03, 1.0, 0.04), 9)  # 0.2 above; the difference's width 0.05
    4.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from perturb.experiments.pipeline import Setup, curve_intervals, run_trials
from perturb.experiments.plan_grid import PlanGrid

__all__ = ["check_grid", "flagged", "regret", "score"]


def regret(mean: float, half: float, best_mean: float, best_half: float) -> float:
    """``(mean − best_mean)/√(half² + best_half²)``: a regret in half-widths of the
    difference (``nan`` when either mean is missing, ``inf`` for a zero width).

    Example:
        >>> regret(1.0, 0.0, 1.0, 0.0), regret(float("nan"), 0.1, 1.0, 0.1)
        (0.0, nan)
    """
    if not (math.isfinite(mean) and math.isfinite(best_mean)):
        return math.nan
    width = math.hypot(half, best_half)
    diff = mean - best_mean
    if width > 0:
        return diff / width
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def flagged(lr: float, batch_size: int, grid: PlanGrid, edges: dict[int, float]) -> bool:
    """Whether ``(η, B)`` lies beyond the boundary (``edges[B]``) or within one grid step.

    Example:
        >>> from perturb.experiments.plan_grid import Horizon
        >>> g = PlanGrid(lrs=(0.01, 0.1, 1.0), batch_sizes=(1, 2),
        ...              horizons=(Horizon("steps", 5),), population=4)
        >>> [flagged(lr, 1, g, {1: 0.5, 2: 2.0}) for lr in g.lrs]  # 1.0 beyond, 0.1 next
        [False, True, True]
        >>> flagged(1.0, 2, g, {1: 0.5, 2: 2.0})  # inside at B = 2, beyond at B = 1
        True
    """
    lrs, sizes = list(grid.lrs), list(grid.batch_sizes)
    if lr > edges[batch_size]:
        return True
    i = lrs.index(lr) if lr in lrs else None
    if i is not None and i + 1 < len(lrs) and lrs[i + 1] > edges[batch_size]:
        return True
    j = sizes.index(batch_size)
    return any(0 <= k < len(sizes) and lr > edges[sizes[k]] for k in (j - 1, j + 1))


def check_grid(
    setup: Setup,
    grid: PlanGrid,
    *,
    extra: dict[int, Sequence[float]],
    trials: int,
    seed: int,
    device: str = "cpu",
    progress: bool = False,
    max_memory: float | None = None,
    force: bool = False,
) -> dict[tuple[int, int, float], dict[str, Any]]:
    """Run ``trials`` SGD trials at every ``(η, B)`` of ``grid`` and at ``extra[B]``.

    One run per batch size, to its longest horizon, recorded at every horizon.

    Returns:
        Per ``(horizon, B, η)``: ``actual`` (mean over the finite trials), ``ci_half``,
        ``trials`` (finite), ``dropped``, ``above_limit`` and ``diverged`` (a trial blew
        up or passed the limit), and ``limit``.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population
        >>> from perturb.experiments.plan_grid import Horizon
        >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
        >>> g = PlanGrid(lrs=(0.01,), batch_sizes=(2,), horizons=(Horizon("steps", 3),),
        ...              population=8)
        >>> out = check_grid(setup, g, extra={2: [0.05]}, trials=4, seed=0)
        >>> sorted(out), out[(0, 2, 0.01)]["diverged"]
        ([(0, 2, 0.01), (0, 2, 0.05)], False)
    """
    out: dict[tuple[int, int, float], dict[str, Any]] = {}
    for i, b in enumerate(grid.batch_sizes):
        schedules = [grid.schedule_at(h, b) for h in grid.horizons]
        longest = max(schedules, key=lambda s: int(s.steps))
        lrs = sorted({*grid.lrs, *(float(v) for v in extra.get(b, ()) if math.isfinite(v))})
        run = run_trials(
            setup,
            longest,
            lrs=lrs,
            trials=trials,
            seed=seed + 1000 * i,
            record=sorted({int(s.steps) for s in schedules}),
            device=device,
            progress=progress,
            max_memory=max_memory,
            force=force,
        )
        means, halves, column = curve_intervals(run)
        limit = run.limits()["limit"]
        for hi, sched in enumerate(schedules):
            t = int(sched.steps)
            for li, lr in enumerate(lrs):
                counts = run.counts_at(li, t)
                out[(hi, b, lr)] = {
                    "actual": float(means[li, column[t]]),
                    "ci_half": float(halves[li, column[t]]),
                    "trials": int(trials - counts["dropped"]),
                    "dropped": counts["dropped"],
                    "above_limit": counts["above_limit"],
                    "diverged": bool(counts["dropped"] or counts["above_limit"]),
                    "limit": limit,
                }
    return out


def _at(runs: dict, horizon: int, lr: float | None, batch_size: int | None) -> dict | None:
    if lr is None or batch_size is None:
        return None
    return runs.get((horizon, batch_size, float(lr)))


def score(
    rows: Sequence[dict[str, Any]],
    boundaries: Sequence[dict[str, Any]],
    grid: PlanGrid,
    runs: dict[tuple[int, int, float], dict[str, Any]],
    *,
    picks: dict[int, dict[str, tuple[float | None, int | None]]],
    trials: int,
) -> list[dict[str, Any]]:
    """Score each horizon's picks against the runs (module notes).

    Args:
        rows: the plan's rows (:func:`~perturb.experiments.plan_grid.grid_rows`); their
            ``actual``, ``ci_half``, ``diverged`` and ``flagged`` are filled in here.
        boundaries: its boundaries.
        grid: its grid.
        runs: :func:`check_grid`'s results.
        picks: per horizon, named picks ``{name: (η, B)}`` (``"plan"`` first; a ``None``
            η is no pick).
        trials: the trials per point.

    Returns:
        Per horizon: ``best`` (``lr``, ``batch_size``, ``actual``, ``ci_half``), per pick
        its ``lr``, ``batch_size``, ``actual``, ``ci_half``, ``regret`` and ``diverged``,
        ``diverged_points``, ``flagged_points``, ``unflagged`` (their ``(η, B)``), and
        ``grid_cost`` (full-batch gradients of the grid search).
    """
    reports = []
    for hi in range(len(grid.horizons)):
        edges = {b["batch_size"]: b["edge"] for b in boundaries if b["horizon"] == hi}
        mine = [r for r in rows if r["horizon"] == hi]
        for r in mine:
            run = runs[(hi, r["batch_size"], r["lr"])]
            r.update(
                actual=run["actual"],
                ci_half=run["ci_half"],
                diverged=run["diverged"],
                flagged=flagged(r["lr"], r["batch_size"], grid, edges),
            )
        calm = [r for r in mine if not r["diverged"] and math.isfinite(r["actual"])]
        best = min(calm, key=lambda r: r["actual"]) if calm else None
        report: dict[str, Any] = {"horizon": hi, "picks": {}}
        report["best"] = None if best is None else {
            k: best[k] for k in ("lr", "batch_size", "actual", "ci_half")
        }  # fmt: skip
        for name, (lr, b) in picks.get(hi, {}).items():
            run = _at(runs, hi, lr, b)
            entry: dict[str, Any] = {"lr": lr, "batch_size": b}
            if run is not None:
                entry.update(actual=run["actual"], ci_half=run["ci_half"], diverged=run["diverged"])
                entry["regret"] = (
                    math.nan if best is None else
                    regret(run["actual"], run["ci_half"], best["actual"], best["ci_half"])
                )  # fmt: skip
            report["picks"][name] = entry
        bad = [r for r in mine if r["diverged"]]
        report["diverged_points"] = len(bad)
        report["flagged_points"] = sum(r["flagged"] for r in bad)
        report["unflagged"] = [[r["lr"], r["batch_size"]] for r in bad if not r["flagged"]]
        report["grid_points"] = len(mine)
        report["grid_cost"] = float(
            np.sum([trials * r["steps"] * r["batch_size"] / grid.population for r in mine])
        )
        reports.append(report)
    return reports
