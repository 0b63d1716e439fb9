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
* ``noiseless``: the noiseless diagrams (every part a single node, so no ``C`` or
  higher cumulant of the gradient noise) through the highest order: the η-series of
  GD-like SGD without noise (not gradient flow, :func:`perturb.compare`'s
  ``gradient flow``, which is the continuous-time limit on the quadratic model);
* ``SDE``: the diffusion with statistics frozen at ``θ_0``, integrated from its
  moment equations (:mod:`perturb.experiments.baselines`; not for GD, which has no per-step
  noise).

Predictors that need the materialized Hessian (SDE, re-summed) are skipped, with the
reason in the result, for models with more than a few thousand parameters.

Every run starts at the same ``θ_0``: the model's seeded initialization, or a
checkpoint, optionally after full-batch gradient descent on the population
(:func:`perturb.experiments.pipeline.start_point`); the loss and gradient norm there are
in ``config["start"]``.  For each predictor the report gives its error in units of the
interval's half-width and the smallest ``ηt`` at which it leaves the interval; a
prediction that blew up (not finite, or far outside what the loss can be,
:func:`perturb.experiments.pipeline.is_unstable`) is shown as ``unstable``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb.checks import check_int, check_lrs, check_orders
from perturb.experiments.baselines import sde_test_loss
from perturb.experiments.pipeline import (
    DEFAULT_PRETRAIN_LR,
    Quadratic,
    Setup,
    Start,
    ci_error,
    curve_intervals,
    cut,
    experiment_schedule,
    is_unstable,
    json_ready,
    load_population,
    measure_at_start,
    noiseless_prediction,
    per_sample_hessians,
    per_sample_orders,
    prediction_entry,
    quadratic_model,
    recorded_steps,
    resummed_prediction,
    run_trials,
    series_predictions,
    start_point,
    timed,
    unstable_growth,
)
from perturb.numeric.distributed import is_main
from perturb.numeric.intervals import mean_interval
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.measuring import contraction_value
from perturb.numeric.predictions import UNSTABLE_GROWTH, UnstableDirectionWarning
from perturb.symbolic.options import describe
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import series

__all__ = ["ValidationResult", "validate"]

DEFAULT_LRS = (0.002, 0.005, 0.01, 0.02, 0.05)
NOISELESS = "noiseless"
"""The noiseless predictor's name: the diagrams without gradient noise (no ``C`` terms)."""


