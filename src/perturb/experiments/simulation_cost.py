r"""How long and how much memory the SGD trials of a simulation will take, before they start.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from perturb.errors import BudgetError
from perturb.experiments.simulation_setup import INDEX_BUDGET, Setup

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "GROUP_BYTES",
    "TRIALS_BUDGET_SECONDS",
    "TrialsEstimate",
    "check_trials",
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
    work = pairs * params * (
        steps * (_STEP_SECONDS + _ROW_SECONDS * batch)
        + _EVAL_SECONDS * (records * test_rows + train)
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
    if max_memory is None:
        max_memory = DEFAULT_MAX_MEMORY
    if isinstance(max_memory, bool) or not isinstance(max_memory, int | float) or not (
        max_memory > 0
    ):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    if force:
        return
    if estimate.seconds > TRIALS_BUDGET_SECONDS:
        raise BudgetError(
            f"the SGD trials would take {estimate.describe()}: over the "
            f"{TRIALS_BUDGET_SECONDS:.0f} s budget; use fewer --trials, --steps or --epochs, "
            "or pass --force (force=True) to run them anyway"
        )
    if estimate.memory_bytes > max_memory:
        raise BudgetError(
            f"the SGD trials would take {estimate.describe()}: over the "
            f"{_short(max_memory / 2**30)} GiB memory bound; raise --max-memory "
            "(max_memory=bytes), use fewer --trials, or pass --force (force=True)"
        )
