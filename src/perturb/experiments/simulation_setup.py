"""Checked arguments of a simulation and the samples each of its trials draws.

:func:`make_setup` validates the arguments of :func:`perturb.experiments.simulation.simulate`
once and moves the data to the compute device, as a :class:`Setup`;
:func:`trial_indices` gives the population rows trial ``k`` uses.  Trial ``k``'s
generator is seeded from ``(seed, k)`` alone, so its samples do not depend on the other
trials: it draws a training set of ``N = M·B`` indices iid uniform on ``{0, …, n-1}``
(with replacement), then for each of the ``E`` epochs an order of it, cut into ``M``
batches of ``B``.  :class:`TrialSamples` draws the same numbers for many trials a few
steps at a time (its memory does not grow with the steps), and :class:`PairIndex` hands
them to the (learning rate, trial) pairs run together, every learning rate of a trial
reading the same draws.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp
import torch

from perturb.symbolic.schedules import Schedule

__all__ = [
    "INDEX_BUDGET",
    "LossFn",
    "PairIndex",
    "Setup",
    "TrialSamples",
    "make_setup",
    "trial_indices",
]

#: ``loss_fn(θ, x, y) -> (n,)``: per-sample losses for flat parameters ``θ``.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Most sample indices (trials × steps × batch rows) :class:`PairIndex` draws at once.
INDEX_BUDGET = 1 << 20

# --------------------------------------------------------------------------- sampling


def _sizes(schedule: Schedule) -> tuple[int, int, int]:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if not schedule.is_numeric:
        raise ValueError(
            "simulate needs a numeric schedule, got a symbolic one "
            f"(M={schedule.batches}, B={schedule.batch_size}, E={schedule.epochs}); "
            "e.g. Online(steps=100, batch_size=1)"
        )
    out = []
    for name in ("batches", "batch_size", "epochs"):
        v = sp.sympify(getattr(schedule, name))
        if not (v.is_Integer and v >= 1):
            raise ValueError(f"schedule {name} must be a positive integer, got {v}")
        out.append(int(v))
    return out[0], out[1], out[2]


def _trial_rng(seed: int, trial: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, trial])))


def trial_indices(
    schedule: Schedule, population_size: int, *, seed: int = 0, trial: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The samples trial ``trial`` uses: its training set and its batches.

    Trial ``k``'s generator is seeded from ``(seed, k)`` alone.  It first draws the
    training set, ``N = M·B`` indices iid uniform on ``{0, …, n-1}`` (with
    replacement), then for each of the ``E`` epochs an order of the training set (the
    identity, or a fresh uniform permutation if ``schedule.shuffle``), cut into ``M``
    consecutive batches of ``B``.

    Args:
        schedule: A numeric schedule.
        population_size: ``n``, the number of population rows.
        seed: The base seed (a non-negative integer).
        trial: The trial number ``k ≥ 0``.

    Returns:
        ``(train, batches)``: population indices of the training set, shape ``(N,)``,
        and of each step's batch, shape ``(T, B)``.

    Example:
        >>> from perturb.symbolic.schedules import Epochs
        >>> train, batches = trial_indices(Epochs(train_size=4, batch_size=2, epochs=3), 10)
        >>> train.shape, batches.shape
        ((4,), (6, 2))
        >>> bool((batches[:2] == batches[2:4]).all())  # fixed order: every epoch alike
        True
    """
    m, b, e = _sizes(schedule)
    seed = _seed(seed)
    if isinstance(trial, bool) or not isinstance(trial, numbers.Integral) or trial < 0:
        raise ValueError(f"trial must be a non-negative integer, got {trial!r}")
    if isinstance(population_size, bool) or not isinstance(population_size, numbers.Integral):
        raise ValueError(f"population_size must be a positive integer, got {population_size!r}")
    if population_size < 1:
        raise ValueError(f"population_size must be a positive integer, got {population_size!r}")
    n = m * b
    rng = _trial_rng(seed, int(trial))
    train = rng.integers(0, int(population_size), size=n, dtype=np.int64)
    orders = [rng.permutation(n) if schedule.shuffle else np.arange(n) for _ in range(e)]
    batches = train[np.concatenate(orders)].reshape(m * e, b)
    return train, batches


