"""Competing predictors of SGD's test loss, from the same statistics at ``θ_0``.

* **ODE** (gradient flow): SGD without noise in continuous time,
  ``dθ/dt = −∇l(θ)``, ``t = ηT``.  On the quadratic model of the loss at ``θ_0``
  (``l + G·Δ + ½ΔᵀHΔ``) the flow has the closed form
  ``Δ(t) = −(I − e^{−Ht}) H^{-1} G``.
* **SDE** (seed 001's Langevin picture, seed 000's moment equations): the
  diffusion ``dθ = −∇l dt + sqrt(η/B) C^{1/2} dW`` in the same time ``t = ηT``,
  with the statistics frozen at ``θ_0``.  Its mean follows the ODE and its
  covariance obeys the Lyapunov equation ``dΣ/dt = −HΣ − ΣH + (η/B)C``, so in an
  eigenbasis of ``H``
  ``Σ_ij(t) = (η/B) C_ij (1 − e^{−(h_i+h_j)t}) / (h_i + h_j)``
  and the expected test loss is ``l + G·m + ½mᵀHm + ½tr(HΣ)``.

These are integrated from their own moment equations, not obtained by dropping
diagrams; the tests compare them with a numerical ODE solver and with the exact
discrete recursion of SGD on linear-Gaussian models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["QuadraticModel", "ode_test_loss", "sde_test_loss"]


@dataclass(frozen=True)
class QuadraticModel:
    """The statistics of a loss at ``θ_0``: value ``l``, ``G``, ``H`` and ``C``.

    Attributes:
        loss: the population loss ``l(θ_0)``.
        grad: ``G``, shape ``(P,)``.
        hess: ``H``, shape ``(P, P)``, symmetric.
        cov: ``C``, the covariance of per-sample gradients, shape ``(P, P)``.

    Example:
        >>> import torch
        >>> q = QuadraticModel.from_derivatives(
        ...     {0: torch.zeros(2), 1: torch.tensor([[1.0], [3.0]])}, torch.ones(1, 1)
        ... )
        >>> float(q.grad[0]), float(q.cov[0, 0])
        (2.0, 1.0)
    """

    loss: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def from_derivatives(cls, derivs: dict, hess: torch.Tensor | None = None) -> QuadraticModel:
        """Build from per-sample losses ``derivs[0]`` and gradients ``derivs[1]``.

        Args:
            derivs: ``{0: (n,), 1: (n, P)}`` and optionally ``{2: (n, P, P)}``.
            hess: the mean Hessian, if ``derivs`` has no per-sample Hessians.
        """
        g = derivs[1]
        mean = g.mean(0)
        centred = g - mean
        cov = centred.T @ centred / g.shape[0]
        if hess is None:
            hess = derivs[2].mean(0)
        return cls(loss=derivs[0].mean(0), grad=mean, hess=hess, cov=cov)

    @cached_property
    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of ``H`` (computed once)."""
        return torch.linalg.eigh((self.hess + self.hess.T) / 2)


def _phi(h: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 − e^{−ht})/h``, equal to ``t`` at ``h = 0`` (stable for small ``ht``)."""
    ht = h * t
    small = ht.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(h), h)
    return torch.where(small, t * (1 - ht / 2), -torch.expm1(-ht) / safe)


def ode_test_loss(model: QuadraticModel, *, lr: float, steps: int) -> torch.Tensor:
    """Gradient-flow test loss at time ``t = ηT`` on the quadratic model.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(1.0), torch.tensor([1.0]), torch.eye(1), torch.eye(1))
        >>> round(float(ode_test_loss(q, lr=0.1, steps=10)), 6)  # 1 − (1 − e^{−2})/2
        0.567668
    """
    m = _flow_mean(model, lr * steps)
    return model.loss + model.grad @ m + 0.5 * m @ model.hess @ m


def _flow_mean(model: QuadraticModel, t: float) -> torch.Tensor:
    h, v = model.eig
    g = v.T @ model.grad
    return -(v @ (_phi(h, t) * g))


def sde_test_loss(
    model: QuadraticModel, *, lr: float, steps: int, batch_size: int = 1
) -> torch.Tensor:
    """SDE test loss at ``t = ηT``: the ODE plus the Lyapunov covariance term.

    Args:
        model: statistics at ``θ_0``.
        lr: η.
        steps: ``T``.
        batch_size: ``B``; the diffusion is ``(η/B) C``.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.zeros(1), torch.eye(1), torch.eye(1))
        >>> round(float(sde_test_loss(q, lr=0.1, steps=10)), 6)  # ½·0.1·(1 − e^{−2})/2
        0.021617
    """
    t = lr * steps
    h, v = model.eig
    c = v.T @ model.cov @ v
    pair = h[:, None] + h[None, :]
    sigma = (lr / batch_size) * c * _phi(pair, t)
    noise = 0.5 * (h * torch.diagonal(sigma)).sum()
    return ode_test_loss(model, lr=lr, steps=steps) + noise
