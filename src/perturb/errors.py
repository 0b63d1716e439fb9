"""The errors perturb raises for bad input, one class per kind of input.

Every error a user can cause is one of these (or a plain :class:`ValueError` /
:class:`TypeError` for an argument of the wrong value or type), with a one-line message
that says what was expected, what came, and what to do.  The command line prints that
line and exits with status 2; ``perturb --debug`` shows the traceback too.

Example:
    >>> issubclass(DataError, PerturbError) and issubclass(DataError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "DataError",
    "DeviceError",
    "ModelSpecError",
    "OutputError",
    "PerturbError",
    "StatisticsFileError",
]


class PerturbError(ValueError):
    """Base class of perturb's input errors (a :class:`ValueError`).

    Example:
        >>> try:
        ...     raise PerturbError("expected a positive learning rate, got -1")
        ... except ValueError as err:
        ...     print(err)
        expected a positive learning rate, got -1
    """


class DataError(PerturbError):
    """A dataset could not be found or read, or its files are corrupt.

    Example:
        >>> from perturb.experiments.data import load_dataset
        >>> try:
        ...     load_dataset("mnist-but-wrong")
        ... except DataError as err:
        ...     print("valid names" in str(err))
        True
    """


class ModelSpecError(PerturbError):
    """A model spec or checkpoint cannot be turned into a model perturb can differentiate.

    Example:
        >>> from perturb.experiments.models import build_model
        >>> try:
        ...     build_model("resnet", (1, 8, 8), 10)
        ... except ModelSpecError as err:
        ...     print("valid" in str(err))
        True
    """


class DeviceError(PerturbError):
    """The requested device cannot be used on this machine (for example CUDA without a GPU).

    Example:
        >>> from perturb.checks import check_device
        >>> check_device("cpu")
        'cpu'
    """


class BudgetError(PerturbError):
    """A job whose estimated time or memory is over its bound, refused before it starts.

    The message gives the estimate, the bound and the option that lifts it (``--force``,
    ``--max-memory``; ``force=True``, ``max_memory=`` in Python).

    Example:
        >>> from perturb.symbolic.cost import check_work, estimate_work
        >>> from perturb.symbolic.schedules import Online
        >>> try:
        ...     check_work(estimate_work(20, Online()), force=False)
        ... except BudgetError as err:
        ...     print("--force" in str(err))
        True
    """


class OutputError(PerturbError):
    """A results folder (``--out``) that cannot be used: a file, under a file, not
    writable, or being written by another run.  Raised before any work starts.

    Example:
        >>> from perturb.experiments.outputs import check_out
        >>> try:
        ...     check_out("", name="--out")
        ... except OutputError as err:
        ...     print(err)
        --out must be a folder path, got ''
    """


class StatisticsFileError(PerturbError):
    """A statistics file (``Statistics.save``) that cannot be read or does not hold
    consistent statistics: not a zip, truncated, fields missing or of the wrong type,
    values not finite or of the wrong shape, flags that contradict the values.

    Example:
        >>> from perturb.numeric.statistics import Statistics
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp) / "stats.npz"
        ...     _ = path.write_bytes(b"not a zip")
        ...     try:
        ...         Statistics.load(path)
        ...     except StatisticsFileError as err:
        ...         print("not a perturb statistics file" in str(err))
        True
    """