@dataclass
class ValidationResult:
    """Everything a validation run produced.

    Attributes:
        config: the settings of the run (``schedule`` and ``description`` name the
            schedule that ran; ``unavailable`` maps predictors that do not apply to it
            to the reason; ``start`` holds ``loss`` ``l(θ_0)``, ``grad_norm`` ``‖G‖``,
            ``checkpoint``, ``pretrain_steps`` and ``pretrain_lr``).
        rows: one record per (learning rate, recorded step): ``lr``, ``steps``,
            ``eta_t``, ``actual``, ``ci_low``, ``ci_high``, ``divergent`` (whether any
            trial of this learning rate diverged), ``divergent_trials``, and for each
            predictor its ``value``, ``error_ci`` (error over the interval's
            half-width) and ``unstable`` (the value blew up: shown as ``unstable``,
            counted as outside).  ``actual`` and the interval are over the finite trials only;
            rows of a divergent learning rate are reported as divergent and left out
            of :attr:`breakdown`.
        breakdown: per predictor, the smallest ``ηt`` from which on it stays outside
            the interval at every later recorded step of that learning rate (``None``
            if never): a single excursion, expected for 5% of the rows from sampling
            alone, does not count.
        gap: one record per learning rate for the generalization gap ``test − train``
            after ``T`` steps: ``actual`` with ``ci_low``/``ci_high`` (paired
            t-interval over the finite trials), the ``order 1`` and ``order 2``
            predictions, ``error_ci`` of order 2, ``divergent``, ``divergent_trials``,
            ``order 1 unstable`` and ``order 2 unstable`` (empty when the gap was not
            requested).
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
        start = Start(**self.config["start"]) if "start" in self.config else None
        if start is not None and not start.is_default:
            lines.append(start.describe())
        head = f"{'η':>7} {'t':>5} {'ηt':>6} {'SGD mean ± 95% CI':>22} " + " ".join(
            f"{n:>16}" for n in names
        )
        lines += [head, "-" * len(head)]
        for r in self.rows:
            cells = []
            for n in names:
                p = r["predictions"][n]
                cells.append(_cell(p["value"], p["error_ci"], r["divergent"], p["unstable"]))
            where = f"{r['lr']:7.4f} {r['steps']:5d} {_eta_t(r['eta_t'])}"
            lines.append(f"{where} {_actual(r, self.config):>22} " + " ".join(cells))
        lines.append("")
        lines.append("(error) = (prediction − SGD mean) / CI half-width; |error| > 1: outside.")
        compared = any(not r["divergent"] for r in self.rows)
        for n in names:
            where = self.breakdown[n]
            if not compared:
                verdict = "not compared (trials diverged at every learning rate)"
            elif where is None:
                verdict = "never leaves the interval for good"
            else:
                verdict = f"leaves the interval for good at ηt = {where:g}"
            lines.append(f"{n:>12}: {verdict}")
        for n, why in self.config.get("unavailable", {}).items():
            lines.append(f"{n:>12}: not available ({why})")
        if "resummed_krylov" in self.config:
            info = self.config["resummed_krylov"]
            lines.append(
                f"{'resummed 2':>12}: in a Krylov subspace of H of rank {info['rank']} "
                f"(P = {info['parameters']}); rank k vs k/2 differ by up to "
                f"{info.get('error', math.nan):.3g}"
            )
        for n, info in self.config.get("unstable_directions", {}).items():
            lines.append(
                f"{n:>12}: warning: H has a negative eigenvalue (h_min = {info['h_min']:.3g}), "
                f"so K^T = (I − ηH)^T grows by up to e^{info['growth']:.3g} (max ηT·|h_min|): "
                "not a long-run prediction"
            )
        if self.gap:
            lines += [
                "",
                f"generalization gap (test − train loss) after T = {self.gap[0]['steps']} steps:",
                f"{'η':>7} {'ηT':>6} {'SGD mean ± 95% CI':>22} {'order 1':>10} {'order 2':>16}",
            ]
            for g in self.gap:
                first = "unstable" if g["order 1 unstable"] else f"{g['order 1']:10.5f}"
                second = _cell(g["order 2"], g["error_ci"], g["divergent"], g["order 2 unstable"])
                lines.append(
                    f"{g['lr']:7.4f} {_eta_t(g['eta_t'])} {_actual(g, self.config):>22} "
                    f"{first:>10} {second}"
                )
        return "\n".join(lines)

    def to_json(self) -> str:
        """The whole result as strict JSON (``NaN`` and infinities become ``null``)."""
        return json.dumps(
            json_ready(
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


def _eta_t(value: float) -> str:
    """``ηt`` in six characters: three decimals below 100, one up to 10⁴."""
    return f"{value:6.3f}" if value < 99.9995 else f"{value:6.1f}"


def _cell(value: float, error: float, divergent: bool, unstable: bool = False) -> str:
    if unstable or not math.isfinite(value):
        return f"{'unstable':>16}"
    if divergent or not math.isfinite(error):
        return f"{value:9.5f} ( n/a)"
    return f"{value:9.5f} ({error:+5.1f})"


def _actual(row: dict[str, Any], config: dict[str, Any]) -> str:
    if row["divergent"]:
        return f"divergent {row['divergent_trials']}/{config['trials']}"
    half = (row["ci_high"] - row["ci_low"]) / 2
    return f"{row['actual']:.5f} ± {half:.5f}"


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
    records_log: bool = False,
    checkpoint: str | Path | None = None,
    pretrain: int = 0,
    pretrain_lr: float = DEFAULT_PRETRAIN_LR,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = True,
    max_hessian_parameters: int = 4000,
    max_per_sample_hessians: float = 5e7,
    krylov_rank: int = 128,
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
    re-summed series exists for the schedules :mod:`perturb.symbolic.resummed` supports.
    Predictors that do not apply are listed in ``config["unavailable"]`` with the
    reason.

    The generalization gap ``test − train`` after ``T`` steps (train: the mean loss
    on the trial's own ``N`` training points, ``N = T·B`` for online SGD) is
    predicted by the engine's ``"gap"`` series through ``η²`` and compared with the
    mean of the per-trial differences (a paired 95% t-interval).

    Args:
        dataset: ``"digits"`` (built in), ``"mnist1d"`` (generated offline),
            ``"fashion-mnist"``, ``"cifar10"`` or ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits, mnist1d).
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
        records_log: space the recorded steps geometrically from 1 to ``T`` instead
            (rounded, duplicates dropped): long runs, small and large ``ηt`` at once.
        checkpoint: start from this weights-only ``state_dict`` of ``model`` instead
            of its seeded initialization.
        pretrain: first take this many steps of full-batch gradient descent on the
            population (deterministic); every run starts where it ends.
        pretrain_lr: their learning rate.
        device: ``"cpu"`` or ``"cuda"``.
        out: folder for ``results.json``, ``results.csv``, ``gap.csv`` and PNG plots.
        progress: show progress bars.
        max_hessian_parameters: largest model for the predictors that materialize
            the Hessian (SDE and re-summed; it takes ``P`` Hessian-vector products
            and ``P²`` numbers).
        max_per_sample_hessians: largest ``n·P²`` for which the re-summed GD series
            (whose parts pair a Hessian node with a gradient node on the same training
            point) materializes the per-sample Hessians.
        krylov_rank: above ``max_hessian_parameters`` the re-summed series is computed
            in a Krylov subspace of ``H`` of this dimension (Hessian-vector products
            only, :func:`perturb.krylov_subspace`); its k vs k/2 difference is reported.

    Returns:
        A :class:`ValidationResult`.

    Raises:
        ValueError: bad sizes, options the schedule does not take, a missing
            ``train_size``, or pretraining that diverged.
        FileNotFoundError: a ``checkpoint`` that does not exist.
        perturb.errors.ModelSpecError: a checkpoint that is no state dict of ``model``.
        perturb.data.DataError: unknown dataset, missing or corrupt files.

    Example:
        >>> r = validate(lrs=(0.01,), steps=4, trials=8, orders=(0, 1), population=16,
        ...              records=1, progress=False, resummed=False, gap=False)
        >>> sorted(r.breakdown)
        ['SDE', 'noiseless', 'order 0', 'order 1']
        >>> r.config["schedule"]
        'online'
    """
    full = experiment_schedule(
        schedule,
        steps=steps,
        batch_size=batch_size,
        train_size=train_size,
        epochs=epochs,
        shuffle=shuffle,
    )
    record_steps = recorded_steps(full, records, log=records_log)
    lrs = check_lrs(lrs)
    trials = check_int("trials", trials, minimum=2)
    orders = check_orders(orders)
    population = check_int("population", population, minimum=1)
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
        "records_log": bool(records_log),
        "device": device,
        "unavailable": {},
    }
    timings: dict[str, float] = {}
    data = load_population(dataset, data_dir=data_dir, population=population, seed=seed)
    with timed(timings, "start_s"):
        setup, start = start_point(
            model,
            data,
            seed=seed,
            device=device,
            checkpoint=checkpoint,
            pretrain_steps=pretrain,
            pretrain_lr=pretrain_lr,
            progress=progress,
        )
    config["start"] = start.to_dict()
    config["parameters"] = setup.parameters
    config["population"] = int(setup.x.shape[0])

    top = max(orders)
    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup, order=top, schedules=[cut(full, s) for s in record_steps], progress=progress
        )
        gap_by_order = _gap_by_order(stats, setup, full, lrs, progress=progress) if gap else None

    with timed(timings, "simulate_s"):
        trials_out = run_trials(
            setup,
            full,
            lrs=lrs,
            trials=trials,
            seed=seed,
            record=record_steps,
            device=device,
            progress=progress,
        )

    with timed(timings, "predict_s"):
        quad = _hessian_stage(
            setup,
            full,
            config["unavailable"],
            resummed=resummed,
            max_hessian_parameters=max_hessian_parameters,
            max_per_sample_hessians=max_per_sample_hessians,
            progress=progress,
        )
        subspace = None
        if resummed and quad is None and "resummed 2" in config["unavailable"]:
            subspace = _krylov_stage(setup, full, krylov_rank, config, progress=progress)
        predictions = _predict(
            stats,
            quad,
            full,
            record_steps,
            lrs,
            orders,
            config["unavailable"],
            resummed=resummed,
            progress=progress,
        )
        if subspace is not None:
            _krylov_predictions(subspace, full, record_steps, lrs, predictions, config)
        if "resummed 2" in predictions and quad is not None:
            grows = unstable_growth(quad, lrs, int(full.steps))
            if grows > UNSTABLE_GROWTH:
                config["unstable_directions"] = {
                    "resummed 2": {"h_min": float(quad.model.eig[0].min()), "growth": grows}
                }

    result = ValidationResult(config=config, timings=timings)
    _compare(result, trials_out, predictions, lrs, record_steps, start_loss=start.loss)
    if gap_by_order is not None:
        result.gap = _gap_rows(trials_out, gap_by_order, int(full.steps), start_loss=start.loss)
    if out is not None and is_main():  # under torchrun only rank 0 writes
        write_outputs(result, Path(out))
    return result


