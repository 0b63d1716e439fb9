"""Every theory side by side on one run: real SGD against each theory's prediction.

The setting is :func:`perturb.experiments.validation.validate`'s: the population is a fixed set of
``n`` labelled images, online SGD draws its samples uniformly with replacement, and
the test loss is the mean loss over the population, so every statistic at ``θ_0`` is
exact.  For a grid of learning rates ``η``, batch sizes ``B`` and step counts ``T``
the actual value is the mean of ``K`` vectorized SGD trials with a 95% t-interval,
and the predictors are

* ``order d``: perturb's un-resummed series through ``η^d``;
* ``resummed 2``: perturb's re-summed diagrams with up to two edges;
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

Each prediction's error is given in units of the interval's half-width; a prediction
that blew up (not finite, or far outside what the loss can be,
:func:`perturb.experiments.pipeline.is_unstable`) is shown as ``unstable``.  The runs
start at the model's seeded initialization, or at a checkpoint, optionally after
full-batch gradient descent on the population (``checkpoint``, ``pretrain``).  The
theories on the quadratic model need the materialized Hessian and are skipped, with a
note, for models over ``max_hessian_parameters``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from perturb.checks import check_int, check_ints, check_lrs, check_orders
from perturb.experiments.baselines import (
    QuadraticModel,
    lyapunov_test_loss,
    ode_test_loss,
    sde_test_loss,
    stationary_excess_loss,
)
from perturb.experiments.pipeline import (
    DEFAULT_PRETRAIN_LR,
    Quadratic,
    Start,
    curve_intervals,
    json_ready,
    load_population,
    measure_at_start,
    prediction_entry,
    quadratic_model,
    resummed_prediction,
    run_trials,
    series_predictions,
    start_point,
    timed,
)
from perturb.symbolic.schedules import Online

__all__ = ["Comparison", "compare"]

DEFAULT_LRS = (0.005, 0.02)
DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_STEPS = (25, 50, 100)
GRADIENT_FLOW = "gradient flow"
"""The gradient-flow predictor's name: the ODE ``dθ/dt = −∇l`` on the quadratic model."""
QUADRATIC = (GRADIENT_FLOW, "SDE", "Lyapunov", "stationary")
"""The theories on the quadratic model at ``θ_0`` (they need the materialized Hessian)."""


