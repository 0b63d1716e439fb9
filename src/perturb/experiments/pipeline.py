"""The stages every experiment shares: population, network, statistics, trials, quadratic model.

:func:`perturb.validate` and :func:`perturb.compare` run the same pipeline, written
once here:

1. :func:`load_population`: a fixed set of ``n`` labelled inputs (images ``(C, H, W)``
   or sequences ``(C, L)``), SGD's population (samples are drawn from it uniformly with
   replacement; the test loss is its mean);
2. :func:`start_point`: the network and its per-sample loss at the start ``θ_0`` of
   every run: its seeded initialization or a checkpoint (:func:`build`), optionally
   after full-batch gradient descent on the population (:func:`pretrain`), with the
   loss and gradient norm there (:class:`Start`);
3. :func:`measure_at_start`: the diagram values at ``θ_0``, exact over the population,
   and the Krylov subspace of ``H`` the re-summed predictors need;
4. :func:`run_trials`: ``K`` vectorized SGD runs per learning rate, with
   :func:`curve_intervals` for the mean and 95% t-interval at each recorded step;
5. :func:`quadratic_model`: per-sample derivatives, the mean Hessian and the quadratic
   model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise ``C`` (float64, on the CPU), for the
   SDE and the other baselines on models small enough to materialize ``H``.

The predictors themselves are in :mod:`perturb.experiments.predictors`.

Schedules come from the command line's options through
:func:`perturb.symbolic.options.make_schedule` (:func:`experiment_schedule`), and a
run of ``T`` steps is recorded at :func:`recorded_steps` (evenly spaced, or on a log
grid for long runs), each a run of the schedule :func:`cut` there.  A prediction far
outside what a loss can be (:func:`is_unstable`) is reported as unstable, never as a
number (:func:`prediction_entry`).

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from perturb.checks import check_int, check_positive
from perturb.experiments.baselines import QuadraticModel, mean_hessian, per_sample_derivatives
from perturb.experiments.data import Dataset, load_dataset
from perturb.experiments.models import build_model, load_checkpoint
from perturb.experiments.simulation import Trials, model_loss, simulate
from perturb.experiments.simulation_cost import TrialsEstimate, check_trials, estimate_trials
from perturb.experiments.simulation_setup import make_setup
from perturb.numeric.adapters import check_forward
from perturb.numeric.intervals import t_half_width
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.measuring import Statistics, measure
from perturb.numeric.trust import blown_up
from perturb.symbolic.options import make_schedule
from perturb.symbolic.schedules import Schedule, cut

__all__ = [
    "DEFAULT_PRETRAIN_LR",
    "Quadratic",
    "Setup",
    "Start",
    "build",
    "check_trials_budget",
    "ci_error",
    "curve_intervals",
    "cut",
    "experiment_schedule",
    "is_unstable",
    "json_ready",
    "load_population",
    "measure_at_start",
    "one_thread",
    "prediction_entry",
    "pretrain",
    "quadratic_model",
    "record_every",
    "recorded_steps",
    "run_trials",
    "start_point",
    "timed",
]

DEFAULT_PRETRAIN_LR = 0.3
"""Learning rate of :func:`pretrain`: 200 steps take the digits convnet from 2.392 to 1.674,
stable all the way (the largest Hessian eigenvalue stays below ``2/0.3``; at lr 1 it
passes 2 by step 50, and the end point then depends on rounding)."""

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


def recorded_steps(schedule: Schedule, records: int, *, log: bool = False) -> list[int]:
    """``records`` steps up to ``T`` (for epochs: ends of epochs), ascending.

    Evenly spaced, or with ``log`` geometrically spaced from 1 to ``T`` (rounded; steps
    that round alike are kept once, so there may be fewer than ``records``).

    Example:
        >>> from perturb.symbolic.schedules import Epochs, Online
        >>> recorded_steps(Online(steps=100, batch_size=1), 5)
        [20, 40, 60, 80, 100]
        >>> recorded_steps(Online(steps=1000, batch_size=1), 5, log=True)
        [1, 6, 32, 178, 1000]
        >>> recorded_steps(Epochs(train_size=4, batch_size=2, epochs=3), 2)
        [4, 6]
    """
    records = check_int("records", records, minimum=1)
    epochs = schedule.name == "epochs"
    last, unit = (
        (int(schedule.epochs), int(schedule.batches)) if epochs else (int(schedule.steps), 1)
    )
    if log:
        grid = [last ** (i / (records - 1)) for i in range(records)] if records > 1 else [last]
    else:
        grid = [last * (i + 1) / records for i in range(records)]
    return [k * unit for k in sorted({max(1, round(v)) for v in grid})]


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


def build(
    model: str | nn.Module,
    data: Dataset,
    *,
    seed: int,
    device: str = "cpu",
    checkpoint: str | Path | None = None,
) -> Setup:
    """The network (a spec for :func:`~perturb.experiments.models.build_model`, or a module).

    Args:
        model: a model spec, initialized with ``seed``, or a module (a module given with
            a ``checkpoint`` is copied, not changed).
        data: the population.
        seed: the seed of the initialization.
        device: where the network and the data go.
        checkpoint: a weights-only ``state_dict`` file for the network
            (:func:`~perturb.experiments.models.load_checkpoint`), or ``None``.

    Raises:
        FileNotFoundError: a ``checkpoint`` that does not exist.
        perturb.errors.ModelSpecError: a checkpoint that is no state dict of this network.

    Example:
        >>> build("mlp", load_population("digits", population=4, seed=0), seed=0).parameters
        2410
    """
    if isinstance(model, str):
        net = build_model(model, data.input_shape, data.num_classes, seed=seed)
    else:
        net = copy.deepcopy(model) if checkpoint is not None else model
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    net = net.to(device)
    loss_fn, theta0 = model_loss(net)
    x = data.x.to(device=device, dtype=theta0.dtype)  # a float64 model reads float64 inputs
    y = data.y.to(device)
    check_forward(loss_fn, theta0, (x, y), model=net)
    return Setup(data, net, x, y, loss_fn, theta0)


def _loss_and_gradient(setup: Setup, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The population's mean loss and its gradient at ``theta``, in chunks of rows."""
    n, chunk = int(setup.x.shape[0]), 2048
    total = torch.zeros((), dtype=theta.dtype, device=theta.device)
    grad = torch.zeros_like(theta)

    def summed(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return setup.loss_fn(th, x, y).sum()

    for a in range(0, n, chunk):
        x, y = setup.x[a : a + chunk], setup.y[a : a + chunk]
        g, value = torch.func.grad_and_value(summed)(theta, x, y)
        total, grad = total + value, grad + g
    return total / n, grad / n


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads set to one inside the block (restored after): a fixed
    reduction order, so sums over rows round the same whatever the thread count.

    Example:
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(setup: Setup, *, steps: int, lr: float, progress: bool = False) -> Setup:
    """``steps`` steps of full-batch gradient descent on the population, from ``θ_0``.

    ``θ ← θ − lr·∇L(θ)`` with ``L`` the population's mean loss, computed in float64 on
    one intra-op thread (:func:`one_thread`: a fixed reduction order), the result cast
    back to the network's dtype.  So the end point is the same bit for bit whatever
    ``OMP_NUM_THREADS`` is, and on another machine it differs from this one's only by
    rounding that GD does not amplify while it is stable, i.e. while ``lr < 2/λ_max(H)``
    along the path.  Full-batch GD sharpens as it trains (``λ_max`` grows towards
    ``2/lr``); the default :data:`DEFAULT_PRETRAIN_LR` keeps 200 steps on the digits
    convnet stable (``λ_max`` from 1.6 to 5.4 < 2/0.3).  A step that raises the loss is a
    sign of the edge of stability, where the end point depends on rounding: a
    ``RuntimeWarning`` says so (lower ``lr``).  The network is copied; the returned setup
    starts where GD ended.

    Raises:
        ValueError: a bad ``steps`` or ``lr``, or pretraining that diverged: a loss or
            parameter that became non-finite, or a loss above 10 times the first
            (the message says at which step: lower ``lr``).

    Example:
        >>> setup = build("mlp", load_population("digits", population=16, seed=0), seed=0)
        >>> after = pretrain(setup, steps=20, lr=0.3)
        >>> float(after.loss_fn(after.theta0, after.x, after.y).mean()) < float(
        ...     setup.loss_fn(setup.theta0, setup.x, setup.y).mean())
        True
    """
    steps = check_int("pretrain steps", steps, minimum=0)
    lr = check_positive("pretrain lr", lr)
    wide = copy.deepcopy(setup.net).double()
    x = setup.x.double() if setup.x.is_floating_point() else setup.x
    loss_fn, theta = model_loss(wide)
    high = Setup(setup.data, wide, x, setup.y, loss_fn, theta)
    limit, last, rose = math.inf, math.inf, []
    with one_thread():
        for k in tqdm(range(steps), desc="pretrain", unit="step", disable=not progress):
            loss, grad = _loss_and_gradient(high, theta)
            limit = 10 * abs(float(loss)) if k == 0 else limit
            theta = theta - lr * grad
            if not (torch.isfinite(theta).all() and float(loss) <= limit):
                raise ValueError(
                    f"pretraining diverged at step {k + 1} of {steps} (lr {lr:g}): the loss "
                    f"is {float(loss):.4g}, or a parameter is not finite; lower the pretrain lr"
                )
            if float(loss) > last * (1 + 1e-12):
                rose.append(k)
            last = float(loss)
    if rose:
        warnings.warn(
            f"pretraining at lr {lr:g} raised the loss at {len(rose)} of {steps} steps "
            f"(first at step {rose[0]}): GD is past its edge of stability there "
            "(λ_max > 2/lr), where rounding grows, so the start may differ between "
            "machines; lower the pretrain lr",
            RuntimeWarning,
            stacklevel=2,
        )
    net = copy.deepcopy(setup.net)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            theta.to(setup.theta0.dtype), [p for p in net.parameters() if p.requires_grad]
        )
    loss_fn, theta0 = model_loss(net)
    return Setup(setup.data, net, setup.x, setup.y, loss_fn, theta0)


