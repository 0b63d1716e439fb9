"""Every theory side by side on one run: real SGD against each theory's prediction.

The setting is :func:`perturb.experiments.validation.validate`'s: the population is a fixed set of
``n`` labelled images, online SGD draws its samples uniformly with replacement, and
the test loss is the mean loss over the population, so every statistic at ``θ_0`` is
exact.  For a grid of learning rates ``η``, batch sizes ``B`` and step counts ``T``
the actual value is the mean of ``K`` vectorized SGD trials with a 95% t-interval,
and the predictors are

* ``order d``: perturb's un-resummed series through ``η^d``;
* ``resummed 2``, ``resummed 3``: perturb's re-summed diagrams with up to two and three
  edges, evaluated in a Krylov subspace of ``H`` of rank ``k`` built from
  Hessian-vector products while measuring (any model size; the notes give the rank
  and the largest ``k`` vs ``k/2`` difference over the grid, and warn where ``K^T``
  grows along an unstable direction);
* ``resummed 3+ladder``: "resummed 3" plus the Hessian ladder, the loss the
  per-sample Hessian fluctuations add (diagrams with four edges and more;
  :func:`perturb.experiments.predictors.ladder_terms`), on the first ``k_3`` vectors;
* ``gradient flow``: the ODE ``dθ/dt = −∇l`` on the quadratic model at ``θ_0``, at
  time ``ηT`` (:func:`perturb.experiments.baselines.ode_test_loss`; not
  :func:`perturb.validate`'s ``noiseless``, the noise-free diagrams of discrete SGD);
* ``SDE``: seed 001's diffusion with statistics frozen at ``θ_0``
  (:func:`perturb.experiments.baselines.sde_test_loss`);
* ``Lyapunov``: the exact moments of discrete SGD on the same quadratic model with
  constant noise, ``m' = Km − ηG``, ``Σ' = KΣK + (η²/B)C``, ``K = I − ηH``
  (:func:`perturb.experiments.baselines.lyapunov_test_loss`);
* ``stationary``: the ``T → ∞`` limit of ``Lyapunov``, the minimum of the quadratic
  model plus ``½tr(HΣ)`` with ``Σ = KΣK + (η²/B)C``; it exists only when ``H`` is
  positive definite and ``ηh_i < 2`` (near a minimum), and is reported as ``nan``
  otherwise, e.g. at a random initialization where ``H`` has negative eigenvalues.

The last four run on the quadratic model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise
``C``: materialized (:func:`perturb.experiments.pipeline.quadratic_model`) for models
with at most ``max_hessian_parameters`` parameters, and above that projected on the
same Krylov subspace (:func:`perturb.experiments.predictors.subspace_quadratic`:
``QᵀG``, ``QᵀHQ``, ``QᵀCQ``; exact at ``k = P``), with a note; without the subspace
(``resummed=False``) they are not available there.  On the projection the eigenvalues
are Ritz values, which lie inside ``H``'s spectrum: a negative one proves ``H``
indefinite, but positive ones do not prove it positive definite, so ``stationary`` is
then the stationary law of SGD restricted to the subspace.

With ``curve`` (``perturb compare --curve``) one learning curve for the whole grid adds
``curve``, ``noiseless path`` and ``SDE (path)``, the predictors that follow the weights
(:mod:`perturb.experiments.validation_curve`, as in :func:`perturb.validate`), and
``compare.json`` holds the curve whole as ``"curve"``.

Each prediction gets the validity estimate of :func:`perturb.validate`
(:mod:`perturb.experiments.judging`): an ``error_estimate`` from the theory (the
series' and re-summed diagrams' truncation estimates; for the theories on the quadratic
model their distance to "resummed 2" plus its estimate; the Hessian ladder added to
every one) and a verdict ``trusted``, with the calibration per predictor in
:attr:`Comparison.validity`.

Each prediction's error is given in units of the interval's half-width; a prediction
that blew up (not finite, or far outside what the loss can be,
:func:`perturb.experiments.pipeline.is_unstable`) is shown as ``unstable``.  The runs
start at the model's seeded initialization, or at a checkpoint, optionally after
full-batch gradient descent on the population (``checkpoint``, ``pretrain``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb.experiments.baselines import (
    QuadraticModel,
    lyapunov_test_loss,
    ode_test_loss,
    sde_test_loss,
    stationary_excess_loss,
)
from perturb.experiments.experiment import Experiment, experiment_of
from perturb.experiments.judging import judge, trial_lines, validity_lines
from perturb.experiments.outputs import COMPARISON_FILES, claims_out, staged
from perturb.experiments.pipeline import (
    Setup,
    Start,
    check_trials_budget,
    curve_intervals,
    json_ready,
    load_population,
    measure_at_start,
    prediction_entry,
    quadratic_model,
    run_trials,
    start_point,
    timed,
)
from perturb.experiments.predictors import (
    LADDER,
    RESUMMED_ORDERS,
    krylov_description,
    ladder_description,
    ladder_note,
    ladder_terms,
    resummed_predictions,
    series_with_estimates,
    subspace_quadratic,
    track_resummed,
)
from perturb.experiments.validation_curve import (
    CURVE,
    CURVE_PREDICTORS,
    check_curve_budget,
    check_curve_schedule,
    curve_description,
    curve_grid_predictions,
)
from perturb.numeric.predictions import UNSTABLE_GROWTH
from perturb.numeric.stability import per_sample_top_curvatures
from perturb.numeric.statistics import Statistics
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
from perturb.symbolic.schedules import Online

__all__ = ["DEFAULTS", "Comparison", "compare"]

DEFAULT_LRS = (0.005, 0.02)
DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_STEPS = (25, 50, 100)
DEFAULTS = {
    "lrs": DEFAULT_LRS,
    "batch_sizes": DEFAULT_BATCH_SIZES,
    "steps": DEFAULT_STEPS,
    "trials": 128,
    "orders": (1, 2, 3),
    "krylov_rank": 128,
    "krylov_higher_rank": 32,
}
"""The fields an experiment may leave to compare, and compare's values for them."""
GRADIENT_FLOW = "gradient flow"
"""The gradient-flow predictor's name: the ODE ``dθ/dt = −∇l`` on the quadratic model."""
QUADRATIC = (GRADIENT_FLOW, "SDE", "Lyapunov", "stationary")
"""The theories on the quadratic model at ``θ_0`` (materialized, or projected on the subspace)."""
RESUMMED = tuple(f"resummed {d}" for d in RESUMMED_ORDERS)
"""The re-summed predictors' names, in table order."""


