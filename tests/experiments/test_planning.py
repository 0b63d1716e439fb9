"""perturb.plan against closed forms: the pick, the instability boundary, the noise scale.

The plan's numbers are checked on populations whose answers are known without perturb:

* a 1-D quadratic population with per-sample curvatures ``a_i`` and slopes ``b_i``
  (``l_i(θ) = ½a_iθ² + b_iθ``), where online SGD's mean and second moment follow a
  two-line recursion, so ``E l(θ_T)`` is exact for every ``(η, B)``: the plan must pick,
  per batch size, the learning rate of the grid with the lowest exact loss; its
  mean-square edge must be the root of ``T(½ log ρ(η) − log⁺|1 − ηĀ|) = 1`` with
  ``ρ = (1 − ηĀ)² + η²Var(a)/B`` and its overshoot edge ``2B/a_(c)``;
* a 3-D linear-Gaussian population (``l_x(θ) = ½θᵀHθ + xᵀθ``) whose noise scale is
  computed here from the materialized per-sample gradients;
* the range test on a population of identical rows, where its losses are a recursion.

The end-to-end runs (API, CLI, ``--check``) use a softmax regression on 8 digits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.optimize import brentq

import perturb
from perturb.cli import cli
from perturb.cli_plan import PLAN_KRYLOV_RANKS, plan_command
from perturb.experiments.models import mlp
from perturb.experiments.plan_check import flagged, regret, score
from perturb.experiments.plan_grid import (
    Horizon,
    NoiseScale,
    PlanGrid,
    grid_rows,
    instability_boundary,
    noise_scale,
    recommend,
)
from perturb.experiments.plan_result import Plan
from perturb.experiments.planning import DEFAULT_KRYLOV_RANKS, PlanSettings, plan
from perturb.experiments.range_test import RangeTestSettings, range_test, steepest
from perturb.symbolic.schedules import Epochs, Online

pytestmark = pytest.mark.usefixtures("one_thread")

A = np.array([0.4, 1.6, 0.4, 1.6])  # per-sample curvatures: Ā = 1, Var(a) = 0.36
SLOPES = np.array([1.0, -0.6, -0.2, 0.2])
THETA0 = 2.0
T = 60


def _quadratic_population():
    rows = torch.tensor(np.c_[A, SLOPES], dtype=torch.float64)
    pop = perturb.Population(lambda p, x: 0.5 * x[0] * (p * p).sum() + x[1] * p.sum(), rows)
    return pop, torch.tensor([THETA0], dtype=torch.float64)


def _exact_loss(eta: float, batch: int, steps: int) -> float:
    """E l(θ_T) of online SGD on the 1-D population, from the moment recursion."""
    a, b = A.mean(), SLOPES.mean()
    var_a, var_b = A.var(), SLOPES.var()
    cov = ((A - a) * (SLOPES - b)).mean()
    m, s = THETA0, THETA0**2
    for _ in range(steps):
        shrink = (1 - eta * a) ** 2 + eta**2 * var_a / batch
        cross = b - eta * (a * b + cov / batch)
        m, s = (
            (1 - eta * a) * m - eta * b,
            shrink * s - 2 * eta * cross * m + eta**2 * (b * b + var_b / batch),
        )
    return 0.5 * a * s + b * m


def _mean_square_edge(batch: int, steps: int) -> float:
    """The first root of T·(½ log ρ − log⁺|1 − ηĀ|) = 1 (``ρ``: the 1-D second-moment rate)."""
    a, var = A.mean(), A.var()

    def excess(eta):
        rho = (1 - eta * a) ** 2 + eta**2 * var / batch
        return steps * (0.5 * math.log(max(rho, 1.0)) - math.log(max(1.0, abs(1 - eta * a)))) - 1

    etas = np.linspace(1e-3, 2 / a, 4001)
    first = next(i for i, e in enumerate(etas) if excess(e) > 0)
    return brentq(excess, etas[first - 1], etas[first], xtol=1e-12)


@pytest.fixture(scope="module")
def quadratic():
    pop, theta0 = _quadratic_population()
    stats = perturb.measure(pop, None, theta0, order=3, exact=True, resummed=True, rank=1,
                            progress=False, schedules=[Online(steps=T, batch_size=1)])  # fmt: skip
    lrs = tuple(float(v) for v in np.round(np.geomspace(0.02, 1.8, 13), 4))
    grid = PlanGrid(lrs=lrs, batch_sizes=(1, 4), horizons=(Horizon("steps", T),), population=4)
    rows, boundaries = grid_rows(stats, grid, sample_curvatures=A, trials=128, points=2)
    return stats, grid, rows, boundaries


def test_predictions_are_the_exact_loss_on_a_quadratic_population(quadratic):
    """resummed 3 + the Hessian ladder is SGD's exact expected loss on quadratic rows."""
    _, _, rows, _ = quadratic
    stable = [r for r in rows if not r["beyond_edge"]]
    got = np.array([r["predicted"] for r in stable])
    want = np.array([_exact_loss(r["lr"], r["batch_size"], T) for r in stable])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_the_plan_picks_the_exact_optimum_per_batch_size(quadratic):
    _, grid, rows, _boundaries = quadratic
    pick = recommend(rows, 0)
    exact_edges = {b: min(2 / A.mean(), _mean_square_edge(b, T)) for b in grid.batch_sizes}
    best = {}
    for b in grid.batch_sizes:
        inside = [lr for lr in grid.lrs if lr < exact_edges[b]]
        best[b] = min(inside, key=lambda lr: _exact_loss(lr, b, T))
    assert pick["per_batch"] == best  # every optimum is trusted here, and picked
    overall = min(best.items(), key=lambda item: _exact_loss(item[1], item[0], T))
    assert (pick["lr"], pick["batch_size"]) == (overall[1], overall[0]) == (0.0896, 4)


