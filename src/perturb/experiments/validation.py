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

With ``curve`` (online only) three predictors that move with the weights join them
(:mod:`perturb.experiments.validation_curve`): ``curve`` (the learning curve of
:func:`perturb.numeric.curve.learning_curve`: the noise carried along the noiseless
path, statistics re-measured on it), ``noiseless path`` (GD at the same ``η`` on the
population) and ``SDE (path)`` (the SDE with statistics that follow the path);
``results.json`` then holds the curve whole as ``"curve"``.

Every run starts at the same ``θ_0``: the model's seeded initialization, or a
checkpoint, optionally after full-batch gradient descent on the population
(:func:`perturb.experiments.pipeline.start_point`); the loss and gradient norm there are
in ``config["start"]``.  For each predictor the report gives its error in units of the
interval's half-width and the smallest ``ηt`` at which it leaves the interval; a
prediction that blew up (not finite, or far outside what the loss can be,
:func:`perturb.experiments.pipeline.is_unstable`) is shown as ``unstable``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from perturb.experiments.baselines import sde_test_loss
from perturb.experiments.experiment import Experiment, experiment_of
from perturb.experiments.judging import judge
from perturb.experiments.outputs import VALIDATION_FILES, claims_out, staged
from perturb.experiments.pipeline import (
    check_trials_budget,
    ci_error,
    curve_intervals,
    cut,
    experiment_schedule,
    is_unstable,
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
    ladder_note,
    ladder_terms,
    noiseless_prediction,
    resummed_predictions,
    sde_model_for,
    series_with_estimates,
    subspace_quadratic,
    track_resummed,
)
from perturb.experiments.validation_curve import (
    check_curve_budget,
    check_curve_schedule,
    curve_predictions,
)
from perturb.experiments.validation_result import ValidationResult, write_outputs
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

if TYPE_CHECKING:
    from perturb.symbolic.schedules import Schedule

__all__ = ["DEFAULTS", "DEFAULT_LRS", "ValidationResult", "validate", "write_outputs"]

DEFAULT_LRS = (0.002, 0.005, 0.01, 0.02, 0.05)
DEFAULTS = {
    "lrs": DEFAULT_LRS,
    "trials": 256,
    "orders": (0, 1, 2, 3),
    "krylov_rank": 128,
    "krylov_higher_rank": 32,
}
"""The fields an experiment may leave to validate, and validate's values for them."""
NOISELESS = "noiseless"
"""The noiseless predictor's name: the diagrams without gradient noise (no ``C`` terms)."""


