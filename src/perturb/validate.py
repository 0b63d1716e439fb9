"""Validation: predicted test loss against the mean of many real SGD runs.

The setting is the theory's own, with nothing left to estimate: the *population*
is a fixed set of ``n`` labelled images; SGD draws its samples from it uniformly
with replacement (online SGD), and the test loss is the mean loss over the
population, so the diagram values measured exactly over the population at
``θ_0`` (:func:`perturb.measure.measure` with ``exact=True``) give the exact
coefficients of the η-series of ``E[test loss]``.  Each predictor is evaluated at
every learning rate and at every recorded step ``t``; the actual value is the mean
of ``K`` vectorized SGD trials (:func:`perturb.simulate.simulate`) with a 95%
t-interval.

Predictors, all from statistics at ``θ_0``:

* ``order d``: the un-resummed series through ``η^d``;
* ``resummed 2``: the re-summed diagrams with up to two edges (edges carry
  ``η(I − ηH)^{Δt−1}``), exact through a full eigendecomposition of ``H``
  (models with a few thousand parameters);
* ``ODE``: the noiseless diagrams (every part a single node) through the highest
  order;
* ``SDE``: the diffusion with statistics frozen at ``θ_0``, integrated from its
  moment equations (:mod:`perturb.baselines`).

For each predictor the report gives its error in units of the interval's half-width
and the smallest ``ηt`` at which it leaves the interval.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from perturb.baselines import QuadraticModel, sde_test_loss
from perturb.data import load_dataset
from perturb.measure import measure
from perturb.models import build_model
from perturb.resum import resummed_terms, resummed_values
from perturb.schedules import Online
from perturb.simulate import model_loss, simulate

__all__ = ["ValidationResult", "validate"]

DEFAULT_LRS = (0.002, 0.005, 0.01, 0.02, 0.05)


@dataclass
class ValidationResult:
    """Everything a validation run produced.

    Attributes:
        config: the settings of the run.
        rows: one record per (learning rate, recorded step): ``lr``, ``steps``,
            ``eta_t``, ``actual``, ``ci_low``, ``ci_high``, ``divergent``, and for each
            predictor its ``value`` and ``error_ci`` (error over the interval's
            half-width).
        breakdown: per predictor, the smallest ``ηt`` from which on it stays outside
            the interval at every later recorded step of that learning rate (``None``
            if never): a single excursion, expected for 5% of the rows from sampling
            alone, does not count.
        timings: seconds spent measuring, simulating and predicting.
    """

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, float | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def predictors(self) -> list[str]:
        """Names of the predictors, in report order."""
        return list(self.breakdown)

    def table(self) -> str:
        """A plain-text table: one line per (η, t)."""
        names = self.predictors
        head = f"{'η':>7} {'t':>5} {'ηt':>6} {'SGD mean ± 95% CI':>22} " + " ".join(
            f"{n:>16}" for n in names
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            half = (r["ci_high"] - r["ci_low"]) / 2
            actual = "divergent" if r["divergent"] else f"{r['actual']:.5f} ± {half:.5f}"
            cells = []
            for n in names:
                v, e = r["predictions"][n]["value"], r["predictions"][n]["error_ci"]
                cells.append(f"{v:9.5f} ({e:+5.1f})" if math.isfinite(v) else f"{'nan':>16}")
            lines.append(
                f"{r['lr']:7.4f} {r['steps']:5d} {r['eta_t']:6.3f} {actual:>22} " + " ".join(cells)
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
        return "\n".join(lines)

    def to_json(self) -> str:
        """The whole result as JSON."""
        return json.dumps(
            {
                "config": self.config,
                "rows": self.rows,
                "breakdown": self.breakdown,
                "timings": self.timings,
            },
            indent=2,
        )


def _hessian(loss_fn, theta0: torch.Tensor, x, y, *, chunk: int = 64) -> torch.Tensor:
    """The mean Hessian by Hessian-vector products in chunks (P HVPs)."""

    def mean_loss(p):
        return loss_fn(p, x, y).mean()

    def hvp(v):
        return jvp(grad(mean_loss), (theta0,), (v,))[1]

    eye = torch.eye(theta0.numel(), dtype=theta0.dtype)
    rows = [vmap(hvp)(eye[i : i + chunk]) for i in range(0, len(eye), chunk)]
    h = torch.cat(rows)
    return (h + h.T) / 2


def validate(
    *,
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    model: str = "smooth-convnet",
    lrs: tuple[float, ...] = DEFAULT_LRS,
    steps: int = 100,
    batch_size: int = 1,
    trials: int = 256,
    orders: tuple[int, ...] = (0, 1, 2, 3),
    resummed: bool = True,
    seed: int = 0,
    population: int = 256,
    records: int = 5,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = True,
    max_resummed_parameters: int = 4000,
) -> ValidationResult:
    """Predict SGD's test loss and compare with the mean of ``trials`` real runs.

    Args:
        dataset: ``"digits"`` (built in), ``"fashion-mnist"``, ``"cifar10"`` or
            ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits).
        model: ``"smooth-convnet"``, ``"mlp"`` or ``"pkg.module:factory"``.
        lrs: learning rates.
        steps: ``T``, online SGD steps.
        batch_size: ``B``.
        trials: ``K`` SGD runs per learning rate.
        orders: orders of the un-resummed series to report.
        resummed: also report the re-summed prediction with up to two edges (needs a
            materialized Hessian: models with at most ``max_resummed_parameters``).
        seed: seed of the model's initialization, the population subset and the trials.
        population: number of images in the population (a deterministic subset).
        records: number of recorded steps (evenly spaced, ending at ``T``).
        device: ``"cpu"`` or ``"cuda"``.
        out: folder for ``results.json``, ``results.csv`` and PNG plots.
        progress: show progress bars.
        max_resummed_parameters: largest model for the re-summed predictor.

    Returns:
        A :class:`ValidationResult`.

    Example:
        >>> r = validate(lrs=(0.01,), steps=4, trials=8, orders=(0, 1), population=16,
        ...              records=1, progress=False, resummed=False)
        >>> sorted(r.breakdown)
        ['ODE', 'SDE', 'order 0', 'order 1']
    """
    _check(
        lrs=lrs,
        steps=steps,
        batch_size=batch_size,
        trials=trials,
        orders=orders,
        population=population,
        records=records,
    )
    config = {
        "dataset": dataset,
        "model": model,
        "lrs": list(lrs),
        "steps": steps,
        "batch_size": batch_size,
        "trials": trials,
        "orders": list(orders),
        "resummed": resummed,
        "seed": seed,
        "population": population,
        "device": device,
        "schedule": "online",
    }
    timings: dict[str, float] = {}
    data = load_dataset(dataset, data_dir=data_dir, split="train")
    if population < len(data):
        data = data.subset(population, seed=seed)
    x, y = data.x.to(device), data.y.to(device)
    net = build_model(model, data.input_shape, data.num_classes, seed=seed).to(device)
    loss_fn, theta0 = model_loss(net)
    config["parameters"] = int(theta0.numel())
    record_steps = sorted({max(1, round(steps * (i + 1) / records)) for i in range(records)})

    start = time.perf_counter()
    top = max(orders)
    stats = measure(
        net,
        (x, y),
        order=top,
        schedules=[Online(steps=s, batch_size=batch_size) for s in record_steps],
        quantities=("test",),
        exact=True,
        dtype=torch.float32,
        progress=progress,
    )
    timings["measure_s"] = time.perf_counter() - start

    start = time.perf_counter()
    trials_out = simulate(
        loss_fn,
        theta0,
        (x, y),
        Online(steps=steps, batch_size=batch_size),
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
    theta64 = theta0.detach().to(torch.float64)
    x64 = x.to(torch.float64)
    losses = loss_fn(theta64, x64, y)
    grads = vmap(
        grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None]).sum()), in_dims=(None, 0, 0)
    )(theta64, x64, y)
    hess = _hessian(loss_fn, theta0.detach().float(), x.float(), y).to(torch.float64)
    quad = QuadraticModel.from_derivatives({0: losses, 1: grads}, hess)
    eigh = torch.linalg.eigh(hess)
    predictions: dict[str, dict[int, np.ndarray]] = {}
    for s in record_steps:
        sched = Online(steps=s, batch_size=batch_size)
        pred = stats.predict(sched, lr=list(lrs), quantity="test", order=top)
        cumulative = np.cumsum(pred.by_order, axis=1)
        for d in orders:
            predictions.setdefault(f"order {d}", {})[s] = cumulative[:, d]
        predictions.setdefault("ODE", {})[s] = _ode(stats, sched, lrs, top)
        predictions.setdefault("SDE", {})[s] = np.array(
            [float(sde_test_loss(quad, lr=lr, steps=s, batch_size=batch_size)) for lr in lrs]
        )
        if resummed and theta0.numel() <= max_resummed_parameters:
            terms = resummed_terms(2, sched)
            predictions.setdefault("resummed 2", {})[s] = np.array(
                [
                    float(
                        sum(
                            resummed_values(
                                terms,
                                {0: losses, 1: grads},
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
    if out is not None:
        write_outputs(result, Path(out))
    return result


def _record_every(record_steps: list[int]) -> int:
    every = record_steps[0]
    for s in record_steps:
        every = math.gcd(every, s)
    return every


def _ode(stats, sched, lrs, top: int) -> np.ndarray:
    """The noiseless (c = 0) diagrams: every part a single node."""
    from perturb.series import series

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
            row = {
                "lr": float(lr),
                "steps": int(s),
                "eta_t": float(lr * s),
                "actual": mean,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "divergent": bool(trials.is_divergent[li]),
                "predictions": {},
            }
            for name, by_step in predictions.items():
                value = float(by_step[s][li])
                error = (value - mean) / half if half > 0 else float("nan")
                row["predictions"][name] = {"value": value, "error_ci": error}
                if not row["divergent"]:
                    errors.setdefault((name, li), []).append((lr * s, abs(error)))
            result.rows.append(row)
    result.rows.sort(key=lambda r: (r["lr"], r["steps"]))
    for (name, _), series in errors.items():
        # leaves for good: outside at this ηt and at every later recorded step of this η
        for i, (eta_t, _err) in enumerate(series):
            if all(e > 1 for _, e in series[i:]):
                prev = exits[name]
                exits[name] = eta_t if prev is None else min(prev, eta_t)
                break
    result.breakdown = exits


def write_outputs(result: ValidationResult, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.csv`` and the plots into ``out``."""
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
    return paths


def _check(*, lrs, steps, batch_size, trials, orders, population, records) -> None:
    if not lrs or any(
        not isinstance(v, int | float) or not math.isfinite(v) or v <= 0 for v in lrs
    ):
        raise ValueError(f"lrs must be positive finite numbers, got {lrs!r}")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("trials", trials),
        ("population", population),
        ("records", records),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if trials < 2:
        raise ValueError(f"trials must be at least 2 for a confidence interval, got {trials}")
    if not orders or any(not isinstance(d, int) or d < 0 or d > 4 for d in orders):
        raise ValueError(f"orders must be integers in 0..4, got {orders!r}")
