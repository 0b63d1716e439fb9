r"""The plan's numbers from the statistics at ``θ_0``: every ``(η, B)`` of a grid, before any run.

From one measurement at the checkpoint (:func:`perturb.measure` with ``resummed=True``,
exact over the population) and the samples' top curvatures, for every learning rate
``η``, batch size ``B`` and horizon:

* **the prediction**: "resummed 3" plus the Hessian ladder (the loss the per-sample
  Hessian fluctuations add, online schedules; :mod:`perturb.experiments.predictors`),
  with the error estimate and the verdict of the one trust rule
  (:meth:`perturb.Statistics.trust`, :mod:`perturb.numeric.trust`) on "resummed 3",
  whose estimate counts the ladder, and its trusted horizon; for multi-epoch schedules
  also the generalization gap ("resummed 2", its own verdict);
* **the instability boundary** per ``(B, T)`` (:func:`instability_boundary`): the
  smallest of GD's edge ``2/h_max`` (largest Ritz value), the mean-square edge (the
  smallest ``η`` at which the per-sample Hessians make the second moment outgrow the
  mean dynamics by :data:`~perturb.numeric.validity.MEAN_SQUARE_EXCESS` e-folds over
  ``T`` steps, :func:`perturb.numeric.validity.mean_square_excess`) and the
  single-sample overshoot edge (the smallest ``η`` at which samples with
  ``ηλ_max(H_i)/B > 2`` are expected to be drawn once in ``T`` steps: with
  ``c = ⌈n/(TB)⌉``, ``2B/λ_{(c)}``, the ``c``-th largest curvature).  These are the
  trust rule's own instability checks, solved for ``η``;
* **the recommendation** per horizon (:func:`recommend`): the lowest predicted loss
  among the trusted points inside the boundary; when none is trusted, no pick, and the
  largest trusted horizon any point inside the boundary reaches;
* **the noise scale** (McCandlish et al. 2018, :class:`NoiseScale`):
  ``B_simple = tr(C)/|G|²``, the critical batch of the quadratic model
  ``B_noise = tr(HC)/GᵀHG`` and its optimal step ``ε_opt(B) = ε_max/(1 + B_noise/B)``,
  ``ε_max = |G|²/GᵀHG``.

A horizon (:class:`Horizon`) is a number of steps ``T``, a sample budget ``T·B``
(``T = S/B``) or a compute budget of ``F`` full-batch gradients over the population of
``n`` rows (``T = Fn/B``), rounded to a whole step (at least one).  For multi-epoch SGD
on ``N`` points the horizon fixes the epochs ``E = round(TB/N)`` (at least one).

Example:
    >>> Horizon("samples", 6400).steps_at(64, population=256)
    100
    >>> Horizon("compute", 25).steps_at(4, population=256)
    1600
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

from perturb.checks import check_int, check_ints, check_lrs, check_positive
from perturb.numeric.adapters import objective
from perturb.numeric.predictions import UnstableDirectionWarning
from perturb.numeric.validity import MEAN_SQUARE_EXCESS, mean_square_excess
from perturb.symbolic.schedules import Epochs, Online, Schedule

__all__ = [
    "HORIZON_KINDS",
    "Horizon",
    "NoiseScale",
    "PlanGrid",
    "default_lrs",
    "grid_rows",
    "instability_boundary",
    "noise_scale",
    "recommend",
    "visible_horizon",
]

HORIZON_KINDS = ("steps", "samples", "compute")
"""A horizon in steps ``T``, in samples ``T·B`` or in full-batch gradients ``T·B/n``."""
_SCAN_PER_DECADE = 8  # rates per decade the mean-square edge is scanned on


@dataclass(frozen=True)
class Horizon:
    """How long SGD runs: ``T`` steps, ``S = T·B`` samples or ``F = T·B/n`` full-batch
    gradients (``kind`` ``"steps"``, ``"samples"``, ``"compute"``), with an optional
    ``label`` for the tables (``E`` epochs of ``N`` points are ``E·N`` samples).

    Example:
        >>> Horizon("steps", 200).describe(), Horizon("compute", 2.5).describe()
        ('T = 200', '2.5 full-batch gradients (T = 2.5·n/B)')
    """

    kind: str
    value: float
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HORIZON_KINDS:
            raise ValueError(f"horizon kind must be one of {HORIZON_KINDS}, got {self.kind!r}")
        if self.kind == "compute":
            object.__setattr__(self, "value", check_positive("compute budget", self.value))
        else:
            object.__setattr__(self, "value", check_int(self.kind, self.value, minimum=1))

    def steps_at(self, batch_size: int, *, population: int) -> int:
        """``T`` at batch size ``B`` (a whole step, at least one)."""
        if self.kind == "steps":
            return int(self.value)
        samples = self.value if self.kind == "samples" else self.value * population
        return max(1, round(samples / batch_size))

    def describe(self) -> str:
        """The horizon as the table heads it (its ``label`` when it has one)."""
        if self.label is not None:
            return self.label
        if self.kind == "steps":
            return f"T = {int(self.value)}"
        if self.kind == "samples":
            return f"T·B = {int(self.value)} samples"
        return f"{self.value:g} full-batch gradients (T = {self.value:g}·n/B)"


@dataclass(frozen=True, kw_only=True)
class PlanGrid:
    """The ``(η, B)`` grid, the horizons and the schedule a plan covers.

    Attributes:
        lrs: learning rates, ascending.
        batch_sizes: batch sizes, ascending.
        horizons: one or more :class:`Horizon`.
        population: ``n``, the rows SGD samples from.
        schedule: ``"online"`` or ``"epochs"``.
        train_size: ``N`` (epochs; every ``B`` must divide it).
        shuffle: reshuffle before each epoch (epochs).

    Example:
        >>> g = PlanGrid(lrs=(0.1, 0.01), batch_sizes=(4, 1), horizons=(Horizon("steps", 10),),
        ...              population=16)
        >>> g.lrs, g.schedule_at(g.horizons[0], 4).steps
        ((0.01, 0.1), 10)
    """

    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    horizons: tuple[Horizon, ...]
    population: int
    schedule: str = "online"
    train_size: int | None = None
    shuffle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(sorted(set(check_lrs(self.lrs)))))
        sizes = check_ints("batch_sizes", self.batch_sizes, minimum=1)
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        horizons = tuple(self.horizons)
        if not horizons or not all(isinstance(h, Horizon) for h in horizons):
            raise ValueError(f"horizons must be one or more Horizon, got {self.horizons!r}")
        object.__setattr__(self, "horizons", horizons)
        check_int("population", self.population, minimum=1)
        if self.schedule not in ("online", "epochs"):
            raise ValueError(f"plan schedule must be online or epochs, got {self.schedule!r}")
        if self.schedule == "epochs":
            n = check_int("train_size", self.train_size, minimum=1) if self.train_size else None
            if n is None:
                raise ValueError("the epochs schedule needs train_size (N), got None")
            bad = [b for b in self.batch_sizes if n % b]
            if bad:
                raise ValueError(f"batch sizes must divide train_size N = {n}, got {bad}")

    def schedule_at(self, horizon: Horizon, batch_size: int) -> Schedule:
        """The numeric schedule run at batch size ``B`` up to ``horizon``."""
        steps = horizon.steps_at(batch_size, population=self.population)
        if self.schedule == "online":
            return Online(steps=steps, batch_size=batch_size)
        epochs = max(1, round(steps * batch_size / self.train_size))
        return Epochs(
            train_size=self.train_size, batch_size=batch_size, epochs=epochs, shuffle=self.shuffle
        )


def default_lrs(stats, *, decades: float = 3.0, per_decade: int = 2) -> tuple[float, ...]:
    """A geometric grid of ``decades·per_decade + 1`` rates ending at GD's edge ``2/h_max``
    (the largest Ritz value of the measured subspace, to two digits), three digits each.

    Raises:
        ValueError: statistics without a Krylov subspace, or no positive Ritz value.

    Example:
        >>> from types import SimpleNamespace
        >>> stats = SimpleNamespace(subspace=SimpleNamespace(ritz_values=lambda: np.array([4.0])))
        >>> default_lrs(stats, decades=1, per_decade=2)
        (0.05, 0.158, 0.5)
    """
    h_max = _largest_curvature(stats)
    if not h_max > 0:
        raise ValueError(
            f"the default learning rates need a positive curvature, got h_max = {h_max:.3g}; "
            "give the learning rates"
        )
    top = float(f"{2 / h_max:.2g}")
    count = check_int("points", round(decades * per_decade), minimum=1)
    return tuple(sorted(float(f"{top * 10 ** (-j / per_decade):.3g}") for j in range(count + 1)))


def _largest_curvature(stats) -> float:
    if getattr(stats, "subspace", None) is None:
        raise ValueError("a plan needs statistics measured with resummed=True, got none")
    return float(np.max(np.asarray(stats.subspace.ritz_values(), dtype=float)))


# ----------------------------------------------------------------------------- noise scale


@dataclass(frozen=True)
class NoiseScale:
    """The gradient noise scale at ``θ_0`` (McCandlish et al. 2018).

    Attributes:
        grad_sq: ``|G|²``.
        trace_cov: ``tr(C)``, the population covariance of the per-sample gradients.
        ghg: ``GᵀHG``.
        trace_hc: ``tr(HC)``.

    Example:
        >>> ns = NoiseScale(grad_sq=2.0, trace_cov=8.0, ghg=1.0, trace_hc=4.0)
        >>> ns.simple, ns.critical, ns.lr_max, ns.lr_at(4)
        (4.0, 4.0, 2.0, 1.0)
    """

    grad_sq: float
    trace_cov: float
    ghg: float
    trace_hc: float

    @property
    def simple(self) -> float:
        """``B_simple = tr(C)/|G|²``."""
        return self.trace_cov / self.grad_sq if self.grad_sq > 0 else math.inf

    @property
    def critical(self) -> float:
        """``B_noise = tr(HC)/GᵀHG``: the critical batch of the quadratic model."""
        return self.trace_hc / self.ghg if self.ghg > 0 else math.nan

    @property
    def lr_max(self) -> float:
        """``ε_max = |G|²/GᵀHG``, the best step without noise (``nan`` if ``GᵀHG ≤ 0``)."""
        return self.grad_sq / self.ghg if self.ghg > 0 else math.nan

    def lr_at(self, batch_size: int) -> float:
        """``ε_opt(B) = ε_max/(1 + B_noise/B)``, the best single step at batch ``B``."""
        return self.lr_max / (1 + self.critical / batch_size)

    def pick(self, batch_sizes: Sequence[int]) -> tuple[float, int]:
        """``(ε_opt(B), B)`` with ``B`` the grid's batch size nearest ``B_simple`` on a log
        scale (clipped to the grid).

        Example:
            >>> NoiseScale(grad_sq=1.0, trace_cov=6.0, ghg=1.0, trace_hc=2.0).pick([1, 4, 16])
            (0.6666666666666666, 4)
        """
        sizes = sorted(batch_sizes)
        target = min(max(self.simple, sizes[0]), sizes[-1])
        b = min(sizes, key=lambda s: abs(math.log(s / target)))
        return self.lr_at(b), int(b)

    def to_dict(self) -> dict[str, float]:
        """The four statistics and what is made of them."""
        return {
            "grad_sq": self.grad_sq,
            "trace_cov": self.trace_cov,
            "ghg": self.ghg,
            "trace_hc": self.trace_hc,
            "b_simple": self.simple,
            "b_critical": self.critical,
            "lr_max": self.lr_max,
        }


def noise_scale(loss_fn_or_model: Any, data: Any, theta0=None, *, stats) -> NoiseScale:
    """:class:`NoiseScale` at ``θ_0``: ``|G|²`` and ``tr(C)`` from the per-sample gradients
    (float64, one vectorized gradient per row), ``GᵀHG`` and ``tr(HC)`` from the measured
    statistics (``"G·H·G"`` and ``"tr(C H)"``, exact over the population).

    Args:
        loss_fn_or_model: as :func:`perturb.measure` (a model, a per-row loss or a
            :class:`perturb.Population`).
        data: its rows.
        theta0: the point.
        stats: the statistics at ``θ_0`` (the test series through order 2 or more).

    Raises:
        KeyError: statistics without ``G·H·G`` or ``tr(C H)``.

    Example:
        >>> import torch, perturb
        >>> xs = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # g_i = θ + x_i: 2 and 4
        >>> pop = perturb.Population(lambda p, x: 0.5 * (p * p).sum() + (x * p).sum(), xs)
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> st = perturb.measure(pop, None, one, order=2, exact=True, progress=False)
        >>> ns = noise_scale(pop, None, one, stats=st)
        >>> ns.grad_sq, ns.trace_cov, round(ns.simple, 4)
        (9.0, 1.0, 0.1111)
    """
    obj = objective(loss_fn_or_model, data, theta0)
    per_row = vmap(grad(obj.single), in_dims=(None, *[0] * len(obj.rows)))
    total = torch.zeros_like(obj.theta0, dtype=torch.float64)
    square = torch.zeros((), dtype=torch.float64)
    for start in range(0, obj.n, 64):
        rows = tuple(r[start : start + 64] for r in obj.rows)
        g = per_row(obj.theta0, *rows).detach().to(torch.float64)
        total += g.sum(0)
        square += (g * g).sum()
    mean = total / obj.n
    grad_sq = float(mean @ mean)
    return NoiseScale(
        grad_sq=grad_sq,
        trace_cov=max(float(square / obj.n) - grad_sq, 0.0),
        ghg=float(stats.value("G·H·G")),
        trace_hc=float(stats.value("tr(C H)")),
    )


# ----------------------------------------------------------------------------- boundary


def _overshoot_edge(curvatures: np.ndarray, *, batch_size: int, steps: int, population: int):
    """The smallest ``η`` at which samples with ``ηλ/B > 2`` are expected to be drawn once."""
    lam = np.sort(np.asarray(curvatures, dtype=float))[::-1]
    count = math.ceil(population / (steps * batch_size))
    if count > len(lam) or not lam[count - 1] > 0:
        return math.inf
    return 2 * batch_size / float(lam[count - 1])


def _crossing(subspace, low: float, high: float, batch: int, steps: int) -> float:
    """The ``η`` in ``[low, high]`` where the mean-square excess over ``steps`` passes
    :data:`~perturb.numeric.validity.MEAN_SQUARE_EXCESS`, by bisection in ``log η``
    (twelve halvings: the bracket shrinks by ``2^{12}`` in ``log η``)."""
    for _ in range(12):
        mid = math.sqrt(low * high)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnstableDirectionWarning)
            value = mean_square_excess(subspace, lr=[mid], steps=steps, batch_size=batch)[0]
        low, high = (low, mid) if value > MEAN_SQUARE_EXCESS else (mid, high)
    return math.sqrt(low * high)


def instability_boundary(
    stats,
    sample_curvatures: Sequence[float] | None,
    *,
    batch_size: int,
    steps: Sequence[int],
    population: int,
    lrs: Sequence[float],
) -> list[dict[str, float]]:
    """The predicted instability boundary at batch ``B`` for each run length in ``steps``.

    Each entry holds ``gd_edge`` (``2/h_max``), ``mean_square`` (the smallest ``η`` whose
    mean-square excess over ``T`` steps passes
    :data:`~perturb.numeric.validity.MEAN_SQUARE_EXCESS` e-folds: the first crossing on
    eight rates per decade from a tenth of ``min(lrs)`` to ten times ``max(lrs)``,
    refined by bisection; ``inf`` beyond the scan or without per-sample Hessians),
    ``overshoot`` (module notes; ``inf`` without curvatures) and ``edge``, the smallest
    of the three.

    Example:
        >>> import torch, perturb
        >>> xs = torch.tensor([[0.5, 1.0], [1.5, -1.0]], dtype=torch.float64)  # H_i = x_0
        >>> pop = perturb.Population(lambda p, x: 0.5 * x[0] * (p * p).sum() + x[1] * p.sum(),
        ...                          xs)
        >>> st = perturb.measure(pop, None, torch.ones(1, dtype=torch.float64), order=3,
        ...                      exact=True, resummed=True, rank=1, progress=False)
        >>> b = instability_boundary(st, [0.5, 1.5], batch_size=1, steps=[10], population=2,
        ...                          lrs=[0.1, 1.0])[0]
        >>> b["gd_edge"], round(b["overshoot"], 4)  # 2/1; 2/1.5 once drawn in 10 steps
        (2.0, 1.3333)
    """
    batch = check_int("batch_size", batch_size, minimum=1)
    h_max = _largest_curvature(stats)
    gd = 2 / h_max if h_max > 0 else math.inf
    low, high = 0.1 * min(lrs), 10 * max(lrs)
    scan = np.geomspace(low, high, max(2, math.ceil(_SCAN_PER_DECADE * math.log10(high / low))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableDirectionWarning)
        per_step = mean_square_excess(stats.subspace, lr=scan, steps=1, batch_size=batch)
    out = []
    for t in steps:
        over = np.flatnonzero(t * per_step > MEAN_SQUARE_EXCESS)
        square = math.inf if not over.size else float(scan[0])
        if over.size and over[0] > 0:
            square = _crossing(stats.subspace, scan[over[0] - 1], scan[over[0]], batch, int(t))
        kick = math.inf
        if sample_curvatures is not None:
            kick = _overshoot_edge(
                sample_curvatures, batch_size=batch, steps=int(t), population=population
            )
        out.append(
            {"gd_edge": gd, "mean_square": square, "overshoot": kick, "edge": min(gd, square, kick)}
        )
    return out


# ----------------------------------------------------------------------------- the grid


def grid_rows(
    stats,
    grid: PlanGrid,
    *,
    sample_curvatures: Sequence[float] | None = None,
    trials: int = 128,
    points: int = 2,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every ``(horizon, B, η)`` of ``grid``: the prediction and its verdict (module notes).

    Args:
        stats: :class:`perturb.Statistics` with a Krylov subspace (``resummed=True``,
            order 3 for the test loss; the gap through 2 edges for epochs).
        grid: the grid.
        sample_curvatures: ``λ_max(H_i)`` of the population's rows (for the overshoot
            check and edge), or ``None``.
        trials: the runs the predictions will be read against (the trust rule's
            resolution).
        points: the run lengths up to ``T`` the trusted horizon is read on
            (:func:`perturb.numeric.trust.horizon_steps`; the default two, ``1`` and
            ``T``, give the verdict at ``T`` at the least cost; :func:`visible_horizon`
            reads it on twelve).

    Returns:
        ``(rows, boundaries)``: a row per ``(horizon, B, η)`` (``horizon`` its index,
        ``lr``, ``batch_size``, ``steps``, ``eta_t``, ``samples``, ``compute``,
        ``predicted``, ``ladder``, ``error_estimate``, ``trusted``, ``trusted_steps``,
        ``trusted_eta_t``, ``edge``, ``beyond_edge``, and for epochs ``gap``,
        ``gap_error_estimate``, ``gap_trusted``), and a boundary per ``(horizon, B)``
        (:func:`instability_boundary` with ``horizon``, ``batch_size``, ``steps``).

    Raises:
        ValueError: statistics without a subspace of three edges.
    """
    sub = getattr(stats, "subspace", None)
    if sub is None or sub.order < 3:
        got = None if sub is None else sub.order
        raise ValueError(
            "a plan needs statistics with a Krylov subspace of three edges (measure with "
            f"resummed=True, order 3), got {got!r}"
        )
    gap = grid.schedule == "epochs" and "gap" in sub.quantities
    n = grid.population
    rows, boundaries = [], []
    for b in grid.batch_sizes:
        schedules = [grid.schedule_at(h, b) for h in grid.horizons]
        edges = instability_boundary(
            stats, sample_curvatures, batch_size=b, steps=[int(s.steps) for s in schedules],
            population=n, lrs=grid.lrs,
        )  # fmt: skip
        for hi, (sched, edge) in enumerate(zip(schedules, edges, strict=True)):
            steps = int(sched.steps)
            boundaries.append({"horizon": hi, "batch_size": b, "steps": steps, **edge})
            trust = stats.trust(
                sched, lr=list(grid.lrs), order=3, resummed=True, trials=trials,
                sample_curvatures=sample_curvatures, points=points,
            )  # fmt: skip
            ladder = np.nan_to_num(trust.checks["hessian_ladder"])
            gap_trust = None
            if gap:
                gap_trust = stats.trust(
                    sched, lr=list(grid.lrs), quantity="gap", order=2, resummed=True,
                    trials=trials, sample_curvatures=sample_curvatures, points=points,
                )  # fmt: skip
            for li, lr in enumerate(grid.lrs):
                row = {
                    "horizon": hi,
                    "lr": float(lr),
                    "batch_size": int(b),
                    "steps": steps,
                    "eta_t": float(lr * steps),
                    "samples": steps * b,
                    "compute": steps * b / n,
                    "predicted": float(trust.value[li] + ladder[li]),
                    "ladder": float(ladder[li]),
                    "error_estimate": float(trust.error_estimate[li]),
                    "trusted": bool(trust.trusted[li]),
                    "trusted_steps": int(trust.trusted_steps[li]),
                    "trusted_eta_t": float(trust.trusted_eta_t[li]),
                    "edge": edge["edge"],
                    "beyond_edge": bool(lr > edge["edge"]),
                }
                if gap_trust is not None:
                    row["gap"] = float(gap_trust.value[li])
                    row["gap_error_estimate"] = float(gap_trust.error_estimate[li])
                    row["gap_trusted"] = bool(gap_trust.trusted[li])
                rows.append(row)
    rows.sort(key=lambda r: (r["horizon"], r["batch_size"], r["lr"]))
    boundaries.sort(key=lambda r: (r["horizon"], r["batch_size"]))
    return rows, boundaries


