"""Numeric re-summation (perturb.numeric.resummation) against exact recursions and the series."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from resum_landscapes import exact_test_loss, linear_gaussian, tanh_net
from torch_calls import torch_calls

import perturb
from perturb.numeric.resummation import complete_homogeneous, time_sum
from perturb.symbolic.resummed import resummed_terms


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eta_frac", [0.1, 1.0, 1.5])
@pytest.mark.parametrize(
    "schedule",
    [
        perturb.Online(steps=10_000, batch_size=1),
        perturb.Online(steps=10_000, batch_size=3),
        perturb.GD(train_size=4, steps=10_000),
    ],
    ids=["online-B1", "online-B3", "gd-N4"],
)
def test_linear_gaussian_order2_is_exact_at_long_times(seed, eta_frac, schedule):
    hess, xs, theta0, loss_fn = linear_gaussian(3, 6, seed)
    lr = eta_frac / float(torch.linalg.eigvalsh(hess).max())
    pred = perturb.predict(
        perturb.Population(loss_fn, xs), theta0, schedule, lr=lr, order=2, resummed=True
    )
    if schedule.batches == 1:
        exact = exact_test_loss(hess, xs, theta0, lr, 10_000, train_size=int(schedule.train_size))
    else:
        exact = exact_test_loss(hess, xs, theta0, lr, 10_000, batch_size=int(schedule.batch_size))
    assert pred.total == pytest.approx(exact, rel=1e-9)


def test_resummed_agrees_with_unresummed_to_next_order_on_tanh_net():
    """Float check on a tanh net: the difference scales as η⁴ (ratio 16 per halving)."""
    pop, theta = tanh_net(0)
    sched = perturb.Online(steps=5, batch_size=1)
    diffs = []
    for lr in (2e-3, 1e-3):
        r = perturb.predict(pop, theta, sched, lr=lr, order=3, resummed=True).total
        u = perturb.predict(pop, theta, sched, lr=lr, order=3).total
        diffs.append(r - u)
    assert diffs[0] / diffs[1] == pytest.approx(16, rel=0.02)


def _predict_calls(pop, theta0, schedule) -> int:
    """Torch operations of one re-summed order-3 prediction (after a warm-up call that
    fills the caches: the symbolic terms, compiled once per schedule shape)."""
    perturb.predict(pop, theta0, schedule, lr=0.1, order=3, resummed=True)
    return torch_calls(perturb.predict, pop, theta0, schedule, lr=0.1, order=3, resummed=True)[1]


def test_long_runs_cost_no_more_than_short_ones():
    """Counted work, not seconds: ``T = 10⁵`` takes log₂T squarings (17 against 7 at
    ``T = 10²``), so at most 3× the operations (2.3× measured), where a loop over the
    steps would take 1000×."""
    _hess, xs, theta0, loss_fn = linear_gaussian(3, 6, 0)
    pop = perturb.Population(loss_fn, xs)
    online = [perturb.Online(steps=steps, batch_size=1) for steps in (100, 100_000)]
    calls = [_predict_calls(pop, theta0, schedule) for schedule in online]
    assert calls[1] < 3 * calls[0], calls


def test_complete_homogeneous_matches_definition():
    z = torch.tensor([1.0, 0.9, 0.5, 0.9], dtype=torch.float64)  # repeated values are fine
    for n in range(6):
        brute = sum(
            float(np.prod([z[i] for i in combo]))
            for combo in itertools.combinations_with_replacement(range(4), n)
        )
        assert float(complete_homogeneous(z, n)) == pytest.approx(brute, rel=1e-13)
    assert float(complete_homogeneous(z, -1)) == 0.0


def test_time_sum_is_the_brute_force_sum_over_embeddings():
    """Chain root ← u ← v in online SGD: Σ_{s<t<T} x_a^{T−t−1} x_b^{t−s−1}."""
    chain = [
        t
        for t in resummed_terms(2, perturb.Online(steps=6, batch_size=1))
        if t.diagram.parents == (-1, 0, 1)
    ]
    assert len(chain) == 0  # a one-child singleton node is re-summed away
    cherry = next(
        t
        for t in resummed_terms(2, perturb.Online(steps=6, batch_size=1))
        if t.diagram.parents == (-1, 0, 0) and len(t.diagram.parts) == 3
    )
    xa, xb = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    brute = sum(0.7 ** (6 - s - 1) * 0.4 ** (6 - t - 1) for s in range(6) for t in range(6))
    assert float(time_sum(cherry.orders, [xa, xb], 6)) == pytest.approx(brute, rel=1e-13)


def test_mean_tensors_replace_per_sample_tensors_for_lone_nodes():
    """Order-2 re-summed values need per-sample gradients only; H may be a mean."""
    from perturb.numeric.resummation import resummed_values
    from perturb.reference import derivative_tensors

    _hess, xs, theta0, loss_fn = linear_gaussian(4, 5, 3)
    derivs = derivative_tensors(loss_fn, xs, theta0, 2)
    schedule = perturb.Online(steps=50, batch_size=2)
    terms = resummed_terms(2, schedule)
    full = resummed_values(terms, derivs, lr=0.2, steps=50, schedule=schedule)
    lean = resummed_values(
        terms,
        {0: derivs[0], 1: derivs[1]},
        lr=0.2,
        steps=50,
        schedule=schedule,
        means={2: derivs[2].mean(0)},
    )
    for a, b in zip(full, lean, strict=True):
        assert float(b) == pytest.approx(float(a), rel=1e-12)


def test_cyclic_part_constraints_have_no_embedding():
    """Parts whose edges force each to precede the other are dropped (order 5)."""
    _hess, xs, theta0, loss_fn = linear_gaussian(2, 3, 0)
    pop = perturb.Population(loss_fn, xs)
    sched = perturb.Online(steps=4, batch_size=1)
    for quantity in ("test", "displacement"):
        pred = perturb.predict(
            pop, theta0, sched, lr=0.1, order=5, quantity=quantity, resummed=True
        )
        assert len(pred.by_order) == 6
    disp = perturb.predict(
        pop, theta0, sched, lr=0.1, order=5, quantity="displacement", resummed=True
    )
    assert all(np.shape(v) == (2,) for v in disp.by_order)


def test_integral_form_of_example_1():
    """Remark 2: one level, three edges to the root: (1 − e^{−T Σr}) / Σr."""
    from perturb.numeric.resummation import time_integral

    rates = [torch.tensor(v, dtype=torch.float64) for v in (0.01, 0.02, 0.005)]
    total = sum(float(r) for r in rates)
    got = float(time_integral(((1, ((1, 2), (1, 2), (1, 2))),), rates, 100.0))
    assert got == pytest.approx(-np.expm1(-100 * total) / total, rel=1e-13)


def test_integral_form_of_the_split_cherry():
    """Two lone leaves under the root: the three weak orders give the full square plus
    the diagonal, ∏ (1 − e^{−r_i T})/r_i + (1 − e^{−(r_1+r_2)T})/(r_1 + r_2)."""
    from perturb.numeric.resummation import time_integral

    cherry = next(
        t
        for t in resummed_terms(2, perturb.Online(steps=7, batch_size=1))
        if t.diagram.parents == (-1, 0, 0) and len(t.diagram.parts) == 3
    )
    r1, r2 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    t = 7.0
    square = (-np.expm1(-0.3 * t) / 0.3) * (-np.expm1(-0.05 * t) / 0.05)
    diagonal = -np.expm1(-0.35 * t) / 0.35
    assert float(time_integral(cherry.orders, [r1, r2], t)) == pytest.approx(
        square + diagonal, rel=1e-12
    )


def test_integral_form_is_exact_to_first_order_in_eta():
    """At fixed ηT the integral form differs from the exact sums by O(η)."""
    _, xs, theta0, loss_fn = linear_gaussian(3, 6, 1)
    pop = perturb.Population(loss_fn, xs)
    gaps = []
    for lr, steps in ((0.02, 50), (0.01, 100), (0.005, 200)):
        sched = perturb.Online(steps=steps, batch_size=1)
        exact = perturb.predict(pop, theta0, sched, lr=lr, order=2, resummed=True).total
        approx = perturb.predict(
            pop, theta0, sched, lr=lr, order=2, resummed=True, integral=True
        ).total
        gaps.append(approx - exact)
    assert gaps[0] / gaps[1] == pytest.approx(2, rel=0.1)
    assert gaps[1] / gaps[2] == pytest.approx(2, rel=0.1)
    with pytest.raises(ValueError, match="integral=True applies to re-summed"):
        perturb.predict(pop, theta0, sched, lr=0.1, order=2, integral=True)


# ----------------------------------------------------------- fixed-order epochs


def _exact_epoch_losses(hess, xs, theta0, lr, *, train_size, batch_size, epochs, shuffle):
    """Exact E l(θ_T) (test) and E (1/N)Σ_n l_n(θ_T) (train) for E epochs on
    l_x(θ) = ½θᵀHθ + xᵀθ, the N training points drawn iid from the rows once.

    ``θ_T = K^T θ_0 − η Σ_t A_t x̄_t``, ``A_t = K^{T−1−t}``; ``Cov(x̄_t, x̄_s) = w C`` with
    ``w = 1/B`` at ``t = s``, ``0`` for two steps of one epoch, and across epochs ``1/B`` at
    the same batch position (fixed order, else ``0``) or ``1/N`` (reshuffled).  So
    ``Cov θ_T = η² Σ_{t,s} w A_t C A_sᵀ``, accumulated per batch (fixed) or per epoch
    (reshuffled), and ``E (1/N)Σ_n x_nᵀθ_T = μᵀE θ_T − (η/N) Σ_t tr(A_t C)``."""
    hess, xs, theta0 = (np.asarray(a, dtype=np.float64) for a in (hess, xs, theta0))
    mu = xs.mean(0)
    cov = (xs - mu).T @ (xs - mu) / xs.shape[0]
    p = len(mu)
    batches = train_size // batch_size
    steps = batches * epochs
    k = np.eye(p) - lr * hess
    powers = [np.eye(p)]
    for _ in range(steps):
        powers.append(k @ powers[-1])
    a = [powers[steps - 1 - t] for t in range(steps)]
    total = sum(a)
    if shuffle:
        per_epoch = [sum(a[e * batches : (e + 1) * batches]) for e in range(epochs)]
        same_step = sum(m @ cov @ m.T for m in a) / batch_size
        across = total @ cov @ total.T - sum(s_ @ cov @ s_.T for s_ in per_epoch)
        sigma = lr**2 * (same_step + across / train_size)
    else:
        per_batch = [sum(a[b::batches]) for b in range(batches)]
        sigma = lr**2 * sum(m @ cov @ m.T for m in per_batch) / batch_size
    mean = powers[steps] @ theta0 - lr * total @ mu
    test = 0.5 * np.trace(hess @ (sigma + np.outer(mean, mean))) + mu @ mean
    cross = lr * np.trace(total @ cov) / train_size
    return float(test), float(test - cross)


@pytest.mark.parametrize("shuffle", [False, True], ids=["fixed", "shuffled"])
@pytest.mark.parametrize("eta_frac", [0.1, 1.0, 1.5])
@pytest.mark.parametrize(
    "sizes", [(6, 2, 100), (5, 1, 60), (8, 4, 150)], ids=["N6B2E100", "N5B1E60", "N8B4E150"]
)
def test_linear_gaussian_order2_is_exact_for_epochs(sizes, eta_frac, shuffle):
    """300 steps of E epochs over one training set (fixed order or reshuffled): the
    re-summed order-2 test, train and gap equal the exact second-moment answer."""
    n, b, e = sizes
    hess, xs, theta0, loss_fn = linear_gaussian(3, 6, 1)
    lr = eta_frac / float(torch.linalg.eigvalsh(hess).max())
    schedule = perturb.Epochs(train_size=n, batch_size=b, epochs=e, shuffle=shuffle)
    pop = perturb.Population(loss_fn, xs)
    test, train = _exact_epoch_losses(
        hess, xs, theta0, lr, train_size=n, batch_size=b, epochs=e, shuffle=shuffle
    )
    for quantity, exact in (("test", test), ("train", train), ("gap", test - train)):
        pred = perturb.predict(
            pop, theta0, schedule, lr=lr, order=2, quantity=quantity, resummed=True
        )
        assert pred.total == pytest.approx(exact, rel=1e-9, abs=1e-12), quantity


def _symbolic_sum_at_numbers(pop, theta0, schedule, quantity, order, lr):
    """Σ_terms prefactor η^d Σ_μ network_μ S_μ with ``S`` from the symbolic layer's exact
    sums (:func:`epoch_time_sum_exact`, ring arithmetic on numpy arrays)."""
    from dataclasses import replace

    from perturb.numeric.resummation import open_network
    from perturb.symbolic.resummed import epoch_time_sum_exact

    derivs = pop.derivatives(torch.as_tensor(theta0, dtype=torch.float64), max(order, 2))
    hess = derivs[2].mean(0)
    evals, evecs = (a.numpy() for a in torch.linalg.eigh(hess))
    rotated = {}
    for k, tensor in derivs.items():
        out = tensor.numpy()
        for axis in range(1, out.ndim):
            out = np.moveaxis(np.tensordot(out, evecs, axes=([axis], [0])), -1, axis)
        rotated[k] = out
    x = 1 - lr * evals
    steps = int(schedule.steps)
    total = [0.0] * (order + 1)
    for term in resummed_terms(order, schedule, quantity):
        d = term.diagram.edges
        network = open_network(term, rotated)
        if not d:
            total[0] += float(term.prefactor) * network
            continue
        xs = [x.reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
        groups = tuple(replace(g, weight=float(g.weight)) for g in term.orders.groups)
        weights = epoch_time_sum_exact(replace(term.orders, groups=groups), xs, steps)
        if term.open_root:
            letters = "abcdefgh"[:d]
            value = evecs @ np.einsum(f"{letters},{letters}->a", network, weights)
        else:
            value = float((network * weights).sum())
        total[d] = total[d] + float(term.prefactor) * lr**d * value
    return total


@pytest.mark.filterwarnings("ignore:re-summed prediction along unstable directions")
@pytest.mark.parametrize("shuffle", [False, True], ids=["fixed", "shuffled"])
@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
@pytest.mark.parametrize("order", [2, 3])
def test_epochs_prediction_is_the_symbolic_sum(order, quantity, shuffle):
    """predict(Epochs(...), resummed=True) on a tanh net (J, S, per-sample Hessians) is
    the symbolic layer's exact sum evaluated at the same numbers, order by order."""
    pop, theta = tanh_net(0)
    schedule = perturb.Epochs(train_size=6, batch_size=2, epochs=4, shuffle=shuffle)
    pred = perturb.predict(
        pop, theta, schedule, lr=0.05, order=order, quantity=quantity, resummed=True
    )
    expected = _symbolic_sum_at_numbers(pop, theta, schedule, quantity, order, 0.05)
    for got, want in zip(pred.by_order, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shuffle", [False, True], ids=["fixed", "shuffled"])
def test_epochs_long_runs_cost_no_more_than_short_ones(shuffle):
    """Counted work, not seconds: log M + log E matrix products, no loop over the steps
    (at most 3× the operations from ``T = 10²`` to ``10⁵``; 2.3–2.4× measured)."""
    _hess, xs, theta0, loss_fn = linear_gaussian(3, 6, 0)
    pop = perturb.Population(loss_fn, xs)
    calls = []
    for n, e in ((10, 10), (100, 1000)):  # T = 10² and 10⁵
        schedule = perturb.Epochs(train_size=n, batch_size=1, epochs=e, shuffle=shuffle)
        value = perturb.predict(pop, theta0, schedule, lr=0.1, order=3, resummed=True).total
        assert np.isfinite(value)
        calls.append(_predict_calls(pop, theta0, schedule))
    assert calls[1] < 3 * calls[0], calls


def test_epochs_integral_form_is_refused():
    _hess, xs, theta0, loss_fn = linear_gaussian(2, 3, 0)
    pop = perturb.Population(loss_fn, xs)
    schedule = perturb.Epochs(train_size=4, batch_size=2, epochs=3)
    with pytest.raises(ValueError, match="integral form is implemented for online SGD"):
        perturb.predict(pop, theta0, schedule, lr=0.1, order=2, resummed=True, integral=True)


def test_complete_homogeneous_on_batches_of_every_width():
    """Batched ``h_n(z_0..z_j)`` for j = 0..3 (one lower-triangular product structure per
    width) at degrees around powers of two (every branch of the repeated squaring),
    against the sum of all monomials of degree ``n``."""
    gen = torch.Generator().manual_seed(0)
    for j in range(4):
        zs = 1.5 * torch.rand(5, j + 1, generator=gen, dtype=torch.float64) - 0.5
        for n in (0, 1, 2, 3, 7, 8, 9):
            ref = torch.zeros(5, dtype=torch.float64)
            for powers in itertools.product(range(n + 1), repeat=j + 1):
                if sum(powers) == n:
                    ref = ref + torch.prod(zs ** torch.tensor(powers, dtype=torch.float64), -1)
            np.testing.assert_allclose(complete_homogeneous(zs, n), ref, rtol=1e-12, atol=1e-15)
    assert float(complete_homogeneous(torch.ones(3, dtype=torch.float64), -1)) == 0.0


def test_cached_networks_give_the_uncached_values():
    """``resummed_values(..., networks=cache)``: one network per diagram, filled on the first
    call and reused for other steps, equal to fresh evaluations."""
    from perturb.numeric.resummation import resummed_values

    pop, theta = tanh_net(3)
    derivs = pop.derivatives(theta, 3)
    cache: dict = {}
    for steps in (5, 40):
        schedule = perturb.Online(steps=steps, batch_size=1)
        terms = resummed_terms(3, schedule)
        kw = {"lr": [0.01, 0.03], "steps": steps, "schedule": schedule, "warn": False}
        cached = resummed_values(terms, derivs, networks=cache, **kw)
        assert len(cache) == len({(t.diagram.parents, t.diagram.parts) for t in terms})
        for a, b in zip(cached, resummed_values(terms, derivs, **kw), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)
