"""MNIST-1D generated offline: shapes, determinism, untouched global RNG, the dataset loader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from perturb.experiments.data import load_dataset
from perturb.experiments.mnist1d import SEQUENCE_LENGTH, mnist1d_arrays
from perturb.experiments.models import build_model


def test_arrays_are_deterministic_and_split_like_the_package():
    x, y, xt, yt = mnist1d_arrays(samples=200, seed=5)
    assert x.shape == (160, 1, SEQUENCE_LENGTH) and xt.shape == (40, 1, SEQUENCE_LENGTH)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert set(np.unique(np.concatenate([y, yt]))) == set(range(10))
    assert np.bincount(np.concatenate([y, yt]), minlength=10).tolist() == [20] * 10
    both = np.concatenate([x, xt])
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std()) - 1) < 1e-4
    again = mnist1d_arrays(samples=200, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((x, y, xt, yt), again, strict=True))
    other = mnist1d_arrays(samples=200, seed=6)[0]
    assert not np.array_equal(x, other)


def test_global_random_state_is_restored():
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d_arrays(samples=20, seed=0)
    assert (np.random.rand(), random.random()) == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples must be an integer ≥ 10"):
        mnist1d_arrays(samples=5)
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0"):
        mnist1d_arrays(seed=-1)


def test_load_dataset_mnist1d_and_its_convnet():
    train = load_dataset("mnist1d")
    test = load_dataset("MNIST-1D", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.input_shape == (1, SEQUENCE_LENGTH) and train.num_classes == 10
    model = build_model("smooth-convnet", train.input_shape, train.num_classes, seed=0)
    assert any(isinstance(m, torch.nn.Conv1d) for m in model.modules())
    logits = model(train.x[:8])
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
