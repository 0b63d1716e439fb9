"""Argument checks shared by every command and the Python API.

Each check returns the value in its canonical type or raises :class:`ValueError`
(:class:`~perturb.errors.DeviceError` for devices) with a message saying what was
expected and what came.  Booleans are never accepted as numbers.  This module imports
neither torch nor sympy, so it sits below every layer.

Example:
    >>> check_lrs([0.01, 0.1])
    (0.01, 0.1)
    >>> try:
    ...     check_lr(-0.01)
    ... except ValueError as err:
    ...     print(err)
    lr must be a positive finite number, got -0.01
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from perturb.errors import DeviceError

__all__ = [
    "DEVICES",
    "check_device",
    "check_int",
    "check_ints",
    "check_lr",
    "check_lrs",
    "check_order",
    "check_orders",
    "check_positive",
    "is_int",
    "is_real",
]

DEVICES = ("cpu", "cuda")


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (a ``bool`` is not).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (a ``bool`` is not).

    Example:
        >>> is_real(0.5), is_real(2), is_real(False)
        (True, True, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Example:
        >>> check_int("steps", 10, minimum=1)
        10
        >>> try:
        ...     check_int("trials", 1, minimum=2)
        ... except ValueError as err:
        ...     print(err)
        trials must be an integer ≥ 2, got 1
    """
    bounds = f"in {minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


def check_ints(
    name: str, values: object, *, minimum: int = 0, maximum: int | None = None
) -> tuple[int, ...]:
    """A non-empty sequence of integers in ``[minimum, maximum]``, as a tuple.

    Example:
        >>> check_ints("steps", [25, 50], minimum=1)
        (25, 50)
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}")
    values = tuple(values)
    bounds = f"in {minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
    if not values or any(
        not is_int(v) or v < minimum or (maximum is not None and v > maximum) for v in values
    ):
        raise ValueError(
            f"{name} must be a non-empty sequence of integers {bounds}, got {values!r}"
        )
    return tuple(int(v) for v in values)


def check_positive(name: str, value: object) -> float:
    """A positive finite real number, as a ``float``.

    Example:
        >>> check_positive("width", 0.5)
        0.5
    """
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_lr(lr: object) -> float:
    """A learning rate: a positive finite real number.

    Example:
        >>> check_lr(0.05)
        0.05
    """
    return check_positive("lr", lr)


def check_lrs(lrs: object, *, name: str = "lrs", zero: bool = False) -> tuple[float, ...]:
    """One learning rate or a non-empty sequence of them, as a tuple of floats.

    ``zero=True`` also takes ``0`` (a series at ``η = 0``: the loss at ``θ_0``).

    Example:
        >>> check_lrs(0.1)
        (0.1,)
        >>> try:
        ...     check_lrs([0.1, float("nan")])
        ... except ValueError as err:
        ...     print(err)
        lrs must be positive finite numbers, got (0.1, nan)
    """
    if is_real(lrs):
        lrs = (lrs,)
    kind = "non-negative" if zero else "positive"
    if isinstance(lrs, str | bytes) or not isinstance(lrs, Iterable):
        raise ValueError(f"{name} must be {kind} finite numbers, got {lrs!r}")
    lrs = tuple(lrs)
    least = 0.0 if zero else math.ulp(0.0)
    if not lrs or any(not is_real(v) or not least <= float(v) < math.inf for v in lrs):
        raise ValueError(f"{name} must be {kind} finite numbers, got {lrs!r}")
    return tuple(float(v) for v in lrs)


def check_order(order: object, *, maximum: int | None = None, name: str = "order") -> int:
    """A perturbative order: a non-negative integer (at most ``maximum``).

    Example:
        >>> check_order(3)
        3
    """
    if not is_int(order) or order < 0 or (maximum is not None and order > maximum):
        top = f" at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a non-negative integer{top}, got {order!r}")
    return int(order)


def check_orders(orders: object, *, maximum: int = 4) -> tuple[int, ...]:
    """A non-empty sequence of orders in ``0..maximum``.

    Example:
        >>> check_orders([0, 1, 2])
        (0, 1, 2)
    """
    if isinstance(orders, str | bytes) or not isinstance(orders, Iterable):
        raise ValueError(f"orders must be integers in 0..{maximum}, got {orders!r}")
    orders = tuple(orders)
    if not orders or any(not is_int(d) or not 0 <= d <= maximum for d in orders):
        raise ValueError(f"orders must be integers in 0..{maximum}, got {orders!r}")
    return tuple(int(d) for d in orders)


def check_device(device: object) -> str:
    """A device name perturb can run on here: ``"cpu"``, or ``"cuda"`` when a GPU is present.

    Imports torch only to ask for CUDA.

    Example:
        >>> check_device("cpu")
        'cpu'
        >>> try:
        ...     check_device("tpu")
        ... except ValueError as err:
        ...     print(err)
        device must be one of cpu, cuda, got 'tpu'
    """
    name = str(device)
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was asked for but torch sees no CUDA GPU on this machine "
                f"(torch {torch.__version__}); use --device cpu"
            )
    return name
