"""The predictors that :func:`perturb.validate` and :func:`perturb.compare` put beside SGD.

Every predictor is evaluated from statistics measured once at ``θ_0``
(:func:`perturb.experiments.pipeline.measure_at_start`), for any schedule, learning
rate and number of steps, without touching the network again:

* ``order d`` (:func:`series_predictions`): the un-resummed series through ``η^d``;
* ``noiseless`` (:func:`noiseless_prediction`): its diagrams without gradient noise;
* ``resummed 2``, ``resummed 3`` (:func:`resummed_predictions`): the re-summed diagrams
  with up to two or three edges (edges carry ``η(I − ηH)^{Δt−1}``), evaluated in the
  Krylov subspace of ``H`` that the measurement built
  (:meth:`perturb.Statistics.predict` with ``resummed=True``), with the subspace's
  ``k`` vs ``k/2`` difference and the growth of ``K^T`` along unstable directions;
* ``resummed 3+ladder`` (:func:`ladder_terms`): "resummed 3" plus the Hessian ladder,
  the loss the per-sample Hessian fluctuations add on the quadratic model
  (:func:`perturb.numeric.validity.hessian_ladder`; diagrams with four edges and
  more), on online schedules, with the ladder's ``k_3`` vs ``k_3/2`` difference;
* the theories on the quadratic model (SDE and the others of
  :mod:`perturb.experiments.baselines`), on the materialized quadratic model
  (:func:`perturb.experiments.pipeline.quadratic_model`) for small models or on its
  projection on the same subspace (:func:`subspace_quadratic`) for large ones.

Example:
    >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
    >>> from perturb.symbolic.schedules import Online
    >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
    >>> sched = Online(steps=4, batch_size=1)
    >>> stats = measure_at_start(setup, order=1, schedules=[sched], resummed=True, rank=16)
    >>> sorted(resummed_predictions(stats, sched, [0.01]))
    ['resummed 2', 'resummed 3']
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from perturb.experiments.baselines import QuadraticModel
from perturb.experiments.pipeline import Setup, quadratic_model
from perturb.numeric.krylov import KrylovSubspace
from perturb.numeric.predictions import UnstableDirectionWarning
from perturb.numeric.statistics import Statistics
from perturb.numeric.validity import hessian_ladder, truncation_estimates
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import series

__all__ = [
    "LADDER",
    "RESUMMED_ORDERS",
    "Resummed",
    "krylov_description",
    "ladder_description",
    "ladder_note",
    "ladder_terms",
    "noiseless_prediction",
    "resummed_predictions",
    "sde_model_for",
    "series_predictions",
    "series_with_estimates",
    "subspace_quadratic",
    "track_resummed",
]

RESUMMED_ORDERS = (2, 3)
"""The numbers of edges of the re-summed predictors the experiments report."""
LADDER = "resummed 3+ladder"
"""The name of "resummed 3" plus the Hessian ladder (:func:`ladder_terms`)."""


def series_predictions(
    stats: Statistics,
    schedule: Schedule,
    lrs: Sequence[float],
    *,
    orders: Sequence[int],
    quantity: str = "test",
) -> dict[str, np.ndarray]:
    """``"order d"``: the un-resummed series of ``quantity`` through ``η^d``, one per ``η``.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> sched = Online(steps=2, batch_size=1)
        >>> stats = measure_at_start(setup, order=1, schedules=[sched])
        >>> sorted(series_predictions(stats, sched, [0.1], orders=(0, 1)))
        ['order 0', 'order 1']
    """
    values, _ = series_with_estimates(stats, schedule, lrs, orders=orders, quantity=quantity)
    return values


def series_with_estimates(
    stats: Statistics,
    schedule: Schedule,
    lrs: Sequence[float],
    *,
    orders: Sequence[int],
    quantity: str = "test",
    ratio: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`series_predictions` and each one's truncation error estimate
    (:func:`perturb.numeric.validity.truncation_estimates`, with ``ratio`` the floor of
    its geometric continuation, per learning rate), from one prediction.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> sched = Online(steps=2, batch_size=1)
        >>> stats = measure_at_start(setup, order=1, schedules=[sched])
        >>> values, estimates = series_with_estimates(stats, sched, [0.1], orders=(0, 1))
        >>> bool(estimates["order 1"][0] > 0), bool(estimates["order 0"][0] > 0)
        (True, True)
    """
    pred = stats.predict(schedule, lr=list(lrs), quantity=quantity, order=max(orders))
    cumulative = np.cumsum(pred.by_order, axis=1)
    estimates = truncation_estimates(pred.by_order, ratio=ratio)
    values = {f"order {d}": cumulative[:, d] for d in orders}
    return values, {f"order {d}": estimates[:, d] for d in orders}


