"""Every theory side by side on one run: real SGD against each theory's prediction.

The setting is :func:`perturb.experiments.validation.validate`'s: the population is a fixed set of
``n`` labelled images, online SGD draws its samples uniformly with replacement, and
the test loss is the mean loss over the population, so every statistic at ``θ_0`` is
exact.  For a grid of learning rates ``η``, batch sizes ``B`` and step counts ``T``
the actual value is the mean of ``K`` vectorized SGD trials with a 95% t-interval,
and the predictors are

* ``order d``: perturb's un-resummed series through ``η^d``;
* ``resummed 2``: perturb's re-summed diagrams with up to two edges;
* ``ODE``: gradient flow on the quadratic model at ``θ_0``
  (:func:`perturb.experiments.baselines.ode_test_loss`);
* ``SDE``: seed 001's diffusion with statistics frozen at ``θ_0``
  (:func:`perturb.experiments.baselines.sde_test_loss`);
* ``Lyapunov``: the exact moments of discrete SGD on the same quadratic model with
  constant noise, ``m' = Km − ηG``, ``Σ' = KΣK + (η²/B)C``, ``K = I − ηH``
  (:func:`perturb.experiments.baselines.lyapunov_test_loss`);
* ``stationary``: the ``T → ∞`` limit of ``Lyapunov``, the minimum of the quadratic
  model plus ``½tr(HΣ)`` with ``Σ = KΣK + (η²/B)C``; it exists only when ``H`` is
  positive definite and ``ηh_i < 2`` (near a minimum), and is reported as ``nan``
  otherwise, e.g. at a random initialization where ``H`` has negative eigenvalues.

Each prediction's error is given in units of the interval's half-width.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perturb.experiments.baselines import (
    QuadraticModel,
    lyapunov_test_loss,
    mean_hessian,
    ode_test_loss,
    per_sample_derivatives,
    sde_test_loss,
    stationary_excess_loss,
)
from perturb.experiments.data import load_dataset
from perturb.experiments.models import build_model
from perturb.experiments.simulation import model_loss, simulate
from perturb.numeric.measuring import measure
from perturb.numeric.resummation import resummed_values
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import Online

__all__ = ["Comparison", "compare"]

DEFAULT_LRS = (0.005, 0.02)
DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_STEPS = (25, 50, 100)


@dataclass
class Comparison:
    """The outcome of :func:`compare`.

    Attributes:
        config: the settings of the run.
        predictors: names of the predictors, in table order.
        rows: one record per ``(η, B, T)``: ``lr``, ``batch_size``, ``steps``, ``eta_t``,
            ``actual`` (SGD mean), ``ci_half`` (95% half-width), ``trials`` (finite
            trials), ``divergent``, and ``predictions[name] = {"value", "error_ci"}``
            with ``error_ci = (value − actual)/ci_half``.
        notes: why a predictor is ``nan`` where it is.
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
        lines = [head, "-" * len(head)]
        for r in self.rows:
            actual = "divergent" if r["divergent"] else f"{r['actual']:.5f} ± {r['ci_half']:.5f}"
            cells = []
            for n in self.predictors:
                v, e = r["predictions"][n]["value"], r["predictions"][n]["error_ci"]
                cells.append(f"{v:9.5f} ({e:+6.1f})" if math.isfinite(v) else f"{'n/a':>17}")
            lines.append(
                f"{r['lr']:7.4f} {r['batch_size']:3d} {r['steps']:5d} {r['eta_t']:6.3f} "
                f"{actual:>21} " + " ".join(cells)
            )
        lines += ["", "(error) = (prediction − SGD mean) / CI half-width; |error| > 1: outside."]
        lines += [f"{name}: {why}" for name, why in self.notes.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: config, predictors, rows, notes and timings (``nan`` → ``None``)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(
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
        writer.writerow(base + list(self.predictors) + [f"{n} error_ci" for n in self.predictors])
        for r in self.rows:
            writer.writerow(
                [r[k] for k in base]
                + [r["predictions"][n]["value"] for n in self.predictors]
                + [r["predictions"][n]["error_ci"] for n in self.predictors]
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
                        [r["predictions"][n]["value"] for r in rows],
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
    device: str = "cpu",
    out: str | Path | None = None,
    progress: bool = False,
    max_resummed_parameters: int = 4000,
) -> Comparison:
    """Run SGD on a grid of ``(η, B, T)`` and put every theory's prediction beside it.

    The statistics at ``θ_0`` are exact over the population (:func:`perturb.measure`
    with ``exact=True`` for the diagrams; the loss, per-sample gradients and the
    Hessian for the quadratic model ``l + G·Δ + ½ΔᵀHΔ`` with gradient noise of
    covariance ``C``); the actual values are means of ``trials`` vectorized online-SGD
    runs per ``(η, B)`` (:func:`perturb.simulate`), recorded at every ``T``.  See the
    module docstring for the predictors.

    Args:
        dataset: ``"digits"`` (built in), ``"fashion-mnist"``, ``"cifar10"`` or
            ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits).
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
        device: ``"cpu"`` or ``"cuda"``.
        out: folder for ``compare.json``, ``compare.csv`` and ``compare.png``.
        progress: show progress bars.
        max_resummed_parameters: largest model for the re-summed predictor.

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: on an empty or malformed grid, ``trials < 2`` or orders outside 0..4.

    Example:
        >>> from perturb.experiments.models import mlp
        >>> softmax = mlp((1, 8, 8), 10, hidden=())  # softmax regression, 650 parameters
        >>> r = compare(model=softmax, lrs=(0.01,), batch_sizes=(2,), steps=(3,), trials=4,
        ...             orders=(1,), population=16)
        >>> r.predictors
        ['order 1', 'resummed 2', 'ODE', 'SDE', 'Lyapunov', 'stationary']
        >>> len(r.rows), r.rows[0]["batch_size"]
        (1, 2)
    """
    _check(
        lrs=lrs,
        batch_sizes=batch_sizes,
        steps=steps,
        trials=trials,
        orders=orders,
        population=population,
    )
    lrs, batch_sizes, steps = tuple(lrs), tuple(sorted(set(batch_sizes))), tuple(sorted(set(steps)))
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
    data = load_dataset(dataset, data_dir=data_dir, split="train")
    if population < len(data):
        data = data.subset(population, seed=seed)
    x, y = data.x.to(device), data.y.to(device)
    net = (
        build_model(model, data.input_shape, data.num_classes, seed=seed)
        if isinstance(model, str)
        else model
    ).to(device)
    loss_fn, theta0 = model_loss(net)
    config["parameters"] = int(theta0.numel())
    schedules = {(b, s): Online(steps=s, batch_size=b) for b in batch_sizes for s in steps}

    start = time.perf_counter()
    top = max(orders)
    stats = measure(
        net,
        (x, y),
        order=top,
        schedules=list(schedules.values()),
        quantities=("test",),
        exact=True,
        dtype=torch.float32,
        progress=progress,
    )
    timings["measure_s"] = time.perf_counter() - start

    start = time.perf_counter()
    every = math.gcd(*steps)
    runs = {
        b: simulate(
            loss_fn,
            theta0,
            (x, y),
            Online(steps=max(steps), batch_size=b),
            lr=list(lrs),
            trials=trials,
            seed=seed + 1000 * i,
            record_every=every,
            device=device,
            dtype=torch.float32,
            progress=progress,
        )
        for i, b in enumerate(batch_sizes)
    }
    timings["simulate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    theta64, x64 = theta0.detach().to(torch.float64), x.to(torch.float64)
    derivs = per_sample_derivatives(loss_fn, theta64, x64, y)
    hess = mean_hessian(loss_fn, theta0.detach().float(), x.float(), y).to(torch.float64)
    quad = QuadraticModel.from_derivatives(derivs, hess)
    eigh = quad.eig
    do_resum = resummed and theta0.numel() <= max_resummed_parameters
    predictors = [f"order {d}" for d in orders] + (["resummed 2"] if do_resum else [])
    predictors += ["ODE", "SDE", "Lyapunov", "stationary"]
    result = Comparison(config=config, predictors=predictors, timings=timings)
    h_min, h_max = float(eigh[0].min()), float(eigh[0].max())
    if h_min <= 0:
        result.notes["stationary"] = (
            f"n/a: H at θ_0 is not positive definite (smallest eigenvalue {h_min:.3g}), "
            "θ_0 is not near a minimum"
        )
    for b in batch_sizes:
        means, sems = runs[b].curve_mean()
        index = {s: k for k, s in enumerate(runs[b].steps)}
        finite = runs[b].finite
        for s in steps:
            sched = schedules[(b, s)]
            by_order = np.cumsum(
                stats.predict(sched, lr=list(lrs), quantity="test", order=top).by_order, axis=1
            )
            terms = resummed_terms(2, sched) if do_resum else None
            for li, lr in enumerate(lrs):
                values = {f"order {d}": float(by_order[li, d]) for d in orders}
                if do_resum:
                    parts = resummed_values(
                        terms,
                        derivs,
                        lr=lr,
                        steps=s,
                        schedule=sched,
                        means={2: hess},
                        eigh=eigh,
                    )
                    values["resummed 2"] = float(sum(parts))
                values["ODE"] = float(ode_test_loss(quad, lr=lr, steps=s))
                values["SDE"] = float(sde_test_loss(quad, lr=lr, steps=s, batch_size=b))
                values["Lyapunov"] = float(lyapunov_test_loss(quad, lr=lr, steps=s, batch_size=b))
                values["stationary"] = _stationary(
                    quad, lr=lr, batch_size=b, h_min=h_min, h_max=h_max
                )
                mean, sem = float(means[li, index[s]]), float(sems[li, index[s]])
                n = int(finite[li])
                half = _half_width(sem, n)
                result.rows.append(
                    {
                        "lr": float(lr),
                        "batch_size": int(b),
                        "steps": int(s),
                        "eta_t": float(lr * s),
                        "actual": mean,
                        "ci_half": half,
                        "trials": n,
                        "divergent": bool(runs[b].is_divergent[li]),
                        "predictions": {
                            name: {
                                "value": v,
                                "error_ci": (v - mean) / half if half > 0 else math.nan,
                            }
                            for name, v in values.items()
                        },
                    }
                )
    if math.isfinite(h_min) and h_min > 0:
        bad = [lr for lr in lrs if lr * h_max >= 2]
        if bad:
            result.notes["stationary"] = f"n/a at η = {bad}: ηh_max ≥ 2, no stationary law"
    result.rows.sort(key=lambda r: (r["lr"], r["batch_size"], r["steps"]))
    timings["predict_s"] = time.perf_counter() - start
    if out is not None:
        result.write(out)
    return result


def _half_width(sem: float, n: int) -> float:
    from scipy import stats as st

    return float(st.t.ppf(0.975, n - 1) * sem) if n > 1 else math.nan


def _stationary(quad: QuadraticModel, *, lr, batch_size, h_min, h_max) -> float:
    """``min`` of the quadratic model + ``½tr(HΣ)`` (discrete Lyapunov), or ``nan``."""
    if h_min <= 0 or lr * h_max >= 2:
        return math.nan
    h, v = quad.eig
    g = v.T @ quad.grad
    floor = float(quad.loss - 0.5 * (g**2 / h).sum())
    return floor + float(stationary_excess_loss(quad.hess, quad.cov, lr=lr, batch_size=batch_size))


def _check(*, lrs, batch_sizes, steps, trials, orders, population) -> None:
    if not lrs or any(
        isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
        for v in lrs
    ):
        raise ValueError(f"lrs must be positive finite numbers, got {lrs!r}")
    for name, grid in (("batch_sizes", batch_sizes), ("steps", steps)):
        if not grid or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid):
            raise ValueError(f"{name} must be positive integers, got {grid!r}")
    for name, value, low in (("trials", trials, 2), ("population", population, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not orders or any(
        isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 4 for d in orders
    ):
        raise ValueError(f"orders must be integers in 0..4, got {orders!r}")
