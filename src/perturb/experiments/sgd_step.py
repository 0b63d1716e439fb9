"""The SGD step of a simulation: one step of every trial at once, and the losses after it.

:func:`make_step` is one step ``θ ← θ - η ∇ (1/B) Σ_{x∈𝓑} l_x(θ)`` for one trial, to be
vectorized over trials with :func:`torch.func.vmap`; :func:`make_loop_step` is the same
step by plain autograd.  :func:`mean_loss` evaluates the mean loss of many trials' parameters
in chunks, :class:`GraphStep` replays the vectorized step as a CUDA graph, and
:func:`run_trials` runs every (learning rate, trial) pair of a
:class:`~perturb.experiments.simulation_setup.Setup`, keeping track of divergence.

A trial stays *alive* while every batch loss, its parameters, its test loss at each
recorded step and its final test and train losses are finite (and, when an absolute cap
``diverge_above`` is given, at most the cap in absolute value); once dead (*blown up*) its
parameters are frozen and its later losses are ``NaN``.  No finite loss kills a trial: a
run that climbs over a bump and comes back stays in every average.  Climbing high is
reported, as information only, against the limit ``f·max(L_0, L_∅)`` (``f`` the
``diverge_factor``), with

.. math::

    L_0 = \\frac{1}{n}\\sum_{i=1}^{n} l_{x_i}(θ_0), \\qquad
    L_∅ = \\frac{1}{n}\\sum_{i=1}^{n} l_{x_i}(0),

the population loss at the shared start ``θ_0`` and the task's loss scale, the population
loss at zero parameters (a network whose output vanishes there: ``log C`` for
cross-entropy over ``C`` classes, the loss of predicting zero for a squared error).  Near a
minimum ``L_0 ≪ L_∅``, so the limit stays ``f`` times the loss of knowing nothing instead
of shrinking with ``L_0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb.experiments.simulation_setup import LossFn, PairIndex, Setup

__all__ = [
    "CUDA_GRAPHS",
    "GraphStep",
    "Outcome",
    "loss_limit",
    "make_loop_step",
    "make_step",
    "mean_loss",
    "run_trials",
]

#: How many (trial, sample) loss evaluations one evaluation call may hold.
_EVAL_BUDGET = 1 << 15
#: Evaluation sets with at least this many rows are evaluated trial by trial.
_LOOP_ROWS = 256
#: Replay the vectorized step as a CUDA graph on a GPU (``benchmarks/check_gpu.py``
#: turns it off to compare with the eager step).
CUDA_GRAPHS = True


def _alive(theta, new, value, alive, threshold):
    """Still alive: batch loss and new parameters finite and at most ``threshold``."""
    return (
        alive
        & torch.isfinite(value)
        & (value.abs() <= threshold)
        & torch.isfinite(new).all()
        & (new.abs().amax() <= threshold)
    )


def make_step(loss_fn: LossFn, threshold: float):
    """One SGD step ``θ ← θ - η ∇ mean_b l(θ)`` (for ``vmap``), with divergence bookkeeping.

    A trial stays *alive* while its batch loss and new parameters are finite and at
    most ``threshold`` in absolute value; once dead its parameters are frozen.

    Args:
        loss_fn: Per-sample losses on flat parameters, ``vmap``-compatible.
        threshold: The absolute cap (``math.inf`` for none).

    Returns:
        ``step(θ, x_b, y_b, η, alive) -> (θ', alive')`` for one trial.

    Example:
        >>> step = torch.func.vmap(make_step(lambda t, x, y: 0.5 * x * t[0] ** 2, 1e8))
        >>> theta, alive = step(torch.ones(2, 1), torch.ones(2, 1), torch.zeros(2, 1),
        ...                     torch.tensor([0.5, 3.0]), torch.ones(2, dtype=torch.bool))
        >>> theta.flatten().tolist(), alive.tolist()
        ([0.5, -2.0], [True, True])
    """

    def batch_mean(theta, xb, yb):
        return loss_fn(theta, xb, yb).mean()

    grad_and_value = torch.func.grad_and_value(batch_mean)

    def step(theta, xb, yb, lr, alive):
        g, value = grad_and_value(theta, xb, yb)
        new = theta - lr * g
        ok = _alive(theta, new, value, alive, threshold)
        return torch.where(ok, new, theta), ok

    return step


def make_loop_step(loss_fn: LossFn, threshold: float):
    """The step of :func:`make_step` for one trial, with plain autograd (the ordinary way).

    Example:
        >>> step = make_loop_step(lambda t, x, y: 0.5 * x * t[0] ** 2, 1.0)
        >>> theta, alive = step(torch.ones(1), torch.ones(1), torch.zeros(1),
        ...                     torch.tensor(3.0), torch.tensor(True))
        >>> theta.tolist(), bool(alive)  # |θ'| = 2 > 1: dead, θ frozen
        ([1.0], False)
    """

    def step(theta, xb, yb, lr, alive):
        with torch.enable_grad():
            p = theta.detach().requires_grad_()
            value = loss_fn(p, xb, yb).mean()
            (g,) = torch.autograd.grad(value, p)
        with torch.no_grad():
            new = theta - lr * g
            ok = _alive(theta, new, value, alive, threshold)
            return torch.where(ok, new, theta), ok

    return step


def mean_loss(
    loss_fn: LossFn,
    thetas: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor | PairIndex | None = None,
    *,
    vectorized: bool = True,
) -> torch.Tensor:
    """Mean loss ``(1/n) Σ_i l_{x_i}(θ_j)`` of each row ``θ_j`` of ``thetas`` (``(c, P)``).

    ``idx`` is ``None`` (all rows of ``x``, shared by every trial) or ``(c, n)`` row
    indices, one set per trial (a tensor, or a :class:`PairIndex` that draws the indices
    as they are read).  The evaluation is vectorized over trials only for small
    sets (``n < 256``) and ``vectorized``: a large set is a big batch for each trial
    already, and looping over trials then beats ``vmap`` (whose batched convolutions
    become slower grouped ones on CPU).  At most ``2**15`` (trial, sample) losses are held
    at once.

    Returns:
        The means, shape ``(c,)``.

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> mean_loss(lambda t, xb, yb: xb @ t, torch.tensor([[1.0], [2.0]]), x, None).tolist()
        [2.0, 4.0]
        >>> idx = torch.tensor([[0, 0], [1, 1]])
        >>> mean_loss(lambda t, xb, yb: xb @ t, torch.tensor([[1.0], [2.0]]), x, x, idx).tolist()
        [1.0, 6.0]
    """
    c = thetas.shape[0]
    n = x.shape[0] if idx is None else idx.shape[1]

    def total(theta, xb, yb):
        return loss_fn(theta, xb, yb).sum()

    with torch.no_grad():
        if vectorized and n < _LOOP_ROWS:
            rows = max(1, _EVAL_BUDGET // c)
            out = torch.zeros(c, dtype=thetas.dtype, device=thetas.device)
            for start in range(0, n, rows):
                if idx is None:
                    xb = x[start : start + rows]
                    yb = None if y is None else y[start : start + rows]
                    out = out + torch.func.vmap(total, in_dims=(0, None, None))(thetas, xb, yb)
                else:
                    ib = idx[:, start : start + rows]
                    out = out + torch.func.vmap(total)(thetas, x[ib], y[ib])
            return out / n
        sums = []
        for j in range(c):
            acc = torch.zeros((), dtype=thetas.dtype, device=thetas.device)
            for start in range(0, n, _EVAL_BUDGET):
                if idx is None:
                    xb = x[start : start + _EVAL_BUDGET]
                    yb = None if y is None else y[start : start + _EVAL_BUDGET]
                else:
                    ib = idx[j, start : start + _EVAL_BUDGET]
                    xb, yb = x[ib], y[ib]
                acc = acc + total(thetas[j], xb, yb)
            sums.append(acc)
        return torch.stack(sums) / n


def _test_loss(
    s: Setup, theta: torch.Tensor, alive: torch.Tensor, vectorized: bool
) -> tuple[np.ndarray, torch.Tensor]:
    """Test losses of the ``(c, P)`` parameters (``NaN`` where dead) and the alive mask."""
    loss = mean_loss(s.loss_fn, theta, s.x_test, s.y_test, vectorized=vectorized)
    ok = alive & torch.isfinite(loss) & (loss.abs() <= s.cap)
    vals = torch.where(ok, loss, torch.full_like(loss, float("nan")))
    return vals.cpu().numpy(), ok


class GraphStep:
    """The vectorized step captured once as a CUDA graph and replayed for every step.

    The step is launch-bound: on an H100, 256 trials of the digits convnet spend ~4 ms of
    CPU dispatch per step for ~0.26 ms of GPU work.  The graph reads the batch indices
    and writes the parameters and alive flags in place, in static buffers; the kernels
    are the ones the eager step runs, so the results are the same
    (``benchmarks/check_gpu.py`` compares the two).

    Example:
        >>> GraphStep.run.__doc__.split(";")[0]  # needs a GPU to build
        'One step on the batches ``ib``'
    """

    def __init__(self, step, theta, alive, x, y, ib, lr) -> None:
        self.theta, self.alive, self.ib = theta.clone(), alive.clone(), ib.clone()
        self.x, self.y, self.lr, self.step = x, y, lr, step
        start = (theta.clone(), alive.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up before capture (allocator, cuDNN plans)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._body()
        self.theta.copy_(start[0])
        self.alive.copy_(start[1])

    def _body(self) -> None:
        new, ok = self.step(self.theta, self.x[self.ib], self.y[self.ib], self.lr, self.alive)
        self.theta.copy_(new)
        self.alive.copy_(ok)

    def run(self, ib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the batches ``ib``; the returned tensors are the static buffers."""
        self.ib.copy_(ib)
        self.graph.replay()
        return self.theta, self.alive