@dataclass
class Comparison:
    """The outcome of :func:`compare`.

    Attributes:
        config: the settings of the run (``start``: the loss ``l(θ_0)``, gradient norm
            ``‖G‖``, checkpoint and pretraining of the start; ``quadratic_model``:
            ``"materialized"``, ``"projected"`` or ``None``; ``resummed_krylov``: the
            extreme Ritz values and, per re-summed predictor, its ranks, largest ``k``
            vs ``k/2`` difference and growth; ``loss_limit``:
            :meth:`~perturb.experiments.simulation.Trials.limits`).
        predictors: names of the predictors, in table order.
        rows: one record per ``(η, B, T)``: ``lr``, ``batch_size``, ``steps``, ``eta_t``,
            ``actual`` (SGD mean over every finite trial), ``ci_half`` (95% half-width),
            ``trials`` (finite trials), ``dropped`` (trials blown up by ``T``: a loss or
            parameter not finite), ``above_limit`` (trials above ``config["loss_limit"]``,
            still averaged), ``divergent`` (every trial blown up),
            ``predictions[name] = {"value", "error_ci",
            "unstable", "error_estimate", "trusted"}`` with ``error_ci = (value −
            actual)/ci_half``, ``unstable`` whether the value blew up (shown as
            ``unstable``), and the validity estimate; and ``validity`` (the
            displacement, its ratio to ``ρ``, the mean-square excess, the single-sample
            overshoot and the Hessian ladder).
        notes: per predictor, how it was evaluated (the Krylov rank, the largest ``k`` vs
            ``k/2`` difference, the projected quadratic model), warnings (unstable
            directions), and why it is ``nan`` where it is, or not available at all.
        timings: seconds spent starting, measuring (the diagrams and the Krylov
            subspace), simulating, building the quadratic model (``hessian_s``),
            predicting and, with the curve, running it (``curve_s``).
        validity: per predictor ``trusted_up_to`` (ηT), ``within_2ci_up_to``,
            ``trusted_rows``, ``calibration`` (the fraction of trusted rows within
            ``error_estimate`` plus the half-width), ``far_off_rows`` and
            ``far_off_untrusted`` (:mod:`perturb.experiments.judging`).
        experiment: the experiment that ran, with the values it used for the fields it
            left to :func:`compare` (``None`` when built by hand).
        curve: the learning curve
            (:meth:`~perturb.numeric.curve.LearningCurve.to_dict` at the run's trials),
            when ``curve`` was on.
    """

    config: dict[str, Any]
    predictors: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    validity: dict[str, dict[str, Any]] = field(default_factory=dict)
    experiment: Experiment | None = None
    curve: dict[str, Any] | None = None

    def table(self) -> str:
        """One plain-text table: a line per ``(η, B, T)``, a column per predictor."""
        head = f"{'η':>7} {'B':>3} {'T':>5} {'ηT':>6} {'SGD mean ± 95% CI':>21} " + " ".join(
            f"{n:>17}" for n in self.predictors
        )
        start = Start(**self.config["start"]) if "start" in self.config else None
        lines = [] if start is None or start.is_default else [start.describe()]
        lines += [head, "-" * len(head)]
        for r in self.rows:
            actual = "divergent" if r["divergent"] else f"{r['actual']:.5f} ± {r['ci_half']:.5f}"
            cells = [_cell(r["predictions"][n]) for n in self.predictors]
            lines.append(
                f"{r['lr']:7.4f} {r['batch_size']:3d} {r['steps']:5d} {_eta_t(r['eta_t'])} "
                f"{actual:>21} " + " ".join(cells)
            )
        lines += ["", "(error) = (prediction − SGD mean) / CI half-width; |error| > 1: outside."]
        lines += trial_lines(self.rows, self.config["trials"], self.config.get("loss_limit"))
        lines += [f"{name}: {why}" for name, why in self.notes.items()]
        if self.curve is not None:
            lines += [f"{CURVE}: {line}" for line in curve_description(self.curve, self.config)]
        if self.validity:
            lines += ["", "validity estimate (from the statistics at θ_0, before any run):"]
            lines += validity_lines(self.validity)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the experiment (when known), config, predictors, rows, notes, timings,
        validity and the learning curve when there is one (``nan`` → ``None``)."""
        known = {} if self.experiment is None else {"experiment": self.experiment.to_dict()}
        curve = {} if self.curve is None else {"curve": self.curve}
        return json_ready(
            {
                **known,
                "config": self.config,
                "predictors": self.predictors,
                "rows": self.rows,
                "notes": self.notes,
                "timings": self.timings,
                "validity": self.validity,
                **curve,
            }
        )

    def to_csv(self) -> str:
        """The rows as CSV text: per predictor its value, error, blow-up, error estimate and
        verdict."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        base = ["lr", "batch_size", "steps", "eta_t", "actual", "ci_half", "trials", "dropped"]
        base += ["above_limit", "divergent"]
        names = list(self.predictors)
        fields = ["value", "error_ci", "unstable", "error_estimate", "trusted"]
        writer.writerow(base + [n if f == "value" else f"{n} {f}" for f in fields for n in names])
        for r in self.rows:
            writer.writerow(
                [r[k] for k in base]
                + [r["predictions"][n].get(f, "") for f in fields for n in names]
            )
        return buf.getvalue()

    def write(self, out: str | Path) -> list[Path]:
        """Write ``compare.json``, ``compare.csv`` and ``compare.png`` into ``out``.

        All three replace those of an earlier run at once, and only when all are written
        (:func:`perturb.experiments.outputs.staged`); ``out`` is checked and locked first.

        Returns:
            The paths written.
        """
        with staged(out, known=COMPARISON_FILES) as folder:
            self._write_into(folder)
        return [Path(out) / name for name in COMPARISON_FILES]

    def _write_into(self, out: Path) -> list[Path]:
        """:meth:`write` into the folder ``out`` (a fresh one: no file left from before)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = [out / "compare.json", out / "compare.csv", out / "compare.png"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2))
        paths[1].write_text(self.to_csv())
        batch_sizes = sorted({r["batch_size"] for r in self.rows})
        lrs = sorted({r["lr"] for r in self.rows})
        fig, axes = plt.subplots(
            len(batch_sizes),
            len(lrs),
            figsize=(3.6 * len(lrs), 3.0 * len(batch_sizes)),
            squeeze=False,
        )
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, b in enumerate(batch_sizes):
            for j, lr in enumerate(lrs):
                ax = axes[i, j]
                rows = [r for r in self.rows if r["batch_size"] == b and r["lr"] == lr]
                t = [r["steps"] for r in rows]
                ax.errorbar(
                    t,
                    [r["actual"] for r in rows],
                    yerr=[r["ci_half"] for r in rows],
                    fmt="ko",
                    capsize=3,
                    label="SGD (95% CI)",
                )
                for k, n in enumerate(self.predictors):
                    ax.plot(
                        t,
                        [
                            math.nan
                            if r["predictions"][n]["unstable"]
                            else r["predictions"][n]["value"]
                            for r in rows
                        ],
                        "-",
                        marker=".",
                        color=colors[k % len(colors)],
                        label=n,
                    )
                actual = [r["actual"] for r in rows if math.isfinite(r["actual"])]
                if actual:
                    pad = max(2 * (max(actual) - min(actual)), 0.01)
                    ax.set_ylim(min(actual) - pad, max(actual) + pad)
                ax.set_title(f"η = {lr:g}, B = {b}", fontsize=9)
                ax.set_xlabel("steps T")
                ax.set_ylabel("test loss")
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(paths[2], dpi=110)
        plt.close(fig)
        return paths


def _eta_t(value: float) -> str:
    """``ηt`` in six characters: three decimals below 100, one up to 10⁴."""
    return f"{value:6.3f}" if value < 99.9995 else f"{value:6.1f}"


def _cell(entry: dict[str, Any]) -> str:
    """A table cell: the value and its error, ``unstable``, or ``n/a`` (see the notes)."""
    if entry["unstable"]:
        return f"{'unstable':>17}"
    if not math.isfinite(entry["value"]):
        return f"{'n/a':>17}"
    return f"{entry['value']:9.5f} ({entry['error_ci']:+6.1f})"


@claims_out  # out is checked and locked before any work
def compare(
    experiment: Experiment | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> Comparison:
    """Run SGD on a grid of ``(η, B, T)`` and put every theory's prediction beside it.

    The statistics at ``θ_0`` are exact over the population (:func:`perturb.measure`
    with ``exact=True`` for the diagrams and, with ``resummed``, the Krylov subspace of
    ``H``; the loss, per-sample gradients and the Hessian, or their projections on the
    subspace, for the quadratic model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise of
    covariance ``C``); the actual values are means of ``trials`` vectorized online-SGD
    runs per ``(η, B)`` (:func:`perturb.simulate`), recorded at every ``T``.  See the
    module docstring for the predictors.

    Args:
        experiment: what to run (:class:`~perturb.experiments.experiment.Experiment`;
            default ``Experiment()``).  Left to compare: ``lrs`` (default
            ``DEFAULT_LRS``), ``batch_sizes`` (``DEFAULT_BATCH_SIZES``), ``steps``
            (``DEFAULT_STEPS``; one run per ``(η, B)`` is recorded at each), 128 trials,
            orders 1..3 and Krylov ranks ``(128, 32)``.  ``curve`` adds the learning
            curve's three predictors (rank ``curve_rank``).  The schedule must be online;
            every ``T`` is recorded (``records``, ``records_log`` and ``gap`` are
            validate's, not used here).
            Above ``max_hessian_parameters`` the quadratic model (gradient flow, SDE,
            Lyapunov, stationary) is projected on the Krylov subspace (needs
            ``resummed``); ``krylov_higher_rank`` ``k_3 ≤ k`` basis vectors carry the
            per-sample Hessians and third derivatives of the three-edge diagrams.
            ``result.experiment`` and ``compare.json`` hold the values used.
        out: folder for ``compare.json`` (the experiment whole, as ``"experiment"``),
            ``compare.csv`` and ``compare.png``.
        progress: show progress bars.
        **options: fields of the experiment to change, by flat name
            (:meth:`~perturb.experiments.experiment.Experiment.replace`); ``model`` may
            also be a network (an ``nn.Module`` taking the dataset's inputs, moved to
            ``device``), recorded by its class name.

    Returns:
        A :class:`Comparison`.

    Raises:
        TypeError: an option that is no field of the experiment.
        ValueError: on an empty or malformed grid, ``trials < 2``, orders outside 0..4,
            a Krylov rank below 2 (or a higher rank below 1), a schedule other than
            online, or pretraining that diverged.
        FileNotFoundError: a ``checkpoint`` that does not exist.
        perturb.errors.ModelSpecError: a checkpoint that is no state dict of ``model``.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> softmax = mlp((1, 8, 8), 10, hidden=())  # softmax regression, 650 parameters
        >>> r = compare(model=softmax, lrs=(0.01,), batch_sizes=(2,), steps=(3,), trials=4,
        ...             orders=(1,), population=16, krylov_rank=16, krylov_higher_rank=4)
        >>> r.predictors[:4]
        ['order 1', 'resummed 2', 'resummed 3', 'resummed 3+ladder']
        >>> r.predictors[4:]
        ['gradient flow', 'SDE', 'Lyapunov', 'stationary']
        >>> len(r.rows), r.rows[0]["batch_size"]
        (1, 2)
        >>> r.notes["resummed 3"].startswith("in a Krylov subspace of H of rank 16 (3-edge")
        True
    """
    experiment, network = experiment_of(experiment, options, command="compare")
    run = experiment.training
    if experiment.measurement.curve:
        check_curve_schedule(run.schedule)
    if (run.schedule, run.train_size, run.epochs, run.shuffle) != ("online", None, None, False):
        raise ValueError(
            "compare runs online SGD: the schedule must be online, with no train_size, "
            f"epochs or shuffle, got {run}"
        )
    e = experiment.with_defaults(**DEFAULTS)
    grid = e.grid
    e = e.replace(batch_sizes=sorted(set(grid.batch_sizes)), steps=sorted(set(grid.steps)))
    return _compare(e, network, out=out, progress=progress)


def _compare(
    e: Experiment, network: torch.nn.Module | None, *, out: str | Path | None, progress: bool
) -> Comparison:
    """:func:`compare` of the experiment ``e`` (its grid, trials and orders given), on
    ``network`` when there is one, else on the model ``e.model`` names."""
    lrs, batch_sizes, steps = e.grid.lrs, e.grid.batch_sizes, e.grid.steps
    trials, seed, device, population = e.trials, e.seed, e.device, e.data.population
    measured, max_memory, force = e.measurement, e.budget.max_memory, e.budget.force
    orders, resummed = measured.orders, measured.resummed
    max_hessian_parameters = measured.max_hessian_parameters
    config = {
        "dataset": e.data.dataset,
        "model": e.model,
        "lrs": list(lrs),
        "batch_sizes": list(batch_sizes),
        "steps": list(steps),
        "trials": trials,
        "orders": list(orders),
        "resummed": resummed,
        "seed": seed,
        "population": population,
        "device": device,
        "schedule": "online",
        "max_hessian_parameters": max_hessian_parameters,
        "krylov_rank": measured.krylov_rank,
        "krylov_higher_rank": measured.krylov_higher_rank,
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
    schedules = {(b, s): Online(steps=s, batch_size=b) for b in batch_sizes for s in steps}
    check_trials_budget(  # before anything is measured
        setup, [Online(steps=max(steps), batch_size=b) for b in batch_sizes], lrs=lrs,
        trials=trials, record=steps, device=device, max_memory=max_memory, force=force,
    )  # fmt: skip
    if measured.curve:
        check_curve_budget(setup, lrs=lrs, steps=max(steps), rank=measured.curve_rank,
                           device=device, max_memory=max_memory, force=force)  # fmt: skip

    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup,
            order=max(orders),
            schedules=list(schedules.values()),
            resummed=resummed,
            rank=measured.krylov_rank,
            higher_rank=measured.krylov_higher_rank,
            progress=progress,
        )
        _, lams = per_sample_top_curvatures(setup.net, (setup.x, setup.y), progress=progress)

    with timed(timings, "simulate_s"):
        runs = {
            b: run_trials(
                setup,
                Online(steps=max(steps), batch_size=b),
                lrs=lrs,
                trials=trials,
                seed=seed + 1000 * i,
                record=steps,
                device=device,
                progress=progress,
                max_memory=max_memory,
                force=force,
            )
            for i, b in enumerate(batch_sizes)
        }
    config["loss_limit"] = runs[batch_sizes[0]].limits()
    curve = None
    if measured.curve:
        with timed(timings, "curve_s"):
            curve = curve_grid_predictions(setup, lrs, batch_sizes, steps, device=device,
                                           rank=measured.curve_rank, trials=trials)  # fmt: skip

    notes: dict[str, str] = {}
    with timed(timings, "hessian_s"):
        quad, kind = _quadratic(setup, stats, max_hessian_parameters, notes, progress)
    config["quadratic_model"] = kind

    with timed(timings, "predict_s"):
        do_resum = stats.subspace is not None
        ladders = {b: ladder_terms(stats, lrs, steps, batch_size=b) for b in batch_sizes}
        do_ladder = do_resum and not np.isnan(ladders[batch_sizes[0]][0]).all()
        predictors = [f"order {d}" for d in orders] + (list(RESUMMED) if do_resum else [])
        predictors += [LADDER] if do_ladder else []
        predictors += list(QUADRATIC) if quad is not None else []
        predictors += list(CURVE_PREDICTORS) if curve is not None else []
        result = Comparison(
            config=config, predictors=predictors, notes=notes, timings=timings, experiment=e
        )
        h_min, h_max = _spectrum(quad, kind == "projected", result.notes)
        krylov: dict[str, dict[str, Any]] = {}
        estimates: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        motion = _motion(stats, quad, schedules, lrs, ladders, lams, int(setup.x.shape[0]), trials)
        radius = curvature_radius(stats.subspace) if do_resum else math.inf
        grid = [(b, s) for b in batch_sizes for s in steps]
        for b, s in tqdm(grid, desc="predict", unit="(B, T)", disable=not progress):
            means, halves, column = curve_intervals(runs[b])
            sched = schedules[(b, s)]
            moved = motion.get((b, s), {}).get("rms_displacement")
            ratio = None if moved is None else displacement_ratio(moved, radius)
            columns, errors = series_with_estimates(stats, sched, lrs, orders=orders, ratio=ratio)
            if do_resum:
                for name, r in _resummed(stats, sched, lrs, krylov, ratio).items():
                    columns[name], errors[name] = r.values, r.estimate
            if do_ladder:
                ladder, ladder_error = (x[:, steps.index(s)] for x in ladders[b])
                columns[LADDER] = columns["resummed 3"] + ladder
                errors[LADDER] = errors["resummed 3"] + ladder_estimate(ladder, ladder_error, ratio)
            anchor = "resummed 2" if do_resum else f"order {max(orders)}"
            rows = []
            for li, lr in enumerate(lrs):
                values = {name: float(v[li]) for name, v in columns.items()}
                if quad is not None:
                    values.update(_baselines(quad, lr=lr, steps=s, batch_size=b))
                    values["stationary"] = _stationary(
                        quad, lr=lr, batch_size=b, h_min=h_min, h_max=h_max
                    )
                for name, by_key in {} if curve is None else curve.values.items():
                    values[name] = float(by_key[(b, s)][li])
                mean, half = float(means[li, column[s]]), float(halves[li, column[s]])
                rows.append(
                    {
                        "lr": float(lr),
                        "batch_size": int(b),
                        "steps": int(s),
                        "eta_t": float(lr * s),
                        "actual": mean,
                        "ci_half": half,
                        "trials": int(trials - runs[b].curve_dropped[li, column[s]]),
                        **runs[b].counts_at(li, s),
                        "predictions": {
                            name: _entry(name, v, mean, half, start.loss)
                            for name, v in values.items()
                        },
                    }
                )
            for name in QUADRATIC if quad is not None else ():  # triangle: via the anchor
                errors[name] = np.array(
                    [
                        abs(r["predictions"][name]["value"] - columns[anchor][li])
                        + errors[anchor][li]
                        for li, r in enumerate(rows)
                    ]
                )
            rung = ladders[b][0][:, steps.index(s)]
            for name, est in errors.items():  # every predictor but LADDER leaves it out
                wide = est if name == LADDER else with_ladder(est, rung)
                estimates.setdefault(name, {})[(b, s)] = wide
            result.rows += rows
        if do_resum:
            config["resummed_krylov"] = _resummed_notes(result.notes, stats, krylov, lrs)
        if do_ladder:
            error = np.concatenate([ladders[b][1] for b in batch_sizes], axis=1)
            config["ladder"] = ladder_note(stats.subspace, error)
            result.notes[LADDER] = ladder_description(**config["ladder"])
        if quad is not None and math.isfinite(h_min) and h_min > 0:
            bad = [lr for lr in lrs if lr * h_max >= 2]
            if bad:
                why = f"n/a at η = {bad}: ηh_max ≥ 2, no stationary law"
                _note(result.notes, "stationary", why)
        result.rows.sort(key=lambda r: (r["lr"], r["batch_size"], r["steps"]))
        config["curvature_radius"] = radius
        if curve is not None:  # the curve carries the ladder: no rung added
            estimates.update(curve.estimates)
            result.curve = curve.curve.to_dict(trials)
        judge(result, estimates, motion, start_loss=start.loss, key=_key,
              resolutions=None if curve is None else curve.resolutions)  # fmt: skip
        place = {name: i for i, name in enumerate([*RESUMMED, LADDER, *QUADRATIC])}
        result.notes = dict(sorted(notes.items(), key=lambda item: place[item[0]]))
    if out is not None:
        result.write(out)
    return result


def _note(notes: dict[str, str], name: str, text: str) -> None:
    """Add ``text`` to the note of ``name`` (after what is there, with ``; ``)."""
    notes[name] = f"{notes[name]}; {text}" if name in notes else text


def _quadratic(
    setup: Setup, stats: Statistics, limit: int, notes: dict[str, str], progress: bool
) -> tuple[QuadraticModel | None, str | None]:
    """The quadratic model at ``θ_0`` and how it was built: ``"materialized"`` (at most
    ``limit`` parameters), ``"projected"`` on the measured Krylov subspace, or ``None``
    (the theories on it are not available; the notes say why)."""
    p = setup.parameters
    if p <= limit:
        return quadratic_model(setup, progress=progress).model, "materialized"
    too_big = f"{p} parameters > max_hessian_parameters = {limit}"
    if stats.subspace is not None:
        for name in QUADRATIC:
            notes[name] = (
                "on the quadratic model projected on the Krylov subspace of H of rank "
                f"{stats.subspace.rank} ({too_big})"
            )
        return subspace_quadratic(stats.subspace), "projected"
    for name in QUADRATIC:
        notes[name] = (
            f"not available (needs the materialized Hessian ({too_big}) or the Krylov "
            "subspace (resummed=True))"
        )
    return None, None


def _resummed(stats: Statistics, sched: Online, lrs, krylov: dict, ratio) -> dict:
    """The re-summed predictions of ``sched`` (``ratio``: their estimates' floor); their
    Krylov error, growth and ranks are accumulated over the grid in ``krylov[name]``."""
    resummed = resummed_predictions(stats, sched, lrs, ratio=ratio)
    track_resummed(krylov, resummed)
    return resummed


def _key(row: dict) -> tuple[int, int]:
    """A comparison row's key in the estimates and the motion: ``(B, T)``."""
    return int(row["batch_size"]), int(row["steps"])


def _motion(
    stats, quad, schedules: dict, lrs, ladders: dict, lams, population: int, trials: int
) -> dict:
    """Per ``(B, T)``: the displacement of the quadratic model, the predicted spread of
    the loss and the resolution of ``trials`` runs, the mean-square excess, the Hessian
    ladder (``ladders[B]``) and the single-sample overshoot, per rate."""
    if quad is None:
        return {}
    sub = stats.subspace
    steps = sorted({s for _, s in schedules})
    out = {}
    for b in sorted({b for b, _ in schedules}):
        excess = np.zeros((len(lrs), len(steps)))
        if sub is not None:
            excess = mean_square_excess(sub, lr=lrs, steps=steps, batch_size=b)
        ladder = ladders[b][0]
        for j, s in enumerate(steps):
            kicks = overshoot(lams, lr=lrs, steps=s, batch_size=b, population=population)
            sched = schedules[(b, s)]
            spread = loss_spread(quad.hess, quad.grad, quad.cov, lr=lrs, schedule=sched)
            out[(b, s)] = {
                "rms_displacement": rms_displacement(
                    quad.hess, quad.grad, quad.cov, lr=lrs, schedule=sched
                ),
                "loss_spread": spread,
                "resolution": resolution(spread, trials=trials),
                "mean_square_excess": excess[:, j],
                **({} if np.isnan(ladder).all() else {"hessian_ladder": ladder[:, j]}),
                **kicks,
            }
    return out


def _resummed_notes(notes: dict[str, str], stats: Statistics, krylov: dict, lrs) -> dict:
    """Note each re-summed predictor's Krylov rank(s), its largest ``k`` vs ``k/2``
    difference over the grid and, where ``K^T`` grows, a warning; returns the record for
    ``config["resummed_krylov"]``."""
    ritz = stats.subspace.ritz_values()
    h_min, h_max = float(ritz.min()), float(ritz.max())
    for name, info in krylov.items():
        text = krylov_description(info["ranks"], stats.parameters, info["error"])
        if info["growth"] > UNSTABLE_GROWTH:
            why = [f"H has a negative eigenvalue (h_min = {h_min:.3g})"] if h_min < 0 else []
            if max(lrs) * h_max > 2:
                why.append(f"ηh_max > 2 at η = {max(lrs):g} (largest Ritz value {h_max:.3g})")
            why = " and ".join(why) or "|1 − ηh| > 1 for a Ritz value h"
            text += (
                f"; warning: {why}, so K^T = (I − ηH)^T grows by up to "
                f"e^{info['growth']:.3g}: not a long-run prediction"
            )
        notes[name] = text
    return {"h_min": h_min, "h_max": h_max, **krylov}


def _spectrum(quad: QuadraticModel | None, projected: bool, notes: dict) -> tuple[float, float]:
    """The extreme eigenvalues of ``H`` (Ritz values on a projection; ``nan`` without a
    model); notes an ``H`` that is not positive definite, and what a projection can say."""
    if quad is None:
        return math.nan, math.nan
    eig = quad.eig[0]
    h_min, h_max = float(eig.min()), float(eig.max())
    what = "Ritz value" if projected else "eigenvalue"
    if h_min <= 0:  # Ritz values lie inside H's spectrum: a negative one proves it
        _note(
            notes,
            "stationary",
            f"n/a: H at θ_0 is not positive definite (smallest {what} {h_min:.3g}), "
            "θ_0 is not near a minimum",
        )
    elif projected:
        _note(
            notes,
            "stationary",
            "its eigenvalues are Ritz values, inside H's spectrum, so H may have eigenvalues "
            "≤ 0 or above 2/η outside the subspace: SGD's stationary law restricted to it",
        )
    return h_min, h_max


def _entry(name: str, value: float, mean: float, half: float, start_loss: float) -> dict:
    """A prediction entry; ``stationary``'s ``nan`` means no stationary law, not a blow-up."""
    if name == "stationary" and math.isnan(value):
        return {"value": value, "error_ci": math.nan, "unstable": False}
    return prediction_entry(value, mean, half, start_loss=start_loss)


def _baselines(quad: QuadraticModel, *, lr: float, steps: int, batch_size: int) -> dict:
    """Gradient flow, the SDE and exact discrete SGD (Lyapunov) on the quadratic model."""
    return {
        GRADIENT_FLOW: float(ode_test_loss(quad, lr=lr, steps=steps)),
        "SDE": float(sde_test_loss(quad, lr=lr, steps=steps, batch_size=batch_size)),
        "Lyapunov": float(lyapunov_test_loss(quad, lr=lr, steps=steps, batch_size=batch_size)),
    }


def _stationary(quad: QuadraticModel, *, lr, batch_size, h_min, h_max) -> float:
    """``min`` of the quadratic model + ``½tr(HΣ)`` (discrete Lyapunov), or ``nan``."""
    if h_min <= 0 or lr * h_max >= 2:
        return math.nan
    h, v = quad.eig
    g = v.T @ quad.grad
    floor = float(quad.loss - 0.5 * (g**2 / h).sum())
    return floor + float(stationary_excess_loss(quad.hess, quad.cov, lr=lr, batch_size=batch_size))