@dataclass(frozen=True)
class Start:
    """Where every run starts: the loss ``l(θ_0)`` and gradient norm ``‖G‖`` there, and how.

    Attributes:
        loss: ``l(θ_0)``, the population's mean loss at ``θ_0``.
        grad_norm: ``‖G‖``, the norm of its gradient.
        checkpoint: the checkpoint file loaded, or ``None`` (the seeded initialization).
        pretrain_steps: steps of full-batch GD taken from there (0: none).
        pretrain_lr: their learning rate (``None`` without pretraining).

    Example:
        >>> start = Start(loss=2.3, grad_norm=0.05, pretrain_steps=10, pretrain_lr=1.0)
        >>> start.describe()[:40]
        'start: l(θ0) = 2.30000, ‖G‖ = 0.050000 ('
        >>> start.describe()[40:]
        'seeded initialization, then 10 steps of full-batch GD at lr 1)'
    """

    loss: float
    grad_norm: float
    checkpoint: str | None = None
    pretrain_steps: int = 0
    pretrain_lr: float | None = None

    @property
    def is_default(self) -> bool:
        """Whether the start is the seeded initialization itself."""
        return self.checkpoint is None and self.pretrain_steps == 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (``config["start"]`` of the results)."""
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "checkpoint": self.checkpoint,
            "pretrain_steps": self.pretrain_steps,
            "pretrain_lr": self.pretrain_lr,
        }

    def describe(self) -> str:
        """One line for the tables' header."""
        where = "seeded initialization" if self.checkpoint is None else self.checkpoint
        if self.pretrain_steps:
            where += (
                f", then {self.pretrain_steps} steps of full-batch GD at lr {self.pretrain_lr:g}"
            )
        return f"start: l(θ0) = {self.loss:.5f}, ‖G‖ = {self.grad_norm:.6f} ({where})"


