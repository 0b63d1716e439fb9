"""The result of a validation: its table, its JSON, and the files of ``--out``.

:class:`ValidationResult` holds what :func:`perturb.validate` produced; its
:meth:`~ValidationResult.table` is what ``perturb validate`` prints, and
:func:`write_outputs` writes ``results.json`` (the run's experiment whole, its settings,
rows, gap and validity), ``results.csv``, ``gap.csv`` and the plots.

Example:
    >>> r = ValidationResult(config={"schedule": "online", "trials": 4})
    >>> r.predictors, r.table().splitlines()[0]
    ([], 'online:')
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perturb.experiments.experiment import Experiment
from perturb.experiments.judging import trial_lines, validity_lines
from perturb.experiments.pipeline import Start, json_ready
from perturb.experiments.predictors import LADDER, krylov_description, ladder_description
from perturb.experiments.validation_curve import CURVE, curve_description

__all__ = ["ValidationResult", "write_outputs"]


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
            subspace), simulating, materializing ``H`` for the SDE (``hessian_s``),
            evaluating every predictor (``predict_s``) and, with the curve, running it
            (``curve_s``).
        curve: the learning curve
            (:meth:`~perturb.numeric.curve.LearningCurve.to_dict` at the run's trials),
            when the experiment asked for it (``None`` otherwise).
        experiment: the experiment that ran, with the values it used for the fields it
            left to the command (``None`` when built by hand).
    """

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, float | None] = field(default_factory=dict)
    gap: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    validity: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: dict[str, Any] | None = None
    experiment: Experiment | None = None

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
        if self.curve is not None:
            lines += [f"{CURVE:>17}: {line}" for line in curve_description(self.curve, self.config)]
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
        """The whole result as strict JSON (``NaN`` and infinities become ``null``); the
        experiment, when known, as ``"experiment"`` (:meth:`Experiment.to_dict`), and the
        learning curve, when there is one, as ``"curve"``."""
        known = {} if self.experiment is None else {"experiment": self.experiment.to_dict()}
        curve = {} if self.curve is None else {"curve": self.curve}
        return json.dumps(
            json_ready(
                {
                    **known,
                    "config": self.config,
                    "rows": self.rows,
                    "breakdown": self.breakdown,
                    "gap": self.gap,
                    "timings": self.timings,
                    "validity": self.validity,
                    **curve,
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


def write_outputs(result: ValidationResult, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.csv``, ``gap.csv`` and the plots (``curve.png``
    with the learning curve) into ``out``.

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
    if result.curve is not None:
        paths.append(_write_curve(result, out, plt))
    return paths


def _write_curve(result: ValidationResult, out: Path, plt) -> Path:
    """``curve.png``: per learning rate, the SGD mean with its 95% band against ``ηt``, the
    learning curve with its error estimate as a band, the noiseless path and the SDE."""
    lrs = sorted({r["lr"] for r in result.rows})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 3.6), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        rows = sorted((r for r in result.rows if r["lr"] == lr), key=lambda r: r["steps"])
        x = np.array([r["eta_t"] for r in rows])
        ax.fill_between(
            x, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color="0.7",
            label="SGD mean, 95% CI",
        )  # fmt: skip
        value = np.array([_shown(r["predictions"]["curve"], "value") for r in rows])
        band = np.array([r["predictions"]["curve"]["error_estimate"] for r in rows])
        band = np.where(np.isfinite(band), band, np.nan)
        ax.plot(x, value, "C0-", label="curve")
        ax.fill_between(x, value - band, value + band, color="C0", alpha=0.2, lw=0,
                        label="curve ± error estimate")  # fmt: skip
        for name, style in (("noiseless path", "C1--"), ("SDE (path)", "C2:")):
            ax.plot(x, [_shown(r["predictions"][name], "value") for r in rows], style, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("ηt")
        ax.set_title(f"η = {lr:g}", fontsize=9)
    axes[0][0].set_ylabel("test loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