class TrialSamples:
    """The samples of some trials, drawn a few steps at a time, as :func:`trial_indices`.

    Each trial's generator makes the same draws in the same order as
    :func:`trial_indices` (numpy's bounded integers drawn in pieces continue one stream),
    so the batches are identical; only what the current steps need is held.  A single
    unshuffled epoch (online SGD) streams its training set: the batches are drawn as the
    steps reach them and :meth:`train_rows` draws the set again for the train loss, so
    memory does not grow with ``T``.  Otherwise the ``N`` training indices of each trial
    are kept, and each epoch's order is drawn when the epoch begins (``2N`` integers per
    trial, whatever ``E``).

    Args:
        schedule: A numeric schedule.
        population_size: ``n``, the number of population rows.
        seed: The base seed.
        trials: The global trial numbers ``k``, distinct.

    Example:
        >>> from perturb.symbolic.schedules import Epochs
        >>> schedule = Epochs(train_size=4, batch_size=2, epochs=3, shuffle=True)
        >>> samples = TrialSamples(schedule, 10, seed=1, trials=[0, 5])
        >>> first, rest = samples.batches(3), samples.batches(3)
        >>> ref = trial_indices(schedule, 10, seed=1, trial=5)[1]
        >>> bool((np.concatenate([first, rest], axis=1)[1] == ref).all())
        True
    """

    def __init__(
        self, schedule: Schedule, population_size: int, *, seed: int, trials: Sequence[int]
    ) -> None:
        self.batches_per_epoch, self.batch_size, self.epochs = _sizes(schedule)
        self.train_size = self.batches_per_epoch * self.batch_size
        self.population_size = int(population_size)
        self.seed = _seed(seed)
        self.trials = tuple(int(k) for k in trials)
        self.shuffle = bool(schedule.shuffle)
        self.streamed = self.epochs == 1 and not self.shuffle
        self._rngs = [_trial_rng(self.seed, k) for k in self.trials]
        self._train = None
        if not self.streamed:
            self._train = np.stack([self._draw(rng, self.train_size) for rng in self._rngs])
        self._order: np.ndarray | None = None
        self._epoch = -1
        self._step = 0
        self._replay: dict[int, tuple[np.random.Generator, int]] = {}

    def _draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.integers(0, self.population_size, size=count, dtype=np.int64)

    def batches(self, count: int) -> np.ndarray:
        """The batches of the next ``count`` steps, shape ``(trials, count, B)``."""
        u, b, m = len(self.trials), self.batch_size, self.batches_per_epoch
        out = np.empty((u, count, b), dtype=np.int64)
        done = 0
        while done < count:
            if self.streamed:
                take = count - done
                for j, rng in enumerate(self._rngs):
                    out[j, done:] = self._draw(rng, take * b).reshape(take, b)
            else:
                epoch, first = divmod(self._step + done, m)
                if epoch != self._epoch:
                    self._epoch = epoch
                    self._order = (
                        np.stack([rng.permutation(self.train_size) for rng in self._rngs])
                        if self.shuffle
                        else None
                    )
                take = min(count - done, m - first)
                cols = slice(first * b, (first + take) * b)
                assert self._train is not None
                rows = (
                    self._train[:, cols]
                    if self._order is None
                    else np.take_along_axis(self._train, self._order[:, cols], axis=1)
                )
                out[:, done : done + take] = rows.reshape(u, take, b)
            done += take
        self._step += count
        return out

    def train_rows(self, start: int, stop: int, trial: int) -> np.ndarray:
        """Training-set indices ``start … stop-1`` of local trial ``trial`` (``trials[trial]``).

        Streamed, the set is drawn again from the trial's seed; reading it in increasing
        pieces draws each index once.
        """
        stop = min(int(stop), self.train_size)
        if self._train is not None:
            return self._train[trial, start:stop]
        rng, at = self._replay.get(trial, (None, -1))
        if rng is None or at > start:
            rng, at = _trial_rng(self.seed, self.trials[trial]), 0
        while at < start:  # skip to ``start``
            skip = min(start - at, INDEX_BUDGET)
            self._draw(rng, skip)
            at += skip
        out = self._draw(rng, max(stop - start, 0))
        self._replay[trial] = (rng, max(stop, start))
        return out