def start_point(
    model: str | nn.Module,
    data: Dataset,
    *,
    seed: int,
    device: str = "cpu",
    checkpoint: str | Path | None = None,
    pretrain_steps: int = 0,
    pretrain_lr: float = DEFAULT_PRETRAIN_LR,
    progress: bool = False,
) -> tuple[Setup, Start]:
    """The network at the start ``θ_0`` of every run, and the loss and gradient there.

    ``θ_0`` is the seeded initialization, or ``checkpoint``'s weights, followed by
    ``pretrain_steps`` steps of :func:`pretrain` at ``pretrain_lr``.

    Example:
        >>> data = load_population("digits", population=16, seed=0)
        >>> setup, start = start_point("mlp", data, seed=0, pretrain_steps=5)
        >>> start.pretrain_steps, start.loss < 2.4, setup.parameters
        (5, True, 2410)
    """
    pretrain_steps = check_int("pretrain steps", pretrain_steps, minimum=0)
    pretrain_lr = check_positive("pretrain lr", pretrain_lr)
    setup = build(model, data, seed=seed, device=device, checkpoint=checkpoint)
    if pretrain_steps:
        setup = pretrain(setup, steps=pretrain_steps, lr=pretrain_lr, progress=progress)
    loss, grad = _loss_and_gradient(setup, setup.theta0)
    start = Start(
        loss=float(loss),
        grad_norm=float(torch.linalg.vector_norm(grad)),
        checkpoint=None if checkpoint is None else str(checkpoint),
        pretrain_steps=pretrain_steps,
        pretrain_lr=pretrain_lr if pretrain_steps else None,
    )
    return setup, start


