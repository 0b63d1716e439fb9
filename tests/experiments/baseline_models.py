"""Problems and helpers shared by the tests of perturb.experiments.baselines (not a test file).

Imported by the test_baselines_*.py files (``from baseline_models import ...``): a random
quadratic model, a linear problem with non-commuting ``H`` and ``C`` on a finite population,
the z-scores of simulated second moments, and the z threshold of every simulation test.
"""

from __future__ import annotations

import math

import torch

from perturb.experiments.baselines import QuadraticModel


def _model(p=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    b = torch.randn(p, p, generator=gen, dtype=torch.float64)
    cov = b @ b.T / p  # does not commute with hess
    grad = torch.randn(p, generator=gen, dtype=torch.float64)
    return QuadraticModel(torch.tensor(2.0, dtype=torch.float64), grad, hess, cov)


# Each simulation test compares n_cmp statistics with |z| < Z_MAX; for Gaussian z the
# false-failure rate is ≤ n_cmp · P(|z| > 4.5) = n_cmp · 6.8e-6 (Bonferroni), e.g. ≤ 3e-4
# for the 44 comparisons below.  The seeds are fixed, so the outcome is reproducible.
Z_MAX = 4.5


def _linear_problem(p=4, n=64, seed=0):
    """Non-commuting ``H`` (eigenvalues in [0.3, 3]) and a finite population of ``x``.

    Per-sample loss ``l_x(θ) = ½θᵀHθ + xᵀθ``; the ``x`` are centred, so the minimum is
    ``θ* = 0`` and ``C = Σ_x xxᵀ/n`` is the exact per-sample gradient covariance.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.linspace(0.3, 3.0, p, dtype=torch.float64)) @ q.T
    mix = torch.randn(p, p, generator=gen, dtype=torch.float64)
    xs = torch.randn(n, p, generator=gen, dtype=torch.float64) @ mix
    xs = xs - xs.mean(0)
    c = xs.T @ xs / n
    assert torch.linalg.norm(h @ c - c @ h) > 0.1 * torch.linalg.norm(h) * torch.linalg.norm(c)
    return h, c, xs


def _zscores(per_chain, predicted, h):
    """z of each unique entry and of ``½tr(H·)``: chains independent ⇒ SE = sd/sqrt(chains)."""
    m = per_chain.shape[0]
    iu = torch.triu_indices(*predicted.shape)
    ent = per_chain[:, iu[0], iu[1]]
    loss = 0.5 * torch.einsum("ij,cji->c", h, per_chain)
    samples = torch.cat([ent, loss[:, None]], 1)
    target = torch.cat([predicted[iu[0], iu[1]], (0.5 * torch.trace(h @ predicted))[None]])
    se = samples.std(0) / math.sqrt(m)
    return (samples.mean(0) - target) / se, samples.mean(0), se
