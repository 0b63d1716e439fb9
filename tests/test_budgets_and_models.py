"""Runaway jobs refused before they start; models and files checked at the door (issue 29).

Budget rows assert that nothing was measured or run (the measuring and stepping functions
are replaced by ones that fail), never on wall clock.  Every refusal is one line on stderr
with status 2 on the command line, and a typed error naming the option in Python.
"""

from __future__ import annotations

import dataclasses
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import perturb.experiments.simulation_setup as sampling
from perturb.cli import cli
from perturb.errors import BudgetError, DataError, ModelSpecError
from perturb.experiments.data import load_dataset
from perturb.experiments.pipeline import build, load_population, run_trials
from perturb.experiments.simulation import model_loss, simulate
from perturb.experiments.simulation_cost import (
    GROUP_BYTES,
    TrialsEstimate,
    check_trials,
    estimate_trials,
)
from perturb.experiments.simulation_setup import PairIndex, make_setup, trial_indices
from perturb.numeric.adapters import FrozenParametersWarning, flat_loss, trainable_parameters
from perturb.numeric.measuring import measure
from perturb.symbolic.schedules import GD, Epochs, Online

pytestmark = pytest.mark.usefixtures("one_thread")


def _fail(what: str):
    def boom(*args, **kwargs):
        raise AssertionError(f"{what} started")

    return boom


def _one_error_line(result, fragment: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0] == result.stderr.splitlines()[-1], result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------- budgets, CLI

BUDGET_CASES = [
    pytest.param(["validate", "--steps", "200000"], "--force", id="steps-200000"),
    pytest.param(["validate", "--trials", "2000000"], "--force", id="trials-2000000"),
    pytest.param(
        ["validate", "--schedule", "epochs", "--train-size", "100", "--epochs", "10000000"],
        "--force",
        id="epochs-10000000",
    ),
    pytest.param(["compare", "--trials", "2000000"], "--force", id="compare-trials"),
    pytest.param(["validate", "--max-memory", "0.001"], "--max-memory", id="max-memory"),
]


@pytest.mark.parametrize(("args", "fragment"), BUDGET_CASES)
def test_runaway_trials_are_refused_before_anything_is_measured(
    monkeypatch, tmp_path, args, fragment
):
    for module in ("validation", "comparison"):
        monkeypatch.setattr(f"perturb.experiments.{module}.measure_at_start", _fail("measuring"))
    monkeypatch.setattr("perturb.experiments.sgd_step.run_trials", _fail("SGD"))
    result = CliRunner().invoke(cli, [*args, "--population", "16", "--out", str(tmp_path / "o")])
    line = _one_error_line(result, fragment)
    assert "the SGD trials would take" in line and " s, ~" in line  # the estimate
    assert not (tmp_path / "o").exists()


def test_force_lifts_the_bound_and_the_trials_run(monkeypatch):
    setup = build("mlp", load_population("digits", population=8, seed=0), seed=0)
    run = run_trials(setup, Online(steps=2, batch_size=1), lrs=[0.1], trials=2, seed=0,
                     record=1, max_memory=1, force=True)  # fmt: skip
    assert run.test_loss.shape == (1, 2) and np.isfinite(run.test_loss).all()
    with pytest.raises(BudgetError, match="max_memory=bytes"):
        run_trials(setup, Online(steps=2, batch_size=1), lrs=[0.1], trials=2, seed=0,
                   record=1, max_memory=1)  # fmt: skip


def test_simulate_refuses_before_a_step(monkeypatch):
    monkeypatch.setattr("perturb.experiments.simulation.run_trials", _fail("SGD"))
    x = torch.zeros(8, 3)
    with pytest.raises(BudgetError, match=r"force=True") as refused:
        simulate(lambda t, xb, yb: xb @ t, torch.zeros(3), (x, torch.zeros(8)),
                 Online(steps=10**9, batch_size=1), lr=0.1, trials=4)  # fmt: skip
    assert "4 runs of 1000000000 steps" in str(refused.value)


