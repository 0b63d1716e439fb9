"""MNIST-1D generated offline from the ``mnist1d`` package's own templates, never downloaded.

MNIST-1D (Greydanus, 2020) turns ten hand-made 1-D digit templates into sequences of
length 40 by padding, shear, translation, correlated and iid noise; the package's
``make_dataset`` does it with numpy alone. perturb calls that generator with the
package's default arguments (``num_samples`` and ``seed`` as asked) and never its
``get_dataset``, whose default downloads a pickle. The generator seeds numpy's and
Python's global random state; both are restored afterwards.

Example:
    >>> x, y, x_test, y_test = mnist1d_arrays(samples=100, seed=0)
    >>> x.shape, x.dtype, y.dtype, x_test.shape
    ((80, 1, 40), dtype('float32'), dtype('int64'), (20, 1, 40))
"""

from __future__ import annotations

import random

import numpy as np

from perturb.checks import check_int
from perturb.errors import DataError

__all__ = ["SEQUENCE_LENGTH", "mnist1d_arrays"]

SEQUENCE_LENGTH = 40
"""Length of one MNIST-1D sequence with the package's default arguments."""


def mnist1d_arrays(
    *, samples: int = 5000, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D: ``(x, y, x_test, y_test)`` with ``x`` of shape ``(n, 1, 40)``.

    The split is the package's: the first 80% of the shuffled samples train, the rest
    test. Inputs are standardized over the whole set (mean 0, standard deviation 1), as
    the package does.

    Args:
        samples: total number of sequences (a multiple of 10 is used: ``samples // 10``
            per class).
        seed: the generator's seed; the same seed gives the same arrays.

    Returns:
        float32 inputs with one channel, int64 labels in ``0..9``, for train and test.

    Raises:
        DataError: the ``mnist1d`` package is not installed.
        ValueError: ``samples`` below 10 or ``seed`` negative.

    Example:
        >>> a = mnist1d_arrays(samples=50, seed=3)[0]
        >>> b = mnist1d_arrays(samples=50, seed=3)[0]
        >>> bool((a == b).all())
        True
    """
    samples = check_int("samples", samples, minimum=10)
    seed = check_int("seed", seed, minimum=0)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise DataError(
            f"MNIST-1D needs the mnist1d package ({err}); install it with pip install mnist1d"
        ) from None
    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def inputs(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)[:, None, :]

    def labels(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.int64)

    return inputs(data["x"]), labels(data["y"]), inputs(data["x_test"]), labels(data["y_test"])
