r"""Learning curves: SGD's expected loss at every step of a run, re-expanded as the weights move.

Every other predictor of perturb expands around ``θ_0`` with the statistics frozen there.
The curve follows the *noiseless path* instead and carries the noise along it:

1. **The path.**  GD on the population at the same ``η``,
   ``θ̄_{t+1} = θ̄_t − η∇l(θ̄_t)``, is run exactly (one full-batch gradient a step).  It is
   every noiseless diagram re-summed: ``l(θ̄_t)`` is what SGD would reach without noise.
2. **The statistics along it.**  At checkpoints ``t_0 = 0 < t_1 < …`` (geometric in
   ``ηt``, :attr:`CurveSettings.per_decade` a decade from :attr:`CurveSettings.first`) a
   Krylov subspace of ``H(θ̄_{t_j})`` is built (:func:`perturb.numeric.krylov.krylov_subspace`,
   started from the gradient and random combinations of the centred per-sample
   gradients) and the per-sample gradients, per-sample Hessians and the mean third
   derivative are projected on it.
3. **The noise.**  Between checkpoints the mean shift ``δ = E θ_t − θ̄_t`` and the
   covariance ``M`` of ``θ_t`` follow the exact second-moment recursion of online SGD
   about the path (:mod:`perturb.numeric.path_noise`): gradient noise, the per-sample
   Hessian ladder and mixed cumulant with the per-sample gradients moved along the path,
   and the third derivative's pull on the mean.  The noise the subspace does not span
   is carried apart, between two bounds over every curvature spectrum it could have
   (:class:`~perturb.numeric.path_noise.OutsideNoise`, measured by
   :func:`outside_noise`).  The prediction is
   ``l(θ̄_t) + g_t·δ + ½ tr(H_t (M + δδᵀ))`` plus the midpoint of those bounds.

On a quadratic population (any per-sample ``H_i`` and gradients, in any correlation) with
a subspace that spans the path's Krylov space, this is SGD's exact expected loss at every
``t`` and ``B``.  One path serves every batch size.

**Error estimate** (before any run): the subspace's ``k`` vs ``k/2`` difference of the
noise term, outside share included (nothing when the subspace is the whole space), plus
the outside share's half-width (its bounds' half-difference and its probes' standard
error), plus the noise term continued geometrically, ``r/(1 − r)`` times it, with ``r``
the relative size of what a Gaussian, linearly moving noise leaves out
(:meth:`~perturb.numeric.path_noise.Segment.nonlinearity`: the mean third derivative
across the spread against ``‖H‖``, and the per-sample third derivatives along the top
curvature direction against the gradient noise there), plus the loss the basis changes
dropped.  **Trusted**
is :func:`perturb.numeric.trust.trust_mask` on it, with the resolution from the predicted
spread of the loss across runs.

**Baselines** carried by the same run: ``path`` (``l(θ̄_t)``, GD at the same ``η``) and,
when :attr:`CurveSettings.sde` is set, the path-following SDE (gradient flow by Heun's
method, the linearized diffusion along it with the same statistics).

**Cost** (:attr:`LearningCurve.cost`, full-batch-gradient equivalents): ``T`` gradients a
learning rate for the path (``2T`` more for the SDE's flow), and per checkpoint ``k``
Hessian-vector products, ``n`` per-sample gradients, ``n·k_3`` per-sample
Hessian-vector products, ``k_3(k_3+1)/2`` third-derivative products and one per-sample
third derivative along the top direction (counted as 4 gradients), and for the outside
share, :attr:`CurveSettings.outside_probes` weighted gradients and twice as many
Hessian-vector products (for ``k`` and ``k/2``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from perturb.checks import check_int, check_positive
from perturb.numeric.adapters import Objective, objective
from perturb.numeric.derivatives import derivative, summed, vmap_rows
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.path_noise import (
    NoiseState,
    OutsideNoise,
    SdeState,
    Segment,
    segment_from,
)
from perturb.numeric.row_passes import per_sample_projected, row_chunks, weighted_gradient
from perturb.numeric.trust import resolution, trust_mask

__all__ = ["CurveSettings", "LearningCurve", "checkpoint_steps", "learning_curve", "outside_noise"]


@dataclass(frozen=True, kw_only=True)
class CurveSettings:
    """How a learning curve is measured.

    Attributes:
        rank: ``k``, the Krylov subspace at each checkpoint.
        higher_rank: ``k_3 ≤ k``, the per-sample Hessians and third derivative's rank
            (16: from a fresh initialization the third derivative's pull needs it, 8 left a
            third of the noise's effect out; docs/curves.md).
        probes: random combinations of centred per-sample gradients in the Krylov start.
        outside_probes: fresh random combinations that measure the noise the subspace
            leaves out (:class:`~perturb.numeric.path_noise.OutsideNoise`; ``0``: leave
            it out of the prediction too).
        first: ``ηt`` of the first checkpoint after ``t = 0``.
        per_decade: checkpoints a decade of ``ηt`` after the first.
        sde: also run the path-following SDE (its gradient flow costs ``2T`` gradients).
        chunk_size: rows per vectorized call (default: the Krylov module's).
        seed: seed of the Krylov probes.

    Example:
        >>> CurveSettings(rank=16).higher_rank
        16
    """

    rank: int = 32
    higher_rank: int = 16
    probes: int = 4
    outside_probes: int = 8
    first: float = 0.1
    per_decade: int = 4
    sde: bool = True
    chunk_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("rank", self.rank, minimum=1)
        check_int("higher_rank", self.higher_rank, minimum=1)
        check_int("probes", self.probes)
        check_int("outside_probes", self.outside_probes)
        check_positive("first", self.first)
        check_int("per_decade", self.per_decade, minimum=1)
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, minimum=1)
        if not isinstance(self.sde, bool):
            raise TypeError(f"sde must be a bool, got {self.sde!r}")


def checkpoint_steps(lr: float, steps: int, *, first: float, per_decade: int) -> list[int]:
    """Where the statistics are measured again: ``0`` and the steps nearest
    ``ηt = first·10^{j/per_decade}`` below ``steps``.

    Example:
        >>> checkpoint_steps(0.1, 100, first=0.1, per_decade=1)
        [0, 1, 10]
    """
    out, j = {0}, 0
    while True:
        t = max(1, round(first * 10 ** (j / per_decade) / lr))
        if t >= steps:
            return sorted(out)
        out.add(t)
        j += 1


@dataclass(frozen=True, eq=False)
class LearningCurve:
    """Predicted ``E[l(θ_t)]`` of online SGD at every recorded step.

    Attributes:
        steps: the recorded steps, ``(S,)``.
        lr: learning rates, ``(L,)``.
        batch_sizes: ``(N_B,)``.
        start_loss: ``l(θ_0)``.
        path: ``l(θ̄_t)`` on the noiseless path (GD at ``η``), ``(L, S)``.
        curve: the prediction, ``(L, N_B, S)``.
        error_estimate: its estimate, ``(L, N_B, S)``.
        spread: the predicted standard deviation of the loss across runs, ``(L, N_B, S)``.
        outside: the share of ``curve`` from the noise the subspace leaves out,
            ``(L, N_B, S)`` (:class:`~perturb.numeric.path_noise.OutsideNoise`).
        sde: the path-following SDE, ``(L, N_B, S)``, or ``None``.
        flow: ``l`` on the gradient-flow path, ``(L, S)``, or ``None``.
        checkpoints: the checkpoint steps per learning rate.
        settings: the :class:`CurveSettings`.
        cost: full-batch-gradient equivalents and seconds.
    """

    steps: np.ndarray
    lr: np.ndarray
    batch_sizes: np.ndarray
    start_loss: float
    path: np.ndarray
    curve: np.ndarray
    error_estimate: np.ndarray
    spread: np.ndarray
    outside: np.ndarray
    sde: np.ndarray | None
    flow: np.ndarray | None
    checkpoints: tuple[tuple[int, ...], ...]
    settings: CurveSettings
    cost: dict[str, float]

    def trusted(self, trials: int = 1) -> np.ndarray:
        """The one trust rule (:func:`perturb.numeric.trust.trust_mask`) at every point,
        read at the resolution of the mean of ``trials`` runs, ``(L, N_B, S)``."""
        trials = check_int("trials", trials, minimum=1)
        return trust_mask(
            self.error_estimate,
            self.curve,
            start_loss=self.start_loss,
            resolution=resolution(self.spread, trials=trials),
        )

    def trusted_steps(self, trials: int = 1) -> np.ndarray:
        """The last recorded step before the first untrusted one, ``(L, N_B)``
        (``0``: not even the first)."""
        ok = self.trusted(trials)
        out = np.zeros(ok.shape[:2], dtype=int)
        for i, j in np.ndindex(*ok.shape[:2]):
            bad = np.flatnonzero(~ok[i, j])
            last = (bad[0] - 1) if len(bad) else len(self.steps) - 1
            out[i, j] = self.steps[last] if last >= 0 else 0
        return out

    def to_dict(self, trials: int = 1) -> dict[str, Any]:
        """JSON-ready: lists, ``None`` for non-finite numbers."""

        def clean(a):
            if a is None:
                return None
            a = np.asarray(a, dtype=float)
            return np.where(np.isfinite(a), a, np.nan).tolist()

        def nulls(x):
            if isinstance(x, list):
                return [nulls(v) for v in x]
            return None if isinstance(x, float) and math.isnan(x) else x

        return {
            "steps": [int(s) for s in self.steps],
            "lr": [float(v) for v in self.lr],
            "batch_sizes": [int(b) for b in self.batch_sizes],
            "start_loss": self.start_loss,
            "path": nulls(clean(self.path)),
            "curve": nulls(clean(self.curve)),
            "error_estimate": nulls(clean(self.error_estimate)),
            "spread": nulls(clean(self.spread)),
            "outside": nulls(clean(self.outside)),
            "sde": nulls(clean(self.sde)),
            "flow": nulls(clean(self.flow)),
            "trials": trials,
            "trusted": self.trusted(trials).tolist(),
            "trusted_steps": self.trusted_steps(trials).tolist(),
            "checkpoints": [list(c) for c in self.checkpoints],
            "settings": asdict(self.settings),
            "cost": dict(self.cost),
        }


def _value_and_gradient(
    obj: Objective, theta: torch.Tensor, chunk: int
) -> tuple[float, torch.Tensor]:
    """``l(θ)`` and ``∇l(θ)`` over the population, chunked (plain autograd: one backward
    pass a chunk)."""
    point = theta.detach().requires_grad_(True)
    total, value = torch.zeros_like(theta), 0.0
    with torch.enable_grad():
        for s in row_chunks(obj.n, chunk):
            part = obj.batch(point, *(r[s] for r in obj.rows)).sum()
            (g,) = torch.autograd.grad(part, point)
            total, value = total + g, value + float(part.detach())
    return value / obj.n, total / obj.n


def outside_noise(
    obj: Objective, bases: Sequence[torch.Tensor], *, probes: int, seed: int, chunk: int
) -> list[tuple[float, float, float]]:
    r"""What each basis ``Q`` leaves out of the gradient noise at ``obj.theta0``:
    ``(a, b, se(b))`` with ``a = tr C − tr(QᵀCQ)`` and ``b = tr(H (C − ΠCΠ))``.

    Each probe is a fresh centred combination ``s = n^{-1/2} Σ_i σ_i (∇l_i − ∇l)``
    (Rademacher ``σ``, one weighted gradient), so ``E ssᵀ = C``; with ``r = s − Πs``,
    ``E|r|² = a`` and ``E[rᵀHr + 2 (Πs)ᵀHr] = b`` (one Hessian-vector product a probe and
    basis).  ``se(b)`` is the probes' standard error (``inf`` with one probe).

    Example:
        >>> from perturb.numeric.adapters import objective
        >>> x = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]],
        ...                  dtype=torch.float64)          # C = diag(1, 4), H = I
        >>> obj = objective(lambda p, x: (p * p).sum() / 2 + (x * p).sum(), x,
        ...                 torch.zeros(2, dtype=torch.float64))
        >>> q, whole = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.eye(2).double()
        >>> (a, b, se), rest = outside_noise(obj, [q, whole], probes=400, seed=0, chunk=4)
        >>> round(a, 1), round(se, 2), a == b, rest   # E a = C_22 = 4; H = I: b = a
        (3.7, 0.23, True, (0.0, 0.0, 0.0))
    """
    probes = check_int("probes", probes, minimum=1)
    chunk = check_int("chunk", chunk, minimum=1)
    n, theta = obj.n, obj.theta0
    vector = derivative(summed(obj.batch), vector=True)

    def total(us: tuple[torch.Tensor, ...]) -> torch.Tensor:
        acc = torch.zeros_like(theta)
        for s in row_chunks(n, chunk):
            acc = acc + vector(theta, tuple(r[s] for r in obj.rows), us)
        return acc

    gen = torch.Generator().manual_seed(seed + 1)  # not the Krylov start's signs
    combos = []
    for _ in range(probes):
        signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(theta.device, theta.dtype)
        combos.append(weighted_gradient(obj, (signs - signs.mean()) / math.sqrt(n), chunk))
    s = torch.stack(combos, dim=1)  # (P, probes)
    out = []
    for q in bases:
        inside = q @ (q.T @ s)
        rest = s - inside
        hr = vmap(lambda u: total((u,)), in_dims=1)(rest).T / n
        a = (rest * rest).sum(0).to("cpu", torch.float64)
        b = (rest * hr + 2 * inside * hr).sum(0).to("cpu", torch.float64)
        se = float(b.std() / math.sqrt(probes)) if probes > 1 else math.inf
        out.append((float(a.mean()), float(b.mean()), se))
    return out


def _segment(obj: Objective, theta: torch.Tensor, settings: CurveSettings, cost: dict) -> Segment:
    """Measure the statistics at ``θ`` (see the module notes)."""
    rank = min(settings.rank, obj.size)
    at = replace(obj, theta0=theta.detach())
    sub = krylov_subspace(
        at,
        None,
        rank=rank,
        order=3,
        higher_rank=min(settings.higher_rank, rank),
        probes=min(settings.probes, max(rank - 1, 0)),
        seed=settings.seed,
        chunk_size=settings.chunk_size,
        per_sample_gradients=True,
    )
    n = obj.n
    c = sub.cost
    cost["checkpoints"] += (
        c["gradients"]
        + 2 * c["hvps"]
        + c["per_sample_gradients"] / n
        + 2 * c["per_sample_hvps"] / n
        + 3 * c["mean_higher_derivatives"]
    )
    seg = segment_from(
        theta, sub.basis, sub.hessian, sub.derivs[1], sub.derivs.get(2), sub.means.get(3)
    )
    cost["checkpoints"] += 4  # the per-sample third derivatives along one direction
    u = torch.as_tensor(seg.top, dtype=sub.basis.dtype, device=sub.basis.device)
    top = (sub.basis @ u).detach()
    chunk = settings.chunk_size or vmap_rows(obj.size, itemsize=theta.element_size(), order=3)
    third = per_sample_projected(at, top[:, None], (top, top), chunk)  # J_i[u, u, u]
    rms = float(third.detach().to("cpu", torch.float64).pow(2).mean().sqrt())
    return replace(seg, top_third=rms)


def _measured_outside(
    obj: Objective, segs: tuple[Segment, Segment], settings: CurveSettings, chunk: int, cost: dict
) -> tuple[Segment, Segment]:
    """Both segments (rank ``k`` and ``k/2``) with what their bases leave out of the noise."""
    at = replace(obj, theta0=segs[0].theta)
    found = outside_noise(
        at, [s.basis for s in segs], probes=settings.outside_probes, seed=settings.seed,
        chunk=chunk,
    )  # fmt: skip
    cost["checkpoints"] += settings.outside_probes * (1 + 2 * len(segs))
    return tuple(
        replace(s, outside_trace=a, outside_curvature=b, outside_error=e)
        for s, (a, b, e) in zip(segs, found, strict=True)
    )


def learning_curve(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    lr: Sequence[float],
    steps: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    settings: CurveSettings | None = None,
    loss: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> LearningCurve:
    r"""Predict online SGD's expected loss at every step of ``steps`` (see the module notes).

    The rows of ``data`` are the population: SGD draws ``B`` of them iid a step and the
    loss is their mean (as in :func:`perturb.predict` and ``perturb validate``).

    Args:
        loss_fn_or_model: an ``nn.Module`` (with ``data = (x, y)``), a per-row
            ``loss_fn(params, *row)``, a :class:`perturb.Population` (``data=None``) or an
            :class:`~perturb.numeric.adapters.Objective`.
        data: the rows.
        theta0: the start (a model's own parameters by default).
        lr: learning rates ``η``.
        steps: the steps to record (``0 ≤ t``, any order); the run is ``max(steps)`` long.
        batch_sizes: ``B``s; one path serves them all.
        settings: a :class:`CurveSettings` (default ``CurveSettings()``).
        loss: per-sample loss of a model's output (default cross-entropy).
        device: where the network is evaluated.
        dtype: float64 (default) or float32 for the network evaluations.

    Returns:
        A :class:`LearningCurve`.

    Raises:
        ValueError: non-positive learning rates or batch sizes, no or negative steps.
        TypeError: ``settings`` that is not a :class:`CurveSettings`.

    Example:
        One parameter, ``l_x(θ) = θ²/2 + xθ`` with ``x = ±1``: the path decays as
        ``(1 − η)^t`` and the noise adds ``½ η² Σ_s (1 − η)^{2s}``, exactly:

        >>> import torch, perturb
        >>> pop = perturb.Population(lambda p, x: 0.5 * (p * p).sum() + (x * p).sum(),
        ...                          torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
        >>> c = learning_curve(pop, None, torch.ones(1, dtype=torch.float64), lr=[0.5],
        ...                    steps=[0, 1, 2], settings=CurveSettings(rank=1, sde=False))
        >>> c.path.round(4).tolist(), c.curve.round(4).tolist()
        ([[0.5, 0.125, 0.0312]], [[[0.5, 0.25, 0.1875]]])
    """
    settings = CurveSettings() if settings is None else settings
    if not isinstance(settings, CurveSettings):
        raise TypeError(f"settings must be a CurveSettings, got {type(settings).__name__}")
    lrs = [check_positive("lr", float(v)) for v in np.asarray(lr, dtype=float).reshape(-1)]
    if not lrs:
        raise ValueError("lr must hold at least one learning rate, got none")
    sizes = [check_int("batch_size", b, minimum=1) for b in batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes must hold at least one batch size, got none")
    recorded = sorted({check_int("step", s) for s in steps})
    if not recorded:
        raise ValueError("steps must hold at least one step, got none")
    if isinstance(loss_fn_or_model, Objective):
        obj = loss_fn_or_model if theta0 is None else replace(loss_fn_or_model, theta0=theta0)
    else:
        obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    chunk = settings.chunk_size or 256
    horizon = recorded[-1]
    shape = (len(lrs), len(sizes), len(recorded))
    path = np.full(shape[::2], np.nan)
    flow = np.full(shape[::2], np.nan) if settings.sde else None
    curve, estimate, spread = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    outside = np.full(shape, np.nan)
    sde = np.full(shape, np.nan) if settings.sde else None
    cost = {"path": 0.0, "flow": 0.0, "checkpoints": 0.0}
    started = time.perf_counter()
    start_loss, _ = _value_and_gradient(obj, obj.theta0, chunk)
    checkpoints = []
    whole_space = min(settings.rank, obj.size) == obj.size  # nothing for k/2 to miss
    for i, eta in enumerate(lrs):
        marks = checkpoint_steps(
            eta, max(horizon, 1), first=settings.first, per_decade=settings.per_decade
        )
        checkpoints.append(tuple(marks))
        theta, flow_theta = obj.theta0.clone(), obj.theta0.clone()
        seg = half = None
        col = 0
        for t in range(horizon + 1):
            if t in marks:
                new = _segment(obj, theta, settings, cost)
                new_half = new.truncated(max(1, new.rank // 2), max(1, new.higher_rank // 2))
                if settings.outside_probes and not whole_space:
                    new, new_half = _measured_outside(obj, (new, new_half), settings, chunk, cost)
                if seg is None:
                    state = NoiseState.start(new, lr=eta, batch_sizes=sizes)
                    small = NoiseState.start(new_half, lr=eta, batch_sizes=sizes)
                    out = OutsideNoise.start(lr=eta, batch_sizes=sizes)
                    small_out = OutsideNoise.start(lr=eta, batch_sizes=sizes)
                    diffusion = SdeState.start(new, lr=eta, batch_sizes=sizes)
                else:
                    state.moved(seg, new)
                    small.moved(half, new_half)
                    diffusion.moved(seg, new)
                seg, half = new, new_half
            value, gradient = _value_and_gradient(obj, theta, chunk)
            cost["path"] += 1
            if settings.sde:  # the flow's value here and Heun's first stage
                flow_value, g1 = _value_and_gradient(obj, flow_theta, chunk)
            m = seg.project(theta - seg.theta)
            if t == recorded[col]:
                g = seg.project(gradient)
                noise, sigma = state.loss(seg, m, g)
                ratio = seg.nonlinearity(state.cov)
                with np.errstate(invalid="ignore", divide="ignore"):
                    own = np.abs(noise) * np.where(ratio < 1, ratio / (1 - ratio), np.inf)
                rest, rest_error = out.loss(seg)
                if whole_space:
                    rank_part = 0.0
                else:
                    small_noise = small.loss(half, m[: half.rank], g[: half.rank])[0]
                    rank_part = np.abs(noise + rest - small_noise - small_out.loss(half)[0])
                path[i, col] = value
                curve[i, :, col] = value + noise + rest
                outside[i, :, col] = rest
                spread[i, :, col] = sigma
                estimate[i, :, col] = rank_part + own + rest_error + state.dropped
                if settings.sde:
                    flow[i, col] = flow_value
                    sde[i, :, col] = flow[i, col] + diffusion.loss(seg, m)
                col += 1
            if t == horizon:
                break
            state.step(seg, m)
            out.step(seg)
            if not whole_space:
                small.step(half, m[: half.rank])
                small_out.step(half)
            if settings.sde:
                diffusion.step(seg, m)
                _, g2 = _value_and_gradient(obj, flow_theta - eta * g1, chunk)
                flow_theta = flow_theta - 0.5 * eta * (g1 + g2)
                cost["flow"] += 2
            theta = theta - eta * gradient
    cost["total"] = cost["path"] + cost["flow"] + cost["checkpoints"]
    cost["seconds"] = time.perf_counter() - started
    blown = ~np.isfinite(curve)
    estimate[blown] = np.inf
    return LearningCurve(
        steps=np.asarray(recorded),
        lr=np.asarray(lrs),
        batch_sizes=np.asarray(sizes),
        start_loss=float(start_loss),
        path=path,
        curve=curve,
        error_estimate=estimate,
        spread=spread,
        outside=outside,
        sde=sde,
        flow=flow,
        checkpoints=tuple(checkpoints),
        settings=settings,
        cost=cost,
    )
