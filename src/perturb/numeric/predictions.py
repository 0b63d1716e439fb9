"""The record of one prediction: its value split by order, with a Krylov error estimate.

Both prediction paths return a :class:`Prediction`: the exact one
(:func:`perturb.numeric.prediction.predict`) and the Krylov one
(:meth:`perturb.numeric.krylov.KrylovSubspace.predict`), which adds the subspace rank, the
values from half the basis (whence :attr:`Prediction.error`) and its cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from perturb.checks import check_lr
from perturb.symbolic.series import Series

__all__ = ["Prediction"]


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
        """The same un-resummed prediction at another learning rate (no re-evaluation).

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
        )


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return value if isinstance(value, np.ndarray) else float(value)