@dataclass(frozen=True, eq=False)
class Outcome:
    """The raw results of :func:`run_trials`, ``L`` learning rates by ``K`` trials.

    Attributes:
        test_loss: Final test losses, shape ``(L, K)`` (``NaN`` if blown up).
        train_loss: Final train losses, shape ``(L, K)`` (``NaN`` if blown up).
        diverged: Whether each trial blew up, shape ``(L, K)``.
        curve: Recorded test losses, shape ``(L, K, S)``.
        start_loss: ``L_0``, the population loss at ``θ_0``.
        limit: The reported loss limit ``f·max(L_0, L_∅)`` (see the module docstring).
        scale: ``L_∅``, the population loss at zero parameters.

    Example:
        >>> o = Outcome(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2), bool),
        ...             np.zeros((1, 2, 1)), 0.01, 23.0, 2.3)
        >>> o.limit / o.scale
        10.0
    """

    test_loss: np.ndarray
    train_loss: np.ndarray
    diverged: np.ndarray
    curve: np.ndarray
    start_loss: float
    limit: float
    scale: float = math.nan


def loss_limit(start_loss: float, scale: float = math.nan, *, factor: float | None) -> float:
    """The reported loss limit ``f·max(L_0, L_∅)``: information, never a reason to drop.

    Of ``L_0`` (the loss at ``θ_0``) and ``L_∅`` (the task's loss scale, the loss at zero
    parameters) only the finite positive ones count; with neither, or without ``factor``,
    there is no limit (``inf``).

    Example:
        >>> loss_limit(0.0064, 1.0986, factor=10.0), loss_limit(2.3, factor=10.0)
        (10.986, 23.0)
        >>> loss_limit(0.0, 0.0, factor=10.0), loss_limit(2.3, 1.1, factor=None)
        (inf, inf)
    """
    levels = [v for v in (start_loss, scale) if math.isfinite(v) and v > 0]
    if factor is None or not levels:
        return math.inf
    return factor * max(levels)


