"""Schedules from user options (perturb.symbolic.options): make_schedule and describe."""

from __future__ import annotations

import pytest

from perturb.symbolic.options import describe, make_schedule
from perturb.symbolic.schedules import Epochs, Online


def test_make_schedule_symbolic_and_numeric():
    assert make_schedule("online") == Online()
    assert make_schedule("epochs", train_size=6, batch_size=2, epochs=3, shuffle=True) == Epochs(
        train_size=6, batch_size=2, epochs=3, shuffle=True
    )
    gd = make_schedule("gd", train_size=5, steps=2)
    assert (gd.batch_size, gd.steps) == (5, 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("adam")


def test_describe():
    assert describe(Online(steps=1, batch_size=2)) == "online SGD (1 step, batch 2)"
    assert describe(Epochs()) == "SGD on N training points (batch B, E epochs, fixed order)"
