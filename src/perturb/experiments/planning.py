"""Choose ``η`` and ``B`` from a checkpoint before running anything, and prove the choice.

:func:`plan` measures once at the start ``θ_0`` (exact over the population: the
Krylov subspace of ``H``, by default of the ranks :data:`DEFAULT_KRYLOV_RANKS`, and the
un-re-summed series through ``η²`` only, which the noise scale reads) and the samples'
top curvatures, then, for every ``(η, B)`` of a grid and every horizon,
predicts the test loss with its error estimate and the one trust rule's verdict, draws
the instability boundary and recommends the best trusted configuration
(:mod:`perturb.experiments.plan_grid`).  Beside it are what the usual tools would pick:
the gradient noise scale (``B_simple``, the critical batch and its optimal step; no run)
and the learning-rate range test (one short real run per batch size,
:mod:`perturb.experiments.range_test`).  With ``check`` it runs real SGD at every grid
point and at those picks and scores them (:mod:`perturb.experiments.plan_check`).

The experiment (data, model, start, schedule, grid, trials, seed, device, Krylov ranks)
is an :class:`~perturb.experiments.experiment.Experiment`, the one :func:`perturb.validate`
and :func:`perturb.compare` take; what only a plan needs is a :class:`PlanSettings`.
Its grid: ``lrs`` (default: geometric over three decades, two rates a decade, ending at
GD's edge ``2/h_max``), ``batch_sizes`` (default: the powers of two up to 64), and the
horizons: ``steps`` (default ``T ∈ {200, 1000}``), or a sample budget
(:attr:`PlanSettings.samples`) or a compute budget in full-batch gradients
(:attr:`PlanSettings.compute`); for multi-epoch SGD also ``epochs``.  One SGD run per
batch size serves every horizon (recorded at each), so a plan for two horizons costs
its check what the longer one costs.

**Costs** are in full-batch gradients, one gradient of the mean loss over the ``n``
rows of the population, timed here (the median of five): planning (the measurement,
the curvatures, the noise scale and the predictions) by its seconds; the range tests
and the grid search by their SGD steps, ``steps·B/n`` per run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from perturb.checks import check_int, check_positive
from perturb.experiments.experiment import Experiment, experiment_of
from perturb.experiments.outputs import claims_out
from perturb.experiments.pipeline import (
    Setup,
    check_trials_budget,
    load_population,
    measure_at_start,
    start_point,
    timed,
)
from perturb.experiments.plan_check import check_grid, score
from perturb.experiments.plan_grid import (
    Horizon,
    PlanGrid,
    default_lrs,
    grid_rows,
    noise_scale,
    recommend,
    visible_horizon,
)
from perturb.experiments.plan_result import Plan
from perturb.experiments.range_test import RangeTestSettings, range_test
from perturb.numeric.stability import per_sample_top_curvatures

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_KRYLOV_RANKS",
    "DEFAULT_STEPS",
    "DEFAULT_TRIALS",
    "PlanSettings",
    "gradient_seconds",
    "plan",
]

DEFAULT_STEPS = (200, 1000)
"""The horizons of a plan given none: ``T = 200`` and ``T = 1000``."""
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes of a plan given none: the powers of two up to 64."""
DEFAULT_TRIALS = 128
"""SGD trials per grid point of a check (and the runs the trust rule's resolution is for)."""
DEFAULT_KRYLOV_RANKS = (64, 16)
"""A plan's Krylov ranks ``(k, k_3)`` where its experiment leaves them ``None``
(validate's and compare's are ``(128, 32)``): the three-edge tensors on ``k_3`` vectors
take ``k_3(k_3 + 1)/2`` directions, 136 instead of 528.  On the digits starts of
docs/planning.md ("Krylov ranks and cost") the plan recommends the same point and trusts
the same points, within their error estimates, as at ``(128, 32)``, for a third to half
of the cost; at ``(32, 8)`` it trusts points far off."""


