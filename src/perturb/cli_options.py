"""The command line's options, declared once and shared by every subcommand.

Each group of options that several commands take (the dataset and model, the learning
rates, the device, the seed, the schedule and its sizes, the start point) is one
decorator here, so the
same flag means the same thing, takes the same values and is checked the same way in
``perturb series``, ``diagrams``, ``predict``, ``validate`` and ``compare``.  Values are
checked where they are parsed, with the checks of :mod:`perturb.checks`: a bad value is
a usage error (exit status 2) before any work starts.

This module imports neither torch nor sympy, so ``perturb --help`` and argument errors
answer at once.  The choice lists below repeat the library's (``SCHEDULES`` of
:mod:`perturb.symbolic.options`, ``FORMS`` of :mod:`perturb.symbolic.schedules`,
``QUANTITIES`` of :mod:`perturb.symbolic.series`), and ``DEFAULT_PRETRAIN_LR`` that of
:mod:`perturb.experiments.pipeline`, for that reason; ``tests/test_cli.py`` checks that
they agree.

Example:
    >>> @click.command()
    ... @lr_option(required=True)
    ... def show(lrs):
    ...     click.echo(lrs)
    >>> show(["--lr", "0.01", "0.1"], standalone_mode=False)
    (0.01, 0.1)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import click
from click.core import ParameterSource

from perturb.checks import DEVICES, check_device, check_lr

__all__ = [
    "DEFAULT_PRETRAIN_LR",
    "DEVICES",
    "DIAGRAM_QUANTITIES",
    "FORMS",
    "IMAGE_FORMATS",
    "OUTPUT_FORMATS",
    "QUANTITIES",
    "SCHEDULES",
    "VariadicOption",
    "batch_sizes_option",
    "budget_options",
    "checkpoint_option",
    "curve_option",
    "data_options",
    "device_option",
    "force_option",
    "krylov_options",
    "lr_option",
    "option_group",
    "schedule_options",
    "schedule_size_options",
    "seed_option",
    "seeds_option",
    "size_option",
    "start_options",
]

SCHEDULES = ("online", "epochs", "gd")
"""Schedule names accepted by ``--schedule`` (:data:`perturb.symbolic.options.SCHEDULES`)."""
FORMS = ("cumulant", "moment")
"""Accepted ``--form`` values (:data:`perturb.symbolic.schedules.FORMS`)."""
QUANTITIES = ("test", "train", "gap", "displacement")
"""Accepted ``--quantity`` values (:data:`perturb.symbolic.series.QUANTITIES`)."""
DIAGRAM_QUANTITIES = ("test", "train", "displacement")
"""The quantities ``perturb diagrams`` lists diagrams for."""
OUTPUT_FORMATS = ("text", "latex", "json")
"""Output formats of ``perturb series``."""
IMAGE_FORMATS = ("svg", "png")
"""Image formats of ``perturb diagrams --draw``."""
DEFAULT_PRETRAIN_LR = 0.3
"""``--pretrain-lr``'s default (:data:`perturb.experiments.pipeline.DEFAULT_PRETRAIN_LR`)."""

