r"""The learning curve in ``perturb validate`` and ``perturb compare``: three predictors
that follow the weights.

With ``curve`` on (:attr:`perturb.experiments.experiment.Measurement.curve`, ``perturb
validate --curve``), validate runs :func:`perturb.numeric.curve.learning_curve` on the
population and the ``θ_0`` it measures on, at its learning rates, its one batch size and
its recorded steps (:func:`curve_predictions`; ``perturb compare --curve``: one curve for
its whole grid of ``η``, ``B`` and ``T``, :func:`curve_grid_predictions`), and adds three
predictors to the table and the calibration:

* ``curve``: ``l(θ̄_t) + g_t·δ + ½ tr(H_t (M + δδᵀ))``, the noise carried along the
  noiseless path with statistics re-measured at checkpoints on it; its estimate is the
  curve's own ``error_estimate``;
* ``noiseless path``: ``l(θ̄_t)``, GD at the same ``η`` on the population (no noise);
* ``SDE (path)``: the path-following SDE (gradient flow and the linearized diffusion
  along it).

The two baselines have no estimate of their own; as validate's other baselines
(``noiseless``, ``SDE``) they get the distance to the predictor that carries what they
leave out plus that predictor's estimate, ``|b − curve| + e_curve``.  The verdict
``trusted`` is :func:`perturb.experiments.judging.judge`'s, with one input of its own:
the resolution of the run's trials is read from the curve's predicted spread of the loss
along the path (``t_{0.975}·σ_t/√K``; ``0`` where ``σ_t`` is not finite) rather than from
the quadratic model frozen at ``θ_0``.

The curve follows online SGD (fresh draws every step); other schedules are refused
(:func:`check_curve_schedule`).  Its cost is estimated and checked against the trials'
budget before anything is measured (:func:`check_curve_budget`).

Example:
    >>> from perturb.experiments.data import Dataset
    >>> from perturb.experiments.pipeline import build
    >>> from perturb.symbolic.schedules import Online
    >>> x = torch.linspace(-1, 1, 24).reshape(6, 1, 2, 2)
    >>> setup = build("mlp", Dataset("toy", x, torch.tensor([0, 1, 2, 0, 1, 2]), 3), seed=0)
    >>> got = curve_predictions(setup, Online(steps=2, batch_size=1), [1, 2], [0.01],
    ...                         rank=4, trials=8)
    >>> sorted(got.values), got.curve.curve.shape
    (['SDE (path)', 'curve', 'noiseless path'], (1, 1, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from perturb.checks import check_int
from perturb.experiments.simulation_cost import CurveEstimate, check_curve, estimate_curve
from perturb.numeric.curve import CurveSettings, LearningCurve, learning_curve
from perturb.numeric.trust import resolution

if TYPE_CHECKING:
    from perturb.experiments.pipeline import Setup
    from perturb.symbolic.schedules import Schedule

__all__ = [
    "CURVE",
    "CURVE_PREDICTORS",
    "NOISELESS_PATH",
    "SDE_PATH",
    "CurvePredictions",
    "check_curve_budget",
    "check_curve_schedule",
    "curve_description",
    "curve_grid_predictions",
    "curve_predictions",
]

CURVE = "curve"
"""The learning curve's name in the table."""
NOISELESS_PATH = "noiseless path"
"""GD on the population at the same ``η``."""
SDE_PATH = "SDE (path)"
"""The SDE with statistics that follow the path."""
CURVE_PREDICTORS = (CURVE, NOISELESS_PATH, SDE_PATH)
"""The predictors ``curve`` adds, in report order."""


def check_curve_schedule(schedule: str) -> None:
    """Refuse a schedule the learning curve does not model (it follows online SGD).

    Raises:
        ValueError: a schedule other than ``"online"``.

    Example:
        >>> check_curve_schedule("online")
        >>> check_curve_schedule("gd")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: curve: expected schedule 'online' (...), got 'gd'
    """
    if schedule != "online":
        raise ValueError(
            "curve: expected schedule 'online' (the learning curve follows online SGD), "
            f"got {schedule!r}"
        )


@dataclass(frozen=True)
class CurvePredictions:
    """The learning curve of a run, as the tables of predictors of validate or compare.

    A key is a recorded step ``t`` (validate, :func:`curve_predictions`) or a ``(B, T)``
    pair (compare, :func:`curve_grid_predictions`).

    Attributes:
        curve: the :class:`~perturb.numeric.curve.LearningCurve`.
        values: ``{name: {key: (L,) predictions}}`` for :data:`CURVE_PREDICTORS`.
        estimates: ``{name: {key: (L,) error estimates}}``.
        resolutions: ``{name: {key: (L,) resolution}}``: the 95% half-width of the mean
            of the run's trials from the curve's predicted spread (``0`` where it is not
            finite), the resolution :func:`~perturb.experiments.judging.judge` reads.
    """

    curve: LearningCurve
    values: dict[str, dict[Any, np.ndarray]]
    estimates: dict[str, dict[Any, np.ndarray]]
    resolutions: dict[str, dict[Any, np.ndarray]]


