"""Re-summation everywhere: the measure path, unstable directions, fast grids of predictions."""

from __future__ import annotations

import string
import warnings

import numpy as np
import pytest
import torch
from resum_landscapes import tanh_net
from torch_calls import torch_calls

import perturb
from perturb.numeric.adapters import flat_loss
from perturb.numeric.resummation import open_network, resummed_values, time_integral, time_sum
from perturb.symbolic.resummed import resummed_terms

ONLINE = perturb.Online(steps=30, batch_size=2)
GD = perturb.GD(train_size=6, steps=30)
LRS = [0.02, 0.1]


def _mlp(hidden: int = 6, rows: int = 24, seed: int = 0):
    """A 4-h-3 tanh MLP (float64, cross-entropy) on random rows: the model and a Population."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
    ).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (rows,), generator=gen)
    fn, theta0 = flat_loss(net)

    def row_loss(p, row):
        return fn(p, row[None, :4], row[None, 4].long())[0]

    pop = perturb.Population(row_loss, torch.cat([x, y[:, None].double()], dim=1))
    return net, (x, y), pop, theta0.detach()


def _old_resummed_values(terms, derivs, *, lr, steps, schedule, integral=False):
    """The implementation before the batched one (one ``lr`` and ``T``, full ``P^d`` grids)."""

    def rotate(tensor, evecs, first):
        for axis in range(first, tensor.ndim):
            tensor = torch.tensordot(tensor, evecs, dims=([axis], [0])).movedim(-1, axis)
        return tensor

    hess = derivs[2].mean(0)
    evals, evecs = torch.linalg.eigh(hess)
    rotated = {k: rotate(t, evecs, 1) for k, t in derivs.items()}
    x = 1 - lr * evals
    order = max(t.diagram.edges for t in terms)
    shape = (hess.shape[0],) if any(t.open_root for t in terms) else ()
    out = [torch.zeros(shape, dtype=hess.dtype)] * (order + 1)
    for term in terms:
        d = term.diagram.edges
        network = open_network(term, rotated)
        xs = [x.reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
        if not d:
            weights = torch.ones((), dtype=hess.dtype)
        elif integral:
            rates = [(lr * evals).reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
            weights = time_integral(term.orders, rates, steps)
        else:
            weights = time_sum(term.orders, xs, steps)
        if term.open_root:
            letters = string.ascii_lowercase[:d]
            value = evecs @ torch.einsum(f"{letters},{letters}->a", network, weights)
        else:
            value = (network * weights).sum()
        out[d] = out[d] + float(term.prefactor) * lr**d * value
    return out


@pytest.mark.parametrize(
    ("schedule", "integral"),
    [
        pytest.param(ONLINE, False, id="online-sums"),
        pytest.param(ONLINE, True, id="online-integral"),
        pytest.param(GD, False, id="gd-sums"),
        # GD's order-3 time integrals take ~2,600 matrix exponentials (15-40 s): the two
        # cases above check the integral weights and GD's terms in the default run
        pytest.param(GD, True, id="gd-integral", marks=pytest.mark.slow),
    ],
)
def test_batched_values_equal_the_previous_implementation(schedule, integral):
    """Every order-3 term, test/train/displacement, a grid of η and T: ≤ 1e-10 relative."""
    pop, theta = tanh_net(1)
    derivs = pop.derivatives(theta, 3)
    steps = [7, 30]
    for quantity in ("test", "train", "displacement"):
        terms = resummed_terms(3, schedule, quantity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
            grid = resummed_values(
                terms, derivs, lr=LRS, steps=steps, schedule=schedule, integral=integral
            )
        for i, lr in enumerate(LRS):
            for j, t in enumerate(steps):
                if quantity == "train" and schedule.name == "online":
                    continue  # the prefactors hold 1/N = 1/(TB): one T per set of terms
                old = _old_resummed_values(
                    terms, derivs, lr=lr, steps=t, schedule=schedule, integral=integral
                )
                for a, b in zip(old, grid, strict=True):
                    np.testing.assert_allclose(
                        b[i, j].numpy(), a.numpy(), rtol=1e-10, atol=1e-12 * float(a.abs().max())
                    )


def test_online_train_values_equal_the_previous_implementation():
    pop, theta = tanh_net(2)
    derivs = pop.derivatives(theta, 3)
    terms = resummed_terms(3, ONLINE, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        grid = resummed_values(terms, derivs, lr=LRS, steps=30, schedule=ONLINE)
    for i, lr in enumerate(LRS):
        old = _old_resummed_values(terms, derivs, lr=lr, steps=30, schedule=ONLINE)
        for a, b in zip(old, grid, strict=True):
            assert float(b[i]) == pytest.approx(float(a), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize(
    ("schedule", "order"),
    [
        pytest.param(ONLINE, 2, id="online-2"),
        pytest.param(ONLINE, 3, id="online-3"),
        pytest.param(GD, 2, id="gd-2"),
        # the order-3 twin of gd-2 and of online-3 (GD's order-3 terms on the measure path)
        pytest.param(GD, 3, id="gd-3", marks=pytest.mark.slow),
    ],
)
def test_measure_path_equals_eigendecomposition_at_full_rank(schedule, order):
    """``measure(model, data, resummed=True, rank=P).predict(resummed=True)`` is the exact
    eigen path of ``perturb.predict`` (materialized tensors) to 1e-10."""
    hidden, rows, lrs = (6, 24, LRS) if order == 2 else (3, 12, LRS[1:])  # P = 51 or 27
    net, data, pop, theta0 = _mlp(hidden=hidden, rows=rows)
    p = theta0.numel()
    quantities = ("test", "train", "gap", "displacement")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        stats = perturb.measure(
            net, data, order=order, schedules=[schedule], quantities=quantities, exact=True,
            resummed=True, rank=p, progress=False,
        )  # fmt: skip
        assert stats.subspace is not None and stats.subspace.rank == p
        for quantity in quantities:
            got = stats.predict(schedule, lr=lrs, quantity=quantity, order=order, resummed=True)
            assert got.resummed and got.rank == p and got.coefficients is None
            for i, lr in enumerate(lrs):
                ref = perturb.predict(
                    pop, theta0, schedule, lr=lr, order=order, quantity=quantity, resummed=True
                )
                scale = np.max(np.abs(ref.total))
                np.testing.assert_allclose(got.total[i], ref.total, rtol=1e-10, atol=1e-10 * scale)
                for a, b in zip(ref.by_order, got.by_order[i], strict=True):
                    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-10 * scale)
            assert np.all(got.se == 0)  # exact statistics
            assert got.error.shape == got.total.shape


def test_measure_path_error_bars_and_convergence():
    """Sampled rows: a finite positive jackknife error bar; the Krylov error shrinks with k."""
    net, data, _pop, _theta0 = _mlp(hidden=6, rows=64)
    stats = perturb.measure(
        net, data, order=2, schedules=[ONLINE], exact=False, resummed=True, rank=24, groups=8,
        progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        full = stats.predict(ONLINE, lr=LRS, resummed=True)
        low = stats.predict(ONLINE, lr=LRS, resummed=True, rank=6)
    assert np.all(np.isfinite(full.se)) and np.all(full.se > 0)
    assert np.all(full.error <= low.error + 1e-12)
    assert stats.meta["resummed_groups"] == 8
    with pytest.raises(ValueError, match="integral and rank apply to re-summed"):
        stats.predict(ONLINE, lr=0.1, rank=3)


def test_saved_statistics_leave_the_subspace_out(tmp_path):
    net, data, _pop, _theta0 = _mlp()
    stats = perturb.measure(
        net, data, order=2, schedules=[ONLINE], exact=True, resummed=True, rank=8, progress=False
    )
    stats.save(tmp_path / "s.npz")
    back = perturb.Statistics.load(tmp_path / "s.npz")
    assert back.subspace is None and "not saved" in back.meta["subspace"]
    with pytest.raises(ValueError, match="hold no Krylov subspace"):
        back.predict(ONLINE, lr=0.1, resummed=True)
    with pytest.raises(ValueError, match="needs rank=k"):
        perturb.measure(net, data, order=2, exact=True, resummed=True, progress=False)


def _saddle():
    """``l_x(θ) = ½θᵀAθ + x·θ`` with ``A = diag(−0.5, 1)``: one negative eigenvalue."""
    a = torch.tensor([-0.5, 1.0], dtype=torch.float64)
    xs = torch.tensor([[1.0, -1.0], [-1.0, 2.0], [0.5, 0.0]], dtype=torch.float64)

    def loss_fn(p, x):
        return 0.5 * (a * p * p).sum() + x @ p

    return perturb.Population(loss_fn, xs), torch.tensor([0.3, -0.2], dtype=torch.float64)


def test_unstable_directions_warn_on_every_path():
    pop, theta0 = _saddle()
    sched = perturb.Online(steps=100, batch_size=1)
    expected = 100 * np.log1p(0.1 * 0.5)  # T·log(1 + η|h_min|)
    with pytest.warns(perturb.UnstableDirectionWarning, match="grows"):
        eig = perturb.predict(pop, theta0, sched, lr=0.1, order=2, resummed=True)
    assert eig.unstable and eig.growth == pytest.approx(expected, rel=1e-12)
    sub = perturb.krylov_subspace(pop, None, theta0, rank=2)
    with pytest.warns(perturb.UnstableDirectionWarning):
        kry = sub.predict(sched, lr=0.1, order=2)
    assert kry.unstable and kry.growth == pytest.approx(expected, rel=1e-9)
    stats = perturb.measure(
        pop, None, theta0, order=2, schedules=[sched], exact=True, resummed=True, rank=2,
        progress=False,
    )  # fmt: skip
    with pytest.warns(perturb.UnstableDirectionWarning):
        meas = stats.predict(sched, lr=[0.01, 0.1], resummed=True)
    assert meas.unstable and meas.growth == pytest.approx(expected, rel=1e-9)
    assert float(meas.total[1]) == pytest.approx(eig.total, rel=1e-10)
    with pytest.warns(perturb.UnstableDirectionWarning):  # ηh > 2 is unstable too
        big = perturb.predict(pop, theta0, sched, lr=2.5, order=1, resummed=True)
    assert big.growth == pytest.approx(100 * np.log1p(0.5 * 2.5), rel=1e-12)
    assert not perturb.predict(pop, theta0, sched, lr=0.1, order=2).unstable  # un-resummed


def test_stable_points_do_not_warn():
    pop, theta0 = tanh_net(0, weight_decay=2.0)  # weight decay makes H positive definite
    sched = perturb.Online(steps=100, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", perturb.UnstableDirectionWarning)
        pred = perturb.predict(pop, theta0, sched, lr=0.05, order=2, resummed=True)
        sub = perturb.krylov_subspace(pop, None, theta0, rank=13).predict(sched, lr=0.05)
    assert not pred.unstable and pred.growth == 0.0
    assert not sub.unstable and sub.growth == 0.0


def test_long_grids_cost_what_short_ones_do():
    """A grid of η at T = 10⁵ costs what it costs at T = 10² (closed forms, log T)."""
    _net, _data, pop, theta0 = _mlp(hidden=10, rows=32)  # P = 83

    def decayed(p, row):  # weight decay: a stable point, finite values at T = 10⁵
        return pop.loss_fn(p, row) + 0.5 * (p @ p)

    stats = perturb.measure(
        perturb.Population(decayed, pop.data), None, theta0, order=2, schedules=[ONLINE],
        exact=False, resummed=True, rank=83, progress=False,
    )  # fmt: skip
    lrs = np.geomspace(1e-3, 0.1, 5)
    calls, values = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", perturb.UnstableDirectionWarning)
        stats.predict(perturb.Online(steps=100, batch_size=1), lr=lrs, resummed=True)
        for steps in (100, 100_000):  # the call above filled the eigenbasis cache
            sched = perturb.Online(steps=steps, batch_size=1)
            values[steps], calls[steps] = torch_calls(stats.predict, sched, lr=lrs, resummed=True)
    assert np.all(np.isfinite(values[100_000].total)) and np.all(values[100_000].se > 0)
    # counted work, not seconds: closed forms cost log₂T squarings (17 vs 7), at most 3×
    # the torch operations (1.9× measured); a loop over steps would cost 1000×
    assert calls[100_000] < 3 * calls[100], calls
