"""Running perturb unchanged under ``torchrun`` (Gloo on CPU, NCCL on GPU).

Launch any script with ``torchrun --nproc-per-node K script.py``; in the script call
:func:`init_from_env` once, then :func:`measure_distributed` and
:func:`simulate_distributed` where one would call :func:`perturb.measure.measure` and
:func:`perturb.simulate.simulate`, and write outputs only where :func:`is_main` holds.
Without a process group (a plain ``python script.py``) every function here falls back to
the single-process behaviour, so the same script runs both ways.

What is split, and why the results do not depend on the number of processes:

* **measurement** (``estimator="tuples"``): every rank draws the same seeded shuffle of
  the rows and cuts it into the same ``R`` disjoint tuples; rank ``r`` evaluates only the
  contiguous block :func:`shard` ``(R, r, W)`` of tuples, and the per-tuple values ``Z_r``
  (float64) are all-gathered in tuple order.  Every rank ends with the same
  :class:`~perturb.measure.Statistics` as a single process.
* **simulation**: rank ``r`` runs the trials :func:`shard` ``(K, r, W)``, each with its own
  per-trial seed ``(seed, k)`` (:func:`perturb.simulate.trial_indices`), and the per-trial
  losses are all-gathered in trial order.

A rank that raises makes ``torchrun`` stop the job with that error; collectives carry the
process group's timeout, so the other ranks cannot wait forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from perturb.schedules import Schedule

# the modules, not the functions of the same name that ``perturb`` re-exports
_m = importlib.import_module("perturb.measure")
_s = importlib.import_module("perturb.simulate")

__all__ = [
    "init_from_env",
    "is_main",
    "measure_distributed",
    "shard",
    "shutdown",
    "simulate_distributed",
    "world",
]


# --------------------------------------------------------------------------- process group


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one.

    Example:
        >>> world()  # no process group in a plain Python process
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that should write outputs).

    Example:
        >>> is_main()
        True
    """
    return world()[0] == 0


def init_from_env(*, backend: str | None = None, timeout_s: float = 300) -> tuple[int, int]:
    """Initialize the default process group from ``torchrun``'s environment, if present.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (set by ``torchrun``).  The backend defaults to ``"nccl"`` when CUDA is available (the
    process then uses GPU ``LOCAL_RANK``) and ``"gloo"`` otherwise.  Every collective
    fails after ``timeout_s`` seconds instead of hanging.  Without those variables, or when
    a group already exists, nothing is done.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose as above).
        timeout_s: timeout of the process group's collectives, in seconds.

    Returns:
        ``(rank, world size)`` after initialization (``(0, 1)`` without ``torchrun``).

    Example:
        >>> import os
        >>> "WORLD_SIZE" in os.environ or init_from_env() == (0, 1)
        True
    """
    if not (timeout_s > 0):
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not dist.is_available() or "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return world()
    if dist.is_initialized():
        return world()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    return world()


