r"""Exact expectations of SGD at a numeric learning rate, by enumerating every sample sequence.

Where :func:`~perturb.reference.oracle.oracle_series` gives the exact *series* in η (for
polynomial losses), :func:`expected_loss` gives the exact *value* at one η, for any smooth
per-row loss written in torch: it enumerates every training set and every batch order of a
schedule with its exact probability, runs plain SGD on each in float64, and averages. Its
only error is float64 rounding, so the distance of a perturbative prediction from it is the
truncation error of the prediction alone.

Setting (the conventions of :mod:`perturb.reference.oracle`)
------------------------------------------------------------
The population is uniform over ``M`` rows :math:`x_0 … x_{M-1}`; the test loss is
:math:`l(θ) = \frac1M \sum_i l_{x_i}(θ)`. One step on a batch :math:`\mathcal B` of ``B``
points is

.. math::  θ \leftarrow θ - \frac{η}{B} \sum_{n \in \mathcal B} \nabla l_n(θ).

A schedule (:func:`perturb.Online`, :func:`perturb.Epochs`, :func:`perturb.GD`) is ``E``
epochs of ``M_b`` batches of ``B`` points:

* online (one epoch): ``T`` steps, each on ``B`` fresh iid uniform draws (with
  replacement); the train loss is the mean of :math:`l_n(θ_T)` over the ``T·B`` draws;
* epochs: a training set of ``N = M_b·B`` iid uniform draws, walked ``E`` times in batches
  of ``B`` consecutive points, in the drawn order every epoch, or (``shuffle``) in a fresh
  uniform permutation each epoch; the train loss is :math:`\frac1N\sum_n l_{x_n}(θ_T)`;
* GD: ``M_b = 1``, ``B = N``, ``E = T``.

The result is :math:`\mathbb E\,Q(θ_T) = \sum_{\text{sequences } s} p_s\,Q_s(θ_T^{(s)})`,
the sum over every draw of the training set and every batch order, with
:math:`Q` = test loss, train loss, or their difference (``"gap"``).

Nothing here imports the rest of perturb beyond the argument checks: a schedule is read
through its attributes ``batches``, ``batch_size``, ``epochs`` and ``shuffle``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch

from perturb.checks import check_int, check_lr

from .truncated import iid_multisets

__all__ = ["MAX_SEQUENCES", "QUANTITIES", "count_sequences", "expected_loss"]

QUANTITIES: tuple[str, ...] = ("test", "train", "gap")
"""Valid values of ``quantity``."""

MAX_SEQUENCES = 1_000_000
"""Default refusal threshold on the number of sample sequences to enumerate."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_Key = tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]


def _sizes(schedule: object) -> tuple[int, int, int, bool]:
    """``(batches per epoch, batch size, epochs, shuffle)`` of a numeric schedule."""
    names = ("batches", "batch_size", "epochs", "shuffle")
    if not all(hasattr(schedule, n) for n in names):
        raise TypeError(
            "schedule must be a perturb Schedule (perturb.Online, perturb.Epochs or "
            f"perturb.GD), got {type(schedule).__name__}"
        )
    sizes = []
    for name in names[:3]:
        value = getattr(schedule, name)
        try:
            number = int(value)
        except TypeError:
            raise ValueError(
                f"expected_loss needs a numeric schedule, got {name}={value} (symbolic); "
                "e.g. Online(steps=3, batch_size=1)"
            ) from None
        if number != value or number < 1:
            raise ValueError(f"schedule {name} must be a positive integer, got {value!r}")
        sizes.append(number)
    return sizes[0], sizes[1], sizes[2], bool(schedule.shuffle)


def _arrangements(batches: int, batch_size: int) -> list[tuple[tuple[int, ...], ...]]:
    """The distinct ordered partitions of positions ``0..N-1`` into batches of ``B``.

    A uniform permutation of the training set gives each of them probability
    ``(B!)^{M_b} / N!``.
    """

    def split(left: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], ...]]:
        if not left:
            yield ()
            return
        for first in itertools.combinations(left, batch_size):
            rest = tuple(i for i in left if i not in first)
            for tail in split(rest):
                yield (first, *tail)

    return list(split(tuple(range(batches * batch_size))))


