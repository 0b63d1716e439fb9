"""Process groups, sharding and collectives: running perturb unchanged under ``torchrun``.

This is the low-level helper that :func:`perturb.measure` and :func:`perturb.simulate` call
(it imports neither).  Launch any script with ``torchrun --nproc-per-node K script.py``; in
the script call :func:`init_from_env` once (or wrap the work in :func:`session`), then call
:func:`perturb.measure` and :func:`perturb.simulate` as usual: once a default process group
of ``W > 1`` processes is initialized (Gloo on CPU, NCCL on GPU) they split their work
across the ranks (through ``measure_distributed`` and ``simulate_distributed`` beside them;
pass ``distributed=False`` to keep a call local) and every rank gets the single-process
result.  Write outputs only where :func:`is_main` holds.  Without a process group (a
plain ``python script.py``) everything runs in the one process, so the same script
runs both ways.  The ``perturb`` command line does all this by itself when ``torchrun``
launches it (``torchrun --nproc-per-node K -m perturb.cli validate ...``).

What is split, and why the results do not depend on the number of processes:

* **measurement** (``estimator="tuples"``, ``exact=False``): every rank draws the same
  seeded shuffle of the rows and cuts it into the same ``R`` disjoint tuples; rank ``r``
  evaluates only the contiguous block :func:`shard` ``(R, r, W)`` of tuples, and the
  per-tuple values ``Z_r`` (float64) are all-gathered in tuple order.  Every rank ends
  with the same :class:`~perturb.numeric.measuring.Statistics` as a single process.
  ``"sketch"`` and ``"auto"`` (the default): every rank draws the same seeded groups,
  splits and pilot; rank ``r`` sketches the groups :func:`shard` ``(K, r, W)`` (of the
  pilot, then of the measurement) and the group values are all-gathered.
  ``resummed=True`` (estimates): rank ``r`` differentiates the rows
  :func:`shard` ``(n, r, W)`` of the Krylov build; every Hessian-vector product (and
  gradient, ``J`` projection) is its partial sum, added over the ranks in rank order,
  and the projected per-sample tensors are all-gathered.  ``exact=True`` and
  ``"groups"`` are computed whole on every rank.
* **per-sample top curvatures** (:func:`perturb.numeric.stability.per_sample_top_curvatures`):
  rank ``r`` runs the power iterations of the rows :func:`shard` ``(k, r, W)``.
* **simulation**: rank ``r`` runs the trials :func:`shard` ``(K, r, W)``
  (``simulate(trials=range(a, b))``), each with its own per-trial seed ``(seed, k)``
  (:func:`perturb.experiments.simulation.trial_indices`), and the per-trial losses are
  all-gathered in trial order.

:func:`communication_bytes` gives the bytes each rank receives.

Every rank must pass the same data, ``θ_0`` and options; the ranks check that they agree
on the layout (numbers of tuples, trials, parameters, seeds) and raise ``ValueError``
together if not.  A rank that raises makes ``torchrun`` stop the job with that error;
collectives carry the process group's timeout, so the other ranks cannot wait forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_ints",
    "collective_device",
    "communication_bytes",
    "gather_blocks",
    "gathered_rows",
    "init_from_env",
    "is_main",
    "local_share",
    "same_on_all_ranks",
    "session",
    "shard",
    "shutdown",
    "sum_over_ranks",
    "summed_tensor",
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


@contextlib.contextmanager
def session(*, backend: str | None = None, timeout_s: float = 300) -> Iterator[tuple[int, int]]:
    """Run a block as one rank of a ``torchrun`` job (the ``perturb`` command line does).

    Calls :func:`init_from_env`; inside the block, ranks other than 0 write nothing to
    standard output (it goes to ``os.devnull``; standard error, where errors go, is
    kept); at the end, after a barrier (on success), the process group is destroyed if
    this block created it.  Without ``torchrun`` it only yields ``(0, 1)``.

    Args:
        backend: as :func:`init_from_env`.
        timeout_s: as :func:`init_from_env`.

    Yields:
        ``(rank, world size)``.

    Example:
        >>> import os
        >>> with session() as (rank, size):
        ...     print(rank == 0 and ("WORLD_SIZE" in os.environ or size == 1))
        True
    """
    created = not (dist.is_available() and dist.is_initialized())
    rank, size = init_from_env(backend=backend, timeout_s=timeout_s)
    created = created and dist.is_available() and dist.is_initialized()
    try:
        with contextlib.ExitStack() as stack:
            if rank != 0:
                quiet = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(quiet))
            yield rank, size
        if created:
            # every rank's last collective has completed before any rank tears down its
            # connections (tearing down under a peer's pending Gloo transfer can abort
            # the peer); skipped on an error, where the other ranks may never arrive
            dist.barrier()
    finally:
        if created:
            shutdown()


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


def collective_device() -> torch.device:
    """Where collective tensors must live for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_blocks(block: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
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
    dev = collective_device()
    local = torch.from_numpy(pad).to(dev)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    out = np.concatenate(
        [p.cpu().numpy()[: len(shard(n, r, size))] for r, p in enumerate(parts)], axis=0
    )
    return np.moveaxis(out, 0, axis)


def sum_over_ranks(block: np.ndarray) -> np.ndarray:
    """All-gather one float64 array of the same shape from every rank and sum, in rank order."""
    _, size = world()
    block = np.asarray(block, dtype=np.float64)
    if size == 1:
        return block
    local = torch.from_numpy(np.ascontiguousarray(block)).to(collective_device())
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return sum(p.cpu().numpy() for p in parts)


def local_share(n: int, *, distributed: bool) -> range:
    """This rank's :func:`shard` of ``n`` items when ``distributed`` and a process group of
    ``1 < W ≤ n`` ranks exists; otherwise all of ``range(n)`` (nothing to split).

    Example:
        >>> local_share(5, distributed=True)  # no process group here
        range(0, 5)
    """
    rank, size = world() if distributed else (0, 1)
    return shard(n, rank, size) if 1 < size <= n else range(n)


def summed_tensor(partial: torch.Tensor) -> torch.Tensor:
    """:func:`sum_over_ranks` of a tensor: summed in float64 in rank order (the same bits
    on every rank), returned in ``partial``'s dtype and device.

    Example:
        >>> summed_tensor(torch.ones(2))  # one process: itself
        tensor([1., 1.])
    """
    host = sum_over_ranks(partial.detach().to("cpu", torch.float64).numpy())
    return torch.as_tensor(host).to(partial.device, partial.dtype)


def gathered_rows(block: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`gather_blocks` of a tensor along its first axis: all ``n`` rows, float64, CPU.

    Example:
        >>> gathered_rows(torch.arange(3.0), 3)  # one process: its own rows
        tensor([0., 1., 2.], dtype=torch.float64)
    """
    return torch.as_tensor(gather_blocks(block.detach().to("cpu", torch.float64).numpy(), n))


def all_ints(values: Sequence[int]) -> np.ndarray:
    """All-gather a short list of integers: row ``r`` holds rank ``r``'s list."""
    _, size = world()
    if size == 1:
        return np.asarray([values], dtype=np.int64)
    local = torch.tensor(list(values), dtype=torch.int64, device=collective_device())
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu().numpy()


def same_on_all_ranks(what: str, rows: np.ndarray) -> None:
    """Raise ``ValueError`` on every rank unless the gathered ``rows`` (one per rank) agree."""
    if not (rows == rows[0]).all():
        raise ValueError(
            f"the ranks disagree on ({what}): {rows.tolist()} (one row per rank); every "
            "rank must pass the same data, θ0 and options"
        )


# --------------------------------------------------------------------------- traffic


def communication_bytes(result: Any, world: int) -> int:
    """Bytes each rank receives in the collectives that produce ``result`` on ``world`` ranks.

    Counted as the sizes of the ``all_gather`` output buffers (every rank's block, its own
    included; a ring all-gather sends ``(W-1)/W`` of it over each link).  With
    ``W = world > 1``:

    * a measurement split over ``R`` tuples (``estimator="tuples"``, ``exact=False``):
      ``8·W·(6 + ⌈R/W⌉·S + K·P·V)`` for ``S`` scalar and ``V`` open-root (displacement)
      contractions kept as ``K`` batch means (``vector_batches``): one float64 per tuple
      and scalar contraction, blocks padded to ``⌈R/W⌉``, every rank's partial ``K × P``
      batch sums, plus 6 int64 of layout check; with ``vector_batches=None`` an open-root
      contraction counts ``P`` per tuple instead; ``0`` for ``exact=True`` or
      ``estimator="groups"`` (not split);
    * ``K`` trials at ``L`` learning rates recording ``S`` steps:
      ``8·W·(5 + ⌈K/W⌉·L·(3 + S))`` (test loss, train loss, divergence flag and curve as
      float64, plus 5 int64 of layout check).

    ``W = 1`` communicates nothing.

    Args:
        result: what ``measure`` or ``simulate`` returned (on any number of ranks).
        world: the number of ranks ``W >= 1``.

    Returns:
        The number of bytes.

    Example:
        >>> from perturb.experiments.simulation import Trials
        >>> t = Trials((0.1, 0.2), np.zeros((2, 10)), np.zeros((2, 10)),
        ...            np.zeros((2, 10), dtype=bool), (0, 4), np.zeros((2, 10, 2)))
        >>> communication_bytes(t, 4)  # 8·4·(5 + 3·2·(3 + 2))
        1120
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if world == 1:
        return 0
    count = getattr(result, "communication_bytes", None)
    if count is None:
        raise TypeError(f"result must be a Statistics or a Trials, got {type(result).__name__}")
    return int(count(world))
