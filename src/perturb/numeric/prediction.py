"""Numeric predictions: a series evaluated on a population at ``θ_0``.

``predict`` assembles the η-series of a quantity for a schedule
(:func:`perturb.symbolic.series.series`) and evaluates every contraction on a
:class:`Population`.  With ``exact=True`` the expectations are exact averages over
the population's rows, computed in float64 from materialized derivative tensors
(:mod:`perturb.reference.tensors`), which suits models with a few dozen
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from perturb.checks import check_lr
from perturb.numeric.resummation import resummed_by_quantity
from perturb.reference.tensors import derivative_tensors
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import QUANTITIES, Series, series

__all__ = ["METHODS", "Population", "Prediction", "predict"]

METHODS = ("eigh", "lanczos")


@dataclass(frozen=True)
class Population:
    """A finite population: a per-sample loss and its rows, uniformly weighted.

    Attributes:
        loss_fn: ``loss_fn(params, x) -> scalar tensor`` for parameters ``params`` (a
            1-D tensor) and one row ``x`` of ``data``.
        data: the rows, shape ``(n, ...)``.

    Example:
        >>> import torch
        >>> pop = Population(lambda p, x: ((p - x) ** 2).sum() / 2, torch.eye(2))
        >>> len(pop)
        2
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: torch.Tensor

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        data = torch.as_tensor(self.data)
        if data.ndim == 0 or data.shape[0] == 0:
            raise ValueError(f"data must have at least one row, got shape {tuple(data.shape)}")
        object.__setattr__(self, "data", data)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def derivatives(self, theta0: torch.Tensor, max_order: int) -> dict[int, torch.Tensor]:
        """Materialized per-sample ``∇^k l_x(θ_0)``, ``k = 0..max_order``, float64."""
        return derivative_tensors(self.loss_fn, self.data, theta0, max_order)


@dataclass(frozen=True)
class Prediction:
    """A prediction, split by order (power of η, or edges of re-summed diagrams).

    Attributes:
        quantity: what was predicted.
        lr: the learning rate.
        values: the contribution of each order at ``lr``.
        series: the un-resummed series (``None`` when re-summed).
        coefficients: the numeric coefficient of each ``η^d`` (un-resummed only;
            independent of ``lr``, so :meth:`at` costs nothing).
        resummed: whether edges carry ``η(I − ηH)^{Δt−1}``.
        rank: ``k`` for a Krylov (Lanczos) prediction, else ``None``.
        coarse_values: a Krylov prediction's values from the first ``⌊k/2⌋`` basis
            vectors (the basis is nested), whence :attr:`error`.
        cost: a Krylov prediction's network evaluations and seconds
            (:attr:`perturb.numeric.krylov.KrylovSubspace.cost`).

    Example:
        >>> import torch
        >>> pop = Population(lambda p, x: ((p - x) ** 2).sum() / 2, torch.eye(2))
        >>> from perturb.symbolic.schedules import Online
        >>> pred = predict(pop, torch.zeros(2), Online(steps=3, batch_size=1), lr=0.1, order=1)
        >>> [round(v, 6) for v in pred.by_order]
        [0.5, -0.15]
    """

    quantity: str
    lr: float
    values: tuple
    series: Series | None = None
    coefficients: tuple | None = None
    resummed: bool = False
    rank: int | None = None
    coarse_values: tuple | None = None
    cost: Mapping[str, float] | None = None

    @property
    def error(self) -> list | None:
        """``|value(k) − value(k/2)|`` of each order (Krylov predictions), else ``None``."""
        if self.coarse_values is None:
            return None
        return [abs(_plain(a - b)) for a, b in zip(self.values, self.coarse_values, strict=True)]

    @property
    def total_error(self):
        """``|total(k) − total(k/2)|`` (Krylov predictions), else ``None``."""
        if self.coarse_values is None:
            return None
        return abs(_plain(sum(self.values) - sum(self.coarse_values)))

    @property
    def by_order(self) -> list:
        """The contribution of each order ``0..d``: floats (vectors for displacement)."""
        return [_plain(v) for v in self.values]

    @property
    def total(self):
        """The sum of :attr:`by_order`: the prediction truncated at order ``d``."""
        return _plain(sum(self.values))

    def at(self, lr: float) -> Prediction:
        """The same un-resummed prediction at another learning rate (no re-evaluation)."""
        if self.coefficients is None:
            raise ValueError("a re-summed prediction depends on lr non-polynomially; call predict")
        lr = check_lr(lr)
        values = tuple(c * lr**d for d, c in enumerate(self.coefficients))
        return Prediction(
            quantity=self.quantity,
            lr=lr,
            values=values,
            series=self.series,
            coefficients=self.coefficients,
        )


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return value if isinstance(value, np.ndarray) else float(value)


