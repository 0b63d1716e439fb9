"""Numeric predictions: a series evaluated on a population at ``θ_0``.

``predict`` assembles the η-series of a quantity for a schedule
(:func:`perturb.symbolic.series.series`) and evaluates every contraction on a
:class:`~perturb.numeric.population.Population`, returning a
:class:`~perturb.numeric.predictions.Prediction` (both re-exported here).  With
``exact=True`` the expectations are exact averages over the population's rows, computed
in float64 from materialized derivative tensors (:mod:`perturb.reference.tensors`), which
suits models with a few dozen parameters.

Every prediction carries its trust (:attr:`Prediction.trust`), assessed when first read
by the one computation ``Statistics.trust``, ``perturb predict``, ``validate`` and
``compare`` use (:func:`perturb.numeric.trust.assess`), on the population's statistics
measured exactly through order ``max(d, TRUST_ORDER)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from perturb.checks import check_int, check_lr, check_order
from perturb.numeric.population import Population
from perturb.numeric.predictions import UNSTABLE_GROWTH, Prediction, warn_if_unstable
from perturb.numeric.resummation import resummed_by_quantity
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import QUANTITIES, series

__all__ = ["METHODS", "TRUST_HIGHER_RANK", "TRUST_ORDER", "Population", "Prediction", "predict"]

METHODS = ("eigh", "lanczos")
TRUST_ORDER = 3
"""The statistics behind an order-``d`` prediction's trust are measured through order
``max(d, TRUST_ORDER)`` (edges, re-summed): what ``validate`` and ``compare`` measure by
default, so the error estimate reads the same measured terms beyond ``d`` as theirs."""
TRUST_HIGHER_RANK = 32
"""Re-summed, the per-sample Hessians and third derivatives behind a prediction's trust are
projected on at most this many Krylov vectors (``perturb predict``'s and ``compare``'s
default ``--krylov-higher-rank``): on ``m`` of them the mean-square check's dense map has
``(m(m+1)/2)²`` entries (:func:`perturb.numeric.stability.mean_square_rate`)."""


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
    trials: int = 1,
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
        trials: the number of SGD runs whose mean the prediction will be read against,
            for its :attr:`~Prediction.trust` (``1``: one run, as ``Statistics.trust``).

    Returns:
        A :class:`Prediction`; ``by_order[d]`` is the ``η^d`` contribution.  A re-summed
        one along directions where ``|1 − ηh| > 1`` (a negative eigenvalue of ``H``, or
        ``ηh > 2``) has :attr:`~Prediction.unstable` set, :attr:`~Prediction.growth` the
        log of the factor by which ``K^T`` grows, and warns
        (:class:`~perturb.numeric.predictions.UnstableDirectionWarning`).

        Its :attr:`~Prediction.trust`, computed when first read, is
        :meth:`perturb.Statistics.trust` (:func:`perturb.numeric.trust.assess`, the
        computation of ``perturb predict``, ``validate`` and ``compare``) of this
        population's statistics measured exactly (:func:`perturb.measure` with
        ``exact=True``) through order ``max(order, TRUST_ORDER)``, so that its error
        estimate reads the terms measured beyond ``order``, as ``compare``'s do for its
        default orders.  Re-summed, the statistics are in a Krylov subspace of rank ``P``
        (the whole space: the eigendecomposition's values; ``method="lanczos"``: the same
        rank-``rank`` subspace), the per-sample Hessians and third derivatives on its
        first ``min(rank, TRUST_HIGHER_RANK)`` vectors (so with more than 32 parameters,
        or a Lanczos rank above 32, its value may differ from :attr:`~Prediction.total`
        by what the 3-edge diagrams lose on 32 vectors).  The overshoot check reads
        every sample's ``λ_max(H_i)``: exact from the materialized per-sample Hessians
        (Lanczos: by power iteration,
        :func:`perturb.numeric.stability.per_sample_top_curvatures`).  The trust is
        ``None`` for ``quantity="displacement"`` (a vector: the rule judges a scalar
        loss) and with ``integral=True`` (the estimate is of the exact sums over steps,
        not of Remark 2's integrals).

    Raises:
        TypeError, ValueError: bad arguments (``trials`` below one included), checked
            here; reading :attr:`~Prediction.trust` may raise what
            :func:`perturb.measure` raises (a
            :class:`~perturb.errors.BudgetError` for statistics estimated over a minute
            of work).

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> pop = Population(lambda p, x: ((p - x) ** 2).sum() / 2, torch.eye(2))
        >>> p = predict(pop, torch.zeros(2), Online(steps=2, batch_size=1), lr=0.1, order=2)
        >>> round(p.total, 6)
        0.42
        >>> p.trust.trusted, p.trust.trusted_steps
        (array([ True]), array([2]))
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
    trials = check_int("trials", trials, minimum=1)
    theta0 = torch.as_tensor(theta0, dtype=torch.float64)
    assessor = _Assessor(
        population=population, theta0=theta0, schedule=schedule, order=order,
        quantity=quantity, resummed=resummed, integral=integral,
        rank=rank if method == "lanczos" else None, probes=probes, seed=seed, trials=trials,
    )  # fmt: skip
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
        pred = subspace.predict(schedule, lr=lr, quantity=quantity, order=order, integral=integral)
        return replace(pred, assessor=assessor)
    derivs = population.derivatives(theta0, max(order, 2))
    assessor = replace(assessor, hessians=derivs[2])
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
            assessor=assessor,
        )
    s = series(order, schedule, quantity)
    coefficients = tuple(s.evaluate(derivs, lr=1))
    values = tuple(c * lr**d for d, c in enumerate(coefficients))
    return Prediction(
        quantity=quantity, lr=lr, values=values, series=s, coefficients=coefficients,
        assessor=assessor,
    )  # fmt: skip


@dataclass(frozen=True)
class _Assessor:
    """What :attr:`Prediction.trust` is assessed from: the prediction's population, point
    and options (:func:`predict` documents the computation); called with the rate."""

    population: Population
    theta0: torch.Tensor
    schedule: Schedule
    order: int
    quantity: str
    resummed: bool
    integral: bool
    rank: int | None  # Lanczos: the subspace's rank; None: the whole space
    probes: int
    seed: int
    trials: int
    hessians: torch.Tensor | None = None  # the materialized H_i, (n, P, P)

    def __call__(self, lr: float):
        if self.quantity == "displacement" or self.integral:
            return None
        from perturb.numeric.measuring import measure
        from perturb.numeric.stability import per_sample_top_curvatures

        top = max(self.order, TRUST_ORDER)
        krylov = {}
        if self.resummed:
            rank = int(self.theta0.numel()) if self.rank is None else self.rank
            krylov = {"resummed": True, "rank": rank, "probes": self.probes,
                      "higher_rank": min(rank, TRUST_HIGHER_RANK)}  # fmt: skip
        stats = measure(
            self.population, None, self.theta0, order=top, schedules=[self.schedule],
            quantities=(self.quantity,), exact=True, seed=self.seed, progress=False, **krylov,
        )  # fmt: skip
        if self.hessians is None:
            _, curvatures = per_sample_top_curvatures(self.population, None, self.theta0)
        else:
            curvatures = torch.linalg.eigvalsh(self.hessians)[:, -1].cpu().numpy()
        return stats.trust(
            self.schedule, lr=[lr], quantity=self.quantity, order=self.order,
            resummed=self.resummed, trials=self.trials,
            sample_curvatures=np.asarray(curvatures, dtype=float),
        )  # fmt: skip