def test_the_boundary_is_the_closed_form_edge(quadratic):
    _, _grid, _, boundaries = quadratic
    n = len(A)
    for entry in boundaries:
        b = entry["batch_size"]
        assert entry["gd_edge"] == pytest.approx(2 / A.mean(), rel=1e-12)
        # the bisection stops at 2^-12 of a log-grid step of 10^(1/8): 7e-5 relative
        assert entry["mean_square"] == pytest.approx(_mean_square_edge(b, T), rel=2e-4)
        count = math.ceil(n / (T * b))  # curvatures drawn once: the count-th largest
        assert entry["overshoot"] == pytest.approx(2 * b / np.sort(A)[::-1][count - 1])
        assert entry["edge"] == min(entry["gd_edge"], entry["mean_square"], entry["overshoot"])
    assert [e["edge"] for e in boundaries] == pytest.approx([1.25, 1.851656], rel=2e-4)


def test_epochs_test_loss_and_gap_are_exact_for_full_batches():
    """E epochs of B = N are GD on a training set of N draws: on l_x = ½θ² + xθ the test loss
    is ½(K^{2E}d_0² + (1 − K^E)²c/N) − μ²/2 and the gap c(1 − K^E)/N, K = 1 − η."""
    xs = torch.tensor([[-2.0], [2.0], [-1.0], [1.0]], dtype=torch.float64) + 0.3
    pop = perturb.Population(lambda p, x: 0.5 * (p * p).sum() + (x * p).sum(), xs)
    n_train, epochs = 4, 5
    stats = perturb.measure(
        pop, None, torch.tensor([2.0], dtype=torch.float64), order={"test": 3, "gap": 2},
        exact=True, resummed=True, rank=1, progress=False,
        schedules=[Epochs(train_size=n_train, batch_size=n_train, epochs=epochs)],
    )  # fmt: skip
    horizon = Horizon("samples", epochs * n_train)
    grid = PlanGrid(lrs=(0.05, 0.2, 0.5), batch_sizes=(4,), population=4, schedule="epochs",
                    horizons=(horizon,), train_size=n_train)  # fmt: skip
    rows, _ = grid_rows(stats, grid)
    mu, c = float(xs.mean()), float(xs.var(unbiased=False))
    for r in rows:
        k = 1 - r["lr"]
        test = 0.5 * (k ** (2 * epochs) * (2.0 + mu) ** 2 + (1 - k**epochs) ** 2 * c / n_train)
        assert r["steps"] == epochs
        assert r["predicted"] == pytest.approx(test - mu**2 / 2, rel=1e-12)
        assert r["gap"] == pytest.approx(c * (1 - k**epochs) / n_train, rel=1e-12)