@dataclass
class Comparison:
    """The outcome of :func:`compare`.

    Attributes:
        config: the settings of the run (``start``: the loss ``l(θ_0)``, gradient norm
            ``‖G‖``, checkpoint and pretraining of the start).
        predictors: names of the predictors, in table order.
        rows: one record per ``(η, B, T)``: ``lr``, ``batch_size``, ``steps``, ``eta_t``,
            ``actual`` (SGD mean), ``ci_half`` (95% half-width), ``trials`` (finite
            trials), ``divergent``, and ``predictions[name] = {"value", "error_ci",
            "unstable"}`` with ``error_ci = (value − actual)/ci_half`` and ``unstable``
            whether the value blew up (shown as ``unstable``).
        notes: why a predictor is ``nan`` where it is, or not available at all.
        timings: seconds spent measuring, simulating and predicting.
    """

    config: dict[str, Any]
    predictors: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

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
        lines += [f"{name}: {why}" for name, why in self.notes.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: config, predictors, rows, notes and timings (``nan`` → ``None``)."""

        return json_ready(
            {
                "config": self.config,
                "predictors": self.predictors,
                "rows": self.rows,
                "notes": self.notes,
                "timings": self.timings,
            }
        )

    def to_csv(self) -> str:
        """The rows as CSV text: one column per predictor value and per error."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        base = ["lr", "batch_size", "steps", "eta_t", "actual", "ci_half", "trials", "divergent"]
        names = list(self.predictors)
        writer.writerow(
            base + names + [f"{n} error_ci" for n in names] + [f"{n} unstable" for n in names]
        )
        for r in self.rows:
            writer.writerow(
                [r[k] for k in base]
                + [r["predictions"][n]["value"] for n in names]
                + [r["predictions"][n]["error_ci"] for n in names]
                + [r["predictions"][n]["unstable"] for n in names]
            )
        return buf.getvalue()

    def write(self, out: str | Path) -> list[Path]:
        """Write ``compare.json``, ``compare.csv`` and ``compare.png`` into ``out``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
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


def compare(
    *,
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    model: str | torch.nn.Module = "smooth-convnet",
    lrs: tuple[float, ...] = DEFAULT_LRS,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    steps: tuple[int, ...] = DEFAULT_STEPS,
    trials: int = 128,
    orders: tuple[int, ...] = (1, 2, 3),
    resummed: bool = True,
    seed: int = 0,
    population: int = 256,
    checkpoint: str | Path | None = None,
    pretrain: int = 0,
    pretrain_lr: float = DEFAULT_PRETRAIN_LR,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = False,
    max_resummed_parameters: int = 4000,
    max_hessian_parameters: int = 4000,
) -> Comparison:
    """Run SGD on a grid of ``(η, B, T)`` and put every theory's prediction beside it.

    The statistics at ``θ_0`` are exact over the population (:func:`perturb.measure`
    with ``exact=True`` for the diagrams; the loss, per-sample gradients and the
    Hessian for the quadratic model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise of
    covariance ``C``); the actual values are means of ``trials`` vectorized online-SGD
    runs per ``(η, B)`` (:func:`perturb.simulate`), recorded at every ``T``.  See the
    module docstring for the predictors.

    Args:
        dataset: ``"digits"`` (built in), ``"mnist1d"`` (generated offline),
            ``"fashion-mnist"``, ``"cifar10"`` or ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits, mnist1d).
        model: ``"smooth-convnet"``, ``"mlp"``, ``"pkg.module:factory"``, or a network
            (an ``nn.Module`` taking the dataset's inputs, moved to ``device``).
        lrs: learning rates ``η``.
        batch_sizes: batch sizes ``B``.
        steps: step counts ``T`` (one run per ``(η, B)`` is recorded at each).
        trials: SGD runs per ``(η, B)`` (at least 2).
        orders: orders of perturb's un-resummed series to report (0..4).
        resummed: also report the re-summed diagrams with up to two edges (models with
            at most ``max_resummed_parameters`` parameters).
        seed: seed of the initialization, the population subset and the trials.
        population: number of images in the population.
        checkpoint: start from this weights-only ``state_dict`` of ``model`` instead
            of its seeded initialization.
        pretrain: first take this many steps of full-batch gradient descent on the
            population (deterministic); every run starts where it ends.
        pretrain_lr: their learning rate.
        device: ``"cpu"`` or ``"cuda"``.
        out: folder for ``compare.json``, ``compare.csv`` and ``compare.png``.
        progress: show progress bars.
        max_resummed_parameters: largest model for the re-summed predictor.
        max_hessian_parameters: largest model for the theories on the quadratic model
            (gradient flow, SDE, Lyapunov, stationary), which materialize ``H``.

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: on an empty or malformed grid, ``trials < 2``, orders outside 0..4,
            or pretraining that diverged.
        FileNotFoundError: a ``checkpoint`` that does not exist.
        perturb.errors.ModelSpecError: a checkpoint that is no state dict of ``model``.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> softmax = mlp((1, 8, 8), 10, hidden=())  # softmax regression, 650 parameters
        >>> r = compare(model=softmax, lrs=(0.01,), batch_sizes=(2,), steps=(3,), trials=4,
        ...             orders=(1,), population=16)
        >>> r.predictors
        ['order 1', 'resummed 2', 'gradient flow', 'SDE', 'Lyapunov', 'stationary']
        >>> len(r.rows), r.rows[0]["batch_size"]
        (1, 2)
    """
    lrs = check_lrs(lrs)
    batch_sizes = tuple(sorted(set(check_ints("batch_sizes", batch_sizes, minimum=1))))
    steps = tuple(sorted(set(check_ints("steps", steps, minimum=1))))
    trials = check_int("trials", trials, minimum=2)
    orders = check_orders(orders)
    population = check_int("population", population, minimum=1)
    config = {
        "dataset": dataset,
        "model": model if isinstance(model, str) else type(model).__name__,
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
    config["parameters"] = p = setup.parameters
    schedules = {(b, s): Online(steps=s, batch_size=b) for b in batch_sizes for s in steps}

    top = max(orders)
    with timed(timings, "measure_s"):
        stats = measure_at_start(
            setup, order=top, schedules=list(schedules.values()), progress=progress
        )

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
            )
            for i, b in enumerate(batch_sizes)
        }

    with timed(timings, "predict_s"):
        notes: dict[str, str] = {}
        quadratic = p <= max_hessian_parameters
        do_resum = resummed and quadratic and p <= max_resummed_parameters
        if not quadratic:
            why = f"needs the materialized Hessian: {p} parameters > max_hessian_parameters"
            for name in (["resummed 2"] if resummed else []) + list(QUADRATIC):
                notes[name] = f"not available ({why} = {max_hessian_parameters})"
        elif resummed and not do_resum:
            notes["resummed 2"] = (
                f"not available ({p} parameters > max_resummed_parameters = "
                f"{max_resummed_parameters})"
            )
        quad = quadratic_model(setup, progress=progress) if quadratic else None
        predictors = [f"order {d}" for d in orders] + (["resummed 2"] if do_resum else [])
        predictors += list(QUADRATIC) if quadratic else []
        result = Comparison(config=config, predictors=predictors, notes=notes, timings=timings)
        h_min, h_max = _spectrum(quad, result.notes)
        grid = [(b, s) for b in batch_sizes for s in steps]
        for b, s in tqdm(grid, desc="predict", unit="(B, T)", disable=not progress):
            means, halves, column = curve_intervals(runs[b])
            sched = schedules[(b, s)]
            columns = series_predictions(stats, sched, lrs, orders=orders)
            if do_resum:
                columns["resummed 2"] = resummed_prediction(quad, sched, lrs)
            for li, lr in enumerate(lrs):
                values = {name: float(v[li]) for name, v in columns.items()}
                if quad is not None:
                    values.update(_baselines(quad.model, lr=lr, steps=s, batch_size=b))
                    values["stationary"] = _stationary(
                        quad.model, lr=lr, batch_size=b, h_min=h_min, h_max=h_max
                    )
                mean, half = float(means[li, column[s]]), float(halves[li, column[s]])
                result.rows.append(
                    {
                        "lr": float(lr),
                        "batch_size": int(b),
                        "steps": int(s),
                        "eta_t": float(lr * s),
                        "actual": mean,
                        "ci_half": half,
                        "trials": int(runs[b].finite[li]),
                        "divergent": bool(runs[b].is_divergent[li]),
                        "predictions": {
                            name: _entry(name, v, mean, half, start.loss)
                            for name, v in values.items()
                        },
                    }
                )
        if quad is not None and math.isfinite(h_min) and h_min > 0:
            bad = [lr for lr in lrs if lr * h_max >= 2]
            if bad:
                result.notes["stationary"] = f"n/a at η = {bad}: ηh_max ≥ 2, no stationary law"
        result.rows.sort(key=lambda r: (r["lr"], r["batch_size"], r["steps"]))
    if out is not None:
        result.write(out)
    return result


def _spectrum(quad: Quadratic | None, notes: dict[str, str]) -> tuple[float, float]:
    """The extreme eigenvalues of ``H`` (``nan`` without it); notes a ``H`` not positive."""
    if quad is None:
        return math.nan, math.nan
    eig = quad.model.eig[0]
    h_min, h_max = float(eig.min()), float(eig.max())
    if h_min <= 0:
        notes["stationary"] = (
            f"n/a: H at θ_0 is not positive definite (smallest eigenvalue {h_min:.3g}), "
            "θ_0 is not near a minimum"
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