def measure_at_start(
    setup: Setup,
    *,
    order: int,
    schedules: Sequence[Schedule],
    gap: bool = False,
    resummed: bool = False,
    rank: int = 128,
    higher_rank: int = 32,
    series_order: int | None = None,
    progress: bool = False,
) -> Statistics:
    """The diagrams at ``θ_0``, exact over the population, for every predictor.

    The test-loss series through ``η^order``; with ``gap`` the generalization gap's
    through ``η²``; with ``resummed`` also the Krylov subspace of ``H`` of dimension
    ``rank`` (at most ``P``) with the tensors of the re-summed diagrams with up to three
    edges (test) and two (gap), third-order ones on ``higher_rank`` vectors
    (:func:`perturb.measure`); the test series is then measured through ``η³`` at least,
    unless ``series_order`` (with ``resummed``) asks for less: the series through that
    order and the same subspace built apart (:func:`perturb.krylov_subspace`, as
    :func:`perturb.measure` builds it), for a caller that reads no η³ term of the series
    (a plan: its η³ statistics, exact, cost more than everything else it measures).

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> stats = measure_at_start(setup, order=1, schedules=[Online(steps=2, batch_size=1)])
        >>> len(stats.predict(Online(steps=2, batch_size=1), lr=[0.1], order=1).by_order[0])
        2
    """
    test = max(order, 3) if resummed else order
    orders = {"test": test, "gap": 2} if gap else {"test": test}
    kw = {}
    if resummed:
        rank = min(check_int("krylov rank", rank, minimum=2), setup.parameters)
        higher = min(check_int("krylov higher rank", higher_rank, minimum=1), rank)
        kw = {"resummed": True, "rank": rank, "higher_rank": higher}
    apart = resummed and series_order is not None
    if apart:
        series = check_int("series order", series_order, minimum=1, maximum=test)
        series = {q: min(d, series) for q, d in orders.items()}
    stats = measure(
        setup.net,
        (setup.x, setup.y),
        order=series if apart else orders,
        schedules=list(schedules),
        exact=True,
        dtype=torch.float32,
        progress=progress,
        **({} if apart else kw),
    )
    if not apart:
        return stats
    sub = krylov_subspace(
        setup.net, (setup.x, setup.y), rank=kw["rank"], order=orders, quantities=tuple(orders),
        schedules=list(schedules),
        higher_rank=kw["higher_rank"], dtype=torch.float32, progress=progress,
    )  # fmt: skip
    meta = {**stats.meta, "resummed_groups": 1, "resummed_rank": sub.rank}
    return replace(stats, subspace=sub, meta=meta)


def run_trials(
    setup: Setup,
    schedule: Schedule,
    *,
    lrs: Sequence[float],
    trials: int,
    seed: int,
    record: int | Sequence[int],
    device: str = "cpu",
    progress: bool = False,
    max_memory: float | None = None,
    force: bool = False,
) -> Trials:
    """``trials`` SGD runs of ``schedule`` from ``θ_0`` per learning rate.

    The test loss is recorded every ``record`` steps, or at the steps ``record`` lists
    (and at 0 and ``T``); ``max_memory`` and ``force`` bound the estimated cost
    (:func:`check_trials_budget`).

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> run = run_trials(setup, Online(steps=2, batch_size=1), lrs=[0.1], trials=3,
        ...                  seed=0, record=1)
        >>> run.steps
        (0, 1, 2)
        >>> run_trials(setup, Online(steps=9, batch_size=1), lrs=[0.1], trials=2, seed=0,
        ...            record=[1, 3]).steps
        (0, 1, 3, 9)
    """
    return simulate(
        setup.loss_fn,
        setup.theta0,
        (setup.x, setup.y),
        schedule,
        lr=list(lrs),
        trials=trials,
        seed=seed,
        record_every=record if isinstance(record, int) else list(record),
        device=device,
        dtype=torch.float32,
        progress=progress,
        max_memory=max_memory,
        force=force,
    )