def noiseless_prediction(
    stats: Statistics, schedule: Schedule, lrs: Sequence[float], *, order: int
) -> np.ndarray:
    """The noiseless diagrams through ``η^order``: those with every part a single node.

    These are the terms of the series without the gradient noise (no ``C`` or higher
    cumulant), i.e. the η-series of noiseless, GD-like SGD on the mean loss.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> sched = Online(steps=2, batch_size=1)
        >>> stats = measure_at_start(setup, order=2, schedules=[sched])
        >>> noiseless_prediction(stats, sched, [0.1], order=2).shape
        (1,)
    """
    eta = np.asarray(lrs, dtype=float)
    total = np.zeros(len(lrs))
    for term in series(order, schedule, "test").terms:
        if all(len(p) == 1 for p in term.contraction.tensors):
            value = stats.value(term.contraction)
            total += float(term.coefficient) * value * eta**term.power
    return total


@dataclass(frozen=True)
class Resummed:
    """A re-summed predictor on a grid of learning rates.

    Attributes:
        values: the prediction per learning rate.
        error: ``|value(k) − value(k/2)|``, the Krylov truncation estimate, per rate.
        growth: the largest ``T·log|1 − ηh|`` over the Ritz values and rates (``0`` when
            every direction is stable).
        ranks: the subspace dimension each number of edges was evaluated at.
        estimate: the truncation error estimate per rate
            (:func:`perturb.numeric.validity.truncation_estimates` of the contributions
            by number of edges, plus the Krylov error).
    """

    values: np.ndarray
    error: np.ndarray
    growth: float
    ranks: tuple[int, ...]
    estimate: np.ndarray


def resummed_predictions(
    stats: Statistics,
    schedule: Schedule,
    lrs: Sequence[float],
    *,
    orders: Sequence[int] = RESUMMED_ORDERS,
    quantity: str = "test",
    ratio: np.ndarray | None = None,
) -> dict[str, Resummed]:
    """``"resummed d"`` for each ``d`` in ``orders``, from the measured Krylov subspace
    (``ratio``: the floor of the estimates' geometric continuation, per learning rate).

    Unstable directions are reported in :attr:`Resummed.growth`, not warned about.

    Raises:
        ValueError: statistics measured without ``resummed=True``, or a subspace that
            lacks the tensors the order needs (:meth:`perturb.Statistics.predict`).

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
        >>> sched = Online(steps=4, batch_size=1)
        >>> stats = measure_at_start(setup, order=1, schedules=[sched], resummed=True, rank=16)
        >>> r = resummed_predictions(stats, sched, [0.01, 0.02], orders=(2,))["resummed 2"]
        >>> r.values.shape, r.ranks
        ((2,), (16, 16, 16))
    """
    top = max(orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableDirectionWarning)
        pred = stats.predict(schedule, lr=list(lrs), quantity=quantity, order=top, resummed=True)
    cumulative = np.cumsum(pred.by_order, axis=1)
    estimates = truncation_estimates(pred.by_order, extra=pred.cumulative_error, ratio=ratio)
    ranks = stats.subspace.ranks(schedule, quantity, top)
    out = {}
    for d in orders:  # the growth is that of the full rank's Ritz values for every d
        out[f"resummed {d}"] = Resummed(
            values=cumulative[:, d],
            error=pred.cumulative_error[:, d],
            growth=float(pred.growth),
            ranks=ranks[: d + 1],
            estimate=estimates[:, d],
        )
    return out


