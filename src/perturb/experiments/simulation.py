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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import sympy as sp
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from perturb.experiments.models import cross_entropy_per_sample
from perturb.numeric.distributed import all_ints, gather_blocks, same_on_all_ranks, shard, world
from perturb.symbolic.schedules import Schedule

__all__ = ["Trials", "model_loss", "simulate", "simulate_loop", "trial_indices"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: How many (trial, sample) loss evaluations one evaluation call may hold.
_EVAL_BUDGET = 1 << 15
#: Evaluation sets with at least this many rows are evaluated trial by trial.
_LOOP_ROWS = 256


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Trials:
    """Final losses of ``K`` SGD trials at each of ``L`` learning rates.

    A trial is *divergent* when its loss or parameters became non-finite or exceeded
    the divergence threshold; its losses are stored as ``NaN`` and every statistic
    below is taken over the ``n`` finite trials only.  For values ``v_1 … v_n`` the
    mean is ``v̄``, the standard error ``s/√n`` with ``s`` the sample standard
    deviation (``ddof = 1``), and the two-sided level-``α`` interval
    ``v̄ ± t_{(1+α)/2, n-1}·s/√n`` (Student's t).

    Attributes:
        lrs: The learning rates ``η``, shape ``(L,)``.
        test_loss: Final test loss of each trial, shape ``(L, K)`` (``NaN`` if divergent).
        train_loss: Final loss on each trial's own training set of ``N`` draws
            (for online SGD: the ``T·B`` samples it drew), shape ``(L, K)``.
        diverged: Whether each trial diverged, shape ``(L, K)``.
        steps: The steps at which the test loss was recorded (always ending at ``T``).
        curve: Test loss at each recorded step, shape ``(L, K, len(steps))``; ``NaN``
            from the first record after a trial diverged.
        schedule: The schedule's name.
        seed: The base seed.
        level: Confidence level of :attr:`ci` (0.95).

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

    @property
    def trials(self) -> int:
        """``K``, the number of trials per learning rate."""
        return int(self.test_loss.shape[1])

    @property
    def divergent(self) -> np.ndarray:
        """Number of divergent trials per learning rate, shape ``(L,)``."""
        return self.diverged.sum(axis=1)

    @property
    def is_divergent(self) -> np.ndarray:
        """Whether any trial diverged, per learning rate, shape ``(L,)``."""
        return self.divergent > 0

    @property
    def finite(self) -> np.ndarray:
        """Number of finite (averaged) trials per learning rate, shape ``(L,)``."""
        return np.isfinite(self.test_loss).sum(axis=1)

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
            half[i] = stats.t.ppf(0.5 + level / 2, n - 1) * sem[i]
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

    With ``θ ∈ ℝ^P`` the concatenation of the flattened parameters (in
    ``named_parameters`` order), ``loss_fn(θ, x, y)[i] = loss(model_θ(x), y)[i]``,
    computed with :func:`torch.func.functional_call`; the model's buffers are passed
    along unchanged (floating buffers cast to ``θ``'s dtype).  The model itself is
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
    named = [(name, p.shape, p.numel()) for name, p in model.named_parameters()]
    if not named:
        raise ValueError("model has no parameters")
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    sizes = [n for _, _, n in named]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def loss_fn(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        params = {name: v.view(shape) for (name, shape, _), v in zip(named, pieces, strict=True)}
        bufs = {k: b.to(theta.dtype) if b.is_floating_point() else b for k, b in buffers.items()}
        out = torch.func.functional_call(model, (params, bufs), (x,))
        return loss(out, y)

    return loss_fn, theta0


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


# --------------------------------------------------------------------------- validation


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


@dataclass
class _Setup:
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
    threshold: float
    progress: bool
    dtype: torch.dtype
    first: int = 0

    def batches(self, trial: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples of local trial ``trial``, i.e. of global trial ``first + trial``."""
        return trial_indices(
            self.schedule, int(self.x.shape[0]), seed=self.seed, trial=self.first + trial
        )


def _setup(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    population: object,
    schedule: Schedule,
    lr: object,
    trials: int | range,
    test: object,
    seed: int,
    chunk: int | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    progress: bool,
    record_every: int | None,
    diverge_above: float,
) -> _Setup:
    """Validate the arguments of :func:`simulate` and move the data to ``device``."""
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
    if record_every is not None and (
        isinstance(record_every, bool)
        or not isinstance(record_every, numbers.Integral)
        or record_every < 1
    ):
        raise ValueError(f"record_every must be a positive integer or None, got {record_every!r}")
    if not (isinstance(diverge_above, numbers.Real) and float(diverge_above) > 0):
        raise ValueError(f"diverge_above must be a positive number, got {diverge_above!r}")
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
    record = (
        tuple(sorted({*range(0, steps, int(record_every)), steps}))
        if record_every is not None
        else (steps,)
    )
    return _Setup(
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
        threshold=float(diverge_above),
        progress=bool(progress),
        dtype=dtype,
        first=trials.start if isinstance(trials, range) else 0,
    )


# --------------------------------------------------------------------------- the step


def _alive(theta, new, value, alive, threshold):
    """Still alive: batch loss and new parameters finite and at most ``threshold``."""
    return (
        alive
        & torch.isfinite(value)
        & (value.abs() <= threshold)
        & torch.isfinite(new).all()
        & (new.abs().amax() <= threshold)
    )


def _make_step(loss_fn: LossFn, threshold: float):
    """One SGD step ``θ ← θ - η ∇ mean_b l(θ)`` (for ``vmap``), with divergence bookkeeping.

    A trial stays *alive* while its batch loss and new parameters are finite and at
    most ``threshold`` in absolute value; once dead its parameters are frozen.
    """

    def batch_mean(theta, xb, yb):
        return loss_fn(theta, xb, yb).mean()

    grad_and_value = torch.func.grad_and_value(batch_mean)

    def step(theta, xb, yb, lr, alive):
        g, value = grad_and_value(theta, xb, yb)
        new = theta - lr * g
        ok = _alive(theta, new, value, alive, threshold)
        return torch.where(ok, new, theta), ok

    return step


def _make_loop_step(loss_fn: LossFn, threshold: float):
    """The same step for one trial, with plain autograd (the ordinary way to run SGD)."""

    def step(theta, xb, yb, lr, alive):
        with torch.enable_grad():
            p = theta.detach().requires_grad_()
            value = loss_fn(p, xb, yb).mean()
            (g,) = torch.autograd.grad(value, p)
        with torch.no_grad():
            new = theta - lr * g
            ok = _alive(theta, new, value, alive, threshold)
            return torch.where(ok, new, theta), ok

    return step


def _mean_loss(s: _Setup, thetas: torch.Tensor, idx: torch.Tensor | None, vec: bool):
    """Mean loss of each row of ``thetas`` (``(c, P)``) on the test set or a training set.

    ``idx`` is ``None`` (the test set, shared) or ``(c, n)`` population indices.  The
    evaluation is vectorized over trials only for small sets (``n < _LOOP_ROWS``): a
    large set is a big batch for each trial already, and looping over trials then
    beats ``vmap`` (whose batched convolutions become slower grouped ones on CPU).
    """
    c = thetas.shape[0]
    x, y = (s.x_test, s.y_test) if idx is None else (s.x, s.y)
    n = x.shape[0] if idx is None else idx.shape[1]

    def total(theta, xb, yb):
        return s.loss_fn(theta, xb, yb).sum()

    with torch.no_grad():
        if vec and n < _LOOP_ROWS:
            rows = max(1, _EVAL_BUDGET // c)
            out = torch.zeros(c, dtype=thetas.dtype, device=thetas.device)
            for start in range(0, n, rows):
                if idx is None:
                    xb, yb = x[start : start + rows], y[start : start + rows]
                    out = out + torch.func.vmap(total, in_dims=(0, None, None))(thetas, xb, yb)
                else:
                    ib = idx[:, start : start + rows]
                    out = out + torch.func.vmap(total)(thetas, x[ib], y[ib])
            return out / n
        sums = []
        for j in range(c):
            acc = torch.zeros((), dtype=thetas.dtype, device=thetas.device)
            for start in range(0, n, _EVAL_BUDGET):
                if idx is None:
                    xb, yb = x[start : start + _EVAL_BUDGET], y[start : start + _EVAL_BUDGET]
                else:
                    ib = idx[j, start : start + _EVAL_BUDGET]
                    xb, yb = x[ib], y[ib]
                acc = acc + total(thetas[j], xb, yb)
            sums.append(acc)
        return torch.stack(sums) / n


def _test_loss(
    s: _Setup, theta: torch.Tensor, alive: torch.Tensor, vectorized: bool
) -> tuple[np.ndarray, torch.Tensor]:
    """Test losses of the ``(c, P)`` parameters (``NaN`` where dead) and the alive mask."""
    loss = _mean_loss(s, theta, None, vectorized)
    ok = alive & torch.isfinite(loss) & (loss.abs() <= s.threshold)
    vals = torch.where(ok, loss, torch.full_like(loss, float("nan")))
    return vals.cpu().numpy(), ok


_CUDA_GRAPHS = True  # replay the vectorized step as a CUDA graph on a GPU


class _GraphStep:
    """The vectorized step captured once as a CUDA graph and replayed for every step.

    The step is launch-bound: on an H100, 256 trials of the digits convnet spend ~4 ms of
    CPU dispatch per step for ~0.26 ms of GPU work.  The graph reads the batch indices
    and writes the parameters and alive flags in place, in static buffers; the kernels
    are the ones the eager step runs, so the results are the same
    (``benchmarks/check_gpu.py`` compares the two).
    """

    def __init__(self, step, theta, alive, x, y, ib, lr) -> None:
        self.theta, self.alive, self.ib = theta.clone(), alive.clone(), ib.clone()
        self.x, self.y, self.lr, self.step = x, y, lr, step
        start = (theta.clone(), alive.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up before capture (allocator, cuDNN plans)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._body()
        self.theta.copy_(start[0])
        self.alive.copy_(start[1])

    def _body(self) -> None:
        new, ok = self.step(self.theta, self.x[self.ib], self.y[self.ib], self.lr, self.alive)
        self.theta.copy_(new)
        self.alive.copy_(ok)

    def run(self, ib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the batches ``ib``; the returned tensors are the static buffers."""
        self.ib.copy_(ib)
        self.graph.replay()
        return self.theta, self.alive


def _run(s: _Setup, *, vectorized: bool) -> Trials:
    """Run every (lr, trial) pair: vectorized in chunks, or one after another."""
    L, K, S = len(s.lrs), s.trials, len(s.record)
    pairs = [(i, k) for i in range(L) for k in range(K)]
    size = (s.chunk or len(pairs)) if vectorized else 1
    groups = [pairs[j : j + size] for j in range(0, len(pairs), size)]
    step = torch.func.vmap(_make_step(s.loss_fn, s.threshold)) if vectorized else None
    loop_step = None if vectorized else _make_loop_step(s.loss_fn, s.threshold)
    test = np.full((L, K), np.nan)
    train = np.full((L, K), np.nan)
    diverged = np.zeros((L, K), dtype=bool)
    curve = np.full((L, K, S), np.nan)
    record_at = {t: j for j, t in enumerate(s.record)}
    device = s.theta0.device
    bar = tqdm(total=len(groups) * s.steps, disable=not s.progress, desc="simulate")
    for group in groups:
        c = len(group)
        drawn = [s.batches(k) for _, k in group]
        train_idx = torch.from_numpy(np.stack([d[0] for d in drawn])).to(device)
        batch_idx = torch.from_numpy(np.stack([d[1] for d in drawn])).to(device)  # (c, T, B)
        lr = torch.tensor([s.lrs[i] for i, _ in group], dtype=s.dtype, device=device)
        theta = s.theta0.expand(c, -1).clone()
        alive = torch.ones(c, dtype=torch.bool, device=device)
        rows = np.array([i for i, _ in group])
        cols = np.array([k for _, k in group])
        if 0 in record_at:
            curve[rows, cols, record_at[0]] = _test_loss(s, theta, alive, vectorized)[0]
        graph = None
        if step is not None and device.type == "cuda" and _CUDA_GRAPHS and s.steps > 1:
            graph = _GraphStep(step, theta, alive, s.x, s.y, batch_idx[:, 0], lr)
        for t in range(s.steps):
            ib = batch_idx[:, t]
            with torch.no_grad():
                if graph is not None:
                    theta, alive = graph.run(ib)
                elif step is not None:
                    theta, alive = step(theta, s.x[ib], s.y[ib], lr, alive)
                else:
                    xb, yb = s.x[ib], s.y[ib]
                    theta, alive = loop_step(theta[0], xb[0], yb[0], lr[0], alive[0])
                    theta, alive = theta[None], alive[None]
            if t + 1 in record_at and t + 1 < s.steps:
                curve[rows, cols, record_at[t + 1]] = _test_loss(s, theta, alive, vectorized)[0]
            bar.update(1)
        vals, ok = _test_loss(s, theta, alive, vectorized)
        curve[rows, cols, -1] = vals
        tr = _mean_loss(s, theta, train_idx, vectorized)
        ok = ok & torch.isfinite(tr) & (tr.abs() <= s.threshold)
        ok_np = ok.cpu().numpy()
        diverged[rows, cols] = ~ok_np
        test[rows, cols] = np.where(ok_np, curve[rows, cols, -1], np.nan)
        train[rows, cols] = np.where(ok_np, tr.cpu().numpy(), np.nan)
    bar.close()
    curve[diverged, -1] = np.nan
    return Trials(
        lrs=s.lrs,
        test_loss=test,
        train_loss=train,
        diverged=diverged,
        steps=s.record,
        curve=curve,
        schedule=s.schedule.name,
        seed=s.seed,
    )


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
        chunk: Run at most this many (lr, trial) pairs together (default: all).
        device: Where to compute (default: ``theta0``'s device).
        dtype: Floating dtype of parameters and inputs (default float64).
        progress: Show a progress bar.
        record_every: Also record the test loss every this many steps (steps
            ``0, r, 2r, …`` and ``T``), for curves against ``T`` from one run.
        diverge_above: A trial diverges once a batch loss, a parameter, or its final
            test or train loss is non-finite or exceeds this in absolute value.

    Returns:
        A :class:`Trials` with the final test and train losses of every trial.

    Raises:
        ValueError: For a bad ``lr``, ``trials < 1``, a symbolic schedule, mismatched
            population/test shapes, or other bad options.
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
    record_every: int | None = None,
    diverge_above: float = 1e8,
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
            )  # fmt: skip
    s = _setup(
        loss_fn, theta0, population, schedule, lr, trials, test, seed, chunk, device, dtype,
        progress, record_every, diverge_above,
    )  # fmt: skip
    return _run(s, vectorized=True)


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
    record_every: int | None = None,
    diverge_above: float = 1e8,
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
    s = _setup(
        loss_fn, theta0, population, schedule, lr, trials, test, seed, chunk, device, dtype,
        progress, record_every, diverge_above,
    )  # fmt: skip
    return _run(s, vectorized=False)


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
    record_every: int | None = None,
    diverge_above: float = 1e8,
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
        record_every=record_every, diverge_above=diverge_above, distributed=False,
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
