"""The experiment as a value: checked fields, dicts, TOML, --set, and runs repeated from a file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from perturb.cli import cli
from perturb.cli_experiment import build_experiment, experiment_options
from perturb.experiments import comparison, validation
from perturb.experiments.experiment import (
    DEFAULT_PRETRAIN_LR,
    Budget,
    Data,
    Experiment,
    Grid,
    Measurement,
    Origin,
    Training,
    experiment_of,
)

# every field away from its default (none of them None)
FULL = Experiment(
    model="mlp",
    data=Data(dataset="npz:x.npz", data_dir="data", population=32),
    start=Origin(checkpoint="c.pt", pretrain=20, pretrain_lr=0.5),
    training=Training(
        schedule="epochs", train_size=8, epochs=3, shuffle=True, records=2, records_log=True
    ),
    grid=Grid(lrs=(0.01, 1e-05), batch_sizes=(2,), steps=(7, 9)),
    trials=64,
    seed=3,
    device="cuda:1",
    measurement=Measurement(
        orders=(0, 2),
        resummed=False,
        gap=False,
        max_hessian_parameters=10,
        krylov_rank=16,
        krylov_higher_rank=4,
        curve=True,
        curve_rank=8,
    ),
    budget=Budget(max_memory=2.5e9, force=True),
)


def test_every_field_is_set_in_the_full_example():
    assert all(value != Experiment().options()[k] for k, value in FULL.options().items())
    assert None not in FULL.options().values()


@pytest.mark.parametrize("experiment", [Experiment(), FULL], ids=["default", "full"])
def test_round_trips_through_dicts_json_and_toml(experiment, tmp_path):
    assert Experiment.from_dict(experiment.to_dict()) == experiment
    text = json.dumps(experiment.to_dict(), allow_nan=False)
    assert Experiment.from_dict(json.loads(text)) == experiment
    (tmp_path / "e.json").write_text(text)
    assert Experiment.load(tmp_path / "e.json") == experiment
    (tmp_path / "e.toml").write_text(experiment.to_toml())
    assert Experiment.load(tmp_path / "e.toml") == experiment
    again = Experiment().replace(**experiment.options())
    assert again == experiment


def test_to_dict_is_nested_plain_data():
    d = FULL.to_dict()
    assert list(d) == [
        "model",
        "data",
        "start",
        "training",
        "grid",
        "trials",
        "seed",
        "device",
        "measurement",
        "budget",
    ]
    assert d["grid"] == {"lrs": [0.01, 1e-05], "batch_sizes": [2], "steps": [7, 9]}
    assert d["start"] == {"checkpoint": "c.pt", "pretrain": 20, "pretrain_lr": 0.5}


def test_values_are_normalized():
    e = Experiment(
        data=Data(data_dir=Path("d")),
        start=Origin(checkpoint=Path("c.pt"), pretrain_lr=1),
        grid=Grid(lrs=[1], batch_sizes=4, steps=np.array([3, 5])),
        measurement=Measurement(orders=[np.int64(2)]),
        budget=Budget(max_memory=2**30),
    )
    assert e.data.data_dir == "d" and e.start.checkpoint == "c.pt"
    assert e.start.pretrain_lr == 1.0 and isinstance(e.start.pretrain_lr, float)
    assert e.grid == Grid(lrs=(1.0,), batch_sizes=(4,), steps=(3, 5))
    assert type(e.grid.lrs[0]) is float and type(e.grid.steps[0]) is int
    assert e.measurement.orders == (2,) and type(e.measurement.orders[0]) is int
    assert e.budget.max_memory == float(2**30)
    assert hash(e) == hash(Experiment().replace(**e.options()))  # frozen, hashable


def test_the_pretrain_lr_default_is_the_pipelines():
    from perturb.experiments.pipeline import DEFAULT_PRETRAIN_LR as PIPELINE

    assert DEFAULT_PRETRAIN_LR == PIPELINE


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": ""}, "model must be a non-empty string, got ''"),
        ({"model": 3}, "model must be a non-empty string, got 3"),
        ({"dataset": None}, "dataset must be a non-empty string, got None"),
        ({"data_dir": 5}, "data_dir must be a non-empty string or None, got 5"),
        ({"population": 0}, "population must be an integer ≥ 1, got 0"),
        ({"checkpoint": ""}, "checkpoint must be a non-empty string or None"),
        ({"pretrain": -1}, "pretrain must be an integer ≥ 0, got -1"),
        ({"pretrain_lr": 0}, "pretrain_lr must be a positive finite number, got 0"),
        ({"pretrain_lr": math.inf}, "pretrain_lr must be a positive finite number, got inf"),
        ({"schedule": "sgd"}, "schedule must be one of online, epochs, gd, got 'sgd'"),
        ({"train_size": 0}, "train_size must be an integer ≥ 1 or None, got 0"),
        ({"epochs": 1.0}, "epochs must be an integer ≥ 1 or None, got 1.0"),
        ({"shuffle": 1}, "shuffle must be true or false, got 1"),
        ({"records": 0}, "records must be an integer ≥ 1, got 0"),
        ({"records_log": "yes"}, "records_log must be true or false, got 'yes'"),
        ({"lrs": ()}, r"lrs must be positive finite numbers \(one or a non-empty list\), got \(\)"),
        ({"lrs": (0.1, math.nan)}, r"lrs must be positive finite numbers .*, got \(0.1, nan\)"),
        ({"lrs": "0.1"}, "lrs must be positive finite numbers .*, got '0.1'"),
        ({"lrs": -1}, r"lrs must be a positive finite number \(or a non-empty list"),
        ({"batch_sizes": (0,)}, r"batch_sizes must be integers ≥ 1 .*, got \(0,\)"),
        ({"steps": 0}, "steps must be an integer ≥ 1 .*, got 0"),
        ({"steps": (True,)}, r"steps must be integers ≥ 1 .*, got \(True,\)"),
        ({"steps": {"a": 1}}, "steps must be integers ≥ 1"),
        ({"orders": (5,)}, r"orders must be integers in 0..4 .*, got \(5,\)"),
        ({"resummed": None}, "resummed must be true or false, got None"),
        ({"gap": "no"}, "gap must be true or false, got 'no'"),
        ({"max_hessian_parameters": -1}, "max_hessian_parameters must be an integer ≥ 0"),
        ({"krylov_rank": 1}, "krylov_rank must be an integer ≥ 2 or None, got 1"),
        ({"krylov_higher_rank": 0}, "krylov_higher_rank must be an integer ≥ 1 or None, got 0"),
        ({"curve": 1}, "curve must be true or false, got 1"),
        ({"curve_rank": 0}, "curve_rank must be an integer ≥ 1, got 0"),
        ({"max_memory": 0}, "max_memory must be a positive finite number or None, got 0"),
        ({"force": "true"}, "force must be true or false, got 'true'"),
        ({"trials": 1}, "trials must be an integer ≥ 2 or None, got 1"),
        ({"seed": -1}, "seed must be an integer ≥ 0, got -1"),
        ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
        ({"device": "cuda:x"}, "device must be cpu, cuda or cuda:N, got 'cuda:x'"),
        ({"data": {"population": 3}}, "data must be a Data, got"),
        ({"budget": Data()}, "budget must be a Budget, got"),
    ],
)
def test_each_field_is_checked_when_made(changes, match):
    with pytest.raises(ValueError, match=match):
        Experiment().replace(**changes)


def test_groups_check_their_fields_when_made_directly():
    with pytest.raises(ValueError, match="population must be an integer ≥ 1, got -2"):
        Data(population=-2)
    with pytest.raises(TypeError):
        Data("digits")  # keyword-only
    with pytest.raises(ValueError, match="trials must be an integer ≥ 2 or None"):
        Experiment(trials=True)


def test_replace_rejects_unknown_names_and_a_group_with_its_fields():
    with pytest.raises(ValueError, match=r"unknown experiment field 'lr'; valid: model, trials,"):
        Experiment().replace(lr=0.1)
    with pytest.raises(ValueError, match="give the group data or its fields"):
        Experiment().replace(data=Data(), population=3)
    assert Experiment().replace(data=Data(population=3)).data.population == 3


def test_krylov_ranks_left_none_or_given_survive_every_form(tmp_path):
    """``None`` (the command's ranks) and an explicit ``(128, 32)`` (validate's values,
    given) stay apart through dicts, TOML and ``--set``, so a file re-runs as it ran."""
    left = Experiment()
    given = Experiment().replace(krylov_rank=128, krylov_higher_rank=32)
    assert (left.measurement.krylov_rank, left.measurement.krylov_higher_rank) == (None, None)
    assert left != given
    for e in (left, given):
        assert Experiment.from_dict(json.loads(json.dumps(e.to_dict()))) == e
        (tmp_path / "e.toml").write_text(e.to_toml())
        assert Experiment.load(tmp_path / "e.toml") == e
    assert left.with_settings(["krylov_rank=128", "krylov_higher_rank=32"]) == given
    assert given.with_settings(["krylov_rank=none", "krylov_higher_rank=none"]) == left
    assert given.with_defaults(krylov_rank=64, krylov_higher_rank=16) == given
    assert left.with_defaults(krylov_rank=64).measurement.krylov_rank == 64


def test_with_defaults_fills_only_the_fields_left_none():
    e = Experiment(trials=8).with_defaults(trials=256, lrs=(0.1,), orders=(1,))
    assert (e.trials, e.grid.lrs, e.measurement.orders) == (8, (0.1,), (1,))
    with pytest.raises(ValueError, match="unknown experiment field 'lr'"):
        Experiment().with_defaults(lr=0.1)


def test_from_dict_takes_groups_or_flat_fields_and_nothing_else():
    e = Experiment.from_dict({"trials": 8, "lrs": [0.1], "data": {"population": 4}})
    assert (e.trials, e.grid.lrs, e.data.population) == (8, (0.1,), 4)
    with pytest.raises(ValueError, match="unknown experiment field 'config'; valid: model,"):
        Experiment.from_dict({"config": {}})
    with pytest.raises(ValueError, match=r"unknown field grid\.lr; valid: lrs, batch_sizes, steps"):
        Experiment.from_dict({"grid": {"lr": [0.1]}})
    with pytest.raises(ValueError, match="grid must be a table of lrs, batch_sizes, steps"):
        Experiment.from_dict({"grid": [0.1]})
    with pytest.raises(ValueError, match="field lrs given twice"):
        Experiment.from_dict({"lrs": [0.1], "grid": {"lrs": [0.2]}})
    with pytest.raises(ValueError, match="an experiment must be a table of fields, got"):
        Experiment.from_dict([("trials", 8)])


def test_settings_are_parsed_as_their_fields_types():
    e = Experiment().with_settings(
        [
            "trials=8",
            "lrs=0.01,0.02",
            "grid.steps=10 20",
            "batch_sizes=4",
            "pretrain_lr=1e-1",
            "gap=false",
            "shuffle=yes",
            "records_log=1",
            "model=pkg.mod:make",
            "dataset=npz:a=b.npz",  # only the first = splits
            "device = cuda:0",
            "max_memory=1e9",
        ]
    )
    assert (e.trials, e.grid.lrs, e.grid.steps, e.grid.batch_sizes) == (
        8,
        (0.01, 0.02),
        (10, 20),
        (4,),
    )
    assert e.start.pretrain_lr == 0.1 and not e.measurement.gap
    assert e.training.shuffle and e.training.records_log
    assert (e.model, e.data.dataset, e.device) == ("pkg.mod:make", "npz:a=b.npz", "cuda:0")
    assert e.budget.max_memory == 1e9
    cleared = e.with_settings(["trials=none", "lrs=null", "max_memory=", "data_dir=None"])
    assert cleared.trials is None and cleared.grid.lrs is None
    assert cleared.budget.max_memory is None and cleared.data.data_dir is None
    assert Experiment().with_settings([]) == Experiment()


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("trials", "a setting must be key=value, got 'trials'"),
        ("trails=8", "unknown experiment field 'trails'; valid: model, trials, seed"),
        ("grid.trials=8", "unknown experiment field 'grid.trials'; valid:"),
        ("data.lrs=0.1", "unknown experiment field 'data.lrs'"),
        ("trials=eight", "trials must be an integer, got 'eight'"),
        ("trials=1", "trials must be an integer ≥ 2 or None, got 1"),
        ("seed=none", "seed must be an integer, got 'none'"),
        ("gap=maybe", "gap must be true or false, got 'maybe'"),
        ("lrs=0.1,fast", "lrs must be a number, got 'fast'"),
        ("lrs=,", "lrs must be one or more floats, got ','"),
        ("lrs=-0.1", "lrs must be positive finite numbers"),
        ("schedule=sgd", "schedule must be one of online, epochs, gd, got 'sgd'"),
        ("model=", "model must be a non-empty string, got ''"),
    ],
)
def test_bad_settings_say_what_was_expected(setting, match):
    with pytest.raises(ValueError, match=match):
        Experiment().with_settings([setting])


def test_settings_must_be_a_list():
    with pytest.raises(ValueError, match="settings must be a list of key=value strings"):
        Experiment().with_settings("trials=8")


def test_load_rejects_files_that_hold_no_experiment(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"config": {}, "rows": []}))
    with pytest.raises(ValueError, match="got one without"):
        Experiment.load(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("trials = 8")
    with pytest.raises(ValueError, match=r"bad\.json: expected a results\.json, .* not JSON"):
        Experiment.load(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text("trials = = 8")
    with pytest.raises(ValueError, match=r"bad\.toml: expected a TOML file"):
        Experiment.load(tmp_path / "bad.toml")
    (tmp_path / "odd.toml").write_text("trials = 8\nwidth = 3\n")
    with pytest.raises(ValueError, match=r"odd\.toml: unknown experiment field 'width'"):
        Experiment.load(tmp_path / "odd.toml")
    with pytest.raises(FileNotFoundError):
        Experiment.load(tmp_path / "missing.toml")
    results = {"experiment": FULL.to_dict(), "config": {}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert Experiment.load(tmp_path / "results.json") == FULL


def test_experiment_of_is_the_keyword_functions_door():
    e, network = experiment_of(FULL, {"trials": 4}, command="validate")
    assert e == FULL.replace(trials=4) and network is None
    with pytest.raises(TypeError, match="validate\\(\\) got an unexpected keyword argument 'lr'"):
        experiment_of(None, {"lr": 0.1}, command="validate")
    with pytest.raises(TypeError, match="compare\\(\\) takes an Experiment, got"):
        experiment_of(FULL.to_dict(), {}, command="compare")
    net = object()
    e, network = experiment_of(None, {"model": net}, command="compare")
    assert network is net and e.model == "object"


def test_commands_reject_experiments_they_cannot_run():
    """Both refuse before any work: no data is loaded."""
    with pytest.raises(ValueError, match="validate runs one schedule: steps must be one value"):
        validation.validate(steps=(5, 10), progress=False)
    with pytest.raises(ValueError, match="compare runs online SGD: the schedule must be online"):
        comparison.compare(schedule="gd", train_size=4)
    with pytest.raises(ValueError, match="with no train_size, epochs or shuffle, got Training"):
        comparison.compare(shuffle=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'width'"):
        comparison.compare(width=3)


# ------------------------------------------------------------------------ the CLI


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _captured(monkeypatch, command: str) -> list[Experiment]:
    """Replace ``command``'s function by one that keeps the experiments it is given."""
    seen: list[Experiment] = []

    class Result:
        gap = ()

        def table(self):
            return "table"

    def fake(experiment, **kwargs):
        seen.append(experiment)
        return Result()

    monkeypatch.setattr(validation if command == "validate" else comparison, command, fake)
    return seen


