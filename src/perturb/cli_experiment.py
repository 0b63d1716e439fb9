"""The experiment of ``perturb validate`` and ``perturb compare``, built once from the options.

:func:`experiment_options` adds ``--config PATH`` and ``--set KEY=VALUE`` to a command;
:func:`build_experiment` turns the command's options into one
:class:`~perturb.experiments.experiment.Experiment`:

* without ``--config``, the options given on the command line set their fields, and
  every option left out keeps the experiment's default (so ``perturb validate`` with no
  options runs ``Experiment()``);
* ``--config`` gives the whole experiment instead: the ``results.json`` (``compare.json``)
  of an earlier run, which holds it, or a small TOML file
  (:meth:`~perturb.experiments.experiment.Experiment.load`).  It is the base; the only
  options that go with it are ``--set`` (to change fields), ``--out`` and ``--threads``
  (where and how to run, not what): any other option is a usage error, so a run is never
  a silent mix of a file and flags;
* ``--set KEY=VALUE`` (repeatable) then changes single fields, by flat name, each
  parsed as its field's type
  (:meth:`~perturb.experiments.experiment.Experiment.with_settings`).

Example:
    >>> @click.command()
    ... @click.option("--trials", type=int, default=256)
    ... @experiment_options
    ... def show(**options):
    ...     click.echo(build_experiment(options).trials)
    >>> show(["--trials", "8", "--set", "trials=16"], standalone_mode=False)
    16
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from perturb.cli_options import option_group
from perturb.experiments.experiment import Experiment

__all__ = ["RUN_OPTIONS", "build_experiment", "experiment_options"]

RUN_OPTIONS = ("config", "settings", "out", "threads")
"""Options that are no field of the experiment (where and how to run): allowed with --config."""
_FIELDS = {"model_spec": "model", "batch_size": "batch_sizes", "seeds": "seed"}
"""Option names that differ from their experiment field's flat name."""
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def experiment_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--config PATH`` and ``--set KEY=VALUE`` (the command gets ``config``, ``settings``).

    Example:
        >>> @click.command()
        ... @experiment_options
        ... def show(config, settings):
        ...     click.echo(settings)
        >>> show(["--set", "trials=8", "--set", "lrs=0.01,0.02"], standalone_mode=False)
        ('trials=8', 'lrs=0.01,0.02')
    """
    return option_group(
        click.option(
            "--config",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            metavar="PATH",
            help="Run the experiment of an earlier run's results.json (compare.json) or of "
            "a TOML file; only --set, --out and --threads go with it.",
        ),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help="Change one field of the experiment (repeatable): --set trials=64 "
            "--set lrs=0.01,0.02 (see perturb.Experiment for the keys).",
        ),
    )(command)


def build_experiment(options: dict[str, Any], *, run_options: tuple[str, ...] = ()) -> Experiment:
    """The experiment the running command's ``options`` describe (see the module docstring).

    Takes ``config`` and ``settings`` out of ``options``; the other options name fields
    (``model_spec`` is ``model``, ``batch_size`` is ``batch_sizes``, ``seeds`` is
    ``seed``: its first value) or are :data:`RUN_OPTIONS` or the command's own
    ``run_options`` (options that are no field, allowed with ``--config`` too; the caller
    has taken their values out of ``options``).  An empty tuple (a repeatable
    option left out) leaves the field to the command; ``schedule`` left out means
    ``epochs`` when ``epochs`` or ``shuffle`` is given, else the default.

    Raises:
        click.UsageError: an option given with ``--config`` that is no run option, a
            ``--set`` that does not parse, or a file that is no experiment.

    Example:
        >>> @click.command()
        ... @click.option("--epochs", type=int, default=None)
        ... @click.option("--schedule", default=None)
        ... @experiment_options
        ... def show(**options):
        ...     click.echo(build_experiment(options).training.schedule)
        >>> show(["--epochs", "2"], standalone_mode=False)
        epochs
    """
    ctx = click.get_current_context()
    config, settings = options.pop("config", None), options.pop("settings", ())
    given = {
        name
        for name in ctx.params
        if name not in RUN_OPTIONS
        and name not in run_options
        and ctx.get_parameter_source(name) in _GIVEN
    }
    try:
        if config is not None:
            if given:
                flags = ", ".join(sorted(_flag(ctx, name) for name in given))
                raise click.UsageError(
                    f"--config gives the whole experiment; change its fields with --set "
                    f"KEY=VALUE, not {flags}",
                    ctx=ctx,
                )
            base = Experiment.load(config)
        else:
            changes = {_FIELDS.get(n, n): options[n] for n in given if n in options}
            if "seed" in changes and isinstance(changes["seed"], tuple):
                changes["seed"] = changes["seed"][0]
            if "schedule" not in changes and ("epochs" in changes or changes.get("shuffle")):
                changes["schedule"] = "epochs"  # validate's rule for --schedule left out
            base = Experiment().replace(**changes)
        return base.with_settings(settings)
    except ValueError as error:
        raise click.UsageError(str(error), ctx=ctx) from None


def _flag(ctx: click.Context, name: str) -> str:
    """The flag of the parameter ``name`` of the running command (its longest)."""
    for param in ctx.command.params:
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return name
