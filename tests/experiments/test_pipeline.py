"""The shared stages of validate and compare: start point, recorded steps, unstable values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from perturb.experiments.models import build_model
from perturb.experiments.pipeline import (
    DEFAULT_PRETRAIN_LR,
    Start,
    build,
    is_unstable,
    load_population,
    measure_at_start,
    pretrain,
    recorded_steps,
    run_trials,
    start_point,
)
from perturb.symbolic.schedules import Epochs, Online


@pytest.fixture(scope="module")
def digits():
    return load_population("digits", population=16, seed=0)


def _population_loss(net, data) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(data.x), data.y))


# ------------------------------------------------------------------ recorded steps


def test_log_grid_is_geometric_rounded_and_deduplicated():
    assert recorded_steps(Online(steps=1000, batch_size=1), 5, log=True) == [1, 6, 32, 178, 1000]
    assert recorded_steps(Online(steps=10_000, batch_size=1), 3, log=True) == [1, 100, 10_000]
    assert recorded_steps(Online(steps=3, batch_size=1), 10, log=True) == [1, 2, 3]
    assert recorded_steps(Online(steps=50, batch_size=1), 1, log=True) == [50]
    # epochs: a log grid of ends of epochs
    sched = Epochs(train_size=4, batch_size=2, epochs=100)
    assert recorded_steps(sched, 3, log=True) == [2, 20, 200]
    # the linear grid is as before
    assert recorded_steps(Online(steps=100, batch_size=1), 5) == [20, 40, 60, 80, 100]


def test_trials_recorded_on_a_log_grid_are_the_same_trials(digits):
    """Recording at listed steps changes nothing but which steps are kept."""
    setup = build("mlp", digits, seed=0)
    sched = Online(steps=12, batch_size=1)
    every = run_trials(setup, sched, lrs=[0.05], trials=3, seed=0, record=1)
    listed = run_trials(setup, sched, lrs=[0.05], trials=3, seed=0, record=[1, 3, 7])
    assert listed.steps == (0, 1, 3, 7, 12)
    columns = [every.steps.index(s) for s in listed.steps]
    np.testing.assert_array_equal(listed.curve, every.curve[:, :, columns])
    np.testing.assert_array_equal(listed.test_loss, every.test_loss)


# ------------------------------------------------------------------ start point


def test_pretrain_lowers_the_loss_deterministically_and_leaves_the_setup_alone(digits):
    setup = build("smooth-convnet", digits, seed=0)
    before = setup.theta0.clone()
    a = pretrain(setup, steps=30, lr=DEFAULT_PRETRAIN_LR)
    b = pretrain(setup, steps=30, lr=DEFAULT_PRETRAIN_LR)
    assert torch.equal(a.theta0, b.theta0)  # bit for bit
    assert torch.equal(setup.theta0, before)  # the original network is not trained
    start = float(setup.loss_fn(setup.theta0, setup.x, setup.y).mean())
    after = float(a.loss_fn(a.theta0, a.x, a.y).mean())
    assert after < start - 0.1
    # the network holds the pretrained weights (the measurement reads the network)
    assert _population_loss(a.net, digits) == pytest.approx(after, rel=1e-5)


# pretraining is the same bit for bit whatever the thread count: tests/test_reproducible.py
# (one subprocess there serves it and the validate command)


def test_pretraining_past_the_edge_of_stability_warns(digits):
    # lr 2 on the mlp: the loss rises at some steps (λ_max > 2/lr), where rounding grows
    setup = build("mlp", digits, seed=0)
    with pytest.warns(RuntimeWarning, match="edge of stability"):
        pretrain(setup, steps=30, lr=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrain(setup, steps=30, lr=DEFAULT_PRETRAIN_LR)  # stable: no warning


def test_pretraining_that_blows_up_is_an_error(digits):
    setup = build("mlp", digits, seed=0)
    with pytest.raises(ValueError, match="pretraining diverged at step"):
        pretrain(setup, steps=50, lr=1e30)


def test_start_point_from_a_checkpoint(tmp_path, digits):
    trained = build_model("mlp", digits.input_shape, digits.num_classes, seed=5)
    path = tmp_path / "ckpt.pt"
    torch.save(trained.state_dict(), path)
    setup, start = start_point("mlp", digits, seed=0, checkpoint=path)
    assert torch.equal(setup.theta0, torch.cat([p.reshape(-1) for p in trained.parameters()]))
    assert start.loss == pytest.approx(_population_loss(trained, digits), rel=1e-6)
    loss = torch.nn.functional.cross_entropy(trained(digits.x), digits.y)
    grad = torch.autograd.grad(loss, list(trained.parameters()))
    norm = float(torch.cat([g.reshape(-1) for g in grad]).norm())
    assert start.grad_norm == pytest.approx(norm, rel=1e-4)
    assert start.to_dict() == {
        "loss": start.loss,
        "grad_norm": start.grad_norm,
        "checkpoint": str(path),
        "pretrain_steps": 0,
        "pretrain_lr": None,
    }
    assert not start.is_default and str(path) in start.describe()
    _, default = start_point("mlp", digits, seed=0)
    assert default.is_default and default.loss != start.loss
    with pytest.raises(FileNotFoundError, match="does not exist"):
        start_point("mlp", digits, seed=0, checkpoint=tmp_path / "missing.pt")


def test_a_module_given_with_a_checkpoint_is_not_changed(tmp_path, digits):
    net = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    other = build_model("mlp", digits.input_shape, digits.num_classes, seed=1)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    before = [p.clone() for p in net.parameters()]
    setup = build(net, digits, seed=0, checkpoint=tmp_path / "other.pt")
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert not torch.equal(setup.theta0, torch.cat([p.reshape(-1) for p in before]))


def test_start_describes_itself():
    start = Start(loss=0.5, grad_norm=0.25, checkpoint="c.pt", pretrain_steps=3, pretrain_lr=0.5)
    assert start.describe() == (
        "start: l(θ0) = 0.50000, ‖G‖ = 0.250000 (c.pt, then 3 steps of full-batch GD at lr 0.5)"
    )


# ------------------------------------------------------------------ unstable values


def test_unstable_band():
    """Far outside [0, 10·l0]: more than 10·l0 below 0 or above 10·l0."""
    assert not any(is_unstable(v, 2.0) for v in (0.0, -19.9, 39.9, 2.0))
    assert all(is_unstable(v, 2.0) for v in (-20.1, 40.1, math.inf, -math.inf, math.nan))
    assert not is_unstable(1e9, math.nan)  # no start loss: only non-finite values
    assert is_unstable(math.nan, math.nan)


# ------------------------------------------------------------------ measurement


@pytest.mark.parametrize("gap", [False, True])
def test_a_shorter_series_keeps_the_same_subspace_and_trust(digits, gap):
    """``series_order=2`` (a plan's): the Krylov subspace, the order-2 statistics and the
    re-summed predictions with their trust are those of the full measurement; only the
    η³ statistics are left out (a plan reads none of them)."""
    setup = build("mlp", digits, seed=0)
    schedules = [Epochs(train_size=8, batch_size=4, epochs=2, shuffle=True)] if gap else [
        Online(steps=6, batch_size=2)
    ]  # fmt: skip
    kw = {"order": 3, "schedules": schedules, "gap": gap, "resummed": True, "rank": 12,
          "higher_rank": 4}  # fmt: skip
    full = measure_at_start(setup, **kw)
    short = measure_at_start(setup, series_order=2, **kw)
    assert (full.order, short.order) == (3, 2)
    assert set(short.contractions) < set(full.contractions)
    for key in short.contractions:
        np.testing.assert_array_equal(short.group_values[key], full.group_values[key])
    torch.testing.assert_close(short.subspace.basis, full.subspace.basis, rtol=0, atol=0)
    np.testing.assert_array_equal(short.subspace.hessian, full.subspace.hessian)
    judge = {"lr": [0.01, 0.1], "quantity": "gap" if gap else "test", "order": 2,
             "resummed": True, "trials": 16}  # fmt: skip
    want, got = full.trust(schedules[0], **judge), short.trust(schedules[0], **judge)
    for name in ("value", "error_estimate", "trusted", "trusted_steps"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    with pytest.raises(ValueError, match="series order"):
        measure_at_start(setup, series_order=0, **kw)
