"""The learning curve in ``perturb validate`` (``--curve``): three predictors, results.json,
the trust verdict, and the default run left as it was."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from curve_runs import assert_only_the_curve_added

from perturb.cli import cli
from perturb.experiments.data import load_dataset
from perturb.experiments.experiment import Experiment
from perturb.experiments.models import build_model
from perturb.experiments.validation import validate
from perturb.experiments.validation_curve import CURVE, CURVE_PREDICTORS, NOISELESS_PATH, SDE_PATH
from perturb.numeric.trust import OVERSHOOT
from perturb.numeric.validity import MEAN_SQUARE_EXCESS

SEED = 2
LRS = (0.003, 0.01)
STEPS, BATCH = 6, 2


OPTIONS = dict(lrs=LRS, steps=STEPS, batch_size=BATCH, trials=16, records=3, population=16)
OPTIONS |= dict(seed=SEED, gap=False, orders=(0, 1), krylov_rank=16, krylov_higher_rank=4)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The same tiny run with ``--curve`` from the command line, then without it from
    Python (on the one thread the command line set): (results, table) each."""
    out = tmp_path_factory.mktemp("curved")
    args = ["validate", "--dataset", tiny, "--model", "mlp", "--lr", *map(str, LRS)]
    args += ["--steps", str(STEPS), "--batch-size", str(BATCH), "--trials", "16"]
    args += ["--records", "3", "--population", "16", "--seed", str(SEED), "--no-gap"]
    args += ["--orders", "0", "1", "--krylov-rank", "16", "--krylov-higher-rank", "4"]
    args += ["--curve", "--set", "curve_rank=8", "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    curved = json.loads((out / "results.json").read_text())
    assert (out / "curve.png").stat().st_size > 0  # the curves with their bands
    plain = validate(dataset=tiny, model="mlp", progress=False, **OPTIONS)
    return (json.loads(plain.to_json()), plain.table()), (curved, result.stdout)


def test_curve_adds_three_predictors_and_results_json_holds_the_curve(runs):
    (plain, plain_out), (curved, out) = runs
    names = list(plain["breakdown"])
    assert list(curved["breakdown"]) == [*names, *CURVE_PREDICTORS]
    assert CURVE_PREDICTORS == ("curve", "noiseless path", "SDE (path)")
    assert "curve" not in plain and "curve" not in plain["timings"]
    assert Experiment.from_dict(curved["experiment"]).measurement.curve
    assert Experiment.from_dict(curved["experiment"]).measurement.curve_rank == 8
    entry = curved["curve"]
    assert entry["steps"] == [2, 4, 6] and entry["lr"] == list(LRS)
    assert entry["batch_sizes"] == [BATCH] and entry["trials"] == 16
    assert entry["settings"]["rank"] == 8 and entry["cost"]["total"] > 0
    for r in curved["rows"]:
        li, j = LRS.index(r["lr"]), entry["steps"].index(r["steps"])
        p = r["predictions"]
        assert p[CURVE]["value"] == entry["curve"][li][0][j]
        assert p[NOISELESS_PATH]["value"] == entry["path"][li][j]
        assert p[SDE_PATH]["value"] == entry["sde"][li][0][j]
        assert p[CURVE]["error_estimate"] == entry["error_estimate"][li][0][j]
        for name in (NOISELESS_PATH, SDE_PATH):  # distance to the curve + its estimate
            distance = abs(p[name]["value"] - p[CURVE]["value"])
            assert p[name]["error_estimate"] == pytest.approx(
                distance + p[CURVE]["error_estimate"], rel=1e-12
            )
    for name in CURVE_PREDICTORS:  # a column, a breakdown line and a validity line
        assert f"{name:>17}: never leaves" in out or f"{name:>17}: leaves" in out
        assert f"{name:>17}: trusted up to" in out or f"{name:>17}: never trusted" in out
    assert "            curve: along the noiseless path, statistics re-measured at" in out
    assert "            curve: cost " in out
    assert "curve" not in plain_out


def test_the_default_run_is_left_as_it_was(runs):
    """Every row, actual value and prediction of the plain run is in the curved run as it
    was (values, estimates, verdicts), and its validity summary too."""
    (plain, _), (curved, _) = runs
    assert len(plain["rows"]) == len(curved["rows"]) == 6
    assert_only_the_curve_added(plain, curved)


def test_the_curve_verdict_is_the_curves_own_rule_where_the_start_checks_are_quiet(runs):
    """``trusted`` of the curve's rows comes from judge (one rule for every predictor) with
    the curve's own resolution; where none of judge's checks at θ_0 fires it is the
    verdict :meth:`LearningCurve.trusted` gives at the run's trials."""
    _, (curved, _) = runs
    entry = curved["curve"]
    for r in curved["rows"]:
        v = r["validity"]
        assert v["mean_square_excess"] <= MEAN_SQUARE_EXCESS
        assert not (v["overshoot"] > OVERSHOOT and v["overshoot_draws"] >= 1)
        li, j = LRS.index(r["lr"]), entry["steps"].index(r["steps"])
        assert r["predictions"][CURVE]["trusted"] is entry["trusted"][li][0][j]


def test_the_noiseless_path_is_full_batch_gd_in_float64(runs, tiny):
    """The "noiseless path" row at every recorded step equals GD on the population's mean
    cross-entropy, from the same seeded initialization, run here by plain autograd in
    float64 (the float32 initialization cast up: validate's θ_0)."""
    _, (curved, _) = runs
    data = load_dataset(tiny)
    x = data.x.double()
    for lr in LRS:
        net = build_model("mlp", data.input_shape, data.num_classes, seed=SEED).double()
        params = list(net.parameters())
        losses = {}
        for t in range(STEPS + 1):
            loss = torch.nn.functional.cross_entropy(net(x), data.y)
            losses[t] = float(loss.detach())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
        for r in curved["rows"]:
            if r["lr"] == lr:
                got = r["predictions"][NOISELESS_PATH]["value"]
                assert got == pytest.approx(losses[r["steps"]], abs=1e-10), r["steps"]


@pytest.mark.parametrize(
    "sizes",
    [dict(schedule="gd", train_size=4, steps=5), dict(schedule="epochs", train_size=4)],
    ids=["gd", "epochs"],
)
def test_curve_refuses_schedules_other_than_online(sizes):
    with pytest.raises(ValueError, match=r"curve: expected schedule 'online' \(.*\), got '"):
        validate(curve=True, progress=False, **sizes)


def test_cli_curve_with_gd_is_a_usage_error(tmp_path):
    args = ["validate", "--curve", "--schedule", "gd", "-N", "4", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "curve: expected schedule 'online'" in result.stderr and "got 'gd'" in result.stderr


def test_curve_fields_are_set_and_checked_like_every_field():
    e = Experiment().with_settings(["curve=true", "measurement.curve_rank=12"])
    assert (e.measurement.curve, e.measurement.curve_rank) == (True, 12)
    assert Experiment().measurement.curve is False  # opt-in
    assert Experiment.from_dict(e.to_dict()) == e
    with pytest.raises(ValueError, match="curve_rank must be an integer ≥ 1, got 0"):
        Experiment().with_settings(["curve_rank=0"])
