"""Tests for perturb.data: readers of the distributed dataset formats and their error paths."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from perturb.experiments.data import DATASET_NAMES, DataError, Dataset, load_dataset

# --------------------------------------------------------------------------- writers


def _idx_images(images: np.ndarray, *, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, *, magic: int = 2049) -> bytes:
    return struct.pack(">iI", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _fake_fashion(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.uint8
    )


def _write_fashion(
    folder: Path, *, n_train: int = 6, n_test: int = 4, gz: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = _fake_fashion(n, seed=n)
        for base, payload in (
            (f"{prefix}-images-idx3-ubyte", _idx_images(images)),
            (f"{prefix}-labels-idx1-ubyte", _idx_labels(labels)),
        ):
            if gz:
                (folder / f"{base}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / base).write_bytes(payload)
        out[split] = (images, labels)
    return out


def _cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _py2_style_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """Hand-assembled protocol-2 pickle as written by Python 2's cPickle (the distributed files).

    Strings are SHORT_BINSTRING/BINSTRING opcodes and the array is rebuilt through
    ``numpy.core.multiarray._reconstruct`` (the pre-NumPy-2 module path).
    """

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n = data.shape[0]
    raw = data.astype(np.uint8).tobytes()
    out = b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
    out += short(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
    out += b"K\x00\x85" + short(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
    out += b"(K\x01" + b"K" + bytes([n]) + b"M" + struct.pack("<H", 3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + short(b"|") + b"NNN" + b"J" + struct.pack("<i", -1)
    out += b"J" + struct.pack("<i", -1) + b"K\x00tb"  # dtype state, BUILD
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"  # array state, BUILD
    out += short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += b"u."  # SETITEMS, STOP
    return out


def _write_cifar(root: Path, *, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = _cifar_batch(3 + i % 2, seed=i)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    return batches


# --------------------------------------------------------------------------- Dataset


def test_dataset_validates_and_subsets_deterministically() -> None:
    x = torch.arange(20.0).view(20, 1, 1, 1)
    y = torch.arange(20) % 4
    ds = Dataset("toy", x, y, 4)
    assert len(ds) == 20 and ds.input_shape == (1, 1, 1)
    a, b, c = ds.subset(7, seed=3), ds.subset(7, seed=3), ds.subset(7, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert len(a) == 7 and len(set(a.x.flatten().tolist())) == 7
    assert torch.equal(a.y, (a.x.flatten().long() % 4))  # labels stay with their inputs
    assert ds.to(torch.float64).x.dtype == torch.float64
    with pytest.raises(ValueError, match="subset size"):
        ds.subset(21, seed=0)
    with pytest.raises(ValueError, match="labels must lie"):
        Dataset("bad", x, y, 3)
    with pytest.raises(ValueError, match="samples"):
        Dataset("bad", x, y[:5], 4)
    with pytest.raises(ValueError, match="int64"):
        Dataset("bad", x, y.int(), 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- digits


def test_digits_shapes_disjoint_deterministic() -> None:
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1297, 500)
    assert train.x.shape == (1297, 1, 8, 8) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.num_classes == test.num_classes == 10
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) == 1.0
    # Stratified: every class appears in both splits in about the same proportion.
    train_frac = torch.bincount(train.y, minlength=10).double() / len(train)
    test_frac = torch.bincount(test.y, minlength=10).double() / len(test)
    assert torch.allclose(train_frac, test_frac, atol=0.01)
    # Together the two splits are exactly the scikit-learn digits, each image once.
    from sklearn.datasets import load_digits

    def sorted_rows(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a.T[::-1])]

    both = torch.cat([train.x, test.x]).reshape(1797, 64).double().numpy()
    every = load_digits().images.reshape(1797, 64) / 16
    np.testing.assert_array_equal(sorted_rows(both), sorted_rows(every))
    again = load_dataset("DIGITS")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)


def test_digits_split_has_no_shared_indices() -> None:
    from perturb.experiments.data import _stratified_test_indices

    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    idx = _stratified_test_indices(labels, 500, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 500
    counts = np.bincount(labels[idx], minlength=10)
    assert np.all(np.abs(counts - np.bincount(labels) * 500 / len(labels)) < 1)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("layout", ["flat", "subdir", "plain"])
def test_fashion_mnist_round_trip(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "fashion-mnist" if layout == "subdir" else tmp_path
    written = _write_fashion(folder, gz=layout != "plain")
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", data_dir=tmp_path, split=split)
        images, labels = written[split]
        assert ds.x.shape == (len(labels), 1, 28, 28) and ds.x.dtype == torch.float32
        assert ds.num_classes == 10 and ds.name == "fashion-mnist"
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
        np.testing.assert_array_equal((ds.x[:, 0].numpy() * 255).round(), images)
        assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0


def test_fashion_mnist_needs_data_dir() -> None:
    with pytest.raises(DataError, match=r"needs data_dir.*train-images-idx3-ubyte"):
        load_dataset("fashion-mnist")


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    load_dataset("fashion-mnist", data_dir=tmp_path)  # train split unaffected
    with pytest.raises(DataError, match=r"missing .*t10k-labels-idx1-ubyte") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path, split="test")
    assert str(tmp_path) in str(info.value)


def test_fashion_mnist_bad_magic(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    images, _ = _fake_fashion(6, seed=6)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_images(images, magic=2049))
    )
    with pytest.raises(DataError, match=r"corrupt.*expected magic number 2051, got 2049"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_truncated(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    payload = _idx_images(_fake_fashion(6, seed=6)[0])
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(DataError, match=r"corrupt.*truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    # a cut-off gzip stream is reported too
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload)[:-20])
    with pytest.raises(DataError, match="corrupt gzip"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    # header shorter than its dimensions
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload[:9]))
    with pytest.raises(DataError, match=r"corrupt.*header"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_labels(np.zeros(5, np.uint8)))
    )
    with pytest.raises(DataError, match=r"6 images .* 5 labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_label_out_of_range_and_wrong_size(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_labels(np.array([0, 1, 2, 3, 4, 10], np.uint8)))
    )
    with pytest.raises(DataError, match=r"expected labels in 0..9, found 10"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    _write_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_images(np.zeros((6, 8, 8), np.uint8)))
    )
    with pytest.raises(DataError, match="expected 28×28 images, got 8×8"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_round_trip(tmp_path: Path, protocol: int, point_at_folder: bool) -> None:
    batches = _write_cifar(tmp_path, protocol=protocol)
    data_dir = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    train = load_dataset("cifar10", data_dir=data_dir)
    test = load_dataset("cifar10", data_dir=os.fspath(data_dir), split="test")
    names = [f"data_batch_{k}" for k in range(1, 6)]
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    assert train.x.shape == (len(labels), 3, 32, 32) and train.x.dtype == torch.float32
    np.testing.assert_array_equal((train.x.numpy() * 255).round().reshape(len(labels), -1), data)
    assert torch.equal(train.y, torch.from_numpy(labels.astype(np.int64)))
    assert test.x.shape == (4, 3, 32, 32) and test.num_classes == 10 and test.name == "cifar10"
    assert torch.equal(test.y, torch.tensor(batches["test_batch"][b"labels"]))
    # channel-major layout: first 1024 bytes are the red plane
    assert torch.allclose(test.x[0, 0].flatten() * 255, torch.from_numpy(
        batches["test_batch"][b"data"][0, :1024].astype(np.float32)))  # fmt: skip


def test_cifar10_python2_pickle(tmp_path: Path) -> None:
    """The real files were written by Python 2 with numpy.core paths; they must load."""
    batches = _write_cifar(tmp_path)
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5]
    blob = _py2_style_pickle(data, labels)
    assert b"numpy.core.multiarray" in blob and b"_codecs" not in blob
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    test = load_dataset("cifar10", data_dir=tmp_path, split="test")
    assert test.y.tolist() == labels
    np.testing.assert_array_equal((test.x.numpy() * 255).round().reshape(5, 3072), data)
    assert len(load_dataset("cifar10", data_dir=tmp_path)) == sum(
        len(batches[f"data_batch_{k}"][b"labels"]) for k in range(1, 6)
    )


def test_cifar10_needs_data_dir() -> None:
    with pytest.raises(DataError, match=r"cifar10 needs data_dir.*cifar-10-batches-py"):
        load_dataset("cifar10")


def test_cifar10_missing_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 file 'data_batch_3'") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_3") in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="missing CIFAR-10 file 'test_batch'"):
        load_dataset("cifar10", data_dir=empty, split="test")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"unsafe.*refusing to unpickle global (posix|nt)\.system"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    assert not marker.exists()
    # other gadgets are refused as well
    for payload in (
        pickle.dumps({b"data": eval, b"labels": []}),  # builtins.eval
        pickle.dumps({b"data": getattr, b"labels": []}),
    ):
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
        with pytest.raises(DataError, match="refusing to unpickle global builtins"):
            load_dataset("cifar10", data_dir=tmp_path, split="test")


def test_cifar10_truncated_and_malformed(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="corrupt CIFAR-10 file"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")

    def rewrite(batch: object) -> None:
        path.write_bytes(pickle.dumps(batch, protocol=2))

    good = _cifar_batch(3, seed=0)
    rewrite({**good, b"labels": [1, 2]})
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    rewrite({**good, b"labels": [1, 2, 10]})
    with pytest.raises(DataError, match=r"labels in 0..9, found range \[1, 10\]"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    rewrite({**good, b"data": np.zeros((3, 100), np.uint8)})
    with pytest.raises(DataError, match=r"expected b'data' of shape \(n, 3072\), got \(3, 100\)"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    rewrite({b"labels": good[b"labels"]})
    with pytest.raises(DataError, match="expected key b'data'"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    rewrite([1, 2, 3])
    with pytest.raises(DataError, match="expected a pickled dict"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")


# --------------------------------------------------------------------------- npz and names


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((7, 2, 5, 5), dtype=np.float32)
    y = np.array([0, 1, 2, 3, 4, 0, 1])
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, x_test=x[:2, :, :, :], y_test=np.array([5, 0]))
    ds = load_dataset(f"npz:{path}")
    assert ds.x.shape == (7, 2, 5, 5) and ds.num_classes == 6  # covers y_test's label 5
    np.testing.assert_array_equal(ds.x.numpy(), x)
    assert ds.y.tolist() == y.tolist()
    test = load_dataset(f"npz:{path}", split="test")
    assert len(test) == 2 and test.num_classes == 6
    # (n, H, W) gets a channel axis; uint8 pixels are scaled to [0, 1]
    path2 = tmp_path / "grey.npz"
    np.savez(path2, x=np.full((3, 4, 4), 255, np.uint8), y=np.array([0, 1, 1]))
    grey = load_dataset(f"npz:{path2}")
    assert grey.x.shape == (3, 1, 4, 4) and float(grey.x.max()) == 1.0 and grey.num_classes == 2
    with pytest.raises(DataError, match="x_test"):
        load_dataset(f"npz:{path2}", split="test")


def test_npz_tabular_rows_are_one_channel_sequences(tmp_path: Path) -> None:
    x = np.arange(12.0).reshape(4, 3)  # (n, d): 4 rows of 3 features, float64
    path = tmp_path / "table.npz"
    np.savez(path, x=x, y=np.array([0, 1, 1, 0]))
    ds = load_dataset(f"npz:{path}")
    assert ds.x.shape == (4, 1, 3) and ds.input_shape == (1, 3) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.x[:, 0].numpy(), x)  # values kept as stored


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing npz file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("npz:")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 1, 2, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"3 inputs .* 2 labels"):
        load_dataset(f"npz:{bad}")
    np.savez(bad, images=np.zeros((3, 1, 2, 2)), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match="expected arrays 'x' and 'y'"):
        load_dataset(f"npz:{bad}")
    np.savez(bad, x=np.zeros(3), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"\(n, d\), got shape \(3,\)"):
        load_dataset(f"npz:{bad}")
    np.savez(bad, x=np.zeros((3, 0)), y=np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"got shape \(3, 1, 0\)"):
        load_dataset(f"npz:{bad}")
    np.savez(bad, x=np.zeros((3, 2, 2)), y=np.array([0, -1, 1]))
    with pytest.raises(DataError, match="labels >= 0"):
        load_dataset(f"npz:{bad}")
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="corrupt npz"):
        load_dataset(f"npz:{bad}")


def test_npz_damaged_or_not_an_archive(tmp_path: Path) -> None:
    """Truncated, CRC-corrupt, random-byte, .npy and empty files: a one-line DataError each."""
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).random((20, 1, 4, 4)), y=np.arange(20) % 3)
    raw = good.read_bytes()
    bad = tmp_path / "bad.npz"
    flipped = bytearray(raw)
    flipped[200] ^= 0xFF  # inside x.npy's data: its CRC-32 no longer matches
    cases = {
        "truncated": (raw[: len(raw) // 2], r"damaged one \(File is not a zip file\)"),
        "crc": (bytes(flipped), r"damaged one \(Bad CRC-32 for file 'x\.npy'\)"),
        "random": (np.random.default_rng(1).bytes(2000), "found a file starting with"),
        "empty": (b"", "found an empty file"),
    }
    for name, (content, message) in cases.items():
        bad.write_bytes(content)
        with pytest.raises(DataError, match=message) as info:
            load_dataset(f"npz:{bad}")
        text = str(info.value)
        assert "expected a" in text and "numpy.savez" in text and "\n" not in text, name
        assert "pickle" not in text, name
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(bad)
    with pytest.raises(DataError, match=r"found a single-array \.npy file"):
        load_dataset(f"npz:{bad}")


def test_population_larger_than_the_data_is_said() -> None:
    ds = load_dataset("digits")
    with pytest.warns(UserWarning, match=r"^population 5000 > 1297 rows of digits: using 1297$"):
        assert ds.population(5000, seed=0) is ds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.population(1297, seed=0) is ds
        sub = ds.population(100, seed=3)
    assert torch.equal(sub.x, ds.subset(100, seed=3).x)
    with pytest.raises(ValueError, match="population size must be a positive integer"):
        ds.population(0, seed=0)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'") as info:
        load_dataset("mnist")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="validation")
    assert issubclass(DataError, ValueError)
