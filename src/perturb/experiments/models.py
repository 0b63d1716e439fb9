"""Smooth models for perturbative SGD experiments.

The perturbative (diagrammatic) theory of SGD expands the loss in a Taylor series around the
initial weights, so every model here is built from analytic pieces only: convolutions, linear
layers, average pooling and ``tanh``/``softplus`` activations; no ReLU, max-pooling or
BatchNorm. :func:`check_model` (defined in :mod:`perturb.numeric.adapters`, re-exported here)
inspects user-supplied models for pieces that break those assumptions.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from perturb.errors import ModelSpecError
from perturb.numeric.adapters import (
    BATCHNORM_LAYERS,
    DROPOUT_LAYERS,
    NonSmoothWarning,
    check_model,
    cross_entropy_per_sample,
)

__all__ = [
    "BUILTIN_MODELS",
    "ModelSpecError",
    "NonSmoothWarning",
    "build_model",
    "check_model",
    "cross_entropy_per_sample",
    "load_checkpoint",
    "mlp",
    "smooth_convnet",
    "stem_mlp",
]

#: Built-in model specs accepted by :func:`build_model` (besides ``"pkg.module:factory"``).
BUILTIN_MODELS: tuple[str, ...] = ("smooth-convnet", "mlp")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}
# Variance gain of the activation used to scale the initialisation of the layer feeding it.
_GAINS = {"tanh": 5.0 / 3.0, "softplus": 1.0}


# --------------------------------------------------------------------------- builders


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; analytic activations available: "
            f"{', '.join(_ACTIVATIONS)}"
        ) from None


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(
            f"input_shape must be (C, H, W) or (C, L) with positive sizes, got {input_shape}"
        )
    return shape


@contextlib.contextmanager
def _private_rng() -> Iterator[None]:
    """Restore the global CPU RNG afterwards (nn layer constructors draw default inits from it)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


@torch.no_grad()
def _init(model: nn.Module, *, seed: int, gain: float) -> None:
    """Deterministic LeCun-style init from a private generator (the global RNG is untouched).

    Weights of every conv/linear layer are uniform with variance ``gain**2 / fan_in`` (gain 1 for
    the last layer, which feeds no activation); biases are zero.
    """
    gen = torch.Generator().manual_seed(int(seed))
    layers = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    for i, layer in enumerate(layers):
        weight = layer.weight
        fan_in = weight[0].numel()
        g = 1.0 if i == len(layers) - 1 else gain
        bound = g * math.sqrt(3.0 / fan_in)
        weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=gen))
        if layer.bias is not None:
            layer.bias.zero_()


