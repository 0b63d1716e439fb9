"""Every way a user can get the command line wrong ends in one line on stderr and status 2.

Each row of :data:`BAD_INPUTS` is a command line and a fragment of the expected message:
the command must exit with status 2, print nothing on stdout, exactly one line on stderr
(``error: …`` containing the fragment), and no traceback.  Then: ``--debug`` shows the
traceback, unexpected exceptions are one ``internal error`` line with status 1, torch's
deprecation noise stays hidden, and ``perturb --help`` answers fast without torch or sympy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from perturb.cli import cli
from perturb.symbolic.schedules import Online

PREDICT = ["predict", "--model", "mlp", "--steps", "3", "--order", "1"]


def _npz(tmp_path: Path, kind: str) -> str:
    """A broken ``.npz``: ``truncated`` (a valid file cut in half) or ``random`` bytes."""
    path = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.normal(size=(12, 1, 2, 2)).astype(np.float32), y=np.arange(12) % 3)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return f"npz:{path}"


def _checkpoints(tmp_path: Path) -> tuple[str, str]:
    """A checkpoint that is no state dict (random bytes) and one of the digits mlp."""
    bad = tmp_path / "random.pt"
    bad.write_bytes(np.random.default_rng(2).integers(0, 256, 512, dtype=np.uint8).tobytes())
    import torch

    from perturb.experiments.models import mlp

    good = tmp_path / "mlp.pt"
    torch.save(mlp((1, 8, 8), 10, seed=0).state_dict(), good)
    return str(bad), str(good)


def _refusal_of_order_20() -> str:
    """The library's own refusal of the order-20 series, which the CLI must print."""
    from perturb.symbolic.cost import check_work, estimate_work

    with pytest.raises(ValueError) as refused:
        check_work(estimate_work(20, Online()), force=False)
    return " ".join(str(refused.value).split())