class PairIndex:
    """Sample indices of the (learning rate, trial) pairs run together, on the device.

    Pair ``j`` runs trial ``trials[j]``; each distinct trial's samples are drawn once
    (:class:`TrialSamples`) and shared by its learning rates.  :meth:`batch` gives step
    ``t``'s batches (``t`` non-decreasing), drawn :data:`INDEX_BUDGET` indices at a time;
    indexing ``[j, a:b]`` or ``[:, a:b]`` gives training-set indices, as a ``(pairs, N)``
    index tensor would (what :func:`perturb.experiments.sgd_step.mean_loss` reads).

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> index = PairIndex(Online(steps=4, batch_size=2), 10, seed=0, trials=[3, 3, 4],
        ...                   device=torch.device("cpu"))
        >>> index.shape, tuple(index.batch(1).shape), bool((index[0, :8] == index[1, :8]).all())
        ((3, 8), (3, 2), True)
        >>> ref = trial_indices(Online(steps=4, batch_size=2), 10, trial=4)[1]
        >>> index.batch(3)[2].tolist() == ref[3].tolist()
        True
    """

    def __init__(
        self,
        schedule: Schedule,
        population_size: int,
        *,
        seed: int,
        trials: Sequence[int],
        device: torch.device,
    ) -> None:
        distinct = sorted(set(int(k) for k in trials))
        where = {k: i for i, k in enumerate(distinct)}
        self.samples = TrialSamples(schedule, population_size, seed=seed, trials=distinct)
        self.pos = np.array([where[int(k)] for k in trials])
        self.device = device
        self.shape = (len(self.pos), self.samples.train_size)
        self.steps = self.samples.batches_per_epoch * self.samples.epochs
        self._rows = torch.as_tensor(self.pos, device=device)
        self._span = max(1, INDEX_BUDGET // (len(distinct) * self.samples.batch_size))
        self._start, self._end = 0, 0
        self._chunk: torch.Tensor | None = None

    def batch(self, t: int) -> torch.Tensor:
        """Population indices of step ``t``'s batch of every pair, shape ``(pairs, B)``."""
        if not self._start <= t < self.steps:
            raise ValueError(f"steps must be read in order, from 0 to {self.steps - 1}; got {t}")
        while t >= self._end:  # the next steps, in order
            count = min(self._span, self.steps - self._end)
            self._chunk = torch.from_numpy(self.samples.batches(count)).to(self.device)
            self._start, self._end = self._end, self._end + count
        assert self._chunk is not None
        return self._chunk[self._rows, t - self._start]

    def __getitem__(self, key: tuple[int | slice, slice]) -> torch.Tensor:
        pairs, cols = key
        start = cols.start or 0
        stop = self.shape[1] if cols.stop is None else cols.stop
        if isinstance(pairs, slice):
            chosen = [int(p) for p in self.pos[pairs]]
            rows = {p: self.samples.train_rows(start, stop, p) for p in sorted(set(chosen))}
            return torch.from_numpy(np.stack([rows[p] for p in chosen])).to(self.device)
        rows = self.samples.train_rows(start, stop, int(self.pos[pairs]))
        return torch.from_numpy(rows).to(self.device)


# --------------------------------------------------------------------------- arguments


def _seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _lrs(lr: object) -> tuple[float, ...]:
    values = lr if isinstance(lr, Sequence | np.ndarray | torch.Tensor) else [lr]
    if isinstance(lr, str):
        values = [lr]
    if isinstance(values, np.ndarray | torch.Tensor):
        values = values.reshape(-1).tolist()
    values = list(values)
    if not values:
        raise ValueError("lr must be a learning rate or a non-empty list of them, got []")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"lr must be a real number >= 0 (or a list of them), got {v!r}")
        f = float(v)
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"lr must be finite and >= 0, got {v!r}")
        out.append(f)
    return tuple(out)


