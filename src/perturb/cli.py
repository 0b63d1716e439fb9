"""The ``perturb`` command line.

Subcommands:

* ``perturb series``: the η-series of a quantity for a schedule, order by order, as
  text, LaTeX or JSON;
* ``perturb diagrams``: the diagrams of one order with their symmetry factors,
  embedding counts and contractions, optionally drawn to files;
* ``perturb predict``: SGD's loss predicted from a checkpoint, with error bars;
* ``perturb validate`` and ``perturb compare``: predictions against real SGD runs;
* ``perturb plan``: η and B chosen from a checkpoint (:mod:`perturb.cli_plan`).

Every subcommand is a small click command on the group :data:`cli`; the options several
commands take are declared once in :mod:`perturb.cli_options` and checked where they are
parsed; validate and compare build their experiment from them once
(:mod:`perturb.cli_experiment`: ``--config``, ``--set``).  Sizes left out stay symbolic
(``T``, ``B``, ``N``, ``E``).  torch and sympy are imported inside the commands that use
them, so ``perturb --help`` and argument errors answer at once.

Every error a user can cause ends in one line ``error: <message>`` on stderr and exit
status 2; an unexpected exception ends in one line ``internal error: …`` and status 1.
``perturb --debug <command> …`` shows the traceback instead.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from perturb.cli_experiment import build_experiment, experiment_options
from perturb.cli_options import (
    DIAGRAM_QUANTITIES,
    FORMS,
    IMAGE_FORMATS,
    OUTPUT_FORMATS,
    POSITIVE,
    QUANTITIES,
    SCHEDULES,
    VariadicOption,
    batch_sizes_option,
    budget_options,
    checkpoint_option,
    curve_option,
    data_options,
    device_option,
    force_option,
    krylov_options,
    lr_option,
    schedule_options,
    schedule_size_options,
    seed_option,
    seeds_option,
    size_option,
    start_options,
)
from perturb.cli_plan import plan_command
from perturb.errors import PerturbError

if TYPE_CHECKING:
    from perturb.symbolic.diagrams import Diagram
    from perturb.symbolic.schedules import Schedule

__all__ = [
    "INPUT_ERRORS",
    "SCHEDULES",
    "CommandError",
    "VariadicOption",
    "cli",
    "contraction_names",
    "diagram_table",
    "main",
    "quiet_known_warnings",
    "schedule_options",
    "series_report",
]

_QUANTITY_LABELS = {
    "test": "E[test loss]",
    "train": "E[train loss]",
    "gap": "E[test loss − train loss]",
    "displacement": "E[θ_T − θ_0]",
}

# ----------------------------------------------------------------------- errors

INPUT_ERRORS: tuple[type[BaseException], ...] = (
    PerturbError,  # DataError, ModelSpecError, DeviceError
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)
"""Exceptions that mean bad input (arguments, files): ``error: …``, exit status 2."""

_READING_ERRORS = (EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
_ANNOUNCE_SECONDS = 1.0  # print the work estimate of a job expected to take longer
_QUIET_WARNINGS = (  # (message regex, category) of third-party warnings users cannot act on
    (r"`torch\.jit\.script", DeprecationWarning),
    (r"`torch\.jit\.script", FutureWarning),
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class CommandError(click.ClickException):
    """An error shown as one line ``<prefix>: <message>`` on stderr, then ``exit_code``.

    Example:
        >>> CommandError("lr must be positive\\n(got -1)").message
        'lr must be positive (got -1)'
    """

    def __init__(self, message: str, *, exit_code: int = 2, prefix: str = "error") -> None:
        super().__init__(_one_line(message))
        self.exit_code = exit_code
        self.prefix = prefix

    def show(self, file: Any = None) -> None:
        """Print the one line on ``file`` (stderr by default)."""
        click.echo(f"{self.prefix}: {self.format_message()}", file=file, err=file is None)


def _click_error(err: click.ClickException) -> CommandError:
    """A click error as one line, with where to look for help on usage errors."""
    message = err.format_message()
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        message = f"{message} (see '{ctx.command_path} --help')"
    return CommandError(message, exit_code=err.exit_code)


def _input_error(err: BaseException) -> CommandError:
    text = str(err) or type(err).__name__
    if isinstance(err, _READING_ERRORS):
        text = f"could not read an input file ({type(err).__name__}: {text})"
    return CommandError(text)


class _Group(click.Group):
    """The command group: every error becomes one line (see :class:`CommandError`)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:
            raise _click_error(err) from None

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (CommandError, click.exceptions.NoArgsIsHelpError):
            raise
        except click.ClickException as err:
            raise _click_error(err) from None
        except (click.exceptions.Exit, click.Abort):
            raise
        except INPUT_ERRORS as err:
            if debug:
                raise
            raise _input_error(err) from err
        except Exception as err:
            if debug:
                raise
            raise CommandError(
                f"{type(err).__name__}: {err} (rerun with --debug for the traceback)",
                exit_code=1,
                prefix="internal error",
            ) from err