@pytest.mark.parametrize("command", ["validate", "compare"])
def test_no_options_build_the_default_experiment(command, monkeypatch, tmp_path):
    seen = _captured(monkeypatch, command)
    monkeypatch.chdir(tmp_path)  # the default --out folder
    result = _run(command)
    assert result.exit_code == 0, result.output
    assert seen == [Experiment()]


@pytest.mark.parametrize("command", ["validate", "compare"])
def test_config_and_set_build_the_experiment_from_a_file(command, monkeypatch, tmp_path):
    seen = _captured(monkeypatch, command)
    path = tmp_path / "e.toml"
    path.write_text(FULL.replace(trials=None, device="cpu").to_toml())
    args = [command, "--config", str(path), "--set", "lrs=0.5", "--set", "seed=7"]
    result = _run(*args, "--out", str(tmp_path / "o"), "--threads", "1")
    assert result.exit_code == 0, result.output
    assert seen == [FULL.replace(trials=None, device="cpu", lrs=(0.5,), seed=7)]


def test_validate_runs_every_seed_of_the_experiment(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "validate")
    result = _run("validate", "--seeds", "4", "5", "--trials", "8", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert seen == [Experiment(trials=8, seed=4), Experiment(trials=8, seed=5)]


@pytest.mark.parametrize("command", ["validate", "compare"])
def test_the_cli_defaults_are_the_commands(command):
    """An option left out leaves its field to the command: the default the help shows is
    the one the command applies."""
    module = validation if command == "validate" else comparison
    resolved = Experiment().with_defaults(**module.DEFAULTS).options()
    names = {"model_spec": "model", "batch_size": "batch_sizes", "seeds": "seed"}
    defaults = cli.commands[command].make_context(command, []).params
    for param in cli.commands[command].params:
        field = names.get(param.name, param.name)
        if field not in resolved or param.name in ("seeds", "schedule"):  # schedule: inferred
            continue
        if isinstance(resolved[field], tuple):  # variadic: the default is in the help
            shown = " ".join(f"{v:g}" for v in resolved[field])
            assert f"[default: {shown}]" in param.help, (param.name, param.help)
        else:
            assert defaults[param.name] == resolved[field], param.name


def test_config_goes_with_set_out_and_threads_only(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text(Experiment().to_toml())
    result = CliRunner().invoke(
        cli, ["validate", "--config", str(path), "--trials", "4", "-T", "3"]
    )
    assert result.exit_code == 2
    assert "change its fields with --set KEY=VALUE, not --steps, --trials" in result.stderr
    bad = CliRunner().invoke(cli, ["compare", "--config", str(path), "--set", "trails=4"])
    assert bad.exit_code == 2 and "unknown experiment field 'trails'" in bad.stderr
    missing = CliRunner().invoke(cli, ["validate", "--config", str(tmp_path / "no.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def _tiny_npz(folder: Path) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 2, 2)).astype(np.float32)
    np.savez(folder / "tiny.npz", x=x, y=rng.integers(0, 3, 12))
    return f"npz:{folder / 'tiny.npz'}"


TINY = ["--model", "mlp", "--lr", "0.01", "0.05", "--trials", "4", "--steps", "6"]
TINY += ["--records", "2", "--orders", "0", "1", "--population", "8", "--seed", "2"]
TINY += ["--krylov-rank", "8", "--krylov-higher-rank", "2", "--pretrain", "3"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A tiny validate run from the command line: (folder, its table)."""
    folder = tmp_path_factory.mktemp("first")
    result = _run("validate", "--dataset", _tiny_npz(folder), *TINY, "--out", str(folder / "a"))
    assert result.exit_code == 0, result.output
    return folder, result.stdout.splitlines()[:-1]  # the table, not the "wrote" line


def test_results_json_holds_the_experiment_that_ran(first):
    folder, _ = first
    payload = json.loads((folder / "a" / "results.json").read_text())
    e = Experiment.from_dict(payload["experiment"])
    assert e.grid == Grid(lrs=(0.01, 0.05), batch_sizes=(1,), steps=(6,))  # B filled in
    assert (e.trials, e.seed, e.measurement.orders, e.start.pretrain) == (4, 2, (0, 1), 3)
    assert payload["config"]["trials"] == 4 and payload["rows"]  # the old fields stay


def test_config_repeats_a_run_digit_for_digit(first):
    folder, table = first
    args = ["validate", "--config", str(folder / "a" / "results.json")]
    again = _run(*args, "--out", str(folder / "b"))
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[:-1] == table
    rows = [json.loads((folder / f / "results.json").read_text())["rows"] for f in "ab"]
    assert rows[0] == rows[1]


def test_the_keyword_function_prints_the_cli_table(first):
    folder, table = first
    result = validation.validate(
        dataset=f"npz:{folder / 'tiny.npz'}",
        model="mlp",
        lrs=(0.01, 0.05),
        trials=4,
        steps=6,
        records=2,
        orders=(0, 1),
        population=8,
        seed=2,
        krylov_rank=8,
        krylov_higher_rank=2,
        pretrain=3,
        progress=False,
    )
    assert result.table().splitlines() == table


def test_compare_records_its_experiment_and_runs_it_again(tmp_path, monkeypatch):
    """compare.json holds the grid that ran (sorted); ``--config`` hands it back whole
    (that a run repeats from its experiment is the validate test's)."""
    args = ["compare", "--dataset", _tiny_npz(tmp_path), "--model", "mlp", "--orders", "1"]
    args += ["--lr", "0.01", "--batch-size", "2", "1", "--steps", "2", "--trials", "4"]
    args += ["--population", "8", "--krylov-rank", "4", "--krylov-higher-rank", "2"]
    first = _run(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    saved = json.loads((tmp_path / "a" / "compare.json").read_text())["experiment"]
    assert saved["grid"] == {"lrs": [0.01], "batch_sizes": [1, 2], "steps": [2]}
    config = str(tmp_path / "a" / "compare.json")
    seen = _captured(monkeypatch, "compare")
    again = _run("compare", "--config", config, "--out", str(tmp_path / "b"))
    assert again.exit_code == 0, again.output
    assert seen == [Experiment.from_dict(saved)]


def test_set_without_config_changes_the_options():
    @click.command()
    @click.option("--trials", type=int, default=256)
    @click.option("--lr", "lrs", type=float, multiple=True)
    @experiment_options
    def show(**options):
        click.echo(repr(build_experiment(options).trials))

    assert CliRunner().invoke(show, ["--trials", "8"]).output == "8\n"
    assert CliRunner().invoke(show, ["--trials", "8", "--set", "trials=16"]).output == "16\n"
    assert CliRunner().invoke(show, []).output == "None\n"  # left to the command
