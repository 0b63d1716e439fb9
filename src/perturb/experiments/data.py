"""Datasets for validating perturbative predictions against real SGD runs.

Everything here reads data the user already has (or that ships inside an installed package);
nothing is ever downloaded.

Supported names for :func:`load_dataset`:

* ``"digits"``: the 8×8 handwritten digits shipped with scikit-learn (1797 images), split
  deterministically and stratified into 1297 train / 500 test images.
* ``"fashion-mnist"``: the four IDX files exactly as distributed by Zalando
  (``train-images-idx3-ubyte.gz`` ...), gzipped or not.
* ``"cifar10"``: the "python version" of CIFAR-10 exactly as distributed
  (``cifar-10-batches-py/data_batch_1`` ... ``test_batch``), read with a restricted unpickler.
* ``"npz:PATH"``: a NumPy ``.npz`` archive holding arrays ``x`` and ``y`` (and optionally
  ``x_test`` and ``y_test`` for the test split); ``x`` of shape ``(n, C, H, W)``, greyscale
  images ``(n, H, W)`` or tabular rows ``(n, d)`` (kept as sequences ``(n, 1, d)``: one
  channel of ``d`` features, for ``--model mlp``).

All images are returned as float32 tensors of shape ``(n, C, H, W)`` with values in ``[0, 1]``
(``npz`` float data is kept as stored), labels as int64 tensors of shape ``(n,)``.
"""

from __future__ import annotations

import builtins
import functools
import gzip
import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perturb.errors import DataError

__all__ = ["DATASET_NAMES", "SPARSE_LABEL_FACTOR", "DataError", "Dataset", "load_dataset"]

#: Canonical dataset names accepted by :func:`load_dataset` (plus ``"npz:PATH"``).
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist1d", "fashion-mnist", "cifar10", "npz:PATH")

#: ``npz`` labels are refused when the largest exceeds this many times the distinct ones.
SPARSE_LABEL_FACTOR = 100

_MNIST1D_SAMPLES = 5000  # the package's default: 4,000 train + 1,000 test sequences of length 40
_MNIST1D_SEED = 42

_ALIASES = {
    "digits": "digits",
    "sklearn-digits": "digits",
    "mnist1d": "mnist1d",
    "mnist-1d": "mnist1d",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
}

_SPLITS = ("train", "test")

_DIGITS_TEST_SIZE = 500
_DIGITS_SPLIT_SEED = 0

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")

_CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An in-memory classification dataset of images ``(C, H, W)`` or sequences ``(C, L)``.

    Attributes:
        name: Canonical dataset name (e.g. ``"digits"``).
        x: Float tensor of shape ``(n, C, H, W)`` (images) or ``(n, C, L)`` (sequences).
        y: Int64 label tensor of shape ``(n,)`` with values in ``[0, num_classes)``.
        num_classes: Number of classes.

    Examples:
        >>> ds = Dataset("toy", torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]), 2)
        >>> len(ds), ds.input_shape
        (4, (1, 2, 2))
        >>> ds.subset(2, seed=0)
        Dataset(name='toy', n=2, input_shape=(1, 2, 2), num_classes=2, dtype=torch.float32)
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.ndim not in (3, 4):
            raise ValueError(
                "Dataset.x must be a tensor of shape (n, C, H, W) or (n, C, L), got "
                f"{_desc(self.x)}"
            )
        if not self.x.is_floating_point():
            raise ValueError(f"Dataset.x must be a floating-point tensor, got {self.x.dtype}")
        if not isinstance(self.y, torch.Tensor) or self.y.ndim != 1 or self.y.dtype != torch.int64:
            raise ValueError(
                f"Dataset.y must be an int64 tensor of shape (n,), got {_desc(self.y)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Dataset.x has {self.x.shape[0]} samples but Dataset.y has {self.y.shape[0]}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), "
                f"got range [{int(self.y.min())}, {int(self.y.max())}]"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape ``(C, H, W)`` or ``(C, L)`` of one input.

        Examples:
            >>> y = torch.zeros(3, dtype=torch.int64)
            >>> Dataset("toy", torch.zeros(3, 3, 4, 5), y, 1).input_shape
            (3, 4, 5)
            >>> Dataset("toy", torch.zeros(3, 1, 40), y, 1).input_shape
            (1, 40)
        """
        return tuple(int(s) for s in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, dtype={self.x.dtype})"
        )

    def subset(self, n: int, *, seed: int) -> Dataset:
        """Return a deterministic random subset of ``n`` samples (kept in original order).

        Args:
            n: Number of samples, ``0 <= n <= len(self)``.
            seed: Seed of the (private) random generator choosing the samples.

        Returns:
            A new :class:`Dataset` with the same name and number of classes.

        Raises:
            ValueError: If ``n`` is out of range.

        Examples:
            >>> x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.zeros(10, dtype=torch.int64)
            >>> ds = Dataset("toy", x, y, 1)
            >>> a, b = ds.subset(3, seed=1), ds.subset(3, seed=1)
            >>> bool(torch.equal(a.x, b.x)), len(a)
            (True, 3)
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"subset size must be in [0, {len(self)}], got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=gen)[:n].sort().values.to(self.x.device)
        return Dataset(self.name, self.x[idx], self.y[idx], self.num_classes)

    def population(self, n: int, *, seed: int) -> Dataset:
        """The population of ``n`` rows SGD samples from: :meth:`subset`, or all rows.

        When ``n`` exceeds the number of rows every row is used, and a :class:`UserWarning`
        says so (the population is not silently smaller than asked for).

        Args:
            n: Number of rows wanted, ``n >= 1``.
            seed: Seed of the subset (see :meth:`subset`).

        Returns:
            ``self`` if ``n >= len(self)``, else ``self.subset(n, seed=seed)``.

        Raises:
            ValueError: If ``n < 1``.

        Examples:
            >>> import warnings
            >>> ds = Dataset("toy", torch.zeros(4, 1, 1, 1), torch.zeros(4, dtype=torch.int64), 1)
            >>> len(ds.population(3, seed=0))
            3
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     n = len(ds.population(10, seed=0))
            >>> n, str(caught[0].message)
            (4, 'population 10 > 4 rows of toy: using 4')
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"population size must be a positive integer, got {n!r}")
        if n < len(self):
            return self.subset(n, seed=seed)
        if n > len(self):
            warnings.warn(
                f"population {n} > {len(self)} rows of {self.name}: using {len(self)}",
                UserWarning,
                stacklevel=2,
            )
        return self

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Dataset:
        """Return a copy with ``x`` cast to ``dtype`` and both tensors moved to ``device``.

        Examples:
            >>> ds = Dataset("toy", torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.int64), 1)
            >>> ds.to(torch.float64).x.dtype
            torch.float64
        """
        x = self.x.to(device=device, dtype=dtype)
        y = self.y.to(device=device)
        return Dataset(self.name, x, y, self.num_classes)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    allow_sparse_labels: bool = False,
) -> Dataset:
    """Load a dataset by name, never downloading anything.

    Args:
        name: ``"digits"``, ``"mnist1d"`` (generated offline by the ``mnist1d``
            package, :mod:`perturb.experiments.mnist1d`), ``"fashion-mnist"``,
            ``"cifar10"`` or ``"npz:PATH"`` (case-insensitive; ``_`` may replace ``-``).
        data_dir: Folder holding the distributed files (required for ``"fashion-mnist"`` and
            ``"cifar10"``; ignored for ``"digits"`` and ``"npz:PATH"``). For Fashion-MNIST the
            files may also sit in ``data_dir/"fashion-mnist"``; for CIFAR-10 ``data_dir`` may
            contain ``cifar-10-batches-py/`` or be that folder itself.
        split: ``"train"`` or ``"test"``. For ``npz`` files the test split is read from arrays
            ``x_test``/``y_test``.
        allow_sparse_labels: ``npz``: accept labels whose largest value is more than
            :data:`SPARSE_LABEL_FACTOR` times the number of distinct labels (the model
            gets ``max label + 1`` outputs); refused by default.

    Returns:
        The requested split as a :class:`Dataset` (float32 ``x``: images in ``[0, 1]``,
        MNIST-1D sequences ``(1, 40)`` standardized; int64 ``y``).

    Raises:
        DataError: Unknown name or split, missing folder or file, or corrupt file.

    Examples:
        >>> train = load_dataset("digits")
        >>> test = load_dataset("digits", split="test")
        >>> len(train), len(test), train.input_shape, train.num_classes
        (1297, 500, (1, 8, 8), 10)
    """
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    if split not in _SPLITS:
        raise DataError(f"split must be one of {_SPLITS}, got {split!r}")
    if name.lower().startswith("npz:"):
        return _load_npz(name[4:], split=split, allow_sparse_labels=allow_sparse_labels)
    key = _ALIASES.get(name.strip().lower().replace("_", "-"))
    if key is None:
        raise DataError(
            f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)} "
            "(npz:PATH reads arrays x, y from a .npz file)"
        )
    if key == "digits":
        return _load_digits(split)
    if key == "mnist1d":
        return _load_mnist1d(split)
    if key == "fashion-mnist":
        return _load_fashion_mnist(data_dir, split)
    return _load_cifar10(data_dir, split)


# --------------------------------------------------------------------------- helpers


def _desc(obj: Any) -> str:
    if isinstance(obj, torch.Tensor | np.ndarray):
        return f"{type(obj).__name__} of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return type(obj).__name__


def _make(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, *, scale: float) -> Dataset:
    """Build a Dataset from uint8/float images (n, C, H, W) and integer labels."""
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if scale != 1.0:
        xf /= np.float32(scale)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return Dataset(name, torch.from_numpy(xf), yt, num_classes)


def _check_dir(data_dir: str | os.PathLike[str] | None, dataset: str, looked_for: str) -> Path:
    if data_dir is None:
        raise DataError(
            f"{dataset} needs data_dir: pass the folder holding {looked_for} "
            "(perturb never downloads data)"
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data_dir {str(path)!r} for {dataset} does not exist or is not a folder "
            f"(looked for {looked_for})"
        )
    return path


# --------------------------------------------------------------------------- digits


def _load_digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    test_idx = _stratified_test_indices(labels, _DIGITS_TEST_SIZE, seed=_DIGITS_SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    if split == "train":
        mask = ~mask
    x = images[mask][:, None, :, :]
    return _make("digits", x, labels[mask], 10, scale=16.0)


@functools.cache
def _mnist1d() -> tuple[np.ndarray, ...]:
    from perturb.experiments.mnist1d import mnist1d_arrays

    return mnist1d_arrays(samples=_MNIST1D_SAMPLES, seed=_MNIST1D_SEED)


def _load_mnist1d(split: str) -> Dataset:
    """MNIST-1D from the package's own generator: 4,000 train and 1,000 test sequences."""
    x, y, x_test, y_test = _mnist1d()
    if split == "train":
        return _make("mnist1d", x, y, 10, scale=1.0)
    return _make("mnist1d", x_test, y_test, 10, scale=1.0)


