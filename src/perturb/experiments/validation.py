"""Validation: predicted test loss against the mean of many real SGD runs.

The setting is the theory's own, with nothing left to estimate: the *population*
is a fixed set of ``n`` labelled images; SGD draws its samples from it uniformly
with replacement (online SGD: fresh samples every step; multi-epoch SGD and GD: a
training set of ``N`` iid draws, walked in batches), and the test loss is the mean
loss over the population, so the diagram values measured exactly over the
population at ``θ_0`` (:func:`perturb.numeric.measuring.measure` with ``exact=True``) give the
exact coefficients of the η-series of ``E[test loss]``.  Each predictor is evaluated
at every learning rate and at every recorded step ``t``; the actual value is the mean
of ``K`` vectorized SGD trials (:func:`perturb.experiments.simulation.simulate`) with a 95%
t-interval.  The generalization gap ``E[test − train]`` after the last step is
predicted through ``η²`` and compared with the mean of the trials' own gaps.

Predictors, all from statistics at ``θ_0``:

* ``order d``: the un-resummed series through ``η^d``;
* ``resummed 2``: the re-summed diagrams with up to two edges (edges carry
  ``η(I − ηH)^{Δt−1}``), exact through a full eigendecomposition of ``H``
  (models with a few thousand parameters);
* ``ODE``: the noiseless diagrams (every part a single node) through the highest
  order;
* ``SDE``: the diffusion with statistics frozen at ``θ_0``, integrated from its
  moment equations (:mod:`perturb.experiments.baselines`; not for GD, which has no per-step
  noise).

Predictors that need the materialized Hessian (SDE, re-summed) are skipped, with the
reason in the result, for models with more than a few thousand parameters.

For each predictor the report gives its error in units of the interval's half-width
and the smallest ``ηt`` at which it leaves the interval.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perturb.symbolic.options import describe
from perturb.experiments.baselines import (
    QuadraticModel,
    mean_hessian,
    per_sample_derivatives,
    sde_test_loss,
)
from perturb.experiments.data import load_dataset
from perturb.experiments.models import build_model
from perturb.experiments.simulation import model_loss, simulate
from perturb.numeric.distributed import is_main
from perturb.numeric.measuring import contraction_value, measure
from perturb.numeric.resummation import resummed_values
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import GD, Epochs, Online, Schedule
from perturb.symbolic.series import series

__all__ = ["ValidationResult", "validate"]

DEFAULT_LRS = (0.002, 0.005, 0.01, 0.02, 0.05)
SCHEDULE_NAMES = ("online", "epochs", "gd")


@dataclass
class ValidationResult:
    """Everything a validation run produced.

    Attributes:
        config: the settings of the run (``schedule`` and ``description`` name the
            schedule that ran; ``unavailable`` maps predictors that do not apply to it
            to the reason).
        rows: one record per (learning rate, recorded step): ``lr``, ``steps``,
            ``eta_t``, ``actual``, ``ci_low``, ``ci_high``, ``divergent`` (whether any
            trial of this learning rate diverged), ``divergent_trials``, and for each
            predictor its ``value`` and ``error_ci`` (error over the interval's
            half-width).  ``actual`` and the interval are over the finite trials only;
            rows of a divergent learning rate are reported as divergent and left out
            of :attr:`breakdown`.
        breakdown: per predictor, the smallest ``ηt`` from which on it stays outside
            the interval at every later recorded step of that learning rate (``None``
            if never): a single excursion, expected for 5% of the rows from sampling
            alone, does not count.
        gap: one record per learning rate for the generalization gap ``test − train``
            after ``T`` steps: ``actual`` with ``ci_low``/``ci_high`` (paired
            t-interval over the finite trials), the ``order 1`` and ``order 2``
            predictions, ``error_ci`` of order 2, ``divergent``, ``divergent_trials``
            (empty when the gap was not requested).
        timings: seconds spent measuring, simulating and predicting.
    """

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, float | None] = field(default_factory=dict)
    gap: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def predictors(self) -> list[str]:
        """Names of the predictors, in report order."""
        return list(self.breakdown)

    def table(self) -> str:
        """A plain-text report: the schedule, one line per (η, t), the gap table."""
        names = self.predictors
        lines = [f"{self.config.get('description', self.config.get('schedule', ''))}:"]
        head = f"{'η':>7} {'t':>5} {'ηt':>6} {'SGD mean ± 95% CI':>22} " + " ".join(
            f"{n:>16}" for n in names
        )
        lines += [head, "-" * len(head)]
        for r in self.rows:
            cells = []
            for n in names:
                v, e = r["predictions"][n]["value"], r["predictions"][n]["error_ci"]
                cells.append(_cell(v, e, r["divergent"]))
            lines.append(
                f"{r['lr']:7.4f} {r['steps']:5d} {r['eta_t']:6.3f} {_actual(r, self.config):>22} "
                + " ".join(cells)
            )
        lines.append("")
        lines.append("(error) = (prediction − SGD mean) / CI half-width; |error| > 1: outside.")
        for n in names:
            where = self.breakdown[n]
            lines.append(
                f"{n:>12}: "
                + (
                    "never leaves the interval for good"
                    if where is None
                    else f"leaves the interval for good at ηt = {where:g}"
                )
            )
        for n, why in self.config.get("unavailable", {}).items():
            lines.append(f"{n:>12}: not available ({why})")
        if self.gap:
            lines += [
                "",
                f"generalization gap (test − train loss) after T = {self.gap[0]['steps']} steps:",
                f"{'η':>7} {'ηT':>6} {'SGD mean ± 95% CI':>22} {'order 1':>10} {'order 2':>16}",
            ]
            for g in self.gap:
                lines.append(
                    f"{g['lr']:7.4f} {g['eta_t']:6.3f} {_actual(g, self.config):>22} "
                    f"{g['order 1']:10.5f} {_cell(g['order 2'], g['error_ci'], g['divergent'])}"
                )
        return "\n".join(lines)

    def to_json(self) -> str:
        """The whole result as strict JSON (``NaN`` and infinities become ``null``)."""
        return json.dumps(
            _finite(
                {
                    "config": self.config,
                    "rows": self.rows,
                    "breakdown": self.breakdown,
                    "gap": self.gap,
                    "timings": self.timings,
                }
            ),
            indent=2,
            allow_nan=False,
        )


def _cell(value: float, error: float, divergent: bool) -> str:
    if not math.isfinite(value):
        return f"{'nan':>16}"
    if divergent or not math.isfinite(error):
        return f"{value:9.5f} ( n/a)"
    return f"{value:9.5f} ({error:+5.1f})"


def _actual(row: dict[str, Any], config: dict[str, Any]) -> str:
    if row["divergent"]:
        return f"divergent {row['divergent_trials']}/{config['trials']}"
    half = (row["ci_high"] - row["ci_low"]) / 2
    return f"{row['actual']:.5f} ± {half:.5f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def validate(
    *,
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    model: str = "smooth-convnet",
    lrs: tuple[float, ...] = DEFAULT_LRS,
    schedule: str = "online",
    steps: int | None = None,
    batch_size: int | None = None,
    train_size: int | None = None,
    epochs: int | None = None,
    shuffle: bool = False,
    trials: int = 256,
    orders: tuple[int, ...] = (0, 1, 2, 3),
    resummed: bool = True,
    gap: bool = True,
    seed: int = 0,
    population: int = 256,
    records: int = 5,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = True,
    max_hessian_parameters: int = 4000,
    max_per_sample_hessians: float = 5e7,
) -> ValidationResult:
    """Predict SGD's test loss and generalization gap; compare with ``trials`` real runs.

    The schedule is one of the engine's (:mod:`perturb.symbolic.schedules`):

    * ``"online"``: ``T = steps`` steps on fresh batches of ``B`` iid draws;
    * ``"epochs"``: ``E = epochs`` passes over a training set of ``N = train_size``
      iid draws in ``N/B`` batches of ``B``, in a fixed order or reshuffled each epoch
      (``shuffle``), ``T = E·N/B`` steps; the recorded steps are ends of epochs;
    * ``"gd"``: ``T = steps`` full-batch steps on a training set of ``N`` iid draws.

    Every predictor is evaluated for the schedule cut at each recorded step ``t``
    (the first ``t`` steps of a run are a run of that shorter schedule).  The SDE
    models fresh samples every step (``dθ = −∇l dt + sqrt(η/B) C^{1/2} dW``), so it is
    not available for GD, whose only noise is the draw of the training set; the
    re-summed series exists for online SGD and GD only (:mod:`perturb.symbolic.resummed`).
    Predictors that do not apply are listed in ``config["unavailable"]`` with the
    reason.

    The generalization gap ``test − train`` after ``T`` steps (train: the mean loss
    on the trial's own ``N`` training points, ``N = T·B`` for online SGD) is
    predicted by the engine's ``"gap"`` series through ``η²`` and compared with the
    mean of the per-trial differences (a paired 95% t-interval).

    Args:
        dataset: ``"digits"`` (built in), ``"fashion-mnist"``, ``"cifar10"`` or
            ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits).
        model: ``"smooth-convnet"``, ``"mlp"`` or ``"pkg.module:factory"``.
        lrs: learning rates.
        schedule: ``"online"``, ``"epochs"`` or ``"gd"``.
        steps: ``T`` (online, gd); default 100.
        batch_size: ``B`` (online, epochs); default 1.
        train_size: ``N`` (epochs, gd; required there).
        epochs: ``E`` (epochs); default 1.
        shuffle: reshuffle the training set before each epoch (epochs).
        trials: ``K`` SGD runs per learning rate.
        orders: orders of the un-resummed series to report.
        resummed: also report the re-summed prediction with up to two edges.
        gap: also predict and simulate the generalization gap (order 2).
        seed: seed of the model's initialization, the population subset and the trials.
        population: number of images in the population (a deterministic subset).
        records: number of recorded steps (evenly spaced, ending at ``T``; for
            ``"epochs"``, evenly spaced ends of epochs).
        device: ``"cpu"`` or ``"cuda"``.
        out: folder for ``results.json``, ``results.csv``, ``gap.csv`` and PNG plots.
        progress: show progress bars.
        max_hessian_parameters: largest model for the predictors that materialize
            the Hessian (SDE and re-summed; it takes ``P`` Hessian-vector products
            and ``P²`` numbers).
        max_per_sample_hessians: largest ``n·P²`` for which the re-summed GD series
            (whose parts pair a Hessian node with a gradient node on the same training
            point) materializes the per-sample Hessians.

    Returns:
        A :class:`ValidationResult`.

    Raises:
        ValueError: bad sizes, options the schedule does not take, or a missing
            ``train_size``.
        perturb.data.DataError: unknown dataset, missing or corrupt files.

    Example:
        >>> r = validate(lrs=(0.01,), steps=4, trials=8, orders=(0, 1), population=16,
        ...              records=1, progress=False, resummed=False, gap=False)
        >>> sorted(r.breakdown)
        ['ODE', 'SDE', 'order 0', 'order 1']
        >>> r.config["schedule"]
        'online'
    """
    full, record_steps, cut = _schedule(
        schedule,
        steps=steps,
        batch_size=batch_size,
        train_size=train_size,
        epochs=epochs,
        shuffle=shuffle,
        records=records,
    )
    _check(lrs=lrs, trials=trials, orders=orders, population=population, records=records)
    config = {
        "dataset": dataset,
        "model": model,
        "lrs": list(lrs),
        "schedule": schedule,
        "description": describe(full),
        "steps": int(full.steps),
        "batch_size": int(full.batch_size),
        "train_size": None if schedule == "online" else int(full.train_size),
        "epochs": int(full.epochs) if schedule == "epochs" else None,
        "shuffle": bool(shuffle),
        "trials": trials,
        "orders": list(orders),
        "resummed": resummed,
        "gap": gap,
        "seed": seed,
        "population": population,
        "device": device,
        "unavailable": {},
    }
    timings: dict[str, float] = {}
    data = load_dataset(dataset, data_dir=data_dir, split="train")
    if population < len(data):
        data = data.subset(population, seed=seed)
    x, y = data.x.to(device), data.y.to(device)
    net = build_model(model, data.input_shape, data.num_classes, seed=seed).to(device)
    loss_fn, theta0 = model_loss(net)
    config["parameters"] = int(theta0.numel())
    config["population"] = int(x.shape[0])

    start = time.perf_counter()
    top = max(orders)
    stats = measure(
        net,
        (x, y),
        order=top,
        schedules=[cut(s) for s in record_steps],
        quantities=("test",),
        exact=True,
        dtype=torch.float32,
        progress=progress,
    )
    gap_by_order = _gap_by_order(stats, net, (x, y), full, lrs) if gap else None
    timings["measure_s"] = time.perf_counter() - start

    start = time.perf_counter()
    trials_out = simulate(
        loss_fn,
        theta0,
        (x, y),
        full,
        lr=list(lrs),
        trials=trials,
        seed=seed,
        record_every=_record_every(record_steps),
        device=device,
        dtype=torch.float32,
        progress=progress,
    )
    timings["simulate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if x.device.type != "cpu":  # the Hessian-based predictors below run on the CPU
        loss_fn, theta0 = model_loss(copy.deepcopy(net).cpu())
        x, y = x.cpu(), y.cpu()
    theta64 = theta0.detach().to(torch.float64)
    x64 = x.to(torch.float64)
    derivs = per_sample_derivatives(loss_fn, theta64, x64, y)
    unavailable = config["unavailable"]
    too_big = theta0.numel() > max_hessian_parameters
    if too_big:
        why = (
            f"needs the materialized Hessian: {theta0.numel()} parameters > "
            f"max_hessian_parameters = {max_hessian_parameters}"
        )
        unavailable["SDE"] = why
        if resummed:
            unavailable["resummed 2"] = why
    else:
        hess = mean_hessian(loss_fn, theta0.detach().float(), x.float(), y).to(torch.float64)
        quad = QuadraticModel.from_derivatives(derivs, hess)
        eigh = quad.eig  # one eigendecomposition of H for the SDE and the re-summed series
    if schedule == "gd":
        unavailable["SDE"] = (
            "the SDE models fresh samples every step; GD's only noise is the draw of "
            "its training set"
        )
    if resummed and not too_big:
        try:
            needs = _per_sample_orders(resummed_terms(2, full))
        except ValueError as err:
            unavailable["resummed 2"] = str(err)
        else:
            if 2 in needs:  # GD: a part {H-node, G-node} shares a training point
                size = x.shape[0] * theta0.numel() ** 2
                if size > max_per_sample_hessians:
                    unavailable["resummed 2"] = (
                        f"needs per-sample Hessians (n·P² = {size:.3g} numbers > "
                        f"max_per_sample_hessians = {max_per_sample_hessians:.3g})"
                    )
                else:
                    derivs[2] = _per_sample_hessians(loss_fn, theta64, x64, y)
    predictions: dict[str, dict[int, np.ndarray]] = {}
    for s in record_steps:
        sched = cut(s)
        pred = stats.predict(sched, lr=list(lrs), quantity="test", order=top)
        cumulative = np.cumsum(pred.by_order, axis=1)
        for d in orders:
            predictions.setdefault(f"order {d}", {})[s] = cumulative[:, d]
        predictions.setdefault("ODE", {})[s] = _ode(stats, sched, lrs, top)
        if "SDE" not in unavailable:
            predictions.setdefault("SDE", {})[s] = np.array(
                [
                    float(sde_test_loss(quad, lr=lr, steps=s, batch_size=int(sched.batch_size)))
                    for lr in lrs
                ]
            )
        if resummed and "resummed 2" not in unavailable:
            terms = resummed_terms(2, sched)
            predictions.setdefault("resummed 2", {})[s] = np.array(
                [
                    float(
                        sum(
                            resummed_values(
                                terms,
                                derivs,
                                lr=lr,
                                steps=s,
                                schedule=sched,
                                means={2: hess},
                                eigh=eigh,
                            )
                        )
                    )
                    for lr in lrs
                ]
            )
    timings["predict_s"] = time.perf_counter() - start

    result = ValidationResult(config=config, timings=timings)
    _compare(result, trials_out, predictions, lrs, record_steps)
    if gap_by_order is not None:
        result.gap = _gap_rows(trials_out, gap_by_order, int(full.steps))
    if out is not None and is_main():  # under torchrun only rank 0 writes
        write_outputs(result, Path(out))
    return result


def _schedule(
    name: str,
    *,
    steps: int | None,
    batch_size: int | None,
    train_size: int | None,
    epochs: int | None,
    shuffle: bool,
    records: int,
) -> tuple[Schedule, list[int], Callable[[int], Schedule]]:
    """The full schedule, the recorded steps, and the schedule cut at a recorded step."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {name!r}")
    for what, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("train_size", train_size),
        ("epochs", epochs),
        ("records", records),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    takes = {
        "online": ("steps", "batch_size"),
        "epochs": ("batch_size", "train_size", "epochs", "shuffle"),
        "gd": ("steps", "train_size"),
    }[name]
    given = {
        "steps": steps is not None,
        "batch_size": batch_size is not None,
        "train_size": train_size is not None,
        "epochs": epochs is not None,
        "shuffle": bool(shuffle),
    }
    for what, used in given.items():
        if used and what not in takes:
            raise ValueError(
                f"{what} does not apply to schedule {name!r} (it takes {', '.join(takes)})"
            )
    if name != "online" and train_size is None:
        raise ValueError(f"schedule {name!r} needs train_size (N, the training set size)")
    if name == "epochs":
        b, e = batch_size or 1, epochs or 1
        if train_size % b:
            raise ValueError(
                f"batch_size must divide train_size, got batch size {b} and train size {train_size}"
            )
        m = train_size // b
        ends = sorted({max(1, round(e * (i + 1) / records)) for i in range(records)})

        def cut(s: int) -> Schedule:
            return Epochs(train_size=train_size, batch_size=b, epochs=s // m, shuffle=shuffle)

        return cut(e * m), [k * m for k in ends], cut
    t = steps or 100
    record_steps = sorted({max(1, round(t * (i + 1) / records)) for i in range(records)})
    if name == "gd":

        def cut(s: int) -> Schedule:
            return GD(train_size=train_size, steps=s)

    else:
        b = batch_size or 1

        def cut(s: int) -> Schedule:
            return Online(steps=s, batch_size=b)

    return cut(t), record_steps, cut


def _gap_by_order(stats, net, data, schedule: Schedule, lrs) -> np.ndarray:
    """The ``η^0, η^1, η^2`` terms of ``E[test − train]``, shape ``(L, 3)``.

    Contractions the test-loss statistics hold are reused (``tr(C H)`` is the costly
    one); the others (train-rooted joint cumulants) are measured exactly here.
    """
    by_order = np.zeros((len(lrs), 3))
    eta = np.asarray(lrs, dtype=float)
    for term in series(2, schedule, "gap").terms:
        if term.contraction in stats:
            value = float(stats.value(term.contraction))
        else:
            value = float(contraction_value(term.contraction, net, data, dtype=torch.float32))
        by_order[:, term.power] += float(term.coefficient) * value * eta**term.power
    return by_order


def _gap_rows(trials, by_order_all: np.ndarray, steps: int) -> list[dict[str, Any]]:
    """Simulated gap (paired t-interval of test − train) against the order-2 prediction."""
    from scipy import stats as st

    rows = []
    for li in range(len(trials.lrs)):
        diff = trials.test_loss[li] - trials.train_loss[li]
        diff = diff[np.isfinite(diff)]
        n = diff.size
        mean = float(diff.mean()) if n else float("nan")
        half = (
            float(st.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n))
            if n > 1
            else float("nan")
        )
        by_order = np.cumsum(by_order_all[li])
        value = float(by_order[2])
        row = _row(trials, li, steps, mean, half)
        row["order 1"], row["order 2"] = float(by_order[1]), value
        row["error_ci"] = (value - mean) / half if half > 0 else float("nan")
        rows.append(row)
    return rows


