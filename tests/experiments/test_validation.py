"""The validation pipeline on a small digits population (fast settings)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from perturb.cli import main
from perturb.experiments.data import DataError
from perturb.experiments.pipeline import DEFAULT_PRETRAIN_LR
from perturb.experiments.validation import validate

Z_9999 = float(stats.t.ppf(0.99995, 255))  # two-sided 99.99% quantile, 256 trials


def _z(error_ci: float, trials: int) -> float:
    """An error in CI half-widths, in standard errors: half-width = t_{0.975}·s.e."""
    return error_ci * float(stats.t.ppf(0.975, trials - 1))


@pytest.fixture(scope="module")
def small():
    return validate(
        lrs=(0.002, 0.01), steps=10, trials=64, population=24, records=2, progress=False, seed=1
    )


def test_rows_and_predictors(small):
    assert small.predictors == [
        "order 0",
        "order 1",
        "order 2",
        "order 3",
        "noiseless",
        "SDE",
        "resummed 2",
        "resummed 3",
        "resummed 3+ladder",
    ]
    assert [(r["lr"], r["steps"]) for r in small.rows] == [
        (0.002, 5),
        (0.002, 10),
        (0.01, 5),
        (0.01, 10),
    ]
    for r in small.rows:
        assert r["ci_low"] < r["actual"] < r["ci_high"]
        assert math.isclose(r["eta_t"], r["lr"] * r["steps"])


def test_small_eta_t_predictions_lie_in_the_interval(small):
    """At ηt ≤ 0.1 the order-3 truncation error is far below the CI (≈ (ηt)⁴ of the
    loss scale), so a standardized error z = (prediction − mean)/s.e. beyond the 99.9%
    t-quantile (3.39 with 63 degrees of freedom) has probability 1e-3 per row from
    sampling alone; 4 rows and 3 predictors: false-failure rate < 1.2%."""
    limit = float(stats.t.ppf(0.9995, 63))
    for r in small.rows:
        if r["eta_t"] <= 0.1:
            for name in ("order 3", "resummed 2", "resummed 3"):
                assert abs(_z(r["predictions"][name]["error_ci"], 64)) < limit, (name, r)


def test_orders_zero_and_one_against_autograd(small):
    """Order 0 is the population loss at θ_0 and order 1 adds −η·t·G·G, with ``G`` the
    gradient of the mean loss taken here by plain autograd (float32 statistics)."""
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model

    data = load_dataset("digits").subset(24, seed=1)
    net = build_model("smooth-convnet", data.input_shape, data.num_classes, seed=1)
    loss = torch.nn.functional.cross_entropy(net(data.x), data.y)
    g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(loss, list(net.parameters()))])
    gg = float(g @ g)
    for r in small.rows:
        p = r["predictions"]
        assert p["order 0"]["value"] == pytest.approx(loss.item(), rel=1e-6)
        assert p["order 1"]["value"] - p["order 0"]["value"] == pytest.approx(
            -r["lr"] * r["steps"] * gg, rel=1e-4
        )


def test_outputs_written(tmp_path, tiny):
    result = validate(
        dataset=tiny,
        model="mlp",
        lrs=(0.01,),
        steps=4,
        trials=8,
        records=1,
        progress=False,
        resummed=False,
        out=tmp_path,
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["steps"] == 4 and len(payload["rows"]) == 1
    assert payload["gap"][0]["order 2"] == pytest.approx(result.gap[0]["order 2"])
    assert (tmp_path / "results.csv").read_text().startswith("lr,steps,eta_t,actual")
    for png in ("test_loss_vs_lr.png", "error_vs_eta_t.png", "gap_vs_lr.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "order 1" in result.table() and "generalization gap" in result.table()


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_divergent_learning_rate_is_reported(tmp_path, tiny):
    """Every trial at η = 1e38 blows up (float32 overflow): reported as divergent; at
    η = 1e36 some do (2 of 4 by t = 2, 3 by t = 4), the mean is over the rest; the table
    and the JSON count them; none of η = 0.01 is dropped.  (At η = 1e9 the losses, ~1e10,
    are finite: averaged.)"""
    result = validate(
        dataset=tiny,
        model="mlp",
        lrs=(0.01, 1e36, 1e38),
        steps=4,
        trials=4,
        records=2,
        progress=False,
        orders=(0, 1),
        out=tmp_path,
    )
    rows = [r for r in result.rows if r["lr"] == 1e38]
    assert rows and all(r["divergent"] and r["dropped"] == 4 for r in rows)
    assert all(not r["divergent"] and r["dropped"] == 0 for r in result.rows if r["lr"] == 0.01)
    assert all(math.isnan(r["actual"]) for r in rows)  # no trial left to average
    some = [r for r in result.rows if r["lr"] == 1e36]
    assert [(r["steps"], r["dropped"], r["divergent"]) for r in some] == [
        (2, 2, False), (4, 3, False)
    ]  # fmt: skip
    assert math.isfinite(some[0]["actual"]) and math.isfinite(some[0]["ci_high"])
    assert math.isfinite(some[1]["actual"]) and math.isnan(some[1]["ci_high"])  # one trial left
    table = result.table()
    assert table.count("divergent 4/4") == 3  # two recorded steps and the gap
    line = "blew up (not finite), left out of the mean: η = 1e+36: 3/4, η = 1e+38: 4/4"
    assert line in table.splitlines()
    # breakdown uses the learning rates with a mean only: never η = 1e38's ηt
    assert all(v in (None, 0.02, 0.04, 2e36, 4e36) for v in result.breakdown.values())
    gap = {g["lr"]: g for g in result.gap}
    assert gap[1e38]["divergent"] and gap[1e38]["dropped"] == 4 and gap[0.01]["dropped"] == 0
    payload = _strict_json((tmp_path / "results.json").read_text())  # NaN became null
    assert [r["actual"] for r in payload["rows"] if r["lr"] == 1e38] == [None, None]
    assert [r["dropped"] for r in payload["rows"]] == [0, 0, 2, 3, 4, 4]
    assert payload["config"]["loss_limit"]["scale"] == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(dataset="mnist"), DataError, "unknown dataset"),
        (dict(lrs=(-0.1,)), ValueError, "lrs must be positive"),
        (dict(trials=1), ValueError, "trials must be an integer ≥ 2"),
        (dict(orders=(5,)), ValueError, "orders must be integers in 0..4"),
        (dict(steps=0), ValueError, "steps must be an integer ≥ 1"),
        (dict(schedule="sgd"), ValueError, "schedule must be one of online, epochs, gd"),
        (dict(schedule="gd", steps=5), ValueError, "schedule 'gd' needs train_size"),
        (dict(schedule="epochs", train_size=4, steps=5), ValueError, "steps does not apply"),
        (dict(schedule="gd", train_size=4, batch_size=2), ValueError, "--batch-size does not"),
        (dict(train_size=4), ValueError, "--train-size does not apply to --schedule online"),
        (dict(schedule="online", shuffle=True), ValueError, "shuffle does not apply"),
        (dict(schedule="epochs", train_size=5, batch_size=2), ValueError, "must divide"),
        (dict(records=0), ValueError, "records must be an integer ≥ 1"),
        (dict(lrs="0.1"), ValueError, "lrs must be positive finite numbers"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        validate(progress=False, **kwargs)


def test_cli_reports_bad_dataset():
    with pytest.raises(SystemExit) as info:
        main(["validate", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"])
    assert info.value.code == 2


# ------------------------------------------------------------------ every schedule
#
# A tiny model keeps these fast: 16 points of 2×2 "images" in 3 classes (npz) and the
# built-in mlp (259 parameters), so the Hessian, its eigendecomposition and the
# per-sample Hessians of the re-summed GD series are cheap.


SCHEDULES = {
    "online": dict(schedule="online", steps=6, batch_size=2),
    "epochs": dict(schedule="epochs", train_size=4, batch_size=2, epochs=3),
    "epochs-shuffled": dict(schedule="epochs", train_size=4, batch_size=2, epochs=3, shuffle=True),
    "gd": dict(schedule="gd", steps=6, train_size=4),
}


@pytest.fixture(
    scope="module",
    # fixed-order epochs (the twin of reshuffled ones through validate): -m slow
    params=[
        pytest.param(s, marks=pytest.mark.slow) if s == "epochs" else s for s in sorted(SCHEDULES)
    ],
)
def scheduled(request, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    kwargs = SCHEDULES[request.param]
    result = validate(
        dataset=tiny,
        model="mlp",
        lrs=(0.003, 0.01),
        trials=256,
        records=3,
        progress=False,
        out=out,
        **kwargs,
    )
    return kwargs, result, out


def test_every_schedule_runs_and_says_which(scheduled):
    kwargs, result, out = scheduled
    name = kwargs["schedule"]
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["schedule"] == name == result.config["schedule"]
    assert result.table().splitlines()[0] == result.config["description"] + ":"
    first = {"online": "online SGD (6", "epochs": "SGD on 4 training", "gd": "full-batch GD (4"}
    assert result.config["description"].startswith(first[name])
    if kwargs.get("shuffle"):
        assert "reshuffled" in result.config["description"]
    for r in result.rows:
        assert all(math.isfinite(p["value"]) for p in r["predictions"].values())
    for g in result.gap:
        assert math.isfinite(g["order 2"]) and g["steps"] == result.config["steps"]
    # predictors that do not apply are named, with the reason, and nowhere else
    unavailable = result.config["unavailable"]
    ladder = "resummed 3+ladder"  # online only: elsewhere batches repeat
    expected = {"online": set(), "epochs": {ladder}, "gd": {"SDE", ladder}}[name]
    assert set(unavailable) == expected
    everything = {"order 0", "order 1", "order 2", "order 3", "noiseless", "SDE"}
    assert set(result.predictors) == (everything | {"resummed 2", "resummed 3", ladder}) - expected
    for n, why in unavailable.items():
        assert f"{n}: not available ({why})" in result.table()
    # 3 records of 6 steps (for epochs: the ends of the 3 epochs of 2 steps)
    assert sorted({r["steps"] for r in result.rows}) == [2, 4, 6]
    assert (out / "gap.csv").read_text().startswith("lr,steps,eta_t,actual")
    assert (out / "gap_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_schedule_order_2_lies_in_the_interval(scheduled):
    """Seeded statistical check, per schedule, at ηt ≤ 0.02 on the tiny model.

    There the η³ truncation error of order 2 is below a tenth of the CI half-width
    (checked: the order-3 term is that small in every such row), so under the theory
    the standardized error z = (prediction − SGD mean)/s.e. exceeds the 99.99%
    t-quantile (≈ 3.9) with probability about 1e-4 per row; 4 rows for the loss and 1
    for the gap: false-failure rate below 0.05% per schedule, 0.2% for the four.  The
    interval resolves what matters: order 0 (missing the η¹ term −t·G·G) is out by
    more than that quantile in every such row.
    """
    _, result, _ = scheduled
    rows = [r for r in result.rows if r["eta_t"] <= 0.02 + 1e-12]
    assert len(rows) == 4
    for r in rows:
        p = r["predictions"]
        half = (r["ci_high"] - r["ci_low"]) / 2
        assert abs(p["order 2"]["value"] - p["order 3"]["value"]) < 0.1 * half
        for name in ("order 2", "order 3", "resummed 2", "resummed 3"):
            if name in p:
                assert abs(_z(p[name]["error_ci"], 256)) < Z_9999, (name, r)
        assert abs(_z(p["order 0"]["error_ci"], 256)) > Z_9999, r
    gaps = [g for g in result.gap if g["eta_t"] <= 0.02 + 1e-12]
    assert len(gaps) == 1
    for g in gaps:
        assert not g["divergent"] and abs(_z(g["error_ci"], 256)) < Z_9999, g


# ------------------------------------------------------------------ the command line


def _cli(*args: str):
    from click.testing import CliRunner

    from perturb.cli import cli

    return CliRunner().invoke(cli, ["validate", *args], catch_exceptions=False)


FAST = ("--model", "mlp", "--steps", "2", "--trials", "4", "--records", "1", "--no-resummed")


def test_cli_space_separated_lists_equal_repeated_options(tmp_path, tiny):
    listed = _cli(
        "--dataset", tiny, *FAST, "--lr", "0.01", "0.02", "--orders", "0", "1",
        "--seeds", "0", "3", "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert listed.exit_code == 0, listed.output
    repeated = _cli(
        "--dataset", tiny, *FAST, "--lr", "0.01", "--lr", "0.02", "--orders", "0",
        "--orders", "1", "--seed", "0", "--seed", "3", "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert repeated.exit_code == 0, repeated.output
    for seed in (0, 3):
        a = json.loads((tmp_path / "a" / f"seed-{seed}" / "results.json").read_text())
        b = json.loads((tmp_path / "b" / f"seed-{seed}" / "results.json").read_text())
        assert a["config"]["lrs"] == [0.01, 0.02] and a["config"]["orders"] == [0, 1]
        assert a["config"]["seed"] == seed
        assert a["rows"] == b["rows"] and a["gap"] == b["gap"]
    assert listed.output.count("seed ") == 2
    assert "order 2" not in listed.output.splitlines()[2]  # only the orders asked for
    # different seeds: different initializations, different numbers
    a0 = json.loads((tmp_path / "a" / "seed-0" / "results.json").read_text())
    a3 = json.loads((tmp_path / "a" / "seed-3" / "results.json").read_text())
    assert a0["rows"][0]["predictions"]["order 0"] != a3["rows"][0]["predictions"]["order 0"]


def test_cli_schedules(tmp_path, tiny):
    result = _cli("--dataset", tiny, *FAST[:2], "--trials", "4", "--no-resummed",
                  "--epochs", "2", "--train-size", "4", "--batch-size", "2", "--shuffle",
                  "--lr", "0.01", "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\nSGD on 4 training points (batch 2, 2 epochs, reshuffled each epoch):\n" in (
        "\n" + result.stdout
    )
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["schedule"] == "epochs" and config["steps"] == 4 and config["shuffle"]
    result = _cli("--dataset", tiny, *FAST, "--schedule", "gd", "--lr", "0.01", "--out",
                  str(tmp_path / "gd"))  # fmt: skip
    assert result.exit_code == 2 and "needs train_size" in result.output


def test_cli_reports_corrupt_files(tmp_path):
    """Files in the distributed formats but corrupt: a usage error naming the file."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    result = _cli("--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out",
                  str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 2
    assert "train-images-idx3-ubyte" in result.output
    folder = tmp_path / "cifar"
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        (folder / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    result = _cli("--dataset", "cifar10", "--data-dir", str(folder), "--out",
                  str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 2 and "corrupt CIFAR-10 file" in result.output


def test_cli_unknown_dataset_and_missing_files(tmp_path):
    result = _cli("--dataset", "mnist")
    assert result.exit_code == 2 and "unknown dataset" in result.output
    result = _cli("--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and "missing CIFAR-10 file" in result.output
    result = _cli("--dataset", f"npz:{tmp_path / 'none.npz'}")
    assert result.exit_code == 2 and "missing npz file" in result.output


def test_gap_prediction_equals_the_engines_gap_series(tiny):
    """validate reuses test-loss statistics for the gap; the engine measures it whole."""
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model
    from perturb.numeric.measuring import measure
    from perturb.symbolic.schedules import GD

    result = validate(dataset=tiny, model="mlp", schedule="gd", train_size=4, steps=3,
                      lrs=(0.01, 0.05), trials=4, records=1, progress=False,
                      resummed=False, orders=(0, 1))  # fmt: skip
    data = load_dataset(tiny)
    net = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    stats = measure(
        net,
        (data.x, data.y),
        order=2,
        schedules=[GD(train_size=4, steps=3)],
        quantities=("gap",),
        exact=True,
        dtype=torch.float64,
        progress=False,
    )
    pred = stats.predict(GD(train_size=4, steps=3), lr=[0.01, 0.05], quantity="gap")
    got = [g["order 2"] for g in result.gap]
    assert got == pytest.approx(pred.total.tolist(), rel=1e-5)
    assert [g["order 1"] for g in result.gap] == pytest.approx(
        pred.by_order[:, :2].sum(axis=1).tolist(), rel=1e-5
    )


def test_large_models_run_the_sde_on_the_krylov_subspace(tiny):
    """Re-summed, the SDE runs on the quadratic model projected on the Krylov subspace
    whatever the size; without re-summation it needs the materialized Hessian and is
    skipped above max_hessian_parameters, with the reason."""
    common = dict(dataset=tiny, model="mlp", lrs=(0.01,), steps=2, trials=4, records=1,
                  progress=False, orders=(0,), gap=False, max_hessian_parameters=100)  # fmt: skip
    result = validate(**common, krylov_rank=16, krylov_higher_rank=4)
    assert result.config["unavailable"] == {} and result.config["sde_krylov_rank"] == 16
    assert result.predictors == [
        "order 0", "noiseless", "SDE", "resummed 2", "resummed 3", "resummed 3+ladder"
    ]  # fmt: skip
    assert result.config["resummed_krylov"]["rank"] == 16
    assert result.config["resummed_ranks"]["resummed 3"] == [16, 16, 16, 4]
    assert "SDE: on the quadratic model projected on the Krylov subspace (rank 16)" in (
        result.table()
    )
    assert "(3-edge diagrams on 4)" in result.table()
    bare = validate(**common, resummed=False)
    why = bare.config["unavailable"]
    assert set(why) == {"SDE"} and "259 parameters > max_hessian_parameters" in why["SDE"]
    assert bare.predictors == ["order 0", "noiseless"] and not bare.gap


def test_krylov_ranks_left_out_are_validates(small):
    """Left ``None``, the ranks are validate's ``(128, 32)``: the subspace is built at them
    (the model has 1418 parameters, more than 128) and ``results.json`` holds them."""
    assert small.config["resummed_krylov"]["rank"] == 128
    assert small.config["resummed_krylov"]["higher_rank"] == 32
    held = json.loads(small.to_json())["experiment"]["measurement"]
    assert (held["krylov_rank"], held["krylov_higher_rank"]) == (128, 32)


# ------------------------------------------------------------------ where the runs start


def _tiny_loss(net, tiny: str) -> float:
    import torch

    from perturb.experiments.data import load_dataset

    data = load_dataset(tiny)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(data.x), data.y))


FAST_API = dict(lrs=(0.01,), steps=2, trials=4, records=1, progress=False, resummed=False)


def test_validate_from_a_checkpoint_round_trip(tmp_path, tiny):
    """A saved state dict is where every run starts: l(θ_0) is the model's loss there."""
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model

    data = load_dataset(tiny)
    net = build_model("mlp", data.input_shape, data.num_classes, seed=7)
    torch.save(net.state_dict(), tmp_path / "ckpt.pt")
    result = validate(
        dataset=tiny,
        model="mlp",
        checkpoint=tmp_path / "ckpt.pt",
        orders=(0, 1),
        gap=False,
        out=tmp_path / "out",
        **FAST_API,
    )
    start = result.config["start"]
    assert start["loss"] == pytest.approx(_tiny_loss(net, tiny), rel=1e-6)
    assert start["checkpoint"] == str(tmp_path / "ckpt.pt") and start["pretrain_steps"] == 0
    assert start["grad_norm"] > 0
    assert result.rows[0]["predictions"]["order 0"]["value"] == pytest.approx(start["loss"])
    lines = result.table().splitlines()
    assert lines[1].startswith(f"start: l(θ0) = {start['loss']:.5f}, ‖G‖ = ")
    assert "ckpt.pt" in lines[1]
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["config"]["start"] == pytest.approx(start)
    default = validate(dataset=tiny, model="mlp", orders=(0,), gap=False, **FAST_API)
    assert default.config["start"]["loss"] != pytest.approx(start["loss"])
    assert not default.table().splitlines()[1].startswith("start:")  # the default: as before


def test_validate_after_pretraining_starts_lower_and_is_deterministic(tiny):
    runs = [
        validate(dataset=tiny, model="mlp", pretrain=25, orders=(0, 1), gap=False, **FAST_API)
        for _ in range(2)
    ]
    default = validate(dataset=tiny, model="mlp", orders=(0, 1), gap=False, **FAST_API)
    a, b = (r.config["start"] for r in runs)
    assert a == b and a["pretrain_steps"] == 25 and a["pretrain_lr"] == DEFAULT_PRETRAIN_LR
    assert a["loss"] < default.config["start"]["loss"] - 0.05
    assert runs[0].rows == runs[1].rows
    assert "then 25 steps of full-batch GD at lr 0.3" in runs[0].table().splitlines()[1]


def test_long_runs_on_a_log_grid(tiny):
    result = validate(
        dataset=tiny,
        model="mlp",
        lrs=(0.01,),
        steps=100,
        records=4,
        records_log=True,
        trials=4,
        orders=(0, 1),
        gap=False,
        resummed=False,
        progress=False,
    )
    assert [r["steps"] for r in result.rows] == [1, 5, 22, 100]
    assert result.config["records_log"] is True


# ------------------------------------------------------------------ blow-ups


@pytest.fixture(scope="module")
def blown_up(tmp_path_factory):
    """η = 30 on the digits convnet: every SGD trial climbs to a loss of ~450 (finite, so
    averaged, and above the limit 10·max(l(θ_0), l(0))); the series blows up."""
    out = tmp_path_factory.mktemp("lr30")
    result = validate(
        lrs=(0.01, 30.0),
        steps=6,
        trials=8,
        population=16,
        records=2,
        orders=(0, 1, 2),
        progress=False,
        out=out,
        resummed=False,
        max_hessian_parameters=1000,  # keeps it fast: SDE and re-summed are skipped
    )
    return result, out


def test_lr_30_trials_are_averaged_and_blown_up_predictions_are_unstable(blown_up):
    result, _ = blown_up
    table = result.table()
    assert "divergent" not in table and "blew up" not in table
    rows = [r for r in result.rows if r["lr"] == 30.0]
    assert all(not r["divergent"] and r["dropped"] == 0 and r["above_limit"] == 8 for r in rows)
    assert all(r["actual"] > 100 for r in rows)  # the mean of every run, high as it is
    limit = result.config["loss_limit"]
    assert limit["scale"] == pytest.approx(math.log(10), rel=1e-6)  # zero logits
    assert limit["limit"] == pytest.approx(10 * max(limit["start"], limit["scale"]))
    line = f"above {limit['limit']:.4g} = 10 × max(l(θ_0) = {limit['start']:.4g}, "
    line += f"l(0) = {limit['scale']:.4g}), still in the mean: η = 30: 8/8"
    assert line in table.splitlines()
    start = result.config["start"]["loss"]
    unstable = [(r["steps"], n) for r in rows for n, p in r["predictions"].items() if p["unstable"]]
    assert (6, "order 2") in unstable and (3, "noiseless") in unstable
    for r in rows:
        for p in r["predictions"].values():  # unstable: far outside [0, 10·l(θ_0)]
            v = p["value"]
            assert p["unstable"] == (not math.isfinite(v) or not -10 * start <= v <= 20 * start)
    # the table prints none of them as a number, and the columns stay aligned
    lines = table.splitlines()
    head = lines[1]
    body = [line for line in lines[: lines.index("")] if line.startswith("30.0000")]
    assert len(body) == 2 and all(len(line) == len(head) for line in body)
    assert all(line.count("unstable") >= 2 for line in body)
    for r in rows:
        for p in r["predictions"].values():
            if p["unstable"] and math.isfinite(p["value"]):
                assert f"{p['value']:9.5f}" not in table
    # the finite learning rate is unaffected
    assert all(
        not r["divergent"] and not any(p["unstable"] for p in r["predictions"].values())
        for r in result.rows
        if r["lr"] == 0.01
    )
    gap = {g["lr"]: g for g in result.gap}
    assert gap[30.0]["order 2 unstable"] and not gap[0.01]["order 2 unstable"]


def test_unstable_predictions_in_results_json_carry_value_and_flag(blown_up):
    _, out = blown_up
    payload = _strict_json((out / "results.json").read_text())
    saved = [
        p
        for r in payload["rows"]
        if r["lr"] == 30.0
        for p in r["predictions"].values()
        if p["unstable"]
    ]
    assert saved and all(p["unstable"] is True for p in saved)
    kept = [p for p in saved if p["value"] is not None]  # finite but absurd: kept as it is
    assert kept and all(abs(p["value"]) > 10 for p in kept)
    assert "order 2 unstable" in (out / "results.csv").read_text().splitlines()[0]


def test_outputs_written_when_every_trial_diverged(tmp_path, tiny):
    """No finite error to plot on a log scale: the plots are still written."""
    result = validate(
        dataset=tiny,
        model="mlp",
        lrs=(1e38,),
        steps=4,
        trials=4,
        records=2,
        orders=(0, 1),
        progress=False,
        out=tmp_path,
    )
    assert all(r["divergent"] for r in result.rows) and result.gap[0]["divergent"]
    for png in ("test_loss_vs_lr.png", "error_vs_eta_t.png", "gap_vs_lr.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.table().count("divergent 4/4") == 3
    diverged = "          order 1: not compared (every trial blew up at every learning rate)"
    assert diverged in result.table()


# The default run pools the digits to 1×1 (P = 20); -m slow to 2×2 (P = 50), online and
# GD (the twin of online here and of tests/numeric/test_resummed_measure.py's gd-2)
@pytest.mark.parametrize(
    ("schedule", "pool"),
    [
        ("online", 8),
        pytest.param("online", 4, marks=pytest.mark.slow),
        pytest.param("gd", 4, marks=pytest.mark.slow),
    ],
)
def test_full_rank_krylov_equals_the_materialized_quadratic_model(schedule, pool):
    """At ``krylov_rank ≥ P`` the subspace spans everything: "resummed 2" and "resummed 3"
    equal perturb.predict's eigendecomposition of materialized tensors (float64, same
    population and θ_0), and the SDE on the projected model equals the SDE on the
    materialized one (validate evaluates the network in float32: 1e-5 relative)."""
    import torch

    import perturb
    from perturb.experiments.pipeline import build, cut, load_population
    from perturb.experiments.simulation import model_loss

    torch.manual_seed(0)
    features = (8 // pool) ** 2
    model = torch.nn.Sequential(  # 8×8 digits pooled to 1×1 or 2×2, softmax regression
        torch.nn.AvgPool2d(pool), torch.nn.Flatten(), torch.nn.Linear(features, 10)
    )
    p = 10 * features + 10  # P = 20 or 50
    sizes = dict(steps=6) if schedule == "online" else dict(train_size=8, steps=6)
    common = dict(
        model=model, lrs=(0.05, 0.2), schedule=schedule, trials=4, population=12,
        records=2, orders=(0,), gap=False, progress=False, seed=2, **sizes,
    )  # fmt: skip
    krylov = validate(**common, krylov_rank=10**6, krylov_higher_rank=10**6)
    info = krylov.config["resummed_krylov"]
    assert info["rank"] == info["higher_rank"] == info["parameters"] == p
    setup = build(model, load_population("digits", population=12, seed=2), seed=2)
    loss_fn, theta = model_loss(setup.net)
    x, y = setup.x.double(), setup.y
    rows = torch.cat([x.reshape(len(y), -1), y[:, None].double()], 1)

    def row_loss(p, row):
        return loss_fn(p, row[None, :-1].reshape(1, *x.shape[1:]), row[None, -1].long())[0]

    pop = perturb.Population(row_loss, rows)
    theta = theta.detach().double()
    full = perturb.Online(**sizes, batch_size=1) if schedule == "online" else perturb.GD(**sizes)
    for r in krylov.rows:
        for d in (2, 3):
            want = perturb.predict(
                pop, theta, cut(full, r["steps"]), lr=r["lr"], order=d, resummed=True
            )
            got = r["predictions"][f"resummed {d}"]["value"]
            assert got == pytest.approx(want.total, rel=1e-5), (d, r)
    if schedule == "online":
        bare = validate(**common, resummed=False)
        for a, b in zip(bare.rows, krylov.rows, strict=True):
            want, got = a["predictions"]["SDE"]["value"], b["predictions"]["SDE"]["value"]
            assert got == pytest.approx(want, rel=1e-5)


def test_every_prediction_carries_a_validity_estimate(small):
    """``error_estimate`` (finite or ``inf``, never negative) and ``trusted`` on every
    prediction, the summary per predictor, and its lines in the table; a trusted row is
    never one the table shows as unstable."""
    for r in small.rows:
        assert set(r["validity"]) == {
            "rms_displacement", "displacement_over_radius", "mean_square_excess",
            "overshoot", "overshoot_draws", "hessian_ladder", "resolution", "loss_spread",
        }  # fmt: skip
        spread, trials = r["validity"]["loss_spread"], small.config["trials"]
        assert 0 < spread < math.inf  # the resolution: the 95% half-width of `trials` runs
        half = stats.t.ppf(0.975, trials - 1) * spread / math.sqrt(trials)
        assert r["validity"]["resolution"] == pytest.approx(half, rel=1e-12)
        ladder = r["validity"]["hessian_ladder"]
        three = r["predictions"]["resummed 3"]["value"]
        assert r["predictions"]["resummed 3+ladder"]["value"] == pytest.approx(three + ladder)
        for name, p in r["predictions"].items():
            assert p["error_estimate"] >= 0 and isinstance(p["trusted"], bool)
            assert not (p["trusted"] and p["unstable"])
            if name != "resummed 3+ladder":  # the others leave the ladder out
                assert p["error_estimate"] >= abs(ladder)
    assert set(small.validity) == set(small.predictors)
    for v in small.validity.values():
        assert v["calibration"] is None or 0 <= v["calibration"] <= 1
    assert "validity estimate (from the statistics at θ_0, before any run):" in small.table()
    payload = json.loads(small.to_json())
    assert payload["validity"] == json.loads(json.dumps(small.validity))
