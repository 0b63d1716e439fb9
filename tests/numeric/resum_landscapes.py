"""Small landscapes with exact answers, shared by the re-summation and Krylov tests."""

from __future__ import annotations

import numpy as np
import torch

import perturb


def linear_gaussian(p: int, rows: int, seed: int):
    """l_x(θ) = ½θᵀHθ + xᵀθ over a finite population of x; H and C do not commute."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.2 * torch.eye(p, dtype=torch.float64)
    xs = torch.randn(rows, p, generator=gen, dtype=torch.float64) @ torch.randn(
        p, p, generator=gen, dtype=torch.float64
    ) + torch.randn(p, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64)

    def loss_fn(theta, x):
        return 0.5 * theta @ hess @ theta + x @ theta

    return hess, xs, theta0, loss_fn


def exact_test_loss(hess, xs, theta0, lr, steps, *, batch_size=None, train_size=None):
    """Exact E l(θ_T) from the first two moments (online: fresh batches; GD: fixed set),
    by the step-by-step recursion (numpy: small matrices, many steps)."""
    hess, xs, theta0 = (np.asarray(a, dtype=np.float64) for a in (hess, xs, theta0))
    mu = xs.mean(0)
    cov = (xs - mu).T @ (xs - mu) / xs.shape[0]
    k = np.eye(len(mu)) - lr * hess
    mean = theta0.copy()
    sigma = np.zeros_like(hess)
    if batch_size is not None:
        for _ in range(steps):
            mean = k @ mean - lr * mu
            sigma = k @ sigma @ k + lr**2 * cov / batch_size
    else:
        acc = np.zeros_like(hess)  # Σ_s η K^s applied to the training-set mean
        power = np.eye(len(mu))
        for _ in range(steps):
            acc = acc + lr * power
            power = k @ power
        mean = power @ theta0 - acc @ mu
        sigma = acc @ (cov / train_size) @ acc.T
    return float(0.5 * np.trace(hess @ (sigma + np.outer(mean, mean))) + mu @ mean)


def tanh_net(seed: int, weight_decay: float = 0.0):
    """A 2-3-1 tanh regression net (13 parameters) on 3 rows, float64."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    theta = 0.7 * torch.randn(13, generator=gen, dtype=torch.float64)

    def loss_fn(p, row):
        w1, b1, w2, b2 = p[:6].reshape(3, 2), p[6:9], p[9:12], p[12]
        fit = 0.5 * (w2 @ torch.tanh(w1 @ row[:2] + b1) + b2 - row[2]) ** 2
        return fit + weight_decay * (p @ p)

    return perturb.Population(loss_fn, data), theta