def _pair(name: str, data: object) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x") and hasattr(data, "y"):
        data = (data.x, data.y)  # e.g. a perturb.data.Dataset
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{name} must be a pair (x, y) of tensors, got {type(data).__name__}")
    x, y = data
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(
            f"{name} must be a pair (x, y) of tensors, got ({type(x).__name__}, {type(y).__name__})"
        )
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} x and y must have the same number of rows, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row")
    return x, y


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _record_at(record_every: object) -> int | tuple[int, ...]:
    """``record_every`` checked: an interval ``r ≥ 1``, or the steps to record (``()``: none)."""
    if record_every is None:
        return ()
    if isinstance(record_every, numbers.Integral) and not isinstance(record_every, bool):
        if record_every >= 1:
            return int(record_every)
    elif isinstance(record_every, Sequence) and not isinstance(record_every, str):
        steps = tuple(record_every)
        if all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 1 for t in steps
        ):
            return tuple(int(t) for t in steps)
    raise ValueError(
        "record_every must be a positive integer, a sequence of positive steps or None, "
        f"got {record_every!r}"
    )


@dataclass
class Setup:
    """The checked arguments of one simulation, with the data on the compute device.

    Attributes:
        loss_fn: The per-sample loss on flat parameters.
        theta0: ``θ_0``, shape ``(P,)``.
        x: Population inputs (sampled from).
        y: Population labels.
        x_test: Test inputs (the population unless given).
        y_test: Test labels.
        schedule: The numeric schedule.
        steps: ``T = M·E``.
        lrs: The learning rates.
        trials: Number of trials run here.
        seed: The base seed.
        chunk: Most (lr, trial) pairs run together, or ``None`` for all.
        record: Steps at which the test loss is recorded (ending at ``T``).
        cap: Absolute cap past which a trial counts as blown up (``inf`` for none).
        factor: Factor of the reported loss limit, or ``None`` for none.
        progress: Show a progress bar.
        dtype: Floating dtype of parameters and inputs.
        first: Global number of the first trial run here.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> data = (torch.ones(3, 1), torch.zeros(3))
        >>> s = make_setup(lambda t, x, y: x @ t, torch.zeros(1), data,
        ...                Online(steps=2, batch_size=1), lr=0.1, trials=range(4, 6))
        >>> s.first, s.trials, s.batches(0)[1].shape
        (4, 2, (2, 1))
    """

    loss_fn: LossFn
    theta0: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    schedule: Schedule
    steps: int
    lrs: tuple[float, ...]
    trials: int
    seed: int
    chunk: int | None
    record: tuple[int, ...]
    cap: float
    factor: float | None
    progress: bool
    dtype: torch.dtype
    first: int = 0

    def batches(self, trial: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples of local trial ``trial``, i.e. of global trial ``first + trial``."""
        return trial_indices(
            self.schedule, int(self.x.shape[0]), seed=self.seed, trial=self.first + trial
        )


def make_setup(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    population: object,
    schedule: Schedule,
    *,
    lr: object,
    trials: int | range,
    test: object = None,
    seed: int = 0,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    record_every: int | Sequence[int] | None = None,
    diverge_above: float | None = None,
    diverge_factor: float | None = 10.0,
) -> Setup:
    """Validate the arguments of :func:`perturb.experiments.simulation.simulate`.

    The arguments are those of ``simulate`` (see there); the data and ``θ_0`` are moved to
    ``device`` (default ``θ_0``'s) and cast to ``dtype`` (floating tensors only).

    Returns:
        The :class:`Setup`.

    Raises:
        ValueError: For a bad value of any argument (the message names it).
        TypeError: If ``loss_fn`` is not callable or ``schedule`` not a Schedule.

    Example:
        >>> from perturb.symbolic.schedules import GD
        >>> data = (torch.ones(3, 1), torch.zeros(3))
        >>> s = make_setup(lambda t, x, y: x @ t, torch.zeros(1), data,
        ...                GD(train_size=2, steps=4), lr=[0.1, 0.2], trials=3, record_every=2)
        >>> s.steps, s.lrs, s.record, s.cap, s.factor
        (4, (0.1, 0.2), (0, 2, 4), inf, 10.0)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    m, _, e = _sizes(schedule)
    lrs = _lrs(lr)
    if isinstance(trials, range):
        if len(trials) < 1 or trials.step != 1 or trials.start < 0:
            raise ValueError(
                f"trials as a range must be non-empty with step 1 and start >= 0, got {trials!r}"
            )
    elif isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1 or a range of trials, got {trials!r}")
    seed = _seed(seed)
    if chunk is not None and (
        isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1
    ):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    at = _record_at(record_every)
    if diverge_above is not None and not (
        isinstance(diverge_above, numbers.Real)
        and not isinstance(diverge_above, bool)
        and float(diverge_above) > 0
    ):
        raise ValueError(f"diverge_above must be a positive number or None, got {diverge_above!r}")
    if diverge_factor is not None and not (
        isinstance(diverge_factor, numbers.Real)
        and not isinstance(diverge_factor, bool)
        and float(diverge_factor) >= 1
    ):
        raise ValueError(
            f"diverge_factor must be a number >= 1 or None, got {diverge_factor!r}; "
            "e.g. 10 reports a trial whose loss exceeds 10 times the larger of its starting "
            "loss and the loss at zero parameters"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    theta0 = torch.as_tensor(theta0)
    if theta0.ndim != 1 or theta0.numel() == 0:
        raise ValueError(f"theta0 must be a non-empty 1-D tensor, got shape {tuple(theta0.shape)}")
    x, y = _pair("population", population)
    x_test, y_test = (x, y) if test is None else _pair("test", test)
    if x_test.shape[1:] != x.shape[1:] or y_test.shape[1:] != y.shape[1:]:
        raise ValueError(
            "test and population shapes do not match: population x "
            f"{tuple(x.shape)}, y {tuple(y.shape)}; test x {tuple(x_test.shape)}, "
            f"y {tuple(y_test.shape)} (rows may differ, the rest must agree)"
        )
    device = torch.device(device) if device is not None else theta0.device
    steps = m * e
    if isinstance(at, int):
        record = tuple(sorted({*range(0, steps, at), steps}))
    else:
        record = tuple(sorted({0, *(t for t in at if t < steps), steps})) if at else (steps,)
    return Setup(
        loss_fn=loss_fn,
        theta0=theta0.detach().to(device=device, dtype=dtype),
        x=_to(x, device, dtype),
        y=_to(y, device, dtype),
        x_test=_to(x_test, device, dtype),
        y_test=_to(y_test, device, dtype),
        schedule=schedule,
        steps=steps,
        lrs=lrs,
        trials=len(trials) if isinstance(trials, range) else int(trials),
        seed=seed,
        chunk=None if chunk is None else int(chunk),
        record=record,
        cap=math.inf if diverge_above is None else float(diverge_above),
        factor=None if diverge_factor is None else float(diverge_factor),
        progress=bool(progress),
        dtype=dtype,
        first=trials.start if isinstance(trials, range) else 0,
    )
