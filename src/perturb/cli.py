"""The ``perturb`` command line.

Subcommands:

* ``perturb series``: the η-series of a quantity for a schedule, order by order, as
  text, LaTeX or JSON;
* ``perturb diagrams``: the diagrams of one order with their symmetry factors,
  embedding counts and contractions, optionally drawn to files.

Every subcommand is a small click command on the group :data:`cli`; the options
that build a schedule are shared through :func:`schedule_options` and
:func:`make_schedule`, so a new subcommand (``predict``, ``validate``, ...) is one
more ``@cli.command`` taking the same options.  Sizes left out stay symbolic
(``T``, ``B``, ``N``, ``E``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import sympy as sp

from perturb.symbolic.contractions import Contraction
from perturb.symbolic.diagrams import Diagram, diagrams
from perturb.symbolic.options import SCHEDULES, describe, make_schedule
from perturb.symbolic.resummed import resummed_report
from perturb.symbolic.schedules import FORMS, Online, Schedule
from perturb.symbolic.series import QUANTITIES, series

__all__ = [
    "SCHEDULES",
    "cli",
    "contraction_names",
    "diagram_table",
    "main",
    "schedule_options",
    "series_report",
]

OUTPUT_FORMATS = ("text", "latex", "json")
DIAGRAM_QUANTITIES = ("test", "train", "displacement")
IMAGE_FORMATS = ("svg", "png")

_QUANTITY_LABELS = {
    "test": "E[test loss]",
    "train": "E[train loss]",
    "gap": "E[test loss − train loss]",
    "displacement": "E[θ_T − θ_0]",
}

# ---------------------------------------------------------------------- helpers


def series_report(
    order: int,
    schedule: Schedule,
    quantity: str = "test",
    *,
    fmt: str = "text",
    form: str = "cumulant",
) -> str:
    """The series of ``quantity`` for ``schedule`` formatted for printing.

    Args:
        order: the highest power of η.
        schedule: the schedule.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        fmt: ``"text"`` (a header line, then one line per power of η), ``"latex"``
            (an ``align*`` environment after a ``%`` comment header) or ``"json"``.
        form: ``"cumulant"`` or ``"moment"``.

    Returns:
        The report, without a trailing newline.

    Example:
        >>> print(series_report(1, Online(batch_size=1)))
        E[test loss] for online SGD (T steps, batch 1), to order η^1:
        η^0: (1)·l
        η^1: (-T)·G·G
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    result = series(order, schedule, quantity, form=form)
    if fmt == "json":
        return result.to_json()
    header = f"{_QUANTITY_LABELS[quantity]} for {describe(schedule)}, to order η^{order}"
    if form != "cumulant":
        header += f" ({form} form)"
    if fmt == "latex":
        return f"% {header}\n\\begin{{align*}}\n{result.to_latex()}\n\\end{{align*}}"
    return f"{header}:\n{result.to_text()}"


def diagram_table(
    items: Sequence[Diagram],
    schedule: Schedule,
    quantity: str = "test",
    *,
    form: str = "cumulant",
) -> str:
    """A table of diagrams: tree, parts, ``|Aut(D)|``, embeddings, contraction.

    Args:
        items: the diagrams, e.g. ``diagrams(order, quantity=quantity)``.
        schedule: the schedule counting the embeddings.
        quantity: ``"test"``, ``"train"`` (the root takes a training point) or
            ``"displacement"`` (the root is a free index).
        form: ``"cumulant"`` or ``"moment"`` (embedding counts and tensor names).

    Returns:
        The table, one row per diagram, columns aligned, without a trailing newline.

    Example:
        >>> print(diagram_table(diagrams(2), Online()))  # doctest: +NORMALIZE_WHITESPACE
        #  tree         parts        |Aut|  embeddings      contraction
        0  [-1, 0, 1]   {0} {1} {2}  1      B**2*T*(T - 1)/2  G·H·G
        1  [-1, 0, 0]   {0} {1,2}    2      B*T             tr(C H)
        2  [-1, 0, 0]   {0} {1} {2}  2      B**2*T**2       G·H·G
    """
    if quantity not in DIAGRAM_QUANTITIES:
        raise ValueError(
            f"quantity must be one of {', '.join(DIAGRAM_QUANTITIES)}, got {quantity!r}"
        )
    rows = [("#", "tree", "parts", "|Aut|", "embeddings", "contraction")]
    names = contraction_names(items, quantity, form=form)
    for i, (d, name) in enumerate(zip(items, names, strict=True)):
        count = schedule.embeddings(d, form=form, train_root=quantity == "train")
        rows.append(
            (
                str(i),
                str(list(d.parents)),
                " ".join("{" + ",".join(map(str, p)) + "}" for p in d.parts),
                str(d.automorphisms),
                str(sp.factor(count)),
                name,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[-1]])
        for r in rows
    )


