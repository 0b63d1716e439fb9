"""The predictors of perturb.experiments.predictors on landscapes with exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import perturb
from perturb.experiments.predictors import ladder_terms, resummed_predictions
from perturb.numeric.validity import hessian_ladder
from perturb.reference.enumeration import expected_loss

H = np.array([[1.0, 0.3], [0.3, 0.5]])
A1, A2 = np.array([[0.6, -0.2], [-0.2, 0.1]]), np.array([[-0.1, 0.4], [0.4, -0.5]])
G, ZETA = np.array([0.7, -0.4]), np.array([0.5, 0.8])


def _population(pairs):
    """``l_i(θ) = ½θᵀH_iθ + g_iᵀθ`` for the pairs ``(H_i, g_i)``: rows and per-row loss."""
    rows = torch.tensor(np.array([np.concatenate([h.reshape(-1), g]) for h, g in pairs]))

    def loss(theta, row):
        return 0.5 * theta @ row[:4].reshape(2, 2) @ theta + row[4:] @ theta

    return rows, loss


def _stats(rows, loss, sched):
    pop = perturb.Population(loss, rows)
    zero = torch.zeros(2, dtype=torch.float64)
    return perturb.measure(
        pop, None, zero, order=3, schedules=[sched], exact=True, resummed=True, rank=2,
        progress=False,
    )  # fmt: skip


@pytest.mark.parametrize(("batch_size", "steps", "lr"), [(1, 5, 0.4), (2, 3, 0.4), (1, 4, 0.8)])
def test_resummed_3_plus_ladder_is_exact_on_a_quadratic_with_independent_hessians(
    batch_size, steps, lr
):
    """Every pair of three Hessian fluctuations and two gradient noises: on a quadratic
    landscape (no ``J``) with ``A_i`` independent of ``ζ_i`` the three-edge diagrams hold
    everything but the ladder, so "resummed 3" plus :func:`ladder_terms` is the exact
    expected loss of every sample sequence enumerated; "resummed 3" alone misses it by
    the ladder."""
    pairs = [(H + a, G + s * ZETA) for a in (A1, A2, -A1 - A2) for s in (1.0, -1.0)]
    rows, loss = _population(pairs)
    sched = perturb.Online(steps=steps, batch_size=batch_size)
    zero = torch.zeros(2, dtype=torch.float64)
    exact = expected_loss(loss, rows, zero, sched, lr=lr)
    stats = _stats(rows, loss, sched)
    three = resummed_predictions(stats, sched, [lr])["resummed 3"].values[0]
    ladder, error = ladder_terms(stats, [lr], [steps], batch_size=batch_size)
    assert three + ladder[0, 0] == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert abs(three - exact) > 1e-3
    half = hessian_ladder(stats.subspace, lr=[lr], steps=steps, batch_size=batch_size, rank=1)
    assert error[0, 0] == pytest.approx(abs(ladder[0, 0] - half[0]), rel=1e-12)


def test_ladder_terms_are_nan_without_per_sample_hessians():
    rows, loss = _population([(H, G + ZETA), (H, G - ZETA)])
    sched = perturb.Online(steps=2, batch_size=1)
    pop = perturb.Population(loss, rows)
    stats = perturb.measure(pop, None, torch.zeros(2, dtype=torch.float64), order=2,
                            schedules=[sched], exact=True, progress=False)  # fmt: skip
    ladder, error = ladder_terms(stats, [0.1, 0.2], [1, 2], batch_size=1)
    assert ladder.shape == error.shape == (2, 2)
    assert np.isnan(ladder).all() and np.isnan(error).all()
