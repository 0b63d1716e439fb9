"""Matrix-free diagram values (perturb.numeric.measuring.measure) against materialized
tensors and oracles.

* every contraction of ``series(3, schedule, q)`` (online, epochs with and without shuffling,
  GD; test/train/gap/displacement) on a polynomial landscape, an MLP and a tiny convnet equals
  ``Contraction.value(derivative_tensors(...))`` to 1e-10 relative in float64 (and order 4,
  and float32 loosely);
* sampled estimates (group and tuple estimators) are unbiased and their standard errors
  calibrated; the tuple estimator's cost is linear, its tuples shared and sliceable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from measure_models import (
    F64,
    POLY_DATA,
    POLY_TH,
    SCHEDULES,
    _assert_close,
    _case,
    _exact,
    _one_thread,  # noqa: F401
    poly_loss,
)

from perturb import QUANTITIES, Contraction, Epochs, Online, series
from perturb.numeric.measuring import measure
from perturb.reference.tensors import derivative_tensors


@pytest.mark.parametrize(
    "name",  # the polynomial (-m slow): the networks are its twins, their derivatives too
    [pytest.param("poly", marks=pytest.mark.slow), "mlp", "convnet"],
)
def test_every_order3_contraction_matches_materialized(name):
    stats, derivs, *_ = _exact(name)
    seen = set()
    for schedule in SCHEDULES:
        for quantity in QUANTITIES:
            for term in series(3, schedule, quantity).terms:
                c = term.contraction
                seen.add(c.key)
                _assert_close(stats.value(c), c.value(derivs), 1e-10, f"{name}: {c.text}")
    assert len(seen) >= 30  # every kind of order-3 network is covered
    assert stats.exact and float(np.max(np.abs(stats.se(next(iter(seen)))))) == 0.0


def test_order_four():
    # Nothing is specific to order 3: every η⁴ network of online SGD's test loss agrees too
    # (absolute floor: some cumulants of the polynomial's constant ∇⁴l vanish exactly).
    derivs = derivative_tensors(poly_loss, POLY_DATA, POLY_TH, 4)
    schedule = Online(steps=2, batch_size=1)
    stats = measure(
        poly_loss, POLY_DATA, POLY_TH, order=4, schedules=schedule, exact=True, progress=False
    )
    terms = [t for t in series(4, schedule).terms if t.power == 4]
    assert len(terms) >= 15
    for term in terms:
        c = term.contraction
        ref = float(c.value(derivs))
        assert abs(float(stats.value(c)) - ref) <= 1e-10 * max(abs(ref), 1e-3), c.text


def test_float32_agrees_loosely():
    model, data, theta0, *_ = _case("mlp")
    _, derivs, *_ = _exact("mlp")
    low = measure(
        model,
        data,
        theta0,
        order=3,
        schedules=(Online(steps=3, batch_size=1),),
        quantities=("test", "displacement"),
        exact=True,
        dtype=torch.float32,
        progress=False,
    )
    assert low.meta["dtype"] == "float32"
    for key, c in low.contractions.items():
        _assert_close(low.value(key), c.value(derivs), 1e-4, c.text)


def test_unbiased_and_calibrated():
    # Population: 40 rows of the polynomial landscape with uniform noise (light tails).  Truth:
    # the exact population values from materialized tensors.  R = 200 independent samples of
    # 4 groups × 6 iid rows (drawn with replacement, a seeded generator); they are measured in
    # one call as 800 groups (a random split of iid rows is again iid), replicate r being
    # groups 4r..4r+3, whose estimate is their mean and whose SE is sd/√4.
    reps, k, size = 200, 4, 6
    gen = torch.Generator().manual_seed(11)
    population = torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1
    theta0 = torch.tensor([0.3, -0.2, 0.4], dtype=F64)
    derivs = derivative_tensors(poly_loss, population, theta0, 3)
    draws = population[torch.randint(0, 40, (reps * k * size,), generator=gen)]
    stats = measure(
        poly_loss,
        draws,
        theta0,
        order=3,
        schedules=(Online(steps=3, batch_size=2), Epochs(train_size=4, batch_size=2, epochs=2)),
        quantities=("test", "train", "displacement"),
        groups=reps * k,
        seed=5,
        chunk_size=4096,
        progress=False,
        estimator="groups",
    )
    assert stats.groups == reps * k and stats.rows == reps * k * size
    ratios, checked = [], 0
    for key, c in stats.contractions.items():
        truth = np.asarray(c.value(derivs).numpy(), dtype=float).reshape(-1)
        groups = stats.group_values[key].reshape(reps, k, -1)
        est = groups.mean(axis=1)  # (reps, coords)
        se2 = groups.var(axis=1, ddof=1) / k  # unbiased for Var(est)
        for j in range(est.shape[1]):
            sem = math.sqrt(se2[:, j].mean() / reps)
            if sem == 0:  # a statistic constant over rows (e.g. a third derivative)
                assert abs(est[:, j].mean() - truth[j]) <= 1e-10 * max(1.0, abs(truth[j]))
                continue
            # |z| > 4 has probability 6e-5 under normality: ~0.4% false failures over the
            # ~70 comparisons here (the seed is fixed, so the outcome is deterministic).
            z = (est[:, j].mean() - truth[j]) / sem
            assert abs(z) < 4, f"{c.text}[{j}]: mean {est[:, j].mean()} vs {truth[j]} (z={z})"
            ratios.append(est[:, j].var(ddof=1) / se2[:, j].mean())
            checked += 1
    assert checked >= 40
    # Calibration: E[SE²] = Var(estimate) exactly (4 iid groups).  The empirical variance of
    # 200 estimates has a relative sd of about sqrt(2/199) ≈ 0.1 (more with heavy tails),
    # the mean of 200 SE² much less, so each ratio lies in [0.6, 1.6] at ~4 sd; their median
    # must be close to 1.
    ratios = np.array(ratios)
    assert np.all((ratios > 0.6) & (ratios < 1.6)), ratios
    assert 0.85 < np.median(ratios) < 1.15, np.median(ratios)


def test_tuples_unbiased_and_calibrated():
    # The tuple estimator (disjoint tuples of m = 4 rows, one row per block of every
    # refinement).  Population: 40 rows of the polynomial landscape, uniform noise; truth
    # from materialized tensors.  reps = 300 replicates of R = 6 tuples (24 iid rows drawn
    # with replacement); they are measured in one call as 1800 tuples (a shuffle of iid rows
    # gives iid tuples), replicate r being tuples 6r..6r+5: its estimate is their mean and
    # its SE² is var/6, unbiased for Var(estimate) since the Z_r are iid.
    reps, per = 300, 6
    gen = torch.Generator().manual_seed(12)
    population = torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1
    theta0 = torch.tensor([0.3, -0.2, 0.4], dtype=F64)
    derivs = derivative_tensors(poly_loss, population, theta0, 3)
    draws = population[torch.randint(0, 40, (reps * per * 4,), generator=gen)]
    stats = measure(
        poly_loss,
        draws,
        theta0,
        order=3,
        schedules=(Online(steps=3, batch_size=2), Epochs(train_size=4, batch_size=2, epochs=2)),
        quantities=("test", "train", "displacement"),
        seed=5,
        chunk_size=4096,
        progress=False,
        vector_batches=None,  # every tuple's displacement vector, for the replicates
        estimator="tuples",
    )
    assert stats.meta["estimator"] == "tuples" and stats.meta["tuple_size"] == 4
    assert stats.groups == reps * per and stats.rows == reps * per * 4
    ratios, checked = [], 0
    for key, c in stats.contractions.items():
        truth = np.asarray(c.value(derivs).numpy(), dtype=float).reshape(-1)
        z = stats.group_values[key].reshape(reps, per, -1)
        est = z.mean(axis=1)
        se2 = z.var(axis=1, ddof=1) / per
        for j in range(est.shape[1]):
            sem = math.sqrt(se2[:, j].mean() / reps)
            if sem == 0:  # constant over rows (a third derivative of the polynomial)
                assert abs(est[:, j].mean() - truth[j]) <= 1e-10 * max(1.0, abs(truth[j]))
                continue
            # |z| > 4 has probability 6e-5 under normality: with ~70 comparisons about 0.4%
            # false failures (the seed is fixed, so the outcome is deterministic).
            score = (est[:, j].mean() - truth[j]) / sem
            assert abs(score) < 4, f"{c.text}[{j}]: {est[:, j].mean()} vs {truth[j]} ({score})"
            ratios.append(est[:, j].var(ddof=1) / se2[:, j].mean())
            checked += 1
    assert checked >= 40
    # Calibration: E[SE²] = Var(estimate).  The variance of 300 estimates has a relative sd
    # of about sqrt(2/299) ≈ 0.08 (more with the heavier tails of products of rows), so each
    # ratio lies in [0.6, 1.6] at more than 4 sd, and the median is close to 1.
    ratios = np.array(ratios)
    assert np.all((ratios > 0.6) & (ratios < 1.6)), ratios
    assert 0.85 < np.median(ratios) < 1.15, np.median(ratios)


def test_tuples_cost_is_linear():
    # single-row derivative evaluations: R × (nodes summed over the distinct networks)
    gen = torch.Generator().manual_seed(4)
    rows = torch.rand(96, 3, generator=gen, dtype=F64)
    counts = {}
    for estimator in ("tuples", "groups"):
        for n in (48, 96):  # multiples of m = 3 (tr(C H))
            st = measure(
                poly_loss,
                rows[:n],
                POLY_TH,
                order=2,
                groups=4,
                estimator=estimator,
                progress=False,
            )
            counts[estimator, n] = st.meta["evaluations"]
    assert counts["tuples", 96] == 2 * counts["tuples", 48]
    # the group estimator with K fixed is superlinear (blocks spanning two subtrees)
    assert counts["groups", 96] > 2.5 * counts["groups", 48]
    assert counts["tuples", 96] < counts["groups", 96]


def test_tuples_share_rows_across_contractions_and_predict():
    gen = torch.Generator().manual_seed(3)
    draws = torch.rand(64, 3, generator=gen, dtype=F64)
    stats = measure(poly_loss, draws, POLY_TH, order=2, samples=50, seed=1, progress=False)
    # order 2 needs tuples of 3 rows (tr(C H)): R = 16, the same tuples for every statistic
    assert stats.meta["tuple_size"] == 3 and stats.groups == 16 and stats.rows == 48
    assert all(v.shape[0] == 16 for v in stats.group_values.values())
    pred = stats.predict(Online(steps=4, batch_size=1), lr=[0.0, 0.1, 0.2])
    s = series(2, Online(steps=4, batch_size=1))
    per_tuple = sum(
        float(t.coefficient) * 0.2**t.power * stats.group_values[t.contraction.key] for t in s.terms
    )
    assert abs(pred.se[2] - per_tuple.std(ddof=1) / 4) < 1e-12
    assert abs(pred.total[2] - per_tuple.mean()) < 1e-12
    # the first-order statistic G·G uses the first two rows of each tuple: rows of one tuple
    # are distinct, so g_i·g_j with i ≠ j (unbiased for |E g|²)
    g = torch.func.vmap(torch.func.grad(poly_loss), in_dims=(None, 0))(POLY_TH, draws)
    gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))
    z = stats.group_values[gg.key]
    pairs = {(float(g[i] @ g[j])) for i in range(64) for j in range(64) if i != j}
    assert all(min(abs(v - p) for p in pairs) < 1e-12 for v in z)


def test_tuple_range_evaluates_a_slice_of_the_same_tuples():
    """The sharding hook: a range of tuples gives exactly those tuples' values."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 2, dtype=torch.float64, generator=gen)

    def f(p, row):
        return ((p - row) ** 2).sum() / 2 + (p[0] * row[1]) ** 3 / 6

    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    full = measure(f, x, theta, order=2, progress=False, seed=3)
    part = measure(f, x, theta, order=2, progress=False, seed=3, tuple_range=lambda k: range(2, 5))
    assert part.meta["tuples_total"] == full.groups and part.groups == 3
    for key, values in full.group_values.items():
        np.testing.assert_array_equal(part.group_values[key], values[2:5])
    empty = measure(f, x, theta, order=2, progress=False, seed=3, tuple_range=lambda k: range(0))
    assert all(v.shape[0] == 0 for v in empty.group_values.values())
    # with displacement: a rank holding no tuples adds zero partial batch means
    kw = dict(order=2, quantities=("test", "displacement"), progress=False, seed=3)
    none = measure(f, x, theta, tuple_range=lambda k: range(0), vector_batches=4, **kw)
    for key, c in none.contractions.items():
        want = (3, 2) if c.open_root else (0,)  # R = 10 tuples: 3 batches of 3
        assert none.group_values[key].shape == want and not none.group_values[key].any()
    with pytest.raises(ValueError, match="tuple_range applies to estimator='tuples'"):
        measure(f, x, theta, order=2, progress=False, exact=True, tuple_range=lambda k: range(1))


