"""Shared argument checks and input errors: every accepted form and every error path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perturb.checks import (
    check_device,
    check_int,
    check_ints,
    check_lr,
    check_lrs,
    check_order,
    check_orders,
    check_positive,
)
from perturb.errors import DataError, DeviceError, ModelSpecError, PerturbError


def test_errors_are_value_errors_of_one_family():
    for cls in (DataError, ModelSpecError, DeviceError):
        assert issubclass(cls, PerturbError)
        assert issubclass(cls, ValueError)


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_check_int_accepts_integers(value):
    assert check_int("n", value, minimum=1) == int(value)
    assert type(check_int("n", value, minimum=1)) is int


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"minimum": 1}, "n must be an integer ≥ 1, got 0"),
        (True, {"minimum": 0}, "n must be an integer ≥ 0, got True"),
        (2.0, {"minimum": 0}, "n must be an integer ≥ 0, got 2.0"),
        ("3", {"minimum": 0}, "n must be an integer ≥ 0, got '3'"),
        (5, {"minimum": 0, "maximum": 4}, "n must be an integer in 0..4, got 5"),
    ],
)
def test_check_int_errors(value, kwargs, message):
    with pytest.raises(ValueError) as err:
        check_int("n", value, **kwargs)
    assert str(err.value) == message


def test_check_ints():
    assert check_ints("steps", (25, 50), minimum=1) == (25, 50)
    for bad in ([], [0], [1, True], "12", 3, [1.5]):
        with pytest.raises(ValueError, match="steps must be"):
            check_ints("steps", bad, minimum=1)


@pytest.mark.parametrize("lr", [1e-6, 0.1, 3, np.float32(0.5)])
def test_check_lr_accepts_positive_finite(lr):
    assert check_lr(lr) == pytest.approx(float(lr))


@pytest.mark.parametrize("lr", [0, -0.01, math.nan, math.inf, -math.inf, True, "0.1", None])
def test_check_lr_refuses(lr):
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        check_lr(lr)


def test_check_positive_names_the_argument():
    assert check_positive("width", 2) == 2.0
    with pytest.raises(ValueError, match="width must be a positive finite number, got -1"):
        check_positive("width", -1)


def test_check_lrs():
    assert check_lrs(0.1) == (0.1,)
    assert check_lrs([0.01, 0.02]) == (0.01, 0.02)
    assert check_lrs(np.array([0.5])) == (0.5,)
    for bad in ([], [0.1, 0.0], [math.nan], "0.1", [True], None, [-1]):
        with pytest.raises(ValueError, match="lrs must be positive finite numbers"):
            check_lrs(bad)
    with pytest.raises(ValueError, match="--lr must be positive finite numbers"):
        check_lrs([0], name="--lr")


def test_check_order_and_orders():
    assert check_order(0) == 0
    assert check_order(4, maximum=4) == 4
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="order must be a non-negative integer"):
            check_order(bad)
    with pytest.raises(ValueError, match="at most 3"):
        check_order(4, maximum=3)
    assert check_orders([0, 1, 2]) == (0, 1, 2)
    for bad in ([], [5], [-1], [True], "12", 2):
        with pytest.raises(ValueError, match=r"orders must be integers in 0\.\.4"):
            check_orders(bad)


def test_check_device():
    assert check_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="device must be one of cpu, cuda, got 'tpu'"):
        check_device("tpu")


def test_check_device_without_cuda_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"no CUDA GPU on this machine.*use --device cpu"):
        check_device("cuda")
    with pytest.raises(DeviceError, match="'cuda:1'"):
        check_device("cuda:1")