def track_resummed(record: dict[str, dict[str, Any]], resummed: dict[str, Resummed]) -> None:
    """Fold each re-summed predictor of one evaluation into ``record[name]``: the largest
    finite ``k`` vs ``k/2`` difference, the largest growth, and its ranks.

    Example:
        >>> record = {}
        >>> r = Resummed(np.ones(2), np.array([0.1, np.inf]), 0.5, (8, 8, 4), np.zeros(2))
        >>> track_resummed(record, {"resummed 2": r})
        >>> record
        {'resummed 2': {'error': 0.1, 'growth': 0.5, 'ranks': [8, 8, 4]}}
    """
    for name, r in resummed.items():
        info = record.setdefault(name, {"error": 0.0, "growth": 0.0, "ranks": list(r.ranks)})
        finite = r.error[np.isfinite(r.error)]
        info["error"] = max([info["error"], *finite.tolist()])
        info["growth"] = max(info["growth"], r.growth)


def krylov_description(ranks: Sequence[int], parameters: int, error: float) -> str:
    """How a re-summed predictor was evaluated, as the tables print it.

    Example:
        >>> for part in krylov_description([128, 128, 128, 32], 1418, 0.663).split("; "):
        ...     print(part)
        in a Krylov subspace of H of rank 128 (3-edge diagrams on 32) (P = 1418)
        rank k vs k/2 differ by up to 0.663
    """
    text = f"in a Krylov subspace of H of rank {ranks[0]}"
    if ranks[-1] != ranks[0]:
        text += f" ({len(ranks) - 1}-edge diagrams on {ranks[-1]})"
    return text + f" (P = {parameters}); rank k vs k/2 differ by up to {error:.3g}"


def sde_model_for(
    setup: Setup,
    stats: Statistics,
    full: Schedule,
    config: dict,
    limit: int,
    progress: bool = False,
) -> QuadraticModel | None:
    """The quadratic model for the SDE: projected on the measured Krylov subspace, else
    materialized up to ``limit`` parameters; ``None`` where it cannot run, the reason in
    ``config["unavailable"]["SDE"]`` (``config["sde_krylov_rank"]`` when projected).

    On the default run the projection (``k = 128`` of ``P = 1418``) moves the SDE's
    values by at most 2e-5, a hundredth of the smallest interval half-width.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import GD, Online
        >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
        >>> sched = Online(steps=4, batch_size=1)
        >>> stats = measure_at_start(setup, order=1, schedules=[sched], resummed=True, rank=16)
        >>> config = {"unavailable": {}}
        >>> sde_model_for(setup, stats, sched, config, 4000).hess.shape, config["sde_krylov_rank"]
        (torch.Size([16, 16]), 16)
        >>> sde_model_for(setup, stats, GD(train_size=4, steps=2), config, 4000) is None
        True
    """
    p, unavailable = setup.parameters, config["unavailable"]
    if full.name == "gd":
        unavailable["SDE"] = (
            "the SDE models fresh samples every step; GD's only noise is the draw of "
            "its training set"
        )
        return None
    if stats.subspace is not None:
        config["sde_krylov_rank"] = stats.subspace.rank
        return subspace_quadratic(stats.subspace)
    if p <= limit:
        return quadratic_model(setup, progress=progress).model
    unavailable["SDE"] = (
        f"needs the materialized Hessian ({p} parameters > max_hessian_parameters = "
        f"{limit}) or the Krylov subspace (resummed=True)"
    )
    return None