def _budgets(name: str, value: Any, *, integer: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, int | float) else tuple(value)
    if not items:
        raise ValueError(f"{name} must be one or more budgets, got {value!r}")
    if integer:
        return tuple(check_int(name, v, minimum=1) for v in items)
    return tuple(check_positive(name, v) for v in items)


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """What a plan needs beyond its :class:`~perturb.experiments.experiment.Experiment`.

    Attributes:
        samples: sample budgets ``S = T·B`` (``T = S/B``), instead of the experiment's
            ``steps``.
        compute: compute budgets in full-batch gradients ``F = T·B/n``, instead.
        decades: the default learning-rate grid spans this many decades.
        per_decade: its rates per decade.
        check: run real SGD at every grid point and at the picks (:func:`plan`).
        range_test: the learning-rate range test.

    Example:
        >>> PlanSettings(samples=6400).samples
        (6400,)
        >>> PlanSettings(compute=[0, 1])
        Traceback (most recent call last):
        ...
        ValueError: compute must be a positive finite number, got 0
    """

    samples: tuple[int, ...] | None = None
    compute: tuple[float, ...] | None = None
    decades: float = 3.0
    per_decade: int = 2
    check: bool = False
    range_test: RangeTestSettings = field(default_factory=RangeTestSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _budgets("samples", self.samples, integer=True))
        object.__setattr__(self, "compute", _budgets("compute", self.compute, integer=False))
        if self.samples is not None and self.compute is not None:
            raise ValueError(
                f"give a sample or a compute budget, not both, got samples={self.samples} "
                f"and compute={self.compute}"
            )
        check_positive("decades", self.decades)
        check_int("per_decade", self.per_decade, minimum=1)
        if not isinstance(self.check, bool):
            raise ValueError(f"check must be true or false, got {self.check!r}")
        if not isinstance(self.range_test, RangeTestSettings):
            raise ValueError(f"range_test must be a RangeTestSettings, got {self.range_test!r}")

    def horizons(self, experiment: Experiment) -> tuple[Horizon, ...]:
        """The horizons: the experiment's ``steps`` or ``epochs`` (``E`` epochs are
        ``E·N`` samples), or the budgets here (:data:`DEFAULT_STEPS` when none is given).

        Raises:
            ValueError: more than one kind of horizon given.

        Example:
            >>> [h.describe() for h in PlanSettings().horizons(Experiment())]
            ['T = 200', 'T = 1000']
        """
        t = experiment.training
        given = {
            "steps": experiment.grid.steps,
            "epochs": (t.epochs,) if t.epochs is not None else None,
            "samples": self.samples,
            "compute": self.compute,
        }
        kinds = [k for k, v in given.items() if v is not None]
        if len(kinds) > 1:
            raise ValueError(f"give one kind of horizon, got {' and '.join(kinds)}")
        if not kinds:
            return tuple(Horizon("steps", s) for s in DEFAULT_STEPS)
        kind = kinds[0]
        if kind == "epochs":
            if t.train_size is None:
                raise ValueError("epochs need train_size (N), got None")
            return tuple(
                Horizon("samples", e * t.train_size, label=f"E = {e} epochs of N = {t.train_size}")
                for e in given["epochs"]
            )
        return tuple(Horizon(kind, v) for v in sorted(set(given[kind])))


