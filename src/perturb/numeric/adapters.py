r"""Adapters from what a user passes (a model, a loss, rows) to what the engine differentiates.

A model becomes a per-sample loss of one flat parameter vector (:class:`FlatLoss`, built by
:func:`flat_loss` after :func:`check_model` has looked for pieces that break the smoothness
the expansion assumes); any input (a model, a :class:`FlatLoss`, a per-row
``loss_fn(params, *row) -> scalar`` or a :class:`~perturb.numeric.population.Population`)
becomes an :class:`Objective`: the rows, the point ``θ_0`` and two forms of the loss, one
row at a time ``l(θ; x)`` and a batch of rows ``(l(θ; x_i))_i``, checked once on the first
rows so that a wrong shape fails here rather than inside a ``vmap``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from perturb.numeric.population import Population

__all__ = [
    "BATCHNORM_LAYERS",
    "DROPOUT_LAYERS",
    "NON_ANALYTIC_LAYERS",
    "FlatLoss",
    "NonSmoothWarning",
    "Objective",
    "check_model",
    "cross_entropy_per_sample",
    "flat_loss",
    "objective",
]

_DTYPES = (torch.float32, torch.float64)


class NonSmoothWarning(UserWarning):
    """A model contains a piece that breaks the smoothness assumed by the perturbative expansion.

    Example:
        >>> issubclass(NonSmoothWarning, UserWarning)
        True
    """


#: Module types :func:`check_model` warns about (not analytic) or rejects (BatchNorm in training
#: mode); dropout is warned about in training mode.
NON_ANALYTIC_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ReLU6,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Softsign,
    nn.Threshold,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
)
DROPOUT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
BATCHNORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        getattr(nn.modules.batchnorm, "_BatchNorm", None),
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
    )
    if cls is not None
)


def check_model(model: nn.Module) -> None:
    """Check that a model fits the smoothness assumptions of the perturbative expansion.

    Only submodules are inspected; activations applied functionally inside ``forward`` (e.g.
    ``F.relu``) cannot be seen.

    Args:
        model: The model to inspect.

    Warns:
        NonSmoothWarning: For each non-analytic submodule (ReLU and its variants, ELU/CELU/SELU,
            hard activations, max-pooling, LP-pooling) and each dropout layer in training mode.

    Raises:
        ValueError: If a BatchNorm layer is in training mode (it couples the samples in a batch).

    Example:
        >>> check_model(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))  # silent
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     check_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> print(caught[0].message)
        submodule '1' (ReLU): the perturbative expansion assumes a smooth loss; ReLU is not analytic
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_model expects a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        label = f"submodule {name!r}" if name else "the model"
        kind = type(module).__name__
        if isinstance(module, BATCHNORM_LAYERS) and module.training:
            raise ValueError(
                f"{label} ({kind}) is in training mode: batch normalisation couples the samples "
                "in a batch; call model.eval() or remove it"
            )
        if isinstance(module, NON_ANALYTIC_LAYERS):
            warnings.warn(
                f"{label} ({kind}): the perturbative expansion assumes a smooth loss; "
                f"{kind} is not analytic",
                NonSmoothWarning,
                stacklevel=2,
            )
        elif isinstance(module, DROPOUT_LAYERS) and module.training and module.p > 0:
            warnings.warn(
                f"{label} ({kind}): the perturbative expansion assumes a smooth, deterministic "
                f"loss; {kind} is random in training mode; call model.eval() or remove it",
                NonSmoothWarning,
                stacklevel=2,
            )


