"""The Krylov (Lanczos) path of re-summation (perturb.numeric.krylov) against exact answers."""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
import torch
from resum_landscapes import exact_test_loss, linear_gaussian, tanh_net

import perturb


@functools.cache
def _convnet_population():
    """A smooth tanh convnet (P = 219) on 40 random 6×6 images, float64, with weight
    decay, at a point near its minimum (so H is positive definite and long runs are
    finite): ``(net, x, y, population, theta0)``."""
    from perturb.experiments.models import smooth_convnet
    from perturb.numeric.adapters import flat_loss

    net = smooth_convnet((1, 6, 6), 3, width=3, activation="tanh", seed=0).double()
    fn, theta = flat_loss(net)
    gen = torch.Generator().manual_seed(1)
    n, wd = 40, 0.05
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    rows = torch.cat([x.reshape(n, -1), y[:, None].double()], 1)

    def loss_fn(p, row):
        return fn(p, row[:-1].reshape(1, 1, 6, 6), row[-1:].long())[0] + 0.5 * wd * (p @ p)

    th = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([th], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = fn(th, x, y).mean() + 0.5 * wd * (th @ th)
        value.backward()
        return value

    opt.step(closure)
    theta0 = th.detach() + 0.1 * torch.randn(theta.numel(), generator=gen, dtype=torch.float64) / (
        theta.numel() ** 0.5
    )
    return net, x, y, perturb.Population(loss_fn, rows), theta0


@functools.cache
def _convnet_subspace():
    from perturb.numeric.krylov import krylov_subspace

    _, _, _, pop, theta0 = _convnet_population()
    return krylov_subspace(pop, None, theta0, rank=theta0.numel(), order=2, probes=8)


@functools.cache
def _convnet_eigh(steps: int, quantity: str = "test"):
    _, _, _, pop, theta0 = _convnet_population()
    hess = pop.derivatives(theta0, 2)[2].mean(0)
    lr = 0.5 / float(torch.linalg.eigvalsh(hess).max())
    sched = perturb.Online(steps=steps, batch_size=1)
    return lr, perturb.predict(pop, theta0, sched, lr=lr, order=2, resummed=True, quantity=quantity)


@pytest.mark.parametrize("steps", [100, 100_000])
def test_krylov_full_rank_equals_eigendecomposition_on_a_convnet(steps):
    """k = P: the projection is a rotation, so the Krylov value is the exact one."""
    lr, exact = _convnet_eigh(steps)
    sub = _convnet_subspace()
    assert sub.rank == 219
    got = sub.predict(perturb.Online(steps=steps, batch_size=1), lr=lr)
    scale = max(abs(v) for v in exact.by_order)
    for ours, ref in zip(got.by_order, exact.by_order, strict=True):
        assert ours == pytest.approx(ref, abs=1e-10 * scale)
    # the basis is orthonormal and T is its Galerkin matrix (checked against materialized H)
    _, _, _, pop, theta0 = _convnet_population()
    hess = pop.derivatives(theta0, 2)[2].mean(0)
    q = sub.basis
    assert torch.allclose(q.T @ q, torch.eye(219, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sub.hessian, q.T @ hess @ q, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [16, pytest.param(3, marks=pytest.mark.slow)])
def test_krylov_model_input_equals_population_input(chunk_size):
    """The network given as an nn.Module with (x, y) gives the numbers of the same loss
    given as a per-row Population (same probes, so the same subspace), whatever the rows
    per vectorized call: the model in chunks of 16 (or 3) rows, the population in the
    default (``vmap_rows``: all 40 rows at once).  Order 3 with ``higher_rank=2``, which
    cuts the 4-column first block, so the basis order within a block is compared too."""
    from perturb.numeric.adapters import flat_loss
    from perturb.numeric.krylov import krylov_subspace

    net, x, y, pop, theta0 = _convnet_population()
    fn, _ = flat_loss(net)

    def loss_fn(p, row):
        return fn(p, row[:-1].reshape(1, 1, 6, 6), row[-1:].long())[0]

    plain = perturb.Population(loss_fn, pop.data)
    kw = dict(rank=12, probes=3, seed=3, order=3, higher_rank=2)
    by_model = krylov_subspace(net, (x, y), theta0, chunk_size=chunk_size, **kw)
    by_pop = krylov_subspace(plain, None, theta0, **kw)
    for got, want in [(by_model.basis, by_pop.basis), (by_model.hessian, by_pop.hessian)]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for m in by_pop.derivs:
        torch.testing.assert_close(by_model.derivs[m], by_pop.derivs[m], rtol=0, atol=1e-12)
    for m in by_pop.means:
        torch.testing.assert_close(by_model.means[m], by_pop.means[m], rtol=0, atol=1e-12)
    sched = perturb.Online(steps=100, batch_size=2)
    a = by_model.predict(sched, lr=0.1)
    b = by_pop.predict(sched, lr=0.1)
    for u, v in zip([*a.by_order, *a.coarse_values], [*b.by_order, *b.coarse_values], strict=True):
        assert u == pytest.approx(v, rel=1e-12, abs=1e-14)
    assert a.cost["hvps"] == 12 and a.cost["gradients"] == 4
    assert a.cost["per_sample_gradients"] == 40 and a.cost["per_sample_hvps"] == 40 * 2
    assert a.cost["mean_higher_derivatives"] == 3  # the sorted pairs of 2 vectors


def test_krylov_converges_and_its_error_estimate_bounds_the_error():
    """Ranks 9…144 of P = 219 at T = 10⁴, η = 0.5/λ_max: the error against the exact
    eigendecomposition falls at every doubling, and |value(k) − value(k/2)| is at least
    the true error of value(k) (deterministic: fixed model, data and probes)."""
    lr, exact = _convnet_eigh(10_000)
    sub = _convnet_subspace()
    sched = perturb.Online(steps=10_000, batch_size=1)
    errors = []
    for rank in (9, 18, 36, 72, 144):
        pred = sub.predict(sched, lr=lr, rank=rank)
        err = abs(pred.total - exact.total)
        errors.append(err)
        assert pred.rank == rank
        assert err <= pred.total_error
        assert pred.total_error == pytest.approx(
            abs(pred.total - sub.predict(sched, lr=lr, rank=rank // 2).total), rel=1e-12
        )
    assert all(b < a / 2 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-6 * abs(exact.total)


def _few_eigenvalues(p: int, rows: int, seed: int):
    """Linear-Gaussian loss whose H has 4 distinct eigenvalues (random eigenvectors, so H
    and C do not commute): the block Krylov space of [G, range C] has dimension ≤ 4·rows."""
    gen = torch.Generator().manual_seed(seed)
    vecs, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    evals = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64).repeat_interleave(p // 4)
    hess = vecs @ torch.diag(evals) @ vecs.T
    xs = torch.randn(rows, p, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64)

    def loss_fn(theta, x):
        return 0.5 * theta @ hess @ theta + x @ theta

    return hess, xs, theta0, loss_fn


@pytest.mark.parametrize(
    "schedule",
    [perturb.Online(steps=10_000, batch_size=1), perturb.Online(steps=10_000, batch_size=3)],
    ids=["online-B1", "online-B3"],
)
@pytest.mark.parametrize("eta_frac", [0.1, 1.0, 1.5])
def test_krylov_is_exact_once_the_krylov_space_is_invariant(schedule, eta_frac):
    """p = 40, C of rank 3, 6 probes (random ±1 combinations of 4 rows coincide often, so
    more probes than rank C; the dependent ones are deflated): [G, z_1..z_6] spans G and
    range C, and its Krylov space (dimension ≤ 16) is invariant, so k = 16 < P already
    matches the exact second-moment recursion at T = 10⁴; larger k continues with random
    vectors."""
    hess, xs, theta0, loss_fn = _few_eigenvalues(40, 4, 0)
    pop = perturb.Population(loss_fn, xs)
    lr = eta_frac / 2.0
    exact = exact_test_loss(hess, xs, theta0, lr, 10_000, batch_size=int(schedule.batch_size))
    for rank in (16, 24):
        pred = perturb.predict(
            pop,
            theta0,
            schedule,
            lr=lr,
            order=2,
            resummed=True,
            method="lanczos",
            rank=rank,
            probes=6,
        )
        assert pred.total == pytest.approx(exact, rel=1e-9)
    from perturb.numeric.krylov import krylov_subspace

    sub = krylov_subspace(pop, None, theta0, rank=16, probes=6)
    assert sub.residual < 1e-9 * float(torch.linalg.matrix_norm(hess))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eta_frac", [0.1, 1.5])
@pytest.mark.parametrize(
    "schedule",
    [perturb.Online(steps=10_000, batch_size=3), perturb.GD(train_size=4, steps=10_000)],
    ids=["online-B3", "gd-N4"],
)
def test_krylov_full_rank_matches_linear_gaussian_recursion(seed, eta_frac, schedule):
    hess, xs, theta0, loss_fn = linear_gaussian(12, 6, seed)
    lr = eta_frac / float(torch.linalg.eigvalsh(hess).max())
    pred = perturb.predict(
        perturb.Population(loss_fn, xs),
        theta0,
        schedule,
        lr=lr,
        order=2,
        resummed=True,
        method="lanczos",
        rank=12,
        probes=2,
        seed=seed,
    )
    if schedule.batches == 1:
        exact = exact_test_loss(hess, xs, theta0, lr, 10_000, train_size=int(schedule.train_size))
    else:
        exact = exact_test_loss(hess, xs, theta0, lr, 10_000, batch_size=int(schedule.batch_size))
    assert pred.total == pytest.approx(exact, rel=1e-9)
    assert pred.cost["hvps"] == 12


@pytest.mark.parametrize(
    ("schedule", "quantity", "integral"),
    [
        (perturb.Online(steps=50, batch_size=1), "test", False),
        (perturb.Online(steps=50, batch_size=2), "displacement", True),
        (perturb.GD(train_size=3, steps=50), "gap", False),
    ],
    ids=["online-test", "online-displacement-integral", "gd-gap"],
)
def test_krylov_full_rank_order3_equals_eigendecomposition(schedule, quantity, integral):
    """Order 3 (J, S and per-sample Hessians through nested jvps) at k = P."""
    from perturb.numeric.krylov import krylov_subspace

    pop, theta = tanh_net(4, weight_decay=0.05)
    sub = krylov_subspace(
        pop, None, theta, rank=13, order=3, quantities=(quantity,), schedules=schedule, probes=2
    )
    exact = perturb.predict(
        pop, theta, schedule, lr=0.05, order=3, quantity=quantity, resummed=True, integral=integral
    )
    got = sub.predict(schedule, lr=0.05, quantity=quantity, integral=integral)
    for ours, ref in zip(got.by_order, exact.by_order, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [
        perturb.Online(steps=40, batch_size=1),
        # reshuffled epochs (-m slow): the nesting is the twin of online's and GD's
        pytest.param(
            perturb.Epochs(train_size=3, batch_size=1, epochs=2, shuffle=True),
            marks=pytest.mark.slow,
        ),
        perturb.GD(train_size=3, steps=40),
    ],
    ids=["online", "epochs-shuffled", "gd"],
)
def test_higher_rank_evaluates_each_order_on_its_own_leading_block(schedule):
    """With ``higher_rank = k_3 < k`` the diagrams that need per-sample Hessians or ``J``
    are those of a rank-``k_3`` subspace (the basis is nested), the others those of rank
    ``k``; at ``k_3 = k = P`` everything is the exact eigendecomposition."""
    from perturb.numeric.krylov import krylov_subspace

    pop, theta = tanh_net(4, weight_decay=0.05)  # P = 13
    kw = {"order": 3, "quantities": ("test", "train"), "schedules": schedule, "probes": 2}
    full = krylov_subspace(pop, None, theta, rank=12, **kw)
    split = krylov_subspace(pop, None, theta, rank=12, higher_rank=5, **kw)
    small = krylov_subspace(pop, None, theta, rank=5, **kw)
    assert split.higher_rank == 5 and full.higher_rank == 12
    assert (
        split.cost["per_sample_hvps"]
        == small.cost["per_sample_hvps"]
        < full.cost["per_sample_hvps"]
    )
    for quantity in ("test", "gap"):
        levels = split.ranks(schedule, quantity, 3)
        assert levels[-1] == 5 and levels[0] == 12
        got = split.values(schedule, lr=[0.02, 0.05], quantity=quantity)
        wide = full.values(schedule, lr=[0.02, 0.05], quantity=quantity)
        narrow = small.values(schedule, lr=[0.02, 0.05], quantity=quantity)
        for d, level in enumerate(levels):
            ref = wide if level == 12 else narrow
            np.testing.assert_allclose(got[:, d], ref[:, d], rtol=1e-10, atol=1e-13)
        half = split.ranks(schedule, quantity, 3, rank=6)  # the k/2 estimate halves both
        assert half[0] == 6 and half[-1] == 2
    exact = krylov_subspace(pop, None, theta, rank=13, higher_rank=13, **kw)
    ref = perturb.predict(pop, theta, schedule, lr=0.05, order=3, resummed=True)
    np.testing.assert_allclose(
        exact.values(schedule, lr=[0.05])[0], ref.by_order, rtol=1e-9, atol=1e-12
    )
    with pytest.raises(ValueError, match=r"higher_rank must be an integer in 1\.\.12, got 13"):
        krylov_subspace(pop, None, theta, rank=12, higher_rank=13, **kw)


def test_open_networks_are_reused_across_steps():
    """A subspace that has evaluated one schedule gives a second schedule with the same
    diagrams (other ``T``, other time structure) the values of a fresh subspace."""
    from perturb.numeric.krylov import krylov_subspace

    pop, theta = tanh_net(4, weight_decay=0.05)
    kw = {"rank": 8, "order": 3, "probes": 2, "schedules": [perturb.Online(), perturb.GD()]}
    warm = krylov_subspace(pop, None, theta, **kw)
    warm.values(perturb.Online(steps=10, batch_size=1), lr=[0.05])
    for schedule in (perturb.Online(steps=30, batch_size=1), perturb.GD(train_size=3, steps=7)):
        fresh = krylov_subspace(pop, None, theta, **kw).values(schedule, lr=[0.05])
        np.testing.assert_allclose(warm.values(schedule, lr=[0.05]), fresh, rtol=1e-12)


def test_krylov_long_runs_cost_no_more_than_short_ones():
    """Counted work, not seconds: closed forms take log₂T squarings (17 vs 7), so at most
    3× the torch operations (2.1× measured), where a loop over steps would take 1000×."""
    from torch_calls import torch_calls

    sub = _convnet_subspace()
    sub.predict(perturb.Online(steps=100, batch_size=1), lr=0.1)  # fills the caches
    calls = [
        torch_calls(sub.predict, perturb.Online(steps=steps, batch_size=1), lr=0.1)[1]
        for steps in (100, 100_000)
    ]
    assert calls[1] < 3 * calls[0], calls


def test_krylov_errors():
    from perturb.numeric.krylov import krylov_subspace

    _hess, xs, theta0, loss_fn = linear_gaussian(4, 5, 0)
    pop = perturb.Population(loss_fn, xs)
    online = perturb.Online(steps=10, batch_size=1)
    with pytest.raises(ValueError, match="method must be one of \\('eigh', 'lanczos'\\)"):
        perturb.predict(pop, theta0, online, lr=0.1, order=2, resummed=True, method="arnoldi")
    with pytest.raises(ValueError, match="rank is required with method='lanczos'"):
        perturb.predict(pop, theta0, online, lr=0.1, order=2, resummed=True, method="lanczos")
    with pytest.raises(ValueError, match="rank is required with method='lanczos'"):
        perturb.predict(pop, theta0, online, lr=0.1, order=2, resummed=True, rank=3)
    with pytest.raises(ValueError, match="method='lanczos' applies to re-summed"):
        perturb.predict(pop, theta0, online, lr=0.1, order=2, method="lanczos", rank=3)
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.4, got 5"):
        krylov_subspace(pop, None, theta0, rank=5)
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.4, got 0"):
        krylov_subspace(pop, None, theta0, rank=0)
    with pytest.raises(ValueError, match="probes must be an integer ≥ 0, got -1"):
        krylov_subspace(pop, None, theta0, rank=2, probes=-1)
    with pytest.raises(ValueError, match="quantities must be a non-empty subset"):
        krylov_subspace(pop, None, theta0, rank=2, quantities=("loss",))
    epochs = perturb.Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True)
    assert krylov_subspace(pop, None, theta0, rank=2, schedules=epochs).rank == 2  # now re-summed
    with pytest.raises(TypeError, match="schedules must hold Schedules, got str"):
        krylov_subspace(pop, None, theta0, rank=2, schedules=["online"])
    sub = krylov_subspace(pop, None, theta0, rank=3)
    with pytest.raises(ValueError, match="built for quantities \\('test',\\), got 'train'"):
        sub.predict(online, lr=0.1, quantity="train")
    both = krylov_subspace(pop, None, theta0, rank=3, quantities=("test", "train"))
    gap = both.predict(online, lr=0.1, quantity="gap")
    parts = [both.predict(online, lr=0.1, quantity=q).total for q in ("test", "train")]
    assert gap.total == pytest.approx(parts[0] - parts[1], rel=1e-12)
    eigh = perturb.predict(pop, theta0, online, lr=0.1, order=2, resummed=True)
    assert eigh.error is None and eigh.total_error is None and eigh.rank is None
    with pytest.raises(ValueError, match=r"order must be an integer in 0\.\.2"):
        sub.predict(online, lr=0.1, order=3)
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.3, got 4"):
        sub.predict(online, lr=0.1, rank=4)
    with pytest.raises(ValueError, match="need projected derivatives of orders \\[2\\]"):
        sub.predict(perturb.GD(train_size=5, steps=10), lr=0.1)
    with pytest.raises(ValueError, match="numeric schedule sizes"):
        sub.predict(perturb.Online(), lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        sub.predict(online, lr="fast")
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        sub.predict("online", lr=0.1)


def _flat_direction_sgd(x, a, theta0, lr, steps, batch_size):
    """Exact E[test loss] and E[θ_T − θ_0] of online SGD on ``l_i(θ) = x_i·θ + (a·θ)²/2``
    (``H = a aᵀ``: zero when ``a = 0``, else rank one), by the moment recursion: with
    ``s = a·θ`` and ``c_i = a·x_i``, ``E s' = r E s − η c̄``, ``E s'² = r² E s² − 2rη c̄ E s
    + η²(c̄² + var(c)/B)`` (``r = 1 − η|a|²``) and ``E θ' = E θ − η(x̄ + a E s)``."""
    x, a, theta = (t.numpy() for t in (x, a, theta0))
    xbar, c = x.mean(0), x @ a
    r = 1 - lr * (a @ a)
    mean_s, mean_s2, mean_theta = a @ theta, (a @ theta) ** 2, theta.copy()
    for _ in range(steps):
        mean_theta = mean_theta - lr * (xbar + a * mean_s)
        mean_s2 = r * r * mean_s2 - 2 * r * lr * c.mean() * mean_s
        mean_s2 += lr**2 * (c.mean() ** 2 + c.var() / batch_size)
        mean_s = r * mean_s - lr * c.mean()
    return xbar @ mean_theta + mean_s2 / 2, mean_theta - theta


@pytest.mark.parametrize("hessian", ["zero", "rank one"])
@pytest.mark.parametrize(("probes", "rank"), [(0, 3), (8, 12)])
def test_krylov_is_exact_for_a_zero_or_rank_deficient_hessian(hessian, probes, rank):
    """A linear loss (H = 0: every Hessian-vector product vanishes, the subspace is
    completed at random) and a rank-one H in P = 20: the re-summed test loss and
    displacement equal the exact moments of SGD, through the Krylov path of
    ``krylov_subspace`` and of ``measure(resummed=True)`` alike (was: 'expanded size')."""
    from perturb.numeric.krylov import krylov_subspace
    from perturb.numeric.measuring import measure

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    a = torch.randn(20, generator=gen, dtype=torch.float64) * (hessian == "rank one")
    theta0 = torch.randn(20, generator=gen, dtype=torch.float64)

    def loss_fn(p, row):  # linear: no second-order term at all (H u does not depend on u)
        return row @ p + (a @ p) ** 2 / 2 if hessian == "rank one" else row @ p

    quantities = ("test", "displacement")
    sub = krylov_subspace(
        perturb.Population(loss_fn, x), None, theta0, rank=rank, probes=probes,
        order=2, quantities=quantities,
    )  # fmt: skip
    stats = measure(
        loss_fn, x, theta0, order=2, exact=True, resummed=True, rank=rank, probes=probes,
        quantities=quantities, progress=False,
    )  # fmt: skip
    assert float(torch.linalg.matrix_norm(sub.hessian)) == pytest.approx(
        float(a @ a), abs=1e-12
    )  # ‖QᵀHQ‖ = |a|²: a lies in the subspace (nothing of a rank-one H is lost)
    for lr, steps, batch in [(0.05, 10, 1), (0.02, 300, 3)]:
        test, shift = _flat_direction_sgd(x, a, theta0, lr, steps, batch)
        sched = perturb.Online(steps=steps, batch_size=batch)
        assert sub.predict(sched, lr=lr).total == pytest.approx(test, rel=1e-12)
        got = sub.predict(sched, lr=lr, quantity="displacement").total
        np.testing.assert_allclose(got, shift, rtol=1e-11, atol=1e-13)
        measured = stats.predict(sched, lr=[lr], resummed=True)
        assert measured.total[0] == pytest.approx(test, rel=1e-12)


def test_progress_bars_on_stderr_and_the_same_numbers(capsys):
    """``progress=True``: tqdm bars on standard error over the Lanczos vectors, the rows
    of the per-sample gradients and the
    directions of each projected tensor (rank 4, higher rank 2: 2 per-sample Hessian
    directions, 3 sorted pairs for the mean third derivative), nothing on standard
    output; ``progress=False``: nothing at all; the subspace is the same to the bit.
    ``H = I`` for this loss, so ``T = QᵀHQ = I``."""
    from perturb.numeric.krylov import krylov_subspace

    pop = perturb.Population(
        lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(4, dtype=torch.float64)
    )
    kw = dict(rank=4, order=3, higher_rank=2, per_sample_gradients=True)
    quiet = krylov_subspace(pop, None, torch.ones(4), **kw)
    assert capsys.readouterr() == ("", "")
    loud = krylov_subspace(pop, None, torch.ones(4), **kw, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "krylov: lanczos" in err and "4/4" in err
    assert re.search(r"krylov: per-sample gradients: 100%\|[^|]*\| 4/4 ", err)  # 4 rows
    assert "krylov: per-sample order 2" in err and "2/2" in err
    assert "krylov: mean order 3" in err and "3/3" in err
    torch.testing.assert_close(quiet.hessian, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(quiet.basis, loud.basis) and torch.equal(quiet.hessian, loud.hessian)
    assert quiet.derivs.keys() == loud.derivs.keys() and quiet.means.keys() == loud.means.keys()
    for m in quiet.derivs:
        assert torch.equal(quiet.derivs[m], loud.derivs[m])
    for m in quiet.means:
        assert torch.equal(quiet.means[m], loud.means[m])


def test_measure_passes_progress_to_the_krylov_build(capsys):
    """``measure(resummed=True, progress=...)`` shows the Krylov bars or nothing, with the
    same statistics either way."""
    from perturb.numeric.measuring import measure

    x = torch.eye(3, dtype=torch.float64)

    def loss_fn(p, row):
        return 0.5 * (p * p).sum() + row @ p

    kw = dict(order=2, exact=True, resummed=True, rank=3, probes=1)
    quiet = measure(loss_fn, x, torch.ones(3, dtype=torch.float64), **kw, progress=False)
    assert capsys.readouterr() == ("", "")
    loud = measure(loss_fn, x, torch.ones(3, dtype=torch.float64), **kw, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "krylov: lanczos" in err and "3/3" in err and "measure" in err
    assert torch.equal(quiet.subspace.hessian, loud.subspace.hessian)
    torch.testing.assert_close(quiet.subspace.hessian, torch.eye(3, dtype=torch.float64))
    for key, value in quiet.group_values.items():
        np.testing.assert_array_equal(value, loud.group_values[key])
