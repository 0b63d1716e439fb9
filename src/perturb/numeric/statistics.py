r"""Measured statistics: contraction values at ``θ_0`` with error bars, and predictions from them.

:func:`perturb.numeric.measuring.measure` returns a :class:`Statistics`: for each measured
contraction the per-group (per-tuple) estimates, stored under :attr:`Contraction.key`
(``"name|WL hash"``, the key saved files hold) and looked up by that key, by the printed
name (``stats["tr(C H)"]``) or by the :class:`Contraction`.  The value is the mean of the
group estimates and its standard error is

.. math::  \operatorname{SE} = \operatorname{sd}(Z_1, \dots, Z_K) / \sqrt K,

exactly unbiased for the variance of the mean because the group estimates are iid.  A
prediction is linear in the values, so :meth:`Statistics.predict` evaluates a schedule's
series on every group and gets the error bar of any ``η`` and ``T`` from the spread of the
per-group predictions (:class:`MeasuredPrediction`).

**Re-summed predictions** (``measure(..., resummed=True, rank=k)``) are not linear in the
values: they come from the Krylov subspace kept in :attr:`Statistics.subspace`
(:mod:`perturb.numeric.krylov`), evaluated for a whole grid of learning rates in one
batched call.  Their standard error is a delete-a-group jackknife over ``K`` groups of the
rows,

.. math::  \operatorname{SE}^2 = \frac{K-1}{K}\sum_g (\hat v_{(-g)} − \bar v)^2,

``\hat v_{(-g)}`` the prediction from the per-sample projected tensors (gradients, and
per-sample Hessians or third derivatives where the diagrams need them) of all rows but
group ``g``, with the Galerkin matrix ``T = QᵀHQ`` and the projected mean third
derivative held at the whole sample's: the error bar covers the sampling noise of ``G``,
``C`` and the per-sample tensors, not that of ``H``.  The Krylov error
``|value(k) − value(k/2)|`` is :attr:`MeasuredPrediction.error`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy as sp
import torch

from perturb.checks import check_int, check_lrs
from perturb.errors import StatisticsFileError
from perturb.numeric.predictions import UNSTABLE_GROWTH, warn_if_unstable
from perturb.numeric.trust import Trust, assess
from perturb.symbolic.contractions import Contraction
from perturb.symbolic.cost import check_work, estimate_work
from perturb.symbolic.schedules import Schedule
from perturb.symbolic.series import QUANTITIES, series

if TYPE_CHECKING:
    from perturb.numeric.krylov import KrylovSubspace

__all__ = ["MAX_SIZE", "HostCopy", "MeasuredPrediction", "Statistics", "check_schedule_sizes"]

MAX_SIZE = 2**53
"""The largest schedule size (steps, batch, training set, epochs) a prediction takes: the
largest integer float64 holds exactly."""


@dataclass(frozen=True)
class MeasuredPrediction:
    """Predictions of one quantity for one schedule over a grid of learning rates.

    Attributes:
        schedule: the numeric schedule.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        lr: the learning rates, shape ``(L,)``.
        coefficients: the numeric coefficient of ``η^d``, shape ``(order+1,)`` (``(order+1,
            P)`` for the displacement); ``None`` when re-summed.
        coefficient_se: standard errors of :attr:`coefficients` (``None`` when re-summed).
        by_order: the ``η^d`` contributions, ``(L, order+1[, P])`` (re-summed: by number
            of edges).
        total: the truncated series at each ``lr``, ``(L[, P])``.
        se: standard error of :attr:`total` (the spread of the per-group predictions over
            ``√K``; re-summed: the jackknife of the module notes; zero for exact
            statistics).
        resummed: whether edges carry ``η(I − ηH)^{Δt−1}`` (Krylov path).
        rank: the Krylov rank ``k`` of a re-summed prediction.
        error: ``|total(k) − total(k/2)|`` at each ``lr`` (re-summed), else ``None``.
        cumulative_error: the same through each number of edges, ``(L, order+1)``:
            column ``d`` is the ``k`` vs ``k/2`` difference of the prediction with up
            to ``d`` edges (re-summed scalars), else ``None``.
        unstable: a re-summed prediction along directions where ``|1 − ηh| > 1``
            (Ritz values), warned about
            (:class:`~perturb.numeric.predictions.UnstableDirectionWarning`).
        growth: ``log`` of the largest growth factor of ``K^T`` over the grid
            (:func:`~perturb.numeric.predictions.growth`).

    Example:
        >>> import torch
        >>> from perturb.numeric.measuring import measure
        >>> from perturb.symbolic.schedules import Online
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
        >>> pred = st.predict(Online(steps=3, batch_size=1), lr=0.1)
        >>> pred.coefficients.round(6).tolist(), pred.se.tolist()
        ([0.5, -1.5], [0.0])
    """

    schedule: Schedule
    quantity: str
    lr: np.ndarray
    coefficients: np.ndarray
    coefficient_se: np.ndarray
    by_order: np.ndarray
    total: np.ndarray
    se: np.ndarray
    resummed: bool = False
    rank: int | None = None
    error: np.ndarray | None = None
    unstable: bool = False
    growth: float = 0.0
    cumulative_error: np.ndarray | None = None


@dataclass
class Statistics:
    """Values of contractions at ``θ_0``: exact, or unbiased estimates with error bars.

    Attributes:
        order: the highest power of η the statistics serve.
        exact: whether the values are exact averages over the rows (``se`` is zero).
        rows: rows used (``K · n_g`` for groups, ``R · m`` for tuples).
        groups: ``K``, the number of disjoint groups, or ``R``, the number of tuples (1
            when exact).
        parameters: ``P``.
        contractions: key -> :class:`Contraction`.
        group_values: key -> per-group (per-tuple) values ``(K,)`` or ``(K, P)`` (float64);
            with tuples an open-root statistic holds ``meta["vector_batches"]`` batch means
            of ``meta["vector_batch_size"]`` tuples each (``R`` per-tuple vectors when
            measured with ``vector_batches=None``).
        meta: free-form JSON-able metadata (dtype, seed, schedules, quantities, …).
        subspace: the Krylov subspace of ``H`` with the projected tensors, for re-summed
            predictions (``measure(..., resummed=True, rank=k)``), else ``None``; kept in
            memory only (:meth:`save` leaves it out).

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> from perturb.numeric.measuring import measure
        >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
        >>> pred = st.predict(Online(steps=3, batch_size=1), lr=[0.0, 0.1])
        >>> [round(float(v), 6) for v in pred.total]
        [0.5, 0.35]
    """

    order: int
    exact: bool
    rows: int
    groups: int
    parameters: int
    contractions: dict[str, Contraction]
    group_values: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    subspace: KrylovSubspace | None = None

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.contractions)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, Contraction | str):
            return False
        return bool(self._matches(item))

    def _matches(self, item: Contraction | str) -> list[str]:
        """The storage keys ``item`` names: a full key, a printed name or a Contraction."""
        if isinstance(item, Contraction):
            if item.key in self.contractions:
                return [item.key]
            return [  # keys from another version of the printer
                k
                for k, c in self.contractions.items()
                if c.open_root == item.open_root and c.form == item.form and c.is_isomorphic(item)
            ]
        if not isinstance(item, str):
            raise TypeError(f"look statistics up by name or Contraction, got {type(item).__name__}")
        if item in self.contractions:
            return [item]
        return [k for k, c in self.contractions.items() if item in (c.text, k.rpartition("|")[0])]

    def key(self, item: Contraction | str) -> str:
        """The storage key (:attr:`Contraction.key`) of a printed name, a key or a Contraction.

        Raises:
            KeyError: When nothing measured matches, or a name matches several statistics
                (then pass the full key or the :class:`Contraction`); the message lists the
                measured names.

        Example:
            >>> import torch
            >>> from perturb.numeric.measuring import measure
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
            >>> st.key("G·G").startswith("G·G|"), "G·G" in st, "tr(C H)" in st
            (True, True, False)
        """
        keys = self._matches(item)
        if len(keys) == 1:
            return keys[0]
        name = item if isinstance(item, str) else item.text
        measured = sorted(c.text for c in self.contractions.values())
        if not keys:
            raise KeyError(f"no statistic for {name!r}; measured: {measured}")
        raise KeyError(
            f"{name!r} matches {len(keys)} measured statistics {sorted(keys)}; pass the full key "
            f"or the Contraction; measured: {measured}"
        )

    def value(self, item: Contraction | str) -> np.ndarray:
        """The value (the mean of the group estimates): a 0-d array or a ``(P,)`` vector.

        ``item`` is a printed name (``"tr(C H)"``), a full key or a :class:`Contraction`;
        ``stats[item]`` is the same.

        Example:
            >>> import torch
            >>> from perturb.numeric.measuring import measure
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
            >>> float(st.value("G·G")), float(st["l"])
            (0.5, 0.5)
        """
        return self.group_values[self.key(item)].mean(axis=0)

    def se(self, item: Contraction | str) -> np.ndarray:
        """Standard error of :meth:`value` (zero when exact, NaN with one group).

        Example:
            >>> import torch
            >>> from perturb.numeric.measuring import measure
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
            >>> float(st.se("G·G"))
            0.0
        """
        return _se(self.group_values[self.key(item)], self.exact)

    def __getitem__(self, item: Contraction | str) -> np.ndarray:
        return self.value(item)

    def to_text(self) -> str:
        """One line per statistic: name, value ± standard error (vectors by their norm)."""
        lines = []
        for key, c in self.contractions.items():
            v, s = self.value(key), self.se(key)
            if v.ndim:
                lines.append(f"{c.text}: |v| = {np.linalg.norm(v):.6g} (vector of {v.size})")
            else:
                lines.append(f"{c.text}: {float(v):.6g} ± {float(s):.2g}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ predictions
    def predict(
        self,
        schedule: Schedule,
        *,
        lr: float | Sequence[float] | np.ndarray,
        quantity: str = "test",
        order: int | None = None,
        resummed: bool = False,
        rank: int | None = None,
        integral: bool = False,
        force: bool = False,
    ) -> MeasuredPrediction:
        r"""Predict ``quantity`` after ``schedule`` for every learning rate in ``lr``.

        ``E[q] ≈ Σ_{d≤order} η^d Σ_t c_t(T, B, N, E) · v_t`` with the schedule's numbers in
        the series coefficients ``c_t`` and the stored values ``v_t``; the standard error is
        the spread of the same prediction made from each group's values, over ``√K``.

        Args:
            schedule: a numeric schedule, sizes at most :data:`MAX_SIZE`.
            lr: one learning rate or a 1-D grid: positive finite numbers (zero too when
                not re-summed: the loss at ``θ_0``), checked as :func:`perturb.predict`
                checks its own (:func:`perturb.checks.check_lrs`).
            quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
            order: highest power of η (default: :attr:`order`); re-summed: highest
                number of edges.
            resummed: the re-summed diagrams through :attr:`subspace` (online SGD and
                GD; all learning rates in one batched evaluation, ``T = 10⁵`` costing what
                ``T = 10²`` does), with the jackknife standard error of the module notes
                and the Krylov error :attr:`MeasuredPrediction.error`.
            rank: re-summed: use the first ``rank`` basis vectors (default all).
            integral: re-summed: Remark 2's integrals of exponentials.
            force: build the series even when its estimated work
                (:func:`perturb.symbolic.cost.estimate_work`) is over a minute (a file
                of high :attr:`order` would otherwise run for hours).

        Returns:
            A :class:`MeasuredPrediction`.

        Warns:
            UnstableDirectionWarning: re-summed, where some ``|1 − ηh| > 1``.
        """
        lr = np.asarray(check_lrs(_plain(lr), name="lr", zero=not resummed))
        if isinstance(schedule, Schedule) and schedule.is_numeric:
            check_schedule_sizes(schedule)
        if resummed:
            return self._resummed(schedule, lr, quantity, order, rank, integral)
        if integral or rank is not None:
            raise ValueError("integral and rank apply to re-summed predictions (resummed=True)")
        order = check_int("order", self.order if order is None else order, maximum=self.order)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        if not schedule.is_numeric:
            raise ValueError(
                "predict needs numeric schedule sizes, e.g. Online(steps=100, batch_size=1); "
                f"got {schedule}"
            )
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        lrs = lr
        check_work(estimate_work(order, schedule, quantity=quantity), force=force,
                   option="force=True or a lower order=")  # fmt: skip
        s = series(order, schedule, quantity)
        missing = [t.contraction.text for t in s.terms if t.contraction not in self]
        if missing:
            raise KeyError(
                f"statistics lack {sorted(set(missing))} for {quantity!r} on {schedule}; "
                "measure them with the schedule and quantity included"
            )
        vector = quantity == "displacement"
        count = self.groups  # vectors may be batch means: their own number of rows
        if s.terms:
            count = self.group_values[self.key(s.terms[0].contraction)].shape[0]
        shape = (count, self.parameters) if vector else (count,)
        per_group = np.zeros((order + 1, *shape))
        for t in s.terms:
            coefficient = sp.sympify(t.coefficient)
            if not coefficient.is_number:
                raise ValueError(f"coefficient {coefficient} of {t.contraction.text} has symbols")
            per_group[t.power] += float(coefficient) * self.group_values[self.key(t.contraction)]
        powers = lrs[:, None] ** np.arange(order + 1)[None, :]  # (L, d+1)
        coefficients = per_group.mean(axis=1)
        by_order = np.einsum("ld,d...->ld...", powers, coefficients)
        group_totals = np.einsum("ld,dg...->lg...", powers, per_group)
        return MeasuredPrediction(
            schedule=schedule,
            quantity=quantity,
            lr=lrs,
            coefficients=coefficients,
            coefficient_se=_se(np.moveaxis(per_group, 1, 0), self.exact),
            by_order=by_order,
            total=by_order.sum(axis=1),
            se=_se(np.moveaxis(group_totals, 1, 0), self.exact),
        )

    def _resummed(self, schedule, lr, quantity, order, rank, integral) -> MeasuredPrediction:
        """:meth:`predict` with ``resummed=True``."""
        sub = self.subspace
        if sub is None:
            raise ValueError(
                "these statistics hold no Krylov subspace: measure them with resummed=True, "
                "rank=k (a loaded file does not keep it)"
            )
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        lrs = lr
        rank = check_int("rank", sub.rank if rank is None else rank, minimum=1, maximum=sub.rank)
        order = check_int("order", sub.order if order is None else order, maximum=sub.order)
        sub.check(schedule, quantity, order)
        growth = warn_if_unstable(
            sub.ritz_values(rank), lrs, int(schedule.steps), integral=integral, stacklevel=3
        )
        kw = {"lr": lrs, "quantity": quantity, "order": order, "integral": integral}
        by_order = sub.values(schedule, rank=rank, **kw)
        coarse = sub.values(schedule, rank=max(rank // 2, 1), **kw)
        total = by_order.sum(axis=1)
        k = int(self.meta.get("resummed_groups", 1))
        if self.exact or k < 2:
            se = np.zeros_like(total) if self.exact else np.full_like(total, np.nan)
        else:
            n = int(sub.derivs[0].shape[0])
            order_rows = np.random.default_rng(int(self.meta.get("seed", 0))).permutation(n)
            reps = []
            for group in np.array_split(order_rows, k):
                keep = np.setdiff1d(order_rows, group)
                reps.append(sub.values(schedule, rank=rank, rows=keep, **kw).sum(axis=1))
            reps = np.stack(reps)
            se = np.sqrt((k - 1) / k * ((reps - reps.mean(axis=0)) ** 2).sum(axis=0))
        with np.errstate(invalid="ignore"):  # inf − inf where K^T overflows (warned)
            error = np.abs(total - coarse.sum(axis=1))
            cumulative = None
            if quantity != "displacement":
                cumulative = np.abs(np.cumsum(by_order, axis=1) - np.cumsum(coarse, axis=1))
        return MeasuredPrediction(
            schedule=schedule,
            quantity=quantity,
            lr=lrs,
            coefficients=None,
            coefficient_se=None,
            by_order=by_order,
            total=total,
            se=se,
            resummed=True,
            rank=rank,
            error=error,
            unstable=growth > UNSTABLE_GROWTH,
            growth=growth,
            cumulative_error=cumulative,
        )

    # ------------------------------------------------------------------ files
    def trust(
        self,
        schedule: Schedule,
        *,
        lr: float | Sequence[float] | np.ndarray,
        quantity: str = "test",
        order: int | None = None,
        resummed: bool = False,
        trials: int = 1,
        sample_curvatures: Sequence[float] | None = None,
        points: int = 12,
    ) -> Trust:
        """How far :meth:`predict`'s prediction can be trusted, before any run: its
        ``error_estimate``, ``trusted`` and the trusted horizon per learning rate
        (:func:`perturb.numeric.trust.assess`, the computation ``validate`` and
        ``compare`` use).

        Example:
            >>> import torch
            >>> from perturb.numeric.measuring import measure
            >>> from perturb.symbolic.schedules import Online
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
            >>> st = measure(f, x, torch.ones(2), order=2, exact=True, progress=False)
            >>> st.trust(Online(steps=10, batch_size=1), lr=[0.01]).trusted_steps.tolist()
            [10]
        """
        return assess(
            self, schedule, lr=lr, order=order, quantity=quantity, resummed=resummed,
            trials=trials, sample_curvatures=sample_curvatures, points=points,
        )  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to one ``.npz`` file: JSON metadata and float64 arrays (no pickle).

        The Krylov :attr:`subspace` is not written (its basis is ``P·k`` numbers); the
        header's ``meta["subspace"]`` says so, and a loaded file makes re-summed
        predictions only after measuring again with ``resummed=True``.

        Example:
            >>> import tempfile, pathlib, torch
            >>> from perturb.numeric.measuring import measure
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     st.save(pathlib.Path(tmp) / "stats.npz")
            ...     back = Statistics.load(pathlib.Path(tmp) / "stats.npz")
            >>> sorted(back.contractions) == sorted(st.contractions)
            True
        """
        entries, arrays = [], {}
        for i, (key, c) in enumerate(self.contractions.items()):
            entries.append(
                {
                    "key": key,
                    "text": c.text,
                    "parents": list(c.parents),
                    "parts": [list(p) for p in c.parts],
                    "form": c.form,
                    "open_root": c.open_root,
                }
            )
            arrays[f"values_{i}"] = np.asarray(self.group_values[key], dtype=np.float64)
        header = {
            "format": "perturb.Statistics",
            "version": 1,
            "order": self.order,
            "exact": self.exact,
            "rows": self.rows,
            "groups": self.groups,
            "parameters": self.parameters,
            "meta": self.meta
            if self.subspace is None
            else {**self.meta, "subspace": "not saved: measure with resummed=True again"},
            "entries": entries,
        }
        with open(os.fspath(path), "wb") as fh:
            np.savez(fh, header=np.array(json.dumps(header, ensure_ascii=False)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Read a file written by :meth:`save` (``allow_pickle=False``), checking all of it.

        Raises:
            FileNotFoundError: no file at ``path``.
            perturb.errors.StatisticsFileError: a file that is no statistics file (not a
                zip, truncated, fields missing or of the wrong type) or whose statistics
                are inconsistent: values not finite or not of the shape the header gives
                (``(groups,)``, ``(groups, parameters)`` for open roots), ``exact`` with
                more than one value per statistic, ``groups`` outside ``1..rows``, or an
                ``order`` above the diagrams stored.

        Example:
            >>> import tempfile, pathlib
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     path = pathlib.Path(tmp) / "stats.npz"
            ...     np.savez(path, header=np.array('{"format": "perturb.Statistics"}'))
            ...     try:
            ...         Statistics.load(path)
            ...     except StatisticsFileError as err:
            ...         print(str(err).split("(")[1])
            version None, expected 1)
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file {path!r} does not exist")

        def bad(why: str) -> StatisticsFileError:
            return StatisticsFileError(f"{path!r} is not a perturb statistics file ({why})")

        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise bad("a single array, not an .npz archive")
            with archive as z:
                if "header" not in z.files:
                    raise bad("no header")
                header = json.loads(str(z["header"]))
                arrays = {k: np.array(z[k]) for k in z.files if k != "header"}
        except (StatisticsFileError, MemoryError):
            raise
        except Exception as err:  # anything a corrupt or truncated archive raises
            raise bad(f"{type(err).__name__}: {err}") from err
        return cls(**_checked_file(header, arrays, bad))

    def communication_bytes(self, world: int) -> int:
        """Bytes each rank receives when ``world`` ranks split this measurement (see
        :func:`perturb.numeric.distributed.communication_bytes`)."""
        if self.exact or self.meta.get("estimator") != "tuples":
            return 0
        batched = "vector_batches" in self.meta
        width = whole = 0
        for key, v in self.group_values.items():
            if batched and self.contractions[key].open_root:
                whole += int(v.size)
            else:
                width += int(np.prod(v.shape[1:]))
        return 8 * world * (6 + -(-self.groups // world) * width + whole)


class HostCopy:
    """Device tensors to NumPy; large CUDA ones through one reused page-locked buffer.

    Per-tuple vectors (``vector_batches=None``) are ``R × P`` float64 (0.8 GB at
    ``R = 1024``, ``P ≈ 10⁵``); a pageable device-to-host copy of that took 0.6 s on an
    H100 host, the staged copy plus a host copy about a third of that (docs/benchmarks.md).

    Example:
        >>> import torch
        >>> HostCopy()(torch.arange(3.0))
        array([0., 1., 2.], dtype=float32)
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, tensor: torch.Tensor) -> np.ndarray:
        tensor = tensor.detach()
        if tensor.device.type != "cuda" or tensor.numel() < 2**20:
            return tensor.cpu().numpy()
        if self.buffer is None or self.buffer.numel() < tensor.numel():
            self.buffer = torch.empty(tensor.numel(), dtype=torch.float64, pin_memory=True)
        staged = self.buffer[: tensor.numel()].view(tensor.shape)
        staged.copy_(tensor.to(torch.float64))
        return staged.numpy().copy()


def _plain(lr: object) -> object:
    """``lr`` with NumPy arrays and scalars as Python lists and numbers, for ``check_lrs``."""
    return lr.tolist() if isinstance(lr, np.ndarray | np.generic) else lr


def check_schedule_sizes(schedule: Schedule) -> None:
    """Refuse schedule sizes past :data:`MAX_SIZE`: the series' coefficients are float64.

    Example:
        >>> from perturb.symbolic.schedules import Online
        >>> try:
        ...     check_schedule_sizes(Online(steps=10**400, batch_size=1))
        ... except ValueError as err:
        ...     print(str(err).split(" (")[0])
        steps must be at most 2^53 = 9007199254740992
    """
    for name in ("steps", "batch_size", "train_size", "epochs"):
        value = getattr(schedule, name, None)
        if isinstance(value, int | sp.Integer) and int(value) > MAX_SIZE:
            digits = len(str(int(value)))
            shown = f"a {digits}-digit number" if digits > 20 else str(int(value))
            raise ValueError(
                f"{name} must be at most 2^53 = {MAX_SIZE} (the predictions are float64 "
                f"numbers), got {shown}"
            )


def _count(header: dict, name: str, minimum: int, bad: Callable) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _checked_file(header: Any, arrays: dict[str, np.ndarray], bad: Callable) -> dict[str, Any]:
    """The fields of :class:`Statistics` from a file's header and arrays, every one checked."""
    if not isinstance(header, dict) or header.get("format") != "perturb.Statistics":
        raise bad("no perturb.Statistics header")
    if header.get("version") != 1:
        raise bad(f"version {header.get('version')!r}, expected 1")
    order, rows = _count(header, "order", 0, bad), _count(header, "rows", 1, bad)
    groups, parameters = _count(header, "groups", 1, bad), _count(header, "parameters", 1, bad)
    exact, meta, entries = header.get("exact"), header.get("meta", {}), header.get("entries")
    if groups > rows:
        raise bad(f"groups = {groups} is more than rows = {rows}")
    if not isinstance(exact, bool) or not isinstance(meta, dict) or not isinstance(entries, list):
        raise bad("exact must be true or false, meta a mapping and entries a list")
    if exact and groups != 1:
        raise bad(f"exact statistics hold one group, the header says groups = {groups}")
    counts = {groups, meta.get("vector_batches")}  # open roots may hold batch means
    contractions, values = {}, {}
    for i, e in enumerate(entries):
        try:
            c = Contraction(
                parents=tuple(int(p) for p in e["parents"]),
                parts=tuple(tuple(int(v) for v in p) for p in e["parts"]),
                form=e["form"],
                open_root=e["open_root"],
            )
            key = e["key"]
            if not isinstance(key, str) or not isinstance(c.open_root, bool) or key in values:
                raise ValueError("a key that is no string or repeats, or open_root not a flag")
        except (TypeError, KeyError, ValueError, IndexError) as err:
            raise bad(f"entry {i}: {type(err).__name__}: {err}") from err
        v = arrays.get(f"values_{i}")
        if v is None or v.dtype.kind not in "fiu":
            raise bad(f"no numeric values for {c.text} (values_{i})")
        want = f"(K, {parameters})" if c.open_root else "(K,)"
        if v.ndim != 1 + c.open_root or (c.open_root and v.shape[1] != parameters):
            raise bad(f"values of {c.text} have shape {v.shape}, expected {want}")
        if v.shape[0] not in (counts if c.open_root else {groups}):
            raise bad(f"{c.text} holds {v.shape[0]} group values, the header says {groups}")
        if not np.isfinite(v).all():
            raise bad(f"values of {c.text} are not all finite")
        contractions[key], values[key] = c, v.astype(np.float64)
    edges = max((len(c.parents) - 1 for c in contractions.values()), default=0)
    if order > edges:
        raise bad(f"order {order}, but the diagrams stored have at most {edges} edges")
    return {
        "order": order,
        "exact": exact,
        "rows": rows,
        "groups": groups,
        "parameters": parameters,
        "contractions": contractions,
        "group_values": values,
        "meta": dict(meta),
    }


def _se(group_values: np.ndarray, exact: bool) -> np.ndarray:
    k = group_values.shape[0]
    if exact:
        return np.zeros(group_values.shape[1:])
    if k < 2:
        return np.full(group_values.shape[1:], np.nan)
    return group_values.std(axis=0, ddof=1) / math.sqrt(k)