@claims_out  # --out is checked and locked before any work
def validate(
    experiment: Experiment | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    **options: Any,
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
        experiment: what to run (:class:`~perturb.experiments.experiment.Experiment`;
            default ``Experiment()``).  Left to validate: the learning rates (default
            ``DEFAULT_LRS``), ``T = 100`` (online, gd), ``B = 1`` (online, epochs),
            ``E = 1``, 256 trials, orders 0..3 and Krylov ranks ``(128, 32)``.  One
            schedule runs: at most one batch size and one step count.
            ``result.experiment`` holds the values used.
        out: folder for ``results.json`` (the experiment whole, as ``"experiment"``),
            ``results.csv``, ``gap.csv`` and PNG plots.
        progress: show progress bars.
        **options: fields of the experiment to change, by flat name
            (:meth:`~perturb.experiments.experiment.Experiment.replace`): ``dataset``,
            ``data_dir``, ``population``, ``model``, ``checkpoint``, ``pretrain``,
            ``pretrain_lr``, ``schedule``, ``steps``, ``batch_size`` (one ``B``; or
            ``batch_sizes``), ``train_size``, ``epochs``, ``shuffle``, ``records``,
            ``records_log``, ``lrs``, ``trials``, ``orders``, ``resummed``, ``gap``,
            ``seed``, ``device``, ``max_hessian_parameters`` (without ``resummed``, the
            largest model whose ``H`` the SDE materializes; with it the SDE runs on the
            Krylov subspace), ``krylov_rank``, ``krylov_higher_rank`` (the third-order
            tensors of "resummed 3" and GD's "resummed 2"), ``curve`` (online only: add
            "curve", "noiseless path" and "SDE (path)"), ``curve_rank``, ``max_memory``,
            ``force``;
            ``model`` may also be a network (an ``nn.Module``), recorded by class name.

    Returns:
        A :class:`ValidationResult`.

    Raises:
        TypeError: an option that is no field of the experiment.
        ValueError: bad sizes, several batch sizes or step counts, options the
            schedule does not take, a missing ``train_size``, ``curve`` with a schedule
            other than online, or pretraining that diverged.
        FileNotFoundError: a ``checkpoint`` that does not exist.
        perturb.errors.ModelSpecError: a checkpoint that is no state dict of ``model``.
        perturb.data.DataError: unknown dataset, missing or corrupt files.

    Example:
        >>> r = validate(lrs=(0.01,), steps=4, trials=8, orders=(0, 1), population=16,
        ...              records=1, progress=False, resummed=False, gap=False)
        >>> sorted(r.breakdown)
        ['SDE', 'noiseless', 'order 0', 'order 1']
        >>> r.config["schedule"], r.experiment.trials
        ('online', 8)
    """
    if "batch_size" in options:  # validate's name for its one batch size
        options["batch_sizes"] = options.pop("batch_size")
    experiment, network = experiment_of(experiment, options, command="validate")
    experiment = experiment.with_defaults(**DEFAULTS)
    return _validate(experiment, network, out=out, progress=progress)


def _one(name: str, values: tuple[int, ...] | None) -> int | None:
    """The one value of a grid field validate takes (``None`` if left to the schedule)."""
    if values is not None and len(values) != 1:
        raise ValueError(f"validate runs one schedule: {name} must be one value, got {values}")
    return None if values is None else values[0]


def _validate(
    e: Experiment, network: Any, *, out: str | Path | None, progress: bool
) -> ValidationResult:
    """:func:`validate` of the experiment ``e`` (its grid, trials and orders given), on
    ``network`` when there is one (an ``nn.Module``), else on the model ``e.model`` names."""
    run, grid, measured = e.training, e.grid, e.measurement
    full = experiment_schedule(
        run.schedule,
        steps=_one("steps", grid.steps),
        batch_size=_one("batch_sizes", grid.batch_sizes),
        train_size=run.train_size,
        epochs=run.epochs,
        shuffle=run.shuffle,
    )
    if measured.curve:
        check_curve_schedule(run.schedule)
    schedule, seed, device, trials = run.schedule, e.seed, e.device, e.trials
    orders, resummed, gap, lrs = measured.orders, measured.resummed, measured.gap, grid.lrs
    population, max_memory, force = e.data.population, e.budget.max_memory, e.budget.force
    record_steps = recorded_steps(full, run.records, log=run.records_log)
    e = e.replace(**_sizes(full))  # what the schedule filled in, for results.json
    config = {
        "dataset": e.data.dataset,
        "model": e.model,
        "lrs": list(lrs),
        "schedule": schedule,
        "description": describe(full),
        "steps": int(full.steps),
        "batch_size": int(full.batch_size),
        "train_size": None if schedule == "online" else int(full.train_size),
        "epochs": int(full.epochs) if schedule == "epochs" else None,
        "shuffle": run.shuffle,
        "trials": trials,
        "orders": list(orders),
        "resummed": resummed,
        "gap": gap,
        "seed": seed,
        "population": population,
        "records_log": run.records_log,
        "device": device,
        "unavailable": {},
    }
    timings: dict[str, float] = {}
    data = load_population(
        e.data.dataset, data_dir=e.data.data_dir, population=population, seed=seed
    )
    with timed(timings, "start_s"):
        setup, start = start_point(
            e.model if network is None else network,
            data,
            seed=seed,
            device=device,
            checkpoint=e.start.checkpoint,
            pretrain_steps=e.start.pretrain,
            pretrain_lr=e.start.pretrain_lr,
            progress=progress,
        )
    config["start"] = start.to_dict()
    config["parameters"] = setup.parameters
    config["population"] = int(setup.x.shape[0])

    check_trials_budget(setup, [full], lrs=lrs, trials=trials, record=record_steps,
                        device=device, max_memory=max_memory, force=force)  # fmt: skip
    if measured.curve:
        check_curve_budget(setup, lrs=lrs, steps=max(record_steps), rank=measured.curve_rank,
                           device=device, max_memory=max_memory, force=force)  # fmt: skip
    cuts = [cut(full, s) for s in record_steps]
    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup,
            order=max(orders),
            schedules=cuts,
            gap=gap,
            resummed=resummed,
            rank=measured.krylov_rank,
            higher_rank=measured.krylov_higher_rank,
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
        largest = measured.max_hessian_parameters
        sde_model = sde_model_for(setup, stats, full, config, largest, progress)
    with timed(timings, "predict_s"):
        predictions, estimates, motion = _predict(
            stats, sde_model, full, record_steps, lrs, orders, config
        )
    curve = None
    if measured.curve:
        with timed(timings, "curve_s"):
            curve = curve_predictions(setup, full, record_steps, lrs, rank=measured.curve_rank,
                                      trials=trials, device=device)  # fmt: skip
        predictions.update(curve.values)
        estimates.update(curve.estimates)

    result = ValidationResult(config=config, timings=timings, experiment=e)
    _compare(result, trials_out, predictions, lrs, record_steps, start_loss=start.loss)
    judge(result, estimates, motion, start_loss=start.loss,
          resolutions=None if curve is None else curve.resolutions)  # fmt: skip
    if curve is not None:
        result.curve = curve.curve.to_dict(trials)
    if gap:
        result.gap = _gap_rows(trials_out, stats, full, lrs, resummed, start_loss=start.loss)
    if out is not None and is_main():  # under torchrun only rank 0 writes
        with staged(out, known=VALIDATION_FILES) as folder:  # all files replaced at once
            write_outputs(result, folder)
    return result


def _sizes(full: Schedule) -> dict[str, Any]:
    """The sizes of the schedule that ran, as experiment fields (those its kind takes)."""
    sizes: dict[str, Any] = {}
    if full.name != "epochs":
        sizes["steps"] = int(full.steps)
    if full.name != "gd":
        sizes["batch_sizes"] = int(full.batch_size)
    if full.name == "epochs":
        sizes["epochs"] = int(full.epochs)
    return sizes


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
