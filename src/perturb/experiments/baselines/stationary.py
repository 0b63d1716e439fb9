"""Stationary laws near a minimum: covariances, the Boltzmann ratio, SLQ log-determinants.

Near a minimum with mean Hessian ``H`` and gradient-noise covariance ``C``, SGD's
iterates settle into a stationary law whose covariance ``Σ`` solves the discrete
Lyapunov equation ``Σ = KΣK + (η²/B)C``, ``K = I − ηH`` (or its continuous limit
``HΣ + ΣH = (η/B)C``); seed 001 compares two minima by the ratio of their Boltzmann
weights, whose log-determinants are estimated by stochastic Lanczos quadrature, and
seed 002 averages the iterates of a stationary run (two-point and EMA averages).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
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