POSITIVE = click.IntRange(min=1)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def option_group(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` in order, as if stacked top to bottom.

    Example:
        >>> pair = option_group(click.option("--a", default=1), click.option("--b", default=2))
        >>> @click.command()
        ... @pair
        ... def show(a, b):
        ...     click.echo(a + b)
        >>> show(["--b", "5"], standalone_mode=False)
        6
    """

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def _wrap(command: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper`` dressed as ``command``, with a copy (not a share) of its click options."""
    functools.update_wrapper(wrapper, command, updated=())
    wrapper.__click_params__ = list(getattr(command, "__click_params__", []))  # type: ignore[attr-defined]
    return wrapper


def _is_value(token: str) -> bool:
    """Whether a command-line token is a value (not an option): numbers may be negative."""
    if not token.startswith("-") or token == "-":
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


class VariadicOption(click.Option):
    """A repeatable option that also takes several values after one flag.

    Click options take a fixed number of values; this one, like argparse's
    ``nargs="+"``, consumes every following token that is not an option, so
    ``--lr 0.01 0.03 0.1``, ``--lr 0.01 --lr 0.03 --lr 0.1`` and mixtures give the same
    tuple.  Tokens that parse as numbers count as values even when they start with
    ``-``.  The option is always ``multiple``; each value is converted by ``type``.

    Example:
        >>> @click.command()
        ... @click.option("--lr", type=float, cls=VariadicOption)
        ... @click.option("--steps", type=int)
        ... def show(lr, steps):
        ...     click.echo(f"{lr} {steps}")
        >>> show(["--lr", "0.1", "0.2", "--steps", "3", "--lr", "0.3"], standalone_mode=False)
        (0.1, 0.2, 0.3) 3
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        """Register with click's parser, then make each flag consume all its values."""
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            original = option.process

            def process(value: Any, state: Any, original: Callable[..., None] = original) -> None:
                original(value, state)
                while state.rargs and _is_value(state.rargs[0]):
                    original(state.rargs.pop(0), state)

            option.process = process


# ---------------------------------------------------------------- checked values


def _callback(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running ``check`` on the value: its ``ValueError`` is a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return check(value)
        except ValueError as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from None

    return callback


def _each_lr(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(check_lr(lr) for lr in values)


def lr_option(*, required: bool = False, default: str | None = None) -> Decorator:
    """``--lr ETA...``: one or more learning rates, each positive and finite.

    The command receives ``lrs``, a tuple (empty when the option is left out and not
    required).

    Args:
        required: whether the option must be given.
        default: the default the command applies when it is left out, for the help.

    Example:
        >>> @click.command()
        ... @lr_option()
        ... def show(lrs):
        ...     click.echo(lrs)
        >>> show(["--lr", "nan"], standalone_mode=False)
        Traceback (most recent call last):
        ...
        click.exceptions.BadParameter: lr must be a positive finite number, got nan
    """
    text = "Learning rates: --lr 0.01 0.03 0.1 (or repeat the option)."
    if default is not None:
        text += f"  [default: {default}]"
    return click.option(
        "--lr",
        "lrs",
        cls=VariadicOption,
        type=float,
        metavar="ETA...",
        required=required,
        callback=_callback(_each_lr),
        help=text,
    )


def batch_sizes_option(*, example: str, default: str) -> Decorator:
    """``--batch-size B...``: a grid of batch sizes, each a positive integer.

    The command receives ``batch_sizes``, a tuple (empty when the option is left out).

    Args:
        example: the sizes the help shows, e.g. ``"1 4"``.
        default: the default the command applies when it is left out, for the help.

    Example:
        >>> @click.command()
        ... @batch_sizes_option(example="1 4", default="1 4")
        ... def show(batch_sizes):
        ...     click.echo(batch_sizes)
        >>> show(["--batch-size", "1", "8"], standalone_mode=False)
        (1, 8)
    """
    return click.option(
        "--batch-size",
        "batch_sizes",
        cls=VariadicOption,
        type=POSITIVE,
        metavar="B...",
        help=f"Batch sizes: --batch-size {example} (or repeat).  [default: {default}]",
    )


def device_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--device cpu|cuda``, refused in one line when CUDA is asked for but absent.

    Example:
        >>> @click.command()
        ... @device_option
        ... def show(device):
        ...     click.echo(device)
        >>> show([], standalone_mode=False)
        cpu
    """
    return click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="cpu",
        show_default=True,
        callback=_callback(check_device),
        help="Where to compute (cuda needs a GPU torch can see).",
    )(command)


def seed_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--seed S``: the seed of the initialization, data subsets and trials.

    Example:
        >>> @click.command()
        ... @seed_option
        ... def show(seed):
        ...     click.echo(seed)
        >>> show(["--seed", "3"], standalone_mode=False)
        3
    """
    return click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Seed of the initialization, the data subsets and the trials.",
    )(command)


def seeds_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--seeds S...`` (alias ``--seed``): one run per seed; the command gets ``seeds``.

    Example:
        >>> @click.command()
        ... @seeds_option
        ... def show(seeds):
        ...     click.echo(seeds)
        >>> show(["--seed", "0", "1"], standalone_mode=False)
        (0, 1)
    """
    return click.option(
        "--seeds",
        "--seed",
        "seeds",
        cls=VariadicOption,
        type=click.IntRange(min=0),
        metavar="S...",
        help="Seeds of the initialization, population subset and trials: one run per seed "
        "(--seeds 0 1 2; several write into OUT/seed-S).  [default: 0]",
    )(command)


def force_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--force``: start a job even when its estimated work is over the budget.

    Example:
        >>> @click.command()
        ... @force_option
        ... def show(force):
        ...     click.echo(force)
        >>> show(["--force"], standalone_mode=False)
        True
    """
    return click.option(
        "--force",
        is_flag=True,
        help="Start even when the estimated work is over the budget.",
    )(command)


def budget_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-memory GIB`` (passed on in bytes, as ``max_memory``) and ``--force``.

    Example:
        >>> @click.command()
        ... @budget_options
        ... def show(max_memory, force):
        ...     click.echo((max_memory, force))
        >>> show(["--max-memory", "0.5"], standalone_mode=False)
        (536870912.0, False)
    """
    memory = click.option(
        "--max-memory",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="GIB",
        callback=lambda ctx, param, value: None if value is None else value * 2**30,
        help="Memory the SGD trials may take, in GiB; their time and memory are estimated "
        "before anything is measured (over one hour needs --force).  [default: 4]",
    )
    return memory(force_option(command))


# ------------------------------------------------------------- dataset and model

_DATASET_HELP = (
    "digits (built in), mnist1d (generated), fashion-mnist, cifar10 or npz:PATH (arrays x, y; "
    "x images (n, C, H, W) or (n, H, W), or tabular rows (n, d))."
)
_MODEL_HELP = (
    "smooth-convnet, mlp (tanh, one hidden layer of 32: any input, tabular included) or "
    "pkg.module:factory."
)


def data_options(*, model_default: str | None = "smooth-convnet", alias: bool = False) -> Decorator:
    """``--dataset``, ``--data-dir`` and ``--model``; the command gets ``dataset``,
    ``data_dir`` and ``model_spec``.

    Args:
        model_default: the default model, or ``None`` to make ``--model`` required.
        alias: also accept ``--data`` (hidden, deprecated) for ``--dataset``, with a
            one-line note on stderr.

    Example:
        >>> @click.command()
        ... @data_options(alias=True)
        ... def show(dataset, data_dir, model_spec):
        ...     click.echo(f"{dataset} {model_spec}")
        >>> show(["--dataset", "npz:x.npz", "--model", "mlp"], standalone_mode=False)
        npz:x.npz mlp
    """
    options = [
        click.option("--dataset", default="digits", show_default=True, help=_DATASET_HELP),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Folder with the dataset's files as distributed.",
        ),
        click.option(
            "--model",
            "model_spec",
            default=model_default,
            required=model_default is None,
            show_default=model_default is not None,
            help=_MODEL_HELP,
        ),
    ]
    if not alias:
        return option_group(*options)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, data_alias: str | None, **kwargs: Any) -> Any:
            if data_alias is not None:
                ctx = click.get_current_context()
                if ctx.get_parameter_source("dataset") == ParameterSource.COMMANDLINE:
                    raise click.UsageError("give --dataset only (--data is its deprecated alias)")
                click.echo("perturb: --data is deprecated, use --dataset", err=True)
                kwargs["dataset"] = data_alias
            return command(*args, **kwargs)

        hidden = click.option("--data", "data_alias", default=None, hidden=True)
        return option_group(*options, hidden)(_wrap(command, wrapper))

    return decorate


def checkpoint_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--checkpoint PATH``: a weights-only ``state_dict`` of ``--model``; must exist.

    Example:
        >>> @click.command()
        ... @checkpoint_option
        ... def show(checkpoint):
        ...     click.echo(repr(checkpoint))
        >>> show([], standalone_mode=False)
        None
    """
    return click.option(
        "--checkpoint",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="A saved state_dict of --model (torch.save, read weights-only); "
        "default: the model's seeded initialization.",
    )(command)


def start_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--checkpoint``, ``--pretrain STEPS`` and ``--pretrain-lr LR``: where runs start.

    The command gets ``checkpoint``, ``pretrain`` and ``pretrain_lr``.

    Example:
        >>> @click.command()
        ... @start_options
        ... def show(checkpoint, pretrain, pretrain_lr):
        ...     click.echo(f"{checkpoint} {pretrain} {pretrain_lr}")
        >>> show(["--pretrain", "200"], standalone_mode=False)
        None 200 0.3
    """
    return option_group(
        checkpoint_option,
        click.option(
            "--pretrain",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            metavar="STEPS",
            help="First take STEPS steps of full-batch gradient descent on the population, "
            "from the initialization or --checkpoint; runs start there.  Computed in "
            "float64 on one thread (a fixed summation order): the same start whatever "
            "the thread count; a warning if a step raises the loss (GD past its edge of "
            "stability, where rounding grows: lower --pretrain-lr).",
        ),
        click.option(
            "--pretrain-lr",
            type=float,
            default=DEFAULT_PRETRAIN_LR,
            show_default=True,
            metavar="LR",
            callback=_callback(check_lr),
            help="Learning rate of --pretrain.",
        ),
    )(command)


# ------------------------------------------------------------------- measurement


def krylov_options(*, defaults: tuple[int, int] = (128, 32)) -> Decorator:
    """``--krylov-rank`` and ``--krylov-higher-rank`` (predict, validate, compare, plan).

    Args:
        defaults: the command's ranks ``(k, k_3)``, shown in the help: ``(128, 32)``
            (predict, validate, compare), a plan's ``(64, 16)``
            (:data:`perturb.experiments.planning.DEFAULT_KRYLOV_RANKS`).  An experiment
            command takes only the options given
            (:func:`perturb.cli_experiment.build_experiment`): left out, the ranks stay
            ``None`` in its experiment and the command applies its own.

    Example:
        >>> @click.command()
        ... @krylov_options()
        ... def show(krylov_rank, krylov_higher_rank):
        ...     click.echo((krylov_rank, krylov_higher_rank))
        >>> show(["--krylov-rank", "16"], standalone_mode=False)
        (16, 32)
    """
    rank, higher = defaults
    return option_group(
        click.option(
            "--krylov-rank",
            type=click.IntRange(min=2),
            default=rank,
            show_default=True,
            help="Dimension k of the Krylov subspace of H for the re-summed series.",
        ),
        click.option(
            "--krylov-higher-rank",
            type=click.IntRange(min=1),
            default=higher,
            show_default=True,
            help="Basis vectors for J and the per-sample Hessians (3 edges, GD's 2).",
        ),
    )


def curve_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--curve``: also the learning curve along the noiseless path (validate, compare;
    online).

    Example:
        >>> @click.command()
        ... @curve_option
        ... def show(curve):
        ...     click.echo(curve)
        >>> show(["--curve"], standalone_mode=False)
        True
    """
    return click.option(
        "--curve",
        is_flag=True,
        help="Also predict the whole learning curve, re-measured along the noiseless path "
        "(online only): adds curve, noiseless path (GD at the same η) and SDE (path); its "
        "Krylov rank is --set curve_rank=K (default 32).",
    )(command)


# ---------------------------------------------------------------------- schedule

_SIZES = {  # parameter -> (short flag, what it is and which schedules take it)
    "steps": ("-T", "Steps T (online, gd)"),
    "batch_size": ("-B", "Batch size B (online, epochs)"),
    "train_size": ("-N", "Training set size N (epochs, gd)"),
    "epochs": ("-E", "Epochs E (epochs)"),
}


def size_option(name: str, note: str = ".", **kwargs: Any) -> Decorator:
    """The size option ``name`` (``steps``, ``batch_size``, ``train_size``, ``epochs``).

    Args:
        name: the parameter name.
        note: the end of the help text after the size's description.
        **kwargs: passed to :func:`click.option` (``required``, ``default``, ``help`` to
            replace the whole help text, ...).

    Example:
        >>> @click.command()
        ... @size_option("steps", required=True)
        ... def show(steps):
        ...     click.echo(steps)
        >>> show(["-T", "7"], standalone_mode=False)
        7
    """
    short, text = _SIZES[name]
    kwargs.setdefault("type", POSITIVE)
    kwargs.setdefault("help", text + note)
    return click.option("--" + name.replace("_", "-"), short, **kwargs)


_SHUFFLE = click.option(
    "--shuffle/--no-shuffle",
    default=False,
    show_default=True,
    help="Reshuffle the training set before each epoch (epochs).",
)


def schedule_size_options(*, symbolic: bool) -> Decorator:
    """``--schedule`` and the sizes, passed to the command as they are.

    Args:
        symbolic: sizes left out stay symbolic (``series``, ``diagrams``; the schedule
            defaults to ``online``), or take the defaults of ``validate`` (the schedule
            ``None`` means: ``epochs`` when ``--epochs`` or ``--shuffle`` is given, else
            ``online``).

    Example:
        >>> @click.command()
        ... @schedule_size_options(symbolic=False)
        ... def show(schedule, steps, batch_size, train_size, epochs, shuffle):
        ...     click.echo(f"{schedule} {steps} {epochs}")
        >>> show(["-E", "2"], standalone_mode=False)
        None None 2
    """
    if symbolic:
        notes = dict.fromkeys(_SIZES, "; symbolic if left out.")
        choice = click.option(
            "--schedule",
            "schedule_name",
            type=click.Choice(SCHEDULES),
            default="online",
            show_default=True,
            help="online: fresh samples each step; epochs: passes over a training set; "
            "gd: full batch.",
        )
    else:
        notes = {
            "steps": ".  [default: 100]",
            "batch_size": ".  [default: 1]",
            "train_size": "; drawn iid from the population, required there.",
            "epochs": ".",
        }
        choice = click.option(
            "--schedule",
            type=click.Choice(SCHEDULES),
            default=None,
            help="online: fresh samples each step; epochs: passes over a training set of "
            "--train-size points; gd: full batch.  [default: epochs if --epochs or "
            "--shuffle is given, else online]",
        )
    sizes = [size_option(name, notes[name], default=None) for name in _SIZES]
    return option_group(choice, *sizes, _SHUFFLE)


def schedule_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options that build a schedule; the command receives ``schedule``.

    The decorated command gets one keyword argument ``schedule`` (a
    :class:`~perturb.symbolic.schedules.Schedule`, sizes left out symbolic) in place of
    the raw options; invalid combinations are usage errors (exit code 2).  Imports
    sympy only when the command runs.

    Example:
        >>> from perturb.symbolic.options import describe
        >>> @click.command()
        ... @schedule_options
        ... def show(schedule):
        ...     click.echo(describe(schedule))
        >>> show(["--schedule", "gd", "--train-size", "10"], standalone_mode=False)
        full-batch GD (10 points, T steps)
    """

    def wrapper(
        *args: Any,
        schedule_name: str,
        steps: int | None,
        batch_size: int | None,
        train_size: int | None,
        epochs: int | None,
        shuffle: bool,
        **kwargs: Any,
    ) -> Any:
        from perturb.symbolic.options import make_schedule

        try:
            schedule = make_schedule(
                schedule_name,
                steps=steps,
                batch_size=batch_size,
                train_size=train_size,
                epochs=epochs,
                shuffle=shuffle,
            )
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        return command(*args, schedule=schedule, **kwargs)

    return schedule_size_options(symbolic=True)(_wrap(command, wrapper))