def test_an_order_per_quantity_measures_each_series_to_its_own_order():
    """``order={"test": 3, "gap": 2}``: the test loss through η³ and the gap through η²
    exactly as two separate measurements give them; the re-summed subspace then holds no
    per-sample third derivatives (only the train loss at order 3 needs them)."""
    import perturb

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(12, 3, generator=gen), torch.randint(0, 2, (12,), generator=gen))
    online = perturb.Online(steps=5, batch_size=1)
    kw = {"schedules": [online], "exact": True, "progress": False}
    both = perturb.measure(net, data, order={"test": 3, "gap": 2}, **kw)
    test = perturb.measure(net, data, order=3, quantities="test", **kw)
    gap = perturb.measure(net, data, order=2, quantities="gap", **kw)
    assert both.order == 3 and both.meta["orders"] == {"test": 3, "gap": 2}
    for quantity, ref, d in (("test", test, 3), ("gap", gap, 2)):
        got = both.predict(online, lr=[0.05], quantity=quantity, order=d)
        want = ref.predict(online, lr=[0.05], quantity=quantity, order=d)
        np.testing.assert_allclose(got.by_order, want.by_order, rtol=1e-12, atol=1e-15)
    with pytest.raises(KeyError, match="statistics lack"):
        both.predict(online, lr=[0.05], quantity="gap", order=3)
    sub = perturb.measure(net, data, order={"test": 3, "gap": 2}, resummed=True, rank=8, **kw)
    assert 3 in sub.subspace.means and 3 not in sub.subspace.derivs
    assert sub.subspace.cost["per_sample_higher_derivatives"] == 0
    sub.predict(online, lr=[0.05], quantity="gap", order=2, resummed=True)
    with pytest.raises(ValueError, match="need projected derivatives of orders \\[3\\]"):
        sub.predict(online, lr=[0.05], quantity="gap", order=3, resummed=True)
    with pytest.raises(ValueError, match="not both"):
        perturb.measure(net, data, order={"test": 1}, quantities=("test",), **kw)
    with pytest.raises(ValueError, match="order of 'gap' must be a non-negative integer"):
        perturb.measure(net, data, order={"test": 1, "gap": -1}, **kw)
    with pytest.raises(ValueError, match="needs at least one quantity"):
        perturb.measure(net, data, order={}, **kw)
