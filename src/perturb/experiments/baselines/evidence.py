"""Bayesian evidence and the SGD noise scale (seed 004, Smith & Le).

The Laplace approximation of a model's evidence around its MAP fit (with an exact
logistic-regression MAP to try it on), and seed 004's noise scale
``g = ε(N/B − 1)/(1 − m)`` with the batch size that holds it fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from perturb.checks import check_int, check_positive

__all__ = [
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
    check_positive("scale", scale)
    _check_noise_args(lr, dataset_size, 1, momentum)
    return lr * dataset_size / (scale * (1 - momentum) + lr)


def _check_noise_args(lr, dataset_size, batch_size, momentum) -> None:
    check_positive("lr", lr)
    check_int("dataset_size", dataset_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if batch_size > dataset_size:
        raise ValueError(f"batch_size ({batch_size}) exceeds dataset_size ({dataset_size})")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