def contraction_names(
    items: Sequence[Diagram], quantity: str = "test", *, form: str = "cumulant"
) -> list[str]:
    """The name of each diagram's tensor network, equal for equal networks.

    Names come from the network's canonical form
    (:attr:`Contraction.canonical <perturb.contractions.Contraction.canonical>`), so
    they match what :func:`perturb.symbolic.series.series` prints for the merged term.

    Args:
        items: the diagrams.
        quantity: ``"displacement"`` leaves the root as a free index.
        form: ``"cumulant"`` or ``"moment"``.

    Returns:
        One name per diagram.

    Example:
        >>> names = contraction_names(diagrams(3))
        >>> names[1] == names[7]
        True
    """
    return [
        Contraction(
            parents=d.parents, parts=d.parts, form=form, open_root=quantity == "displacement"
        ).text
        for d in items
    ]


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


# ------------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Perturbation theory of SGD: predict what SGD will do before running it.

    Under torchrun (torchrun --nproc-per-node K -m perturb.cli ...) the measurement and
    the SGD trials are split across the processes; rank 0 prints and writes outputs.
    """
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
        from perturb.numeric.distributed import session

        ctx.with_resource(session())


def schedule_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options that build a schedule; the command receives ``schedule``.

    The decorated command gets one keyword argument ``schedule`` (a
    :class:`~perturb.symbolic.schedules.Schedule`) in place of the raw options; invalid
    combinations are usage errors (exit code 2).

    Example:
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

    functools.update_wrapper(wrapper, command, updated=())
    # the command's own options so far, copied (not shared) before adding ours
    wrapper.__click_params__ = list(getattr(command, "__click_params__", []))  # type: ignore[attr-defined]
    for option in reversed(_SCHEDULE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


_positive = click.IntRange(min=1)
_SCHEDULE_OPTIONS = (
    click.option(
        "--schedule",
        "schedule_name",
        type=click.Choice(SCHEDULES),
        default="online",
        show_default=True,
        help="online: fresh samples each step; epochs: passes over a training set; gd: full batch.",
    ),
    click.option(
        "--steps", "-T", type=_positive, help="Steps T (online, gd); symbolic if left out."
    ),
    click.option(
        "--batch-size",
        "-B",
        type=_positive,
        help="Batch size B (online, epochs); symbolic if left out.",
    ),
    click.option(
        "--train-size",
        "-N",
        type=_positive,
        help="Training set size N (epochs, gd); symbolic if left out.",
    ),
    click.option("--epochs", "-E", type=_positive, help="Epochs E (epochs); symbolic if left out."),
    click.option(
        "--shuffle/--no-shuffle",
        default=False,
        show_default=True,
        help="Reshuffle the training set before each epoch (epochs).",
    ),
)


_order_option = click.option(
    "--order",
    "-d",
    required=True,
    type=click.IntRange(min=0),
    help="Highest power of η (number of diagram edges), at least 0.",
)
_form_option = click.option(
    "--form",
    type=click.Choice(FORMS),
    default="cumulant",
    show_default=True,
    help="Name parts by joint cumulants (the paper's fuzzy outlines) or by moments.",
)


@cli.command("series")
@_order_option
@schedule_options
@click.option(
    "--quantity",
    type=click.Choice(QUANTITIES),
    default="test",
    show_default=True,
    help="Expected test loss, train loss, their gap, or the displacement θ_T − θ_0.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(OUTPUT_FORMATS),
    default="text",
    show_default=True,
)
@_form_option
@click.option(
    "--resummed",
    is_flag=True,
    help="Print the re-summed diagrams (edges carry η(I − ηH)^{Δt−1}) with their exact "
    "sums over embeddings, in an eigenbasis of H (online SGD and GD).",
)
@click.option(
    "--integral",
    is_flag=True,
    help="With --resummed: Remark 2's integrals of exponentials in r = ηh.",
)
def series_command(
    order: int,
    schedule: Schedule,
    quantity: str,
    fmt: str,
    form: str,
    resummed: bool,
    integral: bool,
) -> None:
    """Print the η-series of a quantity, order by order."""
    if not resummed:
        click.echo(series_report(order, schedule, quantity, fmt=fmt, form=form))
        return
    if quantity == "gap":
        raise click.BadParameter(
            "with --resummed print test and train separately", param_hint="--quantity"
        )
    try:
        report = resummed_report(order, schedule, quantity, fmt=fmt, integral=integral)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if fmt == "text":
        header = (
            f"Re-summed {_QUANTITY_LABELS[quantity]} for {describe(schedule)}, diagrams "
            f"with up to {order} edges; x_a = 1 − η·h_a, h_a the eigenvalue of H on index a:"
        )
        report = f"{header}\n{report}"
    click.echo(report)


@cli.command("diagrams")
@_order_option
@schedule_options
@click.option(
    "--quantity",
    type=click.Choice(DIAGRAM_QUANTITIES),
    default="test",
    show_default=True,
    help="The measured quantity, which decides where the root may sit.",
)
@_form_option
@click.option(
    "--draw",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Draw each diagram into this directory.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(IMAGE_FORMATS),
    help="Image format for --draw.  [default: svg]",
)
def diagrams_command(
    order: int,
    schedule: Schedule,
    quantity: str,
    form: str,
    directory: Path | None,
    fmt: str | None,
) -> None:
    """List the diagrams of one order with their counts and contractions."""
    if fmt is not None and directory is None:
        raise click.UsageError("--format applies to drawings only; give --draw DIR too")
    items = diagrams(order, quantity=quantity, path_condition=schedule.single_epoch)
    condition = "with" if schedule.single_epoch else "without"
    click.echo(
        f"{len(items)} diagram{'' if len(items) == 1 else 's'} of order η^{order} for "
        f"{_QUANTITY_LABELS[quantity]} in {describe(schedule)}, {condition} the path condition:"
    )
    click.echo(diagram_table(items, schedule, quantity, form=form))
    if directory is not None:
        from perturb.draw import draw_diagrams  # matplotlib only when drawing

        names = contraction_names(items, quantity, form=form)
        titles = [f"{i}: {name}" for i, name in enumerate(names)]
        for path in draw_diagrams(items, directory, fmt=fmt or "svg", titles=titles):
            click.echo(f"wrote {path}")


@cli.command("predict")
@click.option(
    "--model", "model_spec", required=True, help="smooth-convnet, mlp or pkg.module:factory."
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="A saved state_dict (torch.save); default: the model's initialization.",
)
@click.option(
    "--data",
    "dataset",
    default="digits",
    show_default=True,
    help="digits (built in), fashion-mnist, cifar10 or npz:PATH.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--lr",
    "lrs",
    cls=VariadicOption,
    type=float,
    metavar="ETA...",
    required=True,
    help="Learning rates: --lr 0.01 0.03 0.1 (or repeat the option).",
)
@click.option("--steps", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--order", type=click.IntRange(0, 4), default=3, show_default=True)
@click.option("--quantity", type=click.Choice(QUANTITIES[:3]), default="test", show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=2),
    default=None,
    help="Estimate from this many data points (default: all of the split).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Treat the points as the population (exact averages, no error bars).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def predict_command(
    model_spec,
    checkpoint,
    dataset,
    data_dir,
    lrs,
    steps,
    batch_size,
    order,
    quantity,
    samples,
    exact,
    seed,
    device,
    fmt,
) -> None:
    """Predict SGD's test loss, train loss or gap from a checkpoint, with error bars."""
    import json

    import torch

    from perturb.experiments.data import DataError, load_dataset
    from perturb.experiments.models import ModelSpecError, build_model, load_checkpoint
    from perturb.numeric.measuring import measure

    try:
        data = load_dataset(dataset, data_dir=data_dir, split="train")
        model = build_model(model_spec, data.input_shape, data.num_classes, seed=seed)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
    except (DataError, ModelSpecError, ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    if exact and samples is not None and samples < len(data):
        data, samples = data.subset(samples, seed=seed), None
    model = model.to(device)
    schedule = Online(steps=steps, batch_size=batch_size)
    stats = measure(
        model,
        (data.x.to(device), data.y.to(device)),
        order=order,
        schedules=[schedule],
        quantities=(quantity,),
        exact=exact,
        samples=samples,
        seed=seed,
        dtype=torch.float32,
    )
    pred = stats.predict(schedule, lr=list(lrs), quantity=quantity, order=order)
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "quantity": quantity,
                    "steps": steps,
                    "batch_size": batch_size,
                    "exact": exact,
                    "rows": stats.rows,
                    "lr": pred.lr.tolist(),
                    "by_order": pred.by_order.tolist(),
                    "total": pred.total.tolist(),
                    "se": pred.se.tolist(),
                },
                indent=2,
            )
        )
        return
    head = f"{'lr':>8} " + " ".join(f"{'η^' + str(d):>12}" for d in range(order + 1))
    click.echo(
        f"E[{quantity}] after {steps} steps of online SGD (batch {batch_size}), "
        f"order {order}, from {stats.rows} points ({'exact' if exact else 'estimated'}):"
    )
    click.echo(head + f" {'total':>12} {'± s.e.':>10}")
    for i, lr in enumerate(pred.lr):
        cells = " ".join(f"{v:12.6f}" for v in pred.by_order[i])
        click.echo(f"{lr:8.4g} {cells} {pred.total[i]:12.6f} {pred.se[i]:10.6f}")


