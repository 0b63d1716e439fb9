"""Tests for perturb.experiments.simulation_setup: checked arguments and trial samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturb.experiments.data import Dataset
from perturb.experiments.simulation_setup import make_setup, trial_indices
from perturb.symbolic.schedules import GD, Epochs, Online


def _loss(theta, x, y):
    return (x @ theta - y) ** 2


def _population(n=9):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(n)


def test_setup_casts_records_and_divergence_options():
    x, y = _population()
    s = make_setup(_loss, torch.zeros(2), (x, y), Epochs(train_size=4, batch_size=2, epochs=3),
                   lr=[0.1, 0.2], trials=range(3, 7), record_every=4)  # fmt: skip
    assert s.steps == 6 and s.record == (0, 4, 6) and s.lrs == (0.1, 0.2)
    assert (s.trials, s.first) == (4, 3)
    assert s.theta0.dtype == s.x.dtype == torch.float64 and s.y.dtype == torch.float64
    assert s.x_test is s.x or torch.equal(s.x_test, s.x)
    assert (s.cap, s.factor) == (math.inf, 10.0)  # no cap: only non-finite values blow up
    none = make_setup(_loss, torch.zeros(2), (x, y), Online(steps=2, batch_size=1), lr=0.1,
                      trials=1, diverge_above=1e8, diverge_factor=None)  # fmt: skip
    assert none.cap == 1e8 and none.factor is None and none.record == (2,)
    labels = torch.zeros(9, dtype=torch.int64)
    s = make_setup(_loss, torch.zeros(2), Dataset("toy", x.view(9, 1, 1, 2), labels, 1),
                   GD(train_size=3, steps=2), lr=0.1, trials=1, dtype=torch.float32)  # fmt: skip
    assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64  # labels keep their dtype


def test_batches_of_local_trials_are_those_of_the_global_trials():
    x, y = _population()
    schedule = Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True)
    s = make_setup(_loss, torch.zeros(2), (x, y), schedule, lr=0.1, trials=range(5, 8), seed=2)
    for local in range(3):
        a, b = s.batches(local), trial_indices(schedule, 9, seed=2, trial=5 + local)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_trial_indices_errors():
    online = Online(steps=2, batch_size=1)
    with pytest.raises(ValueError, match="trial must be a non-negative integer"):
        trial_indices(online, 5, trial=-1)
    with pytest.raises(ValueError, match="population_size must be a positive integer"):
        trial_indices(online, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        trial_indices(online, 5, seed=-2)
    with pytest.raises(ValueError, match="numeric schedule"):
        trial_indices(Online(batch_size=1), 5)


def test_dtype_and_theta_errors():
    x, y = _population()
    online = Online(steps=2, batch_size=1)
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        make_setup(_loss, torch.zeros(2), (x, y), online, lr=0.1, trials=1, dtype=torch.int64)
    with pytest.raises(ValueError, match="theta0 must be a non-empty 1-D tensor"):
        make_setup(_loss, torch.zeros(0), (x, y), online, lr=0.1, trials=1)
    with pytest.raises(ValueError, match="at least one row"):
        make_setup(_loss, torch.zeros(2), (x[:0], y[:0]), online, lr=0.1, trials=1)
