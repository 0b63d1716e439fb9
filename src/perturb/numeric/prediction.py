"""Numeric predictions: a series evaluated on a population at ``θ_0``.

``predict`` assembles the η-series of a quantity for a schedule
(:func:`perturb.symbolic.series.series`) and evaluates every contraction on a
:class:`~perturb.numeric.population.Population`, returning a
:class:`~perturb.numeric.predictions.Prediction` (both re-exported here).  With
``exact=True`` the expectations are exact averages over the population's rows, computed
in float64 from materialized derivative tensors (:mod:`perturb.reference.tensors`), which
suits models with a few dozen parameters.
"""

from __future__ import annotations

import torch

from perturb.checks import check_lr, check_order
from perturb.numeric.population import Population
from perturb.numeric.predictions import UNSTABLE_GROWTH, Prediction, warn_if_unstable
from perturb.numeric.resummation import resummed_by_quantity
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import QUANTITIES, series

__all__ = ["METHODS", "Population", "Prediction", "predict"]

METHODS = ("eigh", "lanczos")


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
        A :class:`Prediction`; ``by_order[d]`` is the ``η^d`` contribution.  A re-summed
        one along directions where ``|1 − ηh| > 1`` (a negative eigenvalue of ``H``, or
        ``ηh > 2``) has :attr:`~Prediction.unstable` set, :attr:`~Prediction.growth` the
        log of the factor by which ``K^T`` grows, and warns
        (:class:`~perturb.numeric.predictions.UnstableDirectionWarning`).

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
    order = check_order(order)
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
        eigh = torch.linalg.eigh(derivs[2].mean(0))
        growth = warn_if_unstable(eigh[0], lr, int(schedule.steps), integral=integral, stacklevel=3)
        values = resummed_by_quantity(
            derivs, schedule, quantity, order=order, lr=lr, integral=integral, eigh=eigh,
            warn=False,
        )  # fmt: skip
        return Prediction(
            quantity=quantity,
            lr=lr,
            values=tuple(values),
            resummed=True,
            unstable=growth > UNSTABLE_GROWTH,
            growth=growth,
        )
    s = series(order, schedule, quantity)
    coefficients = tuple(s.evaluate(derivs, lr=1))
    values = tuple(c * lr**d for d, c in enumerate(coefficients))
    return Prediction(quantity=quantity, lr=lr, values=values, series=s, coefficients=coefficients)
