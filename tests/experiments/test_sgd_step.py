"""Tests for perturb.experiments.sgd_step: the step, the loss evaluation, divergence limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturb.experiments import sgd_step
from perturb.experiments.sgd_step import (
    loss_limit,
    make_loop_step,
    make_step,
    mean_loss,
    run_trials,
)
from perturb.experiments.simulation_setup import make_setup
from perturb.symbolic.schedules import Epochs, Online


def _loss(theta, x, y):
    return 0.5 * (x @ theta - y) ** 2 + 0.1 * torch.tanh(theta).sum()


def _data(n=40, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def test_vmapped_step_equals_the_autograd_step():
    x, y = _data()
    thetas = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lr = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    alive = torch.ones(5, dtype=torch.bool)
    xb, yb = x[:10].reshape(5, 2, 3), y[:10].reshape(5, 2)
    new, ok = torch.func.vmap(make_step(_loss, 1e8))(thetas, xb, yb, lr, alive)
    loop = make_loop_step(_loss, 1e8)
    for k in range(5):
        ref, ok_k = loop(thetas[k], xb[k], yb[k], lr[k], alive[k])
        torch.testing.assert_close(new[k], ref, rtol=0, atol=1e-15)
        assert bool(ok[k]) and bool(ok_k)
    torch.testing.assert_close(new[0], thetas[0], rtol=0, atol=0)  # η = 0: no move


def test_step_freezes_dead_and_blown_up_trials():
    step = torch.func.vmap(make_step(lambda t, x, y: 0.5 * x * t[0] ** 2, 10.0))
    theta = torch.ones(3, 1, dtype=torch.float64)
    x = torch.tensor([[1.0], [1.0], [100.0]], dtype=torch.float64)  # batch loss 50 > 10
    alive = torch.tensor([True, False, True])
    new, ok = step(theta, x, torch.zeros(3, 1), torch.tensor([0.5, 0.5, 0.5]).double(), alive)
    assert ok.tolist() == [True, False, False]
    assert new.flatten().tolist() == [0.5, 1.0, 1.0]


@pytest.mark.parametrize("vectorized", [True, False])
def test_mean_loss_in_chunks_matches_a_direct_mean(monkeypatch, vectorized):
    x, y = _data(n=50)
    thetas = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    idx = torch.randint(0, 50, (4, 30), generator=torch.Generator().manual_seed(3))
    full = torch.stack([_loss(t, x, y).mean() for t in thetas])
    own = torch.stack([_loss(t, x[i], y[i]).mean() for t, i in zip(thetas, idx, strict=True)])
    for budget in (1 << 15, 7):  # one chunk, or many
        monkeypatch.setattr(sgd_step, "_EVAL_BUDGET", budget)
        got = mean_loss(_loss, thetas, x, y, vectorized=vectorized)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-14)
        got = mean_loss(_loss, thetas, x, y, idx, vectorized=vectorized)
        torch.testing.assert_close(got, own, rtol=0, atol=1e-14)


def test_loss_limit():
    """f·max(L_0, L_∅) over the finite positive levels; none (or no factor): no limit."""
    assert loss_limit(2.0, factor=10.0) == 20.0
    assert loss_limit(0.0064, 1.0986, factor=10.0) == 10 * 1.0986  # near a minimum
    assert loss_limit(2.0, 1.0, factor=10.0) == 20.0
    assert loss_limit(2.0, 1.0, factor=None) == math.inf
    for start in (0.0, -3.0, float("nan"), float("inf")):
        assert loss_limit(start, 0.5, factor=10.0) == 5.0
        assert loss_limit(start, start, factor=10.0) == math.inf


def test_run_trials_vectorized_equals_loop_and_reports_the_start():
    x, y = _data()
    schedule = Epochs(train_size=6, batch_size=2, epochs=2, shuffle=True)
    s = make_setup(_loss, torch.zeros(3), (x, y), schedule, lr=[0.1, 0.3], trials=5,
                   seed=4, record_every=2, chunk=3)  # fmt: skip
    vec, loop = run_trials(s, vectorized=True), run_trials(s, vectorized=False)
    for field in ("test_loss", "train_loss", "curve"):
        np.testing.assert_allclose(getattr(vec, field), getattr(loop, field), rtol=0, atol=1e-13)
    start = float(_loss(torch.zeros(3, dtype=torch.float64), x, y).mean())
    assert vec.start_loss == pytest.approx(start, abs=1e-15) and vec.limit == 10 * vec.start_loss
    assert not vec.diverged.any() and vec.curve.shape == (2, 5, 4)


def test_a_record_over_the_limit_is_reported_and_the_trial_goes_on():
    """Above the limit at a recorded step is information only: the trial keeps running."""

    def loss_fn(theta, x, y):  # η = 2.5: θ = 1, -1.5, 2.25, ...; loss 0.5, 1.125, 2.53, ...
        return 0.5 * theta[0] ** 2 + 0 * x

    s = make_setup(loss_fn, torch.ones(1), (torch.zeros(2), torch.zeros(2)),
                   Online(steps=4, batch_size=1), lr=2.5, trials=2, record_every=1,
                   diverge_factor=4.0)  # fmt: skip
    out = run_trials(s, vectorized=True)
    assert out.limit == 2.0 and out.scale == 0.0 and not out.diverged.any()
    expected = [0.5 * 1.5 ** (2 * t) for t in range(5)]
    np.testing.assert_allclose(out.curve[0], [expected] * 2, rtol=1e-15, atol=0)
    np.testing.assert_allclose(out.test_loss, [[expected[-1]] * 2], rtol=1e-15, atol=0)
    loop = run_trials(s, vectorized=False)
    np.testing.assert_array_equal(loop.curve, out.curve)


def test_a_non_finite_loss_kills_the_trial_for_good():
    """θ_0 = 1e153, η = 2.5: θ_t = (−1.5)^t·1e153, and ½θ_t² overflows once
    |θ_t| > 1.34e154 (t = 7): from that record on the trial is dead, its θ frozen."""

    def loss_fn(theta, x, y):
        return 0.5 * theta[0] ** 2 + 0 * x

    theta0 = torch.full((1,), 1e153, dtype=torch.float64)
    s = make_setup(loss_fn, theta0, (torch.zeros(2), torch.zeros(2)),
                   Online(steps=9, batch_size=1), lr=2.5, trials=2, record_every=1)  # fmt: skip
    out = run_trials(s, vectorized=True)
    with np.errstate(over="ignore"):
        theta = 1e153 * (-1.5) ** np.arange(10)
        expected = 0.5 * theta**2
    first = int(np.argmax(~np.isfinite(expected)))
    assert first == 7 and out.diverged.all() and np.isnan(out.test_loss).all()
    np.testing.assert_allclose(out.curve[0, :, :first], [expected[:first]] * 2, rtol=1e-14)
    assert np.isnan(out.curve[0, :, first:]).all()
    loop = run_trials(s, vectorized=False)
    np.testing.assert_array_equal(loop.curve, out.curve)


def test_cuda_graph_switch_is_public():
    assert sgd_step.CUDA_GRAPHS is True