def predict(
    population: Population,
    theta0: torch.Tensor,
    schedule: Schedule,
    *,
    lr: float,
    order: int,
    quantity: str = "test",
    exact: bool = True,
    resummed: bool = False,
    integral: bool = False,
    method: str = "eigh",
    rank: int | None = None,
    probes: int = 8,
    seed: int = 0,
) -> Prediction:
    """Predict SGD's expected ``quantity`` after ``schedule`` from ``θ_0``.

    Args:
        population: the data distribution (uniform over its rows).
        theta0: initial parameters, 1-D.
        schedule: a numeric schedule (:func:`perturb.Online`, :func:`perturb.Epochs`, …).
        lr: learning rate η.
        order: highest power of η kept.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        exact: use exact population expectations (materialized tensors, float64).
            For sampled estimates with error bars use :func:`perturb.measure`;
            ``False`` raises and says so.
        resummed: re-summed diagrams, edges carrying ``η(I − ηH)^{Δt−1}``
            (:mod:`perturb.symbolic.resummed`; online SGD and GD), exact through a full
            eigendecomposition of ``H``; ``order`` then counts edges.
        integral: with ``resummed``, Remark 2's integrals of exponentials in place of
            the exact sums over steps (relative error ``O(η)`` at fixed ``ηT``).
        method: with ``resummed``, ``"eigh"`` (full eigendecomposition of the ``P×P``
            mean Hessian from materialized tensors; small models) or ``"lanczos"``
            (Rayleigh–Ritz in a rank-``rank`` block-Krylov subspace built from
            Hessian-vector products, :func:`perturb.numeric.krylov.krylov_subspace`; real
            networks).  The Lanczos prediction carries an error estimate
            (:attr:`Prediction.error`) and its cost (:attr:`Prediction.cost`).
        rank: the subspace dimension ``k`` (``method="lanczos"`` only, required there).
        probes: random centred-gradient combinations in the starting block (Lanczos).
        seed: seed of the probes (Lanczos).

    Returns:
        A :class:`Prediction`; ``by_order[d]`` is the ``η^d`` contribution.

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> pop = Population(lambda p, x: ((p - x) ** 2).sum() / 2, torch.eye(2))
        >>> p = predict(pop, torch.zeros(2), Online(steps=2, batch_size=1), lr=0.1, order=2)
        >>> round(p.total, 6)
        0.42
    """
    if not isinstance(population, Population):
        raise TypeError(f"population must be a Population, got {type(population).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if not schedule.is_numeric:
        raise ValueError(
            "predict needs numeric schedule sizes, got a symbolic schedule; "
            "e.g. Online(steps=100, batch_size=1)"
        )
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if not exact:
        raise ValueError(
            "predict(exact=False) is not the path for sampled estimates: use "
            "perturb.measure(model_or_loss, data, order=..., exact=False) and "
            "Statistics.predict(schedule, lr=...), which report standard errors"
        )
    if integral and not resummed:
        raise ValueError("integral=True applies to re-summed predictions; pass resummed=True")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lanczos" and not resummed:
        raise ValueError("method='lanczos' applies to re-summed predictions; pass resummed=True")
    if (rank is None) == (method == "lanczos"):
        raise ValueError(
            "rank is required with method='lanczos' and only applies there; got "
            f"method={method!r}, rank={rank!r}"
        )
    lr = check_lr(lr)
    theta0 = torch.as_tensor(theta0, dtype=torch.float64)
    if method == "lanczos":
        from perturb.numeric.krylov import krylov_subspace

        subspace = krylov_subspace(
            population,
            None,
            theta0,
            rank=rank,
            order=max(order, 1),
            quantities=(quantity,),
            schedules=(schedule,),
            probes=probes,
            seed=seed,
        )
        return subspace.predict(schedule, lr=lr, quantity=quantity, order=order, integral=integral)
    derivs = population.derivatives(theta0, max(order, 2))
    if resummed:
        values = resummed_by_quantity(
            derivs, schedule, quantity, order=order, lr=lr, integral=integral
        )
        return Prediction(quantity=quantity, lr=lr, values=tuple(values), resummed=True)
    s = series(order, schedule, quantity)
    coefficients = tuple(s.evaluate(derivs, lr=1))
    values = tuple(c * lr**d for d, c in enumerate(coefficients))
    return Prediction(quantity=quantity, lr=lr, values=values, series=s, coefficients=coefficients)