def _hessian_stage(
    setup: Setup,
    full: Schedule,
    unavailable: dict[str, str],
    *,
    resummed: bool,
    max_hessian_parameters: int,
    max_per_sample_hessians: float,
    progress: bool = False,
) -> Quadratic | None:
    """The quadratic model for SDE and re-summed, or ``None``; records what cannot run."""
    p = setup.parameters
    too_big = p > max_hessian_parameters
    if too_big:
        why = (
            f"needs the materialized Hessian: {p} parameters > "
            f"max_hessian_parameters = {max_hessian_parameters}"
        )
        unavailable["SDE"] = why
        if resummed:
            unavailable["resummed 2"] = why
    if full.name == "gd":
        unavailable["SDE"] = (
            "the SDE models fresh samples every step; GD's only noise is the draw of "
            "its training set"
        )
    if too_big:
        return None
    quad = quadratic_model(setup, progress=progress)
    if resummed:
        try:
            needs = per_sample_orders(resummed_terms(2, full))
        except ValueError as err:
            unavailable["resummed 2"] = str(err)
        else:
            if 2 in needs:  # GD: a part {H-node, G-node} shares a training point
                size = setup.x.shape[0] * p**2
                if size > max_per_sample_hessians:
                    unavailable["resummed 2"] = (
                        f"needs per-sample Hessians (n·P² = {size:.3g} numbers > "
                        f"max_per_sample_hessians = {max_per_sample_hessians:.3g})"
                    )
                else:
                    quad.derivs[2] = per_sample_hessians(quad)
    return quad