@cli.command("validate")
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="digits (built in), fashion-mnist, cifar10 or npz:PATH.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the dataset's files as distributed.",
)
@click.option(
    "--model",
    default="smooth-convnet",
    show_default=True,
    help="smooth-convnet, mlp or pkg.module:factory.",
)
@click.option(
    "--lr",
    "lrs",
    cls=VariadicOption,
    type=float,
    metavar="ETA...",
    help="Learning rates: --lr 0.01 0.03 0.1 (or repeat the option).  "
    "[default: 0.002 0.005 0.01 0.02 0.05]",
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default=None,
    help="online: fresh samples each step; epochs: passes over a training set of "
    "--train-size points; gd: full batch.  [default: epochs if --epochs or --shuffle "
    "is given, else online]",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Steps T (online, gd).  [default: 100]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Batch size B (online, epochs).  [default: 1]",
)
@click.option(
    "--train-size",
    type=click.IntRange(min=1),
    default=None,
    help="Training set size N, drawn iid from the population (epochs, gd; required there).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs E (epochs).")
@click.option(
    "--shuffle/--no-shuffle",
    default=False,
    show_default=True,
    help="Reshuffle the training set before each epoch (epochs).",
)
@click.option("--trials", type=click.IntRange(min=2), default=256, show_default=True)
@click.option(
    "--orders",
    cls=VariadicOption,
    type=click.IntRange(0, 4),
    metavar="D...",
    help="Orders of the series to report: --orders 0 1 2 3 (or repeat).  [default: 0 1 2 3]",
)
@click.option(
    "--gap/--no-gap",
    default=True,
    show_default=True,
    help="Also predict (order 2) and simulate the generalization gap test − train.",
)
@click.option(
    "--resummed/--no-resummed",
    default=True,
    show_default=True,
    help="Also report the re-summed prediction (up to two edges).",
)
@click.option(
    "--seeds",
    "--seed",
    "seeds",
    cls=VariadicOption,
    type=click.IntRange(min=0),
    metavar="S...",
    help="Seeds of the initialization, population subset and trials: one run per seed "
    "(--seeds 0 1 2; several write into OUT/seed-S).  [default: 0]",
)
@click.option(
    "--population",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Images in the population SGD samples from (and the test loss averages).",
)
@click.option(
    "--records",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Recorded steps per run, evenly spaced up to --steps.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="perturb-validate",
    show_default=True,
    help="Folder for results.json, results.csv, gap.csv and plots.",
)
def validate_command(**options: Any) -> None:
    """Predict SGD's test loss and gap and compare with the mean of many real SGD runs."""
    from perturb.experiments.data import DataError
    from perturb.experiments.validation import DEFAULT_LRS, validate

    options["lrs"] = tuple(options["lrs"]) or DEFAULT_LRS
    options["orders"] = tuple(options["orders"]) or (0, 1, 2, 3)
    if options["schedule"] is None:
        given = options["epochs"] is not None or options["shuffle"]
        options["schedule"] = "epochs" if given else "online"
    seeds = tuple(dict.fromkeys(options.pop("seeds"))) or (0,)
    out = Path(options.pop("out"))
    for seed in seeds:
        folder = out if len(seeds) == 1 else out / f"seed-{seed}"
        try:
            result = validate(seed=seed, out=folder, **options)
        except (DataError, ValueError) as err:
            raise click.UsageError(str(err)) from None
        if len(seeds) > 1:
            click.echo(f"seed {seed}:")
        click.echo(result.table())
        written = (
            "results.json, results.csv, gap.csv" if result.gap else "results.json, results.csv"
        )
        click.echo(f"wrote {folder}/{written} and plots")


