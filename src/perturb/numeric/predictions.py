"""The record of one prediction: its value split by order, with a Krylov error estimate.

Both prediction paths return a :class:`Prediction`: the exact one
(:func:`perturb.numeric.prediction.predict`) and the Krylov one
(:meth:`perturb.numeric.krylov.KrylovSubspace.predict`), which adds the subspace rank, the
values from half the basis (whence :attr:`Prediction.error`) and its cost.

A re-summed prediction carries ``K^t = (I − ηH)^t`` along every edge; where the spectral
radius of ``K`` exceeds one (a negative eigenvalue of ``H`` at a random initialization or
a saddle, or ``ηh > 2``) it grows with ``T``.  :func:`growth` measures that and
:func:`warn_if_unstable` says so (:class:`UnstableDirectionWarning`); the prediction
records it (:attr:`Prediction.unstable`, :attr:`Prediction.growth`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from perturb.checks import check_lr
from perturb.symbolic.series import Series

__all__ = [
    "UNSTABLE_GROWTH",
    "Prediction",
    "UnstableDirectionWarning",
    "growth",
    "warn_if_unstable",
]

UNSTABLE_GROWTH = 1e-6
"""Smallest :func:`growth` reported as unstable (far above eigenvalue rounding, ``~1e-12``)."""


class UnstableDirectionWarning(UserWarning):
    """A re-summed prediction along a direction where ``|1 − ηh| > 1``: it grows with ``T``."""


def growth(evals, lr, steps: int, *, integral: bool = False) -> float:
    r"""``log`` of the largest growth factor of ``K^T`` over the learning rates ``lr``.

    .. math::  \max_η\, T \log \max(1, \max_a |1 − ηh_a|) \;\approx\; \max_η ηT|h_{\min}|
               \quad (h_{\min} < 0,\ η|h_{\min}| ≪ 1),

    zero when every ``|1 − ηh_a| ≤ 1``; with ``integral`` (Remark 2's ``exp(−ηhT)``)
    ``max_η ηT·max(0, −h_min)``.

    Args:
        evals: eigenvalues (or Ritz values) of ``H``.
        lr: one learning rate or several.
        steps: ``T``.
        integral: the integral form.

    Example:
        >>> import torch
        >>> round(growth(torch.tensor([-0.01, 1.0]), [0.1, 0.2], 100), 4)  # 100·log(1.002)
        0.1998
        >>> growth(torch.tensor([0.5, 1.0]), 0.1, 10**5)
        0.0
    """
    h = torch.as_tensor(evals, dtype=torch.float64).reshape(-1).cpu()
    if h.numel() == 0:
        return 0.0
    etas = torch.as_tensor(lr, dtype=torch.float64).reshape(-1).cpu()
    low, high = float(h.min()), float(h.max())
    if integral:
        excess = torch.clamp(-etas * low, min=0.0)
        return float((excess * steps).max())
    excess = torch.clamp(torch.maximum(-etas * low, etas * high - 2), min=0.0)
    return float((steps * torch.log1p(excess)).max())


def warn_if_unstable(
    evals, lr, steps: int, *, integral: bool = False, stacklevel: int = 3
) -> float:
    """:func:`growth`, with an :class:`UnstableDirectionWarning` above :data:`UNSTABLE_GROWTH`.

    Example:
        >>> import torch, warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     g = warn_if_unstable(torch.tensor([-0.01, 1.0]), 0.1, 100)
        >>> round(g, 4), caught[0].category.__name__
        (0.1, 'UnstableDirectionWarning')
    """
    g = growth(evals, lr, steps, integral=integral)
    if g > UNSTABLE_GROWTH:
        h = torch.as_tensor(evals, dtype=torch.float64).reshape(-1)
        warnings.warn(
            f"re-summed prediction along unstable directions of K = I − ηH: eigenvalues of H "
            f"in [{float(h.min()):.4g}, {float(h.max()):.4g}], lr up to "
            f"{float(torch.as_tensor(lr, dtype=torch.float64).max()):.4g}, T = {steps}: K^T "
            f"grows by up to e^{g:.4g}; the value is not a stable long-run prediction "
            "(Prediction.unstable, Prediction.growth)",
            UnstableDirectionWarning,
            stacklevel=stacklevel,
        )
    return g


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
        unstable: a re-summed prediction along directions where ``|1 − ηh| > 1``
            (negative eigenvalues of ``H``, or ``ηh > 2``): ``growth`` above
            :data:`UNSTABLE_GROWTH`; an :class:`UnstableDirectionWarning` was issued.
        growth: :func:`growth`, ``log`` of the largest factor by which ``K^T`` grows
            (``≈ ηT|h_min|`` for a small negative ``h_min``; 0 when stable).
        assessor: ``assessor(lr)`` returns :attr:`trust` at ``lr`` (set by
            :func:`perturb.predict`; ``None``: no trust, :attr:`trust` is ``None``).

    Example:
        >>> pred = Prediction("test", lr=0.1, values=(0.5, -0.15), coefficients=(0.5, -1.5))
        >>> pred.total, [round(v, 6) for v in pred.at(0.2).by_order]
        (0.35, [0.5, -0.3])
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
    unstable: bool = False
    growth: float = 0.0
    assessor: Callable[[float], Any] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def trust(self) -> Any:
        """How far this prediction can be trusted, before any run: a :class:`perturb.Trust`
        (``error_estimate``, ``trusted``, ``trusted_steps``, ``trusted_eta_t``, arrays of
        one entry, at :attr:`lr`), computed on first access by :attr:`assessor`
        (:func:`perturb.predict` documents how, and where it is ``None``).
        """
        return None if self.assessor is None else self.assessor(self.lr)

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
        """The same un-resummed prediction at another learning rate (no re-evaluation; its
        :attr:`trust`, where it has one, is assessed at ``lr`` when read).

        ``lr`` is a positive finite number or zero (the series at ``η = 0`` is its zeroth
        order, the loss at ``θ_0``).
        """
        if self.coefficients is None:
            raise ValueError("a re-summed prediction depends on lr non-polynomially; call predict")
        lr = 0.0 if lr == 0 and not isinstance(lr, bool) else check_lr(lr)
        values = tuple(c * lr**d for d, c in enumerate(self.coefficients))
        return Prediction(
            quantity=self.quantity,
            lr=lr,
            values=values,
            series=self.series,
            coefficients=self.coefficients,
            assessor=self.assessor,
        )


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return value if isinstance(value, np.ndarray) else float(value)
