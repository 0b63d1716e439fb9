"""Checked arguments of a simulation and the samples each of its trials draws.

:func:`make_setup` validates the arguments of :func:`perturb.experiments.simulation.simulate`
once and moves the data to the compute device, as a :class:`Setup`;
:func:`trial_indices` gives the population rows trial ``k`` uses.  Trial ``k``'s
generator is seeded from ``(seed, k)`` alone, so its samples do not depend on the other
trials: it draws a training set of ``N = M·B`` indices iid uniform on ``{0, …, n-1}``
(with replacement), then for each of the ``E`` epochs an order of it, cut into ``M``
batches of ``B``.
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

__all__ = ["LossFn", "Setup", "make_setup", "trial_indices"]

#: ``loss_fn(θ, x, y) -> (n,)``: per-sample losses for flat parameters ``θ``.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

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
        cap: Absolute divergence cap (``inf`` for none).
        factor: Relative divergence factor, or ``None`` for none.
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
    diverge_above: float | None = 1e8,
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
        (4, (0.1, 0.2), (0, 2, 4), 100000000.0, 10.0)
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
            "e.g. 10 flags a trial whose loss exceeds 10 times its starting loss"
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