def run_trials(s: Setup, *, vectorized: bool) -> Outcome:
    """Run every (lr, trial) pair of ``s``: vectorized in chunks, or one after another.

    Args:
        s: The checked arguments.
        vectorized: Run up to ``s.chunk`` pairs together with :func:`make_step` under
            ``vmap`` (as a CUDA graph on a GPU); otherwise one pair at a time with
            :func:`make_loop_step`.

    Returns:
        The :class:`Outcome`.

    Example:
        >>> from perturb.experiments.simulation_setup import make_setup
        >>> from perturb.symbolic.schedules import Online
        >>> s = make_setup(lambda t, x, y: 0.5 * x * t[0] ** 2, torch.ones(1),
        ...                (torch.tensor([2.0, 2.0]), torch.zeros(2)),
        ...                Online(steps=3, batch_size=1), lr=[0.1, 1.5], trials=4)
        >>> out = run_trials(s, vectorized=True)  # η = 1.5: θ ← -2θ, finite: every trial kept
        >>> out.start_loss, out.limit, out.diverged.sum(axis=1).tolist()
        (1.0, 10.0, [0, 0])
        >>> out.test_loss[1].tolist()  # θ_3 = -8, loss ½·2·64
        [64.0, 64.0, 64.0, 64.0]
    """
    L, K, S = len(s.lrs), s.trials, len(s.record)
    pairs = [(i, k) for k in range(K) for i in range(L)]  # a trial's learning rates together
    size = (s.chunk or len(pairs)) if vectorized else 1
    groups = [pairs[j : j + size] for j in range(0, len(pairs), size)]
    step = torch.func.vmap(make_step(s.loss_fn, s.cap)) if vectorized else None
    loop_step = None if vectorized else make_loop_step(s.loss_fn, s.cap)
    ends = torch.stack([s.theta0, torch.zeros_like(s.theta0)])
    start_loss, scale = mean_loss(s.loss_fn, ends, s.x, s.y, vectorized=vectorized).tolist()
    limit = loss_limit(start_loss, scale, factor=s.factor)
    test = np.full((L, K), np.nan)
    train = np.full((L, K), np.nan)
    diverged = np.zeros((L, K), dtype=bool)
    curve = np.full((L, K, S), np.nan)
    record_at = {t: j for j, t in enumerate(s.record)}
    device = s.theta0.device
    bar = tqdm(total=len(groups) * s.steps, disable=not s.progress, desc="simulate")
    for group in groups:
        c = len(group)
        index = PairIndex(s.schedule, int(s.x.shape[0]), seed=s.seed,
                          trials=[s.first + k for _, k in group], device=device)  # fmt: skip
        lr = torch.tensor([s.lrs[i] for i, _ in group], dtype=s.dtype, device=device)
        theta = s.theta0.expand(c, -1).clone()
        alive = torch.ones(c, dtype=torch.bool, device=device)
        rows = np.array([i for i, _ in group])
        cols = np.array([k for _, k in group])
        if 0 in record_at:
            curve[rows, cols, record_at[0]] = _test_loss(s, theta, alive, vectorized)[0]
        graph = None
        if step is not None and device.type == "cuda" and CUDA_GRAPHS and s.steps > 1:
            graph = GraphStep(step, theta, alive, s.x, s.y, index.batch(0), lr)
        for t in range(s.steps):
            ib = index.batch(t)
            with torch.no_grad():
                if graph is not None:
                    theta, alive = graph.run(ib)
                elif step is not None:
                    theta, alive = step(theta, s.x[ib], s.y[ib], lr, alive)
                else:
                    xb, yb = s.x[ib], s.y[ib]
                    theta, alive = loop_step(theta[0], xb[0], yb[0], lr[0], alive[0])
                    theta, alive = theta[None], alive[None]
            if t + 1 in record_at and t + 1 < s.steps:
                vals, ok = _test_loss(s, theta, alive, vectorized)
                curve[rows, cols, record_at[t + 1]] = vals
                alive.copy_(ok)  # in place: a CUDA graph reads this buffer at its next replay
            bar.update(1)
        vals, ok = _test_loss(s, theta, alive, vectorized)
        curve[rows, cols, -1] = vals
        tr = mean_loss(s.loss_fn, theta, s.x, s.y, index, vectorized=vectorized)
        ok = ok & torch.isfinite(tr) & (tr.abs() <= s.cap)
        ok_np = ok.cpu().numpy()
        diverged[rows, cols] = ~ok_np
        test[rows, cols] = np.where(ok_np, curve[rows, cols, -1], np.nan)
        train[rows, cols] = np.where(ok_np, tr.cpu().numpy(), np.nan)
    bar.close()
    curve[diverged, -1] = np.nan
    return Outcome(test, train, diverged, curve, start_loss, limit, scale)