def gradient_seconds(setup: Setup, *, repeats: int = 5) -> float:
    """Seconds of one full-batch gradient of the mean loss at ``θ_0`` (the median of
    ``repeats``, after one warm-up), the unit of the plan's costs.

    Example:
        >>> from perturb.experiments.pipeline import build
        >>> gradient_seconds(build("mlp", load_population("digits", population=8, seed=0),
        ...                        seed=0)) > 0
        True
    """

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        return setup.loss_fn(theta, setup.x, setup.y).mean()

    gradient = torch.func.grad(mean_loss)
    gradient(setup.theta0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gradient(setup.theta0)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _check_experiment(e: Experiment) -> None:
    if e.training.schedule not in ("online", "epochs"):
        raise ValueError(f"a plan runs online or epochs schedules, got {e.training.schedule!r}")
    if e.training.schedule == "online" and e.training.train_size is not None:
        raise ValueError(f"online SGD has no training set: train_size must be None, got "
                         f"{e.training.train_size}")  # fmt: skip
    if not e.measurement.resummed:
        raise ValueError(
            "a plan needs the re-summed predictions (the Krylov subspace): resummed must be "
            "true, got false"
        )


@claims_out  # out is checked and locked before any work
def plan(
    experiment: Experiment | None = None,
    settings: PlanSettings | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> Plan:
    """Recommend ``η`` and ``B`` for a horizon from the statistics at ``θ_0`` (module notes).

    Args:
        experiment: what to plan (:class:`~perturb.experiments.experiment.Experiment`;
            default ``Experiment()``): the data, model, start (checkpoint, pretraining),
            schedule (``online`` or ``epochs``), grid (``lrs``, ``batch_sizes``,
            ``steps``; defaults in the module notes), ``trials`` (default 128: the runs
            per grid point of the check, and the trust rule's resolution), seed, device
            and Krylov ranks (``krylov_rank``, ``krylov_higher_rank``; each left
            ``None`` takes its value in :data:`DEFAULT_KRYLOV_RANKS`, ``(64, 16)``).
            ``plan.json`` holds the values used.
        settings: the plan's own settings (:class:`PlanSettings`; default: none of the
            budgets, no check).
        out: folder for ``plan.json``, ``plan.csv`` and ``plan.png``.
        progress: show progress bars.
        **options: fields of the experiment by their flat names
            (:meth:`~perturb.experiments.experiment.Experiment.replace`), e.g.
            ``pretrain=700``, ``lrs=(0.01, 0.1)``; ``model`` may be a network.

    Returns:
        A :class:`~perturb.experiments.plan_result.Plan`.

    Raises:
        ValueError: a schedule other than online or epochs, ``resummed=False``, more than
            one kind of horizon, batch sizes that do not divide ``N``, or what the
            experiment's fields reject.
        TypeError: an option that is no field of the experiment.

    Example:
        >>> import perturb
        >>> from perturb.experiments.models import mlp
        >>> p = perturb.plan(model=mlp((1, 8, 8), 10, hidden=()), population=16, steps=20,
        ...                  lrs=(0.01, 0.1, 1.0), batch_sizes=(1, 4), krylov_rank=8,
        ...                  krylov_higher_rank=4,
        ...                  settings=PlanSettings(range_test=RangeTestSettings(steps=20)))
        >>> p.recommendation(0)
        (0.1, 4)
        >>> p.table().splitlines()[0][:40]
        'horizon T = 20 (online; n = 16): predict'
    """
    experiment, network = experiment_of(experiment, options, command="plan")
    k, k3 = DEFAULT_KRYLOV_RANKS
    e = experiment.with_defaults(trials=DEFAULT_TRIALS, batch_sizes=DEFAULT_BATCH_SIZES,
                                 krylov_rank=k, krylov_higher_rank=k3)  # fmt: skip
    settings = PlanSettings() if settings is None else settings
    if not isinstance(settings, PlanSettings):
        raise TypeError(f"plan() takes PlanSettings, got {settings!r}")
    _check_experiment(e)
    horizons = settings.horizons(e)
    t = e.training
    n_lrs = len(e.grid.lrs) if e.grid.lrs else round(settings.decades * settings.per_decade) + 1
    # the grid as far as it is known before measuring: checks sizes and the trials' budget
    probe = PlanGrid(lrs=tuple(range(1, n_lrs + 1)), batch_sizes=e.grid.batch_sizes,
                     horizons=horizons, population=e.data.population, schedule=t.schedule,
                     train_size=t.train_size, shuffle=t.shuffle)  # fmt: skip
    timings: dict[str, float] = {}
    data = load_population(
        e.data.dataset, data_dir=e.data.data_dir, population=e.data.population, seed=e.seed
    )
    with timed(timings, "start_s"):
        setup, start = start_point(
            network if network is not None else e.model, data, seed=e.seed, device=e.device,
            checkpoint=e.start.checkpoint, pretrain_steps=e.start.pretrain,
            pretrain_lr=e.start.pretrain_lr, progress=progress,
        )  # fmt: skip
    if settings.check:
        longest = [max((probe.schedule_at(h, b) for h in horizons), key=lambda s: int(s.steps))
                   for b in probe.batch_sizes]  # fmt: skip
        check_trials_budget(
            setup, longest, lrs=[1.0] * (n_lrs + 2), trials=e.trials,
            record=sorted({int(s.steps) for s in longest}), device=e.device,
            max_memory=e.budget.max_memory, force=e.budget.force,
        )  # fmt: skip
    unit = gradient_seconds(setup)
    grid_b = probe.batch_sizes
    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup, order=3, schedules=[probe.schedule_at(horizons[0], b) for b in grid_b],
            gap=t.schedule == "epochs" and e.measurement.gap, resummed=True,
            rank=e.measurement.krylov_rank, higher_rank=e.measurement.krylov_higher_rank,
            series_order=2, progress=progress,  # the noise scale reads G·H·G and tr(C H)
        )  # fmt: skip
        _, curvatures = per_sample_top_curvatures(setup.net, (setup.x, setup.y), progress=progress)
        noise = noise_scale(setup.net, (setup.x, setup.y), stats=stats)
    with timed(timings, "predict_s"):
        lrs = e.grid.lrs or default_lrs(stats, decades=settings.decades,
                                        per_decade=settings.per_decade)  # fmt: skip
        grid = PlanGrid(lrs=lrs, batch_sizes=probe.batch_sizes, horizons=horizons,
                        population=probe.population, schedule=t.schedule,
                        train_size=t.train_size, shuffle=t.shuffle)  # fmt: skip
        rows, boundaries = grid_rows(stats, grid, sample_curvatures=curvatures, trials=e.trials)
        recommendations = [recommend(rows, hi) for hi in range(len(horizons))]
        for hi, rec in enumerate(recommendations):
            if rec["lr"] is None:  # nothing trusted at T: how far does the plan see?
                rec.update(visible_horizon(stats, grid, hi, sample_curvatures=curvatures,
                                           trials=e.trials))  # fmt: skip
    with timed(timings, "range_test_s"):
        tests = {
            b: range_test(
                setup.loss_fn,
                setup.theta0,
                (setup.x, setup.y),
                batch_size=b,
                settings=settings.range_test,
                seed=e.seed + 7919 * b,
            )
            for b in grid.batch_sizes
        }
    noise_lr, noise_b = noise.pick(grid.batch_sizes)
    planning = timings["measure_s"] + timings["predict_s"]
    costs: dict[str, Any] = {
        "gradient_seconds": unit,
        "planning_seconds": planning,
        "planning": planning / unit,
        "range_tests": sum(r.cost for r in tests.values()),
    }
    check = None
    if settings.check:
        extra = {b: [r.pick] for b, r in tests.items()}
        extra[noise_b] += [noise_lr, tests[noise_b].min_tenth]
        with timed(timings, "simulate_s"):
            runs = check_grid(
                setup, grid, extra=extra, trials=e.trials, seed=e.seed, device=e.device,
                progress=progress, max_memory=e.budget.max_memory, force=e.budget.force,
            )  # fmt: skip
        picks = {
            hi: {
                "plan": (rec["lr"], rec["batch_size"]),
                "noise scale": (noise_lr, noise_b),
                "range test at noise B": (tests[noise_b].pick, noise_b),
                "range test min/10 at noise B": (tests[noise_b].min_tenth, noise_b),
                **{f"range test, B = {b}": (r.pick, b) for b, r in tests.items()},
            }
            for hi, rec in enumerate(recommendations)
        }
        check = score(rows, boundaries, grid, runs, picks=picks, trials=e.trials)
        costs["grid_search"] = [report["grid_cost"] for report in check]
        costs["simulate_seconds"] = timings["simulate_s"]
    result = Plan(
        experiment=e.to_dict(),
        settings={**asdict(settings), "range_test": asdict(settings.range_test)},
        start=start.to_dict(),
        grid={
            "lrs": list(grid.lrs), "batch_sizes": list(grid.batch_sizes),
            "horizons": [{"kind": h.kind, "value": h.value, "text": h.describe()}
                         for h in horizons],
            "population": grid.population, "schedule": grid.schedule,
            "train_size": grid.train_size, "shuffle": grid.shuffle,
        },
        rows=rows,
        boundaries=boundaries,
        recommendations=recommendations,
        noise={**noise.to_dict(), "pick_lr": noise_lr, "pick_batch_size": noise_b},
        range_tests=[r.to_dict() for r in tests.values()],
        check=check,
        costs=costs,
        timings=timings,
    )  # fmt: skip
    if out is not None:
        result.write(out)
    return result