def _krylov_stage(setup: Setup, full: Schedule, rank: int, config: dict, *, progress: bool):
    """The Krylov subspace for "resummed 2" on a model too big for the materialized Hessian."""
    rank = check_int("krylov_rank", rank, minimum=2)
    rank = min(rank, setup.parameters)
    try:
        with tqdm(total=1, desc="krylov", unit="subspace", disable=not progress) as bar:
            subspace = krylov_subspace(
                setup.net, (setup.x, setup.y), rank=rank, order=2, schedules=[full]
            )
            bar.update()
    except ValueError as err:
        config["unavailable"]["resummed 2"] = f"Krylov subspace failed: {err}"
        return None
    del config["unavailable"]["resummed 2"]
    config["resummed_krylov"] = {"rank": rank, "parameters": setup.parameters}
    return subspace


def _krylov_predictions(subspace, full, record_steps, lrs, predictions, config) -> None:
    """ "resummed 2" from the Krylov subspace at every recorded step, with its k vs k/2 error."""
    error = grows = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableDirectionWarning)
        for s in record_steps:
            sched = cut(full, s)
            preds = [subspace.predict(sched, lr=lr, order=2) for lr in lrs]
            predictions.setdefault("resummed 2", {})[s] = np.array([p.total for p in preds])
            error = max([error, *(abs(float(p.total_error or 0.0)) for p in preds)])
            grows = max([grows, *(p.growth for p in preds)])
    config["resummed_krylov"]["error"] = error
    if grows > UNSTABLE_GROWTH:
        h_min = float(subspace.ritz_values().min())
        config["unstable_directions"] = {"resummed 2": {"h_min": h_min, "growth": grows}}


def _predict(
    stats,
    quad: Quadratic | None,
    full: Schedule,
    record_steps: list[int],
    lrs: tuple[float, ...],
    orders: tuple[int, ...],
    unavailable: dict[str, str],
    *,
    resummed: bool,
    progress: bool = False,
) -> dict[str, dict[int, np.ndarray]]:
    """Every available predictor at every recorded step: ``{name: {step: (L,) values}}``."""
    predictions: dict[str, dict[int, np.ndarray]] = {}
    for s in tqdm(record_steps, desc="predict", unit="step", disable=not progress):
        sched = cut(full, s)
        for name, values in series_predictions(stats, sched, lrs, orders=orders).items():
            predictions.setdefault(name, {})[s] = values
        predictions.setdefault(NOISELESS, {})[s] = noiseless_prediction(
            stats, sched, lrs, order=max(orders)
        )
        if "SDE" not in unavailable:
            predictions.setdefault("SDE", {})[s] = np.array(
                [
                    float(
                        sde_test_loss(quad.model, lr=lr, steps=s, batch_size=int(sched.batch_size))
                    )
                    for lr in lrs
                ]
            )
        if resummed and quad is not None and "resummed 2" not in unavailable:
            predictions.setdefault("resummed 2", {})[s] = resummed_prediction(quad, sched, lrs)
    return predictions


