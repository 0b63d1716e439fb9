"""The learning curve in ``perturb compare`` (``--curve``): three columns on every
``(η, B, T)``, one curve for the whole grid, the verdicts, the outputs, refused schedules.

compare runs networks with the cross-entropy, where the curve is not exact (its exactness on
quadratic populations: tests/numeric/test_curve.py); here its columns are checked against
:func:`perturb.numeric.curve.learning_curve` called directly on the same population and
``θ_0``, and the noiseless path against full-batch GD written here in float64.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from curve_runs import assert_only_the_curve_added

from perturb.cli import cli
from perturb.experiments.comparison import compare
from perturb.experiments.data import load_dataset
from perturb.experiments.models import build_model
from perturb.experiments.pipeline import build, load_population
from perturb.experiments.validation_curve import CURVE, CURVE_PREDICTORS, NOISELESS_PATH, SDE_PATH
from perturb.numeric.curve import CurveSettings, learning_curve

SEED = 1
LRS = (0.01, 0.05)
BATCHES, STEPS = (1, 4), (2, 5)
POPULATION, TRIALS, RANK = 16, 8, 6
OPTIONS = dict(lrs=LRS, batch_sizes=BATCHES, steps=STEPS, trials=TRIALS, orders=(1,), seed=SEED)
OPTIONS |= dict(population=POPULATION, krylov_rank=8, krylov_higher_rank=4)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The tiny grid with ``--curve`` from the command line, then without it from Python
    (on the one thread the command line set): (compare.json, stdout, folder) and the
    plain :class:`~perturb.experiments.comparison.Comparison`."""
    out = tmp_path_factory.mktemp("compared")
    args = ["compare", "--dataset", tiny, "--model", "mlp", "--lr", *map(str, LRS)]
    args += ["--batch-size", *map(str, BATCHES), "--steps", *map(str, STEPS)]
    args += ["--trials", str(TRIALS), "--orders", "1", "--seed", str(SEED)]
    args += ["--population", str(POPULATION), "--krylov-rank", "8", "--krylov-higher-rank", "4"]
    args += ["--curve", "--set", f"curve_rank={RANK}", "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    curved = json.loads((out / "compare.json").read_text())
    plain = compare(dataset=tiny, model="mlp", **OPTIONS)
    return (curved, result.stdout, out), plain


def test_three_columns_on_every_row_and_compare_json_holds_the_curve(runs):
    (curved, out, folder), _ = runs
    assert curved["predictors"][-3:] == list(CURVE_PREDICTORS)
    assert len(curved["rows"]) == len(LRS) * len(BATCHES) * len(STEPS)
    entry = curved["curve"]  # one curve: every η, every B, every T
    assert entry["lr"] == list(LRS) and entry["batch_sizes"] == list(BATCHES)
    assert entry["steps"] == list(STEPS) and entry["trials"] == TRIALS
    assert entry["settings"]["rank"] == RANK and entry["cost"]["total"] > 0
    assert curved["experiment"]["measurement"]["curve"] is True
    assert curved["timings"]["curve_s"] > 0
    for r in curved["rows"]:
        li, bi = LRS.index(r["lr"]), BATCHES.index(r["batch_size"])
        j = entry["steps"].index(r["steps"])
        p = r["predictions"]
        for name in CURVE_PREDICTORS:
            assert np.isfinite(p[name]["value"]) and not p[name]["unstable"]
            assert np.isfinite(p[name]["error_estimate"]) and p[name]["error_estimate"] >= 0
            assert isinstance(p[name]["trusted"], bool)
            assert p[name]["error_ci"] == pytest.approx(
                (p[name]["value"] - r["actual"]) / r["ci_half"], rel=1e-12
            )
        assert p[CURVE]["value"] == entry["curve"][li][bi][j]
        assert p[NOISELESS_PATH]["value"] == entry["path"][li][j]
        assert p[SDE_PATH]["value"] == entry["sde"][li][bi][j]
        assert p[CURVE]["error_estimate"] == entry["error_estimate"][li][bi][j]
        for name in (NOISELESS_PATH, SDE_PATH):  # distance to the curve + its estimate
            distance = abs(p[name]["value"] - p[CURVE]["value"])
            assert p[name]["error_estimate"] == pytest.approx(
                distance + p[CURVE]["error_estimate"], rel=1e-12
            )
    for name in CURVE_PREDICTORS:  # a calibration line each
        assert name in curved["validity"]
        assert f"{name:>17}: trusted up to" in out or f"{name:>17}: never trusted" in out
    assert "curve: along the noiseless path, statistics re-measured at" in out
    assert "curve: cost " in out
    rows = list(csv.DictReader((folder / "compare.csv").open()))
    assert len(rows) == len(curved["rows"])
    for name in CURVE_PREDICTORS:
        for field in ("", " error_ci", " unstable", " error_estimate", " trusted"):
            assert f"{name}{field}" in rows[0]
    for row, r in zip(rows, curved["rows"], strict=True):
        assert float(row[CURVE]) == pytest.approx(r["predictions"][CURVE]["value"], rel=1e-12)


def test_the_plain_run_is_left_as_it_was(runs):
    """Without ``--curve`` every row and every other prediction is the curved run's."""
    (curved, _, _), plain = runs
    plain_dict = json.loads(json.dumps(plain.to_dict()))
    assert "curve" not in plain_dict and "curve_s" not in plain_dict["timings"]
    assert plain_dict["predictors"] + list(CURVE_PREDICTORS) == curved["predictors"]
    assert_only_the_curve_added(plain_dict, curved)
    assert "curve:" not in plain.table()


def test_the_columns_are_one_learning_curve_for_the_whole_grid(runs, tiny):
    """compare's three columns are :func:`learning_curve` called once on the population
    and ``θ_0`` compare runs from, at every η, B and T, with the curve's settings at rank
    ``curve_rank`` (``k_3 = min(16, k)``, the default), in float64."""
    (curved, _, _), _ = runs
    setup = build("mlp", load_population(tiny, population=POPULATION, seed=SEED), seed=SEED)
    direct = learning_curve(
        setup.net, (setup.x, setup.y), setup.theta0, lr=LRS, steps=STEPS, batch_sizes=BATCHES,
        settings=CurveSettings(rank=RANK, higher_rank=RANK), dtype=torch.float64,
    )  # fmt: skip
    for r in curved["rows"]:
        li, bi = LRS.index(r["lr"]), BATCHES.index(r["batch_size"])
        j, p = STEPS.index(r["steps"]), r["predictions"]
        assert p[CURVE]["value"] == pytest.approx(direct.curve[li, bi, j], rel=1e-12)
        assert p[SDE_PATH]["value"] == pytest.approx(direct.sde[li, bi, j], rel=1e-12)
        assert p[CURVE]["error_estimate"] == pytest.approx(
            direct.error_estimate[li, bi, j], rel=1e-12
        )


def test_the_noiseless_path_is_full_batch_gd_in_float64(runs, tiny):
    """The "noiseless path" column at every ``(η, B, T)`` equals GD on the population's mean
    cross-entropy from the same seeded initialization, run here by plain autograd in
    float64 (the same for every B)."""
    (curved, _, _), _ = runs
    data = load_dataset(tiny)
    x = data.x.double()
    for lr in LRS:
        net = build_model("mlp", data.input_shape, data.num_classes, seed=SEED).double()
        params = list(net.parameters())
        losses = {}
        for t in range(max(STEPS) + 1):
            loss = torch.nn.functional.cross_entropy(net(x), data.y)
            losses[t] = float(loss.detach())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
        rows = [r for r in curved["rows"] if r["lr"] == lr]
        assert len(rows) == len(BATCHES) * len(STEPS)
        for r in rows:
            got = r["predictions"][NOISELESS_PATH]["value"]
            assert got == pytest.approx(losses[r["steps"]], abs=1e-10), r["steps"]


@pytest.mark.parametrize(
    "sizes",
    [dict(schedule="gd", train_size=4), dict(schedule="epochs", train_size=4)],
    ids=["gd", "epochs"],
)
def test_curve_refuses_schedules_other_than_online(sizes):
    with pytest.raises(ValueError, match=r"curve: expected schedule 'online' \(.*\), got '"):
        compare(curve=True, **sizes)


def test_cli_compare_curve_with_gd_is_a_usage_error(tmp_path):
    args = ["compare", "--curve", "--set", "schedule=gd", "--set", "train_size=4"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "curve: expected schedule 'online'" in result.stderr and "got 'gd'" in result.stderr
    assert not (tmp_path / "o").exists()
