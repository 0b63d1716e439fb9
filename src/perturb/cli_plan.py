"""``perturb plan``: choose ``η`` and ``B`` from a checkpoint, and with ``--check`` prove it.

The command builds one :class:`~perturb.experiments.experiment.Experiment` from its
options (as ``validate`` and ``compare`` do, :mod:`perturb.cli_experiment`: ``--config``
and ``--set`` included) and a :class:`~perturb.experiments.planning.PlanSettings` from
the options only a plan has (``--samples``, ``--compute``, ``--check``, the grid's
defaults and the range test), runs :func:`perturb.plan`, prints the plan's table and,
with ``--out``, writes ``plan.json``, ``plan.csv`` and ``plan.png`` there.  torch is
imported only when the command runs.

Example:
    >>> plan_command.name, "--check" in [o for p in plan_command.params for o in p.opts]
    ('plan', True)
"""

from __future__ import annotations

from typing import Any

import click

from perturb.cli_experiment import build_experiment, experiment_options
from perturb.cli_options import (
    POSITIVE,
    VariadicOption,
    batch_sizes_option,
    budget_options,
    data_options,
    device_option,
    krylov_options,
    lr_option,
    seed_option,
    start_options,
)

__all__ = ["PLAN_KRYLOV_RANKS", "PLAN_OPTIONS", "plan_command"]

PLAN_KRYLOV_RANKS = (64, 16)
"""A plan's Krylov ranks ``(k, k_3)`` for the help (those of
:data:`perturb.experiments.planning.DEFAULT_KRYLOV_RANKS`, repeated so that this module
imports no torch; ``tests/experiments/test_planning.py`` checks that they agree)."""

PLAN_OPTIONS = (
    "samples",
    "compute",
    "check",
    "decades",
    "per_decade",
    "range_min_lr",
    "range_max_lr",
    "range_steps",
)
"""The options that set :class:`~perturb.experiments.planning.PlanSettings`, no field of the
experiment (so they go with ``--config`` too)."""


def _settings(options: dict[str, Any]) -> Any:
    """The :class:`~perturb.experiments.planning.PlanSettings` of the plan's own options
    (taken out of ``options``; :func:`~perturb.cli_experiment.build_experiment` is told
    they are run options)."""
    from perturb.experiments.planning import PlanSettings
    from perturb.experiments.range_test import RangeTestSettings

    ctx = click.get_current_context()
    own = {name: options.pop(name) for name in PLAN_OPTIONS}
    try:
        return PlanSettings(
            samples=own["samples"] or None,
            compute=own["compute"] or None,
            decades=own["decades"],
            per_decade=own["per_decade"],
            check=own["check"],
            range_test=RangeTestSettings(
                min_lr=own["range_min_lr"], max_lr=own["range_max_lr"], steps=own["range_steps"]
            ),
        )
    except ValueError as error:
        raise click.UsageError(str(error), ctx=ctx) from None


@click.command("plan")
@data_options()
@lr_option(default="geometric, 3 decades, 2 a decade, up to GD's edge 2/h_max")
@batch_sizes_option(example="1 4 16", default="1 2 4 8 16 32 64")
@click.option(
    "--steps",
    cls=VariadicOption,
    type=POSITIVE,
    metavar="T...",
    help="Horizons in steps: --steps 200 1000.  [default: 200 1000]",
)
@click.option(
    "--samples",
    cls=VariadicOption,
    type=POSITIVE,
    metavar="S...",
    help="Horizons as sample budgets T·B (T = S/B), instead of --steps.",
)
@click.option(
    "--compute",
    cls=VariadicOption,
    type=click.FloatRange(min=0, min_open=True),
    metavar="F...",
    help="Horizons as compute budgets in full-batch gradients over the population "
    "(T = F·n/B), instead of --steps.",
)
@click.option(
    "--schedule",
    type=click.Choice(["online", "epochs"]),
    default=None,
    help="online (fresh batches) or epochs (passes over N points).  [default: online]",
)
@click.option("--train-size", "-N", type=POSITIVE, default=None, help="N (epochs).")
@click.option("--epochs", "-E", type=POSITIVE, default=None, help="Horizon in epochs E (epochs).")
@click.option("--shuffle", is_flag=True, help="Reshuffle each epoch (epochs).")
@click.option(
    "--trials",
    type=click.IntRange(min=2),
    default=None,
    help="SGD runs per grid point of --check (and the trust rule's resolution).  [default: 128]",
)
@click.option(
    "--population",
    type=click.IntRange(min=2),
    default=None,
    help="Images in the population SGD samples from.  [default: 256]",
)
@krylov_options(defaults=PLAN_KRYLOV_RANKS)
@click.option(
    "--check",
    is_flag=True,
    help="Run real SGD at every grid point and at the picks; report regrets, divergences "
    "and costs.",
)
@click.option("--decades", type=click.FloatRange(min=0, min_open=True), default=3.0,
              show_default=True, help="Decades of the default learning rates.")  # fmt: skip
@click.option("--per-decade", type=POSITIVE, default=2, show_default=True,
              help="Default learning rates per decade.")  # fmt: skip
@click.option("--range-min-lr", type=click.FloatRange(min=0, min_open=True), default=1e-8,
              show_default=True, help="Range test: first learning rate.")  # fmt: skip
@click.option("--range-max-lr", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Range test: last learning rate.")  # fmt: skip
@click.option("--range-steps", type=click.IntRange(min=13), default=100, show_default=True,
              help="Range test: steps of its run.")  # fmt: skip
@seed_option
@start_options
@device_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for plan.json, plan.csv and plan.png (none: print only).",
)
@budget_options
@click.option(
    "--threads",
    type=POSITIVE,
    default=1,
    show_default=True,
    help="Torch threads (one: the same numbers on any machine).",
)
@experiment_options
def plan_command(**options: Any) -> None:
    """Choose the learning rate and batch size from a checkpoint, before running anything.

    Predicts the test loss at the horizon for every (η, B) of a grid with its error
    estimate and trust verdict, draws the instability boundary, recommends the best
    trusted configuration and sets the noise scale's and the learning-rate range test's
    picks beside it; --check runs the grid for real and scores every pick.
    """
    import torch

    from perturb.experiments.outputs import claimed
    from perturb.experiments.planning import plan

    torch.set_num_threads(options.pop("threads"))
    out = options.pop("out")
    settings = _settings(options)
    experiment = build_experiment(options, run_options=PLAN_OPTIONS)
    if out is None:
        result = plan(experiment, settings, progress=True)
    else:
        with claimed(out, name="--out"):  # checked and locked before any work
            result = plan(experiment, settings, out=out, progress=True)
    click.echo(result.table())
    if out is not None:
        click.echo(f"wrote {out}/plan.json, plan.csv, plan.png")
