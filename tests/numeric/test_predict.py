"""predict(exact=True) on a small tanh network against autodiff of unrolled SGD."""

from __future__ import annotations

import math

import pytest
import torch

import perturb
from perturb.reference import unroll_taylor


def _tanh_net():
    """A 2-3-1 tanh network with a squared loss: 13 parameters, 3 population rows."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(3, 3, generator=gen, dtype=torch.float64)  # (x1, x2, target)
    theta = 0.7 * torch.randn(13, generator=gen, dtype=torch.float64)

    def loss_fn(p, row):
        w1, b1, w2, b2 = p[:6].reshape(3, 2), p[6:9], p[9:12], p[12]
        h = torch.tanh(w1 @ row[:2] + b1)
        return 0.5 * (w2 @ h + b2 - row[2]) ** 2

    return loss_fn, data, theta


SCHEDULES = [
    ("online-T2-B1", perturb.Online(steps=2, batch_size=1), dict(kind="online", steps=2)),
    (
        "online-T2-B2",
        perturb.Online(steps=2, batch_size=2),
        dict(kind="online", steps=2, batch_size=2),
    ),
    (
        "epochs-N2-E2-shuffled",
        perturb.Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        dict(kind="epochs", train_size=2, batch_size=1, epochs=2, shuffle=True),
    ),
    (
        "gd-N3-T2",
        perturb.GD(train_size=3, steps=2),
        dict(kind="epochs", train_size=3, batch_size=3, epochs=2),
    ),
]


@pytest.mark.parametrize(("name", "schedule", "kwargs"), SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("quantity", ["test", "train", "gap"])
def test_tanh_network_matches_unrolled_autodiff(name, schedule, kwargs, quantity):
    loss_fn, data, theta = _tanh_net()
    expected = unroll_taylor(loss_fn, data, theta, order=3, quantity=quantity, **kwargs)
    pred = perturb.predict(
        perturb.Population(loss_fn, data), theta, schedule, lr=1.0, order=3, quantity=quantity
    )
    scale = max(abs(v) for v in expected)
    for ours, ref in zip(pred.by_order, expected, strict=True):
        assert ours == pytest.approx(ref, rel=1e-8, abs=1e-10 * scale)


def test_prediction_scales_with_lr():
    loss_fn, data, theta = _tanh_net()
    pop = perturb.Population(loss_fn, data)
    pred = perturb.predict(pop, theta, perturb.Online(steps=3, batch_size=1), lr=0.1, order=3)
    other = pred.at(0.2)
    for d, (a, b) in enumerate(zip(pred.by_order, other.by_order, strict=True)):
        assert b == pytest.approx(a * 2**d, rel=1e-12)
    assert pred.total == pytest.approx(sum(pred.by_order), rel=1e-12)


def test_displacement_is_a_vector():
    loss_fn, data, theta = _tanh_net()
    pop = perturb.Population(loss_fn, data)
    pred = perturb.predict(
        pop, theta, perturb.Online(steps=2, batch_size=1), lr=0.1, order=2, quantity="displacement"
    )
    assert pred.by_order[1].shape == (13,)


def test_bad_inputs():
    loss_fn, data, theta = _tanh_net()
    pop = perturb.Population(loss_fn, data)
    sched = perturb.Online(steps=2, batch_size=1)
    with pytest.raises(ValueError, match="data must have at least one row"):
        perturb.Population(loss_fn, data[:0])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        perturb.Population(3, data)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        perturb.predict(
            perturb.Population(lambda p, x: p * x[0], data), theta, sched, lr=0.1, order=1
        )
    with pytest.raises(ValueError, match="order must be a non-negative integer"):
        perturb.predict(pop, theta, sched, lr=0.1, order=-1)
    with pytest.raises(ValueError, match="numeric schedule sizes"):
        perturb.predict(pop, theta, perturb.Online(), lr=0.1, order=1)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        perturb.predict(pop, theta, sched, lr=math.inf, order=1)
    with pytest.raises(ValueError, match=r"perturb\.measure"):
        perturb.predict(pop, theta, sched, lr=0.1, order=1, exact=False)
    with pytest.raises(ValueError, match="quantity must be one of"):
        perturb.predict(pop, theta, sched, lr=0.1, order=1, quantity="loss")
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        perturb.predict(pop, theta, "online", lr=0.1, order=1)


def test_non_finite_derivative_names_statistic_and_row():
    data = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    pop = perturb.Population(lambda p, x: torch.sqrt(p[0] * x[0]), data)
    with pytest.raises(ValueError, match=r"non-finite gradient \(∇\^1 l\) at data row 1"):
        perturb.predict(pop, torch.ones(1), perturb.Online(steps=1, batch_size=1), lr=0.1, order=1)