def _row(trials, li: int, steps: int, mean: float, half: float) -> dict[str, Any]:
    """The fields every row has: where, the SGD mean and its interval, divergence."""
    lr = float(trials.lrs[li])
    return {
        "lr": lr,
        "steps": int(steps),
        "eta_t": lr * steps,
        "actual": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "divergent": bool(trials.is_divergent[li]),
        "divergent_trials": int(trials.divergent[li]),
    }


def _per_sample_orders(terms) -> set[int]:
    """Derivative orders needed per sample: those of nodes sharing a part with another."""
    need = set()
    for term in terms:
        d = term.diagram
        for part in d.parts:
            if len(part) > 1:
                need.update(len(d.children[v]) + (v != 0) for v in part)
    return need


def _per_sample_hessians(loss_fn, theta: torch.Tensor, x, y) -> torch.Tensor:
    """``∇²l_i`` for every row, shape ``(n, P, P)`` (float64)."""

    def one(xi, yi):
        return torch.func.hessian(lambda p: loss_fn(p, xi[None], yi[None]).sum())(theta)

    return torch.stack([one(x[i], y[i]) for i in range(x.shape[0])])


def _record_every(record_steps: list[int]) -> int:
    every = record_steps[0]
    for s in record_steps:
        every = math.gcd(every, s)
    return every


