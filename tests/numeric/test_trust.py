"""The trust rule and the predicted spread of SGD's loss, against brute force."""

import itertools

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.trust import resolution, trust_mask
from perturb.numeric.validity import loss_spread


def _deviation_moments(hess, grad, cov, lr, schedule):
    """Mean and covariance of ``Δθ_T`` on the quadratic model, by brute force.

    ``Δ_T = A G + Σ_i A_i ζ_i`` with ``A = −η Σ_t K^{T−1−t}`` and
    ``A_i = −(η/B) Σ_{t: i ∈ b_t} K^{T−1−t}`` for the training points ``i`` (online: one
    fresh point set per step); reshuffled epochs average over every permutation.
    """
    m, b, e = int(schedule.batches), int(schedule.batch_size), int(schedule.epochs)
    n, steps = m * b, m * e
    k = torch.eye(hess.shape[0], dtype=torch.float64) - lr * hess
    powers = [torch.linalg.matrix_power(k, steps - 1 - t) for t in range(steps)]
    mean = -lr * sum(powers) @ grad

    def noise(orders):
        total = 0.0
        for i in range(n):
            a = sum(powers[ep * m + orders[ep].index(i) // b] for ep in range(e)) * (-lr / b)
            total = total + a @ cov @ a.T
        return total

    if schedule.name == "online":
        sigma = sum(q @ cov @ q.T for q in powers) * lr**2 / b
    elif schedule.shuffle:
        perms = list(itertools.permutations(range(n)))
        sigma = sum(noise(list(o)) for o in itertools.product(perms, repeat=e))
        sigma = sigma / len(perms) ** e
    else:
        sigma = noise([list(range(n))] * e)
    return mean, sigma


def _gaussian_loss_std(hess, grad, mean, sigma, draws=100_000, seed=0):
    """The loss ``G·δ + ½δᵀHδ`` of ``δ ~ N(μ, Σ)``, its standard deviation by sampling."""
    gen = np.random.default_rng(seed)
    d = gen.multivariate_normal(mean.numpy(), sigma.numpy(), size=draws, method="eigh")
    h, g = hess.numpy(), grad.numpy()
    values = d @ g + 0.5 * np.einsum("na,ab,nb->n", d, h, d)
    return values.std(), values.std() / np.sqrt(2 * draws)


SCHEDULES = [
    perturb.Online(steps=7, batch_size=1),
    perturb.Online(steps=40, batch_size=3),
    perturb.GD(train_size=5, steps=7),
    perturb.Epochs(train_size=4, batch_size=2, epochs=3),
    # reshuffled epochs of 2 batches: the twin of the fixed-order case above and of the
    # reshuffled case below (-m slow)
    pytest.param(
        perturb.Epochs(train_size=4, batch_size=2, epochs=3, shuffle=True),
        marks=pytest.mark.slow,
    ),
    perturb.Epochs(train_size=3, batch_size=1, epochs=4, shuffle=True),
]


@pytest.mark.parametrize(
    "schedule",
    SCHEDULES,
    ids=lambda s: f"{s.name}-M{s.batches}-B{s.batch_size}-E{s.epochs}{'-s' * s.shuffle}",
)
def test_loss_spread_is_the_spread_of_the_gaussian_deviation(schedule):
    """The closed-form pair weights give the brute-force covariance of ``Δθ_T`` (checked
    through the spread: a Gaussian with that covariance, sampled, has the predicted
    standard deviation of the loss within 4 standard errors: false-failure rate < 1e-4
    per case)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    hess = a @ a.T / 3 - 0.1 * torch.eye(3, dtype=torch.float64)  # one negative direction
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    cov, grad = b @ b.T / 5, torch.randn(3, generator=gen, dtype=torch.float64)
    for lr in (0.05, 0.3):
        mean, sigma = _deviation_moments(hess, grad, cov, lr, schedule)
        std, se = _gaussian_loss_std(hess, grad, mean, sigma)
        got = loss_spread(hess, grad, cov, lr=[lr], schedule=schedule)[0]
        assert abs(got - std) < 4 * se


def test_loss_spread_matches_real_online_sgd_with_gaussian_noise():
    """Online SGD on a quadratic with Gaussian gradient noise has an exactly Gaussian
    deviation: 40,000 seeded runs give the predicted spread of the loss within 4 standard
    errors (false-failure rate < 1e-4)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    hess = a @ a.T / 4
    chol = torch.randn(4, 4, generator=gen, dtype=torch.float64) / 2
    cov, grad = chol @ chol.T, torch.randn(4, generator=gen, dtype=torch.float64)
    lr, steps, runs = 0.2, 30, 40_000
    delta = torch.zeros(runs, 4, dtype=torch.float64)
    for _ in range(steps):
        noise = torch.randn(runs, 4, generator=gen, dtype=torch.float64) @ chol.T
        delta = delta - lr * (grad + delta @ hess + noise)
    loss = delta @ grad + 0.5 * ((delta @ hess) * delta).sum(1)
    std = float(loss.std())
    online = perturb.Online(steps=steps, batch_size=1)
    got = loss_spread(hess, grad, cov, lr=[lr], schedule=online)[0]
    assert got == pytest.approx(std, abs=4 * std / np.sqrt(2 * runs))


def test_loss_spread_edges():
    one = torch.ones(1, 1, dtype=torch.float64)
    assert np.isinf(loss_spread(one, one[0], one, lr=[5.0],
                                schedule=perturb.Online(steps=2000, batch_size=1)))[0]  # fmt: skip
    flat = torch.zeros(1, 1, dtype=torch.float64)  # h = 0: the r → 1 limit, Var = T η² C G²
    online = perturb.Online(steps=50, batch_size=1)
    got = loss_spread(flat, one[0], one, lr=[0.1], schedule=online)[0]
    assert got == pytest.approx(np.sqrt(50 * 0.01), rel=1e-9)
    with pytest.raises(ValueError, match="numeric Schedule, got"):
        loss_spread(one, one[0], one, lr=[0.1], schedule=perturb.Online())


def test_resolution_is_the_t_half_width_of_the_mean():
    assert resolution(np.array([2.0]), trials=1).tolist() == [2.0]
    assert resolution(np.array([1.0]), trials=4)[0] == pytest.approx(3.182446305 / 2, rel=1e-8)


def test_trust_mask_rules():
    est, val = np.full(6, 0.01), np.full(6, 1.05)
    got = trust_mask(
        est, val, start_loss=1.0,
        resolution=np.array([0.0, 0.01, 0.0, 0.01, 0.01, 0.01]),
        unstable=np.array([False, False, False, True, False, False]),
        excess=np.array([np.nan, 0.5, 0.0, 0.0, 2.0, 0.0]),
        overshoot=np.array([3.0, 3.0, np.nan, 0.5, 0.5, 3.0]),
        overshoot_draws=np.array([0.5, 0.5, 0.0, 0.0, 0.0, 1.0]),
    )  # fmt: skip
    assert got.tolist() == [False, True, False, False, False, False]
    assert trust_mask(np.array([0.004]), np.array([1.05]), start_loss=1.0).tolist() == [True]
    assert trust_mask(np.array([np.inf]), np.array([1.05]), start_loss=1.0,
                      resolution=np.inf).tolist() == [False]  # fmt: skip


def test_assess_reads_the_prediction_and_its_horizon_on_the_grid():
    """On an exact quadratic population (``l_i = ½|θ − x_i|²``, no subspace): the value is
    the series through ``order`` and the estimate is the next term plus its geometric
    continuation (:func:`truncation_estimates` of the order-2 prediction, by hand), and
    the horizon is the last grid point before the first untrusted verdict."""
    from perturb.numeric.validity import truncation_estimates

    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    st = perturb.measure(
        lambda p, r: ((p - r) ** 2).sum() / 2, x, torch.ones(2, dtype=torch.float64),
        order=2, exact=True, progress=False,
    )  # fmt: skip
    sched = perturb.Online(steps=50, batch_size=1)
    lrs = [0.001, 0.02, 0.3]
    got = st.trust(sched, lr=lrs, order=1)
    pred = st.predict(sched, lr=lrs, order=2)
    np.testing.assert_allclose(got.value, pred.by_order[:, :2].sum(1), rtol=1e-12)
    np.testing.assert_allclose(got.error_estimate, truncation_estimates(pred.by_order)[:, 1])
    for i, lr in enumerate(lrs):  # the verdicts on the grid, one at a time
        verdicts = []
        for t in _grid(50):
            one = st.trust(perturb.Online(steps=t, batch_size=1), lr=[lr], order=1, points=1)
            verdicts.append(bool(one.trusted[0]))
        first_bad = verdicts.index(False) if False in verdicts else len(verdicts)
        want = _grid(50)[first_bad - 1] if first_bad else 0
        assert got.trusted_steps[i] == want
    assert got.trusted_steps.tolist() != [got.trusted_steps[0]] * 3  # the grid discriminates
    payload = got.to_dict()
    assert payload["trusted_steps"] == got.trusted_steps.tolist()
    assert payload["checks"]["resolution"] == [0.0, 0.0, 0.0]  # no subspace: relative rule
    with pytest.raises(ValueError, match="displacement"):
        st.trust(sched, lr=lrs, quantity="displacement")


def _grid(steps):
    from perturb.numeric.trust import horizon_steps

    return horizon_steps(steps)