def smooth_convnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int = 8,
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """A small convnet made only of analytic pieces.

    Layout: a 3×3 stem convolution with ``width`` channels, then 3×3 stride-2 convolutions
    (doubling the channels each time) until the spatial size is at most 4, then global average
    pooling and a linear classifier; ``activation`` follows every convolution. No BatchNorm, no
    max-pooling. At ``width=8`` this gives 1,418 parameters for 1×8×8 digits, 25,034 for
    1×28×28 Fashion-MNIST and 25,178 for 3×32×32 CIFAR-10. For sequences ``(C, L)``
    (MNIST-1D) the same layout with 1-D convolutions of width 3: 34,202 parameters for 1×40.

    Args:
        input_shape: ``(C, H, W)`` of one image or ``(C, L)`` of one sequence.
        num_classes: Number of output logits.
        width: Channels of the stem convolution.
        activation: ``"tanh"`` or ``"softplus"``.
        seed: Seed of the private generator used for the initial weights.

    Returns:
        An ``nn.Sequential`` mapping ``(n, C, H, W)`` to logits ``(n, num_classes)``.

    Examples:
        >>> net = smooth_convnet((1, 8, 8), 10)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in net.parameters())
        1418
        >>> seq = smooth_convnet((1, 40), 10)
        >>> seq(torch.zeros(2, 1, 40)).shape, sum(p.numel() for p in seq.parameters())
        (torch.Size([2, 10]), 34202)
    """
    c, *sizes = _check_shape(input_shape)
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be >= 1, got {width} and {num_classes}")
    _activation(activation)
    conv, pool = (
        (nn.Conv1d, nn.AdaptiveAvgPool1d) if len(sizes) == 1 else (nn.Conv2d, nn.AdaptiveAvgPool2d)
    )
    with _private_rng():
        layers: list[nn.Module] = [conv(c, width, 3, padding=1), _activation(activation)]
        channels = width
        while min(sizes) > 4:
            layers += [conv(channels, 2 * channels, 3, stride=2, padding=1)]
            layers += [_activation(activation)]
            channels *= 2
            sizes = [(s + 1) // 2 for s in sizes]
        layers += [pool(1), nn.Flatten(), nn.Linear(channels, num_classes)]
        model = nn.Sequential(*layers)
    _init(model, seed=seed, gain=_GAINS[activation])
    return model


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (32,),
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """A fully connected network with analytic activations.

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)`` of one input (flattened by the first
            layer), e.g. ``(1, d)`` for the tabular rows of an ``npz`` dataset.
        num_classes: Number of output logits.
        hidden: Widths of the hidden layers (empty for a linear model).
        activation: ``"tanh"`` or ``"softplus"``.
        seed: Seed of the private generator used for the initial weights.

    Returns:
        An ``nn.Sequential`` mapping ``(n, C, H, W)`` to logits ``(n, num_classes)``.

    Examples:
        >>> net = mlp((1, 8, 8), 10, hidden=(32,))
        >>> net(torch.zeros(3, 1, 8, 8)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([3, 10]), 2410)
        >>> mlp((1, 13), 3)(torch.zeros(5, 1, 13)).shape  # 5 tabular rows of 13 features
        torch.Size([5, 3])
    """
    shape = _check_shape(input_shape)
    if num_classes < 1 or any(int(k) < 1 for k in hidden):
        raise ValueError(f"num_classes and hidden widths must be >= 1, got {num_classes}, {hidden}")
    _activation(activation)  # validate the name even when there are no hidden layers
    with _private_rng():
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(shape)
        for k in hidden:
            layers += [nn.Linear(fan_in, int(k)), _activation(activation)]
            fan_in = int(k)
        layers.append(nn.Linear(fan_in, num_classes))
        model = nn.Sequential(*layers)
    _init(model, seed=seed, gain=_GAINS[activation])
    return model


def stem_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: int = 16,
    pool: int = 2,
    hidden: int = 244,
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """Average pooling, a convolution stem, then one wide dense hidden layer: analytic pieces.

    Layout: ``pool × pool`` average pooling (stride ``pool``) of the input, a 3×3
    convolution with ``channels`` channels (padding 1), ``activation``, a dense layer of
    ``hidden`` units, ``activation``, a linear classifier.  Nearly every parameter sits in
    the dense layer, ``channels·⌊H/pool⌋·⌊W/pool⌋ × hidden`` weights, each used once per
    row, so a forward pass costs about ``2P`` flops per row, not the ``P ×`` spatial size of
    a convolution's weights: at the defaults, 1,002,566 parameters for 3×32×32 inputs and
    10 classes (the convolution 448, the dense layer 4,096 × 244 + 244, the classifier
    2,450) and about 2.2 MFLOP per row forward, against 240 MFLOP for
    :func:`smooth_convnet` of the same size (``width=52``).  For sequences ``(C, L)`` the
    same layout in 1-D.

    Args:
        input_shape: ``(C, H, W)`` of one image or ``(C, L)`` of one sequence.
        num_classes: Number of output logits.
        channels: Channels of the stem convolution.
        pool: Side of the average-pooling window (at most the smallest spatial size).
        hidden: Units of the dense hidden layer.
        activation: ``"tanh"`` or ``"softplus"``.
        seed: Seed of the private generator used for the initial weights.

    Returns:
        An ``nn.Sequential`` mapping ``(n, C, H, W)`` to logits ``(n, num_classes)``.

    Examples:
        >>> net = stem_mlp((3, 32, 32), 10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 1002566)
        >>> sum(p.numel() for p in stem_mlp((1, 8, 8), 3, channels=2, hidden=5).parameters())
        203
    """
    c, *sizes = _check_shape(input_shape)
    if min(channels, hidden, num_classes) < 1 or not 1 <= pool <= min(sizes):
        raise ValueError(
            f"channels, hidden and num_classes must be >= 1 and pool in 1..{min(sizes)}, got "
            f"channels={channels}, hidden={hidden}, num_classes={num_classes}, pool={pool}"
        )
    _activation(activation)
    conv, avg = (nn.Conv1d, nn.AvgPool1d) if len(sizes) == 1 else (nn.Conv2d, nn.AvgPool2d)
    features = channels * math.prod(s // pool for s in sizes)
    with _private_rng():
        model = nn.Sequential(
            avg(pool),
            conv(c, channels, 3, padding=1),
            _activation(activation),
            nn.Flatten(),
            nn.Linear(features, hidden),
            _activation(activation),
            nn.Linear(hidden, num_classes),
        )
    _init(model, seed=seed, gain=_GAINS[activation])
    return model


def build_model(
    spec: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int = 0,
    check: bool = True,
) -> nn.Module:
    """Build a model from a spec string.

    A factory's module is imported as ``python -m`` would find it: the current working
    folder is searched first (it is put in front of ``sys.path`` for the import only).
    With ``check``, a factory's model must be one SGD on flat parameters can run
    (vectorized over trials with :func:`torch.func.vmap`): it must have parameters, no
    BatchNorm layer in training mode (it couples the samples of a batch), no dropout in
    training mode (a random operation), and map a zero input ``(2, C, H, W)`` to logits
    of shape ``(2, num_classes)``, one per class.

    Args:
        spec: ``"smooth-convnet"``, ``"mlp"`` or ``"pkg.module:factory"``. A factory is called
            with whichever of the keywords ``input_shape``, ``num_classes`` and ``seed`` it
            accepts (all of them if it takes ``**kwargs``; none if it accepts none).
        input_shape: ``(C, H, W)`` of one input.
        num_classes: Number of output logits.
        seed: Seed for the initial weights.
        check: Check a factory's model as above (the built-ins pass by construction).

    Returns:
        The model (an ``nn.Module``).

    Raises:
        ModelSpecError: Unknown built-in, malformed spec, module that cannot be imported,
            missing attribute, non-callable factory, a factory not returning an
            ``nn.Module``, or (with ``check``) a model failing a check above.

    Examples:
        >>> build_model("mlp", (1, 8, 8), 10)(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
        >>> try:
        ...     build_model("torch.nn:Identity", (1, 8, 8), 10)
        ... except ModelSpecError as err:
        ...     print(str(err).split(": ")[0])
        model 'torch.nn:Identity' (Identity) has no parameters
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(
            f"model spec must be a non-empty string, got {spec!r}; "
            f"valid built-ins: {', '.join(BUILTIN_MODELS)}, or 'pkg.module:factory'"
        )
    spec = spec.strip()
    key = spec.lower().replace("_", "-")
    if key == "smooth-convnet":
        return smooth_convnet(input_shape, num_classes, seed=seed)
    if key == "mlp":
        return mlp(input_shape, num_classes, seed=seed)
    if ":" not in spec:
        raise ModelSpecError(
            f"unknown model spec {spec!r}; valid built-ins: {', '.join(BUILTIN_MODELS)}, "
            "or 'pkg.module:factory' for a factory function returning an nn.Module"
        )
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ModelSpecError(
            f"malformed model spec {spec!r}: expected 'pkg.module:factory' with both parts "
            f"non-empty (valid built-ins: {', '.join(BUILTIN_MODELS)})"
        )
    try:
        module = _import_from_cwd(module_name)
    except ImportError as err:
        raise ModelSpecError(
            f"cannot import module {module_name!r} from model spec {spec!r}: {err}"
        ) from err
    factory: Any = module
    for part in attr_path.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ModelSpecError(
                f"module {module_name!r} has no attribute {attr_path!r} (model spec {spec!r})"
            ) from None
    if not callable(factory):
        raise ModelSpecError(
            f"{spec!r} is not callable (got {type(factory).__name__}); expected a factory "
            "returning an nn.Module"
        )
    offered = {"input_shape": tuple(input_shape), "num_classes": num_classes, "seed": seed}
    model = factory(**_accepted_kwargs(factory, offered))
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    if check:
        _check_factory_model(model, spec, tuple(input_shape), num_classes)
    return model


def _import_from_cwd(module_name: str) -> Any:
    """Import ``module_name`` with the current working folder searched first, as ``python -m``."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _check_factory_model(
    model: nn.Module, spec: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Raise :class:`ModelSpecError` if SGD on flat parameters cannot run ``model``."""
    label = f"model {spec!r} ({type(model).__name__})"
    params = list(model.parameters())
    if not params:
        raise ModelSpecError(
            f"{label} has no parameters: expected a network with weights for SGD to train"
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        where = f"submodule {name!r} ({kind})" if name else f"the model ({kind})"
        if isinstance(module, BATCHNORM_LAYERS) and module.training:
            raise ModelSpecError(
                f"{label}: {where} is a BatchNorm layer in training mode, which couples the "
                "samples of a batch; expected per-sample layers: remove it, or return "
                "model.eval() from the factory"
            )
        if isinstance(module, DROPOUT_LAYERS) and module.training and module.p > 0:
            raise ModelSpecError(
                f"{label}: {where} is dropout in training mode, a random operation the "
                "vectorized trials cannot run; expected a deterministic model: remove it, or "
                "return model.eval() from the factory"
            )
    floating = [p for p in params if p.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.get_default_dtype()
    zeros = torch.zeros((2, *input_shape), dtype=dtype, device=params[0].device)
    try:
        with torch.no_grad():
            out = model(zeros)
    except Exception as err:  # a user's forward can fail in any way
        raise ModelSpecError(
            f"{label} fails on a zero input of shape {tuple(zeros.shape)}: expected it to take "
            f"(n, C, H, W) images of the dataset; got {type(err).__name__}: {err}"
        ) from err
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape != (2, num_classes):
        got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
        raise ModelSpecError(
            f"{label} maps a zero input of shape {tuple(zeros.shape)} to {got}: expected "
            f"logits of shape (2, {num_classes}), one per class of the dataset; make its last "
            f"layer output num_classes={num_classes}"
        )


def _accepted_kwargs(func: Any, offered: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in offered.items() if k in names}


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a saved ``state_dict`` into ``model`` (in place) after checking it matches.

    The file is read with ``torch.load(..., weights_only=True)`` (no arbitrary code) and may
    hold the state dict itself or a dict with the key ``"state_dict"`` or ``"model"``. A
    ``"module."`` prefix (from ``DataParallel``) is stripped when the model has none.

    Args:
        model: The model to fill.
        path: Path of the checkpoint file.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ModelSpecError: If the file is not a readable state dict, its keys or shapes do not
            match the model (all missing and unexpected keys and shape mismatches are listed),
            or a weight is NaN or infinite.

    Examples:
        >>> import tempfile, pathlib
        >>> a, b = mlp((1, 2, 2), 3, seed=0), mlp((1, 2, 2), 3, seed=1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save(a.state_dict(), pathlib.Path(tmp) / "a.pt")
        ...     _ = load_checkpoint(b, pathlib.Path(tmp) / "a.pt")
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    path_str = os.fspath(path)
    if not os.path.isfile(path_str):
        raise FileNotFoundError(f"checkpoint file {path_str!r} does not exist")
    try:
        obj = torch.load(path_str, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ModelSpecError(
            f"cannot read checkpoint {path_str!r} as a weights-only state dict: {err}"
        ) from err
    state = _extract_state_dict(obj, path_str)
    expected = model.state_dict()
    if not any(k.startswith("module.") for k in expected) and all(
        k.startswith("module.") for k in state
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched)}")
        raise ModelSpecError(
            f"checkpoint {path_str!r} does not match {type(model).__name__}: " + "; ".join(parts)
        )
    for name, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ModelSpecError(
                    f"checkpoint {path_str!r} has non-finite weights in {name} ({bad} of "
                    f"{value.numel()} entries NaN or inf): expected finite weights; save a "
                    "checkpoint from before the run diverged"
                )
    model.load_state_dict(state, strict=True)
    return model


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelSpecError(
            f"checkpoint {path!r} is not a state dict: expected a mapping of parameter names to "
            "tensors (optionally under the key 'state_dict' or 'model'), "
            f"got {type(obj).__name__}"
        )
    return dict(obj)
