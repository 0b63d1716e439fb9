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

__all__ = ["DataError", "DeviceError", "ModelSpecError", "PerturbError"]


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