def test_the_boundary_steps_with_the_horizon():
    """Over fewer steps the overshooting samples are not expected to be drawn."""
    pop, theta0 = _quadratic_population()
    stats = perturb.measure(pop, None, theta0, order=3, exact=True, resummed=True, rank=1,
                            progress=False)  # fmt: skip
    short, long = instability_boundary(stats, A, batch_size=1, steps=[1, 50], population=4,
                                       lrs=[0.1, 1.0])  # fmt: skip
    assert short["overshoot"] == pytest.approx(2 / 0.4)  # needs all four rows: the 4th largest
    assert long["overshoot"] == pytest.approx(2 / 1.6)
    assert short["mean_square"] == math.inf or short["mean_square"] > long["mean_square"]


def test_noise_scale_against_materialized_gradients():
    gen = torch.Generator().manual_seed(3)
    p, n = 3, 16
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.3 * torch.eye(p, dtype=torch.float64)
    xs = torch.randn(n, p, generator=gen, dtype=torch.float64) + 0.5
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64)
    pop = perturb.Population(lambda t, x: 0.5 * t @ hess @ t + x @ t, xs)
    stats = perturb.measure(pop, None, theta0, order=2, exact=True, progress=False)
    ns = noise_scale(pop, None, theta0, stats=stats)
    grads = theta0 @ hess + xs  # the per-sample gradients, materialized
    g = grads.mean(0)
    cov = (grads - g).T @ (grads - g) / n
    assert ns.grad_sq == pytest.approx(float(g @ g), rel=1e-12)
    assert ns.trace_cov == pytest.approx(float(torch.trace(cov)), rel=1e-12)
    assert ns.simple == pytest.approx(float(torch.trace(cov) / (g @ g)), rel=1e-12)
    assert ns.critical == pytest.approx(float(torch.trace(hess @ cov) / (g @ hess @ g)), rel=1e-9)
    assert ns.lr_max == pytest.approx(float((g @ g) / (g @ hess @ g)), rel=1e-9)


def test_noise_scale_pick_is_the_nearest_batch_on_a_log_scale():
    ns = NoiseScale(grad_sq=1.0, trace_cov=12.0, ghg=2.0, trace_hc=8.0)  # B_simple 12
    lr, b = ns.pick([1, 2, 4, 8, 16])  # |log(12/16)| < |log(12/8)|
    assert (b, lr) == (16, 0.5 / (1 + 4 / 16))
    assert ns.pick([1, 2])[1] == 2  # clipped to the grid


def test_range_test_on_identical_rows_follows_the_recursion():
    """All rows alike: every batch loss is ½h(θ_t − 1)² with θ_{t+1} = θ_t − η_t h(θ_t − 1)."""
    h = 2.0
    x = torch.ones(8, 1, dtype=torch.float64)

    def loss_fn(th, x, y):
        return 0.5 * h * ((th - 1.0) ** 2).sum() * torch.ones(len(x), dtype=th.dtype)

    settings = RangeTestSettings(min_lr=1e-3, max_lr=30.0, steps=40)
    r = range_test(loss_fn, torch.zeros(1, dtype=torch.float64), (x, x), batch_size=2,
                   settings=settings)  # fmt: skip
    rates = 1e-3 * 30000.0 ** (np.arange(40) / 39)
    theta, losses = 0.0, []
    for eta in rates:
        losses.append(0.5 * h * (theta - 1.0) ** 2)
        theta -= eta * h * (theta - 1.0)
    ran = len(r.losses)
    np.testing.assert_allclose(r.losses, losses[:ran], rtol=1e-12)
    average, smooth = 0.0, []
    for t, value in enumerate(losses[:ran]):
        average = 0.98 * average + 0.02 * value
        smooth.append(average / (1 - 0.98 ** (t + 1)))
    np.testing.assert_allclose(r.smoothed, smooth, rtol=1e-12)
    # ηh > 2 from η = 1 on: the loss grows and the run stops once it passes 4× its minimum
    assert r.stopped_early and rates[ran - 1] > 1.0
    kept = np.array(smooth[10 : ran - 1])
    assert r.pick == rates[10 + int(np.argmin(np.gradient(kept)))]
    assert r.cost == ran * 2 / 8


