"""Statistics (perturb.numeric.statistics).

* lookups by printed name, by Contraction, by full key; unknown and ambiguous names;
* predictions from measured statistics (``Statistics.predict``) equal ``perturb.predict``
  and, on a polynomial landscape with rational data, the brute-force rational oracle;
  sampled predictions carry the spread of per-group predictions as their error;
* save/load and the errors of predict and lookups.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from measure_models import (
    F64,
    POLY_DATA,
    POLY_ROWS,
    POLY_TH,
    POLY_THETA0,
    SCHEDULES,
    U,
    V,
    W,
    _assert_close,
    _exact,
    _one_thread,  # noqa: F401
    _poly,
    poly_loss,
)

from perturb import GD, QUANTITIES, Epochs, Online, Population, predict, series
from perturb.numeric.measuring import measure
from perturb.numeric.statistics import Statistics
from perturb.reference import oracle_series
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


@pytest.mark.parametrize(
    ("name", "quantities"), [("mlp", QUANTITIES), ("convnet", ("gap", "displacement"))]
)
def test_predictions_match_predict(name, quantities):
    stats, _, per_row, rows, theta0 = _exact(name)
    population = Population(per_row, rows)
    lrs = [0.0, 0.05, 0.3]
    for schedule in SCHEDULES:
        for quantity in quantities:
            want = predict(population, theta0, schedule, lr=1.0, order=3, quantity=quantity)
            got = stats.predict(schedule, lr=lrs, quantity=quantity)
            for d in range(4):
                _assert_close(got.coefficients[d], want.coefficients[d], 1e-10, f"{quantity} η^{d}")
            for i, lr in enumerate(lrs):
                _assert_close(got.total[i], want.at(lr).total, 1e-10, f"{quantity} at {lr}")
            assert np.all(got.se == 0)


ORACLE_SCHEDULES = [
    (Online(steps=3, batch_size=2), {"kind": "online", "steps": 3, "batch_size": 2}),
    (
        Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        {"kind": "epochs", "train_size": 2, "batch_size": 1, "epochs": 2, "shuffle": True},
    ),
    (
        Epochs(train_size=2, batch_size=1, epochs=2),
        {"kind": "epochs", "train_size": 2, "batch_size": 1, "epochs": 2},
    ),
    (GD(train_size=2, steps=2), {"kind": "epochs", "train_size": 2, "batch_size": 2, "epochs": 2}),
]


def test_predictions_match_rational_oracle():
    losses = [_poly(a, b, c, U, V, W) for a, b, c in POLY_ROWS]
    stats = measure(
        poly_loss,
        POLY_DATA,
        POLY_TH,
        order=3,
        schedules=[s for s, _ in ORACLE_SCHEDULES],
        quantities=QUANTITIES,
        exact=True,
        progress=False,
    )
    for schedule, kw in ORACLE_SCHEDULES:
        for quantity in QUANTITIES:
            want = oracle_series(losses, [U, V, W], POLY_THETA0, order=3, quantity=quantity, **kw)
            want = np.array(want, dtype=float)
            if quantity == "displacement":
                want = want.T  # (order + 1, P)
            got = stats.predict(schedule, lr=0.1, quantity=quantity).coefficients
            _assert_close(got, want, 1e-10, f"{schedule.name} {quantity}")


def test_sampled_predictions_carry_group_errors():
    gen = torch.Generator().manual_seed(3)
    draws = torch.rand(64, 3, generator=gen, dtype=F64)
    stats = measure(
        poly_loss,
        draws,
        POLY_TH,
        order=2,
        samples=48,
        groups=8,
        seed=1,
        progress=False,
        estimator="groups",
    )
    assert stats.rows == 48 and stats.groups == 8 and not stats.exact
    pred = stats.predict(Online(steps=4, batch_size=1), lr=[0.0, 0.1, 0.2])
    assert pred.total.shape == (3,) and pred.se.shape == (3,)
    assert np.all(pred.se > 0)
    # the prediction is linear in the values: its SE is the spread of per-group predictions
    s = series(2, Online(steps=4, batch_size=1))
    per_group = sum(
        float(t.coefficient) * 0.2**t.power * stats.group_values[t.contraction.key] for t in s.terms
    )
    assert abs(pred.se[2] - per_group.std(ddof=1) / math.sqrt(8)) < 1e-12
    assert abs(pred.total[2] - per_group.mean()) < 1e-12


def test_save_load_round_trip(tmp_path):
    stats = measure(
        poly_loss,
        torch.rand(40, 3, dtype=F64),
        POLY_TH,
        order=2,
        quantities=("test", "displacement"),
        groups=4,
        progress=False,
    )
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = Statistics.load(path)
    assert back.contractions.keys() == stats.contractions.keys()
    for key in stats.contractions:
        np.testing.assert_array_equal(back.group_values[key], stats.group_values[key])
    assert (back.order, back.exact, back.rows, back.groups, back.parameters, back.meta) == (
        stats.order,
        stats.exact,
        stats.rows,
        stats.groups,
        stats.parameters,
        stats.meta,
    )
    schedule = Online(steps=5, batch_size=2)
    for q in ("test", "displacement"):
        a, b = (
            stats.predict(schedule, lr=[0.1], quantity=q),
            back.predict(schedule, lr=[0.1], quantity=q),
        )
        np.testing.assert_array_equal(a.total, b.total)
        np.testing.assert_array_equal(a.se, b.se)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a perturb statistics file"):
        Statistics.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Statistics.load(tmp_path / "missing.npz")


def test_errors_predict():
    stats = measure(poly_loss, POLY_DATA, POLY_TH, order=2, exact=True, progress=False)
    with pytest.raises(ValueError, match="numeric schedule sizes"):
        stats.predict(Online(), lr=0.1)
    with pytest.raises(KeyError, match="lack"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, quantity="displacement")
    with pytest.raises(ValueError, match="quantity must be one of"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, quantity="loss")
    with pytest.raises(ValueError, match=r"order must be an integer in 0\.\.2"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, order=3)
    with pytest.raises(ValueError, match="finite"):
        stats.predict(Online(steps=2, batch_size=1), lr=float("nan"))
    with pytest.raises(KeyError, match="no statistic"):
        stats.value("nothing")
    assert Contraction((-1, 0), ((0,), (1,))) in stats