def quiet_known_warnings() -> None:
    """Hide the third-party warnings a user of perturb can do nothing about.

    Only warnings matched by message and category are hidden (torch's deprecation of
    ``torch.jit.script``, which its own modules call); every other warning still shows.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     quiet_known_warnings()
        ...     warnings.warn("`torch.jit.script` is deprecated.", DeprecationWarning)
        ...     warnings.warn("something else", UserWarning)
        >>> [str(w.message) for w in caught]
        ['something else']
    """
    for message, category in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _bounded(order: int, schedule: Schedule, quantity: str, *, resummed: bool, force: bool) -> None:
    """Refuse a symbolic job over the work budget (unless forced); announce a long one."""
    from perturb.symbolic.cost import check_work, estimate_work

    estimate = estimate_work(order, schedule, quantity=quantity, resummed=resummed)
    check_work(estimate, force=force)
    if estimate.seconds > _ANNOUNCE_SECONDS:
        click.echo(f"perturb: {estimate.describe()}", err=True)


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
        >>> from perturb.symbolic.schedules import Online
        >>> print(series_report(1, Online(batch_size=1)))
        E[test loss] for online SGD (T steps, batch 1), to order η^1:
        η^0: (1)·l
        η^1: (-T)·G·G
    """
    from perturb.symbolic.options import describe
    from perturb.symbolic.series import series

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
        >>> from perturb.symbolic.diagrams import diagrams
        >>> from perturb.symbolic.schedules import Online
        >>> print(diagram_table(diagrams(2), Online()))  # doctest: +NORMALIZE_WHITESPACE
        #  tree         parts        |Aut|  embeddings      contraction
        0  [-1, 0, 1]   {0} {1} {2}  1      B**2*T*(T - 1)/2  G·H·G
        1  [-1, 0, 0]   {0} {1,2}    2      B*T             tr(C H)
        2  [-1, 0, 0]   {0} {1} {2}  2      B**2*T**2       G·H·G
    """
    import sympy as sp

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
        >>> from perturb.symbolic.diagrams import diagrams
        >>> names = contraction_names(diagrams(3))
        >>> names[1] == names[7]
        True
    """
    from perturb.symbolic.contractions import Contraction

    return [
        Contraction(
            parents=d.parents, parts=d.parts, form=form, open_root=quantity == "displacement"
        ).text
        for d in items
    ]


# ------------------------------------------------------------------- the group


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of an error (and third-party warnings) instead of one line.",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Perturbation theory of SGD: predict what SGD will do before running it.

    Under torchrun (torchrun --nproc-per-node K -m perturb ...) the measurement and
    the SGD trials are split across the processes; rank 0 prints and writes outputs.
    """
    if not debug:
        quiet_known_warnings()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
        from perturb.numeric.distributed import session

        ctx.with_resource(session())


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
@force_option
def series_command(
    order: int,
    schedule: Schedule,
    quantity: str,
    fmt: str,
    form: str,
    resummed: bool,
    integral: bool,
    force: bool,
) -> None:
    """Print the η-series of a quantity, order by order."""
    if resummed and quantity == "gap":
        raise click.BadParameter(
            "with --resummed print test and train separately", param_hint="--quantity"
        )
    _bounded(order, schedule, quantity, resummed=resummed, force=force)
    if not resummed:
        click.echo(series_report(order, schedule, quantity, fmt=fmt, form=form))
        return
    from perturb.symbolic.options import describe
    from perturb.symbolic.resummed import resummed_report

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
@force_option
def diagrams_command(
    order: int,
    schedule: Schedule,
    quantity: str,
    form: str,
    directory: Path | None,
    fmt: str | None,
    force: bool,
) -> None:
    """List the diagrams of one order with their counts and contractions."""
    if fmt is not None and directory is None:
        raise click.UsageError("--format applies to drawings only; give --draw DIR too")
    _bounded(order, schedule, quantity, resummed=False, force=force)
    from perturb.symbolic.diagrams import diagrams
    from perturb.symbolic.options import describe

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
@data_options(model_default=None, alias=True)
@checkpoint_option
@lr_option(required=True)
@size_option("steps", required=True, help="Steps T of online SGD.")
@size_option("batch_size", default=1, show_default=True, help="Batch size B.")
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
@click.option(
    "--resummed",
    is_flag=True,
    help="Re-summed diagrams (edges carry η(I − ηH)^{Δt−1}, --order counts edges, at most "
    "3), in a Krylov subspace of H built from Hessian-vector products.",
)
@krylov_options()
@click.option(
    "--estimator",
    type=click.Choice(["auto", "sketch", "tuples"]),
    default="auto",
    show_default=True,
    help="auto: a pilot picks sketches or tuples per statistic; see perturb.measure.",
)
@click.option(
    "--target-se",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Plan rows and replicates for this standard error (auto; largest over --lr).",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Plan for the least variance within this many full-batch gradients (auto).",
)
@click.option("--verbose", is_flag=True, help="Print the estimator chosen per statistic.")
@seed_option
@device_option
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def predict_command(
    dataset: str,
    data_dir: str | None,
    model_spec: str,
    checkpoint: str | None,
    lrs: tuple[float, ...],
    steps: int,
    batch_size: int,
    order: int,
    quantity: str,
    samples: int | None,
    exact: bool,
    resummed: bool,
    krylov_rank: int,
    krylov_higher_rank: int,
    estimator: str,
    target_se: float | None,
    budget: float | None,
    verbose: bool,
    seed: int,
    device: str,
    fmt: str,
) -> None:
    """Predict SGD's test loss, train loss or gap from a checkpoint, with error bars.

    Every prediction comes with an error estimate of its truncation, from the theory
    (the terms left out, the last continued geometrically; re-summed, plus the Krylov
    subspace's k vs k/2 difference and, for the test loss, the Hessian ladder: the loss
    the per-sample Hessians add, which no diagram with at most three edges holds).
    """
    options = dict(locals())
    from perturb.cli_predict import run_predict

    run_predict(**options)


