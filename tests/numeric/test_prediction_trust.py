"""``perturb.predict(...).trust``: the computation ``Statistics.trust`` does, on the
population measured exactly, and calibrated against brute-force enumeration of SGD on
generic polynomial populations (correlated per-sample Hessians and gradients, a cubic term).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.prediction import TRUST_ORDER
from perturb.numeric.stability import per_sample_top_curvatures
from perturb.reference.enumeration import expected_loss


def _population(seed: int, *, rows: int, params: int, cubic: float = 0.3):
    """``l_i(θ) = ½θᵀA_iθ + g_iᵀθ + c(u_iᵀθ)³/6`` with ``A_i`` and ``g_i`` built from one
    latent ``z_i`` per row (so they are correlated across rows), ``A_i`` positive definite."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, params, generator=gen, dtype=torch.float64)
    base = torch.randn(params, params, generator=gen, dtype=torch.float64)
    mean = base @ base.T / params + 0.5 * torch.eye(params, dtype=torch.float64)
    mix = torch.randn(params, params, generator=gen, dtype=torch.float64)
    cross = torch.einsum("ia,ab->iab", z, mix)
    hess = mean + 0.6 * z[:, :, None] * z[:, None, :] + 0.3 * (cross + cross.transpose(1, 2))
    grad = torch.randn(params, generator=gen, dtype=torch.float64) + z
    u = torch.randn(rows, params, generator=gen, dtype=torch.float64)
    data = torch.cat([hess.reshape(rows, -1), grad, u], dim=1)
    p2 = params * params

    def loss(theta, row):
        h, g, v = row[:p2].reshape(params, params), row[p2 : p2 + params], row[p2 + params :]
        return 0.5 * theta @ h @ theta + g @ theta + cubic * (v @ theta) ** 3 / 6

    return loss, data


def _top_curvatures(loss, data, theta0) -> np.ndarray:
    """``λ_max(H_i)`` of every row, from autograd Hessians (not perturb's tensors)."""
    return np.array(
        [
            float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(
                lambda t, row=row: loss(t, row), theta0))[-1])
            for row in data
        ]
    )  # fmt: skip


def _same_trust(got, want):
    assert got.steps == want.steps and got.trials == want.trials
    for name in ("lr", "value", "error_estimate", "trusted_eta_t"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=0)
    assert got.trusted.tolist() == want.trusted.tolist()
    assert got.trusted_steps.tolist() == want.trusted_steps.tolist()
    assert sorted(got.checks) == sorted(want.checks)
    for key, value in want.checks.items():
        np.testing.assert_allclose(got.checks[key], value, rtol=1e-12, atol=1e-15)