def count_sequences(schedule: object, n_rows: int) -> int:
    """Number of sample sequences :func:`expected_loss` enumerates (before merging).

    Online SGD: ``C(M+B-1, B)^T`` (each batch as a multiset of rows); epochs: ``M^N``
    training sets times ``(N! / (B!)^{M_b})^E`` batch orders when reshuffled.

    Args:
        schedule: a numeric :class:`~perturb.symbolic.schedules.Schedule`.
        n_rows: the population size ``M``.

    Returns:
        The count, an ``int``.

    Example:
        >>> from perturb.symbolic.schedules import Epochs, Online
        >>> count_sequences(Online(steps=4, batch_size=1), 3)
        81
        >>> count_sequences(Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True), 3)
        36
    """
    batches, batch_size, epochs, shuffle = _sizes(schedule)
    n_rows = check_int("n_rows", n_rows, minimum=1)
    if epochs == 1 and not shuffle:  # online: fresh draws every step
        return math.comb(n_rows + batch_size - 1, batch_size) ** batches
    n = batches * batch_size
    count = n_rows**n
    if shuffle and batches > 1:
        orders = math.factorial(n) // math.factorial(batch_size) ** batches
        count *= orders**epochs
    return count


def _scenarios(schedule: object, n_rows: int) -> dict[_Key, Fraction]:
    """Exact probability of each (rows of every step's batch, rows of the train loss)."""
    batches, b, epochs, shuffle = _sizes(schedule)
    merged: dict[_Key, Fraction] = defaultdict(Fraction)
    if epochs == 1 and not shuffle:
        draws = [
            (tuple(r for r in range(n_rows) for _ in range(c[r])), q)
            for c, q in iid_multisets(n_rows, b)
        ]
        for combo in itertools.product(draws, repeat=batches):
            rows = tuple(batch for batch, _ in combo)
            drawn = tuple(sorted(itertools.chain.from_iterable(rows)))
            merged[rows, drawn] += math.prod((q for _, q in combo), start=Fraction(1))
        return merged
    n = batches * b
    if shuffle:
        orders = _arrangements(batches, b)
    else:
        orders = [tuple(tuple(range(s, s + b)) for s in range(0, n, b))]
    p = Fraction(1, n_rows**n * len(orders) ** epochs)
    for xs in itertools.product(range(n_rows), repeat=n):
        train = tuple(sorted(xs))
        for walk in itertools.product(orders, repeat=epochs):
            rows = tuple(tuple(sorted(xs[i] for i in batch)) for order in walk for batch in order)
            merged[rows, train] += p
    return merged


