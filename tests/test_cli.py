"""Tests for the ``perturb`` command line (perturb.cli) through click's CliRunner."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from perturb.cli import cli, main
from perturb.cli_options import DEFAULT_PRETRAIN_LR
from perturb.numeric.validity import ladder_loss
from perturb.symbolic.schedules import Online
from perturb.symbolic.series import series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str):
    """Invoke the CLI in-process; exceptions other than SystemExit propagate."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------- series


def test_series_order_2_matches_theory_notes():
    result = run("series", "--order", "2", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "E[test loss] for online SGD (T steps, batch 1), to order η^2:"
    assert lines[1] == "η^0: (1)·l"
    assert lines[2] == "η^1: (-T)·G·G"
    assert "(T*(2*T - 1)/2)·G·H·G" in lines[3]
    assert "(T/2)·tr(C H)" in lines[3]


def test_series_symbolic_header_and_terms():
    result = run("series", "--order", "2")
    assert result.exit_code == 0, result.output
    first, *rest = result.output.splitlines()
    assert first == "E[test loss] for online SGD (T steps, batch B), to order η^2:"
    assert len(rest) == 3
    assert "(T*(2*T - 1)/2)·G·H·G" in result.output
    assert "tr(C H)" in result.output


def test_series_order_3_header():
    result = run("series", "--order", "3")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "E[test loss] for online SGD (T steps, batch B), to order η^3:\n"
    )
    assert result.output.splitlines()[-1].startswith("η^3: ")
    assert "J:S" in result.output


