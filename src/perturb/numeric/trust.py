r"""Whether to trust a prediction, decided before any SGD is run: one rule for every command.

A prediction ``v`` of ``E[l(θ_T)]`` comes with an ``error_estimate`` ``e``
(:mod:`perturb.numeric.validity`: the terms its truncation leaves out, the Krylov
``k`` vs ``k/2`` difference, the per-sample Hessian ladder).  It is **trusted** when

* it is finite, not blown up, and none of the checks that end the frozen-statistics
  picture fires: mean-square instability of the per-sample Hessians, or a single sample
  whose step overshoots once it is expected to be drawn (a displacement beyond
  ``ρ = ‖H‖/‖J‖`` is no veto: it enters ``e``, as the floor ``d/ρ`` of the geometric
  continuation of the last term); and
* ``e`` is small against what the prediction is for: at most
  :data:`~perturb.numeric.validity.TRUST_FRACTION` of the change it predicts,
  ``|v − l(θ_0)|``, **or** at most the resolution ``r`` at which it is read.

The resolution is the part that makes the verdict sharp near a minimum, where the loss
hardly changes and a relative rule trusts nothing: SGD's outcome is a random variable,
and an error below its spread is below what any run can show.  ``r`` is the 95%
half-width of the mean of ``trials`` runs, ``t_{0.975, n−1}·σ/√n``, with ``σ`` the
standard deviation of the loss across runs *predicted* by the quadratic model
(:func:`perturb.numeric.validity.loss_spread`; with ``n = 1``, one run's ``σ``).
Nothing in it looks at runs.

Example:
    >>> import numpy as np
    >>> trust_mask(np.array([0.01, 0.01]), np.array([1.2, 1.0]), start_loss=1.0,
    ...            resolution=np.array([0.0, 0.02]))
    array([ True,  True])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from perturb.checks import check_int
from perturb.numeric.intervals import t_half_width
from perturb.numeric.predictions import UnstableDirectionWarning
from perturb.numeric.validity import (
    MEAN_SQUARE_EXCESS,
    TRUST_FRACTION,
    curvature_radius,
    displacement_ratio,
    hessian_ladder,
    loss_spread,
    mean_square_excess,
    overshoot,
    rms_displacement,
    truncation_estimates,
    with_ladder,
)
from perturb.symbolic.schedules import Schedule, cut

__all__ = [
    "BLOW_UP",
    "OVERSHOOT",
    "Trust",
    "assess",
    "blown_up",
    "horizon_steps",
    "resolution",
    "trust_mask",
]

BLOW_UP = 10.0
"""A loss prediction has blown up beyond ``BLOW_UP·l(θ_0)`` outside ``[0, 10·l(θ_0)]``."""

OVERSHOOT = 2.0
"""A single sample's step amplifies a deviation along its top curvature once
``ηλ_max(H_i)/B`` exceeds this (``|1 − ηλ/B| > 1``); a prediction is untrusted once the
overshooting samples are expected to be drawn at least once."""


def resolution(spread: np.ndarray, *, trials: int) -> np.ndarray:
    """The 95% half-width of the mean of ``trials`` runs whose loss spreads by ``spread``
    (``trials = 1``: one run's standard deviation itself, there being no interval).

    Example:
        >>> resolution(np.array([1.0]), trials=64).round(4)
        array([0.2498])
    """
    spread = np.asarray(spread, dtype=float)
    if trials <= 1:
        return spread
    return spread * t_half_width(1.0, trials) / np.sqrt(trials)


def trust_mask(
    estimate: np.ndarray,
    value: np.ndarray,
    *,
    start_loss: float,
    resolution: np.ndarray | float = 0.0,
    unstable: np.ndarray | bool = False,
    excess: np.ndarray | float = np.nan,
    overshoot: np.ndarray | float = np.nan,
    overshoot_draws: np.ndarray | float = 0.0,
) -> np.ndarray:
    """The rule of the module notes, elementwise.

    Args:
        estimate: error estimates ``e``.
        value: the predictions ``v``.
        start_loss: ``l(θ_0)``.
        resolution: ``r`` (0: the relative rule alone).
        unstable: predictions that blew up.
        excess: mean-square excess in e-folds
            (:func:`perturb.numeric.validity.mean_square_excess`; ``nan``: not measured).
        overshoot: the largest single-sample step factor ``ηλ_max(H_i)/B``.
        overshoot_draws: the expected draws of overshooting samples.

    Returns:
        A boolean array.

    Example:
        >>> import numpy as np
        >>> trust_mask(np.array([0.01]), np.array([1.05]), start_loss=1.0)  # 0.01 > 0.005
        array([False])
    """
    e = np.asarray(estimate, dtype=float)
    v = np.asarray(value, dtype=float)
    allowed = np.maximum(TRUST_FRACTION * np.abs(v - start_loss), resolution)
    with np.errstate(invalid="ignore"):
        checks_ok = ~(np.asarray(excess) > MEAN_SQUARE_EXCESS) & ~(
            (np.asarray(overshoot) > OVERSHOOT) & (np.asarray(overshoot_draws) >= 1.0)
        )
        return np.asarray(
            checks_ok & ~np.asarray(unstable, dtype=bool) & np.isfinite(e) & (e <= allowed)
        )


def blown_up(value: np.ndarray | float, start_loss: float) -> np.ndarray:
    """Predictions that are absurd: not finite, or more than ``BLOW_UP·l(θ_0)`` outside
    ``[0, 10·l(θ_0)]`` (a loss is never negative, and SGD from ``θ_0`` is expected below
    ``10·l(θ_0)``).  Without a positive finite ``start_loss`` only non-finite values are.

    Example:
        >>> blown_up(np.array([1.5, -11.3, -25.0, 41.0, np.inf]), 2.0).tolist()
        [False, False, True, True, True]
    """
    v = np.asarray(value, dtype=float)
    bad = ~np.isfinite(v)
    if not (np.isfinite(start_loss) and start_loss > 0):
        return bad
    margin = BLOW_UP * start_loss
    with np.errstate(invalid="ignore"):
        return bad | (v < -margin) | (v > 10 * start_loss + margin)


def horizon_steps(steps: int, *, points: int = 12) -> list[int]:
    """The grid of run lengths a horizon is read on: ``points`` geometric steps up to
    ``steps`` (distinct, ascending, ending at ``steps``).

    Example:
        >>> horizon_steps(1000, points=4)
        [1, 10, 100, 1000]
    """
    steps = check_int("steps", steps, minimum=1)
    grid = {max(1, round(steps ** (i / max(points - 1, 1)))) for i in range(points)}
    return sorted(grid | {steps})


@dataclass(frozen=True)
class Trust:
    """How far one prediction can be trusted, per learning rate, before any run.

    Attributes:
        lr: the learning rates, ``(L,)``.
        steps: the run length ``T`` the prediction is for.
        value: the prediction at ``T``, ``(L,)``.
        error_estimate: its error estimate, ``(L,)``.
        trusted: the verdict of :func:`trust_mask` at ``T``, ``(L,)``.
        trusted_steps: the largest ``t`` of :func:`horizon_steps` before the first
            untrusted one, ``(L,)`` (``0``: not even at the first).
        checks: what the verdict read at ``T``: ``"resolution"``, ``"loss_spread"``,
            ``"rms_displacement"``, ``"hessian_ladder"``, ``"mean_square_excess"``,
            ``"overshoot"``, ``"overshoot_draws"`` (``(L,)`` each; ``nan`` where not
            measured).
        trials: the number of runs the resolution is for.
    """

    lr: np.ndarray
    steps: int
    value: np.ndarray
    error_estimate: np.ndarray
    trusted: np.ndarray
    trusted_steps: np.ndarray
    checks: dict[str, np.ndarray] = field(default_factory=dict)
    trials: int = 1

    @property
    def trusted_eta_t(self) -> np.ndarray:
        """``η·trusted_steps``: the trusted horizon in units of ``ηT``."""
        return self.lr * self.trusted_steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists, ``None`` for non-finite numbers."""

        def clean(a):
            return [float(v) if np.isfinite(v) else None for v in np.asarray(a, dtype=float)]

        return {
            "steps": self.steps,
            "trials": self.trials,
            "error_estimate": clean(self.error_estimate),
            "trusted": [bool(t) for t in self.trusted],
            "trusted_steps": [int(t) for t in self.trusted_steps],
            "trusted_eta_t": clean(self.trusted_eta_t),
            "checks": {k: clean(v) for k, v in self.checks.items()},
        }


def _subspace_moments(sub) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(H, G, C)`` projected on the subspace, or ``None`` without per-sample gradients."""
    if sub is None or 1 not in sub.derivs:
        return None
    grads = sub.derivs[1]
    centred = grads - grads.mean(dim=0)
    return sub.hessian, sub.means[1], centred.T @ centred / len(grads)


def _judge_at(
    stats, schedule, lrs, *, order, quantity, resummed, trials, curvatures, population, radius
):
    """Value, estimate, verdict and checks of one prediction at one schedule (the
    prediction through ``order``, its estimate from the terms measured beyond it)."""
    top = stats.subspace.order if resummed else stats.order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableDirectionWarning)
        pred = stats.predict(schedule, lr=lrs, quantity=quantity, order=top, resummed=resummed)
    start = float(pred.by_order[0, 0])
    value = np.cumsum(pred.by_order, axis=1)[:, order]
    sub = stats.subspace if resummed else None
    steps, batch = int(schedule.steps), int(schedule.batch_size)
    nan = np.full(len(lrs), np.nan)
    checks = {"hessian_ladder": nan, "mean_square_excess": nan, "loss_spread": nan,
              "resolution": np.zeros(len(lrs)), "overshoot": nan, "overshoot_draws": nan * 0,
              "rms_displacement": nan}  # fmt: skip
    moments = _subspace_moments(sub)
    ratio = None
    if moments is not None:
        checks["rms_displacement"] = rms_displacement(*moments, lr=lrs, schedule=schedule)
        ratio = displacement_ratio(checks["rms_displacement"], radius)
    estimate = truncation_estimates(pred.by_order, extra=pred.cumulative_error, ratio=ratio)
    estimate = estimate[:, order]
    fresh = schedule.name != "gd"
    if sub is not None and fresh:
        shape = {"lr": lrs, "steps": steps, "batch_size": batch}
        checks["mean_square_excess"] = mean_square_excess(sub, **shape)
        if quantity == "test":
            checks["hessian_ladder"] = hessian_ladder(sub, **shape)
            estimate = with_ladder(estimate, checks["hessian_ladder"])
    if moments is not None and quantity == "test":
        spread = loss_spread(*moments, lr=lrs, schedule=schedule)
        checks["loss_spread"] = spread
        checks["resolution"] = resolution(spread, trials=trials)
    if curvatures is not None and fresh:
        kicks = overshoot(curvatures, lr=lrs, steps=steps, batch_size=batch, population=population)
        checks.update(kicks)
    trusted = trust_mask(
        estimate, value, start_loss=start, resolution=np.nan_to_num(checks["resolution"]),
        unstable=blown_up(value, start), excess=checks["mean_square_excess"],
        overshoot=checks["overshoot"], overshoot_draws=np.nan_to_num(checks["overshoot_draws"]),
    )  # fmt: skip
    return value, estimate, trusted, checks


def assess(
    stats,
    schedule: Schedule,
    *,
    lr: float | Sequence[float],
    order: int | None = None,
    quantity: str = "test",
    resummed: bool = False,
    trials: int = 1,
    sample_curvatures: Sequence[float] | None = None,
    points: int = 12,
) -> Trust:
    r"""The :class:`Trust` of ``stats.predict(schedule, ...)``, by the same estimates and
    the same rule (:func:`trust_mask`) that ``validate`` and ``compare`` apply per row.

    The estimate is the truncation estimate of the series (by powers of ``η``, or by
    edges with the Krylov ``k`` vs ``k/2`` difference, :mod:`perturb.numeric.validity`;
    re-summed, its geometric continuation never slower than ``d/ρ``, the quadratic
    model's displacement against ``ρ = ‖H‖/‖J‖``) plus, for the test loss on schedules
    that draw fresh batches, the per-sample Hessian ladder the prediction leaves out.
    The displacement, the resolution and the mean-square check need the Krylov subspace
    (``resummed=True``); the overshoot check needs the samples' top curvatures
    (:func:`perturb.numeric.stability.per_sample_top_curvatures`).  The horizon is the
    verdict on :func:`horizon_steps` of ``T`` (the schedule cut there).

    Args:
        stats: :class:`~perturb.Statistics` (anything with its ``predict`` and
            ``subspace``).
        schedule: a numeric schedule.
        lr: one learning rate or a grid.
        order: the prediction's order (default: the statistics').
        quantity: ``"test"``, ``"train"`` or ``"gap"``.
        resummed: the re-summed prediction.
        trials: the number of runs whose mean the prediction will be read against
            (``1``: one run; the resolution is then one run's spread).
        sample_curvatures: ``λ_max(H_i)`` of the population's samples, optional.
        points: the horizon grid's size.

    Returns:
        A :class:`Trust`.

    Raises:
        ValueError: ``quantity="displacement"`` (a vector), ``trials < 1``.

    Example:
        >>> import torch, perturb
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> st = perturb.measure(f, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),
        ...                      torch.ones(2), order=2, exact=True, progress=False)
        >>> t = assess(st, perturb.Online(steps=10, batch_size=1), lr=[0.01, 0.5])
        >>> t.trusted.tolist(), t.trusted_steps.tolist()
        ([True, False], [10, 0])
    """
    if quantity == "displacement":
        raise ValueError("assess judges scalar predictions: quantity must not be 'displacement'")
    trials = check_int("trials", trials, minimum=1)
    top = stats.subspace.order if resummed and stats.subspace is not None else stats.order
    order = check_int("order", top if order is None else order, maximum=top)
    lrs = np.atleast_1d(np.asarray(lr, dtype=float))
    curv = None if sample_curvatures is None else np.asarray(sample_curvatures, dtype=float)
    population = int(stats.subspace.derivs[0].shape[0]) if stats.subspace is not None else 1
    if curv is not None:
        population = len(curv)
    radius = curvature_radius(stats.subspace) if resummed else np.inf
    kw = {"order": order, "quantity": quantity, "resummed": resummed, "trials": trials,
          "curvatures": curv, "population": population, "radius": radius}  # fmt: skip
    last = int(schedule.steps)
    unit = int(schedule.batches) if schedule.name == "epochs" else 1
    grid = sorted({max(unit, (t // unit) * unit) for t in horizon_steps(last, points=points)})
    first_bad = np.full(len(lrs), np.inf)
    horizon = np.zeros(len(lrs), dtype=int)
    for t in grid:
        sched = schedule if t == last else cut(schedule, t)
        value, estimate, trusted, checks = _judge_at(stats, sched, lrs, **kw)
        first_bad = np.where(~trusted & ~np.isfinite(first_bad), t, first_bad)
        horizon = np.where(np.isfinite(first_bad), horizon, t)
    return Trust(lr=lrs, steps=last, value=value, error_estimate=estimate, trusted=trusted,
                 trusted_steps=horizon, checks=checks, trials=trials)  # fmt: skip