def _ode(stats, sched, lrs, top: int) -> np.ndarray:
    """The noiseless (c = 0) diagrams: every part a single node."""
    s = series(top, sched, "test")
    total = np.zeros(len(lrs))
    for term in s.terms:
        if all(len(p) == 1 for p in term.contraction.tensors):
            value = stats.value(term.contraction)
            coef = float(term.coefficient)
            total += coef * value * np.asarray(lrs, dtype=float) ** term.power
    return total


def _compare(result: ValidationResult, trials, predictions, lrs, record_steps) -> None:
    means, sems = trials.curve_mean()
    steps_index = {s: i for i, s in enumerate(trials.steps)}
    from scipy import stats as st

    finite = trials.finite
    exits: dict[str, float | None] = {name: None for name in predictions}
    errors: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for li, lr in enumerate(lrs):
        for s in record_steps:
            k = steps_index[s]
            mean, sem = float(means[li, k]), float(sems[li, k])
            n = int(finite[li])
            half = float(st.t.ppf(0.975, max(n - 1, 1)) * sem) if n > 1 else float("nan")
            row = _row(trials, li, s, mean, half)
            row["predictions"] = {}
            for name, by_step in predictions.items():
                value = float(by_step[s][li])
                error = (value - mean) / half if half > 0 else float("nan")
                row["predictions"][name] = {"value": value, "error_ci": error}
                if not row["divergent"]:
                    errors.setdefault((name, li), []).append((lr * s, abs(error)))
            result.rows.append(row)
    result.rows.sort(key=lambda r: (r["lr"], r["steps"]))
    for (name, _), track in errors.items():
        # leaves for good: outside at this ηt and at every later recorded step of this η
        for i, (eta_t, _err) in enumerate(track):
            if all(e > 1 for _, e in track[i:]):
                prev = exits[name]
                exits[name] = eta_t if prev is None else min(prev, eta_t)
                break
    result.breakdown = exits


