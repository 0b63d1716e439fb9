r"""Brute-force oracles for SGD's expected loss as a power series in the learning rate.

These functions share no code with the perturbative engine. They know nothing about
diagrams, cumulants or re-summation: they unroll SGD with a symbolic learning rate η on a
tiny landscape with a finite population, enumerate every sample sequence, and average.

Setting
-------
The population is uniform over ``M`` rows; row ``i`` has loss :math:`l_i(θ)`, and the test
loss is :math:`l(θ) = \frac1M \sum_i l_i(θ)`. One SGD step with batch :math:`\mathcal B` of
size ``B`` is

.. math::  θ \leftarrow θ - \frac{η}{B} \sum_{n \in \mathcal B} \nabla l_n(θ).

Schedules:

* ``kind="online"``: ``T = steps`` steps, each with ``B`` fresh iid draws (with replacement)
  from the population; all :math:`M^{TB}` draw sequences are equally likely. The train loss
  is the mean of :math:`l_n(θ_T)` over the ``T·B`` drawn samples.
* ``kind="epochs"``: a training set :math:`x_0 … x_{N-1}` of ``N = train_size`` iid draws
  (all :math:`M^N` equally likely), ``E = epochs`` passes over it in batches of ``B``
  consecutive points, either in the order ``0 … N-1`` every epoch (``shuffle=False``) or
  in an independent uniform permutation per epoch (``shuffle=True``). ``T = E·N/B`` steps;
  the train loss is :math:`\frac1N \sum_n l_{x_n}(θ_T)`. Full-batch GD is ``B = N``.

Quantities: ``"test"`` :math:`= \mathbb E\, l(θ_T)`, ``"train"``, ``"gap"`` = test − train,
``"displacement"`` :math:`= \mathbb E(θ_T - θ_0)` (one series per coordinate). The
expectation is over the training set and the schedule's randomness.

Two oracles:

* :func:`oracle_series` — exact rational arithmetic for polynomial losses. Each
  coordinate of θ is a power series in η truncated at :math:`η^d`; since the coefficients of
  :math:`η^0 … η^d` of a product only depend on those of its factors, truncating after every
  operation is exact. The result is the exact list of coefficients of the expectation.
* :func:`unroll_taylor` — float64 autodiff for arbitrary smooth losses (e.g. small tanh
  networks). It unrolls SGD with η as a scalar tensor and takes nested derivatives
  :math:`\frac{1}{k!}\,\partial_η^k|_{η=0}` of the probability-weighted average.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import sympy
import torch

from .truncated import (
    Landscape,
    Point,
    check_int_at_least,
    iid_multisets,
    rational_list,
    to_fraction,
)

__all__ = [
    "KINDS",
    "QUANTITIES",
    "oracle_series",
    "unroll_taylor",
]

KINDS: tuple[str, ...] = ("online", "epochs")
"""Valid values of ``kind``."""

QUANTITIES: tuple[str, ...] = ("test", "train", "gap", "displacement")
"""Valid values of ``quantity``."""


# ----------------------------------------------------------------------------------------------
# Input checks (shared by both oracles)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schedule:
    kind: str
    quantity: str
    order: int
    steps: int
    batch_size: int
    train_size: int | None
    epochs: int
    shuffle: bool


def _check_schedule(
    *,
    kind: object,
    order: object,
    quantity: object,
    steps: object,
    batch_size: object,
    train_size: object,
    epochs: object,
    shuffle: object,
) -> _Schedule:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}; got {quantity!r}")
    order = check_int_at_least("order", order, 0)
    batch = check_int_at_least("batch_size", batch_size, 1)
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool; got {shuffle!r} ({type(shuffle).__name__})")
    if kind == "online":
        if steps is None:
            raise ValueError("kind='online' needs steps=T (the number of SGD steps); got None")
        n_steps = check_int_at_least("steps", steps, 1)
        if train_size is not None:
            raise ValueError(
                "train_size is only for kind='epochs' (online SGD draws fresh samples every "
                f"step); got train_size={train_size!r} with kind='online'"
            )
        if isinstance(epochs, bool) or epochs != 1:
            raise ValueError(f"epochs is only for kind='epochs'; got epochs={epochs!r}")
        if shuffle:
            raise ValueError("shuffle is only for kind='epochs'; got shuffle=True")
        return _Schedule("online", str(quantity), order, n_steps, batch, None, 1, False)
    if train_size is None:
        raise ValueError("kind='epochs' needs train_size=N (the training-set size); got None")
    n_train = check_int_at_least("train_size", train_size, 1)
    n_epochs = check_int_at_least("epochs", epochs, 1)
    if n_train % batch:
        raise ValueError(
            f"batch_size must divide train_size; got batch_size={batch}, train_size={n_train}"
        )
    n_steps = n_epochs * n_train // batch
    if steps is not None and (isinstance(steps, bool) or steps != n_steps):
        raise ValueError(
            "for kind='epochs' the number of steps is epochs*train_size/batch_size = "
            f"{n_steps}; got steps={steps!r} (leave it None)"
        )
    return _Schedule("epochs", str(quantity), order, n_steps, batch, n_train, n_epochs, shuffle)


# ----------------------------------------------------------------------------------------------
# Enumeration of batches without replacement (iid multisets: reference.truncated)
# ----------------------------------------------------------------------------------------------


def _subsets_without_replacement(
    remaining: tuple[int, ...], size: int
) -> list[tuple[tuple[int, ...], Fraction]]:
    """Row counts of a uniform random ``size``-subset of the positions left in an epoch.

    ``remaining[r]`` positions hold row ``r``; the probability of taking ``k[r]`` of each row
    is the multivariate hypergeometric ``prod_r C(remaining[r], k[r]) / C(sum remaining, size)``.
    """
    total = math.comb(sum(remaining), size)
    out = []
    for combo in itertools.combinations_with_replacement(range(len(remaining)), size):
        k = tuple(combo.count(r) for r in range(len(remaining)))
        if any(kr > rr for kr, rr in zip(k, remaining, strict=True)):
            continue
        ways = math.prod(math.comb(rr, kr) for kr, rr in zip(k, remaining, strict=True))
        out.append((k, Fraction(ways, total)))
    return out


def _counts(rows: Sequence[int], n_rows: int) -> tuple[int, ...]:
    return tuple(sum(1 for x in rows if x == r) for r in range(n_rows))


# ----------------------------------------------------------------------------------------------
# Exact oracle: SGD on truncated power series (reference.truncated) with Fraction coefficients
# ----------------------------------------------------------------------------------------------


def _online_states(
    land: Landscape, theta0: Point, sched: _Schedule, n_rows: int, track: bool
) -> dict[tuple[Point, tuple[int, ...]], Fraction]:
    """Final distribution over (θ_T, counts of the rows drawn) for online SGD."""
    batches = iid_multisets(n_rows, sched.batch_size)
    zero = (0,) * n_rows
    dist: dict[tuple[Point, tuple[int, ...]], Fraction] = {(theta0, zero): Fraction(1)}
    for _ in range(sched.steps):
        new: dict[tuple[Point, tuple[int, ...]], Fraction] = defaultdict(Fraction)
        for (theta, drawn), p in dist.items():
            for counts, q in batches:
                theta2 = land.step(theta, counts, sched.batch_size)
                drawn2 = tuple(a + b for a, b in zip(drawn, counts, strict=True)) if track else zero
                new[(theta2, drawn2)] += p * q
        dist = new
    return dist


def _epoch_states(
    land: Landscape, theta0: Point, sched: _Schedule, n_rows: int
) -> dict[tuple[Point, tuple[int, ...]], Fraction]:
    """Final distribution over (θ_T, row counts of the training set) for epoch schedules."""
    assert sched.train_size is not None
    n, b = sched.train_size, sched.batch_size
    final: dict[tuple[Point, tuple[int, ...]], Fraction] = defaultdict(Fraction)
    if not sched.shuffle:
        # Fixed order: the training set is an ordered sequence; the walk is deterministic.
        p = Fraction(1, n_rows**n)
        for xs in itertools.product(range(n_rows), repeat=n):
            theta = theta0
            for _ in range(sched.epochs):
                for start in range(0, n, b):
                    theta = land.step(theta, _counts(xs[start : start + b], n_rows), b)
            final[(theta, _counts(xs, n_rows))] += p
        return final
    # Shuffled: only the multiset of the training set matters. A uniform permutation per epoch
    # is the same as drawing each batch uniformly without replacement from what is left.
    dist: dict[tuple[Point, tuple[int, ...]], Fraction] = defaultdict(Fraction)
    for counts, p in iid_multisets(n_rows, n):
        dist[(theta0, counts)] += p
    for _ in range(sched.epochs):
        # state: (θ, training-set counts, counts left in this epoch)
        inner: dict[tuple[Point, tuple[int, ...], tuple[int, ...]], Fraction] = defaultdict(
            Fraction
        )
        for (theta, counts), p in dist.items():
            inner[(theta, counts, counts)] += p
        for _ in range(n // b):
            new: dict[tuple[Point, tuple[int, ...], tuple[int, ...]], Fraction] = defaultdict(
                Fraction
            )
            for (theta, counts, left), p in inner.items():
                for k, q in _subsets_without_replacement(left, b):
                    theta2 = land.step(theta, k, b)
                    left2 = tuple(a - c for a, c in zip(left, k, strict=True))
                    new[(theta2, counts, left2)] += p * q
            inner = new
        dist = defaultdict(Fraction)
        for (theta, counts, _left), p in inner.items():
            dist[(theta, counts)] += p
    final.update(dist)
    return final


def oracle_series(
    losses: Sequence[object],
    params: Sequence[sympy.Symbol],
    theta0: Sequence[object],
    *,
    kind: str,
    order: int,
    quantity: str = "test",
    steps: int | None = None,
    batch_size: int = 1,
    train_size: int | None = None,
    epochs: int = 1,
    shuffle: bool = False,
) -> list:
    r"""Exact η-series of an SGD expectation on a polynomial landscape, by enumeration.

    The population is uniform over the rows ``losses`` (:math:`l_i`, ``i < M``). SGD
    :math:`θ \leftarrow θ - \frac{η}{B}\sum_{n\in\text{batch}} \nabla l_n(θ)` is unrolled with
    every coordinate of θ a power series in η with exact rational coefficients, truncated at
    :math:`η^{order}` after every operation (which loses nothing up to that order). Every
    training set and every batch schedule is enumerated with its exact probability; identical
    intermediate states are merged. The result is

    .. math:: \mathbb E[Q(θ_T)] = \sum_{k=0}^{order} c_k η^k + O(η^{order+1}).

    Args:
        losses: The ``M >= 1`` rows of the population: sympy polynomials in ``params`` with
            rational coefficients.
        params: The parameter symbols (θ's coordinates), in order.
        theta0: Initial point, one rational (int, ``Fraction``, ``sympy.Rational``) per
            parameter. Floats are refused.
        kind: ``"online"`` (``steps`` steps of ``batch_size`` fresh iid draws each) or
            ``"epochs"`` (``epochs`` passes over a training set of ``train_size`` iid draws in
            batches of ``batch_size`` consecutive points, reshuffled each epoch if ``shuffle``).
        order: Highest power of η kept, ``>= 0``.
        quantity: ``"test"`` (:math:`\mathbb E\,\frac1M\sum_i l_i(θ_T)`), ``"train"`` (mean
            loss at θ_T over the samples drawn (online) or the training set (epochs)),
            ``"gap"`` (test − train) or ``"displacement"`` (:math:`\mathbb E(θ_T-θ_0)`).
        steps: Number of steps T; required for ``"online"``, implied for ``"epochs"``
            (``epochs * train_size / batch_size``).
        batch_size: B; must divide ``train_size`` for ``"epochs"`` (B = N is full-batch GD).
        train_size: N, for ``"epochs"`` only.
        epochs: E, for ``"epochs"`` only.
        shuffle: Fresh uniform permutation each epoch (``"epochs"`` only).

    Returns:
        ``[c_0, …, c_order]`` as ``sympy.Rational``; for ``"displacement"`` one such list per
        coordinate.

    Raises:
        ValueError: invalid ``kind``/``quantity``/schedule, no rows, wrong number of initial
            values, a loss that is not a polynomial with rational coefficients.
        TypeError: a non-integer count or a non-rational initial value.

    Example:
        :math:`l_x(θ) = θ^2/2 + xθ`, :math:`x \in \{-1, 1\}`, one online step from θ = 1:
        :math:`θ_1 = 1 - η(1+x)`, so :math:`\mathbb E\, θ_1^2/2 = \tfrac12 - η + η^2`.

        >>> import sympy
        >>> th = sympy.Symbol("theta")
        >>> rows = [th**2 / 2 - th, th**2 / 2 + th]
        >>> oracle_series(rows, [th], [1], kind="online", steps=1, order=3)
        [1/2, -1, 1, 0]
    """
    sched = _check_schedule(
        kind=kind,
        order=order,
        quantity=quantity,
        steps=steps,
        batch_size=batch_size,
        train_size=train_size,
        epochs=epochs,
        shuffle=shuffle,
    )
    losses = list(losses)
    params = list(params)
    if not losses:
        raise ValueError("losses must hold at least one row (the population); got none")
    if not params:
        raise ValueError("params must hold at least one sympy Symbol; got none")
    if len(set(params)) != len(params) or not all(isinstance(p, sympy.Symbol) for p in params):
        raise ValueError(f"params must be distinct sympy Symbols; got {params!r}")
    theta0 = list(theta0)
    if len(theta0) != len(params):
        raise ValueError(
            f"theta0 needs one value per parameter: {len(params)} parameters, got "
            f"{len(theta0)} values"
        )
    d = sched.order
    zeros = (Fraction(0),) * d
    start: Point = tuple((to_fraction(v, f"theta0[{i}]"), *zeros) for i, v in enumerate(theta0))
    land = Landscape(losses, params, d)
    m = len(losses)
    track = sched.quantity in ("train", "gap")
    if sched.kind == "online":
        final = _online_states(land, start, sched, m, track)
    else:
        final = _epoch_states(land, start, sched, m)

    if sched.quantity == "displacement":
        acc = [[Fraction(0)] * (d + 1) for _ in params]
        for (theta, _), p in final.items():
            for mu, coord in enumerate(theta):
                for k, c in enumerate(coord):
                    acc[mu][k] += p * (c - start[mu][k])
        return [rational_list(a) for a in acc]

    acc1 = [Fraction(0)] * (d + 1)
    for (theta, counts), p in final.items():
        row_losses = land.losses(theta)
        # Q(θ) = Σ_r w_r l_r(θ): test w_r = 1/M, train w_r = (count of row r)/(count of all).
        test_w = Fraction(1, m) if sched.quantity in ("test", "gap") else Fraction(0)
        sign = {"test": 0, "train": 1, "gap": -1}[sched.quantity]
        weights = [test_w + (sign * Fraction(c, sum(counts)) if sign else 0) for c in counts]
        for r, w in enumerate(weights):
            if w:
                for k, c in enumerate(row_losses[r]):
                    acc1[k] += p * w * c
    return rational_list(acc1)


# ----------------------------------------------------------------------------------------------
# Autodiff oracle: float64 unrolling with η a scalar tensor, nested derivatives at η = 0
# ----------------------------------------------------------------------------------------------


def _scenarios(
    sched: _Schedule, n_rows: int
) -> Iterator[tuple[tuple[tuple[int, ...], ...], tuple[int, ...], Fraction]]:
    """Yield (rows of each step's batch, rows of the train loss, probability)."""
    b = sched.batch_size
    if sched.kind == "online":
        batches = [
            (tuple(r for r in range(n_rows) for _ in range(c[r])), q)
            for c, q in iid_multisets(n_rows, b)
        ]
        for combo in itertools.product(batches, repeat=sched.steps):
            rows = tuple(batch for batch, _ in combo)
            drawn = tuple(sorted(itertools.chain.from_iterable(rows)))
            yield rows, drawn, math.prod((q for _, q in combo), start=Fraction(1))
        return
    assert sched.train_size is not None
    n = sched.train_size
    p_set = Fraction(1, n_rows**n)
    if not sched.shuffle:
        for xs in itertools.product(range(n_rows), repeat=n):
            one_epoch = tuple(tuple(sorted(xs[s : s + b])) for s in range(0, n, b))
            yield one_epoch * sched.epochs, tuple(sorted(xs)), p_set
        return
    perms = list(itertools.permutations(range(n)))
    p_perm = Fraction(1, len(perms) ** sched.epochs)
    for xs in itertools.product(range(n_rows), repeat=n):
        for schedule in itertools.product(perms, repeat=sched.epochs):
            rows = tuple(
                tuple(sorted(xs[perm[i]] for i in range(s, s + b)))
                for perm in schedule
                for s in range(0, n, b)
            )
            yield rows, tuple(sorted(xs)), p_set * p_perm


def _n_scenarios(sched: _Schedule, n_rows: int) -> int:
    if sched.kind == "online":
        return math.comb(n_rows + sched.batch_size - 1, sched.batch_size) ** sched.steps
    assert sched.train_size is not None
    count = n_rows**sched.train_size
    if sched.shuffle:
        count *= math.factorial(sched.train_size) ** sched.epochs
    return count


class _BatchedLoss:
    """Evaluate ``loss_fn`` row-wise on stacked (θ, x) pairs: vmap, else a Python loop."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.loss_fn = loss_fn
        self.use_vmap = True

    def __call__(self, thetas: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        if self.use_vmap:
            try:
                out = torch.func.vmap(self.loss_fn)(thetas, xs)
            except Exception:  # loss_fn not vmap-able (e.g. data-dependent control flow)
                self.use_vmap = False
            else:
                if out.shape != (thetas.shape[0],):
                    raise ValueError(
                        "loss_fn must return a scalar tensor; got per-row shape "
                        f"{tuple(out.shape[1:])}"
                    )
                return out
        outs = []
        for k in range(thetas.shape[0]):
            value = self.loss_fn(thetas[k], xs[k])
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor; got {value!r}")
            outs.append(value)
        return torch.stack(outs)


def _taylor(value: torch.Tensor, eta: torch.Tensor, order: int) -> list[float]:
    """Coefficients ``∂_η^k value / k!`` at the current η, k = 0 … order."""
    coeffs = [float(value.detach())]
    current = value
    for k in range(1, order + 1):
        if not current.requires_grad:
            coeffs.extend([0.0] * (order + 1 - k))
            break
        (current,) = torch.autograd.grad(
            current, eta, create_graph=k < order, retain_graph=True, allow_unused=True
        )
        if current is None:
            coeffs.extend([0.0] * (order + 1 - k))
            break
        coeffs.append(float(current.detach()) / math.factorial(k))
    return coeffs


def unroll_taylor(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    theta0: torch.Tensor,
    *,
    kind: str,
    order: int,
    quantity: str = "test",
    steps: int | None = None,
    batch_size: int = 1,
    train_size: int | None = None,
    epochs: int = 1,
    shuffle: bool = False,
    max_sequences: int = 20_000,
) -> list:
    r"""Taylor coefficients in η of an SGD expectation for any smooth loss, by autodiff.

    Same schedules and quantities as :func:`oracle_series`, for a loss given as a torch
    function. Every sample sequence is enumerated (sequences that give the same batches as
    multisets are merged, with their probabilities added); SGD is unrolled in float64 for all
    of them at once with η a scalar tensor at 0, and the probability-weighted mean
    :math:`F(η) = \mathbb E\,Q(θ_T)` is differentiated with nested
    ``torch.autograd.grad(..., create_graph=True)``:

    .. math:: c_k = \frac{1}{k!} \frac{d^k F}{dη^k}\Big|_{η=0}, \qquad k = 0 … order.

    The coefficients are exact up to float64 rounding. The cost grows quickly with ``order``
    (nested reverse mode) and with the number of sequences; meant for order ≤ 3 and a few
    thousand sequences.

    Args:
        loss_fn: ``loss_fn(params, x)``: loss of one row ``x`` of ``data`` at the 1-D float64
            parameter tensor ``params``; returns a scalar tensor. It is called through
            ``torch.func.vmap`` when possible, row by row otherwise.
        data: Tensor whose rows (first dimension) are the population, uniformly weighted.
        theta0: 1-D initial parameters.
        kind: ``"online"`` or ``"epochs"``, as in :func:`oracle_series`.
        order: Highest power of η, ``>= 0``.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        steps: T, for ``"online"`` (implied for ``"epochs"``).
        batch_size: B (must divide ``train_size`` for ``"epochs"``).
        train_size: N, for ``"epochs"``.
        epochs: E, for ``"epochs"``.
        shuffle: Fresh uniform permutation each epoch (``"epochs"`` only).
        max_sequences: Refuse schedules with more sample sequences than this (before merging).

    Returns:
        ``[c_0, …, c_order]`` as floats; for ``"displacement"`` one such list per coordinate.

    Raises:
        ValueError: invalid schedule or quantity, empty ``data``, ``theta0`` not 1-D, too
            many sequences, ``loss_fn`` not returning a scalar.
        TypeError: a non-integer count.

    Example:
        The landscape of :func:`oracle_series`'s example, :math:`l_x(θ) = θ^2/2 + xθ`,
        :math:`x \in \{-1, 1\}`:

        >>> import torch
        >>> def loss(p, x):
        ...     return 0.5 * p[0] ** 2 + x[0] * p[0]
        >>> data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
        >>> c = unroll_taylor(loss, data, torch.tensor([1.0]), kind="online", steps=1, order=3)
        >>> [round(v, 12) for v in c]
        [0.5, -1.0, 1.0, 0.0]
    """
    sched = _check_schedule(
        kind=kind,
        order=order,
        quantity=quantity,
        steps=steps,
        batch_size=batch_size,
        train_size=train_size,
        epochs=epochs,
        shuffle=shuffle,
    )
    if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] < 1:
        raise ValueError(
            "data must be a tensor with at least one row (the population); got "
            f"{data.shape if isinstance(data, torch.Tensor) else type(data).__name__}"
        )
    theta0 = torch.as_tensor(theta0)
    if theta0.dim() != 1 or theta0.shape[0] < 1:
        raise ValueError(f"theta0 must be a non-empty 1-D tensor; got shape {tuple(theta0.shape)}")
    limit = check_int_at_least("max_sequences", max_sequences, 1)
    m = data.shape[0]
    n_seq = _n_scenarios(sched, m)
    if n_seq > limit:
        raise ValueError(
            f"this schedule has {n_seq} sample sequences to enumerate, more than "
            f"max_sequences={limit}; use a smaller case or raise max_sequences"
        )

    merged: dict[tuple[tuple[tuple[int, ...], ...], tuple[int, ...]], Fraction] = defaultdict(
        Fraction
    )
    for rows, train_rows, p in _scenarios(sched, m):
        merged[(rows, train_rows)] += p
    keys = list(merged)
    s = len(keys)
    b = sched.batch_size
    weights = torch.tensor([float(merged[k]) for k in keys], dtype=torch.float64)
    step_rows = torch.tensor([k[0] for k in keys], dtype=torch.long)  # (S, T, B)
    train_rows = torch.tensor([k[1] for k in keys], dtype=torch.long)  # (S, L)

    data = data.detach().to(torch.float64)
    start = theta0.detach().to(torch.float64)
    n_params = start.shape[0]
    batched = _BatchedLoss(loss_fn)

    with torch.enable_grad():
        eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
        theta = start.expand(s, n_params).clone().requires_grad_(True)
        for t in range(sched.steps):
            xs = data[step_rows[:, t, :]]  # (S, B, ...)
            thetas = theta.unsqueeze(1).expand(s, b, n_params).reshape(s * b, n_params)
            values = batched(thetas, xs.reshape(s * b, *data.shape[1:]))
            if not values.requires_grad:  # loss constant in θ: no gradient, no move
                continue
            # Rows are independent, so the gradient of the sum w.r.t. the stacked θ is, row by
            # row, the batch's summed gradient Σ_n ∇l_n(θ_t).
            (grad,) = torch.autograd.grad(
                values.sum(), theta, create_graph=True, allow_unused=True, materialize_grads=True
            )
            theta = theta - (eta / b) * grad

        if sched.quantity == "displacement":
            return [
                _taylor((weights * (theta[:, mu] - start[mu])).sum(), eta, sched.order)
                for mu in range(n_params)
            ]

        def mean_loss(rows: torch.Tensor) -> torch.Tensor:
            width = rows.shape[1]
            thetas = theta.unsqueeze(1).expand(s, width, n_params).reshape(s * width, n_params)
            xs = data[rows].reshape(s * width, *data.shape[1:])
            return batched(thetas, xs).reshape(s, width).mean(dim=1)

        per_seq = torch.zeros(s, dtype=torch.float64)
        if sched.quantity in ("test", "gap"):
            per_seq = per_seq + mean_loss(torch.arange(m).expand(s, m))
        if sched.quantity == "train":
            per_seq = per_seq + mean_loss(train_rows)
        if sched.quantity == "gap":
            per_seq = per_seq - mean_loss(train_rows)
        return _taylor((weights * per_seq).sum(), eta, sched.order)