def shutdown() -> None:
    """Destroy the default process group if there is one (call once at the end).

    Example:
        >>> shutdown()  # a no-op without a process group
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` owned by ``rank`` among ``world`` processes.

    The first ``n mod world`` ranks get ``⌈n/world⌉`` items, the others ``⌊n/world⌋``;
    the blocks are disjoint, in rank order and cover ``range(n)``.  The split depends on
    ``n``, ``rank`` and ``world`` only.

    Args:
        n: the number of items, ``n >= 0``.
        rank: this process, ``0 <= rank < world``.
        world: the number of processes, ``>= 1``.

    Returns:
        The indices of this rank (possibly empty).

    Example:
        >>> [list(shard(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
        >>> [len(shard(2, r, 3)) for r in range(3)]
        [1, 1, 0]
    """
    for name, v in (("n", n), ("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, world >= 1 and 0 <= rank < world, got {n}, {rank}, {world}")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _device() -> torch.device:
    """Where collective tensors must live for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_blocks(block: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """All-gather the ranks' :func:`shard` blocks of a float64 array along ``axis``.

    ``block`` holds this rank's ``len(shard(n, rank, world))`` entries along ``axis``; the
    result holds all ``n`` in order, on every rank.  Blocks are padded to the largest one
    for ``all_gather`` and trimmed again.
    """
    _, size = world()
    block = np.asarray(block, dtype=np.float64)
    if size == 1:
        return block
    moved = np.moveaxis(block, axis, 0)
    most = len(shard(n, 0, size))
    pad = np.zeros((most, *moved.shape[1:]), dtype=np.float64)
    pad[: moved.shape[0]] = moved
    dev = _device()
    local = torch.from_numpy(pad).to(dev)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    out = np.concatenate(
        [p.cpu().numpy()[: len(shard(n, r, size))] for r, p in enumerate(parts)], axis=0
    )
    return np.moveaxis(out, 0, axis)


def _sum_int(value: int) -> int:
    """Sum an integer over the ranks."""
    if world()[1] == 1:
        return int(value)
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return int(t.item())


# --------------------------------------------------------------------------- simulation


@dataclasses.dataclass
class _ShardSetup(_s._Setup):
    """A :class:`perturb.simulate._Setup` whose local trial ``j`` is global ``offset + j``."""

    offset: int = 0

    def batches(self, trial: int) -> tuple[np.ndarray, np.ndarray]:
        return super().batches(self.offset + trial)


def simulate_distributed(
    loss_fn: _s.LossFn,
    theta0: torch.Tensor,
    population: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
    *,
    lr: float | Sequence[float],
    trials: int,
    seed: int = 0,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    record_every: int | None = None,
    diverge_above: float = 1e8,
) -> _s.Trials:
    """:func:`perturb.simulate.simulate`, with the trials split across the ranks.

    Rank ``r`` runs trials :func:`shard` ``(trials, r, W)`` only, trial ``k`` with its
    own seed ``(seed, k)``; test and train losses, divergence flags and curves are
    all-gathered in trial order, so every rank returns the same :class:`Trials` as a
    single-process ``simulate`` (to rounding).  Same arguments as ``simulate``; the
    progress bar shows on rank 0 only.

    Example:
        >>> from perturb.schedules import Online
        >>> x = torch.tensor([[1.0], [-1.0]])
        >>> def loss_fn(theta, xb, yb):
        ...     return 0.5 * (theta**2).sum() + xb @ theta
        >>> args = (loss_fn, torch.zeros(1), (x, torch.zeros(2)), Online(steps=4, batch_size=1))
        >>> a = simulate_distributed(*args, lr=[0.1, 0.3], trials=5, seed=3)
        >>> b = _s.simulate(*args, lr=[0.1, 0.3], trials=5, seed=3)
        >>> bool(np.array_equal(a.test_loss, b.test_loss))
        True
    """
    rank, size = world()
    s = _s._setup(
        loss_fn, theta0, population, schedule, lr, trials, test, seed, chunk, device, dtype,
        progress and rank == 0, record_every, diverge_above,
    )  # fmt: skip
    mine = shard(s.trials, rank, size)
    L, S = len(s.lrs), len(s.record)
    if len(mine) > 0:
        fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
        fields["trials"] = len(mine)
        local = _s._run(_ShardSetup(**fields, offset=mine.start), vectorized=True)
        blocks = (local.test_loss, local.train_loss, local.diverged, local.curve)
    else:
        blocks = (np.zeros((L, 0)), np.zeros((L, 0)), np.zeros((L, 0)), np.zeros((L, 0, S)))
    test_loss, train_loss, diverged, curve = (_gather_blocks(b, s.trials, axis=1) for b in blocks)
    return _s.Trials(
        lrs=s.lrs,
        test_loss=test_loss,
        train_loss=train_loss,
        diverged=diverged.astype(bool),
        steps=s.record,
        curve=curve,
        schedule=s.schedule.name,
        seed=s.seed,
    )


# --------------------------------------------------------------------------- measurement


def measure_distributed(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    exact: bool = False,
    estimator: str = "tuples",
    progress: bool = True,
    **kw: Any,
) -> _m.Statistics:
    """:func:`perturb.measure.measure`, with the tuples split across the ranks.

    Every rank builds the same seeded layout of ``R`` disjoint tuples as ``measure``;
    rank ``r`` evaluates the tuples :func:`shard` ``(R, r, W)`` only, and the per-tuple
    values are all-gathered (float64) in tuple order, so every rank returns the
    :class:`~perturb.measure.Statistics` of a single-process ``measure`` (to float64
    rounding); ``meta["evaluations"]`` is the total over the ranks.  Only the default
    ``estimator="tuples"`` with ``exact=False`` is split; without a process group other
    options are passed on to ``measure`` unchanged, with one they raise ``ValueError``.

    Example:
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> x = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> a = measure_distributed(f, x, torch.zeros(2), order=2, progress=False)
        >>> b = _m.measure(f, x, torch.zeros(2), order=2, progress=False)
        >>> all(np.array_equal(a.group_values[k], b.group_values[k]) for k in b.group_values)
        True
    """
    rank, size = world()
    if size == 1:
        return _m.measure(
            loss_fn_or_model, data, theta0, exact=exact, estimator=estimator, progress=progress,
            **kw,
        )  # fmt: skip
    if exact or estimator != "tuples":
        raise ValueError(
            "measure_distributed splits only estimator='tuples' with exact=False "
            f"(got exact={exact!r}, estimator={estimator!r})"
        )
    local = _m.measure(
        loss_fn_or_model, data, theta0, exact=False, estimator="tuples",
        progress=progress and rank == 0, tuple_range=lambda k: shard(k, rank, size), **kw,
    )  # fmt: skip
    total = int(local.meta["tuples_total"])
    values = {key: _gather_blocks(v, total, axis=0) for key, v in local.group_values.items()}
    meta = {k: v for k, v in local.meta.items() if k not in ("tuple_range", "tuples_total")}
    meta.update(evaluations=_sum_int(local.meta["evaluations"]), world_size=size)
    return dataclasses.replace(
        local,
        rows=total * int(local.meta["tuple_size"]),
        groups=total,
        group_values=values,
        meta=meta,
    )