def test_estimate_chunks_groups_that_would_not_fit():
    data = (torch.zeros(64, 300), torch.zeros(64))
    s = make_setup(lambda t, x, y: x @ t[:300], torch.zeros(10**5), data,
                   Online(steps=10, batch_size=1), lr=[0.1, 0.2], trials=4000)  # fmt: skip
    e = estimate_trials(s)
    assert e.pairs == 8000 and e.group < e.pairs and e.group % 2 == 0
    per_pair = 8 * (6 * 10**5 + 8 * 300)  # float64 parameters and gathered batches
    assert e.group * per_pair <= GROUP_BYTES < (e.group + 2) * per_pair
    assert e.memory_bytes > e.group * per_pair
    check_trials(TrialsEstimate(1, 1, 1, 1, 1.0, 10), max_memory=100)
    with pytest.raises(ValueError, match="max_memory must be a positive number"):
        check_trials(e, max_memory=-1)


# ------------------------------------------------------- samples: once, in chunks


SCHEDULES = [
    Online(steps=9, batch_size=3),
    Epochs(train_size=6, batch_size=2, epochs=4),
    Epochs(train_size=6, batch_size=3, epochs=3, shuffle=True),
    Epochs(train_size=6, batch_size=3, epochs=1, shuffle=True),
    GD(train_size=5, steps=4),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name + str(s.shuffle))
def test_pair_index_draws_what_trial_indices_draws_in_small_chunks(monkeypatch, schedule):
    monkeypatch.setattr(sampling, "INDEX_BUDGET", 5)
    index = PairIndex(schedule, 11, seed=4, trials=[7, 2, 7, 2], device=torch.device("cpu"))
    steps = int(schedule.steps)
    got = torch.stack([index.batch(t) for t in range(steps)], dim=1).numpy()
    held = index._chunk.shape[1] * 2 * int(schedule.batch_size)  # two distinct trials
    assert held <= max(5, 2 * int(schedule.batch_size))  # never the whole run
    for j, k in enumerate([7, 2, 7, 2]):
        train, batches = trial_indices(schedule, 11, seed=4, trial=k)
        np.testing.assert_array_equal(got[j], batches)
        pieces = [index[j, a : a + 4] for a in range(0, len(train), 4)]
        np.testing.assert_array_equal(torch.cat(pieces).numpy(), train)
    np.testing.assert_array_equal(
        index[:, 0:3].numpy()[1], trial_indices(schedule, 11, seed=4, trial=2)[0][:3]
    )
    with pytest.raises(ValueError, match="steps must be read in order"):
        index.batch(0)


def test_samples_are_drawn_once_per_trial_whatever_the_learning_rates(monkeypatch):
    drawn: list[tuple[int, int]] = []
    original = sampling._trial_rng

    def counted(seed, trial):
        drawn.append((seed, trial))
        return original(seed, trial)

    monkeypatch.setattr(sampling, "_trial_rng", counted)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    args = (lambda t, xb, yb: (xb @ t) ** 2, torch.ones(2), (x, torch.zeros(10)))
    for lrs in ([0.1], [0.1, 0.2, 0.3]):
        drawn.clear()
        simulate(*args, Epochs(train_size=4, batch_size=2, epochs=50), lr=lrs, trials=5)
        assert sorted(drawn) == [(0, k) for k in range(5)]


def test_results_do_not_depend_on_the_index_chunks(monkeypatch):
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    args = (lambda t, xb, yb: ((xb @ t - 1) ** 2), torch.zeros(2), (x, torch.zeros(300)),
            Online(steps=280, batch_size=1))  # fmt: skip
    whole = simulate(*args, lr=[0.01, 0.02], trials=3, record_every=70)
    monkeypatch.setattr(sampling, "INDEX_BUDGET", 7)
    monkeypatch.setattr("perturb.experiments.sgd_step._EVAL_BUDGET", 16)
    small = simulate(*args, lr=[0.01, 0.02], trials=3, record_every=70)
    for field in ("train_loss", "test_loss", "curve"):  # the same draws, sums in other pieces
        np.testing.assert_allclose(getattr(small, field), getattr(whole, field), rtol=1e-13)