def _row_values(loss_fn: LossFn, thetas: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``l_{x_k}(θ_k)`` for stacked pairs, by ``vmap`` (a Python loop if that fails)."""
    try:
        out = torch.func.vmap(loss_fn)(thetas, xs)
    except Exception:  # not vmap-able (e.g. data-dependent control flow)
        out = torch.stack([_scalar(loss_fn(t, x)) for t, x in zip(thetas, xs, strict=True)])
    if out.shape != (thetas.shape[0],):
        raise ValueError(
            f"loss_fn must return a scalar tensor; got per-row shape {tuple(out.shape[1:])}"
        )
    return out


def _scalar(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor; got {value!r}")
    return value


def _row_grads(loss_fn: LossFn, thetas: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``∇l_{x_k}(θ_k)`` for stacked pairs (rows independent: one backward of the sum)."""
    with torch.enable_grad():
        leaf = thetas.detach().requires_grad_(True)
        values = _row_values(loss_fn, leaf, xs)
        if not values.requires_grad:  # constant in θ
            return torch.zeros_like(leaf)
        (grads,) = torch.autograd.grad(values.sum(), leaf, materialize_grads=True)
    return grads.detach()


def expected_loss(
    loss_fn: LossFn,
    rows: torch.Tensor,
    theta0: torch.Tensor,
    schedule: object,
    *,
    lr: float,
    quantity: str = "test",
    max_sequences: int = MAX_SEQUENCES,
) -> float:
    r"""Exact :math:`\mathbb E\,Q(θ_T)` of SGD at learning rate η, every sequence enumerated.

    Every training set and batch order of ``schedule`` is enumerated with its exact
    probability :math:`p_s` (sequences giving the same batches, as multisets of rows, are
    merged); plain SGD :math:`θ_{t+1} = θ_t - \frac{η}{B}\sum_{n\in\mathcal B_t}\nabla
    l_n(θ_t)` runs on all of them at once in float64, and

    .. math:: \mathbb E\,Q(θ_T) = \sum_s p_s\, Q_s\big(θ_T^{(s)}\big),

    with :math:`Q` the test loss :math:`\frac1M\sum_i l_{x_i}`, the train loss (mean over
    the drawn training points, with multiplicity) or test − train. The only error is float64
    rounding; the conventions are those of :func:`~perturb.reference.oracle.oracle_series`.

    Args:
        loss_fn: ``loss_fn(params, x)``: the loss of one row ``x`` at the 1-D parameter
            tensor ``params``, a scalar tensor (called through ``torch.func.vmap`` when it
            can be, else row by row).
        rows: the population, uniformly weighted; a tensor whose first axis indexes rows.
        theta0: the initial parameters, 1-D.
        schedule: a numeric :func:`perturb.Online`, :func:`perturb.Epochs` or
            :func:`perturb.GD`.
        lr: η, a positive finite number.
        quantity: ``"test"``, ``"train"`` or ``"gap"`` (test − train).
        max_sequences: refuse schedules with more sample sequences than this
            (:func:`count_sequences`).

    Returns:
        The expectation, a float (``inf`` or ``nan`` if SGD diverges on some sequence).

    Raises:
        ValueError: a bad ``quantity``, ``lr``, symbolic schedule, empty ``rows``, ``theta0``
            not 1-D, too many sequences, or ``loss_fn`` not returning a scalar.
        TypeError: ``schedule`` is not a schedule or ``loss_fn`` not callable.

    Example:
        :math:`l_x(θ) = θ^2/2 + xθ`, :math:`x \in \{-1, 1\}`, one online step from θ = 1:
        :math:`θ_1 = 1 - η(1+x)`, so :math:`\mathbb E\,l(θ_1) = \tfrac12 - η + η^2`
        (0.41 at η = 0.1, the series of :func:`~perturb.reference.oracle.oracle_series`).

        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> loss = lambda p, x: 0.5 * p[0] ** 2 + x[0] * p[0]
        >>> rows = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
        >>> sched = Online(steps=1, batch_size=1)
        >>> round(expected_loss(loss, rows, torch.tensor([1.0]), sched, lr=0.1), 12)
        0.41
        >>> round(expected_loss(loss, rows, torch.tensor([1.0]), sched, lr=0.1,
        ...                     quantity="gap"), 12)  # the drawn row is fitted: test > train
        0.1
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    lr = check_lr(lr)
    limit = check_int("max_sequences", max_sequences, minimum=1)
    data = torch.as_tensor(rows, dtype=torch.float64)
    if data.ndim == 0 or data.shape[0] == 0:
        raise ValueError(f"rows must have at least one row, got shape {tuple(data.shape)}")
    start = torch.as_tensor(theta0, dtype=torch.float64).detach()
    if start.ndim != 1 or start.shape[0] == 0:
        raise ValueError(f"theta0 must be a non-empty 1-D tensor, got shape {tuple(start.shape)}")
    _, b, _, _ = _sizes(schedule)
    m = int(data.shape[0])
    n_seq = count_sequences(schedule, m)
    if n_seq > limit:
        raise ValueError(
            f"this schedule has {n_seq} sample sequences over {m} rows, more than "
            f"max_sequences={limit}; use fewer rows or steps, or raise max_sequences"
        )

    scenarios = _scenarios(schedule, m)
    keys = list(scenarios)
    s, p = len(keys), start.shape[0]
    weights = torch.tensor([float(scenarios[k]) for k in keys], dtype=torch.float64)
    step_rows = torch.tensor([k[0] for k in keys], dtype=torch.long)  # (S, T, B)
    train_rows = torch.tensor([k[1] for k in keys], dtype=torch.long)  # (S, L)

    theta = start.expand(s, p).clone()
    for t in range(step_rows.shape[1]):
        xs = data[step_rows[:, t, :].reshape(-1)]  # (S·B, ...)
        grads = _row_grads(loss_fn, theta.repeat_interleave(b, dim=0), xs)
        theta = theta - (lr / b) * grads.reshape(s, b, p).sum(dim=1)

    def mean_loss(which: torch.Tensor) -> torch.Tensor:
        width = which.shape[1]
        values = _row_values(
            loss_fn, theta.repeat_interleave(width, dim=0), data[which.reshape(-1)]
        )
        return values.detach().reshape(s, width).mean(dim=1)

    per_seq = torch.zeros(s, dtype=torch.float64)
    if quantity in ("test", "gap"):
        per_seq = per_seq + mean_loss(torch.arange(m).expand(s, m))
    if quantity == "train":
        per_seq = per_seq + mean_loss(train_rows)
    if quantity == "gap":
        per_seq = per_seq - mean_loss(train_rows)
    return math.fsum((weights * per_seq).tolist())
