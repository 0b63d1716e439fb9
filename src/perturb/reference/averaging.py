r"""Brute-force η-series of the test loss at a *weighted average of SGD iterates*.

Like :func:`perturb.reference.oracle_series` (whose landscape arithmetic it reuses: exact
rational power series in η, truncated after every operation), but for online SGD with a
*per-step* learning rate :math:`η\,α_t` and a loss read at the average
:math:`\bar θ = \sum_{t=0}^{T} w_t θ_t` of the iterates instead of at :math:`θ_T`:

.. math::  θ_{t+1} = θ_t - \frac{η α_t}{B} \sum_{n \in \mathcal B_t} \nabla l_n(θ_t),
           \qquad \mathbb E\, l\Big(\sum_t w_t θ_t\Big) = \sum_{k \le d} c_k η^k + O(η^{d+1}).

Every sequence of batches (``B`` iid uniform draws from the ``M`` rows per step) is
enumerated with its exact probability; identical (iterate, running average) states are
merged.  Weights ``w = (0, …, 0, 1)`` and rates ``α = 1`` give back ``oracle_series``
with ``kind="online"``.  Nothing here knows about diagrams or schedules' equivalences.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction

import sympy

from .truncated import (
    Landscape,
    Point,
    check_int_at_least,
    iid_multisets,
    rational_list,
    to_fraction,
)

__all__ = ["averaged_oracle_series"]


def _add_scaled(acc: Point, theta: Point, w: Fraction) -> Point:
    return tuple(
        tuple(a + w * t for a, t in zip(ac, tc, strict=True))
        for ac, tc in zip(acc, theta, strict=True)
    )


def _step(land: Landscape, theta: Point, counts: tuple[int, ...], rate: Fraction, b: int):
    """θ − (η·rate/B) Σ_r k_r ∇l_r(θ) on truncated series."""
    grads = land.grads(theta)
    scale = rate / b
    out = []
    for mu, coord in enumerate(theta):
        new = list(coord)
        for r, k in enumerate(counts):
            if k:
                g = grads[r][mu]
                for j in range(land.order):
                    if g[j]:
                        new[j + 1] -= scale * k * g[j]
        out.append(tuple(new))
    return tuple(out)


def averaged_oracle_series(
    losses: Sequence[object],
    params: Sequence[sympy.Symbol],
    theta0: Sequence[object],
    *,
    rates: Sequence[object],
    weights: Sequence[object],
    order: int,
    batch_size: int = 1,
) -> list:
    r"""Exact η-series of :math:`\mathbb E\, l(\sum_t w_t θ_t)` for online SGD with rates ``ηα_t``.

    Args:
        losses: the ``M ≥ 1`` rows of the population, sympy polynomials in ``params`` with
            rational coefficients; the test loss is their mean.
        params: the parameter symbols.
        theta0: the initial point (rationals).
        rates: ``α_0 … α_{T-1}`` (rationals): step ``t`` uses learning rate ``η α_t``.
        weights: ``w_0 … w_T`` (rationals), one per iterate ``θ_0 … θ_T``; they need not sum
            to one (the loss is read at ``Σ_t w_t θ_t``).
        order: the highest power of η kept.
        batch_size: ``B``, iid draws per step.

    Returns:
        ``[c_0, …, c_order]`` as ``sympy.Rational``.

    Raises:
        ValueError: ``len(weights) != len(rates) + 1``, no steps, or an invalid landscape.
        TypeError: non-rational rates, weights or initial values.

    Example:
        Two-point average of one step on :math:`l_x = θ^2/2 + xθ`, :math:`x = ±1`, from
        θ = 1: :math:`\bar θ = 1 - \frac{η}{2}(1 + x)`, so
        :math:`\mathbb E\,\bar θ^2/2 = \frac12 - \frac{η}2 + \frac{η^2}4`.

        >>> import sympy
        >>> th = sympy.Symbol("theta")
        >>> rows = [th**2 / 2 - th, th**2 / 2 + th]
        >>> half = sympy.Rational(1, 2)
        >>> averaged_oracle_series(rows, [th], [1], rates=[1], weights=[half, half], order=2)
        [1/2, -1/2, 1/4]
    """
    order = check_int_at_least("order", order, 0)
    b = check_int_at_least("batch_size", batch_size, 1)
    if not losses:
        raise ValueError("losses must hold at least one row; got none")
    if len(theta0) != len(params):
        raise ValueError(f"theta0 has {len(theta0)} values for {len(params)} parameters")
    alphas = [to_fraction(a, f"rates[{i}]") for i, a in enumerate(rates)]
    ws = [to_fraction(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not alphas:
        raise ValueError("rates must hold one multiplier per step; got none")
    if len(ws) != len(alphas) + 1:
        raise ValueError(
            f"weights must have len(rates) + 1 = {len(alphas) + 1} entries (one per iterate "
            f"θ_0 … θ_T); got {len(ws)}"
        )
    land = Landscape(losses, params, order)
    zero = (Fraction(0),) * order
    start: Point = tuple((to_fraction(v, f"theta0[{i}]"), *zero) for i, v in enumerate(theta0))
    nothing: Point = tuple((Fraction(0),) * (order + 1) for _ in params)
    dist: dict[tuple[Point, Point], Fraction] = {(start, _add_scaled(nothing, start, ws[0])): 1}
    batches = iid_multisets(len(losses), b)
    for alpha, w in zip(alphas, ws[1:], strict=True):
        new: dict[tuple[Point, Point], Fraction] = defaultdict(Fraction)
        for (theta, acc), p in dist.items():
            for counts, q in batches:
                theta2 = _step(land, theta, counts, alpha, b)
                new[(theta2, _add_scaled(acc, theta2, w))] += p * q
        dist = new
    total = [Fraction(0)] * (order + 1)
    m = len(losses)
    for (_theta, acc), p in dist.items():
        for row in land.losses(acc):
            for k, v in enumerate(row):
                total[k] += p * v / m
    return rational_list(total)
