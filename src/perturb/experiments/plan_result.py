"""What :func:`perturb.plan` returns: the plan as a table, JSON, CSV and a heat map.

A :class:`Plan` holds, per horizon, a row per ``(η, B)`` (the prediction, its error
estimate and verdict, the instability boundary and, after ``--check``, the actual mean
with its interval), the recommendation, the noise scale and the range tests beside it,
the check's regrets and divergences, and the costs.  :meth:`Plan.write` puts
``plan.json``, ``plan.csv`` and ``plan.png`` in a folder at once
(:func:`perturb.experiments.outputs.staged`).

Example:
    >>> p = Plan(grid={"lrs": [0.1], "batch_sizes": [1], "horizons": [
    ...     {"kind": "steps", "value": 10, "text": "T = 10"}], "population": 4,
    ...     "schedule": "online"})
    >>> p.recommendation(0) is None
    True
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

from perturb.experiments.outputs import staged
from perturb.experiments.pipeline import Start, is_unstable, json_ready

__all__ = ["PLAN_FILES", "Plan"]

PLAN_FILES = ("plan.json", "plan.csv", "plan.png")
"""The files :meth:`Plan.write` puts in its folder."""
_PICK_NAMES = {
    "plan": "plan (best trusted)",
    "noise scale": "noise scale (B_simple, ε_opt)",
    "range test at noise B": "range test at that B",
    "range test min/10 at noise B": "range test, min/10, at that B",
}


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _shown(value: float | None, start: float) -> float:
    """A loss as the heat map colours it: ``nan`` (grey) when missing or blown up."""
    if value is None or is_unstable(value, start):
        return math.nan
    return float(value)


def _edge(value: float) -> str:
    return "∞" if value == math.inf else f"{value:.3g}"


def _lr(value: Any) -> str:
    return "—" if value is None else f"{value:.3g}"


@dataclass(frozen=True)
class Plan:
    """The outcome of :func:`perturb.plan`.

    Attributes:
        experiment: the experiment run (:meth:`perturb.experiments.experiment.Experiment.to_dict`).
        settings: the plan's own settings (horizon budgets, grid defaults, range test,
            check).
        start: where every run starts (:class:`~perturb.experiments.pipeline.Start`).
        grid: ``lrs``, ``batch_sizes``, ``horizons`` (``kind``, ``value``, ``text``),
            ``population``, ``schedule``, ``train_size``, ``shuffle``.
        rows: a row per ``(horizon, B, η)``
            (:func:`~perturb.experiments.plan_grid.grid_rows`), with ``actual``,
            ``ci_half``, ``diverged`` and ``flagged`` after a check.
        boundaries: per ``(horizon, B)``: ``gd_edge``, ``mean_square``, ``overshoot``
            and ``edge``, the smallest.
        recommendations: per horizon (:func:`~perturb.experiments.plan_grid.recommend`).
        noise: the noise scale (:class:`~perturb.experiments.plan_grid.NoiseScale`) and
            its pick.
        range_tests: per batch size (:class:`~perturb.experiments.range_test.RangeTest`).
        check: per horizon, after ``--check``
            (:func:`~perturb.experiments.plan_check.score`); ``None`` without.
        costs: full-batch gradient equivalents: ``planning`` (timed), ``range_tests``
            (counted), per horizon ``grid_search`` (counted, the grid search's SGD
            steps) and the seconds behind them.
        timings: seconds per stage.
    """

    experiment: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    boundaries: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, Any] = field(default_factory=dict)
    range_tests: list[dict[str, Any]] = field(default_factory=list)
    check: list[dict[str, Any]] | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def recommendation(self, horizon: int) -> tuple[float, int] | None:
        """``(η, B)`` recommended at ``horizon`` (an index), or ``None``."""
        if horizon >= len(self.recommendations):
            return None
        rec = self.recommendations[horizon]
        return None if rec["lr"] is None else (rec["lr"], rec["batch_size"])

    # ------------------------------------------------------------------ text

    def table(self) -> str:
        """The plan as text: per horizon an ``η × B`` table and what the plan picks."""
        lines = []
        if self.start and not Start(**self.start).is_default:
            lines.append(Start(**self.start).describe())
        for hi, horizon in enumerate(self.grid["horizons"]):
            if hi or lines:
                lines.append("")
            lines += self._horizon_lines(hi, horizon)
        lines += ["", *self._tool_lines(), *self._cost_lines()]
        return "\n".join(lines)

    def _matrix(self, hi: int, cell) -> list[str]:
        sizes = self.grid["batch_sizes"]
        head = f"{'η':>9} " + " ".join(f"{f'B = {b}':>19}" for b in sizes)
        lines = [head, "-" * len(head)]
        for lr in self.grid["lrs"]:
            cells = []
            for b in sizes:
                row = self._row(hi, b, lr)
                cells.append(f"{cell(row):>19}")
            lines.append(f"{lr:9.4g} " + " ".join(cells))
        return lines

    def _row(self, hi: int, b: int, lr: float) -> dict[str, Any]:
        return next(
            r for r in self.rows if r["horizon"] == hi and r["batch_size"] == b and r["lr"] == lr
        )

    def _horizon_lines(self, hi: int, horizon: dict[str, Any]) -> list[str]:
        g = self.grid
        what = f"{g['schedule']}" + (f", N = {g['train_size']}" if g.get("train_size") else "")
        start = self.start.get("loss", math.nan)
        lines = [
            f"horizon {horizon['text']} ({what}; n = {g['population']}): predicted test loss "
            "(resummed 3 + Hessian ladder) ± error estimate",
            "  * trusted, ! beyond the predicted instability boundary, ~ blown up",
        ]

        def predicted(r):
            if is_unstable(r["predicted"], start):
                return "~"
            mark = ("*" if r["trusted"] else " ") + ("!" if r["beyond_edge"] else " ")
            return f"{r['predicted']:.4f}±{_num(r['error_estimate'], 2)}{mark}"

        lines += self._matrix(hi, predicted)
        if any("gap" in r for r in self.rows):

            def gap(r):
                mark = "*" if r["gap_trusted"] else " "
                return f"{r['gap']:.4f}±{_num(r['gap_error_estimate'], 2)}{mark} "

            lines += ["predicted generalization gap (resummed 2) ± error estimate, * trusted"]
            lines += self._matrix(hi, gap)
        bounds = [b for b in self.boundaries if b["horizon"] == hi]
        lines.append(
            "instability boundary η (mean-square | overshoot | GD 2/h_max; ∞: none): "
            + "; ".join(
                f"B = {b['batch_size']}: {_edge(b['edge'])} ({_edge(b['mean_square'])} | "
                f"{_edge(b['overshoot'])} | {_edge(b['gd_edge'])})"
                for b in bounds
            )
        )
        rec = self.recommendations[hi]
        if rec["lr"] is not None:
            lines.append(
                f"recommendation: η = {_lr(rec['lr'])}, B = {rec['batch_size']} (T = "
                f"{rec['steps']}): predicted {rec['predicted']:.4f} ± "
                f"{_num(rec['error_estimate'], 2)}, trusted"
            )
        else:
            eta, b = rec["visible_at"]
            lines.append(
                f"recommendation: none: no trusted prediction reaches {horizon['text']}; the "
                f"plan sees to T = {rec['visible_steps']} (η = {_lr(eta)}, B = {b})"
            )
        if self.check is not None:
            lines += ["", *self._check_lines(hi)]
        return lines

    def _check_lines(self, hi: int) -> list[str]:
        report = self.check[hi]

        def actual(r):
            if r["diverged"]:
                return "diverged" + ("(flagged)" if r["flagged"] else "(MISSED)")
            return f"{r['actual']:.4f}±{r['ci_half']:.4f}"

        trials = self.experiment.get("trials")
        lines = [f"--check: SGD mean test loss ± 95% CI ({trials} trials per point)"]
        lines += self._matrix(hi, actual)
        best = report["best"]
        lines.append(
            "best grid point: "
            + (
                "none (every point diverged)"
                if best is None
                else f"η = {_lr(best['lr'])}, B = {best['batch_size']}: "
                f"{best['actual']:.4f} ± {best['ci_half']:.4f}"
            )
        )
        lines.append(
            f"{'pick':>32} {'η':>9} {'B':>3} {'SGD mean ± 95% CI':>20} {'regret (half-widths)':>21}"
        )
        for name, p in report["picks"].items():
            label = _PICK_NAMES.get(name, name)
            if p["lr"] is None:
                lines.append(f"{label:>32} {'—':>9} {'—':>3} {'no pick':>20}")
                continue
            if "actual" not in p:
                lines.append(f"{label:>32} {_lr(p['lr']):>9} {p['batch_size']:3d} {'not run':>20}")
                continue
            mean = "diverged" if p["diverged"] else f"{p['actual']:.4f} ± {p['ci_half']:.4f}"
            lines.append(
                f"{label:>32} {_lr(p['lr']):>9} {p['batch_size']:3d} {mean:>20} "
                f"{p['regret']:>+21.2f}"
            )
        unflagged = ", ".join(f"(η = {_lr(a)}, B = {b})" for a, b in report["unflagged"])
        lines.append(
            f"diverged grid points: {report['diverged_points']} of {report['grid_points']}, "
            f"{report['flagged_points']} flagged (beyond the boundary or one grid step from it)"
            + (f"; not flagged: {unflagged}" if unflagged else "")
        )
        return lines

    def _tool_lines(self) -> list[str]:
        ns = self.noise
        lines = [
            f"noise scale (McCandlish et al. 2018): B_simple = tr(C)/|G|² = "
            f"{_num(ns.get('b_simple'), 3)}, critical batch B_noise = tr(HC)/GᵀHG = "
            f"{_num(ns.get('b_critical'), 3)}, ε_max = |G|²/GᵀHG = {_num(ns.get('lr_max'), 3)}; "
            f"pick: B = {ns.get('pick_batch_size')} (nearest B_simple), "
            f"η = ε_max/(1 + B_noise/B) = {_lr(ns.get('pick_lr'))}"
        ]
        picks = ", ".join(
            f"B = {r['batch_size']}: {_lr(r['pick'])}" + (" (stopped early)" * r["stopped_early"])
            for r in self.range_tests
        )
        lines.append(
            "learning-rate range test (Lightning lr_find: one run, η from "
            f"{self.settings.get('range_test', {}).get('min_lr', '?')} to "
            f"{self.settings.get('range_test', {}).get('max_lr', '?')}; pick: steepest descent "
            f"of the smoothed loss): {picks}"
        )
        return lines

    def _cost_lines(self) -> list[str]:
        c = self.costs
        if not c:
            return []
        lines = [
            f"cost in full-batch gradients (one gradient over the n = {self.grid['population']} "
            f"rows, {_num(c.get('gradient_seconds'), 3)} s here): planning "
            f"{_num(c.get('planning'), 4)} (timed: {_num(c.get('planning_seconds'), 3)} s), "
            f"range tests {_num(c.get('range_tests'), 4)} (counted)"
        ]
        for hi, grid_cost in enumerate(c.get("grid_search", [])):
            text = self.grid["horizons"][hi]["text"]
            ratio = c["planning"] / grid_cost if grid_cost else math.nan
            lines.append(
                f"  grid search at {text}: {_num(grid_cost, 4)} (counted SGD steps, "
                f"{self.experiment.get('trials')} trials per point); planning / grid search = "
                f"{_num(ratio, 3)}"
            )
        if "simulate_seconds" in c:
            lines.append(
                f"  the check's simulation took {c['simulate_seconds']:.1f} s "
                f"({_num(c['simulate_seconds'] / c['gradient_seconds'], 4)} timed gradients)"
            )
        return lines

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``nan`` and ``inf`` → ``None``); ``config`` names the command and its
        settings, so that ``perturb plan --config plan.json`` reads the experiment back
        (:meth:`perturb.experiments.experiment.Experiment.load`)."""
        return json_ready(
            {
                "config": {"command": "plan", "settings": self.settings},
                "experiment": self.experiment,
                "settings": self.settings,
                "start": self.start,
                "grid": self.grid,
                "rows": self.rows,
                "boundaries": self.boundaries,
                "recommendations": [
                    {**r, "per_batch": {str(k): v for k, v in r["per_batch"].items()}}
                    for r in self.recommendations
                ],
                "noise": self.noise,
                "range_tests": self.range_tests,
                "check": self.check,
                "costs": self.costs,
                "timings": self.timings,
            }
        )

    def to_csv(self) -> str:
        """The rows as CSV, one line per ``(horizon, B, η)``."""
        keys = ["horizon", "lr", "batch_size", "steps", "eta_t", "samples", "compute"]
        keys += ["predicted", "ladder", "error_estimate", "trusted", "trusted_steps"]
        keys += ["trusted_eta_t", "edge", "beyond_edge", "gap", "gap_error_estimate"]
        keys += ["gap_trusted", "actual", "ci_half", "diverged", "flagged"]
        keys = [k for k in keys if any(k in r for r in self.rows)]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(keys)
        for r in self.rows:
            writer.writerow([r.get(k, "") for k in keys])
        return buf.getvalue()

    def write(self, out: str | Path) -> list[Path]:
        """Write :data:`PLAN_FILES` into ``out``, all at once (and only when all are
        written; ``out`` is checked and locked first).

        Returns:
            The paths written.
        """
        with staged(out, known=PLAN_FILES) as folder:
            (folder / "plan.json").write_text(json.dumps(self.to_dict(), indent=2))
            (folder / "plan.csv").write_text(self.to_csv())
            self.heatmap(folder / "plan.png")
        return [Path(out) / name for name in PLAN_FILES]

    def heatmap(self, path: str | Path) -> Path:
        """Draw the plan: per horizon a heat map of the predicted loss over ``η × B``
        (trusted cells outlined, the instability boundary as a line, the picks marked)
        and, after a check, the actual one beside it (diverged cells crossed).

        Returns:
            ``path``.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lrs, sizes = self.grid["lrs"], self.grid["batch_sizes"]
        horizons = self.grid["horizons"]
        cols = 2 if self.check is not None else 1
        width = 1.8 + 0.7 * len(lrs)
        height = 1.4 + 0.45 * len(sizes)
        fig, axes = plt.subplots(len(horizons), cols, squeeze=False,
                                 figsize=(width * cols, height * len(horizons) + 0.5))  # fmt: skip
        start = self.start.get("loss", math.nan)
        for hi, horizon in enumerate(horizons):
            panels = [("predicted", "predicted test loss")]
            if cols == 2:
                panels.append(("actual", "SGD mean test loss (--check)"))
            grids = {
                key: np.array(
                    [[_shown(self._row(hi, b, lr).get(key), start) for lr in lrs] for b in sizes]
                )
                for key, _ in panels
            }
            finite = np.concatenate([v[np.isfinite(v)] for v in grids.values()])
            low = float(finite.min()) if finite.size else 0.0
            high = start if math.isfinite(start) and start > low else low + 1.0
            for ci, (key, title) in enumerate(panels):
                ax = axes[hi, ci]
                cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
                image = ax.imshow(np.clip(grids[key], low, high), origin="lower", aspect="auto",
                                  cmap=cmap, vmin=low, vmax=high)  # fmt: skip
                fig.colorbar(image, ax=ax, fraction=0.05, label=f"test loss (≥ {high:.3g} clipped)")
                self._decorate(ax, hi, key)
                ax.set_title(f"{title}, {horizon['text']}\n(trusted cells outlined; grey: blown "
                             "up or not run)", fontsize=9)  # fmt: skip
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def _decorate(self, ax, hi: int, key: str) -> None:
        """Axes, the trusted cells, the boundary and the picks on one panel."""
        from matplotlib.patches import Rectangle

        lrs, sizes = self.grid["lrs"], self.grid["batch_sizes"]
        ax.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs], fontsize=7, rotation=45)
        ax.set_yticks(range(len(sizes)), [str(b) for b in sizes], fontsize=7)
        ax.set_xlabel("learning rate η")
        ax.set_ylabel("batch size B")
        for j, b in enumerate(sizes):
            for i, lr in enumerate(lrs):
                r = self._row(hi, b, lr)
                if r["trusted"]:
                    ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, lw=1.5,
                                           ec="white"))  # fmt: skip
                if key == "actual" and r.get("diverged"):
                    ax.plot(i, j, "rx", ms=9, mew=2)
        edges = [self._position(b["edge"]) for b in self.boundaries if b["horizon"] == hi]
        xs = [x for x in edges for _ in (0, 1)]
        ys = [j + d for j in range(len(sizes)) for d in (-0.5, 0.5)]
        ax.plot(xs, ys, color="red", lw=2, label="instability boundary")
        rec = self.recommendations[hi]
        if rec["lr"] is not None:
            ax.plot(lrs.index(rec["lr"]), sizes.index(rec["batch_size"]), "w*", ms=14,
                    mec="k", label="plan")  # fmt: skip
        rt = [(self._position(r["pick"]), sizes.index(r["batch_size"])) for r in self.range_tests]
        if rt:
            ax.plot(*zip(*rt, strict=True), "c^", ms=7, mec="k", ls="", label="range test")
        if self.noise.get("pick_lr") is not None:
            ax.plot(self._position(self.noise["pick_lr"]),
                    sizes.index(self.noise["pick_batch_size"]), "mD", ms=7, mec="k",
                    label="noise scale")  # fmt: skip

    def _position(self, lr: float | None) -> float:
        """``lr``'s position on the categorical ``η`` axis (log-interpolated, clipped)."""
        lrs = np.log(np.asarray(self.grid["lrs"], dtype=float))
        if lr is None or not math.isfinite(lr) or lr <= 0:
            return len(lrs) - 0.5
        return float(np.interp(math.log(lr), lrs, np.arange(len(lrs)), left=-0.5,
                               right=len(lrs) - 0.5))  # fmt: skip