def _orders_option(default: str) -> Any:
    return click.option(
        "--orders",
        cls=VariadicOption,
        type=click.IntRange(0, 4),
        metavar="D...",
        help=f"Orders of the series to report: --orders 0 1 2 3 (or repeat).  [default: {default}]",
    )


_population_option = click.option(
    "--population",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Images in the population SGD samples from (and the test loss averages).",
)
_threads_option = click.option(
    "--threads",
    type=POSITIVE,
    default=1,
    show_default=True,
    help="Torch threads for this run. One thread fixes the order of every float sum, so a "
    "seed gives the same results.json on any machine; more threads are faster and change "
    "the last digits.",
)


def _pin_threads(options: dict[str, Any]) -> None:
    """Take ``--threads`` out of the options and set torch's thread count to it."""
    threads = options.pop("threads", None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@cli.command("validate")
@data_options()
@lr_option(default="0.002 0.005 0.01 0.02 0.05")
@schedule_size_options(symbolic=False)
@click.option("--trials", type=click.IntRange(min=2), default=256, show_default=True)
@_orders_option("0 1 2 3")
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
    help="Also report the re-summed predictions (up to two and three edges).",
)
@krylov_options()
@curve_option
@seeds_option
@_population_option
@click.option(
    "--records",
    type=POSITIVE,
    default=5,
    show_default=True,
    help="Recorded steps per run, evenly spaced up to --steps.",
)
@click.option(
    "--records-log",
    is_flag=True,
    help="Space the recorded steps geometrically from 1 to --steps (long runs).",
)
@start_options
@device_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="perturb-validate",
    show_default=True,
    help="Folder for results.json, results.csv, gap.csv and plots.",
)
@budget_options
@_threads_option
@experiment_options
def validate_command(**options: Any) -> None:
    """Predict SGD's test loss and gap and compare with the mean of many real SGD runs."""
    _pin_threads(options)
    from perturb.experiments.outputs import VALIDATION_FILES, claimed_runs
    from perturb.experiments.validation import validate

    out, seeds = options.pop("out"), tuple(dict.fromkeys(options.pop("seeds")))
    experiment = build_experiment(options)
    seeds = seeds or (experiment.seed,)
    with claimed_runs(out, seeds, known=VALIDATION_FILES, name="--out") as runs:
        for seed, folder in runs.items():  # every folder checked and locked before any work
            result = validate(experiment.replace(seed=seed), out=folder)
            if len(seeds) > 1:
                click.echo(f"seed {seed}:")
            click.echo(result.table())
            written = "results.json, results.csv" + (", gap.csv" if result.gap else "")
            click.echo(f"wrote {folder}/{written} and plots")


