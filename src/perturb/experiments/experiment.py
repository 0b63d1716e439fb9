"""The experiment as a value: everything that decides what a validation or comparison runs.

An :class:`Experiment` is a frozen, keyword-only dataclass with a few groups: the
:class:`Data` (dataset, its folder, the population ``n``), the ``model`` spec, where
every run starts (:class:`Origin`: checkpoint, pretraining), how SGD trains
(:class:`Training`: the schedule, ``N``, ``E``, the recorded steps), the :class:`Grid` of
learning rates ``η``, batch sizes ``B`` and step counts ``T``, the number of ``trials``,
the ``seed``, the ``device``, what is measured and predicted (:class:`Measurement`: the
orders, re-summation, the Krylov ranks, the learning curve) and the :class:`Budget` of the
SGD trials.
:func:`perturb.validate` and :func:`perturb.compare` run one (their keyword options are
its fields), ``perturb validate|compare`` build one from their options, and the results
file of a run holds it whole (``"experiment"``), so the run can be repeated exactly:
``perturb validate --config results.json`` (or a small TOML file), ``--set key=value`` to
change one field.

Every field has a flat name (``trials``, ``lrs``, ``population``...; the leaf names of all
groups differ), used by :meth:`Experiment.replace`, :meth:`Experiment.with_settings` and
:meth:`Experiment.options`.  A field left ``None`` in :class:`Grid`, ``trials``,
``orders`` and the Krylov ranks takes the command's default (validate: ``η ∈ {0.002,
0.005, 0.01, 0.02, 0.05}``, ``T = 100``, ``B = 1``, 256 trials, orders 0..3; compare:
``η ∈ {0.005, 0.02}``, ``B ∈ {1, 4}``, ``T ∈ {25, 50, 100}``, 128 trials, orders 1..3;
both Krylov ranks ``(k, k_3) = (128, 32)``, :func:`perturb.plan` ``(64, 16)``); a
results file holds the values the run used.  Every field is checked when the experiment
is made, with an ``X must be …, got Y`` message; whether the fields fit together (a
training-set size for an online schedule) is the command's to check.

This module imports neither torch nor sympy.  TOML files are read with :mod:`tomllib`
(Python ≥ 3.11, else the ``tomli`` package if installed).

Example:
    >>> e = Experiment(trials=64, grid=Grid(lrs=(0.01, 0.02)))
    >>> e.with_settings(["population=32", "lrs=0.05"]).options()["lrs"]
    (0.05,)
    >>> Experiment.from_dict(e.to_dict()) == e
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perturb.checks import DEVICES, is_int, is_real

__all__ = [
    "DEFAULT_PRETRAIN_LR",
    "Budget",
    "Data",
    "Experiment",
    "Grid",
    "Measurement",
    "Origin",
    "Training",
    "experiment_of",
]

DEFAULT_PRETRAIN_LR = 0.3
"""Learning rate of the pretraining (:data:`perturb.experiments.pipeline.DEFAULT_PRETRAIN_LR`,
repeated here so that this module imports no torch; a test checks that they agree)."""
_SCHEDULES = ("online", "epochs", "gd")


# ------------------------------------------------------------------------ field checks


def _fail(name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {value!r}")


def _is_lr(value: object) -> bool:
    return is_real(value) and 0 < float(value) < math.inf


def _is_size(value: object) -> bool:
    return is_int(value) and value >= 1


def _is_order(value: object) -> bool:
    return is_int(value) and 0 <= value <= 4


def _text(name: str, value: object, *, optional: bool = False) -> str | None:
    """A non-empty string (a path becomes its string), or ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike) and optional:
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise _fail(name, "a non-empty string" + (" or None" * optional), value)
    return value


