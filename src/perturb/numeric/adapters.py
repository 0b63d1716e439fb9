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

from perturb.errors import ModelSpecError
from perturb.numeric.population import Population

__all__ = [
    "BATCHNORM_LAYERS",
    "DROPOUT_LAYERS",
    "NON_ANALYTIC_LAYERS",
    "FlatLoss",
    "FrozenParametersWarning",
    "NonSmoothWarning",
    "Objective",
    "check_forward",
    "check_model",
    "cross_entropy_per_sample",
    "flat_loss",
    "objective",
    "trainable_parameters",
]

_DTYPES = (torch.float32, torch.float64)


class NonSmoothWarning(UserWarning):
    """A model contains a piece that breaks the smoothness assumed by the perturbative expansion.

    Example:
        >>> issubclass(NonSmoothWarning, UserWarning)
        True
    """


class FrozenParametersWarning(UserWarning):
    """Some of a model's parameters do not require grad: they stay fixed, outside ``θ``.

    Example:
        >>> issubclass(FrozenParametersWarning, UserWarning)
        True
    """


def trainable_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], dict[str, torch.Tensor]]:
    """The parameters that are ``θ`` (those that require grad) and the frozen rest.

    Only parameters with ``requires_grad`` are trained and enter the theory; the others
    (``requires_grad=False``, and every integer parameter, which cannot require grad)
    are held fixed at their values, like buffers, with a warning that says how many.

    Args:
        model: the network.

    Returns:
        ``(trainable, frozen)``: ``(name, parameter)`` pairs in ``named_parameters``
        order, and ``{name: detached value}`` of the frozen ones.

    Warns:
        FrozenParametersWarning: when some parameters are frozen.

    Raises:
        perturb.errors.ModelSpecError: no parameter requires grad, or a trainable one is
            not float32 or float64 (half and bfloat16 are refused: convert the model
            with ``model.float()``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
        >>> net[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     trainable, frozen = trainable_parameters(net)
        >>> [n for n, _ in trainable], list(frozen)
        (['0.bias', '1.weight', '1.bias'], ['0.weight'])
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        1 of 4 parameter tensors (6 of 14 numbers) do not require grad ...
    """
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    frozen = {n: p.detach() for n, p in named if not p.requires_grad}
    label = type(model).__name__
    if not trainable:
        raise ModelSpecError(
            f"{label} has no parameters that require grad ({len(named)} parameter tensors, "
            "all frozen): expected at least one trainable parameter for SGD to train"
        )
    for name, p in trainable:
        if p.dtype not in _DTYPES:
            raise ModelSpecError(
                f"parameter {name!r} of {label} is {str(p.dtype).replace('torch.', '')}: "
                "perturb computes in float32 or float64; convert the model first, e.g. "
                "model.float()"
            )
    if frozen:
        numbers = sum(v.numel() for v in frozen.values())
        total = sum(p.numel() for _, p in named)
        warnings.warn(
            f"{len(frozen)} of {len(named)} parameter tensors ({numbers} of {total} numbers) "
            f"do not require grad ({', '.join(list(frozen)[:3])}"
            f"{', …' if len(frozen) > 3 else ''}): they stay fixed and are not part of θ, "
            f"which has the {total - numbers} trainable numbers",
            FrozenParametersWarning,
            stacklevel=2,
        )
    return trainable, frozen


def check_forward(
    loss_fn: Callable[..., torch.Tensor],
    theta: torch.Tensor,
    rows: Sequence[torch.Tensor],
    *,
    model: nn.Module | None = None,
) -> None:
    """Check that a per-sample loss is a pure function of ``θ`` under :mod:`torch.func`.

    perturb differentiates and vectorizes the loss with ``torch.func`` (``grad`` inside
    ``vmap``), which needs a forward that is a function of its inputs alone: no
    ``.item()`` or Python branches on tensor values, no random numbers, no changes to
    buffers.  The probe takes one ``vmap(grad)`` over two copies of ``θ`` and of the
    first two rows (random operations are an error there), then checks that the
    model's buffers and parameters did not change and that two evaluations agree.

    Args:
        loss_fn: ``loss_fn(θ, *rows) -> (n,)``.
        theta: a point, 1-D.
        rows: the data (tensors with a common leading axis; only the first two rows are
            used).
        model: the module behind ``loss_fn``, whose state must not change.

    Raises:
        perturb.errors.ModelSpecError: "your model's forward …", saying what failed.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> fn, theta0 = flat_loss(net)
        >>> check_forward(fn, theta0, (torch.zeros(2, 3), torch.tensor([0, 1])), model=net)
        >>> class Noisy(nn.Linear):
        ...     def forward(self, x):
        ...         return super().forward(x) + torch.randn(2)
        >>> fn, theta0 = flat_loss(Noisy(3, 2))
        >>> try:
        ...     check_forward(fn, theta0, (torch.zeros(2, 3), torch.tensor([0, 1])))
        ... except ModelSpecError as err:
        ...     print(str(err)[:60], "random operation" in str(err))
        your model's forward (or loss) cannot run under torch.func.v True
    """
    few = tuple(r[:2] for r in rows)
    before = (
        {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else {}
    )

    def total(t: torch.Tensor, *batch: torch.Tensor) -> torch.Tensor:
        return loss_fn(t, *batch).sum()

    twice = tuple(r.unsqueeze(0).expand(2, *r.shape) for r in few)
    try:
        vmap(torch.func.grad(total), randomness="error")(theta.unsqueeze(0).expand(2, -1), *twice)
    except Exception as err:  # a user's forward can fail in any way under torch.func
        message = " ".join(str(err).split())[:300]
        raise ModelSpecError(
            "your model's forward (or loss) cannot run under torch.func.vmap(grad(...)), "
            f"which perturb uses to differentiate it: {type(err).__name__}: {message}; "
            "make it a pure function of its inputs: no .item() or branches on tensor "
            "values, no random numbers (dropout: model.eval()), no in-place changes to "
            "buffers"
        ) from err
    if model is not None:
        after = model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        for k, v in before.items():  # put the model back as it was
            after[k].copy_(v)
        if changed:
            raise ModelSpecError(
                f"your model's forward changes {', '.join(changed[:3])}: perturb "
                "differentiates a fixed function of θ, so forward must not update state; "
                "keep running statistics and counters out of it"
            )
    with torch.no_grad():
        first, second = loss_fn(theta, *few), loss_fn(theta, *few)
    if not torch.equal(first, second):
        raise ModelSpecError(
            "your model's forward gives different losses for the same parameters and rows "
            "(random numbers, e.g. dropout in training mode?): perturb needs a "
            "deterministic loss; call model.eval() or remove the randomness"
        )


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
        """Split a flat vector into the model's named parameter tensors.

        One ``split`` (whose backward concatenates the parts' gradients once), not a slice
        per tensor (whose backward pads each part to ``P`` with zeros and adds them: ``2P``
        per tensor per row, the bulk of a per-sample gradient of a wide dense layer).
        """
        parts = params.split([math.prod(shape) for shape in self.shapes])
        return {n: t.view(s) for n, s, t in zip(self.names, self.shapes, parts, strict=True)}

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
    pieces, an error for BatchNorm in training mode).  Only parameters that require grad
    are ``θ`` (:func:`trainable_parameters`); frozen ones are held fixed, as buffers.

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
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters to differentiate")
    named, frozen = trainable_parameters(model)
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.detach() for n, b in model.named_buffers()} | frozen
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
        check_forward(fn, theta, rows, model=fn.model)
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