def check_trials_budget(
    setup: Setup,
    schedules: Sequence[Schedule],
    *,
    lrs: Sequence[float],
    trials: int,
    record: int | Sequence[int],
    device: str = "cpu",
    max_memory: float | None = None,
    force: bool = False,
) -> TrialsEstimate:
    """Refuse, before anything is measured, trials over the time or memory budget.

    The trials of each schedule as :func:`run_trials` runs them, estimated by
    :func:`~perturb.experiments.simulation_cost.estimate_trials`: their times add up,
    the memory is the largest one's.

    Returns:
        The combined estimate.

    Raises:
        perturb.errors.BudgetError: over one hour or ``max_memory`` (default 4 GiB),
            unless ``force``; the message gives the estimate.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> setup = build("mlp", load_population("digits", population=4, seed=0), seed=0)
        >>> check_trials_budget(setup, [Online(steps=10, batch_size=1)], lrs=[0.1],
        ...                     trials=8, record=5).pairs
        8
    """
    estimates = []
    for schedule in schedules:
        checked = make_setup(
            setup.loss_fn, setup.theta0, (setup.x, setup.y), schedule, lr=list(lrs),
            trials=trials, record_every=record if isinstance(record, int) else list(record),
            device=device, dtype=torch.float32,
        )  # fmt: skip
        estimates.append(estimate_trials(checked))
    largest = max(estimates, key=lambda e: e.memory_bytes)
    total = replace(
        largest,
        pairs=sum(e.pairs for e in estimates),
        steps=max(e.steps for e in estimates),
        seconds=sum(e.seconds for e in estimates),
    )
    check_trials(total, max_memory=max_memory, force=force)
    return total


def curve_intervals(trials: Trials) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Mean test loss, its 95% t half-width, and the column of each recorded step.

    Means, standard errors and degrees of freedom are over every trial still finite at
    each step (only a trial that blew up is left out).  Shapes ``(L, len(steps))``.

    Example:
        >>> t = Trials((0.1,), np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]),
        ...            np.array([[False, False]]), (0, 1),
        ...            np.array([[[2.0, 1.0], [2.0, 3.0]]]))
        >>> mean, half, column = curve_intervals(t)
        >>> mean.tolist(), round(float(half[0, 1]), 4), column
        ([[2.0, 2.0]], 12.7062, {0: 0, 1: 1})
    """
    means, sems = trials.curve_mean()
    finite = trials.trials - trials.curve_dropped
    half = np.array(
        [
            [t_half_width(float(sem), int(n)) for sem, n in zip(sems[li], finite[li], strict=True)]
            for li in range(means.shape[0])
        ]
    ).reshape(means.shape)
    return means, half, {int(s): k for k, s in enumerate(trials.steps)}


# ----------------------------------------------------------------------------- quadratic model


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


def quadratic_model(setup: Setup, *, progress: bool = False) -> Quadratic:
    """Per-sample derivatives, the mean Hessian and the quadratic model at ``θ_0``.

    Materializes ``H`` (``P`` Hessian-vector products, ``P²`` numbers), on the CPU, and
    eigendecomposes it; ``progress`` shows the three stages as a bar.

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
    with tqdm(total=3, desc="hessian", unit="stage", disable=not progress) as bar:
        bar.set_postfix_str("per-sample gradients")
        derivs = per_sample_derivatives(loss_fn, theta64, x64, y)
        bar.update()
        bar.set_postfix_str(f"H ({theta0.numel()} HVPs)")
        hess = mean_hessian(loss_fn, theta0.detach().float(), x.float(), y).to(torch.float64)
        bar.update()
        bar.set_postfix_str("eigendecomposition")
        model = QuadraticModel.from_derivatives(derivs, hess)
        bar.update()
    return Quadratic(loss_fn, theta64, x64, y, derivs, hess, model)


# ----------------------------------------------------------------------------- reports


def ci_error(value: float, mean: float, half: float) -> float:
    """A prediction's error in interval half-widths, ``(value − mean)/half`` (``nan``: none).

    Example:
        >>> ci_error(1.5, 1.0, 0.25)
        2.0
    """
    return (value - mean) / half if half > 0 else math.nan


def is_unstable(value: float, start_loss: float) -> bool:
    """Whether a predicted loss is absurd (:func:`perturb.numeric.trust.blown_up`: not
    finite, or outside ``[−10·l(θ_0), 20·l(θ_0)]``), the rule every command shares.

    Example:
        >>> [is_unstable(v, 2.0) for v in (1.5, -11.3, -25.0, 41.0, float("inf"))]
        [False, False, True, True, True]
    """
    return bool(blown_up(value, start_loss))


def prediction_entry(value: float, mean: float, half: float, *, start_loss: float) -> dict:
    """A prediction as the results hold it: ``value``, ``error_ci`` and ``unstable``.

    Example:
        >>> prediction_entry(2.5, 2.0, 0.25, start_loss=2.3)
        {'value': 2.5, 'error_ci': 2.0, 'unstable': False}
        >>> prediction_entry(-1e6, 2.0, 0.25, start_loss=2.3)["unstable"]
        True
    """
    return {
        "value": value,
        "error_ci": ci_error(value, mean, half),
        "unstable": is_unstable(value, start_loss),
    }


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
