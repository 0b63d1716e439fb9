"""The Student-t interval helpers against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from perturb.numeric.intervals import mean_interval, t_half_width


@pytest.mark.parametrize("n", [2, 3, 10, 64, 256])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_half_width_is_scipys_t_quantile(n, level):
    sem = 0.0123
    assert t_half_width(sem, n, level=level) == pytest.approx(
        float(stats.t.ppf((1 + level) / 2, n - 1)) * sem, rel=1e-14
    )


def test_default_level_is_exactly_the_0975_quantile():
    for n in (2, 8, 256):
        assert t_half_width(0.5, n) == float(stats.t.ppf(0.975, n - 1) * 0.5)


def test_mean_interval_is_scipys_interval_over_the_finite_values():
    rng = np.random.default_rng(0)
    v = rng.normal(size=40)
    low, high = stats.t.interval(0.95, v.size - 1, loc=v.mean(), scale=stats.sem(v))
    mean, half = mean_interval(np.concatenate([v, [np.nan, np.inf]]))
    assert mean == pytest.approx(v.mean(), rel=1e-14)
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-12)


def test_too_few_values_give_nan():
    assert math.isnan(t_half_width(1.0, 1)) and math.isnan(t_half_width(1.0, 0))
    mean, half = mean_interval([2.0])
    assert mean == 2.0 and math.isnan(half)
    assert all(math.isnan(x) for x in mean_interval([]))


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_bad_level(level):
    with pytest.raises(ValueError, match="level must lie in"):
        t_half_width(1.0, 5, level=level)