def test_series_json_parses_with_every_term():
    result = run("series", "--order", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = series(2, Online())
    assert len(data["terms"]) == len(expected.terms) == 4
    assert data["order"] == 2 and data["quantity"] == "test"
    assert {t["contraction"] for t in data["terms"]} == {"l", "G·G", "G·H·G", "tr(C H)"}
    assert data["schedule"]["name"] == "online"


def test_series_latex():
    result = run("series", "--order", "2", "--format", "latex")
    assert result.exit_code == 0, result.output
    assert r"\operatorname{tr}" in result.output
    assert r"\begin{align*}" in result.output and r"\end{align*}" in result.output
    assert result.output.startswith("% E[test loss]")


def test_series_gd_gap():
    result = run("series", "--schedule", "gd", "--quantity", "gap", "--order", "1")
    assert result.exit_code == 0, result.output
    assert "(T/N)·tr(C)" in result.output
    assert result.output.splitlines()[0].startswith("E[test loss − train loss] for full-batch GD")


def test_series_numeric_sizes():
    result = run("series", "--order", "2", "--steps", "3", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "(3 steps, batch 1)" in result.output
    assert "η^1: (-3)·G·G" in result.output
    assert "(15/2)·G·H·G" in result.output and "(3/2)·tr(C H)" in result.output
    assert "T" not in result.output.split("\n", 1)[1]  # no symbol left after the header


def test_series_epochs_and_moment_form():
    result = run(
        "series", "-d", "1", "--schedule", "epochs", "-N", "6", "-B", "2", "-E", "2", "--shuffle"
    )
    assert result.exit_code == 0, result.output
    assert "reshuffled each epoch" in result.output
    assert "η^1: (-6)·G·G" in result.output
    moment = run("series", "--order", "2", "--form", "moment", "--batch-size", "1")
    assert moment.exit_code == 0, moment.output
    assert "(moment form)" in moment.output and "E[∇l ∇l]" in moment.output


def test_series_displacement():
    result = run("series", "--order", "1", "--quantity", "displacement")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("E[θ_T − θ_0]")
    assert "(-T)·G" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["series", "--order", "-1"], "-1 is not in the range"),
        (["series"], "Missing option '--order'"),
        (["series", "--order", "x"], "is not a valid integer"),
        (["series", "--order", "1", "--schedule", "sgd"], "'online', 'epochs', 'gd'"),
        (["series", "--order", "1", "--quantity", "loss"], "'test', 'train', 'gap'"),
        (["series", "--order", "1", "--format", "html"], "'text', 'latex', 'json'"),
        (["series", "--order", "1", "--form", "raw"], "'cumulant', 'moment'"),
        (["series", "--order", "1", "--steps", "0"], "0 is not in the range x>=1"),
        (
            ["series", "--order", "1", "--schedule", "epochs", "-N", "6", "-B", "4"],
            "--batch-size must divide --train-size",
        ),
        (["series", "--order", "1", "--epochs", "2"], "--epochs does not apply to --schedule"),
        (["series", "--order", "1", "--schedule", "gd", "-B", "2"], "--batch-size does not"),
        (["series", "--order", "1", "--shuffle"], "--shuffle does not apply"),
        (["diagrams", "--order", "-2"], "-2 is not in the range"),
        (["diagrams", "--order", "2", "--quantity", "gap"], "'test', 'train', 'displacement'"),
        (["diagrams", "--order", "2", "--schedule", "adam"], "'online', 'epochs', 'gd'"),
        (["diagrams", "--order", "2", "--draw", "x", "--format", "pdf"], "'svg', 'png'"),
        (["diagrams", "--order", "2", "--format", "png"], "give --draw DIR"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_a_usage_error(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, (ValueError, TypeError))


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "series" in result.output and "diagrams" in result.output


def test_main_entry_point(capsys):
    assert main(["series", "--order", "0"], standalone_mode=False) is None
    assert capsys.readouterr().out.splitlines()[-1] == "η^0: (1)·l"
    with pytest.raises(SystemExit) as exit_info:
        main(["series", "--order", "-1"])
    assert exit_info.value.code == 2


# -------------------------------------------------------------------- diagrams


def _table_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#  tree"))
    rows = []
    for line in lines[header + 1 :]:
        if line.startswith("wrote "):
            break
        rows.append(line.split("  "))
    return rows


def test_diagrams_order_3_table():
    result = run("diagrams", "--order", "3")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("9 diagrams of order η^3 for E[test loss] in online SGD")
    rows = _table_rows(result.output)
    assert len(rows) == 9
    assert [r[0] for r in rows] == [str(i) for i in range(9)]
    text = result.output
    assert "B*T " in text and "J:S" in text  # the three-leaf star in one part: S
    assert "[-1, 0, 1, 2]" in text and "B**3*T*(T - 2)*(T - 1)/6" in text
    star = next(line for line in text.splitlines() if "{0} {1,2,3}" in line)
    assert " 6 " in star  # |Aut| of the star whose leaves share a part


def test_diagrams_name_equal_networks_alike_and_as_series_does():
    result = run("diagrams", "--order", "3")
    names = {line.rsplit("  ", 1)[-1] for line in result.output.splitlines()[2:]}
    series_names = {t.contraction.text for t in series(3, Online()).terms if t.power == 3}
    assert names == series_names


def test_diagrams_train_and_multi_epoch():
    train = run("diagrams", "--order", "1", "--quantity", "train", "--schedule", "gd")
    assert train.exit_code == 0, train.output
    assert "without the path condition" in train.output
    assert "{0,1}" in train.output and "tr(C)" in train.output
    assert len(_table_rows(train.output)) == 2
    disp = run("diagrams", "--order", "2", "--quantity", "displacement", "--steps", "4")
    assert disp.exit_code == 0, disp.output
    assert "1 diagram of order η^2" in disp.output and "6*B**2" in disp.output


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_diagrams_draw(tmp_path: Path, fmt: str):
    out = tmp_path / "pictures"
    args = ["diagrams", "--order", "3", "--draw", str(out)]
    if fmt == "png":
        args += ["--format", "png"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    written = [Path(line.removeprefix("wrote ")) for line in result.output.splitlines()]
    written = [p for p in written if p.suffix == f".{fmt}"]
    assert len(written) == 9
    assert sorted(p.name for p in out.iterdir()) == [f"d3_{i:03d}.{fmt}" for i in range(9)]
    for path in written:
        assert path.is_file()
        if fmt == "png":
            assert path.read_bytes()[:8] == PNG_MAGIC
        else:
            assert ET.parse(path).getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_series_resummed_reproduces_example_1():
    """Example 1 of the paper: the skew term −(η³/3!) Σ S J (1 − y^T)/(1 − y), y = Π x."""
    result = run("series", "--order", "3", "--resummed", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "S_(a,b,c)" in x)
    assert line == "η^3·(-1/6)·Σ J_abc S_(a,b,c) · (x_a**T*x_b**T*x_c**T - 1)/(x_a*x_b*x_c - 1)"


def test_series_resummed_bad_inputs():
    result = run("series", "--order", "2", "--resummed", "--schedule", "epochs", "--epochs", "2")
    assert result.exit_code == 0 and "2 epochs" in result.output  # epochs are re-summed now
    result = run("series", "--order", "2", "--resummed", "--quantity", "gap")
    assert result.exit_code == 2 and "test and train separately" in result.output


def test_predict_from_checkpoint(tmp_path):
    import json as _json

    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model
    from perturb.numeric.measuring import measure

    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=3)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    args = [
        "predict",
        "--model",
        "mlp",
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
        "--lr",
        "0.01",
        "--lr",
        "0.02",
        "--steps",
        "10",
        "--order",
        "1",
        "--samples",
        "40",
        "--exact",
        "--format",
        "json",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    payload = _json.loads(result.output[result.output.index("{") :])
    # the same numbers from the Python API on the same 40 points (exact averages)
    sub = data.subset(40, seed=0)
    stats = measure(model, (sub.x, sub.y), order=1, exact=True, progress=False, dtype=torch.float32)
    pred = stats.predict(Online(steps=10, batch_size=1), lr=[0.01, 0.02])
    assert payload["total"] == pytest.approx(pred.total.tolist(), rel=1e-6)
    assert payload["total"][0] < payload["by_order"][0][0]  # η¹ lowers the loss


def test_predict_bad_checkpoint(tmp_path):
    import torch

    torch.save({"weight": torch.zeros(3)}, tmp_path / "bad.pt")
    result = run(
        "predict",
        "--model",
        "mlp",
        "--checkpoint",
        str(tmp_path / "bad.pt"),
        "--lr",
        "0.01",
        "--steps",
        "5",
    )
    assert result.exit_code == 2 and "missing" in result.output.lower()


def test_series_resummed_integral_form_is_the_papers_example_1():
    result = run("series", "--order", "3", "--resummed", "--integral", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "S_(a,b,c)" in x)
    assert line.endswith("(1 - exp(T*(-r_a - r_b - r_c)))/(r_a + r_b + r_c)")


def test_compare_command_writes_its_table(tmp_path):
    import csv as _csv

    import numpy as np

    rng = np.random.default_rng(0)  # a tiny dataset keeps the MLP at 227 parameters
    x = rng.normal(size=(12, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "tiny.npz", x=x, y=rng.integers(0, 3, 12))
    out = tmp_path / "cmp"
    args = ["compare", "--dataset", f"npz:{tmp_path / 'tiny.npz'}", "--model", "mlp"]
    args += ["--orders", "1", "--lr", "0.01", "--batch-size", "1", "2"]  # space-separated
    result = run(*args, "--steps", "2", "--trials", "4", "--population", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = list(_csv.DictReader((out / "compare.csv").open()))
    assert [int(r["batch_size"]) for r in rows] == [1, 2]
    for r in rows:  # the printed table is the written one
        assert f"{float(r['actual']):.5f} ± {float(r['ci_half']):.5f}" in result.output
        assert f"{float(r['SDE']):9.5f}" in result.output
    assert (out / "compare.png").exists()
    bad = run("compare", "--steps", "0", "--out", str(out))
    assert bad.exit_code == 2 and "steps must be" in bad.output and "(0,)" in bad.output


# ---------------------------------------------------------------- list options


def test_variadic_option_takes_lists_and_repeats():
    from perturb.cli import VariadicOption

    @click.command()
    @click.option("--lr", type=float, cls=VariadicOption)
    @click.option("--orders", "-d", type=click.IntRange(0, 4), cls=VariadicOption)
    @click.option("--steps", "-T", type=int)
    @click.option("--flag/--no-flag", default=False)
    def show(lr, orders, steps, flag):
        click.echo(repr((lr, orders, steps, flag)))

    def out(*args):
        result = CliRunner().invoke(show, list(args))
        assert result.exit_code == 0, result.output
        return result.output.strip()

    assert out("--lr", "0.01", "0.03", "0.1") == "((0.01, 0.03, 0.1), (), None, False)"
    assert out("--lr", "0.01", "--lr", "0.03") == "((0.01, 0.03), (), None, False)"
    # a list stops at the next option, short or long, and resumes when repeated
    assert out("--lr", "1", "2", "-T", "5", "--lr=3", "4", "-d", "0", "1", "--flag") == (
        "((1.0, 2.0, 3.0, 4.0), (0, 1), 5, True)"
    )
    assert out("--lr", "-0.5", "1e-3") == "((-0.5, 0.001), (), None, False)"  # numbers, not flags
    assert out() == "((), (), None, False)"
    bad = CliRunner().invoke(show, ["--orders", "1", "7"])
    assert bad.exit_code == 2 and "7 is not in the range 0<=x<=4" in bad.output
    bad = CliRunner().invoke(show, ["--lr", "0.1", "fast"])
    assert bad.exit_code == 2 and "'fast' is not a valid float" in bad.output
    bad = CliRunner().invoke(show, ["--lr"])
    assert bad.exit_code == 2 and "requires an argument" in bad.output


def test_predict_takes_a_list_of_learning_rates():
    args = ["predict", "--model", "mlp", "--steps", "3", "--order", "1", "--samples", "12"]
    args += ["--exact", "--format", "json"]
    listed = run(*args, "--lr", "0.01", "0.02", "0.05")
    repeated = run(*args, "--lr", "0.01", "--lr", "0.02", "--lr", "0.05")
    assert listed.exit_code == 0 and repeated.exit_code == 0, listed.output
    a = json.loads(listed.output[listed.output.index("{") :])
    b = json.loads(repeated.output[repeated.output.index("{") :])
    assert a["lr"] == [0.01, 0.02, 0.05] and a["total"] == b["total"]


def test_predict_verbose_prints_the_plan_and_target_se_uses_fewer_points():
    """``--verbose`` prints the pilot's choice per statistic (stderr); a loose
    ``--target-se`` measures on fewer points than the default plan."""
    args = ["predict", "--model", "mlp", "--steps", "10", "--order", "2", "--lr", "0.01"]
    args += ["--samples", "900", "--format", "json"]
    runner = CliRunner()
    plain = runner.invoke(cli, [*args, "--verbose"], catch_exceptions=False)
    assert plain.exit_code == 0, plain.output
    lines = plain.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("estimator: auto"))
    assert "pilot on 112 points" in lines[head]
    assert lines[head + 1].startswith("  measured on 784 points, 1 replicate")
    chosen = [line.split(": ")[1].split()[0] for line in lines[head + 2 : head + 6]]
    assert [line.split(":")[0].strip() for line in lines[head + 2 : head + 6]] == [
        "l", "G·G", "G·H·G", "tr(C H)",
    ]  # fmt: skip
    assert set(chosen) <= {"sketch", "tuples"}
    full = json.loads(plain.stdout)
    loose = runner.invoke(cli, [*args, "--target-se", str(4 * full["se"][0])])
    assert loose.exit_code == 0, loose.output
    assert json.loads(loose.stdout)["rows"] < full["rows"] == 784


@pytest.mark.parametrize(
    ("model", "parameters"),  # the validity verdicts cost most, and grow fast with P
    [("pooled_softmax_1x1", 20), pytest.param("pooled_softmax", 50, marks=pytest.mark.slow)],
)
def test_predict_resummed_at_full_rank_is_the_eigendecomposition(model, parameters):
    """``perturb predict --resummed`` on softmax regression pooled to 1×1 digits (P = 20;
    -m slow: 2×2, P = 50; ``--krylov-rank 4096`` ≥ P: the subspace spans everything)
    equals perturb.predict's eigendecomposition of materialized float64 tensors on the
    same 12 points; the error estimate is the last edge's contribution continued
    geometrically, not zero, plus the Hessian ladder, which equals ``ladder_loss`` of the
    materialized per-sample Hessians and gradients."""
    import torch

    import perturb

    args = ["predict", "--model", "mlp", "--steps", "20", "--order", "3", "--samples", "12"]
    args += ["--exact", "--format", "json", "--resummed", "--krylov-rank", "4096"]
    args += ["--krylov-higher-rank", "4096", "--lr", "0.05", "0.2"]
    result = run(*args[:2], f"tests.test_cli:{model}", *args[3:])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout[result.stdout.index("{") :])
    assert got["resummed"] and got["krylov_rank"] == parameters
    pop, t0, row_loss, rows = _digits_population(model)
    per_h = torch.func.vmap(lambda r: torch.func.hessian(row_loss)(t0, r))(rows)
    per_g = torch.func.vmap(lambda r: torch.func.grad(row_loss)(t0, r))(rows)
    ladder = ladder_loss(per_h.mean(0), per_h, per_g.mean(0), per_g, lr=got["lr"], steps=20)
    np.testing.assert_allclose(got["hessian_ladder"], ladder, rtol=1e-4)
    # the verdict of perturb.numeric.trust on the same prediction, with its horizon
    assert len(got["trusted"]) == 2 and all(0 <= t <= 20 for t in got["trusted_steps"])
    assert got["trusted_eta_t"] == pytest.approx(
        [lr * t for lr, t in zip(got["lr"], got["trusted_steps"], strict=True)]
    )
    assert set(got["validity"]) >= {"resolution", "loss_spread", "rms_displacement"}
    for lr, total, estimate, rung in zip(
        got["lr"], got["total"], got["error_estimate"], ladder, strict=True
    ):
        want = perturb.predict(
            pop, t0, perturb.Online(steps=20, batch_size=1), lr=lr, order=3, resummed=True
        )
        assert total == pytest.approx(want.total, rel=1e-5)
        assert 0 < rung < estimate <= abs(want.by_order[3]) + rung + 1e-6


def test_predict_resummed_order_2_reads_the_three_edge_terms_as_compare_does():
    """``--resummed --order 2`` measures through 3 edges for its estimate (issue 25 item 4:
    the CLI's estimate was the 2-edge continuation alone, a fraction of compare's): the
    Hessian ladder is there and equals the order-3 run's, and the estimate covers the
    3-edge contribution that order 3 adds."""
    base = ["predict", "--model", "tests.test_cli:pooled_softmax_1x1", "--steps", "20"]
    base += ["--samples", "12", "--exact", "--format", "json", "--resummed"]
    base += ["--krylov-rank", "4096", "--krylov-higher-rank", "4096", "--lr", "0.05", "0.2"]
    got = {}
    for order in ("2", "3"):
        result = run(*base, "--order", order)
        assert result.exit_code == 0, result.output
        got[order] = json.loads(result.stdout[result.stdout.index("{") :])
    assert got["2"]["hessian_ladder"] is not None
    np.testing.assert_allclose(got["2"]["hessian_ladder"], got["3"]["hessian_ladder"], rtol=1e-6)
    for two, three, estimate in zip(
        got["2"]["total"], got["3"]["total"], got["2"]["error_estimate"], strict=True
    ):
        assert estimate >= abs(three - two) > 0


def _digits_population(model: str):
    """The CLI tests' 12 digits rows as a float64 :class:`perturb.Population` for
    ``tests.test_cli:<model>`` at its seed-0 initialization: ``(pop, θ_0, row_loss, rows)``."""
    import torch

    import perturb
    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model
    from perturb.experiments.simulation import model_loss

    data = load_dataset("digits", split="train").subset(12, seed=0)
    net = build_model(f"tests.test_cli:{model}", data.input_shape, data.num_classes, seed=0)
    loss_fn, theta = model_loss(net)
    x, y = data.x.double(), data.y
    rows = torch.cat([x.reshape(len(y), -1), y[:, None].double()], 1)

    def row_loss(p, row):
        return loss_fn(p, row[None, :-1].reshape(1, *x.shape[1:]), row[None, -1].long())[0]

    return perturb.Population(row_loss, rows), theta.detach().double(), row_loss, rows


def test_predict_series_order_2_reads_the_third_order_terms_as_perturb_predict_does():
    """The un-resummed twin (issue 25 item 4): ``perturb predict --order 2`` measures
    through η³ for its estimate, so it equals ``perturb.predict(..., order=2).trust``'s on
    the same rows in float64 (before: the order-2 measurement alone, a different and
    smaller estimate) and covers the η³ term that ``--order 3`` adds."""
    import perturb

    base = ["predict", "--model", "tests.test_cli:pooled_softmax_1x1", "--steps", "20"]
    base += ["--samples", "12", "--exact", "--format", "json", "--lr", "0.05", "0.2"]
    got = {}
    for order in ("2", "3"):
        result = run(*base, "--order", order)
        assert result.exit_code == 0, result.output
        got[order] = json.loads(result.stdout[result.stdout.index("{") :])
    pop, t0, _, _ = _digits_population("pooled_softmax_1x1")
    for lr, two, three, estimate in zip(
        got["2"]["lr"], got["2"]["total"], got["3"]["total"], got["2"]["error_estimate"],
        strict=True,
    ):  # fmt: skip
        assert estimate >= abs(three - two) > 0
        want = perturb.predict(pop, t0, perturb.Online(steps=20, batch_size=1), lr=lr, order=2)
        assert two == pytest.approx(want.total, rel=1e-5)
        assert estimate == pytest.approx(want.trust.error_estimate, rel=1e-4)


def pooled_softmax(input_shape, num_classes, seed):
    """A 50-parameter model for the CLI tests: 8×8 digits pooled to 2×2, then softmax."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(4, num_classes)
    )


def pooled_softmax_1x1(input_shape, num_classes, seed):
    """A 20-parameter model for the CLI tests: 8×8 digits pooled to 1×1, then softmax."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(1, num_classes)
    )


# ----------------------------------------------------------- shared option groups


def test_the_cli_choices_are_the_librarys():
    from perturb import cli_options
    from perturb.symbolic.options import SCHEDULES
    from perturb.symbolic.schedules import FORMS
    from perturb.symbolic.series import QUANTITIES

    assert cli_options.SCHEDULES == SCHEDULES
    assert cli_options.FORMS == FORMS
    assert cli_options.QUANTITIES == QUANTITIES


def test_the_pretrain_lr_default_is_the_librarys():
    from perturb import cli_options
    from perturb.experiments.pipeline import DEFAULT_PRETRAIN_LR

    assert cli_options.DEFAULT_PRETRAIN_LR == DEFAULT_PRETRAIN_LR
    for command in ("validate", "compare"):
        params = {p.name: p for p in cli.commands[command].params}
        assert params["pretrain_lr"].default == DEFAULT_PRETRAIN_LR
        assert params["pretrain"].default == 0 and params["checkpoint"].default is None


def _tiny_npz(tmp_path: Path) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "tiny.npz", x=x, y=rng.integers(0, 3, 12))
    return f"npz:{tmp_path / 'tiny.npz'}"


def test_validate_from_a_checkpoint_with_pretraining_on_a_log_grid(tmp_path):
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model

    dataset = _tiny_npz(tmp_path)
    data = load_dataset(dataset)
    torch.save(build_model("mlp", data.input_shape, 3, seed=4).state_dict(), tmp_path / "c.pt")
    args = ["validate", "--dataset", dataset, "--model", "mlp", "--lr", "0.01", "--trials", "4"]
    args += ["--steps", "30", "--records", "3", "--records-log", "--orders", "0", "1"]
    args += ["--no-resummed", "--no-gap", "--checkpoint", str(tmp_path / "c.pt")]
    result = run(*args, "--pretrain", "10", "--pretrain-lr", "0.5", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    start = json.loads((tmp_path / "o" / "results.json").read_text())["config"]["start"]
    assert start["checkpoint"] == str(tmp_path / "c.pt")
    assert (start["pretrain_steps"], start["pretrain_lr"]) == (10, 0.5)
    lines = result.stdout.splitlines()
    assert lines[1] == (
        f"start: l(θ0) = {start['loss']:.5f}, ‖G‖ = {start['grad_norm']:.6f} "
        f"({tmp_path / 'c.pt'}, then 10 steps of full-batch GD at lr 0.5)"
    )
    assert [int(line.split()[1]) for line in lines[4:7]] == [1, 5, 30]


def test_compare_after_pretraining(tmp_path):
    args = ["compare", "--dataset", _tiny_npz(tmp_path), "--model", "mlp", "--orders", "1"]
    args += ["--lr", "0.01", "--batch-size", "1", "--steps", "2", "--trials", "4"]
    result = run(*args, "--population", "8", "--pretrain", "5", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    start = json.loads((tmp_path / "o" / "compare.json").read_text())["config"]["start"]
    assert start["pretrain_steps"] == 5 and start["pretrain_lr"] == DEFAULT_PRETRAIN_LR
    assert result.stdout.splitlines()[0].startswith(f"start: l(θ0) = {start['loss']:.5f}")


@pytest.mark.parametrize("command", ["predict", "validate", "compare"])
def test_every_command_takes_the_same_shared_options(command):
    params = {p.name: p for p in cli.commands[command].params}
    predict = {p.name: p for p in cli.commands["predict"].params}
    for name in ("dataset", "data_dir", "model_spec", "lrs", "device"):
        assert name in params, name
        assert params[name].opts == predict[name].opts
    assert params["dataset"].default == "digits"
    assert params["device"].default == "cpu"
    assert {"seed", "seeds"} & set(params)


def test_predict_data_is_a_hidden_deprecated_alias_of_dataset():
    assert "--data " not in run("predict", "--help").output
    assert "--dataset" in run("predict", "--help").output
    args = ["predict", "--model", "mlp", "--steps", "3", "--order", "1", "--samples", "12"]
    args += ["--exact", "--format", "json", "--lr", "0.01"]
    new = CliRunner().invoke(cli, [*args, "--dataset", "digits"])
    old = CliRunner().invoke(cli, [*args, "--data", "digits"])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert json.loads(old.stdout) == json.loads(new.stdout)
    notes = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert notes == ["perturb: --data is deprecated, use --dataset"]
    assert "deprecated" not in new.stderr
    both = CliRunner().invoke(cli, [*args, "--data", "digits", "--dataset", "digits"])
    assert both.exit_code == 2 and "give --dataset only" in both.stderr


def test_schedule_options_are_declared_once():
    series_opts = {p.name: p.opts for p in cli.commands["series"].params}
    validate_opts = {p.name: p.opts for p in cli.commands["validate"].params}
    for name in ("steps", "batch_size", "train_size", "epochs", "shuffle"):
        assert series_opts[name] == validate_opts[name], name


# ----------------------------------------------------------------- lazy package


def test_the_package_loads_its_names_lazily():
    import subprocess
    import sys

    code = (
        "import sys, perturb; before = {'torch', 'sympy'} & set(sys.modules); "
        "names = [n for n in perturb.__all__ if getattr(perturb, n, None) is None]; "
        "print(sorted(before), names, set(perturb.__all__) <= set(dir(perturb)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[]", "True"]
    import perturb

    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        perturb.frobnicate  # noqa: B018


def test_predict_marks_a_blown_up_series_unstable_and_writes_strict_json():
    """validate's rule in predict: a total outside [−10·l(θ_0), 20·l(θ_0)] is printed as
    ``unstable`` (JSON: ``null`` and ``"unstable": true``), never as a loss; l(θ_0) is the
    order-0 term of the exact series; NaN (one group: no standard error) is ``null``."""
    from perturb.experiments.pipeline import is_unstable

    args = ["predict", "--model", "mlp", "--samples", "8", "--exact", "--order", "2"]
    args += ["--lr", "0.01", "--steps"]
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in the JSON")}
    text = run(*args, "1000000")
    data = json.loads(run(*args, "1000000", "--format", "json").stdout, **strict)
    assert text.exit_code == 0, text.output
    assert data["start_loss"] == pytest.approx(data["by_order"][0][0], rel=1e-6)
    blown = sum(data["by_order"][0])  # the truncated series, as the table would print it
    assert blown > 20 * data["start_loss"] and is_unstable(blown, data["start_loss"])
    assert data["total"] == [None] and data["unstable"] == [True]
    row = text.stdout.splitlines()[-1].split()
    assert row[0] == "0.01" and row[4:6] == ["unstable", "–"]
    assert f"{blown:.6f}" not in text.stdout and "unstable, no prediction" in text.stderr
    short = json.loads(run(*args, "3", "--format", "json").stdout, **strict)
    assert short["unstable"] == [False] and short["total"] == [sum(short["by_order"][0])]
    sampled = run("predict", "--model", "mlp", "--samples", "3", "--order", "1", "--lr", "0.01",
                  "--steps", "3", "--format", "json")  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert "NaN" not in sampled.stdout and json.loads(sampled.stdout, **strict)["se"] == [None]