def visible_horizon(
    stats,
    grid: PlanGrid,
    horizon: int,
    *,
    sample_curvatures: Sequence[float] | None = None,
    trials: int = 128,
) -> dict[str, Any]:
    """The largest trusted horizon at ``grid.horizons[horizon]``: the rows of that horizon
    with their trusted horizon read on twelve run lengths, and the row inside the boundary
    that sees furthest (:func:`recommend`'s ``visible_steps`` and ``visible_at``).

    Example:
        >>> import torch, perturb
        >>> xs = torch.tensor([[0.5, 1.0], [1.5, -1.0]], dtype=torch.float64)
        >>> pop = perturb.Population(lambda p, x: 0.5 * x[0] * (p * p).sum() + x[1] * p.sum(),
        ...                          xs)
        >>> st = perturb.measure(pop, None, torch.ones(1, dtype=torch.float64), order=3,
        ...                      exact=True, resummed=True, rank=1, progress=False)
        >>> g = PlanGrid(lrs=(0.1,), batch_sizes=(1,), horizons=(Horizon("steps", 50),),
        ...              population=2)
        >>> visible_horizon(st, g, 0)["visible_steps"]
        50
    """
    one = PlanGrid(lrs=grid.lrs, batch_sizes=grid.batch_sizes, horizons=(grid.horizons[horizon],),
                   population=grid.population, schedule=grid.schedule,
                   train_size=grid.train_size, shuffle=grid.shuffle)  # fmt: skip
    rows, _ = grid_rows(stats, one, sample_curvatures=sample_curvatures, trials=trials, points=12)
    inside = [r for r in rows if not r["beyond_edge"]] or rows
    seen = max(inside, key=lambda r: (r["trusted_steps"], -r["lr"]))
    return {
        "visible_steps": int(seen["trusted_steps"]),
        "visible_at": [seen["lr"], seen["batch_size"]],
    }


