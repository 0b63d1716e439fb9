"""perturb.experiments.comparison against exact expectations by enumerating every SGD path.

Softmax regression (``mlp(hidden=())``) on a population of 8 digits: for ``T ≤ 2`` steps
the expected test loss is a finite average over all ``n^{BT}`` batch sequences, computed
here with the closed-form softmax gradient (no perturb code).  The table's SGD mean is
checked against it within its standard error, and the theories' values against it and
against each other.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from perturb.experiments.baselines import QuadraticModel, lyapunov_test_loss, sde_test_loss
from perturb.experiments.comparison import Comparison, compare
from perturb.experiments.data import load_dataset
from perturb.experiments.models import mlp
from perturb.experiments.pipeline import Start

POP, LR, SEED = 8, 0.02, 0


def _population():
    data = load_dataset("digits", split="train").subset(POP, seed=SEED)
    x = data.x.reshape(POP, -1).to(torch.float64)
    return x, torch.nn.functional.one_hot(data.y, 10).to(torch.float64)


def _net():
    return mlp((1, 8, 8), 10, hidden=(), seed=SEED)


def _exact_sgd(batch_size: int, steps: int) -> float:
    """E over all batch sequences (uniform, with replacement) of the population loss."""
    x, onehot = _population()
    lin = _net()[1]
    w0 = torch.cat([lin.weight.detach().to(torch.float64), lin.bias.detach()[:, None].double()], 1)
    xb = torch.cat([x, torch.ones(POP, 1, dtype=torch.float64)], 1)  # (n, 65)
    batches = torch.tensor(list(itertools.product(range(POP), repeat=batch_size)))
    ws = w0[None]
    for _ in range(steps):
        p = torch.softmax(ws @ xb.T, dim=1)  # (S, 10, n): softmax over classes
        per = (p - onehot.T[None])[:, :, None, :] * xb.T[None, None]  # (S, 10, 65, n)
        g = per[..., batches].mean(-1)  # (S, 10, 65, batches)
        ws = (ws[:, :, :, None] - LR * g).permute(0, 3, 1, 2).reshape(-1, 10, 65)
    logits = ws @ xb.T  # (S, 10, n)
    loss = -(torch.log_softmax(logits, dim=1) * onehot.T[None]).sum(1).mean(1)
    return float(loss.mean())


@pytest.fixture(scope="module")
def small():
    return compare(
        model=_net(),
        lrs=(LR,),
        batch_sizes=(1, 2),
        steps=(1, 2),
        trials=2000,
        orders=(1, 2, 3),
        population=POP,
        seed=SEED,
    )


def test_sgd_mean_matches_exact_enumeration(small):
    """|mean − exact| < 4.5 SE for each of 4 rows: false failure ≤ 4·6.8e-6 (seeded)."""
    for r in small.rows:
        exact = _exact_sgd(r["batch_size"], r["steps"])
        se = r["ci_half"] / stats.t.ppf(0.975, r["trials"] - 1)
        assert abs(r["actual"] - exact) < 4.5 * se, (r["batch_size"], r["steps"], exact, r)


def test_perturb_orders_converge_to_exact(small):
    """The un-resummed series approaches the exact value order by order (η = 0.02)."""
    for r in small.rows:
        exact = _exact_sgd(r["batch_size"], r["steps"])
        errs = [abs(r["predictions"][f"order {d}"]["value"] - exact) for d in (1, 2, 3)]
        assert errs[0] > errs[1] > errs[2], (r["batch_size"], r["steps"], errs)
        assert errs[2] < 1e-3 * abs(exact)


def test_theories_use_the_statistics_at_theta0(small):
    """Gradient flow/SDE/Lyapunov equal the baselines on a quadratic model built here with autograd;
    at T = 1 the quadratic model's exact answer (Lyapunov) is perturb's order 2."""
    x, onehot = _population()
    lin = _net()[1]
    w0 = torch.cat([lin.weight.detach().double(), lin.bias.detach()[:, None].double()], 1)
    xb = torch.cat([x, torch.ones(POP, 1, dtype=torch.float64)], 1)

    def per_sample(w):
        logits = xb @ w.reshape(10, 65).T
        return -(torch.log_softmax(logits, 1) * onehot).sum(1)

    flat = w0.reshape(-1)
    hess = torch.autograd.functional.hessian(lambda w: per_sample(w).mean(), flat, vectorize=True)
    grads = torch.autograd.functional.jacobian(per_sample, flat, vectorize=True)
    # perturb's flat parameters are (weight, bias) concatenated; reorder ours to match
    order = torch.cat(
        [
            torch.arange(650).reshape(10, 65)[:, :64].reshape(-1),
            torch.arange(650).reshape(10, 65)[:, 64],
        ]
    )
    quad = QuadraticModel.from_derivatives(
        {0: per_sample(flat), 1: grads[:, order]}, hess[order][:, order]
    )
    for r in small.rows:
        s, b = r["steps"], r["batch_size"]
        pred = r["predictions"]
        want = float(lyapunov_test_loss(quad, lr=LR, steps=s, batch_size=b))
        assert pred["Lyapunov"]["value"] == pytest.approx(want, rel=1e-5)
        want = float(sde_test_loss(quad, lr=LR, steps=s, batch_size=b))
        assert pred["SDE"]["value"] == pytest.approx(want, rel=1e-5)
        if s == 1:
            assert pred["order 2"]["value"] == pytest.approx(pred["Lyapunov"]["value"], rel=1e-5)
        # softmax regression: H at θ_0 has flat directions, so no stationary law
        assert math.isnan(pred["stationary"]["value"])
    assert "not positive definite" in small.notes["stationary"]


def test_outputs_agree_with_the_rows(small, tmp_path):
    paths = small.write(tmp_path)
    assert [p.name for p in paths] == ["compare.json", "compare.csv", "compare.png"]
    loaded = json.loads(paths[0].read_text())
    assert loaded["predictors"] == small.predictors
    assert loaded["rows"][0]["actual"] == pytest.approx(small.rows[0]["actual"])
    assert math.isnan(small.rows[0]["predictions"]["stationary"]["value"])
    assert loaded["rows"][0]["predictions"]["stationary"]["value"] is None
    lines = small.to_csv().strip().splitlines()
    assert len(lines) == 1 + len(small.rows)
    header = lines[0].split(",")
    first = dict(zip(header, lines[1].split(","), strict=True))
    assert float(first["SDE"]) == pytest.approx(small.rows[0]["predictions"]["SDE"]["value"])
    table = small.table()
    assert all(n in table.splitlines()[0] for n in small.predictors)
    assert f"{small.rows[0]['actual']:.5f}" in table
    assert isinstance(Comparison(config={}).to_dict()["rows"], list)
    assert paths[2].stat().st_size > 1000 and np.isfinite(small.rows[0]["ci_half"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lrs": ()}, "lrs"),
        ({"lrs": (-0.1,)}, "lrs"),
        ({"batch_sizes": (0,)}, "batch_sizes"),
        ({"steps": ()}, "steps"),
        ({"steps": (1.5,)}, "steps"),
        ({"trials": 1}, "trials"),
        ({"population": 0}, "population"),
        ({"orders": (5,)}, "orders"),
    ],
)
def test_compare_rejects_bad_grids(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare(**kwargs)


def test_mnist1d_compare_runs_and_names_the_theories_it_skips():
    """The 1-D convnet (34,202 parameters) is too big for the materialized Hessian."""
    result = compare(
        dataset="mnist1d",
        lrs=(0.01,),
        batch_sizes=(1,),
        steps=(2, 4),
        trials=4,
        orders=(1,),
        population=64,
    )
    assert result.config["parameters"] == 34202
    assert result.predictors == ["order 1"]
    why = "not available (needs the materialized Hessian: 34202 parameters > "
    why += "max_hessian_parameters = 4000)"
    skipped = ("resummed 2", "gradient flow", "SDE", "Lyapunov", "stationary")
    assert result.notes == dict.fromkeys(skipped, why)
    table = result.table()
    assert all(f"{name}: {why}" in table for name in skipped)
    assert [r["steps"] for r in result.rows] == [2, 4]
    for r in result.rows:
        assert not r["divergent"] and math.isfinite(r["predictions"]["order 1"]["value"])


def test_compare_from_a_pretrained_start_flags_blown_up_theories(tmp_path):
    """Softmax regression pretrained on the population; at η = 60 the series blows up."""
    result = compare(
        model=_net(),
        lrs=(LR, 60.0),
        batch_sizes=(1,),
        steps=(2,),
        trials=8,
        orders=(1, 3),
        population=POP,
        pretrain=20,
        pretrain_lr=0.5,
    )
    start = result.config["start"]
    assert start["pretrain_steps"] == 20 and start["pretrain_lr"] == 0.5
    table = result.table()
    assert table.splitlines()[0] == Start(**start).describe()
    bad = {r["lr"]: r for r in result.rows}[60.0]["predictions"]
    assert bad["order 3"]["unstable"] and math.isfinite(bad["order 3"]["value"])
    assert "unstable" in table and f"{bad['order 3']['value']:9.5f}" not in table
    good = {r["lr"]: r for r in result.rows}[LR]["predictions"]
    assert not any(p["unstable"] for p in good.values())
    # stationary's nan is "no stationary law" (see the notes), not a blow-up
    assert all(not p["unstable"] for p in good.values() if math.isnan(p["value"]))
    loaded = json.loads(result.write(tmp_path)[0].read_text())
    assert loaded["config"]["start"] == start
    assert any(p["unstable"] for r in loaded["rows"] for p in r["predictions"].values())