def subspace_quadratic(subspace: KrylovSubspace) -> QuadraticModel:
    """The quadratic model at ``θ_0`` projected on the Krylov subspace: ``k×k`` matrices.

    ``G → QᵀG``, ``H → QᵀHQ`` and ``C`` from the projected per-sample gradients: the
    Galerkin version of :func:`perturb.experiments.pipeline.quadratic_model`, exact when
    the subspace spans everything (``k = P``).  The theories on the quadratic model run
    on it unchanged for models whose ``H`` cannot be materialized.

    Raises:
        ValueError: a subspace without projected per-sample gradients.

    Example:
        >>> import torch, perturb
        >>> from perturb.numeric.krylov import krylov_subspace
        >>> pop = perturb.Population(
        ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(3, dtype=torch.float64))
        >>> sub = krylov_subspace(pop, None, torch.ones(3), rank=3)
        >>> subspace_quadratic(sub).hess.shape
        torch.Size([3, 3])
    """
    if 1 not in subspace.derivs:
        raise ValueError(
            "the subspace holds no projected per-sample gradients; build it with "
            "per_sample_gradients=True (or for an order ≥ 2 of a noisy schedule)"
        )
    derivs = {0: subspace.derivs[0], 1: subspace.derivs[1]}
    return QuadraticModel.from_derivatives(derivs, subspace.hessian)


def ladder_terms(
    stats: Statistics, lrs: Sequence[float], steps: Sequence[int], *, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian ladder at each of ``steps`` and its truncation error estimate.

    The ladder (:func:`perturb.numeric.validity.hessian_ladder`) is evaluated on the
    first ``k_3`` basis vectors of the measured subspace, and again on ``k_3/2`` of them:
    their difference is its error estimate, as for the re-summed diagrams.

    Returns:
        ``(ladder, error)``, each ``(L, S)``; ``nan`` without a subspace that holds the
        per-sample Hessians and gradients.

    Example:
        >>> from perturb.experiments.pipeline import build, load_population, measure_at_start
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
        >>> sched = Online(steps=4, batch_size=1)
        >>> stats = measure_at_start(setup, order=3, schedules=[sched], resummed=True,
        ...                          rank=16, higher_rank=8)
        >>> ladder, error = ladder_terms(stats, [0.1], [2, 4], batch_size=1)
        >>> ladder.shape, bool((ladder[:, 1] > ladder[:, 0]).all())
        ((1, 2), True)
    """
    shape = (len(lrs), len(steps))
    sub = stats.subspace
    if sub is None or 2 not in sub.derivs or 1 not in sub.derivs:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    kw = {"lr": list(lrs), "steps": list(steps), "batch_size": batch_size}
    full = hessian_ladder(sub, **kw)
    half = hessian_ladder(sub, **kw, rank=max(1, sub.higher_rank // 2))
    with np.errstate(invalid="ignore"):
        error = np.abs(full - half)
    error[~np.isfinite(full)] = np.inf
    return full, error


def ladder_note(subspace: KrylovSubspace, error: np.ndarray) -> dict[str, Any]:
    """The record of how the ladder was evaluated: its rank ``k_3`` and the largest
    finite ``k_3`` vs ``k_3/2`` difference in ``error``.

    Example:
        >>> from types import SimpleNamespace
        >>> ladder_note(SimpleNamespace(higher_rank=32), np.array([[1e-4, np.inf]]))
        {'rank': 32, 'error': 0.0001}
    """
    finite = error[np.isfinite(error)]
    return {"rank": int(subspace.higher_rank), "error": float(finite.max(initial=0.0))}


def ladder_description(*, rank: int, error: float) -> str:
    """How "resummed 3+ladder" was evaluated, as the tables print it.

    Example:
        >>> ladder_description(rank=8, error=0.01)
        'resummed 3 + Hessian ladder on 8 Krylov vectors; rank 8 vs 4 differ by up to 0.01'
    """
    return (
        f"resummed 3 + Hessian ladder on {rank} Krylov vectors; rank {rank} vs "
        f"{max(1, rank // 2)} differ by up to {error:.3g}"
    )