def recommend(rows: Sequence[dict[str, Any]], horizon: int) -> dict[str, Any]:
    """The pick at one horizon: the lowest ``predicted`` among the rows of ``horizon``
    that are trusted and inside the boundary, with the best such ``η`` per batch size.

    When no row is trusted there: ``lr`` and ``batch_size`` are ``None`` and
    ``visible_steps`` is the largest ``trusted_steps`` of a row inside the boundary
    (``visible_at`` its ``(η, B)``): the horizon the plan can see, on the run lengths
    the rows were judged on (:func:`visible_horizon` reads it on twelve).

    Example:
        >>> row = {"horizon": 0, "batch_size": 1, "steps": 10, "error_estimate": 0.01,
        ...        "beyond_edge": False}
        >>> rows = [{**row, "lr": 0.1, "predicted": 1.0, "trusted": True, "trusted_steps": 10},
        ...         {**row, "lr": 0.2, "predicted": 0.5, "trusted": False, "trusted_steps": 5}]
        >>> r = recommend(rows, 0)
        >>> r["lr"], r["batch_size"], r["per_batch"]
        (0.1, 1, {1: 0.1})
    """
    mine = [r for r in rows if r["horizon"] == horizon]
    good = [r for r in mine if r["trusted"] and not r["beyond_edge"]]
    per_batch: dict[int, float] = {}
    for b in sorted({r["batch_size"] for r in good}):
        best = min((r for r in good if r["batch_size"] == b), key=lambda r: r["predicted"])
        per_batch[b] = best["lr"]
    if good:
        best = min(good, key=lambda r: r["predicted"])
        return {
            "horizon": horizon,
            "lr": best["lr"],
            "batch_size": best["batch_size"],
            "steps": best["steps"],
            "predicted": best["predicted"],
            "error_estimate": best["error_estimate"],
            "per_batch": per_batch,
        }
    inside = [r for r in mine if not r["beyond_edge"]] or mine
    seen = max(inside, key=lambda r: (r["trusted_steps"], -r["lr"]))
    return {
        "horizon": horizon,
        "lr": None,
        "batch_size": None,
        "steps": None,
        "predicted": None,
        "error_estimate": None,
        "per_batch": per_batch,
        "visible_steps": int(seen["trusted_steps"]),
        "visible_at": [seen["lr"], seen["batch_size"]],
    }
