"""The stages every experiment shares: population, network, statistics, trials, quadratic model.

:func:`perturb.validate` and :func:`perturb.compare` run the same pipeline, written
once here:

1. :func:`load_population`: a fixed set of ``n`` labelled images, SGD's population
   (samples are drawn from it uniformly with replacement; the test loss is its mean);
2. :func:`build`: the network at its initialization ``θ_0`` and its per-sample loss;
3. :func:`measure_at_start`: the diagram values at ``θ_0``, exact over the population;
4. :func:`run_trials`: ``K`` vectorized SGD runs per learning rate, with
   :func:`curve_intervals` for the mean and 95% t-interval at each recorded step;
5. :func:`quadratic_model`: per-sample derivatives, the mean Hessian and the quadratic
   model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise ``C`` (float64, on the CPU), for the
   predictors that need the materialized Hessian (:func:`resummed_prediction`, the
   SDE and the other baselines).

Schedules come from the command line's options through
:func:`perturb.symbolic.options.make_schedule` (:func:`experiment_schedule`), and a
run of ``T`` steps is recorded at :func:`recorded_steps`, each a run of the schedule
:func:`cut` there.

Example:
    >>> data = load_population("digits", population=16, seed=0)
    >>> setup = build("mlp", data, seed=0)
    >>> setup.parameters, tuple(setup.x.shape)
    (2410, (16, 1, 8, 8))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perturb.checks import check_int
from perturb.experiments.baselines import QuadraticModel, mean_hessian, per_sample_derivatives
from perturb.experiments.data import Dataset, load_dataset
from perturb.experiments.models import build_model
from perturb.experiments.simulation import Trials, model_loss, simulate
from perturb.numeric.intervals import t_half_width
from perturb.numeric.measuring import Statistics, measure
from perturb.numeric.resummation import resummed_values
from perturb.symbolic.options import make_schedule
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import GD, Epochs, Online, Schedule
from perturb.symbolic.series import series

__all__ = [
    "Quadratic",
    "Setup",
    "build",
    "ci_error",
    "curve_intervals",
    "cut",
    "experiment_schedule",
    "json_ready",
    "load_population",
    "measure_at_start",
    "noiseless_prediction",
    "per_sample_hessians",
    "per_sample_orders",
    "quadratic_model",
    "record_every",
    "recorded_steps",
    "resummed_prediction",
    "run_trials",
    "series_predictions",
    "timed",
]

# the sizes an experiment fills in when they are not given (only where they apply)
_DEFAULTS = {"online": {"steps": 100, "batch_size": 1}, "epochs": {"batch_size": 1, "epochs": 1}}
_DEFAULTS["gd"] = {"steps": 100}


# ----------------------------------------------------------------------------- schedules


def experiment_schedule(
    name: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    train_size: int | None = None,
    epochs: int | None = None,
    shuffle: bool = False,
) -> Schedule:
    """The numeric schedule an experiment runs, from the command line's options.

    :func:`~perturb.symbolic.options.make_schedule` with the defaults ``T = 100``,
    ``B = 1`` and ``E = 1`` for the sizes not given; ``N`` has no default.

    Args:
        name: ``"online"``, ``"epochs"`` or ``"gd"``.
        steps: ``T`` (online, gd).
        batch_size: ``B`` (online, epochs).
        train_size: ``N`` (epochs, gd; required there).
        epochs: ``E`` (epochs).
        shuffle: reshuffle before each epoch (epochs).

    Raises:
        ValueError: a size that is not a positive integer, an option the schedule does
            not take (from ``make_schedule``), or a missing ``train_size``.

    Example:
        >>> experiment_schedule("epochs", train_size=8, batch_size=2).steps
        4
        >>> experiment_schedule("online").batch_size
        1
    """
    sizes = {"steps": steps, "batch_size": batch_size, "train_size": train_size, "epochs": epochs}
    given = {k: check_int(k, v, minimum=1) for k, v in sizes.items() if v is not None}
    schedule = make_schedule(name, **{**_DEFAULTS.get(name, {}), **given}, shuffle=shuffle)
    if name != "online" and train_size is None:
        raise ValueError(f"schedule {name!r} needs train_size (N, the training set size)")
    return schedule


def recorded_steps(schedule: Schedule, records: int) -> list[int]:
    """``records`` steps evenly spaced up to ``T`` (for epochs: ends of epochs), ascending.

    Example:
        >>> recorded_steps(Online(steps=100, batch_size=1), 5)
        [20, 40, 60, 80, 100]
        >>> recorded_steps(Epochs(train_size=4, batch_size=2, epochs=3), 2)
        [4, 6]
    """
    records = check_int("records", records, minimum=1)
    if schedule.name == "epochs":
        m, e = int(schedule.batches), int(schedule.epochs)
        ends = sorted({max(1, round(e * (i + 1) / records)) for i in range(records)})
        return [k * m for k in ends]
    t = int(schedule.steps)
    return sorted({max(1, round(t * (i + 1) / records)) for i in range(records)})


def cut(schedule: Schedule, steps: int) -> Schedule:
    """The schedule's first ``steps`` steps, itself a schedule (for epochs: whole epochs).

    Example:
        >>> cut(GD(train_size=8, steps=10), 4).steps
        4
        >>> cut(Epochs(train_size=4, batch_size=2, epochs=3), 4).epochs
        2
    """
    if schedule.name == "epochs":
        return Epochs(
            train_size=int(schedule.train_size),
            batch_size=int(schedule.batch_size),
            epochs=steps // int(schedule.batches),
            shuffle=schedule.shuffle,
        )
    if schedule.name == "gd":
        return GD(train_size=int(schedule.train_size), steps=steps)
    return Online(steps=steps, batch_size=int(schedule.batch_size))


def record_every(steps: Sequence[int]) -> int:
    """The largest recording interval that hits every one of ``steps``: their gcd.

    Example:
        >>> record_every([20, 40, 100])
        20
    """
    return math.gcd(*steps)


# ----------------------------------------------------------------------------- stages


@dataclass
class Setup:
    """A population on a device and a network at its initialization ``θ_0``.

    Attributes:
        data: the population (on the CPU).
        net: the network, on the device.
        x: the inputs, on the device.
        y: the labels, on the device.
        loss_fn: per-sample losses ``loss_fn(θ, x, y) -> (n,)``.
        theta0: the flat parameters ``θ_0``.

    Example:
        >>> setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
        >>> float(setup.loss_fn(setup.theta0, setup.x, setup.y).mean()) > 0
        True
    """

    data: Dataset
    net: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[..., torch.Tensor]
    theta0: torch.Tensor

    @property
    def parameters(self) -> int:
        """``P``, the number of parameters."""
        return int(self.theta0.numel())


def load_population(
    dataset: str, *, data_dir: str | Path | None = None, population: int, seed: int
) -> Dataset:
    """The population: ``population`` images of ``dataset``'s train split (a seeded subset).

    Example:
        >>> len(load_population("digits", population=10, seed=0))
        10
    """
    population = check_int("population", population, minimum=1)
    data = load_dataset(dataset, data_dir=data_dir, split="train")
    return data.population(population, seed=seed)  # warns if population > len(data)


def build(model: str | nn.Module, data: Dataset, *, seed: int, device: str = "cpu") -> Setup:
    """The network (a spec for :func:`~perturb.experiments.models.build_model`, or a module).

    Example:
        >>> build("mlp", load_population("digits", population=4, seed=0), seed=0).parameters
        2410
    """
    net = (
        build_model(model, data.input_shape, data.num_classes, seed=seed)
        if isinstance(model, str)
        else model
    ).to(device)
    loss_fn, theta0 = model_loss(net)
    return Setup(data, net, data.x.to(device), data.y.to(device), loss_fn, theta0)


def measure_at_start(
    setup: Setup, *, order: int, schedules: Sequence[Schedule], progress: bool = False
) -> Statistics:
    """The test-loss diagrams through ``η^order`` at ``θ_0``, exact over the population.

    Example:
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> stats = measure_at_start(setup, order=1, schedules=[Online(steps=2, batch_size=1)])
        >>> len(stats.predict(Online(steps=2, batch_size=1), lr=[0.1], order=1).by_order[0])
        2
    """
    return measure(
        setup.net,
        (setup.x, setup.y),
        order=order,
        schedules=list(schedules),
        quantities=("test",),
        exact=True,
        dtype=torch.float32,
        progress=progress,
    )


def run_trials(
    setup: Setup,
    schedule: Schedule,
    *,
    lrs: Sequence[float],
    trials: int,
    seed: int,
    every: int,
    device: str = "cpu",
    progress: bool = False,
) -> Trials:
    """``trials`` SGD runs of ``schedule`` from ``θ_0`` per learning rate, recorded ``every``.

    Example:
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> run = run_trials(setup, Online(steps=2, batch_size=1), lrs=[0.1], trials=3,
        ...                  seed=0, every=1)
        >>> run.steps
        (0, 1, 2)
    """
    return simulate(
        setup.loss_fn,
        setup.theta0,
        (setup.x, setup.y),
        schedule,
        lr=list(lrs),
        trials=trials,
        seed=seed,
        record_every=every,
        device=device,
        dtype=torch.float32,
        progress=progress,
    )


def curve_intervals(trials: Trials) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Mean test loss, its 95% t half-width, and the column of each recorded step.

    Means and standard errors are over the trials finite at each step; the degrees of
    freedom are those of the trials finite at the end.  Shapes ``(L, len(steps))``.

    Example:
        >>> t = Trials((0.1,), np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]),
        ...            np.array([[False, False]]), (0, 1),
        ...            np.array([[[2.0, 1.0], [2.0, 3.0]]]))
        >>> mean, half, column = curve_intervals(t)
        >>> mean.tolist(), round(float(half[0, 1]), 4), column
        ([[2.0, 2.0]], 12.7062, {0: 0, 1: 1})
    """
    means, sems = trials.curve_mean()
    half = np.array(
        [
            [t_half_width(float(sem), int(trials.finite[li])) for sem in sems[li]]
            for li in range(means.shape[0])
        ]
    ).reshape(means.shape)
    return means, half, {int(s): k for k, s in enumerate(trials.steps)}