def _integer(name: str, value: object, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not is_int(value) or value < minimum:
        raise _fail(name, f"an integer ≥ {minimum}" + (" or None" * optional), value)
    return int(value)


def _positive(name: str, value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not is_real(value) or not 0 < float(value) < math.inf:
        raise _fail(name, "a positive finite number" + (" or None" * optional), value)
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(name, "one of " + ", ".join(choices), value)
    return str(value)


def _numbers(name: str, value: object, check: Any, one: str, many: str) -> tuple[Any, ...] | None:
    """``None``, or one value or a non-empty sequence of them, each passing ``check``."""
    if value is None:
        return None
    if is_real(value):
        if not check(value):
            raise _fail(name, f"{one} (or a non-empty list of them)", value)
        return (value,)
    expected = f"{many} (one or a non-empty list)"
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise _fail(name, expected, value)
    items = tuple(value)
    if not items or not all(check(v) for v in items):
        raise _fail(name, expected, value)
    return items


def _set(instance: object, name: str, value: object) -> None:
    object.__setattr__(instance, name, value)  # normalizing a frozen dataclass's field


# ------------------------------------------------------------------------------ groups


@dataclass(frozen=True, kw_only=True)
class Data:
    """What SGD samples from.

    Attributes:
        dataset: ``"digits"`` (built in), ``"mnist1d"`` (generated offline),
            ``"fashion-mnist"``, ``"cifar10"`` or ``"npz:PATH"``.
        data_dir: folder with the dataset's files (not needed for digits, mnist1d).
        population: ``n``, the images in the population (a deterministic subset).

    Example:
        >>> Data(population=64).population
        64
    """

    dataset: str = "digits"
    data_dir: str | None = None
    population: int = 256

    def __post_init__(self) -> None:
        _set(self, "dataset", _text("dataset", self.dataset))
        _set(self, "data_dir", _text("data_dir", self.data_dir, optional=True))
        _set(self, "population", _integer("population", self.population, 1))


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Where every run starts: the model's seeded initialization or a checkpoint, then
    ``pretrain`` steps of full-batch gradient descent at ``pretrain_lr``.

    Attributes:
        checkpoint: a weights-only ``state_dict`` of the model (a path), or ``None``.
        pretrain: steps of full-batch gradient descent on the population first.
        pretrain_lr: their learning rate.

    Example:
        >>> Origin(pretrain=200).pretrain_lr
        0.3
    """

    checkpoint: str | None = None
    pretrain: int = 0
    pretrain_lr: float = DEFAULT_PRETRAIN_LR

    def __post_init__(self) -> None:
        _set(self, "checkpoint", _text("checkpoint", self.checkpoint, optional=True))
        _set(self, "pretrain", _integer("pretrain", self.pretrain, 0))
        _set(self, "pretrain_lr", _positive("pretrain_lr", self.pretrain_lr))


@dataclass(frozen=True, kw_only=True)
class Training:
    """How SGD trains and which of its steps are recorded (validate).

    Attributes:
        schedule: ``"online"`` (fresh batches of ``B`` iid draws), ``"epochs"`` (passes
            over a training set of ``N`` iid draws) or ``"gd"`` (full batch on ``N``).
        train_size: ``N`` (epochs, gd; required there).
        epochs: ``E`` (epochs; default 1).
        shuffle: reshuffle the training set before each epoch (epochs).
        records: recorded steps per run, evenly spaced up to ``T``.
        records_log: space them geometrically from 1 to ``T`` instead.

    Example:
        >>> Training(schedule="gd", train_size=32).schedule
        'gd'
    """

    schedule: str = "online"
    train_size: int | None = None
    epochs: int | None = None
    shuffle: bool = False
    records: int = 5
    records_log: bool = False

    def __post_init__(self) -> None:
        _set(self, "schedule", _choice("schedule", self.schedule, _SCHEDULES))
        _set(self, "train_size", _integer("train_size", self.train_size, 1, optional=True))
        _set(self, "epochs", _integer("epochs", self.epochs, 1, optional=True))
        _set(self, "shuffle", _flag("shuffle", self.shuffle))
        _set(self, "records", _integer("records", self.records, 1))
        _set(self, "records_log", _flag("records_log", self.records_log))


@dataclass(frozen=True, kw_only=True)
class Grid:
    """The learning rates ``η``, batch sizes ``B`` and step counts ``T`` to run.

    ``None`` takes the command's default; one number is a grid of one.  validate runs
    one schedule (at most one ``B`` and one ``T``); compare runs every ``(η, B)`` and
    records each ``T``.

    Attributes:
        lrs: learning rates, positive and finite.
        batch_sizes: batch sizes ``B ≥ 1``.
        steps: step counts ``T ≥ 1``.

    Example:
        >>> Grid(lrs=0.01, steps=[25, 50]).steps
        (25, 50)
    """

    lrs: tuple[float, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        lrs = _numbers(
            "lrs", self.lrs, _is_lr, "a positive finite number", "positive finite numbers"
        )
        _set(self, "lrs", None if lrs is None else tuple(float(v) for v in lrs))
        for name in ("batch_sizes", "steps"):
            sizes = _numbers(name, getattr(self, name), _is_size, "an integer ≥ 1", "integers ≥ 1")
            _set(self, name, None if sizes is None else tuple(int(v) for v in sizes))


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """What is measured at ``θ_0`` and predicted from it.

    Attributes:
        orders: orders of the un-resummed series to report (0..4; ``None``: the
            command's default).
        resummed: also the re-summed predictions (up to two and three edges).
        gap: also predict and simulate the generalization gap (validate).
        max_hessian_parameters: largest model whose quadratic model materializes ``H``.
        krylov_rank: ``k``, the dimension of the Krylov subspace of ``H`` (≥ 2;
            ``None``: the command's default).
        krylov_higher_rank: ``k_3``, the basis vectors the third-order tensors are
            projected on (≥ 1; ``None``: the command's default).
        curve: also the learning curve along the noiseless path and its baselines
            (validate and compare, online schedule:
            :mod:`perturb.experiments.validation_curve`).
        curve_rank: ``k`` of the curve's Krylov subspace at each checkpoint (≥ 1).

    Example:
        >>> Measurement(orders=[0, 1]).orders
        (0, 1)
    """

    orders: tuple[int, ...] | None = None
    resummed: bool = True
    gap: bool = True
    max_hessian_parameters: int = 4000
    krylov_rank: int | None = None
    krylov_higher_rank: int | None = None
    curve: bool = False
    curve_rank: int = 32

    def __post_init__(self) -> None:
        orders = _numbers(
            "orders", self.orders, _is_order, "an integer in 0..4", "integers in 0..4"
        )
        _set(self, "orders", None if orders is None else tuple(int(v) for v in orders))
        _set(self, "resummed", _flag("resummed", self.resummed))
        _set(self, "gap", _flag("gap", self.gap))
        maximum = _integer("max_hessian_parameters", self.max_hessian_parameters, 0)
        _set(self, "max_hessian_parameters", maximum)
        _set(self, "krylov_rank", _integer("krylov_rank", self.krylov_rank, 2, optional=True))
        higher = _integer("krylov_higher_rank", self.krylov_higher_rank, 1, optional=True)
        _set(self, "krylov_higher_rank", higher)
        _set(self, "curve", _flag("curve", self.curve))
        _set(self, "curve_rank", _integer("curve_rank", self.curve_rank, 1))


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What the SGD trials may take.

    Attributes:
        max_memory: bytes (``None``: 4 GiB); time and memory are estimated first.
        force: run even when the estimate is over one hour or ``max_memory``.

    Example:
        >>> Budget(max_memory=2**30).max_memory
        1073741824.0
    """

    max_memory: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        _set(self, "max_memory", _positive("max_memory", self.max_memory, optional=True))
        _set(self, "force", _flag("force", self.force))


_GROUPS: dict[str, type] = {
    "data": Data,
    "start": Origin,
    "training": Training,
    "grid": Grid,
    "measurement": Measurement,
    "budget": Budget,
}


# -------------------------------------------------------------------------- experiment


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One validation or comparison, whole: data, model, start, schedule, grid, trials,
    seed, device, measurement and budget (see the module docstring).

    ``Experiment()`` is what ``perturb validate`` (and ``perturb compare``) run with no
    options.  Fields by their flat names: ``dataset``, ``data_dir``, ``population``
    (:class:`Data`); ``checkpoint``, ``pretrain``, ``pretrain_lr`` (:class:`Origin`);
    ``schedule``, ``train_size``, ``epochs``, ``shuffle``, ``records``, ``records_log``
    (:class:`Training`); ``lrs``, ``batch_sizes``, ``steps`` (:class:`Grid`);
    ``orders``, ``resummed``, ``gap``, ``max_hessian_parameters``, ``krylov_rank``,
    ``krylov_higher_rank``, ``curve``, ``curve_rank`` (:class:`Measurement`);
    ``max_memory``, ``force`` (:class:`Budget`); ``model``, ``trials``, ``seed``, ``device``.

    Attributes:
        model: ``"smooth-convnet"``, ``"mlp"`` or ``"pkg.module:factory"`` (a network
            passed to :func:`perturb.validate` or :func:`perturb.compare` as an
            ``nn.Module`` is recorded here by its class name, and such a run cannot be
            repeated from its file).
        data: the dataset and population.
        start: where every run starts.
        training: the schedule and the recorded steps.
        grid: the ``(η, B, T)`` grid.
        trials: ``K`` SGD runs per ``(η, B)``, at least 2 (``None``: the command's).
        seed: seed of the initialization, the population subset and the trials.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (whether it is there is checked
            when the experiment runs).
        measurement: what is measured and predicted.
        budget: what the SGD trials may take.

    Example:
        >>> e = Experiment.from_dict({"trials": 8, "grid": {"lrs": [0.01]}})
        >>> e.trials, e.grid.lrs, e.data.dataset
        (8, (0.01,), 'digits')
        >>> e.replace(seed=3, population=16).options()["population"]
        16
    """

    model: str = "smooth-convnet"
    data: Data = field(default_factory=Data)
    start: Origin = field(default_factory=Origin)
    training: Training = field(default_factory=Training)
    grid: Grid = field(default_factory=Grid)
    trials: int | None = None
    seed: int = 0
    device: str = "cpu"
    measurement: Measurement = field(default_factory=Measurement)
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        _set(self, "model", _text("model", self.model))
        for name, kind in _GROUPS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise _fail(name, f"a {kind.__name__}", value)
        _set(self, "trials", _integer("trials", self.trials, 2, optional=True))
        _set(self, "seed", _integer("seed", self.seed, 0))
        device = self.device
        if not isinstance(device, str) or _device_kind(device) not in DEVICES:
            raise _fail("device", "cpu, cuda or cuda:N", device)

    # ------------------------------------------------------------------ flat names

    def options(self) -> dict[str, Any]:
        """Every field by its flat name (tuples stay tuples), in declaration order.

        Example:
            >>> list(Experiment().options())[:4]
            ['model', 'dataset', 'data_dir', 'population']
        """
        flat: dict[str, Any] = {}
        for top in dataclasses.fields(self):
            value = getattr(self, top.name)
            if top.name in _GROUPS:
                flat.update({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
            else:
                flat[top.name] = value
        return flat

    def replace(self, **changes: Any) -> Experiment:
        """A copy with ``changes``: flat field names (``trials=8``, ``lrs=(0.01,)``) or
        whole groups (``data=Data(...)``).

        Raises:
            ValueError: an unknown name (the message lists the valid ones), or a value a
                field does not take.

        Example:
            >>> Experiment().replace(lrs=0.01, krylov_rank=16).measurement.krylov_rank
            16
        """
        groups: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in changes.items():
            where = None if name in _GROUPS else _place(name)
            if where is None:
                top[name] = value
            else:
                groups.setdefault(where, {})[name] = value
        for name, values in groups.items():
            if name in top:
                raise ValueError(f"give the group {name} or its fields {sorted(values)}, not both")
            top[name] = dataclasses.replace(getattr(self, name), **values)
        return dataclasses.replace(self, **top)

    def with_defaults(self, **defaults: Any) -> Experiment:
        """A copy with each field in ``defaults`` (flat names) that is ``None`` set to its
        default there: how a command fills in the fields left to it.

        Example:
            >>> Experiment(trials=8).with_defaults(trials=256, lrs=(0.01,)).options()["trials"]
            8
        """
        flat = self.options()
        for name in defaults:
            _place(name)  # an unknown name raises
        return self.replace(**{k: v for k, v in defaults.items() if flat[k] is None})

    def with_settings(self, settings: Iterable[str]) -> Experiment:
        """A copy with ``key=value`` settings (``--set``), each parsed as its field's type.

        Numbers are numbers, ``true``/``false`` flags, ``none`` clears a field that may be
        ``None``, and a list takes its items separated by commas or spaces
        (``lrs=0.01,0.02``); a dotted key (``grid.lrs``) names the group too.

        Raises:
            ValueError: a setting with no ``=``, an unknown key (the message lists the valid
                ones) or a value the field does not take.

        Example:
            >>> e = Experiment().with_settings(["trials=8", "grid.lrs=0.01 0.1", "gap=false"])
            >>> e.trials, e.grid.lrs, e.measurement.gap
            (8, (0.01, 0.1), False)
        """
        if isinstance(settings, str):
            raise _fail("settings", "a list of key=value strings", settings)
        changes: dict[str, Any] = {}
        for setting in settings:
            key, sep, text = str(setting).partition("=")
            key = key.strip()
            if not sep:
                raise _fail("a setting", "key=value", setting)
            group, _, name = key.rpartition(".")
            if _place(name, key) != (group or _PLACES[name]):
                raise _unknown(key)
            changes[name] = _parse(name, text.strip(), _HINTS[name])
        return self.replace(**changes)

    # --------------------------------------------------------------- dicts and files

    def to_dict(self) -> dict[str, Any]:
        """The whole experiment, JSON-ready: groups as dicts, tuples as lists.

        Example:
            >>> Experiment().to_dict()["data"]
            {'dataset': 'digits', 'data_dir': None, 'population': 256}
        """

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return list(value) if isinstance(value, tuple) else value

        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """The experiment ``data`` describes: :meth:`to_dict`'s form, or a part of it.

        Keys left out keep their defaults.  A group may also be given by its fields at
        the top level (``{"trials": 8, "lrs": [0.01]}``), as in a small TOML file.

        Raises:
            ValueError: a key that is no field (the message lists the valid ones), a
                group that is not a table, a field given twice, or a bad value.

        Example:
            >>> Experiment.from_dict({"data": {"population": 32}, "seed": 2}).data.population
            32
        """
        if not isinstance(data, Mapping):
            raise _fail("an experiment", "a table of fields", data)
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if key in _GROUPS:
                if not isinstance(value, Mapping):
                    raise _fail(key, "a table of " + ", ".join(_fields_of(key)), value)
                for name, item in value.items():
                    if name not in _fields_of(key):
                        valid = ", ".join(_fields_of(key))
                        raise ValueError(f"unknown field {key}.{name}; valid: {valid}")
                    _once(changes, name, item)
            else:
                _place(key)
                _once(changes, key, value)
        return cls().replace(**changes)

    def to_toml(self) -> str:
        """The experiment as a TOML file :meth:`load` reads (``None`` fields left out).

        Example:
            >>> print(Experiment(trials=8).to_toml().splitlines()[1])
            trials = 8
        """
        lines = []
        sections = []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                body = [f"{k} = {_toml(v)}" for k, v in value.items() if v is not None]
                sections += ["", f"[{key}]", *body]
            elif value is not None:
                lines.append(f"{key} = {_toml(value)}")
        return "\n".join(lines + sections) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Experiment:
        """Read an experiment from ``path``: the ``results.json`` (or ``compare.json``) of
        a run, which holds it as ``"experiment"``, a JSON file of :meth:`to_dict`'s form,
        or a TOML file (``.toml``) of that form.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a file that is not JSON or TOML, a results file without the
                experiment (written before it was recorded), or a bad experiment.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path = Path(folder, "e.toml")
            ...     _ = path.write_text('trials = 8\\n[grid]\\nlrs = [0.01]\\n')
            ...     Experiment.load(path).grid.lrs
            (0.01,)
        """
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() == ".toml":
            data = _read_toml(text, path)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}: expected a results.json, an experiment as JSON or a .toml "
                    f"file, got text that is not JSON ({error})"
                ) from None
            if isinstance(data, Mapping) and "config" in data:
                if "experiment" not in data:
                    raise ValueError(
                        f"{path}: expected a results file holding its experiment, got one "
                        "without (written before perturb recorded the experiment)"
                    )
                data = data["experiment"]
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _device_kind(device: str) -> str:
    kind, sep, index = device.partition(":")
    return kind if not sep or (kind == "cuda" and index.isdigit()) else ""


def _fields_of(group: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_GROUPS[group])]


_PLACES: dict[str, str | None] = {
    **{f.name: None for f in dataclasses.fields(Experiment) if f.name not in _GROUPS},
    **{name: group for group in _GROUPS for name in _fields_of(group)},
}
"""Each flat field name → its group (``None`` for the top-level fields)."""
_HINTS: dict[str, Any] = {
    name: typing.get_type_hints(_GROUPS[group] if group else Experiment)[name]
    for name, group in _PLACES.items()
}
"""Each flat field name → its type."""


def _unknown(key: str) -> ValueError:
    return ValueError(f"unknown experiment field {key!r}; valid: {', '.join(_PLACES)}")


def _place(name: str, key: str | None = None) -> str | None:
    """The group of the flat field ``name`` (``None``: top level); unknown names raise."""
    if name not in _PLACES:
        raise _unknown(key or name)
    return _PLACES[name]


def _once(changes: dict[str, Any], name: str, value: Any) -> None:
    if name in changes:
        raise ValueError(f"field {name} given twice (at the top level and in its group)")
    changes[name] = value


def experiment_of(
    experiment: Experiment | None, options: Mapping[str, Any], *, command: str
) -> tuple[Experiment, Any]:
    """The experiment a keyword function runs, and the network it was given if any.

    The experiment is ``experiment`` (default ``Experiment()``) with ``options``, its
    fields by flat name (:meth:`Experiment.replace`).  A ``model`` option that is no
    spec string but a network (an ``nn.Module``) is returned apart, and the experiment
    records its class name.

    Raises:
        TypeError: ``experiment`` is no :class:`Experiment`, or an option is no field
            (as for any unknown keyword argument; the message lists the valid ones).

    Example:
        >>> e, network = experiment_of(None, {"trials": 8}, command="validate")
        >>> e.trials, network
        (8, None)
    """
    options = dict(options)
    network = options.get("model")
    if isinstance(network, str) or network is None:
        network = None
    else:
        options["model"] = type(network).__name__
    if experiment is None:
        experiment = Experiment()
    if not isinstance(experiment, Experiment):
        raise TypeError(f"{command}() takes an Experiment, got {experiment!r}")
    unknown = [name for name in options if name not in _PLACES]
    if unknown:
        raise TypeError(
            f"{command}() got an unexpected keyword argument {unknown[0]!r}; "
            f"valid: {', '.join(_PLACES)}"
        )
    return experiment.replace(**options), network


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _parse(name: str, text: str, hint: Any) -> Any:
    """``text`` as a value of the type ``hint`` (``--set name=text``)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    kind = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        parts = text.replace(",", " ").split()
        if not parts:
            raise _fail(name, f"one or more {item.__name__}s", text)
        return tuple(_parse(name, part, item) for part in parts)
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _fail(name, "true or false", text)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise _fail(name, "an integer" if kind is int else "a number", text) from None
    return text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string


def _read_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ValueError(
                f"{path}: reading TOML needs Python ≥ 3.11 (tomllib) or the tomli package; "
                "give the experiment as JSON instead"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: expected a TOML file, got {error}") from None
