"""Actual SGD runs: many independent trials at once, to check the predictions against.

The theory predicts the *expected* test loss of SGD after a schedule; :func:`simulate`
estimates that expectation by running ``K`` independent trials of SGD on one
schedule and averaging.  Samples come from a finite *population* ``{x_1, …, x_n}``
(with labels), uniformly **with replacement**, so they are iid draws from the
population distribution whose mean loss

.. math::

    L(θ) = \\frac{1}{n}\\sum_{i=1}^{n} l_{x_i}(θ)

is exactly the test loss the theory predicts.  Every schedule is one shape (see
:mod:`perturb.symbolic.schedules`): each trial draws a training set of ``N = M·B`` indices
iid from the population, then walks it ``E`` times in ``M`` batches of ``B``
consecutive points, in a fixed order or reshuffled each epoch, for ``T = M·E``
steps

.. math::

    θ_{t+1} = θ_t - η\\,∇_θ \\frac{1}{B}\\sum_{x ∈ \\mathcal{B}_t} l_x(θ_t).

Online SGD (``E = 1``) therefore uses ``T·B`` fresh iid draws, and full-batch GD
(``M = 1``, ``B = N``) is deterministic given the training set.

The trials run together: their parameters are stacked into a ``(K, P)`` matrix and
the per-trial step is vectorized with :func:`torch.func.vmap`.  Trial ``k`` draws
its samples from its own generator, seeded from ``(seed, k)``, so its trajectory
does not depend on how many trials run beside it, on ``chunk``, or on which process
runs it (``trials=range(a, b)`` runs trials ``a … b-1`` alone; under ``torchrun``
:func:`simulate` splits the trials across the processes, see
:mod:`perturb.numeric.distributed`); every learning
rate sees the same samples (common random numbers).  :func:`simulate_loop` runs the
same trials one after another and serves as the reference.

A trial *blows up* (diverges) when a batch loss, a parameter, or an evaluated test or
train loss becomes non-finite (or exceeds the optional absolute cap ``diverge_above``);
such trials are counted and left out of the averages.  Every finite trial is averaged,
however high it climbed on the way: a trial whose loss went above ``diverge_factor``
times ``max(L(θ_0), L(0))`` (the larger of the starting loss and the loss at zero
parameters, the task's loss scale) is reported, not dropped, since dropping the runs
that pass over a bump would bias the mean low.  The step itself and the bookkeeping live in
:mod:`perturb.experiments.sgd_step`, the checks of the arguments and the samples of each
trial in :mod:`perturb.experiments.simulation_setup`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from perturb.experiments.sgd_step import run_trials
from perturb.experiments.simulation_cost import check_trials, estimate_trials
from perturb.experiments.simulation_setup import LossFn, make_setup, trial_indices
from perturb.numeric.adapters import cross_entropy_per_sample, trainable_parameters
from perturb.numeric.distributed import all_ints, gather_blocks, same_on_all_ranks, shard, world
from perturb.numeric.intervals import t_half_width
from perturb.symbolic.schedules import Schedule

__all__ = [
    "Trials",
    "model_loss",
    "simulate",
    "simulate_distributed",
    "simulate_loop",
    "trial_indices",
]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Trials:
    """Final losses of ``K`` SGD trials at each of ``L`` learning rates.

    A trial is *divergent* (blew up) when a loss or its parameters became non-finite (or
    exceeded the optional absolute cap); its losses are stored as ``NaN``,
    :attr:`divergent` counts them, and every statistic below is taken over the ``n``
    finite trials, all of them, however high they climbed.  A finite trial whose loss went
    above :attr:`loss_limit` stays in every statistic; :attr:`crossed` counts those, as
    information.  For values ``v_1 … v_n`` the mean is ``v̄``, the standard error
    ``s/√n`` with ``s`` the sample standard deviation (``ddof = 1``), and the two-sided
    level-``α`` interval ``v̄ ± t_{(1+α)/2, n-1}·s/√n`` (Student's t).

    Attributes:
        lrs: The learning rates ``η``, shape ``(L,)``.
        test_loss: Final test loss of each trial, shape ``(L, K)`` (``NaN`` if blown up).
        train_loss: Final loss on each trial's own training set of ``N`` draws
            (for online SGD: the ``T·B`` samples it drew), shape ``(L, K)``.
        diverged: Whether each trial blew up, shape ``(L, K)``.
        steps: The steps at which the test loss was recorded (always ending at ``T``).
        curve: Test loss at each recorded step, shape ``(L, K, len(steps))``; ``NaN``
            from the first record after a trial blew up.
        schedule: The schedule's name.
        seed: The base seed.
        level: Confidence level of :attr:`ci` (0.95).
        start_loss: ``L(θ_0)``, the population loss at the shared start as the
            simulation evaluated it (``NaN`` if not known).
        loss_limit: The reported limit ``diverge_factor·max(L(θ_0), L(0))`` (``inf``:
            none): information only, a trial above it is still averaged.
        loss_scale: ``L(0)``, the population loss at zero parameters, the task's loss
            scale (``log C`` for cross-entropy over ``C`` classes; ``NaN`` if not known).

    Example:
        >>> t = Trials(
        ...     lrs=(0.1,),
        ...     test_loss=np.array([[1.0, 2.0, 3.0, np.nan]]),
        ...     train_loss=np.array([[1.0, 1.0, 1.0, np.nan]]),
        ...     diverged=np.array([[False, False, False, True]]),
        ...     steps=(5,),
        ...     curve=np.array([[[1.0], [2.0], [3.0], [np.nan]]]),
        ... )
        >>> t.mean.tolist(), t.divergent.tolist(), t.is_divergent.tolist()
        ([2.0], [1], [True])
        >>> t.curve_dropped.tolist(), t.crossed.tolist()  # no limit given: none crossed
        ([[1]], [0])
        >>> t.ci.round(3).tolist()
        [[-0.484, 4.484]]
    """

    lrs: tuple[float, ...]
    test_loss: np.ndarray
    train_loss: np.ndarray
    diverged: np.ndarray
    steps: tuple[int, ...]
    curve: np.ndarray
    schedule: str = "schedule"
    seed: int = 0
    level: float = 0.95
    start_loss: float = math.nan
    loss_limit: float = math.inf
    loss_scale: float = math.nan

    @property
    def trials(self) -> int:
        """``K``, the number of trials per learning rate."""
        return int(self.test_loss.shape[1])

    @property
    def divergent(self) -> np.ndarray:
        """Number of trials that blew up (left out of the averages) per learning rate,
        shape ``(L,)``."""
        return self.diverged.sum(axis=1)

    @property
    def is_divergent(self) -> np.ndarray:
        """Whether any trial blew up, per learning rate, shape ``(L,)``."""
        return self.divergent > 0

    @property
    def crossed(self) -> np.ndarray:
        """Number of trials still averaged whose test loss at a recorded step went above
        :attr:`loss_limit`, per learning rate, shape ``(L,)``."""
        with np.errstate(invalid="ignore"):
            above = (self.curve > self.loss_limit).any(axis=2)
        return (above & ~self.diverged).sum(axis=1)

    @property
    def curve_dropped(self) -> np.ndarray:
        """Number of trials blown up by each recorded step (left out of that step's
        mean), shape ``(L, len(steps))``."""
        return (~np.isfinite(self.curve)).sum(axis=1)

    @property
    def curve_above(self) -> np.ndarray:
        """Number of finite recorded test losses above :attr:`loss_limit` (averaged all
        the same) at each recorded step, shape ``(L, len(steps))``."""
        with np.errstate(invalid="ignore"):
            return (self.curve > self.loss_limit).sum(axis=1)

    @property
    def finite(self) -> np.ndarray:
        """Number of finite (averaged) trials per learning rate, shape ``(L,)``."""
        return np.isfinite(self.test_loss).sum(axis=1)

    def limits(self) -> dict[str, float]:
        """The reported loss limit and what it is made of, for a report's ``config``.

        Returns:
            ``limit`` (:attr:`loss_limit`), ``start`` (:attr:`start_loss`) and ``scale``
            (:attr:`loss_scale`).

        Example:
            >>> t = Trials((0.1,), np.ones((1, 2)), np.ones((1, 2)), np.zeros((1, 2), bool),
            ...            (1,), np.ones((1, 2, 1)), start_loss=0.5, loss_limit=23.0,
            ...            loss_scale=2.3)
            >>> t.limits()
            {'limit': 23.0, 'start': 0.5, 'scale': 2.3}
        """
        return {
            "limit": float(self.loss_limit),
            "start": float(self.start_loss),
            "scale": float(self.loss_scale),
        }

    def counts_at(self, lr_index: int, step: int) -> dict[str, Any]:
        """The trial counts of a report row: learning rate ``lrs[lr_index]`` at ``step``.

        Returns:
            ``dropped`` (trials blown up by ``step``, left out of its mean),
            ``above_limit`` (trials above :attr:`loss_limit` there, averaged all the same)
            and ``divergent`` (every trial blown up: no mean to compare with).

        Example:
            >>> t = Trials((0.1,), np.array([[1.0, np.nan]]), np.array([[1.0, np.nan]]),
            ...            np.array([[False, True]]), (0, 3),
            ...            np.array([[[1.0, 1.0], [1.0, np.nan]]]))
            >>> t.counts_at(0, 3)
            {'dropped': 1, 'above_limit': 0, 'divergent': False}
        """
        j = self.steps.index(step)
        dropped = int(self.curve_dropped[lr_index, j])
        return {
            "dropped": dropped,
            "above_limit": int(self.curve_above[lr_index, j]),
            "divergent": dropped == self.trials,
        }

    @property
    def mean(self) -> np.ndarray:
        """Mean final test loss over the finite trials, shape ``(L,)``."""
        return _summary(self.test_loss, self.level)[0]

    @property
    def sem(self) -> np.ndarray:
        """Standard error of :attr:`mean`, shape ``(L,)``."""
        return _summary(self.test_loss, self.level)[1]

    @property
    def ci(self) -> np.ndarray:
        """The level-:attr:`level` t-interval of the mean test loss, shape ``(L, 2)``."""
        return self.interval()

    @property
    def train_mean(self) -> np.ndarray:
        """Mean final train loss over the finite trials, shape ``(L,)``."""
        return _summary(self.train_loss, self.level)[0]

    @property
    def train_sem(self) -> np.ndarray:
        """Standard error of :attr:`train_mean`, shape ``(L,)``."""
        return _summary(self.train_loss, self.level)[1]

    def interval(self, level: float | None = None, *, train: bool = False) -> np.ndarray:
        """The two-sided t-interval ``v̄ ± t_{(1+α)/2, n-1}·s/√n`` of the mean.

        Args:
            level: Confidence level ``α`` in ``(0, 1)``; default :attr:`level`.
            train: Use the train losses instead of the test losses.

        Returns:
            Lower and upper bounds, shape ``(L, 2)`` (``NaN`` where fewer than 2 trials
            are finite).

        Example:
            >>> t = Trials((0.1,), np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]),
            ...            np.array([[False, False]]), (1,), np.array([[[1.0], [3.0]]]))
            >>> t.interval(0.5).round(2).tolist()  # t_{0.75, 1} = 1, so mean ± sem
            [[1.0, 3.0]]
        """
        level = self.level if level is None else float(level)
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        mean, _, half = _summary(self.train_loss if train else self.test_loss, level)
        return np.stack([mean - half, mean + half], axis=-1)

    def curve_mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error of the recorded test loss at each of :attr:`steps`.

        Each step averages the trials still finite at that step.

        Returns:
            ``(mean, sem)``, each of shape ``(L, len(steps))``.

        Example:
            >>> t = Trials((0.1,), np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]),
            ...            np.array([[False, False]]), (0, 1),
            ...            np.array([[[2.0, 1.0], [2.0, 3.0]]]))
            >>> t.curve_mean()[0].tolist()
            [[2.0, 2.0]]
        """
        flat = np.moveaxis(self.curve, 1, -1)  # (L, S, K)
        mean, sem, _ = _summary(flat.reshape(-1, flat.shape[-1]), self.level)
        shape = self.curve.shape[0], self.curve.shape[2]
        return mean.reshape(shape), sem.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``NaN`` becomes ``None``).

        Example:
            >>> import json
            >>> t = Trials((0.1,), np.array([[1.0, np.nan]]), np.array([[1.0, np.nan]]),
            ...            np.array([[False, True]]), (3,), np.array([[[1.0], [np.nan]]]))
            >>> d = json.loads(json.dumps(t.to_dict()))
            >>> d["mean"], d["divergent"], d["test_loss"]
            ([1.0], [1], [[1.0, None]])
        """
        curve_mean, curve_sem = self.curve_mean()
        return {
            "schedule": self.schedule,
            "seed": int(self.seed),
            "trials": self.trials,
            "level": float(self.level),
            "lrs": [float(v) for v in self.lrs],
            "mean": _jsonable(self.mean),
            "sem": _jsonable(self.sem),
            "ci": _jsonable(self.ci),
            "train_mean": _jsonable(self.train_mean),
            "train_sem": _jsonable(self.train_sem),
            "train_ci": _jsonable(self.interval(train=True)),
            "finite": [int(v) for v in self.finite],
            "divergent": [int(v) for v in self.divergent],
            "is_divergent": [bool(v) for v in self.is_divergent],
            "crossed": [int(v) for v in self.crossed],
            "start_loss": _jsonable(self.start_loss),
            "loss_limit": _jsonable(self.loss_limit),
            "loss_scale": _jsonable(self.loss_scale),
            "test_loss": _jsonable(self.test_loss),
            "train_loss": _jsonable(self.train_loss),
            "steps": [int(s) for s in self.steps],
            "curve_mean": _jsonable(curve_mean),
            "curve_sem": _jsonable(curve_sem),
        }

    def communication_bytes(self, world: int) -> int:
        """Bytes each rank receives when ``world`` ranks split these trials (see
        :func:`perturb.numeric.distributed.communication_bytes`)."""
        block = -(-self.trials // world)
        return 8 * world * (5 + block * len(self.lrs) * (3 + len(self.steps)))


def _summary(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise mean, standard error and t half-width over the finite entries."""
    values = np.asarray(values, dtype=np.float64)
    rows = values.shape[0]
    mean = np.full(rows, np.nan)
    sem = np.full(rows, np.nan)
    half = np.full(rows, np.nan)
    for i in range(rows):
        v = values[i][np.isfinite(values[i])]
        n = v.size
        if n:
            mean[i] = v.mean()
        if n > 1:
            sem[i] = v.std(ddof=1) / math.sqrt(n)
            half[i] = t_half_width(sem[i], n, level=level)
    return mean, sem, half