def _settings(rank: int) -> CurveSettings:
    """The curve's settings at Krylov rank ``rank`` (``k_3`` the default, at most ``k``)."""
    rank = check_int("curve_rank", rank, minimum=1)
    return CurveSettings(rank=rank, higher_rank=min(CurveSettings.higher_rank, rank))


def check_curve_budget(
    setup: Setup,
    *,
    lrs: Sequence[float],
    steps: int,
    rank: int,
    device: str = "cpu",
    max_memory: float | None = None,
    force: bool = False,
) -> CurveEstimate:
    """Refuse, before anything is measured, a learning curve over the time or memory budget
    (:func:`~perturb.experiments.simulation_cost.estimate_curve`, the curve alone).

    Args:
        setup: the population and the network.
        lrs: the learning rates.
        steps: the longest recorded step.
        rank: the curve's Krylov rank (``curve_rank``).
        device: where the network is evaluated.
        max_memory: bytes the curve may use (default 4 GiB).
        force: run whatever the estimate.

    Returns:
        The estimate.

    Raises:
        perturb.errors.BudgetError: over one hour or ``max_memory``, unless ``force``.

    Example:
        >>> from perturb.experiments.data import Dataset
        >>> from perturb.experiments.pipeline import build
        >>> x = torch.linspace(-1, 1, 24).reshape(6, 1, 2, 2)
        >>> setup = build("mlp", Dataset("toy", x, torch.tensor([0, 1, 2, 0, 1, 2]), 3), seed=0)
        >>> e = check_curve_budget(setup, lrs=[0.01, 0.02], steps=100, rank=8)
        >>> e.lrs, e.steps, e.gradients > 2 * 301  # two paths and their flows, and more
        (2, 100, True)
    """
    estimate = estimate_curve(
        parameters=setup.parameters,
        rows=int(setup.x.shape[0]),
        lrs=list(lrs),
        steps=int(steps),
        settings=_settings(rank),
        cuda=str(device).startswith("cuda"),
    )
    check_curve(estimate, max_memory=max_memory, force=force)
    return estimate


def curve_predictions(
    setup: Setup,
    schedule: Schedule,
    record_steps: Sequence[int],
    lrs: Sequence[float],
    *,
    rank: int,
    trials: int,
    device: str | None = None,
) -> CurvePredictions:
    """Run the learning curve of ``setup``'s population from its ``θ_0`` (float64) and
    read it at ``record_steps`` (see the module notes), keyed by step.

    Args:
        setup: the population and the network at ``θ_0``.
        schedule: the online schedule that ran (its batch size is the curve's).
        record_steps: the recorded steps (ascending, distinct).
        lrs: the learning rates.
        rank: ``k``, the Krylov subspace at each checkpoint
            (:attr:`~perturb.numeric.curve.CurveSettings.rank`).
        trials: the run's trials (the resolution of their mean).
        device: where the network is evaluated (default: ``θ_0``'s).

    Raises:
        ValueError: a schedule that is not online, a bad ``rank`` or ``trials``.
    """
    check_curve_schedule(schedule.name)
    trials = check_int("trials", trials, minimum=1)
    curve = _run(setup, lrs, [int(schedule.batch_size)], record_steps, rank=rank, device=device)
    return _tables(curve, {int(s): (0, int(s)) for s in record_steps}, trials)


def curve_grid_predictions(
    setup: Setup,
    lrs: Sequence[float],
    batch_sizes: Sequence[int],
    steps: Sequence[int],
    *,
    rank: int,
    trials: int,
    device: str | None = None,
) -> CurvePredictions:
    """One learning curve for a grid of online runs (compare's): every learning rate, batch
    size and step count, read at every ``(B, T)`` and keyed by it.

    Args:
        setup: the population and the network at ``θ_0``.
        lrs: the learning rates.
        batch_sizes: the batch sizes (one path serves them all).
        steps: the step counts (each one recorded).
        rank: ``k``, the Krylov subspace at each checkpoint.
        trials: each ``(η, B)``'s trials (the resolution of their mean).
        device: where the network is evaluated (default: ``θ_0``'s).

    Raises:
        ValueError: a bad ``rank`` or ``trials``.

    Example:
        >>> from perturb.experiments.data import Dataset
        >>> from perturb.experiments.pipeline import build
        >>> x = torch.linspace(-1, 1, 24).reshape(6, 1, 2, 2)
        >>> setup = build("mlp", Dataset("toy", x, torch.tensor([0, 1, 2, 0, 1, 2]), 3), seed=0)
        >>> got = curve_grid_predictions(setup, [0.01], [1, 4], [2, 3], rank=4, trials=8)
        >>> sorted(got.values["curve"]), got.curve.curve.shape
        ([(1, 2), (1, 3), (4, 2), (4, 3)], (1, 2, 2))
    """
    sizes = [int(b) for b in batch_sizes]
    trials = check_int("trials", trials, minimum=1)
    curve = _run(setup, lrs, sizes, steps, rank=rank, device=device)
    keys = {(b, int(s)): (i, int(s)) for i, b in enumerate(sizes) for s in steps}
    return _tables(curve, keys, trials)