def cross_entropy_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy loss.

    Args:
        logits: ``(n, num_classes)`` logits.
        y: ``(n,)`` integer labels.

    Returns:
        A ``(n,)`` tensor of losses (differentiable).

    Example:
        >>> cross_entropy_per_sample(torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor([1.3863, 1.3863])
    """
    return F.cross_entropy(logits, y, reduction="none")


@dataclass(frozen=True, eq=False)
class FlatLoss:
    """A model's per-sample loss as a function of one flat parameter vector.

    ``FlatLoss(params, x, y)`` returns the ``(n,)`` per-sample losses
    ``loss(model(x; params), y)``.  Parameters are a flat vector (``P`` entries in the order
    of ``model.named_parameters()``); buffers are fixed at their current values.  Build it
    with :func:`flat_loss`.

    Attributes:
        model: the module (its own parameters are not used, only its structure).
        loss: ``loss(output, y) -> (n,)`` per-sample losses.
        names: parameter names.
        shapes: parameter shapes.
        buffers: the fixed buffers.

    Example:
        >>> import torch
        >>> fn, theta0 = flat_loss(torch.nn.Linear(3, 2))
        >>> fn.size, {k: tuple(v.shape) for k, v in fn.unflatten(theta0).items()}
        (8, {'weight': (2, 3), 'bias': (2,)})
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """``P``, the number of parameters."""
        return sum(math.prod(s) for s in self.shapes)

    def unflatten(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into the model's named parameter tensors."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = math.prod(shape)
            out[name] = params[offset : offset + k].view(shape)
            offset += k
        return out

    def to(self, dtype: torch.dtype, device: torch.device) -> FlatLoss:
        """The same loss with buffers cast (floating ones) and moved."""
        bufs = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in self.buffers.items()
        }
        return FlatLoss(self.model, self.loss, self.names, self.shapes, bufs)

    def __call__(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, (self.unflatten(params), dict(self.buffers)), (x,))
        return self.loss(out, y)


def flat_loss(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
) -> tuple[FlatLoss, torch.Tensor]:
    """Per-sample loss of ``model`` on flat parameters, and the current flat parameters.

    The model is checked with :func:`check_model` (a warning for ReLU and other non-analytic
    pieces, an error for BatchNorm in training mode).

    Args:
        model: the network.
        loss: ``loss(output, y) -> (n,)``, per-sample losses (default cross-entropy).

    Returns:
        ``(loss_fn, theta0)``: ``loss_fn(params_flat, x_batch, y_batch) -> (n,)`` (a
        :class:`FlatLoss`) and the model's parameters as one detached vector.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> fn, theta0 = flat_loss(net)
        >>> theta0.shape, fn(theta0, torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])).shape
        (torch.Size([8]), torch.Size([4]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    check_model(model)
    named = [(n, p) for n, p in model.named_parameters()]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to differentiate")
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fn = FlatLoss(
        model=model,
        loss=loss,
        names=tuple(n for n, _ in named),
        shapes=tuple(p.shape for _, p in named),
        buffers=buffers,
    )
    return fn, theta0


@dataclass(frozen=True, eq=False)
class Objective:
    """Rows, point and the two loss forms the engine differentiates (see :func:`objective`).

    Attributes:
        single: ``single(θ, *row) -> scalar``, the loss of one row.
        batch: ``batch(θ, *rows) -> (n,)``, the losses of a batch of rows.
        rows: the rows, tensors with a common leading axis, on the device.
        theta0: the point ``θ_0``, a 1-D tensor of the working dtype.
        origin: the row index in the caller's data of each row here (for error messages).

    Example:
        >>> import torch
        >>> obj = objective(lambda p, x: (p * x).sum(), torch.ones(3, 2), torch.zeros(2))
        >>> obj.n, obj.size, obj.select(torch.tensor([2])).origin.tolist()
        (3, 2, [2])
    """

    single: Callable[..., torch.Tensor]  # (theta, *row) -> scalar
    batch: Callable[..., torch.Tensor]  # (theta, *rows) -> (n,)
    rows: tuple[torch.Tensor, ...]
    theta0: torch.Tensor
    origin: torch.Tensor  # row index in the caller's data of each row here

    @property
    def n(self) -> int:
        """The number of rows."""
        return int(self.rows[0].shape[0])

    @property
    def size(self) -> int:
        """``P``, the number of parameters."""
        return int(self.theta0.numel())

    def select(self, idx: torch.Tensor) -> Objective:
        """The rows ``idx`` only (their :attr:`origin` kept)."""
        return Objective(
            self.single,
            self.batch,
            tuple(r[idx] for r in self.rows),
            self.theta0,
            self.origin[idx],
        )


def _as_rows(data: Any, what: str) -> tuple[torch.Tensor, ...]:
    if isinstance(data, torch.Tensor | np.ndarray):
        rows = (torch.as_tensor(data),)
    elif isinstance(data, Sequence) and not isinstance(data, str) and len(data) > 0:
        rows = tuple(torch.as_tensor(d) for d in data)
    else:
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(data).__name__}")
    for r in rows:
        if r.ndim == 0:
            raise ValueError(f"{what} must have a leading row axis, got a 0-d tensor")
    n = int(rows[0].shape[0])
    if n == 0:
        raise ValueError(f"{what} is empty: it must hold at least one row, got 0 rows")
    lengths = [int(r.shape[0]) for r in rows]
    if len(set(lengths)) != 1:
        raise ValueError(f"{what}: every tensor needs the same number of rows, got {lengths}")
    return rows


def objective(
    loss_fn_or_model: Any,
    data: Any,
    theta0: Any = None,
    *,
    loss: Callable | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Objective:
    """The :class:`Objective` of a model, a :class:`FlatLoss`, a per-row loss or a population.

    Args:
        loss_fn_or_model: an ``nn.Module`` (with ``data = (x, y)``), a :class:`FlatLoss`, a
            :class:`~perturb.numeric.population.Population` (``data=None``) or a per-row
            ``loss_fn(params, *row) -> scalar``.
        data: the rows: a tensor, or a tuple of tensors with a common leading axis.
        theta0: the point (default: a model's own parameters).
        loss: per-sample loss of a model's output (default cross-entropy).
        dtype: ``torch.float32`` or ``torch.float64``.
        device: where to compute (default: ``theta0``'s device).

    Raises:
        ValueError: For a wrong dtype, missing or empty data, a missing or misshapen
            ``theta0``, or a loss that does not return one scalar per row.
        TypeError: For anything that is neither a model nor a loss.

    Example:
        >>> import torch
        >>> obj = objective(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])))
        >>> obj.n, obj.size, obj.batch(obj.theta0, *obj.rows).shape
        (4, 8, torch.Size([4]))
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(loss_fn_or_model, Population):
        if data is not None:
            raise ValueError("pass data=None with a Population: its rows are the data")
        data = loss_fn_or_model.data
        loss_fn_or_model = loss_fn_or_model.loss_fn
    if data is None:
        raise ValueError("data is required (a tensor of rows, or (x, y) for a model)")
    if isinstance(loss_fn_or_model, nn.Module):
        fn, default = flat_loss(
            loss_fn_or_model, cross_entropy_per_sample if loss is None else loss
        )
    elif isinstance(loss_fn_or_model, FlatLoss):
        fn, default = loss_fn_or_model, None
    elif callable(loss_fn_or_model):
        fn, default = None, None
    else:
        raise TypeError(
            "expected an nn.Module, a FlatLoss from flat_loss(), or a per-row loss "
            f"loss_fn(params, x) -> scalar; got {type(loss_fn_or_model).__name__}"
        )
    if theta0 is None:
        if default is None:
            raise ValueError("theta0 is required with a loss function (only a model has its own)")
        theta0 = default
    if device is None:
        device = torch.as_tensor(theta0).device
    device = torch.device(device)
    theta = torch.as_tensor(theta0).detach().to(device=device, dtype=dtype)
    if theta.ndim != 1:
        raise ValueError(f"theta0 must be a 1-D parameter vector, got shape {tuple(theta.shape)}")
    rows = _as_rows(data, "data")
    rows = tuple(
        r.to(device=device, dtype=dtype if r.is_floating_point() else r.dtype) for r in rows
    )
    n = int(rows[0].shape[0])
    origin = torch.arange(n, device=device)
    if fn is not None:
        if theta.numel() != fn.size:
            raise ValueError(
                f"theta0 has {theta.numel()} entries but the model has {fn.size} parameters"
            )
        fn = fn.to(dtype, device)
        batch = fn

        def single(t, *row):
            return fn(t, *(r.unsqueeze(0) for r in row))[0]

        k = min(n, 2)
        probe = fn(theta, *(r[:k] for r in rows))
        if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != (k,):
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe)
            raise ValueError(
                f"the per-sample loss must return one scalar per row, shape ({k},) for {k} "
                f"rows; got {shape}"
            )
    else:
        user = loss_fn_or_model
        single = user
        batch = vmap(user, in_dims=(None, *([0] * len(rows))))
        try:
            probe = user(theta, *(r[0] for r in rows))
        except (RuntimeError, IndexError, ValueError) as err:
            raise ValueError(
                f"loss_fn(theta0, row) failed on the first row (theta0 has {theta.numel()} "
                f"entries; is that the right size?): {err}"
            ) from err
        if not isinstance(probe, torch.Tensor) or probe.ndim != 0:
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe)
            raise ValueError(
                f"loss_fn(params, x) must return a scalar tensor (shape ()) per row, got {shape}"
            )
    return Objective(single, batch, rows, theta, origin)