@cli.command("compare")
@click.option("--dataset", default="digits", show_default=True, help="digits, fashion-mnist, …")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--model", default="smooth-convnet", show_default=True)
@click.option(
    "--lr", "lrs", cls=VariadicOption, type=float, metavar="ETA...", help="[default: 0.005 0.02]"
)
@click.option(
    "--batch-size",
    "batch_sizes",
    cls=VariadicOption,
    type=click.IntRange(min=1),
    metavar="B...",
    help="[default: 1 4]",
)
@click.option("--steps", cls=VariadicOption, type=int, metavar="T...", help="[default: 25 50 100]")
@click.option("--trials", type=click.IntRange(min=2), default=128, show_default=True)
@click.option(
    "--orders",
    cls=VariadicOption,
    type=click.IntRange(0, 4),
    metavar="D...",
    help="[default: 1 2 3]",
)
@click.option("--resummed/--no-resummed", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--population", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="compare-out", show_default=True)
def compare_command(**options: Any) -> None:
    """Real SGD against every theory (perturb orders, re-summed, ODE, SDE, Lyapunov)."""
    from perturb.experiments.comparison import (
        DEFAULT_BATCH_SIZES,
        DEFAULT_LRS,
        DEFAULT_STEPS,
        compare,
    )
    from perturb.experiments.data import DataError
    from perturb.experiments.models import ModelSpecError

    for key, default in (
        ("lrs", DEFAULT_LRS),
        ("batch_sizes", DEFAULT_BATCH_SIZES),
        ("steps", DEFAULT_STEPS),
        ("orders", (1, 2, 3)),
    ):
        options[key] = tuple(options[key]) or default
    try:
        result = compare(**options)
    except (DataError, ModelSpecError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(result.table())
    click.echo(f"wrote {options['out']}/compare.json, compare.csv, compare.png")


def main(args: Sequence[str] | None = None, *, standalone_mode: bool = True) -> Any:
    """Run the ``perturb`` command line (the console script's entry point).

    Args:
        args: the arguments; ``None`` reads ``sys.argv``.
        standalone_mode: click's standalone mode: handle errors and exit.  Pass
            ``False`` to call it from Python and get exceptions instead.

    Returns:
        The subcommand's return value (only when ``standalone_mode`` is false).

    Example:
        >>> main(["series", "--order", "1", "--schedule", "gd", "--quantity", "gap"],
        ...      standalone_mode=False)
        E[test loss − train loss] for full-batch GD (N points, T steps), to order η^1:
        η^0: 0
        η^1: (T/N)·tr(C)
    """
    return cli.main(args=args, prog_name="perturb", standalone_mode=standalone_mode)


if __name__ == "__main__":
    main()
