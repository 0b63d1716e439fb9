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
* ``resummed 2``, ``resummed 3``: the re-summed diagrams with up to two and three
  edges (edges carry ``η(I − ηH)^{Δt−1}``), in a Krylov subspace of ``H`` built from
  Hessian-vector products while measuring (any model size; the table reports the
  subspace's rank and its ``k`` vs ``k/2`` difference);
* ``noiseless``: the noiseless diagrams (every part a single node, so no ``C`` or
  higher cumulant of the gradient noise) through the highest order: the η-series of
  GD-like SGD without noise (not gradient flow, :func:`perturb.compare`'s
  ``gradient flow``, which is the continuous-time limit on the quadratic model);
* ``SDE``: the diffusion with statistics frozen at ``θ_0``, integrated from its
  moment equations (:mod:`perturb.experiments.baselines`; not for GD, which has no
  per-step noise).

The SDE runs on the quadratic model projected on the same Krylov subspace (or, without
re-summation, materialized, for models with a few thousand parameters).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perturb.checks import check_int, check_lrs, check_orders
from perturb.experiments.baselines import sde_test_loss
from perturb.experiments.judging import judge, trial_lines, validity_lines
from perturb.experiments.outputs import VALIDATION_FILES, claims_out, staged
from perturb.experiments.pipeline import (
    DEFAULT_PRETRAIN_LR,
    Start,
    check_trials_budget,
    ci_error,
    curve_intervals,
    cut,
    experiment_schedule,
    is_unstable,
    json_ready,
    load_population,
    measure_at_start,
    prediction_entry,
    recorded_steps,
    run_trials,
    start_point,
    timed,
)
from perturb.experiments.predictors import (
    LADDER,
    krylov_description,
    ladder_description,
    ladder_note,
    ladder_terms,
    noiseless_prediction,
    resummed_predictions,
    sde_model_for,
    series_with_estimates,
    subspace_quadratic,
    track_resummed,
)
from perturb.numeric.distributed import is_main
from perturb.numeric.intervals import mean_interval
from perturb.numeric.predictions import UNSTABLE_GROWTH
from perturb.numeric.stability import per_sample_top_curvatures
from perturb.numeric.trust import resolution
from perturb.numeric.validity import (
    curvature_radius,
    displacement_ratio,
    ladder_estimate,
    loss_spread,
    mean_square_excess,
    overshoot,
    rms_displacement,
    with_ladder,
)
from perturb.symbolic.options import describe

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
            ``checkpoint``, ``pretrain_steps`` and ``pretrain_lr``; ``loss_limit``:
            :meth:`~perturb.experiments.simulation.Trials.limits`).
        rows: one record per (learning rate, recorded step): ``lr``, ``steps``,
            ``eta_t``, ``actual``, ``ci_low``, ``ci_high``, ``dropped`` (trials blown up
            by this step: a loss or parameter not finite), ``above_limit`` (trials above
            ``config["loss_limit"]``, still averaged), ``divergent`` (every trial blown
            up), and for each
            predictor its ``value``, ``error_ci`` (error over the interval's
            half-width), ``unstable`` (the value blew up: shown as ``unstable``,
            counted as outside), ``error_estimate`` (its truncation error estimated
            from the theory, same units as ``value``) and ``trusted``
            (:mod:`perturb.experiments.judging`); and ``validity``: the root-mean-square
            displacement, its ratio to ``ρ = ‖H‖/‖J‖``, the mean-square excess and
            the Hessian ladder (the loss the per-sample Hessians add, already in every
            ``error_estimate``).
            ``actual`` and the interval are over every finite trial; divergent rows are
            reported as such and left out of :attr:`breakdown` and the calibration.
        breakdown: per predictor, the smallest ``ηt`` from which on it stays outside
            the interval at every later recorded step of that learning rate (``None``
            if never): a single excursion, expected for 5% of the rows from sampling
            alone, does not count.
        gap: one record per learning rate for the generalization gap ``test − train``
            after ``T`` steps: ``actual`` with ``ci_low``/``ci_high`` (paired
            t-interval over the finite trials), the ``order 1``, ``order 2`` and (when
            re-summed) ``resummed 2`` predictions, ``error_ci`` of order 2 and
            ``resummed 2 error_ci``, ``dropped``, ``above_limit``, ``divergent``, and
            ``<name> unstable`` per prediction (empty when the gap was not requested).
        validity: per predictor ``trusted_up_to`` (ηT), ``trusted_rows``,
            ``calibration`` (the fraction of trusted rows within ``error_estimate``
            plus the half-width), ``far_off_rows`` and ``far_off_untrusted``.
        timings: seconds spent starting, measuring (the diagrams and the Krylov
            subspace), simulating, materializing ``H`` for the SDE (``hessian_s``) and
            evaluating every predictor (``predict_s``).
    """

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, float | None] = field(default_factory=dict)
    gap: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    validity: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            f"{n:>17}" for n in names
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
        lines += trial_lines(self.rows, self.config["trials"], self.config.get("loss_limit"))
        compared = any(not r["divergent"] for r in self.rows)
        for n in names:
            where = self.breakdown[n]
            if not compared:
                verdict = "not compared (every trial blew up at every learning rate)"
            elif where is None:
                verdict = "never leaves the interval for good"
            else:
                verdict = f"leaves the interval for good at ηt = {where:g}"
            lines.append(f"{n:>17}: {verdict}")
        for n, why in self.config.get("unavailable", {}).items():
            lines.append(f"{n:>17}: not available ({why})")
        if self.validity:
            lines += ["", "validity estimate (from the statistics at θ_0, before any run):"]
            lines += validity_lines(self.validity)
        if "resummed_krylov" in self.config:
            info = self.config["resummed_krylov"]
            for n, err in info["error"].items():
                ranks = self.config.get("resummed_ranks", {}).get(n, [info["rank"]])
                lines.append(f"{n:>17}: {krylov_description(ranks, info['parameters'], err)}")
        if "ladder" in self.config:
            lines.append(f"{LADDER:>17}: {ladder_description(**self.config['ladder'])}")
        if "sde_krylov_rank" in self.config:
            lines.append(
                f"{'SDE':>17}: on the quadratic model projected on the Krylov subspace "
                f"(rank {self.config['sde_krylov_rank']})"
            )
        for n, info in self.config.get("unstable_directions", {}).items():
            lines.append(
                f"{n:>17}: warning: H has a negative eigenvalue (h_min = {info['h_min']:.3g}), "
                f"so K^T = (I − ηH)^T grows by up to e^{info['growth']:.3g} (max ηT·|h_min|): "
                "not a long-run prediction"
            )
        if self.gap:
            lines += [
                "",
                f"generalization gap (test − train loss) after T = {self.gap[0]['steps']} steps:",
                f"{'η':>7} {'ηT':>6} {'SGD mean ± 95% CI':>22} {'order 1':>10} {'order 2':>17}"
                + (f" {'resummed 2':>17}" if "resummed 2" in self.gap[0] else ""),
            ]
            for g in self.gap:
                first = "unstable" if g["order 1 unstable"] else f"{g['order 1']:10.5f}"
                second = _cell(g["order 2"], g["error_ci"], g["divergent"], g["order 2 unstable"])
                third = ""
                if "resummed 2" in g:
                    third = " " + _cell(
                        g["resummed 2"],
                        g["resummed 2 error_ci"],
                        g["divergent"],
                        g["resummed 2 unstable"],
                    )
                lines.append(
                    f"{g['lr']:7.4f} {_eta_t(g['eta_t'])} {_actual(g, self.config):>22} "
                    f"{first:>10} {second}{third}"
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
                    "validity": self.validity,
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
        return f"{'unstable':>17}"
    if divergent or not math.isfinite(error):
        return f"{value:9.5f} (  n/a)"
    return f"{value:9.5f} ({error:+5.1f})"


def _actual(row: dict[str, Any], config: dict[str, Any]) -> str:
    if row["divergent"]:
        return f"divergent {row['dropped']}/{config['trials']}"
    half = (row["ci_high"] - row["ci_low"]) / 2
    return f"{row['actual']:.5f} ± {half:.5f}"


@claims_out  # --out is checked and locked before any work
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
    krylov_rank: int = 128,
    krylov_higher_rank: int = 32,
    max_memory: float | None = None,
    force: bool = False,
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
    re-summed series exists for the schedules :mod:`perturb.symbolic.resummed` supports;
    "resummed 3+ladder" ("resummed 3" plus the loss the per-sample Hessians add,
    :func:`perturb.experiments.predictors.ladder_terms`) is online only.
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
        resummed: also report the re-summed predictions with up to two and three
            edges ("resummed 2", "resummed 3"; the gap's with two).
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
        max_hessian_parameters: without ``resummed`` (no Krylov subspace), largest
            model for which the SDE's quadratic model materializes ``H`` (``P``
            Hessian-vector products, ``P²`` numbers); with it the SDE runs on the
            quadratic model projected on the subspace.
        krylov_rank: ``k``, the dimension of the Krylov subspace of ``H`` in which the
            re-summed series are computed (Hessian-vector products only,
            :func:`perturb.measure` with ``resummed=True``; at most ``P``); its k vs k/2
            difference is reported.
        krylov_higher_rank: ``k_3``: the third-order tensors (``J``, per-sample
            Hessians) of "resummed 3" and of GD's "resummed 2" are projected on the
            first ``k_3`` basis vectors (``n·k_3`` per-sample Hessian-vector products).
        max_memory: bytes the SGD trials may take (default 4 GiB), estimated first.
        force: run even when the estimate is over one hour or ``max_memory``.

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

    check_trials_budget(setup, [full], lrs=lrs, trials=trials, record=record_steps,
                        device=device, max_memory=max_memory, force=force)  # fmt: skip
    cuts = [cut(full, s) for s in record_steps]
    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup,
            order=max(orders),
            schedules=cuts,
            gap=gap,
            resummed=resummed,
            rank=krylov_rank,
            higher_rank=krylov_higher_rank,
            progress=progress,
        )
        if full.name != "gd":  # one-step overshoot of single samples (validity estimate)
            rows, lams = per_sample_top_curvatures(setup.net, (setup.x, setup.y), progress=progress)
            config["sample_curvature"] = {"rows": rows.tolist(), "lambda_max": lams.tolist()}

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
            max_memory=max_memory,
            force=force,
        )
    config["loss_limit"] = trials_out.limits()

    with timed(timings, "hessian_s"):
        sde_model = sde_model_for(setup, stats, full, config, max_hessian_parameters, progress)
    with timed(timings, "predict_s"):
        predictions, estimates, motion = _predict(
            stats, sde_model, full, record_steps, lrs, orders, config
        )

    result = ValidationResult(config=config, timings=timings)
    _compare(result, trials_out, predictions, lrs, record_steps, start_loss=start.loss)
    judge(result, estimates, motion, start_loss=start.loss)
    if gap:
        result.gap = _gap_rows(trials_out, stats, full, lrs, resummed, start_loss=start.loss)
    if out is not None and is_main():  # under torchrun only rank 0 writes
        with staged(out, known=VALIDATION_FILES) as folder:  # all files replaced at once
            write_outputs(result, folder)
    return result


def _predict(stats, sde_model, full, record_steps, lrs, orders, config) -> tuple:
    """Every available predictor at every recorded step, and the validity estimates.

    Returns ``({name: {step: (L,) values}}, {name: {step: (L,) error estimates}},
    {step: {"rms_displacement", "mean_square_excess": (L,)}})``; the re-summed
    predictors' Krylov errors, unstable growth and ``ρ = ‖H‖/‖J‖`` go into ``config``.
    """
    predictions: dict[str, dict[int, np.ndarray]] = {}
    estimates: dict[str, dict[int, np.ndarray]] = {}
    motion: dict[int, dict[str, np.ndarray]] = {}
    krylov: dict[str, dict] = {}  # per re-summed predictor: largest error, growth, ranks
    sub = stats.subspace
    quad = sde_model  # the projection when there is a subspace (GD has no SDE: project here)
    if quad is None and sub is not None:
        quad = subspace_quadratic(sub)
    top = f"order {max(orders)}"
    sharp = config.get("sample_curvature")
    kicks = {"batch_size": int(full.batch_size), "population": config["population"]}
    excess = np.zeros((len(lrs), len(record_steps)))  # SGD's RMS growth beyond GD's, per step
    ladder = np.full((len(lrs), len(record_steps)), np.nan)  # not estimated for GD
    ladder_error = ladder
    if sub is not None and full.name != "gd":
        b = int(full.batch_size)
        excess = mean_square_excess(sub, lr=lrs, steps=list(record_steps), batch_size=b)
        ladder, ladder_error = ladder_terms(stats, lrs, record_steps, batch_size=b)
    if sub is not None and full.name != "online":
        config["unavailable"][LADDER] = (
            "the ladder's recursion draws every step's batch afresh; here batches repeat"
        )

    def put(name, s, values, estimate):
        predictions.setdefault(name, {})[s] = values
        estimates.setdefault(name, {})[s] = estimate

    radius = curvature_radius(sub) if sub is not None else np.inf
    for s in record_steps:
        sched = cut(full, s)
        moved = spread = None
        if quad is not None:
            moved = rms_displacement(quad.hess, quad.grad, quad.cov, lr=lrs, schedule=sched)
            spread = loss_spread(quad.hess, quad.grad, quad.cov, lr=lrs, schedule=sched)
        ratio = None if moved is None else displacement_ratio(moved, radius)
        values, errs = series_with_estimates(stats, sched, lrs, orders=orders, ratio=ratio)
        for name, value in values.items():
            put(name, s, value, errs[name])
        noiseless = noiseless_prediction(stats, sched, lrs, order=max(orders))
        put(NOISELESS, s, noiseless, np.abs(predictions[top][s] - noiseless) + estimates[top][s])
        resummed = resummed_predictions(stats, sched, lrs, ratio=ratio) if sub is not None else {}
        if sde_model is not None:
            b = int(sched.batch_size)
            sde = np.array(
                [float(sde_test_loss(sde_model, lr=lr, steps=s, batch_size=b)) for lr in lrs]
            )
            if "resummed 2" in resummed:  # its discretization gap + the quadratic model's
                two = resummed["resummed 2"]
                put("SDE", s, sde, np.abs(sde - two.values) + two.estimate)
            else:
                put("SDE", s, sde, np.full(len(lrs), np.inf))
        for name, r in resummed.items():
            put(name, s, r.values, r.estimate)
        track_resummed(krylov, resummed)
        j = record_steps.index(s)
        rung = ladder[:, j]
        if not np.isnan(rung).all():  # every predictor leaves the ladder out
            for name, by_step in estimates.items():
                if name != LADDER:
                    by_step[s] = with_ladder(by_step[s], rung)
            if full.name == "online" and "resummed 3" in resummed:
                three = resummed["resummed 3"]
                own = ladder_estimate(rung, ladder_error[:, j], ratio)
                put(LADDER, s, three.values + rung, three.estimate + own)
        if quad is not None:
            motion[s] = {
                "rms_displacement": moved,
                "loss_spread": spread,
                "resolution": resolution(spread, trials=config["trials"]),
                "mean_square_excess": excess[:, j],
                **({} if np.isnan(rung).all() else {"hessian_ladder": rung}),
                **(overshoot(sharp["lambda_max"], lr=lrs, steps=s, **kicks) if sharp else {}),
            }
    if LADDER in predictions:
        config["ladder"] = ladder_note(sub, ladder_error)
    if sub is not None:
        config["resummed_krylov"] = {
            "rank": sub.rank,
            "higher_rank": sub.higher_rank,
            "parameters": stats.parameters,
            "error": {name: info["error"] for name, info in krylov.items()},
        }
        config["resummed_ranks"] = {name: info["ranks"] for name, info in krylov.items()}
        config["curvature_radius"] = radius
        h_min = float(sub.ritz_values().min())
        for name, info in krylov.items():
            if info["growth"] > UNSTABLE_GROWTH:
                unstable = {"h_min": h_min, "growth": info["growth"]}
                config.setdefault("unstable_directions", {})[name] = unstable
    return predictions, estimates, motion


def _gap_rows(trials, stats, full, lrs, resummed: bool, *, start_loss: float) -> list[dict]:
    """Simulated gap (paired t-interval of test − train) against the order-1, order-2 and
    (with ``resummed``) re-summed order-2 predictions after the last step."""
    by_order = np.cumsum(stats.predict(full, lr=list(lrs), quantity="gap", order=2).by_order, 1)
    resum = {}
    if resummed:
        resum = resummed_predictions(stats, full, lrs, orders=(2,), quantity="gap")
    rows = []
    for li in range(len(trials.lrs)):
        mean, half = mean_interval(trials.test_loss[li] - trials.train_loss[li])
        row = _row(trials, li, int(full.steps), mean, half)
        row["order 1"], row["order 2"] = float(by_order[li, 1]), float(by_order[li, 2])
        row["error_ci"] = ci_error(row["order 2"], mean, half)
        if "resummed 2" in resum:
            value = float(resum["resummed 2"].values[li])
            row["resummed 2"] = value
            row["resummed 2 error_ci"] = ci_error(value, mean, half)
        for name in ("order 1", "order 2", "resummed 2"):
            if name in row:
                row[f"{name} unstable"] = is_unstable(row[name], start_loss)
        rows.append(row)
    return rows


def _row(trials, li: int, steps: int, mean: float, half: float) -> dict[str, Any]:
    """The fields every row has: where, the SGD mean and its interval, the trial counts."""
    lr = float(trials.lrs[li])
    where = {"lr": lr, "steps": int(steps), "eta_t": lr * steps, "actual": mean}
    return {**where, "ci_low": mean - half, "ci_high": mean + half, **trials.counts_at(li, steps)}


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
            ["lr", "steps", "eta_t", "actual", "ci_low", "ci_high", "dropped", "divergent"]
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
                    r["dropped"],
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
    keys += ["dropped", "above_limit", "order 1", "order 2", "error_ci"]
    keys += ["order 1 unstable", "order 2 unstable"]
    if "resummed 2" in result.gap[0]:
        keys += ["resummed 2", "resummed 2 error_ci", "resummed 2 unstable"]
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
    for name in ("order 1", "order 2", "resummed 2"):
        if rows and name not in rows[0]:
            continue
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