@cli.command("compare")
@data_options()
@lr_option(default="0.005 0.02")
@batch_sizes_option(example="1 4", default="1 4")
@click.option(
    "--steps",
    cls=VariadicOption,
    type=int,
    metavar="T...",
    help="Step counts: --steps 25 50 100 (or repeat).  [default: 25 50 100]",
)
@click.option("--trials", type=click.IntRange(min=2), default=128, show_default=True)
@_orders_option("1 2 3")
@click.option("--resummed/--no-resummed", default=True, show_default=True)
@krylov_options()
@curve_option
@seed_option
@_population_option
@start_options
@device_option
@click.option("--out", type=click.Path(file_okay=False), default="compare-out", show_default=True)
@budget_options
@_threads_option
@experiment_options
def compare_command(**options: Any) -> None:
    """Real SGD against every theory (orders, re-summed, gradient flow, SDE, Lyapunov)."""
    _pin_threads(options)
    from perturb.experiments.comparison import compare
    from perturb.experiments.outputs import claimed

    out = options.pop("out")
    experiment = build_experiment(options)
    with claimed(out, name="--out"):  # checked and locked before any work
        result = compare(experiment, out=out, progress=True)
    click.echo(result.table())
    click.echo(f"wrote {out}/compare.json, compare.csv, compare.png")


cli.add_command(plan_command)


def main(args: Sequence[str] | None = None, *, standalone_mode: bool = True) -> Any:
    """Run the ``perturb`` command line (the console script's entry point).

    Args:
        args: the arguments; ``None`` reads ``sys.argv``.
        standalone_mode: click's standalone mode: handle errors and exit.  Pass
            ``False`` to call it from Python and get exceptions instead (a
            :class:`CommandError` whose ``__cause__`` is the original error).

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