def test_steepest_needs_two_points():
    assert math.isnan(steepest(np.geomspace(1e-3, 1, 12), np.ones(12)))


def test_regret_and_flags_by_hand():
    assert regret(1.3, 0.03, 1.0, 0.04) == pytest.approx(6.0)
    assert regret(1.0, 0.0, 1.0, 0.0) == 0.0 and regret(2.0, 0.0, 1.0, 0.0) == math.inf
    grid = PlanGrid(lrs=(0.01, 0.1, 1.0, 10.0), batch_sizes=(1, 2, 4),
                    horizons=(Horizon("steps", 5),), population=8)  # fmt: skip
    edges = {1: 0.5, 2: 5.0, 4: 50.0}
    got = {(lr, b) for lr in grid.lrs for b in grid.batch_sizes if flagged(lr, b, grid, edges)}
    # beyond: (1, 1), (10, 1), (10, 2); a step up beyond: (0.1, 1), (1, 2); a B-neighbour
    # beyond: (1, 2) next to (1, 1), (10, 4) next to (10, 2)
    assert got == {(0.1, 1), (1.0, 1), (10.0, 1), (1.0, 2), (10.0, 2), (10.0, 4)}


def test_score_by_hand():
    """Regrets, divergences and the grid search's cost of a check, from hand-made runs."""
    grid = PlanGrid(lrs=(0.01, 0.1, 1.0), batch_sizes=(1, 4),
                    horizons=(Horizon("samples", 16),), population=8)  # fmt: skip
    rows = [{"horizon": 0, "lr": lr, "batch_size": b, "steps": 16 // b}
            for b in grid.batch_sizes for lr in grid.lrs]  # fmt: skip
    boundaries = [{"horizon": 0, "batch_size": 1, "edge": 0.5},
                  {"horizon": 0, "batch_size": 4, "edge": 5.0}]  # fmt: skip
    means = {(1, 0.01): 2.0, (1, 0.1): 1.5, (1, 1.0): math.nan, (4, 0.01): 2.1,
             (4, 0.1): 1.4, (4, 1.0): 1.0, (4, 0.3): 1.2}  # fmt: skip
    runs = {
        (0, b, lr): {"actual": m, "ci_half": 0.1, "diverged": not math.isfinite(m) or lr == 1.0}
        for (b, lr), m in means.items()
    }
    picks = {0: {"plan": (0.1, 4), "other": (0.3, 4), "none": (None, None)}}
    report = score(rows, boundaries, grid, runs, picks=picks, trials=10)[0]
    # (4, 1.0) passed the loss limit: diverged though finite; the best calm point is (4, 0.1)
    assert report["best"] == {"lr": 0.1, "batch_size": 4, "actual": 1.4, "ci_half": 0.1}
    assert report["picks"]["plan"]["regret"] == 0.0
    assert report["picks"]["other"]["regret"] == pytest.approx(-0.2 / math.hypot(0.1, 0.1))
    assert report["picks"]["none"] == {"lr": None, "batch_size": None}
    # (1, 1.0) is beyond B = 1's edge; (4, 1.0) is inside B = 4's, next to (1, 1.0)
    assert (report["diverged_points"], report["flagged_points"]) == (2, 2)
    assert report["grid_cost"] == pytest.approx(10 * 6 * 16 / 8)  # every point: T·B = 16


def test_horizons_in_samples_and_compute():
    assert Horizon("samples", 6400).steps_at(64, population=256) == 100
    assert Horizon("compute", 2).steps_at(8, population=256) == 64
    assert Horizon("samples", 10).steps_at(64, population=256) == 1  # at least one step
    grid = PlanGrid(lrs=(0.1,), batch_sizes=(2, 4), horizons=(Horizon("samples", 40),),
                    population=8, schedule="epochs", train_size=8)  # fmt: skip
    sched = grid.schedule_at(grid.horizons[0], 4)  # 40 samples = 5 epochs of N = 8
    assert (sched.epochs, sched.steps) == (5, 10)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Horizon("epochs", 3), "horizon kind must be one of"),
        (lambda: Horizon("steps", 0), "steps must be an integer ≥ 1, got 0"),
        (lambda: PlanSettings(samples=100, compute=2.0), "not both, got samples=(100,)"),
        (lambda: PlanSettings(samples=[]), "samples must be one or more budgets, got []"),
        (lambda: PlanSettings(per_decade=0), "per_decade must be an integer ≥ 1, got 0"),
        (lambda: RangeTestSettings(min_lr=1.0, max_lr=0.1), "max_lr must exceed min_lr, got"),
        (
            lambda: PlanGrid(
                lrs=(0.1,),
                batch_sizes=(3,),
                horizons=(Horizon("steps", 2),),
                population=8,
                schedule="epochs",
                train_size=8,
            ),
            "batch sizes must divide train_size N = 8, got [3]",
        ),
        (
            lambda: PlanGrid(
                lrs=(0.1,),
                batch_sizes=(1,),
                horizons=(Horizon("steps", 2),),
                population=8,
                schedule="epochs",
            ),
            "the epochs schedule needs train_size (N), got None",
        ),
        (
            lambda: PlanGrid(lrs=(0.1,), batch_sizes=(1,), horizons=(), population=8),
            "horizons must be one or more Horizon, got ()",
        ),
        (lambda: plan(schedule="gd", train_size=8), "online or epochs schedules, got 'gd'"),
        (lambda: plan(resummed=False), "resummed must be true, got false"),
        (lambda: plan(steps=10, settings=PlanSettings(samples=100)), "got steps and samples"),
        (lambda: plan(train_size=8), "train_size must be None, got 8"),
    ],
)
def test_bad_settings_say_what_was_expected(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_plan_takes_an_experiment_and_settings_only():
    with pytest.raises(TypeError, match="plan\\(\\) takes PlanSettings, got 3"):
        plan(settings=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'horizon'"):
        plan(horizon=3)


class _Measured(Exception):
    """Stops a plan at its measurement, carrying the ranks it was asked for."""


@pytest.mark.parametrize(
    ("given", "measured"),
    [
        ({}, (64, 16)),  # left None: the plan's own ranks, DEFAULT_KRYLOV_RANKS
        ({"krylov_rank": 128, "krylov_higher_rank": 32}, (128, 32)),  # validate's, given
        ({"krylov_rank": 16, "krylov_higher_rank": 4}, (16, 4)),
        ({"krylov_rank": 128}, (128, 16)),  # each rank left None is the plan's
    ],
)
def test_plan_measures_at_its_own_krylov_ranks(monkeypatch, given, measured):
    """Ranks left ``None`` are the plan's ``(64, 16)``; ranks given are measured as given,
    validate's and compare's ``(128, 32)`` too."""

    def stop(setup, **kw):
        raise _Measured((kw["rank"], kw["higher_rank"]))

    monkeypatch.setattr("perturb.experiments.planning.measure_at_start", stop)
    with pytest.raises(_Measured) as info:
        plan(model=mlp((1, 8, 8), 10, hidden=()), population=8, steps=2, lrs=(0.1,),
             batch_sizes=(1,), **given)  # fmt: skip
    assert info.value.args[0] == measured
    m = perturb.Experiment().measurement
    assert (m.krylov_rank, m.krylov_higher_rank) == (None, None)


def test_cli_plan_krylov_ranks_left_out_given_or_from_a_file(monkeypatch, tmp_path):
    """``perturb plan`` measures at (64, 16) unless told otherwise: ``--krylov-rank 128
    --krylov-higher-rank 32``, ``--set`` or ``--config`` of a file holding them."""
    asked = []

    def stop(setup, **kw):
        asked.append((kw["rank"], kw["higher_rank"]))
        raise _Measured

    monkeypatch.setattr("perturb.experiments.planning.measure_at_start", stop)
    base = ["plan", "--model", "mlp", "--population", "8", "--steps", "2", "--lr", "0.1",
            "--batch-size", "1"]  # fmt: skip
    config = tmp_path / "plan.json"
    given = perturb.Experiment(model="mlp").replace(
        population=8, steps=(2,), lrs=(0.1,), batch_sizes=(1,), krylov_rank=128,
        krylov_higher_rank=32,
    )  # fmt: skip
    config.write_text(json.dumps(Plan(experiment=given.to_dict()).to_dict()))
    runs = [
        base,
        [*base, "--krylov-rank", "128", "--krylov-higher-rank", "32"],
        [*base, "--set", "krylov_rank=128", "--set", "krylov_higher_rank=32"],
        ["plan", "--config", str(config)],
    ]
    for args in runs:
        CliRunner().invoke(cli, args)
    assert asked == [(64, 16), (128, 32), (128, 32), (128, 32)]
    flags = {o: p for p in plan_command.params for o in p.opts}
    assert (flags["--krylov-rank"].default, flags["--krylov-higher-rank"].default) == (
        DEFAULT_KRYLOV_RANKS
    )
    assert PLAN_KRYLOV_RANKS == DEFAULT_KRYLOV_RANKS  # the help's, repeated without torch


def test_grid_rows_need_the_subspace():
    pop, theta0 = _quadratic_population()
    stats = perturb.measure(pop, None, theta0, order=3, exact=True, progress=False)
    grid = PlanGrid(lrs=(0.1,), batch_sizes=(1,), horizons=(Horizon("steps", 2),), population=4)
    with pytest.raises(ValueError, match="measure with resummed=True, order 3\\), got None"):
        grid_rows(stats, grid)


# ----------------------------------------------------------------------- end to end

_TINY = {"population": 8, "krylov_rank": 4, "krylov_higher_rank": 2, "trials": 4}


@pytest.mark.slow  # 5-15 s; fast twins: test_score_by_hand, check_grid's doctest
def test_plan_check_on_a_tiny_run(tmp_path):
    """A real check: every number the report derives is recomputed here from its rows."""
    settings = PlanSettings(check=True, range_test=RangeTestSettings(steps=13))
    p = plan(model=mlp((1, 8, 8), 10, hidden=()), lrs=(0.05, 60.0), batch_sizes=(1, 2),
             steps=4, settings=settings, out=tmp_path, **_TINY)  # fmt: skip
    report = p.check[0]
    rows = p.rows
    assert all("actual" in r for r in rows) and len(rows) == 4
    # η = 60 is far beyond GD's edge: every trial blows up there, and the plan flagged it
    wild = [r for r in rows if r["lr"] == 60.0]
    assert all(r["beyond_edge"] and r["diverged"] and r["flagged"] for r in wild)
    assert report["diverged_points"] == sum(r["diverged"] for r in rows) >= 2
    assert report["flagged_points"] == report["diverged_points"] and report["unflagged"] == []
    calm = [r for r in rows if not r["diverged"]]
    best = min(calm, key=lambda r: r["actual"])
    assert (report["best"]["lr"], report["best"]["batch_size"]) == (best["lr"], best["batch_size"])
    lr, b = p.recommendation(0)
    mine = next(r for r in rows if (r["lr"], r["batch_size"]) == (lr, b))
    want = (mine["actual"] - best["actual"]) / math.hypot(mine["ci_half"], best["ci_half"])
    assert report["picks"]["plan"]["regret"] == pytest.approx(want)
    assert report["grid_cost"] == pytest.approx(4 * 4 * (1 + 1 + 2 + 2) / 8)
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["recommendations"][0]["lr"] == lr
    assert (tmp_path / "plan.png").stat().st_size > 0
    assert (tmp_path / "plan.csv").read_text().splitlines()[0].startswith("horizon,lr,")
    table = p.table()
    assert "--check: SGD mean test loss" in table and "diverged(flagged)" in table


def test_cli_builds_the_experiment_and_settings(tmp_path, monkeypatch):
    """The command's options reach plan() as one Experiment and one PlanSettings."""
    seen = {}

    def fake(experiment, settings, **kw):
        seen.update(experiment=experiment, settings=settings, **kw)
        return Plan(grid={"lrs": [0.1], "batch_sizes": [2], "population": 8,
                          "schedule": "online", "horizons": []})  # fmt: skip

    monkeypatch.setattr("perturb.experiments.planning.plan", fake)
    args = ["plan", "--model", "mlp", "--population", "8", "--lr", "0.01", "0.1",
            "--batch-size", "2", "4", "--compute", "1.5", "--check", "--range-steps", "20",
            "--pretrain", "7", "--set", "krylov_rank=4"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    e, settings = seen["experiment"], seen["settings"]
    assert (e.model, e.data.population, e.grid.lrs, e.grid.batch_sizes) == (
        "mlp",
        8,
        (0.01, 0.1),
        (2, 4),
    )
    assert (e.start.pretrain, e.measurement.krylov_rank, e.trials) == (7, 4, None)
    assert settings.compute == (1.5,) and settings.check and settings.range_test.steps == 20
    assert "out" not in seen


def test_cli_config_goes_with_the_plans_own_options(tmp_path, monkeypatch):
    """``--config`` takes the plan's settings (run options) but refuses experiment fields."""
    seen = {}

    def fake(experiment, settings, **kw):
        seen.update(experiment=experiment, settings=settings)
        return Plan(grid={"lrs": [0.1], "batch_sizes": [2], "population": 8,
                          "schedule": "online", "horizons": []})  # fmt: skip

    monkeypatch.setattr("perturb.experiments.planning.plan", fake)
    experiment = perturb.Experiment(trials=8, model="mlp").replace(lrs=(0.01,), pretrain=3)
    config = tmp_path / "plan.json"
    config.write_text(json.dumps(Plan(experiment=experiment.to_dict()).to_dict()))
    args = ["plan", "--config", str(config), "--decades", "2", "--range-steps", "20"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["experiment"] == experiment
    assert seen["settings"].decades == 2 and seen["settings"].range_test.steps == 20
    refused = CliRunner().invoke(cli, ["plan", "--config", str(config), "--trials", "4"])
    assert refused.exit_code == 2 and "not --trials" in refused.output


def test_plan_json_holds_the_experiment_for_config(tmp_path):
    experiment = perturb.Experiment(trials=8, model="mlp").replace(lrs=(0.01,), pretrain=3)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(Plan(experiment=experiment.to_dict()).to_dict()))
    assert perturb.Experiment.load(plan_file) == experiment


@pytest.mark.slow  # 5 s; fast twin: test_cli_builds_the_experiment_and_settings
def test_cli_plan_prints_and_writes(tmp_path):
    out = tmp_path / "plan"
    args = ["plan", "--model", "mlp", "--population", "8", "--lr", "0.01", "0.1",
            "--batch-size", "2", "--samples", "8", "--range-steps", "13", "--set",
            "krylov_rank=4", "--set", "krylov_higher_rank=2", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "horizon T·B = 8 samples (online; n = 8)" in result.output
    assert "recommendation:" in result.output and f"wrote {out}/plan.json" in result.output
    written = json.loads((out / "plan.json").read_text())
    assert written["grid"]["horizons"][0] == {"kind": "samples", "value": 8,
                                               "text": "T·B = 8 samples"}  # fmt: skip
    assert [r["steps"] for r in written["rows"]] == [4, 4]  # T = S/B
    assert written["check"] is None


def test_cli_plan_usage_errors():
    runner = CliRunner()
    both = runner.invoke(cli, ["plan", "--samples", "8", "--compute", "1"])
    assert both.exit_code == 2 and "not both" in both.output
    steps = runner.invoke(cli, ["plan", "--steps", "8", "--compute", "1"])
    assert steps.exit_code == 2 and "give one kind of horizon, got steps and compute" in (
        steps.output
    )