def _run(setup: Setup, lrs, batch_sizes: list[int], steps, *, rank: int, device) -> LearningCurve:
    """:func:`~perturb.numeric.curve.learning_curve` of ``setup`` from its ``θ_0`` (float64)."""
    return learning_curve(
        setup.net,
        (setup.x, setup.y),
        setup.theta0,
        lr=list(lrs),
        steps=[int(s) for s in steps],
        batch_sizes=batch_sizes,
        settings=_settings(rank),
        device=device,
        dtype=torch.float64,
    )


def _tables(
    curve: LearningCurve, keys: dict[Any, tuple[int, int]], trials: int
) -> CurvePredictions:
    """The predictors, their estimates and resolutions at each key's ``(batch-size index,
    step)``."""
    column = {int(s): j for j, s in enumerate(curve.steps)}
    with np.errstate(invalid="ignore"):
        read = resolution(curve.spread, trials=trials)
    read = np.where(np.isfinite(read), read, 0.0)
    values: dict[str, dict[Any, np.ndarray]] = {}
    estimates: dict[str, dict[Any, np.ndarray]] = {}
    resolutions: dict[str, dict[Any, np.ndarray]] = {}
    for key, (bi, s) in keys.items():
        j = column[s]
        own, estimate = curve.curve[:, bi, j], curve.error_estimate[:, bi, j]
        rows = {CURVE: own, NOISELESS_PATH: curve.path[:, j], SDE_PATH: curve.sde[:, bi, j]}
        for name, value in rows.items():
            values.setdefault(name, {})[key] = value
            with np.errstate(invalid="ignore"):
                distance = np.zeros_like(value) if name == CURVE else np.abs(value - own)
            total = distance + estimate
            estimates.setdefault(name, {})[key] = np.where(np.isnan(total), np.inf, total)
            resolutions.setdefault(name, {})[key] = read[:, bi, j]
    return CurvePredictions(curve, values, estimates, resolutions)


def curve_description(curve: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The table's lines on the curve: its checkpoints and rank, and its cost against the
    trials' (both in full-batch-gradient equivalents: a trial step is ``B`` of ``n``
    per-sample gradients; compare runs each ``(η, B)`` to its longest ``T``).

    Args:
        curve: :meth:`~perturb.numeric.curve.LearningCurve.to_dict`'s form.
        config: the run's settings (``trials``, ``lrs``, ``population``, and validate's
            ``steps`` and ``batch_size`` or compare's lists ``steps`` and ``batch_sizes``).

    Example:
        >>> curve = {"checkpoints": [[0, 5], [0]], "settings": {"rank": 32},
        ...          "cost": {"total": 426.0, "path": 14.0, "flow": 24.0,
        ...                   "checkpoints": 388.0}}
        >>> config = {"trials": 64, "lrs": [0.1, 0.2], "steps": 10, "batch_size": 2,
        ...           "population": 16}
        >>> for line in curve_description(curve, config):
        ...     print(line)
        along the noiseless path, statistics re-measured at 1 to 2 checkpoints per η (rank ≤ 32)
        cost 426 full-batch gradients (path 14, SDE flow 24, checkpoints 388); the trials 160
        >>> config |= {"steps": [5, 10], "batch_sizes": [1, 2]}
        >>> curve_description(curve, config)[1].endswith("the trials 240")
        True
    """
    counts = [len(c) for c in curve["checkpoints"]]
    low, high = min(counts), max(counts)
    many = f"{low}" if low == high else f"{low} to {high}"
    cost = curve["cost"]
    steps = config["steps"] if isinstance(config["steps"], int) else max(config["steps"])
    sizes = config["batch_sizes"] if "batch_sizes" in config else [config["batch_size"]]
    trials = (config["trials"] * len(config["lrs"]) * steps * sum(sizes)) / config["population"]
    return [
        f"along the noiseless path, statistics re-measured at {many} checkpoint"
        f"{'' if high == 1 else 's'} per η "
        f"(rank ≤ {curve['settings']['rank']})",
        f"cost {cost['total']:.4g} full-batch gradients (path {cost['path']:.4g}, SDE flow "
        f"{cost['flow']:.4g}, checkpoints {cost['checkpoints']:.4g}); the trials {trials:.4g}",
    ]
