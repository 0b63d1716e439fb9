"""A finite population: a per-sample loss and its rows, the input of an exact prediction.

Every expectation of the theory is an average over the population's rows, uniformly
weighted; :meth:`Population.derivatives` materializes the per-sample derivative tensors
``∇^k l_x(θ_0)`` that the exact path (:mod:`perturb.numeric.prediction`) contracts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from perturb.reference.tensors import derivative_tensors

__all__ = ["Population"]


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
