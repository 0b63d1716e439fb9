"""Schedules from user options: the one place that turns sizes and a name into a schedule.

The command line, :func:`perturb.validate` and :func:`perturb.compare` all build their
schedules here, so the same options mean the same schedule everywhere and a size a
schedule does not take is an error, never silently ignored.

Example:
    >>> describe(make_schedule("online", steps=100, batch_size=4))
    'online SGD (100 steps, batch 4)'
"""

from __future__ import annotations

import sympy as sp

from perturb.symbolic.schedules import GD, Epochs, Online, Schedule

__all__ = ["SCHEDULES", "describe", "make_schedule"]

SCHEDULES = ("online", "epochs", "gd")
"""Schedule names accepted by ``--schedule``."""

# which schedule takes which size option (the option's parameter name -> schedules)
_APPLIES = {
    "steps": ("online", "gd"),
    "batch_size": ("online", "epochs"),
    "train_size": ("epochs", "gd"),
    "epochs": ("epochs",),
    "shuffle": ("epochs",),
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _count(value: sp.Expr, noun: str) -> str:
    return f"{value} {noun}" if value == 1 else f"{value} {noun}s"


def make_schedule(
    name: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    train_size: int | None = None,
    epochs: int | None = None,
    shuffle: bool = False,
) -> Schedule:
    """The schedule named ``name`` from the command line's size options.

    Sizes left as ``None`` stay symbolic.  Options a schedule does not take are an
    error rather than silently ignored.

    Args:
        name: ``"online"``, ``"epochs"`` or ``"gd"``.
        steps: ``T`` (online, gd).
        batch_size: ``B`` (online, epochs).
        train_size: ``N`` (epochs, gd).
        epochs: ``E`` (epochs).
        shuffle: reshuffle before each epoch (epochs).

    Returns:
        The :class:`~perturb.symbolic.schedules.Schedule`.

    Raises:
        ValueError: unknown name, an option the schedule does not take, or sizes
            the schedule rejects (e.g. a batch size not dividing the train size).

    Example:
        >>> make_schedule("epochs", train_size=6, batch_size=2).steps
        3*E
        >>> make_schedule("gd", epochs=2)
        Traceback (most recent call last):
        ...
        ValueError: --epochs does not apply to --schedule gd (it takes --steps, --train-size)
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    given = {
        "steps": steps is not None,
        "batch_size": batch_size is not None,
        "train_size": train_size is not None,
        "epochs": epochs is not None,
        "shuffle": bool(shuffle),
    }
    for option, used in given.items():
        if used and name not in _APPLIES[option]:
            takes = ", ".join(
                _flag(o) for o, names in _APPLIES.items() if name in names and o != "shuffle"
            )
            raise ValueError(
                f"{_flag(option)} does not apply to --schedule {name} (it takes {takes})"
            )
    if name == "online":
        return Online(steps=steps, batch_size=batch_size)
    if name == "gd":
        return GD(train_size=train_size, steps=steps)
    if train_size is not None and batch_size is not None and train_size % batch_size:
        raise ValueError(
            f"--batch-size must divide --train-size, got batch size {batch_size} "
            f"and train size {train_size}"
        )
    return Epochs(train_size=train_size, batch_size=batch_size, epochs=epochs, shuffle=shuffle)


def describe(schedule: Schedule) -> str:
    """A short English description of a schedule, with its sizes or symbols.

    Args:
        schedule: the schedule.

    Returns:
        e.g. ``online SGD (T steps, batch B)``.

    Example:
        >>> describe(Online())
        'online SGD (T steps, batch B)'
        >>> describe(Epochs(train_size=6, batch_size=2, epochs=1, shuffle=True))
        'SGD on 6 training points (batch 2, 1 epoch, reshuffled each epoch)'
        >>> describe(GD(steps=5))
        'full-batch GD (N points, 5 steps)'
    """
    if schedule.name == "online":
        return f"online SGD ({_count(schedule.steps, 'step')}, batch {schedule.batch_size})"
    if schedule.name == "gd":
        return f"full-batch GD ({schedule.train_size} points, {_count(schedule.steps, 'step')})"
    order = "reshuffled each epoch" if schedule.shuffle else "fixed order"
    return (
        f"SGD on {schedule.train_size} training points (batch {schedule.batch_size}, "
        f"{_count(schedule.epochs, 'epoch')}, {order})"
    )
