"""The quadratic model of the loss at ``θ_0`` and the ODE, SDE and Lyapunov predictors on it.

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

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from perturb.checks import check_int

__all__ = [
    "QuadraticModel",
    "lyapunov_test_loss",
    "mean_hessian",
    "ode_test_loss",
    "per_sample_derivatives",
    "sde_test_loss",
]


def per_sample_derivatives(
    loss_fn: Callable[..., torch.Tensor], theta0: torch.Tensor, *rows: torch.Tensor
) -> dict[int, torch.Tensor]:
    r"""Per-sample losses ``l_i(θ_0)`` and gradients ``∇l_i(θ_0)``, as ``{0: (n,), 1: (n, P)}``.

    The input :meth:`QuadraticModel.from_derivatives` takes: gradients by ``vmap`` of
    ``grad`` over the rows, each row passed to ``loss_fn`` as a batch of one.

    Args:
        loss_fn: per-sample losses ``loss_fn(θ, *rows) -> (n,)``, e.g. from
            :func:`perturb.experiments.simulation.model_loss`.
        theta0: the point, shape ``(P,)``.
        *rows: the data, each with the samples on the first axis.

    Returns:
        ``{0: losses, 1: gradients}``.

    Example:
        >>> import torch
        >>> f = lambda t, x: 0.5 * (x * t**2).sum(-1)
        >>> d = per_sample_derivatives(f, torch.ones(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> d[0], d[1]
        (tensor([1.5000, 3.5000]), tensor([[1., 2.],
                [3., 4.]]))
    """

    def one(p: torch.Tensor, *row: torch.Tensor) -> torch.Tensor:
        return loss_fn(p, *(r[None] for r in row)).sum()

    dims = (None, *([0] * len(rows)))
    grads = torch.func.vmap(torch.func.grad(one), in_dims=dims)(theta0, *rows)
    return {0: loss_fn(theta0, *rows), 1: grads}


def mean_hessian(
    loss_fn: Callable[..., torch.Tensor],
    theta0: torch.Tensor,
    *rows: torch.Tensor,
    chunk: int = 64,
) -> torch.Tensor:
    r"""The materialized mean Hessian ``H = ∇² (1/n) Σ_i l_i(θ_0)``, symmetrized.

    Built from ``P`` Hessian-vector products (forward-over-reverse, ``chunk`` at a time
    under ``vmap``), so it costs ``P/chunk`` batched passes and ``P²`` numbers: for the
    quadratic model of a small network (the SDE and Lyapunov baselines), not for large ones.

    Args:
        loss_fn: per-sample losses ``loss_fn(θ, *rows) -> (n,)``, e.g. from
            :func:`perturb.experiments.simulation.model_loss`.
        theta0: the point, shape ``(P,)``; ``H`` has its dtype and device.
        *rows: the data, each with the samples on the first axis.
        chunk: Hessian-vector products per ``vmap`` call (``>= 1``).

    Returns:
        ``(P, P)`` tensor.

    Example:
        >>> import torch
        >>> f = lambda t, x: 0.5 * (x * t**2).sum(-1)  # per-sample losses, H = diag(mean x)
        >>> mean_hessian(f, torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[2., 0.],
                [0., 3.]])
    """
    chunk = check_int("chunk", chunk, minimum=1)
    if theta0.ndim != 1:
        raise ValueError(f"theta0 must be a 1-D parameter vector, got shape {tuple(theta0.shape)}")

    def mean_loss(p: torch.Tensor) -> torch.Tensor:
        return loss_fn(p, *rows).mean()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(torch.func.grad(mean_loss), (theta0,), (v,))[1]

    eye = torch.eye(theta0.numel(), dtype=theta0.dtype, device=theta0.device)
    h = torch.cat([torch.func.vmap(hvp)(eye[i : i + chunk]) for i in range(0, len(eye), chunk)])
    return (h + h.T) / 2


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


def _geometric(k: torch.Tensor, steps: int) -> torch.Tensor:
    """``Σ_{t<T} k^t = (1 − k^T)/(1 − k)``, equal to ``T`` at ``k = 1``."""
    near = (1 - k).abs() < 1e-10
    safe = torch.where(near, torch.zeros_like(k), k)
    return torch.where(near, torch.full_like(k, float(steps)), (1 - safe**steps) / (1 - safe))


def lyapunov_test_loss(
    model: QuadraticModel, *, lr: float, steps: int, batch_size: int = 1
) -> torch.Tensor:
    """Exact expected test loss of discrete SGD on the quadratic model with constant noise.

    SGD on per-sample losses ``l + (G + ξ)·Δ + ½ΔᵀHΔ`` (``Cov ξ = C``, ``B`` i.i.d.
    samples per step) has mean and covariance ``m' = Km − ηG``, ``Σ' = KΣK + (η²/B)C``
    (``K = I − ηH``, the discrete Lyapunov recursion), so in the eigenbasis of ``H``
    (``k_i = 1 − ηh_i``, ``g̃ = VᵀG``, ``C̃ = VᵀCV``)

    ``m̃_i = −η g̃_i Σ_{t<T} k_i^t``,  ``Σ̃_ij = (η²/B) C̃_ij Σ_{t<T} (k_ik_j)^t``,

    and ``E l(θ_T) = l + G·m + ½mᵀHm + ½tr(HΣ)``.  As ``T → ∞`` (when ``0 < ηh_i < 2``)
    it tends to the minimum of the quadratic plus :func:`stationary_excess_loss`; as
    ``η → 0`` at fixed ``ηT`` to :func:`sde_test_loss`.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.zeros(1), torch.eye(1), torch.eye(1))
        >>> round(float(lyapunov_test_loss(q, lr=0.5, steps=2)), 6)  # ½·¼·(1 + ¼)
        0.15625
    """
    h, v = model.eig
    k = 1 - lr * h
    g = v.T @ model.grad
    m = -lr * _geometric(k, steps) * g
    c = v.T @ model.cov @ v
    sigma_diag = (lr**2 / batch_size) * torch.diagonal(c) * _geometric(k * k, steps)
    quad = model.loss + g @ m + 0.5 * (h * m * m).sum()
    return quad + 0.5 * (h * sigma_diag).sum()
