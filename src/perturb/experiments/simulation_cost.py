r"""How long and how much memory the SGD trials (and the learning curve) will take, before
they start.

:func:`estimate_trials` sizes a checked simulation (a
:class:`~perturb.experiments.simulation_setup.Setup`) from formulas alone, so that
:func:`check_trials` can refuse a run of hours, or one that would not fit in memory, in
well under a second and before anything else is measured; ``force`` (``--force``) runs
it anyway and ``max_memory`` (``--max-memory``) moves the memory bound.

With ``L`` learning rates, ``K`` trials, ``T`` steps of batch ``B``, a training set of
``N`` rows, ``S`` recorded steps on ``n_test`` test rows, ``P`` parameters and inputs of
``d`` numbers each, the ``L·K`` (learning rate, trial) pairs run in groups of ``c``, and

.. math::

    \text{seconds} ≈ L K P \bigl(T (a + b B) + e (S\, n_{test} + N)\bigr) + g\, T \lceil LK/c \rceil

with ``a = 3·10⁻⁸ s``, ``b = 10⁻⁸ s`` (a step, per pair, parameter and batch row), ``e =
3·10⁻⁹ s`` (a loss evaluation, per pair, parameter and row) and ``g = 2·10⁻⁴ s`` (the
Python work of one step of one group), timed on one CPU core for the digits MLP and
convnet (the two bracket these constants by a factor of three); a GPU is taken as 20
times faster per pair.  Memory is the results (``8·L·K·(S+3)`` bytes, twice), the data,
and one group's working set: ``c·s·(6P + 8Bd)`` bytes for parameters, gradients and
gathered batches (``s`` the dtype's size), the kept training sets and epoch orders
(``16N`` bytes per trial unless streamed) and the index and evaluation buffers.  Without
a ``chunk``, ``c`` is every pair when that working set fits in :data:`GROUP_BYTES`, else
as many as fit (the buffers left aside).  The estimate is good to a factor of a few; it is
meant to tell minutes from days.

The learning curve (:func:`perturb.numeric.curve.learning_curve`, ``--curve``) is sized
the same way by :func:`estimate_curve` and refused by :func:`check_curve`.  Its work is
counted in full-batch gradients over the ``n`` rows, as its own ``cost`` counts them: per
learning rate ``T + 1`` for the path, ``2T`` for the SDE's gradient flow (with
:attr:`~perturb.numeric.curve.CurveSettings.sde`), and at each checkpoint
(:func:`~perturb.numeric.curve.checkpoint_steps`) the Krylov start ``1 + p`` (``p``
probes), ``k`` Hessian-vector products (2 each), the ``n`` per-sample gradients (1), the
``n·k_3`` per-sample Hessian-vector products (``2k_3``), the ``k_3(k_3+1)/2`` mean
third-derivative products (3 each), the per-sample third derivative along one
direction (4) and, when ``k < P``, the noise outside the subspaces (``5m``: ``m``
:attr:`~perturb.numeric.curve.CurveSettings.outside_probes` weighted gradients and ``2m``
Hessian-vector products): the count is the run's own, to the gradient.  A full-batch gradient takes
``2P(a + b n)`` (the trials' constants for a batch of ``n`` rows, twice for float64; a
GPU 20 times faster) plus ``g`` a call of 256 rows, and every step of every learning rate
``h = 10⁻³ s`` more for the noise recursions (rank 32).  Timed on one CPU core beside
other jobs (two learning rates, rank 32): the digits MLP (``P = 2410``) 14.6 s against
40 s estimated at ``n = 256``, ``T = 100``, and 6.9 s against 7.7 s at ``n = 16``,
``T = 400``; the smooth convnet (``P = 1418``, ``n = 64``, ``T = 40``) 19.8 s against
5.2 s (its per-row passes cost more per parameter): within a factor of four.  Memory
(float64) is the Krylov bases and the path's vectors, ``8P(3k + 10)``, one vectorized
per-row call of the third order (:func:`~perturb.numeric.derivatives.vmap_rows`) and the
projected per-sample gradients and Hessians of two checkpoints, ``16n(k + k_3²)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from perturb.checks import check_int
from perturb.errors import BudgetError
from perturb.experiments.simulation_setup import INDEX_BUDGET, Setup
from perturb.numeric.curve import CurveSettings, checkpoint_steps
from perturb.numeric.derivatives import vmap_rows

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "GROUP_BYTES",
    "TRIALS_BUDGET_SECONDS",
    "CurveEstimate",
    "TrialsEstimate",
    "check_curve",
    "check_trials",
    "estimate_curve",
    "estimate_trials",
]

TRIALS_BUDGET_SECONDS = 3600.0
"""Estimated seconds above which the trials need ``force`` (``--force``)."""
DEFAULT_MAX_MEMORY = 4 * 2**30
"""Estimated bytes above which the trials need a larger ``max_memory`` (or ``force``)."""
GROUP_BYTES = 2**30
"""Largest working set of one group of pairs run together when no ``chunk`` is given."""

_STEP_SECONDS = 3e-8  # per pair and parameter, each step
_ROW_SECONDS = 1e-8  # per pair, parameter and batch row, each step
_EVAL_SECONDS = 3e-9  # per pair, parameter and evaluated row
_GROUP_STEP_SECONDS = 2e-4  # Python and dispatch work of one step of one group
_GPU_SPEEDUP = 20.0
_EVAL_ROWS = 1 << 15  # (pair, row) losses one evaluation call holds (sgd_step._EVAL_BUDGET)
_CURVE_STEP_SECONDS = 1e-3  # the curve's noise recursions, one step of one learning rate
_CURVE_CHUNK = 256  # rows per call of the curve's full-batch gradient
_FLOAT64 = 2.0  # the curve runs in float64, the trials' constants are float32's


def _short(value: float) -> str:
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


@dataclass(frozen=True)
class TrialsEstimate:
    """The size of a simulation's trials and what they will cost.

    Attributes:
        pairs: ``L·K``, the (learning rate, trial) pairs.
        group: pairs run together (the chunk).
        steps: ``T``.
        batch_size: ``B``.
        seconds: a rough estimate of the run time.
        memory_bytes: a rough estimate of the peak memory.

    Example:
        >>> TrialsEstimate(1280, 1280, 200000, 1, 1.5e4, 3e8).describe()
        '1280 runs of 200000 steps (batch 1): ~1.5e4 s, ~0.28 GiB'
    """

    pairs: int
    group: int
    steps: int
    batch_size: int
    seconds: float
    memory_bytes: int

    def describe(self) -> str:
        """One line: the runs, the time and the memory."""
        return (
            f"{self.pairs} runs of {self.steps} steps (batch {self.batch_size}): "
            f"~{_short(self.seconds)} s, ~{_short(self.memory_bytes / 2**30)} GiB"
        )


def estimate_trials(s: Setup) -> TrialsEstimate:
    """Estimate the time and memory of the trials of ``s`` (see the module notes).

    Example:
        >>> from perturb.experiments.simulation_setup import make_setup
        >>> from perturb.symbolic.schedules import Online
        >>> data = (torch.zeros(256, 64), torch.zeros(256))
        >>> s = make_setup(lambda t, x, y: x @ t[:64], torch.zeros(1418), data,
        ...                Online(steps=200000, batch_size=1), lr=[0.01] * 5, trials=256)
        >>> e = estimate_trials(s)
        >>> e.pairs, e.group, e.seconds > TRIALS_BUDGET_SECONDS
        (1280, 1280, True)
    """
    lrs, trials, steps = len(s.lrs), s.trials, s.steps
    pairs = lrs * trials
    batch = int(s.schedule.batch_size)
    train = int(s.schedule.batches) * batch
    params = int(s.theta0.numel())
    row = max(1, int(s.x[0].numel()))
    size = torch.empty((), dtype=s.dtype).element_size()
    streamed = int(s.schedule.epochs) == 1 and not s.schedule.shuffle
    per_pair = size * (6 * params + 8 * batch * row)
    per_trial = 0 if streamed else 16 * train
    fixed = 16 * INDEX_BUDGET + 2 * size * row * _EVAL_ROWS

    def working(c: int) -> int:
        return c * per_pair + (c // lrs + 2) * per_trial + fixed

    if s.chunk is not None:
        group = min(s.chunk, pairs)
    elif working(pairs) <= GROUP_BYTES:
        group = pairs
    else:
        group = int(min(max(1, GROUP_BYTES // (per_pair + per_trial / lrs)), pairs))
        if group > lrs:
            group -= group % lrs  # whole trials: each one's samples drawn once
    records = len(s.record)
    test_rows, rows = int(s.x_test.shape[0]), int(s.x.shape[0])
    work = (
        pairs
        * params
        * (
            steps * (_STEP_SECONDS + _ROW_SECONDS * batch)
            + _EVAL_SECONDS * (records * test_rows + train)
        )
    )
    if s.theta0.device.type == "cuda":
        work /= _GPU_SPEEDUP
    seconds = work + _GROUP_STEP_SECONDS * steps * math.ceil(pairs / group)
    results = 2 * 8 * pairs * (records + 3)
    data = (rows + test_rows) * (row * size + 8)
    return TrialsEstimate(
        pairs=pairs,
        group=group,
        steps=steps,
        batch_size=batch,
        seconds=float(seconds),
        memory_bytes=int(results + data + working(group)),
    )


def check_trials(
    estimate: TrialsEstimate, *, max_memory: float | None = None, force: bool = False
) -> None:
    """Raise unless the trials fit :data:`TRIALS_BUDGET_SECONDS` and ``max_memory``, or ``force``.

    Args:
        estimate: from :func:`estimate_trials`.
        max_memory: bytes the trials may use (default :data:`DEFAULT_MAX_MEMORY`).
        force: run whatever the estimate.

    Raises:
        perturb.errors.BudgetError: naming the estimate, the bound and the option that
            lifts it.
        ValueError: a ``max_memory`` that is not a positive number.

    Example:
        >>> check_trials(TrialsEstimate(10, 10, 100, 1, 2.0, 10**6))
        >>> check_trials(TrialsEstimate(10, 10, 10**9, 1, 1e9, 10**6))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        perturb.errors.BudgetError: the SGD trials would take 10 runs ... pass --force ...
    """
    _refuse(
        "the SGD trials", estimate, max_memory, force,
        slower="use fewer --trials, --steps or --epochs, or pass --force (force=True) to run "
        "them anyway",
        larger="use fewer --trials, or pass --force (force=True)",
    )  # fmt: skip


def _refuse(
    what: str,
    estimate: TrialsEstimate | CurveEstimate,
    max_memory: float | None,
    force: bool,
    *,
    slower: str,
    larger: str,
) -> None:
    """Raise a :class:`~perturb.errors.BudgetError` naming ``what``, the estimate, the bound
    it passes and the advice (``slower`` past :data:`TRIALS_BUDGET_SECONDS`, ``larger``
    past ``max_memory``), unless ``force``; ``max_memory`` is checked either way."""
    max_memory = _bound(max_memory)
    if force:
        return
    if estimate.seconds > TRIALS_BUDGET_SECONDS:
        raise BudgetError(
            f"{what} would take {estimate.describe()}: over the "
            f"{TRIALS_BUDGET_SECONDS:.0f} s budget; {slower}"
        )
    if estimate.memory_bytes > max_memory:
        raise BudgetError(
            f"{what} would take {estimate.describe()}: over the "
            f"{_short(max_memory / 2**30)} GiB memory bound; raise --max-memory "
            f"(max_memory=bytes), {larger}"
        )


def _bound(max_memory: float | None) -> float:
    """``max_memory``, checked (default :data:`DEFAULT_MAX_MEMORY`)."""
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if (
        isinstance(max_memory, bool)
        or not isinstance(max_memory, int | float)
        or not (max_memory > 0)
    ):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


@dataclass(frozen=True)
class CurveEstimate:
    """The size of a learning curve's run and what it will cost.

    Attributes:
        lrs: ``L``, the learning rates (one path each).
        steps: ``T``, the longest recorded step.
        checkpoints: the most checkpoints over every learning rate.
        gradients: full-batch-gradient equivalents (as ``LearningCurve.cost["total"]``).
        seconds: a rough estimate of the run time.
        memory_bytes: a rough estimate of the peak memory.

    Example:
        >>> CurveEstimate(2, 10**6, 40, 6.1e6, 9.2e3, 5e7).describe()  # doctest: +ELLIPSIS
        '2 paths of 1000000 steps, ≤ 40 checkpoints: ~6.1e6 full-batch gradients, ~9.2e3 s, ...'
    """

    lrs: int
    steps: int
    checkpoints: int
    gradients: float
    seconds: float
    memory_bytes: int

    def describe(self) -> str:
        """One line: the paths, the checkpoints, the gradients, the time and the memory."""
        return (
            f"{self.lrs} path{'' if self.lrs == 1 else 's'} of {self.steps} steps, "
            f"≤ {self.checkpoints} checkpoints: ~{_short(self.gradients)} full-batch gradients, "
            f"~{_short(self.seconds)} s, ~{_short(self.memory_bytes / 2**30)} GiB"
        )


def estimate_curve(
    *,
    parameters: int,
    rows: int,
    lrs: Sequence[float],
    steps: int,
    settings: CurveSettings,
    cuda: bool = False,
) -> CurveEstimate:
    """Estimate the work, time and memory of a learning curve (see the module notes).

    Args:
        parameters: ``P``.
        rows: ``n``, the population.
        lrs: the learning rates.
        steps: ``T``, the longest recorded step.
        settings: the curve's :class:`~perturb.numeric.curve.CurveSettings`.
        cuda: the network is evaluated on a GPU.

    Example:
        >>> from perturb.numeric.curve import CurveSettings
        >>> e = estimate_curve(parameters=259, rows=16, lrs=[0.1], steps=10,
        ...                    settings=CurveSettings(rank=8, higher_rank=4))
        >>> e.checkpoints, e.gradients  # path 11, flow 20, 5 × (5 + 16 + 1 + 8 + 30 + 4 + 40)
        (5, 551.0)
    """
    p = check_int("parameters", parameters, minimum=1)
    n = check_int("rows", rows, minimum=1)
    steps = check_int("steps", steps)
    if not isinstance(settings, CurveSettings):
        raise TypeError(f"settings must be a CurveSettings, got {type(settings).__name__}")
    k = min(settings.rank, p)
    k3 = min(settings.higher_rank, k)
    probes = min(settings.probes, max(k - 1, 0))
    per_checkpoint = (1 + probes) + 2 * k + 1 + 2 * k3 + 3 * k3 * (k3 + 1) / 2 + 4
    if k < p:  # the noise outside the rank-k and rank-k/2 subspaces
        per_checkpoint += 5 * settings.outside_probes
    marks = sum(
        len(checkpoint_steps(float(eta), max(steps, 1), first=settings.first,
                             per_decade=settings.per_decade))
        for eta in lrs
    )  # fmt: skip
    path = len(lrs) * ((steps + 1) + (2 * steps if settings.sde else 0))
    gradients = path + marks * per_checkpoint
    work = _FLOAT64 * p * (_STEP_SECONDS + _ROW_SECONDS * n)
    if cuda:
        work /= _GPU_SPEEDUP
    one = work + _GROUP_STEP_SECONDS * math.ceil(n / _CURVE_CHUNK)
    seconds = gradients * one + _CURVE_STEP_SECONDS * len(lrs) * steps
    per_row = vmap_rows(p, itemsize=8, order=3) * 16 * p * 8
    memory = 8 * p * (3 * k + 10) + per_row + 16 * n * (k + k3 * k3)
    return CurveEstimate(
        lrs=len(lrs),
        steps=steps,
        checkpoints=marks,
        gradients=float(gradients),
        seconds=float(seconds),
        memory_bytes=int(memory),
    )


def check_curve(
    estimate: CurveEstimate, *, max_memory: float | None = None, force: bool = False
) -> None:
    """Raise unless the learning curve fits :data:`TRIALS_BUDGET_SECONDS` and ``max_memory``
    (the trials' bounds, for the curve alone), or ``force``.

    Raises:
        perturb.errors.BudgetError: naming the estimate, the bound and the option that
            lifts it.
        ValueError: a ``max_memory`` that is not a positive number.

    Example:
        >>> check_curve(CurveEstimate(1, 100, 3, 900.0, 2.0, 10**6))
        >>> check_curve(CurveEstimate(1, 10**8, 30, 3e8, 1e6, 10**6))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        perturb.errors.BudgetError: the learning curve would take 1 path ... pass --force ...
    """
    _refuse(
        "the learning curve", estimate, max_memory, force,
        slower="use fewer --steps or learning rates, a lower curve_rank, or pass --force "
        "(force=True) to run it anyway",
        larger="use a lower curve_rank, or pass --force (force=True)",
    )  # fmt: skip
