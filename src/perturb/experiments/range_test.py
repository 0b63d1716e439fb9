r"""The learning-rate range test: what a practitioner's ``lr_find`` would pick, run for real.

The tool of fastai's ``lr_find`` and Lightning's ``Tuner.lr_find``, with Lightning's
defaults: one short SGD run from ``θ_0`` whose learning rate grows geometrically from
``min_lr`` to ``max_lr`` over ``steps`` steps,

.. math::  η_t = η_{\min} (η_{\max}/η_{\min})^{t/(S−1)},\qquad t = 0 … S−1,

recording the loss of each step's own batch before the step, smoothed by an
exponential moving average with bias correction (``β = 0.98``):
``a_t = βa_{t−1} + (1−β)l_t``, ``\bar l_t = a_t/(1 − β^{t+1})``.  The run stops early
once ``\bar l_t`` exceeds ``stop_factor`` times its smallest value so far, or a loss or
parameter is not finite.

**The pick** is Lightning's suggestion, the point of steepest descent of the smoothed
curve: drop the first ``skip_begin = 10`` and the last ``skip_end = 1`` points, take
``np.gradient`` of the rest (by index, i.e. by ``log η``: the rates are geometric) and
the learning rate at its most negative entry.  fastai's older ``lr_min/10`` (a tenth of
the rate at the smallest smoothed loss) is recorded beside it (:attr:`RangeTest.min_tenth`;
``perturb plan --check`` scores it at the noise scale's batch size).

**Cost**: ``s·B`` per-sample gradients for the ``s`` steps run, ``s·B/n``
full-batch gradients on a population of ``n`` rows (:attr:`RangeTest.cost`).

Example:
    >>> import torch
    >>> x = torch.linspace(-1, 1, 16)[:, None]
    >>> loss_fn = lambda th, x, y: 0.5 * ((x @ th[None] - y) ** 2).sum(1)
    >>> y = 2 * x + 0.3 * torch.cos(7 * x)  # a noisy fit: SGD has a loss floor
    >>> r = range_test(loss_fn, torch.zeros(1), (x, y), batch_size=4,
    ...                settings=RangeTestSettings(min_lr=1e-3, max_lr=100.0))
    >>> r.stopped_early, len(r.lrs), r.cost  # blew up at step 88 of 100: 88·4/16
    (True, 88, 22.0)
    >>> round(r.pick, 4), round(r.min_tenth, 3)
    (0.0115, 1.963)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from perturb.checks import check_int, check_positive

__all__ = ["RangeTest", "RangeTestSettings", "range_test"]

SMOOTHING = 0.98
"""``β`` of the exponential moving average of the batch losses (fastai, Lightning)."""
SKIP_BEGIN, SKIP_END = 10, 1
"""Points of the smoothed curve left out at its start and end before the steepest descent
is looked for (Lightning's ``suggestion(skip_begin=10, skip_end=1)``)."""


@dataclass(frozen=True, kw_only=True)
class RangeTestSettings:
    """How the range test runs (Lightning's ``lr_find`` defaults).

    Attributes:
        min_lr: the first learning rate.
        max_lr: the last one.
        steps: steps of the run (rates grow geometrically between the two).
        stop_factor: stop once the smoothed loss exceeds this times its minimum.

    Example:
        >>> RangeTestSettings().steps, RangeTestSettings().min_lr
        (100, 1e-08)
    """

    min_lr: float = 1e-8
    max_lr: float = 1.0
    steps: int = 100
    stop_factor: float = 4.0

    def __post_init__(self) -> None:
        check_positive("range test min_lr", self.min_lr)
        check_positive("range test max_lr", self.max_lr)
        if not self.max_lr > self.min_lr:
            raise ValueError(
                f"range test max_lr must exceed min_lr, got {self.max_lr!r} ≤ {self.min_lr!r}"
            )
        check_int("range test steps", self.steps, minimum=SKIP_BEGIN + SKIP_END + 2)
        check_positive("range test stop_factor", self.stop_factor)


@dataclass(frozen=True)
class RangeTest:
    """One range test's curve and pick.

    Attributes:
        batch_size: ``B``.
        lrs: the learning rate of each step run, ``(s,)``.
        losses: each step's batch loss, ``(s,)``.
        smoothed: the bias-corrected moving average, ``(s,)``.
        pick: the learning rate of steepest smoothed descent (``nan`` when the run
            stopped before ``skip_begin + skip_end + 2`` points).
        min_tenth: a tenth of the learning rate at the smallest smoothed loss.
        stopped_early: the run stopped before its last step (the loss blew up).
        cost: full-batch gradient equivalents spent, ``s·B/n``.
    """

    batch_size: int
    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    pick: float
    min_tenth: float
    stopped_early: bool
    cost: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the pick, the alternative, the steps run and the cost.

        Example:
            >>> r = RangeTest(2, np.ones(3), np.ones(3), np.ones(3), 0.1, 0.01, False, 1.5)
            >>> r.to_dict()["pick"], r.to_dict()["steps_run"]
            (0.1, 3)
        """
        return {
            "batch_size": self.batch_size,
            "pick": self.pick if math.isfinite(self.pick) else None,
            "min_tenth": self.min_tenth if math.isfinite(self.min_tenth) else None,
            "steps_run": len(self.lrs),
            "stopped_early": self.stopped_early,
            "cost": self.cost,
        }


def steepest(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """Lightning's suggestion: the rate at the most negative ``np.gradient`` of the
    smoothed losses, the first :data:`SKIP_BEGIN` and last :data:`SKIP_END` left out
    (``nan`` with fewer than two finite points left).

    Example:
        >>> lrs = np.geomspace(1e-3, 1, 14)
        >>> steepest(lrs, np.r_[[5.0] * 10, 4.0, 2.0, 1.9, 9.0]) == float(lrs[10])  # 4 → 2
        True
    """
    lrs, losses = np.asarray(lrs, float), np.asarray(smoothed, float)
    keep = slice(SKIP_BEGIN, len(losses) - SKIP_END)
    lrs, losses = lrs[keep], losses[keep]
    finite = np.isfinite(losses)
    if finite.sum() < 2:
        return math.nan
    lrs, losses = lrs[finite], losses[finite]
    return float(lrs[int(np.argmin(np.gradient(losses)))])


def range_test(
    loss_fn: Callable[..., torch.Tensor],
    theta0: torch.Tensor,
    data: tuple[torch.Tensor, ...],
    *,
    batch_size: int,
    settings: RangeTestSettings | None = None,
    seed: int = 0,
) -> RangeTest:
    """Run the range test of the module notes at batch size ``B`` from ``θ_0``.

    Args:
        loss_fn: per-sample losses ``loss_fn(θ, *rows) -> (b,)``.
        theta0: the start, flat.
        data: the population's rows (tensors with a common first axis); batches of
            ``B`` are drawn from them uniformly with replacement.
        batch_size: ``B``.
        settings: the run (default :class:`RangeTestSettings`).
        seed: seed of the batches.

    Returns:
        A :class:`RangeTest`.

    Raises:
        ValueError: a batch size below one, or empty data.

    Example:
        >>> import torch
        >>> x = torch.linspace(-1, 1, 8)[:, None]
        >>> f = lambda th, x, y: 0.5 * ((x @ th[None] - y) ** 2).sum(1)
        >>> float(range_test(f, torch.zeros(1), (x, x), batch_size=2).lrs[0])
        1e-08
    """
    settings = RangeTestSettings() if settings is None else settings
    batch = check_int("batch_size", batch_size, minimum=1)
    n = int(data[0].shape[0]) if data else 0
    if n == 0:
        raise ValueError("range test data must hold at least one row, got none")
    gen = torch.Generator().manual_seed(int(seed))
    steps = settings.steps
    rates = settings.min_lr * (settings.max_lr / settings.min_lr) ** (
        np.arange(steps) / (steps - 1)
    )

    def mean_loss(theta: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        return loss_fn(theta, *rows).mean()

    step = torch.func.grad_and_value(mean_loss)
    theta = theta0.detach().clone()
    losses, smoothed = [], []
    average, best, stopped = 0.0, math.inf, False
    for t, eta in enumerate(rates):
        idx = torch.randint(n, (batch,), generator=gen).to(data[0].device)
        grad, loss = step(theta, *(r[idx] for r in data))
        value = float(loss)
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smooth = average / (1 - SMOOTHING ** (t + 1))
        losses.append(value)
        smoothed.append(smooth)
        theta = theta - float(eta) * grad
        best = min(best, smooth)
        blown = not (math.isfinite(smooth) and bool(torch.isfinite(theta).all()))
        if blown or (t > 0 and smooth > settings.stop_factor * best):
            stopped = t < steps - 1
            break
    run = len(losses)
    lrs, smooth_arr = rates[:run], np.array(smoothed)
    finite = np.isfinite(smooth_arr)
    low = (
        float(lrs[int(np.nanargmin(np.where(finite, smooth_arr, np.nan)))])
        if finite.any()
        else math.nan
    )
    return RangeTest(
        batch_size=batch,
        lrs=lrs,
        losses=np.array(losses),
        smoothed=smooth_arr,
        pick=steepest(lrs, smooth_arr),
        min_tenth=low / 10,
        stopped_early=stopped,
        cost=run * batch / n,
    )