BAD_INPUTS = [
    pytest.param([*PREDICT, "--lr", "-0.01"], "lr must be a positive finite number", id="lr<0"),
    pytest.param([*PREDICT, "--lr", "0"], "lr must be a positive finite number, got 0", id="lr=0"),
    pytest.param([*PREDICT, "--lr", "nan"], "got nan", id="lr=nan"),
    pytest.param([*PREDICT, "--lr", "inf"], "got inf", id="lr=inf"),
    pytest.param([*PREDICT, "--lr", "0.01", "0.02", "-1"], "got -1", id="lr-list"),
    pytest.param([*PREDICT, "--lr", "0.01", "--device", "cuda"], "no CUDA GPU", id="cuda"),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--exact", "--estimator", "sketch"],
        "apply to estimates",
        id="exact-estimator",
    ),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--estimator", "tuples", "--target-se", "0.01"],
        "plan the auto estimator, got --estimator tuples",
        id="target-needs-auto",
    ),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--target-se", "0.01", "--budget", "10"],
        "--target-se or --budget, not both",
        id="target-and-budget",
    ),
    pytest.param([*PREDICT, "--lr", "0.01", "--budget", "0"], "budget", id="budget=0"),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--estimator", "best"],
        "'best' is not one of",
        id="estimator-name",
    ),
    pytest.param(["series", "--order", "-1"], "-1 is not in the range", id="order<0"),
    pytest.param(["series", "--order", "20"], None, id="order-20"),
    pytest.param(["diagrams", "--order", "20"], None, id="diagrams-order-20"),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--checkpoint", "{tmp}/missing.pt"],
        "does not exist",
        id="missing-checkpoint",
    ),
    pytest.param([*PREDICT, "--lr", "0.01", "--dataset", "{truncated}"], "npz", id="npz-cut"),
    pytest.param([*PREDICT, "--lr", "0.01", "--dataset", "{random}"], "npz", id="npz-random"),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--samples", "100000"], "more than the", id="samples>data"
    ),
    pytest.param(
        ["predict", "--model", "resnet", "--lr", "0.01", "--steps", "3"],
        "unknown model spec 'resnet'",
        id="unknown-model",
    ),
    pytest.param(
        [*PREDICT, "--lr", "0.01", "--dataset", "mnist-but-wrong"],
        "unknown dataset 'mnist-but-wrong'",
        id="unknown-dataset",
    ),
    pytest.param(
        ["series", "--order", "1", "--schedule", "epochs", "-N", "6", "-B", "4"],
        "--batch-size must divide --train-size",
        id="batch-not-dividing",
    ),
    pytest.param(
        ["validate", "--schedule", "epochs", "--train-size", "10", "--batch-size", "3"],
        "--batch-size must divide --train-size",
        id="validate-batch-not-dividing",
    ),
    pytest.param(["validate", "--population", "0"], "0 is not in the range x>=2", id="pop=0"),
    pytest.param(["validate", "--lr", "0"], "lr must be a positive finite number", id="val-lr"),
    pytest.param(["compare", "--lr", "nan"], "got nan", id="compare-lr"),
    pytest.param(["compare", "--trials", "1"], "1 is not in the range x>=2", id="trials=1"),
    pytest.param(
        ["validate", "--checkpoint", "{tmp}/missing.pt"], "does not exist", id="val-no-ckpt"
    ),
    pytest.param(
        ["compare", "--checkpoint", "{tmp}/missing.pt"], "does not exist", id="cmp-no-ckpt"
    ),
    pytest.param(
        ["validate", "--model", "mlp", "--checkpoint", "{ckpt}"],
        "cannot read checkpoint",
        id="val-bad-ckpt",
    ),
    pytest.param(
        ["validate", "--checkpoint", "{mlp_ckpt}"],
        "does not match Sequential: missing keys",
        id="val-wrong-ckpt",
    ),
    pytest.param(["validate", "--pretrain", "-1"], "-1 is not in the range x>=0", id="pretrain<0"),
    pytest.param(
        ["compare", "--pretrain-lr", "0"], "lr must be a positive finite number", id="pretrain-lr"
    ),
    pytest.param(
        ["predict", "--model", "mlp", "--steps", "3"], "Missing option '--lr'", id="no-lr"
    ),
    pytest.param([*PREDICT, "--lr", "0.1", "--steps", "0"], "0 is not in the range", id="steps=0"),
    pytest.param(
        [*PREDICT, "--lr", "0.1", "--steps", str(10**400)],
        "steps must be at most 2^53 = 9007199254740992 (the predictions are float64 numbers), "
        "got a 401-digit number",
        id="steps=10^400",
    ),
    pytest.param(["predict", "--seed", "-1"], "-1 is not in the range x>=0", id="seed<0"),
    pytest.param(["frobnicate"], "No such command 'frobnicate'", id="command"),
    pytest.param(["--frobnicate"], "No such option '--frobnicate'", id="group-option"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(args, fragment, tmp_path):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    if fragment is None:
        fragment = _refusal_of_order_20()
    names = {"tmp": str(tmp_path)}
    for kind in ("truncated", "random"):
        if any(f"{{{kind}}}" in a for a in args):
            names[kind] = _npz(tmp_path, kind)
    names["ckpt"], names["mlp_ckpt"] = _checkpoints(tmp_path)
    args = [a.format(**names) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


def _raise(error: BaseException):
    def boom(*args, **kwargs):
        raise error

    return boom


def test_debug_shows_the_traceback():
    args = ["predict", "--model", "resnet", "--lr", "0.01", "--steps", "3"]
    result = CliRunner().invoke(cli, ["--debug", *args])
    from perturb.errors import ModelSpecError

    assert isinstance(result.exception, ModelSpecError)
    assert result.exit_code == 1


def test_an_unexpected_exception_is_one_internal_error_line(monkeypatch):
    monkeypatch.setattr("perturb.cli.series_report", _raise(RuntimeError("boom\nsecond line")))
    result = CliRunner().invoke(cli, ["series", "--order", "1"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "internal error: RuntimeError: boom second line (rerun with --debug for the traceback)"
    ]
    debug = CliRunner().invoke(cli, ["--debug", "series", "--order", "1"])
    assert isinstance(debug.exception, RuntimeError) and debug.exit_code == 1


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (FileNotFoundError("no such file 'x.pt'"), "error: no such file 'x.pt'"),
        (TypeError("lr must be a number"), "error: lr must be a number"),
        (EOFError("Ran out of input"), "error: could not read an input file (EOFError: Ran"),
    ],
)
def test_input_errors_from_the_library_are_status_2(monkeypatch, error, fragment):
    monkeypatch.setattr("perturb.cli.series_report", _raise(error))
    result = CliRunner().invoke(cli, ["series", "--order", "1"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(fragment)


def test_torch_deprecation_warnings_are_hidden_and_others_are_not(monkeypatch):
    def noisy(*args, **kwargs):
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch.", DeprecationWarning, stacklevel=1
        )
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch.", FutureWarning, stacklevel=1
        )
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
        return "report"

    monkeypatch.setattr("perturb.cli.series_report", noisy)
    for args, expected in (([], 1), (["--debug"], 3)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(cli, [*args, "series", "--order", "1"])
        assert result.exit_code == 0, result.output
        assert len(caught) == expected, [str(w.message) for w in caught]
        assert "a warning of our own" in {str(w.message) for w in caught}


# ------------------------------------------------------------------------ start-up

_SCRIPT = shutil.which("perturb", path=str(Path(sys.executable).parent)) or shutil.which("perturb")


#: Most modules a fast start may import: ~125 (the standard library's, click's, perturb's
#: command line) measured; numpy alone adds ~140, sympy ~600, torch ~1,100.
_FAST_START_MODULES = 200


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def _imported(importtime_log: str) -> set[str]:
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"imported package"}


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([sys.executable, "-X", "importtime", "-m", "perturb"], id="python -m perturb"),
        pytest.param([sys.executable, "-X", "importtime", _SCRIPT or "perturb"], id="perturb"),
    ],
)
@pytest.mark.parametrize(
    "args", [["--help"], ["series", "--order", "-1"], ["predict", "--lr", "0"]]
)
def test_help_and_argument_errors_start_fast_without_torch_or_sympy(command, args):
    if _SCRIPT is None and "-m" not in command:
        pytest.skip("the perturb script is not installed")
    done = _run([*command, *args])
    assert done.returncode == (0 if args == ["--help"] else 2), done.stderr[-2000:]
    modules = _imported(done.stderr)
    assert "perturb.cli" in modules
    assert not {"torch", "sympy", "numpy"} & modules
    assert len(modules) < _FAST_START_MODULES, len(modules)  # counted work, not seconds


