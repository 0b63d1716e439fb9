"""The network evaluation engine (perturb.numeric.engine): the message cache, the choice
of evaluation root, device-side batch means of open-root tuples, the cache budget and
non-finite values named by statistic and data row."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from measure_models import (
    F64,
    SCHEDULES,
    _assert_close,
    _case,
    _mlp,
    _one_thread,  # noqa: F401
)

import perturb.numeric.engine as engine_module
from perturb import QUANTITIES, Contraction, Online, series
from perturb.numeric.adapters import objective
from perturb.numeric.engine import MESSAGE_CACHE, Engine
from perturb.numeric.measuring import measure
from perturb.numeric.networks import contraction_value, tuple_networks


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


def test_tuples_non_finite_names_row():
    def bad(p, x):
        return torch.sqrt(p[0] * x[0]) + p[1] ** 2

    theta0 = torch.tensor([1.0, 0.5], dtype=F64)
    many = torch.cat([torch.ones(7, 1), torch.tensor([[-1.0]])]).to(F64)
    with pytest.raises(ValueError, match="at data row 7"):
        measure(bad, many, theta0, order=2, samples=8, progress=False)


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