# ----------------------------------------------------------------------------- predictions


def series_predictions(
    stats: Statistics, schedule: Schedule, lrs: Sequence[float], *, orders: Sequence[int]
) -> dict[str, np.ndarray]:
    """``"order d"``: the un-resummed test-loss series through ``η^d``, one value per ``η``.

    Example:
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> sched = Online(steps=2, batch_size=1)
        >>> stats = measure_at_start(setup, order=1, schedules=[sched])
        >>> sorted(series_predictions(stats, sched, [0.1], orders=(0, 1)))
        ['order 0', 'order 1']
    """
    pred = stats.predict(schedule, lr=list(lrs), quantity="test", order=max(orders))
    cumulative = np.cumsum(pred.by_order, axis=1)
    return {f"order {d}": cumulative[:, d] for d in orders}


def noiseless_prediction(
    stats: Statistics, schedule: Schedule, lrs: Sequence[float], *, order: int
) -> np.ndarray:
    """The noiseless diagrams through ``η^order``: those with every part a single node.

    These are the terms of the series without the gradient noise (no ``C`` or higher
    cumulant), i.e. the η-series of noiseless, GD-like SGD on the mean loss.

    Example:
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


@dataclass
class Quadratic:
    """The derivatives at ``θ_0`` that the Hessian-based predictors use, float64 on the CPU.

    Attributes:
        loss_fn: per-sample losses of a CPU copy of the network.
        theta: ``θ_0``.
        x: the inputs.
        y: the labels.
        derivs: per-sample losses, gradients (and, once added, Hessians), by order.
        hess: the mean Hessian ``H``.
        model: the quadratic model (``H`` is eigendecomposed once, in ``model.eig``).

    Example:
        >>> from perturb.experiments.models import mlp
        >>> setup = build(mlp((1, 8, 8), 10, hidden=()),
        ...               load_population("digits", population=4, seed=0), seed=0)
        >>> quadratic_model(setup).hess.shape
        torch.Size([650, 650])
    """

    loss_fn: Callable[..., torch.Tensor]
    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    derivs: dict[int, torch.Tensor]
    hess: torch.Tensor
    model: QuadraticModel


def quadratic_model(setup: Setup) -> Quadratic:
    """Per-sample derivatives, the mean Hessian and the quadratic model at ``θ_0``.

    Materializes ``H`` (``P`` Hessian-vector products, ``P²`` numbers), on the CPU.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> setup = build(mlp((1, 8, 8), 10, hidden=()),
        ...               load_population("digits", population=4, seed=0), seed=0)
        >>> quadratic_model(setup).model.cov.shape
        torch.Size([650, 650])
    """
    loss_fn, theta0, x, y = setup.loss_fn, setup.theta0, setup.x, setup.y
    if x.device.type != "cpu":
        loss_fn, theta0 = model_loss(copy.deepcopy(setup.net).cpu())
        x, y = x.cpu(), y.cpu()
    theta64, x64 = theta0.detach().to(torch.float64), x.to(torch.float64)
    derivs = per_sample_derivatives(loss_fn, theta64, x64, y)
    hess = mean_hessian(loss_fn, theta0.detach().float(), x.float(), y).to(torch.float64)
    model = QuadraticModel.from_derivatives(derivs, hess)
    return Quadratic(loss_fn, theta64, x64, y, derivs, hess, model)


def resummed_prediction(
    quad: Quadratic, schedule: Schedule, lrs: Sequence[float], *, terms: list | None = None
) -> np.ndarray:
    """The re-summed diagrams with up to two edges, exact through the eigenbasis of ``H``.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> setup = build(mlp((1, 8, 8), 10, hidden=()),
        ...               load_population("digits", population=4, seed=0), seed=0)
        >>> quad = quadratic_model(setup)
        >>> resummed_prediction(quad, Online(steps=2, batch_size=1), [0.1]).shape
        (1,)
    """
    terms = resummed_terms(2, schedule) if terms is None else terms
    steps = int(schedule.steps)
    return np.array(
        [
            float(
                sum(
                    resummed_values(
                        terms,
                        quad.derivs,
                        lr=lr,
                        steps=steps,
                        schedule=schedule,
                        means={2: quad.hess},
                        eigh=quad.model.eig,
                    )
                )
            )
            for lr in lrs
        ]
    )


def per_sample_orders(terms: list) -> set[int]:
    """Derivative orders needed per sample: those of nodes sharing a part with another.

    Example:
        >>> sorted(per_sample_orders(resummed_terms(2, GD(train_size=4, steps=2))))
        [1, 2]
    """
    need = set()
    for term in terms:
        d = term.diagram
        for part in d.parts:
            if len(part) > 1:
                need.update(len(d.children[v]) + (v != 0) for v in part)
    return need


def per_sample_hessians(quad: Quadratic) -> torch.Tensor:
    """``∇²l_i`` at ``θ_0`` for every row, shape ``(n, P, P)`` (float64).

    Example:
        >>> from perturb.experiments.models import mlp
        >>> setup = build(mlp((1, 8, 8), 10, hidden=()),
        ...               load_population("digits", population=2, seed=0), seed=0)
        >>> per_sample_hessians(quadratic_model(setup)).shape
        torch.Size([2, 650, 650])
    """

    def one(xi, yi):
        return torch.func.hessian(lambda p: quad.loss_fn(p, xi[None], yi[None]).sum())(quad.theta)

    return torch.stack([one(quad.x[i], quad.y[i]) for i in range(quad.x.shape[0])])


# ----------------------------------------------------------------------------- reports


def ci_error(value: float, mean: float, half: float) -> float:
    """A prediction's error in interval half-widths, ``(value − mean)/half`` (``nan``: none).

    Example:
        >>> ci_error(1.5, 1.0, 0.25)
        2.0
    """
    return (value - mean) / half if half > 0 else math.nan


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tuples as lists, for strict JSON.

    Example:
        >>> json_ready({"a": [1.0, float("nan")], "b": (2,)})
        {'a': [1.0, None], 'b': [2]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the ``with`` block takes as ``timings[key]``.

    Example:
        >>> timings = {}
        >>> with timed(timings, "work_s"):
        ...     pass
        >>> timings["work_s"] >= 0
        True
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - start