def _stratified_test_indices(labels: np.ndarray, n_test: int, *, seed: int) -> np.ndarray:
    """Indices of a stratified random test set of exactly ``n_test`` samples (sorted).

    Per-class test counts follow the class frequencies (largest-remainder rounding); the
    implementation uses only NumPy's ``default_rng`` so it is stable across library versions.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    order = np.lexsort((classes, -remainder))  # largest remainder first, ties by class
    take[order[: n_test - int(take.sum())]] += 1
    perm = np.random.default_rng(seed).permutation(len(labels))
    chosen = []
    for cls, k in zip(classes, take, strict=True):
        members = perm[labels[perm] == cls]
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- Fashion-MNIST


def _load_fashion_mnist(data_dir: str | os.PathLike[str] | None, split: str) -> Dataset:
    image_base, label_base = _FASHION_FILES[split]
    looked_for = f"{image_base}.gz and {label_base}.gz (or un-gzipped)"
    root = _check_dir(data_dir, "fashion-mnist", looked_for)
    image_path = _find_idx_file(root, image_base)
    label_path = _find_idx_file(root, label_base)
    images = _read_idx(image_path, magic=_IDX_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(label_path, magic=_IDX_LABELS_MAGIC, ndim=1)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"corrupt Fashion-MNIST file {str(image_path)!r}: expected 28×28 images, "
            f"got {images.shape[1]}×{images.shape[2]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"corrupt Fashion-MNIST files: {str(image_path)!r} holds {images.shape[0]} images "
            f"but {str(label_path)!r} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(
            f"corrupt Fashion-MNIST file {str(label_path)!r}: expected labels in 0..9, "
            f"found {int(labels.max())}"
        )
    return _make("fashion-mnist", images[:, None, :, :], labels, 10, scale=255.0)


def _find_idx_file(root: Path, base: str) -> Path:
    tried = []
    for sub in _FASHION_SUBDIRS:
        folder = root / sub if sub else root
        for fname in (base + ".gz", base):
            candidate = folder / fname
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise DataError(
        f"missing Fashion-MNIST file {base}.gz: looked for it (gzipped or not) at "
        + ", ".join(repr(t) for t in tried)
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (detected from the gzip magic bytes)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"corrupt gzip file {str(path)!r}: {err}") from err
    return raw


def _read_idx(path: Path, *, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (big-endian header) into a uint8 array."""
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(
            f"corrupt IDX file {str(path)!r}: expected a 4-byte magic number {magic}, "
            f"got only {len(data)} bytes"
        )
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise DataError(
            f"corrupt IDX file {str(path)!r}: expected magic number {magic}, got {found}"
        )
    if len(data) < header:
        raise DataError(
            f"corrupt IDX file {str(path)!r}: expected a {header}-byte header, "
            f"got {len(data)} bytes (truncated)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes"
        raise DataError(
            f"corrupt IDX file {str(path)!r}: dimensions {dims} need {expected} data bytes, "
            f"got {got} ({what})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------- CIFAR-10


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 pickle may reference: NumPy array reconstruction."""
    empty = np.empty(0, dtype=np.uint8)
    reconstruct = empty.__reduce__()[0]
    frombuffer = empty.__reduce_ex__(5)[0]
    scalar = np.uint8(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of bytes at protocol <= 2 go through codecs.encode(str, "latin1").
        ("_codecs", "encode"): _latin1_encode,
        ("codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for name in ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray"):
        for module in ("builtins", "__builtin__"):
            allowed[(module, name)] = getattr(builtins, name)
    return allowed


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal("refusing codecs.encode call other than str -> latin1")
    return obj.encode(encoding, errors)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside the allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy array reconstruction and plain containers."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_pickle_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"refusing to unpickle global {module}.{name}: only NumPy arrays and plain "
                "containers are allowed in a CIFAR-10 batch"
            ) from None


def _unpickle_batch(path: Path) -> dict[Any, Any]:
    data = _read_bytes(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DataError(f"unsafe CIFAR-10 file {str(path)!r}: {err}") from err
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: not a complete pickle "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(obj, dict):
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: expected a pickled dict, got {_desc(obj)}"
        )
    return obj


def _get_key(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(
        f"corrupt CIFAR-10 file {str(path)!r}: expected key b{key!r}, "
        f"found keys {sorted(map(repr, batch))}"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_batch(path)
    data = _get_key(batch, "data", path)
    labels = _get_key(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: expected b'data' as a uint8 array of shape "
            f"(n, 3072), got {_desc(data)}"
        )
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: expected b'data' of shape (n, 3072), "
            f"got {data.shape}"
        )
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise DataError(f"corrupt CIFAR-10 file {str(path)!r}: bad b'labels' ({err})") from err
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: expected b'labels' as n integers, got {_desc(y)}"
        )
    if y.shape[0] != data.shape[0]:
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: {data.shape[0]} images but {y.shape[0]} labels"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= 10):
        raise DataError(
            f"corrupt CIFAR-10 file {str(path)!r}: expected labels in 0..9, "
            f"found range [{int(y.min())}, {int(y.max())}]"
        )
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_cifar10(data_dir: str | os.PathLike[str] | None, split: str) -> Dataset:
    names = _CIFAR_FILES[split]
    looked_for = f"{_CIFAR_DIRNAME}/{{{', '.join(names)}}}"
    root = _check_dir(data_dir, "cifar10", looked_for)
    folder = root / _CIFAR_DIRNAME
    if not folder.is_dir() and any((root / n).is_file() for n in _CIFAR_FILES["test"] + names):
        folder = root  # data_dir points at cifar-10-batches-py itself
    xs, ys = [], []
    for fname in names:
        path = folder / fname
        if not path.is_file():
            raise DataError(
                f"missing CIFAR-10 file {fname!r}: expected it at {str(path)!r} "
                f"(data_dir should contain {_CIFAR_DIRNAME}/ as extracted from "
                "cifar-10-python.tar.gz, or be that folder)"
            )
        x, y = _read_cifar_batch(path)
        xs.append(x)
        ys.append(y)
    return _make("cifar10", np.concatenate(xs), np.concatenate(ys), 10, scale=255.0)


# --------------------------------------------------------------------------- npz


#: How every zip archive (so every ``.npz`` file) starts: a local file header or, for an
#: empty archive, the end-of-central-directory record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_npz_magic(path: Path) -> None:
    """Refuse a file that is not a zip archive before numpy guesses it is a pickle."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as err:
        raise DataError(f"cannot read npz file {str(path)!r}: {err}") from err
    if head.startswith(_ZIP_MAGIC):
        return
    if head.startswith(b"\x93NUMPY"):
        found = "a single-array .npy file"
    elif not head:
        found = "an empty file"
    else:
        found = f"a file starting with {head!r}"
    raise DataError(
        f"corrupt npz file {str(path)!r}: expected a NumPy .npz archive (a zip file, as "
        f"numpy.savez writes), found {found}; save it with numpy.savez(path, x=..., y=...)"
    )


def _check_npz_labels(path: Path, y: np.ndarray, all_labels: list, *, allow_sparse: bool) -> None:
    """Warn for one row or one class; refuse labels implying far more classes than occur."""
    if y.shape[0] == 1:
        warnings.warn(
            f"npz file {str(path)!r} has one row: SGD samples the same point every step "
            "and there is no sampling noise to predict",
            stacklevel=3,
        )
    labels = np.unique(np.concatenate([a.reshape(-1) for a in all_labels]))
    if labels.size == 1:
        warnings.warn(
            f"npz file {str(path)!r} has one class (label {int(labels[0])}): the "
            "cross-entropy of one class is 0 whatever the model, so SGD does not move",
            stacklevel=3,
        )
    top = int(labels.max()) + 1 if labels.size else 1
    if top > SPARSE_LABEL_FACTOR * labels.size and not allow_sparse:
        raise DataError(
            f"npz file {str(path)!r}: labels up to {top - 1} imply {top} classes but only "
            f"{labels.size} distinct labels occur (more than {SPARSE_LABEL_FACTOR}x): the "
            f"model would get {top} outputs; relabel them 0..{labels.size - 1} "
            "(numpy.unique(y, return_inverse=True)) or pass allow_sparse_labels=True"
        )


def _load_npz(path_str: str, *, split: str, allow_sparse_labels: bool = False) -> Dataset:
    if not path_str:
        raise DataError("npz dataset needs a path: use 'npz:/path/to/file.npz'")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"missing npz file: expected {str(path)!r} (from 'npz:{path_str}')")
    xkey, ykey = ("x", "y") if split == "train" else ("x_test", "y_test")
    _check_npz_magic(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            if xkey not in files or ykey not in files:
                hint = "" if split == "train" else " (the test split is read from x_test/y_test)"
                raise DataError(
                    f"corrupt npz file {str(path)!r}: expected arrays {xkey!r} and {ykey!r}, "
                    f"found {files}{hint}"
                )
            x = np.asarray(npz[xkey])
            y = np.asarray(npz[ykey])
            all_labels = [y] + [np.asarray(npz[k]) for k in ("y", "y_test") if k in files]
    except DataError:
        raise
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"corrupt npz file {str(path)!r}: expected a readable NumPy .npz archive, got "
            f"a damaged one ({err}); re-create it with numpy.savez(path, x=..., y=...)"
        ) from err
    if x.ndim in (2, 3):  # tabular rows (n, d): one channel of d; greyscale (n, H, W)
        x = x[:, None]
    if x.ndim not in (3, 4) or min(x.shape[1:], default=0) < 1:
        raise DataError(
            f"corrupt npz file {str(path)!r}: expected {xkey!r} of shape (n, C, H, W), "
            f"(n, H, W) or (n, d), got shape {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"corrupt npz file {str(path)!r}: {xkey!r} has dtype {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"corrupt npz file {str(path)!r}: expected {ykey!r} as n integer labels, "
            f"got shape {y.shape} and dtype {y.dtype}"
        )
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"corrupt npz file {str(path)!r}: {x.shape[0]} inputs in {xkey!r} but "
            f"{y.shape[0]} labels in {ykey!r}"
        )
    if y.size and int(y.min()) < 0:
        raise DataError(
            f"corrupt npz file {str(path)!r}: expected labels >= 0, found {int(y.min())}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"corrupt npz file {str(path)!r}: {xkey!r} contains NaN or inf")
    _check_npz_labels(path, y, all_labels, allow_sparse=allow_sparse_labels)
    num_classes = max((int(a.max()) + 1 for a in all_labels if a.size), default=1)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return _make(f"npz:{path_str}", x, y, num_classes, scale=scale)