def _gap_by_order(
    stats, setup: Setup, schedule: Schedule, lrs, *, progress: bool = False
) -> np.ndarray:
    """The ``η^0, η^1, η^2`` terms of ``E[test − train]``, shape ``(L, 3)``.

    Contractions the test-loss statistics hold are reused (``tr(C H)`` is the costly
    one); the others (train-rooted joint cumulants) are measured exactly here.
    """
    by_order = np.zeros((len(lrs), 3))
    eta = np.asarray(lrs, dtype=float)
    terms = series(2, schedule, "gap").terms
    for term in tqdm(terms, desc="gap", unit="term", disable=not progress):
        if term.contraction in stats:
            value = float(stats.value(term.contraction))
        else:
            value = float(
                contraction_value(
                    term.contraction, setup.net, (setup.x, setup.y), dtype=torch.float32
                )
            )
        by_order[:, term.power] += float(term.coefficient) * value * eta**term.power
    return by_order


def _gap_rows(
    trials, by_order_all: np.ndarray, steps: int, *, start_loss: float
) -> list[dict[str, Any]]:
    """Simulated gap (paired t-interval of test − train) against the order-2 prediction."""
    rows = []
    for li in range(len(trials.lrs)):
        mean, half = mean_interval(trials.test_loss[li] - trials.train_loss[li])
        by_order = np.cumsum(by_order_all[li])
        value = float(by_order[2])
        row = _row(trials, li, steps, mean, half)
        row["order 1"], row["order 2"] = float(by_order[1]), value
        row["error_ci"] = ci_error(value, mean, half)
        for name in ("order 1", "order 2"):
            row[f"{name} unstable"] = is_unstable(row[name], start_loss)
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


def _compare(
    result: ValidationResult, trials, predictions, lrs, record_steps, *, start_loss: float
) -> None:
    means, halves, column = curve_intervals(trials)
    exits: dict[str, float | None] = {name: None for name in predictions}
    errors: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for li, lr in enumerate(lrs):
        for s in record_steps:
            mean, half = float(means[li, column[s]]), float(halves[li, column[s]])
            row = _row(trials, li, s, mean, half)
            row["predictions"] = {}
            for name, by_step in predictions.items():
                entry = prediction_entry(float(by_step[s][li]), mean, half, start_loss=start_loss)
                row["predictions"][name] = entry
                if not row["divergent"]:  # an unstable prediction is outside
                    error = math.inf if entry["unstable"] else abs(entry["error_ci"])
                    errors.setdefault((name, li), []).append((lr * s, error))
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
            + [f"{n} unstable" for n in names]
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
                + [r["predictions"][n]["unstable"] for n in names]
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
    for n in names:  # unstable predictions are left out of the plots
        ax.plot(lr, [_shown(r["predictions"][n], "value") for r in rows], "-", marker=".", label=n)
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
    shown = 0
    for n in names:  # errors that exist: not of divergent rows, not of unstable values
        pts = sorted(
            (r["eta_t"], e)
            for r in result.rows
            if math.isfinite(e := abs(_shown(r["predictions"][n], "error_ci"))) and e > 0
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", label=n)
        shown += len(pts)
    ax.axhline(1.0, color="k", lw=0.8)
    if shown:  # a log scale needs positive data (none when every trial diverged)
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


def _shown(entry: dict[str, Any], key: str) -> float:
    """``entry[key]`` for a plot: ``nan`` (left out) when the prediction is unstable."""
    return math.nan if entry["unstable"] else entry[key]


def _write_gap(result: ValidationResult, out: Path, plt) -> list[Path]:
    keys = ["lr", "steps", "eta_t", "actual", "ci_low", "ci_high", "divergent"]
    keys += ["divergent_trials", "order 1", "order 2", "error_ci"]
    keys += ["order 1 unstable", "order 2 unstable"]
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
        values = [math.nan if g[f"{name} unstable"] else g[name] for g in rows]
        ax.plot([g["lr"] for g in rows], values, "-", marker=".", label=name)
    ax.axhline(0.0, color="k", lw=0.5)
    if rows:  # a log scale needs data (none when every trial diverged)
        ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(f"test − train loss after T = {result.gap[0]['steps']} steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_lr.png", dpi=120)
    plt.close(fig)
    return [out / "gap.csv", out / "gap_vs_lr.png"]
