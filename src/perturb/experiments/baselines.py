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

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

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
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
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


# ---------------------------------------------------------------------------
# Stationary statistics near a minimum, Boltzmann ratio of two minima (seed 001),
# stochastic Lanczos quadrature, and iterate averaging (seed 002).
# ---------------------------------------------------------------------------

__all__ += [
    "LogdetEstimate",
    "boltzmann_ratio",
    "ema_covariance",
    "logdet_slq",
    "slq_bias_bound",
    "stationary_covariance",
    "stationary_excess_loss",
    "two_point_average_covariance",
]


def _eig_frame(
    hess: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues ``h`` and vectors ``V`` of ``H`` and ``C̃ = VᵀCV`` (float64)."""
    hess = torch.as_tensor(hess, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    h, v = torch.linalg.eigh((hess + hess.T) / 2)
    return h, v, v.T @ ((cov + cov.T) / 2) @ v


def _discrete_frame(
    hess: torch.Tensor, cov: torch.Tensor, lr: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k = 1 − ηh``, ``V`` and the discrete stationary ``Σ̃`` in the eigenbasis of ``H``."""
    h, v, c = _eig_frame(hess, cov)
    k = 1 - lr * h
    if not bool((k.abs() < 1).all()):
        raise ValueError("no stationary law: need 0 < η h_i < 2 for every eigenvalue of H")
    sigma = (lr**2 / batch_size) * c / (1 - k[:, None] * k[None, :])
    return k, v, sigma


def stationary_covariance(
    hess: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: float,
    batch_size: int = 1,
    discrete: bool = True,
) -> torch.Tensor:
    """Stationary covariance of SGD's iterate near a minimum of the linear model.

    Near a minimum ``θ*`` with Hessian ``H`` and per-sample gradient covariance ``C``
    (gradients ``H(θ − θ*) + ξ``, ``Cov ξ = C``, ``B`` samples per step), SGD is the
    linear recursion ``Δ' = KΔ − η ξ̄`` with ``K = I − ηH`` and ``Cov ξ̄ = C/B``.

    * ``discrete=True``: the exact stationary covariance, the solution of the
      discrete Lyapunov equation ``Σ = KΣK + (η²/B) C``; in the eigenbasis of ``H``
      (``C̃ = VᵀCV``) ``Σ̃_ij = (η²/B) C̃_ij / (1 − k_i k_j)``, ``k_i = 1 − ηh_i``.
      Requires ``0 < ηh_i < 2``.
    * ``discrete=False``: the SDE's (seed 001) continuous Lyapunov equation
      ``HΣ + ΣH = (η/B) C``, i.e. ``Σ̃_ij = (η/B) C̃_ij / (h_i + h_j)``.

    Since ``1 − k_i k_j = η(h_i + h_j − ηh_ih_j)`` the two differ at relative order
    ``ηh``: for commuting ``H, C`` the discrete one is larger by ``1/(1 − ηh/2)``.

    Args:
        hess: ``H``, ``(P, P)`` symmetric positive definite.
        cov: ``C``, ``(P, P)``, the covariance of one sample's gradient.
        lr: η.
        batch_size: ``B`` (samples drawn with replacement, i.i.d.).
        discrete: the exact SGD answer (default) or the SDE's.

    Returns:
        ``Σ``, ``(P, P)`` float64.

    Example:
        >>> import torch
        >>> h, c = torch.tensor([[2.0]]), torch.tensor([[1.0]])
        >>> round(float(stationary_covariance(h, c, lr=0.1)), 6)  # 0.01/(1 − 0.64)
        0.027778
        >>> round(float(stationary_covariance(h, c, lr=0.1, discrete=False)), 6)  # 0.1/4
        0.025
    """
    if discrete:
        _, v, sigma = _discrete_frame(hess, cov, lr, batch_size)
    else:
        h, v, c = _eig_frame(hess, cov)
        if not bool((h > 0).all()):
            raise ValueError("the continuous Lyapunov equation needs H positive definite")
        sigma = (lr / batch_size) * c / (h[:, None] + h[None, :])
    return v @ sigma @ v.T


def stationary_excess_loss(
    hess: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: float,
    batch_size: int = 1,
    discrete: bool = True,
) -> torch.Tensor:
    """Stationary expected loss above the minimum, ``½ tr(HΣ)``.

    ``Σ`` is :func:`stationary_covariance` (same arguments).  For ``C = σ²I`` the
    continuous answer is ``(η/B)σ²P/4`` whatever ``H`` is (equipartition).

    Example:
        >>> import torch
        >>> h, c = torch.diag(torch.tensor([1.0, 3.0])), torch.eye(2)
        >>> round(float(stationary_excess_loss(h, c, lr=0.1, discrete=False)), 6)  # 0.1·2/4
        0.05
    """
    sigma = stationary_covariance(hess, cov, lr=lr, batch_size=batch_size, discrete=discrete)
    return 0.5 * torch.trace(torch.as_tensor(hess, dtype=torch.float64) @ sigma)


def boltzmann_ratio(
    loss_a: float,
    loss_b: float,
    logdet_h_a: float,
    logdet_h_b: float,
    *,
    lr: float,
    batch_size: int,
    sigma2: float = 1.0,
    log: bool = False,
) -> float:
    """Seed 001's ratio of the stationary probabilities of two minima ``A`` and ``B``.

    Seed 001 (Jastrzebski et al.) models SGD as ``dθ = −η g dt + (η/√B) σ dW`` with
    *isotropic, constant* per-sample gradient noise ``C(θ) = σ²I`` (``σ²`` is the
    variance of one sample's gradient along any direction).  Its Fokker-Planck
    equation has the Gibbs stationary law ``P(θ) ∝ exp(−2L(θ)/(nσ²))``, ``n = η/B``;
    a Laplace approximation of each basin gives

    ``p_A/p_B = sqrt(det H_B / det H_A) · exp(2(L_B − L_A)/(nσ²))``.

    Args:
        loss_a: ``L_A``, the loss at minimum ``A``.
        loss_b: ``L_B``.
        logdet_h_a: ``log det H_A`` (e.g. from :func:`logdet_slq`).
        logdet_h_b: ``log det H_B``.
        lr: η.
        batch_size: ``B``.
        sigma2: ``σ²``.
        log: return ``log(p_A/p_B)`` instead (no overflow).

    Returns:
        ``p_A/p_B`` (or its log).

    Example:
        >>> import math
        >>> r = boltzmann_ratio(0.0, 0.0, math.log(1.0), math.log(4.0), lr=0.1, batch_size=1)
        >>> round(r, 6)  # equal losses: sqrt(4/1), the flatter minimum wins
        2.0
        >>> round(boltzmann_ratio(0.0, 0.1, 0.0, 0.0, lr=0.1, batch_size=1, log=True), 6)
        2.0
    """
    n = lr / batch_size
    logr = 0.5 * (logdet_h_b - logdet_h_a) + 2.0 * (loss_b - loss_a) / (n * sigma2)
    return float(logr) if log else math.exp(logr)


class LogdetEstimate(NamedTuple):
    """An SLQ estimate of ``log det H``: its value, standard error and per-probe samples."""

    value: float
    stderr: float
    samples: torch.Tensor


def _lanczos(
    hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos with full reorthogonalization from ``v0``: diagonal ``α`` and off-diagonal ``β``."""
    dim = v0.shape[0]
    basis = torch.zeros(steps, dim, dtype=torch.float64)
    alpha, beta = [], []
    q = v0 / torch.linalg.norm(v0)
    for j in range(steps):
        basis[j] = q
        w = torch.as_tensor(hvp(q), dtype=torch.float64).reshape(-1)
        a = torch.dot(q, w)
        alpha.append(a)
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = torch.linalg.norm(w)
        if j == steps - 1 or b < 1e-12 * max(1.0, abs(float(a))):
            break  # Krylov space exhausted: the quadrature is exact
        beta.append(b)
        q = w / b
    return torch.stack(alpha), torch.stack(beta) if beta else torch.zeros(0, dtype=torch.float64)


def logdet_slq(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    probes: int = 30,
    steps: int = 20,
    seed: int = 0,
) -> LogdetEstimate:
    """Stochastic Lanczos quadrature estimate of ``log det H = tr log H`` (``H`` SPD).

    For Rademacher probes ``v`` (``E vvᵀ = I``), ``tr log H = E vᵀ log(H) v``.  Each
    ``vᵀ log(H) v`` is the Gauss quadrature rule of the Lanczos tridiagonal ``T_m``
    (``m = steps``) built from ``v/|v|``: with Ritz values ``θ_k`` and first
    eigenvector components ``τ_k`` of ``T_m``, ``vᵀ log(H) v ≈ |v|² Σ_k τ_k² log θ_k``
    (exact for polynomials of degree ``2m − 1``; see :func:`slq_bias_bound`).  The
    estimate is the mean over probes; ``stderr`` is their standard deviation over
    ``sqrt(probes)`` (the Hutchinson part of the error; the quadrature bias is not in
    it).

    Args:
        hvp: ``u ↦ Hu`` for ``u`` of shape ``(dim,)``, float64.
        dim: ``P``.
        probes: number of Rademacher probes.
        steps: Lanczos steps per probe (``≤ dim``).
        seed: seed of the probes.

    Returns:
        :class:`LogdetEstimate` ``(value, stderr, samples)``.

    Example:
        >>> import torch
        >>> h = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> est = logdet_slq(lambda u: h @ u, 3, probes=4, steps=3)
        >>> round(est.value, 6), round(est.stderr, 6)  # exact: log 8, diagonal H
        (2.079442, 0.0)
    """
    gen = torch.Generator().manual_seed(seed)
    steps = min(steps, dim)
    samples = torch.empty(probes, dtype=torch.float64)
    for i in range(probes):
        v = torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1
        alpha, beta = _lanczos(hvp, v, steps)
        t = torch.diag(alpha)
        if len(beta):
            t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta, u = torch.linalg.eigh(t)
        if not bool((theta > 0).all()):
            raise ValueError("non-positive Ritz value: H is not positive definite")
        samples[i] = dim * (u[0] ** 2 * torch.log(theta)).sum()
    se = float(samples.std() / math.sqrt(probes)) if probes > 1 else float("nan")
    return LogdetEstimate(float(samples.mean()), se, samples)


def slq_bias_bound(lam_min: float, lam_max: float, dim: int, *, steps: int) -> float:
    """Bound on the Lanczos-quadrature (not Hutchinson) error of :func:`logdet_slq`.

    With ``m`` steps Gauss quadrature is exact for polynomials of degree ``2m − 1``,
    so per probe the error is at most ``2|v|² E_{2m−1}``, ``E_n`` the best uniform
    polynomial error of ``log`` on ``[λ_min, λ_max]``.  Mapping to ``[−1, 1]``,
    ``log`` becomes ``log(s + x)`` up to a constant, ``s = (κ+1)/(κ−1)``, whose
    Chebyshev coefficients are ``2(−1)^{k+1}/(kρ^k)``, ``ρ = s + sqrt(s² − 1) =
    (√κ+1)/(√κ−1)``; the truncated tail gives ``E_n ≤ 2ρ^{−(n+1)}/((n+1)(1 − 1/ρ))``.
    The bound is ``2·dim·E_{2m−1}`` (``|v|² = dim`` for Rademacher probes).

    Example:
        >>> slq_bias_bound(1.0, 10.0, 50, steps=15) < 1e-6
        True
    """
    if lam_max <= lam_min:
        return 0.0
    kappa = lam_max / lam_min
    rho = (math.sqrt(kappa) + 1) / (math.sqrt(kappa) - 1)
    n = 2 * steps - 1
    e_n = 2 * rho ** (-(n + 1)) / ((n + 1) * (1 - 1 / rho))
    return 2 * dim * e_n


def two_point_average_covariance(
    hess: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: float,
    batch_size: int = 1,
    gap: int = 1,
) -> torch.Tensor:
    """Stationary covariance of the two-point average ``(θ_t + θ_{t+k})/2`` (seed 002).

    In the stationary regime of ``Δ' = KΔ − ηξ̄`` (see :func:`stationary_covariance`)
    ``E Δ_{t+k} Δ_tᵀ = K^k Σ`` because the later noise is independent of ``Δ_t``, so

    ``Cov((Δ_t + Δ_{t+k})/2) = ¼(2Σ + K^kΣ + ΣK^k)``.

    For ``k = 1`` this is ``Σ − (η/4)(HΣ + ΣH)``; for ``k → ∞`` it tends to ``Σ/2``
    (seed 002's "average of two points on the ellipsoid" ≈ SGD at learning rate ``η/2``
    when ``ηh`` is small).  Holds for non-commuting ``H`` and ``C``.  Taking the trace
    of the discrete Lyapunov equation shows that for ``k = 1`` the excess loss
    ``½tr(H·)`` is exactly ``(η/4B) tr C``, the SDE's stationary excess loss.

    Args:
        hess: ``H``.
        cov: ``C``.
        lr: η.
        batch_size: ``B``.
        gap: ``k ≥ 1``, the steps between the averaged iterates.

    Example:
        >>> import torch
        >>> h, c = torch.tensor([[2.0]]), torch.tensor([[1.0]])
        >>> s = float(stationary_covariance(h, c, lr=0.1))
        >>> round(float(two_point_average_covariance(h, c, lr=0.1)) / s, 6)  # (2 + 2·0.8)/4
        0.9
    """
    k, v, sigma = _discrete_frame(hess, cov, lr, batch_size)
    kk = k**gap
    avg = 0.25 * (2 * sigma + (kk[:, None] + kk[None, :]) * sigma)
    return v @ avg @ v.T


def ema_covariance(
    hess: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: float,
    decay: float,
    batch_size: int = 1,
    joint: bool = False,
) -> torch.Tensor:
    """Stationary covariance of the EMA ``θ̄_{t+1} = (1−δ)θ̄_t + δθ_{t+1}`` (seed 002).

    The pair ``(Δ, Δ̄)`` (``Δ̄ = θ̄ − θ*``) obeys the linear recursion

    ``Δ' = KΔ − ηξ̄``,  ``Δ̄' = (1−δ)Δ̄ + δKΔ − δηξ̄``,

    whose stationary covariance solves a discrete Lyapunov equation of size ``2P``.
    In the eigenbasis of ``H`` it decouples pairwise: with ``Σ̃`` the iterate's,
    ``X_ij = E Δ̄_i Δ_j = δΣ̃_ij/(1 − (1−δ)k_j)`` and

    ``Cov(Δ̄)_ij = [δ²Σ̃_ij + δ(1−δ)(k_j X_ij + k_i X_ji)] / (δ(2 − δ))``.

    ``δ = 1`` gives back ``Σ``; ``δ → 0`` shrinks it like ``δ``.

    Args:
        hess: ``H``.
        cov: ``C``.
        lr: η.
        decay: ``δ ∈ (0, 1]``.
        batch_size: ``B``.
        joint: return the full ``(2P, 2P)`` covariance of ``(Δ, Δ̄)`` instead.

    Example:
        >>> import torch
        >>> h, c = torch.tensor([[2.0]]), torch.tensor([[1.0]])
        >>> s = float(stationary_covariance(h, c, lr=0.1))
        >>> round(float(ema_covariance(h, c, lr=0.1, decay=1.0)) / s, 6)
        1.0
        >>> round(float(ema_covariance(h, c, lr=0.1, decay=0.5)) / s, 6)  # (¼ + ¼·2·.8·⅚)/¾
        0.777778
    """
    if not 0 < decay <= 1:
        raise ValueError("decay must be in (0, 1]")
    k, v, sigma = _discrete_frame(hess, cov, lr, batch_size)
    d = decay
    x = d * sigma / (1 - (1 - d) * k[None, :])  # X_ij = E Δ̄_i Δ_j
    y = (d**2 * sigma + d * (1 - d) * (k[None, :] * x + k[:, None] * x.T)) / (d * (2 - d))
    if not joint:
        return v @ y @ v.T
    p = len(k)
    out = torch.empty(2 * p, 2 * p, dtype=torch.float64)
    out[:p, :p] = v @ sigma @ v.T
    out[p:, :p] = v @ x @ v.T
    out[:p, p:] = out[p:, :p].T
    out[p:, p:] = v @ y @ v.T
    return out


# ---------------------------------------------------------------------------
# Bayesian evidence and the SGD noise scale (seed 004, Smith & Le).
# ---------------------------------------------------------------------------

__all__ += [
    "LaplaceEvidence",
    "LogisticFit",
    "batch_size_for_noise_scale",
    "laplace_evidence",
    "logistic_map",
    "noise_scale",
]


class LaplaceEvidence(NamedTuple):
    """Laplace approximation of a model's evidence (seed 004, equations 9-10).

    Attributes:
        log_evidence: ``log P(y|x; M) ≈ −C(ω_0) − ½ Σ_i log(λ_i/λ)``.
        log_occam: the log Occam factor ``−½ Σ_i log(λ_i/λ)`` (``≤ 0`` when every
            ``λ_i ≥ λ``).
        cost: ``C(ω_0)``, the regularized summed loss at the minimum.
        log_null: the null model's ``log P(y|x; NULL) = −N log n``.
        log_ratio: seed 004's ``E(ω_0) = −(log_evidence − log_null)``, the log evidence
            ratio *in favour of the null model*: the model is to be trusted only where
            it is negative.
    """

    log_evidence: float
    log_occam: float
    cost: float
    log_null: float
    log_ratio: float


def laplace_evidence(
    cost: float,
    hessian: torch.Tensor,
    *,
    l2: float,
    num_samples: int,
    num_classes: int,
) -> LaplaceEvidence:
    """Laplace log-evidence and Occam factor from the Hessian spectrum (seed 004).

    The model has likelihood ``e^{−H(ω)}`` (``H`` the summed cross-entropy over the
    ``N`` training labels) and the Gaussian prior ``(λ/2π)^{p/2} e^{−λ|ω|²/2}``; its
    regularized summed loss is ``C(ω) = H(ω) + λ|ω|²/2``, minimized at ``ω_0``.  The
    evidence ``P(y|x) = (λ/2π)^{p/2} ∫ e^{−C(ω)} dω`` in the Laplace (quadratic)
    approximation around ``ω_0``, with ``λ_i`` the eigenvalues of ``∇∇C(ω_0)``, is

    ``log P(y|x; M) ≈ −C(ω_0) − ½ Σ_i log(λ_i/λ)``,

    exact when ``C`` is quadratic (Bayesian linear regression).  Against the
    parameter-free null model that gives each of the ``n`` classes probability
    ``1/n`` (``log P = −N log n``) the seed's log ratio is
    ``E(ω_0) = C(ω_0) + ½ Σ_i log(λ_i/λ) − N log n``.

    Args:
        cost: ``C(ω_0)``.
        hessian: ``∇∇C(ω_0)`` as a ``(p, p)`` matrix, or its ``p`` eigenvalues (1-D).
        l2: ``λ > 0``, the prior precision (L2 strength of the summed loss).
        num_samples: ``N``, the number of training labels.
        num_classes: ``n ≥ 2``.

    Returns:
        :class:`LaplaceEvidence`.

    Raises:
        ValueError: if ``λ ≤ 0``, the Hessian is not positive definite, or the counts are
            not positive integers.

    Example:
        >>> import torch
        >>> ev = laplace_evidence(3.0, torch.tensor([2.0, 8.0]), l2=2.0, num_samples=10,
        ...                       num_classes=2)
        >>> round(ev.log_occam, 6), round(ev.log_evidence, 6)  # −½ log 4, −3 − ½ log 4
        (-0.693147, -3.693147)
        >>> round(ev.log_ratio, 6)  # 3.693147 − 10 log 2
        -3.238325
    """
    if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number, got {l2!r}")
    for name, value, low in (("num_samples", num_samples, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    hessian = torch.as_tensor(hessian, dtype=torch.float64)
    if hessian.ndim == 2 and hessian.shape[0] == hessian.shape[1]:
        eigs = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    elif hessian.ndim == 1:
        eigs = hessian
    else:
        raise ValueError(
            f"hessian must be a square matrix or a 1-D spectrum, got shape {tuple(hessian.shape)}"
        )
    if not bool((eigs > 0).all()):
        raise ValueError(
            f"the Hessian of the regularized loss must be positive definite, "
            f"smallest eigenvalue {float(eigs.min()):.3g}"
        )
    log_occam = -0.5 * float(torch.log(eigs / l2).sum())
    log_evidence = -float(cost) + log_occam
    log_null = -num_samples * math.log(num_classes)
    return LaplaceEvidence(
        log_evidence=log_evidence,
        log_occam=log_occam,
        cost=float(cost),
        log_null=log_null,
        log_ratio=log_null - log_evidence,
    )


@dataclass(frozen=True)
class LogisticFit:
    """The MAP fit of an L2-regularized binary logistic regression.

    Attributes:
        weights: ``ω_0``, shape ``(p,)`` (the last entry is the bias if one was added).
        cost: ``C(ω_0) = Σ_i CE_i + λ|ω_0|²/2`` on the training set.
        hessian: ``∇∇C(ω_0) = Xᵀ diag(s(1−s)) X + λI``, shape ``(p, p)``.
        train_ce: the mean training cross-entropy at ``ω_0`` (nats).
        evidence: :func:`laplace_evidence` of the fit against the two-class null model.
        iterations: Newton steps taken.
    """

    weights: torch.Tensor
    cost: float
    hessian: torch.Tensor
    train_ce: float
    evidence: LaplaceEvidence
    iterations: int

    def cross_entropy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean cross-entropy (nats) of the fit on ``(x, y)`` (features as in the fit)."""
        x, y = _logistic_inputs(x, y, bias=len(self.weights) == x.shape[1] + 1)
        return float(_bce(x @ self.weights, y).mean())


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


def _logistic_inputs(x, y, *, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"expected x of shape (N, d) and y of shape (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("y must hold binary labels 0 and 1")
    if bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    return x, y


def logistic_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    bias: bool = True,
    init: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> LogisticFit:
    """MAP logistic regression by Newton's method, with its exact Hessian and evidence.

    Minimizes the regularized summed loss of seed 004's logistic-regression experiment,
    ``C(ω) = Σ_i [log(1 + e^{z_i}) − y_i z_i] + λ|ω|²/2``, ``z = Xω``, whose gradient
    is ``Xᵀ(s − y) + λω`` and Hessian ``Xᵀ diag(s(1−s)) X + λI`` (``s = σ(z)``); the
    prior ``N(0, I/λ)`` covers every weight, the bias included.  Newton's method is
    used as is (``C`` is strictly convex) until the step is below ``tol``.

    Args:
        x: features, ``(N, d)``.
        y: labels in ``{0, 1}``, ``(N,)``.
        l2: ``λ > 0``.
        bias: append a constant feature (the bias weight, also under the prior).
        init: starting weights (e.g. the fit at a neighbouring ``λ``).
        tol: stop when the largest Newton step is below this.
        max_iter: at most this many Newton steps.

    Returns:
        :class:`LogisticFit` (with :func:`laplace_evidence` against the null model).

    Raises:
        ValueError: on malformed inputs, or if Newton's method did not converge.

    Example:
        >>> import math, torch
        >>> fit = logistic_map(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, 0.0]), l2=1.0,
        ...                    bias=False)
        >>> w = float(fit.weights[0])  # stationarity: 2σ(−w) = w
        >>> abs(2 / (1 + math.exp(w)) - w) < 1e-12
        True
    """
    if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number, got {l2!r}")
    x, y = _logistic_inputs(x, y, bias=bias)
    p = x.shape[1]
    w = torch.zeros(p, dtype=torch.float64) if init is None else init.to(torch.float64).clone()
    eye = torch.eye(p, dtype=torch.float64)
    iterations, step = 0, torch.full((p,), math.inf, dtype=torch.float64)
    while float(step.abs().max()) >= tol:
        if iterations == max_iter:
            raise ValueError(f"Newton's method did not converge in {max_iter} steps (λ = {l2})")
        iterations += 1
        s = torch.sigmoid(x @ w)
        g = x.T @ (s - y) + l2 * w
        hess = x.T @ (x * (s * (1 - s))[:, None]) + l2 * eye
        step = torch.linalg.solve(hess, g)
        w = w - step
    s = torch.sigmoid(x @ w)
    hess = x.T @ (x * (s * (1 - s))[:, None]) + l2 * eye
    ce = _bce(x @ w, y)
    cost = float(ce.sum() + 0.5 * l2 * w @ w)
    ev = laplace_evidence(cost, hess, l2=l2, num_samples=len(y), num_classes=2)
    return LogisticFit(w, cost, hess, float(ce.mean()), ev, iterations)


def noise_scale(lr: float, *, dataset_size: int, batch_size: int, momentum: float = 0.0) -> float:
    """Seed 004's SGD noise scale ``g = ε(N/B − 1)/(1 − m)``.

    SGD on the summed loss ``C = Σ_{i≤N} C_i`` with batches of ``B`` distinct samples,
    ``ω' = ω − ε·(1/B)Σ_{i∈batch} ∇C_i`` (heavy-ball momentum ``m``:
    ``v' = mv − ε·(…)``, ``ω' = ω + v'``), is read as the SDE
    ``dω/dt = −∇C + η(t)``, ``⟨η(t)η(t')⟩ = gF δ(t − t')``, with ``F`` the covariance of
    one sample's gradient (divisor ``N − 1``) and time ``ε/(N(1 − m))`` per step.  The
    batch mean's covariance is exactly ``F(N − B)/(NB)``, whence ``g``.  Near a minimum
    with mean Hessian ``H`` the stationary covariance to leading order in ``ε`` solves
    ``HΣ + ΣH = (g/N)F`` (:func:`stationary_covariance` with ``lr = g/N``,
    ``discrete=False``); runs with equal ``g`` fluctuate alike.

    Args:
        lr: ``ε``.
        dataset_size: ``N``.
        batch_size: ``B`` (``1 ≤ B ≤ N``).
        momentum: ``m ∈ [0, 1)``.

    Example:
        >>> noise_scale(0.1, dataset_size=1000, batch_size=10)
        9.9
        >>> round(noise_scale(0.1, dataset_size=1000, batch_size=10, momentum=0.9), 6)
        99.0
    """
    _check_noise_args(lr, dataset_size, batch_size, momentum)
    return lr * (dataset_size / batch_size - 1) / (1 - momentum)


def batch_size_for_noise_scale(
    scale: float, *, lr: float, dataset_size: int, momentum: float = 0.0
) -> float:
    """The batch size at which SGD has noise scale ``g`` (seed 004's ``B_opt`` rule).

    Inverting :func:`noise_scale`, ``B = εN/(g(1 − m) + ε) ≈ εN/(g(1 − m))``: holding
    ``g`` at its optimum, the optimal batch size scales as ``B_opt ∝ εN/(1 − m)``.

    Example:
        >>> batch_size_for_noise_scale(9.9, lr=0.1, dataset_size=1000)
        10.0
    """
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    _check_noise_args(lr, dataset_size, 1, momentum)
    return lr * dataset_size / (scale * (1 - momentum) + lr)


def _check_noise_args(lr, dataset_size, batch_size, momentum) -> None:
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > dataset_size:
        raise ValueError(f"batch_size ({batch_size}) exceeds dataset_size ({dataset_size})")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


# ---------------------------------------------------------------------------
# Iterate averaging ↔ learning-rate schedules (seed 002, Lemma 2 and Table 1).
# ---------------------------------------------------------------------------

__all__ += [
    "AVERAGES",
    "averaging_gap_series",
    "averaging_weights",
    "equivalent_schedule",
    "iterate_average_moments",
    "iterate_average_test_loss",
    "weighted_iterate_series",
]

AVERAGES = ("two_point", "swa", "ema")
"""Averages of a side-trip ``θ_0 … θ_k`` that :func:`averaging_weights` knows."""


def _number(value: object, what: str):
    import sympy as sp

    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got {value!r}")
    try:
        out = sp.sympify(value)
    except (sp.SympifyError, TypeError) as err:
        raise TypeError(f"{what} must be a number, got {value!r}") from err
    if not (out.is_number and out.is_real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    return out


def _steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def averaging_weights(kind: str, *, steps: int, decay: object = None) -> list:
    """Weights ``w_0 … w_k`` of seed 002's averages of the iterates ``θ_0 … θ_k``.

    * ``"two_point"``: ``(θ_0 + θ_k)/2``, the two ends of a ``k``-step side-trip.
    * ``"swa"``: ``(1/k) Σ_{t=1}^{k} θ_t`` (window ``k``, cycle ``c = 1``; the start
      ``θ_0`` is not in the window).
    * ``"ema"``: the EMA ``θ̄_{t+1} = (1−δ)θ̄_t + δθ_{t+1}`` started at ``θ̄_0 = θ_0``:
      ``w_0 = (1−δ)^k``, ``w_t = δ(1−δ)^{k−t}``.

    All sum to one.  Exact (sympy rationals) when ``decay`` is rational.

    Args:
        kind: one of :data:`AVERAGES`.
        steps: ``k ≥ 1``.
        decay: ``δ ∈ (0, 1]``, for ``"ema"`` only.

    Returns:
        A list of ``k + 1`` sympy numbers.

    Example:
        >>> averaging_weights("swa", steps=2)
        [0, 1/2, 1/2]
        >>> averaging_weights("ema", steps=2, decay="1/2")
        [1/4, 1/4, 1/2]
    """
    import sympy as sp

    k = _steps(steps)
    if kind not in AVERAGES:
        raise ValueError(f"kind must be one of {AVERAGES}, got {kind!r}")
    if (decay is None) != (kind != "ema"):
        raise ValueError(f"decay is required for kind='ema' and only there; got {decay!r}")
    if kind == "two_point":
        return [sp.Rational(1, 2)] + [sp.Integer(0)] * (k - 1) + [sp.Rational(1, 2)]
    if kind == "swa":
        return [sp.Integer(0)] + [sp.Rational(1, k)] * k
    d = _number(decay, "decay")
    if not bool(0 < d <= 1):
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    return [(1 - d) ** k] + [d * (1 - d) ** (k - t) for t in range(1, k + 1)]


def _weights(weights: object, what: str = "weights") -> list:
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
        raise TypeError(f"{what} must be a sequence of numbers, got {weights!r}")
    out = [_number(w, f"{what}[{i}]") for i, w in enumerate(weights)]
    if len(out) < 2:
        raise ValueError(f"{what} needs one entry per iterate θ_0 … θ_k (k ≥ 1), got {len(out)}")
    if abs(float(sum(out)) - 1) > 1e-12:
        raise ValueError(f"{what} must sum to 1 (an average), got sum {float(sum(out))!r}")
    return out


def equivalent_schedule(weights: object) -> list:
    """Seed 002's learning-rate schedule equivalent to averaging the iterates with ``weights``.

    With frozen per-sample gradients ``g_t`` (Lemma 2's assumption), ``θ_t = θ_0 −
    η Σ_{s<t} g_s`` and ``Σ_t w_t θ_t = θ_0 − η Σ_s c_s g_s`` with the tail sums

    ``c_s = Σ_{t>s} w_t``,  ``s = 0 … k−1``,

    which is the last iterate of SGD with learning rate ``η c_s`` at step ``s``.  This
    gives Table 1: two-point ``c_s = ½`` (``η/2``), SWA ``c_s = (k − s)/k`` (linear
    decay, ``(k+1−i)/k`` for ``i = s + 1``), EMA ``c_s = 1 − (1−δ)^{k−s}`` (exactly, when
    the EMA starts at ``θ_0``; seed 002 needs ``k ≫ 1/δ`` because its EMA starts earlier).
    The identity is exact to first order in ``η`` on any landscape; see
    :func:`averaging_gap_series` for the first order where it is not.

    Args:
        weights: ``w_0 … w_k`` summing to one (e.g. from :func:`averaging_weights`).

    Returns:
        ``[c_0, …, c_{k−1}]``, sympy numbers.

    Example:
        >>> equivalent_schedule(averaging_weights("swa", steps=4))
        [1, 3/4, 1/2, 1/4]
        >>> equivalent_schedule(averaging_weights("two_point", steps=3))
        [1/2, 1/2, 1/2]
    """
    w = _weights(weights)
    return [sum(w[s + 1 :]) for s in range(len(w) - 1)]


def _rates(lrs: object, k: int | None = None, what: str = "lrs") -> list[float]:
    if isinstance(lrs, str | bytes) or not hasattr(lrs, "__len__") or len(lrs) < 1:
        raise ValueError(f"{what} must be a non-empty sequence (one per step), got {lrs!r}")
    out = [float(_number(x, f"{what}[{i}]")) for i, x in enumerate(lrs)]
    if k is not None and len(out) != k:
        raise ValueError(f"{what} has {len(out)} entries, expected one per step ({k})")
    return out


def iterate_average_moments(
    model: QuadraticModel,
    *,
    lrs: object,
    weights: object = None,
    batch_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of ``Σ_t w_t θ_t − θ_0`` for SGD with step sizes ``η_t``.

    SGD on the quadratic model with constant noise (see :func:`lyapunov_test_loss`),
    ``Δ_{t+1} = K_tΔ_t − η_t(G + ξ̄_t)``, ``K_t = I − η_tH``, ``Cov ξ̄_t = C/B``, from
    ``Δ_0 = 0``.  With the running sum ``A_t = Σ_{s≤t} w_sΔ_s``, ``P = Cov Δ``,
    ``X = Cov(A, Δ)``, ``Y = Cov A``, one step is linear and the moments obey

    ``m' = K m − ηG``,  ``a' = a + w' m'``,
    ``P' = KPKᵀ + (η²/B)C``,  ``X' = XKᵀ + w'P'``,
    ``Y' = Y + w'(XKᵀ + KXᵀ) + w'²P'``

    (the later noise is independent of the past).  ``H`` and ``C`` need not commute.

    Args:
        model: ``l``, ``G``, ``H``, ``C`` at ``θ_0``.
        lrs: ``η_0 … η_{k−1}``, one learning rate per step.
        weights: ``w_0 … w_k`` (any reals; an average sums to one); ``None``: the last
            iterate (``w = (0, …, 0, 1)``), i.e. plain SGD on the schedule ``lrs``.
        batch_size: ``B``.

    Returns:
        ``(mean, cov)``, shapes ``(P,)`` and ``(P, P)``, float64.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.zeros(1), torch.eye(1), torch.eye(1))
        >>> m, s = iterate_average_moments(q, lrs=[0.5, 0.5], weights=[0.5, 0, 0.5])
        >>> round(float(s), 6)  # ¼·Var θ_2 = ¼·(¼·¼ + ¼)
        0.078125
    """
    k = len(_rates(lrs))
    etas = _rates(lrs, k)
    if weights is None:
        ws = [0.0] * k + [1.0]
    else:
        if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
            raise TypeError(f"weights must be a sequence of numbers, got {weights!r}")
        ws = [float(_number(w, f"weights[{i}]")) for i, w in enumerate(weights)]
        if len(ws) != k + 1:
            raise ValueError(f"weights needs len(lrs) + 1 = {k + 1} entries, got {len(ws)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    h = model.hess.to(torch.float64)
    c = model.cov.to(torch.float64) / batch_size
    g = model.grad.to(torch.float64)
    p = len(g)
    eye = torch.eye(p, dtype=torch.float64)
    m = torch.zeros(p, dtype=torch.float64)
    a = torch.zeros(p, dtype=torch.float64)
    cov_d = torch.zeros(p, p, dtype=torch.float64)
    cross = torch.zeros(p, p, dtype=torch.float64)
    cov_a = torch.zeros(p, p, dtype=torch.float64)
    for eta, w in zip(etas, ws[1:], strict=True):
        kk = eye - eta * h
        m = kk @ m - eta * g
        a = a + w * m
        cov_d = kk @ cov_d @ kk.T + eta**2 * c
        xk = cross @ kk.T
        cov_a = cov_a + w * (xk + xk.T) + w**2 * cov_d
        cross = xk + w * cov_d
    return a, (cov_a + cov_a.T) / 2


def iterate_average_test_loss(
    model: QuadraticModel,
    *,
    lrs: object,
    weights: object = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Exact expected test loss at ``Σ_t w_tθ_t`` on the quadratic model (seed 002).

    ``l + G·a + ½aᵀHa + ½tr(HY)`` with ``a``, ``Y`` from :func:`iterate_average_moments`.
    Comparing ``weights`` at constant ``lrs = [η]*k`` with ``weights=None`` at
    ``lrs = [η c_s]`` (:func:`equivalent_schedule`) tests seed 002's equivalences: they
    agree through ``η¹`` (and the noise term ``(η²/2B)Σc_s² tr(HC)`` agrees) but the mean
    differs at ``η²`` by ``Σ_{r<s} c_s(1 − c_r)·HG``, so the loss differs by
    ``η²Σ_{r<s}c_s(1 − c_r)·GᵀHG + O(η³)``.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.ones(1), torch.eye(1), torch.eye(1))
        >>> avg = iterate_average_test_loss(q, lrs=[0.01] * 2, weights=[0.5, 0, 0.5])
        >>> sch = iterate_average_test_loss(q, lrs=[0.005] * 2)
        >>> round(float(avg - sch) / 0.01**2, 2)  # ≈ c_1(1 − c_0)·GᵀHG = ¼
        0.25
    """
    a, cov_a = iterate_average_moments(model, lrs=lrs, weights=weights, batch_size=batch_size)
    h = model.hess.to(torch.float64)
    return (
        model.loss.to(torch.float64)
        + model.grad.to(torch.float64) @ a
        + 0.5 * a @ h @ a
        + 0.5 * torch.trace(h @ cov_a)
    )


# Names of the engine's contractions through η³ (perturb.series, online SGD, cumulant form).
_CONTRACTIONS = {
    "l": 0,
    "G·G": 1,
    "G·H·G": 2,
    "tr(C H)": 2,
    "G·H·H·G": 3,
    "tr(C H H)": 3,
    "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": 3,
    "G_a J_abc G_b G_c": 3,
    "C_(a,b) J_abc G_c": 3,
    "J:S": 3,
}


def _weighted_coefficients(alphas: list, ws: list, b) -> dict:
    """Coefficients of the contractions in ``_CONTRACTIONS`` for rates ``α``, weights ``w``."""
    k = len(alphas)
    beta = [alphas[p] * sum(ws[p + 1 :]) for p in range(k)]
    a1 = [sum(alphas[:s]) for s in range(k)]  # A_s = Σ_{r<s} α_r
    a2 = [sum(x**2 for x in alphas[:s]) for s in range(k)]  # Σ_{r<s} α_r²
    ab = [sum(alphas[r] * beta[r] for r in range(s)) for s in range(k)]  # Σ_{r<s} α_r β_r
    s1, s2, s3 = sum(beta), sum(x**2 for x in beta), sum(x**3 for x in beta)
    chain = sum(beta[s] * a1[s] for s in range(k))
    return {
        "l": sum(ws),
        "G·G": -s1,
        "G·H·G": chain + s1**2 / 2,
        "tr(C H)": s2 / (2 * b),
        "G·H·H·G": -sum(beta[s] * (a1[s] ** 2 - a2[s]) / 2 for s in range(k)) - s1 * chain,
        "tr(C H H)": -sum(beta[s] * ab[s] for s in range(k)) / b,
        "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": -sum(beta[s] ** 2 * a1[s] for s in range(k)) / b,
        "G_a J_abc G_b G_c": -sum(beta[s] * a1[s] ** 2 for s in range(k)) / 2 - s1**3 / 6,
        "C_(a,b) J_abc G_c": -sum(beta[s] * a2[s] for s in range(k)) / (2 * b) - s1 * s2 / (2 * b),
        "J:S": -s3 / (6 * b**2),
    }


def _series_from(coefficients: dict, *, steps: int, batch_size: int, order: int):
    import sympy as sp

    from perturb.symbolic.schedules import Online
    from perturb.symbolic.series import Series, Term, series

    contractions = {}
    for term in series(3, Online()).terms:
        contractions[term.contraction.text] = term.contraction
    missing = set(_CONTRACTIONS) - set(contractions)
    if missing:
        raise RuntimeError(
            f"perturb.symbolic.series no longer names the contractions {sorted(missing)}"
        )
    terms = tuple(
        Term(_CONTRACTIONS[name], sp.sympify(value), contractions[name])
        for name, value in coefficients.items()
        if _CONTRACTIONS[name] <= order and sp.simplify(value) != 0
    )
    sched = Online(steps=steps, batch_size=batch_size)
    return Series(order=order, schedule=sched, quantity="test", form="cumulant", terms=terms)


def _check_order(order: object) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 3:
        raise ValueError(f"order must be an integer in 0 … 3, got {order!r}")
    return order


def weighted_iterate_series(
    *, weights: object, rates: object = None, batch_size: int = 1, order: int = 3
):
    """η-series of ``E l(Σ_t w_tθ_t)`` for online SGD with learning rate ``ηα_t`` at step ``t``.

    Unrolling ``θ_{t+1} = θ_t − ηα_t ∇l_{x_t}(θ_t)`` around ``θ_0`` (batch means of ``B``
    iid samples; ``g_s, H_s, J_s`` the derivatives of step ``s``'s batch at ``θ_0``) gives
    ``D = Σ_t w_t(θ_t − θ_0) = ηD₁ + η²D₂ + η³D₃ + …`` with ``β_p = α_p Σ_{t>p} w_t``,
    ``A_s = Σ_{r<s} α_r``:

    ``D₁ = −Σ_p β_p g_p``,  ``D₂ = Σ_{r<s} β_sα_r H_s g_r``,
    ``D₃ = −Σ_{q<r<s} β_sα_rα_q H_sH_r g_q − ½Σ_s β_s Σ_{r,r'<s} α_rα_{r'} J_s[g_r, g_{r'}]``,

    and ``E l(θ_0 + D) = l + G·ED + ½E DᵀHD + ⅙E J[D,D,D] + …``.  Taking expectations
    (``E g gᵀ = GGᵀ + C/B``, ``Cov(g, H_s) = ⟨∇l,∇∇l⟩/B``, third cumulant ``S/B²``) the
    coefficients of the engine's contractions are, with ``Σβ^j = Σ_p β_p^j``:

    * ``η¹``: ``G·G``: ``−Σβ``.
    * ``η²``: ``G·H·G``: ``Σ_s β_sA_s + (Σβ)²/2``; ``tr(C H)``: ``Σβ²/(2B)``.
    * ``η³``: ``G·H·H·G``: ``−Σ_s β_s Σ_{q<r<s}α_rα_q − Σβ·Σ_s β_sA_s``;
      ``tr(C H H)``: ``−Σ_{r<s} β_sα_rβ_r/B``; ``G_a⟨∇l,∇∇l⟩_(c,ab)H_bc``:
      ``−Σ_s β_s²A_s/B``; ``G_aJ_abcG_bG_c``: ``−½Σ_s β_sA_s² − (Σβ)³/6``;
      ``C_(a,b)J_abcG_c``: ``−½Σ_s β_s Σ_{r<s}α_r²/B − Σβ·Σβ²/(2B)``; ``J:S``: ``−Σβ³/(6B²)``.

    With ``α = 1`` and ``w = (0, …, 0, 1)`` these are the engine's online-SGD
    coefficients (``perturb.series(3, Online(...))``).

    Args:
        weights: ``w_0 … w_k``, one per iterate.
        rates: ``α_0 … α_{k−1}`` (default all 1).
        batch_size: ``B``.
        order: highest power of η kept (``≤ 3``).

    Returns:
        A :class:`perturb.Series` (schedule ``Online(steps=k, batch_size=B)``), exact when
        the inputs are rational; evaluate it with :meth:`perturb.Series.evaluate`.

    Example:
        >>> s = weighted_iterate_series(weights=averaging_weights("two_point", steps=2), order=2)
        >>> print(s.to_text())  # doctest: +NORMALIZE_WHITESPACE
        η^0: (1)·l
        η^1: (-1)·G·G
        η^2: (1)·G·H·G + (1/4)·tr(C H)
    """
    order = _check_order(order)
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of numbers, got {weights!r}")
    ws = [_number(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(ws) < 2:
        raise ValueError(f"weights needs one entry per iterate θ_0 … θ_k (k ≥ 1), got {len(ws)}")
    k = len(ws) - 1
    if rates is None:
        alphas = [_number(1, "rates")] * k
    else:
        if isinstance(rates, str | bytes) or not hasattr(rates, "__len__"):
            raise TypeError(f"rates must be a sequence of numbers, got {rates!r}")
        alphas = [_number(a, f"rates[{i}]") for i, a in enumerate(rates)]
        if len(alphas) != k:
            raise ValueError(f"rates needs len(weights) − 1 = {k} entries, got {len(alphas)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    coefficients = _weighted_coefficients(alphas, ws, _number(batch_size, "batch_size"))
    return _series_from(coefficients, steps=k, batch_size=batch_size, order=order)


def averaging_gap_series(weights: object, *, batch_size: int = 1, order: int = 3):
    """Where seed 002's averaging ↔ schedule equivalence breaks: ``E l(avg) − E l(schedule)``.

    The average ``Σ_t w_tθ_t`` of a constant-``η`` side-trip minus the last iterate of SGD
    on :func:`equivalent_schedule` ``η c_s`` (same ``θ_0``, same batches), as an η-series
    (difference of two :func:`weighted_iterate_series`; both have ``β_s = c_s``, so ``D₁``
    and every term built from ``D₁`` alone — ``G·G``, ``tr(C H)``, ``J:S`` — cancel).  What
    is left, with ``c`` the schedule:

    * ``η²``: ``Σ_{r<s} c_s(1 − c_r) · G·H·G`` — the equivalence holds through ``η¹``
      on any landscape and, at ``η²``, exactly when ``G = 0`` (no third derivative here:
      the iterates the gradients are taken at differ by ``O(η)``, felt through ``H``);
    * ``η³``: ``G·H·H·G``, ``tr(C H H)``, the gradient–Hessian cumulant and, from the
      third derivative, ``−½Σ_s c_s Σ_{r<s}(1 − c_r²)/B · C_(a,b)J_abcG_c`` (the noise-
      driven drift ``−½J[C]`` is built at the full ``η`` along the averaged trajectory)
      and ``−½Σ_s c_s (s² − (Σ_{r<s}c_r)²) · G_aJ_abcG_bG_c``.

    Example:
        >>> print(averaging_gap_series(averaging_weights("two_point", steps=2), order=2))
        η^0: 0
        η^1: 0
        η^2: (1/4)·G·H·G
    """
    order = _check_order(order)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    w = _weights(weights)
    c = equivalent_schedule(w)
    b = _number(batch_size, "batch_size")
    a = _weighted_coefficients([_number(1, "rate")] * len(c), w, b)
    s = _weighted_coefficients(c, [0] * len(c) + [1], b)
    diff = {name: a[name] - s[name] for name in a}
    return _series_from(diff, steps=len(c), batch_size=batch_size, order=order)