def _jsonable(a: np.ndarray) -> Any:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return float(a) if np.isfinite(a) else None
    return [_jsonable(v) for v in a]


# --------------------------------------------------------------------------- models


def model_loss(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
) -> tuple[LossFn, torch.Tensor]:
    """A per-sample loss on *flat* parameters for ``model``, and its current parameters.

    With ``θ ∈ ℝ^P`` the concatenation of the flattened parameters that require grad (in
    ``named_parameters`` order), ``loss_fn(θ, x, y)[i] = loss(model_θ(x), y)[i]``,
    computed with :func:`torch.func.functional_call`; the model's buffers and frozen
    parameters are passed along unchanged (floating ones cast to ``θ``'s dtype; see
    :func:`perturb.numeric.adapters.trainable_parameters`).  The model itself is
    never modified.

    Args:
        model: The network.
        loss: ``loss(outputs, y) -> (n,)`` per-sample losses; default cross-entropy.

    Returns:
        ``(loss_fn, theta0)``: the loss on flat parameters and a detached copy of the
        model's parameters, shape ``(P,)``.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> loss_fn, theta0 = model_loss(mlp((1, 2, 2), 3, hidden=()))
        >>> theta0.shape
        torch.Size([15])
        >>> loss_fn(theta0, torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])).shape
        torch.Size([2])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model has no parameters")
    trainable, frozen = trainable_parameters(model)  # θ: what requires grad
    named = [(name, p.shape, p.numel()) for name, p in trainable]
    buffers = {name: b.detach() for name, b in model.named_buffers()} | frozen
    sizes = [n for _, _, n in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in trainable]).clone()

    def loss_fn(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        params = {name: v.view(shape) for (name, shape, _), v in zip(named, pieces, strict=True)}
        bufs = {k: b.to(theta.dtype) if b.is_floating_point() else b for k, b in buffers.items()}
        out = torch.func.functional_call(model, (params, bufs), (x,))
        return loss(out, y)

    return loss_fn, theta0


# --------------------------------------------------------------------------- public API

_DOC_ARGS = """
    Args:
        loss_fn: ``loss_fn(θ, x, y) -> (n,)`` per-sample losses for flat parameters
            ``θ`` of shape ``(P,)`` and a batch ``x``, ``y`` of ``n`` rows (see
            :func:`model_loss`).  It must be :func:`torch.func.vmap`-compatible.
        theta0: ``θ_0``, shape ``(P,)``, shared by every trial.
        population: ``(x, y)``, the finite population sampled uniformly with
            replacement (a :class:`perturb.experiments.data.Dataset` works too).
        schedule: A numeric schedule (:func:`~perturb.symbolic.schedules.Online`,
            :func:`~perturb.symbolic.schedules.Epochs`, :func:`~perturb.symbolic.schedules.GD`).
        lr: ``η``, a number ``>= 0`` or a list of them; all run on the same samples.
        trials: ``K >= 1`` trials per learning rate, or a ``range`` of trial numbers
            (step 1, start ``>= 0``): ``trials=range(a, b)`` runs trials ``a … b-1``
            only, each exactly as in a run of ``b`` or more trials (its seed is
            ``(seed, k)``), so runs over disjoint ranges can be concatenated.
        test: ``(x, y)`` on which the test loss is measured; default the population
            (then the test loss is the exact population loss the theory predicts).
        seed: Base seed; trial ``k`` is seeded from ``(seed, k)`` (see
            :func:`trial_indices`).
        chunk: Run at most this many (lr, trial) pairs together (default: all, or as
            many as fit in :data:`~perturb.experiments.simulation_cost.GROUP_BYTES`);
            a trial's learning rates run together and share its draws.
        device: Where to compute (default: ``theta0``'s device).
        dtype: Floating dtype of parameters and inputs (default float64).
        progress: Show a progress bar.
        record_every: Also record the test loss every this many steps (steps
            ``0, r, 2r, …`` and ``T``), for curves against ``T`` from one run; or a
            sequence of steps: exactly those (with ``0`` and ``T``), e.g. a log grid.
        diverge_above: Optional absolute cap: a trial also counts as blown up once a
            batch loss, a parameter, or a test or train loss exceeds this in absolute
            value (default ``None``: only non-finite values blow a trial up).  Blown-up
            trials are counted in :attr:`Trials.divergent` and left out of every average.
        diverge_factor: Factor ``f`` of the reported limit ``f·max(L(θ_0), L(0))``, with
            ``L(θ_0)`` and ``L(0)`` the mean loss over the *population* at ``θ_0`` and
            at zero parameters as this simulation evaluates them (same device and
            dtype), reported as :attr:`Trials.start_loss` and :attr:`Trials.loss_scale`
            (only finite positive ones count).  A trial whose test loss at a recorded
            step goes above it is counted in :attr:`Trials.crossed` and still averaged;
            ``None``: no limit.
        max_memory: Bytes the trials may take (default 4 GiB); their time and memory
            are estimated before they start
            (:func:`~perturb.experiments.simulation_cost.estimate_trials`).
        force: Run even when the estimate is over the time budget (one hour) or
            ``max_memory``.

    Returns:
        A :class:`Trials` with the final test and train losses of every trial.

    Raises:
        ValueError: For a bad ``lr``, ``trials < 1``, a symbolic schedule, mismatched
            population/test shapes, or other bad options.
        perturb.errors.BudgetError: When the estimated time or memory is over the
            bound (the message gives the estimate), unless ``force``.
        TypeError: If ``loss_fn`` is not callable or ``schedule`` not a Schedule.
"""


def simulate(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    population: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
    *,
    lr: float | Sequence[float],
    trials: int | range,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    record_every: int | Sequence[int] | None = None,
    diverge_above: float | None = None,
    diverge_factor: float | None = 10.0,
    max_memory: float | None = None,
    force: bool = False,
    distributed: bool = True,
) -> Trials:
    """Run ``K`` independent SGD trials at once (vectorized over trials with ``vmap``).

    Each trial draws its training set of ``N = M·B`` points iid from the population
    and runs ``T = M·E`` steps ``θ_{t+1} = θ_t - η ∇ (1/B) Σ_{x∈𝓑_t} l_x(θ_t)`` from
    ``θ_0`` (see :mod:`perturb.experiments.simulation`).  The parameters of all trials form a
    ``(K, P)`` matrix updated by one vectorized step; the test loss
    ``L(θ_T) = mean_{test} l_x(θ_T)`` and the train loss ``(1/N) Σ_n l_{x_n}(θ_T)``
    of each trial are recorded.

    Under ``torchrun`` (a default :mod:`torch.distributed` process group of ``W > 1``
    processes is initialized) and with ``distributed=True``, the trials are split
    across the ranks and their losses gathered (:func:`simulate_distributed`):
    every rank must pass the same arguments and returns the same :class:`Trials` as one
    process would.  ``distributed=False`` runs every trial here.
    {args}
    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> x = torch.tensor([[1.0], [-1.0]])
        >>> def loss_fn(theta, xb, yb):
        ...     return 0.5 * (theta**2).sum() + xb @ theta
        >>> res = simulate(loss_fn, torch.zeros(1), (x, torch.zeros(2)),
        ...                Online(steps=5, batch_size=1), lr=[0.1, 0.5], trials=8)
        >>> res.test_loss.shape, res.divergent.tolist()
        ((2, 8), [0, 0])
        >>> bool((res.mean > 0).all())
        True
        >>> part = simulate(loss_fn, torch.zeros(1), (x, torch.zeros(2)),
        ...                 Online(steps=5, batch_size=1), lr=[0.1, 0.5], trials=range(3, 8))
        >>> bool(np.array_equal(part.test_loss, res.test_loss[:, 3:]))
        True
    """
    if distributed:
        if world()[1] > 1:
            return simulate_distributed(
                loss_fn, theta0, population, schedule, lr=lr, trials=trials, test=test,
                seed=seed, chunk=chunk, device=device, dtype=dtype, progress=progress,
                record_every=record_every, diverge_above=diverge_above,
                diverge_factor=diverge_factor, max_memory=max_memory, force=force,
            )  # fmt: skip
    return _run(
        loss_fn, theta0, population, schedule, lr=lr, trials=trials, test=test, seed=seed,
        chunk=chunk, device=device, dtype=dtype, progress=progress, record_every=record_every,
        diverge_above=diverge_above, diverge_factor=diverge_factor, vectorized=True,
        max_memory=max_memory, force=force,
    )  # fmt: skip


def simulate_loop(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    population: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
    *,
    lr: float | Sequence[float],
    trials: int | range,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    record_every: int | Sequence[int] | None = None,
    diverge_above: float | None = None,
    diverge_factor: float | None = 10.0,
    max_memory: float | None = None,
    force: bool = False,
) -> Trials:
    """Reference for :func:`simulate`: the same trials, one after another.

    Same arguments, seeds and results as :func:`simulate` (up to rounding), but each
    (lr, trial) pair runs alone in a plain Python loop, its gradient taken by ordinary
    autograd (``torch.autograd.grad``) instead of ``vmap(grad)``; ``chunk`` is accepted
    and ignored.
    {args}
    Example:
        >>> from perturb.symbolic.schedules import GD
        >>> x = torch.tensor([[1.0], [-1.0]])
        >>> def loss_fn(theta, xb, yb):
        ...     return 0.5 * (theta**2).sum() + xb @ theta
        >>> args = (loss_fn, torch.zeros(1), (x, torch.zeros(2)), GD(train_size=2, steps=3))
        >>> a = simulate_loop(*args, lr=0.1, trials=3)
        >>> b = simulate(*args, lr=0.1, trials=3)
        >>> bool(np.allclose(a.test_loss, b.test_loss, rtol=0, atol=1e-12))
        True
    """
    return _run(
        loss_fn, theta0, population, schedule, lr=lr, trials=trials, test=test, seed=seed,
        chunk=chunk, device=device, dtype=dtype, progress=progress, record_every=record_every,
        diverge_above=diverge_above, diverge_factor=diverge_factor, vectorized=False,
        max_memory=max_memory, force=force,
    )  # fmt: skip


def _run(
    *args: Any, vectorized: bool, max_memory: float | None, force: bool, **options: Any
) -> Trials:
    """Check the arguments and the budget, run the trials
    (:func:`~perturb.experiments.sgd_step.run_trials`)."""
    s = make_setup(*args, **options)
    estimate = estimate_trials(s)
    check_trials(estimate, max_memory=max_memory, force=bool(force))
    if s.chunk is None:
        s = replace(s, chunk=estimate.group)
    out = run_trials(s, vectorized=vectorized)
    return Trials(
        lrs=s.lrs,
        test_loss=out.test_loss,
        train_loss=out.train_loss,
        diverged=out.diverged,
        steps=s.record,
        curve=out.curve,
        schedule=s.schedule.name,
        seed=s.seed,
        start_loss=out.start_loss,
        loss_limit=out.limit,
        loss_scale=out.scale,
    )


simulate.__doc__ = (simulate.__doc__ or "").replace("{args}", _DOC_ARGS)
simulate_loop.__doc__ = (simulate_loop.__doc__ or "").replace("{args}", _DOC_ARGS)


def simulate_distributed(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    population: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
    *,
    lr: float | Sequence[float],
    trials: int | range,
    seed: int = 0,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    record_every: int | Sequence[int] | None = None,
    diverge_above: float | None = None,
    diverge_factor: float | None = 10.0,
    max_memory: float | None = None,
    force: bool = False,
) -> Trials:
    """:func:`perturb.experiments.simulation.simulate`, with the trials split across the ranks.

    With ``K`` trials (or a ``range`` of them), rank ``r`` runs the block
    :func:`shard` ``(K, r, W)`` only, as ``simulate(..., trials=range(a, b))`` (trial
    ``k`` keeps its own seed ``(seed, k)``); test and train losses, divergence flags
    and curves are all-gathered in trial order, so every rank returns the same
    :class:`Trials` as a single-process ``simulate``.  A rank with no trial (``K < W``)
    runs the first one and discards it, so that every rank checks the arguments alike.
    ``simulate`` itself calls this under a process group; same arguments; the progress
    bar shows on rank 0 only.

    Raises:
        ValueError: For bad arguments (as ``simulate``), or when the ranks disagree on
            the number of trials, the first trial, the learning rates, the recorded
            steps or the seed.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> x = torch.tensor([[1.0], [-1.0]])
        >>> def loss_fn(theta, xb, yb):
        ...     return 0.5 * (theta**2).sum() + xb @ theta
        >>> args = (loss_fn, torch.zeros(1), (x, torch.zeros(2)), Online(steps=4, batch_size=1))
        >>> a = simulate_distributed(*args, lr=[0.1, 0.3], trials=5, seed=3)
        >>> b = simulate(*args, lr=[0.1, 0.3], trials=5, seed=3)
        >>> bool(np.array_equal(a.test_loss, b.test_loss))
        True
    """
    rank, size = world()
    count = len(trials) if isinstance(trials, range) else trials
    options = dict(
        lr=lr, seed=seed, test=test, chunk=chunk, device=device, dtype=dtype,
        record_every=record_every, diverge_above=diverge_above,
        diverge_factor=diverge_factor, distributed=False, max_memory=max_memory, force=force,
    )  # fmt: skip
    if size == 1 or isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        # one process, or bad trials: simulate's own checks raise on every rank alike
        return simulate(
            loss_fn, theta0, population, schedule, trials=trials, progress=progress, **options
        )
    every = trials if isinstance(trials, range) else range(int(trials))
    part = shard(len(every), rank, size)
    mine = every[part.start : part.stop]
    local = simulate(
        loss_fn, theta0, population, schedule, trials=mine if len(mine) else every[:1],
        progress=progress and rank == 0, **options,
    )  # fmt: skip
    layout = [len(every), every.start, len(local.lrs), len(local.steps), local.seed]
    same_on_all_ranks(
        "len(trials), first trial, learning rates, recorded steps, seed", all_ints(layout)
    )
    blocks = (local.test_loss, local.train_loss, local.diverged, local.curve)
    test_loss, train_loss, diverged, curve = (
        gather_blocks(b[:, : len(mine)], len(every), axis=1) for b in blocks
    )
    return replace(
        local, test_loss=test_loss, train_loss=train_loss, diverged=diverged.astype(bool),
        curve=curve,
    )  # fmt: skip