# ------------------------------------------------------------------- measure / predict


def test_measure_order_5_is_refused_before_any_series(monkeypatch):
    monkeypatch.setattr("perturb.numeric.measuring.requested_contractions", _fail("series"))
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    with pytest.raises(BudgetError, match=r"order 5: .* s budget; pass force=True"):
        measure(net, data, order=5, progress=False)


def test_statistics_of_order_9_do_not_hang_predict(monkeypatch):
    f = lambda p, x: ((p - x) ** 2).sum() / 2  # noqa: E731
    stats = measure(f, torch.eye(2), torch.zeros(2), order=2, exact=True, progress=False)
    monkeypatch.setattr("perturb.numeric.statistics.series", _fail("series"))
    with pytest.raises(BudgetError, match=r"order 9: .* pass force=True or a lower order="):
        dataclasses.replace(stats, order=9).predict(Online(steps=2, batch_size=1), lr=0.1)


# ------------------------------------------------------------------- models at the door

FACTORIES = """
import torch
from torch import nn


def _net(input_shape, num_classes):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, num_classes))


class Noisy(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = _net(None, num_classes)

    def forward(self, x):
        return self.net(x) + 0.01 * torch.randn(x.shape[0], 1)


class Counter(Noisy):
    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.net(x)


class Item(Noisy):
    def forward(self, x):
        return self.net(x) * (1.0 if x.sum().item() > -1e9 else 2.0)


def double(input_shape, num_classes):
    return _net(input_shape, num_classes).double()


def half(input_shape, num_classes):
    return _net(input_shape, num_classes).half()


def bf16(input_shape, num_classes):
    return _net(input_shape, num_classes).to(torch.bfloat16)


def frozen(input_shape, num_classes):
    net = _net(input_shape, num_classes)
    net[1].weight.requires_grad_(False)
    return net


def noisy(input_shape, num_classes):
    return Noisy(num_classes)


def counter(input_shape, num_classes):
    return Counter(num_classes)


def item(input_shape, num_classes):
    return Item(num_classes)
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "door_models.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("door_models")


VALIDATE = ["validate", "--steps", "2", "--trials", "2", "--population", "8", "--lr", "0.01",
            "--records", "1", "--no-resummed", "--no-gap", "--orders", "1"]  # fmt: skip
PREDICT = ["predict", "--steps", "2", "--lr", "0.01", "--samples", "8", "--exact", "--order", "1"]

BAD_MODELS = [
    pytest.param("half", "model.float()", id="half"),
    pytest.param("bf16", "bfloat16", id="bf16"),
    pytest.param("noisy", "your model's forward", id="random"),
    pytest.param("counter", "your model's forward", id="buffer"),
    pytest.param("item", "your model's forward", id="item"),
]


@pytest.mark.parametrize(("factory", "fragment"), BAD_MODELS)
@pytest.mark.parametrize("command", [VALIDATE, PREDICT], ids=["validate", "predict"])
def test_bad_models_are_one_clear_line(factories, tmp_path, command, factory, fragment):
    args = [*command, "--model", f"door_models:{factory}"]
    if command is VALIDATE:
        args += ["--out", str(tmp_path / "out")]
    _one_error_line(CliRunner().invoke(cli, args), fragment)


@pytest.mark.parametrize("factory", ["double", "frozen"])
@pytest.mark.parametrize("command", [VALIDATE, PREDICT], ids=["validate", "predict"])
def test_float64_and_frozen_models_run_every_command(factories, tmp_path, command, factory):
    args = [*command, "--model", f"door_models:{factory}"]
    if command is VALIDATE:
        args += ["--out", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    frozen = [w for w in caught if issubclass(w.category, FrozenParametersWarning)]
    assert bool(frozen) == (factory == "frozen")
    assert all("(384 of 460 numbers)" in str(w.message) for w in frozen)


def test_only_parameters_that_require_grad_are_theta(factories):
    net = factories.frozen(None, 3)
    net.register_parameter("steps", nn.Parameter(torch.tensor([1, 2]), requires_grad=False))
    with pytest.warns(FrozenParametersWarning, match=r"2 of 5 parameter tensors \(386 of 413"):
        fn, theta0 = flat_loss(net)
    assert theta0.numel() == 6 + 18 + 3 and fn.size == 27
    with pytest.warns(FrozenParametersWarning):
        loss_fn, theta = model_loss(net)
    assert torch.equal(theta, theta0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    np.testing.assert_allclose(
        loss_fn(theta, x, y).detach().numpy(),
        nn.functional.cross_entropy(net(x), y, reduction="none").detach().numpy(),
    )
    for p in net.parameters():
        p.requires_grad_(False) if p.is_floating_point() else None
    with pytest.raises(ModelSpecError, match="no parameters that require grad"):
        trainable_parameters(net)


def test_float64_module_through_the_python_api(factories):
    net = factories.double(None, 10)
    data = load_population("digits", population=8, seed=0)
    setup = build(net, data, seed=0)
    assert setup.x.dtype == torch.float64
    run = run_trials(setup, Online(steps=2, batch_size=1), lrs=[0.1], trials=2, seed=0, record=1)
    assert np.isfinite(run.test_loss).all()
    stats = measure(net, (data.x, data.y), order=1, exact=True, progress=False)
    assert stats.parameters == 64 * 6 + 6 + 6 * 10 + 10


@pytest.mark.parametrize("factory", ["noisy", "counter", "item"])
def test_impure_forwards_are_refused_by_the_api(factories, factory):
    net = getattr(factories, factory)(None, 10)
    data = load_population("digits", population=8, seed=0)
    with pytest.raises(ModelSpecError, match="your model's forward"):
        build(net, data, seed=0)
    with pytest.raises(ModelSpecError, match="your model's forward"):
        measure(net, (data.x, data.y), order=1, exact=True, progress=False)
    if factory == "counter":
        assert float(net.calls) == 0  # the probe left the buffer as it was


# ------------------------------------------------------------------- data at the door


def _save(path: Path, y: np.ndarray) -> str:
    np.savez(path, x=np.zeros((len(y), 1, 2, 2), np.float32), y=y)
    return f"npz:{path}"


def test_npz_with_one_row_or_one_class_warns(tmp_path):
    with pytest.warns(UserWarning, match="has one row") as caught:
        load_dataset(_save(tmp_path / "one.npz", np.zeros(1, np.int64)))
    assert any("has one class (label 0)" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(_save(tmp_path / "two.npz", np.array([0, 1, 1])))


def test_npz_labels_implying_far_more_classes_are_refused(tmp_path):
    y = np.zeros(40, np.int64)
    y[0] = 10**7
    spec = _save(tmp_path / "sparse.npz", y)
    with pytest.raises(DataError, match=r"labels up to 10000000 imply .* allow_sparse_labels"):
        load_dataset(spec)
    result = CliRunner().invoke(cli, [*PREDICT, "--model", "mlp", "--dataset", spec])
    _one_error_line(result, "only 2 distinct labels occur")
    small = y.copy()
    small[0] = 250  # 251 classes > 100 × 2
    assert load_dataset(_save(tmp_path / "ok.npz", small), allow_sparse_labels=True).num_classes
    with pytest.raises(DataError):
        load_dataset(_save(tmp_path / "no.npz", small))