def write_outputs(result: ValidationResult, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.csv``, ``gap.csv`` and the plots into ``out``.

    Returns:
        The paths written.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv"]
    paths[0].write_text(result.to_json())
    names = result.predictors
    with paths[1].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["lr", "steps", "eta_t", "actual", "ci_low", "ci_high", "divergent"]
            + [f"{n}" for n in names]
            + [f"{n} error_ci" for n in names]
        )
        for r in result.rows:
            writer.writerow(
                [
                    r["lr"],
                    r["steps"],
                    r["eta_t"],
                    r["actual"],
                    r["ci_low"],
                    r["ci_high"],
                    r["divergent"],
                ]
                + [r["predictions"][n]["value"] for n in names]
                + [r["predictions"][n]["error_ci"] for n in names]
            )
    final = max(r["steps"] for r in result.rows)
    rows = [r for r in result.rows if r["steps"] == final]
    lr = np.array([r["lr"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        lr,
        [r["actual"] for r in rows],
        yerr=[(r["ci_high"] - r["ci_low"]) / 2 for r in rows],
        fmt="ko",
        capsize=3,
        label=f"SGD mean, {result.config['trials']} trials (95% CI)",
    )
    for n in names:
        ax.plot(lr, [r["predictions"][n]["value"] for r in rows], "-", marker=".", label=n)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    actual = [r["actual"] for r in rows if math.isfinite(r["actual"])]
    if actual:
        pad = max(3 * (max(actual) - min(actual)), 0.02)
        ax.set_ylim(min(actual) - pad, max(actual) + pad)  # predictions that blow up leave
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(f"test loss after T = {final} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "test_loss_vs_lr.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        pts = sorted((r["eta_t"], abs(r["predictions"][n]["error_ci"])) for r in result.rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ηt")
    ax.set_ylabel("|prediction − SGD mean| / CI half-width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "error_vs_eta_t.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if result.gap:
        paths += _write_gap(result, out, plt)
    return paths


def _write_gap(result: ValidationResult, out: Path, plt) -> list[Path]:
    keys = ["lr", "steps", "eta_t", "actual", "ci_low", "ci_high", "divergent"]
    keys += ["divergent_trials", "order 1", "order 2", "error_ci"]
    with (out / "gap.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for g in result.gap:
            writer.writerow([g[k] for k in keys])
    rows = [g for g in result.gap if not g["divergent"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        [g["lr"] for g in rows],
        [g["actual"] for g in rows],
        yerr=[(g["ci_high"] - g["ci_low"]) / 2 for g in rows],
        fmt="ko",
        capsize=3,
        label=f"SGD mean, {result.config['trials']} trials (95% CI)",
    )
    for name in ("order 1", "order 2"):
        ax.plot([g["lr"] for g in rows], [g[name] for g in rows], "-", marker=".", label=name)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(f"test − train loss after T = {result.gap[0]['steps']} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_lr.png", dpi=120)
    plt.close(fig)
    return [out / "gap.csv", out / "gap_vs_lr.png"]


def _check(*, lrs, trials, orders, population, records) -> None:
    if (
        isinstance(lrs, str | bytes)
        or not lrs
        or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
            for v in lrs
        )
    ):
        raise ValueError(f"lrs must be positive finite numbers, got {lrs!r}")
    for name, value in (("trials", trials), ("population", population), ("records", records)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if trials < 2:
        raise ValueError(f"trials must be at least 2 for a confidence interval, got {trials}")
    if not orders or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 4 for d in orders
    ):
        raise ValueError(f"orders must be integers in 0..4, got {orders!r}")
