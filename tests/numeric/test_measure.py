"""Matrix-free diagram values (perturb.measure) against materialized tensors and oracles.

* every contraction of ``series(3, schedule, q)`` (online, epochs with and without shuffling,
  GD; test/train/gap/displacement) on a polynomial landscape, an MLP and a tiny convnet equals
  ``Contraction.value(derivative_tensors(...))`` to 1e-10 relative in float64;
* predictions through ``measure(exact=True)`` equal ``perturb.predict`` and, on a polynomial
  landscape with rational data, the brute-force rational oracle;
* sampled estimates are unbiased and their standard errors calibrated;
* save/load and every error path.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import sympy
import torch
from sympy import Rational as R
from torch import nn

import perturb.numeric.engine as engine_module
from perturb import GD, QUANTITIES, Contraction, Epochs, Online, Population, predict, series
from perturb.numeric.adapters import FlatLoss, NonSmoothWarning, flat_loss, objective
from perturb.numeric.derivatives import derivative
from perturb.numeric.engine import MESSAGE_CACHE, Engine
from perturb.numeric.measuring import measure
from perturb.numeric.networks import (
    contraction_value,
    moment_network,
    tuple_networks,
    tuple_size,
    tuple_values,
)
from perturb.numeric.statistics import Statistics
from perturb.reference import oracle_series
from perturb.reference.tensors import derivative_tensors

F64 = torch.float64
SCHEDULES = (
    Online(steps=3, batch_size=2),
    Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True),
    Epochs(train_size=4, batch_size=2, epochs=2, shuffle=False),
    GD(train_size=3, steps=2),
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The networks here are tiny: one intra-op thread avoids thread-pool overhead (and spin
    # waits on a shared 2-core machine) that would dominate the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ landscapes

U, V, W = sympy.symbols("u v w")
POLY_ROWS = [(1, 0, R(1, 2)), (-1, 2, 0), (0, -1, -1), (R(1, 2), R(1, 3), 1)]
POLY_THETA0 = [R(1, 2), R(-1, 3), R(1, 4)]


def _poly(a, b, c, u, v, w):
    """A 3-parameter polynomial with noisy gradient, Hessian and third derivatives."""
    return (
        u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u**2 * v + u**4 / 12
        + a * w**3 / 6 + b * u * w + w**2 / 2 + c * v * w**2
    )  # fmt: skip


def poly_loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _poly(x[0], x[1], x[2], p[0], p[1], p[2])


POLY_DATA = torch.tensor([[float(v) for v in row] for row in POLY_ROWS], dtype=F64)
POLY_TH = torch.tensor([float(v) for v in POLY_THETA0], dtype=F64)


def _mlp() -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.8)
    return net  # 53 parameters


def _convnet() -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(2, 2, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.6)
    return net  # 67 parameters


def _image_data(shape, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _packed(fn: FlatLoss, x: torch.Tensor, y: torch.Tensor):
    """A per-row loss and packed rows (x flattened, label last) for the materialized path."""
    shape = x.shape[1:]
    d = math.prod(shape)
    rows = torch.cat([x.reshape(len(x), d), y[:, None].to(F64)], dim=1)

    def per_row(p, row):
        return fn(p, row[:d].reshape(1, *shape), row[d:].long())[0]

    return per_row, rows


def _case(name: str):
    """(what measure takes, data, theta0, per-row loss, rows) for one landscape."""
    if name == "poly":
        return poly_loss, POLY_DATA, POLY_TH, poly_loss, POLY_DATA
    net = _mlp() if name == "mlp" else _convnet()
    x, y = _image_data((1, 2, 3) if name == "mlp" else (1, 4, 4), 5, seed=3)
    fn, theta0 = flat_loss(net)
    per_row, rows = _packed(fn, x, y)
    return net, (x, y), theta0, per_row, rows


_CACHE: dict = {}


def _exact(name: str):
    """Exact statistics of every order-3 contraction of SCHEDULES, and the reference tensors."""
    if name not in _CACHE:
        model, data, theta0, per_row, rows = _case(name)
        stats = measure(
            model,
            data,
            theta0,
            order=3,
            schedules=SCHEDULES,
            quantities=QUANTITIES,
            exact=True,
            progress=False,
        )
        derivs = derivative_tensors(per_row, rows, theta0, 3)
        _CACHE[name] = (stats, derivs, per_row, rows, theta0)
    return _CACHE[name]


def _assert_close(got, ref, rel: float, what: str) -> None:
    got = np.asarray(got, dtype=float)
    ref = np.asarray(ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else ref, float)
    scale = max(float(np.max(np.abs(ref))), 1e-300)
    err = float(np.max(np.abs(got - ref))) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} (got {got}, want {ref})"


# ---------------------------------------------------------------- 1. materialized agreement


@pytest.mark.parametrize("name", ["poly", "mlp", "convnet"])
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


def test_chunked_and_conditioned_paths_agree():
    # A tiny message budget forces the outer loop over chunks of samples for the open blocks,
    # and a small chunk_size splits every vmap; values must not change.  The networks with
    # most open blocks are the order-3 ones with several multi-node parts (torch.func costs
    # ~10 ms a call on these tiny functions, so only a few of them).
    model, data, theta0, per_row, rows = _case("poly")
    derivs = derivative_tensors(per_row, rows, theta0, 3)
    for schedule, quantity, budget in [
        (Epochs(train_size=4, batch_size=2, epochs=2), "train", 1),
        (Online(steps=2, batch_size=1), "displacement", 12),
    ]:
        terms = [t for t in series(3, schedule, quantity).terms if t.power == 3]
        terms.sort(key=lambda t: -sum(len(p) > 1 for p in t.contraction.parts))
        for term in terms[:3]:
            c = term.contraction
            got = contraction_value(
                c, model, data, theta0, chunk_size=3, max_message_elements=budget
            )
            _assert_close(got, c.value(derivs), 1e-10, c.text)


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


def test_moment_network_matches_moment_form():
    model, data, theta0, per_row, rows = _case("mlp")
    derivs = derivative_tensors(per_row, rows, theta0, 3)
    for parents, parts, open_root in [
        ((-1, 0, 1, 0), ((0, 2), (1, 3)), False),
        ((-1, 0, 1, 1), ((0,), (1, 2), (3,)), False),
        ((-1, 0, 1, 2), ((0,), (1, 3), (2,)), True),
    ]:
        net = Contraction(parents=parents, parts=parts, form="moment", open_root=open_root)
        _assert_close(moment_network(net, model, data, theta0), net.value(derivs), 1e-10, net.text)


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


def test_model_with_buffers_and_eval_batchnorm():
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)
    )
    net = net.to(F64)
    with torch.no_grad():
        net[2].running_mean.fill_(0.3)
        net[2].running_var.fill_(2.0)
    net.eval()
    x, y = torch.randn(5, 1, 2, 2, dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    fn, theta0 = flat_loss(net)
    assert torch.allclose(
        fn(theta0, x, y), nn.functional.cross_entropy(net(x), y, reduction="none")
    )
    per_row, rows = _packed(fn, x, y)
    derivs = derivative_tensors(per_row, rows, theta0, 2)
    for term in series(2, Online(steps=2, batch_size=1)).terms:
        c = term.contraction
        _assert_close(contraction_value(c, net, (x, y)), c.value(derivs), 1e-10, c.text)


# ----------------------------------------------------------------------------- 2. predictions


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


# --------------------------------------------------------------------------- 3. unbiasedness


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


def test_unbiased_value_is_distinct_tuple_average():
    # G·G and a train-root tr(C) by hand: U-statistics over distinct rows.
    rows = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0], [0.3, -0.4, 1.0]], dtype=F64)
    g = torch.func.vmap(torch.func.grad(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    n = len(rows)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    gg = sum(float(g[i] @ g[j]) for i, j in pairs) / len(pairs)
    c = Contraction(parents=(-1, 0), parts=((0,), (1,)))
    got = contraction_value(c, poly_loss, rows, POLY_TH, unbiased=True)
    assert abs(float(got) - gg) < 1e-12
    trc = Contraction(parents=(-1, 0), parts=((0, 1),))
    mean_sq = sum(float(g[i] @ g[i]) for i in range(n)) / n
    want = mean_sq - gg  # unbiased E|g|² − |E g|²
    got = contraction_value(trc, poly_loss, rows, POLY_TH, unbiased=True)
    assert abs(float(got) - want) < 1e-12


# ------------------------------------------------------------------- 3b. tuple estimator


def test_tuples_unbiased_and_calibrated():
    # The default estimator (disjoint tuples of m = 4 rows, one row per block of every
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


def test_tuples_average_over_assignments_is_complete_u_statistic():
    # One tuple uses one assignment of its m rows to the blocks.  Averaged over all m!
    # orderings of the same m rows it is the complete U-statistic of those rows (every
    # injective map of a refinement's blocks into the rows occurs equally often), which the
    # group estimator computes (validated by hand in the test above).  Every order-3
    # contraction of every schedule and quantity, on the polynomial and the MLP.
    perms = torch.tensor(list(itertools.permutations(range(4))))
    for name in ("poly", "mlp"):
        model, data, theta0, *_ = _case(name)
        sub = tuple(d[:4] for d in data) if isinstance(data, tuple) else data[:4]
        complete = measure(
            model,
            sub,
            theta0,
            order=3,
            schedules=SCHEDULES,
            quantities=QUANTITIES,
            groups=1,
            estimator="groups",
            progress=False,
        )
        obj = objective(model, sub, theta0, loss=None, dtype=F64, device=None)
        engine = Engine(obj, perms, chunk_size=64, budget=None)
        for key, c in complete.contractions.items():
            got = tuple_values(engine, c, perms).mean(dim=0)
            want = complete.group_values[key][0]
            _assert_close(got.numpy(), want, 1e-10, f"{name} {c.text} (m={tuple_size(c)})")
    # and explicitly from per-row gradients and Hessians: tr(C H) = E g_b·H_a g_b −
    # g_b·H_a g_c over distinct (a, b, c), with H at the (test) root
    rows = POLY_DATA
    g = torch.func.vmap(torch.func.grad(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    h = torch.func.vmap(torch.func.hessian(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    triples = list(itertools.permutations(range(4), 3))
    want = sum(float(g[b] @ h[a] @ g[b] - g[b] @ h[a] @ g[c]) for a, b, c in triples)
    want /= len(triples)
    obj = objective(poly_loss, rows, POLY_TH, loss=None, dtype=F64, device=None)
    engine = Engine(obj, perms, chunk_size=64, budget=None)
    trch = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    got = float(tuple_values(engine, trch, perms).mean())
    assert abs(got - want) < 1e-12 * max(1.0, abs(want))


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


def test_tuples_non_finite_names_row():
    def bad(p, x):
        return torch.sqrt(p[0] * x[0]) + p[1] ** 2

    theta0 = torch.tensor([1.0, 0.5], dtype=F64)
    many = torch.cat([torch.ones(7, 1), torch.tensor([[-1.0]])]).to(F64)
    with pytest.raises(ValueError, match="at data row 7"):
        measure(bad, many, theta0, order=2, samples=8, progress=False)


def test_population_input_matches_predict():
    population = Population(poly_loss, POLY_DATA)
    stats = measure(population, None, POLY_TH, order=2, exact=True, progress=False)
    schedule = Online(steps=3, batch_size=1)
    want = predict(population, POLY_TH, schedule, lr=0.2, order=2)
    _assert_close(stats.predict(schedule, lr=0.2).total[0], want.total, 1e-10, "population")


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


# ------------------------------------------------------------------------------ 4. save/load


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


# --------------------------------------------------------------------------------- 5. errors


def test_errors_inputs():
    net = _mlp()
    x, y = _image_data((1, 2, 3), 5, seed=0)
    with pytest.raises(ValueError, match="one scalar per row"):
        measure(net, (x, y), order=1, loss=lambda out, t: out, progress=False)
    with pytest.raises(ValueError, match="scalar tensor"):
        measure(lambda p, r: p * r[0], POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        measure(poly_loss, torch.zeros(0, 3), POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="same number of rows"):
        measure(net, (x, y[:3]), order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 has 3 entries but the model has 53"):
        measure(net, (x, y), torch.zeros(3), order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 is required"):
        measure(poly_loss, POLY_DATA, order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 has 2 entries; is that the right size"):
        measure(poly_loss, POLY_DATA, torch.zeros(2), order=1, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be an integer ≥ 1"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, exact=True, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="max_message_elements must be an integer ≥ 1"):
        contraction_value(
            Contraction((-1, 0), ((0,), (1,))),
            poly_loss,
            POLY_DATA,
            POLY_TH,
            max_message_elements=0,
        )
    with pytest.raises(ValueError, match="data=None with a Population"):
        measure(Population(poly_loss, POLY_DATA), POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="1-D parameter vector"):
        measure(poly_loss, POLY_DATA, torch.zeros(3, 1), order=1, progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="cannot be split into 16"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, estimator="groups", progress=False)
    with pytest.raises(ValueError, match="distinct rows per group"):
        measure(
            poly_loss, POLY_DATA, POLY_TH, order=2, groups=2, estimator="groups", progress=False
        )
    with pytest.raises(ValueError, match="tuples of 3 distinct rows, got only 2"):
        measure(poly_loss, POLY_DATA[:2], POLY_TH, order=2, progress=False)
    with pytest.raises(ValueError, match="estimator must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, estimator="jackknife", progress=False)
    with pytest.raises(ValueError, match="samples applies to estimates only"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, exact=True, samples=2, progress=False)
    with pytest.raises(ValueError, match="exceeds the 4 rows"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, samples=9, groups=1, progress=False)
    with pytest.raises(ValueError, match="quantities must be among"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, quantities=("loss",), progress=False)
    with pytest.raises(ValueError, match="order must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=-1, progress=False)
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        measure(3, POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="moment-form"):
        moment_network(Contraction((-1, 0), ((0,), (1,))), poly_loss, POLY_DATA, POLY_TH)


def test_errors_models():
    bn = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    x, y = _image_data((1, 2, 3), 4, seed=0)
    with pytest.raises(ValueError, match="training mode"):
        measure(bn, (x, y), order=1, progress=False)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.warns(NonSmoothWarning, match="ReLU"):
        flat_loss(relu)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        flat_loss(poly_loss)


def test_errors_non_finite_names_statistic_and_row():
    def bad(p, x):
        return torch.sqrt(p[0] * x[0]) + p[1] ** 2

    rows = torch.tensor([[1.0], [2.0], [-1.0], [3.0]], dtype=F64)
    theta0 = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match=r"statistic 'l'\) at data row 2"):
        measure(bad, rows, theta0, order=1, exact=True, progress=False)
    trc = Contraction(parents=(-1, 0), parts=((0, 1),))  # per-row path
    with pytest.raises(ValueError, match=r"'tr\(C\)'\) at data row 2"):
        contraction_value(trc, bad, rows, theta0)
    # a subset keeps the caller's row numbers
    many = torch.cat([torch.ones(7, 1), torch.tensor([[-1.0]])]).to(F64)
    with pytest.raises(ValueError, match="at data row 7"):
        measure(bad, many, theta0, order=1, groups=1, samples=8, progress=False)


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


def test_tuple_message_cache_reuses_subtrees_exactly(monkeypatch):
    # messages shared by several networks (same tuple column, same children) are computed
    # once; the per-tuple values must equal those computed with no cache, bit for bit
    # up to summation order, and the evaluations must drop
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=gen)
    kwargs = dict(order=3, quantities=("test", "train"), progress=False)
    cached = measure(_mlp(), (x, y), **kwargs)
    monkeypatch.setattr(engine_module, "MESSAGE_CACHE", 0)
    plain = measure(_mlp(), (x, y), **kwargs)
    assert cached.meta["evaluations"] < 0.8 * plain.meta["evaluations"]
    for key, values in plain.group_values.items():
        np.testing.assert_allclose(cached.group_values[key], values, rtol=1e-12, atol=1e-14)


def test_tuple_networks_equal_at_every_evaluation_root(monkeypatch):
    # A contraction's tree is an undirected tree of symmetric tensors (node v is ∇^{deg v} l),
    # so the engine may evaluate any node last (it picks the cheapest).  Forcing each node
    # in turn as the root must give the same per-tuple values, for every order-3
    # contraction of every schedule and quantity, on the MLP, in float64.
    model, data, theta0, *_ = _case("mlp")
    obj = objective(model, data, theta0, loss=None, dtype=F64, device=None)
    tuples = torch.tensor(list(itertools.permutations(range(obj.n), 4))[::20])
    contractions = {}
    for s in SCHEDULES:
        for q in QUANTITIES:
            for term in series(3, s, q).terms:
                contractions.setdefault(term.contraction.hash, term.contraction)
    networks = {net: c for c in contractions.values() for net, _ in tuple_networks(c)}
    chosen = Engine._hang
    roots_seen = set()
    for net, c in networks.items():
        engine = Engine(obj, tuples, chunk_size=3, budget=None)
        want = engine.tuple_values(net, tuples, "chosen")
        roots = [0] if net.open_root else range(len(net.parents))
        for root in roots:

            def forced(self, net, block_of, tuples, root=root):
                return self._hung_at(net, block_of, tuples, root)[1:]

            monkeypatch.setattr(Engine, "_hang", forced)
            got = Engine(obj, tuples, chunk_size=3, budget=None).tuple_values(net, tuples, "r")
            monkeypatch.setattr(Engine, "_hang", chosen)
            _assert_close(got.numpy(), want.numpy(), 1e-12, f"{c.text} root {root}")
            roots_seen.add(root)
    assert roots_seen == {0, 1, 2, 3}


def test_reverse_first_derivative_equals_forward():
    # On CUDA vector nodes start from the reverse-over-reverse HVP; the number is the same
    model, data, theta0, *_ = _case("mlp")
    obj = objective(model, data, theta0, loss=None, dtype=F64, device=None)
    gen = torch.Generator().manual_seed(1)
    rows = obj.rows
    us = tuple(torch.randn(obj.n, obj.size, generator=gen, dtype=F64) for _ in range(2))
    for k in (0, 1, 2):
        fwd = torch.func.vmap(derivative(obj.single, True), in_dims=(None, 0, 0))
        rev = torch.func.vmap(
            derivative(obj.single, True, reverse_first=True), in_dims=(None, 0, 0)
        )
        want, got = fwd(obj.theta0, rows, us[:k]), rev(obj.theta0, rows, us[:k])
        _assert_close(got.numpy(), want.numpy(), 1e-12, f"k = {k}")
        assert want.abs().max() > 1e-3


def test_vector_statistics_are_batch_means_of_tuples():
    # Open-root statistics keep K = ⌊R/s⌋ batch means of s = ⌈R/vector_batches⌉
    # consecutive tuples (the first K·s tuples), accumulated on the device; scalars keep
    # every tuple.  Against the per-tuple vectors of the same tuples (same seed).
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (64,), generator=gen)
    kwargs = dict(order=2, quantities=("test", "displacement"), progress=False, seed=2)
    every = measure(_mlp(), (x, y), vector_batches=None, chunk_size=5, **kwargs)
    r = every.groups  # 21 tuples of 3 rows
    assert r == 21 and "vector_batches" not in every.meta
    for batches, k, s in ((2, 2, 10), (4, 3, 6), (8, 7, 3), (21, 21, 1), (64, 21, 1)):
        got = measure(_mlp(), (x, y), vector_batches=batches, chunk_size=5, **kwargs)
        assert got.meta["vector_batches"] == k and got.meta["vector_batch_size"] == s
        assert got.groups == r
        for key, c in every.contractions.items():
            per_tuple = every.group_values[key]
            if c.open_root:
                want = per_tuple[: k * s].reshape(k, s, -1).mean(axis=1)
            else:
                want = per_tuple
            np.testing.assert_allclose(got.group_values[key], want, rtol=1e-12, atol=1e-15)
        # a displacement prediction and its error bar come from the batch means
        schedule = Online(steps=3, batch_size=1)
        pred = got.predict(schedule, lr=0.1, quantity="displacement")
        terms = series(2, schedule, "displacement").terms
        per_batch = sum(
            float(t.coefficient) * 0.1**t.power * got.group_values[t.contraction.key] for t in terms
        )
        np.testing.assert_allclose(pred.total[0], per_batch.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(
            pred.se[0], per_batch.std(axis=0, ddof=1) / math.sqrt(k), rtol=1e-12
        )
    with pytest.raises(ValueError, match="vector_batches must be an integer ≥ 2"):
        measure(_mlp(), (x, y), vector_batches=1, **kwargs)
    with pytest.raises(ValueError, match="vector_batches must be an integer ≥ 2"):
        measure(_mlp(), (x, y), vector_batches=2.0, **kwargs)


def test_message_cache_takes_a_quarter_of_free_memory(monkeypatch):
    model, data, theta0, *_ = _case("mlp")
    obj = objective(model, data, theta0, loss=None, dtype=F64, device=None)
    tuples = torch.arange(4)[None, :]
    monkeypatch.setattr(engine_module, "free_bytes", lambda device: 2**40)
    assert Engine(obj, tuples, chunk_size=2, budget=None).message_budget == 2**40 // 4 // 8
    monkeypatch.setattr(engine_module, "free_bytes", lambda device: 2**20)  # little: the floor
    assert Engine(obj, tuples, chunk_size=2, budget=None).message_budget == MESSAGE_CACHE
    monkeypatch.setattr(engine_module, "free_bytes", lambda device: None)  # unknown: the floor
    assert Engine(obj, tuples, chunk_size=2, budget=None).message_budget == MESSAGE_CACHE