CASES = [  # (schedule, quantity, order, resummed); GD's gap (two series) under -m slow
    (perturb.Online(steps=4, batch_size=1), "test", 2, False),
    (perturb.Online(steps=4, batch_size=1), "test", 2, True),
    pytest.param(perturb.GD(train_size=3, steps=3), "gap", 1, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("schedule", "quantity", "order", "resummed"), CASES)
def test_trust_is_statistics_trust_of_the_exactly_measured_population(
    schedule, quantity, order, resummed
):
    loss, data = _population(0, rows=3, params=2)
    pop, theta0, lr = perturb.Population(loss, data), torch.tensor([0.3, -0.2]), 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        pred = perturb.predict(
            pop, theta0, schedule, lr=lr, order=order, quantity=quantity, resummed=resummed,
            trials=16,
        )  # fmt: skip
        stats = perturb.measure(
            loss, data, theta0, order=max(order, TRUST_ORDER), schedules=[schedule],
            quantities=(quantity,), exact=True, progress=False, resummed=resummed,
            rank=2 if resummed else None,
        )  # fmt: skip
        want = stats.trust(
            schedule, lr=[lr], quantity=quantity, order=order, resummed=resummed, trials=16,
            sample_curvatures=_top_curvatures(loss, data, theta0.double()),
        )  # fmt: skip
    assert pred.trust is pred.trust  # assessed once, when first read
    _same_trust(pred.trust, want)
    assert pred.trust.value[0] == pytest.approx(pred.total, rel=1e-12)  # this prediction's
    if not resummed:  # another rate: the trust is assessed there
        other = pred.at(0.05)
        assert other.trust.lr.tolist() == [0.05]
        assert other.trust.value[0] == pytest.approx(other.total, rel=1e-12)


def test_lanczos_trust_is_that_of_the_same_subspace():
    loss, data = _population(1, rows=3, params=4)
    pop, theta0 = perturb.Population(loss, data), 0.1 * torch.ones(4, dtype=torch.float64)
    sched = perturb.Online(steps=3, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        pred = perturb.predict(
            pop, theta0, sched, lr=0.05, order=2, resummed=True, method="lanczos", rank=2
        )
        stats = perturb.measure(
            loss, data, theta0, order=TRUST_ORDER, schedules=[sched], exact=True,
            progress=False, resummed=True, rank=2,
        )  # fmt: skip
        want = stats.trust(
            sched, lr=[0.05], order=2, resummed=True,
            sample_curvatures=per_sample_top_curvatures(loss, data, theta0)[1],
        )  # fmt: skip
    _same_trust(pred.trust, want)
    assert pred.trust.value[0] == pytest.approx(pred.total, rel=1e-12)


PREDICTORS = [(False, 1), (False, 2), (False, 3), (True, 1), (True, 2), (True, 3)]


def _calibration(loss, data, theta0, steps, lrs, predictors):
    """``(trusted, covered, misses)`` over the grid: a trusted prediction is covered when
    its error against the exact enumeration is at most its error estimate."""
    pop = perturb.Population(loss, data)
    trusted, covered, misses = 0, 0, []
    for t in steps:
        sched = perturb.Online(steps=t, batch_size=1)
        for lr in lrs:
            exact = expected_loss(loss, data, theta0, sched, lr=lr)
            for resummed, order in predictors:
                pred = perturb.predict(pop, theta0, sched, lr=lr, order=order, resummed=resummed)
                if not pred.trust.trusted[0]:
                    continue
                trusted += 1
                error, estimate = abs(pred.total - exact), float(pred.trust.error_estimate[0])
                covered += error <= estimate
                if error > estimate:
                    misses.append((t, lr, resummed, order, error, estimate))
    return trusted, covered, misses


def test_trusted_predictions_are_within_their_estimate_of_the_enumeration():
    """Fast twin of the grid below: T = 4, η = 0.1, order 2 (untrusted) and the re-summed
    2 and 3 edges (trusted)."""
    loss, data = _population(0, rows=3, params=2)
    theta0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    predictors = [(False, 2), (True, 2), (True, 3)]
    trusted, covered, misses = _calibration(loss, data, theta0, [4], [0.1], predictors)
    assert (trusted, covered, misses) == (2, 2, [])


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "rows", "params", "least"), [(0, 3, 2, 25), (1, 2, 3, 16)])
def test_trusted_predictions_are_within_their_estimate_on_the_grid(seed, rows, params, least):
    """Online B = 1, T ∈ {2, 4, 6}, η ∈ {0.05, 0.1, 0.2}, orders 1–3 of the series and of
    the re-summed diagrams: 54 predictions per population, every trusted one within its
    estimate (25 and 16 trusted; the largest error / estimate among them 0.96 and 0.94)."""
    loss, data = _population(seed, rows=rows, params=params)
    theta0 = torch.linspace(0.3, -0.2, params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        trusted, _, misses = _calibration(
            loss, data, theta0, [2, 4, 6], [0.05, 0.1, 0.2], PREDICTORS
        )
    assert misses == []
    assert trusted >= least  # not vacuous


def test_trust_is_none_where_it_cannot_be_assessed_and_trials_are_checked():
    loss, data = _population(0, rows=2, params=2)
    pop, theta0 = perturb.Population(loss, data), torch.zeros(2, dtype=torch.float64)
    sched = perturb.Online(steps=2, batch_size=1)
    moved = perturb.predict(pop, theta0, sched, lr=0.1, order=1, quantity="displacement")
    assert moved.trust is None  # a vector: the rule judges a scalar loss
    integral = perturb.predict(pop, theta0, sched, lr=0.1, order=1, resummed=True, integral=True)
    assert integral.trust is None  # the estimate is of the exact sums, not the integrals
    assert perturb.Prediction("test", lr=0.1, values=(1.0,)).trust is None  # no assessor
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="trials"):
            perturb.predict(pop, theta0, sched, lr=0.1, order=1, trials=bad)
