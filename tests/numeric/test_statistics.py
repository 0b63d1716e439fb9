"""Statistics lookups: by printed name, by Contraction, by full key; unknown and ambiguous names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturb.numeric.measuring import measure
from perturb.numeric.statistics import Statistics
from perturb.symbolic.contractions import Contraction

GG = Contraction(parents=(-1, 0), parts=((0,), (1,)))  # G·G
TRCH = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))  # tr(C H)
GHG = Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)))  # G·H·G


def _loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((p - x) ** 2).sum() / 2 + (p[0] * x[1]) ** 3 / 6


@pytest.fixture(scope="module")
def stats() -> Statistics:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, dtype=torch.float64, generator=gen)
    return measure(
        _loss, x, torch.tensor([0.3, -0.2], dtype=torch.float64), order=2, progress=False
    )


def test_names_of_the_contractions():
    assert (GG.text, TRCH.text, GHG.text) == ("G·G", "tr(C H)", "G·H·G")


def test_lookup_by_name_contraction_and_key_agree(stats):
    for c in (GG, TRCH, GHG):
        want = stats.group_values[c.key].mean(axis=0)
        for item in (c.text, c, c.key):
            assert item in stats
            assert stats.key(item) == c.key
            np.testing.assert_array_equal(stats[item], want)
            np.testing.assert_array_equal(stats.value(item), want)
            np.testing.assert_array_equal(stats.se(item), stats.se(c.key))
    assert float(stats.se("tr(C H)")) > 0


def test_lookup_by_an_isomorphic_contraction(stats):
    relabelled = Contraction(parents=(-1, 0, 0), parts=((0,), (2, 1)))  # tr(C H) spelt anew
    assert relabelled in stats
    assert stats.key(relabelled) == TRCH.key


def test_unknown_names_raise_key_error_listing_the_measured_names(stats):
    assert "tr(C)" not in stats and 3 not in stats
    with pytest.raises(KeyError, match=r"no statistic for 'tr\(C\)'") as err:
        stats["tr(C)"]
    assert "G·H·G" in str(err.value) and "tr(C H)" in str(err.value)
    with pytest.raises(KeyError, match=r"measured: .*'G·G'"):
        stats.value("G·G|not-a-hash")
    with pytest.raises(KeyError, match=r"no statistic for 'tr\(C\)'"):
        stats.se(Contraction(parents=(-1, 0), parts=((0, 1),)))
    with pytest.raises(TypeError, match="by name or Contraction"):
        stats.value(3)


def test_an_ambiguous_name_raises_key_error():
    # two statistics printed alike (e.g. saved by another version of the printer)
    values = {"G·G|aaa": np.zeros(2), "G·G|bbb": np.ones(2)}
    st = Statistics(
        order=1,
        exact=False,
        rows=4,
        groups=2,
        parameters=1,
        contractions={key: GG for key in values},
        group_values=values,
    )
    assert "G·G" in st
    with pytest.raises(KeyError, match="'G·G' matches 2 measured statistics") as err:
        st["G·G"]
    assert "pass the full key" in str(err.value) and "measured: ['G·G', 'G·G']" in str(err.value)
    assert float(st["G·G|bbb"]) == 1.0  # the full key still picks one