def test_python_dash_m_perturb_runs_the_command_line():
    done = _run([sys.executable, "-m", "perturb", "series", "--order", "1", "-B", "1"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "E[test loss] for online SGD (T steps, batch 1), to order η^1:",
        "η^0: (1)·l",
        "η^1: (-T)·G·G",
    ]


def test_series_order_20_is_refused_before_any_work(monkeypatch):
    """The refusal comes from the estimate alone: no series is built, and no tree of more
    than ``EXACT_ORDERS + 1`` nodes is enumerated (counted, not timed)."""
    done = _run([sys.executable, "-m", "perturb", "series", "--order", "20"])
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {_refusal_of_order_20()}"]
    from perturb.symbolic import cost, diagrams

    sizes: list[int] = []

    def counted(nodes):
        sizes.append(nodes)
        return diagrams.rooted_trees(nodes)

    monkeypatch.setattr(cost, "rooted_trees", counted)
    monkeypatch.setattr("perturb.cli.series_report", _raise(AssertionError("built the series")))
    cost.labellings.cache_clear()
    result = CliRunner().invoke(cli, ["series", "--order", "20"])
    cost.labellings.cache_clear()  # computed under the patch: leave no cache behind
    assert result.exit_code == 2 and _refusal_of_order_20() in " ".join(result.output.split())
    assert sizes and max(sizes) <= cost.EXACT_ORDERS + 1
