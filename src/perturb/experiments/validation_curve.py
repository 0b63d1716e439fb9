r"""The learning curve in ``perturb validate``: three predictors that follow the weights.

With ``curve`` on (:attr:`perturb.experiments.experiment.Measurement.curve`, ``perturb
validate --curve``), validate runs :func:`perturb.numeric.curve.learning_curve` on the
population and the ``θ_0`` it measures on, at its learning rates, its one batch size and
its recorded steps, and adds three predictors to the table and the calibration:

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
(:func:`check_curve_schedule`).

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
    "check_curve_schedule",
    "curve_description",
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
    """The learning curve of a validation run, as validate's tables of predictors.

    Attributes:
        curve: the :class:`~perturb.numeric.curve.LearningCurve`.
        values: ``{name: {step: (L,) predictions}}`` for :data:`CURVE_PREDICTORS`.
        estimates: ``{name: {step: (L,) error estimates}}``.
        resolutions: ``{name: {step: (L,) resolution}}``: the 95% half-width of the mean
            of the run's trials from the curve's predicted spread (``0`` where it is not
            finite), the resolution :func:`~perturb.experiments.judging.judge` reads.
    """

    curve: LearningCurve
    values: dict[str, dict[int, np.ndarray]]
    estimates: dict[str, dict[int, np.ndarray]]
    resolutions: dict[str, dict[int, np.ndarray]]


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
    read it at ``record_steps`` (see the module notes).

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
    rank = check_int("curve_rank", rank, minimum=1)
    trials = check_int("trials", trials, minimum=1)
    settings = CurveSettings(rank=rank, higher_rank=min(CurveSettings.higher_rank, rank))
    curve = learning_curve(
        setup.net,
        (setup.x, setup.y),
        setup.theta0,
        lr=list(lrs),
        steps=list(record_steps),
        batch_sizes=[int(schedule.batch_size)],
        settings=settings,
        device=device,
        dtype=torch.float64,
    )
    column = {int(s): j for j, s in enumerate(curve.steps)}
    own = curve.curve[:, 0, :]
    estimate = curve.error_estimate[:, 0, :]
    with np.errstate(invalid="ignore"):
        read = resolution(curve.spread[:, 0, :], trials=trials)
    read = np.where(np.isfinite(read), read, 0.0)
    values: dict[str, dict[int, np.ndarray]] = {}
    estimates: dict[str, dict[int, np.ndarray]] = {}
    resolutions: dict[str, dict[int, np.ndarray]] = {}
    for s in record_steps:
        j = column[int(s)]
        rows = {CURVE: own[:, j], NOISELESS_PATH: curve.path[:, j], SDE_PATH: curve.sde[:, 0, j]}
        for name, value in rows.items():
            values.setdefault(name, {})[s] = value
            with np.errstate(invalid="ignore"):
                distance = np.zeros_like(value) if name == CURVE else np.abs(value - own[:, j])
            total = distance + estimate[:, j]
            estimates.setdefault(name, {})[s] = np.where(np.isnan(total), np.inf, total)
            resolutions.setdefault(name, {})[s] = read[:, j]
    return CurvePredictions(curve, values, estimates, resolutions)


def curve_description(curve: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The table's lines on the curve: its checkpoints and rank, and its cost against the
    trials' (both in full-batch-gradient equivalents: a trial step is ``B`` of ``n``
    per-sample gradients).

    Args:
        curve: :meth:`~perturb.numeric.curve.LearningCurve.to_dict`'s form.
        config: the run's settings (``trials``, ``lrs``, ``steps``, ``batch_size``,
            ``population``).

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
    """
    counts = [len(c) for c in curve["checkpoints"]]
    low, high = min(counts), max(counts)
    many = f"{low}" if low == high else f"{low} to {high}"
    cost = curve["cost"]
    trials = (
        config["trials"] * len(config["lrs"]) * config["steps"] * config["batch_size"]
    ) / config["population"]
    return [
        f"along the noiseless path, statistics re-measured at {many} checkpoint"
        f"{'' if high == 1 else 's'} per η "
        f"(rank ≤ {curve['settings']['rank']})",
        f"cost {cost['total']:.4g} full-batch gradients (path {cost['path']:.4g}, SDE flow "
        f"{cost['flow']:.4g}, checkpoints {cost['checkpoints']:.4g}); the trials {trials:.4g}",
    ]
